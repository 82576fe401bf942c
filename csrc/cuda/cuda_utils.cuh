// Shared pieces of attnkern's CUDA kernels: input checks and layout handling (host), vector
// loads, the first-maximum (value, index) rule and warp reductions (device), and the generic
// elementwise kernel used by apply_gates / cbam_input_grad / bam_combine / bam_input_grad.
//
// Only c10/cuda headers are used on the CUDA side (not ATen/cuda/CUDAContext.h, which pulls in
// cuBLAS / cuSPARSE headers): the files then also compile against a CPU build of torch, which is
// what tests/test_cuda_compile.py does.
#pragma once

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>

namespace attnkern {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Constants and small helpers
// ---------------------------------------------------------------------------------------------

constexpr int kBlock = 256;        // threads per block for every kernel here
constexpr int kWarp = 32;
constexpr int kVecBytes = 16;      // width of a vector load / store
constexpr int kBlocksPerSm = 32;   // grid cap for grid-stride loops (8 resident blocks x 4 waves)

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;  // double for double, float otherwise

template <typename scalar_t>
constexpr int vec_width() {
  return kVecBytes / static_cast<int>(sizeof(scalar_t));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool is_aligned(const void* p, int bytes = kVecBytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Elements per vector access for rows of `inner` contiguous elements: a vector must not cross a
// row and every pointer must be aligned to the vector's size. Tiers: 16 bytes; 8 bytes for 2-byte
// types (e.g. fp16 rows of 196 = 14 x 14); else scalar. Null pointers are ignored.
template <typename scalar_t>
int pick_vec(int64_t inner, std::initializer_list<const void*> ptrs) {
  constexpr int V = vec_width<scalar_t>();
  const int tiers[3] = {V, sizeof(scalar_t) == 2 ? V / 2 : 1, 1};
  for (int vec : tiers) {
    if (inner % vec != 0) continue;
    bool ok = true;
    for (const void* p : ptrs) ok = ok && is_aligned(p, vec * static_cast<int>(sizeof(scalar_t)));
    if (ok) return vec;
  }
  return 1;
}

// Calls f(std::integral_constant<int, VEC>{}) for the vec chosen by pick_vec (only its tiers are
// instantiated).
template <typename scalar_t, typename F>
void dispatch_vec(int vec, F&& f) {
  constexpr int V = vec_width<scalar_t>();
  if (vec == V) {
    f(std::integral_constant<int, V>{});
  } else if constexpr (sizeof(scalar_t) == 2) {
    if (vec == V / 2)
      f(std::integral_constant<int, V / 2>{});
    else
      f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Number of SMs of a device, queried once per device (no synchronisation; graph-capture safe).
inline int sm_count(int device) {
  constexpr int kMaxCached = 64;
  static std::atomic<int> cache[kMaxCached];
  if (device >= 0 && device < kMaxCached) {
    int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  v = std::max(v, 1);
  if (device >= 0 && device < kMaxCached) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

inline int64_t grid_cap(int device) { return static_cast<int64_t>(sm_count(device)) * kBlocksPerSm; }

// Launch shape of a reduction over the outer dim A of [N][A][B] with columns B innermost: a block
// of TX x TY threads (TX a power of two, at most a warp, TX * TY = kBlock) owns a tile of
// TX * vec columns of one sample and a segment of `seg` rows of A; S segments per tile. A is split
// only when the column tiles alone leave the GPU short of blocks, and never into segments of fewer
// than min_row_steps * TY rows. N * B > 0.
struct OuterPlan {
  int TX;
  int64_t tiles_b, S, seg, blocks;
};

inline OuterPlan outer_plan(int64_t N, int64_t A, int64_t B, int vec, int device, int64_t min_row_steps) {
  const int64_t sms = sm_count(device);
  const int64_t nvb = ceil_div(B, vec);  // vectors per row
  int TX = 1;
  while (TX < kWarp && TX < nvb) TX *= 2;
  const int TY = kBlock / TX;
  const int64_t tiles_b = ceil_div(B, static_cast<int64_t>(TX) * vec);
  const int64_t base_blocks = N * tiles_b;
  int64_t S = 1, seg = A;
  if (base_blocks < 2 * sms) {  // few column tiles: split A to fill the GPU
    const int64_t want = ceil_div(4 * sms, base_blocks);
    const int64_t most = std::max<int64_t>(1, A / (min_row_steps * TY));
    S = std::min(want, most);
    if (S > 1) {
      seg = ceil_div(A, S);
      S = ceil_div(A, seg);
    }
  }
  const int64_t blocks = std::max<int64_t>(1, std::min(base_blocks * S, grid_cap(device)));
  return {TX, tiles_b, S, seg, blocks};
}

// ---------------------------------------------------------------------------------------------
// Host-side checks and layout
// ---------------------------------------------------------------------------------------------

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), "attnkern::", op, ": ", name,
              " must have a floating dtype (float32, float64, float16 or bfloat16), got dtype ",
              t.scalar_type());
}

// x as the kernels see it: either NCHW-contiguous (inner dim HW) or channels_last (inner dim C).
// Any other layout is copied once into the one it suggests.
struct XInfo {
  at::Tensor x;
  at::MemoryFormat fmt;
  bool nhwc;
  int64_t N, C, H, W, HW;
};

inline XInfo prepare_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.defined(), "attnkern::", op, ": x is undefined");
  TORCH_CHECK(x.dim() == 4, "attnkern::", op, ": x must be a 4-D tensor (N, C, H, W), got a ",
              x.dim(), "-D tensor of shape ", x.sizes());
  check_dtype(x, op, "x");
  TORCH_CHECK(x.is_cuda(), "attnkern::", op, ": x must be a CUDA tensor, got device ", x.device());
  XInfo info;
  if (x.is_contiguous()) {
    info.x = x;
    info.fmt = at::MemoryFormat::Contiguous;
  } else if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    info.x = x;
    info.fmt = at::MemoryFormat::ChannelsLast;
  } else {
    info.fmt = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                           : at::MemoryFormat::Contiguous;
    info.x = x.contiguous(info.fmt);
  }
  info.nhwc = info.fmt == at::MemoryFormat::ChannelsLast;
  info.N = x.size(0);
  info.C = x.size(1);
  info.H = x.size(2);
  info.W = x.size(3);
  info.HW = info.H * info.W;
  // Indices inside one reduction (an argmax over C or over HW) are kept as 32-bit ints.
  TORCH_CHECK(info.C <= INT_MAX && info.HW <= INT_MAX, "attnkern::", op,
              ": C and H*W must each be below 2^31, got C=", info.C, ", H*W=", info.HW);
  return info;
}

// A full-size companion of x (grad, grad_x_partial): same shape and device; brought to x's dtype
// and to the layout the kernels read x in (a copy only when it differs).
inline at::Tensor prepare_full(const at::Tensor& t, const XInfo& xi, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "attnkern::", op, ": ", name, " is undefined");
  TORCH_CHECK(t.sizes().equals(xi.x.sizes()), "attnkern::", op, ": ", name, " must have x's shape ",
              xi.x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.device() == xi.x.device(), "attnkern::", op, ": ", name, " must be on x's device ",
              xi.x.device(), ", got ", t.device());
  check_dtype(t, op, name);
  at::Tensor r = t.scalar_type() == xi.x.scalar_type() ? t : t.to(xi.x.scalar_type());
  return r.is_contiguous(xi.fmt) ? r : r.contiguous(xi.fmt);
}

// A small per-sample tensor (gates, pooled maps, their grads): exact shape, x's device; converted to
// `dtype` (the acc dtype, or int64 for indices) and made contiguous (no-ops when already so).
inline at::Tensor prepare_small(const at::Tensor& t, const XInfo& xi, const char* op, const char* name,
                                at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), "attnkern::", op, ": ", name, " is undefined");
  TORCH_CHECK(t.sizes().equals(sizes), "attnkern::", op, ": ", name, " must have shape ", sizes,
              " for x of shape ", xi.x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.device() == xi.x.device(), "attnkern::", op, ": ", name, " must be on x's device ",
              xi.x.device(), ", got ", t.device());
  if (at::isFloatingType(dtype)) {
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "attnkern::", op, ": ", name,
                " must have a floating dtype, got dtype ", t.scalar_type());
  } else {
    TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), "attnkern::", op, ": ",
                name, " must have an integer dtype (int64 indices), got dtype ", t.scalar_type());
  }
  return t.to(dtype).contiguous();
}

inline at::ScalarType acc_dtype_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

template <typename A>
__device__ __forceinline__ bool is_nan(A v) {
  return v != v;
}

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// The max/argmax rule of torch.max(dim): the FIRST maximal element wins, NaN counts as maximal (the
// first NaN wins). Returns true when (cv, ci) must replace the current best (bv, bi). This is a
// strict total order on (value, index) pairs with distinct indices, so any combine order (thread
// loops, shuffles, split partials) gives the same result. The identity is (-inf, INT_MAX).
template <typename A>
__device__ __forceinline__ bool takes_over(A cv, int ci, A bv, int bi) {
  const bool cn = is_nan(cv), bn = is_nan(bv);
  if (cn || bn) return cn && (!bn || ci < bi);
  return cv > bv || (cv == bv && ci < bi);
}

template <typename A>
__device__ __forceinline__ void maxarg_update(A& bv, int& bi, A cv, int ci) {
  if (takes_over(cv, ci, bv, bi)) {
    bv = cv;
    bi = ci;
  }
}

// Butterfly reductions within aligned groups of `width` lanes (a power of two <= 32). Every lane of
// the warp must call them. Results are bitwise identical on all lanes of a group.
template <typename T>
__device__ __forceinline__ T group_sum(T v, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, width);
  return v;
}

template <typename A>
__device__ __forceinline__ void group_maxarg(A& v, int& i, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) {
    const A ov = __shfl_xor_sync(0xffffffffu, v, o, width);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o, width);
    maxarg_update(v, i, ov, oi);
  }
}

__device__ __forceinline__ float sigmoid_acc(float a) { return 1.0f / (1.0f + expf(-a)); }
__device__ __forceinline__ double sigmoid_acc(double a) { return 1.0 / (1.0 + exp(-a)); }

// ---------------------------------------------------------------------------------------------
// Elementwise kernel: out = op(in, extra, n, c, hw) over a full-size tensor in memory order.
// The tensor is viewed as rows of its contiguous inner dimension B (HW for NCHW, C for NHWC).
// VEC (pick_vec) divides B and all pointers are aligned to VEC elements, so a vector never crosses
// a row. index_t is int32 when numel (plus one grid stride) fits, int64 otherwise.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename Op, int VEC, typename index_t>
__global__ void __launch_bounds__(kBlock)
    elementwise_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ extra,
                       scalar_t* __restrict__ out, Op op, index_t nvec, index_t C, index_t HW, bool nhwc) {
  using acc_t = typename Op::acc_t;
  const index_t B = nhwc ? C : HW;
  const index_t stride = static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x);
  for (index_t iv = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) +
                                static_cast<index_t>(threadIdx.x);
       iv < nvec;
       iv += stride) {
    const index_t e = iv * VEC;
    const index_t r = e / B;
    const index_t j = e - r * B;
    index_t n, c0, hw0;
    if (nhwc) {
      n = r / HW;
      hw0 = r - n * HW;
      c0 = j;
    } else {
      n = r / C;
      c0 = r - n * C;
      hw0 = j;
    }
    const Vec<scalar_t, VEC> vin = load_vec<VEC>(in + e);
    Vec<scalar_t, VEC> vex;
    if (extra != nullptr) vex = load_vec<VEC>(extra + e);
    Vec<scalar_t, VEC> vout;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const int64_t c = static_cast<int64_t>(c0) + (nhwc ? v : 0);
      const int64_t hw = static_cast<int64_t>(hw0) + (nhwc ? 0 : v);
      const acc_t ex = extra != nullptr ? static_cast<acc_t>(vex.v[v]) : acc_t(0);
      vout.v[v] = static_cast<scalar_t>(op(static_cast<acc_t>(vin.v[v]), ex, static_cast<int64_t>(n), c, hw));
    }
    store_vec<VEC>(out + e, vout);
  }
}

template <typename scalar_t, int VEC, typename index_t, typename Op>
void launch_elementwise_impl(const scalar_t* in, const scalar_t* extra, scalar_t* out, int64_t numel,
                             const XInfo& xi, const Op& op, int64_t blocks) {
  elementwise_kernel<scalar_t, Op, VEC, index_t>
      <<<static_cast<unsigned>(blocks), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
          in, extra, out, op, static_cast<index_t>(numel / VEC), static_cast<index_t>(xi.C),
          static_cast<index_t>(xi.HW), xi.nhwc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// `in`, `extra` (may be undefined) and `out` are full-size, in x's layout and dtype.
template <typename scalar_t, typename Op>
void launch_elementwise(const at::Tensor& in, const at::Tensor& extra, at::Tensor& out, const XInfo& xi,
                        const Op& op) {
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const scalar_t* in_p = in.const_data_ptr<scalar_t>();
  const scalar_t* ex_p = extra.defined() ? extra.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
  const int vec = pick_vec<scalar_t>(xi.nhwc ? xi.C : xi.HW, {in_p, ex_p, out_p});
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(numel / vec, kBlock), grid_cap(xi.x.get_device())));
  const bool small = numel + blocks * kBlock * vec < static_cast<int64_t>(INT_MAX);
  dispatch_vec<scalar_t>(vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    if (small)
      launch_elementwise_impl<scalar_t, VEC, int32_t>(in_p, ex_p, out_p, numel, xi, op, blocks);
    else
      launch_elementwise_impl<scalar_t, VEC, int64_t>(in_p, ex_p, out_p, numel, xi, op, blocks);
  });
}

}  // namespace cuda
}  // namespace attnkern
