// CPU kernels of the CBAM ops (schemas and semantics: csrc/ops.cpp; reference:
// attnkern/backends/torch_kernels.py). NCHW (contiguous) and NHWC (channels_last) are handled
// natively; other strides are copied to contiguous first. Vector ISA, dispatch, work splitting
// and the shared loops: cpu_utils.h. HW = H * W below.
//
// Loop orders:
//   over HW (channel_pool, channel_gate_grad):
//     NCHW: one contiguous plane per (n, c) (channel_gate_grad with spatial terms: HW tiles,
//           all C planes each, so the tile's per-pixel maps stay in L1);
//     NHWC: C is innermost, so lanes run across C and the rows (pixels) of a chunk are
//           accumulated into column buffers (see nhwc_channel_stats); chunk results are merged
//           in order.
//   over C (spatial_pool, spatial_gate_grad):
//     NCHW: a task owns an HW tile of a sample and walks its C planes four at a time into
//           tile-length buffers, vectorised over HW;
//     NHWC: one contiguous row of C per pixel.
//   per sample (channel_gate_per_sample_cpu): a thread takes whole samples and runs the
//     channel pool, the MLP and what follows on each in turn: the scaling (SE, ChannelGate), or
//     CBAM's spatial pool and conv, and unless BN needs the batch's statistics its BN, sigmoid
//     and the scaling too.
//   elementwise: apply_gates NCHW walks whole planes in storage order (HW tiles cut a plane
//     into separate streams: up to 1.8x slower at HW = 3136), cbam_input_grad NCHW HW tiles
//     through the C planes (channel ranges too when the batch is small; its argmax buckets are
//     per tile); NHWC row chunks.
// Max / argmax (first maximal element; NaN is maximal): row_stats and col_stats in cpu_utils.h.
// The argmax terms of the backward kernels touch one element per pixel (spatial argmax) or per
// channel (channel argmax); they are applied per tile or row right after its dense part, while
// it is in cache, instead of comparing indices at every element.
#include "cpu/cpu_ops.h"
#include "cpu/cpu_utils.h"
#include "cpu/spatial_conv.h"

ATTNKERN_VEC_BEGIN
namespace attnkern::cpu {
namespace {

// ---- channel_pool ---------------------------------------------------------------------------

// Column statistics of the pixel rows [r0, r1) of one NHWC sample (xs: its first row): emit(c,
// stats) for every channel, the argmax row relative to r0. For C in [128, 512], whole rows in
// storage order into several buffer sets (row_set_stats); otherwise four rows at a time, kCols
// channels at a time (col_stats: at C <= 64 four rows are one contiguous stretch).
template <typename T, bool kArg, typename Emit>
void nhwc_channel_stats(const T* xs, int64_t C, int64_t r0, int64_t r1, const Emit& emit) {
  using A = acc_t<T>;
  constexpr int64_t L = Vectorized<A>::size();
  constexpr int64_t kSetEntries = 1024;  // the sets' total (8 KiB of sums and maxima in fp32)
  ScratchSet<A, kSetEntries, 3> bufs;
  A *sum = bufs[0], *best = bufs[1], *idx = bufs[2];
  const T* rows = xs + r0 * C;
  const int64_t padded_c = divup(C, L) * L;
  const bool in_sets = C >= 128 && 2 * padded_c <= kSetEntries;
  const int64_t sets = in_sets ? std::min<int64_t>(4, kSetEntries / padded_c) : 1;
  const int64_t block = in_sets ? C : std::min(kCols, C);
  for (int64_t c0 = 0; c0 < C; c0 += block) {
    const int64_t cols = std::min(block, C - c0);
    const int64_t padded = divup(cols, L) * L;
    std::fill(sum, sum + sets * padded, A(0));
    std::fill(best, best + sets * padded, -std::numeric_limits<A>::infinity());
    std::fill(idx, idx + sets * padded, c10::bit_cast<A>(bits_t<A>(0)));
    if (in_sets) {
      row_set_stats<T, kArg>(rows, C, r1 - r0, sets, padded, sum, best, idx);
    } else {
      col_stats<T, false, kArg>(rows + c0, C, r1 - r0, cols, nullptr, sum, best, idx);
    }
    for (int64_t j = 0; j < cols; ++j) {
      emit(c0 + j, col_stats_result<T, false, kArg>(rows + c0, C, r1 - r0, nullptr, sum, best, idx, j));
    }
  }
}

// kArg false: no argmax (arg is not written).
template <typename T, bool kArg>
void channel_pool_kernel(const at::Tensor& x, Layout layout, const at::Tensor& avg, const at::Tensor& mx,
                         const at::Tensor& arg) {
  using A = acc_t<T>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const T* xp = x.const_data_ptr<T>();
  A* avgp = avg.data_ptr<A>();
  A* mxp = mx.data_ptr<A>();
  int64_t* argp = kArg ? arg.data_ptr<int64_t>() : nullptr;
  if (layout == Layout::NCHW) {
    at::parallel_for(0, N * C, task_grain(HW), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const auto r = row_stats<T, false, kArg>(xp + p * HW, nullptr, HW);
        avgp[p] = r.sum / A(HW);
        mxp[p] = r.max;
        if constexpr (kArg) {
          argp[p] = r.arg;
        }
      }
    });
    return;
  }
  // NHWC: per sample an (HW rows, C columns) matrix reduced over its rows, cut into row chunks
  // only to give every thread work (long chunks: the argmax bookkeeping fades as a column's
  // running max settles); chunk results are merged in order (first maximum wins across chunks).
  const Tasks tk{N, HW, chunks_per_sample(N, HW, int64_t(1) << 30, std::max<int64_t>(4, 4096 / C), HW * C), 1};
  const int64_t nch = tk.nch;
  std::vector<A> psum, pmax;
  std::vector<int64_t> parg;
  if (nch > 1) {
    psum.resize(N * nch * C);
    pmax.assign(N * nch * C, -std::numeric_limits<A>::infinity());
    parg.assign(N * nch * C, 0);
  }
  run_tasks(tk, divup(HW, nch) * C, [&](int64_t t, int64_t n, int64_t r0, int64_t r1) {
    nhwc_channel_stats<T, kArg>(xp + n * HW * C, C, r0, r1, [&](int64_t c, const RowStats<A>& r) {
      if (nch == 1) {
        avgp[n * C + c] = r.sum / A(HW);
        mxp[n * C + c] = r.max;
        if constexpr (kArg) {
          argp[n * C + c] = r.arg;
        }
      } else {
        psum[t * C + c] = r.sum;
        pmax[t * C + c] = r.max;
        parg[t * C + c] = r.arg + r0;
      }
    });
  });
  if (nch > 1) {
    at::parallel_for(0, N * C, task_grain(nch), [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t n = q / C, c = q % C;
        A s = 0, m = pmax[n * nch * C + c];
        int64_t a = parg[n * nch * C + c];
        for (int64_t ch = 0; ch < nch; ++ch) {
          const int64_t i = (n * nch + ch) * C + c;
          s += psum[i];
          if (ch > 0) {
            merge_max(m, a, pmax[i], parg[i]);
          }
        }
        avgp[q] = s / A(HW);
        mxp[q] = m;
        if constexpr (kArg) {
          argp[q] = a;
        }
      }
    });
  }
}

// ---- spatial_pool ---------------------------------------------------------------------------

// The spatial pool of one sample, x * gate over C for its pixels [h0, h1): avg_map[hw], max_map[hw]
// and (kArg) arg_map[hw], the channel of the first maximum. NCHW: xs is the sample's first plane,
// the tile's C planes are walked into tile-length buffers; NHWC: xs is its first pixel row. The
// means are divided in one vector pass at the end: a scalar division per pixel was ~40 % of the
// NHWC pool's time at C = 64 (perf).
template <typename T, bool kArg>
void spatial_pool_sample(const T* xs, Layout layout, int64_t C, int64_t HW, int64_t h0, int64_t h1,
                         const acc_t<T>* gate, acc_t<T>* avg_map, acc_t<T>* max_map, int64_t* arg_map) {
  using A = acc_t<T>;
  constexpr int64_t L = Vectorized<A>::size();
  if (layout == Layout::NHWC) {
    int64_t r = h0;
    if (!kArg && C % L == 0) {
      for (; r + L <= h1; r += L) {
        row_block_stats(xs + r * C, C, gate, avg_map + r, max_map + r);
      }
    }
    for (; r < h1; ++r) {
      const auto st = row_stats<T, true, kArg>(xs + r * C, gate, C);
      avg_map[r] = st.sum;
      max_map[r] = st.max;
      if constexpr (kArg) {
        arg_map[r] = st.arg;
      }
    }
    divide_into(avg_map + h0, avg_map + h0, h1 - h0, A(C));
    return;
  }
  ScratchSet<A, kSeg, 3> bufs;
  A *sum = bufs[0], *best = bufs[1], *idx = bufs[2];
  for (int64_t t0 = h0; t0 < h1; t0 += kSeg) {
    const int64_t cols = std::min(kSeg, h1 - t0), padded = divup(cols, L) * L;
    std::fill(sum, sum + padded, A(0));
    std::fill(best, best + padded, -std::numeric_limits<A>::infinity());
    std::fill(idx, idx + padded, c10::bit_cast<A>(bits_t<A>(0)));
    col_stats<T, true, kArg>(xs + t0, HW, C, cols, gate, sum, best, idx);
    divide_into(avg_map + t0, sum, cols, A(C));
    for (int64_t j = 0; j < cols; ++j) {
      const auto r = col_stats_result<T, true, kArg>(xs + t0, HW, C, gate, sum, best, idx, j);
      max_map[t0 + j] = r.max;
      if constexpr (kArg) {
        arg_map[t0 + j] = r.arg;
      }
    }
  }
}

// kArg false: no argmax (arg is not written).
template <typename T, bool kArg>
void spatial_pool_kernel(const at::Tensor& x, Layout layout, const at::Tensor& gate, const at::Tensor& pooled,
                         const at::Tensor& arg) {
  using A = acc_t<T>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const T* xp = x.const_data_ptr<T>();
  const A* gp = gate.const_data_ptr<A>();
  A* pp = pooled.data_ptr<A>();
  int64_t* argp = kArg ? arg.data_ptr<int64_t>() : nullptr;
  auto pool = [&](int64_t n, int64_t h0, int64_t h1) {
    spatial_pool_sample<T, kArg>(xp + n * C * HW, layout, C, HW, h0, h1, gp + n * C, pp + n * 2 * HW,
                                 pp + (n * 2 + 1) * HW, kArg ? argp + n * HW : nullptr);
  };
  if (layout == Layout::NHWC) {  // rows of C split evenly, across sample boundaries
    at::parallel_for(0, N * HW, task_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end;) {
        const int64_t n = r / HW, h1 = std::min(HW, r % HW + (end - r));
        pool(n, r % HW, h1);
        r += h1 - r % HW;
      }
    });
    return;
  }
  // NCHW: a task owns an HW tile of one sample and walks the C planes.
  const Tasks tk = nchw_tiles<T>(N, C, HW, kSeg);
  run_tasks(tk, divup(HW, tk.nch) * C, [&](int64_t, int64_t n, int64_t h0, int64_t h1) { pool(n, h0, h1); });
}

// ---- apply_gates ----------------------------------------------------------------------------

// y = x * g * s[j] over [j0, j1) of one NCHW plane: g its channel's gate, s its sample's spatial
// gate (null: none).
template <typename T>
inline void gate_plane(const T* x, T* y, int64_t j0, int64_t j1, acc_t<T> g, const acc_t<T>* s) {
  const Vectorized<acc_t<T>> gv(g);
  if (s == nullptr) {
    map_range(y, j0, j1, [&](int64_t j, int64_t cnt) { return load_n(x + j, cnt) * gv; });
  } else {
    map_range(y, j0, j1, [&](int64_t j, int64_t cnt) { return load_n(x + j, cnt) * (gv * load_acc_n(s + j, cnt)); });
  }
}

// y = x * g[c] * s over one whole NCHW sample (s: its spatial gate map with L - 1 readable entries
// past HW, or null: none). Planes of at least L pixels go in order and each one's last vector is
// stored whole, running into the next plane (never further), whose own stores then overwrite it:
// only the sample's last plane ends in a partial store (at::vec's copy through a stack buffer).
template <typename T>
void gate_sample_planes(const T* xs, T* ys, int64_t C, int64_t HW, const acc_t<T>* g, const acc_t<T>* s) {
  constexpr int64_t L = Vectorized<acc_t<T>>::size();
  const int64_t whole = HW >= L ? divup(HW, L) * L : HW;
  for (int64_t c = 0; c < C; ++c) {
    gate_plane(xs + c * HW, ys + c * HW, 0, c + 1 < C ? whole : HW, g[c], s);
  }
}

// y = x * g[c] * s over one NHWC pixel row of C channels: g the sample's channel gate, s the
// pixel's spatial gate (null: none).
template <typename T>
inline void gate_row(const T* x, T* y, int64_t C, const acc_t<T>* g, const acc_t<T>* s) {
  if (s == nullptr) {
    map_range(y, 0, C, [&](int64_t j, int64_t cnt) { return load_n(x + j, cnt) * load_acc_n(g + j, cnt); });
  } else {
    const Vectorized<acc_t<T>> sv(*s);
    map_range(y, 0, C, [&](int64_t j, int64_t cnt) { return load_n(x + j, cnt) * (load_acc_n(g + j, cnt) * sv); });
  }
}

template <typename T>
void apply_gates_kernel(const at::Tensor& x, Layout layout, const at::Tensor& cgate, const at::Tensor* sgate,
                        const at::Tensor& y) {
  using A = acc_t<T>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const A* cg = cgate.const_data_ptr<A>();
  const A* sg = sgate ? sgate->const_data_ptr<A>() : nullptr;
  if (layout == Layout::NCHW) {
    // Whole planes in storage order, the sample's spatial gate re-read from cache for each: HW
    // tiles through the C planes measured up to 1.8x slower at HW = 3136 (two tiles per plane).
    parallel_rows(N * C, HW, [&](int64_t p, int64_t j0, int64_t j1) {
      gate_plane(xp + p * HW, yp + p * HW, j0, j1, cg[p], sg ? sg + (p / C) * HW : nullptr);
    });
  } else {
    const Tasks tk = nhwc_chunks(N, C, HW);
    run_tasks(tk, 2 * divup(HW, tk.nch) * C, [&](int64_t, int64_t n, int64_t r0, int64_t r1) {
      for (int64_t r = n * HW + r0; r < n * HW + r1; ++r) {
        gate_row(xp + r * C, yp + r * C, C, cg + n * C, sg ? sg + r : nullptr);
      }
    });
  }
}

// ---- channel gate, and what follows it, one sample at a time -------------------------------

// The shared MLP's parameters (acc, contiguous): fc1 (Ch, C), fc2 (C, Ch); biases may be null.
template <typename A>
struct MlpWeights {
  const A *fc1_weight, *fc1_bias, *fc2_weight, *fc2_bias;
  int64_t hidden;
};

// Hidden unit h of the MLP for one pool (C,): relu(fc1_weight[h] . pool + fc1_bias[h]), a ReLU
// that keeps NaN, as torch.relu.
template <typename A>
inline A mlp_hidden_unit(const MlpWeights<A>& mlp, const A* pool, int64_t C, int64_t h) {
  const A* w = mlp.fc1_weight + h * C;
  const A dot = row_sum<A>(C, [&](int64_t j, int64_t cnt) {
    return load_acc_n(w + j, cnt) * load_acc_n(pool + j, cnt);
  });
  const A z = dot + (mlp.fc1_bias ? mlp.fc1_bias[h] : A(0));
  return std::isnan(z) ? z : std::max(A(0), z);
}

// CBAM's spatial gate: taps (1, 2, k, k) on the padded pooled maps and the conv bias; with
// `whole`, BN as (conv_out - mean) * scale + shift (mean 0, scale 1, shift 0 without BN).
template <typename A>
struct SpatialGateArgs {
  const A* taps;
  PaddedMaps geometry;
  A bias, mean, scale, shift;
  bool whole;
};

// One sample's conv_out = conv(pooled) + bias, (H, W), from its pooled maps (2, H, W). padded: the
// thread's zero-padded copy of the maps (its border stays zero from sample to sample).
template <typename A>
void spatial_conv_sample(const A* pooled, A* padded, const SpatialGateArgs<A>& sg, A* conv_out) {
  const PaddedMaps& g = sg.geometry;
  for (int64_t c = 0; c < 2; ++c) {
    for (int64_t h = 0; h < g.height; ++h) {
      const A* row = pooled + (c * g.height + h) * g.width;
      std::copy(row, row + g.width, padded + g.at(c, h, 0));
    }
  }
  correlate_sample(padded, 2, sg.taps, conv_out, 1, g);
  const Vectorized<A> bias(sg.bias);
  map_range(conv_out, 0, g.height * g.width,
            [&](int64_t j, int64_t cnt) { return load_acc_n(conv_out + j, cnt) + bias; });
}

// gate = sigmoid(BN(conv_out)) over one sample's (H, W) map.
template <typename A>
void spatial_gate_sample(const A* conv_out, const SpatialGateArgs<A>& sg, A* gate) {
  using V = Vectorized<A>;
  const V mean(sg.mean), scale(sg.scale), shift(sg.shift), one(A(1));
  map_range(gate, 0, sg.geometry.height * sg.geometry.width, [&](int64_t j, int64_t cnt) {
    const V logits = (load_acc_n(conv_out + j, cnt) - mean) * scale + shift;
    return one / (one + (V(A(0)) - logits).exp());
  });
}

// The channel gate with whole samples per thread: pool a sample, run the MLP on its pools, then
// make the sample's next passes while it is still in the thread's L2, so that those reads of x come
// from cache (see PerSampleGate in cpu_ops.h for the variants; `out` holds the outputs,
// allocated). pools: (P, N, C), P = use_avg + use_max; gate (N, C); acc. kArg: also the max pools'
// argmaxes (first maximum, NaN maximal), into channel_argmax (N, C) when use_max and
// spatial_argmax (N, HW) with the spatial pool.
template <typename T, bool kArg>
void channel_gate_per_sample_kernel(const at::Tensor& x, Layout layout, const MlpWeights<acc_t<T>>& mlp,
                                    const SpatialGateArgs<acc_t<T>>* sgate, bool use_avg, bool use_max,
                                    const PerSampleGate& out) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), Ch = mlp.hidden;
  const T* xp = x.const_data_ptr<T>();
  T* yp = out.y.defined() ? out.y.data_ptr<T>() : nullptr;
  A* pooled_p = out.pooled.defined() ? out.pooled.data_ptr<A>() : nullptr;
  A* conv_p = sgate ? out.conv_out.data_ptr<A>() : nullptr;
  A* sgate_p = sgate && sgate->whole ? out.spatial_gate.data_ptr<A>() : nullptr;
  A* pools_p = out.pools.data_ptr<A>();
  A* gate_p = out.channel_gate.data_ptr<A>();
  int64_t* carg_p = kArg && use_max ? out.channel_argmax.data_ptr<int64_t>() : nullptr;
  int64_t* sarg_p = kArg && pooled_p ? out.spatial_argmax.data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<A> avg(C), mx(C), hidden(Ch), padded(sgate ? 2 * sgate->geometry.plane() : 0, A(0));
    // NCHW: the spatial gate with L readable entries past HW, for gate_sample_planes.
    std::vector<A> gate_map(sgate_p != nullptr && layout == Layout::NCHW ? HW + L : 0, A(0));
    std::vector<int64_t> arg(kArg ? C : 0);
    auto keep = [&](int64_t c, const RowStats<A>& r) {
      avg[c] = r.sum / A(HW);
      mx[c] = r.max;
      if constexpr (kArg) {
        arg[c] = r.arg;
      }
    };
    for (int64_t n = n0; n < n1; ++n) {
      const T* xs = xp + n * C * HW;
      if (layout == Layout::NCHW) {
        for (int64_t c = 0; c < C; ++c) {
          keep(c, row_stats<T, false, kArg>(xs + c * HW, nullptr, HW));
        }
      } else {
        nhwc_channel_stats<T, kArg>(xs, C, 0, HW, keep);
      }
      if (carg_p != nullptr) {
        std::copy(arg.begin(), arg.end(), carg_p + n * C);
      }
      // gate = sigmoid(fc2(sum over the pools of relu(fc1(pool)))): fc2 is linear, so the hidden
      // activations are summed first and fc2's bias counted once per pool.
      std::fill(hidden.begin(), hidden.end(), A(0));
      int64_t p = 0;
      for (const std::vector<A>* pool : {use_avg ? &avg : nullptr, use_max ? &mx : nullptr}) {
        if (pool == nullptr) {
          continue;
        }
        std::copy(pool->begin(), pool->end(), pools_p + (p++ * N + n) * C);
        for (int64_t h = 0; h < Ch; ++h) {
          hidden[h] += mlp_hidden_unit(mlp, pool->data(), C, h);
        }
      }
      // L channels at a time: their fc2 rows are one contiguous stretch of weights.
      A* g = gate_p + n * C;
      for (int64_t c0 = 0; c0 < C; c0 += L) {
        const int64_t rows = std::min(L, C - c0);
        V z = row_dots(mlp.fc2_weight + c0 * Ch, Ch, rows, hidden.data(), Ch);
        if (mlp.fc2_bias != nullptr) {
          z = z + load_acc_n(mlp.fc2_bias + c0, rows) * V(A(p));
        }
        vstore(g + c0, V(A(1)) / (V(A(1)) + (V(A(0)) - z).exp()), rows);
      }
      const A* s = nullptr;  // the sample's spatial gate
      if (sgate != nullptr) {  // CBAM's spatial pool of x * gate, and what follows
        A* pooled_n = pooled_p + n * 2 * HW;
        spatial_pool_sample<T, kArg>(xs, layout, C, HW, 0, HW, g, pooled_n, pooled_n + HW,
                                     kArg ? sarg_p + n * HW : nullptr);
        spatial_conv_sample(pooled_n, padded.data(), *sgate, conv_p + n * HW);
        if (!sgate->whole) {
          continue;
        }
        spatial_gate_sample(conv_p + n * HW, *sgate, sgate_p + n * HW);
        s = sgate_p + n * HW;
      }
      T* ys = yp + n * C * HW;
      if (layout == Layout::NCHW) {
        if (s != nullptr) {
          std::copy(s, s + HW, gate_map.begin());
        }
        gate_sample_planes(xs, ys, C, HW, g, s != nullptr ? gate_map.data() : nullptr);
      } else {
        for (int64_t r = 0; r < HW; ++r) {
          gate_row(xs + r * C, ys + r * C, C, g, s ? s + r : nullptr);
        }
      }
    }
  });
}

// ---- the spatial gate's BN, over the (N, 1, H, W) conv output ---------------------------------

// (mean, biased variance) of the m values of z, two passes; (0, 0) for none.
template <typename A>
std::pair<double, double> mean_var(const A* z, int64_t m) {
  using V = Vectorized<A>;
  if (m == 0) {
    return {0.0, 0.0};
  }
  const double mean = block_sum<A>(m, [&](int64_t j, int64_t cnt) { return load_acc_n(z + j, cnt); }) / m;
  const V mv(static_cast<A>(mean));
  const double var = block_sum<A>(m, [&](int64_t j, int64_t cnt) {
                       const V d = load_acc_n(z + j, cnt) - mv;
                       return cnt == V::size() ? d * d : V::set(V(A(0)), d * d, cnt);
                     }) / m;
  return {mean, var};
}

// The spatial gate's backward from gate = sigmoid(logits) to the conv output z, m values:
// g = dgate * gate * (1 - gate); with BN, logits = w * (z - mean) * invstd + b and xhat = (z - mean)
// * invstd: grad_z = w * invstd * (g - [training] (sum g + xhat * sum g * xhat) / m); without it
// grad_z = g. Returns (sum g * xhat, sum g, sum grad_z): BN's weight and bias grads, the conv
// bias's.
template <typename A>
std::tuple<double, double, double> spatial_logit_backward_kernel(const A* dgate, const A* gate, const A* z, int64_t m,
                                                                 const SpatialBnScalars* bn, A* grad_z) {
  using V = Vectorized<A>;
  const V one(A(1));
  auto g_at = [&](int64_t j, int64_t cnt) {
    const V s = load_acc_n(gate + j, cnt);
    return load_acc_n(dgate + j, cnt) * s * (one - s);
  };
  if (bn == nullptr) {
    map_range(grad_z, 0, m, g_at);
    return {0.0, 0.0, block_sum<A>(m, [&](int64_t j, int64_t cnt) { return load_acc_n(grad_z + j, cnt); })};
  }
  const V mean(static_cast<A>(bn->mean)), invstd(static_cast<A>(bn->invstd));
  auto xhat_at = [&](int64_t j, int64_t cnt) { return (load_acc_n(z + j, cnt) - mean) * invstd; };
  const double sum_g = block_sum<A>(m, g_at);
  const double sum_g_xhat = block_sum<A>(m, [&](int64_t j, int64_t cnt) { return g_at(j, cnt) * xhat_at(j, cnt); });
  const V scale(static_cast<A>(bn->weight * bn->invstd));
  if (bn->training && m > 0) {
    const V g_mean(static_cast<A>(sum_g / m)), gx_mean(static_cast<A>(sum_g_xhat / m));
    map_range(grad_z, 0, m, [&](int64_t j, int64_t cnt) {
      return scale * (g_at(j, cnt) - g_mean - xhat_at(j, cnt) * gx_mean);
    });
  } else {
    map_range(grad_z, 0, m, [&](int64_t j, int64_t cnt) { return scale * g_at(j, cnt); });
  }
  const double sum_grad_z = block_sum<A>(m, [&](int64_t j, int64_t cnt) { return load_acc_n(grad_z + j, cnt); });
  return {sum_g_xhat, sum_g, sum_grad_z};
}

// ---- the shared MLP's backward ----------------------------------------------------------------

// y += a * x over n elements.
template <typename A>
inline void axpy(A* y, A a, const A* x, int64_t n) {
  const Vectorized<A> av(a);
  map_range(y, 0, n,
            [&](int64_t j, int64_t cnt) { return at::vec::fmadd(av, load_acc_n(x + j, cnt), load_acc_n(y + j, cnt)); });
}

// The backward of gate = sigmoid(sum_p fc2(relu(fc1(pools[p])))) for pools (P, N, C), as
// mlp_backward in cbam_fused_cpu.cpp, a sample at a time with vector dot products and axpys:
// grad_pools (P, N, C) and the parameter grads (zeroed by the caller; biases may be null).
template <typename A>
void mlp_backward_kernel(const A* pools, int64_t P, int64_t N, int64_t C, const A* gate, const A* grad_gate,
                         const MlpWeights<A>& mlp, A* grad_pools, A* d_fc1_w, A* d_fc1_b, A* d_fc2_w, A* d_fc2_b) {
  const int64_t Ch = mlp.hidden;
  std::vector<A> grad_logits(C), hidden(P * Ch), hidden_sum(Ch), grad_base(Ch);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const A g = gate[n * C + c];
      grad_logits[c] = grad_gate[n * C + c] * g * (A(1) - g);
    }
    std::fill(hidden_sum.begin(), hidden_sum.end(), A(0));
    for (int64_t p = 0; p < P; ++p) {
      const A* pool = pools + (p * N + n) * C;
      for (int64_t h = 0; h < Ch; ++h) {
        hidden[p * Ch + h] = mlp_hidden_unit(mlp, pool, C, h);
        hidden_sum[h] += hidden[p * Ch + h];
      }
    }
    std::fill(grad_base.begin(), grad_base.end(), A(0));  // grad_logits @ fc2_weight
    for (int64_t c = 0; c < C; ++c) {
      axpy(grad_base.data(), grad_logits[c], mlp.fc2_weight + c * Ch, Ch);
      axpy(d_fc2_w + c * Ch, grad_logits[c], hidden_sum.data(), Ch);
      if (d_fc2_b != nullptr) {
        d_fc2_b[c] += A(P) * grad_logits[c];
      }
    }
    for (int64_t p = 0; p < P; ++p) {
      const A* pool = pools + (p * N + n) * C;
      A* grad_pool = grad_pools + (p * N + n) * C;
      std::fill(grad_pool, grad_pool + C, A(0));
      for (int64_t h = 0; h < Ch; ++h) {
        const A gh = hidden[p * Ch + h] > A(0) ? grad_base[h] : A(0);  // ReLU's gradient
        axpy(grad_pool, gh, mlp.fc1_weight + h * C, C);
        axpy(d_fc1_w + h * C, gh, pool, C);
        if (d_fc1_b != nullptr) {
          d_fc1_b[h] += gh;
        }
      }
    }
  }
}

// ---- spatial_gate_grad ----------------------------------------------------------------------

// out[n, hw] = sum over c of grad * x * cgate[n, c]: the spatial gate's grad through the scaling.
// kScaling: in the same pass also scaling_out[n, c] = sum over hw of grad * x * sg[n, hw], the
// channel gate's grad through the scaling (sg the spatial gate), so that the channel gate's own
// pass needs x alone (channel_gate_grad_kernel without grad): the backward reads grad once less.
template <typename T, bool kScaling>
void spatial_gate_grad_kernel(const at::Tensor& grad, const at::Tensor& x, Layout layout, const at::Tensor& cgate,
                              const acc_t<T>* sg, const at::Tensor& out, acc_t<T>* scaling_out) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const T* xp = x.const_data_ptr<T>();
  const T* gp = grad.const_data_ptr<T>();
  const A* cg = cgate.const_data_ptr<A>();
  A* op = out.data_ptr<A>();
  if (layout == Layout::NHWC) {  // row chunks; kScaling: the chunk's column sums in a buffer
    const Tasks tk = nhwc_chunks(N, C, HW);
    ChannelPartials<A> parts(N, C, kScaling ? tk.nch : 1, scaling_out);
    run_tasks(tk, 2 * divup(HW, tk.nch) * C, [&](int64_t t, int64_t n, int64_t r0, int64_t r1) {
      std::vector<A> col(kScaling ? divup(C, L) * L : 0, A(0));
      const A* g = cg + n * C;
      for (int64_t r = n * HW + r0; r < n * HW + r1; ++r) {
        const T* xr = xp + r * C;
        const T* gr = gp + r * C;
        const V s(kScaling ? sg[r] : A(0));
        op[r] = row_sum<A>(C, [&](int64_t j, int64_t cnt) {
          const V v = load_n(gr + j, cnt) * load_n(xr + j, cnt);
          if constexpr (kScaling) {
            at::vec::fmadd(v, s, V::loadu(col.data() + j)).store(col.data() + j);
          }
          return v * load_acc_n(g + j, cnt);
        });
      }
      if constexpr (kScaling) {
        std::copy(col.begin(), col.begin() + C, parts.row(t, n));
      }
    });
    parts.finish();
    return;
  }
  // NCHW: a task owns an HW tile of one sample and walks its C planes K = 4 at a time into a
  // tile-length buffer; kScaling: each plane's sum over the tile in registers.
  const Tasks tk = nchw_tiles<T>(N, C, HW, kSeg);
  ChannelPartials<A> parts(N, C, kScaling ? tk.nch : 1, scaling_out);
  run_tasks(tk, 2 * divup(HW, tk.nch) * C, [&](int64_t t, int64_t n, int64_t h0, int64_t h1) {
    const int64_t len = h1 - h0;
    Scratch<A, kSeg> sum;
    std::fill(sum.data, sum.data + divup(len, L) * L, A(0));
    const T* xb = xp + n * C * HW + h0;
    const T* gb = gp + n * C * HW + h0;
    const A* s = kScaling ? sg + n * HW + h0 : nullptr;
    A* planes_out = kScaling ? parts.row(t, n) : nullptr;
    auto walk = [&](auto planes, int64_t c) {
      constexpr int64_t K = decltype(planes)::value;
      V g[K], acc[K], v[K];
      for (int64_t k = 0; k < K; ++k) {
        g[k] = V(cg[n * C + c + k]);
        acc[k] = V(A(0));
      }
      const NextRows<T> next_grad(gb + c * HW, HW, len, C - c), next_x(xb + c * HW, HW, len, C - c);
      for (int64_t j = 0; j < len; j += L) {
        const int64_t cnt = std::min(L, len - j);
        next_grad.at(j);
        next_x.at(j);
        for (int64_t k = 0; k < K; ++k) {
          v[k] = load_n(gb + (c + k) * HW + j, cnt) * load_n(xb + (c + k) * HW + j, cnt);
        }
        V terms = v[0] * g[0];
        if constexpr (K == 4) {
          terms = (terms + v[1] * g[1]) + (v[2] * g[2] + v[3] * g[3]);
        }
        (V::loadu(sum.data + j) + terms).store(sum.data + j);
        if constexpr (kScaling) {
          const V sv = load_acc_n(s + j, cnt);
          for (int64_t k = 0; k < K; ++k) {
            acc[k] = at::vec::fmadd(v[k], sv, acc[k]);
          }
        }
      }
      if constexpr (kScaling) {
        for (int64_t k = 0; k < K; ++k) {
          planes_out[c + k] = hsum(acc[k]);
        }
      }
    };
    int64_t c = 0;
    for (; c + 4 <= C; c += 4) {
      walk(std::integral_constant<int64_t, 4>{}, c);
    }
    for (; c < C; ++c) {
      walk(std::integral_constant<int64_t, 1>{}, c);
    }
    std::copy(sum.data, sum.data + len, op + n * HW + h0);
  });
  parts.finish();
}

// ---- channel_gate_grad ----------------------------------------------------------------------

// The spatial terms of g1 (csrc/ops.cpp) as raw pointers: sg = spatial_gate (N, HW),
// gp = grad_pooled (N, 2, HW), sarg = spatial_argmax (N, HW); gp and sarg null without
// grad_pooled.
template <typename A>
struct SpatialTerms {
  const A* sg = nullptr;
  const A* gp = nullptr;
  const int64_t* sarg = nullptr;
};

// The pixels [0, len) of a tile grouped by the channel their spatial argmax points at (a
// counting sort), so that a kernel walking the tile's C planes applies the one-hot term of
// plane c while that plane's tile is in L1: pixels of c are pix[start[c] .. start[c + 1]).
struct TileBuckets {
  std::vector<int32_t> start, cursor, pix;
  void build(const int64_t* target, int64_t len, int64_t C) {
    start.assign(C + 1, 0);
    pix.resize(len);
    for (int64_t i = 0; i < len; ++i) {
      if (target[i] >= 0 && target[i] < C) {
        ++start[target[i] + 1];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      start[c + 1] += start[c];
    }
    cursor.assign(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < len; ++i) {
      if (target[i] >= 0 && target[i] < C) {
        pix[cursor[target[i]]++] = static_cast<int32_t>(i);
      }
    }
  }
};

// out[n, c] = sum over hw of g1 * x (g1: csrc/ops.cpp). kGrad false: g1 without its grad term,
// that is the spatial pool's terms alone (which need grad_pooled; grad is not read): the channel
// gate's grad through the spatial pool, when spatial_gate_grad_kernel made the scaling's part.
template <typename T, bool kSpatial, bool kGrad = true>
void channel_gate_grad_kernel(const at::Tensor& grad, const at::Tensor& x, Layout layout,
                              const SpatialTerms<acc_t<T>>& st, const at::Tensor& out) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const T* xp = x.const_data_ptr<T>();
  const T* gp = kGrad ? grad.const_data_ptr<T>() : nullptr;
  const bool sparse = kSpatial && st.sarg != nullptr;
  static_assert(kGrad || kSpatial, "without grad, g1 is the spatial pool's terms");
  TORCH_INTERNAL_ASSERT(kGrad || sparse);
  if (layout == Layout::NCHW) {
    if constexpr (!kSpatial) {
      A* op = out.data_ptr<A>();
      at::parallel_for(0, N * C, task_grain(2 * HW), [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const T* xr = xp + p * HW;
          const T* gr = gp + p * HW;
          op[p] = row_sum<A>(HW, [&](int64_t j, int64_t cnt) { return load_n(gr + j, cnt) * load_n(xr + j, cnt); });
        }
      });
      return;
    }
    // HW tiles, all C planes each, so that the tile's per-pixel maps stay in L1.
    const PlaneTiles pt = plane_tiles<T>(N, C, HW, kTile);
    ChannelPartials<A> parts(N, C, pt.nch, out.data_ptr<A>());
    run_tiles(pt, 2, [&](const Tile& tl) {
      const int64_t n = tl.n, h0 = tl.h0, h1 = tl.h1;
      A* dst = parts.row(tl.chunk, n);
      const int64_t len = h1 - h0;
      const A* s = kGrad ? st.sg + n * HW + h0 : nullptr;
      Scratch<A, kTile> gp0s;  // grad_pooled[:, 0] / C
      TileBuckets buckets;
      const A* g1 = nullptr;
      if (sparse) {
        divide_into(gp0s.data, st.gp + n * 2 * HW + h0, len, A(C));
        buckets.build(st.sarg + n * HW + h0, len, C);
        g1 = st.gp + n * 2 * HW + HW + h0;
      }
      for (int64_t c = tl.c0; c < tl.c1; ++c) {
        const T* xr = xp + (n * C + c) * HW + h0;
        const T* gr = kGrad ? gp + (n * C + c) * HW + h0 : nullptr;
        if (sparse) {
          A v = row_sum<A>(len, [&](int64_t j, int64_t cnt) {
            const V pooled_terms = load_acc_n(gp0s.data + j, cnt);
            if constexpr (!kGrad) {
              return pooled_terms * load_n(xr + j, cnt);
            }
            return at::vec::fmadd(load_n(gr + j, cnt), load_acc_n(s + j, cnt), pooled_terms) * load_n(xr + j, cnt);
          });
          for (int32_t i = buckets.start[c]; i < buckets.start[c + 1]; ++i) {
            const int32_t j = buckets.pix[i];
            v += g1[j] * static_cast<A>(xr[j]);
          }
          dst[c] = v;
        } else {
          dst[c] = row_sum<A>(len, [&](int64_t j, int64_t cnt) {
            return load_n(gr + j, cnt) * load_acc_n(s + j, cnt) * load_n(xr + j, cnt);
          });
        }
      }
    });
    parts.finish();
    return;
  }
  // NHWC: per sample an (HW rows, C columns) block summed over its rows, in row chunks; the
  // one-hot term (one element per row) is added after each block of rows, still in L1.
  const Tasks tk = nhwc_chunks(N, C, HW);
  ChannelPartials<A> parts(N, C, tk.nch, out.data_ptr<A>());
  run_tasks(tk, 2 * divup(HW, tk.nch) * C, [&](int64_t t, int64_t n, int64_t r0, int64_t r1) {
    A* dst = parts.row(t, n);
    Scratch<A, kCols> sum;
    for (int64_t c0 = 0; c0 < C; c0 += kCols) {
      const int64_t cols = std::min(kCols, C - c0);
      std::fill(sum.data, sum.data + divup(cols, L) * L, A(0));
      const T* xb = xp + (n * HW + r0) * C + c0;
      const T* gb = kGrad ? gp + (n * HW + r0) * C + c0 : nullptr;
      if constexpr (kSpatial) {
        const A* s = kGrad ? st.sg + n * HW + r0 : nullptr;
        const A* gp0 = sparse ? st.gp + n * 2 * HW + r0 : nullptr;
        const A* g1 = sparse ? st.gp + n * 2 * HW + HW + r0 : nullptr;
        const int64_t* sarg = sparse ? st.sarg + n * HW + r0 : nullptr;
        col_sum<A>(
            r1 - r0, cols, sum.data,
            [&](int64_t k) {
              return RowArgs<T>{kGrad ? gb + k * C : nullptr, xb + k * C, V(kGrad ? s[k] : A(0)),
                                V(gp0 ? gp0[k] / A(C) : A(0))};
            },
            [&](const RowArgs<T>& q, int64_t j, int64_t cnt) {
              if constexpr (!kGrad) {
                return q.t * load_n(q.b + j, cnt);
              }
              return at::vec::fmadd(load_n(q.a + j, cnt), q.s, q.t) * load_n(q.b + j, cnt);
            },
            [&](int64_t k0, int64_t k1) {
              if (!sparse) {
                return;
              }
              for (int64_t k = k0; k < k1; ++k) {
                const int64_t c = sarg[k] - c0;
                if (c >= 0 && c < cols) {
                  sum.data[c] += g1[k] * static_cast<A>(xb[k * C + c]);
                }
              }
            });
      } else {
        col_sum<A>(
            r1 - r0, cols, sum.data, [&](int64_t k) { return RowArgs<T>{gb + k * C, xb + k * C, V(A(1)), V(A(0))}; },
            [&](const RowArgs<T>& q, int64_t j, int64_t cnt) { return load_n(q.a + j, cnt) * load_n(q.b + j, cnt); },
            [](int64_t, int64_t) {});
      }
      std::copy(sum.data, sum.data + cols, dst + c0);
    }
  });
  parts.finish();
}

// ---- cbam_input_grad ------------------------------------------------------------------------

// ga = grad_avg (N, C) or null; gm = grad_max (N, C), carg = channel_argmax (N, C) or null.
template <typename A>
struct ChannelTerms {
  const A* ga = nullptr;
  const A* gm = nullptr;
  const int64_t* carg = nullptr;
};

template <typename T, bool kSpatial>
void cbam_input_grad_kernel(const at::Tensor& grad, Layout layout, const at::Tensor& cgate,
                            const SpatialTerms<acc_t<T>>& st, const ChannelTerms<acc_t<T>>& ct, const at::Tensor& dx) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const int64_t N = grad.size(0), C = grad.size(1), HW = grad.size(2) * grad.size(3);
  const T* gp = grad.const_data_ptr<T>();
  T* dp = dx.data_ptr<T>();
  const A* cg = cgate.const_data_ptr<A>();
  const bool with_gp = kSpatial && st.gp != nullptr;
  // Dense part, dx = (grad * sg + gp0 / C) * cg + ga / HW (the terms given); then the one-hot
  // terms, each right after its element was written: (c = spatial_argmax[n, hw], hw) gets
  // grad_pooled[:, 1] * cg, (c, hw = channel_argmax[n, c]) gets grad_max. For float / double
  // the stored dense value is exact in acc_t, so a term is added to it (each exactly once);
  // reduced dtypes recompute the whole element (idempotent) so that it is rounded once.
  auto full = [&](int64_t n, int64_t c, int64_t hw) {
    const int64_t off = offset_of(layout, C, HW, n, c, hw);
    A g1 = static_cast<A>(gp[off]);
    if constexpr (kSpatial) {
      g1 = g1 * st.sg[n * HW + hw];
      if (with_gp) {
        g1 = g1 + st.gp[n * 2 * HW + hw] / A(C);
        if (st.sarg[n * HW + hw] == c) {
          g1 = g1 + st.gp[n * 2 * HW + HW + hw];
        }
      }
    }
    A v = g1 * cg[n * C + c];
    if (ct.ga != nullptr) {
      v = v + ct.ga[n * C + c] / A(HW);
    }
    if (ct.carg != nullptr && ct.carg[n * C + c] == hw) {
      v = v + ct.gm[n * C + c];
    }
    dp[off] = static_cast<T>(v);
  };
  constexpr bool kAddInPlace = std::is_same_v<T, A>;
  auto fix_spatial = [&](int64_t n, int64_t c, int64_t hw) {
    if constexpr (kAddInPlace) {
      T& d = dp[offset_of(layout, C, HW, n, c, hw)];
      d = d + st.gp[n * 2 * HW + HW + hw] * cg[n * C + c];
    } else {
      full(n, c, hw);
    }
  };
  auto fix_channel = [&](int64_t n, int64_t c, int64_t hw) {
    if constexpr (kAddInPlace) {
      T& d = dp[offset_of(layout, C, HW, n, c, hw)];
      d = d + ct.gm[n * C + c];
    } else {
      full(n, c, hw);
    }
  };
  if (layout == Layout::NCHW) {
    run_tiles(plane_tiles<T>(N, C, HW, kTile), 2, [&](const Tile& tl) {
      const int64_t n = tl.n, h0 = tl.h0, h1 = tl.h1;
      const int64_t len = h1 - h0;
      Scratch<A, kTile> gp0s;  // grad_pooled[:, 0] / C
      TileBuckets buckets;
      if (with_gp) {
        divide_into(gp0s.data, st.gp + n * 2 * HW + h0, len, A(C));
        buckets.build(st.sarg + n * HW + h0, len, C);
      }
      for (int64_t c = tl.c0; c < tl.c1; ++c) {
        const int64_t p = n * C + c;
        const T* gr = gp + p * HW + h0;
        T* dr = dp + p * HW + h0;
        const V m(cg[p]);
        const V add(ct.ga ? ct.ga[p] / A(HW) : A(0));
        if constexpr (kSpatial) {
          const A* s = st.sg + n * HW + h0;
          if (with_gp) {
            map_range(dr, 0, len, [&](int64_t j, int64_t cnt) {
              return at::vec::fmadd(
                  at::vec::fmadd(load_n(gr + j, cnt), load_acc_n(s + j, cnt), load_acc_n(gp0s.data + j, cnt)), m, add);
            });
            for (int32_t i = buckets.start[c]; i < buckets.start[c + 1]; ++i) {
              fix_spatial(n, c, h0 + buckets.pix[i]);
            }
          } else {
            map_range(dr, 0, len, [&](int64_t j, int64_t cnt) {
              return at::vec::fmadd(load_n(gr + j, cnt) * load_acc_n(s + j, cnt), m, add);
            });
          }
        } else {
          map_range(dr, 0, len, [&](int64_t j, int64_t cnt) { return at::vec::fmadd(load_n(gr + j, cnt), m, add); });
        }
        if (ct.carg != nullptr) {
          const int64_t hw = ct.carg[p];
          if (hw >= h0 && hw < h1) {
            fix_channel(n, c, hw);
          }
        }
      }
    });
  } else {
    const Tasks tk = nhwc_chunks(N, C, HW);
    run_tasks(tk, 2 * divup(HW, tk.nch) * C, [&](int64_t, int64_t n, int64_t r0, int64_t r1) {
      const A* m = cg + n * C;
      std::vector<A> add;  // grad_avg / HW
      if (ct.ga != nullptr) {
        add.resize(C);
        divide_into(add.data(), ct.ga + n * C, C, A(HW));
      }
      for (int64_t hw = r0; hw < r1; ++hw) {
        const int64_t r = n * HW + hw;
        const T* gr = gp + r * C;
        T* dr = dp + r * C;
        V s(A(1)), b(A(0));
        if constexpr (kSpatial) {
          s = V(st.sg[r]);
          if (with_gp) {
            b = V(st.gp[n * 2 * HW + hw] / A(C));
          }
        }
        if (!add.empty()) {
          map_range(dr, 0, C, [&](int64_t j, int64_t cnt) {
            return at::vec::fmadd(at::vec::fmadd(load_n(gr + j, cnt), s, b), load_acc_n(m + j, cnt),
                                  load_acc_n(add.data() + j, cnt));
          });
        } else {
          map_range(dr, 0, C, [&](int64_t j, int64_t cnt) {
            return at::vec::fmadd(load_n(gr + j, cnt), s, b) * load_acc_n(m + j, cnt);
          });
        }
        if (with_gp) {
          const int64_t c = st.sarg[r];
          if (c >= 0 && c < C) {
            fix_spatial(n, c, hw);
          }
        }
      }
      if (ct.carg != nullptr) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t hw = ct.carg[n * C + c];
          if (hw >= r0 && hw < r1) {
            fix_channel(n, c, hw);
          }
        }
      }
    });
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

// A full-size fallback result in x's dtype and memory format.
Tensor like_x(const Tensor& result, const Tensor& x) {
  return at::empty_like(x).copy_(result);
}

namespace fallback {

std::tuple<Tensor, Tensor, Tensor> channel_pool(const Tensor& x) {
  auto flat = acc(x).flatten(2);
  auto [mx, arg] = flat.max(2);
  return {flat.mean(2), mx, arg};
}

std::tuple<Tensor, Tensor> spatial_pool(const Tensor& x, const Tensor& gate) {
  auto x1 = acc(x) * gate.unsqueeze(-1).unsqueeze(-1);
  auto [mx, arg] = x1.max(1);
  return {at::stack({x1.mean(1), mx}, 1), arg};
}

// g1's terms from the spatial pool (grad_pooled, spatial_argmax given).
Tensor pooled_terms(const Tensor& x, const Tensor& gp, const Tensor& sarg) {
  auto onehot = at::arange(x.size(1), sarg.options()).view({1, -1, 1, 1}) == sarg.unsqueeze(1);
  return gp.narrow(1, 0, 1) / x.size(1) + gp.narrow(1, 1, 1) * onehot;
}

Tensor g1_of(const Tensor& grad, const Tensor& x, const optional<Tensor>& sg, const optional<Tensor>& gp,
             const optional<Tensor>& sarg) {
  auto g1 = acc(grad);
  if (!sg.has_value()) {
    return g1;
  }
  g1 = g1 * sg->unsqueeze(1);
  return gp.has_value() ? g1 + pooled_terms(x, *gp, *sarg) : g1;
}

}  // namespace fallback

// Shared argument handling of the full-size inputs.
struct Prepared {
  Tensor x;  // in `layout`
  Layout layout;
  at::ScalarType acc;
};

Prepared prepare(const char* op, const Tensor& x) {
  check_full(op, "x", x);
  const Layout layout = layout_of(x);
  return {in_layout(x, layout), layout, acc_type_of(x.scalar_type())};
}

// Checks the optional spatial terms; returns (spatial_gate, grad_pooled, spatial_argmax), each
// contiguous, the last two absent or both present. Without spatial_gate the others are ignored
// (as in the reference).
std::tuple<optional<Tensor>, optional<Tensor>, optional<Tensor>> check_spatial_terms(
    const char* op, const Tensor& x, at::ScalarType acc_type, const optional<Tensor>& sg, const optional<Tensor>& gp,
    const optional<Tensor>& sarg) {
  if (!sg.has_value()) {
    return {};
  }
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  Tensor s = check_spatial_map(op, "spatial_gate", *sg, acc_type, x);
  if (!gp.has_value()) {
    return {s, std::nullopt, std::nullopt};
  }
  TORCH_CHECK(sarg.has_value(), op, ": grad_pooled needs spatial_argmax");
  Tensor g = check_small(op, "grad_pooled", *gp, acc_type, {N, 2, H, W}, x);
  Tensor a = check_spatial_map(op, "spatial_argmax", *sarg, at::kLong, x);
  return {s, g, a};
}

template <typename A>
SpatialTerms<A> spatial_terms_of(const optional<Tensor>& sg, const optional<Tensor>& gp, const optional<Tensor>& sarg) {
  SpatialTerms<A> st;
  if (sg.has_value()) {
    st.sg = sg->const_data_ptr<A>();
  }
  if (gp.has_value()) {
    st.gp = gp->const_data_ptr<A>();
    st.sarg = sarg->const_data_ptr<int64_t>();
  }
  return st;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> channel_pool_cpu(const Tensor& x_in, bool need_argmax) {
  constexpr const char* op = "attnkern::channel_pool";
  check_full(op, "x", x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  TORCH_CHECK(HW > 0 || N * C == 0, op, ": cannot take the max over an empty H*W (x has shape ", x_in.sizes(), ")");
  const auto long_opts = x_in.options().dtype(at::kLong);
  if (!use_vec_kernels()) {
    auto [avg, mx, arg] = fallback::channel_pool(x_in);
    return {avg, mx, need_argmax ? arg : at::empty({0}, long_opts)};
  }
  const auto p = prepare(op, x_in);
  auto opts = x_in.options().dtype(p.acc);
  Tensor avg = at::empty({N, C}, opts), mx = at::empty({N, C}, opts);
  Tensor arg = need_argmax ? at::empty({N, C}, long_opts) : at::empty({0}, long_opts);
  if (N * C > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "attnkern_channel_pool_cpu", [&] {
      if (need_argmax) {
        channel_pool_kernel<scalar_t, true>(p.x, p.layout, avg, mx, arg);
      } else {
        channel_pool_kernel<scalar_t, false>(p.x, p.layout, avg, mx, arg);
      }
    });
  }
  return {avg, mx, arg};
}

std::tuple<Tensor, Tensor> spatial_pool_cpu(const Tensor& x_in, const Tensor& gate_in, bool need_argmax) {
  constexpr const char* op = "attnkern::spatial_pool";
  auto p = prepare(op, x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  Tensor gate = check_small(op, "channel_gate", gate_in, p.acc, {N, C}, x_in);
  TORCH_CHECK(C > 0 || N * H * W == 0, op, ": cannot take the max over an empty C (x has shape ", x_in.sizes(), ")");
  TORCH_CHECK(C < (int64_t(1) << 31), op, ": more than 2^31 - 1 channels are not supported");
  const auto long_opts = x_in.options().dtype(at::kLong);
  if (!use_vec_kernels()) {
    auto [pooled, arg] = fallback::spatial_pool(x_in, gate);
    return {pooled, need_argmax ? arg : at::empty({0}, long_opts)};
  }
  Tensor pooled = at::empty({N, 2, H, W}, x_in.options().dtype(p.acc));
  Tensor arg = need_argmax ? at::empty({N, H, W}, long_opts) : at::empty({0}, long_opts);
  if (N * H * W > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "attnkern_spatial_pool_cpu", [&] {
      if (need_argmax) {
        spatial_pool_kernel<scalar_t, true>(p.x, p.layout, gate, pooled, arg);
      } else {
        spatial_pool_kernel<scalar_t, false>(p.x, p.layout, gate, pooled, arg);
      }
    });
  }
  return {pooled, arg};
}

Tensor apply_gates_cpu(const Tensor& x_in, const Tensor& cgate_in, const optional<Tensor>& sgate_in) {
  constexpr const char* op = "attnkern::apply_gates";
  auto p = prepare(op, x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1);
  Tensor cgate = check_small(op, "channel_gate", cgate_in, p.acc, {N, C}, x_in);
  optional<Tensor> sgate;
  if (sgate_in.has_value()) {
    sgate = check_spatial_map(op, "spatial_gate", *sgate_in, p.acc, x_in);
  }
  if (!use_vec_kernels()) {
    auto scale = cgate.unsqueeze(-1).unsqueeze(-1);
    if (sgate.has_value()) {
      scale = scale * sgate->unsqueeze(1);
    }
    return like_x(acc(x_in) * scale, x_in);
  }
  Tensor y = at::empty_like(p.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "attnkern_apply_gates_cpu", [&] {
    apply_gates_kernel<scalar_t>(p.x, p.layout, cgate, sgate.has_value() ? &*sgate : nullptr, y);
  });
  return y;
}

PerSampleGate channel_gate_per_sample_cpu(const Tensor& x_in, const Tensor& fc1_weight,
                                          const optional<Tensor>& fc1_bias, const Tensor& fc2_weight,
                                          const optional<Tensor>& fc2_bias, bool use_avg, bool use_max,
                                          const optional<PerSampleSpatialGate>& spatial_gate, bool need_argmax) {
  constexpr const char* op = "attnkern::cbam_fused_forward";
  auto p = prepare(op, x_in);
  TORCH_CHECK(use_vec_kernels(), op, ": the per-sample channel gate needs the vector kernels");
  TORCH_CHECK(use_avg || use_max, op, ": the channel gate needs an avg or a max pool");
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), Ch = fc1_weight.size(0);
  TORCH_CHECK(H * W > 0 || N * C == 0, op, ": cannot pool over an empty H*W (x has shape ", x_in.sizes(), ")");
  TORCH_CHECK(C > 0 || !spatial_gate.has_value() || N * H * W == 0, op,
              ": cannot take the max over an empty C (x has shape ", x_in.sizes(), ")");
  TORCH_CHECK(C < (int64_t(1) << 31), op, ": more than 2^31 - 1 channels are not supported");
  auto optional_small = [&](const char* name, const optional<Tensor>& t, c10::IntArrayRef sizes) {
    return t ? optional<Tensor>(check_small(op, name, *t, p.acc, sizes, x_in)) : std::nullopt;
  };
  const Tensor w1 = check_small(op, "fc1_weight", fc1_weight, p.acc, {Ch, C}, x_in);
  const Tensor w2 = check_small(op, "fc2_weight", fc2_weight, p.acc, {C, Ch}, x_in);
  const optional<Tensor> b1 = optional_small("fc1_bias", fc1_bias, {Ch});
  const optional<Tensor> b2 = optional_small("fc2_bias", fc2_bias, {C});
  Tensor taps;
  optional<Tensor> conv_bias;
  const bool spatial = spatial_gate.has_value(), whole = spatial && spatial_gate->whole;
  if (spatial) {
    const Tensor& w = spatial_gate->conv_weight;
    const int64_t k = w.dim() == 4 ? w.size(-1) : 0;
    TORCH_CHECK(k % 2 == 1, op, ": conv_weight must be (1, 2, k, k) with k odd, got ", w.sizes());
    taps = check_small(op, "conv_weight", w, p.acc, {1, 2, k, k}, x_in);
    conv_bias = optional_small("conv_bias", spatial_gate->conv_bias, {1});
  }
  const auto opts = x_in.options().dtype(p.acc);
  const auto long_opts = x_in.options().dtype(at::kLong);
  PerSampleGate out;
  out.pools = at::empty({int64_t(use_avg) + int64_t(use_max), N, C}, opts);
  out.channel_gate = at::empty({N, C}, opts);
  out.channel_argmax = need_argmax && use_max ? at::empty({N, C}, long_opts) : at::empty({0}, long_opts);
  out.spatial_argmax = need_argmax && spatial ? at::empty({N, H, W}, long_opts) : at::empty({0}, long_opts);
  out.y = spatial && !whole ? Tensor() : at::empty_like(p.x);
  out.pooled = spatial ? at::empty({N, 2, H, W}, opts) : Tensor();
  out.conv_out = spatial ? at::empty({N, 1, H, W}, opts) : Tensor();
  out.spatial_gate = whole ? at::empty({N, H, W}, opts) : Tensor();
  if (N * C * H * W == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "attnkern_channel_gate_cpu", [&] {
    using A = acc_t<scalar_t>;
    const MlpWeights<A> mlp{w1.const_data_ptr<A>(), b1 ? b1->const_data_ptr<A>() : nullptr, w2.const_data_ptr<A>(),
                            b2 ? b2->const_data_ptr<A>() : nullptr, Ch};
    optional<SpatialGateArgs<A>> sgate;
    if (spatial) {
      const optional<SpatialBnScalars>& bn = spatial_gate->bn;
      sgate = SpatialGateArgs<A>{taps.const_data_ptr<A>(), PaddedMaps(H, W, taps.size(-1)),
                                 conv_bias ? *conv_bias->const_data_ptr<A>() : A(0),
                                 static_cast<A>(bn ? bn->mean : 0.0),
                                 static_cast<A>(bn ? bn->weight * bn->invstd : 1.0),
                                 static_cast<A>(bn ? bn->bias : 0.0), whole};
    }
    const SpatialGateArgs<A>* sgate_p = sgate ? &*sgate : nullptr;
    if (need_argmax) {
      channel_gate_per_sample_kernel<scalar_t, true>(p.x, p.layout, mlp, sgate_p, use_avg, use_max, out);
    } else {
      channel_gate_per_sample_kernel<scalar_t, false>(p.x, p.layout, mlp, sgate_p, use_avg, use_max, out);
    }
  });
  return out;
}

std::pair<double, double> spatial_map_mean_var_cpu(const Tensor& conv_out) {
  TORCH_CHECK(use_vec_kernels(), "attnkern::spatial_map_mean_var_cpu needs the vector kernels");
  const Tensor z = conv_out.contiguous();
  std::pair<double, double> out;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "attnkern_spatial_mean_var_cpu",
                             [&] { out = mean_var(z.const_data_ptr<scalar_t>(), z.numel()); });
  return out;
}

std::tuple<Tensor, double, double, double> spatial_logit_backward_cpu(const Tensor& grad_gate, const Tensor& gate,
                                                                      const Tensor& conv_out,
                                                                      const optional<SpatialBnScalars>& bn) {
  TORCH_CHECK(use_vec_kernels(), "attnkern::spatial_logit_backward_cpu needs the vector kernels");
  const Tensor dgate = grad_gate.contiguous(), g = gate.contiguous(), z = conv_out.contiguous();
  TORCH_CHECK(dgate.numel() == z.numel() && g.numel() == z.numel(),
              "attnkern::spatial_logit_backward_cpu: the gate, its grad and the conv output must match, got ",
              dgate.sizes(), ", ", g.sizes(), ", ", z.sizes());
  Tensor grad_z = at::empty_like(z);
  std::tuple<double, double, double> sums;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "attnkern_spatial_logit_backward_cpu", [&] {
    sums = spatial_logit_backward_kernel(dgate.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                                         z.const_data_ptr<scalar_t>(), z.numel(), bn ? &*bn : nullptr,
                                         grad_z.mutable_data_ptr<scalar_t>());
  });
  return {grad_z, std::get<0>(sums), std::get<1>(sums), std::get<2>(sums)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mlp_backward_cpu(const Tensor& grad_gate, const Tensor& gate,
                                                                    const Tensor& pools, const Tensor& fc1_weight,
                                                                    const optional<Tensor>& fc1_bias,
                                                                    const Tensor& fc2_weight,
                                                                    const optional<Tensor>& fc2_bias) {
  TORCH_CHECK(use_vec_kernels(), "attnkern::mlp_backward_cpu needs the vector kernels");
  const auto contiguous = [](const optional<Tensor>& t) {
    return t ? optional<Tensor>(t->contiguous()) : std::nullopt;
  };
  const Tensor pools_c = pools.contiguous(), gate_c = gate.contiguous(), grad_c = grad_gate.contiguous();
  const Tensor w1 = fc1_weight.contiguous(), w2 = fc2_weight.contiguous();
  const optional<Tensor> b1 = contiguous(fc1_bias), b2 = contiguous(fc2_bias);
  const int64_t P = pools.size(0), N = pools.size(1), C = pools.size(2);
  Tensor grad_pools = at::empty_like(pools_c);
  Tensor d_w1 = at::zeros_like(w1), d_w2 = at::zeros_like(w2);
  Tensor d_b1 = b1 ? at::zeros_like(*b1) : Tensor(), d_b2 = b2 ? at::zeros_like(*b2) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(pools.scalar_type(), "attnkern_mlp_backward_cpu", [&] {
    const MlpWeights<scalar_t> mlp{w1.const_data_ptr<scalar_t>(), b1 ? b1->const_data_ptr<scalar_t>() : nullptr,
                                   w2.const_data_ptr<scalar_t>(), b2 ? b2->const_data_ptr<scalar_t>() : nullptr,
                                   w1.size(0)};
    mlp_backward_kernel<scalar_t>(pools_c.const_data_ptr<scalar_t>(), P, N, C, gate_c.const_data_ptr<scalar_t>(),
                                  grad_c.const_data_ptr<scalar_t>(), mlp, grad_pools.mutable_data_ptr<scalar_t>(),
                                  d_w1.mutable_data_ptr<scalar_t>(), b1 ? d_b1.mutable_data_ptr<scalar_t>() : nullptr,
                                  d_w2.mutable_data_ptr<scalar_t>(), b2 ? d_b2.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {grad_pools, d_w1, d_b1, d_w2, d_b2};
}

namespace {

// spatial_gate_grad, and with sg_in (the spatial gate) also the channel gate's grad through the
// scaling (undefined without).
std::pair<Tensor, Tensor> spatial_gate_grad_impl(const Tensor& grad_in, const Tensor& x_in, const Tensor& cgate_in,
                                                 const optional<Tensor>& sg_in) {
  constexpr const char* op = "attnkern::spatial_gate_grad";
  auto p = prepare(op, x_in);
  check_like_x(op, "grad", grad_in, x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  Tensor cgate = check_small(op, "channel_gate", cgate_in, p.acc, {N, C}, x_in);
  optional<Tensor> sg;
  if (sg_in.has_value()) {
    sg = check_spatial_map(op, "spatial_gate", *sg_in, p.acc, x_in);
  }
  if (!use_vec_kernels()) {
    const Tensor product = acc(grad_in) * acc(x_in);
    return {(product * cgate.unsqueeze(-1).unsqueeze(-1)).sum(1),
            sg.has_value() ? (product * sg->unsqueeze(1)).sum({2, 3}) : Tensor()};
  }
  Tensor grad = in_layout(grad_in, p.layout);
  Tensor out = at::empty({N, H, W}, x_in.options().dtype(p.acc));
  Tensor channel = sg.has_value() ? at::zeros({N, C}, out.options()) : Tensor();
  if (out.numel() > 0 && C > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "attnkern_spatial_gate_grad_cpu", [&] {
      using A = acc_t<scalar_t>;
      if (sg.has_value()) {
        spatial_gate_grad_kernel<scalar_t, true>(grad, p.x, p.layout, cgate, sg->const_data_ptr<A>(), out,
                                                 channel.data_ptr<A>());
      } else {
        spatial_gate_grad_kernel<scalar_t, false>(grad, p.x, p.layout, cgate, nullptr, out, nullptr);
      }
    });
  } else {
    out.zero_();  // empty sums
  }
  return {out, channel};
}

}  // namespace

Tensor spatial_gate_grad_cpu(const Tensor& grad, const Tensor& x, const Tensor& cgate) {
  return spatial_gate_grad_impl(grad, x, cgate, std::nullopt).first;
}

std::pair<Tensor, Tensor> scaling_grads_cpu(const Tensor& grad, const Tensor& x, const Tensor& cgate,
                                            const Tensor& sgate) {
  return spatial_gate_grad_impl(grad, x, cgate, sgate);
}

Tensor spatial_pool_channel_grad_cpu(const Tensor& x_in, const Tensor& gp_in, const Tensor& sarg_in) {
  constexpr const char* op = "attnkern::spatial_pool_channel_grad";
  auto p = prepare(op, x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  Tensor gp = check_small(op, "grad_pooled", gp_in, p.acc, {N, 2, H, W}, x_in);
  Tensor sarg = check_spatial_map(op, "spatial_argmax", sarg_in, at::kLong, x_in);
  if (!use_vec_kernels()) {
    return (fallback::pooled_terms(x_in, gp, sarg) * acc(x_in)).sum({2, 3});
  }
  Tensor out = at::zeros({N, C}, x_in.options().dtype(p.acc));
  if (out.numel() > 0 && H * W > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, p.x.scalar_type(), "attnkern_spatial_pool_channel_grad_cpu", [&] {
          SpatialTerms<acc_t<scalar_t>> st;
          st.gp = gp.const_data_ptr<acc_t<scalar_t>>();
          st.sarg = sarg.const_data_ptr<int64_t>();
          channel_gate_grad_kernel<scalar_t, true, false>(Tensor(), p.x, p.layout, st, out);
        });
  }
  return out;
}

Tensor channel_gate_grad_cpu(const Tensor& grad_in, const Tensor& x_in, const optional<Tensor>& sg_in,
                             const optional<Tensor>& gp_in, const optional<Tensor>& sarg_in) {
  constexpr const char* op = "attnkern::channel_gate_grad";
  auto p = prepare(op, x_in);
  check_like_x(op, "grad", grad_in, x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1);
  optional<Tensor> sg, gp, sarg;
  std::tie(sg, gp, sarg) = check_spatial_terms(op, x_in, p.acc, sg_in, gp_in, sarg_in);
  if (!use_vec_kernels()) {
    return (fallback::g1_of(grad_in, x_in, sg, gp, sarg) * acc(x_in)).sum({2, 3});
  }
  Tensor grad = in_layout(grad_in, p.layout);
  Tensor out = at::empty({N, C}, x_in.options().dtype(p.acc));
  if (out.numel() > 0 && x_in.size(2) * x_in.size(3) == 0) {
    out.zero_();  // empty sums
  } else if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "attnkern_channel_gate_grad_cpu", [&] {
      const auto st = spatial_terms_of<acc_t<scalar_t>>(sg, gp, sarg);
      if (sg.has_value()) {
        channel_gate_grad_kernel<scalar_t, true>(grad, p.x, p.layout, st, out);
      } else {
        channel_gate_grad_kernel<scalar_t, false>(grad, p.x, p.layout, st, out);
      }
    });
  }
  return out;
}

Tensor cbam_input_grad_cpu(const Tensor& grad_in, const Tensor& x_in, const Tensor& cgate_in,
                           const optional<Tensor>& sg_in, const optional<Tensor>& gp_in,
                           const optional<Tensor>& sarg_in, const optional<Tensor>& ga_in,
                           const optional<Tensor>& gm_in, const optional<Tensor>& carg_in) {
  constexpr const char* op = "attnkern::cbam_input_grad";
  auto p = prepare(op, x_in);
  check_like_x(op, "grad", grad_in, x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  Tensor cgate = check_small(op, "channel_gate", cgate_in, p.acc, {N, C}, x_in);
  optional<Tensor> sg, gp, sarg;
  std::tie(sg, gp, sarg) = check_spatial_terms(op, x_in, p.acc, sg_in, gp_in, sarg_in);
  optional<Tensor> ga, gm, carg;
  if (ga_in.has_value()) {
    ga = check_small(op, "grad_avg", *ga_in, p.acc, {N, C}, x_in);
  }
  if (gm_in.has_value()) {
    TORCH_CHECK(carg_in.has_value(), op, ": grad_max needs channel_argmax");
    gm = check_small(op, "grad_max", *gm_in, p.acc, {N, C}, x_in);
    carg = check_small(op, "channel_argmax", *carg_in, at::kLong, {N, C}, x_in);
  }
  if (!use_vec_kernels()) {
    auto dx = fallback::g1_of(grad_in, x_in, sg, gp, sarg) * cgate.unsqueeze(-1).unsqueeze(-1);
    if (ga.has_value()) {
      dx = dx + ga->unsqueeze(-1).unsqueeze(-1) / HW;
    }
    if (gm.has_value()) {
      auto onehot = at::arange(HW, carg->options()).view({1, 1, -1}) == carg->unsqueeze(-1);
      dx = dx + (gm->unsqueeze(-1) * onehot).view(x_in.sizes());
    }
    return like_x(dx, x_in);
  }
  Tensor grad = in_layout(grad_in, p.layout);
  Tensor dx = at::empty_like(p.x);
  if (dx.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "attnkern_cbam_input_grad_cpu", [&] {
      using A = acc_t<scalar_t>;
      const auto st = spatial_terms_of<A>(sg, gp, sarg);
      ChannelTerms<A> ct;
      if (ga.has_value()) {
        ct.ga = ga->const_data_ptr<A>();
      }
      if (gm.has_value()) {
        ct.gm = gm->const_data_ptr<A>();
        ct.carg = carg->const_data_ptr<int64_t>();
      }
      if (sg.has_value()) {
        cbam_input_grad_kernel<scalar_t, true>(grad, p.layout, cgate, st, ct, dx);
      } else {
        cbam_input_grad_kernel<scalar_t, false>(grad, p.layout, cgate, st, ct, dx);
      }
    });
  }
  return dx;
}

}  // namespace attnkern::cpu

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("channel_pool", [](const at::Tensor& x) { return attnkern::cpu::channel_pool_cpu(x, true); });
  m.impl("spatial_pool",
         [](const at::Tensor& x, const at::Tensor& gate) { return attnkern::cpu::spatial_pool_cpu(x, gate, true); });
  m.impl("apply_gates", &attnkern::cpu::apply_gates_cpu);
  m.impl("spatial_gate_grad", &attnkern::cpu::spatial_gate_grad_cpu);
  m.impl("channel_gate_grad", &attnkern::cpu::channel_gate_grad_cpu);
  m.impl("cbam_input_grad", &attnkern::cpu::cbam_input_grad_cpu);
}
