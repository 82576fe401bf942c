"""attnkern benchmark: fused CBAM / BAM / SE vs eager PyTorch vs torch.compile vs the x.clone() floor.

    python -m benchmarks.bench                 # the default sweep for this machine (CPU: a few minutes)
    python -m benchmarks.bench --quick         # tiny shapes, seconds: checks that everything runs
    python benchmarks/bench.py --help

One run measures, for each module, dtype, memory format, shape and mode (forward / forward+backward),
every fused backend available on the device, the eager reference module, torch.compile of it and
the clone floor; then ResNet-50 end to end. It prints tables and writes CSV, JSON and PNG files
(see --output). benchmarks/NOTES.md explains the byte model and holds measured tables.
"""
import argparse
import datetime
import os
import platform
import shlex
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `attnkern` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import attnkern  # noqa: E402
from benchmarks import cases as C  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.memory import peak_cuda_bytes, saved_bytes  # noqa: E402
from benchmarks.timing import (  # noqa: E402
    CpuSampler,
    keep_freed_memory,
    last_level_cache_bytes,
    rotation_count,
    time_cuda,
)

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N, or auto (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None,
                   help="comma-separated dtypes from fp32, bf16, fp16, fp64 (default: fp32 on CPU; fp32,bf16 on CUDA)")
    p.add_argument("--modules", default="cbam,bam,se",
                   help="comma-separated modules from cbam, bam, se (default: all three)")
    p.add_argument("--backends", default=None,
                   help="comma-separated fused backends (cpu, cuda, triton, torch) to time (default: every backend "
                        "attnkern.available_backends(device) lists, except interpreted Triton on the CPU, which "
                        "only runs when named here and TRITON_INTERPRET=1 is set)")
    p.add_argument("--formats", default="nchw,channels_last",
                   help="comma-separated memory formats from nchw, channels_last (default: both)")
    p.add_argument("--modes", default="fwd,fwdbwd",
                   help="comma-separated from fwd (eval mode, no_grad) and fwdbwd (train mode, forward + backward); "
                        "default: both")
    p.add_argument("--shapes", default=None,
                   help="comma-separated NxCxHxW shapes, e.g. 8x256x28x28,8x64x56x56 (default: ResNet-50 stage "
                        "shapes for the device, see benchmarks/cases.py)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, few repeats and a tiny end-to-end run: finishes in seconds; for checking "
                        "that everything runs, not for numbers")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) baseline")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the baseline (default: torch's default; e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--no-e2e", action="store_true", help="skip the ResNet-50 end-to-end measurements")
    p.add_argument("--no-ops", action="store_true", help="skip the per-module measurements (end to end only)")
    p.add_argument("--e2e-depth", type=int, default=50, choices=(18, 34, 50, 101),
                   help="ResNet depth of the end-to-end run (default: 50)")
    p.add_argument("--e2e-batch", type=int, default=None, help="end-to-end batch size (default: 2 on CPU, 64 on CUDA)")
    p.add_argument("--e2e-size", type=int, default=None, help="end-to-end image size (default: 224)")
    p.add_argument("--e2e-format", default=None,
                   help="memory format of the end-to-end run: nchw or channels_last (default: nchw on CPU, "
                        "channels_last on CUDA)")
    p.add_argument("--e2e-attention", default="cbam,bam,se",
                   help="attention types compared with the plain ResNet-50 (default: cbam,bam,se)")
    p.add_argument("--e2e-repeats", type=int, default=None,
                   help="timed rounds of the end-to-end run, after 2 warm-up rounds; each round runs every model "
                        "once, interleaved (default: 7 on CPU, 20 on CUDA; 2 with --quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed samples per measurement on the CPU; each sample averages enough calls to last "
                        "--min-time (default: 7; 3 with --quick). On CUDA see --gpu-rep-ms")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds each CPU sample lasts at least (default: 0.02; 0.002 with --quick)")
    p.add_argument("--gpu-rep-ms", type=int, default=100,
                   help="CUDA: milliseconds of timed calls per measurement (triton.testing.do_bench's rep; default 100)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: the number of cores this process may use)")
    p.add_argument("--malloc", default="default", choices=("default", "keep"),
                   help="CPU: 'keep' stops glibc from returning freed memory to the OS, so that outputs are "
                        "not page-faulted in anew on every call (benchmarks/timing.py keep_freed_memory "
                        "explains; jemalloc or tcmalloc behave so anyway). Default: glibc's own behaviour")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the saved-for-backward and peak-memory measurements")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--output", default=DEFAULT_OUTPUT,
                   help=f"directory for the CSV, JSON and PNG files (default: {os.path.relpath(DEFAULT_OUTPUT)})")
    p.add_argument("--tag", default=None,
                   help="file-name stem of the outputs (default: bench_<device>_<timestamp>)")
    args = p.parse_args(argv)
    return p, args


def _split(text, allowed, what):
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {bad}; choose from {sorted(allowed)}")
    return items


def resolve_config(args, log):
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    is_cuda = device.type == "cuda"
    dtypes = _split(args.dtype or ("fp32,bf16" if is_cuda else "fp32"), C.DTYPES, "dtype")
    modules = _split(args.modules, C.MODULES, "module")
    formats = _split(args.formats, C.FORMATS, "format")
    modes = _split(args.modes, C.MODES, "mode")
    available = attnkern.available_backends(device)
    if args.backends:
        requested = _split(args.backends, attnkern.BACKENDS, "backend")
        backends = [b for b in requested if b in available]
        for b in requested:
            if b not in available:
                log(f"note: backend {b!r} cannot run on {device.type} here (available: {available}); skipped")
    else:
        backends = [b for b in available if not (b == "triton" and device.type == "cpu")]
        if "triton" in available and device.type == "cpu":
            log("note: interpreted Triton (TRITON_INTERPRET=1) is not timed unless named in --backends")
    if args.shapes:
        shapes = [C.parse_shape(s) for s in args.shapes.split(",") if s.strip()]
    elif args.quick:
        shapes = C.QUICK_SHAPES
    else:
        shapes = C.GPU_SHAPES if is_cuda else C.CPU_SHAPES
    quick = args.quick
    return dict(
        device=device, dtypes=dtypes, modules=modules, formats=formats, modes=modes, backends=backends,
        available_backends=available, shapes=shapes,
        repeats=args.repeats or (3 if quick else 7),
        min_time=args.min_time if args.min_time is not None else (0.002 if quick else 0.02),
        compile=not args.no_compile, compile_mode=args.compile_mode,
        e2e=not args.no_e2e, ops=not args.no_ops,
        e2e_depth=args.e2e_depth,
        e2e_batch=args.e2e_batch or (2 if (quick or not is_cuda) else 64),
        e2e_size=args.e2e_size or (64 if quick else 224),
        e2e_format=_split(args.e2e_format or ("channels_last" if is_cuda else "nchw"), C.FORMATS, "format")[0],
        e2e_attention=_split(args.e2e_attention, C.MODULES, "attention") if args.e2e_attention else [],
        e2e_repeats=args.e2e_repeats or (2 if quick else (20 if is_cuda else 7)),
        gpu_rep_ms=args.gpu_rep_ms, memory=not args.no_memory, plots=not args.no_plots,
    )


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({cpu_count()} cores)"


def git_revision():
    """The repository's commit, with "+dirty" when the working tree has changes; None outside git."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def metadata(cfg, argv, threads, module="benchmarks.bench"):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    now = datetime.datetime.now(datetime.timezone.utc).astimezone()
    return dict(
        timestamp=now.isoformat(timespec="seconds"),
        device=str(cfg["device"]),
        device_name=device_name(cfg["device"]),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        attnkern=attnkern.__version__,
        git=git_revision(),
        python=platform.python_version(),
        platform=platform.platform(),
        threads=threads,
        command=" ".join(shlex.quote(a) for a in [sys.executable, "-m", module, *argv]),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        available_backends=cfg["available_backends"],
        timed_backends=cfg["backends"],
        llc_bytes=last_level_cache_bytes() if cfg["device"].type == "cpu" else None,
    )


def _make_inputs(shape, dtype, fmt, device, count, with_grad):
    gen = torch.Generator().manual_seed(0)
    xs, gs = [], []
    for _ in range(count):
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype, memory_format=fmt)
        xs.append(x.requires_grad_(with_grad))
        if with_grad:
            gs.append(torch.randn(shape, generator=gen).to(device=device, dtype=dtype, memory_format=fmt))
    return xs, gs


def _calls(impl, mode, xs, gs):
    """call(i) for the timer, on input i."""
    if impl.module is None:  # the clone floor
        if mode == "fwd":
            return lambda i: xs[i].clone()

        def floor(i):
            x = xs[i]
            return x.clone(), torch.add(gs[i], x)

        return floor
    module, params = impl.module, impl.params
    if mode == "fwd":
        return lambda i: module(xs[i])

    def fwdbwd(i):
        x = xs[i]
        module(x).backward(gs[i])
        x.grad = None
        for p in params:
            p.grad = None

    return fwdbwd


def run_case(cfg, module_name, dtype_name, fmt_name, shape, mode, log, progress):
    """Times every implementation of one case; returns row dicts."""
    device, dtype, fmt = cfg["device"], C.DTYPES[dtype_name], C.FORMATS[fmt_name]
    is_cuda = device.type == "cuda"
    torch._dynamo.reset()  # a fresh compile per case (no recompile limits, no stale guards)
    n, c, h, w = shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    pass_bytes = n * c * h * w * itemsize
    with_grad = mode == "fwdbwd"
    rotate = 1 if is_cuda else rotation_count(pass_bytes * (2 if with_grad else 1), last_level_cache_bytes())
    xs, gs = _make_inputs(shape, dtype, fmt, device, rotate, with_grad)
    impls = C.build_impls(module_name, c, cfg["backends"], device, dtype, cfg["compile"], cfg["compile_mode"])
    grad_ctx = torch.enable_grad if with_grad else torch.no_grad
    rows, live = [], []  # live: (impl, row, call, sampler) of the implementations still running

    def fail(row, exc):
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]

    # 1. Per implementation: compile (timed), warm up; on CUDA also the whole timing (do_bench).
    for impl in impls:
        row = dict(module=module_name, impl=impl.name, backend=impl.backend, dtype=dtype_name, format=fmt_name,
                   shape=C.shape_str(shape), mode=mode, min_passes=C.min_passes(mode),
                   min_bytes=C.min_passes(mode) * pass_bytes, rotate=rotate, error="")
        rows.append(row)
        if impl.module is not None:
            impl.module.train(with_grad)
        call = _calls(impl, mode, xs, gs)
        try:
            with grad_ctx():
                if impl.name == "compile":
                    t0 = time.perf_counter()
                    call(0)
                    if is_cuda:
                        torch.cuda.synchronize(device)
                    row["compile_s"] = time.perf_counter() - t0
                if is_cuda:
                    row["_stats"] = time_cuda(lambda: call(0), rep_ms=cfg["gpu_rep_ms"])
                    sampler = None
                else:
                    sampler = CpuSampler(call, n_inputs=rotate, min_time=cfg["min_time"])
        except Exception as exc:  # noqa: BLE001 - one failing implementation must not end the run
            fail(row, exc)
            continue
        live.append((impl, row, call, sampler))
    # 2. CPU: the samples of all implementations in turns (rotating order), sharing any drift.
    if not is_cuda:
        for r in range(cfg["repeats"]):
            for k in range(len(live)):
                impl, row, call, sampler = live[(k + r) % len(live)]
                if row["error"]:
                    continue
                try:
                    with grad_ctx():
                        sampler.sample()
                except Exception as exc:  # noqa: BLE001
                    fail(row, exc)
    # 3. Statistics and memory.
    for impl, row, call, sampler in live:
        if not row["error"]:
            stats = row.pop("_stats", None) or sampler.stats()
            row.update(median_ms=stats.median_ms, q25_ms=stats.q25_ms, q75_ms=stats.q75_ms, min_ms=stats.min_ms,
                       max_ms=stats.max_ms, iqr_pct=stats.spread_pct, samples=stats.samples, inner=stats.inner,
                       gbps=row["min_bytes"] / (stats.median_ms * 1e-3) / 1e9)
            try:
                with grad_ctx():
                    if cfg["memory"] and with_grad and impl.module is not None:
                        x = xs[0]
                        saved, out = saved_bytes(lambda: impl.module(x), inputs=[x], params=impl.params)
                        out.backward(gs[0])
                        x.grad = None
                        for p in impl.params:
                            p.grad = None
                        del out
                        row.update(saved_bytes=saved.activations, saved_ratio=saved.activations / pass_bytes,
                                   saved_extra_ratio=saved.extra / pass_bytes)
                    if cfg["memory"] and is_cuda:
                        peak = peak_cuda_bytes(lambda: call(0), device)
                        row.update(peak_bytes=peak, peak_ratio=peak / pass_bytes)
            except Exception as exc:  # noqa: BLE001
                fail(row, exc)
        row.pop("_stats", None)
    for row in rows:
        progress(row)
    by_impl = {r["impl"]: r.get("median_ms") for r in rows}
    for r in rows:
        t = r.get("median_ms")
        if not t:
            continue
        for key, base in (("speedup_vs_eager", by_impl.get("eager")), ("speedup_vs_compile", by_impl.get("compile"))):
            if base and r["impl"] not in ("clone",):
                r[key] = base / t
        if by_impl.get("clone") and r["impl"] != "clone":
            r["x_floor"] = t / by_impl["clone"]
    del impls, xs, gs
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    _, args = parse_args(argv)
    started = time.perf_counter()
    messages = []

    def log(msg):
        messages.append(msg)
        print(msg, flush=True)

    threads = args.threads or cpu_count()
    torch.set_num_threads(threads)
    if args.malloc == "keep" and not keep_freed_memory():
        log("WARNING: --malloc keep: mallopt is not available here; glibc's default behaviour stays")
    cfg = resolve_config(args, log)
    meta = metadata(cfg, argv, threads)
    meta["malloc"] = args.malloc
    log(f"attnkern benchmark on {meta['device_name']} [{meta['device']}], torch {meta['torch']}, "
        f"triton {meta['triton']}, {threads} threads")
    log(f"backends available: {cfg['available_backends']}; timed: {cfg['backends'] or 'none (baselines only)'}")
    if meta["load_average"] and cfg["device"].type == "cpu" and meta["load_average"][0] > 0.5 * cpu_count():
        log(f"WARNING: load average {meta['load_average'][0]:.1f} on {cpu_count()} cores: other processes are "
            "running and CPU timings will be noisy")
    if cfg["device"].type == "cpu" and "cpu" not in cfg["available_backends"]:
        log("note: the C++ CPU kernels are not loaded (attnkern.available_backends('cpu') has no 'cpu'): "
            "fused rows use the plain-PyTorch 'torch' backend")

    op_rows = []
    if cfg["ops"]:
        cases = [(m, d, f, s, mode) for m in cfg["modules"] for d in cfg["dtypes"] for f in cfg["formats"]
                 for s in cfg["shapes"] for mode in cfg["modes"]]
        baselines = 2 + int(cfg["compile"])
        total = len(cases) * (baselines + len(cfg["backends"]))
        done = [0]

        def progress(row):
            done[0] += 1
            elapsed = time.perf_counter() - started
            what = (f"failed: {row['error'][:80]}" if row.get("error") else
                    f"{row['median_ms']:9.3f} ms  IQR {row['iqr_pct']:4.1f}%  {row['gbps']:7.1f} GB/s")
            print(f"[{done[0]:4d}/{total}] {elapsed:6.0f}s  {row['module']:<4} {row['dtype']:<4} {row['format']:<13} "
                  f"{row['shape']:<14} {row['mode']:<6} {row['impl']:<12} {what}", flush=True)

        for m, d, f, s, mode in cases:
            op_rows += run_case(cfg, m, d, f, s, mode, log, progress)

    e2e_rows = []
    if cfg["e2e"]:
        from benchmarks.e2e import run_e2e

        log(f"end to end: ResNet-{cfg['e2e_depth']} batch {cfg['e2e_batch']} at {cfg['e2e_size']}x{cfg['e2e_size']}, "
            f"{cfg['e2e_format']}, attention {cfg['e2e_attention']}")
        for d in cfg["dtypes"]:
            e2e_rows += run_e2e(cfg["device"], C.DTYPES[d], d, cfg["e2e_format"], cfg["e2e_batch"], cfg["e2e_size"],
                                cfg["e2e_attention"], cfg["backends"], cfg["e2e_repeats"], log,
                                depth=cfg["e2e_depth"], memory=cfg["memory"])

    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    meta["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if op_rows:
        print(report.op_tables(op_rows))
        print(report.summary_table(op_rows))
    if e2e_rows:
        print(report.e2e_table(e2e_rows))

    out_dir = report.ensure_dir(args.output)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = args.tag or f"bench_{cfg['device'].type}_{stamp}"
    prefix = os.path.join(out_dir, stem)
    paths = dict(ops_csv=f"{prefix}_ops.csv", e2e_csv=f"{prefix}_e2e.csv", json=f"{prefix}.json")
    report.write_csv(paths["ops_csv"], op_rows, report.OP_COLUMNS, meta)
    report.write_csv(paths["e2e_csv"], e2e_rows, report.E2E_COLUMNS, meta)
    config = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in cfg.items()}
    config["shapes"] = [C.shape_str(s) for s in cfg["shapes"]]
    report.write_json(paths["json"], dict(meta=meta, config=config, notes=messages, ops=op_rows, e2e=e2e_rows,
                                          byte_model=C.__doc__))
    if cfg["plots"] and op_rows:
        try:
            paths["plots"] = report.plot(op_rows, prefix, meta)
        except Exception as exc:  # noqa: BLE001 - plots are a convenience
            log(f"plots failed: {type(exc).__name__}: {exc}")
    print(f"\nwrote {', '.join(os.path.relpath(p) for k, p in paths.items() if k != 'plots')}"
          + (f" and {len(paths['plots'])} plots" if paths.get("plots") else "")
          + f" in {meta['elapsed_s']:.0f} s")
    return dict(paths=paths, ops=op_rows, e2e=e2e_rows, meta=meta)


if __name__ == "__main__":
    main()
