import ctypes
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton reads this once, at import: without a GPU its kernels run in the interpreter on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from attnkern.backends import available_backends  # noqa: E402


def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def backend_device_pairs(include_torch=True):
    """(backend, device) for every backend that can run here. The torch backend is the reference."""
    pairs = []
    for device in devices():
        for backend in available_backends(device):
            if backend == "torch" and not include_torch:
                continue
            pairs.append(pytest.param(backend, device, id=f"{backend}-{device}"))
    return pairs


def kernel_dtypes(backend, device):
    """Every dtype the kernels take; interpreted Triton has no bf16 / fp16 math."""
    if backend == "triton" and device == "cpu":
        return [torch.float32, torch.float64]
    return [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# Tolerances on outputs in x's dtype (inputs and reference computed in float64).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def interpreted_triton(backend, device):
    return backend == "triton" and device == "cpu"


@pytest.fixture
def poisoned_heap():
    """glibc's M_PERTURB: the blocks malloc hands out come filled with 0xA5 bytes (or the 0x5A their
    free left), fresh mmap pages with 0, and test values are drawn to be none of these, so an output
    element a CPU kernel leaves unwritten shows up. A no-op without glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    m_perturb = -6
    assert mallopt(m_perturb, 0x5A)
    yield
    mallopt(m_perturb, 0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return (
        f"attnkern backends: cpu={available_backends('cpu')}"
        + (f" cuda={available_backends('cuda')}" if HAS_CUDA else " (no CUDA device)")
        + f"; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
    )
