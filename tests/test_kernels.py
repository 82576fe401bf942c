"""Each backend's CBAM kernels against the torch backend's definitions (attnkern/backends/torch_kernels.py),
computed in float64 from the same inputs."""
import pytest
import torch

from attnkern.backends import get_kernels, torch_kernels
from conftest import TOLERANCES, backend_device_pairs, interpreted_triton, kernel_dtypes

PAIRS = backend_device_pairs(include_torch=False)
pytestmark = pytest.mark.usefixtures("poisoned_heap")  # unwritten CPU outputs show

SHAPES = [
    (2, 3, 7, 7),
    (1, 5, 13, 17),
    (3, 16, 1, 1),
    (2, 33, 5, 9),
    (1, 1, 4, 6),
    (2, 130, 3, 11),
    (0, 4, 3, 3),
    # The CPU kernels' work splits: several HW tiles per plane (96 * 96 > 4096 pixels), one sample
    # cut into chunks for two threads (merged partial max / argmax), C in several 256-column blocks.
    (1, 8, 96, 96),
    (2, 300, 9, 9),
]
SMALL_SHAPES = [(2, 3, 7, 7), (1, 5, 13, 17), (3, 6, 1, 1), (1, 1, 4, 6), (2, 33, 3, 5)]
MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last]


def shapes_for(backend, device):
    return SMALL_SHAPES if interpreted_triton(backend, device) else SHAPES


def poison_allocator(device):
    """On CUDA, frees NaN-filled blocks that the caching allocator splits for the next requests, so
    an output element a kernel fails to write reads as NaN and fails the comparison. On the CPU the
    poisoned_heap fixture (conftest.py) does this for every test of this file."""
    if torch.device(device).type != "cuda":
        return
    for numel in (1 << 18, 1 << 12):
        torch.full((numel,), float("nan"), device=device)


def cases(backend, device):
    for shape in shapes_for(backend, device):
        for dtype in kernel_dtypes(backend, device):
            for fmt in MEMORY_FORMATS:
                poison_allocator(device)
                yield shape, dtype, fmt


def make_x(shape, dtype, fmt, device):
    return torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype).contiguous(memory_format=fmt)


def gate(shape, device, dtype, cols):
    acc = torch_kernels.acc_dtype(dtype)
    return torch.rand(shape[0], cols, dtype=torch.float64).to(device=device, dtype=acc)


def spatial_map(shape, device, dtype):
    acc = torch_kernels.acc_dtype(dtype)
    n, _, h, w = shape
    return torch.rand(n, h, w, dtype=torch.float64).to(device=device, dtype=acc)


def to64(t):
    return None if t is None else (t.double() if t.is_floating_point() else t)


def expect_close(actual, expected, dtype, name):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.device == expected.device, f"{name}: device"
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{name}: {m}")


def reference(kernel_name, *args):
    """The torch kernel in float64 on the same (upcast) inputs."""
    return getattr(torch_kernels, kernel_name)(*[to64(a) if isinstance(a, torch.Tensor) else a for a in args])


@pytest.mark.parametrize("backend,device", PAIRS)
def test_channel_pool(backend, device):
    k = get_kernels(backend)
    for shape, dtype, fmt in cases(backend, device):
        x = make_x(shape, dtype, fmt, device)
        avg, mx, arg = k.channel_pool(x)
        ravg, rmx, rarg = reference("channel_pool", x)
        acc = torch_kernels.acc_dtype(dtype)
        assert avg.dtype == acc and mx.dtype == acc and arg.dtype == torch.int64
        expect_close(avg, ravg, dtype, f"avg {shape} {dtype} {fmt}")
        expect_close(mx, rmx, dtype, f"max {shape} {dtype} {fmt}")
        assert torch.equal(arg, rarg), f"argmax {shape} {dtype} {fmt}"


@pytest.mark.parametrize("backend,device", PAIRS)
def test_spatial_pool(backend, device):
    k = get_kernels(backend)
    for shape, dtype, fmt in cases(backend, device):
        x = make_x(shape, dtype, fmt, device)
        g = gate(shape, device, dtype, shape[1])
        pooled, arg = k.spatial_pool(x, g)
        rpooled, rarg = reference("spatial_pool", x, g)
        assert pooled.dtype == torch_kernels.acc_dtype(dtype) and arg.dtype == torch.int64
        expect_close(pooled, rpooled, dtype, f"pooled {shape} {dtype} {fmt}")
        if dtype in (torch.float32, torch.float64):
            assert torch.equal(arg, rarg), f"argmax {shape} {dtype} {fmt}"


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("with_spatial", [True, False])
def test_apply_gates(backend, device, with_spatial):
    k = get_kernels(backend)
    for shape, dtype, fmt in cases(backend, device):
        x = make_x(shape, dtype, fmt, device)
        g = gate(shape, device, dtype, shape[1])
        s = spatial_map(shape, device, dtype) if with_spatial else None
        y = k.apply_gates(x, g, s)
        assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
        expect_close(y, reference("apply_gates", x, g, s), dtype, f"y {shape} {dtype} {fmt}")


@pytest.mark.parametrize("backend,device", PAIRS)
def test_spatial_gate_grad(backend, device):
    k = get_kernels(backend)
    for shape, dtype, fmt in cases(backend, device):
        x, grad = make_x(shape, dtype, fmt, device), make_x(shape, dtype, fmt, device)
        g = gate(shape, device, dtype, shape[1])
        out = k.spatial_gate_grad(grad, x, g)
        expect_close(out, reference("spatial_gate_grad", grad, x, g), dtype, f"dMs {shape} {dtype} {fmt}")


def _spatial_terms(shape, device, dtype):
    n, c, h, w = shape
    acc = torch_kernels.acc_dtype(dtype)
    grad_pooled = torch.randn(n, 2, h, w, dtype=torch.float64).to(device=device, dtype=acc)
    argmax = torch.randint(0, max(c, 1), (n, h, w), device=device)
    return spatial_map(shape, device, dtype), grad_pooled, argmax


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("with_spatial", [True, False])
def test_channel_gate_grad(backend, device, with_spatial):
    k = get_kernels(backend)
    for shape, dtype, fmt in cases(backend, device):
        x, grad = make_x(shape, dtype, fmt, device), make_x(shape, dtype, fmt, device)
        s, gp, arg = _spatial_terms(shape, device, dtype) if with_spatial else (None, None, None)
        out = k.channel_gate_grad(grad, x, s, gp, arg)
        expect_close(out, reference("channel_gate_grad", grad, x, s, gp, arg), dtype, f"dMc {shape} {dtype} {fmt}")


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("with_spatial", [True, False])
@pytest.mark.parametrize("pools", ["avg", "max", "both", "none"])
def test_cbam_input_grad(backend, device, with_spatial, pools):
    k = get_kernels(backend)
    for shape, dtype, fmt in cases(backend, device):
        n, c, h, w = shape
        acc = torch_kernels.acc_dtype(dtype)
        x, grad = make_x(shape, dtype, fmt, device), make_x(shape, dtype, fmt, device)
        g = gate(shape, device, dtype, c)
        s, gp, sarg = _spatial_terms(shape, device, dtype) if with_spatial else (None, None, None)
        grad_avg = torch.randn(n, c, dtype=torch.float64).to(device=device, dtype=acc) if pools in ("avg", "both") else None
        grad_max, carg = None, None
        if pools in ("max", "both"):
            grad_max = torch.randn(n, c, dtype=torch.float64).to(device=device, dtype=acc)
            carg = torch.randint(0, h * w, (n, c), device=device)
        dx = k.cbam_input_grad(grad, x, g, s, gp, sarg, grad_avg, grad_max, carg)
        assert dx.dtype == dtype and dx.is_contiguous(memory_format=fmt)
        expected = reference("cbam_input_grad", grad, x, g, s, gp, sarg, grad_avg, grad_max, carg)
        expect_close(dx, expected, dtype, f"dx {shape} {dtype} {fmt}")


@pytest.mark.parametrize("backend,device", PAIRS)
def test_max_ties_and_nan_pick_first(backend, device):
    """The documented rule: argmax is the first maximal element; NaN counts as maximal."""
    k = get_kernels(backend)
    x = torch.zeros(1, 4, 3, 5, device=device)
    x[0, :, 1, 2] = 7.0
    x[0, :, 2, 4] = 7.0
    x[0, 2, 0, 0] = float("nan")
    x[0, 3, 0, 0] = float("nan")
    avg, mx, arg = k.channel_pool(x)
    assert arg.tolist() == [[7, 7, 0, 0]]
    assert torch.isnan(mx[0, 2:]).all() and mx[0, :2].tolist() == [7.0, 7.0]
    pooled, sarg = k.spatial_pool(x, torch.ones(1, 4, device=device))
    assert sarg[0, 1, 2].item() == 0 and sarg[0, 0, 0].item() == 2
    assert torch.isnan(pooled[0, :, 0, 0]).all()


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("channels", [64, 130, 200, 300, 512, 600])
@pytest.mark.parametrize("size", [(2, 5, 7), (1, 13, 17)])
def test_channel_pool_ties_everywhere(backend, device, channels, size):
    """Small integers, so that most maxima tie, in both layouts and at the C that take the CPU's
    other NHWC walks (several buffer sets for 128 <= C <= 512, column blocks beyond) and map sizes
    that end in partial vectors: argmax is the first maximal pixel, against torch.max; NaN maximal;
    an all -inf channel gives pixel 0."""
    k = get_kernels(backend)
    n, h, w = size
    g = torch.Generator().manual_seed(channels)
    x = torch.randint(0, 4, (2, channels, h, w), generator=g).float()
    x[0, 1] = float("-inf")
    x[1, 2, 3, 1] = float("nan")
    x[1, 3, 0, 2] = float("nan")
    x[1, 3, 4, 6] = float("nan")
    x = x[-n:].to(device)
    ravg, rmx, rarg = reference("channel_pool", x)
    for fmt in MEMORY_FORMATS:
        for dtype in (torch.float32, torch.float64):
            avg, mx, arg = k.channel_pool(x.to(dtype).contiguous(memory_format=fmt))
            torch.testing.assert_close(avg.double(), ravg, equal_nan=True, **TOLERANCES[dtype])
            torch.testing.assert_close(mx.double(), rmx, equal_nan=True)
            assert torch.equal(arg, rarg), f"argmax {fmt} {dtype}"
    assert arg[-1, 2].item() == 3 * w + 1 and arg[-1, 3].item() == 2
    if n == 2:
        assert arg[0, 1].item() == 0


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("channels", [8, 37, 64, 130, 300, 600])
def test_spatial_pool_ties_everywhere(backend, device, channels):
    """The spatial max over C the same way: small integers times gates of 1 or 2 (exact products),
    at C that end in partial vectors and on both sides of the CPU's row lengths with the argmax
    kept in the pass (up to 64 vectors): argmax is the first maximal channel, against torch.max;
    NaN maximal; an all -inf pixel gives channel 0."""
    k = get_kernels(backend)
    g = torch.Generator().manual_seed(channels)
    x = torch.randint(0, 4, (2, channels, 5, 7), generator=g).float()
    x[0, :, 1, 1] = float("-inf")
    x[1, 2, 3, 1] = float("nan")
    x[1, 3, 0, 2] = float("nan")
    x[1, 5, 0, 2] = float("nan")
    gates = torch.randint(1, 3, (2, channels), generator=g).float()
    x, gates = x.to(device), gates.to(device)
    rpooled, rarg = reference("spatial_pool", x, gates)
    for fmt in MEMORY_FORMATS:
        for dtype in (torch.float32, torch.float64):
            pooled, arg = k.spatial_pool(x.to(dtype).contiguous(memory_format=fmt), gates.to(dtype))
            torch.testing.assert_close(pooled.double(), rpooled, equal_nan=True, **TOLERANCES[dtype])
            assert torch.equal(arg, rarg), f"argmax {fmt} {dtype}"
    assert arg[0, 1, 1].item() == 0 and arg[1, 3, 1].item() == 2 and arg[1, 0, 2].item() == 3


@pytest.mark.parametrize("backend,device", PAIRS)
def test_rejects_bad_input(backend, device):
    k = get_kernels(backend)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="4-D"):
        k.channel_pool(torch.randn(2, 3, 4, device=device))
    with pytest.raises((RuntimeError, ValueError, TypeError), match="(?i)float|dtype"):
        k.channel_pool(torch.ones(1, 2, 3, 3, dtype=torch.int32, device=device))


@pytest.mark.parametrize("backend,device", PAIRS)
def test_spatial_conv(backend, device):
    k = get_kernels(backend)
    # k = 3, 5, 7 have register-blocked CPU paths; 1 and 9 (larger than the map) take the generic one.
    cases = [((3, 2, 7, 9), 7), ((2, 2, 1, 1), 7), ((1, 2, 13, 17), 3), ((2, 3, 5, 4), 5), ((0, 2, 4, 4), 7),
             ((1, 1, 3, 2), 9), ((2, 2, 6, 5), 1)]
    for (n, cin, h, w), size in cases:
        for dtype in (torch.float32, torch.float64):
            pooled = torch.randn(n, cin, h, w, dtype=torch.float64).to(device=device, dtype=dtype)
            weight = torch.randn(1, cin, size, size, dtype=torch.float64).to(device=device, dtype=dtype)
            bias = torch.randn(1, dtype=torch.float64).to(device=device, dtype=dtype)
            grad = torch.randn(n, 1, h, w, dtype=torch.float64).to(device=device, dtype=dtype)
            for b in (None, bias):
                expect_close(k.spatial_conv(pooled, weight, b), reference("spatial_conv", pooled, weight, b), dtype, f"conv {h}x{w} k{size}")
            grad_pooled, grad_weight = k.spatial_conv_backward(grad, pooled, weight)
            ref_pooled, ref_weight = reference("spatial_conv_backward", grad, pooled, weight)
            expect_close(grad_pooled, ref_pooled, dtype, f"conv grad_pooled {h}x{w} k{size}")
            expect_close(grad_weight, ref_weight, dtype, f"conv grad_weight {h}x{w} k{size}")


@pytest.mark.parametrize("backend,device", PAIRS)
def test_spatial_conv_strided_inputs_and_determinism(backend, device):
    k = get_kernels(backend)
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 2, 9, 14, generator=g, dtype=torch.float64).to(device)
    pooled = wide[:, :, :, ::2]  # every other column: not contiguous
    weight = torch.randn(1, 2, 7, 7, generator=g, dtype=torch.float64).to(device).transpose(2, 3)
    grad = torch.randn(2, 1, 9, 7, generator=g, dtype=torch.float64).to(device).transpose(2, 3)
    pooled = pooled.transpose(2, 3)  # (2, 2, 7, 9) with odd strides
    expect_close(k.spatial_conv(pooled, weight, None), reference("spatial_conv", pooled, weight, None), torch.float64, "conv")
    first = k.spatial_conv_backward(grad, pooled, weight)
    for got, want, name in zip(first, reference("spatial_conv_backward", grad, pooled, weight), ("grad_pooled", "grad_weight")):
        expect_close(got, want, torch.float64, f"conv {name}")
    second = k.spatial_conv_backward(grad, pooled, weight)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "spatial_conv_backward is not deterministic"


@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p.values[0] != "torch"])
def test_spatial_conv_rejects_bad_input(backend, device):
    k = get_kernels(backend)
    pooled = torch.randn(2, 2, 5, 5, device=device)
    bad = [
        (pooled, torch.randn(1, 2, 4, 4, device=device), "(?i)odd|k"),  # even kernel
        (pooled, torch.randn(1, 3, 7, 7, device=device), "(?i)weight|channel|cin"),  # wrong Cin
        (pooled, torch.randn(1, 2, 7, 7, device=device, dtype=torch.float64), "(?i)dtype|float"),  # mixed dtypes
        (pooled[0], torch.randn(1, 2, 7, 7, device=device), "(?i)4-d|dim|rank"),  # 3-D map
    ]
    for p, w, match in bad:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
            k.spatial_conv(p, w, None)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="(?i)bias|element"):
        k.spatial_conv(pooled, torch.randn(1, 2, 7, 7, device=device), torch.randn(2, device=device))
