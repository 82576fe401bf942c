// BAM's spatial-branch convs on the CPU (declared in cpu_ops.h), in register tiles (AVX2: 16 vector
// registers) sized for their narrow side:
//
// bam_pool_reduce_cpu: the channel pool and the 1x1 reduce conv from one read of x: avg[n, c] = mean
// over hw of x, z = weight (Cr, C) . x + bias per pixel, in acc and in x's layout. The reduce conv
// is the largest GEMM of a BAM forward (C x C/r per pixel); its narrow side (C/r = 4-32 outputs)
// keeps ATen's GEMM at 20-65 % of this CPU's FMA rate, where these tiles reach 70-80 % on a sample
// in cache, and the channel pool's own pass over x goes (benchmarks/NOTES.md).
//   NCHW, z (Cr, HW) = W (Cr, C) . X (C, HW): kOut output channels x kPixVecs vectors of pixels;
//     per input channel kPixVecs loads of x and kOut broadcast weights. The tile's strip of x (C
//     rows of kPixVecs vectors) is read from memory by the first output block and from L1 by the
//     others; the channel sums ride on the first block's loads.
//   NHWC, z (HW, Cr) = X (HW, C) . W^T (C, Cr): kRows pixels x kVecs vectors of outputs (6 x 2, or
//     12 x 1 where Cr fits one vector: C/r = 4 wasted three quarters of a 6 x 2 tile); per input
//     channel kVecs loads of W^T and kRows broadcast elements of x. The channel sums are added row
//     by row after the tile, from L1.
//
// bam_narrow_conv_cpu: the dilated k x k convs on maps of at most kNarrowConvChannels channels, the
// same kOut x kPixVecs tile over a zero-padded NCHW copy of each sample, a tap at a time. oneDNN
// runs 4-channel maps at ~14 % of the FMA rate (8x4x56x56: 431 us, these tiles 128 us, 1 thread).
// bam_wide_conv_cpu: the same convs on maps of up to kWideConvChannels channels, as the NHWC reduce
// conv's tiles (pixels x vectors of outputs, here 6 x 2) over a zero-padded NHWC copy: on par with
// oneDNN on large 16-channel maps, without its ~40-100 us of setup a call.
// bam_logits_conv_cpu: the final 1x1 conv to one channel. bam_linear_cpu: the channel gate's two
// layers, 1x1 convs on its (N, C) pooled means. These four apply the previous layer's BN and ReLU
// (InputTransform) in the copy they make of their input anyway (the padded sample; the logits
// conv's loads; the linear layer's rows): ATen's ReLU and BN passes, a write and a read of each
// hidden map, go.
//
// Backward: bam_reduce_weight_grad_cpu (the reduce conv's weight grad: dR . X^T, NCHW sums along
// pixel rows, NHWC broadcasts of dR against vectors of x's channels; its input grad is added in
// bam_cpu.cpp's dx pass) and bam_conv_weight_grad_cpu (the narrow and wide dilated convs' weight
// grads, kOut outputs x 3 taps of a tap row along the padded pixel rows). Their input grads are the
// forward kernels run on the flipped taps.
#include "cpu/cpu_ops.h"
#include "cpu/cpu_utils.h"

ATTNKERN_VEC_BEGIN
namespace attnkern::cpu {
namespace {

using at::Tensor;

constexpr int64_t kOut = 4, kPixVecs = 3;         // NCHW tile
constexpr int64_t kWidePixels = 6, kWideVecs = 2;  // the wide conv's NHWC tile
constexpr int64_t kWeightGradBlockBytes = 128 * 1024;  // the NHWC reduce weight grad's rows of x in L2

// The vector v (of a tile's outputs: a bias) followed by zeros up to len entries, for whole tiles.
inline Tensor zero_padded(const Tensor& v, int64_t len) {
  const Tensor out = at::zeros({len}, v.options());
  out.narrow(0, 0, v.numel()).copy_(v);
  return out;
}

// v rounded to T (identity for float and double): the conv's output is in x's dtype, as in the
// other backends (ops/bam.py _conv); only the bias is added in acc.
template <typename T>
inline Vectorized<acc_t<T>> rounded_to(const Vectorized<acc_t<T>>& v) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
  } else {
    return v;
  }
}

// zs[r * stride + j * col_stride] = rounded acc[r][j] + the bias for r < rows, j < count: a tile's
// outputs (bias(r, v): the bias vector of acc[r][v]). The whole tile goes through a stack buffer
// with constant indices: stores with runtime bounds straight from acc made GCC keep acc in memory
// and store all of it in every step of the tile's channel loop (2.5x slower).
template <typename T, int64_t kR, int64_t kV, typename Bias>
inline void store_tile(const Vectorized<acc_t<T>> (&acc)[kR][kV], const Bias& bias, int64_t rows, int64_t stride,
                       int64_t count, acc_t<T>* zs, int64_t col_stride = 1) {
  constexpr int64_t L = Vectorized<acc_t<T>>::size();
  alignas(64) acc_t<T> out[kR][kV * L];
  for (int64_t r = 0; r < kR; ++r) {
    for (int64_t v = 0; v < kV; ++v) {
      (rounded_to<T>(acc[r][v]) + bias(r, v)).store(out[r] + v * L);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (col_stride == 1) {
      std::copy(out[r], out[r] + count, zs + r * stride);
    } else {
      for (int64_t j = 0; j < count; ++j) zs[r * stride + j * col_stride] = out[r][j];
    }
  }
}

// Prefetches into L2 part of a row of `bytes` bytes (bytes <= 128): every line it touches is
// reached by one of three addresses (its first, middle and last byte), and of those, share `part`
// of `parts` takes every parts-th.
class RowPrefetch {
 public:
  RowPrefetch(int64_t bytes, int64_t part, int64_t parts) {
    for (int64_t k = part; k < 3; k += parts) offsets_[count_++] = k * (bytes - 1) / 2;
  }
  void operator()(const char* row) const {
    for (int64_t i = 0; i < count_; ++i) __builtin_prefetch(row + offsets_[i], 0, 2);
  }

 private:
  int64_t offsets_[3] = {};
  int64_t count_ = 0;
};

// One NCHW tile: outputs [o0, o0 + kOut) (w: their kOut rows of C weights) over `count` <=
// kPixVecs * L pixels starting at xs (rows `stride` apart, whole vectors readable), stored from
// zs (output rows HW apart) for the first `rows` outputs. kSum: also lane_sums[c * L + lane] +=
// the tile's pixels of channel c. prefetch: this tile's share of the next pixel block's lines.
template <bool kSum, typename T>
inline void nchw_tile(const T* xs, int64_t stride, int64_t C, const acc_t<T>* w, const acc_t<T>* bias, int64_t rows,
                      int64_t count, acc_t<T>* zs, int64_t HW, acc_t<T>* lane_sums, const RowPrefetch& prefetch) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  V acc[kOut][kPixVecs];
  zero_tile(acc);
  for (int64_t c = 0; c < C; ++c) {
    V in[kPixVecs];
    for (int64_t v = 0; v < kPixVecs; ++v) in[v] = vload(xs + c * stride + v * L);
    accumulate_row(in, w + c, C, acc);
    prefetch(reinterpret_cast<const char*>(xs + c * stride + kPixVecs * L));
    if constexpr (kSum) {
      V s = V::loadu(lane_sums + c * L);
      for (int64_t v = 0; v < kPixVecs; ++v) s = s + in[v];
      s.store(lane_sums + c * L);
    }
  }
  store_tile<T>(acc, [&](int64_t r, int64_t) { return V(bias[r]); }, rows, HW, count, zs);
}

// Pixels [h0, h1) of NCHW sample xs (C planes of HW): z rows (Cr planes of HW) and the channel
// sums, added into sums (C). w, bias: Cr rounded up to kOut rows, the extra ones zero. strip: C *
// kPixVecs * L elements of T for the last, partial pixel block.
template <typename T>
void nchw_pool_reduce(const T* xs, int64_t C, int64_t HW, int64_t h0, int64_t h1, const acc_t<T>* w,
                      const acc_t<T>* bias, int64_t Cr, acc_t<T>* zs, acc_t<T>* sums, std::vector<T>& strip) {
  using A = acc_t<T>;
  constexpr int64_t L = Vectorized<A>::size(), kBlock = kPixVecs * L;
  std::vector<A> lane_sums(C * L, A(0));
  // A block reads C rows of x at once, far more streams than the hardware prefetchers follow, so
  // the tiles ask for the next block's lines into L2: spread over all of the block's output tiles
  // so that memory is busy throughout (from the first tile alone, NCHW 8x256x28x28 with x not in
  // cache took 1.9x its hot time).
  const int64_t tiles = divup(Cr, kOut);
  for (int64_t p0 = h0; p0 < h1; p0 += kBlock) {
    const int64_t count = std::min(kBlock, h1 - p0);
    const T* src = xs + p0;
    int64_t stride = HW;
    if (count < kBlock) {  // the partial block, copied so that every load is whole
      for (int64_t c = 0; c < C; ++c) {
        T* row = strip.data() + c * kBlock;
        std::fill(std::copy(xs + c * HW + p0, xs + c * HW + p0 + count, row), row + kBlock, T(0));  // zeros: summed
      }
      src = strip.data();
      stride = kBlock;
    }
    for (int64_t o0 = 0, tile = 0; o0 < Cr; o0 += kOut, ++tile) {
      const int64_t rows = std::min(kOut, Cr - o0);
      const RowPrefetch prefetch(kBlock * sizeof(T), tile, tiles);
      A* out = zs + o0 * HW + p0;
      if (o0 == 0) {
        nchw_tile<true>(src, stride, C, w, bias, rows, count, out, HW, lane_sums.data(), prefetch);
      } else {
        nchw_tile<false>(src, stride, C, w + o0 * C, bias + o0, rows, count, out, HW, nullptr, prefetch);
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    sums[c] += hsum(Vectorized<A>::loadu(lane_sums.data() + c * L));
  }
}

// Where an NHWC tile's outputs go: z[pixel * pix + channel * chan] (z NHWC: (Cr, 1); NCHW: (1, HW)).
struct ZStrides {
  int64_t pix, chan;
};

// One NHWC tile of kRows rows of x (C apart) against outputs [o0, o0 + kVecs * L) of wt (C rows of
// Cr_pad), stored from zs (the tile's first pixel) with the bias added. kPrefetch: also bring the
// next tile's rows into L2.
template <int64_t kRows, int64_t kVecs, bool kPrefetch, typename T>
inline void nhwc_tile(const T* xs, int64_t C, const acc_t<T>* wt, int64_t Cr_pad, const acc_t<T>* bias, int64_t o0,
                      int64_t Cr, acc_t<T>* zs, const ZStrides& zst) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  V acc[kRows][kVecs];
  zero_tile(acc);
  for (int64_t c = 0; c < C; ++c) {
    V wv[kVecs];
    for (int64_t v = 0; v < kVecs; ++v) wv[v] = V::loadu(wt + c * Cr_pad + o0 + v * L);
    accumulate_row(wv, xs + c, C, acc);
    if constexpr (kPrefetch) {
      // The tile reads kRows rows of x at once, each a line every 16 steps: too many slow streams
      // for the hardware prefetchers (CL 2x512x28x28 with x not in cache took 2x the hot time).
      // The next tile's kRows * C elements, walked at kRows elements a step.
      __builtin_prefetch(xs + kRows * C + c * kRows, 0, 2);
    }
  }
  const auto bias_of = [&](int64_t, int64_t v) { return V::loadu(bias + o0 + v * L); };
  store_tile<T>(acc, bias_of, kRows, zst.pix, std::min(kVecs * L, Cr - o0), zs + o0 * zst.chan, zst.chan);
}

template <int64_t kRows, int64_t kVecs, typename T>
inline void nhwc_rows(const T* xs, int64_t C, const acc_t<T>* wt, int64_t Cr_pad, const acc_t<T>* bias, int64_t Cr,
                      acc_t<T>* zs, const ZStrides& zst, acc_t<T>* sums) {
  nhwc_tile<kRows, kVecs, true>(xs, C, wt, Cr_pad, bias, 0, Cr, zs, zst);
  for (int64_t o0 = kVecs * Vectorized<acc_t<T>>::size(); o0 < Cr; o0 += kVecs * Vectorized<acc_t<T>>::size()) {
    nhwc_tile<kRows, kVecs, false>(xs, C, wt, Cr_pad, bias, o0, Cr, zs, zst);
  }
  // All the rows in one walk: a walk per row loaded and stored the sums kRows times.
  map_range(sums, 0, C, [&](int64_t j, int64_t cnt) {
    auto sum = load_acc_n(sums + j, cnt);
    for (int64_t p = 0; p < kRows; ++p) sum = sum + load_n(xs + p * C + j, cnt);
    return sum;
  });
}

// Pixel rows [h0, h1) of NHWC sample xs with kRows x kVecs tiles: the sample's z (zs, in either
// layout) and the channel sums (added into sums). wt (C, Cr_pad) and bias (Cr_pad): Cr rounded up
// to kVecs vectors, the extra entries zero.
template <int64_t kRows, int64_t kVecs, typename T>
void nhwc_pool_reduce(const T* xs, int64_t C, int64_t h0, int64_t h1, const acc_t<T>* wt, int64_t Cr_pad,
                      const acc_t<T>* bias, int64_t Cr, acc_t<T>* zs, const ZStrides& zst, acc_t<T>* sums) {
  int64_t p = h0;
  for (; p + kRows <= h1; p += kRows) {
    nhwc_rows<kRows, kVecs>(xs + p * C, C, wt, Cr_pad, bias, Cr, zs + p * zst.pix, zst, sums);
  }
  for (; p < h1; ++p) {
    nhwc_rows<1, kVecs>(xs + p * C, C, wt, Cr_pad, bias, Cr, zs + p * zst.pix, zst, sums);
  }
}

template <typename T>
void pool_reduce_kernel(const Tensor& x, Layout layout, const Tensor& weight, const Tensor& bias, const Tensor& avg,
                        const Tensor& z) {
  using A = acc_t<T>;
  constexpr int64_t L = Vectorized<A>::size();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), Cr = weight.size(0);
  const T* xp = x.const_data_ptr<T>();
  A* zp = z.data_ptr<A>();
  // The weights padded with zero outputs to whole tiles: NCHW as rows (Cr_pad, C), NHWC transposed
  // (C, Cr_pad).
  const bool nchw = layout == Layout::NCHW;
  const bool narrow = Cr <= L;  // NHWC: 12 x 1 tiles
  const int64_t out_block = nchw ? kOut : (narrow ? L : 2 * L);
  const int64_t Cr_pad = divup(Cr, out_block) * out_block;
  const Tensor w_pad = at::zeros(nchw ? std::vector<int64_t>{Cr_pad, C} : std::vector<int64_t>{C, Cr_pad},
                                 weight.options());
  (nchw ? w_pad.narrow(0, 0, Cr) : w_pad.narrow(1, 0, Cr)).copy_(nchw ? weight : weight.t());
  const Tensor b_pad = zero_padded(bias, Cr_pad);
  const A* wp = w_pad.const_data_ptr<A>();
  const A* bp = b_pad.const_data_ptr<A>();
  const ZStrides zst = z.is_contiguous() ? ZStrides{1, HW} : ZStrides{Cr, 1};  // NHWC x
  // Samples split into pixel chunks only where the batch alone leaves threads idle.
  const Tasks tk{N, HW, chunks_per_sample(N, HW, HW, 16 * kPixVecs * L, C * HW * Cr), 64 / int64_t(sizeof(A))};
  ChannelPartials<A> partials(N, C, tk.nch, avg.data_ptr<A>());
  std::fill_n(avg.data_ptr<A>(), N * C, A(0));
  at::parallel_for(0, tk.count(), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> strip(nchw ? C * kPixVecs * L : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tk.nch;
      const auto [h0, h1] = chunk_range(HW, tk.nch, t % tk.nch, tk.align);
      if (h0 >= h1) {
        continue;
      }
      const T* xs = xp + n * C * HW;
      A* zs = zp + n * Cr * HW;
      if (nchw) {
        nchw_pool_reduce(xs, C, HW, h0, h1, wp, bp, Cr, zs, partials.row(t, n), strip);
      } else if (narrow) {
        nhwc_pool_reduce<12, 1>(xs, C, h0, h1, wp, Cr_pad, bp, Cr, zs, zst, partials.row(t, n));
      } else {
        nhwc_pool_reduce<6, 2>(xs, C, h0, h1, wp, Cr_pad, bp, Cr, zs, zst, partials.row(t, n));
      }
    }
  });
  partials.finish();
  A* ap = avg.data_ptr<A>();
  for (int64_t q = 0; q < N * C; ++q) ap[q] /= static_cast<A>(HW);  // ATen's div_: ~3 us a call
}

// The reduce conv's weight grad, gw (Cr, C) += sum over hw of dr[k, hw] * x[c, hw] for one sample
// (xs, drs: dr in acc, both in the sample's layout) and channels [c0, c0 + kCh) (those below C).
// NCHW: tiles of kK rows of dr x kCh rows of x, pixel vectors summed lane-wise, then added up.
template <typename T>
void nchw_reduce_weight_grad(const T* xs, const acc_t<T>* drs, int64_t C, int64_t HW, int64_t Cr, int64_t c0,
                             acc_t<T>* gw) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  // 4 x 2: more accumulators made GCC keep one in memory, a loop-carried store and reload.
  constexpr int64_t L = V::size(), kK = 4, kCh = 2;
  const T* xr[kCh];  // rows past C repeat the last one; their sums are dropped
  for (int64_t c = 0; c < kCh; ++c) xr[c] = xs + std::min(c0 + c, C - 1) * HW;
  for (int64_t k0 = 0; k0 < Cr; k0 += kK) {
    const A* dk[kK];
    for (int64_t r = 0; r < kK; ++r) dk[r] = drs + std::min(k0 + r, Cr - 1) * HW;
    V acc[kK][kCh];
    zero_tile(acc);
    for (int64_t j = 0; j < HW; j += L) {
      const int64_t m = std::min(L, HW - j);
      V in[kCh];
      for (int64_t c = 0; c < kCh; ++c) {
        in[c] = load_n(xr[c] + j, m);
        // The rows two blocks on: a block streams only kCh short rows, too few for the hardware
        // prefetchers (8x256x28x28: 1.23 -> 0.87 ms of CPU time a step).
        __builtin_prefetch(xr[c] + j + 2 * kCh * HW, 0, 3);
      }
      for (int64_t r = 0; r < kK; ++r) {
        const V d = load_acc_n(dk[r] + j, m);
        for (int64_t c = 0; c < kCh; ++c) acc[r][c] = at::vec::fmadd(d, in[c], acc[r][c]);
      }
    }
    // Summed with constant indices first: runtime-bounded reads of acc made GCC keep it in memory.
    A sums[kK][kCh];
    for (int64_t r = 0; r < kK; ++r) {
      for (int64_t c = 0; c < kCh; ++c) sums[r][c] = hsum(acc[r][c]);
    }
    for (int64_t r = 0; r < std::min(kK, Cr - k0); ++r) {
      for (int64_t c = 0; c < std::min(kCh, C - c0); ++c) gw[(k0 + r) * C + c0 + c] += sums[r][c];
    }
  }
}

// NHWC, pixel rows [p0, p1) of a sample into gw: tiles of kK channels of dr (broadcast) x kVecs
// vectors of x's channels, over blocks of rows that stay in L2 while every column tile walks them.
// A column tile reads one line of each row: such strided streams from memory ran 4.5x the hot time
// (CL 8x64x56x56), so each tile's first pass asks for its columns of the next block.
template <typename T>
void nhwc_reduce_weight_grad(const T* xs, const acc_t<T>* drs, int64_t C, int64_t Cr, int64_t p0, int64_t p1,
                             acc_t<T>* gw) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size(), kK = 6, kVecs = 2;
  const int64_t block = std::max<int64_t>(kK, kWeightGradBlockBytes / (C * int64_t(sizeof(T))));
  for (int64_t q0 = p0; q0 < p1; q0 += block) {
    const int64_t q1 = std::min(q0 + block, p1);
    for (int64_t c0 = 0; c0 < C; c0 += kVecs * L) {
      int64_t m[kVecs];
      for (int64_t v = 0; v < kVecs; ++v) m[v] = std::clamp<int64_t>(C - c0 - v * L, 0, L);
      const int64_t c_last = std::min(c0 + kVecs * L, C) - 1;
      for (int64_t k0 = 0; k0 < Cr; k0 += kK) {
        int64_t kr[kK];  // channels past Cr repeat the last one; their sums are dropped
        for (int64_t r = 0; r < kK; ++r) kr[r] = std::min(k0 + r, Cr - 1);
        V acc[kK][kVecs];
        zero_tile(acc);
        for (int64_t p = q0; p < q1; ++p) {
          V in[kVecs];
          for (int64_t v = 0; v < kVecs; ++v) in[v] = load_n(xs + p * C + c0 + v * L, m[v]);
          if (k0 == 0) {  // the first and last column of the tile: every line it reads
            __builtin_prefetch(xs + (p + block) * C + c0, 0, 2);
            __builtin_prefetch(xs + (p + block) * C + c_last, 0, 2);
          }
          for (int64_t r = 0; r < kK; ++r) {
            const V d(drs[p * Cr + kr[r]]);
            for (int64_t v = 0; v < kVecs; ++v) acc[r][v] = at::vec::fmadd(d, in[v], acc[r][v]);
          }
        }
        alignas(64) A sums[kK][kVecs * L];  // constant indices, as in nchw_reduce_weight_grad
        for (int64_t r = 0; r < kK; ++r) {
          for (int64_t v = 0; v < kVecs; ++v) acc[r][v].store(sums[r] + v * L);
        }
        for (int64_t r = 0; r < std::min(kK, Cr - k0); ++r) {
          A* o = gw + (k0 + r) * C + c0;
          for (int64_t j = 0; j < std::min(kVecs * L, C - c0); ++j) o[j] += sums[r][j];
        }
      }
    }
  }
}

// out[j] = the sum of the `count` partials (rows of `len`) at j, added in order (deterministic),
// j split over the threads.
template <typename A>
void add_partials(const A* partials, int64_t count, int64_t len, A* out) {
  at::parallel_for(0, len, task_grain(count), [&](int64_t j0, int64_t j1) {
    std::fill(out + j0, out + j1, A(0));
    for (int64_t t = 0; t < count; ++t) {  // row by row: contiguous runs
      for (int64_t j = j0; j < j1; ++j) out[j] += partials[t * len + j];
    }
  });
}

// NCHW: threads own channel blocks (no reduction across them), each walking the samples in order.
// NHWC: tasks of (sample, chunk of pixel rows), each into its own partial gw, added up in task
// order.
template <typename T>
void reduce_weight_grad_kernel(const Tensor& x, Layout layout, const Tensor& dr, const Tensor& gw) {
  using A = acc_t<T>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), Cr = dr.size(1);
  const T* xp = x.const_data_ptr<T>();
  const A* dp = dr.const_data_ptr<A>();
  A* gp = gw.data_ptr<A>();
  if (layout == Layout::NCHW) {
    constexpr int64_t kBlock = 2;  // nchw_reduce_weight_grad's channels
    at::parallel_for(0, divup(C, kBlock), task_grain(N * HW * kBlock * Cr), [&](int64_t b0, int64_t b1) {
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t b = b0; b < b1; ++b) {
          nchw_reduce_weight_grad(xp + n * C * HW, dp + n * Cr * HW, C, HW, Cr, b * kBlock, gp);
        }
      }
    });
    return;
  }
  const Tasks tk = nhwc_chunks(N, C, HW);
  std::vector<A> partials(tk.count() * Cr * C, A(0));
  run_tasks(tk, divup(HW, tk.nch) * C * Cr, [&](int64_t t, int64_t n, int64_t p0, int64_t p1) {
    nhwc_reduce_weight_grad(xp + n * HW * C, dp + n * HW * Cr, C, Cr, p0, p1, partials.data() + t * Cr * C);
  });
  add_partials(partials.data(), tk.count(), Cr * C, gp);
}

// One tile of a dilated k x k conv over a zero-padded NCHW sample (Ci planes of rows `pw` apart,
// `plane` apart): outputs [o0, o0 + kOut) (w: their rows of Ci * k * k taps) at output row h,
// columns [w0, w0 + count), acc[r][v] = sum over (ic, i, j) of w * padded[ic][h + i d][w0 + j d +
// v L]; stored from zs (output planes HW apart, rows W apart) for the first `rows` outputs.
template <typename A>
inline void dilated_tile(const A* padded, int64_t Ci, int64_t plane, int64_t pw, int64_t k, int64_t d, const A* w,
                         const A* bias, int64_t rows, int64_t count, int64_t h, int64_t w0, int64_t HW, A* zs) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t taps = Ci * k * k;
  V acc[kOut][kPixVecs];
  zero_tile(acc);
  int64_t t = 0;
  for (int64_t ic = 0; ic < Ci; ++ic) {
    for (int64_t i = 0; i < k; ++i) {
      const A* src = padded + ic * plane + (h + i * d) * pw + w0;
      for (int64_t j = 0; j < k; ++j, ++t) {
        V in[kPixVecs];
        for (int64_t v = 0; v < kPixVecs; ++v) in[v] = V::loadu(src + j * d + v * L);
        accumulate_row(in, w + t, taps, acc);
      }
    }
  }
  store_tile<A>(acc, [&](int64_t r, int64_t) { return V(bias[r]); }, rows, HW, count, zs);
}

// A zero-padded copy of a sample's planes (H x W) for a dilated k x k conv: `pad` more rows and
// columns on every side, rows `pw` apart with `slack` more zero columns on the right (so that whole
// vectors past the last column read zeros), planes `plane` apart.
struct Padding {
  int64_t pad, pw, plane;
};

inline Padding padding_for(int64_t H, int64_t W, int64_t k, int64_t d, int64_t slack) {
  const int64_t pad = d * (k / 2), pw = W + 2 * pad + slack;
  return {pad, pw, (H + 2 * pad) * pw};
}

// Channel c's H x W plane into its padded copy, whose border and slack stay as they are (zero).
template <typename A>
void pad_plane(const A* src, int64_t H, int64_t W, const Padding& pd, const LoadTransform<A>& tf, int64_t c,
               A* padded) {
  for (int64_t h = 0; h < H; ++h) {
    tf.copy_row(src + h * W, W, c, padded + (h + pd.pad) * pd.pw + pd.pad);
  }
}

template <typename A>
void dilated_conv_kernel(const Tensor& a, const Tensor& weight, const Tensor& bias, int64_t d,
                         const LoadTransform<A>& tf, const Tensor& out) {
  constexpr int64_t L = Vectorized<A>::size(), kBlock = kPixVecs * L;
  const int64_t N = a.size(0), Ci = a.size(1), H = a.size(2), W = a.size(3), Co = weight.size(0), k = weight.size(2);
  const Padding pd = padding_for(H, W, k, d, kBlock);
  const int64_t pw = pd.pw, plane = pd.plane;
  const int64_t Co_pad = divup(Co, kOut) * kOut;
  const Tensor w_pad = at::zeros({Co_pad, Ci * k * k}, weight.options());
  w_pad.narrow(0, 0, Co).copy_(weight.reshape({Co, -1}));
  const Tensor b_pad = zero_padded(bias, Co_pad);
  const A* ap = a.const_data_ptr<A>();
  const A* wp = w_pad.const_data_ptr<A>();
  const A* bp = b_pad.const_data_ptr<A>();
  A* op = out.data_ptr<A>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<A> padded(Ci * plane, A(0));  // the border and the slack stay zero
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t ic = 0; ic < Ci; ++ic) {
        pad_plane(ap + (n * Ci + ic) * H * W, H, W, pd, tf, ic, padded.data() + ic * plane);
      }
      A* zs = op + n * Co * H * W;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t w0 = 0; w0 < W; w0 += kBlock) {
          for (int64_t o0 = 0; o0 < Co; o0 += kOut) {
            dilated_tile(padded.data(), Ci, plane, pw, k, d, wp + o0 * Ci * k * k, bp + o0, std::min(kOut, Co - o0),
                         std::min(kBlock, W - w0), h, w0, H * W, zs + o0 * H * W + h * W + w0);
          }
        }
      }
    }
  });
}

// One tile of a dilated k x k conv over a zero-padded NHWC sample (pixels of Ci values, rows `pw`
// pixels apart): kWidePixels pixels along output row h from w0 x kWideVecs vectors of outputs (wt:
// k * k * Ci rows of Co_pad outputs, from the tile's first), acc[r][v] = sum over (i, j, ic) of
// padded[h + i d][w0 + r + j d][ic] * wt[i][j][ic][v L ...]; stored from zs (pixels `stride` apart,
// outputs `col_stride` apart) for the first `rows` pixels and `count` outputs.
template <typename A>
inline void wide_tile(const A* padded, int64_t Ci, int64_t pw, int64_t k, int64_t d, const A* wt, int64_t Co_pad,
                      const A* bias, int64_t h, int64_t w0, int64_t rows, int64_t count, A* zs, int64_t stride,
                      int64_t col_stride) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  V acc[kWidePixels][kWideVecs];
  zero_tile(acc);
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const A* src = padded + ((h + i * d) * pw + w0 + j * d) * Ci;
      const A* wtap = wt + (i * k + j) * Ci * Co_pad;
      for (int64_t ic = 0; ic < Ci; ++ic) {
        V wv[kWideVecs];
        for (int64_t v = 0; v < kWideVecs; ++v) wv[v] = V::loadu(wtap + ic * Co_pad + v * L);
        accumulate_row<kWidePixels>(wv, src + ic, Ci, acc);
      }
    }
  }
  store_tile<A>(acc, [&](int64_t, int64_t v) { return V::loadu(bias + v * L); }, rows, stride, count, zs, col_stride);
}

// Sample n of a (NCHW or NHWC) into the NHWC padded copy, transformed: NCHW a is transposed here,
// in L x L blocks of (channels, pixels), which saves a full copy of the map in the other layout
// (element by element it took a fifth of the conv's time on 8x16x28x28).
template <typename A>
void pad_sample_nhwc(const A* ap, Layout layout, int64_t n, int64_t Ci, int64_t H, int64_t W, const Padding& pd,
                     const LoadTransform<A>& tf, A* padded) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  for (int64_t h = 0; h < H; ++h) {
    A* dst = padded + ((h + pd.pad) * pd.pw + pd.pad) * Ci;
    if (layout == Layout::NHWC) {
      tf.copy_pixels(ap + (n * H + h) * W * Ci, W, Ci, dst);
      continue;
    }
    const auto row = [&](int64_t c) { return ap + ((n * Ci + c) * H + h) * W; };
    const auto copy_elements = [&](int64_t c0, int64_t c1, int64_t w0) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t w = w0; w < W; ++w) dst[w * Ci + c] = tf.scalar(row(c)[w], c);
      }
    };
    int64_t c0 = 0;
    for (; c0 + L <= Ci; c0 += L) {
      int64_t w = 0;
      for (; w + L <= W; w += L) {
        V block[L];
        for (int64_t i = 0; i < L; ++i) block[i] = tf.channel(V::loadu(row(c0 + i) + w), c0 + i);
        store_transposed(block, dst + w * Ci + c0, Ci);
      }
      copy_elements(c0, c0 + L, w);
    }
    copy_elements(c0, Ci, 0);
  }
}

template <typename A>
void wide_conv_kernel(const Tensor& a, Layout layout, const Tensor& weight, const Tensor& bias, int64_t d,
                      const LoadTransform<A>& tf, const Tensor& out) {
  constexpr int64_t kR = kWidePixels, kBlock = kWideVecs * Vectorized<A>::size();
  const int64_t N = a.size(0), Ci = a.size(1), H = a.size(2), W = a.size(3), Co = weight.size(0), k = weight.size(2);
  const Padding pd = padding_for(H, W, k, d, kR);
  const int64_t Co_pad = divup(Co, kBlock) * kBlock;
  const Tensor wt = at::zeros({k, k, Ci, Co_pad}, weight.options());
  wt.narrow(3, 0, Co).copy_(weight.permute({2, 3, 1, 0}));
  const Tensor b_pad = zero_padded(bias, Co_pad);
  const A* ap = a.const_data_ptr<A>();
  const A* wp = wt.const_data_ptr<A>();
  const A* bp = b_pad.const_data_ptr<A>();
  A* op = out.data_ptr<A>();
  const int64_t sn = out.stride(0), sc = out.stride(1), sh = out.stride(2), sw = out.stride(3);
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<A> padded(pd.plane * Ci, A(0));  // the border and the slack (kR columns) stay zero
    for (int64_t n = n0; n < n1; ++n) {
      pad_sample_nhwc(ap, layout, n, Ci, H, W, pd, tf, padded.data());
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t w0 = 0; w0 < W; w0 += kR) {
          for (int64_t o0 = 0; o0 < Co; o0 += kBlock) {
            wide_tile<A>(padded.data(), Ci, pd.pw, k, d, wp + o0, Co_pad, bp + o0, h, w0, std::min(kR, W - w0),
                         std::min(kBlock, Co - o0), op + n * sn + o0 * sc + h * sh + w0 * sw, sw, sc);
          }
        }
      }
    }
  });
}

// The weight grad of a dilated 3 x 3 conv ('same', stride 1): gw[o][i][ty][tx] = sum over n, h, w
// of g[n, o, h, w] * padded a[n, i, h + ty d, w + tx d]. Tasks of (sample, input channel) write
// their own slice of the sample's partial grad, the samples' partials added in order; per task,
// for each block of kOut outputs and tap row, a kOut x 3 tile of sums along the pixel rows. The
// rows' whole vectors go first, their tails after with masked loads: a count test per load and
// the sizes re-read through the lambda's captures kept the tile at a fifth of the FMA rate.
template <typename A>
void dilated_weight_grad_kernel(const Tensor& g, const Tensor& a, int64_t d, const Tensor& gw) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size(), k = kWeightGradTaps;
  const int64_t N = a.size(0), Ci = a.size(1), H = a.size(2), W = a.size(3), Co = g.size(1), HW = H * W;
  const Padding pd = padding_for(H, W, k, d, L);
  const LoadTransform<A> identity(InputTransform{}, Ci);
  const int64_t per_sample = Co * Ci * k * k, whole = W - W % L, tail = W % L, pw = pd.pw;
  std::vector<A> partials(N * per_sample);
  const A* ap = a.const_data_ptr<A>();
  const A* gp = g.const_data_ptr<A>();
  A* pp = partials.data();
  at::parallel_for(0, N * Ci, 1, [=, &pd, &identity](int64_t t0, int64_t t1) {
    std::vector<A> padded(pd.plane, A(0));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / Ci, i = t % Ci;
      pad_plane(ap + t * HW, H, W, pd, identity, i, padded.data());
      for (int64_t o0 = 0; o0 < Co; o0 += kOut) {
        const A* grow[kOut];  // outputs past Co repeat the last one; their sums are dropped
        for (int64_t r = 0; r < kOut; ++r) grow[r] = gp + (n * Co + std::min(o0 + r, Co - 1)) * HW;
        for (int64_t ty = 0; ty < k; ++ty) {
          V acc[kOut][k];
          zero_tile(acc);
          const auto accumulate = [&](const A* arow, int64_t offset, int64_t m) {
            V in[k];
            for (int64_t tx = 0; tx < k; ++tx) in[tx] = m == L ? vload(arow + tx * d) : vload(arow + tx * d, m);
            for (int64_t r = 0; r < kOut; ++r) {
              const V gv = m == L ? vload(grow[r] + offset) : vload(grow[r] + offset, m);
              for (int64_t tx = 0; tx < k; ++tx) acc[r][tx] = at::vec::fmadd(gv, in[tx], acc[r][tx]);
            }
          };
          for (int64_t h = 0; h < H; ++h) {
            const A* arow = padded.data() + (h + ty * d) * pw;
            for (int64_t w0 = 0; w0 < whole; w0 += L) accumulate(arow + w0, h * W + w0, L);
            // Lanes past W load as zero on both sides (a non-finite a there must not count).
            if (tail > 0) accumulate(arow + whole, h * W + whole, tail);
          }
          A sums[kOut][k];  // constant indices (see nchw_reduce_weight_grad)
          for (int64_t r = 0; r < kOut; ++r) {
            for (int64_t tx = 0; tx < k; ++tx) sums[r][tx] = hsum(acc[r][tx]);
          }
          for (int64_t r = 0; r < std::min(kOut, Co - o0); ++r) {
            std::copy(sums[r], sums[r] + k, pp + n * per_sample + (((o0 + r) * Ci + i) * k + ty) * k);
          }
        }
      }
    }
  });
  add_partials(partials.data(), N, per_sample, gw.data_ptr<A>());
}

// out[n, p] = bias + sum over c of w[c] * transformed a[n, c, p], pixels split over the threads.
// NCHW: vectors of pixels, a channel's plane at a time; NHWC: a pixel's channels in vectors, then
// summed (the sums of L pixels at once in lane_sums took twice as long: its L accumulators left the
// registers).
template <typename A>
void logits_conv_kernel(const Tensor& a, Layout layout, const A* w, A bias, const LoadTransform<A>& tf,
                        const Tensor& out) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t Ci = a.size(1), HW = a.size(2) * a.size(3);
  const A* ap = a.const_data_ptr<A>();
  A* op = out.data_ptr<A>();
  parallel_rows(a.size(0), HW, [&](int64_t n, int64_t p0, int64_t p1) {
    if (layout == Layout::NCHW) {
      map_range(op + n * HW, p0, p1, [&](int64_t p, int64_t cnt) {
        V acc(bias);
        for (int64_t c = 0; c < Ci; ++c) {
          acc = at::vec::fmadd(V(w[c]), tf.channel(load_acc_n(ap + (n * Ci + c) * HW + p, cnt), c), acc);
        }
        return acc;
      });
      return;
    }
    for (int64_t p = p0; p < p1; ++p) {
      const A* pixel = ap + (n * HW + p) * Ci;
      V part(A(0));
      for (int64_t j = 0; j < Ci; j += L) {
        const int64_t cnt = std::min(L, Ci - j);
        part = at::vec::fmadd(load_acc_n(w + j, cnt), tf.channels(load_acc_n(pixel + j, cnt), j, cnt), part);
      }
      op[n * HW + p] = bias + hsum(part);
    }
  });
}

// out[n, o] = bias[o] + sum_i weight[o, i] * tf(a[n, i]) for a (N, Ci) and weight (Co, Ci): the
// transformed rows copied once, then L outputs of a row at a time (row_dots: L independent chains).
template <typename A>
void linear_kernel(const A* a, int64_t N, int64_t Ci, const A* weight, const A* bias, int64_t Co,
                   const LoadTransform<A>& tf, A* out) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  std::vector<A> rows(N * Ci);
  tf.copy_pixels(a, N, Ci, rows.data());
  const int64_t blocks = divup(Co, L);
  at::parallel_for(0, N * blocks, task_grain(L * Ci), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / blocks, o = t % blocks * L, cnt = std::min(L, Co - o);
      const V dots = row_dots(weight + o * Ci, Ci, cnt, rows.data() + n * Ci, Ci);
      vstore(out + n * Co + o, dots + load_acc_n(bias + o, cnt), cnt);
    }
  });
}

// linear_kernel's backward (no transform): grad_w[o] = sum over n of g[n, o] * a[n] and grad_a[n] =
// sum over o of g[n, o] * weight[o], each a row of vectors along the input channels. A task is one
// output row of either.
template <typename A>
void linear_backward_kernel(const A* g, const A* a, const A* weight, int64_t N, int64_t Ci, int64_t Co, A* grad_a,
                            A* grad_w) {
  using V = Vectorized<A>;
  at::parallel_for(0, Co + N, task_grain(std::max(N, Co) * Ci), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const bool weight_row = t < Co;
      const int64_t terms = weight_row ? N : Co;
      const A* rows = weight_row ? a : weight;  // term q's row of Ci, times its coefficient below
      const auto coefficient = [&](int64_t q) { return weight_row ? g[q * Co + t] : g[(t - Co) * Co + q]; };
      map_range(weight_row ? grad_w + t * Ci : grad_a + (t - Co) * Ci, 0, Ci, [&](int64_t j, int64_t cnt) {
        V sum(A(0));
        for (int64_t q = 0; q < terms; ++q) {
          sum = at::vec::fmadd(V(coefficient(q)), load_acc_n(rows + q * Ci + j, cnt), sum);
        }
        return sum;
      });
    }
  });
}

}  // namespace

Tensor bam_conv_weight_grad_cpu(const Tensor& grad, const Tensor& a_in, int64_t dilation) {
  TORCH_INTERNAL_ASSERT(use_vec_kernels() && grad.scalar_type() == a_in.scalar_type() && grad.dim() == 4 &&
                        grad.size(0) == a_in.size(0) && grad.size(2) == a_in.size(2) &&
                        grad.size(3) == a_in.size(3));
  const Tensor a = in_layout(a_in, Layout::NCHW);
  const Tensor g = in_layout(grad, Layout::NCHW);
  Tensor gw = at::empty({g.size(1), a.size(1), kWeightGradTaps, kWeightGradTaps}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "attnkern_bam_conv_weight_grad_cpu",
                             [&] { dilated_weight_grad_kernel<scalar_t>(g, a, dilation, gw); });
  return gw;
}

Tensor bam_narrow_conv_cpu(const Tensor& a_in, const Tensor& weight, const Tensor& bias, int64_t dilation,
                           const InputTransform& transform) {
  const Layout layout = layout_of(a_in);
  const Tensor a = in_layout(a_in, Layout::NCHW);
  Tensor out = at::empty({a.size(0), weight.size(0), a.size(2), a.size(3)}, a.options());
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "attnkern_bam_narrow_conv_cpu", [&] {
      dilated_conv_kernel<scalar_t>(a, weight.to(a.scalar_type()).contiguous(), bias.to(a.scalar_type()), dilation,
                                    LoadTransform<scalar_t>(transform, a.size(1)), out);
    });
  }
  return in_layout(out, layout);
}

Tensor bam_wide_conv_cpu(const Tensor& a_in, const Tensor& weight, const Tensor& bias, int64_t dilation,
                         const InputTransform& transform) {
  const Layout layout = layout_of(a_in);
  const Tensor a = in_layout(a_in, layout);
  Tensor out = at::empty({a.size(0), weight.size(0), a.size(2), a.size(3)},
                         a.options().memory_format(memory_format_of(layout)));
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "attnkern_bam_wide_conv_cpu", [&] {
      wide_conv_kernel<scalar_t>(a, layout, weight.to(a.scalar_type()), bias.to(a.scalar_type()), dilation,
                                 LoadTransform<scalar_t>(transform, a.size(1)), out);
    });
  }
  return out;
}

Tensor bam_logits_conv_cpu(const Tensor& a_in, const Tensor& weight, const Tensor& bias,
                           const InputTransform& transform) {
  TORCH_INTERNAL_ASSERT(use_vec_kernels() && a_in.dim() == 4 && weight.numel() == a_in.size(1) &&
                        bias.numel() == 1 && float_or_double(a_in));
  const Layout layout = layout_of(a_in);
  const Tensor a = in_layout(a_in, layout);
  Tensor out = at::empty({a.size(0), 1, a.size(2), a.size(3)}, a.options());
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "attnkern_bam_logits_conv_cpu", [&] {
      const Tensor w = weight.to(a.scalar_type()).contiguous();
      // The bias read in place: item() is a dispatched op (~5 us).
      logits_conv_kernel<scalar_t>(a, layout, w.const_data_ptr<scalar_t>(),
                                   *bias.to(a.scalar_type()).const_data_ptr<scalar_t>(),
                                   LoadTransform<scalar_t>(transform, a.size(1)), out);
    });
  }
  return out;
}

Tensor bam_linear_cpu(const Tensor& a_in, const Tensor& weight_in, const Tensor& bias_in,
                      const InputTransform& transform) {
  TORCH_INTERNAL_ASSERT(use_vec_kernels() && a_in.dim() == 2 && weight_in.dim() == 2 &&
                        weight_in.size(1) == a_in.size(1) && bias_in.numel() == weight_in.size(0) &&
                        float_or_double(a_in));
  const Tensor a = a_in.contiguous();
  const Tensor weight = weight_in.to(a.scalar_type()).contiguous(), bias = bias_in.to(a.scalar_type()).contiguous();
  Tensor out = at::empty({a.size(0), weight.size(0)}, a.options());
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "attnkern_bam_linear_cpu", [&] {
      linear_kernel<scalar_t>(a.const_data_ptr<scalar_t>(), a.size(0), a.size(1), weight.const_data_ptr<scalar_t>(),
                              bias.const_data_ptr<scalar_t>(), weight.size(0),
                              LoadTransform<scalar_t>(transform, a.size(1)), out.mutable_data_ptr<scalar_t>());
    });
  }
  return out;
}

std::pair<Tensor, Tensor> bam_linear_backward_cpu(const Tensor& grad_in, const Tensor& a_in, const Tensor& weight_in) {
  TORCH_INTERNAL_ASSERT(use_vec_kernels() && grad_in.dim() == 2 && a_in.dim() == 2 && weight_in.dim() == 2 &&
                        grad_in.size(0) == a_in.size(0) && weight_in.size(0) == grad_in.size(1) &&
                        weight_in.size(1) == a_in.size(1) && grad_in.scalar_type() == a_in.scalar_type() &&
                        float_or_double(a_in));
  const Tensor g = grad_in.contiguous(), a = a_in.contiguous(), weight = weight_in.to(a.scalar_type()).contiguous();
  Tensor grad_a = at::empty_like(a), grad_w = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "attnkern_bam_linear_backward_cpu", [&] {
    linear_backward_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                                     weight.const_data_ptr<scalar_t>(), a.size(0), a.size(1), weight.size(0),
                                     grad_a.mutable_data_ptr<scalar_t>(), grad_w.mutable_data_ptr<scalar_t>());
  });
  return {grad_a, grad_w};
}

Tensor bam_reduce_weight_grad_cpu(const Tensor& x_in, const Tensor& grad_output) {
  TORCH_INTERNAL_ASSERT(use_vec_kernels() && grad_output.scalar_type() == acc_type_of(x_in.scalar_type()));
  const Layout layout = layout_of(x_in);
  const Tensor x = in_layout(x_in, layout);
  const Tensor dr = in_layout(grad_output, layout);
  Tensor gw = at::zeros({dr.size(1), x.size(1)}, dr.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() > 0 && gw.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "attnkern_bam_reduce_weight_grad_cpu",
                                    [&] { reduce_weight_grad_kernel<scalar_t>(x, layout, dr, gw); });
  }
  return gw;
}

std::pair<Tensor, Tensor> bam_pool_reduce_cpu(const Tensor& x_in, const Tensor& weight_in, const Tensor& bias_in,
                                              at::MemoryFormat z_format) {
  constexpr const char* op = "attnkern::bam_pool_reduce";
  check_full(op, "x", x_in);
  const auto acc_type = acc_type_of(x_in.scalar_type());
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  // The weights in x's dtype (as the conv of the other backends takes them), held in acc.
  const Tensor weight = weight_in.to(x_in.scalar_type()).to(acc_type).reshape({-1, C}).contiguous();
  const int64_t Cr = weight.size(0);
  const Tensor bias = check_small(op, "bias", bias_in.to(acc_type), acc_type, {Cr}, x_in);
  const Layout layout = layout_of(x_in);
  const Tensor x = in_layout(x_in, layout);
  if (!use_vec_kernels() || H * W == 0) {
    const Tensor z = at::conv2d(x, weight.to(x.scalar_type()).view({Cr, C, 1, 1})).to(acc_type) + bias.view({1, Cr, 1, 1});
    return {acc(x).mean({2, 3}), z.contiguous(z_format)};
  }
  const auto opts = x.options().dtype(acc_type);
  Tensor avg = at::empty({N, C}, opts);
  // NCHW x takes NCHW z (its tiles store planes).
  Tensor z = at::empty({N, Cr, H, W}, opts.memory_format(layout == Layout::NCHW ? at::MemoryFormat::Contiguous : z_format));
  if (N * C * Cr > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "attnkern_bam_pool_reduce_cpu",
                                    [&] { pool_reduce_kernel<scalar_t>(x, layout, weight, bias, avg, z); });
  } else {
    avg.zero_();
    z.copy_(bias.view({1, Cr, 1, 1}).expand_as(z));
  }
  return {avg, z};
}

}  // namespace attnkern::cpu
ATTNKERN_VEC_END
