"""The registered ops: kernel fakes for the compiled library, and the fused module ops with autograd."""
from attnkern.ops import bam, cbam, kernel_fakes  # noqa: F401
