"""Build attnkern._C: C++ CPU kernels always, CUDA kernels where a toolkit and a CUDA torch exist.

Environment overrides:
  ATTNKERN_CUDA=1 / 0      force the CUDA sources on / off (default: auto-detect)
  TORCH_CUDA_ARCH_LIST     GPU architectures (default when no GPU is visible: "8.0;9.0")
  ATTNKERN_NATIVE=1        compile the CPU sources with -march=native (not portable)
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.strip().lower() not in ("0", "false", "no", "off")


def _want_cuda():
    forced = _env_flag("ATTNKERN_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if forced is True and not available:
        raise RuntimeError(
            "ATTNKERN_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
        )
    return available if forced is None else forced


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # No -std: BuildExtension picks the standard the installed torch's headers want.
    cxx = ["-O3", "-fopenmp"]
    if _env_flag("ATTNKERN_NATIVE"):
        cxx.append("-march=native")
    common = dict(
        name="attnkern._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
        return CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
