"""attnkern: fused kernels for the CBAM, BAM and SE attention modules."""
from attnkern import reference
from attnkern._extension import LOAD_ERROR as extension_load_error
from attnkern.backends import BACKENDS, available_backends

__all__ = ["BACKENDS", "available_backends", "extension_load_error", "reference"]
__version__ = "0.1.0"
