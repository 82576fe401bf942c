// The whole BAM forward and backward on the CPU, one C++ call each (schemas bam_fused_forward /
// bam_fused_backward in csrc/ops.cpp). They follow the Python composition of attnkern/ops/bam.py
// step by step: the same passes (combine kernels of bam_cpu.cpp), the same ATen calls for the two
// small stacks (dilated convs, BatchNorm folded in eval), without its ~100 Python-level calls per
// forward, which cost ~0.3 ms a call. Where bam_convs_cpu.cpp's kernels take a conv instead (the
// reduce conv both ways, the convs of narrow maps) they accumulate in acc; the reduce conv's
// grads stay in acc where the Python path rounds them to x's dtype (bf16 / fp16 results differ
// from it within the tests' tolerances). Those kernels also apply each hidden layer's BN and ReLU
// as they load its map (Activation), where the Python path writes the activation first. Names
// follow the Python functions; the tests hold both against the reference module.

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <functional>

#include "cpu/cpu_ops.h"
#include "cpu/cpu_utils.h"

namespace attnkern::cpu {
namespace {

using at::Tensor;
using at::TensorList;
using std::vector;

using ForwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, vector<Tensor>, vector<Tensor>, vector<Tensor>>;
using BackwardOutputs = std::tuple<Tensor, vector<Tensor>, vector<Tensor>, vector<Tensor>, vector<Tensor>>;

constexpr size_t kChannelLayers = 2;  // fc1, fc2 lead `weights` and `biases`; the spatial convs follow

Tensor channel_view(const Tensor& t) {
  return t.view({1, -1, 1, 1});
}

Tensor as_conv(const Tensor& weight) {
  return weight.dim() == 2 ? weight.view({weight.size(0), weight.size(1), 1, 1}) : weight;
}

bool is_pointwise(const Tensor& weight) {
  return weight.size(-2) == 1 && weight.size(-1) == 1;
}

vector<int64_t> padding(const Tensor& weight, int64_t dilation) {
  return {dilation * (weight.size(-2) / 2), dilation * (weight.size(-1) / 2)};
}

Tensor pixel_rows(const Tensor& t) {
  return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)});
}

Tensor pointwise(const Tensor& a, const Tensor& weight) {
  const int64_t n = a.size(0), ci = a.size(1), h = a.size(2), w = a.size(3);
  const Tensor matrix = weight.reshape({weight.size(0), ci});
  if (a.is_contiguous() && h * w > 1) {
    return at::bmm(matrix.expand({n, -1, -1}), a.view({n, ci, h * w})).view({n, matrix.size(0), h, w});
  }
  return at::mm(pixel_rows(a), matrix.t()).view({n, h, w, matrix.size(0)}).permute({0, 3, 1, 2});
}

std::pair<Tensor, Tensor> pointwise_backward(const Tensor& grad, const Tensor& a, const Tensor& weight) {
  const int64_t n = a.size(0), ci = a.size(1), h = a.size(2), w = a.size(3);
  const int64_t co = weight.size(0);
  const Tensor matrix = weight.reshape({co, ci});
  Tensor grad_a, grad_weight;
  if (a.is_contiguous() && grad.is_contiguous() && h * w > 1) {
    const Tensor grad_rows = grad.view({n, co, h * w}), a_rows = a.view({n, ci, h * w});
    grad_a = at::bmm(matrix.t().expand({n, -1, -1}), grad_rows).view({n, ci, h, w});
    grad_weight = at::bmm(grad_rows, a_rows.transpose(1, 2)).sum(0);
  } else {
    const Tensor grad_rows = pixel_rows(grad), a_rows = pixel_rows(a);
    grad_a = at::mm(grad_rows, matrix).view({n, h, w, ci}).permute({0, 3, 1, 2});
    grad_weight = at::mm(grad_rows.t(), a_rows);
  }
  return {grad_a, grad_weight.view(weight.sizes())};
}

Tensor conv_nobias(const Tensor& a, const Tensor& weight, int64_t dilation) {
  if (is_pointwise(weight)) {
    return pointwise(a, weight);
  }
  return at::conv2d(a, weight, {}, 1, padding(weight, dilation), dilation);
}

// Whether one of bam_convs_cpu.cpp's dilated conv kernels can run conv(a, weight): at most
// max_channels channels (kNarrowConvChannels for bam_narrow_conv_cpu, kWideConvChannels for
// bam_wide_conv_cpu), a square odd kernel, a in float / double.
bool own_conv(const Tensor& a, const Tensor& weight, int64_t max_channels) {
  return use_vec_kernels() && float_or_double(a) &&
         weight.size(0) <= max_channels && weight.size(1) <= max_channels && weight.size(2) == weight.size(3) &&
         weight.size(2) % 2 == 1;
}

bool narrow_conv(const Tensor& a, const Tensor& weight) {
  return own_conv(a, weight, kNarrowConvChannels);
}

// The layout of the spatial stack's hidden maps: NCHW for maps of at most kNarrowConvChannels
// channels, x's otherwise. The first conv makes them so, and every later step keeps its input's
// layout. The narrow convs run on NCHW maps, and ATen's channels-last BatchNorm vectorises over C:
// on 8x4x56x56 it took 690 us forward and 415 backward against 97 and 23 in NCHW; with
// channels_last x, copies to NCHW and back cost ~20 transposes a training step. ops/bam.py's fake
// follows the same rule.
Layout map_layout(int64_t channels, Layout x_layout) {
  return channels <= kNarrowConvChannels ? Layout::NCHW : x_layout;
}

// Whether a hidden map goes through the kernels of batch_norm_cpu.cpp: float / double, dense in
// its layout.
bool own_bn_kernels(const Tensor& z) {
  return use_vec_kernels() && z.is_contiguous(memory_format_of(layout_of(z))) &&
         float_or_double(z);
}

// A conv's input: a stack's input, or a hidden layer's output relu(z * scale + shift) per channel
// (InputTransform), which our conv kernels apply as they load z and ATen's take materialised.
struct Activation {
  Tensor z;
  InputTransform transform;
};

Tensor materialized(const Activation& in) {
  const InputTransform& t = in.transform;
  if (!t.relu) {
    return in.z;
  }
  if (!t.scale.defined()) {
    return at::relu(in.z);
  }
  if (own_bn_kernels(in.z)) {
    return scale_shift_relu_cpu(in.z, t.scale, t.shift);
  }
  return at::relu(at::addcmul(channel_view(t.shift), in.z, channel_view(t.scale)));
}

// Whether bam_logits_conv_cpu can run conv(a, weight): a 1x1 conv to one channel (the spatial
// stack's last), a in float / double.
bool logits_conv(const Tensor& a, const Tensor& weight) {
  return use_vec_kernels() && is_pointwise(weight) && weight.size(0) == 1 &&
         float_or_double(a);
}

// Whether bam_linear_cpu takes conv(a, weight): a 1x1 conv on 1x1 maps (the channel gate's
// layers), a in float / double, weights of at most kLinearMaxWeightBytes.
bool linear_layer(const Tensor& a, const Tensor& weight) {
  return use_vec_kernels() && is_pointwise(weight) && a.size(2) == 1 && a.size(3) == 1 &&
         float_or_double(a) &&
         weight.numel() * a.element_size() <= kLinearMaxWeightBytes;
}

// conv(a) in a's dtype, the output and the bias in acc (as ops/bam.py _conv).
Tensor conv(const Activation& in, const Tensor& weight, const Tensor& bias, int64_t dilation, at::ScalarType acc) {
  const Tensor& a = in.z;
  if (a.scalar_type() == acc && linear_layer(a, weight)) {
    const int64_t n = a.size(0), co = weight.size(0);
    return bam_linear_cpu(a.reshape({n, a.size(1)}), weight.reshape({co, a.size(1)}), bias.to(acc), in.transform)
        .view({n, co, 1, 1});
  }
  if (a.scalar_type() == acc && !is_pointwise(weight)) {
    if (narrow_conv(a, weight)) {
      return bam_narrow_conv_cpu(a, weight.to(acc), bias.to(acc), dilation, in.transform);
    }
    if (own_conv(a, weight, kWideConvChannels)) {
      return bam_wide_conv_cpu(a, weight.to(acc), bias.to(acc), dilation, in.transform);
    }
    return at::conv2d(materialized(in), weight.to(acc), bias.to(acc), 1, padding(weight, dilation),
                      dilation);  // bias in oneDNN
  }
  if (a.scalar_type() == acc && logits_conv(a, weight)) {
    return bam_logits_conv_cpu(a, weight.to(acc), bias.to(acc), in.transform);
  }
  return conv_nobias(materialized(in), weight.to(a.scalar_type()), dilation).to(acc) + channel_view(bias.to(acc));
}

// Computes a stack's first conv in place of conv(): (a, weight, bias) -> the output in acc.
using FirstConv = std::function<Tensor(const Tensor&, const Tensor&, const Tensor&)>;
// And its backward in place of conv_backward(): (grad in acc, a, weight in acc) -> (grad_a, or
// undefined where the caller adds it into dx itself; grad_weight).
using FirstConvBackward = std::function<std::pair<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&)>;

std::pair<Tensor, Tensor> conv_backward(const Tensor& grad, const Tensor& a, const Tensor& weight, int64_t dilation) {
  if (linear_layer(a, weight) && grad.scalar_type() == a.scalar_type()) {
    const int64_t n = a.size(0), ci = a.size(1), co = weight.size(0);
    auto [grad_a, grad_weight] =
        bam_linear_backward_cpu(grad.reshape({n, co}), a.reshape({n, ci}), weight.reshape({co, ci}));
    return {grad_a.view({n, ci, 1, 1}), grad_weight.view(weight.sizes())};
  }
  if (is_pointwise(weight)) {
    return pointwise_backward(grad, a, weight);
  }
  // Our kernels take the maps of up to kWideConvChannels channels: oneDNN's backward of a 16-channel
  // conv on 8x16x28x28 took 1.2-1.8 ms, ~4x its forward (benchmarks/NOTES.md).
  const bool own = own_conv(a, weight, kWideConvChannels) && grad.scalar_type() == a.scalar_type();
  const bool our_weight_grad = own && weight.size(2) == kWeightGradTaps;
  Tensor grad_a, grad_weight;
  if (our_weight_grad) {
    grad_weight = bam_conv_weight_grad_cpu(grad, a, dilation);
  } else {
    std::tie(grad_a, grad_weight, std::ignore) =
        at::convolution_backward(grad, a, weight, std::nullopt, {1, 1}, padding(weight, dilation),
                                 {dilation, dilation}, false, {0, 0}, 1, {!own, true, false});
  }
  if (own) {
    // A stride-1 'same' conv's input grad is the same conv of grad with the taps flipped and the
    // channels swapped; oneDNN took 1.9 ms for it on NCHW 8x4x56x56, ~8x its forward.
    const Tensor flipped = weight.flip({2, 3}).transpose(0, 1), no_bias = at::zeros({a.size(1)}, a.options());
    grad_a = narrow_conv(a, weight) ? bam_narrow_conv_cpu(grad, flipped, no_bias, dilation)
                                    : bam_wide_conv_cpu(grad, flipped, no_bias, dilation);
  }
  return {grad_a, grad_weight};
}

// Whether the 1x1 reduce conv runs in the kernels of bam_convs_cpu.cpp (bam_pool_reduce_cpu
// forward; bam_reduce_weight_grad_cpu and bam_input_grad_reduce_cpu backward, which need the vector
// kernels): a 1x1 conv with weights of at most kPoolReduceMaxWeightBytes.
bool reduce_in_kernels(const Tensor& weight, at::ScalarType acc) {
  return is_pointwise(weight) && weight.numel() * c10::elementSize(acc) <= kPoolReduceMaxWeightBytes;
}

struct Bn {
  Tensor weight, bias, mean, var;  // mean / var: running ones in the forward, those used in the backward
  double eps;
  bool training;
};

// The BNs, after checking the layout: weights / biases [fc1, fc2, reduce, dilated..., final], BNs
// [channel, reduce, dilated...].
vector<Bn> bn_list(TensorList weights, TensorList biases, TensorList bn_weights, TensorList bn_biases,
                   TensorList means, TensorList vars, at::ArrayRef<double> eps, const c10::List<bool>& training) {
  const size_t num_bn = bn_weights.size();
  TORCH_CHECK(weights.size() == biases.size() && weights.size() >= kChannelLayers + 2 &&
                  num_bn == weights.size() - 2,
              "attnkern::bam_fused: expected weights/biases [fc1, fc2, reduce, dilated..., final] and BNs "
              "[channel, reduce, dilated...]; got ",
              weights.size(), " weights, ", biases.size(), " biases, ", num_bn, " BNs");
  TORCH_CHECK(bn_biases.size() == num_bn && means.size() == num_bn && vars.size() == num_bn &&
                  eps.size() == num_bn && training.size() == num_bn,
              "attnkern::bam_fused: every BN needs a weight, bias, mean, var, eps and training flag");
  vector<Bn> bns;
  for (size_t i = 0; i < num_bn; ++i) {
    bns.push_back({bn_weights[i], bn_biases[i], means[i], vars[i], eps[i], training.get(i)});
  }
  return bns;
}

struct Affine {
  Tensor scale, shift, invstd;
};

// BN as y = z * scale + shift for the given statistics (ops/bam.py _bn_affine), in one loop over
// the channels: the ~7 ATen calls it took cost ~15 us a BN, a tenth of the whole op on small maps.
Affine bn_affine(const Bn& bn, const Tensor& mean_in, const Tensor& var_in, at::ScalarType acc) {
  const auto dense_acc = [&](const Tensor& t) { return t.to(acc).contiguous(); };
  const Tensor gamma = dense_acc(bn.weight), beta = dense_acc(bn.bias), mean = dense_acc(mean_in),
               var = dense_acc(var_in);
  Affine out{at::empty_like(gamma), at::empty_like(gamma), at::empty_like(gamma)};
  AT_DISPATCH_FLOATING_TYPES(acc, "attnkern_bam_bn_affine", [&] {
    for (int64_t o = 0; o < gamma.numel(); ++o) {
      const scalar_t invstd = scalar_t(1) / std::sqrt(var.const_data_ptr<scalar_t>()[o] + static_cast<scalar_t>(bn.eps));
      const scalar_t scale = gamma.const_data_ptr<scalar_t>()[o] * invstd;
      out.invstd.data_ptr<scalar_t>()[o] = invstd;
      out.scale.data_ptr<scalar_t>()[o] = scale;
      out.shift.data_ptr<scalar_t>()[o] = beta.const_data_ptr<scalar_t>()[o] - mean.const_data_ptr<scalar_t>()[o] * scale;
    }
  });
  return out;
}

struct Folded {
  Tensor weight, bias;
};

// The conv before an eval-mode BN with the BN folded in, as ops/bam.py computes it: W' = W * scale,
// b' = b * scale + shift, in one loop (ATen's multiply and addcmul took ~10 us a BN).
Folded fold_bn(const Tensor& weight, const Tensor& bias, const Bn& bn, at::ScalarType acc) {
  const Affine af = bn_affine(bn, bn.mean, bn.var, acc);
  const Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  Folded out{at::empty_like(w), at::empty_like(b)};
  const int64_t outputs = w.size(0), per_output = outputs == 0 ? 0 : w.numel() / outputs;
  AT_DISPATCH_FLOATING_TYPES(acc, "attnkern_bam_fold_bn", [&] {
    const scalar_t *wp = w.const_data_ptr<scalar_t>(), *bp = b.const_data_ptr<scalar_t>();
    const scalar_t *scale = af.scale.const_data_ptr<scalar_t>(), *shift = af.shift.const_data_ptr<scalar_t>();
    scalar_t *folded_w = out.weight.mutable_data_ptr<scalar_t>(), *folded_b = out.bias.mutable_data_ptr<scalar_t>();
    for (int64_t o = 0; o < outputs; ++o) {
      for (int64_t i = o * per_output; i < (o + 1) * per_output; ++i) {
        folded_w[i] = wp[i] * scale[o];
      }
      folded_b[o] = bp[o] * scale[o] + shift[o];
    }
  });
  return out;
}

struct StackForward {
  Tensor logits;
  vector<Tensor> hidden, means, vars;
};

// [conv, BN, ReLU] per BN, then the final conv (ops/bam.py _stack_forward); `first`, when given,
// computes the first conv. Each BN and ReLU is left to the next conv (Activation).
StackForward stack_forward(const Tensor& inp, const vector<Tensor>& weights, TensorList biases,
                           const vector<Bn>& bns, int64_t dilation, at::ScalarType acc,
                           const FirstConv& first = nullptr) {
  StackForward out;
  Activation a{inp};
  for (size_t k = 0; k < bns.size(); ++k) {
    const Bn& bn = bns[k];
    const auto layer_conv = [&](const Tensor& weight, const Tensor& bias) {
      return k == 0 && first ? first(a.z, weight, bias) : conv(a, weight, bias, dilation, acc);
    };
    if (bn.training) {
      const Tensor z = layer_conv(weights[k], biases[k]);
      Tensor mean, var;
      if (own_bn_kernels(z)) {
        std::tie(mean, var) = batch_norm_stats_cpu(z);
        const Affine af = bn_affine(bn, mean, var, acc);
        a = {z, {true, af.scale, af.shift}};
      } else {
        // ATen's BN: 3-8x faster than var_mean on these maps; var + eps is what its invstd inverts.
        auto [normalized, batch_mean, invstd] =
            at::native_batch_norm(z, bn.weight.to(acc), bn.bias.to(acc), {}, {}, true, 0.0, bn.eps);
        a = {at::relu(normalized)};
        mean = batch_mean;
        var = invstd.pow(-2) - bn.eps;
      }
      out.hidden.push_back(z);
      out.means.push_back(mean);
      out.vars.push_back(var);
    } else {
      const Folded folded = fold_bn(weights[k], biases[k], bn, acc);
      const Tensor pre = layer_conv(folded.weight, folded.bias);
      a = {pre, {true}};
      out.hidden.push_back(pre);
      out.means.push_back(inp.new_empty({0}, inp.options().dtype(acc)));  // distinct: outputs may not alias
      out.vars.push_back(inp.new_empty({0}, inp.options().dtype(acc)));
    }
  }
  out.logits = conv(a, weights.back(), biases.back(), dilation, acc);
  return out;
}

// Whether batch_norm_relu_backward_cpu takes a hidden layer's ReLU + BN backward: the hidden map in
// own_bn_kernels, its grad and activation in its dtype, the activation in its layout.
bool fused_bn_backward(const Tensor& grad, const Tensor& act, const Tensor& z) {
  return own_bn_kernels(z) && grad.scalar_type() == z.scalar_type() && act.scalar_type() == z.scalar_type() &&
         act.is_contiguous(memory_format_of(layout_of(z)));
}

struct StackGrads {
  Tensor grad_input;
  vector<Tensor> weights, biases, gammas, betas;
};

// The backward of stack_forward; bns carry the statistics each BN normalised with (ops/bam.py
// _stack_backward). `first`, when given, computes the first conv's backward.
StackGrads stack_backward(const Tensor& grad_logits, const Tensor& inp, const vector<Tensor>& weights,
                          TensorList biases, const vector<Bn>& bns, TensorList hidden, int64_t dilation,
                          at::ScalarType acc, const FirstConvBackward& first = nullptr) {
  const size_t num_hidden = bns.size();
  vector<Affine> affine;
  vector<Tensor> acts{inp};
  for (size_t k = 0; k < num_hidden; ++k) {
    affine.push_back(bn_affine(bns[k], bns[k].mean, bns[k].var, acc));
    // In eval hidden is the BN's output.
    const InputTransform bn_relu = bns[k].training ? InputTransform{true, affine[k].scale, affine[k].shift}
                                                   : InputTransform{true};
    acts.push_back(materialized({hidden[k], bn_relu}));
  }
  StackGrads out;
  out.weights.resize(num_hidden + 1);
  out.biases.resize(num_hidden + 1);
  out.gammas.resize(num_hidden);
  out.betas.resize(num_hidden);
  Tensor g = grad_logits;
  for (size_t k = num_hidden + 1; k-- > 0;) {
    const Tensor weight = weights[k].to(acc);
    Tensor conv_weight = weight;
    const Bn* bn = k < num_hidden ? &bns[k] : nullptr;
    if (bn != nullptr && bn->training && fused_bn_backward(g, acts[k + 1], hidden[k])) {
      std::tie(g, out.gammas[k], out.betas[k]) =
          batch_norm_relu_backward_cpu(in_layout(g, layout_of(hidden[k])), acts[k + 1], hidden[k],
                                       bn->weight.to(acc), bn->mean.to(acc), affine[k].invstd);
    } else if (bn != nullptr) {
      g = at::threshold_backward(g, acts[k + 1], 0);  // ReLU: g is now the grad wrt the BN output
      if (bn->training) {
        std::tie(g, out.gammas[k], out.betas[k]) =
            at::native_batch_norm_backward(g, hidden[k], bn->weight.to(acc), {}, {},
                                           bn->mean.to(acc), affine[k].invstd, true, bn->eps, {true, true, true});
        g = in_layout(g, layout_of(hidden[k]));  // as the activations the next steps pair it with
      } else {
        conv_weight = weight * affine[k].scale.view({-1, 1, 1, 1});
      }
    }
    const Tensor& a_in = acts[k];
    auto [grad_in, grad_weight] =
        k == 0 && first ? first(g, a_in, conv_weight)
                        : conv_backward(g.to(a_in.scalar_type()), a_in, conv_weight.to(a_in.scalar_type()), dilation);
    grad_weight = grad_weight.to(acc);
    // A bias before a batch-statistics BN cancels out of the output: its gradient is exactly zero.
    Tensor grad_bias = bn != nullptr && bn->training ? at::zeros({g.size(1)}, g.options()) : g.sum({0, 2, 3});
    if (bn != nullptr && !bn->training) {  // eval: map the folded conv's grads back
      const Tensor centred_bias = biases[k].to(acc) - bn->mean.to(acc);
      out.gammas[k] = ((weight * grad_weight).sum({1, 2, 3}) + centred_bias * grad_bias) * affine[k].invstd;
      out.betas[k] = grad_bias;
      grad_weight = grad_weight * affine[k].scale.view({-1, 1, 1, 1});
      grad_bias = grad_bias * affine[k].scale;
    }
    out.weights[k] = grad_weight;
    out.biases[k] = grad_bias;
    g = grad_in;
  }
  out.grad_input = g;
  return out;
}

// x in the layout the kernels take natively (a copy only for other strides).
Tensor dense(const Tensor& x) {
  check_full("attnkern::bam_fused", "x", x);
  return in_layout(x, layout_of(x));
}

vector<Tensor> channel_weights(TensorList weights) {
  return {as_conv(weights[0]), as_conv(weights[1])};
}

vector<Tensor> spatial_weights(TensorList weights) {
  return vector<Tensor>(weights.begin() + kChannelLayers, weights.end());
}

vector<Tensor> concat(vector<Tensor> a, const vector<Tensor>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Each gradient in its parameter's dtype and shape, contiguous (as the fake promises).
vector<Tensor> like_params(const vector<Tensor>& grads, TensorList params) {
  vector<Tensor> out;
  for (size_t i = 0; i < grads.size(); ++i) {
    out.push_back(grads[i].to(params[i].scalar_type()).reshape(params[i].sizes()).contiguous());
  }
  return out;
}

ForwardOutputs bam_fused_forward_cpu(const Tensor& x_in, TensorList weights, TensorList biases,
                                     TensorList bn_weights, TensorList bn_biases, TensorList bn_running_means,
                                     TensorList bn_running_vars, at::ArrayRef<double> bn_eps,
                                     const c10::List<bool>& bn_training, int64_t dilation, bool product) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // the small math runs in acc
  const Tensor x = dense(x_in);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const auto acc = acc_type_of(x.scalar_type());
  const vector<Bn> bns =
      bn_list(weights, biases, bn_weights, bn_biases, bn_running_means, bn_running_vars, bn_eps, bn_training);
  // The channel pool rides on the reduce conv's read of x where that pays (a 1x1 conv with small
  // weights; see bam_pool_reduce_cpu).
  Tensor avg;
  const FirstConv pool_and_reduce = [&](const Tensor& a, const Tensor& weight, const Tensor& bias) {
    const Layout z_layout = map_layout(weight.size(0), layout_of(a));
    if (!reduce_in_kernels(weight, acc)) {
      avg = std::get<0>(channel_pool_cpu(a, false));
      return in_layout(conv({a}, weight, bias, dilation, acc), z_layout);
    }
    auto [mean, z] = bam_pool_reduce_cpu(a, weight, bias, memory_format_of(z_layout));
    avg = mean;
    return z;
  };
  const StackForward spatial = stack_forward(x, spatial_weights(weights), biases.slice(kChannelLayers),
                                             vector<Bn>(bns.begin() + 1, bns.end()), dilation, acc, pool_and_reduce);
  TORCH_INTERNAL_ASSERT(avg.defined(), "the spatial stack starts with a conv and BN");
  const StackForward channel = stack_forward(avg.view({n, c, 1, 1}), channel_weights(weights),
                                             biases.slice(0, kChannelLayers), {bns[0]}, 1, acc);
  const Tensor channel_att = channel.logits.reshape({n, c});
  const Tensor spatial_att = spatial.logits.reshape({n, h, w});
  Tensor y = bam_combine_cpu(x, channel_att, spatial_att, product);
  vector<Tensor> hidden;
  for (const Tensor& t : channel.hidden) {
    hidden.push_back(t.contiguous());
  }
  for (const Tensor& t : spatial.hidden) {
    hidden.push_back(in_layout(t, map_layout(t.size(1), layout_of(x))));
  }
  return {y, avg, channel_att, spatial_att, hidden, concat(channel.means, spatial.means),
          concat(channel.vars, spatial.vars)};
}

BackwardOutputs bam_fused_backward_cpu(const Tensor& grad_in, const Tensor& x_in, TensorList weights,
                                       TensorList biases, TensorList bn_weights, TensorList bn_biases,
                                       TensorList bn_means, TensorList bn_vars, at::ArrayRef<double> bn_eps,
                                       const c10::List<bool>& bn_training, int64_t dilation, bool product,
                                       const Tensor& avg, const Tensor& channel_att, const Tensor& spatial_att,
                                       TensorList hidden) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Tensor x = dense(x_in);
  const Tensor grad = in_layout(grad_in, layout_of(x));
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const auto acc = acc_type_of(x.scalar_type());
  const vector<Bn> bns = bn_list(weights, biases, bn_weights, bn_biases, bn_means, bn_vars, bn_eps, bn_training);
  TORCH_CHECK(hidden.size() == bns.size(), "attnkern::bam_fused_backward: expected ", bns.size(),
              " hidden maps, got ", hidden.size());
  // The 1x1 reduce conv's input gradient is added inside dx's pass where the forward's kernel
  // took that conv (bam_input_grad_reduce_cpu, after the combine backward's pass wrote dx's direct
  // term), and its weight grad is ours too.
  const bool reduce_in_pass = use_vec_kernels() && reduce_in_kernels(weights[kChannelLayers], acc);
  Tensor grad_channel, grad_spatial, dx;
  if (reduce_in_pass) {
    std::tie(grad_channel, grad_spatial, dx) =
        bam_combine_backward_with_direct_cpu(grad, x, channel_att, spatial_att, product);
  } else {
    std::tie(grad_channel, grad_spatial) = bam_combine_backward_cpu(grad, x, channel_att, spatial_att, product);
  }
  const StackGrads channel =
      stack_backward(grad_channel.view({n, c, 1, 1}), avg.view({n, c, 1, 1}), channel_weights(weights),
                     biases.slice(0, kChannelLayers), {bns[0]}, hidden.slice(0, 1), 1, acc);
  Tensor grad_reduce, reduce_weight;
  const FirstConvBackward reduce_backward = [&](const Tensor& g, const Tensor& a, const Tensor& weight) {
    if (!reduce_in_pass) {
      return conv_backward(g.to(a.scalar_type()), a, weight.to(a.scalar_type()), dilation);
    }
    grad_reduce = in_layout(g, layout_of(a));  // once, for both kernels
    reduce_weight = weight;
    return std::pair<Tensor, Tensor>{Tensor(), bam_reduce_weight_grad_cpu(a, grad_reduce).view(weight.sizes())};
  };
  const StackGrads spatial =
      stack_backward(grad_spatial.view({n, 1, h, w}), x, spatial_weights(weights), biases.slice(kChannelLayers),
                     vector<Bn>(bns.begin() + 1, bns.end()), hidden.slice(1), dilation, acc, reduce_backward);
  const Tensor grad_avg = channel.grad_input.view({n, c});
  // Without reduce_in_pass the reduce conv's input gradient is this op's own temporary: dx overwrites it.
  dx = reduce_in_pass ? bam_input_grad_reduce_cpu(dx, grad_avg, reduce_weight, grad_reduce)
                      : bam_input_grad_into_partial_cpu(grad, x, channel_att, spatial_att, product, grad_avg,
                                                        spatial.grad_input);
  return {dx, like_params(concat(channel.weights, spatial.weights), weights),
          like_params(concat(channel.biases, spatial.biases), biases),
          like_params(concat(channel.gammas, spatial.gammas), bn_weights),
          like_params(concat(channel.betas, spatial.betas), bn_biases)};
}

}  // namespace
}  // namespace attnkern::cpu

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("bam_fused_forward", &attnkern::cpu::bam_fused_forward_cpu);
  m.impl("bam_fused_backward", &attnkern::cpu::bam_fused_backward_cpu);
}
