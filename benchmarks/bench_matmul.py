"""Benchmark of quanta._C.matmul (y[M, N] = x[M, K] @ w[N, K]^T) against NumPy's float32 matmul.

    PYTHONPATH=python python benchmarks/bench_matmul.py [--threads 2] [--runs 10] [--m 1 16 64 512]

Both run with the same thread count (OMP_NUM_THREADS / OPENBLAS_NUM_THREADS, set before
NumPy and quanta are imported). Every case first checks the kernel's output against NumPy in
float64, then reports the median of --runs timed calls (after a pause, so that the other library's worker
threads have stopped spinning). A block during which other processes kept a core busy is
timed again, and marked with * if it never ran undisturbed. Weights are rotated through several
copies totalling >= 256 MB so that they come from memory, as in decode. GEMV (M = 1) is
reported as GB/s of weights read, GEMM (M = 16, 64, 512) as GFLOP/s (2*M*N*K); ratio is
NumPy's time / quanta's time for the same M (> 1: quanta is faster).
"""
import argparse
import os
import sys

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--runs", type=int, default=10)
ap.add_argument("--n", type=int, default=4096)
ap.add_argument("--k", type=int, default=4096)
ap.add_argument("--m", type=int, nargs="*", default=[1, 16, 64, 512])
ap.add_argument("--rotate-mb", type=int, default=256, help="total size of the rotated weight copies")
args = ap.parse_args()
os.environ["OMP_NUM_THREADS"] = str(args.threads)
os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)

import glob  # noqa: E402
import importlib.util  # noqa: E402
import time  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

try:
    from quanta import _C
except ImportError:  # a kernels-only checkout: load the extension without the Python layer
    _path = glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "quanta", "_C*.so"))[0]
    _spec = importlib.util.spec_from_file_location("quanta._C", _path)
    _C = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_C)

CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(ml_dtypes.bfloat16): 2}
NAMES = {0: "f32", 1: "f16", 2: "bf16"}


def _busy_seconds():
    """CPU seconds all processes have spent busy so far (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
    except OSError:
        return None
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def median_time(fn, runs, tries=6):
    """Median of runs timed calls. On a shared machine a block during which other processes
    used more than 5% of a core is timed again (up to tries times); returns (median, clean)."""
    for _ in range(tries):
        # OpenBLAS and OpenMP worker threads spin for a while after a call; on a 2-core
        # machine the spinning threads of one library would steal a core from the other's
        time.sleep(0.5)
        fn()  # warm-up
        b0, c0, w0 = _busy_seconds(), time.process_time(), time.perf_counter()
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        b1, c1, w1 = _busy_seconds(), time.process_time(), time.perf_counter()
        clean = b0 is None or (b1 - b0) - (c1 - c0) < 0.05 * (w1 - w0)
        if clean:
            break
    return float(np.median(ts)), clean


def weight_copies(w, total_mb):
    n = max(1, -(-(total_mb << 20) // w.nbytes))
    return [w.copy() for _ in range(n)]


def check(x, w):
    y = _C.matmul(x, CODES[x.dtype], w, CODES[w.dtype], None)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    err = np.abs(y - x64 @ w64.T).max()
    scale = (np.abs(x64) @ np.abs(w64).T).max()
    if not err <= 2e-5 * scale:
        sys.exit(f"matmul output wrong: max error {err:.3g} for scale {scale:.3g}")


def main():
    N, K = args.n, args.k
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((N, K), dtype=np.float32)
    info = _C.info()
    print(f"quanta matmul, N={N} K={K}, {args.threads} threads, isa={info['isa']}, NumPy {np.__version__}, "
          f"median of {args.runs}")
    print(f"{'case':<22} {'quanta ms':>10} {'rate':>14} {'numpy f32 ms':>13} {'rate':>14} {'ratio':>6}")
    sets = {}
    for M in args.m:
        x32 = rng.standard_normal((M, K), dtype=np.float32)
        # NumPy baseline: float32 x @ w.T on rotated copies
        if "np" not in sets:
            sets["np"] = weight_copies(w32, args.rotate_mb)
        ws, it = sets["np"], [0]

        def run_np():
            it[0] = (it[0] + 1) % len(ws)
            np.matmul(x32, ws[it[0]].T)

        t_np, clean_np = median_time(run_np, args.runs)
        for xdt, wdt in [(np.float32, np.float32), (np.float32, np.float16), (np.float32, ml_dtypes.bfloat16),
                         (ml_dtypes.bfloat16, ml_dtypes.bfloat16)]:
            x = x32.astype(xdt)
            key = np.dtype(wdt).name
            if key not in sets:
                sets[key] = weight_copies(w32.astype(wdt), args.rotate_mb)
            wl = sets[key]
            check(x, wl[0][: min(N, 512)])
            xc, wc, out, it = CODES[x.dtype], CODES[wl[0].dtype], np.empty((M, N), np.float32), [0]

            def run_q():
                it[0] = (it[0] + 1) % len(wl)
                _C.matmul(x, xc, wl[it[0]], wc, out)

            t_q, clean_q = median_time(run_q, args.runs)
            name = f"M={M} x {NAMES[xc]} w {NAMES[wc]}"
            if M == 1:
                rq, rn = f"{wl[0].nbytes / t_q / 1e9:.1f} GB/s", f"{w32.nbytes / t_np / 1e9:.1f} GB/s"
            else:
                rq, rn = f"{2 * M * N * K / t_q / 1e9:.1f} GFLOP/s", f"{2 * M * N * K / t_np / 1e9:.1f} GFLOP/s"
            flag = "" if clean_q and clean_np else "  * other processes were busy"
            print(f"{name:<22} {t_q * 1e3:>10.3f} {rq:>14} {t_np * 1e3:>13.3f} {rn:>14} {t_np / t_q:>6.2f}{flag}",
                  flush=True)


if __name__ == "__main__":
    main()
