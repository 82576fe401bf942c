"""Each kernel pass alone, against what its bytes cost on this machine in the same run.

    python -m benchmarks.passes                       # the CPU kernels on the issue's shapes
    python -m benchmarks.passes --device cuda --backend triton --dtype bf16

A fused module is a few passes over full-size tensors (../shared/DESIGN.md, section 2). This times
every pass on its own, sampled in turns (CPU) with three bandwidth probes: `read` (x.sum(), one
read), `clone` (a read and a write) and `add` (dy + x, two reads and a write). A pass reading R and
writing W full-size tensors is set against floor = R * read + W * (clone - read), the cost of its
bytes at this run's measured read and write speed: `x floor` near 1 means the pass streams at the
machine's bandwidth, well above 1 means it is bound by something else (compute, access pattern).
The `forward` rows are the whole CBAM forward where the backend has a whole-op kernel (3 reads and
a write: `3-pass floor`), with and without the max pools' argmax bookkeeping.
"""
import argparse
import os
import sys

import torch

import attnkern  # noqa: F401  (registers the ops)
from attnkern.backends import available_backends, get_kernels, has_whole_op
from benchmarks import report
from benchmarks.bench import cpu_count, metadata
from benchmarks.cases import DTYPES, FORMATS, parse_shape, shape_str
from benchmarks.timing import (CpuSampler, keep_freed_memory, last_level_cache_bytes, rotation_count, time_cuda)

DEFAULT_SHAPES = "8x256x28x28,8x64x56x56"
COLUMNS = ["shape", "format", "dtype", "backend", "pass", "reads", "writes", "median_ms", "q25_ms", "q75_ms",
           "floor_ms", "x_floor", "gb_s"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.passes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--backend", default=None, help="kernel backend (default: the device's first available)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated NxCxHxW (default: {DEFAULT_SHAPES})")
    p.add_argument("--formats", default="nchw,channels_last", help="comma-separated from nchw, channels_last")
    p.add_argument("--repeats", type=int, default=7, help="samples per pass (CPU)")
    p.add_argument("--min-time", type=float, default=0.02, help="seconds per CPU sample")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--malloc", choices=("default", "keep"), default="default",
                   help="glibc heap trimming: as is, or off (see benchmarks/timing.py keep_freed_memory)")
    p.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results"),
                   help="directory for the CSV and JSON files")
    return p.parse_args(argv)


def passes(kernels, backend, shape, dtype, device):
    """(name, reads, writes, call(x, dy)) for every pass, on fixed random gates and maps."""
    n, c, h, w = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(1)

    def small(*size, kind=torch.rand):
        return kind(*size, generator=gen, dtype=acc).to(device)

    gate, smap, gp = small(n, c), small(n, h, w), small(n, 2, h, w, kind=torch.randn)
    sarg = torch.randint(0, c, (n, h, w), generator=gen).to(device)
    carg = torch.randint(0, h * w, (n, c), generator=gen).to(device)
    ca, sa = small(n, c, kind=torch.randn), small(n, h, w, kind=torch.randn)
    rows = [
        ("read", 1, 0, lambda x, dy: x.sum()),
        ("clone", 1, 1, lambda x, dy: x.clone()),
        ("add", 2, 1, lambda x, dy: dy + x),
        ("channel_pool", 1, 0, lambda x, dy: kernels.channel_pool(x)),
        ("spatial_pool", 1, 0, lambda x, dy: kernels.spatial_pool(x, gate)),
        ("apply_gates", 1, 1, lambda x, dy: kernels.apply_gates(x, gate, smap)),
        ("spatial_gate_grad", 2, 0, lambda x, dy: kernels.spatial_gate_grad(dy, x, gate)),
        ("channel_gate_grad", 2, 0, lambda x, dy: kernels.channel_gate_grad(dy, x, smap, gp, sarg)),
        ("cbam_input_grad", 2, 1, lambda x, dy: kernels.cbam_input_grad(dy, x, gate, smap, gp, sarg, gate, gate, carg)),
    ]
    for product in (False, True):
        form = "product" if product else "sum"
        rows += [
            (f"bam_combine {form}", 1, 1, lambda x, dy, p=product: kernels.bam_combine(x, ca, sa, p)),
            (f"bam_combine_backward {form}", 2, 0, lambda x, dy, p=product: kernels.bam_combine_backward(dy, x, ca, sa, p)),
        ]
    if has_whole_op(backend):
        module = attnkern.CBAM(c).to(device=device, dtype=dtype).eval()
        ch, sp = module.channel, module.spatial
        params = (ch.fc1.weight, ch.fc1.bias, ch.fc2.weight, ch.fc2.bias, True, True, sp.conv.weight, sp.conv.bias,
                  sp.bn.weight, sp.bn.bias, sp.bn.running_mean, sp.bn.running_var, sp.bn.eps, False)
        for need_argmax in (True, False):
            rows.append((f"forward {'with' if need_argmax else 'without'} argmax", 3, 1,
                         lambda x, dy, a=need_argmax: torch.ops.attnkern.cbam_fused_forward(x, *params, a)))
    return rows


def time_passes(rows, xs, gs, device, repeats, min_time):
    """{name: Stats}; on the CPU the passes are sampled in turns so that drifts hit them alike."""
    if device.type == "cuda":
        return {name: time_cuda(lambda f=fn: f(xs[0], gs[0])) for name, _, _, fn in rows}
    count = len(xs)
    samplers = {name: CpuSampler(lambda i, f=fn: f(xs[i], gs[i]), count, min_time) for name, _, _, fn in rows}
    for _ in range(repeats):
        for sampler in samplers.values():
            sampler.sample()
    return {name: s.stats() for name, s in samplers.items()}


def measure(args, device, backend, dtype, shape, fmt_name):
    fmt = FORMATS[fmt_name]
    numel = 1
    for d in shape:
        numel *= d
    pass_bytes = numel * dtype.itemsize
    count = 1 if device.type == "cuda" else rotation_count(2 * pass_bytes, last_level_cache_bytes())
    gen = torch.Generator().manual_seed(0)
    xs, gs = [], []
    for _ in range(count):
        xs.append(torch.randn(shape, generator=gen).to(device=device, dtype=dtype, memory_format=fmt))
        gs.append(torch.randn(shape, generator=gen).to(device=device, dtype=dtype, memory_format=fmt))
    rows = passes(get_kernels(backend), backend, shape, dtype, device)
    with torch.no_grad():
        stats = time_passes(rows, xs, gs, device, args.repeats, args.min_time)
    read, clone = stats["read"].median_ms, stats["clone"].median_ms
    out = []
    for name, reads, writes, _ in rows:
        st = stats[name]
        floor = reads * read + writes * max(clone - read, 0.0)
        out.append(dict(shape=shape_str(shape), format=fmt_name, dtype=args.dtype, backend=backend, **{"pass": name},
                        reads=reads, writes=writes, median_ms=st.median_ms, q25_ms=st.q25_ms, q75_ms=st.q75_ms,
                        floor_ms=floor, x_floor=st.median_ms / floor if floor > 0 else float("nan"),
                        gb_s=(reads + writes) * pass_bytes / st.median_ms / 1e6))
    three_pass = 2 * read + clone
    out.append(dict(shape=shape_str(shape), format=fmt_name, dtype=args.dtype, backend=backend,
                    **{"pass": "3-pass floor (2 x read + clone)"}, reads=3, writes=1, median_ms=three_pass,
                    floor_ms=three_pass, x_floor=1.0, gb_s=4 * pass_bytes / three_pass / 1e6))
    return out


def table(rows):
    head = f"{'pass':34s} {'R':>2s} {'W':>2s} {'median ms':>10s} {'IQR ms':>8s} {'floor ms':>9s} {'x floor':>8s} {'x clone':>8s} {'GB/s':>7s}"
    lines = []
    for key in dict.fromkeys((r["shape"], r["format"], r["dtype"], r["backend"]) for r in rows):
        group = [r for r in rows if (r["shape"], r["format"], r["dtype"], r["backend"]) == key]
        clone = next(r["median_ms"] for r in group if r["pass"] == "clone")
        lines += ["", f"== {key[0]} {key[1]} {key[2]} backend={key[3]}", head, "-" * len(head)]
        for r in group:
            iqr = r["q75_ms"] - r["q25_ms"] if "q25_ms" in r else float("nan")
            lines.append(f"{r['pass']:34s} {r['reads']:2d} {r['writes']:2d} {r['median_ms']:10.3f} {iqr:8.3f} "
                         f"{r['floor_ms']:9.3f} {r['x_floor']:8.2f} {r['median_ms'] / clone:8.2f} {r['gb_s']:7.1f}")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    backend = args.backend or available_backends(device)[0]
    if device.type == "cpu":
        torch.set_num_threads(args.threads or cpu_count())
    if args.malloc == "keep" and not keep_freed_memory():
        sys.exit("--malloc keep: glibc's mallopt is not available here")
    dtype = DTYPES[args.dtype]
    rows = []
    for shape in (parse_shape(s) for s in args.shapes.split(",")):
        for fmt_name in args.formats.split(","):
            rows += measure(args, device, backend, dtype, shape, fmt_name)
    print(table(rows))
    cfg = dict(device=device, available_backends=available_backends(device), backends=[backend])
    meta = dict(metadata(cfg, argv, torch.get_num_threads() if device.type == "cpu" else None, "benchmarks.passes"),
                malloc=args.malloc)
    return dict(rows=rows, paths=report.write_run(args.output, f"passes_{device.type}", rows, COLUMNS, meta))


if __name__ == "__main__":
    main()
