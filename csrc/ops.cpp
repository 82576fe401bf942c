// The one place where attnkern's kernel schemas are defined. Each backend registers its
// implementations in its own file with TORCH_LIBRARY_IMPL(attnkern, <Key>, m); autograd and
// fake (meta) kernels are registered once, in Python (attnkern/ops/).
//
// Conventions shared by every kernel (see attnkern/backends/torch_kernels.py, the reference):
//   x is (N, C, H, W), floating, contiguous or channels_last (strides handled natively);
//   "acc" is float64 for float64 x, float32 otherwise: gates, pooled maps and reductions use it;
//   full-size outputs have x's dtype and memory format; argmax outputs are int64 and pick the
//   first maximal element (NaN counts as maximal, so NaN propagates like torch.max).
#include <torch/library.h>

TORCH_LIBRARY(attnkern, m) {
  // avg[n,c] = mean_hw x, max[n,c] = max_hw x, argmax[n,c] = flat hw index of that max.
  m.def("channel_pool(Tensor x) -> (Tensor avg, Tensor max, Tensor argmax)");
  // Pools x*gate over C without materialising it: pooled[n,0] = mean_c, pooled[n,1] = max_c,
  // argmax[n,h,w] = channel of that max. pooled (N,2,H,W) acc, argmax (N,H,W) int64.
  m.def("spatial_pool(Tensor x, Tensor channel_gate) -> (Tensor pooled, Tensor argmax)");
  // y = x * channel_gate[n,c] * spatial_gate[n,h,w] (spatial_gate optional).
  m.def("apply_gates(Tensor x, Tensor channel_gate, Tensor? spatial_gate) -> Tensor");
  // d_spatial_gate[n,h,w] = sum_c grad * x * channel_gate[n,c]   (N,H,W) acc.
  m.def("spatial_gate_grad(Tensor grad, Tensor x, Tensor channel_gate) -> Tensor");
  // d_channel_gate[n,c] = sum_hw g1 * x, where g1 is the gradient w.r.t. x*channel_gate:
  //   g1 = grad * spatial_gate[n,hw] + grad_pooled[n,0,hw] / C + grad_pooled[n,1,hw] * (c == spatial_argmax[n,hw])
  // (spatial terms omitted when spatial_gate is None).   (N,C) acc.
  m.def("channel_gate_grad(Tensor grad, Tensor x, Tensor? spatial_gate, Tensor? grad_pooled, Tensor? spatial_argmax) -> Tensor");
  // dx = g1 * channel_gate[n,c] + grad_avg[n,c] / HW + grad_max[n,c] * (hw == channel_argmax[n,c]),
  // g1 as in channel_gate_grad; grad_avg / grad_max (and channel_argmax) optional.
  m.def("cbam_input_grad(Tensor grad, Tensor x, Tensor channel_gate, Tensor? spatial_gate, Tensor? grad_pooled, Tensor? spatial_argmax, Tensor? grad_avg, Tensor? grad_max, Tensor? channel_argmax) -> Tensor");
  // The spatial gate's k x k "same" convolution of the small pooled map, which ATen runs slowly
  // for so few channels: out[n,0] = bias + sum_{c,i,j} weight[0,c,i,j] * pooled[n,c,h+i-k/2,w+j-k/2],
  // zero padding; pooled (N,Cin,H,W) and weight (1,Cin,k,k) in one float dtype, k odd.
  m.def("spatial_conv(Tensor pooled, Tensor weight, Tensor? bias) -> Tensor");
  // Its backward without the bias term: (grad_pooled (N,Cin,H,W), grad_weight (1,Cin,k,k)).
  m.def("spatial_conv_backward(Tensor grad, Tensor pooled, Tensor weight) -> (Tensor grad_pooled, Tensor grad_weight)");
  // Whole-op kernels (optional per backend): the fused module's entire forward / backward in one
  // call, with the contract of the Python ops attnkern::cbam / attnkern::cbam_backward
  // (attnkern/ops/cbam.py) minus their backend argument. The forward's need_argmax false leaves
  // channel_argmax and spatial_argmax empty (a forward no backward follows skips their
  // bookkeeping); its autograd kernel sets it whenever it records a backward.
  m.def("cbam_fused_forward(Tensor x, Tensor? fc1_weight, Tensor? fc1_bias, Tensor? fc2_weight, Tensor? fc2_bias, "
        "bool use_avg, bool use_max, Tensor? conv_weight, Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, "
        "Tensor? bn_running_mean, Tensor? bn_running_var, float bn_eps, bool bn_training, bool need_argmax) -> "
        "(Tensor y, Tensor pools, "
        "Tensor channel_argmax, Tensor channel_gate, Tensor pooled, Tensor spatial_argmax, Tensor spatial_gate, "
        "Tensor conv_out, Tensor batch_mean, Tensor batch_var)");
  m.def("cbam_fused_backward(Tensor grad, Tensor x, Tensor? fc1_weight, Tensor? fc1_bias, Tensor? fc2_weight, "
        "Tensor? fc2_bias, Tensor? conv_weight, Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, "
        "Tensor? bn_running_mean, Tensor? bn_running_var, float bn_eps, bool bn_training, Tensor pools, "
        "Tensor channel_argmax, Tensor channel_gate, Tensor pooled, Tensor spatial_argmax, Tensor spatial_gate, "
        "Tensor conv_out, bool use_avg, bool use_max) -> (Tensor dx, Tensor d_fc1_weight, Tensor d_fc1_bias, "
        "Tensor d_fc2_weight, Tensor d_fc2_bias, Tensor d_conv_weight, Tensor d_conv_bias, Tensor d_bn_weight, "
        "Tensor d_bn_bias)");
  // t (4-D, dense in the other layout) copied into NHWC (channels_last) or NCHW: the NCHW <-> NHWC
  // transpose the CPU kernels run on a grad that comes in the other layout than x (CPU only).
  m.def("transpose_layout(Tensor t, bool channels_last) -> Tensor");
  // BAM: y = x * (1 + sigmoid(a)), a = channel_att[n,c] + spatial_att[n,h,w] (product: a = ca * sa).
  m.def("bam_combine(Tensor x, Tensor channel_att, Tensor spatial_att, bool product) -> Tensor");
  // The reductions of BAM's combine backward, one pass over (grad, x): with M = sigmoid(a) and
  // t = grad * x * M * (1 - M): grad_channel[n,c] = sum_hw t (* spatial_att if product),
  // grad_spatial[n,h,w] = sum_c t (* channel_att if product). Both acc.
  m.def("bam_combine_backward(Tensor grad, Tensor x, Tensor channel_att, Tensor spatial_att, bool product) -> (Tensor grad_channel, Tensor grad_spatial)");
  // dx = grad * (1 + M) + grad_avg[n,c] / HW (optional) + grad_x_partial (optional, full size).
  m.def("bam_input_grad(Tensor grad, Tensor x, Tensor channel_att, Tensor spatial_att, bool product, Tensor? grad_avg, Tensor? grad_x_partial) -> Tensor");
  // BAM's whole-op kernels (optional per backend), with the contract of the Python ops
  // attnkern::bam / attnkern::bam_backward (attnkern/ops/bam.py) minus their backend argument.
  m.def("bam_fused_forward(Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] bn_weights, Tensor[] bn_biases, "
        "Tensor[] bn_running_means, Tensor[] bn_running_vars, float[] bn_eps, bool[] bn_training, int dilation, "
        "bool product) -> (Tensor y, Tensor avg, Tensor channel_att, Tensor spatial_att, Tensor[] hidden, "
        "Tensor[] batch_means, Tensor[] batch_vars)");
  m.def("bam_fused_backward(Tensor grad, Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] bn_weights, "
        "Tensor[] bn_biases, Tensor[] bn_means, Tensor[] bn_vars, float[] bn_eps, bool[] bn_training, int dilation, "
        "bool product, Tensor avg, Tensor channel_att, Tensor spatial_att, Tensor[] hidden) -> (Tensor dx, "
        "Tensor[] d_weights, Tensor[] d_biases, Tensor[] d_bn_weights, Tensor[] d_bn_biases)");
}
