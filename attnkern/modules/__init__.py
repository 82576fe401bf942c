"""Fused nn.Modules: drop-in replacements for those in attnkern.reference."""
from attnkern.modules.cbam import CBAM, SE, ChannelGate, SpatialGate

__all__ = ["CBAM", "SE", "ChannelGate", "SpatialGate"]
