// Direct k x k "same" convolution of CBAM's small pooled map (N, Cin, H, W) -> (N, 1, H, W), and its
// backward. ATen routes a 2-in / 1-out channel conv through im2col or oneDNN, which costs more than
// the rest of the fused CBAM forward; these loops touch each pooled value k*k times and nothing else.
// The loops are compiled for AVX2 (see cpu_utils.h); CPUs without it take ATen's convolution.
#include "cpu/cpu_ops.h"
#include "cpu/cpu_utils.h"
#include "cpu/spatial_conv.h"

namespace attnkern {
namespace {

using cpu::float_or_double;
using cpu::use_vec_kernels;

void check_conv_args(const at::Tensor& pooled, const at::Tensor& weight) {
  TORCH_CHECK(pooled.dim() == 4, "spatial_conv: pooled must be 4-D (N, Cin, H, W), got ", pooled.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == 1 && weight.size(1) == pooled.size(1) &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              "spatial_conv: weight must be (1, ", pooled.size(1), ", k, k) with k odd, got ", weight.sizes());
  TORCH_CHECK(pooled.scalar_type() == weight.scalar_type() &&
                  float_or_double(pooled),
              "spatial_conv: pooled and weight must share a float32/float64 dtype, got ", pooled.scalar_type(),
              " and ", weight.scalar_type());
  TORCH_CHECK(pooled.device() == weight.device(), "spatial_conv: pooled and weight must be on one device");
}

ATTNKERN_VEC_BEGIN

// correlate_row_pair over the batch (PaddedMaps: the padded inputs' geometry).
template <typename T>
void correlate_padded(const T* padded, int64_t in_channels, const T* taps, T* out, int64_t out_channels,
                      int64_t batch, const cpu::PaddedMaps& g) {
  const int64_t pairs = cpu::divup(g.height, 2);
  at::parallel_for(0, batch * pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / pairs;
      cpu::correlate_row_pair(padded + n * in_channels * g.plane(), in_channels, taps,
                              out + n * out_channels * g.height * g.width, out_channels, u % pairs, g);
    }
  });
}

// One tap row of grad_weight: acc[j * lanes ...] (a vector of partial sums per j) = the sum of
// g[n,h,w] * padded[n,c,h+i,w+j] over the batch and the rows. kTaps > 0 fixes k at compile time,
// so that the k accumulators stay in registers (with a runtime k they go through memory, and each
// FMA waits for the last store).
template <typename T, int64_t kTaps>
void tap_row_sums(const T* padded_grad, const T* padded, T* acc, int64_t c, int64_t i, int64_t batch, int64_t cin,
                  const cpu::PaddedMaps& g) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t k = kTaps > 0 ? kTaps : g.k;
  const int64_t pad = k / 2, padded_height = g.padded_height, padded_width = g.padded_width;
  constexpr int64_t L = Vec::size();
  Vec sums[kTaps > 0 ? kTaps : 1];
  if constexpr (kTaps > 0) {
    for (auto& v : sums) v = Vec(T(0));
  } else {
    std::fill(acc, acc + k * L, T(0));
  }
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t h = 0; h < g.height; ++h) {
      const T* g_row = padded_grad + (n * padded_height + h + pad) * padded_width + pad;
      const T* p_row = padded + ((n * cin + c) * padded_height + h + i) * padded_width;
      for (int64_t w0 = 0; w0 < g.width; w0 += Vec::size()) {
        const Vec gv = Vec::loadu(g_row + w0);
        if constexpr (kTaps > 0) {
          for (int64_t j = 0; j < kTaps; ++j) sums[j] = at::vec::fmadd(gv, Vec::loadu(p_row + w0 + j), sums[j]);
        } else {
          for (int64_t j = 0; j < k; ++j) {
            at::vec::fmadd(gv, Vec::loadu(p_row + w0 + j), Vec::loadu(acc + j * L)).store(acc + j * L);
          }
        }
      }
    }
  }
  if constexpr (kTaps > 0) {
    for (int64_t j = 0; j < kTaps; ++j) sums[j].store(acc + j * L);
  }
}

// grad_weight[c, i, j] = sum_{n,h,w} g[n,h,w] * padded[n,c,h+i,w+j], with g read from its own
// padded copy (the zero slack past each row makes whole vectors safe). One tap row (c, i) per task,
// vectorised over w with one accumulator per j, in a fixed order: the result does not depend on
// the thread count.
template <typename T>
void conv_weight_grad(const T* padded_grad, const T* padded, T* gw, int64_t batch, int64_t cin,
                      const cpu::PaddedMaps& g) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const int64_t k = g.k;
  at::parallel_for(0, cin * k, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(k * L);
    for (int64_t ci = begin; ci < end; ++ci) {
      const int64_t c = ci / k, i = ci % k;
      const auto run = [&](auto taps) {
        tap_row_sums<T, decltype(taps)::value>(padded_grad, padded, acc.data(), c, i, batch, cin, g);
      };
      switch (k) {
        case 3: run(std::integral_constant<int64_t, 3>()); break;
        case 5: run(std::integral_constant<int64_t, 5>()); break;
        case 7: run(std::integral_constant<int64_t, 7>()); break;
        default: run(std::integral_constant<int64_t, 0>());
      }
      for (int64_t j = 0; j < k; ++j) {
        gw[ci * k + j] = std::accumulate(&acc[j * L], &acc[j * L] + L, T(0));
      }
    }
  });
}

ATTNKERN_VEC_END

// maps (N, C, H, W) zero-padded for correlate_padded.
at::Tensor zero_padded(const at::Tensor& maps, const cpu::PaddedMaps& g) {
  at::Tensor padded = at::zeros({maps.size(0), maps.size(1), g.padded_height, g.padded_width}, maps.options());
  padded.narrow(2, g.k / 2, g.height).narrow(3, g.k / 2, g.width).copy_(maps);
  return padded;
}

}  // namespace

namespace cpu {

at::Tensor spatial_conv_cpu(const at::Tensor& pooled_in, const at::Tensor& weight_in,
                            const c10::optional<at::Tensor>& bias) {
  check_conv_args(pooled_in, weight_in);
  const at::Tensor pooled = pooled_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t pad = weight.size(-1) / 2;
  if (!use_vec_kernels()) {
    return at::conv2d(pooled, weight, bias, {1, 1}, {pad, pad});
  }
  const int64_t n = pooled.size(0), cin = pooled.size(1), h = pooled.size(2), w = pooled.size(3);
  at::Tensor out = at::empty({n, 1, h, w}, pooled.options());
  if (out.numel() == 0) return out;
  const cpu::PaddedMaps geometry(h, w, weight.size(-1));
  const at::Tensor padded = zero_padded(pooled, geometry);
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "spatial_conv_cpu", [&] {
    correlate_padded<scalar_t>(padded.const_data_ptr<scalar_t>(), cin, weight.const_data_ptr<scalar_t>(),
                               out.mutable_data_ptr<scalar_t>(), 1, n, geometry);
  });
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == 1, "spatial_conv: bias must have one element, got ", bias->sizes());
    out.add_(bias->to(out.scalar_type()).reshape({1, 1, 1, 1}));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> spatial_conv_backward_cpu(const at::Tensor& grad_in, const at::Tensor& pooled_in,
                                                             const at::Tensor& weight_in) {
  check_conv_args(pooled_in, weight_in);
  const int64_t n = pooled_in.size(0), cin = pooled_in.size(1), h = pooled_in.size(2), w = pooled_in.size(3);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({n, 1, h, w}) && grad_in.scalar_type() == pooled_in.scalar_type(),
              "spatial_conv_backward: grad must be (", n, ", 1, ", h, ", ", w, ") in the pooled map's dtype, got ",
              grad_in.sizes(), " ", grad_in.scalar_type());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor pooled = pooled_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t k = weight.size(-1);
  if (!use_vec_kernels()) {
    auto grads = at::convolution_backward(grad, pooled, weight, c10::nullopt, {1, 1}, {k / 2, k / 2}, {1, 1}, false,
                                          {0, 0}, 1, {true, true, false});
    return {std::get<0>(grads), std::get<1>(grads)};
  }
  at::Tensor grad_pooled = at::empty_like(pooled);
  at::Tensor grad_weight = at::empty_like(weight);
  if (pooled.numel() == 0) return {grad_pooled, grad_weight.zero_()};
  // The input gradient is the correlation of the padded grad with the spatially flipped taps,
  // one output channel per input channel of the forward.
  const at::Tensor flipped = weight.flip({2, 3}).reshape({cin, 1, k, k}).contiguous();
  const cpu::PaddedMaps geometry(h, w, k);
  const at::Tensor padded_grad = zero_padded(grad, geometry);
  const at::Tensor padded_pooled = zero_padded(pooled, geometry);
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "spatial_conv_backward_cpu", [&] {
    correlate_padded<scalar_t>(padded_grad.const_data_ptr<scalar_t>(), 1, flipped.const_data_ptr<scalar_t>(),
                               grad_pooled.mutable_data_ptr<scalar_t>(), cin, n, geometry);
    conv_weight_grad<scalar_t>(padded_grad.const_data_ptr<scalar_t>(), padded_pooled.const_data_ptr<scalar_t>(),
                               grad_weight.mutable_data_ptr<scalar_t>(), n, cin, geometry);
  });
  return {grad_pooled, grad_weight};
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("spatial_conv", &cpu::spatial_conv_cpu);
  m.impl("spatial_conv_backward", &cpu::spatial_conv_backward_cpu);
}

}  // namespace attnkern
