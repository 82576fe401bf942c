"""Timers. CPU: a perf_counter loop over rotating inputs, sampled in turns across implementations; CUDA: CUDA events via triton.testing.do_bench
(which flushes the L2 cache before each call), or torch.cuda.Event when Triton is missing.

Both return a Stats of per-call times in milliseconds: median, quartiles, min, max, and how many
calls each sample averaged (CPU) or how many samples there were (CUDA).
"""
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch

__all__ = [
    "Stats", "summarize", "CpuSampler", "time_cuda", "last_level_cache_bytes",
    "rotation_count", "keep_freed_memory",
]


@dataclass
class Stats:
    median_ms: float
    q25_ms: float
    q75_ms: float
    min_ms: float
    max_ms: float
    samples: int  # repetitions (CPU) or timed calls (CUDA)
    inner: int  # calls per sample (CPU); 1 on CUDA

    @property
    def iqr_ms(self):
        return self.q75_ms - self.q25_ms

    @property
    def spread_pct(self):
        """IQR relative to the median, in percent."""
        return 100.0 * self.iqr_ms / self.median_ms if self.median_ms > 0 else float("nan")


def summarize(times_ms, inner=1):
    times = sorted(times_ms)
    if len(times) == 1:
        q25 = q75 = times[0]
    else:
        q = statistics.quantiles(times, n=4, method="inclusive")
        q25, q75 = q[0], q[2]
    return Stats(statistics.median(times), q25, q75, times[0], times[-1], len(times), inner)


def last_level_cache_bytes(default=32 << 20):
    """The largest CPU cache reported by sysfs (the LLC), or `default`."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            path = os.path.join(base, entry, "size")
            if entry.startswith("index") and os.path.exists(path):
                text = open(path).read().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
                sizes.append(int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return max(sizes) if sizes else default


def keep_freed_memory():
    """Stops glibc from handing freed memory back to the OS (returns whether it could).

    By default glibc trims the top of its heap once more than twice its (adaptive) mmap threshold is
    free there. A forward+backward that frees two full-size tensors at the end of each call crosses
    that line, and the next call page-faults its outputs in anew: ~1.5 us per 4 KiB page here, 2.3 ms
    a call for two 6.4 MB tensors, more than the kernels take. Whether it happens depends on the
    heap's history (it did for NCHW inputs but not for channels_last ones, whose conversion copies
    left free holes), so timings swing by 2x between identical calls. A fixed mmap threshold and no
    trimming (what jemalloc or tcmalloc do anyway) make the runs repeatable."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))


def rotation_count(bytes_per_input, cache_bytes, cap=64):
    """How many distinct inputs to cycle through so that their total is at least twice the cache:
    each call then finds its input evicted, as a layer's input mostly is in a real network."""
    if bytes_per_input <= 0:
        return 1
    return int(min(cap, max(1, math.ceil(2 * cache_bytes / bytes_per_input))))


class CpuSampler:
    """Times call(i) (input i of n_inputs) on the CPU, one sample at a time, so that several
    implementations can be sampled in turns (interleaved) and share the machine's drifts.

    Construction warms up: `warmup` calls, plus one pass over all inputs (bounded by max_warmup_s),
    then picks `inner`, the consecutive calls one sample averages, so that a sample lasts at least
    min_time seconds (a call slower than that is its own sample). The inputs rotate across calls."""

    def __init__(self, call, n_inputs=1, min_time=0.02, warmup=2, max_warmup_s=2.0):
        self.call, self.n_inputs = call, n_inputs
        start = time.perf_counter()
        for i in range(max(warmup, 1)):
            call(i % n_inputs)
        one = (time.perf_counter() - start) / max(warmup, 1)
        if n_inputs > 1:
            for i in range(n_inputs):
                if time.perf_counter() - start > max_warmup_s:
                    break
                call(i)
        self.inner = 1
        if 0 < min_time and one < min_time:  # calibrate on one more call
            t0 = time.perf_counter()
            call(0)
            one = min(one, time.perf_counter() - t0)
            self.inner = max(1, math.ceil(min_time / max(one, 1e-7)))
        self.next_input = 1 % n_inputs
        self.samples = []

    def sample(self):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            t0 = time.perf_counter()
            for _ in range(self.inner):
                self.call(self.next_input)
                self.next_input = (self.next_input + 1) % self.n_inputs
            self.samples.append((time.perf_counter() - t0) * 1e3 / self.inner)
        finally:
            if was_enabled:
                gc.enable()

    def stats(self):
        return summarize(self.samples, self.inner)


def time_cuda(fn, rep_ms=100, warmup_ms=25, grad_to_none=None):
    """Per-call CUDA-event times of fn, L2 flushed before each call (triton.testing.do_bench)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="all")
        return summarize(list(times))
    # Fallback: events around each call, with a cache flush in between.
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    est_ms = max((time.perf_counter() - t0) * 1e3 / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est_ms))):
        fn()
    n = max(5, int(rep_ms / est_ms))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        for t in grad_to_none or ():
            t.grad = None
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in events])

