"""Fake (meta) kernels for the compiled kernel ops of csrc/ops.cpp, so they trace and opcheck."""
import torch

from attnkern import _extension
from attnkern.backends.torch_kernels import acc_dtype


def _acc_empty(x, shape):
    return x.new_empty(shape, dtype=acc_dtype(x.dtype))


def _register():
    fake = torch.library.register_fake

    @fake("attnkern::channel_pool")
    def _(x):
        n, c = x.shape[:2]
        return _acc_empty(x, (n, c)), _acc_empty(x, (n, c)), x.new_empty((n, c), dtype=torch.long)

    @fake("attnkern::spatial_pool")
    def _(x, channel_gate):
        n, _, h, w = x.shape
        return _acc_empty(x, (n, 2, h, w)), x.new_empty((n, h, w), dtype=torch.long)

    @fake("attnkern::apply_gates")
    def _(x, channel_gate, spatial_gate):
        return torch.empty_like(x)

    @fake("attnkern::spatial_gate_grad")
    def _(grad, x, channel_gate):
        n, _, h, w = x.shape
        return _acc_empty(x, (n, h, w))

    @fake("attnkern::channel_gate_grad")
    def _(grad, x, spatial_gate, grad_pooled, spatial_argmax):
        return _acc_empty(x, x.shape[:2])

    @fake("attnkern::cbam_input_grad")
    def _(grad, x, *_):
        return torch.empty_like(x)

    @fake("attnkern::spatial_conv")
    def _(pooled, weight, bias):
        n, _, h, w = pooled.shape
        return pooled.new_empty((n, 1, h, w))

    @fake("attnkern::spatial_conv_backward")
    def _(grad, pooled, weight):
        # Contiguous, as every kernel returns them (empty_like would copy a strided input's strides).
        return pooled.new_empty(pooled.shape), weight.new_empty(weight.shape)

    @fake("attnkern::bam_combine")
    def _(x, channel_att, spatial_att, product):
        return torch.empty_like(x)

    @fake("attnkern::bam_combine_backward")
    def _(grad, x, channel_att, spatial_att, product):
        n, c, h, w = x.shape
        return _acc_empty(x, (n, c)), _acc_empty(x, (n, h, w))

    @fake("attnkern::bam_input_grad")
    def _(grad, x, *_):
        return torch.empty_like(x)

    @fake("attnkern::transpose_layout")
    def _(t, channels_last):
        return torch.empty_like(t, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


if _extension.LOAD_ERROR is None:
    _register()
