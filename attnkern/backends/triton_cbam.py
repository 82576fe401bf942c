"""Triton kernels of CBAM (and SE, which uses channel_pool / apply_gates / cbam_input_grad).

Semantics: csrc/ops.cpp; reference: attnkern/backends/torch_kernels.py (same names and positional
signatures). Layout, tiling, split reductions and numerics are described in triton_utils.py.

Kernels and their tiles (x is (N, C, HW) with HW = H*W merged):
  channel_pool, channel_gate_grad   reduce over HW: one program per (n, c-block, hw-split), looping
                                    over its HW range in [BLOCK_C, BLOCK_HW] tiles.
  spatial_pool, spatial_gate_grad   reduce over C: one program per (n, hw-block, c-split), looping
                                    over its C range.
  apply_gates, cbam_input_grad      element-wise: one program per (n, c-block, hw-block) tile,
                                    autotuned tile size / warps.
For NCHW the HW block is the contiguous (~256-byte) one, for channels_last the C block.
"""
import torch
import triton
import triton.language as tl

from attnkern.backends.torch_kernels import acc_dtype
from attnkern.backends.triton_utils import (
    Outputs,
    ReductionPlan,
    check_x,
    device_guard,
    elementwise,
    ew_tile,
    first_max_reduce,
    full_like_x,
    index_map,
    launch_elementwise,
    layout,
    need_int64,
    small,
    split_program,
)

__all__ = [
    "channel_pool",
    "spatial_pool",
    "apply_gates",
    "spatial_gate_grad",
    "channel_gate_grad",
    "cbam_input_grad",
]


# The loops' index math is inlined rather than put in @triton.jit helpers: the interpreter pays
# several milliseconds per helper call, and these run once per loop iteration (the once-per-program
# prologues share split_program / ew_tile). Under INT64 the sample, split and in-sample offsets are
# int64; loop indices kept as argmax stay int32 (H*W, C < 2**31).

# ----------------------------------------------------------------------------------------------
# Reductions over HW: program (n, c-block, split) loops over its HW range
# ----------------------------------------------------------------------------------------------
@triton.jit
def _channel_pool_kernel(x_ptr, sum_ptr, max_ptr, idx_ptr,
                         C, HW, sn, sc, shw, per_split, n_cb, n_split, o_ss, o_sn, oi_sn, DIV,
                         CL: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n, cb, s, begin, end = split_program(HW, per_split, n_cb, n_split, INT64)
    acc_ty = sum_ptr.dtype.element_ty
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    lanes = begin + tl.arange(0, BLOCK_HW)
    c_o = c.to(tl.int64) if INT64 else c
    x_tile = x_ptr + n * sn + (c_o[:, None] if CL else c_o[:, None] * sc)

    total = tl.full([BLOCK_C, BLOCK_HW], 0, acc_ty)
    best = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), acc_ty)
    best_idx = tl.full([BLOCK_C, BLOCK_HW], 0, tl.int32) + lanes[None, :]
    for start in range(begin, end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_o = hw.to(tl.int64) if INT64 else hw
        mask = c_mask[:, None] & (hw < HW)[None, :]
        v = tl.load(x_tile + (hw_o[None, :] * shw if CL else hw_o[None, :]), mask=mask, other=float("-inf"))
        v = v.to(acc_ty)
        total += tl.where(mask, v, 0.0)
        upd = (best == best) & ~(v <= best)  # first max per lane; NaN is maximal
        best = tl.where(upd, v, best)
        best_idx = tl.where(upd, hw[None, :], best_idx)

    mx, idx = first_max_reduce(best, best_idx, (lanes < HW)[None, :], 1)
    out = s * o_ss + n * o_sn + c
    tl.store(sum_ptr + out, tl.sum(total, axis=1) / DIV, mask=c_mask)
    tl.store(max_ptr + out, mx, mask=c_mask)
    tl.store(idx_ptr + s * o_ss + n * oi_sn + c, idx.to(tl.int64), mask=c_mask)


@triton.jit
def _channel_gate_grad_kernel(g_ptr, x_ptr, ms_ptr, gp_ptr, sarg_ptr, out_ptr,
                              C, HW, sn, sc, shw, per_split, n_cb, n_split, o_ss, o_sn,
                              HAS_SPATIAL: tl.constexpr, CL: tl.constexpr, INT64: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n, cb, s, begin, end = split_program(HW, per_split, n_cb, n_split, INT64)
    acc_ty = out_ptr.dtype.element_ty
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c_o = c.to(tl.int64) if INT64 else c
    tile = n * sn + (c_o[:, None] if CL else c_o[:, None] * sc)
    ms_base = ms_ptr + n * HW  # (N, H, W) maps
    sarg_base = sarg_ptr + n * HW
    gp_base = gp_ptr + n * (2 * HW)  # (N, 2, H, W) pooled-map gradient

    total = tl.full([BLOCK_C, BLOCK_HW], 0, acc_ty)
    for start in range(begin, end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_o = hw.to(tl.int64) if INT64 else hw
        hw_mask = hw < HW
        mask = c_mask[:, None] & hw_mask[None, :]
        off = tile + (hw_o[None, :] * shw if CL else hw_o[None, :])
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(acc_ty)
        xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(acc_ty)
        if HAS_SPATIAL:
            ms = tl.load(ms_base + hw, mask=hw_mask, other=0.0)
            gp_mean = tl.load(gp_base + hw, mask=hw_mask, other=0.0) / C
            gp_max = tl.load(gp_base + HW + hw, mask=hw_mask, other=0.0)
            sarg = tl.load(sarg_base + hw, mask=hw_mask, other=-1)
            onehot = (c[:, None] == sarg[None, :]).to(acc_ty)
            g = g * ms[None, :] + gp_mean[None, :] + gp_max[None, :] * onehot
        total += g * xv

    tl.store(out_ptr + s * o_ss + n * o_sn + c, tl.sum(total, axis=1), mask=c_mask)


# ----------------------------------------------------------------------------------------------
# Reductions over C: program (n, hw-block, split) loops over its C range
# ----------------------------------------------------------------------------------------------
@triton.jit
def _spatial_pool_kernel(x_ptr, gate_ptr, sum_ptr, max_ptr, idx_ptr,
                         C, HW, sn, sc, shw, per_split, n_hb, n_split, o_ss, o_sn, oi_sn, DIV,
                         CL: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n, hb, s, begin, end = split_program(C, per_split, n_hb, n_split, INT64)
    acc_ty = sum_ptr.dtype.element_ty
    hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    lanes = begin + tl.arange(0, BLOCK_C)
    hw_o = hw.to(tl.int64) if INT64 else hw
    x_tile = x_ptr + n * sn + (hw_o[None, :] * shw if CL else hw_o[None, :])
    gate_base = gate_ptr + n * C

    total = tl.full([BLOCK_C, BLOCK_HW], 0, acc_ty)
    best = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), acc_ty)
    best_idx = tl.full([BLOCK_C, BLOCK_HW], 0, tl.int32) + lanes[:, None]
    for start in range(begin, end, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_o = c.to(tl.int64) if INT64 else c
        c_mask = c < C
        mask = c_mask[:, None] & hw_mask[None, :]
        xv = tl.load(x_tile + (c_o[:, None] if CL else c_o[:, None] * sc), mask=mask, other=0.0).to(acc_ty)
        gate = tl.load(gate_base + c, mask=c_mask, other=0.0)
        v = xv * gate[:, None]
        total += v
        v = tl.where(mask, v, float("-inf"))
        upd = (best == best) & ~(v <= best)  # first max per lane; NaN is maximal
        best = tl.where(upd, v, best)
        best_idx = tl.where(upd, c[:, None], best_idx)

    mx, idx = first_max_reduce(best, best_idx, (lanes < C)[:, None], 0)
    out = s * o_ss + n * o_sn + hw
    tl.store(sum_ptr + out, tl.sum(total, axis=0) / DIV, mask=hw_mask)
    tl.store(max_ptr + out, mx, mask=hw_mask)
    tl.store(idx_ptr + s * o_ss + n * oi_sn + hw, idx.to(tl.int64), mask=hw_mask)


@triton.jit
def _spatial_gate_grad_kernel(g_ptr, x_ptr, gate_ptr, out_ptr,
                              C, HW, sn, sc, shw, per_split, n_hb, n_split, o_ss, o_sn,
                              CL: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n, hb, s, begin, end = split_program(C, per_split, n_hb, n_split, INT64)
    acc_ty = out_ptr.dtype.element_ty
    hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    hw_o = hw.to(tl.int64) if INT64 else hw
    tile = n * sn + (hw_o[None, :] * shw if CL else hw_o[None, :])
    gate_base = gate_ptr + n * C

    total = tl.full([BLOCK_C, BLOCK_HW], 0, acc_ty)
    for start in range(begin, end, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_o = c.to(tl.int64) if INT64 else c
        c_mask = c < C
        mask = c_mask[:, None] & hw_mask[None, :]
        off = tile + (c_o[:, None] if CL else c_o[:, None] * sc)
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(acc_ty)
        xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(acc_ty)
        gate = tl.load(gate_base + c, mask=c_mask, other=0.0)
        total += g * xv * gate[:, None]

    tl.store(out_ptr + s * o_ss + n * o_sn + hw, tl.sum(total, axis=0), mask=hw_mask)


# ----------------------------------------------------------------------------------------------
# Element-wise: program (n, c-block, hw-block)
# ----------------------------------------------------------------------------------------------
def _apply_gates_kernel(x_ptr, y_ptr, cg_ptr, ms_ptr, C, HW, sn, sc, shw,
                        HAS_SPATIAL: tl.constexpr, CL: tl.constexpr, INT64: tl.constexpr,
                        TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n, c, hw, c_mask, hw_mask, mask, off = ew_tile(C, HW, sn, sc, shw, CL, INT64, BLOCK_C, BLOCK_HW)
    acc_ty = cg_ptr.dtype.element_ty
    xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(acc_ty)
    scale = tl.load(cg_ptr + n * C + c, mask=c_mask, other=0.0)[:, None]
    if HAS_SPATIAL:
        ms = tl.load(ms_ptr + n * HW + hw, mask=hw_mask, other=0.0)
        scale = scale * ms[None, :]
    tl.store(y_ptr + off, (xv * scale).to(y_ptr.dtype.element_ty), mask=mask)


_apply_gates_kernels = elementwise(_apply_gates_kernel)


def _cbam_input_grad_kernel(g_ptr, y_ptr, cg_ptr, ms_ptr, gp_ptr, sarg_ptr, gavg_ptr, gmax_ptr, carg_ptr,
                            C, HW, sn, sc, shw,
                            HAS_SPATIAL: tl.constexpr, HAS_AVG: tl.constexpr, HAS_MAX: tl.constexpr,
                            CL: tl.constexpr, INT64: tl.constexpr,
                            TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n, c, hw, c_mask, hw_mask, mask, off = ew_tile(C, HW, sn, sc, shw, CL, INT64, BLOCK_C, BLOCK_HW)
    acc_ty = cg_ptr.dtype.element_ty
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(acc_ty)
    if HAS_SPATIAL:
        ms = tl.load(ms_ptr + n * HW + hw, mask=hw_mask, other=0.0)
        gp_mean = tl.load(gp_ptr + n * (2 * HW) + hw, mask=hw_mask, other=0.0) / C
        gp_max = tl.load(gp_ptr + n * (2 * HW) + HW + hw, mask=hw_mask, other=0.0)
        sarg = tl.load(sarg_ptr + n * HW + hw, mask=hw_mask, other=-1)
        onehot = (c[:, None] == sarg[None, :]).to(acc_ty)
        g = g * ms[None, :] + gp_mean[None, :] + gp_max[None, :] * onehot
    cg = tl.load(cg_ptr + n * C + c, mask=c_mask, other=0.0)
    dx = g * cg[:, None]
    if HAS_AVG:
        gavg = tl.load(gavg_ptr + n * C + c, mask=c_mask, other=0.0) / HW
        dx = dx + gavg[:, None]
    if HAS_MAX:
        gmax = tl.load(gmax_ptr + n * C + c, mask=c_mask, other=0.0)
        carg = tl.load(carg_ptr + n * C + c, mask=c_mask, other=-1)
        dx = dx + gmax[:, None] * (hw[None, :] == carg[:, None]).to(acc_ty)
    tl.store(y_ptr + off, dx.to(y_ptr.dtype.element_ty), mask=mask)


_cbam_input_grad_kernels = elementwise(_cbam_input_grad_kernel)


# ----------------------------------------------------------------------------------------------
# Python wrappers
# ----------------------------------------------------------------------------------------------
def _dims(x):
    n, c, h, w = x.shape
    return n, c, h, w, h * w


def channel_pool(x):
    """avg, max, argmax over H*W per (n, c): (N, C) acc, acc, int64."""
    op = "channel_pool"
    check_x(x, op)
    x, cl = layout(x)
    n, c, h, w, hw = _dims(x)
    acc = acc_dtype(x.dtype)
    avg = torch.empty((n, c), dtype=acc, device=x.device)
    mx = torch.empty((n, c), dtype=acc, device=x.device)
    arg = torch.empty((n, c), dtype=torch.int64, device=x.device)
    if n * c == 0:
        return avg, mx, arg
    if hw == 0:
        raise ValueError(f"{op}: cannot pool over an empty H*W (x has shape {tuple(x.shape)})")
    plan = ReductionPlan(x, cl, over_hw=True)
    out = Outputs(plan.n_split, n, c, avg, mx, arg)
    int64 = need_int64(x, out.sum, out.idx)
    with device_guard(x):
        _channel_pool_kernel[plan.grid](
            x, out.sum, out.max, out.idx, *plan.args, out.split_stride, out.sn, out.isn, out.div_in_kernel(hw),
            **plan.meta(int64),
        )
        out.finish(hw, int64)
    return avg, mx, arg


def spatial_pool(x, channel_gate):
    """pooled (N, 2, H, W) acc = [mean_c, max_c] of x * channel_gate, argmax (N, H, W) int64."""
    op = "spatial_pool"
    check_x(x, op)
    x, cl = layout(x)
    n, c, h, w, hw = _dims(x)
    acc = acc_dtype(x.dtype)
    gate = small(channel_gate, (n, c), x, acc, op, "channel_gate")
    pooled = torch.empty((n, 2, h, w), dtype=acc, device=x.device)
    arg = torch.empty((n, h, w), dtype=torch.int64, device=x.device)
    if n * hw == 0:
        return pooled, arg
    if c == 0:
        raise ValueError(f"{op}: cannot pool over an empty C (x has shape {tuple(x.shape)})")
    plan = ReductionPlan(x, cl, over_hw=False)
    out = Outputs(plan.n_split, n, hw, pooled[:, 0], pooled[:, 1], arg, n_stride=2 * hw, idx_n_stride=hw)
    int64 = need_int64(x, pooled, out.sum, out.idx)
    with device_guard(x):
        _spatial_pool_kernel[plan.grid](
            x, gate, out.sum, out.max, out.idx, *plan.args, out.split_stride, out.sn, out.isn, out.div_in_kernel(c),
            **plan.meta(int64),
        )
        out.finish(c, int64)
    return pooled, arg


def apply_gates(x, channel_gate, spatial_gate):
    """y = x * channel_gate[n, c] (* spatial_gate[n, h, w]), in x's dtype and memory format."""
    op = "apply_gates"
    check_x(x, op)
    x, cl = layout(x)
    n, c, h, w, hw = _dims(x)
    acc = acc_dtype(x.dtype)
    cg = small(channel_gate, (n, c), x, acc, op, "channel_gate")
    ms = None if spatial_gate is None else small(spatial_gate, (n, h, w), x, acc, op, "spatial_gate")
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    launch_elementwise(
        _apply_gates_kernels, x, cl,
        x, y, cg, cg if ms is None else ms,
        HAS_SPATIAL=ms is not None, INT64=need_int64(x),
    )
    return y


def spatial_gate_grad(grad, x, channel_gate):
    """d_spatial_gate[n, h, w] = sum_c grad * x * channel_gate[n, c]: (N, H, W) acc."""
    op = "spatial_gate_grad"
    check_x(x, op)
    x, cl = layout(x)
    grad = full_like_x(grad, x, cl, op, "grad")
    n, c, h, w, hw = _dims(x)
    acc = acc_dtype(x.dtype)
    gate = small(channel_gate, (n, c), x, acc, op, "channel_gate")
    if n * hw == 0 or c == 0:
        return torch.zeros((n, h, w), dtype=acc, device=x.device)
    result = torch.empty((n, h, w), dtype=acc, device=x.device)
    plan = ReductionPlan(x, cl, over_hw=False)
    out = Outputs(plan.n_split, n, hw, out_sum=result)
    int64 = need_int64(x, out.sum)
    with device_guard(x):
        _spatial_gate_grad_kernel[plan.grid](
            grad, x, gate, out.sum, *plan.args, out.split_stride, out.sn, **plan.meta(int64),
        )
        out.finish(1, int64)
    return result


def _spatial_terms(op, x, n, c, h, w, acc, spatial_gate, grad_pooled, spatial_argmax):
    if spatial_gate is None:
        return None, None, None
    if grad_pooled is None or spatial_argmax is None:
        raise ValueError(f"{op}: spatial_gate needs grad_pooled and spatial_argmax as well")
    ms = small(spatial_gate, (n, h, w), x, acc, op, "spatial_gate")
    gp = small(grad_pooled, (n, 2, h, w), x, acc, op, "grad_pooled")
    sarg = index_map(spatial_argmax, (n, h, w), x, op, "spatial_argmax")
    return ms, gp, sarg


def channel_gate_grad(grad, x, spatial_gate, grad_pooled, spatial_argmax):
    """d_channel_gate[n, c] = sum_hw g1 * x (g1: see csrc/ops.cpp): (N, C) acc."""
    op = "channel_gate_grad"
    check_x(x, op)
    x, cl = layout(x)
    grad = full_like_x(grad, x, cl, op, "grad")
    n, c, h, w, hw = _dims(x)
    acc = acc_dtype(x.dtype)
    ms, gp, sarg = _spatial_terms(op, x, n, c, h, w, acc, spatial_gate, grad_pooled, spatial_argmax)
    if n * c == 0 or hw == 0:
        return torch.zeros((n, c), dtype=acc, device=x.device)
    result = torch.empty((n, c), dtype=acc, device=x.device)
    plan = ReductionPlan(x, cl, over_hw=True)
    out = Outputs(plan.n_split, n, c, out_sum=result)
    int64 = need_int64(x, gp, out.sum)
    has_spatial = ms is not None
    with device_guard(x):
        _channel_gate_grad_kernel[plan.grid](
            grad, x, ms if has_spatial else result, gp if has_spatial else result,
            sarg if has_spatial else result, out.sum, *plan.args, out.split_stride, out.sn,
            HAS_SPATIAL=has_spatial, **plan.meta(int64),
        )
        out.finish(1, int64)
    return result


def cbam_input_grad(grad, x, channel_gate, spatial_gate, grad_pooled, spatial_argmax, grad_avg, grad_max, channel_argmax):
    """dx = g1 * channel_gate + grad_avg / HW + grad_max * onehot(channel_argmax), in x's dtype and
    memory format (see csrc/ops.cpp)."""
    op = "cbam_input_grad"
    check_x(x, op)
    x, cl = layout(x)
    grad = full_like_x(grad, x, cl, op, "grad")
    n, c, h, w, hw = _dims(x)
    acc = acc_dtype(x.dtype)
    cg = small(channel_gate, (n, c), x, acc, op, "channel_gate")
    ms, gp, sarg = _spatial_terms(op, x, n, c, h, w, acc, spatial_gate, grad_pooled, spatial_argmax)
    gavg = None if grad_avg is None else small(grad_avg, (n, c), x, acc, op, "grad_avg")
    gmax = carg = None
    if grad_max is not None:
        if channel_argmax is None:
            raise ValueError(f"{op}: grad_max needs channel_argmax as well")
        gmax = small(grad_max, (n, c), x, acc, op, "grad_max")
        carg = index_map(channel_argmax, (n, c), x, op, "channel_argmax")
    dx = torch.empty_like(x)
    if dx.numel() == 0:
        return dx
    launch_elementwise(
        _cbam_input_grad_kernels, x, cl,
        grad, dx, cg,
        cg if ms is None else ms, cg if gp is None else gp, cg if sarg is None else sarg,
        cg if gavg is None else gavg, cg if gmax is None else gmax, cg if carg is None else carg,
        HAS_SPATIAL=ms is not None, HAS_AVG=gavg is not None, HAS_MAX=gmax is not None,
        INT64=need_int64(x, gp),
    )
    return dx
