"""attnkern: fused kernels for the CBAM, BAM and SE attention modules.

    attnkern.CBAM, SE, ChannelGate, SpatialGate   fused modules (backend="auto"|"cpu"|"cuda"|"triton"|"torch")
    attnkern.reference                            the plain-PyTorch modules they are tested against
    attnkern.available_backends(device)           what can run here, fastest first
"""
from attnkern import ops, reference  # noqa: F401  (ops registers attnkern::* with torch.library)
from attnkern._extension import LOAD_ERROR as extension_load_error
from attnkern.backends import BACKENDS, available_backends
from attnkern.modules import BAM, CBAM, SE, ChannelGate, SpatialGate

__all__ = [
    "BACKENDS",
    "BAM",
    "CBAM",
    "SE",
    "ChannelGate",
    "SpatialGate",
    "available_backends",
    "extension_load_error",
    "reference",
]
__version__ = "0.1.0"
