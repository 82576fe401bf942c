// The direct k x k "same" correlation of CBAM's pooled maps, a sample at a time: the batched op
// (spatial_conv_cpu.cpp) runs it over the samples, the per-sample CBAM forward
// (channel_gate_per_sample_cpu in cbam_cpu.cpp) on each sample it owns.
#pragma once

#include "cpu/cpu_utils.h"

ATTNKERN_VEC_BEGIN
namespace attnkern::cpu {

// Columns of slack past each padded row: the widest register block (four AVX2 float vectors).
constexpr int64_t kConvBlock = 32;

// Geometry of the zero-padded input maps: a border of k/2 and kConvBlock columns of slack, so that
// no load needs a bounds check.
struct PaddedMaps {
  int64_t height, width, k, padded_height, padded_width;

  PaddedMaps(int64_t height, int64_t width, int64_t k)
      : height(height), width(width), k(k), padded_height(height + k - 1), padded_width(width + k - 1 + kConvBlock) {}
  int64_t plane() const { return padded_height * padded_width; }
  // Offset of input pixel (h, w) in channel c's padded plane.
  int64_t at(int64_t c, int64_t h, int64_t w) const {
    return (c * padded_height + h + k / 2) * padded_width + w + k / 2;
  }
};

// Output rows [h, h + kRows) of output channel oc, columns [w0, w0 + kVecs vectors), in registers
// across all the taps. Each padded input row is loaded once for the kRows output rows it feeds.
template <int64_t kRows, int64_t kVecs, typename T>
void correlate_block(const T* padded, int64_t in_channels, const T* taps, T* out, int64_t oc, int64_t h, int64_t w0,
                     const PaddedMaps& g) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const int64_t k = g.k;
  Vec acc[kRows][kVecs];
  for (auto& row : acc) {
    for (auto& v : row) v = Vec(T(0));
  }
  for (int64_t ic = 0; ic < in_channels; ++ic) {
    const T* channel_taps = taps + (oc * in_channels + ic) * k * k;
    const T* in_rows = padded + (ic * g.padded_height + h) * g.padded_width + w0;
    // Input row r meets tap row r of output row h and (kRows = 2) tap row r - 1 of output row h + 1.
    auto accumulate = [&](int64_t r, auto first, auto second) {
      const T* in_row = in_rows + r * g.padded_width;
      for (int64_t j = 0; j < k; ++j) {
        Vec in[kVecs];
        for (int64_t v = 0; v < kVecs; ++v) in[v] = Vec::loadu(in_row + j + v * L);
        if constexpr (decltype(first)::value) {
          const Vec tap(channel_taps[r * k + j]);
          for (int64_t v = 0; v < kVecs; ++v) acc[0][v] = at::vec::fmadd(tap, in[v], acc[0][v]);
        }
        if constexpr (decltype(second)::value) {
          const Vec tap(channel_taps[(r - 1) * k + j]);
          for (int64_t v = 0; v < kVecs; ++v) acc[kRows - 1][v] = at::vec::fmadd(tap, in[v], acc[kRows - 1][v]);
        }
      }
    };
    using yes = std::true_type;
    using no = std::false_type;
    if constexpr (kRows == 1) {
      for (int64_t r = 0; r < k; ++r) accumulate(r, yes(), no());
    } else {
      accumulate(0, yes(), no());
      for (int64_t r = 1; r < k; ++r) accumulate(r, yes(), yes());
      accumulate(k, no(), yes());
    }
  }
  for (int64_t q = 0; q < kRows; ++q) {
    T block[kVecs * L];
    for (int64_t v = 0; v < kVecs; ++v) acc[q][v].store(block + v * L);
    T* out_row = out + (oc * g.height + h + q) * g.width;
    std::copy(block, block + std::min(kVecs * L, g.width - w0), out_row + w0);
  }
}

// Rows [h, h + kRows) of out[oc] = sum_{ic, i, j} taps[oc, ic, i, j] * padded[ic, h + i, w + j] for
// one sample: padded holds its in_channels padded maps, out its out_channels (height, width) maps.
// Blocks of four vectors, the last one as narrow as the row allows.
template <int64_t kRows, typename T>
void correlate_rows(const T* padded, int64_t in_channels, const T* taps, T* out, int64_t out_channels, int64_t h,
                    const PaddedMaps& g) {
  constexpr int64_t L = at::vec::Vectorized<T>::size();
  for (int64_t oc = 0; oc < out_channels; ++oc) {
    for (int64_t w0 = 0; w0 < g.width; w0 += 4 * L) {
      switch (std::min<int64_t>(4, divup(g.width - w0, L))) {
        case 1: correlate_block<kRows, 1>(padded, in_channels, taps, out, oc, h, w0, g); break;
        case 2: correlate_block<kRows, 2>(padded, in_channels, taps, out, oc, h, w0, g); break;
        case 3: correlate_block<kRows, 3>(padded, in_channels, taps, out, oc, h, w0, g); break;
        default: correlate_block<kRows, 4>(padded, in_channels, taps, out, oc, h, w0, g);
      }
    }
  }
}

// Rows 2p and 2p + 1 (the last pair of an odd height has one row) of one sample.
template <typename T>
void correlate_row_pair(const T* padded, int64_t in_channels, const T* taps, T* out, int64_t out_channels, int64_t p,
                        const PaddedMaps& g) {
  if (2 * p + 2 <= g.height) {
    correlate_rows<2>(padded, in_channels, taps, out, out_channels, 2 * p, g);
  } else {
    correlate_rows<1>(padded, in_channels, taps, out, out_channels, 2 * p, g);
  }
}

// All the rows of one sample.
template <typename T>
void correlate_sample(const T* padded, int64_t in_channels, const T* taps, T* out, int64_t out_channels,
                      const PaddedMaps& g) {
  for (int64_t p = 0; p < divup(g.height, 2); ++p) {
    correlate_row_pair(padded, in_channels, taps, out, out_channels, p, g);
  }
}

}  // namespace attnkern::cpu
ATTNKERN_VEC_END
