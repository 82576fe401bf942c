"""What every fused module shares: the backend argument and BatchNorm's running-statistics update."""
import torch

from attnkern.backends import check_backend_name


class FusedModule:
    """Mixin for a reference module: same constructor plus backend=, same state dict."""

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend_name(backend)

    def extra_repr(self):
        inner = super().extra_repr()
        return f"{inner}, backend={self.backend!r}" if inner else f"backend={self.backend!r}"


def lookup(module, name):
    """module.<name> (a parameter, buffer or submodule), read from nn.Module's dicts first: its
    __getattr__ costs ~0.7 us a lookup, and a fused module's call makes 15-40 of them, which was
    20-30 us a call, as much as the CPU kernels of a small input."""
    for store in (module._parameters, module._buffers, module._modules):
        if name in store:
            return store[name]
    return getattr(module, name)


def bn_uses_batch_stats(bn):
    """As nn.BatchNorm does: batch statistics in training, or when there are no running ones."""
    return bn.training or lookup(bn, "running_mean") is None


def check_bn_batch(bn, count, module):
    """nn.BatchNorm's error for a training batch with one value per channel."""
    if bn_uses_batch_stats(bn) and count == 1:
        raise ValueError(f"{module}: expected more than 1 value per channel when training its BatchNorm, got 1")


def update_running_stats(bn, batch_mean, batch_var, count):
    """Folds biased batch statistics over `count` values into bn's running buffers, exactly as
    nn.BatchNorm does in training (momentum, or a cumulative average when momentum is None;
    unbiased variance). An empty batch counts as a batch but leaves the statistics, like nn.BatchNorm."""
    if not (bn.training and bn.track_running_stats):
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        if count == 0:
            return
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        unbiased_var = batch_var * (count / (count - 1))
        bn.running_mean.mul_(1 - momentum).add_(batch_mean.to(bn.running_mean.dtype), alpha=momentum)
        bn.running_var.mul_(1 - momentum).add_(unbiased_var.to(bn.running_var.dtype), alpha=momentum)
