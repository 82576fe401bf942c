// Autograd of the whole-op kernel cbam_fused_forward, for every backend that implements it: its
// backward is cbam_fused_backward. It lives in C++ because the fused modules call this op directly
// (attnkern/ops/cbam.py, cbam_op): a Python autograd wrapper costs ~0.1 ms a call, more than the
// whole CBAM forward at small ResNet sizes. The formulas are the Python op's (attnkern::cbam,
// register_autograd in attnkern/ops/cbam.py): x and the small per-sample maps are saved, never a
// full-size intermediate.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace attnkern {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using OptTensor = optional<Tensor>;
using ForwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using BackwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

ForwardOutputs call_forward(const Tensor& x, const OptTensor& fc1_weight, const OptTensor& fc1_bias,
                            const OptTensor& fc2_weight, const OptTensor& fc2_bias, bool use_avg, bool use_max,
                            const OptTensor& conv_weight, const OptTensor& conv_bias, const OptTensor& bn_weight,
                            const OptTensor& bn_bias, const OptTensor& bn_running_mean,
                            const OptTensor& bn_running_var, double bn_eps, bool bn_training, bool need_argmax) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attnkern::cbam_fused_forward", "")
                       .typed<ForwardOutputs(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                             const OptTensor&, bool, bool, const OptTensor&, const OptTensor&,
                                             const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                             double, bool, bool)>();
  return op.call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, use_avg, use_max, conv_weight, conv_bias, bn_weight,
                 bn_bias, bn_running_mean, bn_running_var, bn_eps, bn_training, need_argmax);
}

BackwardOutputs call_backward(const Tensor& grad, const Tensor& x, const OptTensor& fc1_weight,
                              const OptTensor& fc1_bias, const OptTensor& fc2_weight, const OptTensor& fc2_bias,
                              const OptTensor& conv_weight, const OptTensor& conv_bias, const OptTensor& bn_weight,
                              const OptTensor& bn_bias, const OptTensor& bn_running_mean,
                              const OptTensor& bn_running_var, double bn_eps, bool bn_training, const Tensor& pools,
                              const Tensor& channel_argmax, const Tensor& channel_gate, const Tensor& pooled,
                              const Tensor& spatial_argmax, const Tensor& spatial_gate, const Tensor& conv_out,
                              bool use_avg, bool use_max) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("attnkern::cbam_fused_backward", "")
          .typed<BackwardOutputs(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                 const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                 const OptTensor&, const OptTensor&, const OptTensor&, double, bool, const Tensor&,
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, bool, bool)>();
  return op.call(grad, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, bn_weight, bn_bias,
                 bn_running_mean, bn_running_var, bn_eps, bn_training, pools, channel_argmax, channel_gate, pooled,
                 spatial_argmax, spatial_gate, conv_out, use_avg, use_max);
}

OptTensor present(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

class CbamFused : public torch::autograd::Function<CbamFused> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& fc1_weight,
                               const OptTensor& fc1_bias, const OptTensor& fc2_weight, const OptTensor& fc2_bias,
                               bool use_avg, bool use_max, const OptTensor& conv_weight, const OptTensor& conv_bias,
                               const OptTensor& bn_weight, const OptTensor& bn_bias,
                               const OptTensor& bn_running_mean, const OptTensor& bn_running_var, double bn_eps,
                               bool bn_training, bool need_argmax) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, pools, channel_argmax, channel_gate, pooled, spatial_argmax, spatial_gate, conv_out, batch_mean,
          batch_var] = call_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, use_avg, use_max, conv_weight,
                                    conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_eps,
                                    bn_training, need_argmax);
    // Training-mode BN normalises with batch statistics (recomputed in backward), so the running
    // buffers are saved only when they are used.
    const Tensor none;
    ctx->save_for_backward({x, fc1_weight.value_or(none), fc1_bias.value_or(none), fc2_weight.value_or(none),
                            fc2_bias.value_or(none), conv_weight.value_or(none), conv_bias.value_or(none),
                            bn_weight.value_or(none), bn_bias.value_or(none),
                            bn_training ? none : bn_running_mean.value_or(none),
                            bn_training ? none : bn_running_var.value_or(none), pools, channel_argmax, channel_gate,
                            pooled, spatial_argmax, spatial_gate, conv_out});
    ctx->saved_data["bn_eps"] = bn_eps;
    ctx->saved_data["bn_training"] = bn_training;
    ctx->saved_data["use_avg"] = use_avg;
    ctx->saved_data["use_max"] = use_max;
    ctx->mark_non_differentiable(
        {pools, channel_argmax, channel_gate, pooled, spatial_argmax, spatial_gate, conv_out, batch_mean, batch_var});
    return {y, pools, channel_argmax, channel_gate, pooled, spatial_argmax, spatial_gate, conv_out, batch_mean,
            batch_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The backward op has no derivative: refuse create_graph rather than return gradients that
    // silently drop CBAM's second-order terms (as the Python op's autograd refuses it too).
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "attnkern::cbam_fused_forward: double backward (create_graph=True) is not supported; "
                "use the reference modules in attnkern.reference for higher-order gradients");
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    std::array<OptTensor, 10> params;  // fc1 w/b, fc2 w/b, conv w/b, bn w/b, running mean/var
    for (size_t i = 0; i < params.size(); ++i) {
      params[i] = present(saved[1 + i]);
    }
    // Every input gets a gradient slot; only the present parameters get a gradient.
    variable_list result(16);
    if (!grads[0].defined()) {
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto grads_out =
        call_backward(grads[0], x, params[0], params[1], params[2], params[3], params[4], params[5], params[6],
                      params[7], params[8], params[9], ctx->saved_data["bn_eps"].toDouble(),
                      ctx->saved_data["bn_training"].toBool(), saved[11], saved[12], saved[13], saved[14], saved[15],
                      saved[16], saved[17], ctx->saved_data["use_avg"].toBool(), ctx->saved_data["use_max"].toBool());
    const auto [dx, d_fc1_weight, d_fc1_bias, d_fc2_weight, d_fc2_bias, d_conv_weight, d_conv_bias, d_bn_weight,
                d_bn_bias] = grads_out;
    // Input positions: x 0, fc1 1-2, fc2 3-4, use_avg/use_max 5-6, conv 7-8, bn 9-10, then buffers and config.
    const std::array<std::pair<int, Tensor>, 8> param_grads{{{1, d_fc1_weight},
                                                            {2, d_fc1_bias},
                                                            {3, d_fc2_weight},
                                                            {4, d_fc2_bias},
                                                            {7, d_conv_weight},
                                                            {8, d_conv_bias},
                                                            {9, d_bn_weight},
                                                            {10, d_bn_bias}}};
    result[0] = dx;
    for (size_t i = 0; i < param_grads.size(); ++i) {
      if (params[i].has_value()) {
        result[param_grads[i].first] = param_grads[i].second;
      }
    }
    return result;
  }
};

ForwardOutputs cbam_fused_forward_autograd(const Tensor& x, const OptTensor& fc1_weight, const OptTensor& fc1_bias,
                                           const OptTensor& fc2_weight, const OptTensor& fc2_bias, bool use_avg,
                                           bool use_max, const OptTensor& conv_weight, const OptTensor& conv_bias,
                                           const OptTensor& bn_weight, const OptTensor& bn_bias,
                                           const OptTensor& bn_running_mean, const OptTensor& bn_running_var,
                                           double bn_eps, bool bn_training, bool need_argmax) {
  // The backward reads the argmaxes: compute them whenever this call records one.
  bool records_backward = x.requires_grad();
  for (const OptTensor* p :
       {&fc1_weight, &fc1_bias, &fc2_weight, &fc2_bias, &conv_weight, &conv_bias, &bn_weight, &bn_bias}) {
    records_backward = records_backward || (p->has_value() && (*p)->requires_grad());
  }
  records_backward = records_backward && at::GradMode::is_enabled();
  const auto out = CbamFused::apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, use_avg, use_max, conv_weight,
                                    conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_eps,
                                    bn_training, need_argmax || records_backward);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8], out[9]};
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, Autograd, m) {
  m.impl("cbam_fused_forward", &attnkern::cbam_fused_forward_autograd);
}
