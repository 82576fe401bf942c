"""The C++ CPU ops' portable path (CPUs without AVX2/FMA run ATen composites instead of the AVX2
kernels): the kernel contract tests again, in a subprocess with ATTNKERN_CPU_FALLBACK=1."""
import os
import subprocess
import sys

import pytest

from attnkern import available_backends

HERE = os.path.dirname(os.path.abspath(__file__))


def run_on_the_fallback_path(names, selection):
    env = dict(os.environ, ATTNKERN_CPU_FALLBACK="1")
    tests = [os.path.join(HERE, name) for name in names]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selection, *tests],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="attnkern._C has no CPU kernels in this build")
def test_kernel_contract_on_the_fallback_path():
    run_on_the_fallback_path(("test_kernels.py", "test_bam_kernels.py"), "cpu-cpu")


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="attnkern._C has no CPU kernels in this build")
def test_whole_cbam_op_on_the_fallback_path():
    """The CBAM whole op's small math (MLP backward, spatial BN) runs in C++ loops with AVX2 and as
    ATen calls without: the modules against the reference, and gradcheck, on the latter."""
    run_on_the_fallback_path(("test_cbam.py",), "cpu-cpu and (matches_reference_float64 or gradcheck or odd_maps)")


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="attnkern._C has no CPU kernels in this build")
def test_whole_bam_op_on_the_fallback_path():
    """The BAM whole op's convs and BatchNorms run in their C++ kernels with AVX2 (the reduce conv
    both ways, the narrow maps' convs and weight grads, BN with batch statistics) and in ATen
    without: the module against the reference, in float64 and in low precision."""
    run_on_the_fallback_path(("test_bam.py",), "cpu-cpu and (matches_reference or batch_of_one)")
