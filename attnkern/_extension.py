"""Loads the compiled library attnkern._C, whose import registers the C++/CUDA kernels."""
import torch

try:
    from attnkern import _C  # noqa: F401
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = exc
else:
    LOAD_ERROR = None


def has_kernel(dispatch_key, op="channel_pool"):
    """Whether attnkern::<op> has a compiled kernel for the dispatch key ("CPU", "CUDA")."""
    if LOAD_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"attnkern::{op}", dispatch_key)
