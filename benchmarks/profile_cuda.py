"""One call of each quantized-matmul path on the GPU, for a profiler to look at:

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
        -k regex:qn_q python benchmarks/profile_cuda.py [--format q4_0] [--n 8192] [--k 8192]

Runs M = 1 (GEMV), 16 and 64 (tensor-core GEMM) once each after a warm-up call, checking each
result against quanta.reference first.
"""
import argparse

import numpy as np

import quanta
from quanta import cuda, reference


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="q4_0")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--k", type=int, default=8192)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    qt = quanta.quantize((rng.standard_normal((args.n, args.k)) * 0.02).astype(np.float32), args.format)
    wd = qt.to("cuda")
    for M in (1, 16, 64):
        x = rng.standard_normal((M, args.k)).astype(np.float16)
        xd = cuda.to_device(x)
        y = cuda.qmatmul(xd, wd).numpy()
        yr = reference.qmatmul(x[:8].astype(np.float32), qt)
        err = np.linalg.norm(y[:8] - yr) / np.linalg.norm(yr)
        if err > 1e-2:
            raise SystemExit(f"M={M}: wrong result, rel err {err:.2e}")
        cuda.qmatmul(xd, wd)
        cuda.default_stream(0).synchronize()
        print(f"M={M} path {cuda.qmatmul_path(wd, M)} ok (rel err {err:.1e})")


if __name__ == "__main__":
    main()
