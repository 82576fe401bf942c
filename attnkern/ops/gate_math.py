"""The small per-sample math between the full-size passes, forward and hand-written backward.

It runs on (N, C) vectors and (N, *, H, W) maps (a C-th of the input or less), in the "acc" dtype,
with ATen ops, so every backend shares it. The backward is written out rather than traced so that
the fused ops need no autograd inside them; tests hold it against the reference's autograd.
"""
import torch
import torch.nn.functional as F


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _param_grad(grad, param, like):
    """A parameter's gradient in its own dtype; an empty tensor stands for 'no such parameter'."""
    return like.new_empty(0) if param is None else grad.to(param.dtype)


def mlp_forward(pools, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """Shared MLP over the stacked pooled vectors: logits = sum_p fc2(relu(fc1(p))).

    pools is (P, N, C); returns (gate = sigmoid(logits), hidden (P, N, Ch) after ReLU)."""
    acc = pools.dtype
    hidden = F.relu(F.linear(pools, fc1_weight.to(acc), _cast(fc1_bias, acc)))
    logits = F.linear(hidden, fc2_weight.to(acc), _cast(fc2_bias, acc)).sum(dim=0)
    return torch.sigmoid(logits), hidden


def mlp_backward(grad_gate, gate, pools, hidden, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """Returns (grad_pools (P, N, C), d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias)."""
    acc = pools.dtype
    num_pools = pools.shape[0]
    grad_logits = grad_gate * gate * (1 - gate)  # (N, C), shared by every pool type
    grad_fc2_weight = grad_logits.T @ hidden.sum(dim=0)
    grad_fc2_bias = grad_logits.sum(dim=0) * num_pools
    grad_hidden = (grad_logits @ fc2_weight.to(acc)).unsqueeze(0) * (hidden > 0)
    grad_fc1_weight = grad_hidden.flatten(0, 1).T @ pools.flatten(0, 1)
    grad_fc1_bias = grad_hidden.sum(dim=(0, 1))
    grad_pools = grad_hidden @ fc1_weight.to(acc)
    return (
        grad_pools,
        _param_grad(grad_fc1_weight, fc1_weight, pools),
        _param_grad(grad_fc1_bias, fc1_bias, pools),
        _param_grad(grad_fc2_weight, fc2_weight, pools),
        _param_grad(grad_fc2_bias, fc2_bias, pools),
    )


def _batch_stats(logits, keepdim=False):
    """Biased (var, mean) per channel over (N, H, W); zeros for an empty batch instead of NaN.
    Two passes over a (C, N*H*W) view: several times faster than torch.var_mean over (0, 2, 3) here."""
    channels = logits.shape[1]
    shape = (1, channels, 1, 1) if keepdim else (channels,)
    if logits.numel() == 0:
        return logits.new_zeros(shape), logits.new_zeros(shape)
    flat = logits.transpose(0, 1).reshape(channels, -1)
    mean = flat.mean(dim=1)
    var = (flat - mean[:, None]).square().mean(dim=1)
    return var.view(shape), mean.view(shape)


def spatial_forward(kernels, pooled, conv_weight, conv_bias, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, bn_training):
    """Ms = sigmoid(BN(conv(pooled))) on the (N, 2, H, W) pooled map (conv: kernels.spatial_conv).

    BN (when bn_weight is given) normalises with batch statistics in training and running
    statistics otherwise. Returns (Ms (N, H, W), the conv's output (N, 1, H, W), batch_mean,
    batch_var): the biased batch statistics the caller folds into the running ones, empty when
    not training."""
    acc = pooled.dtype
    conv_out = logits = kernels.spatial_conv(pooled, conv_weight.to(acc), _cast(conv_bias, acc))
    batch_mean, batch_var = pooled.new_empty(0), pooled.new_empty(0)  # distinct: op outputs may not alias
    if bn_weight is not None:
        if bn_training:
            batch_var, batch_mean = _batch_stats(logits)
            mean, var = batch_mean, batch_var
        else:
            mean, var = bn_mean.to(acc), bn_var.to(acc)
        scale = bn_weight.to(acc) * torch.rsqrt(var + bn_eps)
        logits = (logits - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + bn_bias.to(acc).view(1, -1, 1, 1)
    return torch.sigmoid(logits[:, 0]), conv_out, batch_mean, batch_var


def spatial_backward(kernels, grad_gate, gate, pooled, conv_out, conv_weight, conv_bias, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, bn_training):
    """conv_out is spatial_forward's conv output. Returns (grad_pooled (N, 2, H, W), d conv_weight,
    d conv_bias, d bn_weight, d bn_bias)."""
    acc = pooled.dtype
    weight = conv_weight.to(acc)
    grad_logits = (grad_gate * gate * (1 - gate)).unsqueeze(1)  # (N, 1, H, W)
    grad_bn_weight = grad_bn_bias = None
    if bn_weight is not None:
        if bn_training:
            var, mean = _batch_stats(conv_out, keepdim=True)
        else:
            mean, var = bn_mean.to(acc).view(1, -1, 1, 1), bn_var.to(acc).view(1, -1, 1, 1)
        invstd = torch.rsqrt(var + bn_eps)
        normalized = (conv_out - mean) * invstd
        grad_bn_weight = (grad_logits * normalized).sum(dim=(0, 2, 3))
        grad_bn_bias = grad_logits.sum(dim=(0, 2, 3))
        grad_normalized = grad_logits * bn_weight.to(acc).view(1, -1, 1, 1)
        if bn_training:
            grad_normalized = (
                grad_normalized
                - grad_normalized.mean(dim=(0, 2, 3), keepdim=True)
                - normalized * (grad_normalized * normalized).mean(dim=(0, 2, 3), keepdim=True)
            )
        grad_logits = grad_normalized * invstd
    grad_pooled, grad_conv_weight = kernels.spatial_conv_backward(grad_logits, pooled, weight)
    grad_conv_bias = grad_logits.sum(dim=(0, 2, 3)) if conv_bias is not None else None
    return (
        grad_pooled,
        _param_grad(grad_conv_weight, conv_weight, pooled),
        _param_grad(grad_conv_bias, conv_bias, pooled),
        _param_grad(grad_bn_weight, bn_weight, pooled),
        _param_grad(grad_bn_bias, bn_bias, pooled),
    )
