"""Helpers shared by the fused ops."""
import functools

import torch


def dense(t):
    """t itself when it is NCHW- or channels_last-contiguous (what the kernels read natively), else a copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def like_x(t, x):
    """t in x's memory format, so that kernels reading both walk them the same way."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def without_autocast(op_impl):
    """Runs an op's implementation with autocast off: the op chooses its own dtypes (float32 gates
    and small maps), which an enclosing autocast would otherwise recast to bf16 / fp16. The first
    argument is a tensor on the op's device."""

    @functools.wraps(op_impl)
    def wrapper(first, *args):
        with torch.autocast(first.device.type, enabled=False):
            return op_impl(first, *args)

    return wrapper


def refuse_double_backward(op_name):
    """The backward ops have no derivative of their own: create_graph=True must fail with an error
    that says what to do, not drop the second-order terms (or fail on a missing formula)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op_name}: double backward (create_graph=True) is not supported; use the reference modules "
            "in attnkern.reference for higher-order gradients"
        )
