"""Triton kernels of BAM's combine step y = x * (1 + sigmoid(a)), a = channel_att[n,c] +
spatial_att[n,h,w] (product form: a = channel_att * spatial_att), and its backward.

Semantics: csrc/ops.cpp; reference: attnkern/backends/torch_kernels.py (same names and positional
signatures). Layout, tiling, split reductions and numerics are described in triton_utils.py.

Kernels and their tiles (x is (N, C, HW) with HW = H*W merged):
  bam_combine, bam_input_grad   element-wise: one program per (n, c-block, hw-block) tile,
                                autotuned tile size / warps.
  bam_combine_backward          one pass over (grad, x) for two reductions on different axes.
                                The program loops over the non-contiguous axis and reduces each
                                tile along the contiguous one (within a warp, no shared memory):
                                NCHW: program (n, hw-block, c-split) loops over C; grad_spatial
                                accumulates per lane, grad_channel is one partial per hw-block.
                                NHWC: program (n, c-block, hw-split) loops over HW; grad_channel
                                accumulates per lane, grad_spatial is one partial per c-block.
                                A second small pass sums partials in a fixed order: no atomics,
                                deterministic.
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
    full_like_x,
    launch_elementwise,
    layout,
    need_int64,
    small,
    split_program,
)

__all__ = ["bam_combine", "bam_combine_backward", "bam_input_grad"]


# The loops' index math and the sigmoid are inlined rather than put in @triton.jit helpers: the
# interpreter pays several milliseconds per helper call (the once-per-program prologues share
# split_program / ew_tile). Under INT64 all offsets are int64.


def _bam_combine_kernel(x_ptr, y_ptr, ca_ptr, sa_ptr, C, HW, sn, sc, shw,
                        PRODUCT: tl.constexpr, CL: tl.constexpr, INT64: tl.constexpr,
                        TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n, c, hw, c_mask, hw_mask, mask, off = ew_tile(C, HW, sn, sc, shw, CL, INT64, BLOCK_C, BLOCK_HW)
    acc_ty = ca_ptr.dtype.element_ty
    xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(acc_ty)
    ca = tl.load(ca_ptr + n * C + c, mask=c_mask, other=0.0)
    sa = tl.load(sa_ptr + n * HW + hw, mask=hw_mask, other=0.0)
    a = ca[:, None] * sa[None, :] if PRODUCT else ca[:, None] + sa[None, :]
    m = 1.0 / (1.0 + tl.exp(-a))
    tl.store(y_ptr + off, (xv * (1.0 + m)).to(y_ptr.dtype.element_ty), mask=mask)


_bam_combine_kernels = elementwise(_bam_combine_kernel)


def _bam_input_grad_kernel(g_ptr, y_ptr, ca_ptr, sa_ptr, gavg_ptr, part_ptr, C, HW, sn, sc, shw,
                           PRODUCT: tl.constexpr, HAS_AVG: tl.constexpr, HAS_PARTIAL: tl.constexpr,
                           CL: tl.constexpr, INT64: tl.constexpr,
                           TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n, c, hw, c_mask, hw_mask, mask, off = ew_tile(C, HW, sn, sc, shw, CL, INT64, BLOCK_C, BLOCK_HW)
    acc_ty = ca_ptr.dtype.element_ty
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(acc_ty)
    ca = tl.load(ca_ptr + n * C + c, mask=c_mask, other=0.0)
    sa = tl.load(sa_ptr + n * HW + hw, mask=hw_mask, other=0.0)
    a = ca[:, None] * sa[None, :] if PRODUCT else ca[:, None] + sa[None, :]
    m = 1.0 / (1.0 + tl.exp(-a))
    dx = g * (1.0 + m)
    if HAS_AVG:
        gavg = tl.load(gavg_ptr + n * C + c, mask=c_mask, other=0.0) / HW
        dx = dx + gavg[:, None]
    if HAS_PARTIAL:
        dx = dx + tl.load(part_ptr + off, mask=mask, other=0.0).to(acc_ty)
    tl.store(y_ptr + off, dx.to(y_ptr.dtype.element_ty), mask=mask)


_bam_input_grad_kernels = elementwise(_bam_input_grad_kernel)


@triton.jit
def _bam_backward_c_loop_kernel(g_ptr, x_ptr, ca_ptr, sa_ptr, dc_ptr, ds_ptr,
                                C, HW, sn, sc, shw, per_split, n_hb, n_split, dc_ss, dc_sn, ds_ss, ds_sn,
                                PRODUCT: tl.constexpr, CL: tl.constexpr, INT64: tl.constexpr,
                                BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """NCHW: program (n, hw-block, c-split) loops over C. Each tile's sum over HW (the contiguous,
    intra-warp axis) is one grad_channel partial per hw-block; grad_spatial accumulates per lane."""
    n, hb, s, begin, end = split_program(C, per_split, n_hb, n_split, INT64)
    acc_ty = ds_ptr.dtype.element_ty
    hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    if INT64:
        hb = hb.to(tl.int64)  # also the split index of the grad_channel partials
    hw_o = hw.to(tl.int64) if INT64 else hw
    tile = n * sn + (hw_o[None, :] * shw if CL else hw_o[None, :])
    sa = tl.load(sa_ptr + n * HW + hw, mask=hw_mask, other=0.0)
    ca_base = ca_ptr + n * C
    dc_base = dc_ptr + hb * dc_ss + n * dc_sn

    total = tl.full([BLOCK_C, BLOCK_HW], 0, acc_ty)
    for start in range(begin, end, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_o = c.to(tl.int64) if INT64 else c
        c_mask = c < C
        mask = c_mask[:, None] & hw_mask[None, :]
        off = tile + (c_o[:, None] if CL else c_o[:, None] * sc)
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(acc_ty)
        xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(acc_ty)
        ca = tl.load(ca_base + c, mask=c_mask, other=0.0)
        a = ca[:, None] * sa[None, :] if PRODUCT else ca[:, None] + sa[None, :]
        m = 1.0 / (1.0 + tl.exp(-a))
        tv = g * xv * m * (1.0 - m)  # zero where masked (g = x = 0 there)
        if PRODUCT:
            tl.store(dc_base + c, tl.sum(tv * sa[None, :], axis=1), mask=c_mask)
            total += tv * ca[:, None]
        else:
            tl.store(dc_base + c, tl.sum(tv, axis=1), mask=c_mask)
            total += tv

    tl.store(ds_ptr + s * ds_ss + n * ds_sn + hw, tl.sum(total, axis=0), mask=hw_mask)


@triton.jit
def _bam_backward_hw_loop_kernel(g_ptr, x_ptr, ca_ptr, sa_ptr, dc_ptr, ds_ptr,
                                 C, HW, sn, sc, shw, per_split, n_cb, n_split, dc_ss, dc_sn, ds_ss, ds_sn,
                                 PRODUCT: tl.constexpr, CL: tl.constexpr, INT64: tl.constexpr,
                                 BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """channels_last: program (n, c-block, hw-split) loops over HW. Each tile's sum over C (the
    contiguous, intra-warp axis) is one grad_spatial partial per c-block; grad_channel accumulates
    per lane."""
    n, cb, s, begin, end = split_program(HW, per_split, n_cb, n_split, INT64)
    acc_ty = dc_ptr.dtype.element_ty
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if INT64:
        cb = cb.to(tl.int64)  # also the split index of the grad_spatial partials
    c_o = c.to(tl.int64) if INT64 else c
    tile = n * sn + (c_o[:, None] if CL else c_o[:, None] * sc)
    ca = tl.load(ca_ptr + n * C + c, mask=c_mask, other=0.0)
    sa_base = sa_ptr + n * HW
    ds_base = ds_ptr + cb * ds_ss + n * ds_sn

    total = tl.full([BLOCK_C, BLOCK_HW], 0, acc_ty)
    for start in range(begin, end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_o = hw.to(tl.int64) if INT64 else hw
        hw_mask = hw < HW
        mask = c_mask[:, None] & hw_mask[None, :]
        off = tile + (hw_o[None, :] * shw if CL else hw_o[None, :])
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(acc_ty)
        xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(acc_ty)
        sa = tl.load(sa_base + hw, mask=hw_mask, other=0.0)
        a = ca[:, None] * sa[None, :] if PRODUCT else ca[:, None] + sa[None, :]
        m = 1.0 / (1.0 + tl.exp(-a))
        tv = g * xv * m * (1.0 - m)  # zero where masked (g = x = 0 there)
        if PRODUCT:
            tl.store(ds_base + hw, tl.sum(tv * ca[:, None], axis=0), mask=hw_mask)
            total += tv * sa[None, :]
        else:
            tl.store(ds_base + hw, tl.sum(tv, axis=0), mask=hw_mask)
            total += tv

    tl.store(dc_ptr + s * dc_ss + n * dc_sn + c, tl.sum(total, axis=1), mask=c_mask)


# ----------------------------------------------------------------------------------------------
# Python wrappers
# ----------------------------------------------------------------------------------------------
def _maps(op, x, channel_att, spatial_att, product):
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    if not isinstance(product, (bool, int)):
        raise TypeError(f"{op}: product must be a bool, got {type(product).__name__}")
    ca = small(channel_att, (n, c), x, acc, op, "channel_att")
    sa = small(spatial_att, (n, h, w), x, acc, op, "spatial_att")
    return ca, sa, bool(product), acc


def bam_combine(x, channel_att, spatial_att, product):
    """y = x * (1 + sigmoid(a)) in x's dtype and memory format."""
    op = "bam_combine"
    check_x(x, op)
    x, cl = layout(x)
    ca, sa, product, _ = _maps(op, x, channel_att, spatial_att, product)
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    launch_elementwise(_bam_combine_kernels, x, cl, x, y, ca, sa, PRODUCT=product, INT64=need_int64(x))
    return y


def bam_combine_backward(grad, x, channel_att, spatial_att, product):
    """(grad_channel (N, C), grad_spatial (N, H, W)), both acc: the sums over HW and over C of
    t = grad * x * M * (1 - M) (times the other attention map in the product form)."""
    op = "bam_combine_backward"
    check_x(x, op)
    x, cl = layout(x)
    grad = full_like_x(grad, x, cl, op, "grad")
    ca, sa, product, acc = _maps(op, x, channel_att, spatial_att, product)
    n, c, h, w = x.shape
    hw = h * w
    if x.numel() == 0:
        return (torch.zeros((n, c), dtype=acc, device=x.device), torch.zeros((n, h, w), dtype=acc, device=x.device))
    grad_channel = torch.empty((n, c), dtype=acc, device=x.device)
    grad_spatial = torch.empty((n, h, w), dtype=acc, device=x.device)
    # Loop over the non-contiguous axis; reduce each tile along the contiguous one (intra-warp).
    plan = ReductionPlan(x, cl, over_hw=cl)
    if cl:
        dc = Outputs(plan.n_split, n, c, out_sum=grad_channel)  # one partial per hw-split
        ds = Outputs(plan.n_blocks, n, hw, out_sum=grad_spatial)  # one partial per c-block
        kernel = _bam_backward_hw_loop_kernel
    else:
        dc = Outputs(plan.n_blocks, n, c, out_sum=grad_channel)  # one partial per hw-block
        ds = Outputs(plan.n_split, n, hw, out_sum=grad_spatial)  # one partial per c-split
        kernel = _bam_backward_c_loop_kernel
    int64 = need_int64(x, dc.sum, ds.sum)
    with device_guard(x):
        kernel[plan.grid](
            grad, x, ca, sa, dc.sum, ds.sum, *plan.args, dc.split_stride, dc.sn, ds.split_stride, ds.sn,
            PRODUCT=product, **plan.meta(int64),
        )
        dc.finish(1, int64)
        ds.finish(1, int64)
    return grad_channel, grad_spatial


def bam_input_grad(grad, x, channel_att, spatial_att, product, grad_avg, grad_x_partial):
    """dx = grad * (1 + M) (+ grad_avg[n, c] / HW) (+ grad_x_partial), in x's dtype and format."""
    op = "bam_input_grad"
    check_x(x, op)
    x, cl = layout(x)
    grad = full_like_x(grad, x, cl, op, "grad")
    ca, sa, product, acc = _maps(op, x, channel_att, spatial_att, product)
    n, c = x.shape[:2]
    gavg = None if grad_avg is None else small(grad_avg, (n, c), x, acc, op, "grad_avg")
    part = None if grad_x_partial is None else full_like_x(grad_x_partial, x, cl, op, "grad_x_partial")
    dx = torch.empty_like(x)
    if dx.numel() == 0:
        return dx
    launch_elementwise(
        _bam_input_grad_kernels, x, cl,
        grad, dx, ca, sa, ca if gavg is None else gavg, grad if part is None else part,
        PRODUCT=product, HAS_AVG=gavg is not None, HAS_PARTIAL=part is not None, INT64=need_int64(x),
    )
    return dx
