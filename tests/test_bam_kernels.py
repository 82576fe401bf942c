"""Each backend's BAM combine kernels against the torch backend's definitions, in float64."""
import pytest
import torch

from attnkern import available_backends
from attnkern.backends import get_kernels, torch_kernels
from conftest import backend_device_pairs
from test_kernels import cases, expect_close, make_x, reference

PAIRS = backend_device_pairs(include_torch=False)
pytestmark = pytest.mark.usefixtures("poisoned_heap")  # unwritten CPU outputs show


def attention_maps(shape, device, dtype):
    n, c, h, w = shape
    acc = torch_kernels.acc_dtype(dtype)
    ca = torch.randn(n, c, dtype=torch.float64).to(device=device, dtype=acc)
    sa = torch.randn(n, h, w, dtype=torch.float64).to(device=device, dtype=acc)
    return ca, sa


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("product", [False, True])
def test_bam_combine(backend, device, product):
    k = get_kernels(backend)
    for shape, dtype, fmt in cases(backend, device):
        x = make_x(shape, dtype, fmt, device)
        ca, sa = attention_maps(shape, device, dtype)
        y = k.bam_combine(x, ca, sa, product)
        assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
        expect_close(y, reference("bam_combine", x, ca, sa, product), dtype, f"y {shape} {dtype} {fmt}")


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("product", [False, True])
def test_bam_combine_backward(backend, device, product):
    k = get_kernels(backend)
    for shape, dtype, fmt in cases(backend, device):
        x, grad = make_x(shape, dtype, fmt, device), make_x(shape, dtype, fmt, device)
        ca, sa = attention_maps(shape, device, dtype)
        dca, dsa = k.bam_combine_backward(grad, x, ca, sa, product)
        rca, rsa = reference("bam_combine_backward", grad, x, ca, sa, product)
        expect_close(dca, rca, dtype, f"d_channel {shape} {dtype} {fmt}")
        expect_close(dsa, rsa, dtype, f"d_spatial {shape} {dtype} {fmt}")


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("product", [False, True])
@pytest.mark.parametrize("extras", ["none", "avg", "partial", "both"])
def test_bam_input_grad(backend, device, product, extras):
    k = get_kernels(backend)
    for shape, dtype, fmt in cases(backend, device):
        n, c = shape[:2]
        x, grad = make_x(shape, dtype, fmt, device), make_x(shape, dtype, fmt, device)
        ca, sa = attention_maps(shape, device, dtype)
        acc = torch_kernels.acc_dtype(dtype)
        grad_avg = torch.randn(n, c, dtype=torch.float64).to(device=device, dtype=acc) if extras in ("avg", "both") else None
        partial = make_x(shape, dtype, fmt, device) if extras in ("partial", "both") else None
        dx = k.bam_input_grad(grad, x, ca, sa, product, grad_avg, partial)
        assert dx.dtype == dtype and dx.is_contiguous(memory_format=fmt)
        expected = reference("bam_input_grad", grad, x, ca, sa, product, grad_avg, partial)
        expect_close(dx, expected, dtype, f"dx {shape} {dtype} {fmt}")


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="attnkern._C has no CPU kernels in this build")
@pytest.mark.parametrize("product", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cpu_combine_sigmoid_accuracy(product, fmt):
    """The C++ kernels compute sigmoid from their own exp (a polynomial, fitted to 8e-8): y =
    x * (1 + M) in float32 within 1e-6 of float64 (measured ~1e-7), over arguments up to +-100,
    where the exp's clamps act, and (for the sum) past the factored form's range."""
    k = get_kernels("cpu")
    torch.manual_seed(0)
    n, c, h, w = 2, 37, 9, 11
    x = make_x((n, c, h, w), torch.float32, fmt, "cpu")
    bound = 10.0 if product else 50.0
    ca = torch.empty(n, c).uniform_(-bound, bound)
    sa = torch.empty(n, h, w).uniform_(-bound, bound)
    y = k.bam_combine(x, ca, sa, product)
    expected = reference("bam_combine", x, ca, sa, product)
    rel = ((y.double() - expected).abs() / expected.abs()).max().item()
    assert rel <= 1e-6, f"max relative error {rel:.3g}"
