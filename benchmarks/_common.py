"""Shared benchmark helpers: thread setup, medians, the memory-bandwidth probe, tables.

Import this module before numpy and quanta: it fixes the thread count (default 2, or
--threads) for OpenMP and OpenBLAS alike, so ratios compare equal thread counts.
"""
from __future__ import annotations

import os
import sys
import time


def setup_threads(default: int = 2) -> int:
    n = default
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            n = int(sys.argv[i + 1])
        elif a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    return n


def median_time(fn, repeats: int = 10, warmup: int = 2, min_time: float = 0.0) -> float:
    """Median seconds of fn() over `repeats` runs (more if the total is under min_time)."""
    import numpy as np
    for _ in range(warmup):
        fn()
    ts = []
    start = time.perf_counter()
    while len(ts) < repeats or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 10, buf=None) -> float:
    """Bytes/s the machine reads with the current threads (quanta's streaming probe);
    buf: a uint64 array to read (reused between calls), else nbytes of a fresh one."""
    import numpy as np
    from quanta import _C
    a = np.ones(nbytes // 8, dtype=np.uint64) if buf is None else buf
    t = median_time(lambda: _C._read_bandwidth(a), repeats=repeats, warmup=1)
    return a.nbytes / t


def time_against_bandwidth(fn, nbytes: int, rounds: int = 7, repeats: int = 20, probe_bytes: int = 256 << 20):
    """(median seconds of fn, median of nbytes / bandwidth / seconds, median bandwidth):
    rounds that each probe the read bandwidth and then time fn, so the fraction of the
    bandwidth floor is taken from measurements side by side on this noisy machine."""
    import numpy as np
    buf = np.ones(probe_bytes // 8, dtype=np.uint64)
    ts, fr, bws = [], [], []
    for _ in range(rounds):
        bw = read_bandwidth(repeats=3, buf=buf)
        t = median_time(fn, repeats=repeats)
        ts.append(t)
        bws.append(bw)
        fr.append(nbytes / bw / t)
    return float(np.median(ts)), float(np.median(fr)), float(np.median(bws))


class Rotator:
    """Cycles through copies of an object so each call reads weights from memory, not cache."""

    def __init__(self, make_copy, one_bytes: int, total_bytes: int = 320 << 20):
        n = max(2, -(-total_bytes // max(one_bytes, 1)))
        self.items = [make_copy() for _ in range(n)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def print_table(headers, rows, file=sys.stdout):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = " | ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    print(line, file=file)
    print("-+-".join("-" * w for w in widths), file=file)
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)), file=file)
