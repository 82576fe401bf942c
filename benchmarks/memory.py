"""Memory measurements: bytes saved for backward (saved_tensors_hooks) and peak CUDA memory."""
import torch

__all__ = ["SavedBytes", "saved_bytes", "peak_cuda_bytes"]


class SavedBytes:
    """Unique storages saved for backward during a forward, in bytes: `total` (everything),
    `activations` (all but the parameters' storages: what the forward adds to memory while the
    graph lives, the input included) and `extra` (also without the input's storage)."""

    def __init__(self, total, activations, extra, count):
        self.total, self.activations, self.extra, self.count = total, activations, extra, count


def _storage_key(t):
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr()), storage.nbytes()


def _keys(tensors):
    return {_storage_key(t)[0] for t in tensors if isinstance(t, torch.Tensor) and t.numel() > 0}


def saved_bytes(forward, inputs=(), params=()):
    """Runs forward() (which must build an autograd graph) under saved_tensors_hooks and counts
    each saved storage once. Returns (SavedBytes, forward's result)."""
    input_keys, param_keys = _keys(inputs), _keys(params)
    sizes = {}

    def pack(t):
        try:
            if t.numel() > 0 and t.device.type != "meta":
                key, nbytes = _storage_key(t)
                sizes[key] = max(nbytes, sizes.get(key, 0))
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    total = sum(sizes.values())
    activations = sum(v for k, v in sizes.items() if k not in param_keys)
    extra = sum(v for k, v in sizes.items() if k not in param_keys and k not in input_keys)
    return SavedBytes(total, activations, extra, len(sizes)), out


def peak_cuda_bytes(fn, device):
    """Peak CUDA memory allocated while fn() runs, above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak
