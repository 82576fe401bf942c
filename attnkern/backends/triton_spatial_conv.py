"""Triton kernels of CBAM's spatial convolution: the k x k "same" (zero-padded) convolution of the
small pooled map, pooled (N, Cin, H, W) * weight (1, Cin, k, k) (+ bias) -> (N, 1, H, W), and its
backward without the bias term -> (grad_pooled (N, Cin, H, W), grad_weight (1, Cin, k, k)).

Semantics: csrc/ops.cpp; reference: attnkern/backends/torch_kernels.py (same names and positional
signatures); the CPU C++ version: csrc/cpu/spatial_conv_cpu.cpp. pooled, weight and grad share one
dtype, float32 or float64 (the acc dtype of the fused op); k is odd and a constexpr, Cin is any
(small) count. The maps are small (N*Cin*H*W, not N*C*H*W), so the kernels aim at simple, exact
index math rather than peak bandwidth; inputs are made contiguous (a copy only when they are not).

Kernels and their programs (KP = next power of two >= k; the tap axes are padded to KP, masked):
  _correlate_kernel     out[n, co] = sum_{ci, i, j} tap[co, ci, i, j] * in[n, ci, h +- (i - k/2),
                        w +- (j - k/2)]: one program per (n, co, row-block, col-block) tile of the
                        output, consecutive lanes on consecutive columns. Per tap row i it forms the
                        shifted offsets and the padding mask once (the masks are the zero padding),
                        then per input channel loads the k taps of the row for every output pixel
                        as one [BLOCK_H, BLOCK_W, KP] tile (overlapping loads hit L1) and reduces it
                        along the tap axis, in registers. Forward: in = pooled, one output channel,
                        ci over Cin. Backward grad_pooled: the same kernel with the roles swapped,
                        in = grad (one channel), co over Cin, and FLIP: the correlation of grad
                        with the spatially flipped taps. weight (1, Cin, k, k) is read in place as
                        the (Cout, Cin', k, k) tap array of either case: nothing is flipped or copied.
  _weight_grad_kernel   grad_weight[0, c, i, j] = sum_{n, h, w} grad[n, 0, h, w] * pooled[n, c,
                        h + i - k/2, w + j - k/2], a reduction over N*H*W per tap. One program per
                        (input channel c, split of the flat N*H*W axis) loops over its range in
                        blocks of BLOCK elements with all k*k taps of c in a [KP, KP, BLOCK] tile
                        (each grad value is read once per c), and reduces across lanes once at
                        the end. Cin programs cannot fill a GPU, so N*H*W is split (split_plan);
                        the (n_split, Cin*k*k) partials are combined in split order by
                        triton_utils.finish_kernel. No atomics: deterministic.
Why vectorise the tap axes rather than unroll the k*k taps as scalar-times-tile steps: on the GPU
the same loads (masked lanes of the KP padding load nothing) and about the same flops, with the
tap axis held in each thread's registers (checked in the sm_90 TTGIR: no shuffles or barriers in
the loop); under the interpreter, which runs every Triton op as several NumPy calls, k (or k*k)
times fewer ops, and the CBAM tests run these kernels there.
Offsets are int32 unless a tensor of the launch has 2**31 elements or more (constexpr INT64, from
numel on the host). No wrapper synchronises with the host (CUDA-graph safe).
"""
import torch
import triton
import triton.language as tl

from attnkern.backends import triton_interpreted
from attnkern.backends.triton_utils import (
    Outputs,
    cdiv,
    check_x,
    device_guard,
    need_int64,
    next_pow2,
    split_plan,
)

__all__ = ["spatial_conv", "spatial_conv_backward"]

CONV_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _correlate_kernel(in_ptr, tap_ptr, bias_ptr, out_ptr, CIN, COUT, H, W, n_hb, n_wb,
                      K: tl.constexpr, KP: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      INT64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """out (N, COUT, H, W) = zero-padded correlation of in (N, CIN, H, W) with taps (COUT, CIN, K, K);
    FLIP reads the input at h - (i - K//2), w - (j - K//2) (correlation with the flipped taps).
    The k taps of a tap row are one [BLOCK_H, BLOCK_W, KP] load, reduced along the tap axis."""
    PAD: tl.constexpr = K // 2
    pid = tl.program_id(0)
    wb = pid % n_wb
    t = pid // n_wb
    hb = t % n_hb
    t = t // n_hb
    co = t % COUT
    n = t // COUT
    acc_ty = out_ptr.dtype.element_ty
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    HW = H * W
    if INT64:
        n = n.to(tl.int64)
        h = h.to(tl.int64)
        w = w.to(tl.int64)
        HW = H.to(tl.int64) * W
    # Tap column q reads input column w + K//2 - q: tap j = q under FLIP, else j = K-1-q. The
    # columns decrease along q in both cases, which keeps Triton's layout from spreading the q axis
    # over lanes or warps (it follows contiguous addresses): each thread holds its pixels' q taps
    # and the reduction over q stays in registers (no shuffles or barriers in the loop).
    q = tl.arange(0, KP)
    q_ok = q < K
    ww = w[:, None] + (PAD - q)[None, :]  # [BLOCK_W, KP]
    col_ok = q_ok[None, :] & (ww >= 0) & (ww < W)
    in_base = in_ptr + n * CIN * HW
    if FLIP:
        tap_base = tap_ptr + co * CIN * (K * K) + q
    else:
        tap_base = tap_ptr + co * CIN * (K * K) + (K - 1 - q)

    acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=acc_ty)
    for i in range(K):
        if FLIP:
            hh = h + (PAD - i)
        else:
            hh = h + (i - PAD)
        m = ((hh >= 0) & (hh < H))[:, None, None] & col_ok[None, :, :]
        src = in_base + (hh[:, None, None] * W + ww[None, :, :])
        for ci in range(CIN):  # offsets and padding mask shared by the input channels
            v = tl.load(src + ci * HW, mask=m, other=0.0)
            tap = tl.load(tap_base + (ci * (K * K) + i * K), mask=q_ok, other=0.0)
            acc += tl.sum(v * tap[None, None, :], axis=2)

    if HAS_BIAS:
        acc += tl.load(bias_ptr)
    out_mask = (h < H)[:, None] & (w < W)[None, :]
    out_off = (n * COUT + co) * HW + h[:, None] * W + w[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _weight_grad_kernel(g_ptr, p_ptr, part_ptr, CIN, H, W, total, per_split, n_split, split_stride,
                        K: tl.constexpr, KP: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """part[s, c, i, j] = sum over split s of the flat (n, h, w) axis of grad[n, 0, h, w] *
    pooled[n, c, h + i - K//2, w + j - K//2]; program (input channel c, split s), all k*k taps
    of c at once in a [KP, KP, BLOCK] tile."""
    PAD: tl.constexpr = K // 2
    pid = tl.program_id(0)
    s = pid % n_split
    c = pid // n_split
    if INT64:
        s = s.to(tl.int64)
    begin = s * per_split
    end = tl.minimum(begin + per_split, total)
    acc_ty = part_ptr.dtype.element_ty
    HW = H * W
    if INT64:
        HW = H.to(tl.int64) * W
    k_idx = tl.arange(0, KP)
    k_ok = k_idx < K
    d = k_idx - PAD  # the tap's row (i) or column (j) shift

    acc = tl.zeros([KP, KP, BLOCK], dtype=acc_ty)
    for start in range(begin, end, BLOCK):
        e = start + tl.arange(0, BLOCK)
        e_ok = e < end
        n = e // HW
        hw = e - n * HW
        h = hw // W
        w = hw - h * W
        g = tl.load(g_ptr + e, mask=e_ok, other=0.0)
        hh = h[None, :] + d[:, None]  # [KP (i), BLOCK]
        ww = w[None, :] + d[:, None]  # [KP (j), BLOCK]
        row_ok = k_ok[:, None] & e_ok[None, :] & (hh >= 0) & (hh < H)
        col_ok = k_ok[:, None] & (ww >= 0) & (ww < W)
        rows = (n * CIN + c)[None, :] * HW + hh * W
        v = tl.load(p_ptr + (rows[:, None, :] + ww[None, :, :]),
                    mask=row_ok[:, None, :] & col_ok[None, :, :], other=0.0)
        acc += g[None, None, :] * v

    taps = c * (K * K) + k_idx[:, None] * K + k_idx[None, :]
    tl.store(part_ptr + s * split_stride + taps, tl.sum(acc, axis=2), mask=k_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def _check_conv_args(op, pooled, weight):
    """pooled (N, Cin, H, W) and weight (1, Cin, k, k), k odd, one float32/float64 dtype, one device."""
    check_x(pooled, op, "pooled")
    if pooled.dtype not in CONV_DTYPES:
        raise TypeError(f"{op}: pooled has dtype {pooled.dtype}; expected float32 or float64 (the acc dtype)")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
    cin = pooled.shape[1]
    shape = tuple(weight.shape)
    if weight.dim() != 4 or shape[0] != 1 or shape[1] != cin or shape[2] != shape[3] or shape[2] % 2 != 1:
        raise ValueError(f"{op}: weight must be (1, {cin}, k, k) with k odd, got shape {shape}")
    if weight.dtype != pooled.dtype:
        raise TypeError(f"{op}: pooled and weight must share one dtype, got {pooled.dtype} and {weight.dtype}")
    if weight.device != pooled.device:
        raise ValueError(f"{op}: weight is on {weight.device} but pooled is on {pooled.device}")
    return pooled.contiguous(), weight.contiguous()


def _check_bias(op, bias, pooled):
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.numel() != 1:
        raise ValueError(f"{op}: bias must have one element, got shape {tuple(bias.shape)}")
    if not bias.is_floating_point():
        raise TypeError(f"{op}: bias has dtype {bias.dtype}; expected a floating dtype")
    if bias.device != pooled.device:
        raise ValueError(f"{op}: bias is on {bias.device} but pooled is on {pooled.device}")
    return bias.reshape(1).to(pooled.dtype).contiguous()


def _tile(h, w):
    """(BLOCK_H, BLOCK_W, num_warps) of a correlation program: up to 64 columns (consecutive lanes
    take consecutive columns) by enough rows for ~256 outputs, two per thread, each with its row of
    KP taps in registers (~70 registers at k = 7, float32, sm_90); small under the interpreter, so
    that the test maps still span several tiles."""
    if triton_interpreted():
        return min(next_pow2(h), 8), min(next_pow2(w), 16), 1
    bw = min(next_pow2(w), 64)
    bh = min(next_pow2(h), max(1, 256 // bw))
    return bh, bw, max(1, min(4, bh * bw // 64))


def _correlate(inp, taps, bias, out, cin, cout, k, flip):
    n, _, h, w = inp.shape
    bh, bw, warps = _tile(h, w)
    n_hb, n_wb = cdiv(h, bh), cdiv(w, bw)
    _correlate_kernel[(n * cout * n_hb * n_wb,)](
        inp, taps, out if bias is None else bias, out, cin, cout, h, w, n_hb, n_wb,
        K=k, KP=next_pow2(k), FLIP=flip, HAS_BIAS=bias is not None, INT64=need_int64(inp, out),
        BLOCK_H=bh, BLOCK_W=bw, num_warps=warps,
    )


def spatial_conv(pooled, weight, bias):
    """out (N, 1, H, W) = bias + sum_{c,i,j} weight[0,c,i,j] * pooled[n,c,h+i-k/2,w+j-k/2], zero padding."""
    op = "spatial_conv"
    pooled, weight = _check_conv_args(op, pooled, weight)
    bias = _check_bias(op, bias, pooled)
    n, cin, h, w = pooled.shape
    k = weight.shape[-1]
    out = torch.empty((n, 1, h, w), dtype=pooled.dtype, device=pooled.device)
    if out.numel() == 0:
        return out
    with device_guard(pooled):
        _correlate(pooled, weight, bias, out, cin, 1, k, flip=False)
    return out


def spatial_conv_backward(grad, pooled, weight):
    """(grad_pooled (N, Cin, H, W), grad_weight (1, Cin, k, k)) of spatial_conv, without the bias term."""
    op = "spatial_conv_backward"
    pooled, weight = _check_conv_args(op, pooled, weight)
    n, cin, h, w = pooled.shape
    k = weight.shape[-1]
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"{op}: grad must be a torch.Tensor, got {type(grad).__name__}")
    if tuple(grad.shape) != (n, 1, h, w):
        raise ValueError(f"{op}: grad has shape {tuple(grad.shape)}, expected {(n, 1, h, w)}")
    if grad.dtype != pooled.dtype:
        raise TypeError(f"{op}: grad has dtype {grad.dtype}; expected pooled's dtype {pooled.dtype}")
    if grad.device != pooled.device:
        raise ValueError(f"{op}: grad is on {grad.device} but pooled is on {pooled.device}")
    grad = grad.contiguous()

    grad_pooled = torch.empty_like(pooled)
    grad_weight = torch.empty_like(weight)
    total = n * h * w
    if total == 0 or cin == 0:
        return grad_pooled, grad_weight.zero_()
    with device_guard(pooled):
        # Input gradient: weight (1, Cin, k, k) read as Cin output channels of one input channel.
        _correlate(grad, weight, None, grad_pooled, 1, cin, k, flip=True)

        interp = triton_interpreted()
        kp = next_pow2(k)
        block = max(16, 2048 // (kp * kp))  # a [KP, KP, BLOCK] tile of 2048 elements
        n_split, per_split = split_plan(total, block, kp * kp, cin, pooled.device)
        taps = cin * k * k
        out = Outputs(n_split, 1, taps, out_sum=grad_weight.view(1, taps))
        int64 = need_int64(pooled, out.sum)
        _weight_grad_kernel[(cin * n_split,)](
            grad, pooled, out.sum, cin, h, w, total, per_split, n_split, out.split_stride,
            K=k, KP=kp, INT64=int64, BLOCK=block, num_warps=1 if interp else 4,
        )
        out.finish(1, int64)
    return grad_pooled, grad_weight
