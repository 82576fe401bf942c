// CUDA kernels of CBAM (and SE): channel_pool, spatial_pool, apply_gates, spatial_gate_grad,
// channel_gate_grad, cbam_input_grad. Schemas and semantics: csrc/ops.cpp; the definitions they
// must match: attnkern/backends/torch_kernels.py.
//
// x is viewed as [N][A][B] with B the contiguous inner dimension: NCHW -> A = C, B = HW;
// channels_last -> A = HW, B = C. Every reduction is then one of two kinds:
//   * over the inner dim B, one result per row (n, a)     -> inner_reduce_kernel
//       (channel_pool / channel_gate_grad on NCHW, spatial_pool / spatial_gate_grad on NHWC)
//     A group of `tpr` threads (1..256, power of two) per row reads the row with coalesced vector
//     loads; warp shuffles then, for tpr > 32, a fixed-order pass over the group's warps in shared
//     memory. Long rows with few of them are split in S segments (partials + finalize_kernel).
//   * over the outer dim A, one result per column (n, b)  -> outer_reduce_kernel
//       (channel_pool / channel_gate_grad on NHWC, spatial_pool / spatial_gate_grad on NCHW)
//     A block is TX x TY threads (TX * TY = 256); TX threads cover TX * VEC consecutive columns,
//     TY threads stride over rows; the TY partials of a column are combined in fixed order through
//     shared memory. Few column tiles and a long A are split in S segments of A (partials +
//     finalize_kernel).
// No atomics: every result is produced by a fixed combine order for a given shape / alignment.
#include "cuda_utils.cuh"

#include <torch/library.h>

namespace attnkern {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Reduction "ops": value(x, g, n, c, hw) is the reduced quantity of one element (g = grad where
// kGrad), write(n, k, sum, max, argmax) stores the result of kept index k (c or hw).
// ---------------------------------------------------------------------------------------------

template <typename acc>
struct ChannelPoolOp {  // over HW: avg, max, argmax per (n, c)
  using acc_t = acc;
  static constexpr bool kMax = true;
  static constexpr bool kGrad = false;
  acc* avg;
  acc* mx;
  int64_t* arg;
  int64_t C;
  acc count;  // HW
  __device__ __forceinline__ acc value(acc x, acc, int64_t, int64_t, int64_t) const { return x; }
  __device__ __forceinline__ void write(int64_t n, int64_t c, acc sum, acc m, int i) const {
    const int64_t o = n * C + c;
    avg[o] = sum / count;
    mx[o] = m;
    arg[o] = i;
  }
};

template <typename acc>
struct SpatialPoolOp {  // over C of x * gate: pooled[n,0] = mean, pooled[n,1] = max, argmax per (n, hw)
  using acc_t = acc;
  static constexpr bool kMax = true;
  static constexpr bool kGrad = false;
  const acc* gate;
  acc* pooled;
  int64_t* arg;
  int64_t C, HW;
  __device__ __forceinline__ acc value(acc x, acc, int64_t n, int64_t c, int64_t) const {
    return x * gate[n * C + c];
  }
  __device__ __forceinline__ void write(int64_t n, int64_t hw, acc sum, acc m, int i) const {
    pooled[2 * n * HW + hw] = sum / static_cast<acc>(C);
    pooled[(2 * n + 1) * HW + hw] = m;
    arg[n * HW + hw] = i;
  }
};

template <typename acc>
struct SpatialGateGradOp {  // over C: sum grad * x * gate per (n, hw)
  using acc_t = acc;
  static constexpr bool kMax = false;
  static constexpr bool kGrad = true;
  const acc* gate;
  acc* out;
  int64_t C, HW;
  __device__ __forceinline__ acc value(acc x, acc g, int64_t n, int64_t c, int64_t) const {
    return g * x * gate[n * C + c];
  }
  __device__ __forceinline__ void write(int64_t n, int64_t hw, acc sum, acc, int) const { out[n * HW + hw] = sum; }
};

// g1 = grad w.r.t. x * channel_gate (see csrc/ops.cpp); shared by channel_gate_grad and cbam_input_grad.
template <typename acc>
struct GatedInputGrad {
  const acc* sg;        // (N, HW) or null: no spatial terms at all
  const acc* gp;        // (N, 2, HW) or null: no pooled terms
  const int64_t* sarg;  // (N, HW), with gp
  int64_t C, HW;
  __device__ __forceinline__ acc operator()(acc g, int64_t n, int64_t c, int64_t hw) const {
    if (sg == nullptr) return g;
    const int64_t s = n * HW + hw;
    acc g1 = g * sg[s];
    if (gp != nullptr) {
      g1 = g1 + gp[2 * n * HW + hw] / static_cast<acc>(C);
      if (sarg[s] == c) g1 = g1 + gp[(2 * n + 1) * HW + hw];
    }
    return g1;
  }
};

template <typename acc>
struct ChannelGateGradOp {  // over HW: sum g1 * x per (n, c)
  using acc_t = acc;
  static constexpr bool kMax = false;
  static constexpr bool kGrad = true;
  GatedInputGrad<acc> g1;
  acc* out;
  int64_t C;
  __device__ __forceinline__ acc value(acc x, acc g, int64_t n, int64_t c, int64_t hw) const {
    return g1(g, n, c, hw) * x;
  }
  __device__ __forceinline__ void write(int64_t n, int64_t c, acc sum, acc, int) const { out[n * C + c] = sum; }
};

// ---------------------------------------------------------------------------------------------
// Reduction kernels
// ---------------------------------------------------------------------------------------------

// One group of `tpr` threads per unit (row r = n * A + a, segment s of its B range). S == 1: the
// op writes the result; S > 1: partials at [r * S + s].
template <typename scalar_t, typename Op, int VEC, bool NHWC>
__global__ void __launch_bounds__(kBlock)
    inner_reduce_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, Op op, int64_t rows,
                        int64_t A, int64_t B, int tpr, int64_t S, int64_t seg, typename Op::acc_t* __restrict__ psum,
                        typename Op::acc_t* __restrict__ pmax, int* __restrict__ parg) {
  using acc = typename Op::acc_t;
  constexpr int kWarps = kBlock / kWarp;
  __shared__ acc s_sum[kWarps];
  __shared__ acc s_max[Op::kMax ? kWarps : 1];
  __shared__ int s_arg[Op::kMax ? kWarps : 1];

  const int tid = static_cast<int>(threadIdx.x);
  const int groups = kBlock / tpr;
  const int group = tid / tpr;
  const int gl = tid - group * tpr;
  const int width = tpr < kWarp ? tpr : kWarp;
  const int64_t units = rows * S;

  // `base` is uniform across the block, so every thread runs the same iterations (__syncthreads).
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * groups; base < units;
       base += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t u = base + group;
    const bool active = u < units;
    acc sum = acc(0);
    acc mx = neg_inf<acc>();
    int am = INT_MAX;
    int64_t n = 0, a = 0;
    if (active) {
      const int64_t r = u / S;
      const int64_t s = u - r * S;
      n = r / A;
      a = r - n * A;
      const int64_t b_begin = s * seg;
      const int64_t b_end = b_begin + seg < B ? b_begin + seg : B;
      const scalar_t* xr = x + r * B;
      const scalar_t* gr = Op::kGrad ? g + r * B : nullptr;
      for (int64_t b = b_begin + static_cast<int64_t>(gl) * VEC; b < b_end; b += static_cast<int64_t>(tpr) * VEC) {
        const Vec<scalar_t, VEC> xv = load_vec<VEC>(xr + b);
        Vec<scalar_t, VEC> gv;
        if constexpr (Op::kGrad) gv = load_vec<VEC>(gr + b);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const int64_t c = NHWC ? b + v : a;
          const int64_t hw = NHWC ? a : b + v;
          acc gval = acc(0);
          if constexpr (Op::kGrad) gval = static_cast<acc>(gv.v[v]);
          const acc val = op.value(static_cast<acc>(xv.v[v]), gval, n, c, hw);
          sum += val;
          if constexpr (Op::kMax) maxarg_update(mx, am, val, static_cast<int>(b + v));
        }
      }
    }
    sum = group_sum(sum, width);
    if constexpr (Op::kMax) group_maxarg(mx, am, width);
    if (tpr > kWarp) {  // uniform: combine the group's warps in order
      const int warp = tid / kWarp;
      if ((tid & (kWarp - 1)) == 0) {
        s_sum[warp] = sum;
        if constexpr (Op::kMax) {
          s_max[warp] = mx;
          s_arg[warp] = am;
        }
      }
      __syncthreads();
      if (gl == 0) {
        const int w0 = group * (tpr / kWarp);
        sum = s_sum[w0];
        if constexpr (Op::kMax) {
          mx = s_max[w0];
          am = s_arg[w0];
        }
        for (int w = 1; w < tpr / kWarp; ++w) {
          sum += s_sum[w0 + w];
          if constexpr (Op::kMax) maxarg_update(mx, am, s_max[w0 + w], s_arg[w0 + w]);
        }
      }
      __syncthreads();
    }
    if (active && gl == 0) {
      if (S == 1) {
        op.write(n, a, sum, mx, am);
      } else {
        psum[u] = sum;
        if constexpr (Op::kMax) {
          pmax[u] = mx;
          parg[u] = am;
        }
      }
    }
  }
}

// Block = TX x TY threads over a tile of TX * VEC columns of sample n and segment s of A.
// S == 1: the op writes the result of column (n, b); S > 1: partials at [(n * B + b) * S + s].
template <typename scalar_t, typename Op, int VEC, bool NHWC>
__global__ void __launch_bounds__(kBlock)
    outer_reduce_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, Op op, int64_t N,
                        int64_t A, int64_t B, int TX, int64_t tiles_b, int64_t S, int64_t seg,
                        typename Op::acc_t* __restrict__ psum, typename Op::acc_t* __restrict__ pmax,
                        int* __restrict__ parg) {
  using acc = typename Op::acc_t;
  constexpr int kTile = kBlock * VEC;
  __shared__ acc s_sum[kTile];
  __shared__ acc s_max[Op::kMax ? kTile : 1];
  __shared__ int s_arg[Op::kMax ? kTile : 1];

  const int tid = static_cast<int>(threadIdx.x);
  const int TY = kBlock / TX;
  const int ty = tid / TX;
  const int tx = tid - ty * TX;
  const int TB = TX * VEC;
  const int64_t total = N * tiles_b * S;

  for (int64_t blk = blockIdx.x; blk < total; blk += gridDim.x) {  // uniform across the block
    const int64_t t = blk / S;
    const int64_t s = blk - t * S;
    const int64_t n = t / tiles_b;
    const int64_t bt = t - n * tiles_b;
    const int64_t b0 = bt * TB + static_cast<int64_t>(tx) * VEC;
    const int64_t a_begin = s * seg;
    const int64_t a_end = a_begin + seg < A ? a_begin + seg : A;

    acc sum[VEC];
    acc mx[VEC];
    int am[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      sum[v] = acc(0);
      mx[v] = neg_inf<acc>();
      am[v] = INT_MAX;
    }
    if (b0 < B) {  // B % VEC == 0 when VEC > 1: the whole vector is in range
      for (int64_t a = a_begin + ty; a < a_end; a += TY) {
        const int64_t off = (n * A + a) * B + b0;
        const Vec<scalar_t, VEC> xv = load_vec<VEC>(x + off);
        Vec<scalar_t, VEC> gv;
        if constexpr (Op::kGrad) gv = load_vec<VEC>(g + off);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const int64_t c = NHWC ? b0 + v : a;
          const int64_t hw = NHWC ? a : b0 + v;
          acc gval = acc(0);
          if constexpr (Op::kGrad) gval = static_cast<acc>(gv.v[v]);
          const acc val = op.value(static_cast<acc>(xv.v[v]), gval, n, c, hw);
          sum[v] += val;
          if constexpr (Op::kMax) maxarg_update(mx[v], am[v], val, static_cast<int>(a));
        }
      }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const int j = ty * TB + tx * VEC + v;
      s_sum[j] = sum[v];
      if constexpr (Op::kMax) {
        s_max[j] = mx[v];
        s_arg[j] = am[v];
      }
    }
    __syncthreads();
    for (int j = tid; j < TB; j += kBlock) {
      const int64_t b = bt * TB + j;
      if (b < B) {
        acc tot = s_sum[j];
        acc m = neg_inf<acc>();
        int i = INT_MAX;
        if constexpr (Op::kMax) {
          m = s_max[j];
          i = s_arg[j];
        }
        for (int y = 1; y < TY; ++y) {
          tot += s_sum[y * TB + j];
          if constexpr (Op::kMax) maxarg_update(m, i, s_max[y * TB + j], s_arg[y * TB + j]);
        }
        if (S == 1) {
          op.write(n, b, tot, m, i);
        } else {
          const int64_t o = (n * B + b) * S + s;
          psum[o] = tot;
          if constexpr (Op::kMax) {
            pmax[o] = m;
            parg[o] = i;
          }
        }
      }
    }
    __syncthreads();
  }
}

// Combines S partials per output o = n * K + k in order s = 0..S-1.
template <typename Op>
__global__ void __launch_bounds__(kBlock)
    finalize_kernel(Op op, const typename Op::acc_t* __restrict__ psum, const typename Op::acc_t* __restrict__ pmax,
                    const int* __restrict__ parg, int64_t count, int64_t K, int64_t S) {
  using acc = typename Op::acc_t;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < count;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc tot = acc(0);
    acc m = neg_inf<acc>();
    int i = INT_MAX;
    for (int64_t s = 0; s < S; ++s) {
      tot += psum[o * S + s];
      if constexpr (Op::kMax) maxarg_update(m, i, pmax[o * S + s], parg[o * S + s]);
    }
    const int64_t n = o / K;
    op.write(n, o - n * K, tot, m, i);
  }
}

// ---------------------------------------------------------------------------------------------
// Reduction launchers
// ---------------------------------------------------------------------------------------------

struct Partials {
  at::Tensor sum, max, arg;
};

template <typename Op>
Partials make_partials(const XInfo& xi, int64_t count) {
  Partials p;
  const auto acc_opts = xi.x.options().dtype(acc_dtype_of(xi.x)).memory_format(at::MemoryFormat::Contiguous);
  p.sum = at::empty({count}, acc_opts);
  if (Op::kMax) {
    p.max = at::empty({count}, acc_opts);
    p.arg = at::empty({count}, acc_opts.dtype(at::kInt));
  }
  return p;
}

template <typename Op>
void launch_finalize(const Op& op, const Partials& p, const XInfo& xi, int64_t count, int64_t K, int64_t S) {
  using acc = typename Op::acc_t;
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(count, kBlock), grid_cap(xi.x.get_device())));
  finalize_kernel<Op><<<static_cast<unsigned>(blocks), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      op, p.sum.data_ptr<acc>(), Op::kMax ? p.max.data_ptr<acc>() : nullptr,
      Op::kMax ? p.arg.data_ptr<int>() : nullptr, count, K, S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Reduce over the inner dim B of x viewed as [N][A][B]; results per (n, a).
template <typename scalar_t, typename Op, bool NHWC, int VEC>
void reduce_inner_impl(const scalar_t* x, const scalar_t* g, const Op& op, const XInfo& xi, int64_t A, int64_t B) {
  const int device = xi.x.get_device();
  const int64_t sms = sm_count(device);
  const int64_t rows = xi.N * A;
  const int64_t nv = ceil_div(B, VEC);  // vectors per row
  int tpr = 1;                          // ~4 or more vectors per thread
  while (tpr < kBlock && static_cast<int64_t>(tpr) * 4 < nv) tpr *= 2;
  int64_t S = 1, seg = B;
  if (tpr == kBlock && rows < 2 * sms) {  // few long rows: split them to fill the GPU
    const int64_t want = ceil_div(4 * sms, rows);
    const int64_t most = std::max<int64_t>(1, nv / (static_cast<int64_t>(kBlock) * 4));
    S = std::min(want, most);
    if (S > 1) {
      const int64_t segv = ceil_div(nv, S);
      seg = segv * VEC;
      S = ceil_div(nv, segv);
    }
  }
  const int64_t groups = kBlock / tpr;
  const int64_t units = rows * S;
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(units, groups), grid_cap(device)));
  using acc = typename Op::acc_t;
  Partials p;
  if (S > 1) p = make_partials<Op>(xi, units);
  inner_reduce_kernel<scalar_t, Op, VEC, NHWC>
      <<<static_cast<unsigned>(blocks), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x, g, op, rows, A, B, tpr, S, seg, S > 1 ? p.sum.data_ptr<acc>() : nullptr,
          S > 1 && Op::kMax ? p.max.data_ptr<acc>() : nullptr, S > 1 && Op::kMax ? p.arg.data_ptr<int>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (S > 1) launch_finalize(op, p, xi, rows, A, S);
}

// Reduce over the outer dim A of x viewed as [N][A][B]; results per (n, b).
template <typename scalar_t, typename Op, bool NHWC, int VEC>
void reduce_outer_impl(const scalar_t* x, const scalar_t* g, const Op& op, const XInfo& xi, int64_t A, int64_t B) {
  const OuterPlan plan = outer_plan(xi.N, A, B, VEC, xi.x.get_device(), 4);
  const int64_t S = plan.S;
  using acc = typename Op::acc_t;
  Partials p;
  if (S > 1) p = make_partials<Op>(xi, xi.N * B * S);
  outer_reduce_kernel<scalar_t, Op, VEC, NHWC>
      <<<static_cast<unsigned>(plan.blocks), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x, g, op, xi.N, A, B, plan.TX, plan.tiles_b, S, plan.seg, S > 1 ? p.sum.data_ptr<acc>() : nullptr,
          S > 1 && Op::kMax ? p.max.data_ptr<acc>() : nullptr, S > 1 && Op::kMax ? p.arg.data_ptr<int>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (S > 1) launch_finalize(op, p, xi, xi.N * B, B, S);
}

// Reduces over C (kOverChannels) or over HW, picking the kernel that keeps loads coalesced for
// x's layout, and vector loads where the inner dim and the pointers allow (pick_vec). The reduced dim is
// the inner one for NCHW over HW and for NHWC over C; only those kernel variants are instantiated.
template <typename scalar_t, bool kOverChannels, typename Op>
void reduce(const at::Tensor& x, const at::Tensor& g, const Op& op, const XInfo& xi) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = Op::kGrad ? g.const_data_ptr<scalar_t>() : nullptr;
  const int64_t A = xi.nhwc ? xi.HW : xi.C;
  const int64_t B = xi.nhwc ? xi.C : xi.HW;
  const int vec = pick_vec<scalar_t>(B, {xp, gp});
  dispatch_vec<scalar_t>(vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    if (xi.nhwc == kOverChannels)
      reduce_inner_impl<scalar_t, Op, kOverChannels, VEC>(xp, gp, op, xi, A, B);
    else
      reduce_outer_impl<scalar_t, Op, !kOverChannels, VEC>(xp, gp, op, xi, A, B);
  });
}

// ---------------------------------------------------------------------------------------------
// Elementwise ops
// ---------------------------------------------------------------------------------------------

template <typename acc>
struct ApplyGatesOp {  // y = x * (channel_gate[n,c] * spatial_gate[n,hw])
  using acc_t = acc;
  const acc* cg;
  const acc* sg;  // may be null
  int64_t C, HW;
  __device__ __forceinline__ acc operator()(acc x, acc, int64_t n, int64_t c, int64_t hw) const {
    acc scale = cg[n * C + c];
    if (sg != nullptr) scale = scale * sg[n * HW + hw];
    return x * scale;
  }
};

template <typename acc>
struct CbamInputGradOp {  // dx = g1 * cg + grad_avg / HW + grad_max * [hw == channel_argmax]
  using acc_t = acc;
  GatedInputGrad<acc> g1;
  const acc* cg;
  const acc* gavg;      // may be null
  const acc* gmax;      // may be null
  const int64_t* carg;  // with gmax
  int64_t C, HW;
  __device__ __forceinline__ acc operator()(acc g, acc, int64_t n, int64_t c, int64_t hw) const {
    const int64_t k = n * C + c;
    acc dx = g1(g, n, c, hw) * cg[k];
    if (gavg != nullptr) dx = dx + gavg[k] / static_cast<acc>(HW);
    if (gmax != nullptr && carg[k] == hw) dx = dx + gmax[k];
    return dx;
  }
};

// ---------------------------------------------------------------------------------------------
// Host ops
// ---------------------------------------------------------------------------------------------

// The spatial terms of g1: spatial_gate (N,H,W); grad_pooled (N,2,H,W) and spatial_argmax (N,H,W)
// are used only with spatial_gate (as in torch_kernels); spatial_argmax is required with grad_pooled.
struct SpatialTerms {
  at::Tensor sg, gp, sarg;
};

SpatialTerms prepare_spatial_terms(const XInfo& xi, const char* op, const std::optional<at::Tensor>& spatial_gate,
                                   const std::optional<at::Tensor>& grad_pooled,
                                   const std::optional<at::Tensor>& spatial_argmax) {
  SpatialTerms t;
  if (!spatial_gate.has_value() || !spatial_gate->defined()) return t;
  const auto acc = acc_dtype_of(xi.x);
  t.sg = prepare_small(*spatial_gate, xi, op, "spatial_gate", {xi.N, xi.H, xi.W}, acc);
  if (grad_pooled.has_value() && grad_pooled->defined()) {
    t.gp = prepare_small(*grad_pooled, xi, op, "grad_pooled", {xi.N, 2, xi.H, xi.W}, acc);
    TORCH_CHECK(spatial_argmax.has_value() && spatial_argmax->defined(), "attnkern::", op,
                ": spatial_argmax is required with grad_pooled");
    t.sarg = prepare_small(*spatial_argmax, xi, op, "spatial_argmax", {xi.N, xi.H, xi.W}, at::kLong);
  }
  return t;
}

template <typename acc>
GatedInputGrad<acc> gated_input_grad(const SpatialTerms& t, const XInfo& xi) {
  GatedInputGrad<acc> g1;
  g1.sg = t.sg.defined() ? t.sg.const_data_ptr<acc>() : nullptr;
  g1.gp = t.gp.defined() ? t.gp.const_data_ptr<acc>() : nullptr;
  g1.sarg = t.sarg.defined() ? t.sarg.const_data_ptr<int64_t>() : nullptr;
  g1.C = xi.C;
  g1.HW = xi.HW;
  return g1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_pool_cuda(const at::Tensor& x_in) {
  const char* op = "channel_pool";
  const XInfo xi = prepare_x(x_in, op);
  const auto acc_opts = xi.x.options().dtype(acc_dtype_of(xi.x)).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor avg = at::empty({xi.N, xi.C}, acc_opts);
  at::Tensor mx = at::empty({xi.N, xi.C}, acc_opts);
  at::Tensor arg = at::empty({xi.N, xi.C}, acc_opts.dtype(at::kLong));
  if (xi.N * xi.C == 0) return {avg, mx, arg};
  TORCH_CHECK(xi.HW > 0, "attnkern::", op, ": cannot take the max over an empty H*W (x has shape ", xi.x.sizes(), ")");
  c10::cuda::CUDAGuard guard(xi.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xi.x.scalar_type(), "attnkern_channel_pool", [&] {
    using acc = acc_type<scalar_t>;
    ChannelPoolOp<acc> p{avg.data_ptr<acc>(), mx.data_ptr<acc>(), arg.data_ptr<int64_t>(), xi.C,
                         static_cast<acc>(xi.HW)};
    reduce<scalar_t, /*kOverChannels=*/false>(xi.x, at::Tensor(), p, xi);
  });
  return {avg, mx, arg};
}

std::tuple<at::Tensor, at::Tensor> spatial_pool_cuda(const at::Tensor& x_in, const at::Tensor& channel_gate) {
  const char* op = "spatial_pool";
  const XInfo xi = prepare_x(x_in, op);
  const auto acc = acc_dtype_of(xi.x);
  const at::Tensor cg = prepare_small(channel_gate, xi, op, "channel_gate", {xi.N, xi.C}, acc);
  const auto acc_opts = xi.x.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor pooled = at::empty({xi.N, 2, xi.H, xi.W}, acc_opts);
  at::Tensor arg = at::empty({xi.N, xi.H, xi.W}, acc_opts.dtype(at::kLong));
  if (xi.N * xi.HW == 0) return {pooled, arg};
  TORCH_CHECK(xi.C > 0, "attnkern::", op, ": cannot take the max over an empty C (x has shape ", xi.x.sizes(), ")");
  c10::cuda::CUDAGuard guard(xi.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xi.x.scalar_type(), "attnkern_spatial_pool", [&] {
    using acc_t = acc_type<scalar_t>;
    SpatialPoolOp<acc_t> p{cg.const_data_ptr<acc_t>(), pooled.data_ptr<acc_t>(), arg.data_ptr<int64_t>(), xi.C,
                           xi.HW};
    reduce<scalar_t, /*kOverChannels=*/true>(xi.x, at::Tensor(), p, xi);
  });
  return {pooled, arg};
}

at::Tensor apply_gates_cuda(const at::Tensor& x_in, const at::Tensor& channel_gate,
                            const std::optional<at::Tensor>& spatial_gate) {
  const char* op = "apply_gates";
  const XInfo xi = prepare_x(x_in, op);
  const auto acc = acc_dtype_of(xi.x);
  const at::Tensor cg = prepare_small(channel_gate, xi, op, "channel_gate", {xi.N, xi.C}, acc);
  at::Tensor sg;
  if (spatial_gate.has_value() && spatial_gate->defined())
    sg = prepare_small(*spatial_gate, xi, op, "spatial_gate", {xi.N, xi.H, xi.W}, acc);
  at::Tensor y = at::empty_like(xi.x);
  if (y.numel() == 0) return y;
  c10::cuda::CUDAGuard guard(xi.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xi.x.scalar_type(), "attnkern_apply_gates", [&] {
    using acc_t = acc_type<scalar_t>;
    ApplyGatesOp<acc_t> p{cg.const_data_ptr<acc_t>(), sg.defined() ? sg.const_data_ptr<acc_t>() : nullptr, xi.C,
                          xi.HW};
    launch_elementwise<scalar_t>(xi.x, at::Tensor(), y, xi, p);
  });
  return y;
}

at::Tensor spatial_gate_grad_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& channel_gate) {
  const char* op = "spatial_gate_grad";
  const XInfo xi = prepare_x(x_in, op);
  const at::Tensor grad = prepare_full(grad_in, xi, op, "grad");
  const auto acc = acc_dtype_of(xi.x);
  const at::Tensor cg = prepare_small(channel_gate, xi, op, "channel_gate", {xi.N, xi.C}, acc);
  at::Tensor out = at::empty({xi.N, xi.H, xi.W}, xi.x.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  if (xi.C == 0) return out.zero_();  // empty sum
  c10::cuda::CUDAGuard guard(xi.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xi.x.scalar_type(), "attnkern_spatial_gate_grad", [&] {
    using acc_t = acc_type<scalar_t>;
    SpatialGateGradOp<acc_t> p{cg.const_data_ptr<acc_t>(), out.data_ptr<acc_t>(), xi.C, xi.HW};
    reduce<scalar_t, /*kOverChannels=*/true>(xi.x, grad, p, xi);
  });
  return out;
}

at::Tensor channel_gate_grad_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                  const std::optional<at::Tensor>& spatial_gate,
                                  const std::optional<at::Tensor>& grad_pooled,
                                  const std::optional<at::Tensor>& spatial_argmax) {
  const char* op = "channel_gate_grad";
  const XInfo xi = prepare_x(x_in, op);
  const at::Tensor grad = prepare_full(grad_in, xi, op, "grad");
  const SpatialTerms terms = prepare_spatial_terms(xi, op, spatial_gate, grad_pooled, spatial_argmax);
  const auto acc = acc_dtype_of(xi.x);
  at::Tensor out = at::empty({xi.N, xi.C}, xi.x.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  if (xi.HW == 0) return out.zero_();  // empty sum
  c10::cuda::CUDAGuard guard(xi.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xi.x.scalar_type(), "attnkern_channel_gate_grad", [&] {
    using acc_t = acc_type<scalar_t>;
    ChannelGateGradOp<acc_t> p{gated_input_grad<acc_t>(terms, xi), out.data_ptr<acc_t>(), xi.C};
    reduce<scalar_t, /*kOverChannels=*/false>(xi.x, grad, p, xi);
  });
  return out;
}

at::Tensor cbam_input_grad_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& channel_gate,
                                const std::optional<at::Tensor>& spatial_gate,
                                const std::optional<at::Tensor>& grad_pooled,
                                const std::optional<at::Tensor>& spatial_argmax,
                                const std::optional<at::Tensor>& grad_avg, const std::optional<at::Tensor>& grad_max,
                                const std::optional<at::Tensor>& channel_argmax) {
  const char* op = "cbam_input_grad";
  const XInfo xi = prepare_x(x_in, op);
  const at::Tensor grad = prepare_full(grad_in, xi, op, "grad");
  const auto acc = acc_dtype_of(xi.x);
  const at::Tensor cg = prepare_small(channel_gate, xi, op, "channel_gate", {xi.N, xi.C}, acc);
  const SpatialTerms terms = prepare_spatial_terms(xi, op, spatial_gate, grad_pooled, spatial_argmax);
  at::Tensor gavg, gmax, carg;
  if (grad_avg.has_value() && grad_avg->defined())
    gavg = prepare_small(*grad_avg, xi, op, "grad_avg", {xi.N, xi.C}, acc);
  if (grad_max.has_value() && grad_max->defined()) {
    gmax = prepare_small(*grad_max, xi, op, "grad_max", {xi.N, xi.C}, acc);
    TORCH_CHECK(channel_argmax.has_value() && channel_argmax->defined(), "attnkern::", op,
                ": channel_argmax is required with grad_max");
    carg = prepare_small(*channel_argmax, xi, op, "channel_argmax", {xi.N, xi.C}, at::kLong);
  }
  at::Tensor dx = at::empty_like(xi.x);
  if (dx.numel() == 0) return dx;
  c10::cuda::CUDAGuard guard(xi.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xi.x.scalar_type(), "attnkern_cbam_input_grad", [&] {
    using acc_t = acc_type<scalar_t>;
    CbamInputGradOp<acc_t> p{gated_input_grad<acc_t>(terms, xi),
                             cg.const_data_ptr<acc_t>(),
                             gavg.defined() ? gavg.const_data_ptr<acc_t>() : nullptr,
                             gmax.defined() ? gmax.const_data_ptr<acc_t>() : nullptr,
                             carg.defined() ? carg.const_data_ptr<int64_t>() : nullptr,
                             xi.C,
                             xi.HW};
    launch_elementwise<scalar_t>(grad, at::Tensor(), dx, xi, p);
  });
  return dx;
}

}  // namespace
}  // namespace cuda
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, CUDA, m) {
  m.impl("channel_pool", &attnkern::cuda::channel_pool_cuda);
  m.impl("spatial_pool", &attnkern::cuda::spatial_pool_cuda);
  m.impl("apply_gates", &attnkern::cuda::apply_gates_cuda);
  m.impl("spatial_gate_grad", &attnkern::cuda::spatial_gate_grad_cuda);
  m.impl("channel_gate_grad", &attnkern::cuda::channel_gate_grad_cuda);
  m.impl("cbam_input_grad", &attnkern::cuda::cbam_input_grad_cuda);
}
