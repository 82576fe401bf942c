"""Compile-only check of the CUDA sources (csrc/cuda/*.cu) with nvcc, per file and GPU architecture.

Runs wherever nvcc exists, also with a CPU build of torch (no GPU needed): the sources include only
c10/cuda headers, and the one generated header a CPU wheel lacks (c10/cuda/impl/cuda_cmake_macros.h)
is stubbed in a temporary include directory. The flags follow what setup.py + torch's
BuildExtension pass to nvcc. The compiles selected in a session run concurrently (one per core) and
each test waits for its own, so a failure names the file and the architecture.
"""
import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
SOURCES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CUDA_DIR, "*.cu")))
# (arch, C++ standard): A100 (sm_80) and H100 / H200 (sm_90). setup.py leaves the standard to the
# installed torch's BuildExtension: C++17 up to torch 2.11 (the GPU image), C++20 since (this
# machine's 2.13), so the sources must compile under both.
TARGETS = [("80", "c++17"), ("90", "c++17"), ("90", "c++20")]
TIMEOUT_S = 900

SETUP_NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]  # setup.py's nvcc flags, but the standard


def find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = cpp_extension.CUDA_HOME
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return None


NVCC = find_nvcc()

CMAKE_MACROS = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
CMAKE_MACROS_STUB = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def torch_include_dirs():
    return cpp_extension.include_paths()


def needs_macros_stub():
    return not any(os.path.isfile(os.path.join(d, CMAKE_MACROS)) for d in torch_include_dirs())


def nvcc_command(source, target, stub_dir, out_dir):
    arch, std = target
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    obj = os.path.join(out_dir, f"{os.path.splitext(source)[0]}.sm_{arch}.{std}.o")
    includes = ([stub_dir] if stub_dir else []) + torch_include_dirs() + [os.path.join(ROOT, "csrc")]
    cmd = [NVCC, "-c", os.path.join(CUDA_DIR, source), "-o", obj]
    for inc in includes:
        cmd += ["-I", inc]
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS)  # -D__CUDA_NO_HALF_OPERATORS__ etc., --expt-relaxed-constexpr
    cmd += ["--compiler-options", "-fPIC"]
    cmd += SETUP_NVCC_FLAGS + [f"-std={std}"]
    cmd += [
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-gencode",
        f"arch=compute_{arch},code=sm_{arch}",
    ]
    return cmd, obj


def run_nvcc(cmd):
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        return -1, f"timed out after {TIMEOUT_S} s\n{exc.stdout or ''}{exc.stderr or ''}"
    return proc.returncode, proc.stdout + proc.stderr


def _selected(session):
    """(source, target) of the test_compiles items this session will run."""
    wanted = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if getattr(item, "originalname", None) != "test_compiles" or callspec is None:
            continue
        if os.path.abspath(str(item.path)) == os.path.abspath(__file__):
            wanted.append((callspec.params["source"], callspec.params["target"]))
    return wanted


@pytest.fixture(scope="module")
def compiles(request, tmp_path_factory):
    """Starts the selected compiles concurrently; maps (source, target) -> (command, future)."""
    if NVCC is None:
        pytest.skip("nvcc not found (neither on PATH nor under CUDA_HOME): cannot compile csrc/cuda/*.cu")
    work = tmp_path_factory.mktemp("nvcc")
    stub_dir = None
    if needs_macros_stub():
        stub_dir = str(work / "stub_include")
        os.makedirs(os.path.join(stub_dir, os.path.dirname(CMAKE_MACROS)), exist_ok=True)
        with open(os.path.join(stub_dir, CMAKE_MACROS), "w") as f:
            f.write(CMAKE_MACROS_STUB)
    out_dir = str(work / "obj")
    os.makedirs(out_dir, exist_ok=True)
    wanted = _selected(request.session) or [(s, t) for s in SOURCES for t in TARGETS]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(wanted), os.cpu_count() or 1)))
    jobs = {}
    for source, target in wanted:
        cmd, obj = nvcc_command(source, target, stub_dir, out_dir)
        jobs[(source, target)] = (cmd, obj, pool.submit(run_nvcc, cmd))
    yield jobs
    pool.shutdown(wait=True, cancel_futures=True)


def own_warnings(output, source):
    """Compiler warnings that point into our own sources (torch's headers are not ours to fix)."""
    ours = (os.path.join("csrc", "cuda", ""), "cuda_utils.cuh", source)
    return [line for line in output.splitlines() if "warning" in line.lower() and any(s in line for s in ours)
            and "torch/include" not in line]


def test_sources_exist():
    assert SOURCES, f"no CUDA sources in {CUDA_DIR}"


@pytest.mark.parametrize("target", TARGETS, ids=[f"sm_{a}-{std}" for a, std in TARGETS])
@pytest.mark.parametrize("source", SOURCES)
def test_compiles(compiles, source, target):
    key = (source, target)
    name = f"{source} sm_{target[0]} {target[1]}"
    if key not in compiles:  # not among the items collected for this session (should not happen)
        pytest.fail(f"compile of {name} was not scheduled")
    cmd, obj, future = compiles[key]
    rc, output = future.result()
    tail = "\n".join(output.splitlines()[-80:])
    assert rc == 0, f"nvcc failed (rc={rc}) for {name}\n$ {' '.join(cmd)}\n{tail}"
    assert os.path.isfile(obj) and os.path.getsize(obj) > 0, f"nvcc produced no object for {name}"
    warnings = own_warnings(output, source)
    assert not warnings, f"warnings in our sources ({name}):\n" + "\n".join(warnings[:40])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
