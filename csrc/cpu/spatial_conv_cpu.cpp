// Direct k x k "same" convolution of CBAM's small pooled map (N, Cin, H, W) -> (N, 1, H, W), and its
// backward. ATen routes a 2-in / 1-out channel conv through im2col or oneDNN, which costs more than
// the rest of the fused CBAM forward; these loops touch each pooled value k*k times and nothing else.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace attnkern {
namespace {

void check_conv_args(const at::Tensor& pooled, const at::Tensor& weight) {
  TORCH_CHECK(pooled.dim() == 4, "spatial_conv: pooled must be 4-D (N, Cin, H, W), got ", pooled.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == 1 && weight.size(1) == pooled.size(1) &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              "spatial_conv: weight must be (1, ", pooled.size(1), ", k, k) with k odd, got ", weight.sizes());
  TORCH_CHECK(pooled.scalar_type() == weight.scalar_type() &&
                  (pooled.scalar_type() == at::kFloat || pooled.scalar_type() == at::kDouble),
              "spatial_conv: pooled and weight must share a float32/float64 dtype, got ", pooled.scalar_type(),
              " and ", weight.scalar_type());
  TORCH_CHECK(pooled.device() == weight.device(), "spatial_conv: pooled and weight must be on one device");
}

// out_row[w] += sum_j taps[j] * in_row[w + j - pad] over the w where the input index is in range.
template <typename T>
inline void correlate_row(T* out_row, const T* in_row, const T* taps, int64_t width, int64_t k, int64_t pad) {
  for (int64_t j = 0; j < k; ++j) {
    const int64_t shift = j - pad;
    const int64_t lo = std::max<int64_t>(0, -shift);
    const int64_t hi = std::min<int64_t>(width, width - shift);
    const T tap = taps[j];
#pragma omp simd
    for (int64_t w = lo; w < hi; ++w) {
      out_row[w] += tap * in_row[w + shift];
    }
  }
}

// out[n, oc_rows] = sum_c sum_i taps(c, i) . in[n, c, h + sign*(i - pad)]: forward (sign +1, taps as is)
// and input gradient (sign -1, taps flipped) share this loop.
template <typename T>
void correlate(const T* in, int64_t in_channels, const T* weight, T* out, int64_t out_channels, int64_t batch,
               int64_t height, int64_t width, int64_t k, bool transpose) {
  const int64_t pad = k / 2;
  const int64_t plane = height * width;
  at::parallel_for(0, batch * height, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, width * k * k)),
                   [&](int64_t begin, int64_t end) {
    std::vector<T> flipped(k);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / height, h = row % height;
      for (int64_t oc = 0; oc < out_channels; ++oc) {
        T* out_row = out + (n * out_channels + oc) * plane + h * width;
        std::fill(out_row, out_row + width, T(0));
        for (int64_t ic = 0; ic < in_channels; ++ic) {
          const int64_t c = transpose ? oc : ic;  // the weight's input channel
          for (int64_t i = 0; i < k; ++i) {
            const int64_t src_h = transpose ? h - i + pad : h + i - pad;
            if (src_h < 0 || src_h >= height) continue;
            const T* taps = weight + (c * k + i) * k;
            if (transpose) {
              for (int64_t j = 0; j < k; ++j) flipped[j] = taps[k - 1 - j];
              taps = flipped.data();
            }
            correlate_row(out_row, in + (n * in_channels + ic) * plane + src_h * width, taps, width, k, pad);
          }
        }
      }
    }
  });
}

// grad_weight[c, i, j] = sum_{n,h,w} g[n,h,w] * x[n,c,h+i-pad,w+j-pad]: one tap row (c, i) per task,
// accumulated in a fixed order so the result does not depend on the thread count.
template <typename T>
void conv_weight_grad(const T* g, const T* x, T* gw, int64_t batch, int64_t cin, int64_t height, int64_t width,
                      int64_t k) {
  const int64_t pad = k / 2, plane = height * width;
  at::parallel_for(0, cin * k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ci = begin; ci < end; ++ci) {
      const int64_t c = ci / k, i = ci % k;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t shift = j - pad;
        const int64_t lo = std::max<int64_t>(0, -shift), hi = std::min<int64_t>(width, width - shift);
        T acc = 0;
        for (int64_t b = 0; b < batch; ++b) {
          for (int64_t row = 0; row < height; ++row) {
            const int64_t src_h = row + i - pad;
            if (src_h < 0 || src_h >= height) continue;
            const T* g_row = g + b * plane + row * width;
            const T* x_row = x + (b * cin + c) * plane + src_h * width + shift;
#pragma omp simd reduction(+ : acc)
            for (int64_t col = lo; col < hi; ++col) acc += g_row[col] * x_row[col];
          }
        }
        gw[ci * k + j] = acc;
      }
    }
  });
}

at::Tensor spatial_conv_cpu(const at::Tensor& pooled_in, const at::Tensor& weight_in,
                            const c10::optional<at::Tensor>& bias) {
  check_conv_args(pooled_in, weight_in);
  const at::Tensor pooled = pooled_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t n = pooled.size(0), cin = pooled.size(1), h = pooled.size(2), w = pooled.size(3);
  at::Tensor out = at::empty({n, 1, h, w}, pooled.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "spatial_conv_cpu", [&] {
    correlate<scalar_t>(pooled.const_data_ptr<scalar_t>(), cin, weight.const_data_ptr<scalar_t>(),
                        out.mutable_data_ptr<scalar_t>(), 1, n, h, w, weight.size(-1), /*transpose=*/false);
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
  at::Tensor grad_pooled = at::empty_like(pooled);
  at::Tensor grad_weight = at::zeros_like(weight);
  if (pooled.numel() == 0) return {grad_pooled, grad_weight};
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "spatial_conv_backward_cpu", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* x = pooled.const_data_ptr<scalar_t>();
    correlate<scalar_t>(g, 1, weight.const_data_ptr<scalar_t>(), grad_pooled.mutable_data_ptr<scalar_t>(), cin, n, h,
                        w, k, /*transpose=*/true);
    conv_weight_grad<scalar_t>(g, x, grad_weight.mutable_data_ptr<scalar_t>(), n, cin, h, w, k);
  });
  return {grad_pooled, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("spatial_conv", &spatial_conv_cpu);
  m.impl("spatial_conv_backward", &spatial_conv_backward_cpu);
}

}  // namespace attnkern
