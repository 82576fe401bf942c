"""NCHW <-> NHWC copies on the CPU: clone (the floor), ATen's .contiguous(memory_format=...) and
attnkern::transpose_layout, the AVX2 transpose the CPU kernels run on a grad in the other layout than x.

    python -m benchmarks.layout                      # the shapes below, fp32 and bf16, both directions
    python -m benchmarks.layout --dtypes fp32 --shapes 8x1024x14x14 --repeats 50

Each copy reads and writes one full-size tensor, so `x clone` is its time over the clone's. The three
are sampled in turns (benchmarks/timing.py CpuSampler) on inputs rotating past the last-level cache
(--hot: one input, cached), with glibc's heap trimming off (keep_freed_memory) so that outputs are not
page-faulted in anew.
"""
import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `attnkern` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import attnkern  # noqa: E402, F401  (registers the ops)
from attnkern import available_backends  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.bench import metadata  # noqa: E402
from benchmarks.cases import DTYPES, parse_shape, shape_str  # noqa: E402
from benchmarks.timing import CpuSampler, keep_freed_memory, last_level_cache_bytes, rotation_count  # noqa: E402

DEFAULT_SHAPES = "8x256x28x28,8x64x56x56,8x1024x14x14,8x2048x7x7,2x256x56x56"
DIRECTIONS = {"nchw->nhwc": (torch.contiguous_format, torch.channels_last),
              "nhwc->nchw": (torch.channels_last, torch.contiguous_format)}
COLUMNS = ["shape", "dtype", "direction", "impl", "median_ms", "q25_ms", "q75_ms", "x_clone", "gb_s", "samples",
           "inner", "rotate"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.layout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated NxCxHxW (default: {DEFAULT_SHAPES})")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated from " + ", ".join(sorted(DTYPES)))
    p.add_argument("--repeats", type=int, default=30, help="samples per implementation (default: 30)")
    p.add_argument("--min-time", type=float, default=0.01, help="seconds per sample (default: 0.01)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    p.add_argument("--hot", action="store_true",
                   help="one input, in cache from the call before, instead of inputs rotating past the LLC")
    p.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="directory for the CSV and JSON files")
    return p.parse_args(argv)


def measure(shape, dtype_name, direction, args):
    """Rows (one per implementation) for one shape, dtype and direction."""
    dtype = DTYPES[dtype_name]
    source, target = DIRECTIONS[direction]
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    rotate = 1 if args.hot else rotation_count(2 * nbytes, last_level_cache_bytes())
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape, generator=gen).to(dtype=dtype, memory_format=source) for _ in range(rotate)]
    to_nhwc = target == torch.channels_last
    calls = {
        "clone": lambda i: xs[i].clone(),
        "aten": lambda i: xs[i].contiguous(memory_format=target),
        "attnkern": lambda i: torch.ops.attnkern.transpose_layout(xs[i], to_nhwc),
    }
    if not torch.equal(calls["attnkern"](0), calls["aten"](0)):
        raise AssertionError(f"attnkern::transpose_layout differs from ATen at {shape_str(shape)} {dtype_name}")
    samplers = {name: CpuSampler(call, rotate, args.min_time) for name, call in calls.items()}
    for _ in range(args.repeats):
        for sampler in samplers.values():
            sampler.sample()
    stats = {name: s.stats() for name, s in samplers.items()}
    clone = stats["clone"].median_ms
    return [dict(shape=shape_str(shape), dtype=dtype_name, direction=direction, impl=name, median_ms=st.median_ms,
                 q25_ms=st.q25_ms, q75_ms=st.q75_ms, x_clone=st.median_ms / clone,
                 gb_s=2 * nbytes / st.median_ms / 1e6, samples=st.samples, inner=st.inner, rotate=rotate)
            for name, st in stats.items()]


def table(rows):
    head = (f"{'shape':14s} {'dtype':5s} {'direction':11s} {'clone us':>17s} {'ATen us':>17s} {'attnkern us':>17s} "
            f"{'ATen/clone':>10s} {'new/clone':>9s} {'ATen/new':>8s}")
    lines = ["times: median (25% quantile), microseconds", head, "-" * len(head)]
    for key in dict.fromkeys((r["shape"], r["dtype"], r["direction"]) for r in rows):
        by = {r["impl"]: r for r in rows if (r["shape"], r["dtype"], r["direction"]) == key}
        cells = [f"{by[k]['median_ms'] * 1e3:8.1f} ({by[k]['q25_ms'] * 1e3:6.1f})"
                 for k in ("clone", "aten", "attnkern")]
        lines.append(f"{key[0]:14s} {key[1]:5s} {key[2]:11s} {cells[0]:>17s} {cells[1]:>17s} {cells[2]:>17s} "
                     f"{by['aten']['x_clone']:10.2f} {by['attnkern']['x_clone']:9.2f} "
                     f"{by['aten']['median_ms'] / by['attnkern']['median_ms']:8.2f}")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "cpu" not in available_backends("cpu"):
        sys.exit("attnkern._C has no CPU kernels here (not built?): nothing to time")
    torch.set_num_threads(args.threads)
    malloc = "keep" if keep_freed_memory() else "default"
    rows = []
    for shape in (parse_shape(s) for s in args.shapes.split(",")):
        for dtype_name in args.dtypes.split(","):
            for direction in DIRECTIONS:
                rows += measure(shape, dtype_name, direction, args)
                print(table(rows[-3:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    cfg = dict(device=torch.device("cpu"), available_backends=available_backends("cpu"), backends=["cpu"])
    meta = dict(metadata(cfg, argv, torch.get_num_threads(), "benchmarks.layout"), malloc=malloc)
    return dict(rows=rows, paths=report.write_run(args.output, "layout_cpu", rows, COLUMNS, meta))


if __name__ == "__main__":
    main()
