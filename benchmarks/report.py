"""Output: the terminal tables, CSV + JSON files and PNG plots."""
import csv
import datetime
import json
import math
import os

__all__ = ["OP_COLUMNS", "E2E_COLUMNS", "META_COLUMNS", "op_tables", "summary_table", "e2e_table", "write_csv", "write_json", "write_run", "plot"]

META_COLUMNS = ["timestamp", "device", "device_name", "torch", "triton", "cuda", "git", "malloc", "threads", "command"]
OP_COLUMNS = [
    "module", "impl", "backend", "dtype", "format", "shape", "mode",
    "median_ms", "q25_ms", "q75_ms", "min_ms", "max_ms", "iqr_pct", "samples", "inner", "rotate",
    "min_passes", "min_bytes", "gbps", "x_floor", "speedup_vs_eager", "speedup_vs_compile",
    "saved_bytes", "saved_ratio", "saved_extra_ratio", "peak_bytes", "peak_ratio", "compile_s", "error",
]
E2E_COLUMNS = [
    "model", "attention", "impl", "mode", "dtype", "format", "batch", "image_size",
    "median_ms", "q25_ms", "q75_ms", "min_ms", "max_ms", "samples", "overhead_pct", "attention_ms",
    "speedup_vs_eager", "saved_mb", "peak_mb", "error",
]
MODE_TITLES = {"fwd": "forward (eval, no_grad)", "fwdbwd": "forward+backward (train)"}


def _fmt(value, spec, empty="-"):
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return empty
    return format(value, spec)


def op_tables(rows):
    """One table per (module, dtype, format, mode), rows grouped by shape."""
    lines = []
    groups = {}
    for r in rows:
        groups.setdefault((r["module"], r["dtype"], r["format"], r["mode"]), []).append(r)
    header = (f"{'shape':<16} {'impl':<13} {'median ms':>10} {'IQR%':>6} {'GB/s':>7} {'x floor':>8} "
              f"{'vs eager':>9} {'vs compile':>10} {'saved/x':>8} {'extra/x':>8}")
    for (module, dtype, fmt, mode), group in groups.items():
        passes = group[0]["min_passes"]
        lines.append("")
        lines.append(f"== {module.upper()}  {dtype}  {fmt}  {MODE_TITLES.get(mode, mode)}  "
                     f"(GB/s over the minimal {passes} passes of x: see cases.py)")
        lines.append(header)
        lines.append("-" * len(header))
        last_shape = None
        for r in group:
            shape = r["shape"] if r["shape"] != last_shape else ""
            last_shape = r["shape"]
            if r.get("error"):
                lines.append(f"{shape:<16} {r['impl']:<13} {'failed: ' + r['error'][:70]}")
                continue
            lines.append(
                f"{shape:<16} {r['impl']:<13} {_fmt(r.get('median_ms'), '10.3f'):>10} {_fmt(r.get('iqr_pct'), '5.1f'):>6} "
                f"{_fmt(r.get('gbps'), '7.1f'):>7} {_fmt(r.get('x_floor'), '7.2f'):>8} "
                f"{_fmt(r.get('speedup_vs_eager'), '8.2f'):>9} {_fmt(r.get('speedup_vs_compile'), '9.2f'):>10} "
                f"{_fmt(r.get('saved_ratio'), '7.2f'):>8} {_fmt(r.get('saved_extra_ratio'), '7.2f'):>8}"
            )
    return "\n".join(lines)


def summary_table(rows):
    """One line per case: the fastest fused backend against eager, compile and the clone floor."""
    cases = {}
    for r in rows:
        cases.setdefault((r["module"], r["dtype"], r["mode"], r["format"], r["shape"]), {})[r["impl"]] = r
    header = (f"{'module':<5} {'dtype':<5} {'mode':<7} {'format':<13} {'shape':<15} {'clone':>8} {'eager':>8} "
              f"{'compile':>8} {'best fused':>18} {'vs eager':>8} {'vs comp.':>8} {'x floor':>7} {'GB/s':>6} "
              f"{'saved/x fused|eager|comp.':>26}")
    lines = ["", "== Summary: the fastest fused backend per case (times: median ms)", header, "-" * len(header)]

    def ms(r):
        return r.get("median_ms") if r and not r.get("error") else None

    for (module, dtype, mode, fmt, shape), impls in cases.items():
        fused = [r for name, r in impls.items() if name.startswith("fused") and ms(r)]
        best = min(fused, key=ms) if fused else None
        saved = "|".join(_fmt(impls.get(k, {}).get("saved_ratio"), ".2f")
                         for k in ((best or {}).get("impl", "-"), "eager", "compile"))
        lines.append(
            f"{module:<5} {dtype:<5} {mode:<7} {fmt:<13} {shape:<15} {_fmt(ms(impls.get('clone')), '8.3f'):>8} "
            f"{_fmt(ms(impls.get('eager')), '8.3f'):>8} {_fmt(ms(impls.get('compile')), '8.3f'):>8} "
            f"{(_fmt(ms(best), '.3f') + ' ' + best['backend']) if best else 'n/a':>18} "
            f"{_fmt((best or {}).get('speedup_vs_eager'), '7.2f'):>8} {_fmt((best or {}).get('speedup_vs_compile'), '7.2f'):>8} "
            f"{_fmt((best or {}).get('x_floor'), '6.1f'):>7} {_fmt((best or {}).get('gbps'), '6.1f'):>6} "
            f"{saved if mode == 'fwdbwd' else '-':>26}"
        )
    return "\n".join(lines)


def e2e_table(rows):
    lines = []
    groups = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["format"], r["batch"], r["image_size"]), []).append(r)
    header = (f"{'model':<16} {'impl':<13} {'mode':<11} {'median ms':>10} {'IQR ms':>8} {'overhead':>9} "
              f"{'attn ms':>8} {'vs eager':>9} {'saved MB':>9} {'peak MB':>8}")
    for (dtype, fmt, batch, size), group in groups.items():
        lines.append("")
        lines.append(f"== {group[0]['model'].split('+')[0]} end to end  {dtype}  {fmt}  batch {batch} at {size}x{size}  "
                     "(overhead = time over the plain network)")
        lines.append(header)
        lines.append("-" * len(header))
        for r in sorted(group, key=lambda r: (r["mode"], r["attention"] != "none", r["attention"], r["impl"])):
            if r.get("error"):
                lines.append(f"{r['model']:<16} {r['impl']:<13} {r['mode']:<11} failed: {r['error'][:60]}")
                continue
            iqr = r["q75_ms"] - r["q25_ms"] if r.get("q75_ms") is not None else None
            overhead = r.get("overhead_pct")
            lines.append(
                f"{r['model']:<16} {r['impl']:<13} {r['mode']:<11} {_fmt(r.get('median_ms'), '10.1f'):>10} "
                f"{_fmt(iqr, '8.1f'):>8} {(_fmt(overhead, '+7.1f') + '%') if overhead is not None else '-':>9} "
                f"{_fmt(r.get('attention_ms'), '8.1f'):>8} {_fmt(r.get('speedup_vs_eager'), '8.2f'):>9} "
                f"{_fmt(r.get('saved_mb'), '9.1f'):>9} {_fmt(r.get('peak_mb'), '8.1f'):>8}"
            )
    return "\n".join(lines)


def write_csv(path, rows, columns, meta):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=META_COLUMNS + columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            out = {k: meta.get(k, "") for k in META_COLUMNS}
            for k in columns:
                v = r.get(k, "")
                out[k] = "" if v is None else (round(v, 6) if isinstance(v, float) else v)
            writer.writerow(out)


def write_json(path, payload):
    def clean(v):
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    with open(path, "w") as f:
        json.dump(clean(payload), f, indent=1)


def plot(rows, out_prefix, meta):
    """<prefix>_speedup_<dtype>.png (fused over eager and over compile, per shape and format) and
    <prefix>_latency_<dtype>.png (median latency of every implementation, log scale). Returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    paths = []
    ok = [r for r in rows if not r.get("error") and r.get("median_ms")]
    for dtype in sorted({r["dtype"] for r in ok}):
        sub = [r for r in ok if r["dtype"] == dtype]
        modules = [m for m in ("cbam", "bam", "se") if any(r["module"] == m for r in sub)]
        modes = [m for m in ("fwd", "fwdbwd") if any(r["mode"] == m for r in sub)]
        if not modules or not modes:
            continue
        for kind in ("speedup", "latency"):
            width_in = max(7.0, 0.75 * len({(r["shape"], r["format"]) for r in sub}) + 2)
            fig, axes = plt.subplots(len(modules), len(modes), figsize=(width_in * len(modes), 4.2 * len(modules)),
                                     squeeze=False)
            for i, module in enumerate(modules):
                for j, mode in enumerate(modes):
                    ax = axes[i][j]
                    cell = [r for r in sub if r["module"] == module and r["mode"] == mode]
                    cases = []
                    for r in cell:
                        key = (r["shape"], r["format"])
                        if key not in cases:
                            cases.append(key)
                    labels = [f"{s} {'CL' if f == 'channels_last' else 'NCHW'}" for s, f in cases]
                    if kind == "speedup":
                        series = []
                        for impl in sorted({r["impl"] for r in cell if r["impl"].startswith("fused")}):
                            for ref in ("eager", "compile"):
                                key = f"speedup_vs_{ref}"
                                vals = [next((r.get(key) for r in cell if r["impl"] == impl
                                              and (r["shape"], r["format"]) == c), None) for c in cases]
                                if any(v for v in vals):
                                    series.append((f"{impl} vs {ref}", [v or float("nan") for v in vals]))
                        ax.axhline(1.0, color="gray", lw=0.8)
                        ax.set_yscale("log")
                        ax.set_ylabel("speed-up (x, log; >1 = fused faster)")
                        if not series:
                            ax.text(0.5, 0.5, "no fused rows (module not available in this build?)",
                                    transform=ax.transAxes, ha="center", va="center", fontsize=8)
                    else:
                        impls = []
                        for r in cell:
                            if r["impl"] not in impls:
                                impls.append(r["impl"])
                        series = [(impl, [next((r["median_ms"] for r in cell if r["impl"] == impl
                                                and (r["shape"], r["format"]) == c), float("nan")) for c in cases])
                                  for impl in impls]
                        ax.set_yscale("log")
                        ax.set_ylabel("median latency (ms)")
                    width = 0.8 / max(len(series), 1)
                    for k, (label, vals) in enumerate(series):
                        ax.bar([x + (k - (len(series) - 1) / 2) * width for x in range(len(cases))], vals,
                               width, label=label)
                    ax.set_xticks(range(len(cases)))
                    ax.set_xticklabels(labels, fontsize=7, rotation=45, ha="right", rotation_mode="anchor")
                    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
                    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                    ax.grid(axis="y", which="major", alpha=0.3)
                    ax.set_title(f"{module.upper()} {MODE_TITLES.get(mode, mode)}", fontsize=9)
                    if series:
                        ax.legend(fontsize=7)
            fig.suptitle(f"attnkern {kind}, {dtype}, {meta.get('device_name', '')} "
                         f"(torch {meta.get('torch', '')}, {meta.get('timestamp', '')})", fontsize=10)
            fig.tight_layout()
            path = f"{out_prefix}_{kind}_{dtype}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
    return paths


def write_run(output, name, rows, columns, meta):
    """rows as <output>/<name>_<timestamp>.csv and .json (the JSON with meta); returns the paths."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    prefix = os.path.join(ensure_dir(output), f"{name}_{stamp}")
    paths = dict(csv=f"{prefix}.csv", json=f"{prefix}.json")
    write_csv(paths["csv"], rows, columns, meta)
    write_json(paths["json"], dict(meta=meta, rows=rows))
    print(f"\nwrote {paths['csv']} and {paths['json']}")
    return paths


def ensure_dir(path):
    os.makedirs(path, exist_ok=True)
    return path
