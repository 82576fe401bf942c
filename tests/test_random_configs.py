"""Fused modules against attnkern.reference on configurations drawn at random (fixed seeds): module
kind, constructor options, channels, reduction, shape, memory format and train / eval together, in
float64 (outputs, every gradient and the BN buffers). The hand-picked configs in test_cbam.py and
test_bam.py cover each kernel path; these catch the combinations nobody listed (e.g. BAM with three
dilated convs on a 1-pixel-wide map, or CBAM with a 1x1 spatial conv and max pooling only).

Low precision is left to the hand-picked tests: with random configs, bf16 / fp16 rounding flips ReLU
masks and BatchNorm's batch variance of a width-1 hidden layer, and the reference's own low-precision
gradients then differ from float64 by as much as the fused ones do."""
import random

import pytest
import torch

from conftest import backend_device_pairs
from test_cbam import FORMATS, assert_matches, make_modules

# The compiled backends (the torch backend is the kernels' definition; interpreted Triton is too
# slow for maps of this size).
PAIRS = [p for p in backend_device_pairs() if p.values[0] in ("cpu", "cuda")]
SEEDS = range(120)


def random_config(seed):
    """(module name, constructor args, kwargs, input shape, train, memory format)."""
    rng = random.Random(seed)
    pick = rng.choice
    name = pick(["CBAM", "CBAM", "SE", "ChannelGate", "SpatialGate", "BAM", "BAM"])
    channels = pick([1, 2, 3, 5, 8, 9, 15, 16, 17, 31, 33, 64, 100, 129, rng.randint(1, 260)])
    reduction = min(channels, pick([1, 2, 4, 8, 16, 32]))
    shape = (
        pick([1, 2, 3, 5]),
        channels,
        pick([1, 2, 3, 5, 7, 9, 13, 17, 28, rng.randint(1, 40)]),
        pick([1, 3, 6, 7, 17, 28, rng.randint(1, 40)]),
    )
    if name == "CBAM":
        args = (channels, reduction, pick([1, 3, 5, 7]))
        kwargs = {
            "pool_types": pick([("avg", "max"), ("avg",), ("max",), ("max", "avg")]),
            "spatial": pick([True, True, False]),
            "mlp_bias": pick([True, False]),
            "spatial_norm": pick([True, False]),
        }
    elif name == "SE":
        args, kwargs = (channels, reduction), {"bias": pick([True, False])}
    elif name == "ChannelGate":
        args = (channels, reduction)
        kwargs = {"pool_types": pick([("avg", "max"), ("avg",), ("max",)]), "bias": pick([True, False])}
    elif name == "SpatialGate":
        args, kwargs = (pick([1, 3, 7, 9]),), {"norm": pick([True, False])}
    else:
        args = (channels, reduction)
        kwargs = {"dilation": pick([1, 2, 4, 5]), "num_dilated": pick([0, 1, 2, 3]), "combine": pick(["sum", "product"])}
    n, _, h, w = shape
    # Training-mode BN needs more than one value per channel: BAM's BatchNorm1d sees N values, the
    # BatchNorm2d layers N * H * W.
    one_value = n == 1 if name == "BAM" else n * h * w == 1
    train = pick([True, False]) and not one_value
    return name, args, kwargs, shape, train, pick(FORMATS)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_config_matches_reference_float64(backend, device, seed):
    name, args, kwargs, shape, train, fmt = random_config(seed)
    torch.manual_seed(seed)
    ref, fused = make_modules(name, args, kwargs, backend, device)
    try:
        assert_matches(ref, fused, torch.randn(shape, dtype=torch.float64), torch.float64, fmt, device, train)
    except AssertionError as e:
        raise AssertionError(f"{name}{args}{kwargs} {shape} train={train} {fmt}: {e}") from None
