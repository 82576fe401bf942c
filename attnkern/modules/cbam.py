"""Fused CBAM, SE and their gates: the reference modules with forward replaced by attnkern::cbam."""
from attnkern import backends, reference
from attnkern.modules.common import FusedModule, bn_uses_batch_stats, check_bn_batch, lookup, update_running_stats
from attnkern.ops.cbam import cbam_op
from attnkern.reference import check_input

__all__ = ["ChannelGate", "SpatialGate", "CBAM", "SE", "fused_cbam"]


def fused_cbam(x, channel, spatial, backend):
    """y = x * Mc * Ms through attnkern::cbam; channel (a ChannelGate) or spatial (a SpatialGate) may be None."""
    backend = backends.resolve(backend, x.device)
    channel_args = (None,) * 4 + (False, False)
    if channel is not None:
        fc1, fc2 = lookup(channel, "fc1"), lookup(channel, "fc2")
        channel_args = (
            lookup(fc1, "weight"), lookup(fc1, "bias"), lookup(fc2, "weight"), lookup(fc2, "bias"),
            "avg" in channel.pool_types, "max" in channel.pool_types,
        )
    spatial_args, bn = (None,) * 6 + (0.0, False), None
    if spatial is not None:
        conv, bn = lookup(spatial, "conv"), lookup(spatial, "bn")
        conv_args = (lookup(conv, "weight"), lookup(conv, "bias"))
        if bn is None:
            spatial_args = conv_args + (None,) * 4 + (0.0, False)
        else:
            check_bn_batch(bn, x.shape[0] * x.shape[2] * x.shape[3], "SpatialGate")
            spatial_args = conv_args + (
                lookup(bn, "weight"), lookup(bn, "bias"), lookup(bn, "running_mean"), lookup(bn, "running_var"),
                bn.eps, bn_uses_batch_stats(bn),
            )
    outputs = cbam_op(x, *channel_args, *spatial_args, backend=backend)
    if bn is not None:
        update_running_stats(bn, outputs[8], outputs[9], x.shape[0] * x.shape[2] * x.shape[3])
    return outputs[0]


class ChannelGate(FusedModule, reference.ChannelGate):
    def forward(self, x):
        check_input(x, self.channels, type(self).__name__)
        return fused_cbam(x, self, None, self.backend)


class SE(FusedModule, reference.SE):
    def forward(self, x):
        check_input(x, self.channels, type(self).__name__)
        return fused_cbam(x, self, None, self.backend)


class SpatialGate(FusedModule, reference.SpatialGate):
    def forward(self, x):
        check_input(x, None, type(self).__name__)
        return fused_cbam(x, None, self, self.backend)


class CBAM(FusedModule, reference.CBAM):
    def forward(self, x):
        check_input(x, self.channels, type(self).__name__)
        return fused_cbam(x, lookup(self, "channel"), lookup(self, "spatial"), self.backend)
