// BatchNorm with the batch's statistics on BAM's hidden maps (declared in cpu_ops.h): (N, Ch, H,
// W) maps of a few channels in float / double. ATen's kernel for it took ~100 us on an 8x16x28x28
// or 8x4x56x56 map here (16x a clone of it); the statistics' two passes over each channel's planes
// take a fraction of that (benchmarks/NOTES.md), and the next conv applies the BN and its ReLU as
// it loads the map. scale_shift_relu_cpu applies them where the backward needs the activation;
// batch_norm_relu_backward_cpu: the backward of relu(BN(z)) in two passes, where ATen's
// threshold_backward and BN backward took three and their dispatch.
#include "cpu/cpu_ops.h"
#include "cpu/cpu_utils.h"

ATTNKERN_VEC_BEGIN
namespace attnkern::cpu {
namespace {

// K per-channel sums over the rows of an NHWC map (rows of Ch): sums[q][c] = the sum over r of
// term q of f(r, j, cnt, terms), which sets the K vectors of row r's channels [j, j + cnt) (lanes
// past cnt ignored). In A over blocks of rows, in double across them, in a fixed order.
template <typename A, int64_t K, typename F>
std::array<std::vector<double>, K> nhwc_channel_sums(int64_t rows, int64_t Ch, const F& f) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size(), kBlockRows = 256, kRows = 4;  // kRows rows at a time: independent adds
  static_assert(kRows == 4, "the partial sums below add four row accumulators");
  const int64_t blocks = divup(rows, kBlockRows);
  std::vector<A> partial(K * blocks * Ch);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r1 = std::min(rows, (b + 1) * kBlockRows);
      for (int64_t j = 0; j < Ch; j += L) {
        const int64_t cnt = std::min(L, Ch - j);
        V acc[kRows][K];
        zero_tile(acc);
        const auto add_row = [&](int64_t r, V(&into)[K]) {
          V terms[K];
          f(r, j, cnt, terms);
          for (int64_t q = 0; q < K; ++q) into[q] = into[q] + terms[q];
        };
        int64_t r = b * kBlockRows;
        for (; r + kRows <= r1; r += kRows) {
          for (int64_t k = 0; k < kRows; ++k) add_row(r + k, acc[k]);
        }
        for (; r < r1; ++r) add_row(r, acc[0]);
        for (int64_t q = 0; q < K; ++q) {
          vstore(partial.data() + (q * blocks + b) * Ch + j, (acc[0][q] + acc[1][q]) + (acc[2][q] + acc[3][q]), cnt);
        }
      }
    }
  });
  std::array<std::vector<double>, K> sums;
  for (int64_t q = 0; q < K; ++q) {
    sums[q].assign(Ch, 0.0);
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t c = 0; c < Ch; ++c) sums[q][c] += partial[(q * blocks + b) * Ch + c];
    }
  }
  return sums;
}

// out = relu(z * scale[c] + shift[c]) for each channel c (tf), in z's layout (NCHW: planes; NHWC:
// rows of channel vectors).
template <typename A>
void scale_shift_relu_kernel(const at::Tensor& z, Layout layout, const LoadTransform<A>& tf, const at::Tensor& out) {
  const int64_t N = z.size(0), Ch = z.size(1), HW = z.size(2) * z.size(3);
  const A* zp = z.const_data_ptr<A>();
  A* op = out.data_ptr<A>();
  if (layout == Layout::NCHW) {
    at::parallel_for(0, N * Ch, task_grain(HW), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) tf.copy_row(zp + q * HW, HW, q % Ch, op + q * HW);
    });
    return;
  }
  at::parallel_for(0, N * HW, task_grain(Ch),
                   [&](int64_t r0, int64_t r1) { tf.copy_pixels(zp + r0 * Ch, r1 - r0, Ch, op + r0 * Ch); });
}

// Mean and biased variance of each channel: two passes, sums in double per block (NCHW a channel's
// N planes at a time, NHWC vectors of channels along the rows).
template <typename A>
void batch_norm_stats_kernel(const at::Tensor& z, Layout layout, const at::Tensor& mean, const at::Tensor& var) {
  using V = Vectorized<A>;
  const int64_t N = z.size(0), Ch = z.size(1), HW = z.size(2) * z.size(3);
  const A* zp = z.const_data_ptr<A>();
  const double count = static_cast<double>(N * HW);
  std::vector<double> sums(Ch, 0.0), squares(Ch, 0.0);  // sum z, sum (z - mean)^2 (mean in A)
  if (layout == Layout::NHWC) {
    sums = nhwc_channel_sums<A, 1>(N * HW, Ch, [&](int64_t r, int64_t j, int64_t cnt, V(&t)[1]) {
      t[0] = load_acc_n(zp + r * Ch + j, cnt);
    })[0];
    std::vector<A> mu(Ch);
    for (int64_t c = 0; c < Ch; ++c) mu[c] = static_cast<A>(sums[c] / count);
    squares = nhwc_channel_sums<A, 1>(N * HW, Ch, [&](int64_t r, int64_t j, int64_t cnt, V(&t)[1]) {
      const V d = load_acc_n(zp + r * Ch + j, cnt) - load_acc_n(mu.data() + j, cnt);
      t[0] = d * d;
    })[0];
  } else {
    at::parallel_for(0, Ch, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const auto plane = [&](int64_t n) { return zp + (n * Ch + c) * HW; };
        for (int64_t n = 0; n < N; ++n) {
          sums[c] += block_sum<A>(HW, [&](int64_t j, int64_t cnt) { return load_acc_n(plane(n) + j, cnt); });
        }
        const V mv(static_cast<A>(sums[c] / count));
        for (int64_t n = 0; n < N; ++n) {
          squares[c] += block_sum<A>(HW, [&](int64_t j, int64_t cnt) {
            const V d = load_acc_n(plane(n) + j, cnt) - mv;
            return cnt == V::size() ? d * d : V::set(V(A(0)), d * d, cnt);
          });
        }
      }
    });
  }
  for (int64_t c = 0; c < Ch; ++c) {
    mean.data_ptr<A>()[c] = static_cast<A>(sums[c] / count);
    var.data_ptr<A>()[c] = static_cast<A>(squares[c] / count);
  }
}

// The ReLU's mask applied to its output's grad: g where the ReLU's output is positive.
template <typename A>
inline Vectorized<A> relu_grad(const Vectorized<A>& g, const Vectorized<A>& act) {
  return Vectorized<A>::blendv(Vectorized<A>(A(0)), g, act > Vectorized<A>(A(0)));
}

// Per channel c, with g the grad of act = relu(BN(z)) masked by the ReLU: gb[c] = sum g and gw[c]
// = sum g (z - mean) invstd over (N, H, W), and gz = gamma invstd (g - gb / M - (z - mean)
// invstd gw / M), M = N H W (ATen's batch_norm_backward with batch statistics). Sums of a plane /
// a block of rows in A, across them in double, in a fixed order.
template <typename A>
void bn_relu_backward_kernel(const at::Tensor& grad, const at::Tensor& act, const at::Tensor& z,
                             const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& invstd, Layout layout,
                             const at::Tensor& gz, const at::Tensor& gw, const at::Tensor& gb) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t N = z.size(0), Ch = z.size(1), HW = z.size(2) * z.size(3);
  const A* gp = grad.const_data_ptr<A>();
  const A* ap = act.const_data_ptr<A>();
  const A* zp = z.const_data_ptr<A>();
  const A* mp = mean.const_data_ptr<A>();
  A* out = gz.data_ptr<A>();
  std::vector<double> s1(Ch, 0.0), s2(Ch, 0.0);  // sum g, sum g (z - mean)
  if (layout == Layout::NCHW) {
    at::parallel_for(0, Ch, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const V mv(mp[c]);
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * Ch + c) * HW;
          V a1(A(0)), a2(A(0));
          for (int64_t j = 0; j < HW; j += L) {
            const int64_t cnt = std::min(L, HW - j);
            const V gm = relu_grad(load_acc_n(gp + off + j, cnt), load_acc_n(ap + off + j, cnt));  // zeros past cnt
            a1 = a1 + gm;
            a2 = at::vec::fmadd(gm, load_acc_n(zp + off + j, cnt) - mv, a2);
          }
          s1[c] += hsum(a1);
          s2[c] += hsum(a2);
        }
      }
    });
  } else {
    auto sums = nhwc_channel_sums<A, 2>(N * HW, Ch, [&](int64_t r, int64_t j, int64_t cnt, V(&t)[2]) {
      const int64_t off = r * Ch + j;
      t[0] = relu_grad(load_acc_n(gp + off, cnt), load_acc_n(ap + off, cnt));
      t[1] = t[0] * (load_acc_n(zp + off, cnt) - load_acc_n(mp + j, cnt));
    });
    s1 = std::move(sums[0]);
    s2 = std::move(sums[1]);
  }
  // gz = k_g g - k_z (z - mean) - k_0 per channel.
  const double count = static_cast<double>(N * HW);
  std::vector<A> k_g(Ch), k_z(Ch), k_0(Ch);
  for (int64_t c = 0; c < Ch; ++c) {
    const double is = invstd.const_data_ptr<A>()[c], a = weight.const_data_ptr<A>()[c] * is;
    k_g[c] = static_cast<A>(a);
    k_z[c] = static_cast<A>(a * is * is * s2[c] / count);
    k_0[c] = static_cast<A>(a * s1[c] / count);
    gb.data_ptr<A>()[c] = static_cast<A>(s1[c]);
    gw.data_ptr<A>()[c] = static_cast<A>(s2[c] * is);
  }
  const auto grad_z = [&](const V& g, const V& a, const V& zv, const V& mv, const V& kg, const V& kz, const V& k0) {
    return at::vec::fmadd(kg, relu_grad(g, a), V(A(0)) - at::vec::fmadd(kz, zv - mv, k0));
  };
  if (layout == Layout::NCHW) {
    at::parallel_for(0, N * Ch, task_grain(HW), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t c = q % Ch, off = q * HW;
        const V mv(mp[c]), kg(k_g[c]), kz(k_z[c]), k0(k_0[c]);
        map_range(out + off, 0, HW, [&](int64_t j, int64_t cnt) {
          return grad_z(load_acc_n(gp + off + j, cnt), load_acc_n(ap + off + j, cnt), load_acc_n(zp + off + j, cnt), mv,
                        kg, kz, k0);
        });
      }
    });
    return;
  }
  at::parallel_for(0, N * HW, task_grain(Ch), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * Ch;
      map_range(out + off, 0, Ch, [&](int64_t j, int64_t cnt) {
        return grad_z(load_acc_n(gp + off + j, cnt), load_acc_n(ap + off + j, cnt), load_acc_n(zp + off + j, cnt),
                      load_acc_n(mp + j, cnt), load_acc_n(k_g.data() + j, cnt), load_acc_n(k_z.data() + j, cnt),
                      load_acc_n(k_0.data() + j, cnt));
      });
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cpu(const at::Tensor& grad,
                                                                           const at::Tensor& act, const at::Tensor& z,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& mean,
                                                                           const at::Tensor& invstd) {
  const Layout layout = layout_of(z);
  const at::MemoryFormat format = memory_format_of(layout);
  TORCH_INTERNAL_ASSERT(use_vec_kernels() && z.dim() == 4 && z.is_contiguous(format) && grad.is_contiguous(format) &&
                        act.is_contiguous(format) && float_or_double(z) &&
                        grad.scalar_type() == z.scalar_type() && act.scalar_type() == z.scalar_type() &&
                        weight.scalar_type() == z.scalar_type() && mean.scalar_type() == z.scalar_type() &&
                        invstd.scalar_type() == z.scalar_type());
  const int64_t Ch = z.size(1);
  at::Tensor gz = at::empty_like(z);
  at::Tensor gw = at::empty({Ch}, z.options());
  at::Tensor gb = at::empty({Ch}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "attnkern_batch_norm_relu_backward_cpu", [&] {
    bn_relu_backward_kernel<scalar_t>(grad, act, z, weight.contiguous(), mean.contiguous(), invstd.contiguous(), layout,
                                      gz, gw, gb);
  });
  return {gz, gw, gb};
}

std::pair<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& z) {
  const Layout layout = layout_of(z);
  TORCH_INTERNAL_ASSERT(use_vec_kernels() && z.dim() == 4 && z.is_contiguous(memory_format_of(layout)) &&
                        float_or_double(z));
  at::Tensor mean = at::empty({z.size(1)}, z.options());
  at::Tensor var = at::empty({z.size(1)}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "attnkern_batch_norm_stats_cpu",
                             [&] { batch_norm_stats_kernel<scalar_t>(z, layout, mean, var); });
  return {mean, var};
}

at::Tensor scale_shift_relu_cpu(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift) {
  const Layout layout = layout_of(z);
  TORCH_INTERNAL_ASSERT(use_vec_kernels() && z.dim() == 4 && z.is_contiguous(memory_format_of(layout)) &&
                        float_or_double(z) &&
                        scale.scalar_type() == z.scalar_type() && shift.scalar_type() == z.scalar_type());
  at::Tensor out = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "attnkern_scale_shift_relu_cpu", [&] {
    scale_shift_relu_kernel<scalar_t>(z, layout, LoadTransform<scalar_t>({true, scale, shift}, z.size(1)), out);
  });
  return out;
}

}  // namespace attnkern::cpu
ATTNKERN_VEC_END
