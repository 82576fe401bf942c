"""What the benchmark measures: modules, shapes, the implementations compared, and the byte model.

Byte model (minimal traffic a perfect implementation must move; one "pass" = N*C*H*W*itemsize):
    forward           1 read of x + 1 write of y                                   = 2 passes
    forward+backward  forward (2) + 1 read of dy + 1 read of x + 1 write of dx     = 5 passes
The same floor is used for CBAM, SE and BAM (the gates are (N, C) and (N, H, W): negligible), and
it is what the `clone` rows move: x.clone() (2 passes) and, for forward+backward, also dy + x (3).
Achieved GB/s = minimal bytes / time; `x floor` = time / clone's time, the same bytes.
Memory saved for backward (saved_tensors_hooks, each storage once, parameters not counted):
saved_ratio = bytes / one pass (x counts when it is saved), saved_extra_ratio = the same without x.
benchmarks/NOTES.md gives each implementation's actual pass count and flop count.
"""
import copy
from dataclasses import dataclass, field

import torch

import attnkern
from attnkern import reference

__all__ = [
    "MODULES", "MODES", "FORMATS", "DTYPES", "CPU_SHAPES", "GPU_SHAPES", "QUICK_SHAPES",
    "min_passes", "make_reference", "fused_class", "Impl", "build_impls", "parse_shape", "shape_str",
]

MODULES = ("cbam", "bam", "se")
MODES = ("fwd", "fwdbwd")
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
REDUCTION = 16

# ResNet-50 stage outputs (after each stage's blocks; BAM sits on the first three), batch 8 on
# the CPU; the first two are the shapes.
CPU_SHAPES = [
    (8, 256, 28, 28),
    (8, 64, 56, 56),
    (8, 256, 56, 56),
    (8, 512, 28, 28),
    (8, 1024, 14, 14),
    (8, 2048, 7, 7),
]
GPU_SHAPES = [
    (32, 256, 56, 56),
    (32, 512, 28, 28),
    (128, 1024, 14, 14),
    (32, 64, 56, 56),
    (128, 2048, 7, 7),
]
QUICK_SHAPES = [(2, 32, 8, 8), (2, 64, 7, 9)]


def min_passes(mode):
    return 2 if mode == "fwd" else 5


def parse_shape(text):
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 4:
        raise ValueError(f"shape {text!r}: expected NxCxHxW")
    return tuple(int(p) for p in parts)


def shape_str(shape):
    return "x".join(str(s) for s in shape)


def make_reference(module, channels):
    if module == "cbam":
        return reference.CBAM(channels, REDUCTION)
    if module == "se":
        return reference.SE(channels, REDUCTION)
    if module == "bam":
        return reference.BAM(channels, REDUCTION)
    raise ValueError(module)


def fused_class(module):
    """attnkern's fused class for a module name."""
    return {"cbam": attnkern.CBAM, "se": attnkern.SE, "bam": attnkern.BAM}[module]


def randomize_(m):
    """Non-trivial gate weights (the authors' init zeroes CBAM's spatial BN weight, which makes
    the spatial gate constant): BN affine ~ U(0.5, 1.5) / N(0, 0.1), others left as constructed."""
    with torch.no_grad():
        for sub in m.modules():
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm) and sub.affine:
                sub.weight.uniform_(0.5, 1.5)
                sub.bias.normal_(0, 0.1)
    return m


@dataclass
class Impl:
    """One implementation of one case: name (fused:<backend> / eager / compile / clone) and a module
    (None for clone)."""
    name: str
    backend: str
    module: object = None
    params: list = field(default_factory=list)


def build_impls(module, channels, backends, device, dtype, compile_enabled, compile_mode=None):
    """The implementations to compare, all with the same weights. Fused ones for each backend."""
    ref = randomize_(make_reference(module, channels)).to(device=device, dtype=dtype)
    impls = []
    cls = fused_class(module)
    for backend in backends:
        fused = cls(channels, REDUCTION, backend=backend).to(device=device, dtype=dtype)
        fused.load_state_dict(ref.state_dict())
        impls.append(Impl(f"fused:{backend}", backend, fused, list(fused.parameters())))
    impls.append(Impl("eager", "-", ref, list(ref.parameters())))
    if compile_enabled:
        base = copy.deepcopy(ref)
        compiled = torch.compile(base, mode=compile_mode)
        impls.append(Impl("compile", "inductor", compiled, list(base.parameters())))
    impls.append(Impl("clone", "-", None, []))
    return impls
