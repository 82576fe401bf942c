// CPU kernels of BAM's combine step (schemas and semantics: csrc/ops.cpp; reference:
// attnkern/backends/torch_kernels.py): y = x * (1 + M), M = sigmoid(a), a = ca[n, c] + sa[n, hw]
// (product form: ca * sa). Layouts as in cbam_cpu.cpp: NCHW walks planes in storage order
// (combine) or HW tiles through all C planes (the backward's reductions), NHWC walks rows of C.
//
// M needs one exp per element. In the additive form exp(-a) = exp(-ca) * exp(-sa), so when the
// maps are moderate (|ca|, |sa| <= 40: no overflow, no NaN) the exps are taken once per map
// entry and an element costs a multiply and a reciprocal; otherwise (and for the product form)
// each element takes a vector exp (see attention()). The backward uses M * (1 - M) as the reference
// does, so saturated M gives exactly 0 there too.
#include "cpu/cpu_ops.h"
#include "cpu/cpu_utils.h"

ATTNKERN_VEC_BEGIN
namespace attnkern::cpu {
namespace {

// How M is computed: kFactored: exp(-a) = ec * es from precomputed ec = exp(-ca), es = exp(-sa);
// kSum / kProduct: exp(-a) per element. kSafe: the maps hold non-finite or huge values, so
// a = +-inf and NaN are handled explicitly (the vector exp clamps its input). kLog2Product: the
// product form with the channel operand scaled by -log2(e) beforehand (float maps within 1e18):
// exp(-a) = 2^(c * s), one multiply instead of two.
enum Mode { kFactored, kSum, kProduct, kLog2Product };

constexpr double kLog2E = 1.4426950408889634;

// 1 / d for d in [1, 2^120]. AVX2 float: the reciprocal estimate refined by one Newton step (within
// ~2 ulp; a division would bound the factored kernels at its throughput), else a division.
template <typename A>
inline Vectorized<A> reciprocal_ge1(const Vectorized<A>& d) {
  return Vectorized<A>(A(1)) / d;
}
#if defined(CPU_CAPABILITY_AVX2)
template <>
inline Vectorized<float> reciprocal_ge1(const Vectorized<float>& d) {
  const __m256 r0 = _mm256_rcp_ps(d);
  const __m256 err = _mm256_fnmadd_ps(d, r0, _mm256_set1_ps(1.f));  // 1 - d * r0
  return _mm256_fmadd_ps(r0, err, r0);
}
#endif

// 1 / (1 + 2^t), for finite t.
template <typename A>
inline Vectorized<A> sigmoid_of_log2(const Vectorized<A>& t) {
  const Vectorized<A> one(A(1));
  return one / (one + (t * Vectorized<A>(A(1 / kLog2E))).exp_u20());
}

// 1 / (1 + exp(-a)), for finite a (the callers handle the rest).
template <typename A>
inline Vectorized<A> sigmoid(const Vectorized<A>& a) {
  const Vectorized<A> one(A(1));
  return one / (one + (Vectorized<A>(A(0)) - a).exp_u20());
}
#if defined(CPU_CAPABILITY_AVX2)
// AVX2 float: 2^t with t clamped to [-126, 128], as 2^round(t) (built in the exponent bits; round(t)
// = 128 gives inf, so M = 0 exactly for t > 127.5, as with exp_u20) times a degree-5 polynomial in
// the remainder (relative error 8e-8, fitted on [-0.5, 0.5]). As accurate as at::vec's exp_u20 for
// |t| < 23 (within 6 ulp; past that t's own rounding shows, a few 1e-6 relative on M < 1e-7) and
// fewer instructions: the product combine on 8x256x28x28 went from 0.65-0.68 to 0.53 ms (1 thread,
// in cache), and to 0.46 with kLog2Product and the bias in the rounding constant. A refined
// reciprocal estimate in place of the division was slower (benchmarks/NOTES.md).
template <>
inline Vectorized<float> sigmoid_of_log2(const Vectorized<float>& t_in) {
  // Adding 1.5 * 2^23 rounds to an integer; the 127 more leave round(t) + 127, the biased exponent
  // of 2^round(t), in the low bits.
  const __m256 magic = _mm256_set1_ps(12582912.f + 127.f);
  const __m256 t = _mm256_max_ps(_mm256_min_ps(t_in, _mm256_set1_ps(128.f)), _mm256_set1_ps(-126.f));
  const __m256 shifted = _mm256_add_ps(t, magic);
  const __m256 r = _mm256_sub_ps(t, _mm256_sub_ps(shifted, magic));  // in [-0.5, 0.5]
  __m256 p = _mm256_set1_ps(1.3266970386e-3f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(9.6754597455e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.5507426160e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.4022121754e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(6.9314694916e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0000000710f));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(shifted), 23));
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_fmadd_ps(p, scale, one));
}

template <>
inline Vectorized<float> sigmoid(const Vectorized<float>& a) {
  return sigmoid_of_log2(a * Vectorized<float>(static_cast<float>(-kLog2E)));
}
#endif

// M = sigmoid(a) = 1 / (1 + exp(-a)) for one vector; c and s are the channel and spatial operands
// (ec, es for kFactored; ca, sa otherwise).
template <int kMode, bool kSafe, typename A>
inline Vectorized<A> attention(const Vectorized<A>& c, const Vectorized<A>& s) {
  using V = Vectorized<A>;
  const V one(A(1));
  if constexpr (kMode == kFactored) {
    return reciprocal_ge1(at::vec::fmadd(c, s, one));  // c * s = exp(-ca - sa) <= e^80
  } else if constexpr (kMode == kLog2Product) {
    return sigmoid_of_log2(c * s);
  } else {
    const V a = kMode == kSum ? c + s : c * s;
    V r = sigmoid(a);
    if constexpr (kSafe) {
      const V inf(std::numeric_limits<A>::infinity());
      r = V::blendv(r, one, a == inf);
      r = V::blendv(r, V(A(0)), a == V(A(0)) - inf);
      r = V::blendv(r, a, a.isnan());
    }
    return r;
  }
}

// The channel / spatial operands of attention(): ec, es (kFactored) or ca, sa, all (N, C) and
// (N, HW) acc_t.
template <typename A>
struct Maps {
  const A* c;
  const A* s;
};

// ---- bam_combine / bam_input_grad -----------------------------------------------------------

// out = src * (1 + M) (+ add[n, c] + extra, for the input gradient: src = grad, add =
// grad_avg / HW, extra = grad_x_partial).
template <typename T, int kMode, bool kSafe>
void combine_kernel(const at::Tensor& src, Layout layout, const Maps<acc_t<T>>& maps, const acc_t<T>* add,
                    const T* extra, const at::Tensor& out) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const int64_t N = src.size(0), C = src.size(1), HW = src.size(2) * src.size(3);
  const T* sp = src.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  if (layout == Layout::NCHW) {
    // Whole planes in storage order (as apply_gates in cbam_cpu.cpp), the spatial map re-read from cache.
    parallel_rows(N * C, HW, [&](int64_t p, int64_t j0, int64_t j1) {
      const A* s = maps.s + (p / C) * HW;
      const T* xr = sp + p * HW;
      const T* er = extra ? extra + p * HW : nullptr;
      const V cv(maps.c[p]);
      const V addv(add ? add[p] : A(0));
      map_range(op + p * HW, j0, j1, [&](int64_t j, int64_t cnt) {
        const V r = attention<kMode, kSafe>(cv, load_acc_n(s + j, cnt));
        const V x = load_n(xr + j, cnt);
        V y = at::vec::fmadd(x, r, x);
        if (add != nullptr) {
          y = y + addv;
        }
        if (er != nullptr) {
          y = y + load_n(er + j, cnt);
        }
        return y;
      });
    });
    return;
  }
  const Tasks tk = nhwc_chunks(N, C, HW);
  run_tasks(tk, 2 * divup(HW, tk.nch) * C, [&](int64_t, int64_t n, int64_t r0, int64_t r1) {
    const A* cm = maps.c + n * C;
    const A* addr = add ? add + n * C : nullptr;
    for (int64_t row = n * HW + r0; row < n * HW + r1; ++row) {
      const T* xr = sp + row * C;
      const T* er = extra ? extra + row * C : nullptr;
      const V sv(maps.s[row]);
      map_range(op + row * C, 0, C, [&](int64_t j, int64_t cnt) {
        const V r = attention<kMode, kSafe>(load_acc_n(cm + j, cnt), sv);
        const V x = load_n(xr + j, cnt);
        V y = at::vec::fmadd(x, r, x);
        if (addr != nullptr) {
          y = y + load_acc_n(addr + j, cnt);
        }
        if (er != nullptr) {
          y = y + load_n(er + j, cnt);
        }
        return y;
      });
    }
  });
}

// ---- bam_input_grad with the reduce conv's input gradient ------------------------------------

// The reduce conv's terms of dx: dx[n, c, hw] += sum_k w[k, c] * dr[n, k, hw], with w (Cr, C_pad)
// rows (C_pad a whole number of tiles, the extra columns zero) and dr (the grad of the conv's
// output) in acc and in x's layout.
template <typename A>
struct ReduceTerms {
  const A* w;
  int64_t C_pad;
  const A* dr;
  int64_t Cr;
};

constexpr int64_t kChanTile = 4, kPixTile = 3;  // NCHW tile: channels x vectors of pixels
constexpr int64_t kRowTile = 6, kColTile = 2;   // NHWC tile: pixels x vectors of channels
constexpr int64_t kLongPlaneBytes = 8 * 1024;   // see combine_backward_kernel

// dx for channels [c0, c0 + rows) of sample n at pixels [p0, p0 + count), count <= kPixTile * L;
// kFull: count is the whole tile. The kChanTile x kPixTile sums over k are kept in registers and
// added to the direct term as each element of dx is written.
template <typename T, bool kFull>
inline void nchw_reduce_grad_tile(const T* direct, const acc_t<T>* add, const ReduceTerms<acc_t<T>>& rt, int64_t C,
                                  int64_t HW, int64_t n, int64_t c0, int64_t rows, int64_t p0, int64_t count, T* out) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const auto cnt = [&](int64_t v) { return kFull ? L : std::clamp<int64_t>(count - v * L, 0, L); };
  V acc[kChanTile][kPixTile];
  zero_tile(acc);
  const A* dr = rt.dr + n * rt.Cr * HW + p0;
  for (int64_t k = 0; k < rt.Cr; ++k) {
    V in[kPixTile];
    for (int64_t v = 0; v < kPixTile; ++v) in[v] = load_acc_n(dr + k * HW + v * L, cnt(v));
    accumulate_row(in, rt.w + k * rt.C_pad + c0, 1, acc);
  }
  for (int64_t r = 0; r < kChanTile; ++r) {
    if (r >= rows) {
      break;
    }
    const int64_t q = n * C + c0 + r;
    const V addv(add[q]);
    const T* d = direct + q * HW + p0;
    T* o = out + q * HW + p0;
    for (int64_t v = 0; v < kPixTile; ++v) {
      const int64_t m = cnt(v);
      if (m > 0) {
        const V y = load_n(d + v * L, m) + addv + acc[r][v];
        m == L ? vstore(o + v * L, y) : vstore(o + v * L, y, m);
      }
    }
  }
}

// dx for kRows pixel rows of an NHWC sample (row: the first one's index in N * HW) at channels
// [c0, c0 + kColTile * L) (those below C; kFull: all of them).
template <int64_t kRows, bool kFull, typename T>
inline void nhwc_reduce_grad_tile(const T* direct, const acc_t<T>* add, const ReduceTerms<acc_t<T>>& rt, int64_t C,
                                  int64_t n, int64_t row, int64_t c0, T* out) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  V acc[kRows][kColTile];
  zero_tile(acc);
  const A* dr = rt.dr + row * rt.Cr;
  for (int64_t k = 0; k < rt.Cr; ++k) {
    V wv[kColTile];
    for (int64_t v = 0; v < kColTile; ++v) wv[v] = V::loadu(rt.w + k * rt.C_pad + c0 + v * L);
    accumulate_row(wv, dr + k, rt.Cr, acc);
  }
  const A* addr = add + n * C;
  for (int64_t p = 0; p < kRows; ++p) {
    const T* d = direct + (row + p) * C;
    T* o = out + (row + p) * C;
    for (int64_t v = 0; v < kColTile; ++v) {
      const int64_t c = c0 + v * L, m = kFull ? L : std::min(L, C - c);
      if (m > 0) {
        const V y = load_n(d + c, m) + load_acc_n(addr + c, m) + acc[p][v];
        m == L ? vstore(o + c, y) : vstore(o + c, y, m);
      }
    }
  }
}

// out = direct + add[n, c] + the reduce conv's terms (rt), one pass writing out (which may be
// direct: each element is read before it is written). direct: dx's direct term, grad * (1 + M).
template <typename T>
void reduce_input_grad_kernel(const at::Tensor& direct, Layout layout, const acc_t<T>* add,
                              const ReduceTerms<acc_t<T>>& rt, const at::Tensor& out) {
  using A = acc_t<T>;
  constexpr int64_t L = Vectorized<A>::size();
  const int64_t N = direct.size(0), C = direct.size(1), HW = direct.size(2) * direct.size(3);
  const T* dp = direct.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  if (layout == Layout::NCHW) {
    // Tasks of kChanTile planes of one sample, walked along HW: a few streams each, the sample's dr
    // re-read from L2.
    constexpr int64_t kBlock = kPixTile * L;
    const int64_t blocks = divup(C, kChanTile);
    at::parallel_for(0, N * blocks, task_grain(kChanTile * HW), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks, c0 = (t % blocks) * kChanTile, rows = std::min(kChanTile, C - c0);
        int64_t p0 = 0;
        for (; p0 + kBlock <= HW; p0 += kBlock) {
          nchw_reduce_grad_tile<T, true>(dp, add, rt, C, HW, n, c0, rows, p0, kBlock, op);
        }
        if (p0 < HW) {
          nchw_reduce_grad_tile<T, false>(dp, add, rt, C, HW, n, c0, rows, p0, HW - p0, op);
        }
      }
    });
    return;
  }
  const Tasks tk = nhwc_chunks(N, C, HW);
  constexpr int64_t kCols = kColTile * L;
  const int64_t full_cols = C / kCols * kCols;
  // Whole column tiles without the bounds (their branches made GCC keep the tile in memory).
  const auto rows = [&](auto rows_c, int64_t n, int64_t row) {
    constexpr int64_t kRows = decltype(rows_c)::value;
    for (int64_t c0 = 0; c0 < full_cols; c0 += kCols) {
      nhwc_reduce_grad_tile<kRows, true, T>(dp, add, rt, C, n, row, c0, op);
    }
    if (full_cols < C) {
      nhwc_reduce_grad_tile<kRows, false, T>(dp, add, rt, C, n, row, full_cols, op);
    }
  };
  run_tasks(tk, (2 + rt.Cr / L) * divup(HW, tk.nch) * C, [&](int64_t, int64_t n, int64_t r0, int64_t r1) {
    int64_t p = r0;
    for (; p + kRowTile <= r1; p += kRowTile) {
      rows(std::integral_constant<int64_t, kRowTile>(), n, n * HW + p);
    }
    for (; p < r1; ++p) {
      rows(std::integral_constant<int64_t, 1>(), n, n * HW + p);
    }
  });
}

// ---- bam_combine_backward -------------------------------------------------------------------

// t = grad * x * M * (1 - M); grad_channel[n, c] = sum_hw t (* sa),
// grad_spatial[n, hw] = sum_c t (* ca): both reductions in one pass. kWithDirect: the pass also
// writes dx's direct term grad * (1 + M) to `direct` (x's layout and dtype), so that the input
// gradient's pass needs no exp.
template <typename T, int kMode, bool kSafe, bool kWithDirect>
void combine_backward_kernel(const at::Tensor& grad, const at::Tensor& x, Layout layout, const Maps<acc_t<T>>& maps,
                             const acc_t<T>* ca, const acc_t<T>* sa, const at::Tensor& gc, const at::Tensor& gs,
                             T* direct) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr bool kProd = kMode == kProduct || kMode == kLog2Product;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const T* xp = x.const_data_ptr<T>();
  const T* gp = grad.const_data_ptr<T>();
  A* gsp = gs.data_ptr<A>();
  // t for one vector at offset j of a row (grad, x, direct rows at gr, xr, dr), storing the direct
  // term where asked.
  auto t_of = [&](const T* gr, const T* xr, T* dr, int64_t j, int64_t cnt, const V& cv, const V& sv) {
    const V g = load_n(gr + j, cnt);
    const V m = attention<kMode, kSafe>(cv, sv);
    if constexpr (kWithDirect) {
      const V d = at::vec::fmadd(g, m, g);
      cnt == L ? vstore(dr + j, d) : vstore(dr + j, d, cnt);
    }
    return (g * load_n(xr + j, cnt)) * (m * (V(A(1)) - m));
  };
  if (layout == Layout::NCHW) {
    const Tasks tk = nchw_tiles<T>(N, C, HW, kTile);
    ChannelPartials<A> parts(N, C, tk.nch, gc.data_ptr<A>());
    // Long planes ask for the next plane's pixels a plane ahead: NCHW 8x64x56x56 with grad and x
    // not in cache went 526 -> 455 us. On 28x28 planes the same prefetch cost 10 %.
    const bool long_planes = HW * int64_t(sizeof(T)) >= kLongPlaneBytes;
    run_tasks(tk, 2 * divup(HW, tk.nch) * C, [&](int64_t t, int64_t n, int64_t h0, int64_t h1) {
      A* dst = parts.row(t, n);
      const int64_t len = h1 - h0;
      Scratch<A, kTile> spatial;  // sum over c of t (* ca), for the tile
      std::fill(spatial.data, spatial.data + divup(len, L) * L, A(0));
      const A* s = maps.s + n * HW + h0;
      const A* sar = sa + n * HW + h0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t p = n * C + c;
        const T* xr = xp + p * HW + h0;
        const T* gr = gp + p * HW + h0;
        T* dr = kWithDirect ? direct + p * HW + h0 : nullptr;
        const V cv(maps.c[p]);
        const V cav(ca[p]);
        V rs0(A(0)), rs1(A(0));
        int64_t j = 0;
        auto step = [&](int64_t jj, int64_t cnt, V& rs) {
          V tv = t_of(gr, xr, dr, jj, cnt, cv, load_acc_n(s + jj, cnt));
          if (cnt < L) {  // the padding lanes may hold NaN (inf * 0) when a map is infinite
            tv = V::set(V(A(0)), tv, cnt);
          }
          A* sp = spatial.data + jj;
          if constexpr (kProd) {
            (V::loadu(sp) + tv * cav).store(sp);
            rs = at::vec::fmadd(tv, load_acc_n(sar + jj, cnt), rs);
          } else {
            (V::loadu(sp) + tv).store(sp);
            rs = rs + tv;
          }
        };
        for (; j + 2 * L <= len; j += 2 * L) {
          if (long_planes) {
            __builtin_prefetch(gr + HW + j, 0, 2);
            __builtin_prefetch(xr + HW + j, 0, 2);
          }
          step(j, L, rs0);
          step(j + L, L, rs1);
        }
        for (; j < len; j += L) {
          step(j, std::min(L, len - j), rs0);
        }
        dst[c] = hsum(rs0 + rs1);
      }
      std::copy(spatial.data, spatial.data + len, gsp + n * HW + h0);
    });
    parts.finish();
    return;
  }
  const Tasks tk = nhwc_chunks(N, C, HW);
  ChannelPartials<A> parts(N, C, tk.nch, gc.data_ptr<A>());
  const int64_t padded = divup(C, L) * L;
  run_tasks(tk, 2 * divup(HW, tk.nch) * C, [&](int64_t t, int64_t n, int64_t r0, int64_t r1) {
    std::vector<A> chan(padded, A(0));  // sum over this chunk's rows of t (* sa)
    const A* cm = maps.c + n * C;
    const A* car = ca + n * C;
    for (int64_t hw = r0; hw < r1; ++hw) {
      const int64_t row = n * HW + hw;
      const T* xr = xp + row * C;
      const T* gr = gp + row * C;
      T* dr = kWithDirect ? direct + row * C : nullptr;
      const V sv(maps.s[row]);
      const V sav(sa[row]);
      V rs0(A(0)), rs1(A(0));
      auto step = [&](int64_t j, int64_t cnt, V& rs) {
        V tv = t_of(gr, xr, dr, j, cnt, load_acc_n(cm + j, cnt), sv);
        if (cnt < L) {  // the padding lanes may hold NaN (inf * 0) when a map is infinite
          tv = V::set(V(A(0)), tv, cnt);
        }
        A* cp = chan.data() + j;
        if constexpr (kProd) {
          (V::loadu(cp) + tv * sav).store(cp);
          rs = at::vec::fmadd(tv, load_acc_n(car + j, cnt), rs);
        } else {
          (V::loadu(cp) + tv).store(cp);
          rs = rs + tv;
        }
      };
      int64_t j = 0;
      for (; j + 2 * L <= C; j += 2 * L) {
        step(j, L, rs0);
        step(j + L, L, rs1);
      }
      for (; j < C; j += L) {
        step(j, std::min(L, C - j), rs0);
      }
      gsp[row] = hsum(rs0 + rs1);
    }
    std::copy(chan.data(), chan.data() + C, parts.row(t, n));
  });
  parts.finish();
}

// ---- map preparation ------------------------------------------------------------------------

// Whether |p[i]| <= bound for all i (false on NaN).
template <typename A>
bool all_within(const A* p, int64_t n, A bound) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const V b(bound);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    // lanes where NOT(|p| <= bound): NaN compares false, so it is caught too
    if (lanes_set(V::loadu(p + i).abs() <= b) != (1 << L) - 1) {
      return false;
    }
  }
  for (; i < n; ++i) {
    if (!(std::abs(p[i]) <= bound)) {
      return false;
    }
  }
  return true;
}

// dst[i] = exp(-src[i]) (at::vec's accurate exp).
template <typename A>
void exp_neg(const A* src, A* dst, int64_t n) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    (V(A(0)) - V::loadu(src + i)).exp().store(dst + i);
  }
  for (; i < n; ++i) {
    dst[i] = std::exp(-src[i]);
  }
}

}  // namespace
}  // namespace attnkern::cpu
ATTNKERN_VEC_END

// -----------------------------------------------------------------------------------------------
// The ops: checks, then the kernels above (or, on a CPU without AVX2/FMA, a composite of ATen ops
// that mirrors attnkern/backends/torch_kernels.py).
namespace attnkern::cpu {
namespace {

using at::Tensor;
using std::optional;

Tensor attention_ref(const Tensor& ca, const Tensor& sa, bool product) {
  auto c = ca.unsqueeze(-1).unsqueeze(-1), s = sa.unsqueeze(1);
  return at::sigmoid(product ? c * s : c + s);
}

struct Args {
  Tensor x;  // in `layout`
  Layout layout;
  at::ScalarType acc;
  Tensor ca, sa;  // (N, C), (N, H, W), contiguous, acc
};

Args prepare(const char* op, const Tensor& x, const Tensor& ca, const Tensor& sa) {
  check_full(op, "x", x);
  const Layout layout = layout_of(x);
  const auto acc_type = acc_type_of(x.scalar_type());
  Tensor c = check_small(op, "channel_att", ca, acc_type, {x.size(0), x.size(1)}, x);
  Tensor s = check_spatial_map(op, "spatial_att", sa, acc_type, x);
  return {in_layout(x, layout), layout, acc_type, c, s};
}

// The maps' operands for the kernels (ec = exp(-ca), es = exp(-sa) in the factored mode), the
// mode and whether it needs the non-finite handling; `store` keeps the factored maps alive.
template <typename A>
struct MapsPlan {
  Maps<A> maps;
  int mode;
  bool safe;
};

template <typename A>
MapsPlan<A> maps_for(const Args& a, bool product, std::vector<A>& store) {
  const A* ca = a.ca.const_data_ptr<A>();
  const A* sa = a.sa.const_data_ptr<A>();
  const int64_t nc = a.ca.numel(), ns = a.sa.numel();
  if (!product && all_within(ca, nc, A(40)) && all_within(sa, ns, A(40))) {
    store.resize(nc + ns);
    exp_neg(ca, store.data(), nc);
    exp_neg(sa, store.data() + nc, ns);
    return {Maps<A>{store.data(), store.data() + nc}, kFactored, false};
  }
  // |ca|, |sa| <= 1e18: a = ca * sa (or ca + sa) is finite, no special values to handle.
  const bool safe = !(product && all_within(ca, nc, A(1e18)) && all_within(sa, ns, A(1e18)));
  if constexpr (std::is_same_v<A, float>) {
    if (product && !safe) {
      store.resize(nc);
      for (int64_t i = 0; i < nc; ++i) store[i] = ca[i] * static_cast<float>(-kLog2E);
      return {Maps<A>{store.data(), sa}, kLog2Product, false};
    }
  }
  return {Maps<A>{ca, sa}, product ? kProduct : kSum, safe};
}

// Calls f(mode, safe) with both as compile-time constants.
template <typename F>
void with_mode(int mode, bool safe, const F& f) {
  using std::integral_constant;
  if (mode == kFactored) {
    f(integral_constant<int, kFactored>(), integral_constant<bool, false>());
  } else if (mode == kSum) {
    f(integral_constant<int, kSum>(), integral_constant<bool, true>());
  } else if (mode == kLog2Product) {
    f(integral_constant<int, kLog2Product>(), integral_constant<bool, false>());
  } else if (safe) {
    f(integral_constant<int, kProduct>(), integral_constant<bool, true>());
  } else {
    f(integral_constant<int, kProduct>(), integral_constant<bool, false>());
  }
}

// grad_avg / HW: the average pool's gradient at each pixel (grad_avg (N, C) in acc).
template <typename A>
std::vector<A> per_pixel(const Tensor& grad_avg, const Tensor& x) {
  const A* g = grad_avg.const_data_ptr<A>();
  const A hw = A(x.size(2) * x.size(3));
  std::vector<A> out(grad_avg.numel());
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = g[i] / hw;
  }
  return out;
}

}  // namespace

Tensor bam_combine_cpu(const Tensor& x_in, const Tensor& ca_in, const Tensor& sa_in, bool product) {
  constexpr const char* op = "attnkern::bam_combine";
  const Args a = prepare(op, x_in, ca_in, sa_in);
  if (!use_vec_kernels()) {
    return at::empty_like(x_in).copy_(acc(x_in) * (1 + attention_ref(a.ca, a.sa, product)));
  }
  Tensor y = at::empty_like(a.x);
  if (y.numel() == 0) {
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.x.scalar_type(), "attnkern_bam_combine_cpu", [&] {
    using A = acc_t<scalar_t>;
    std::vector<A> store;
    const MapsPlan<A> plan = maps_for<A>(a, product, store);
    with_mode(plan.mode, plan.safe, [&](auto kmode, auto ksafe) {
      combine_kernel<scalar_t, decltype(kmode)::value, decltype(ksafe)::value>(a.x, a.layout, plan.maps, nullptr,
                                                                               nullptr, y);
    });
  });
  return y;
}

namespace {

// bam_input_grad; into_partial: dx overwrites grad_x_partial (in x's layout) element by element.
Tensor input_grad(const Tensor& grad_in, const Tensor& x_in, const Tensor& ca_in, const Tensor& sa_in, bool product,
                  const optional<Tensor>& ga_in, const optional<Tensor>& partial_in, bool into_partial) {
  constexpr const char* op = "attnkern::bam_input_grad";
  const Args a = prepare(op, x_in, ca_in, sa_in);
  check_like_x(op, "grad", grad_in, x_in);
  optional<Tensor> ga, partial;
  if (ga_in.has_value()) {
    ga = check_small(op, "grad_avg", *ga_in, a.acc, {x_in.size(0), x_in.size(1)}, x_in);
  }
  if (partial_in.has_value()) {
    check_like_x(op, "grad_x_partial", *partial_in, x_in);
  }
  if (!use_vec_kernels()) {
    auto dx = acc(grad_in) * (1 + attention_ref(a.ca, a.sa, product));
    if (ga.has_value()) {
      dx = dx + ga->unsqueeze(-1).unsqueeze(-1) / (x_in.size(2) * x_in.size(3));
    }
    if (partial_in.has_value()) {
      dx = dx + *partial_in;
    }
    return at::empty_like(x_in).copy_(dx);
  }
  Tensor grad = in_layout(grad_in, a.layout);
  if (partial_in.has_value()) {
    partial = in_layout(*partial_in, a.layout);
  }
  Tensor dx = into_partial && partial.has_value() ? *partial : at::empty_like(a.x);
  if (dx.numel() == 0) {
    return dx;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.x.scalar_type(), "attnkern_bam_input_grad_cpu", [&] {
    using A = acc_t<scalar_t>;
    std::vector<A> store;
    const MapsPlan<A> plan = maps_for<A>(a, product, store);
    const std::vector<A> ga_hw = ga.has_value() ? per_pixel<A>(*ga, x_in) : std::vector<A>();
    const A* gap = ga.has_value() ? ga_hw.data() : nullptr;
    const scalar_t* pp = partial.has_value() ? partial->const_data_ptr<scalar_t>() : nullptr;
    with_mode(plan.mode, plan.safe, [&](auto kmode, auto ksafe) {
      combine_kernel<scalar_t, decltype(kmode)::value, decltype(ksafe)::value>(grad, a.layout, plan.maps, gap, pp,
                                                                               dx);
    });
  });
  return dx;
}

}  // namespace

Tensor bam_input_grad_cpu(const Tensor& grad, const Tensor& x, const Tensor& ca, const Tensor& sa, bool product,
                          const optional<Tensor>& grad_avg, const optional<Tensor>& grad_x_partial) {
  return input_grad(grad, x, ca, sa, product, grad_avg, grad_x_partial, false);
}

Tensor bam_input_grad_reduce_cpu(const Tensor& direct, const Tensor& grad_avg, const Tensor& reduce_weight,
                                 const Tensor& grad_reduce) {
  const Layout layout = layout_of(direct);
  const auto acc_type = acc_type_of(direct.scalar_type());
  const int64_t N = direct.size(0), C = direct.size(1), H = direct.size(2), W = direct.size(3);
  const Tensor w = reduce_weight.reshape({-1, C});
  const int64_t Cr = w.size(0);
  TORCH_INTERNAL_ASSERT(use_vec_kernels() && direct.is_contiguous(memory_format_of(layout)) &&
                        grad_avg.scalar_type() == acc_type && grad_avg.is_contiguous() &&
                        grad_avg.numel() == N * C && grad_reduce.scalar_type() == acc_type &&
                        grad_reduce.size(0) == N && grad_reduce.size(1) == Cr && grad_reduce.size(2) == H &&
                        grad_reduce.size(3) == W);
  if (direct.numel() == 0) {
    return direct;
  }
  const Tensor dr = in_layout(grad_reduce, layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, direct.scalar_type(), "attnkern_bam_input_grad_reduce_cpu",
                                  [&] {
    using A = acc_t<scalar_t>;
    constexpr int64_t kTileCols = kColTile * Vectorized<A>::size();  // a multiple of kChanTile
    // The weights as the reduce conv took them (in x's dtype), held in acc.
    const Tensor w_pad = at::zeros({Cr, divup(C, kTileCols) * kTileCols}, w.options().dtype(acc_type));
    w_pad.narrow(1, 0, C).copy_(w.to(direct.scalar_type()));
    const ReduceTerms<A> rt{w_pad.const_data_ptr<A>(), w_pad.size(1), dr.const_data_ptr<A>(), Cr};
    const std::vector<A> ga_hw = per_pixel<A>(grad_avg, direct);
    reduce_input_grad_kernel<scalar_t>(direct, layout, ga_hw.data(), rt, direct);
  });
  return direct;
}

Tensor bam_input_grad_into_partial_cpu(const Tensor& grad, const Tensor& x, const Tensor& ca, const Tensor& sa,
                                       bool product, const Tensor& grad_avg, const Tensor& grad_x_partial) {
  return input_grad(grad, x, ca, sa, product, grad_avg, grad_x_partial, true);
}

namespace {

// bam_combine_backward; with_direct: also dx's direct term grad * (1 + M) (x's layout and dtype),
// else that is left undefined.
std::tuple<Tensor, Tensor, Tensor> combine_backward(const Tensor& grad_in, const Tensor& x_in, const Tensor& ca_in,
                                                    const Tensor& sa_in, bool product, bool with_direct) {
  constexpr const char* op = "attnkern::bam_combine_backward";
  const Args a = prepare(op, x_in, ca_in, sa_in);
  check_like_x(op, "grad", grad_in, x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  if (!use_vec_kernels()) {
    auto m = attention_ref(a.ca, a.sa, product);
    auto t = acc(grad_in) * acc(x_in) * m * (1 - m);
    auto gc = (product ? t * a.sa.unsqueeze(1) : t).sum({2, 3});
    auto gs = (product ? t * a.ca.unsqueeze(-1).unsqueeze(-1) : t).sum(1);
    TORCH_INTERNAL_ASSERT(!with_direct, "the direct term is for the vector kernels' input gradient pass");
    return {gc, gs, Tensor()};
  }
  Tensor grad = in_layout(grad_in, a.layout);
  auto opts = x_in.options().dtype(a.acc);
  Tensor gc = at::empty({N, C}, opts);
  Tensor gs = at::empty({N, H, W}, opts);
  Tensor direct = with_direct ? at::empty_like(a.x) : Tensor();
  if (N * C * H * W == 0) {  // empty sums are zero
    gc.zero_();
    gs.zero_();
    return {gc, gs, direct};
  }
  const auto dtype = a.x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "attnkern_bam_combine_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    std::vector<A> store;
    const MapsPlan<A> plan = maps_for<A>(a, product, store);
    const A* ca = a.ca.const_data_ptr<A>();
    const A* sa = a.sa.const_data_ptr<A>();
    with_mode(plan.mode, plan.safe, [&](auto kmode, auto ksafe) {
      constexpr int kMode = decltype(kmode)::value;
      constexpr bool kSafe = decltype(ksafe)::value;
      if (with_direct) {
        combine_backward_kernel<scalar_t, kMode, kSafe, true>(grad, a.x, a.layout, plan.maps, ca, sa, gc, gs,
                                                              direct.data_ptr<scalar_t>());
      } else {
        combine_backward_kernel<scalar_t, kMode, kSafe, false>(grad, a.x, a.layout, plan.maps, ca, sa, gc, gs,
                                                               nullptr);
      }
    });
  });
  return {gc, gs, direct};
}

}  // namespace

std::tuple<Tensor, Tensor> bam_combine_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& ca,
                                                    const Tensor& sa, bool product) {
  auto [gc, gs, direct] = combine_backward(grad, x, ca, sa, product, false);
  return {gc, gs};
}

std::tuple<Tensor, Tensor, Tensor> bam_combine_backward_with_direct_cpu(const Tensor& grad, const Tensor& x,
                                                                        const Tensor& ca, const Tensor& sa,
                                                                        bool product) {
  return combine_backward(grad, x, ca, sa, product, true);
}

}  // namespace attnkern::cpu

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("bam_combine", &attnkern::cpu::bam_combine_cpu);
  m.impl("bam_combine_backward", &attnkern::cpu::bam_combine_backward_cpu);
  m.impl("bam_input_grad", &attnkern::cpu::bam_input_grad_cpu);
}
