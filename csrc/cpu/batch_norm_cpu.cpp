// BatchNorm with the batch's statistics on BAM's hidden maps (declared in cpu_ops.h): (N, Ch, H,
// W) NCHW maps of a few channels in float / double. ATen's kernel for it took ~100 us on an 8x16x28x28
// or 8x4x56x56 map here (16x a clone of it); three passes over each channel's planes take a fraction
// of that (benchmarks/NOTES.md).
#include "cpu/cpu_ops.h"
#include "cpu/cpu_utils.h"

ATTNKERN_VEC_BEGIN
namespace attnkern::cpu {
namespace {

// Channel c: mean and biased variance over its N planes (two passes, sums in double per block),
// then out = z * scale + shift.
template <typename A>
void batch_norm_kernel(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias, double eps,
                       const at::Tensor& out, const at::Tensor& mean, const at::Tensor& invstd) {
  using V = Vectorized<A>;
  const int64_t N = z.size(0), Ch = z.size(1), HW = z.size(2) * z.size(3);
  const A* zp = z.const_data_ptr<A>();
  const A* wp = weight.const_data_ptr<A>();
  const A* bp = bias.const_data_ptr<A>();
  A* op = out.data_ptr<A>();
  A* mp = mean.data_ptr<A>();
  A* ip = invstd.data_ptr<A>();
  const double count = static_cast<double>(N * HW);
  at::parallel_for(0, Ch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const auto plane = [&](int64_t n) { return zp + (n * Ch + c) * HW; };
      double sum = 0;
      for (int64_t n = 0; n < N; ++n) {
        sum += block_sum<A>(HW, [&](int64_t j, int64_t cnt) { return load_acc_n(plane(n) + j, cnt); });
      }
      const double mu = sum / count;
      const V mv(static_cast<A>(mu));
      double sq = 0;
      for (int64_t n = 0; n < N; ++n) {
        sq += block_sum<A>(HW, [&](int64_t j, int64_t cnt) {
          const V d = load_acc_n(plane(n) + j, cnt) - mv;
          return cnt == V::size() ? d * d : V::set(V(A(0)), d * d, cnt);
        });
      }
      const double is = 1.0 / std::sqrt(sq / count + eps);
      mp[c] = static_cast<A>(mu);
      ip[c] = static_cast<A>(is);
      const V scale(static_cast<A>(wp[c] * is));
      const V shift(static_cast<A>(bp[c] - mu * wp[c] * is));
      for (int64_t n = 0; n < N; ++n) {
        const A* zr = plane(n);
        map_range(op + (n * Ch + c) * HW, 0, HW,
                  [&](int64_t j, int64_t cnt) { return at::vec::fmadd(load_acc_n(zr + j, cnt), scale, shift); });
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_cpu(const at::Tensor& z, const at::Tensor& weight,
                                                                    const at::Tensor& bias, double eps) {
  TORCH_INTERNAL_ASSERT(use_vec_kernels() && z.dim() == 4 && z.is_contiguous() &&
                        (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble) &&
                        weight.scalar_type() == z.scalar_type() && bias.scalar_type() == z.scalar_type());
  const int64_t Ch = z.size(1);
  at::Tensor out = at::empty_like(z);
  at::Tensor mean = at::empty({Ch}, z.options());
  at::Tensor invstd = at::empty({Ch}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "attnkern_batch_norm_train_cpu", [&] {
    batch_norm_kernel<scalar_t>(z, weight.contiguous(), bias.contiguous(), eps, out, mean, invstd);
  });
  return {out, mean, invstd};
}

}  // namespace attnkern::cpu
ATTNKERN_VEC_END
