// Autograd of the whole-op kernel bam_fused_forward, for every backend that implements it: its
// backward is bam_fused_backward. In C++ for the reason cbam_fused_autograd.cpp gives (the fused
// module calls this op directly; a Python autograd wrapper costs ~0.1 ms a call). The formulas
// are the Python op's (attnkern::bam, register_autograd in attnkern/ops/bam.py): x, the (N, C) and
// (N, H, W) maps and the narrow hidden maps are saved, never a full-size intermediate.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace attnkern {
namespace {

using at::Tensor;
using at::TensorList;
using std::vector;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, vector<Tensor>, vector<Tensor>, vector<Tensor>>;
using BackwardOutputs = std::tuple<Tensor, vector<Tensor>, vector<Tensor>, vector<Tensor>, vector<Tensor>>;

ForwardOutputs call_forward(const Tensor& x, TensorList weights, TensorList biases, TensorList bn_weights,
                            TensorList bn_biases, TensorList bn_running_means, TensorList bn_running_vars,
                            at::ArrayRef<double> bn_eps, const c10::List<bool>& bn_training, int64_t dilation,
                            bool product) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attnkern::bam_fused_forward", "")
                       .typed<ForwardOutputs(const Tensor&, TensorList, TensorList, TensorList, TensorList,
                                             TensorList, TensorList, at::ArrayRef<double>, const c10::List<bool>&,
                                             int64_t, bool)>();
  return op.call(x, weights, biases, bn_weights, bn_biases, bn_running_means, bn_running_vars, bn_eps, bn_training,
                 dilation, product);
}

BackwardOutputs call_backward(const Tensor& grad, const Tensor& x, TensorList weights, TensorList biases,
                              TensorList bn_weights, TensorList bn_biases, TensorList bn_means, TensorList bn_vars,
                              at::ArrayRef<double> bn_eps, const c10::List<bool>& bn_training, int64_t dilation,
                              bool product, const Tensor& avg, const Tensor& channel_att, const Tensor& spatial_att,
                              TensorList hidden) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attnkern::bam_fused_backward", "")
                       .typed<BackwardOutputs(const Tensor&, const Tensor&, TensorList, TensorList, TensorList,
                                              TensorList, TensorList, TensorList, at::ArrayRef<double>,
                                              const c10::List<bool>&, int64_t, bool, const Tensor&, const Tensor&,
                                              const Tensor&, TensorList)>();
  return op.call(grad, x, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, bn_eps, bn_training, dilation,
                 product, avg, channel_att, spatial_att, hidden);
}

// Consecutive slices of a flat list, by count.
class Cursor {
 public:
  explicit Cursor(const variable_list& list) : list_(list) {}
  vector<Tensor> take(size_t count) {
    vector<Tensor> out(list_.begin() + next_, list_.begin() + next_ + count);
    next_ += count;
    return out;
  }

 private:
  const variable_list& list_;
  size_t next_ = 0;
};

class BamFused : public torch::autograd::Function<BamFused> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, TensorList weights, TensorList biases,
                               TensorList bn_weights, TensorList bn_biases, TensorList bn_running_means,
                               TensorList bn_running_vars, at::ArrayRef<double> bn_eps,
                               const c10::List<bool>& bn_training, int64_t dilation, bool product) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, avg, channel_att, spatial_att, hidden, batch_means, batch_vars] =
        call_forward(x, weights, biases, bn_weights, bn_biases, bn_running_means, bn_running_vars, bn_eps,
                     bn_training, dilation, product);
    const size_t num_layers = weights.size(), num_bn = bn_weights.size();
    // The statistics each BN normalised with: the batch's in training, the running buffers in eval
    // (those are updated in place after the op only in training).
    variable_list saved{x, avg, channel_att, spatial_att};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), biases.begin(), biases.end());
    saved.insert(saved.end(), bn_weights.begin(), bn_weights.end());
    saved.insert(saved.end(), bn_biases.begin(), bn_biases.end());
    for (size_t i = 0; i < num_bn; ++i) {
      saved.push_back(bn_training.get(i) ? batch_means[i] : bn_running_means[i]);
    }
    for (size_t i = 0; i < num_bn; ++i) {
      saved.push_back(bn_training.get(i) ? batch_vars[i] : bn_running_vars[i]);
    }
    saved.insert(saved.end(), hidden.begin(), hidden.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["num_layers"] = static_cast<int64_t>(num_layers);
    ctx->saved_data["num_bn"] = static_cast<int64_t>(num_bn);
    ctx->saved_data["bn_eps"] = bn_eps.vec();
    ctx->saved_data["bn_training"] = bn_training;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["product"] = product;
    variable_list outputs{y, avg, channel_att, spatial_att};
    for (const auto* group : {&hidden, &batch_means, &batch_vars}) {
      outputs.insert(outputs.end(), group->begin(), group->end());
    }
    ctx->mark_non_differentiable(variable_list(outputs.begin() + 1, outputs.end()));
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "attnkern::bam_fused_forward: double backward (create_graph=True) is not supported; "
                "use the reference modules in attnkern.reference for higher-order gradients");
    const size_t num_layers = ctx->saved_data["num_layers"].toInt();
    const size_t num_bn = ctx->saved_data["num_bn"].toInt();
    // One slot per tensor input (lists count each tensor), then eps, training, dilation, product.
    variable_list result(1 + 2 * num_layers + 4 * num_bn + 4);
    if (!grads[0].defined()) {
      return result;
    }
    const variable_list saved = ctx->get_saved_variables();
    Cursor cur(saved);
    const auto maps = cur.take(4);  // x, avg, channel_att, spatial_att
    const auto weights = cur.take(num_layers), biases = cur.take(num_layers);
    const auto bn_weights = cur.take(num_bn), bn_biases = cur.take(num_bn);
    const auto means = cur.take(num_bn), variances = cur.take(num_bn), hidden = cur.take(num_bn);
    const auto bn_eps = ctx->saved_data["bn_eps"].toDoubleVector();
    const auto bn_training = ctx->saved_data["bn_training"].toBoolList();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, d_weights, d_biases, d_bn_weights, d_bn_biases] =
        call_backward(grads[0], maps[0], weights, biases, bn_weights, bn_biases, means, variances, bn_eps,
                      bn_training, ctx->saved_data["dilation"].toInt(), ctx->saved_data["product"].toBool(),
                      maps[1], maps[2], maps[3], hidden);
    size_t slot = 0;
    result[slot++] = dx;
    for (const auto* group : {&d_weights, &d_biases, &d_bn_weights, &d_bn_biases}) {
      for (const Tensor& g : *group) {
        result[slot++] = g;
      }
    }
    return result;
  }
};

ForwardOutputs bam_fused_forward_autograd(const Tensor& x, TensorList weights, TensorList biases,
                                          TensorList bn_weights, TensorList bn_biases, TensorList bn_running_means,
                                          TensorList bn_running_vars, at::ArrayRef<double> bn_eps,
                                          const c10::List<bool>& bn_training, int64_t dilation, bool product) {
  const variable_list out = BamFused::apply(x, weights, biases, bn_weights, bn_biases, bn_running_means,
                                            bn_running_vars, bn_eps, bn_training, dilation, product);
  const size_t num_bn = bn_weights.size();
  Cursor cur(out);
  const auto maps = cur.take(4);
  auto hidden = cur.take(num_bn), means = cur.take(num_bn), variances = cur.take(num_bn);
  return {maps[0], maps[1], maps[2], maps[3], hidden, means, variances};
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, Autograd, m) {
  m.impl("bam_fused_forward", &attnkern::bam_fused_forward_autograd);
}
