// The whole CBAM / SE / gate forward and backward on the CPU, one C++ call each (schemas
// cbam_fused_forward / cbam_fused_backward in csrc/ops.cpp). They run the per-pass kernels of
// cbam_cpu.cpp and spatial_conv_cpu.cpp with the small math between them (shared MLP, spatial
// BatchNorm, sigmoids on (N, C) vectors and (N, 1, H, W) maps) done here with ATen: the same
// passes as the Python composition in attnkern/ops/cbam.py, without its ~30 (forward) and ~60
// (backward) Python-level calls, which cost more than the passes themselves at ResNet sizes.
// The small math mirrors attnkern/ops/gate_math.py line for line; the tests hold both against
// the reference modules. Where it pays (channel_gate_per_sample), the channel pool, the MLP and
// the passes after them run a sample per thread instead (channel_gate_per_sample_cpu), so that
// those passes read the sample from cache: for CBAM the spatial pool and conv, and where BN needs
// no batch statistics the rest of the spatial gate and the scaling. Its MLP is the same math as
// dot products, its BN the same affine map.

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "cpu/cpu_ops.h"
#include "cpu/cpu_utils.h"

namespace attnkern::cpu {
namespace {

using at::Tensor;
using std::optional;

using ForwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using BackwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

optional<Tensor> cast(const optional<Tensor>& t, at::ScalarType dtype) {
  return t.has_value() ? optional<Tensor>(t->to(dtype)) : std::nullopt;
}

// A per-channel vector broadcast over (N, C, H, W).
Tensor per_channel(const Tensor& v) {
  return v.view({1, -1, 1, 1});
}

// A parameter's gradient in the parameter's dtype; an empty tensor stands for "no such parameter".
Tensor param_grad(const Tensor& grad, const optional<Tensor>& param, const Tensor& like) {
  return param.has_value() ? grad.to(param->scalar_type()) : like.new_empty({0});
}

// The shared MLP's parameters in the acc dtype.
struct Mlp {
  Tensor fc1_weight;
  optional<Tensor> fc1_bias;
  Tensor fc2_weight;
  optional<Tensor> fc2_bias;
};

Mlp mlp_in(at::ScalarType acc, const Tensor& fc1_weight, const optional<Tensor>& fc1_bias,
           const optional<Tensor>& fc2_weight, const optional<Tensor>& fc2_bias) {
  TORCH_CHECK(fc2_weight.has_value(), "attnkern::cbam_fused: fc1_weight needs fc2_weight");
  return {fc1_weight.to(acc), cast(fc1_bias, acc), fc2_weight->to(acc), cast(fc2_bias, acc)};
}

Tensor mlp_hidden(const Tensor& pools, const Mlp& mlp) {
  return at::relu(at::linear(pools, mlp.fc1_weight, mlp.fc1_bias));
}

// gate = sigmoid(sum_p fc2(relu(fc1(pools[p])))) for the stacked pools (P, N, C).
Tensor mlp_forward(const Tensor& pools, const Mlp& mlp) {
  return at::sigmoid(at::linear(mlp_hidden(pools, mlp), mlp.fc2_weight, mlp.fc2_bias).sum(0));
}

// Below this many multiply-adds the MLP's backward runs as C++ loops (mlp_backward_cpu), above it
// as ATen GEMMs, whose ~15 calls cost ~0.1 ms at any size. Measured (N = 8, hidden C / 16): C = 64
// and 256 17-30 us against 107-141; C = 512 (1 M) 95 against 197. C = 1024 (4 M) stays on ATen
// (280 us), where the loops, single-threaded, would take about 4x their C = 512 time.
constexpr int64_t kLoopMlpMacs = int64_t(2) << 20;

// Returns (grad_pools (P, N, C), d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias) in the acc dtype.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mlp_backward(const Tensor& grad_gate, const Tensor& gate,
                                                                const Tensor& pools, const Mlp& mlp) {
  const int64_t P = pools.size(0), N = pools.size(1), C = pools.size(2), Ch = mlp.fc1_weight.size(0);
  if (use_vec_kernels() && N * C * Ch * (3 * P + 2) <= kLoopMlpMacs) {
    return mlp_backward_cpu(grad_gate, gate, pools, mlp.fc1_weight, mlp.fc1_bias, mlp.fc2_weight, mlp.fc2_bias);
  }
  const Tensor hidden = mlp_hidden(pools, mlp);
  const Tensor grad_logits = grad_gate * gate * (1 - gate);  // (N, C), shared by every pool
  const Tensor grad_hidden = grad_logits.mm(mlp.fc2_weight).unsqueeze(0) * (hidden > 0);
  return {
      grad_hidden.matmul(mlp.fc1_weight),
      grad_hidden.flatten(0, 1).t().mm(pools.flatten(0, 1)),
      grad_hidden.sum({0, 1}),
      grad_logits.t().mm(hidden.sum(0)),
      grad_logits.sum(0) * pools.size(0),
  };
}

// Biased (var, mean) per channel over (N, H, W); zeros for an empty batch instead of NaN. The one
// channel of CBAM's conv output in C++ (spatial_map_mean_var_cpu) where the vector kernels run.
std::pair<Tensor, Tensor> batch_stats(const Tensor& t) {
  const int64_t channels = t.size(1);
  if (channels == 1 && use_vec_kernels()) {
    const auto [mean, var] = spatial_map_mean_var_cpu(t);
    return {at::full({1}, var, t.options()), at::full({1}, mean, t.options())};
  }
  if (t.numel() == 0) {
    return {at::zeros({channels}, t.options()), at::zeros({channels}, t.options())};
  }
  const Tensor flat = t.transpose(0, 1).reshape({channels, -1});
  const Tensor mean = flat.mean(1);
  return {(flat - mean.unsqueeze(1)).square().mean(1), mean};
}

struct SpatialBn {
  optional<Tensor> weight, bias, running_mean, running_var;
  double eps;
  bool training;
};

// The running (mean, var) in the acc dtype, which BN normalises with outside training.
std::pair<Tensor, Tensor> running_stats(const SpatialBn& bn, at::ScalarType acc) {
  TORCH_CHECK(bn.running_mean.has_value() && bn.running_var.has_value(),
              "attnkern::cbam_fused: BatchNorm outside training needs running statistics");
  return {bn.running_mean->to(acc), bn.running_var->to(acc)};
}

// The (mean, var) BN normalises with: the batch's in training, else the running ones (acc dtype).
std::pair<Tensor, Tensor> bn_stats(const Tensor& conv_out, const SpatialBn& bn) {
  if (bn.training) {
    auto [var, mean] = batch_stats(conv_out);
    return {mean, var};
  }
  return running_stats(bn, conv_out.scalar_type());
}

// BN's affine map as logits = (conv_out - mean) * scale + shift: returns scale.
Tensor bn_scale(const Tensor& var, const SpatialBn& bn) {
  return bn.weight->to(var.scalar_type()) * at::rsqrt(var + bn.eps);
}

// BN as numbers for the C++ kernels, normalising with (mean, var) (one-element tensors).
SpatialBnScalars bn_scalars(const SpatialBn& bn, const Tensor& mean, const Tensor& var) {
  return {bn.weight->item<double>(), bn.bias->item<double>(), mean.item<double>(),
          1.0 / std::sqrt(var.item<double>() + bn.eps), bn.training};
}

// Returns (grad_pooled, d conv_weight, d conv_bias, d bn_weight, d bn_bias); absent ones undefined.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> spatial_backward(const Tensor& grad_gate, const Tensor& gate,
                                                                    const Tensor& pooled, const Tensor& conv_out,
                                                                    const Tensor& conv_weight, bool has_conv_bias,
                                                                    const SpatialBn& bn) {
  const auto acc = pooled.scalar_type();
  Tensor grad_logits, grad_conv_bias, grad_bn_weight, grad_bn_bias;
  if (use_vec_kernels()) {  // the same math in one C++ pass or two (spatial_logit_backward_cpu)
    optional<SpatialBnScalars> scalars;
    if (bn.weight.has_value()) {
      const auto [mean, var] = bn_stats(conv_out, bn);
      scalars = bn_scalars(bn, mean, var);
    }
    double d_weight, d_bias, d_conv_bias;
    std::tie(grad_logits, d_weight, d_bias, d_conv_bias) =
        spatial_logit_backward_cpu(grad_gate, gate, conv_out, scalars);
    const auto scalar = [&](double v) { return at::full({1}, v, conv_out.options()); };
    if (bn.weight.has_value()) {
      grad_bn_weight = scalar(d_weight);
      grad_bn_bias = scalar(d_bias);
    }
    grad_conv_bias = has_conv_bias ? scalar(d_conv_bias) : Tensor();
  } else {
    grad_logits = (grad_gate * gate * (1 - gate)).unsqueeze(1);  // (N, 1, H, W)
    if (bn.weight.has_value()) {
      const auto [mean, var] = bn_stats(conv_out, bn);
      const Tensor invstd = per_channel(at::rsqrt(var + bn.eps));
      const Tensor normalized = (conv_out - per_channel(mean)) * invstd;
      grad_bn_weight = (grad_logits * normalized).sum({0, 2, 3});
      grad_bn_bias = grad_logits.sum({0, 2, 3});
      Tensor grad_normalized = grad_logits * per_channel(bn.weight->to(acc));
      if (bn.training) {
        grad_normalized = grad_normalized - grad_normalized.mean({0, 2, 3}, true) -
                          normalized * (grad_normalized * normalized).mean({0, 2, 3}, true);
      }
      grad_logits = grad_normalized * invstd;
    }
    grad_conv_bias = has_conv_bias ? grad_logits.sum({0, 2, 3}) : Tensor();
  }
  auto [grad_pooled, grad_conv_weight] = spatial_conv_backward_cpu(grad_logits, pooled, conv_weight.to(acc));
  return {grad_pooled, grad_conv_weight, grad_conv_bias, grad_bn_weight, grad_bn_bias};
}

// Whether the channel gate and the pass after it run one sample per thread at a time
// (channel_gate_per_sample_cpu: the second read of x then comes from cache): when every thread gets
// a sample and the MLP's weights are small next to one or small outright. Each sample reads the
// weights (from L2 / L3), which measured cheaper than the batched path's ATen MLP and its separate
// passes at every size tried up to 2 MiB of weights: CBAM 8x2048x7x7 0.55 -> 0.42 ms, 2x2048x7x7
// 0.27 -> 0.13, 8x1024x14x14 0.85 -> 0.47, 8x256x2x2 0.11 -> 0.06 (forward, fp32, 2 threads). In
// NHWC only for samples up to 2 MiB: its per-sample pool (a column reduction) is slower than the
// batched path's, which the cache reuse pays for only while the sample stays in L2 / nearby L3
// (measured on SE: 8x512x28x28, 1.6 MB a sample, faster; 8x256x56x56, 3.2 MB, 1.27x slower).
bool channel_gate_per_sample(const Tensor& x, const Tensor& fc1_weight) {
  constexpr int64_t kNhwcSampleBytes = int64_t(2) << 20;
  constexpr int64_t kSmallWeightBytes = int64_t(4) << 20;
  const int64_t sample_bytes = x.numel() / std::max<int64_t>(1, x.size(0)) * x.element_size();
  const int64_t weight_bytes = 2 * fc1_weight.numel() * int64_t(sizeof(float));
  return use_vec_kernels() && x.size(0) >= at::get_num_threads() &&
         (4 * weight_bytes <= sample_bytes || weight_bytes <= kSmallWeightBytes) &&
         (layout_of(x) == Layout::NCHW || sample_bytes <= kNhwcSampleBytes);
}

// x in the layout the kernels take natively (a copy only for other strides), so that each pass
// does not make its own.
Tensor dense(const Tensor& x) {
  check_full("attnkern::cbam_fused", "x", x);
  return in_layout(x, layout_of(x));
}

// Each parameter given is floating and on x's device (the op computes in x's acc dtype whatever
// their floating dtype: autocast hands bf16 x float32 parameters), and BN's weight and bias come
// together.
void check_params(const Tensor& x, std::initializer_list<std::pair<const char*, const optional<Tensor>*>> params,
                  const optional<Tensor>& bn_weight, const optional<Tensor>& bn_bias) {
  for (const auto& [name, param] : params) {
    if (param->has_value()) {
      TORCH_CHECK(at::isFloatingType((*param)->scalar_type()), "attnkern::cbam_fused: ", name,
                  " must have a floating dtype, got ", (*param)->scalar_type());
      TORCH_CHECK((*param)->device() == x.device(), "attnkern::cbam_fused: ", name, " must be on x's device (",
                  x.device(), "), got ", (*param)->device());
    }
  }
  TORCH_CHECK(bn_weight.has_value() == bn_bias.has_value(),
              "attnkern::cbam_fused: bn_weight and bn_bias come together (an affine BN), got only one");
}

ForwardOutputs cbam_fused_forward_cpu(const Tensor& x_in, const optional<Tensor>& fc1_weight,
                                      const optional<Tensor>& fc1_bias, const optional<Tensor>& fc2_weight,
                                      const optional<Tensor>& fc2_bias, bool use_avg, bool use_max,
                                      const optional<Tensor>& conv_weight, const optional<Tensor>& conv_bias,
                                      const optional<Tensor>& bn_weight, const optional<Tensor>& bn_bias,
                                      const optional<Tensor>& bn_running_mean,
                                      const optional<Tensor>& bn_running_var, double bn_eps, bool bn_training,
                                      bool need_argmax) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // the small math runs in acc
  const Tensor x = dense(x_in);
  check_params(x,
               {{"fc1_weight", &fc1_weight}, {"fc1_bias", &fc1_bias}, {"fc2_weight", &fc2_weight},
                {"fc2_bias", &fc2_bias}, {"conv_weight", &conv_weight}, {"conv_bias", &conv_bias},
                {"bn_weight", &bn_weight}, {"bn_bias", &bn_bias}, {"bn_running_mean", &bn_running_mean},
                {"bn_running_var", &bn_running_var}},
               bn_weight, bn_bias);
  const int64_t N = x.size(0), C = x.size(1);
  const auto acc = acc_type_of(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const auto long_opts = x.options().dtype(at::kLong);
  // Placeholders for absent outputs are distinct tensors: op outputs may not alias.
  Tensor pooled = at::empty({0}, acc_opts), spatial_argmax = at::empty({0}, long_opts);
  Tensor spatial_gate = at::empty({0}, acc_opts), conv_out = at::empty({0}, acc_opts);
  Tensor batch_mean = at::empty({0}, acc_opts), batch_var = at::empty({0}, acc_opts);
  Tensor pools, channel_argmax = at::empty({0}, long_opts), channel_gate;
  // The channel gate and the passes after it a sample per thread where that pays (see
  // channel_gate_per_sample): the scaling for SE / ChannelGate; for CBAM the spatial pool and conv,
  // and the rest of the spatial gate and the scaling too unless BN needs the batch's statistics.
  const bool per_sample = fc1_weight.has_value() && channel_gate_per_sample(x, *fc1_weight);
  const SpatialBn bn{bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_eps, bn_training};
  if (per_sample) {
    optional<PerSampleSpatialGate> sample_spatial_gate;
    if (conv_weight.has_value()) {
      const bool whole = !bn_weight.has_value() || !bn_training;
      sample_spatial_gate = PerSampleSpatialGate{conv_weight->to(acc), cast(conv_bias, acc), whole, std::nullopt};
      if (whole && bn_weight.has_value()) {
        const auto [mean, var] = running_stats(bn, acc);
        sample_spatial_gate->bn = bn_scalars(bn, mean, var);
      }
    }
    const Mlp mlp = mlp_in(acc, *fc1_weight, fc1_bias, fc2_weight, fc2_bias);
    PerSampleGate gate = channel_gate_per_sample_cpu(x, mlp.fc1_weight, mlp.fc1_bias, mlp.fc2_weight, mlp.fc2_bias,
                                                     use_avg, use_max, sample_spatial_gate, need_argmax);
    pools = gate.pools;
    channel_gate = gate.channel_gate;
    channel_argmax = gate.channel_argmax;
    if (conv_weight.has_value()) {
      pooled = gate.pooled;
      spatial_argmax = gate.spatial_argmax;
      conv_out = gate.conv_out;
    }
    if (gate.y.defined()) {
      if (gate.spatial_gate.defined()) {
        spatial_gate = gate.spatial_gate;
      }
      return {gate.y, pools, channel_argmax, channel_gate, pooled, spatial_argmax, spatial_gate, conv_out,
              batch_mean, batch_var};
    }
  } else if (fc1_weight.has_value()) {
    TORCH_CHECK(use_avg || use_max, "attnkern::cbam_fused: the channel gate needs an avg or a max pool");
    if (use_max) {
      auto [avg, mx, arg] = channel_pool_cpu(x, need_argmax);
      pools = use_avg ? at::stack({avg, mx}) : mx.unsqueeze(0);
      channel_argmax = arg;
    } else {
      // SE: the mean alone, in ATen's reduction: the max and its argmax would double the pass's work.
      TORCH_CHECK(x.size(2) * x.size(3) > 0 || N * C == 0,
                  "attnkern::cbam_fused: cannot average over an empty H*W (x has shape ", x.sizes(), ")");
      pools = at::mean(x, {2, 3}, false, acc).unsqueeze(0);
    }
    channel_gate = mlp_forward(pools, mlp_in(acc, *fc1_weight, fc1_bias, fc2_weight, fc2_bias));
  } else {
    pools = at::empty({0, N, C}, acc_opts);
    channel_gate = at::ones({N, C}, acc_opts);
  }
  optional<Tensor> spatial_gate_arg;
  if (conv_weight.has_value()) {
    if (!per_sample) {
      std::tie(pooled, spatial_argmax) = spatial_pool_cpu(x, channel_gate, need_argmax);
      conv_out = spatial_conv_cpu(pooled, conv_weight->to(acc), cast(conv_bias, acc));
    }
    Tensor logits = conv_out;
    if (bn_weight.has_value()) {
      const auto [mean, var] = bn_stats(conv_out, bn);
      if (bn_training) {
        batch_mean = mean;
        batch_var = var;
      }
      logits = (logits - per_channel(mean)) * per_channel(bn_scale(var, bn)) + per_channel(bn_bias->to(acc));
    }
    spatial_gate = at::sigmoid(logits.select(1, 0));
    spatial_gate_arg = spatial_gate;
  }
  Tensor y = apply_gates_cpu(x, channel_gate, spatial_gate_arg);
  return {y, pools, channel_argmax, channel_gate, pooled, spatial_argmax, spatial_gate, conv_out, batch_mean, batch_var};
}

BackwardOutputs cbam_fused_backward_cpu(
    const Tensor& grad_in, const Tensor& x_in, const optional<Tensor>& fc1_weight, const optional<Tensor>& fc1_bias,
    const optional<Tensor>& fc2_weight, const optional<Tensor>& fc2_bias, const optional<Tensor>& conv_weight,
    const optional<Tensor>& conv_bias, const optional<Tensor>& bn_weight, const optional<Tensor>& bn_bias,
    const optional<Tensor>& bn_running_mean, const optional<Tensor>& bn_running_var, double bn_eps, bool bn_training,
    const Tensor& pools, const Tensor& channel_argmax, const Tensor& channel_gate, const Tensor& pooled,
    const Tensor& spatial_argmax, const Tensor& spatial_gate, const Tensor& conv_out, bool use_avg, bool use_max) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Tensor x = dense(x_in);
  const Tensor grad = in_layout(grad_in, layout_of(x));
  optional<Tensor> sg, grad_pooled, sarg;
  Tensor d_conv_weight, d_conv_bias, d_bn_weight, d_bn_bias;
  // With both gates the first pass also makes the channel gate's grad through the scaling, so
  // that its pass through the spatial pool reads x alone (scaling_grads_cpu).
  Tensor grad_channel_gate;
  if (conv_weight.has_value()) {
    Tensor grad_spatial_gate;
    if (fc1_weight.has_value()) {
      std::tie(grad_spatial_gate, grad_channel_gate) = scaling_grads_cpu(grad, x, channel_gate, spatial_gate);
    } else {
      grad_spatial_gate = spatial_gate_grad_cpu(grad, x, channel_gate);
    }
    const SpatialBn bn{bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_eps, bn_training};
    Tensor gp;
    std::tie(gp, d_conv_weight, d_conv_bias, d_bn_weight, d_bn_bias) = spatial_backward(
        grad_spatial_gate, spatial_gate, pooled, conv_out, *conv_weight, conv_bias.has_value(), bn);
    sg = spatial_gate;
    grad_pooled = gp;
    sarg = spatial_argmax;
  }
  optional<Tensor> grad_avg, grad_max, max_argmax;
  Tensor d_fc1_weight, d_fc1_bias, d_fc2_weight, d_fc2_bias;
  if (fc1_weight.has_value()) {
    if (conv_weight.has_value()) {
      grad_channel_gate.add_(spatial_pool_channel_grad_cpu(x, *grad_pooled, *sarg));
    } else {
      grad_channel_gate = channel_gate_grad_cpu(grad, x, sg, grad_pooled, sarg);
    }
    const Mlp mlp = mlp_in(pools.scalar_type(), *fc1_weight, fc1_bias, fc2_weight, fc2_bias);
    Tensor grad_pools;
    std::tie(grad_pools, d_fc1_weight, d_fc1_bias, d_fc2_weight, d_fc2_bias) =
        mlp_backward(grad_channel_gate, channel_gate, pools, mlp);
    int64_t next = 0;
    if (use_avg) grad_avg = grad_pools[next++];
    if (use_max) {
      grad_max = grad_pools[next++];
      max_argmax = channel_argmax;
    }
  }
  Tensor dx = cbam_input_grad_cpu(grad, x, channel_gate, sg, grad_pooled, sarg, grad_avg, grad_max, max_argmax);
  const Tensor& like = channel_gate;
  return {
      dx,
      param_grad(d_fc1_weight, fc1_weight, like),
      param_grad(d_fc1_bias, fc1_bias, like),
      param_grad(d_fc2_weight, fc2_weight, like),
      param_grad(d_fc2_bias, fc2_bias, like),
      param_grad(d_conv_weight, conv_weight, like),
      param_grad(d_conv_bias, conv_bias, like),
      param_grad(d_bn_weight, bn_weight, like),
      param_grad(d_bn_bias, bn_bias, like),
  };
}

}  // namespace
}  // namespace attnkern::cpu

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("cbam_fused_forward", &attnkern::cpu::cbam_fused_forward_cpu);
  m.impl("cbam_fused_backward", &attnkern::cpu::cbam_fused_backward_cpu);
}
