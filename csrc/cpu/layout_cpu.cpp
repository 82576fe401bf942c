// The NCHW <-> NHWC copy (layout_cpu.h). Each sample of an NCHW tensor is a row-major (C, HW) matrix
// and of an NHWC one its transpose, so the copy transposes a (rows, cols) matrix per sample, moving
// elements of E = 2, 4 or 8 bytes as integers (bit-exact, whatever the dtype).
//
// Tile: 16-byte pieces of 32/E source rows, row r and row r + 16/E in the two 128-bit lanes of one
// register; in-lane unpacks (epi16, epi32, epi64) transpose both 16 x 16-byte squares at once, and
// each result register is 32 contiguous bytes of a destination row.
//
// Panels: rows whose stride is a multiple of a large power of two (NHWC rows of C = 256..2048
// channels: 1-8 KiB) share a few L1 sets, and visiting 64 bytes of each such row in turn, as tiles
// do, runs at a third of the speed of longer runs per row (stores at a 4 KiB stride: 273 us for 64
// bytes a row, 83 us for 512). So of the two sides, the one whose byte stride has the larger
// power-of-two factor goes through a 16 KiB L1 buffer in runs of 256 elements per row, and the tiles
// move data between that buffer and the other side, a cache line per row at a time. Edges the tiles
// miss (C or H * W not a multiple of the tile) are copied element by element.
//
// Parallel tasks: (sample, band of source columns), a band being whole panels.
#include "cpu/layout_cpu.h"

#include "cpu/cpu_utils.h"

namespace attnkern::cpu {
namespace {

#if ATTNKERN_X86_DISPATCH
ATTNKERN_VEC_BEGIN

// The tile's geometry for elements of type T (an unsigned integer of the element's size), and the
// panels': a cache line of each unbuffered row by a run of each buffered one (16 KiB in the buffer;
// runs of 128 elements measured slower for 4-byte ones, and 512 fill the L1 for 2-byte ones).
template <typename T>
struct TileShape {
  static constexpr int64_t rows = 32 / sizeof(T);  // source rows, two per register
  static constexpr int64_t cols = 16 / sizeof(T);  // source columns: one 16-byte piece per row
  static constexpr int64_t line = 64 / sizeof(T);
  static constexpr int64_t run = 256;
};

inline __m256i load_pair(const void* low, const void* high) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(low))),
                                 _mm_loadu_si128(static_cast<const __m128i*>(high)), 1);
}

inline void store(void* p, __m256i v) {
  _mm256_storeu_si256(static_cast<__m256i*>(p), v);
}

// dst(j, i) = src(i, j) for the tile's rows x cols at src (row stride ss elements), dst row stride ds.
template <typename T>
void transpose_tile(const T* s, int64_t ss, T* d, int64_t ds);

template <>
void transpose_tile<uint64_t>(const uint64_t* s, int64_t ss, uint64_t* d, int64_t ds) {
  const __m256i r0 = load_pair(s, s + 2 * ss), r1 = load_pair(s + ss, s + 3 * ss);
  store(d, _mm256_unpacklo_epi64(r0, r1));
  store(d + ds, _mm256_unpackhi_epi64(r0, r1));
}

template <>
void transpose_tile<uint32_t>(const uint32_t* s, int64_t ss, uint32_t* d, int64_t ds) {
  const __m256i r0 = load_pair(s, s + 4 * ss), r1 = load_pair(s + ss, s + 5 * ss);
  const __m256i r2 = load_pair(s + 2 * ss, s + 6 * ss), r3 = load_pair(s + 3 * ss, s + 7 * ss);
  // Column pairs of row pairs, then the four columns.
  const __m256i a0 = _mm256_unpacklo_epi32(r0, r1), a1 = _mm256_unpackhi_epi32(r0, r1);
  const __m256i a2 = _mm256_unpacklo_epi32(r2, r3), a3 = _mm256_unpackhi_epi32(r2, r3);
  store(d, _mm256_unpacklo_epi64(a0, a2));
  store(d + ds, _mm256_unpackhi_epi64(a0, a2));
  store(d + 2 * ds, _mm256_unpacklo_epi64(a1, a3));
  store(d + 3 * ds, _mm256_unpackhi_epi64(a1, a3));
}

template <>
void transpose_tile<uint16_t>(const uint16_t* s, int64_t ss, uint16_t* d, int64_t ds) {
  __m256i r[8], a[8], b[8];
  for (int k = 0; k < 8; ++k) {
    r[k] = load_pair(s + k * ss, s + (k + 8) * ss);
  }
  // Interleave element pairs, then 4-byte pairs, then 8-byte halves: the 8x8 transpose per lane.
  for (int k = 0; k < 8; k += 2) {
    a[k] = _mm256_unpacklo_epi16(r[k], r[k + 1]);
    a[k + 1] = _mm256_unpackhi_epi16(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    b[k] = _mm256_unpacklo_epi32(a[k], a[k + 2]);
    b[k + 1] = _mm256_unpackhi_epi32(a[k], a[k + 2]);
    b[k + 2] = _mm256_unpacklo_epi32(a[k + 1], a[k + 3]);
    b[k + 3] = _mm256_unpackhi_epi32(a[k + 1], a[k + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    store(d + 2 * k * ds, _mm256_unpacklo_epi64(b[k], b[k + 4]));
    store(d + (2 * k + 1) * ds, _mm256_unpackhi_epi64(b[k], b[k + 4]));
  }
}

// Into L2: the lines of the next panel. Neither side streams as the hardware prefetchers want (a
// line from each of hundreds of rows, or short runs), and with inputs out of cache this took one
// thread's 8x256x28x28 fp32 transposes from 1.7x (to NHWC) and 1.5x (to NCHW) a memcpy to 1.1x and 1.3x.
inline void prefetch(const void* p) {
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
}

// A run of `bytes` (a multiple of 16) bytes.
inline void copy_run(const void* from, void* to, int64_t bytes) {
  const char* s = static_cast<const char*>(from);
  char* d = static_cast<char*>(to);
  int64_t k = 0;
  for (; k + 32 <= bytes; k += 32) {
    store(d + k, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k)));
  }
  if (k < bytes) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + k), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k)));
  }
}

// dst(j, i) = src(i, j) one element at a time, i in [i0, i1), j in [j0, j1) (the edges tiles miss).
template <typename T>
void transpose_elements(const T* src, T* dst, int64_t rows, int64_t cols, int64_t i0, int64_t i1, int64_t j0,
                        int64_t j1) {
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j = j0; j < j1; ++j) {
      dst[j * rows + i] = src[i * cols + j];
    }
  }
}

// dst (cols x rows) = src (rows x cols) transposed, for source columns [j0, j1) (j0 a multiple of
// the tile's columns). buffer_dst: the runs are on dst's side, else on src's (see the top). Edges go
// element by element with the panel they border, while its lines are in L1: the columns past the
// last whole tile after each panel, the rows past it (i0 + ni to i1) with each step of the last one.
template <typename T>
void transpose_band(const T* src, T* dst, int64_t rows, int64_t cols, int64_t j0, int64_t j1, bool buffer_dst) {
  using Shape = TileShape<T>;
  constexpr int64_t kLine = Shape::line, kRun = Shape::run;
  alignas(64) T buffer[kLine * kRun];
  const int64_t tiled_rows = rows / Shape::rows * Shape::rows;
  const int64_t tiled_end = j0 + (j1 - j0) / Shape::cols * Shape::cols;
  if (buffer_dst) {
    // kRun source rows by a line of source columns -> buffer rows -> runs of dst rows.
    for (int64_t i0 = 0; i0 < tiled_rows; i0 += kRun) {
      const int64_t ni = std::min(kRun, tiled_rows - i0);
      const int64_t i1 = i0 + ni == tiled_rows ? rows : i0 + ni;  // see the end of the loop
      for (int64_t j = j0; j < tiled_end; j += kLine) {
        const int64_t nj = std::min(kLine, tiled_end - j);
        for (int64_t i = 0; i < ni; i += Shape::rows) {
          for (int64_t r = 0; r < Shape::rows; ++r) {
            prefetch(src + (i0 + i + r) * cols + j + kLine);
          }
          for (int64_t jj = 0; jj < nj; jj += Shape::cols) {
            transpose_tile(src + (i0 + i) * cols + j + jj, cols, buffer + jj * kRun + i, kRun);
          }
        }
        for (int64_t jj = 0; jj < nj; ++jj) {
          copy_run(buffer + jj * kRun, dst + (j + jj) * rows + i0, ni * sizeof(T));
        }
        transpose_elements(src, dst, rows, cols, i0 + ni, i1, j, j + nj);
      }
      transpose_elements(src, dst, rows, cols, i0, i1, tiled_end, j1);
    }
  } else {
    // Runs of a line of src rows -> buffer -> tiles into dst, a line of each dst row at a time.
    for (int64_t i0 = 0; i0 < tiled_rows; i0 += kLine) {
      const int64_t ni = std::min(kLine, tiled_rows - i0);
      const int64_t i1 = i0 + ni == tiled_rows ? rows : i0 + ni;
      for (int64_t j = j0; j < tiled_end; j += kRun) {
        const int64_t nj = std::min(kRun, tiled_end - j);
        for (int64_t i = 0; i < ni; ++i) {
          for (int64_t jj = 0; jj < nj; jj += kLine) {
            prefetch(src + (i0 + i) * cols + j + kRun + jj);
          }
          copy_run(src + (i0 + i) * cols + j, buffer + i * kRun, nj * sizeof(T));
        }
        for (int64_t jj = 0; jj < nj; jj += Shape::cols) {
          for (int64_t r = 0; r < Shape::cols; ++r) {
            prefetch(dst + (j + kRun + jj + r) * rows + i0);
          }
          for (int64_t i = 0; i < ni; i += Shape::rows) {
            transpose_tile(buffer + i * kRun + jj, kRun, dst + (j + jj) * rows + i0 + i, rows);
          }
        }
        transpose_elements(src, dst, rows, cols, i0 + ni, i1, j, j + nj);
      }
      transpose_elements(src, dst, rows, cols, i0, i1, tiled_end, j1);
    }
  }
  if (tiled_rows == 0) {
    transpose_elements(src, dst, rows, cols, 0, rows, j0, j1);
  }
}

// Each of n (rows x cols) matrices at src, transposed into dst.
template <typename T>
void transpose_samples(const T* src, T* dst, int64_t n, int64_t rows, int64_t cols) {
  const auto pow2_factor = [](int64_t v) { return v & -v; };
  const bool buffer_dst = pow2_factor(rows * int64_t(sizeof(T))) >= pow2_factor(cols * int64_t(sizeof(T)));
  // Bands of whole panels: kRun columns when the runs are along src rows, a line otherwise.
  const int64_t align = buffer_dst ? TileShape<T>::line : TileShape<T>::run;
  const int64_t work = rows * cols;
  const int64_t bands = chunks_per_sample(n, cols, cols, align, work);
  at::parallel_for(0, n * bands, task_grain(divup(work, bands)), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / bands;
      const auto [j0, j1] = chunk_range(cols, bands, task % bands, align);
      transpose_band(src + sample * work, dst + sample * work, rows, cols, j0, j1, buffer_dst);
    }
  });
}

ATTNKERN_VEC_END
#endif

}  // namespace

at::Tensor transpose_layout(const at::Tensor& t, at::MemoryFormat format) {
  const bool to_nhwc = format == at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(t.dim() == 4 && t.device().is_cpu() && (to_nhwc || format == at::MemoryFormat::Contiguous) &&
                  t.is_contiguous(to_nhwc ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast),
              "transpose_layout: wants a 4-D CPU tensor dense in the layout other than ", format);
#if ATTNKERN_X86_DISPATCH
  const int64_t element = t.element_size();
  if (use_vec_kernels() && (element == 2 || element == 4 || element == 8)) {
    at::Tensor out = at::empty(t.sizes(), t.options().memory_format(format));
    if (out.numel() == 0) {
      return out;
    }
    const int64_t n = t.size(0), channels = t.size(1), pixels = t.size(2) * t.size(3);
    const int64_t rows = to_nhwc ? channels : pixels, cols = to_nhwc ? pixels : channels;
    const void* src = t.const_data_ptr();
    void* dst = out.mutable_data_ptr();
    if (element == 2) {
      transpose_samples(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), n, rows, cols);
    } else if (element == 4) {
      transpose_samples(static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), n, rows, cols);
    } else {
      transpose_samples(static_cast<const uint64_t*>(src), static_cast<uint64_t*>(dst), n, rows, cols);
    }
    return out;
  }
#endif
  return t.clone(format);
}

}  // namespace attnkern::cpu

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("transpose_layout", [](const at::Tensor& t, bool channels_last) {
    return attnkern::cpu::transpose_layout(t, channels_last ? at::MemoryFormat::ChannelsLast
                                                            : at::MemoryFormat::Contiguous);
  });
}
