"""attnkern: fused kernels for the CBAM, BAM and SE attention modules.

    attnkern.CBAM, SE, BAM, ChannelGate, SpatialGate   fused modules (backend="auto"|"cpu"|"cuda"|"triton"|"torch")
    attnkern.reference                            the plain-PyTorch modules they are tested against
    attnkern.available_backends(device)           what can run here, fastest first
    attnkern.models.resnet50(attention=...)       ResNets with CBAM / BAM / SE (the authors' layout)
    attnkern.convert_model(model)                 swap CBAM / BAM / SE modules for the fused ones
"""
from attnkern import models, ops, reference  # noqa: F401  (ops registers attnkern::* with torch.library)
from attnkern._extension import LOAD_ERROR as extension_load_error
from attnkern.backends import BACKENDS, available_backends
from attnkern.convert import convert_model
from attnkern.modules import BAM, CBAM, SE, ChannelGate, SpatialGate

__all__ = [
    "BACKENDS",
    "BAM",
    "CBAM",
    "SE",
    "ChannelGate",
    "SpatialGate",
    "available_backends",
    "convert_model",
    "extension_load_error",
    "models",
    "reference",
]
__version__ = "0.1.0"
