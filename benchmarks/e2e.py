"""End to end: ResNet-50 (or --e2e-depth) plain vs + CBAM / BAM / SE, reference modules vs fused ones.

Inference = eval mode under torch.no_grad(); training step = train mode, forward, cross-entropy,
backward, SGD (momentum 0.9) step. All models of one attention type share weights (the fused ones
are convert_model() of a copy of the reference one). All models are built first and timed
**interleaved**: each round runs every model once (in a rotating order), so that drifts of the
machine (clock, other processes) hit every model alike; the first rounds are warm-up. Overhead is
the median time over the plain network's, in percent.
"""
import copy
import time

import torch
import torch.nn.functional as F

from attnkern import models
from attnkern.convert import convert_model
from benchmarks.cases import FORMATS
from benchmarks.memory import peak_cuda_bytes, saved_bytes
from benchmarks.timing import summarize

__all__ = ["run_e2e", "E2E_MODES"]

E2E_MODES = ("inference", "train_step")


def _variants(attentions, backends, depth):
    """(attention, impl label, factory) triples; a factory builds the model on the CPU in fp32."""
    out = [(None, "plain", lambda: models.build_resnet(depth, None, fused=False))]
    for attention in attentions:
        refs = {}

        def reference(attention=attention, refs=refs):
            if "m" not in refs:
                torch.manual_seed(0)
                refs["m"] = models.build_resnet(depth, attention, fused=False)
            return copy.deepcopy(refs["m"])

        out.append((attention, "eager", reference))
        for backend in backends:
            out.append((attention, f"fused:{backend}", lambda r=reference, b=backend: convert_model(r(), backend=b)))
    return out


def _timer(device):
    if torch.device(device).type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return run


class _Entry:
    def __init__(self, attention, impl, model, images, targets):
        self.attention, self.impl, self.model = attention, impl, model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=0.01, momentum=0.9)
        self.images, self.targets = images, targets
        self.error = {}

    def infer(self):
        with torch.no_grad():
            return self.model(self.images)

    def train_step(self):
        out = self.model(self.images)
        loss = F.cross_entropy(out.float(), self.targets)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss


def run_e2e(device, dtype, dtype_name, fmt_name, batch, size, attentions, backends, repeats, log,
            depth=50, warmup=2, memory=True):
    """Returns a list of row dicts, one per (model variant, mode)."""
    fmt = FORMATS[fmt_name]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device=device, dtype=dtype, memory_format=fmt)
    targets = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    entries = []
    for attention, impl, factory in _variants(attentions, backends, depth):
        try:
            model = factory().to(device=device, dtype=dtype, memory_format=fmt)
        except Exception as exc:  # noqa: BLE001 - report and go on
            log(f"e2e: {attention or 'plain'} {impl}: construction failed: {type(exc).__name__}: {exc}")
            continue
        entries.append(_Entry(attention, impl, model, images, targets))
    timer = _timer(device)
    rows = []
    for mode in E2E_MODES:
        samples = {id(e): [] for e in entries}
        for e in entries:
            e.model.train(mode == "train_step")
        rounds = warmup + repeats
        for r in range(rounds):
            for k in range(len(entries)):
                e = entries[(k + r) % len(entries)]
                if mode in e.error:
                    continue
                fn = e.train_step if mode == "train_step" else e.infer
                try:
                    t = timer(fn)
                except Exception as exc:  # noqa: BLE001
                    e.error[mode] = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                if r >= warmup:
                    samples[id(e)].append(t)
            log(f"e2e: {mode} round {r + 1}/{rounds}" + (" (warm-up)" if r < warmup else ""))
        plain = None
        for e in entries:
            name = f"resnet{depth}{'+' + e.attention if e.attention else ''}"
            row = dict(model=name, attention=e.attention or "none", impl=e.impl, mode=mode, dtype=dtype_name,
                       format=fmt_name, batch=batch, image_size=size, error=e.error.get(mode, ""))
            if not row["error"] and samples[id(e)]:
                stats = summarize(samples[id(e)])
                row.update(median_ms=stats.median_ms, q25_ms=stats.q25_ms, q75_ms=stats.q75_ms,
                           min_ms=stats.min_ms, max_ms=stats.max_ms, samples=stats.samples)
                if e.attention is None:
                    plain = stats.median_ms
                if plain:
                    row["overhead_pct"] = 100.0 * (stats.median_ms / plain - 1.0)
                    row["attention_ms"] = stats.median_ms - plain
                if memory and mode == "train_step":
                    saved, out = saved_bytes(lambda: e.model(images), inputs=[images], params=e.params)
                    del out
                    row["saved_mb"] = saved.activations / 2**20
                if memory and torch.device(device).type == "cuda":
                    fn = e.train_step if mode == "train_step" else e.infer
                    row["peak_mb"] = peak_cuda_bytes(fn, device) / 2**20
            rows.append(row)
            log(f"e2e: {name:16s} {e.impl:12s} {mode:10s} "
                + (f"failed: {row['error']}" if row["error"] else
                   f"{row.get('median_ms', float('nan')):9.2f} ms"
                   + (f"  overhead {row['overhead_pct']:+6.1f}%" if "overhead_pct" in row else "")))
    # Speed-up of the fused model over the reference one, per attention type and mode.
    ref = {(r["attention"], r["mode"]): r.get("median_ms") for r in rows if r["impl"] == "eager"}
    for r in rows:
        base = ref.get((r["attention"], r["mode"]))
        if r["impl"].startswith("fused") and base and r.get("median_ms"):
            r["speedup_vs_eager"] = base / r["median_ms"]
    del entries
    return rows
