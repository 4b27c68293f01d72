"""python -m quanta {info, demo}"""
from __future__ import annotations

import argparse
import sys
import time


def _demo(fmt: str, n: int, m: int) -> int:
    import numpy as np

    import quanta
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, n)) * 0.02).astype(np.float32)
    x = rng.standard_normal((m, n)).astype(np.float32)
    t0 = time.perf_counter()
    wq = quanta.quantize(w, fmt)
    tq = time.perf_counter() - t0
    print(f"quantized W[{n}, {n}] float32 ({w.nbytes / 1e6:.1f} MB) to {wq.format}: "
          f"{wq.nbytes / 1e6:.1f} MB, {wq.bits_per_weight:.3f} bits/weight, in {tq * 1e3:.0f} ms")
    for rows in (1, m):
        xr = x[:rows]
        y = quanta.ops.qmatmul(xr, wq)
        ref = xr.astype(np.float64) @ w.T.astype(np.float64)
        err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        reps = 20 if rows == 1 else 3
        t0 = time.perf_counter()
        for _ in range(reps):
            quanta.ops.qmatmul(xr, wq)
        tk = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            xr @ w.T
        tn = (time.perf_counter() - t0) / reps
        print(f"  M={rows:4d}: y = x @ W^T relative error vs float64 {err:.2e}; "
              f"{tk * 1e3:.2f} ms (NumPy float32: {tn * 1e3:.2f} ms, {tn / tk:.1f}x)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quanta", description="quanta command line")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="version, kernel paths, threads, CUDA")
    d = sub.add_parser("demo", help="quantize a random layer and multiply, checked against NumPy")
    d.add_argument("--format", default="q4_k")
    d.add_argument("--size", type=int, default=4096)
    d.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        import quanta
        quanta.print_info()
        return 0
    return _demo(args.format, args.size, args.batch)


if __name__ == "__main__":
    sys.exit(main())
