"""Shared pieces of the Triton backend (triton_cbam.py, triton_bam.py).

Host side: input validation, memory-format handling, tile shapes, the split plan of long
reductions, the deterministic second pass that combines split partials, and the autotuned launch
of the element-wise kernels. Device side: the program decompositions of the element-wise kernels
(`ew_tile`) and of the split reductions (`split_program`), and the cross-lane first-max reduction
(`first_max_reduce`).

Conventions (see csrc/ops.cpp for the kernel semantics):
- A full-size tensor is (N, C, H, W), dense in NCHW or in channels_last (NHWC). H and W are
  merged into one HW axis; the kernels take the strides (sn, sc, shw) and a constexpr CL flag that
  says which of sc / shw is the constant 1 (NCHW: hw is contiguous, NHWC: c is). Every full-size
  operand of one launch is brought to the same layout as x, so one set of strides serves them all
  (a differently laid-out grad or partial costs one copy; x itself is never copied for these two
  layouts). Other layouts are made contiguous.
- Every kernel works on 2-D tiles [BLOCK_C, BLOCK_HW]. The block along the contiguous axis is
  about 256 bytes wide (full 128-byte lines, 16-byte vectors) and the other block fills the tile,
  so both layouts are coalesced and per-c / per-hw side vectors (gates, maps) are amortised over
  a square-ish tile.
- Reductions never use atomics: one program per (n, parallel block, split) loops over its range of
  the reduction axis, keeps per-lane accumulators and reduces across lanes once at the end. Long
  reductions with too few programs to fill the GPU are split; the splits write partials that a
  second small kernel (`finish_kernel`) combines in a fixed order, so results are deterministic.
- Offsets are int32 unless a tensor of the launch has 2**31 elements or more: then a constexpr
  INT64 flag makes the kernels compute them in int64 (chosen on the host from numel, no sync).
- No wrapper synchronises with the host or has data-dependent shapes (CUDA-graph safe), except
  the one-off autotuning benchmark of the element-wise kernels on the first call per shape (it
  is skipped, with a fixed default config, while a CUDA graph is being captured).
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl

from attnkern.backends import triton_interpreted

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_INT32_LIMIT = 2**31


def cdiv(a, b):
    return -(-a // b)


def next_pow2(n):
    return triton.next_power_of_2(max(int(n), 1))


# ----------------------------------------------------------------------------------------------
# Tuning parameters. Under the interpreter they are tiny, so that the small test shapes still run
# multi-iteration loops, split reductions and the finish pass (the interpreter is slow, too).
# ----------------------------------------------------------------------------------------------
class _Params:
    def __init__(self, interp):
        self.tile = 256 if interp else 2048  # elements per reduction tile (4 warps)
        self.warps = 1 if interp else 4
        self.contig_bytes = 64 if interp else 256  # width of the contiguous block, in bytes
        self.min_contig = 4 if interp else 16  # at least this many elements along it
        self.min_work = 64 if interp else 8192  # elements a split program should at least get
        self.finish_block = 64 if interp else 512


@functools.lru_cache(maxsize=None)
def params():
    return _Params(triton_interpreted())


@functools.lru_cache(maxsize=None)
def _num_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device):
    """Programs wanted in flight for a memory-bound reduction: ~4 per SM on a GPU."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 4 * _num_sms(index)


def device_guard(t):
    """Launch on t's GPU (Triton launches on the current device, on its current stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def capturing(t):
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------------------------
# Validation and layout
# ----------------------------------------------------------------------------------------------
def check_x(x, op, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: {name} must be a 4-D (N, C, H, W) tensor, got {x.dim()}-D shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {x.dtype}; expected a floating dtype (float16, bfloat16, float32 or float64)"
        )
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and triton_interpreted():
        return
    raise RuntimeError(
        f"{op}: the Triton backend runs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 set "
        f"before importing triton); {name} is on {x.device}"
    )


def _check_device(t, x, op, name):
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def layout(x):
    """(x, cl): x dense in NCHW (cl False) or NHWC (cl True); other layouts are made contiguous.
    Where both describe the same memory (C == 1 or H*W == 1) the one with the longer contiguous
    run is picked."""
    c, hw = x.shape[1], x.shape[2] * x.shape[3]
    nchw = x.is_contiguous()
    nhwc = x.is_contiguous(memory_format=torch.channels_last)
    if nchw and nhwc:
        return x, hw == 1 and c > 1
    if nchw:
        return x, False
    if nhwc:
        return x, True
    return x.contiguous(), False


def memory_format(cl):
    return torch.channels_last if cl else torch.contiguous_format


def strides(x, cl):
    """(sn, sc, shw) of a dense x in the chosen layout (the unit one is passed but not used)."""
    _, c, h, w = x.shape
    hw = h * w
    return (c * hw, 1, c) if cl else (c * hw, hw, 1)


def full_like_x(t, x, cl, op, name):
    """A full-size operand (grad, partial gradient): same shape and device as x, floating, laid out
    like x so that x's strides address it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be a 4-D (N, C, H, W) tensor, got {t.dim()}-D shape {tuple(t.shape)}")
    if tuple(t.shape) != tuple(x.shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected x's shape {tuple(x.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected a floating dtype")
    _check_device(t, x, op, name)
    fmt = memory_format(cl)
    if not t.is_contiguous(memory_format=fmt):
        t = t.contiguous(memory_format=fmt)
    return t


def small(t, shape, x, acc, op, name):
    """A per-sample map (gate, pooled map, ...): exact shape, floating, on x's device; returned
    contiguous in the acc dtype (a copy only where it is not already)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected a floating dtype")
    _check_device(t, x, op, name)
    return t.to(dtype=acc).contiguous()


def index_map(t, shape, x, op, name):
    """An argmax map: exact shape, integer dtype, on x's device; returned contiguous."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected an integer dtype (int64)")
    _check_device(t, x, op, name)
    return t.contiguous()


def need_int64(*tensors):
    return any(t is not None and t.numel() >= _INT32_LIMIT for t in tensors)


# ----------------------------------------------------------------------------------------------
# Tiles and split plans
# ----------------------------------------------------------------------------------------------
def tile_shape(c, hw, cl, itemsize, tile):
    """(BLOCK_C, BLOCK_HW), powers of two, about `tile` elements: the contiguous axis gets a block
    of ~256 bytes (more when the other axis is too short to fill the tile)."""
    contig_len, other_len = (c, hw) if cl else (hw, c)
    p = params()
    base = max(p.min_contig, p.contig_bytes // itemsize)
    contig = min(next_pow2(contig_len), max(base, tile // next_pow2(other_len)))
    other = min(next_pow2(other_len), max(1, tile // contig))
    return (contig, other) if cl else (other, contig)


def split_plan(red_len, red_block, other_block, base_programs, device):
    """(n_split, per_split): split a reduction of length red_len over more programs when the
    base_programs (one per parallel block) cannot fill the device. per_split is a multiple of
    red_block (so no tile straddles two splits) and every split is non-empty."""
    if red_len <= red_block:
        return 1, max(red_len, 1)
    target = target_programs(device)
    if base_programs >= target:
        return 1, red_len
    min_per = cdiv(max(red_block, cdiv(params().min_work, other_block)), red_block) * red_block
    n = min(cdiv(target, base_programs), cdiv(red_len, min_per))
    if n <= 1:
        return 1, red_len
    per = cdiv(cdiv(red_len, n), red_block) * red_block
    return cdiv(red_len, per), per


class ReductionPlan:
    """Launch plan of a reduction of x over HW (over_hw: programs (n, c-block, split)) or over C
    (programs (n, hw-block, split)). Every reduction kernel takes `args` (C, HW, sn, sc, shw,
    per_split, n_blocks, n_split) after its pointers and `meta(int64)` as its constexprs."""

    def __init__(self, x, cl, over_hw):
        n, c, h, w = x.shape
        hw = h * w
        p = params()
        self.block_c, self.block_hw = tile_shape(c, hw, cl, x.element_size(), p.tile)
        if over_hw:
            self.n_blocks = cdiv(c, self.block_c)
            self.n_split, self.per_split = split_plan(hw, self.block_hw, self.block_c, n * self.n_blocks, x.device)
        else:
            self.n_blocks = cdiv(hw, self.block_hw)
            self.n_split, self.per_split = split_plan(c, self.block_c, self.block_hw, n * self.n_blocks, x.device)
        self.grid = (n * self.n_blocks * self.n_split,)
        self.args = (c, hw, *strides(x, cl), self.per_split, self.n_blocks, self.n_split)
        self.cl, self.warps = cl, p.warps

    def meta(self, int64):
        return dict(CL=self.cl, INT64=int64, BLOCK_C=self.block_c, BLOCK_HW=self.block_hw, num_warps=self.warps)


class Outputs:
    """Where a split reduction writes: straight into the final outputs (one split), or into
    (n_split, N*P) partial buffers that finish() combines in split order. out_sum / out_max /
    out_idx are the final (N, P)-shaped outputs (views with unit stride along P), n_stride /
    idx_n_stride their N strides. The kernel writes to .sum / .max / .idx at
    s * .split_stride + n * .sn (.isn for idx) + p."""

    def __init__(self, n_split, n, p, out_sum=None, out_max=None, out_idx=None, n_stride=None, idx_n_stride=None):
        self.n_split, self.n, self.p = n_split, n, p
        self.out_sum, self.out_max, self.out_idx = out_sum, out_max, out_idx
        self.n_stride = p if n_stride is None else n_stride
        self.idx_n_stride = p if idx_n_stride is None else idx_n_stride
        if n_split == 1:
            self.sum, self.max, self.idx = out_sum, out_max, out_idx
            self.split_stride, self.sn, self.isn = 0, self.n_stride, self.idx_n_stride
        else:
            ref = out_sum if out_sum is not None else out_max
            shape = (n_split, n * p)
            self.sum = None if out_sum is None else torch.empty(shape, dtype=out_sum.dtype, device=ref.device)
            self.max = None if out_max is None else torch.empty(shape, dtype=out_max.dtype, device=ref.device)
            self.idx = None if out_idx is None else torch.empty(shape, dtype=torch.int64, device=ref.device)
            self.split_stride, self.sn, self.isn = n * p, p, p

    def finish(self, div, int64):
        """Combine the partials (no-op for one split); sums are divided by `div` at the end."""
        if self.n_split == 1:
            return
        m = self.n * self.p
        block = params().finish_block
        dummy = self.sum if self.sum is not None else self.max
        finish_kernel[(cdiv(m, block),)](
            dummy if self.sum is None else self.sum,
            dummy if self.max is None else self.max,
            self.idx if self.idx is not None else dummy,
            dummy if self.out_sum is None else self.out_sum,
            dummy if self.out_max is None else self.out_max,
            self.out_idx if self.out_idx is not None else dummy,
            m, self.p, self.n_split, self.n_stride, self.idx_n_stride, div,
            HAS_SUM=self.sum is not None, HAS_MAX=self.max is not None, INT64=int64,
            BLOCK=block, num_warps=params().warps,
        )

    def div_in_kernel(self, div):
        """The divisor the main kernel applies: the real one when it writes final results."""
        return div if self.n_split == 1 else 1


# ----------------------------------------------------------------------------------------------
# Autotuning of the element-wise kernels
# ----------------------------------------------------------------------------------------------
def ew_configs():
    if triton_interpreted():
        return [triton.Config({"TILE": 256}, num_warps=1)]
    return [
        triton.Config({"TILE": 1024}, num_warps=4),
        triton.Config({"TILE": 2048}, num_warps=4),
        triton.Config({"TILE": 4096}, num_warps=8),
        triton.Config({"TILE": 8192}, num_warps=8),
    ]


def ew_default():
    return {"TILE": 256, "num_warps": 1} if triton_interpreted() else {"TILE": 2048, "num_warps": 4}


def _ew_block(args, axis):
    bc, bh = tile_shape(args["C"], args["HW"], args["CL"], args["y_ptr"].element_size(), args["TILE"])
    return bc if axis == 0 else bh


EW_HEURISTICS = {"BLOCK_C": lambda a: _ew_block(a, 0), "BLOCK_HW": lambda a: _ew_block(a, 1)}
EW_KEY = ["C", "HW", "CL"]


def elementwise(fn):
    """(plain, tuned): the kernel with heuristic tile shapes for a given TILE, and the same under
    a small autotuned set of (TILE, num_warps)."""
    plain = triton.heuristics(EW_HEURISTICS)(triton.jit(fn))
    return plain, triton.autotune(configs=ew_configs(), key=EW_KEY)(plain)


def launch_elementwise(kernels, x, cl, *pointers, **flags):
    """Launch an element-wise kernel over x's tiles. Every element-wise kernel takes its pointers,
    then (C, HW, sn, sc, shw), then its flags and CL."""
    plain, tuned = kernels
    n, c, h, w = x.shape
    hw = h * w
    args = (*pointers, c, hw, *strides(x, cl))

    def grid(meta):
        return (n * cdiv(c, meta["BLOCK_C"]) * cdiv(hw, meta["BLOCK_HW"]),)

    with device_guard(x):
        if capturing(x):  # no benchmarking inside a CUDA graph capture
            plain[grid](*args, CL=cl, **flags, **ew_default())
        else:
            tuned[grid](*args, CL=cl, **flags)


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def ew_tile(C, HW, sn, sc, shw, CL: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """(n, c, hw, c_mask, hw_mask, mask, off) of an element-wise program's [BLOCK_C, BLOCK_HW]
    tile: consecutive programs walk the contiguous axis first. n is int64 under INT64, mask the
    tile's in-bounds elements, off their element offsets."""
    pid = tl.program_id(0)
    n_cb = (C + BLOCK_C - 1) // BLOCK_C
    n_hb = (HW + BLOCK_HW - 1) // BLOCK_HW
    per_sample = n_cb * n_hb
    n = pid // per_sample
    t = pid % per_sample
    if CL:
        cb = t % n_cb
        hb = t // n_cb
    else:
        hb = t % n_hb
        cb = t // n_hb
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    if INT64:
        n = n.to(tl.int64)
        c_o = c.to(tl.int64)
        hw_o = hw.to(tl.int64)
    else:
        c_o = c
        hw_o = hw
    if CL:
        off = n * sn + c_o[:, None] + hw_o[None, :] * shw
    else:
        off = n * sn + c_o[:, None] * sc + hw_o[None, :]
    c_mask = c < C
    hw_mask = hw < HW
    return n, c, hw, c_mask, hw_mask, c_mask[:, None] & hw_mask[None, :], off


@triton.jit
def split_program(red_len, per_split, n_blocks, n_split, INT64: tl.constexpr):
    """(n, block, s, begin, end) of a split-reduction program (n, parallel block, split), [begin,
    end) the part of the reduced axis its split covers. n and s are int64 under INT64 (they scale
    sample and split strides); block and the range stay int32 (they index tiles and argmax lanes)."""
    pid = tl.program_id(0)
    s = pid % n_split
    t = pid // n_split
    block = t % n_blocks
    n = t // n_blocks
    begin = s * per_split
    end = tl.minimum(begin + per_split, red_len)
    if INT64:
        n = n.to(tl.int64)
        s = s.to(tl.int64)
    return n, block, s, begin, end


@triton.jit
def first_max_reduce(best, best_idx, valid, AXIS: tl.constexpr):
    """Reduce per-lane first-maxima across lanes: the first NaN if any, else the maximum with the
    smallest index. `valid` marks the lanes that saw at least one element.

    The per-lane running first-max, inlined in the kernels' loops (a jit helper call per loop
    iteration is expensive under the interpreter), is
        upd = (best == best) & ~(v <= best);  best = where(upd, v, best);  idx = where(upd, i, idx)
    Lanes see increasing indices, so a later element replaces the kept one only if it is strictly
    greater, or NaN while the kept one is not (NaN is maximal and the first NaN stays). Masked
    elements come in as -inf and so never replace anything; lanes start at -inf with the index of
    their first element, so an all -inf lane reports its first element."""
    is_nan = best != best
    # Two reductions: NaN ranks as +inf for the value, then among the lanes at the maximum the
    # key (index, +2**32 unless NaN) picks the first NaN if there is one, else the first maximum.
    key_val = tl.where(valid, tl.where(is_nan, float("inf"), best), float("-inf"))
    mx = tl.max(key_val, axis=AXIS)
    at_max = valid & (key_val == tl.expand_dims(mx, AXIS))
    key = best_idx.to(tl.int64) + tl.where(is_nan, 0, 4294967296)
    key = tl.min(tl.where(at_max, key, 9223372036854775807), axis=AXIS)
    has_nan = key < 4294967296
    idx = tl.where(has_nan, key, key - 4294967296)
    return tl.where(has_nan, float("nan"), mx), idx


@triton.jit
def finish_kernel(psum_ptr, pmax_ptr, pidx_ptr, osum_ptr, omax_ptr, oidx_ptr,
                  M, P, S, o_sn, oi_sn, DIV,
                  HAS_SUM: tl.constexpr, HAS_MAX: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """Combine (S, M) split partials in split order: sums (then / DIV), and first-max (value,
    index) pairs (earlier splits hold smaller indices, so a later one wins only if strictly
    greater, or NaN over a non-NaN)."""
    m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = m < M
    if INT64:
        m = m.to(tl.int64)
    n = m // P
    p = m - n * P
    if HAS_SUM:
        total = tl.load(psum_ptr + m, mask=mask, other=0.0)
        for s in range(1, S):
            total += tl.load(psum_ptr + s * M + m, mask=mask, other=0.0)
        tl.store(osum_ptr + n * o_sn + p, total / DIV, mask=mask)
    if HAS_MAX:
        best = tl.load(pmax_ptr + m, mask=mask, other=0.0)
        best_idx = tl.load(pidx_ptr + m, mask=mask, other=0)
        for s in range(1, S):
            v = tl.load(pmax_ptr + s * M + m, mask=mask, other=0.0)
            i = tl.load(pidx_ptr + s * M + m, mask=mask, other=0)
            upd = (best == best) & ~(v <= best)
            best = tl.where(upd, v, best)
            best_idx = tl.where(upd, i, best_idx)
        tl.store(omax_ptr + n * o_sn + p, best, mask=mask)
        tl.store(oidx_ptr + n * oi_sn + p, best_idx, mask=mask)
