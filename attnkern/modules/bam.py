"""Fused BAM: the reference module with forward replaced by attnkern::bam (or the backend's whole-op kernel)."""
from attnkern import backends, reference
from attnkern.modules.common import FusedModule, bn_uses_batch_stats, check_bn_batch, lookup, update_running_stats
from attnkern.ops.bam import bam_op
from attnkern.reference import check_input

__all__ = ["BAM", "fused_bam", "bam_op_inputs"]


def _layers(module):
    """(convs and Linears in attnkern::bam's order, BatchNorms in its order)."""
    channel, spatial = lookup(module, "channel"), lookup(module, "spatial")
    convs = [lookup(channel, "fc1"), lookup(channel, "fc2"), lookup(spatial, "reduce"), *lookup(spatial, "dilated"),
             lookup(spatial, "final")]
    return convs, [lookup(channel, "bn"), lookup(spatial, "reduce_bn"), *lookup(spatial, "dilated_bn")]


def bam_op_inputs(module, x):
    """attnkern::bam's arguments, all but backend, for a reference.BAM's parameters and buffers."""
    convs, bns = _layers(module)
    empty = x.new_empty(0)
    running = [(lookup(bn, "running_mean"), lookup(bn, "running_var")) for bn in bns]
    return (
        x,
        [lookup(conv, "weight") for conv in convs],
        [lookup(conv, "bias") for conv in convs],
        [lookup(bn, "weight") for bn in bns],
        [lookup(bn, "bias") for bn in bns],
        [empty if mean is None else mean for mean, _ in running],
        [empty if var is None else var for _, var in running],
        [bn.eps for bn in bns],
        [bn_uses_batch_stats(bn) for bn in bns],
        lookup(module, "spatial").dilation,
        module.combine == "product",
    )


def fused_bam(x, module, backend):
    """y = x * (1 + sigmoid(Mc op Ms)) through attnkern::bam for a reference.BAM's parameters;
    its BatchNorms' running statistics are updated as nn.BatchNorm's would be."""
    backend = backends.resolve(backend, x.device)
    n, _, h, w = x.shape
    _, bns = _layers(module)
    counts = [n] + [n * h * w] * (len(bns) - 1)  # values per channel: BatchNorm1d on (N, Ch), then BatchNorm2d
    for bn, count in zip(bns, counts):
        check_bn_batch(bn, count, type(module).__name__)
    if x.numel() == 0:
        # Nothing to compute, and ATen's BN kernels refuse an empty batch (its backward crashes).
        for bn in bns:
            update_running_stats(bn, None, None, 0)
        return x.clone()
    outputs = bam_op(*bam_op_inputs(module, x), backend=backend)
    for bn, count, mean, var in zip(bns, counts, outputs[5], outputs[6]):
        update_running_stats(bn, mean, var, count)
    return outputs[0]


class BAM(FusedModule, reference.BAM):
    def forward(self, x):
        check_input(x, self.channels, type(self).__name__)
        return fused_bam(x, self, self.backend)
