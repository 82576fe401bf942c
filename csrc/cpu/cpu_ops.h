// The CPU implementations of the per-pass kernel ops (schemas: csrc/ops.cpp), for the whole-op
// kernels that compose them in one C++ call (cbam_fused_cpu.cpp, bam_fused_cpu.cpp). Each checks
// its arguments.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <utility>

namespace attnkern::cpu {

// need_argmax false: the argmax output comes back empty, and the pass skips its bookkeeping (the
// registered ops always compute it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_pool_cpu(const at::Tensor& x, bool need_argmax);
std::tuple<at::Tensor, at::Tensor> spatial_pool_cpu(const at::Tensor& x, const at::Tensor& channel_gate,
                                                    bool need_argmax);
at::Tensor apply_gates_cpu(const at::Tensor& x, const at::Tensor& channel_gate,
                           const std::optional<at::Tensor>& spatial_gate);
// The channel gate with whole samples per thread (channel pool, MLP, then the sample's next passes
// while it is in the thread's L2). What comes after the channel gate:
//   no spatial gate: y = x * Mc (SE, ChannelGate);
//   a spatial gate: CBAM's spatial pool of x * Mc and its conv; with `whole` also BN, the sigmoid
//     and y = x * Mc * Ms. Without it (BN in training needs the whole batch's statistics) the
//     caller normalises conv_out and scales.
// MLP and spatial-gate parameters in x's acc dtype. need_argmax: the max pools' argmaxes too (else
// those outputs are empty).
// CBAM's spatial BN (one channel) as numbers: its weight and bias, the (mean, invstd) it normalises
// with, and whether those are the batch's.
struct SpatialBnScalars {
  double weight, bias, mean, invstd;
  bool training;
};
struct PerSampleSpatialGate {
  at::Tensor conv_weight;               // (1, 2, k, k), k odd
  std::optional<at::Tensor> conv_bias;  // (1,)
  bool whole;
  std::optional<SpatialBnScalars> bn;  // with whole: BN with its running statistics
};
struct PerSampleGate {
  at::Tensor y;             // undefined with a spatial gate that is not whole
  at::Tensor pooled;        // (N, 2, H, W) with a spatial gate, else undefined
  at::Tensor conv_out;      // (N, 1, H, W) with a spatial gate, else undefined
  at::Tensor spatial_gate;  // (N, H, W) with a whole spatial gate, else undefined
  at::Tensor pools, channel_gate, channel_argmax, spatial_argmax;
};
PerSampleGate channel_gate_per_sample_cpu(const at::Tensor& x, const at::Tensor& fc1_weight,
                                          const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                                          const std::optional<at::Tensor>& fc2_bias, bool use_avg, bool use_max,
                                          const std::optional<PerSampleSpatialGate>& spatial_gate, bool need_argmax);
// CBAM's spatial BN over the conv output map (N, 1, H, W), for the whole-op kernel: its batch
// (mean, biased variance), in double; and the backward from the spatial gate's sigmoid to the conv
// output, returning (grad_conv_out, d bn_weight, d bn_bias, d conv_bias), the three grads as
// sums in double. bn absent: no BN. Both replace ~20 small ATen calls per training step.
std::pair<double, double> spatial_map_mean_var_cpu(const at::Tensor& conv_out);
std::tuple<at::Tensor, double, double, double> spatial_logit_backward_cpu(const at::Tensor& grad_gate,
                                                                          const at::Tensor& gate,
                                                                          const at::Tensor& conv_out,
                                                                          const std::optional<SpatialBnScalars>& bn);
// The shared MLP's backward in loops (cbam_fused_cpu.cpp's mlp_backward, for small MLPs, where
// ATen's ~15 calls cost ~0.1 ms): (grad_pools, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias),
// an absent bias's grad undefined. All in one acc dtype; pools (P, N, C), gates (N, C).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_backward_cpu(
    const at::Tensor& grad_gate, const at::Tensor& gate, const at::Tensor& pools, const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias);
at::Tensor spatial_gate_grad_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& channel_gate);
// The gradients of y = x * channel_gate * spatial_gate's two gates in one pass over (grad, x):
// spatial_gate_grad's (N, H, W) result and sum over hw of grad * x * spatial_gate (N, C).
std::pair<at::Tensor, at::Tensor> scaling_grads_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                    const at::Tensor& channel_gate, const at::Tensor& spatial_gate);
// The channel gate's grad through CBAM's spatial pool, in a pass over x alone: channel_gate_grad
// without its grad * spatial_gate term (scaling_grads_cpu's second result), (N, C).
at::Tensor spatial_pool_channel_grad_cpu(const at::Tensor& x, const at::Tensor& grad_pooled,
                                         const at::Tensor& spatial_argmax);
at::Tensor channel_gate_grad_cpu(const at::Tensor& grad, const at::Tensor& x,
                                 const std::optional<at::Tensor>& spatial_gate,
                                 const std::optional<at::Tensor>& grad_pooled,
                                 const std::optional<at::Tensor>& spatial_argmax);
at::Tensor cbam_input_grad_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& channel_gate,
                               const std::optional<at::Tensor>& spatial_gate,
                               const std::optional<at::Tensor>& grad_pooled,
                               const std::optional<at::Tensor>& spatial_argmax,
                               const std::optional<at::Tensor>& grad_avg, const std::optional<at::Tensor>& grad_max,
                               const std::optional<at::Tensor>& channel_argmax);
at::Tensor spatial_conv_cpu(const at::Tensor& pooled, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> spatial_conv_backward_cpu(const at::Tensor& grad, const at::Tensor& pooled,
                                                             const at::Tensor& weight);
// BAM's channel pool and spatial reduce conv in one read of x: (avg (N, C), z (N, Cr, H, W) =
// conv1x1(x, weight (Cr, C, 1, 1), bias (Cr,))), both in x's acc dtype, z in z_format (channels_last
// x only; NCHW x gives NCHW z). It pays
// for weights up to kPoolReduceMaxWeightBytes (in acc); past that (C >= 1024 at r = 16) its
// register tiles stream the weights from L2 for every pixel block, and ATen's GEMM is faster
// than the pass it saves (benchmarks/NOTES.md).
constexpr int64_t kPoolReduceMaxWeightBytes = 64 * 1024;
std::pair<at::Tensor, at::Tensor> bam_pool_reduce_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const at::Tensor& bias, at::MemoryFormat z_format);
// The reduce conv's weight grad, (Cr, C) in acc: sum over n, hw of grad_output[n, k, hw] * x[n, c,
// hw], grad_output (N, Cr, H, W) in acc. ATen's GEMM for it (Cr = 4-16 rows) reached a third of
// this CPU's FMA rate. Needs the vector kernels.
at::Tensor bam_reduce_weight_grad_cpu(const at::Tensor& x, const at::Tensor& grad_output);
// What BAM's conv kernels below read from their input map a: a itself, or with `relu`, relu(a *
// scale[c] + shift[c]) for each channel c (scale and shift (Ci,) in a's dtype; undefined: relu(a)).
// A hidden layer's BN and ReLU are so applied as the next conv loads its input: the activation map
// is never written (in eval its BN is folded into the conv before it, leaving the ReLU).
struct InputTransform {
  bool relu = false;
  at::Tensor scale, shift;
};
// BAM's dilated k x k convs ('same' padding, stride 1) on narrow maps (a: float / double, any
// layout; the output in a's layout): conv(transformed a, weight (Co, Ci, k, k)) + bias. oneDNN runs
// 4-channel maps at ~14 % of this CPU's FMA rate; register tiles (4 outputs x 24 pixels) do better
// up to kNarrowConvChannels channels (benchmarks/NOTES.md). Needs the vector kernels
// (use_vec_kernels()).
constexpr int64_t kNarrowConvChannels = 8;
at::Tensor bam_narrow_conv_cpu(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias,
                               int64_t dilation, const InputTransform& transform = {});
// bam_narrow_conv_cpu for maps of more channels, up to kWideConvChannels. oneDNN's conv is as fast
// on large 16-channel maps, but costs ~40-100 us a call on small ones (8x16x2x2: 43 us, these tiles
// 14); from 32 channels on it is faster (a BAM forward on 8x512x28x28: 3.8 ms against 4.4 with
// these tiles; benchmarks/NOTES.md).
constexpr int64_t kWideConvChannels = 16;
at::Tensor bam_wide_conv_cpu(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias,
                             int64_t dilation, const InputTransform& transform = {});
// A 1x1 conv to one channel (BAM's final spatial conv), conv(transformed a, weight (1, Ci, 1, 1)) +
// bias (1,): (N, 1, H, W), a float / double in either layout. ATen took a GEMM call and a bias add
// (~15 us on 8x16x28x28), after a ReLU pass over a. Needs the vector kernels.
at::Tensor bam_logits_conv_cpu(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias,
                               const InputTransform& transform);
// A linear layer on rows, out (N, Co) = transformed a (N, Ci) . weight (Co, Ci)^T + bias (Co,), a
// float / double: BAM's channel gate (its 1x1 convs on 1x1 maps). ATen took a GEMM call, a bias
// add, the BN's folding or a ReLU pass, and the reshapes around them: ~90 us for the gate on
// 8x256 means here. It reads the weights once per row of a, so it pays for weights up to
// kLinearMaxWeightBytes (in acc); past that ATen's blocked GEMM reads them once (BAM's forward on
// 8x1024x14x14 and 8x2048x7x7 was 2-9 % slower with these). Needs the vector kernels.
constexpr int64_t kLinearMaxWeightBytes = 64 * 1024;
at::Tensor bam_linear_cpu(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias,
                          const InputTransform& transform);
// Its backward without a transform, from grad (N, Co) in a's dtype: (grad of a (N, Ci), of weight
// (Co, Ci)). ATen's two GEMMs and the reshapes around them took ~60 us a layer here.
std::pair<at::Tensor, at::Tensor> bam_linear_backward_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                          const at::Tensor& weight);
// The weight grad of BAM's dilated 3 x 3 convs on the maps the narrow and wide convs take ('same',
// stride 1; grad and a float / double, the same dtype, any layout): (Co, Ci, 3, 3) in a's dtype.
// oneDNN's (im2col and a GEMM) took 0.38 ms on NCHW 8x4x56x56, these tiles 0.08; on 8x16x28x28
// 0.8-1.2 ms, these 0.4 (benchmarks/NOTES.md). Needs the vector kernels.
constexpr int64_t kWeightGradTaps = 3;
at::Tensor bam_conv_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& a, int64_t dilation);
// The batch statistics of a map for BatchNorm in training, as at::native_batch_norm computes them:
// (mean, biased variance) per channel, for float / double maps in either layout, in z's dtype.
// ATen's BN took ~100 us for 100 k values here (benchmarks/NOTES.md); the BN itself and its ReLU
// are applied by the next conv as it loads z (InputTransform). Needs the vector kernels.
std::pair<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& z);
// relu(z * scale[c] + shift[c]) for each channel c of a float / double map in either layout, scale
// and shift (Ch,) in its dtype. Needs the vector kernels.
at::Tensor scale_shift_relu_cpu(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift);
// The backward of act = relu(BN(z)) with the batch's statistics (mean, invstd) and weight, from
// grad (of act): (grad of z, of the BN's weight, of its bias), as ATen's threshold_backward and
// native_batch_norm_backward compute them, in two passes. z, act, grad: float / double, one
// layout (contiguous or channels_last), everything in z's dtype. Needs the vector kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cpu(const at::Tensor& grad,
                                                                           const at::Tensor& act, const at::Tensor& z,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& mean,
                                                                           const at::Tensor& invstd);
at::Tensor bam_combine_cpu(const at::Tensor& x, const at::Tensor& channel_att, const at::Tensor& spatial_att,
                           bool product);
std::tuple<at::Tensor, at::Tensor> bam_combine_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& channel_att,
                                                            const at::Tensor& spatial_att, bool product);
// bam_combine_backward that also writes dx's direct term grad * (1 + M) (x's layout and dtype) in
// its pass: (grad_channel, grad_spatial, direct). The pass computes M anyway; the input gradient's
// own pass then needs no exp (an exp per element was half of that pass's time). bf16 / fp16 dx is
// thus rounded twice (the direct term, then the sum). Needs the vector kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bam_combine_backward_with_direct_cpu(const at::Tensor& grad,
                                                                                    const at::Tensor& x,
                                                                                    const at::Tensor& channel_att,
                                                                                    const at::Tensor& spatial_att,
                                                                                    bool product);
at::Tensor bam_input_grad_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& channel_att,
                              const at::Tensor& spatial_att, bool product, const std::optional<at::Tensor>& grad_avg,
                              const std::optional<at::Tensor>& grad_x_partial);
// The rest of bam_input_grad, in place, after bam_combine_backward_with_direct_cpu: direct += grad_avg
// / HW + sum_k weight[k, c] * grad_reduce[n, k, hw], the 1x1 reduce conv's input gradient computed
// in the pass (weight (Cr, C[, 1, 1]) as the conv took it; grad_avg (N, C) and grad_reduce (N, Cr,
// H, W) in acc). ATen's GEMM wrote that term as a full-size tensor in 3-8x a clone's time
// (benchmarks/NOTES.md). Returns direct, now dx. Needs the vector kernels.
at::Tensor bam_input_grad_reduce_cpu(const at::Tensor& direct, const at::Tensor& grad_avg,
                                     const at::Tensor& reduce_weight, const at::Tensor& grad_reduce);
// bam_input_grad written into grad_x_partial's memory (when it is in x's layout), which the caller
// owns: no second full-size buffer, and the writes land on lines the pass has just read.
at::Tensor bam_input_grad_into_partial_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& channel_att,
                                           const at::Tensor& spatial_att, bool product, const at::Tensor& grad_avg,
                                           const at::Tensor& grad_x_partial);

}  // namespace attnkern::cpu
