// CUDA kernels of BAM's combine: bam_combine, bam_combine_backward, bam_input_grad. Schemas and
// semantics: csrc/ops.cpp; the definitions they must match: attnkern/backends/torch_kernels.py.
//
// M = sigmoid(a), a = channel_att[n,c] + spatial_att[n,h,w] (product form: a = ca * sa).
// bam_combine and bam_input_grad are elementwise (cuda_utils.cuh). bam_combine_backward makes one
// pass over (grad, x) and reduces t = grad * x * M * (1 - M) along both axes at once:
// x is viewed as [N][A][B] with B contiguous (NCHW: A = C, B = HW; NHWC: A = HW, B = C); a block
// of TX x TY threads owns a tile of TX * VEC columns and a segment of A. Row sums (over B) are
// reduced across the TX lanes of a row with shuffles and stored per column tile; column sums (over
// A) are reduced across TY in shared memory and stored per A segment. When there is more than one
// column tile / A segment, a second kernel adds those partials in fixed order (no atomics).
#include "cuda_utils.cuh"

#include <torch/library.h>

namespace attnkern {
namespace cuda {
namespace {

template <typename acc>
__device__ __forceinline__ acc bam_logit(acc ca, acc sa, bool product) {
  return product ? ca * sa : ca + sa;
}

template <typename acc>
struct BamCombineOp {  // y = x * (1 + M)
  using acc_t = acc;
  const acc* ca;
  const acc* sa;
  int64_t C, HW;
  bool product;
  __device__ __forceinline__ acc operator()(acc x, acc, int64_t n, int64_t c, int64_t hw) const {
    const acc m = sigmoid_acc(bam_logit(ca[n * C + c], sa[n * HW + hw], product));
    return x * (acc(1) + m);
  }
};

template <typename acc>
struct BamInputGradOp {  // dx = grad * (1 + M) + grad_avg[n,c] / HW + grad_x_partial
  using acc_t = acc;
  const acc* ca;
  const acc* sa;
  const acc* gavg;  // may be null
  int64_t C, HW;
  bool product;
  __device__ __forceinline__ acc operator()(acc g, acc partial, int64_t n, int64_t c, int64_t hw) const {
    const int64_t k = n * C + c;
    const acc m = sigmoid_acc(bam_logit(ca[k], sa[n * HW + hw], product));
    acc dx = g * (acc(1) + m);
    if (gavg != nullptr) dx = dx + gavg[k] / static_cast<acc>(HW);
    return dx + partial;  // partial is 0 when grad_x_partial is None
  }
};

// See the header comment. row_part[(n * A + a) * tiles_b + bt], col_part[(n * B + b) * S + s].
template <typename scalar_t, int VEC, bool NHWC>
__global__ void __launch_bounds__(kBlock)
    bam_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                        const acc_type<scalar_t>* __restrict__ ca, const acc_type<scalar_t>* __restrict__ sa,
                        bool product, int64_t N, int64_t A, int64_t B, int TX, int64_t tiles_b, int64_t S,
                        int64_t seg, acc_type<scalar_t>* __restrict__ row_part,
                        acc_type<scalar_t>* __restrict__ col_part) {
  using acc = acc_type<scalar_t>;
  constexpr int kTile = kBlock * VEC;
  __shared__ acc s_col[kTile];

  const int tid = static_cast<int>(threadIdx.x);
  const int TY = kBlock / TX;
  const int ty = tid / TX;
  const int tx = tid - ty * TX;
  const int TB = TX * VEC;
  // C and HW of the NCHW view, for indexing channel_att (N, C) and spatial_att (N, HW).
  const int64_t C = NHWC ? B : A;
  const int64_t HW = NHWC ? A : B;
  const int64_t total = N * tiles_b * S;

  for (int64_t blk = blockIdx.x; blk < total; blk += gridDim.x) {  // uniform across the block
    const int64_t t = blk / S;
    const int64_t s = blk - t * S;
    const int64_t n = t / tiles_b;
    const int64_t bt = t - n * tiles_b;
    const int64_t b0 = bt * TB + static_cast<int64_t>(tx) * VEC;
    const bool col_ok = b0 < B;  // B % VEC == 0 when VEC > 1
    const int64_t a_begin = s * seg;
    const int64_t a_end = a_begin + seg < A ? a_begin + seg : A;

    // The per-column attention values are fixed for this thread: spatial_att (NCHW) or channel_att (NHWC).
    acc col_att[VEC];
    acc col_sum[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      col_sum[v] = acc(0);
      col_att[v] = acc(0);
      if (col_ok) col_att[v] = NHWC ? ca[n * C + b0 + v] : sa[n * HW + b0 + v];
    }

    // Same trip count for every thread of the block: the row shuffles need whole warps.
    for (int64_t a0 = a_begin; a0 < a_end; a0 += TY) {
      const int64_t a = a0 + ty;
      const bool ok = col_ok && a < a_end;
      acc row_sum = acc(0);
      if (ok) {
        const acc row_att = NHWC ? sa[n * HW + a] : ca[n * C + a];
        const int64_t off = (n * A + a) * B + b0;
        const Vec<scalar_t, VEC> gv = load_vec<VEC>(grad + off);
        const Vec<scalar_t, VEC> xv = load_vec<VEC>(x + off);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const acc cav = NHWC ? col_att[v] : row_att;
          const acc sav = NHWC ? row_att : col_att[v];
          const acc m = sigmoid_acc(bam_logit(cav, sav, product));
          const acc tv = static_cast<acc>(gv.v[v]) * static_cast<acc>(xv.v[v]) * m * (acc(1) - m);
          const acc tc = product ? tv * sav : tv;  // summed into grad_channel
          const acc ts = product ? tv * cav : tv;  // summed into grad_spatial
          row_sum += NHWC ? ts : tc;
          col_sum[v] += NHWC ? tc : ts;
        }
      }
      row_sum = group_sum(row_sum, TX);  // TX <= 32: the lanes of one row share a warp
      if (tx == 0 && a < a_end) row_part[(n * A + a) * tiles_b + bt] = row_sum;
    }

#pragma unroll
    for (int v = 0; v < VEC; ++v) s_col[ty * TB + tx * VEC + v] = col_sum[v];
    __syncthreads();
    for (int j = tid; j < TB; j += kBlock) {
      const int64_t b = bt * TB + j;
      if (b < B) {
        acc tot = s_col[j];
        for (int y = 1; y < TY; ++y) tot += s_col[y * TB + j];
        col_part[(n * B + b) * S + s] = tot;
      }
    }
    __syncthreads();
  }
}

// out[o] = sum_s part[o * S + s], in order.
template <typename acc>
__global__ void __launch_bounds__(kBlock)
    sum_partials_kernel(const acc* __restrict__ part, acc* __restrict__ out, int64_t count, int64_t S) {
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < count;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc tot = acc(0);
    for (int64_t s = 0; s < S; ++s) tot += part[o * S + s];
    out[o] = tot;
  }
}

template <typename acc>
void launch_sum_partials(const at::Tensor& part, at::Tensor& out, int64_t count, int64_t S, int device) {
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(count, kBlock), grid_cap(device)));
  sum_partials_kernel<acc><<<static_cast<unsigned>(blocks), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      part.const_data_ptr<acc>(), out.mutable_data_ptr<acc>(), count, S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC, bool NHWC>
void bam_backward_impl(const at::Tensor& grad, const XInfo& xi, const at::Tensor& ca, const at::Tensor& sa,
                       bool product, at::Tensor& grad_channel, at::Tensor& grad_spatial) {
  using acc = acc_type<scalar_t>;
  const int device = xi.x.get_device();
  const int64_t A = NHWC ? xi.HW : xi.C;
  const int64_t B = NHWC ? xi.C : xi.HW;
  const OuterPlan plan = outer_plan(xi.N, A, B, VEC, device, 2);
  // Row results are per (n, a), column results per (n, b); which of grad_channel / grad_spatial
  // they are depends on the layout. With one tile / one segment the partials are the outputs.
  at::Tensor& row_out = NHWC ? grad_spatial : grad_channel;
  at::Tensor& col_out = NHWC ? grad_channel : grad_spatial;
  const auto opts = row_out.options();
  at::Tensor row_part = plan.tiles_b == 1 ? row_out : at::empty({xi.N * A * plan.tiles_b}, opts);
  at::Tensor col_part = plan.S == 1 ? col_out : at::empty({xi.N * B * plan.S}, opts);
  bam_backward_kernel<scalar_t, VEC, NHWC><<<static_cast<unsigned>(plan.blocks), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      grad.const_data_ptr<scalar_t>(), xi.x.const_data_ptr<scalar_t>(), ca.const_data_ptr<acc>(),
      sa.const_data_ptr<acc>(), product, xi.N, A, B, plan.TX, plan.tiles_b, plan.S, plan.seg,
      row_part.mutable_data_ptr<acc>(), col_part.mutable_data_ptr<acc>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (plan.tiles_b > 1) launch_sum_partials<acc>(row_part, row_out, xi.N * A, plan.tiles_b, device);
  if (plan.S > 1) launch_sum_partials<acc>(col_part, col_out, xi.N * B, plan.S, device);
}

struct Attention {
  at::Tensor ca, sa;
};

Attention prepare_attention(const XInfo& xi, const char* op, const at::Tensor& channel_att,
                            const at::Tensor& spatial_att) {
  const auto acc = acc_dtype_of(xi.x);
  return {prepare_small(channel_att, xi, op, "channel_att", {xi.N, xi.C}, acc),
          prepare_small(spatial_att, xi, op, "spatial_att", {xi.N, xi.H, xi.W}, acc)};
}

at::Tensor bam_combine_cuda(const at::Tensor& x_in, const at::Tensor& channel_att, const at::Tensor& spatial_att,
                            bool product) {
  const char* op = "bam_combine";
  const XInfo xi = prepare_x(x_in, op);
  const Attention att = prepare_attention(xi, op, channel_att, spatial_att);
  at::Tensor y = at::empty_like(xi.x);
  if (y.numel() == 0) return y;
  c10::cuda::CUDAGuard guard(xi.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xi.x.scalar_type(), "attnkern_bam_combine", [&] {
    using acc_t = acc_type<scalar_t>;
    BamCombineOp<acc_t> p{att.ca.const_data_ptr<acc_t>(), att.sa.const_data_ptr<acc_t>(), xi.C, xi.HW, product};
    launch_elementwise<scalar_t>(xi.x, at::Tensor(), y, xi, p);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bam_combine_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                             const at::Tensor& channel_att,
                                                             const at::Tensor& spatial_att, bool product) {
  const char* op = "bam_combine_backward";
  const XInfo xi = prepare_x(x_in, op);
  const at::Tensor grad = prepare_full(grad_in, xi, op, "grad");
  const Attention att = prepare_attention(xi, op, channel_att, spatial_att);
  const auto acc_opts = xi.x.options().dtype(acc_dtype_of(xi.x)).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_channel = at::empty({xi.N, xi.C}, acc_opts);
  at::Tensor grad_spatial = at::empty({xi.N, xi.H, xi.W}, acc_opts);
  if (xi.x.numel() == 0) {  // sums over an empty axis are 0
    if (grad_channel.numel() > 0) grad_channel.zero_();
    if (grad_spatial.numel() > 0) grad_spatial.zero_();
    return {grad_channel, grad_spatial};
  }
  c10::cuda::CUDAGuard guard(xi.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xi.x.scalar_type(), "attnkern_bam_combine_backward", [&] {
    const int vec = pick_vec<scalar_t>(xi.nhwc ? xi.C : xi.HW, {xi.x.const_data_ptr(), grad.const_data_ptr()});
    dispatch_vec<scalar_t>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      if (xi.nhwc)
        bam_backward_impl<scalar_t, VEC, true>(grad, xi, att.ca, att.sa, product, grad_channel, grad_spatial);
      else
        bam_backward_impl<scalar_t, VEC, false>(grad, xi, att.ca, att.sa, product, grad_channel, grad_spatial);
    });
  });
  return {grad_channel, grad_spatial};
}

at::Tensor bam_input_grad_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& channel_att,
                               const at::Tensor& spatial_att, bool product, const std::optional<at::Tensor>& grad_avg,
                               const std::optional<at::Tensor>& grad_x_partial) {
  const char* op = "bam_input_grad";
  const XInfo xi = prepare_x(x_in, op);
  const at::Tensor grad = prepare_full(grad_in, xi, op, "grad");
  const Attention att = prepare_attention(xi, op, channel_att, spatial_att);
  at::Tensor gavg, partial;
  if (grad_avg.has_value() && grad_avg->defined())
    gavg = prepare_small(*grad_avg, xi, op, "grad_avg", {xi.N, xi.C}, acc_dtype_of(xi.x));
  if (grad_x_partial.has_value() && grad_x_partial->defined())
    partial = prepare_full(*grad_x_partial, xi, op, "grad_x_partial");
  at::Tensor dx = at::empty_like(xi.x);
  if (dx.numel() == 0) return dx;
  c10::cuda::CUDAGuard guard(xi.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xi.x.scalar_type(), "attnkern_bam_input_grad", [&] {
    using acc_t = acc_type<scalar_t>;
    BamInputGradOp<acc_t> p{att.ca.const_data_ptr<acc_t>(), att.sa.const_data_ptr<acc_t>(),
                            gavg.defined() ? gavg.const_data_ptr<acc_t>() : nullptr, xi.C, xi.HW, product};
    launch_elementwise<scalar_t>(grad, partial, dx, xi, p);
  });
  return dx;
}

}  // namespace
}  // namespace cuda
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, CUDA, m) {
  m.impl("bam_combine", &attnkern::cuda::bam_combine_cuda);
  m.impl("bam_combine_backward", &attnkern::cuda::bam_combine_backward_cuda);
  m.impl("bam_input_grad", &attnkern::cuda::bam_input_grad_cuda);
}
