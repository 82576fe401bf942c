"""The C++ CPU kernels' NCHW <-> NHWC transpose (csrc/cpu/layout_cpu.cpp), which they run on a grad
that arrives in the other layout than x: bit-exact against ATen's copy, every element written, tile
edges included; and CBAM / SE / BAM backwards with such a grad exactly as with a converted one."""
import itertools

import pytest
import torch

import attnkern
from attnkern import available_backends

pytestmark = pytest.mark.skipif("cpu" not in available_backends("cpu"),
                                reason="attnkern._C has no CPU kernels in this build")

NCHW, NHWC = torch.contiguous_format, torch.channels_last
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# C and H * W below, at and past the tiles (4 to 16 source rows by 2 to 8 columns, by element size)
# or multiples of neither; N=3 for the per-sample offsets.
CHANNELS = [1, 3, 13, 64, 100]
MAPS = [(1, 1), (7, 7), (13, 17), (3, 40)]
SHAPES = [(n, c, h, w) for n, c, (h, w) in itertools.product((1, 3), CHANNELS, MAPS)]


def other(fmt):
    return NHWC if fmt is NCHW else NCHW


# Beyond SHAPES: both panel modes (the byte stride with the larger power-of-two factor is buffered),
# several 512-byte runs and bands, the ResNet shapes' power-of-two channels.
LARGE_SHAPES = [(1, 1024, 14, 14), (2, 2048, 7, 7), (1, 64, 56, 56), (2, 257, 19, 23), (1, 512, 9, 64), (3, 8, 64, 64),
                (1, 300, 3, 13)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.int16, torch.int32, torch.int64, torch.complex64, torch.uint8],
                         ids=str)
@pytest.mark.parametrize("to", [NHWC, NCHW], ids=["to_nhwc", "to_nchw"])
def test_transpose_layout_matches_aten(dtype, to, poisoned_heap):
    gen = torch.Generator().manual_seed(1)
    for shape in SHAPES + LARGE_SHAPES:
        if dtype.is_floating_point or dtype.is_complex:
            src = torch.randn(shape, generator=gen).to(dtype)
        else:
            src = torch.randint(1, 90, shape, generator=gen).to(dtype)
        src = src.contiguous(memory_format=other(to))
        out = torch.ops.attnkern.transpose_layout(src, to is NHWC)
        assert out.is_contiguous(memory_format=to), shape
        assert out.data_ptr() != src.data_ptr()
        assert torch.equal(out, src.contiguous(memory_format=to)), shape


def test_transpose_layout_odd_input():
    for to in (NHWC, NCHW):
        empty = torch.empty(0, 5, 3, 4).contiguous(memory_format=other(to))
        out = torch.ops.attnkern.transpose_layout(empty, to is NHWC)
        assert out.shape == empty.shape and out.is_contiguous(memory_format=to)
        conj = torch.randn(2, 9, 5, 4, dtype=torch.complex64).contiguous(memory_format=other(to)).conj()
        assert torch.equal(torch.ops.attnkern.transpose_layout(conj, to is NHWC), conj.contiguous(memory_format=to))
        torch.library.opcheck(torch.ops.attnkern.transpose_layout.default,
                              (torch.randn(2, 9, 5, 4).contiguous(memory_format=other(to)), to is NHWC))
    with pytest.raises(RuntimeError, match="dense in the layout other"):
        torch.ops.attnkern.transpose_layout(torch.randn(2, 3, 4, 5)[..., ::2], True)
    with pytest.raises(RuntimeError, match="dense in the layout other"):
        torch.ops.attnkern.transpose_layout(torch.randn(2, 3, 4), False)


def make_module(name, channels, dtype):
    reduction = min(channels, 4)
    module = {
        "CBAM": lambda: attnkern.CBAM(channels, reduction, backend="cpu"),
        "SE": lambda: attnkern.SE(channels, reduction, backend="cpu"),
        "BAM": lambda: attnkern.BAM(channels, reduction, dilation=2, backend="cpu"),
    }[name]()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    # Eval: BN's batch statistics would refuse the 1 x 1 maps of one sample.
    return module.to(torch.float64 if dtype == torch.float64 else torch.float32).eval()


def grads(module, x, grad):
    x = x.detach().requires_grad_(True)
    params = list(module.parameters())
    return torch.autograd.grad(module(x), [x] + params, grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_format", [NCHW, NHWC], ids=["x_nchw", "x_nhwc"])
@pytest.mark.parametrize("name", ["CBAM", "SE", "BAM"])
def test_backward_with_grad_in_the_other_layout(name, x_format, dtype):
    """dx and the parameter grads are bitwise those of the grad converted by ATen first; so for a
    grad in neither layout (strided)."""
    for shape in SHAPES:
        module = make_module(name, shape[1], dtype)
        x = torch.randn(shape).to(dtype).contiguous(memory_format=x_format)
        grad = torch.randn(shape).to(dtype)
        expected = grads(module, x, grad.contiguous(memory_format=x_format))
        strided = torch.empty(shape[:3] + (2 * shape[3],), dtype=dtype)[..., ::2].copy_(grad)
        for g in (grad.contiguous(memory_format=other(x_format)), strided):
            got = grads(module, x, g)
            assert got[0].stride() == expected[0].stride(), shape
            for a, b in zip(got, expected):
                assert torch.equal(a, b), (shape, g.stride())
