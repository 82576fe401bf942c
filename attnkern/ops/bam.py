"""attnkern::bam, the fused BAM op, and its backward.

    y = x * (1 + sigmoid(Mc op Ms)),  op = * (product, the authors' code) or + (sum, the paper)
    Mc = fc2(relu(BN1d(fc1(avg_hw(x)))))                      (N, C)
    Ms = final(relu(BN(dil(... relu(BN(reduce(x))) ...))))    (N, H, W)

A backend with whole-op kernels (bam_fused_forward / bam_fused_backward: the C++ CPU backend,
csrc/cpu/bam_fused_cpu.cpp, the functions below call for call) runs each direction as one call.

Both branches are the same kind of stack: [conv, BN, ReLU] * L followed by a conv with no BN.
The channel MLP is that stack on the (N, C, 1, 1) pooled vector with 1x1 convs (BatchNorm1d on
(N, Ch) is BatchNorm on (N, Ch, 1, 1)); the spatial branch is it on x, with the 3x3 convs dilated.

Forward: one read of x for the average (channel_pool), one for the 1x1 reduce conv (an ATen GEMM
over x, in x's dtype; every later layer works on C/r channels in the acc dtype), and
y = bam_combine(x, Mc, Ms): one read + one write. The full-size attention is never formed.
Backward: bam_combine_backward gives (dMc, dMs) in one pass over (grad, x); the two small stacks
are differentiated with explicit ATen backward ops (convolution_backward,
native_batch_norm_backward); the reduce conv's backward reads x once for its weight gradient and
writes its input gradient (full size, x's dtype), which bam_input_grad adds into
dx = grad * (1 + M) + d avg / HW + that partial. The 1x1 convs (the MLP's included) are GEMMs,
forward and backward (_pointwise).

BatchNorm: in training each BN normalises with batch statistics, which the op returns (biased
variance) for the module to fold into its running buffers; the op never mutates (and the bias of the
conv before such a BN cancels out of the output, so its gradient is returned as an exact zero). In
eval each BN is folded into the conv before it (W' = W * s, b' = (b - mean) * s + beta,
s = gamma / sqrt(var + eps)), so the layer is one conv; its backward runs the conv backward with W'
and maps the result back:
dW = dW' * s, db = db' * s, dbeta = db', dgamma = (<W, dW'> + (b - mean) . db') / sqrt(var + eps),
which needs no division by gamma.

Saved for backward: x, the parameters, the (N, C) average and Mc, the (N, H, W) Ms, and each hidden
layer's pre-ReLU map (pre-BN in training, post-BN in eval): (N, C/r, H, W) in the acc dtype per
spatial layer. Activations after ReLU are recomputed from them.

Argument layout: `weights` / `biases` hold [fc1, fc2, reduce, dilated..., final] (fc weights 2-D,
the rest conv weights); the BN lists hold [channel bn, reduce bn, dilated bns...]. A running-stats
entry is read only where bn_training is False.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkern import _extension
from attnkern.backends import get_kernels, has_whole_op
from attnkern.backends.torch_kernels import acc_dtype
from attnkern.ops.common import dense, like_x, refuse_double_backward, without_autocast

CHANNEL_LAYERS = 2  # fc1, fc2 lead `weights` and `biases`; the spatial convs follow


def _as_conv(weight):
    """A Linear weight (out, in) as a 1x1 conv weight; conv weights pass through."""
    return weight.view(*weight.shape, 1, 1) if weight.dim() == 2 else weight


def _padding(weight, dilation):
    return [dilation * (weight.shape[-2] // 2), dilation * (weight.shape[-1] // 2)]


def _is_pointwise(weight):
    return weight.shape[-2:] == (1, 1)


def _pixel_rows(t):
    """t (N, C, H, W) as (N*H*W, C) rows: a free view for channels_last, a copy otherwise."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _pointwise(a, weight):
    """A 1x1 convolution (no bias) as one GEMM in the layout a is stored in. ATen's CPU conv2d is
    slow here: ~50 us of setup even on (N, C, 1, 1) maps, and 2.5x a GEMM's time for the
    256 -> 16 reduce conv on 2x256x56x56 (benchmarks/NOTES.md). The output keeps a's layout.
    NCHW maps take bmm with the weight broadcast over the batch: matmul(2-D, 3-D) folds the batch
    into rows through transposed copies of the full-size operand (1.5 ms a call on 2x1024x14x14).
    (N, C, 1, 1) vectors are pixel rows already, and one mm."""
    n, ci, h, w = a.shape
    matrix = weight.reshape(weight.shape[0], ci)
    if a.is_contiguous() and h * w > 1:
        return torch.bmm(matrix.expand(n, -1, -1), a.view(n, ci, h * w)).view(n, matrix.shape[0], h, w)
    return (_pixel_rows(a) @ matrix.t()).view(n, h, w, matrix.shape[0]).permute(0, 3, 1, 2)


def _pointwise_backward(grad, a, weight):
    """(grad wrt a, grad wrt weight) of _pointwise(a, weight)."""
    n, ci, h, w = a.shape
    co = weight.shape[0]
    matrix = weight.reshape(co, ci)
    if a.is_contiguous() and grad.is_contiguous() and h * w > 1:
        grad_rows, a_rows = grad.view(n, co, h * w), a.view(n, ci, h * w)
        grad_a = torch.bmm(matrix.t().expand(n, -1, -1), grad_rows).view(n, ci, h, w)
        grad_weight = torch.bmm(grad_rows, a_rows.transpose(1, 2)).sum(0)
    else:
        grad_rows, a_rows = _pixel_rows(grad), _pixel_rows(a)
        grad_a = (grad_rows @ matrix).view(n, h, w, ci).permute(0, 3, 1, 2)
        grad_weight = grad_rows.t() @ a_rows
    return grad_a, grad_weight.view(weight.shape)


def _conv_nobias(a, weight, dilation):
    if _is_pointwise(weight):
        return _pointwise(a, weight)
    return F.conv2d(a, weight, None, padding=_padding(weight, dilation), dilation=dilation)


def _conv(a, weight, bias, dilation, acc):
    """conv(a) in a's dtype, output in acc: the full-size first layer of the spatial branch reads x
    in its own dtype (no full-size upcast; the conv accumulates in float32) and adds the bias in acc."""
    return _conv_nobias(a, weight.to(a.dtype), dilation).to(acc) + _channel(bias.to(acc))


def _conv_backward(grad, a, weight, dilation):
    """(grad wrt a, grad wrt weight) of _conv_nobias(a, weight, dilation)."""
    if _is_pointwise(weight):
        return _pointwise_backward(grad, a, weight)
    grad_a, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, a, weight, None, [1, 1], _padding(weight, dilation), [dilation, dilation], False, [0, 0], 1,
        [True, True, False],
    )
    return grad_a, grad_weight


class _BN(NamedTuple):
    weight: Tensor
    bias: Tensor
    mean: Tensor  # running statistics in the forward; in the backward, those it normalised with
    var: Tensor
    eps: float
    training: bool


def _bn_affine(bn, mean, var, acc):
    """BN as y = z * scale + shift for the given statistics; also returns invstd."""
    invstd = torch.rsqrt(var.to(acc) + bn.eps)
    scale = bn.weight.to(acc) * invstd
    return scale, bn.bias.to(acc) - mean.to(acc) * scale, invstd


def _channel(t):
    return t.view(1, -1, 1, 1)


def _stack_forward(inp, weights, biases, bns, dilation, acc):
    """[conv, BN, ReLU] per entry of bns, then the final conv. Returns (logits, hidden, batch means,
    batch vars): hidden[k] is layer k's pre-ReLU map, pre-BN in training and BN-folded in eval;
    the statistics are empty for eval BNs."""
    a, hidden, means, variances = inp, [], [], []
    for weight, bias, bn in zip(weights, biases, bns):
        if bn.training:
            z = _conv(a, weight, bias, dilation, acc)
            # ATen's BN kernel: 3-8x faster than var_mean over (N, H, W) on these maps. The biased
            # variance comes back from its invstd (exact to rounding: var + eps is what it inverted).
            pre, mean, invstd = torch.native_batch_norm(
                z, bn.weight.to(acc), bn.bias.to(acc), None, None, True, 0.0, bn.eps
            )
            var = invstd.pow(-2) - bn.eps
            hidden.append(z)
            means.append(mean)
            variances.append(var)
        else:
            scale, shift, _ = _bn_affine(bn, bn.mean, bn.var, acc)
            folded = weight.to(acc) * scale.view(-1, 1, 1, 1)
            pre = _conv(a, folded, bias.to(acc) * scale + shift, dilation, acc)
            hidden.append(pre)
            means.append(inp.new_empty(0, dtype=acc))  # distinct: op outputs may not alias
            variances.append(inp.new_empty(0, dtype=acc))
        a = torch.relu(pre)
    return _conv(a, weights[-1], biases[-1], dilation, acc), hidden, means, variances


def _stack_backward(grad_logits, inp, weights, biases, bns, hidden, dilation, acc):
    """The backward of _stack_forward; bns carry the statistics each BN normalised with.
    Returns (grad wrt inp, in inp's dtype; d weights; d biases; d bn weights; d bn biases), acc."""
    num_hidden = len(bns)
    affine = [_bn_affine(bn, bn.mean, bn.var, acc) for bn in bns]
    acts = [inp]
    for bn, (scale, shift, _), pre in zip(bns, affine, hidden):
        if bn.training:  # hidden is pre-BN
            pre = torch.addcmul(_channel(shift), pre, _channel(scale))
        acts.append(torch.relu(pre))
    grad_weights, grad_biases = [None] * (num_hidden + 1), [None] * (num_hidden + 1)
    grad_gammas, grad_betas = [None] * num_hidden, [None] * num_hidden
    g = grad_logits
    for k in reversed(range(num_hidden + 1)):
        weight = weights[k].to(acc)
        conv_weight = weight
        bn = bns[k] if k < num_hidden else None
        if bn is not None:
            scale, _, invstd = affine[k]
            g = torch.ops.aten.threshold_backward(g, acts[k + 1], 0)  # ReLU: g is now the grad wrt the BN output
            if bn.training:
                g, grad_gammas[k], grad_betas[k] = torch.ops.aten.native_batch_norm_backward(
                    g, hidden[k], bn.weight.to(acc), None, None, bn.mean.to(acc), invstd, True, bn.eps, [True, True, True]
                )
            else:
                conv_weight = weight * scale.view(-1, 1, 1, 1)
        a_in = acts[k]
        grad_in, grad_weight = _conv_backward(g.to(a_in.dtype), a_in, conv_weight.to(a_in.dtype), dilation)
        grad_weight = grad_weight.to(acc)
        if bn is not None and bn.training:
            # A bias before a batch-statistics BN cancels out of the output: its gradient is exactly
            # zero (summing g would return only rounding noise, large where the batch variance is small).
            grad_bias = g.new_zeros(g.shape[1])
        else:
            grad_bias = g.sum(dim=(0, 2, 3))
        if bn is not None and not bn.training:  # eval: map the folded conv's grads back
            centred_bias = biases[k].to(acc) - bn.mean.to(acc)
            grad_gammas[k] = ((weight * grad_weight).sum(dim=(1, 2, 3)) + centred_bias * grad_bias) * invstd
            grad_betas[k] = grad_bias
            grad_weight, grad_bias = grad_weight * scale.view(-1, 1, 1, 1), grad_bias * scale
        grad_weights[k], grad_biases[k] = grad_weight, grad_bias
        g = grad_in
    return g, grad_weights, grad_biases, grad_gammas, grad_betas


def _bn_tuples(bn_weights, bn_biases, bn_means, bn_vars, bn_eps, bn_training):
    return [_BN(*fields) for fields in zip(bn_weights, bn_biases, bn_means, bn_vars, bn_eps, bn_training)]


def _check_layout(weights, biases, bns):
    if len(weights) != len(biases) or len(weights) < CHANNEL_LAYERS + 2 or len(bns) != len(weights) - 2:
        raise ValueError(
            f"attnkern::bam: expected weights/biases [fc1, fc2, reduce, dilated..., final] and BNs "
            f"[channel, reduce, dilated...]; got {len(weights)} weights, {len(biases)} biases, {len(bns)} BNs"
        )


@torch.library.custom_op("attnkern::bam", mutates_args=())
@without_autocast
def bam(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    bn_weights: list[Tensor],
    bn_biases: list[Tensor],
    bn_running_means: list[Tensor],
    bn_running_vars: list[Tensor],
    bn_eps: list[float],
    bn_training: list[bool],
    dilation: int,
    product: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Returns (y, avg (N, C), Mc (N, C), Ms (N, H, W), hidden maps, BN batch means, BN batch vars)."""
    if has_whole_op(backend):
        return torch.ops.attnkern.bam_fused_forward(
            x, weights, biases, bn_weights, bn_biases, bn_running_means, bn_running_vars, bn_eps, bn_training,
            dilation, product,
        )
    return _bam_forward(x, weights, biases, bn_weights, bn_biases, bn_running_means, bn_running_vars, bn_eps,
                        bn_training, dilation, product, backend)


def _bam_forward(x, weights, biases, bn_weights, bn_biases, bn_running_means, bn_running_vars, bn_eps, bn_training,
                 dilation, product, backend):
    kernels = get_kernels(backend)
    x = dense(x)
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    bns = _bn_tuples(bn_weights, bn_biases, bn_running_means, bn_running_vars, bn_eps, bn_training)
    _check_layout(weights, biases, bns)
    avg = kernels.channel_pool(x)[0]
    channel_weights = [_as_conv(wt) for wt in weights[:CHANNEL_LAYERS]]
    channel_logits, channel_hidden, channel_means, channel_vars = _stack_forward(
        avg.view(n, c, 1, 1), channel_weights, biases[:CHANNEL_LAYERS], bns[:1], 1, acc
    )
    spatial_logits, spatial_hidden, spatial_means, spatial_vars = _stack_forward(
        x, weights[CHANNEL_LAYERS:], biases[CHANNEL_LAYERS:], bns[1:], dilation, acc
    )
    channel_att = channel_logits.reshape(n, c)
    spatial_att = spatial_logits.reshape(n, h, w)
    y = kernels.bam_combine(x, channel_att, spatial_att, product)
    hidden = [t.contiguous() for t in channel_hidden] + [_hidden_layout(t, x) for t in spatial_hidden]
    return y, avg, channel_att, spatial_att, hidden, channel_means + spatial_means, channel_vars + spatial_vars


# Hidden maps of at most this many channels come back NCHW whatever x's layout (csrc/cpu/cpu_ops.h
# kNarrowConvChannels: the C++ kernels run such maps in NCHW), wider ones in x's layout.
NARROW_MAP_CHANNELS = 8


def _hidden_layout(t, x):
    return t.contiguous() if t.shape[1] <= NARROW_MAP_CHANNELS else like_x(t, x)


@bam.register_fake
def _bam_fake(x, weights, biases, bn_weights, bn_biases, bn_running_means, bn_running_vars, bn_eps, bn_training,
              dilation, product, backend=None):
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    x = dense(x)
    hidden = [x.new_empty((n, weights[0].shape[0], 1, 1), dtype=acc)]
    hidden += [_hidden_layout(x.new_empty((n, wt.shape[0], h, w), dtype=acc), x) for wt in weights[CHANNEL_LAYERS:-1]]
    stats = [
        [x.new_empty((gamma.shape[0],) if training else (0,), dtype=acc) for gamma, training in zip(bn_weights, bn_training)]
        for _ in range(2)  # batch means, batch variances
    ]
    return (
        torch.empty_like(x),
        x.new_empty((n, c), dtype=acc),
        x.new_empty((n, c), dtype=acc),
        x.new_empty((n, h, w), dtype=acc),
        hidden,
        *stats,
    )


@torch.library.custom_op("attnkern::bam_backward", mutates_args=())
@without_autocast
def bam_backward(
    grad: Tensor,
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    bn_weights: list[Tensor],
    bn_biases: list[Tensor],
    bn_means: list[Tensor],
    bn_vars: list[Tensor],
    bn_eps: list[float],
    bn_training: list[bool],
    dilation: int,
    product: bool,
    avg: Tensor,
    channel_att: Tensor,
    spatial_att: Tensor,
    hidden: list[Tensor],
    backend: str,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Returns (dx, d weights, d biases, d bn weights, d bn biases), each parameter's gradient in
    its dtype and shape. bn_means / bn_vars are the statistics each BN normalised with: the
    batch's (biased variance) in training, the running ones in eval."""
    if has_whole_op(backend):
        return torch.ops.attnkern.bam_fused_backward(
            grad, x, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, bn_eps, bn_training, dilation,
            product, avg, channel_att, spatial_att, hidden,
        )
    return _bam_backward(grad, x, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, bn_eps, bn_training,
                         dilation, product, avg, channel_att, spatial_att, hidden, backend)


def _bam_backward(grad, x, weights, biases, bn_weights, bn_biases, bn_means, bn_vars, bn_eps, bn_training, dilation,
                  product, avg, channel_att, spatial_att, hidden, backend):
    kernels = get_kernels(backend)
    x = dense(x)
    grad = like_x(grad, x)
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    bns = _bn_tuples(bn_weights, bn_biases, bn_means, bn_vars, bn_eps, bn_training)
    _check_layout(weights, biases, bns)
    grad_channel, grad_spatial = kernels.bam_combine_backward(grad, x, channel_att, spatial_att, product)
    channel_weights = [_as_conv(wt) for wt in weights[:CHANNEL_LAYERS]]
    grad_avg, *channel_grads = _stack_backward(
        grad_channel.view(n, c, 1, 1), avg.view(n, c, 1, 1), channel_weights, biases[:CHANNEL_LAYERS],
        bns[:1], hidden[:1], 1, acc,
    )
    grad_x_partial, *spatial_grads = _stack_backward(
        grad_spatial.view(n, 1, h, w), x, weights[CHANNEL_LAYERS:], biases[CHANNEL_LAYERS:],
        bns[1:], hidden[1:], dilation, acc,
    )
    dx = kernels.bam_input_grad(grad, x, channel_att, spatial_att, product, grad_avg.view(n, c), like_x(grad_x_partial, x))
    grad_weights, grad_biases, grad_gammas, grad_betas = (a + b for a, b in zip(channel_grads, spatial_grads))
    return (
        dx,
        _like_params(grad_weights, weights),
        _like_params(grad_biases, biases),
        _like_params(grad_gammas, bn_weights),
        _like_params(grad_betas, bn_biases),
    )


def _like_params(grads, params):
    """Each gradient in its parameter's dtype and shape, contiguous (as the fake promises)."""
    return [g.to(p.dtype).reshape(p.shape).contiguous() for g, p in zip(grads, params)]


@bam_backward.register_fake
def _bam_backward_fake(grad, x, weights, biases, bn_weights, bn_biases, *_):
    like = [[p.new_empty(p.shape) for p in params] for params in (weights, biases, bn_weights, bn_biases)]
    return (torch.empty_like(dense(x)), *like)


def _setup_context(ctx, inputs, output):
    (x, weights, biases, bn_weights, bn_biases, bn_running_means, bn_running_vars, bn_eps, bn_training,
     dilation, product, backend) = inputs
    _, avg, channel_att, spatial_att, hidden, batch_means, batch_vars = output
    # The statistics each BN normalised with: the batch's (returned by the op) in training, the
    # running buffers in eval (those are updated in place after the op only in training).
    means = [b if t else r for b, r, t in zip(batch_means, bn_running_means, bn_training)]
    variances = [b if t else r for b, r, t in zip(batch_vars, bn_running_vars, bn_training)]
    groups = (weights, biases, bn_weights, bn_biases, means, variances, hidden)
    ctx.save_for_backward(x, avg, channel_att, spatial_att, *(t for group in groups for t in group))
    ctx.sizes = [len(group) for group in groups]
    ctx.config = (bn_eps, bn_training, dilation, product, backend)
    ctx.num_running = len(bn_running_means)
    ctx.mark_non_differentiable(avg, channel_att, spatial_att, *hidden, *batch_means, *batch_vars)


def _backward(ctx, grad, *_unused):
    refuse_double_backward("attnkern::bam")
    x, avg, channel_att, spatial_att, *rest = ctx.saved_tensors
    groups = []
    for size in ctx.sizes:
        groups.append(rest[:size])
        rest = rest[size:]
    weights, biases, bn_weights, bn_biases, means, variances, hidden = groups
    bn_eps, bn_training, dilation, product, backend = ctx.config
    dx, grad_weights, grad_biases, grad_gammas, grad_betas = bam_backward(
        grad, x, weights, biases, bn_weights, bn_biases, means, variances, bn_eps, bn_training, dilation, product,
        avg, channel_att, spatial_att, hidden, backend,
    )
    no_grads = [None] * ctx.num_running  # tensor-list inputs take a list of Nones
    return dx, grad_weights, grad_biases, grad_gammas, grad_betas, no_grads, list(no_grads), None, None, None, None, None


bam.register_autograd(_backward, setup_context=_setup_context)


# The whole-op kernels share these ops' contracts (minus the backend), so their fakes too.
if _extension.LOAD_ERROR is None:
    torch.library.register_fake("attnkern::bam_fused_forward", _bam_fake)
    torch.library.register_fake("attnkern::bam_fused_backward", _bam_backward_fake)


def bam_op(*args, backend):
    """attnkern::bam(*args, backend), or the backend's whole-op kernel itself where it has one, whose
    autograd lives in C++ (csrc/bam_fused_autograd.cpp): the custom op's Python autograd wrapper and
    body cost ~0.3 ms a call."""
    if has_whole_op(backend):
        return torch.ops.attnkern.bam_fused_forward(*args)
    return bam(*args, backend)
