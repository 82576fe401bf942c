"""Fused nn.Modules: drop-in replacements for those in attnkern.reference."""
from attnkern.modules.bam import BAM
from attnkern.modules.cbam import CBAM, SE, ChannelGate, SpatialGate

__all__ = ["BAM", "CBAM", "SE", "ChannelGate", "SpatialGate"]
