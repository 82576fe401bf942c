"""attnkern::cbam, the fused CBAM / SE / channel-gate / spatial-gate op, and its backward.

Forward, three passes over x (csrc/ops.cpp has the kernels' definitions):
    channel_pool(x) -> MLP -> Mc;  spatial_pool(x, Mc) -> conv/BN -> Ms;  y = apply_gates(x, Mc, Ms)
Backward, three passes over (grad, x):
    spatial_gate_grad -> conv/BN backward -> d pooled;  channel_gate_grad -> MLP backward -> d pools;
    dx = cbam_input_grad(...)
Only x and (N, C)- or (N, H, W)-sized tensors are saved; never the full-size x * Mc.

A backend with whole-op kernels (cbam_fused_forward / cbam_fused_backward: the C++ CPU backend)
runs each direction as one call instead of this composition; called directly (cbam_op), that
forward skips the max pools' argmaxes when no backward will read them.

Outputs: y, then what backward needs: pools (P, N, C) (the used ones of avg, max), channel_argmax
(N, C) when the max pool is used, channel_gate, pooled, spatial_argmax, spatial_gate, conv_out, and
the BN batch statistics; an empty tensor stands for each one a configuration does not have.

A missing channel gate (fc1_weight None) means Mc = 1; a missing spatial gate (conv_weight None)
means Ms = 1; a missing bn_weight means no BatchNorm. The op never mutates: in BN training mode it
returns the biased batch statistics, and the module folds them into its running buffers.
"""
from typing import Optional

import torch
from torch import Tensor

from attnkern import _extension
from attnkern.backends import get_kernels, has_whole_op
from attnkern.backends.torch_kernels import acc_dtype
from attnkern.ops import gate_math
from attnkern.ops.common import dense, like_x, refuse_double_backward, without_autocast


@torch.library.custom_op("attnkern::cbam", mutates_args=())
@without_autocast
def cbam(
    x: Tensor,
    fc1_weight: Optional[Tensor],
    fc1_bias: Optional[Tensor],
    fc2_weight: Optional[Tensor],
    fc2_bias: Optional[Tensor],
    use_avg: bool,
    use_max: bool,
    conv_weight: Optional[Tensor],
    conv_bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    bn_running_mean: Optional[Tensor],
    bn_running_var: Optional[Tensor],
    bn_eps: float,
    bn_training: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if has_whole_op(backend):
        return torch.ops.attnkern.cbam_fused_forward(
            x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, use_avg, use_max, conv_weight, conv_bias,
            bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_eps, bn_training, True,
        )
    kernels = get_kernels(backend)
    x = dense(x)
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    if fc1_weight is not None:
        avg, mx, channel_argmax = kernels.channel_pool(x)
        pools = torch.stack([p for p, used in ((avg, use_avg), (mx, use_max)) if used])
        if not use_max:
            channel_argmax = x.new_empty(0, dtype=torch.long)
        channel_gate, _ = gate_math.mlp_forward(pools, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    else:
        pools, channel_argmax = x.new_empty((0, n, c), dtype=acc), x.new_empty(0, dtype=torch.long)
        channel_gate = x.new_ones((n, c), dtype=acc)
    if conv_weight is not None:
        pooled, spatial_argmax = kernels.spatial_pool(x, channel_gate)
        spatial_gate, conv_out, batch_mean, batch_var = gate_math.spatial_forward(
            kernels, pooled, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_eps, bn_training
        )
    else:
        # Placeholders for absent outputs; each its own tensor, since op outputs may not alias.
        pooled, spatial_gate, conv_out, batch_mean, batch_var = (x.new_empty(0, dtype=acc) for _ in range(5))
        spatial_argmax = x.new_empty(0, dtype=torch.long)
    y = kernels.apply_gates(x, channel_gate, spatial_gate if conv_weight is not None else None)
    return y, pools, channel_argmax, channel_gate, pooled, spatial_argmax, spatial_gate, conv_out, batch_mean, batch_var


@cbam.register_fake
def _cbam_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, use_avg, use_max, conv_weight, conv_bias,
               bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_eps, bn_training, backend):
    return _forward_outputs_like(x, fc1_weight, use_avg, use_max, conv_weight, bn_weight, bn_training, need_argmax=True)


def _cbam_fused_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, use_avg, use_max, conv_weight, conv_bias,
                     bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_eps, bn_training, need_argmax):
    return _forward_outputs_like(x, fc1_weight, use_avg, use_max, conv_weight, bn_weight, bn_training, need_argmax)


def _forward_outputs_like(x, fc1_weight, use_avg, use_max, conv_weight, bn_weight, bn_training, need_argmax):
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    has_channel, has_spatial = fc1_weight is not None, conv_weight is not None
    num_pools = int(use_avg) + int(use_max) if has_channel else 0
    stats = 1 if has_spatial and bn_weight is not None and bn_training else 0
    return (
        torch.empty_like(dense(x)),
        x.new_empty((num_pools, n, c), dtype=acc),
        x.new_empty((n, c) if has_channel and use_max and need_argmax else (0,), dtype=torch.long),
        x.new_empty((n, c), dtype=acc),
        x.new_empty((n, 2, h, w) if has_spatial else (0,), dtype=acc),
        x.new_empty((n, h, w) if has_spatial and need_argmax else (0,), dtype=torch.long),
        x.new_empty((n, h, w) if has_spatial else (0,), dtype=acc),
        x.new_empty((n, 1, h, w) if has_spatial else (0,), dtype=acc),
        x.new_empty((stats,), dtype=acc),
        x.new_empty((stats,), dtype=acc),
    )


@torch.library.custom_op("attnkern::cbam_backward", mutates_args=())
@without_autocast
def cbam_backward(
    grad: Tensor,
    x: Tensor,
    fc1_weight: Optional[Tensor],
    fc1_bias: Optional[Tensor],
    fc2_weight: Optional[Tensor],
    fc2_bias: Optional[Tensor],
    conv_weight: Optional[Tensor],
    conv_bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    bn_running_mean: Optional[Tensor],
    bn_running_var: Optional[Tensor],
    bn_eps: float,
    bn_training: bool,
    pools: Tensor,
    channel_argmax: Tensor,
    channel_gate: Tensor,
    pooled: Tensor,
    spatial_argmax: Tensor,
    spatial_gate: Tensor,
    conv_out: Tensor,
    use_avg: bool,
    use_max: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias, d conv_weight, d conv_bias,
    d bn_weight, d bn_bias); an empty tensor for each absent parameter."""
    if has_whole_op(backend):
        return torch.ops.attnkern.cbam_fused_backward(
            grad, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, bn_weight, bn_bias,
            bn_running_mean, bn_running_var, bn_eps, bn_training, pools, channel_argmax, channel_gate, pooled,
            spatial_argmax, spatial_gate, conv_out, use_avg, use_max,
        )
    kernels = get_kernels(backend)
    x = dense(x)
    grad = like_x(grad, x)
    acc = acc_dtype(x.dtype)
    if conv_weight is not None:
        grad_spatial_gate = kernels.spatial_gate_grad(grad, x, channel_gate)
        grad_pooled, *spatial_param_grads = gate_math.spatial_backward(
            kernels, grad_spatial_gate, spatial_gate, pooled, conv_out, conv_weight, conv_bias,
            bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_eps, bn_training,
        )
        spatial_args = (spatial_gate, grad_pooled, spatial_argmax)
    else:
        spatial_param_grads = [x.new_empty(0, dtype=acc) for _ in range(4)]  # distinct: outputs may not alias
        spatial_args = (None, None, None)
    grad_avg = grad_max = None
    if fc1_weight is not None:
        grad_channel_gate = kernels.channel_gate_grad(grad, x, *spatial_args)
        _, hidden = gate_math.mlp_forward(pools, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        grad_pools, *mlp_param_grads = gate_math.mlp_backward(
            grad_channel_gate, channel_gate, pools, hidden, fc1_weight, fc1_bias, fc2_weight, fc2_bias
        )
        grad_pools = list(grad_pools.unbind(0))
        grad_avg = grad_pools.pop(0) if use_avg else None
        grad_max = grad_pools.pop(0) if use_max else None
    else:
        mlp_param_grads = [x.new_empty(0, dtype=acc) for _ in range(4)]
    dx = kernels.cbam_input_grad(
        grad, x, channel_gate, *spatial_args, grad_avg, grad_max, channel_argmax if grad_max is not None else None
    )
    return (dx, *mlp_param_grads, *spatial_param_grads)


@cbam_backward.register_fake
def _cbam_backward_fake(grad, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias,
                        bn_weight, bn_bias, *_):
    params = (fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, bn_weight, bn_bias)
    acc = acc_dtype(x.dtype)
    return (torch.empty_like(dense(x)), *[x.new_empty(0, dtype=acc) if p is None else torch.empty_like(p) for p in params])


# The whole-op kernels share these ops' contracts (minus the backend), so their fakes too.
if _extension.LOAD_ERROR is None:
    torch.library.register_fake("attnkern::cbam_fused_forward", _cbam_fused_fake)
    torch.library.register_fake("attnkern::cbam_fused_backward", _cbam_backward_fake)


def _setup_context(ctx, inputs, output):
    (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, use_avg, use_max, conv_weight, conv_bias,
     bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_eps, bn_training, backend) = inputs
    _, pools, channel_argmax, channel_gate, pooled, spatial_argmax, spatial_gate, conv_out, _, _ = output
    # Training-mode BN normalises with batch statistics (recomputed in backward); the running
    # buffers are updated in place after this op, so they are saved only when they are used.
    running = (None, None) if bn_training else (bn_running_mean, bn_running_var)
    ctx.save_for_backward(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, bn_weight, bn_bias, *running,
        pools, channel_argmax, channel_gate, pooled, spatial_argmax, spatial_gate, conv_out,
    )
    ctx.config = (bn_eps, bn_training, use_avg, use_max, backend)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad, *_unused):
    refuse_double_backward("attnkern::cbam")
    saved = ctx.saved_tensors
    bn_eps, bn_training, use_avg, use_max, backend = ctx.config
    x, params, running, internals = saved[0], saved[1:9], saved[9:11], saved[11:]
    grads = cbam_backward(grad, x, *params, *running, bn_eps, bn_training, *internals, use_avg, use_max, backend)
    dx, param_grads = grads[0], [None if p is None else g for p, g in zip(params, grads[1:])]
    fc1w, fc1b, fc2w, fc2b, convw, convb, bnw, bnb = param_grads
    return dx, fc1w, fc1b, fc2w, fc2b, None, None, convw, convb, bnw, bnb, None, None, None, None, None


cbam.register_autograd(_backward, setup_context=_setup_context)


def cbam_op(*args, backend):
    """attnkern::cbam(*args, backend), or the backend's whole-op kernel itself where it has one. That
    op carries its autograd in C++ (csrc/cbam_fused_autograd.cpp): the custom op's Python autograd
    wrapper costs ~0.1 ms a call, more than the CPU kernels at small ResNet sizes."""
    if has_whole_op(backend):
        # need_argmax=False: the op's autograd kernel computes the argmaxes when a backward follows.
        return torch.ops.attnkern.cbam_fused_forward(*args, False)
    return cbam(*args, backend)
