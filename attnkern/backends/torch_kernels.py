"""The kernels in plain PyTorch: the `torch` backend, and the definition each compiled or Triton
kernel is tested against. Semantics are documented beside the schemas in csrc/ops.cpp."""
import torch

__all__ = [
    "acc_dtype",
    "channel_pool",
    "spatial_pool",
    "apply_gates",
    "spatial_gate_grad",
    "channel_gate_grad",
    "cbam_input_grad",
    "spatial_conv",
    "spatial_conv_backward",
    "bam_combine",
    "bam_combine_backward",
    "bam_input_grad",
]


def acc_dtype(dtype):
    """Accumulation / gate dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(x):
    return x.to(acc_dtype(x.dtype))


def channel_pool(x):
    flat = _acc(x).flatten(2)
    mx, argmax = flat.max(dim=2)
    return flat.mean(dim=2), mx, argmax


def spatial_pool(x, channel_gate):
    x1 = _acc(x) * channel_gate[:, :, None, None]
    mx, argmax = x1.max(dim=1)
    return torch.stack([x1.mean(dim=1), mx], dim=1), argmax


def apply_gates(x, channel_gate, spatial_gate):
    scale = channel_gate[:, :, None, None]
    if spatial_gate is not None:
        scale = scale * spatial_gate[:, None]
    return (_acc(x) * scale).to(x.dtype)


def spatial_gate_grad(grad, x, channel_gate):
    return (_acc(grad) * _acc(x) * channel_gate[:, :, None, None]).sum(dim=1)


def _grad_gated_input(grad, x, spatial_gate, grad_pooled, spatial_argmax):
    """Gradient w.r.t. x1 = x * channel_gate (g1 in csrc/ops.cpp)."""
    g1 = _acc(grad)
    if spatial_gate is None:
        return g1
    g1 = g1 * spatial_gate[:, None]
    channels = x.shape[1]
    g1 = g1 + grad_pooled[:, 0:1] / channels
    onehot = torch.arange(channels, device=x.device)[None, :, None, None] == spatial_argmax[:, None]
    return g1 + grad_pooled[:, 1:2] * onehot


def channel_gate_grad(grad, x, spatial_gate, grad_pooled, spatial_argmax):
    g1 = _grad_gated_input(grad, x, spatial_gate, grad_pooled, spatial_argmax)
    return (g1 * _acc(x)).sum(dim=(2, 3))


def cbam_input_grad(grad, x, channel_gate, spatial_gate, grad_pooled, spatial_argmax, grad_avg, grad_max, channel_argmax):
    g1 = _grad_gated_input(grad, x, spatial_gate, grad_pooled, spatial_argmax)
    dx = g1 * channel_gate[:, :, None, None]
    n, c, h, w = x.shape
    if grad_avg is not None:
        dx = dx + grad_avg[:, :, None, None] / (h * w)
    if grad_max is not None:
        onehot = torch.arange(h * w, device=x.device)[None, None, :] == channel_argmax[:, :, None]
        dx = dx + (grad_max[:, :, None] * onehot).view(n, c, h, w)
    return dx.to(x.dtype)


def spatial_conv(pooled, weight, bias):
    return torch.nn.functional.conv2d(pooled, weight, bias, padding=weight.shape[-1] // 2)


def spatial_conv_backward(grad, pooled, weight):
    pad = weight.shape[-1] // 2
    grad_pooled, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, pooled, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [True, True, False]
    )
    return grad_pooled, grad_weight


def _bam_attention(channel_att, spatial_att, product):
    ca, sa = channel_att[:, :, None, None], spatial_att[:, None]
    return torch.sigmoid(ca * sa if product else ca + sa)


def bam_combine(x, channel_att, spatial_att, product):
    return (_acc(x) * (1 + _bam_attention(channel_att, spatial_att, product))).to(x.dtype)


def bam_combine_backward(grad, x, channel_att, spatial_att, product):
    m = _bam_attention(channel_att, spatial_att, product)
    t = _acc(grad) * _acc(x) * m * (1 - m)
    grad_channel = (t * spatial_att[:, None] if product else t).sum(dim=(2, 3))
    grad_spatial = (t * channel_att[:, :, None, None] if product else t).sum(dim=1)
    return grad_channel, grad_spatial


def bam_input_grad(grad, x, channel_att, spatial_att, product, grad_avg, grad_x_partial):
    dx = _acc(grad) * (1 + _bam_attention(channel_att, spatial_att, product))
    if grad_avg is not None:
        dx = dx + grad_avg[:, :, None, None] / (x.shape[2] * x.shape[3])
    if grad_x_partial is not None:
        dx = dx + grad_x_partial
    return dx.to(x.dtype)
