// Shared by the C++ CPU kernels (cbam_cpu.cpp, bam_cpu.cpp): argument checks, layouts, work
// splitting, and the at::vec helpers the kernels are written with.
//
// Vector ISA. at::vec::Vectorized<T> is only fast when it is compiled for AVX2 (its generic
// version is plain loops, ~10x slower here), and setup.py compiles every file with the baseline
// x86-64 flags. So on x86-64 with GCC the kernel code is compiled for AVX2+FMA+F16C inside
// ATTNKERN_VEC_BEGIN / ATTNKERN_VEC_END (a `#pragma GCC target` region that also holds the
// at::vec headers, included here with CPU_CAPABILITY=AVX2), and every op checks the CPU at run
// time (use_vec_kernels()): without AVX2/FMA it runs a composite ATen fallback that mirrors
// attnkern/backends/torch_kernels.py. Only code *defined* inside a region is AVX2 code: the
// ATen / c10 / std headers are all included before it (see the list below), so no inline
// function that baseline code may share is emitted with AVX2 instructions. Elsewhere (other
// architectures, other compilers, or -DATTNKERN_GENERIC_VEC) the kernels use the TU's own
// Vectorized (NEON on aarch64; on x86 the generic loops: correct, slower) and always run.
// ATTNKERN_CPU_FALLBACK=1 in the environment forces the fallback (to test it).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

// in_layout calls transpose_layout (layout_cpu.cpp, which includes this file). Its header declares it
// with at::MemoryFormat and includes only ATen core headers: no include cycle, and nothing of it is
// compiled inside the AVX2 region below.
#include "cpu/layout_cpu.h"
// InputTransform, for LoadTransform below (ATen core headers only: no include cycle).
#include "cpu/cpu_ops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(ATTNKERN_GENERIC_VEC)
#define ATTNKERN_X86_DISPATCH 1
#else
#define ATTNKERN_X86_DISPATCH 0
#endif

#if ATTNKERN_X86_DISPATCH
// Everything at::vec's headers include outside at::vec, so that it is compiled for the baseline
// ISA here rather than inside the AVX2 region below.
#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/jiterator_macros.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/MathConstants.h>
#include <c10/util/copysign.h>
#include <x86intrin.h>

#define ATTNKERN_VEC_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define ATTNKERN_VEC_END _Pragma("GCC pop_options")
#ifdef CPU_CAPABILITY
#error "cpu_utils.h must be included before any at::vec header"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define ATTNKERN_VEC_BEGIN
#define ATTNKERN_VEC_END
#endif

namespace attnkern::cpu {

// ---------------------------------------------------------------------------------------------
// Baseline-ISA part: dispatch decision, argument checks, layouts, work splitting.

// Whether the vectorised kernels may run on this CPU (see the header comment).
inline bool use_vec_kernels() {
  static const bool ok = [] {
    const char* env = std::getenv("ATTNKERN_CPU_FALLBACK");
    if (env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0) {
      return false;
    }
#if ATTNKERN_X86_DISPATCH
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return true;
#endif
  }();
  return ok;
}

enum class Layout { NCHW, NHWC };

inline at::MemoryFormat memory_format_of(Layout layout) {
  return layout == Layout::NHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Contiguous wins when both hold (C == 1 or H == W == 1: the two orders are the same memory).
// Any other strides are made contiguous (one copy).
inline Layout layout_of(const at::Tensor& x) {
  if (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return Layout::NHWC;
  }
  return Layout::NCHW;
}

// t in the given layout: t itself when it already is, else a copy. A tensor dense in the other
// layout (so C > 1 and H * W > 1) is transposed by transpose_layout: ATen's copy between the two
// takes 7-26x a clone.
inline at::Tensor in_layout(const at::Tensor& t, Layout layout) {
  const at::MemoryFormat format = memory_format_of(layout);
  const at::MemoryFormat other = memory_format_of(layout == Layout::NCHW ? Layout::NHWC : Layout::NCHW);
  if (t.dim() == 4 && !t.is_contiguous(format) && t.is_contiguous(other)) {
    return transpose_layout(t, format);
  }
  return t.contiguous(format);
}

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether t is float32 / float64: the dtypes of the kernels that have no reduced-precision path.
inline bool float_or_double(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// t converted to its accumulation dtype (the fallbacks compute in it).
inline at::Tensor acc(const at::Tensor& t) {
  return t.to(acc_type_of(t.scalar_type()));
}

// The full-size input (x, grad): 4-D, floating, on the CPU.
inline void check_full(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be a 4-D (N, C, H, W) tensor, got a ", t.dim(),
              "-dim tensor of shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op, ": ", name,
              " must have a floating dtype (float32, float64, bfloat16 or float16), got dtype ", st);
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU (this is the CPU kernel), got device ",
              t.device());
}

// A second full-size tensor (grad, grad_x_partial): same shape and dtype as x.
inline void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_full(op, name, t);
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got dtype ", t.scalar_type());
}

// A small map (gate, pooled map, argmax): dtype, device and shape checked; returned contiguous.
inline at::Tensor check_small(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                              at::IntArrayRef shape, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device (", x.device(), "), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype,
              dtype == at::kLong ? std::string("") : std::string(" (the accumulation dtype for x of dtype ") +
                                                         std::string(c10::toString(x.scalar_type())) + ")",
              ", got dtype ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  return t.contiguous();
}

// A per-pixel map given as (N, H, W) or (N, 1, H, W); returned as a contiguous (N, H, W) tensor.
inline at::Tensor check_spatial_map(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                                    const at::Tensor& x) {
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  if (t.dim() == 4) {
    return check_small(op, name, t, dtype, {n, 1, h, w}, x).view({n, h, w});
  }
  return check_small(op, name, t, dtype, {n, h, w}, x);
}

// Parallel split helpers. A parallel task should hold at least kGrain elements of work; with the
// OpenMP backend at::parallel_for gives each thread one contiguous block of tasks, so task counts
// are kept divisible by the thread count where that is cheap.
constexpr int64_t kGrain = 32768;

constexpr int64_t divup(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The grain (in tasks) for tasks of `work` elements each.
inline int64_t task_grain(int64_t work) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, work));
}

// How many chunks to cut each of `samples` ranges of length `len` into: chunks at most
// `max_len` long and, where the data is big enough to be worth threads, a total task count that
// splits evenly across the threads (one sample with two threads gets two chunks), never chunks
// shorter than `min_len`.
inline int64_t chunks_per_sample(int64_t samples, int64_t len, int64_t max_len, int64_t min_len,
                                 int64_t work_per_sample) {
  if (samples <= 0 || len <= 0) {
    return 1;
  }
  int64_t nch = divup(len, max_len);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t most = std::max(nch, len / std::max<int64_t>(1, min_len));
  if (threads > 1 && samples * work_per_sample >= 2 * kGrain && samples * nch < 4 * threads) {
    while ((samples * nch) % threads != 0 && nch < most) {
      ++nch;
    }
  }
  return nch;
}

// [start, end) of chunk i of `nch` chunks of a range of length len, with chunk starts aligned to
// `align` elements.
inline std::pair<int64_t, int64_t> chunk_range(int64_t len, int64_t nch, int64_t i, int64_t align) {
  int64_t size = divup(divup(len, nch), align) * align;
  int64_t start = std::min(len, i * size);
  int64_t end = std::min(len, start + size);
  return {start, end};
}

}  // namespace attnkern::cpu

// ---------------------------------------------------------------------------------------------
// Vector part (AVX2 on x86-64/GCC; see above).
ATTNKERN_VEC_BEGIN
#if ATTNKERN_X86_DISPATCH && !defined(__AVX__)
// g++ preprocesses the whole file before the target pragma takes effect, so the ISA macros stay
// at the baseline; sleef.h declares its 256-bit functions (used by vec256) only under __AVX__.
#define __AVX__ 1
#define ATTNKERN_UNDEF_AVX
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#ifdef ATTNKERN_UNDEF_AVX
#undef __AVX__
#undef ATTNKERN_UNDEF_AVX
#endif

namespace attnkern::cpu {

using at::vec::Vectorized;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// An integer with the width of acc_t: argmax positions ride in vector lanes as bit patterns.
template <typename A>
using bits_t = std::conditional_t<std::is_same_v<A, double>, int64_t, int32_t>;

template <typename A>
inline Vectorized<A> bits_vec(bits_t<A> k) {
  return Vectorized<A>(c10::bit_cast<A>(k));
}

template <typename A>
inline bits_t<A> from_bits(A v) {
  return c10::bit_cast<bits_t<A>>(v);
}

#if ATTNKERN_X86_DISPATCH
// Lane masks of the first n lanes, for AVX2's masked loads and stores: at::vec's partial loads and
// stores go through a stack buffer and memcpy, ~10 ns each, which made a map of 2 x 2 pixels
// cost as much as one of 28 x 28 in bam_combine (whose NCHW rows are then all partial).
inline __m256i first_lanes_32(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256i first_lanes_64(int64_t n) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
#endif

// Loads of Vectorized<acc_t<T>>::size() elements of T as acc_t (and partial loads of n of them,
// the other lanes zero); stores back to T.
inline Vectorized<float> vload(const float* p) {
  return Vectorized<float>::loadu(p);
}
inline Vectorized<float> vload(const float* p, int64_t n) {
#if ATTNKERN_X86_DISPATCH
  return _mm256_maskload_ps(p, first_lanes_32(n));
#else
  return Vectorized<float>::loadu(p, n);
#endif
}
inline Vectorized<double> vload(const double* p) {
  return Vectorized<double>::loadu(p);
}
inline Vectorized<double> vload(const double* p, int64_t n) {
#if ATTNKERN_X86_DISPATCH
  return _mm256_maskload_pd(p, first_lanes_64(n));
#else
  return Vectorized<double>::loadu(p, n);
#endif
}
template <typename T, typename = std::enable_if_t<at::vec::is_reduced_floating_point_v<T>>>
inline Vectorized<float> vload(const T* p) {
  Vectorized<float> out;
  at::vec::load_to_float<T>(p, out);
  return out;
}
template <typename T, typename = std::enable_if_t<at::vec::is_reduced_floating_point_v<T>>>
inline Vectorized<float> vload(const T* p, int64_t n) {
  auto both = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, n));
  return std::get<0>(both);
}

inline void vstore(float* p, const Vectorized<float>& v) {
  v.store(p);
}
inline void vstore(float* p, const Vectorized<float>& v, int64_t n) {
#if ATTNKERN_X86_DISPATCH
  _mm256_maskstore_ps(p, first_lanes_32(n), v);
#else
  v.store(p, n);
#endif
}
inline void vstore(double* p, const Vectorized<double>& v) {
  v.store(p);
}
inline void vstore(double* p, const Vectorized<double>& v, int64_t n) {
#if ATTNKERN_X86_DISPATCH
  _mm256_maskstore_pd(p, first_lanes_64(n), v);
#else
  v.store(p, n);
#endif
}
template <typename T, typename = std::enable_if_t<at::vec::is_reduced_floating_point_v<T>>>
inline void vstore(T* p, const Vectorized<float>& v) {
  at::vec::convert_from_float<T>(v, v).store(p, Vectorized<float>::size());
}
template <typename T, typename = std::enable_if_t<at::vec::is_reduced_floating_point_v<T>>>
inline void vstore(T* p, const Vectorized<float>& v, int64_t n) {
  at::vec::convert_from_float<T>(v, v).store(p, n);
}

template <typename A>
inline A hsum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](const Vectorized<A>& a, const Vectorized<A>& b) { return a + b; }, v);
}

// Lane k of the result = reduce(v[k]): the generic form of lane_sums and lane_maxes.
template <typename A, typename Reduce>
inline Vectorized<A> reduce_each(const Vectorized<A> (&v)[Vectorized<A>::size()], const Reduce& reduce) {
  constexpr int64_t L = Vectorized<A>::size();
  A out[L];
  for (int64_t k = 0; k < L; ++k) {
    out[k] = reduce(v[k]);
  }
  return Vectorized<A>::loadu(out);
}

// Lane k of the result = the sum of the lanes of v[k]: L horizontal sums in one step.
template <typename A>
inline Vectorized<A> lane_sums(const Vectorized<A> (&v)[Vectorized<A>::size()]) {
  return reduce_each(v, [](const Vectorized<A>& x) { return hsum(x); });
}
#if ATTNKERN_X86_DISPATCH
template <>
inline Vectorized<float> lane_sums<float>(const Vectorized<float> (&v)[8]) {
  // Pairwise adds leave, per 128-bit half, the half-sums of v[0..3] and of v[4..7].
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
template <>
inline Vectorized<double> lane_sums<double>(const Vectorized<double> (&v)[4]) {
  const __m256d a = _mm256_hadd_pd(v[0], v[1]), b = _mm256_hadd_pd(v[2], v[3]);
  return _mm256_add_pd(_mm256_permute2f128_pd(a, b, 0x20), _mm256_permute2f128_pd(a, b, 0x31));
}
#endif

// d[j * ds + i] = lane j of rows[i]: an L x L block stored transposed (L rows of d, ds apart).
template <typename A>
inline void store_transposed(const Vectorized<A> (&rows)[Vectorized<A>::size()], A* d, int64_t ds) {
  constexpr int64_t L = Vectorized<A>::size();
  alignas(64) A block[L][L];
  for (int64_t i = 0; i < L; ++i) rows[i].store(block[i]);
  for (int64_t j = 0; j < L; ++j) {
    for (int64_t i = 0; i < L; ++i) d[j * ds + i] = block[i][j];
  }
}
#if ATTNKERN_X86_DISPATCH
template <>
inline void store_transposed<float>(const Vectorized<float> (&rows)[8], float* d, int64_t ds) {
  __m256 pairs[8], quads[8];  // 2 x 2, then 4 x 4 blocks transposed within each 128-bit half
  for (int k = 0; k < 4; ++k) {
    pairs[2 * k] = _mm256_unpacklo_ps(rows[2 * k], rows[2 * k + 1]);
    pairs[2 * k + 1] = _mm256_unpackhi_ps(rows[2 * k], rows[2 * k + 1]);
  }
  for (int k = 0; k < 2; ++k) {
    for (int h = 0; h < 2; ++h) {
      quads[4 * k + 2 * h] = _mm256_shuffle_ps(pairs[4 * k + h], pairs[4 * k + 2 + h], 0x44);
      quads[4 * k + 2 * h + 1] = _mm256_shuffle_ps(pairs[4 * k + h], pairs[4 * k + 2 + h], 0xEE);
    }
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(d + j * ds, _mm256_permute2f128_ps(quads[j], quads[4 + j], 0x20));
    _mm256_storeu_ps(d + (j + 4) * ds, _mm256_permute2f128_ps(quads[j], quads[4 + j], 0x31));
  }
}
#endif

// Runs f(row, j0, j1) over the [j0, j1) pieces of `rows` rows of length `len`, the rows * len
// elements split evenly over the threads (elementwise kernels).
template <typename F>
inline void parallel_rows(int64_t rows, int64_t len, const F& f) {
  if (rows <= 0 || len <= 0) {
    return;
  }
  at::parallel_for(0, rows * len, kGrain, [&](int64_t begin, int64_t end) {
    int64_t row = begin / len;
    int64_t j = begin - row * len;
    while (begin < end) {
      const int64_t j1 = std::min(len, j + (end - begin));
      f(row, j, j1);
      begin += j1 - j;
      ++row;
      j = 0;
    }
  });
}

// Max for finite / infinite values (NaN handling is left to the callers: they find NaNs from the
// sums, which a NaN always turns into NaN). One instruction on x86, unlike at::vec::maximum.
template <typename A>
inline Vectorized<A> vmax(const Vectorized<A>& a, const Vectorized<A>& b) {
  return at::vec::clamp_min(a, b);
}

template <typename A>
inline A hmax(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](const Vectorized<A>& a, const Vectorized<A>& b) { return vmax(a, b); }, v);
}

// Lane k of the result = the max of the lanes of v[k] (NaN: as vmax), as lane_sums does sums.
template <typename A>
inline Vectorized<A> lane_maxes(const Vectorized<A> (&v)[Vectorized<A>::size()]) {
  return reduce_each(v, [](const Vectorized<A>& x) { return hmax(x); });
}
#if ATTNKERN_X86_DISPATCH
template <>
inline Vectorized<float> lane_maxes<float>(const Vectorized<float> (&v)[8]) {
  // Interleave pairs, then quads, reducing at each step; the halves hold lanes 0-3 and 4-7.
  auto pairs = [](const Vectorized<float>& a, const Vectorized<float>& b) {
    return vmax(Vectorized<float>(_mm256_unpacklo_ps(a, b)), Vectorized<float>(_mm256_unpackhi_ps(a, b)));
  };
  auto quads = [](const Vectorized<float>& a, const Vectorized<float>& b) {
    return vmax(Vectorized<float>(_mm256_shuffle_ps(a, b, 0x44)), Vectorized<float>(_mm256_shuffle_ps(a, b, 0xEE)));
  };
  const Vectorized<float> lo = quads(pairs(v[0], v[1]), pairs(v[2], v[3]));
  const Vectorized<float> hi = quads(pairs(v[4], v[5]), pairs(v[6], v[7]));
  return vmax(Vectorized<float>(_mm256_permute2f128_ps(lo, hi, 0x20)),
              Vectorized<float>(_mm256_permute2f128_ps(lo, hi, 0x31)));
}
#endif

// Bit i set where lane i of the comparison mask m is set.
template <typename A>
inline int lanes_set(const Vectorized<A>& m) {
  constexpr int all = (1 << Vectorized<A>::size()) - 1;
  return ~m.zero_mask() & all;
}

// Sum, max and argmax (first maximal element; NaN counts as maximal) of v_j for j in [0, n),
// where v_j = p[j] (kScaled: p[j] * s[j]), all in acc_t.
template <typename A>
struct RowStats {
  A sum;
  A max;
  int64_t arg;
};

// The elements v_j of row_stats' row, as vectors or one at a time.
template <typename T, bool kScaled>
struct RowReader {
  using A = acc_t<T>;
  const T* p;
  const A* s;
  Vectorized<A> vec(int64_t j) const {
    Vectorized<A> v = vload(p + j);
    if constexpr (kScaled) {
      v = v * Vectorized<A>::loadu(s + j);
    }
    return v;
  }
  A at(int64_t j) const {
    A v = static_cast<A>(p[j]);
    if constexpr (kScaled) {
      v = v * s[j];
    }
    return v;
  }
  // The first NaN, if any, is the row's max and argmax: called when the sum came out NaN (a NaN,
  // or +inf and -inf), since the comparisons skip NaNs.
  bool first_nan(int64_t n, RowStats<A>& r) const {
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(at(i))) {
        r.max = at(i);
        r.arg = i;
        return true;
      }
    }
    return false;
  }
};

// Four vector partial sums of a row, totalled as (s0 + s1) + (s2 + s3): row_stats and
// tracked_row_stats share it, so that a pool's avg does not depend on whether its argmax is wanted.
template <typename A>
struct RowSum {
  Vectorized<A> s0{A(0)}, s1{A(0)}, s2{A(0)}, s3{A(0)};
  void add(const Vectorized<A>& v0, const Vectorized<A>& v1, const Vectorized<A>& v2, const Vectorized<A>& v3) {
    s0 = s0 + v0;
    s1 = s1 + v1;
    s2 = s2 + v2;
    s3 = s3 + v3;
  }
  void add(const Vectorized<A>& v) {
    s0 = s0 + v;
  }
  A total() const {
    return hsum((s0 + s1) + (s2 + s3));
  }
};

// Rows up to this long find their argmax in the sum-and-max pass (tracked_row_stats), longer ones
// by a rescan that stops at the first hit (row_stats).
template <typename A>
constexpr int64_t kTrackedRow = 64 * Vectorized<A>::size();

// row_stats with the argmax kept in the same pass, for short rows (NHWC pools over C): each lane
// keeps the position of its first maximum (strict >; positions as A values, exact at these
// lengths), and the row's argmax is the least position among the lanes holding the row's max.
// A rescan after the pass mispredicted its exit branch about once per row: with row_set_stats'
// old branch, the argmaxes added 0.12-0.15 ms to the 0.47 ms channels_last per-sample forward at
// 8x256x28x28; 0.01-0.02 ms with both changes.
template <typename T, bool kScaled>
inline RowStats<acc_t<T>> tracked_row_stats(const T* p, const acc_t<T>* s, int64_t n) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const RowReader<T, kScaled> row{p, s};
  const V neg_inf(-std::numeric_limits<A>::infinity());
  RowSum<A> sum;
  // Lanes of vectors 0 and 2 of each step in (m0, at0), of vectors 1 and 3 in (m1, at1); at0 and
  // at1 hold the position of the lane's first element's vector (+ L for at1, added at the end).
  V m0 = neg_inf, m1 = neg_inf, at0(A(0)), at1(A(0));
  auto track = [](const V& v, const V& pos, V& m, V& at) {
    const V gt = v > m;
    m = V::blendv(m, v, gt);
    at = V::blendv(at, pos, gt);
  };
  V base(A(0));
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    const V v0 = row.vec(j), v1 = row.vec(j + L), v2 = row.vec(j + 2 * L), v3 = row.vec(j + 3 * L);
    sum.add(v0, v1, v2, v3);
    const V base2 = base + V(A(2 * L));
    track(v0, base, m0, at0);
    track(v1, base, m1, at1);
    track(v2, base2, m0, at0);
    track(v3, base2, m1, at1);
    base = base + V(A(4 * L));
  }
  for (; j + L <= n; j += L) {
    const V v = row.vec(j);
    sum.add(v);
    track(v, V(A(j)), m0, at0);
  }
  RowStats<A> r{sum.total(), hmax(vmax(m0, m1)), 0};
  const V lane = V::arange(A(0), A(1)), mv(r.max), none{A(n)};
  const V pos0 = V::blendv(none, at0 + lane, m0 == mv);
  const V pos1 = V::blendv(none, at1 + lane + V(A(L)), m1 == mv);
  r.arg = static_cast<int64_t>(at::vec::vec_reduce_all<A>(
      [](const V& a, const V& b) { return at::vec::minimum(a, b); }, at::vec::minimum(pos0, pos1)));
  for (; j < n; ++j) {
    const A v = row.at(j);
    r.sum += v;
    if (v > r.max) {
      r.max = v;
      r.arg = j;
    }
  }
  if (std::isnan(r.sum)) {
    row.first_nan(n, r);
  }
  return r;
}

// kArg false: arg is left 0 (the max pools of a forward that no backward follows). Long rows:
// sum and max, then the first position holding the max (the row is in L1 by then, and the search
// stops there).
template <typename T, bool kScaled, bool kArg = true>
inline RowStats<acc_t<T>> row_stats(const T* p, const acc_t<T>* s, int64_t n) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  if constexpr (kArg) {
    if (n <= kTrackedRow<A>) {
      return tracked_row_stats<T, kScaled>(p, s, n);
    }
  }
  const RowReader<T, kScaled> row{p, s};
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  RowSum<A> sum;
  V m0(kNegInf), m1(kNegInf), m2(kNegInf), m3(kNegInf);
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    const V v0 = row.vec(j), v1 = row.vec(j + L), v2 = row.vec(j + 2 * L), v3 = row.vec(j + 3 * L);
    sum.add(v0, v1, v2, v3);
    m0 = vmax(m0, v0);
    m1 = vmax(m1, v1);
    m2 = vmax(m2, v2);
    m3 = vmax(m3, v3);
  }
  for (; j + L <= n; j += L) {
    const V v = row.vec(j);
    sum.add(v);
    m0 = vmax(m0, v);
  }
  RowStats<A> r{sum.total(), hmax(vmax(vmax(m0, m1), vmax(m2, m3))), 0};
  for (int64_t i = j; i < n; ++i) {
    const A v = row.at(i);
    r.sum += v;
    r.max = v > r.max ? v : r.max;
  }
  if (std::isnan(r.sum) && row.first_nan(n, r)) {
    return r;
  }
  if constexpr (!kArg) {
    return r;
  }
  const V mv(r.max);
  const int64_t full = n - n % L;
  for (int64_t i = 0; i < full; i += L) {
    const int hit = lanes_set(row.vec(i) == mv);
    if (hit != 0) {
      r.arg = i + __builtin_ctz(hit);
      return r;
    }
  }
  for (int64_t i = full; i < n; ++i) {
    if (row.at(i) == r.max) {
      r.arg = i;
      return r;
    }
  }
  return r;  // n == 0
}

// Sums and maxima of x * s over each of L consecutive rows of C elements (C a multiple of L) into
// sum[0, L) and mx[0, L): each row in vectors, then one lane_sums and one lane_maxes for the L
// rows instead of two horizontal reductions per row (most of the NHWC spatial pool at C = 64).
// A row whose sum is NaN is redone by row_stats, which gives its max as NaN.
template <typename T>
inline void row_block_stats(const T* p, int64_t C, const acc_t<T>* s, acc_t<T>* sum, acc_t<T>* mx) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const V neg_inf(-std::numeric_limits<A>::infinity());
  V sums[L], maxes[L];
  for (int64_t k = 0; k < L; ++k) {
    const RowReader<T, true> row{p + k * C, s};
    V s0(A(0)), s1(A(0)), m0 = neg_inf, m1 = neg_inf;
    int64_t j = 0;
    for (; j + 2 * L <= C; j += 2 * L) {
      const V v0 = row.vec(j), v1 = row.vec(j + L);
      s0 = s0 + v0;
      s1 = s1 + v1;
      m0 = vmax(m0, v0);
      m1 = vmax(m1, v1);
    }
    if (j < C) {
      const V v = row.vec(j);
      s0 = s0 + v;
      m0 = vmax(m0, v);
    }
    sums[k] = s0 + s1;
    maxes[k] = vmax(m0, m1);
  }
  lane_sums(sums).store(sum);
  lane_maxes(maxes).store(mx);
  for (int64_t k = 0; k < L; ++k) {
    if (std::isnan(sum[k])) {
      const RowStats<A> r = row_stats<T, true, false>(p + k * C, s, C);
      sum[k] = r.sum;
      mx[k] = r.max;
    }
  }
}

// Software prefetch for the loops that walk the rows (planes) of a block four at a time across
// their columns (col_stats, spatial_gate_grad's NCHW walk). From memory, four interleaved short
// streams (rows of up to kShortRowBytes) kept the hardware prefetchers from running ahead: the
// NCHW spatial pool of 8x1024x14x14 took 3.4x an amax of x, 1.4x with this. Where the rows are
// contiguous and short, at column step j (4 * L elements read) it asks in storage order for two
// lines of the four rows after the current ones.
constexpr int64_t kShortRowBytes = 2048;

template <typename T>
class NextRows {
 public:
  // rows: the first of the four current rows; rows_left: the rows from there to the block's end.
  NextRows(const T* rows, int64_t stride, int64_t cols, int64_t rows_left)
      : next_(stride == cols && cols * int64_t(sizeof(T)) <= kShortRowBytes && rows_left >= 8
                  ? reinterpret_cast<const char*>(rows + 4 * stride)
                  : nullptr) {}
  void at(int64_t j) const {
    if (next_ != nullptr) {
      const char* p = next_ + 4 * j * int64_t(sizeof(T));
      __builtin_prefetch(p, 0, 3);
      __builtin_prefetch(p + 64, 0, 3);
    }
  }

 private:
  const char* next_;
};

// Column statistics of a strided block: for rows k in [0, rows) and columns j in [0, cols),
// v = base[k * stride + j] (kScaled: times rs[k]); accumulates sum[j], max[j] and the row of the
// first maximum (as bits, see bits_vec) into the buffers, which hold round_up(cols, L) entries.
// Rows go four at a time: the buffers are loaded and stored once per four rows, and the argmax is
// kept with blends, no branch: the first of the four rows equal to their maximum, taken where that
// maximum beats the running one (a branch on "any lane beats it" mispredicted on much of the
// input: the training forward's spatial pool took 3x its argmax-free time). kArg false: no
// argmax (idx is not touched).
template <typename T, bool kScaled, bool kArg = true>
inline void col_stats(const T* base, int64_t stride, int64_t rows, int64_t cols, const acc_t<T>* rs,
                      acc_t<T>* sum, acc_t<T>* mx, acc_t<T>* idx) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  auto load = [&](const T* row, int64_t j, int64_t cnt, A scale) {
    V v = cnt == L ? vload(row + j) : vload(row + j, cnt);
    if constexpr (kScaled) {
      v = v * V(scale);
    }
    return v;
  };
  auto track = [](const V& v, const V& kv, V& m, V& ix) {
    const V gt = v > m;
    m = V::blendv(m, v, gt);
    ix = V::blendv(ix, kv, gt);
  };
  int64_t k = 0;
  for (; k + 4 <= rows; k += 4) {
    const T* r0 = base + k * stride;
    const T* r1 = r0 + stride;
    const T* r2 = r1 + stride;
    const T* r3 = r2 + stride;
    const NextRows<T> next(r0, stride, cols, rows - k);
    const A c0 = kScaled ? rs[k] : A(1), c1 = kScaled ? rs[k + 1] : A(1);
    const A c2 = kScaled ? rs[k + 2] : A(1), c3 = kScaled ? rs[k + 3] : A(1);
    const V k0 = bits_vec<A>(bits_t<A>(k)), k1 = bits_vec<A>(bits_t<A>(k + 1));
    const V k2 = bits_vec<A>(bits_t<A>(k + 2)), k3 = bits_vec<A>(bits_t<A>(k + 3));
    for (int64_t j = 0; j < cols; j += L) {
      const int64_t cnt = std::min(L, cols - j);
      next.at(j);
      const V v0 = load(r0, j, cnt, c0), v1 = load(r1, j, cnt, c1);
      const V v2 = load(r2, j, cnt, c2), v3 = load(r3, j, cnt, c3);
      (V::loadu(sum + j) + ((v0 + v1) + (v2 + v3))).store(sum + j);
      const V m = V::loadu(mx + j);
      const V top = vmax(vmax(v0, v1), vmax(v2, v3));
      if constexpr (!kArg) {
        vmax(m, top).store(mx + j);
      } else {
        const V first = V::blendv(V::blendv(V::blendv(k3, k2, v2 == top), k1, v1 == top), k0, v0 == top);
        const V gt = top > m;  // strict: an earlier row with the same maximum keeps it
        V::blendv(m, top, gt).store(mx + j);
        V::blendv(V::loadu(idx + j), first, gt).store(idx + j);
      }
    }
  }
  for (; k < rows; ++k) {
    const T* r0 = base + k * stride;
    const A c0 = kScaled ? rs[k] : A(1);
    const V kv = bits_vec<A>(bits_t<A>(k));
    for (int64_t j = 0; j < cols; j += L) {
      const int64_t cnt = std::min(L, cols - j);
      const V v0 = load(r0, j, cnt, c0);
      (V::loadu(sum + j) + v0).store(sum + j);
      if constexpr (!kArg) {
        vmax(V::loadu(mx + j), v0).store(mx + j);
      } else {
        V m = V::loadu(mx + j), ix = V::loadu(idx + j);
        track(v0, kv, m, ix);
        m.store(mx + j);
        ix.store(idx + j);
      }
    }
  }
}

// Turns the buffers of col_stats or row_set_stats into (sum, max, row of the first max) for column
// j, finding NaNs the comparisons skipped by rescanning columns whose sum is NaN.
template <typename T, bool kScaled, bool kArg = true>
inline RowStats<acc_t<T>> col_stats_result(const T* base, int64_t stride, int64_t rows, const acc_t<T>* rs,
                                           const acc_t<T>* sum, const acc_t<T>* mx, const acc_t<T>* idx,
                                           int64_t j) {
  using A = acc_t<T>;
  RowStats<A> r{sum[j], mx[j], kArg ? int64_t(from_bits<A>(idx[j])) : 0};
  if (std::isnan(r.sum)) {
    for (int64_t k = 0; k < rows; ++k) {
      A v = static_cast<A>(base[k * stride + j]);
      if constexpr (kScaled) {
        v = v * rs[k];
      }
      if (std::isnan(v)) {
        r.max = v;
        r.arg = k;
        break;
      }
    }
  }
  return r;
}

// Merges a later chunk's (max, arg) into the running one: first maximum wins, NaN is maximal.
template <typename A>
inline void merge_max(A& best, int64_t& arg, A v, int64_t varg) {
  if (std::isnan(best)) {
    return;
  }
  if (std::isnan(v) || v > best) {
    best = v;
    arg = varg;
  }
}

// sum over j in [0, n) of f(j, cnt), f giving lanes j..j+cnt (the others zero).
template <typename A, typename F>
inline A row_sum(int64_t n, const F& f) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  V s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0));
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    s0 = s0 + f(j, L);
    s1 = s1 + f(j + L, L);
    s2 = s2 + f(j + 2 * L, L);
    s3 = s3 + f(j + 3 * L, L);
  }
  for (; j + L <= n; j += L) {
    s0 = s0 + f(j, L);
  }
  if (j < n) {
    s1 = s1 + f(j, n - j);
  }
  return hsum((s0 + s1) + (s2 + s3));
}

// sum over j in [0, n) of f(j, cnt) (lanes past cnt must be zero), in double: blocks of 1024
// elements are summed in vector lanes first.
template <typename A, typename F>
double block_sum(int64_t n, const F& f) {
  constexpr int64_t kBlock = 1024;
  double total = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    total += row_sum<A>(std::min(kBlock, n - b), [&](int64_t j, int64_t cnt) { return f(b + j, cnt); });
  }
  return total;
}

// Per-row operands of a column sum: two rows of T and two per-row constants.
template <typename T>
struct RowArgs {
  const T* a;
  const T* b;
  Vectorized<acc_t<T>> s, t;
};

// sum[j] += sum over rows k in [0, rows) of f(row(k), j, cnt), for the column vectors of
// [0, cols) (cnt lanes valid); rows four at a time per buffer load/store, each row's operands
// (row(k)) computed once; post(k0, k1) runs after each block of rows [k0, k1) (while those rows
// are in L1). sum holds round_up(cols, L) entries.
template <typename A, typename Row, typename F, typename Post>
inline void col_sum(int64_t rows, int64_t cols, A* sum, const Row& row, const F& f, const Post& post) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  int64_t k = 0;
  for (; k + 4 <= rows; k += 4) {
    const auto q0 = row(k), q1 = row(k + 1), q2 = row(k + 2), q3 = row(k + 3);
    for (int64_t j = 0; j < cols; j += L) {
      const int64_t cnt = std::min(L, cols - j);
      (V::loadu(sum + j) + ((f(q0, j, cnt) + f(q1, j, cnt)) + (f(q2, j, cnt) + f(q3, j, cnt)))).store(sum + j);
    }
    post(k, k + 4);
  }
  for (; k < rows; ++k) {
    const auto q0 = row(k);
    for (int64_t j = 0; j < cols; j += L) {
      const int64_t cnt = std::min(L, cols - j);
      (V::loadu(sum + j) + f(q0, j, cnt)).store(sum + j);
    }
    post(k, k + 1);
  }
}

template <typename T>
inline Vectorized<acc_t<T>> load_n(const T* p, int64_t cnt) {
  return cnt == Vectorized<acc_t<T>>::size() ? vload(p) : vload(p, cnt);
}

template <typename A>
inline Vectorized<A> load_acc_n(const A* p, int64_t cnt) {
  return cnt == Vectorized<A>::size() ? Vectorized<A>::loadu(p) : vload(p, cnt);
}

// Lane k = the dot product of row k of w (rows of `len`, `stride` apart) with x, for `rows` <= L
// rows (lanes past them zero). A full block runs L independent chains and ends in one lane_sums
// instead of a horizontal sum per row.
template <typename A>
inline Vectorized<A> row_dots(const A* w, int64_t stride, int64_t rows, const A* x, int64_t len) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  V acc[L];
  for (auto& a : acc) {
    a = V(A(0));
  }
  if (rows == L) {
    for (int64_t j = 0; j < len; j += L) {
      const int64_t cnt = std::min(L, len - j);
      const V xv = load_acc_n(x + j, cnt);
      for (int64_t k = 0; k < L; ++k) {
        acc[k] = at::vec::fmadd(load_acc_n(w + k * stride + j, cnt), xv, acc[k]);
      }
    }
  } else {
    for (int64_t k = 0; k < rows; ++k) {
      for (int64_t j = 0; j < len; j += L) {
        const int64_t cnt = std::min(L, len - j);
        acc[k] = at::vec::fmadd(load_acc_n(w + k * stride + j, cnt), load_acc_n(x + j, cnt), acc[k]);
      }
    }
  }
  return lane_sums(acc);
}

// A register tile of accumulators set to zero.
template <typename A, int64_t kR, int64_t kV>
inline void zero_tile(Vectorized<A> (&acc)[kR][kV]) {
  for (auto& row : acc) {
    for (auto& v : row) v = Vectorized<A>(A(0));
  }
}

// One step of a register tile (BAM's convs): acc[r][v] += w[r * w_stride] * in[v], a broadcast
// element per row r (a weight, or an element of x or dR, converted to A) against the same kV
// vectors.
template <int64_t kR, int64_t kV, typename A, typename W>
inline void accumulate_row(const Vectorized<A> (&in)[kV], const W* w, int64_t w_stride, Vectorized<A> (&acc)[kR][kV]) {
  for (int64_t r = 0; r < kR; ++r) {
    const Vectorized<A> wv(static_cast<A>(w[r * w_stride]));
    for (int64_t v = 0; v < kV; ++v) acc[r][v] = at::vec::fmadd(wv, in[v], acc[r][v]);
  }
}

// y[j] = f(j, cnt) for j in [j0, j1).
template <typename T, typename F>
inline void map_range(T* y, int64_t j0, int64_t j1, const F& f) {
  constexpr int64_t L = Vectorized<acc_t<T>>::size();
  int64_t j = j0;
  for (; j + 2 * L <= j1; j += 2 * L) {
    vstore(y + j, f(j, L));
    vstore(y + j + L, f(j + L, L));
  }
  for (; j + L <= j1; j += L) {
    vstore(y + j, f(j, L));
  }
  if (j < j1) {
    vstore(y + j, f(j, j1 - j), j1 - j);
  }
}

// InputTransform (cpu_ops.h) as kernels apply it while they copy a map: per channel c, v ->
// relu(v * scale[c] + shift[c]) (scale 1 and shift 0 where only the ReLU is asked for), or v itself.
template <typename A>
class LoadTransform {
 public:
  using V = Vectorized<A>;

  LoadTransform(const InputTransform& t, int64_t channels)
      : relu_(t.relu), scale_(channels, A(1)), shift_(channels, A(0)) {
    if (t.scale.defined()) {
      const at::Tensor sc = t.scale.to(c10::CppTypeToScalarType<A>::value).contiguous();
      const at::Tensor sh = t.shift.to(c10::CppTypeToScalarType<A>::value).contiguous();
      std::copy_n(sc.const_data_ptr<A>(), channels, scale_.data());
      std::copy_n(sh.const_data_ptr<A>(), channels, shift_.data());
    }
  }

  A scalar(A v, int64_t c) const {
    return relu_ ? std::max(v * scale_[c] + shift_[c], A(0)) : v;
  }
  // v of channel c in every lane.
  V channel(const V& v, int64_t c) const {
    return relu_ ? at::vec::maximum(at::vec::fmadd(v, V(scale_[c]), V(shift_[c])), V(A(0))) : v;
  }
  // v of channels [j, j + cnt) in its lanes.
  V channels(const V& v, int64_t j, int64_t cnt) const {
    if (!relu_) {
      return v;
    }
    return at::vec::maximum(at::vec::fmadd(v, load_acc_n(scale_.data() + j, cnt), load_acc_n(shift_.data() + j, cnt)),
                            V(A(0)));
  }
  // count elements of channel c into dst.
  void copy_row(const A* src, int64_t count, int64_t c, A* dst) const {
    if (!relu_) {
      std::copy(src, src + count, dst);
      return;
    }
    map_range(dst, 0, count, [&](int64_t j, int64_t cnt) { return channel(load_acc_n(src + j, cnt), c); });
  }
  // count pixels of `channels` values each into dst.
  void copy_pixels(const A* src, int64_t count, int64_t channels, A* dst) const {
    if (!relu_) {
      std::copy(src, src + count * channels, dst);
      return;
    }
    for (int64_t p = 0; p < count; ++p) {
      map_range(dst + p * channels, 0, channels, [&](int64_t j, int64_t cnt) {
        return this->channels(load_acc_n(src + p * channels + j, cnt), j, cnt);
      });
    }
  }

 private:
  bool relu_;
  std::vector<A> scale_, shift_;
};

// Column statistics of `rows` consecutive rows of C elements (an NHWC sample's pixels), read in
// storage order: row k accumulates into buffer set k % sets, each set `stride` entries of sum[],
// mx[] and idx[] (as col_stats, unscaled), and the sets are merged into set 0 at the end (sums in
// set order; max: ties go to the earlier row). Why sets: col_stats' four rows at a time read four
// streams 4*C bytes apart, and a single set makes each row's loads of the buffers wait on the last
// row's stores. Both ran at about half the read bandwidth from memory at C = 128-512 (a standalone
// loop, 8x784x256 fp32: four rows 0.27 ms, one set 0.34, four sets 0.19, a plain sum 0.15).
// The argmax is kept with a blend, no branch: a branch on "any lane beats the running max", taken
// ~4 * L / k of the time at row k on random data, cost 15-25 % more (a standalone loop).
template <typename T, bool kArg>
inline void row_set_stats(const T* base, int64_t C, int64_t rows, int64_t sets, int64_t stride, acc_t<T>* sum,
                          acc_t<T>* mx, acc_t<T>* idx) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  for (int64_t k = 0; k < rows; ++k) {
    const T* xr = base + k * C;
    const int64_t off = (k % sets) * stride;
    A *s = sum + off, *m = mx + off, *ix = idx + off;
    const V row = bits_vec<A>(bits_t<A>(k));
    for (int64_t j = 0; j < C; j += L) {
      const V v = load_n(xr + j, std::min(L, C - j));
      (V::loadu(s + j) + v).store(s + j);
      const V best = V::loadu(m + j);
      if constexpr (!kArg) {
        vmax(best, v).store(m + j);
      } else {
        const V gt = v > best;
        V::blendv(best, v, gt).store(m + j);
        V::blendv(V::loadu(ix + j), row, gt).store(ix + j);
      }
    }
  }
  for (int64_t set = 1; set < sets; ++set) {
    const int64_t off = set * stride;
    for (int64_t j = 0; j < C; ++j) {
      sum[j] += sum[off + j];
      if constexpr (kArg) {
        const bool earlier_tie = mx[off + j] == mx[j] && from_bits<A>(idx[off + j]) < from_bits<A>(idx[j]);
        if (mx[off + j] > mx[j] || earlier_tie) {
          mx[j] = mx[off + j];
          idx[j] = idx[off + j];
        }
      } else {
        mx[j] = std::max(mx[j], mx[off + j]);
      }
    }
  }
}

// Work split into tasks of (sample n, chunk [h0, h1) of HW): nch chunks per sample.
struct Tasks {
  int64_t N, HW, nch, align;
  int64_t count() const {
    return N * nch;
  }
};

// NCHW tiles: chunks of at most max_len pixels, each task walking all C planes of its chunk (so
// per-pixel maps and column buffers of the chunk stay in L1). Chunk starts are aligned to 64
// bytes of T, so that two threads do not write one cache line (false sharing) where a plane is
// split between them.
template <typename T>
inline Tasks nchw_tiles(int64_t N, int64_t C, int64_t HW, int64_t max_len) {
  constexpr int64_t align = 64 / sizeof(T);
  return {N, HW, chunks_per_sample(N, HW, max_len, 4 * align, C * HW), align};
}

// NCHW tiles for kernels whose planes are independent (elementwise ones, reductions over HW):
// HW tiles of at most max_len pixels as above and, where the batch alone does not split evenly
// over the threads, channel ranges. Threads get whole channel ranges (never two HW tiles of the
// same planes at once: writing two halves of the same planes from two cores measured up to 2x
// slower than one core).
struct PlaneTiles {
  int64_t N, C, HW, nch, ncr, align;
  int64_t count() const {
    return N * ncr * nch;
  }
};

struct Tile {
  int64_t n;      // sample
  int64_t chunk;  // n * nch + HW tile index
  int64_t h0, h1, c0, c1;
};

template <typename T>
inline PlaneTiles plane_tiles(int64_t N, int64_t C, int64_t HW, int64_t max_len) {
  const int64_t nch = std::max<int64_t>(1, divup(HW, max_len));
  const int64_t ncr = chunks_per_sample(N, C, std::max<int64_t>(1, C), 1, C * HW);
  return {N, C, HW, nch, ncr, 64 / int64_t(sizeof(T))};
}

// Runs f(tile) for every non-empty tile, in (sample, channel range, HW tile) order; `work`
// elements per unit of C * HW (1 for one pass).
template <typename F>
inline void run_tiles(const PlaneTiles& pt, int64_t work, const F& f) {
  const int64_t per_task = work * divup(pt.HW, pt.nch) * divup(pt.C, pt.ncr);
  at::parallel_for(0, pt.count(), task_grain(per_task), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (pt.ncr * pt.nch), rest = t % (pt.ncr * pt.nch);
      const int64_t cr = rest / pt.nch, hc = rest % pt.nch;
      const auto hr = chunk_range(pt.HW, pt.nch, hc, pt.align);
      const auto cs = chunk_range(pt.C, pt.ncr, cr, 1);
      if (hr.first < hr.second && cs.first < cs.second) {
        f(Tile{n, n * pt.nch + hc, hr.first, hr.second, cs.first, cs.second});
      }
    }
  });
}

// NHWC row chunks of about kChunkElems elements (kept in L2 for a second, sparse pass).
constexpr int64_t kChunkElems = 65536;
inline Tasks nhwc_chunks(int64_t N, int64_t C, int64_t HW) {
  const int64_t rows = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, C));
  return {N, HW, chunks_per_sample(N, HW, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C)), C * HW), 1};
}

// Runs f(task, n, h0, h1) for every non-empty task, `work` elements per task.
template <typename F>
inline void run_tasks(const Tasks& tk, int64_t work, const F& f) {
  at::parallel_for(0, tk.count(), task_grain(work), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const auto range = chunk_range(tk.HW, tk.nch, t % tk.nch, tk.align);
      if (range.first < range.second) {
        f(t, t / tk.nch, range.first, range.second);
      }
    }
  });
}

constexpr int64_t kSeg = 4096;   // pixels per NCHW tile of the over-C reductions (L1 buffers)
constexpr int64_t kTile = 4096;  // pixels per NCHW tile of the per-pixel-map kernels
constexpr int64_t kCols = 256;   // C segment of the NHWC over-HW reductions (L1 buffers)

inline int64_t offset_of(Layout layout, int64_t C, int64_t HW, int64_t n, int64_t c, int64_t hw) {
  return layout == Layout::NCHW ? (n * C + c) * HW + hw : (n * HW + hw) * C + c;
}

// Per-task (N, C) partial sums: task t writes row t (or straight into out when a sample is one
// task); finish() adds the rows of each sample in order.
template <typename A>
struct ChannelPartials {
  int64_t N, C, nch;
  A* out;
  std::vector<A> rows;
  ChannelPartials(int64_t N_, int64_t C_, int64_t nch_, A* out_) : N(N_), C(C_), nch(nch_), out(out_) {
    if (nch > 1) {
      rows.assign(N * nch * C, A(0));
    }
  }
  A* row(int64_t t, int64_t n) {
    return nch > 1 ? rows.data() + t * C : out + n * C;
  }
  void finish() {
    if (nch <= 1) {
      return;
    }
    at::parallel_for(0, N * C, task_grain(nch), [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t n = q / C, c = q % C;
        A s = 0;
        for (int64_t ch = 0; ch < nch; ++ch) {
          s += rows[(n * nch + ch) * C + c];
        }
        out[q] = s;
      }
    });
  }
};

// buf[j] = src[j] / d for j in [0, n) (n <= the buffer's length).
template <typename A>
inline void divide_into(A* buf, const A* src, int64_t n, A d) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const V dv(d);
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    (V::loadu(src + j) / dv).store(buf + j);
  }
  for (; j < n; ++j) {
    buf[j] = src[j] / d;
  }
}

// A fixed-size, 64-byte aligned scratch buffer on the stack.
template <typename A, int64_t kLen>
struct alignas(64) Scratch {
  A data[kLen];
};

// kCount scratch buffers of kLen entries that a loop reads and writes in lockstep (sum, max,
// argmax at the same index), each starting 64 bytes further into a 4 KiB page than the last. At
// equal page offsets a load of one buffer right after a store to another looks like a dependence
// to the CPU's 4 KiB address check and waits: the NHWC channel pool at C = 256 (sets of 4 KiB)
// took 1.45x the time of the NCHW one, and the same as it with the offsets.
template <typename A, int64_t kLen, int kCount>
struct alignas(64) ScratchSet {
  static constexpr int64_t kPageEntries = 4096 / int64_t(sizeof(A));
  static constexpr int64_t kStride = divup(kLen, kPageEntries) * kPageEntries + 64 / int64_t(sizeof(A));
  A data[kCount * kStride];
  A* operator[](int i) {
    return data + i * kStride;
  }
};

}  // namespace attnkern::cpu
ATTNKERN_VEC_END
