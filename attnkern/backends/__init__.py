"""Backends: named sets of kernels with one signature (see csrc/ops.cpp and torch_kernels.py).

    cpu     C++ kernels of attnkern._C (CPU tensors)
    cuda    CUDA C++ kernels of attnkern._C (CUDA tensors)
    triton  Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
    torch   plain PyTorch, any device: the reference the others are tested against

A backend is one module exposing the kernel functions; registering it here is all it takes.
"""
import functools
import importlib
import importlib.util
import os
import types

import torch

from attnkern import _extension
from attnkern.backends import torch_kernels

BACKENDS = ("cpu", "cuda", "triton", "torch")

KERNEL_NAMES = (
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
)


def _with_fallbacks(kernels):
    """A backend's kernels, with the torch definition standing in for any it does not implement."""
    return types.SimpleNamespace(**{name: kernels.get(name, getattr(torch_kernels, name)) for name in KERNEL_NAMES})


@functools.cache
def _compiled_kernels(dispatch_key):
    ops = torch.ops.attnkern
    return _with_fallbacks({n: getattr(ops, n) for n in KERNEL_NAMES if _extension.has_kernel(dispatch_key, n)})


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_kernels():
    """The Triton kernels (imported on first use: importing Triton is slow). Each file holds one module's kernels."""
    merged = {}
    for module in ("attnkern.backends.triton_cbam", "attnkern.backends.triton_bam", "attnkern.backends.triton_spatial_conv"):
        try:
            merged.update({k: v for k, v in vars(importlib.import_module(module)).items() if k in KERNEL_NAMES})
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return _with_fallbacks(merged)


def _supports(backend, device_type):
    if backend == "torch":
        return True
    if backend == "cpu":
        return device_type == "cpu" and _extension.has_kernel("CPU")
    if backend == "cuda":
        return device_type == "cuda" and _extension.has_kernel("CUDA")
    if backend == "triton":
        if device_type == "cpu" and not triton_interpreted():
            return False
        return device_type in ("cuda", "cpu") and importlib.util.find_spec("triton") is not None
    return False


# What "auto" picks, per device type: the first available. On CUDA the CUDA C++ kernels come
# before Triton until a GPU measurement in benchmarks/ says otherwise (see benchmarks/NOTES.md).
_PREFERENCE = {
    "cpu": ("cpu", "torch", "triton"),
    "cuda": ("cuda", "triton", "torch"),
    "other": ("torch",),
}

# Decided once, at import (the compiled kernels are registered by then), so that resolving a
# backend inside torch.compile is a dictionary lookup rather than a dispatcher query.
_AVAILABLE = {
    device_type: tuple(b for b in preference if _supports(b, device_type))
    for device_type, preference in _PREFERENCE.items()
}


# The compiled backends with whole-op kernels (attnkern::cbam_fused_* and bam_fused_*: a fused
# module's entire forward or backward in one call, see csrc/ops.cpp), decided at import like
# _AVAILABLE. The others run the composition of the kernels above in attnkern/ops/.
_WHOLE_OP = frozenset(
    b for b in ("cpu", "cuda")
    if all(_extension.has_kernel(b.upper(), op) for op in ("cbam_fused_forward", "bam_fused_forward"))
)


def has_whole_op(backend):
    """Whether a concrete backend runs a fused module's forward and backward as one op each."""
    return backend in _WHOLE_OP


def available_backends(device="cpu"):
    """The backends that can run on `device` here, fastest first."""
    device_type = torch.device(device).type
    return list(_AVAILABLE.get(device_type, _AVAILABLE["other"]))


def check_backend_name(backend):
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    return backend


def resolve(backend, device):
    """The backend that runs a tensor on `device`: `backend` itself, or auto's pick."""
    check_backend_name(backend)
    device_type = torch.device(device).type
    if backend == "auto":
        return available_backends(device)[0]
    if backend not in _AVAILABLE.get(device_type, _AVAILABLE["other"]):
        reason = ""
        if backend in ("cpu", "cuda") and _extension.LOAD_ERROR is not None:
            reason = f" (attnkern._C failed to load: {_extension.LOAD_ERROR})"
        elif backend == "triton" and device_type == "cpu":
            reason = " (Triton runs CPU tensors only with TRITON_INTERPRET=1 set before importing triton)"
        raise RuntimeError(
            f"backend {backend!r} cannot run {device_type} tensors here{reason}; "
            f"available for {device_type}: {available_backends(device)}"
        )
    return backend


def get_kernels(backend):
    """The kernel namespace of a concrete backend name."""
    if backend == "torch":
        return torch_kernels
    if backend in ("cpu", "cuda"):
        return _compiled_kernels(backend.upper())
    if backend == "triton":
        return _triton_kernels()
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

