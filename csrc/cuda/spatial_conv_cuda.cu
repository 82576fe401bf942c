// CUDA kernels of CBAM's spatial convolution: the k x k "same" (zero-padded) convolution of the
// small pooled map, pooled (N, Cin, H, W) * weight (1, Cin, k, k) (+ bias) -> (N, 1, H, W), and its
// backward without the bias term -> (grad_pooled (N, Cin, H, W), grad_weight (1, Cin, k, k)).
// Schemas and semantics: csrc/ops.cpp; the definition they must match:
// attnkern/backends/torch_kernels.py; the CPU version: csrc/cpu/spatial_conv_cpu.cpp.
//
// pooled, weight and grad share one dtype, float32 or float64 (the acc dtype of the fused op), so
// every kernel computes in that dtype. The maps are small (N*Cin*H*W), inputs are made contiguous.
//
//   correlate_kernel   out[n, co, h, w] = sum_{ci, i, j} tap[co, ci, i, j] * in[n, ci, h + i - k/2,
//                      w + j - k/2], zero padding. A 32 x 8 thread block per output tile, a thread
//                      per output pixel; per input channel the block stages that channel's k*k taps
//                      and the (8 + k - 1) x (32 + k - 1) input tile with its halo in shared memory
//                      (zeros outside the map), then every thread runs the k*k taps from shared
//                      memory. Forward: in = pooled, one output channel, Cin input channels.
//                      grad_pooled: in = grad (one channel), Cin output channels, the taps loaded
//                      flipped in both axes (correlation with the flipped weight). weight
//                      (1, Cin, k, k) is read in place as the (Cout, Cin', k, k) tap array of either
//                      case. A k too large for the tile to fit in 48 KiB of shared memory takes the
//                      direct variant (same loop, global loads with bounds checks).
//   weight_grad_kernel grad_weight[0, c, i, j] = sum_{n, h, w} grad[n, 0, h, w] *
//                      pooled[n, c, h + i - k/2, w + j - k/2]: one block per (tap, split of the
//                      flat N*H*W axis); each thread accumulates a strided subset, then a warp
//                      butterfly and a fixed-order pass over the warps in shared memory. With more
//                      than one split, sum_partials_kernel adds the splits in order. No atomics:
//                      the result depends only on the shape and the device's SM count.
// Index math is int32 when every offset of the launch fits, int64 otherwise.
#include "cuda_utils.cuh"

#include <torch/library.h>

namespace attnkern {
namespace cuda {
namespace {

constexpr int kTileW = 32;  // output tile of a correlate block: kTileW x kTileH threads (= kBlock)
constexpr int kTileH = kBlock / kTileW;
constexpr size_t kMaxSmemBytes = 48 * 1024;  // static + dynamic shared memory without opting in

static_assert(kTileW == kWarp, "a tile row is one warp: coalesced global loads and stores");

// Shared-memory elements of a tiled correlate block: k*k taps plus the halo tile.
inline int64_t correlate_smem_elems(int64_t k) { return k * k + (kTileH + k - 1) * (kTileW + k - 1); }

// One block per (n, co, tile row, tile column); blockIdx.x = ((n * cout + co) * tiles_h + th) * tiles_w + tw.
template <typename scalar_t, typename index_t, bool TILED>
__global__ void __launch_bounds__(kBlock)
    correlate_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ taps,
                     const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, index_t cin, index_t cout,
                     index_t H, index_t W, int k, bool flip, index_t tiles_h, index_t tiles_w) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem_raw[];
  const int pad = k / 2;
  const int kk = k * k;

  const int tx = static_cast<int>(threadIdx.x) % kTileW;
  const int ty = static_cast<int>(threadIdx.x) / kTileW;
  const int tid = static_cast<int>(threadIdx.x);
  index_t b = static_cast<index_t>(blockIdx.x);
  const index_t tw = b % tiles_w;
  b /= tiles_w;
  const index_t th = b % tiles_h;
  const index_t plane = b / tiles_h;  // n * cout + co
  const index_t co = plane % cout;
  const index_t n = plane / cout;
  const index_t h0 = th * kTileH, w0 = tw * kTileW;
  const index_t h = h0 + ty, w = w0 + tx;
  const index_t HW = H * W;
  const bool inside = h < H && w < W;

  scalar_t acc = scalar_t(0);
  for (index_t ci = 0; ci < cin; ++ci) {
    const scalar_t* in_plane = in + (n * cin + ci) * HW;
    const scalar_t* tap = taps + (co * cin + ci) * static_cast<index_t>(kk);
    if constexpr (TILED) {
      // Shared memory: the k*k taps, then the (kTileH + k - 1) x (kTileW + k - 1) halo tile.
      scalar_t* s_tap = reinterpret_cast<scalar_t*>(smem_raw);
      scalar_t* s_in = s_tap + kk;
      const int halo_w = kTileW + k - 1;
      const int halo_elems = (kTileH + k - 1) * halo_w;
      if (ci > 0) __syncthreads();  // the previous channel's tile is no longer read
      // flip: tap[k-1-i][k-1-j], i.e. the flat index reversed.
      for (int t = tid; t < kk; t += kBlock) s_tap[t] = tap[flip ? kk - 1 - t : t];
      for (int t = tid; t < halo_elems; t += kBlock) {
        const index_t gh = h0 - pad + t / halo_w;
        const index_t gw = w0 - pad + t % halo_w;
        s_in[t] = (gh >= 0 && gh < H && gw >= 0 && gw < W) ? in_plane[gh * W + gw] : scalar_t(0);
      }
      __syncthreads();
      if (inside) {
        for (int i = 0; i < k; ++i) {
          const scalar_t* row = s_in + (ty + i) * halo_w + tx;
          const scalar_t* tap_row = s_tap + i * k;
          for (int j = 0; j < k; ++j) acc += tap_row[j] * row[j];
        }
      }
    } else {
      if (inside) {
        for (int i = 0; i < k; ++i) {
          const index_t gh = h - pad + i;
          if (gh < 0 || gh >= H) continue;
          for (int j = 0; j < k; ++j) {
            const index_t gw = w - pad + j;
            if (gw < 0 || gw >= W) continue;
            const int t = i * k + j;
            acc += tap[flip ? kk - 1 - t : t] * in_plane[gh * W + gw];
          }
        }
      }
    }
  }
  if (inside) {
    if (bias != nullptr) acc += bias[0];
    out[plane * HW + h * W + w] = acc;
  }
}

// Block (tap, split): tap = (c * k + i) * k + j; split s covers [s * seg, min((s + 1) * seg, total))
// of the flat (n, h, w) axis. S == 1: writes gw[tap]; else part[s * taps + tap].
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBlock)
    weight_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ pooled,
                       scalar_t* __restrict__ out, index_t cin, index_t H, index_t W, int k, index_t total,
                       index_t seg, index_t S) {
  constexpr int kWarps = kBlock / kWarp;
  __shared__ scalar_t s_warp[kWarps];
  const index_t taps = cin * k * k;
  const index_t tap = static_cast<index_t>(blockIdx.x) % taps;
  const index_t s = static_cast<index_t>(blockIdx.x) / taps;
  const index_t c = tap / (k * k);
  const int ij = static_cast<int>(tap - c * k * k);
  const int di = ij / k - k / 2, dj = ij % k - k / 2;
  const index_t HW = H * W;
  const index_t begin = s * seg;
  const index_t end = begin + seg < total ? begin + seg : total;

  scalar_t acc = scalar_t(0);
  for (index_t e = begin + static_cast<index_t>(threadIdx.x); e < end; e += kBlock) {
    const index_t n = e / HW;
    const index_t hw = e - n * HW;
    const index_t h = hw / W;
    const index_t hh = h + di;
    const index_t ww = hw - h * W + dj;
    if (hh >= 0 && hh < H && ww >= 0 && ww < W) acc += grad[e] * pooled[(n * cin + c) * HW + hh * W + ww];
  }
  acc = group_sum(acc, kWarp);
  const int lane = static_cast<int>(threadIdx.x) % kWarp, warp = static_cast<int>(threadIdx.x) / kWarp;
  if (lane == 0) s_warp[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    scalar_t tot = s_warp[0];
    for (int w = 1; w < kWarps; ++w) tot += s_warp[w];
    out[s * taps + tap] = tot;
  }
}

// out[o] = sum_s part[s * count + o], in split order.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    sum_partials_kernel(const scalar_t* __restrict__ part, scalar_t* __restrict__ out, int64_t count, int64_t S) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (o >= count) return;
  scalar_t tot = part[o];
  for (int64_t s = 1; s < S; ++s) tot += part[s * count + o];
  out[o] = tot;
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

void check_conv_args(const at::Tensor& pooled, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(pooled.defined() && weight.defined(), "attnkern::", op, ": pooled and weight must be defined");
  TORCH_CHECK(pooled.dim() == 4, "attnkern::", op, ": pooled must be a 4-D tensor (N, Cin, H, W), got a ",
              pooled.dim(), "-D tensor of shape ", pooled.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == 1 && weight.size(1) == pooled.size(1) &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              "attnkern::", op, ": weight must be (1, ", pooled.size(1), ", k, k) with k odd, got shape ",
              weight.sizes());
  TORCH_CHECK(pooled.scalar_type() == weight.scalar_type() &&
                  (pooled.scalar_type() == at::kFloat || pooled.scalar_type() == at::kDouble),
              "attnkern::", op, ": pooled and weight must share one dtype, float32 or float64, got ",
              pooled.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(pooled.is_cuda(), "attnkern::", op, ": pooled must be a CUDA tensor, got device ", pooled.device());
  TORCH_CHECK(weight.device() == pooled.device(), "attnkern::", op, ": weight must be on pooled's device ",
              pooled.device(), ", got ", weight.device());
}

// True when every offset a kernel forms over tensors of these sizes (plus a halo / block of slack)
// fits in int32.
bool fits_int32(std::initializer_list<int64_t> numels, int64_t slack) {
  for (int64_t n : numels)
    if (n + slack >= static_cast<int64_t>(INT_MAX)) return false;
  return true;
}

template <typename scalar_t>
void launch_correlate(const at::Tensor& in, const at::Tensor& taps, const scalar_t* bias, at::Tensor& out,
                      int64_t cin, int64_t cout, int64_t k, bool flip) {
  const int64_t N = in.size(0), H = in.size(2), W = in.size(3);
  const int64_t tiles_h = ceil_div(H, kTileH), tiles_w = ceil_div(W, kTileW);
  const int64_t blocks = N * cout * tiles_h * tiles_w;
  TORCH_CHECK(blocks <= static_cast<int64_t>(INT_MAX), "attnkern::spatial_conv: the map is too large (",
              blocks, " blocks of ", kTileH, "x", kTileW, " outputs)");
  const size_t smem = static_cast<size_t>(correlate_smem_elems(k)) * sizeof(scalar_t);
  const bool tiled = smem <= kMaxSmemBytes;
  const bool small = fits_int32({in.numel(), out.numel(), blocks}, (k + kTileW) * (W + 1));
  auto go = [&](auto index_tag, auto tiled_tag) {
    using index_t = decltype(index_tag);
    constexpr bool TILED = decltype(tiled_tag)::value;
    correlate_kernel<scalar_t, index_t, TILED>
        <<<static_cast<unsigned>(blocks), kBlock, TILED ? smem : size_t{0}, c10::cuda::getCurrentCUDAStream()>>>(
            in.const_data_ptr<scalar_t>(), taps.const_data_ptr<scalar_t>(), bias, out.mutable_data_ptr<scalar_t>(),
            static_cast<index_t>(cin), static_cast<index_t>(cout), static_cast<index_t>(H), static_cast<index_t>(W),
            static_cast<int>(k), flip, static_cast<index_t>(tiles_h), static_cast<index_t>(tiles_w));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (small) {
    tiled ? go(int32_t{}, std::true_type{}) : go(int32_t{}, std::false_type{});
  } else {
    tiled ? go(int64_t{}, std::true_type{}) : go(int64_t{}, std::false_type{});
  }
}

template <typename scalar_t>
void launch_weight_grad(const at::Tensor& grad, const at::Tensor& pooled, at::Tensor& grad_weight, int64_t k) {
  const int64_t N = pooled.size(0), cin = pooled.size(1), H = pooled.size(2), W = pooled.size(3);
  const int64_t total = N * H * W;
  const int64_t taps = cin * k * k;
  // Enough blocks for ~2 per SM, each with at least 8 elements per thread.
  const int64_t want = ceil_div(2 * static_cast<int64_t>(sm_count(pooled.get_device())), taps);
  const int64_t S = std::max<int64_t>(1, std::min(want, ceil_div(total, kBlock * 8)));
  const int64_t seg = ceil_div(total, S);
  const int64_t blocks = taps * S;
  TORCH_CHECK(blocks <= static_cast<int64_t>(INT_MAX), "attnkern::spatial_conv_backward: too many taps (", taps, ")");
  at::Tensor part = S == 1 ? grad_weight : at::empty({S, taps}, grad_weight.options());
  const bool small = fits_int32({pooled.numel(), total + seg, blocks}, (k + 1) * (W + 1) + kBlock);
  auto go = [&](auto index_tag) {
    using index_t = decltype(index_tag);
    weight_grad_kernel<scalar_t, index_t>
        <<<static_cast<unsigned>(blocks), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
            grad.const_data_ptr<scalar_t>(), pooled.const_data_ptr<scalar_t>(), part.mutable_data_ptr<scalar_t>(),
            static_cast<index_t>(cin), static_cast<index_t>(H), static_cast<index_t>(W), static_cast<int>(k),
            static_cast<index_t>(total), static_cast<index_t>(seg), static_cast<index_t>(S));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (small)
    go(int32_t{});
  else
    go(int64_t{});
  if (S > 1) {
    sum_partials_kernel<scalar_t>
        <<<static_cast<unsigned>(ceil_div(taps, kBlock)), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
            part.const_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>(), taps, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor spatial_conv_cuda(const at::Tensor& pooled_in, const at::Tensor& weight_in,
                             const std::optional<at::Tensor>& bias_in) {
  const char* op = "spatial_conv";
  check_conv_args(pooled_in, weight_in, op);
  c10::cuda::CUDAGuard guard(pooled_in.device());
  const at::Tensor pooled = pooled_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->numel() == 1, "attnkern::", op, ": bias must have one element, got shape ", bias_in->sizes());
    TORCH_CHECK(at::isFloatingType(bias_in->scalar_type()), "attnkern::", op,
                ": bias must have a floating dtype, got ", bias_in->scalar_type());
    TORCH_CHECK(bias_in->device() == pooled.device(), "attnkern::", op, ": bias must be on pooled's device ",
                pooled.device(), ", got ", bias_in->device());
    bias = bias_in->reshape({1}).to(pooled.scalar_type()).contiguous();
  }
  const int64_t N = pooled.size(0), cin = pooled.size(1), H = pooled.size(2), W = pooled.size(3);
  const int64_t k = weight.size(-1);
  at::Tensor out = at::empty({N, 1, H, W}, pooled.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "attnkern_spatial_conv", [&] {
    const scalar_t* bias_p = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    launch_correlate<scalar_t>(pooled, weight, bias_p, out, cin, /*cout=*/1, k, /*flip=*/false);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> spatial_conv_backward_cuda(const at::Tensor& grad_in, const at::Tensor& pooled_in,
                                                              const at::Tensor& weight_in) {
  const char* op = "spatial_conv_backward";
  check_conv_args(pooled_in, weight_in, op);
  const int64_t N = pooled_in.size(0), cin = pooled_in.size(1), H = pooled_in.size(2), W = pooled_in.size(3);
  TORCH_CHECK(grad_in.defined() && grad_in.sizes() == at::IntArrayRef({N, 1, H, W}), "attnkern::", op,
              ": grad must have shape (", N, ", 1, ", H, ", ", W, "), got ",
              grad_in.defined() ? grad_in.sizes() : at::IntArrayRef{});
  TORCH_CHECK(grad_in.scalar_type() == pooled_in.scalar_type(), "attnkern::", op,
              ": grad must have pooled's dtype ", pooled_in.scalar_type(), ", got ", grad_in.scalar_type());
  TORCH_CHECK(grad_in.device() == pooled_in.device(), "attnkern::", op, ": grad must be on pooled's device ",
              pooled_in.device(), ", got ", grad_in.device());
  c10::cuda::CUDAGuard guard(pooled_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor pooled = pooled_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t k = weight.size(-1);
  at::Tensor grad_pooled = at::empty_like(pooled, at::MemoryFormat::Contiguous);
  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  if (N * H * W == 0 || cin == 0) return {grad_pooled, grad_weight.zero_()};
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "attnkern_spatial_conv_backward", [&] {
    // Input gradient: weight (1, Cin, k, k) read as Cin output channels of one input channel, flipped.
    launch_correlate<scalar_t>(grad, weight, nullptr, grad_pooled, /*cin=*/1, /*cout=*/cin, k, /*flip=*/true);
    launch_weight_grad<scalar_t>(grad, pooled, grad_weight, k);
  });
  return {grad_pooled, grad_weight};
}

}  // namespace
}  // namespace cuda
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, CUDA, m) {
  m.impl("spatial_conv", &attnkern::cuda::spatial_conv_cuda);
  m.impl("spatial_conv_backward", &attnkern::cuda::spatial_conv_backward_cuda);
}
