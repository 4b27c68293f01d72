"""The gated activations of the MLP blocks: gelu_mul (GeGLU, per kernel path) and silu_mul
(SwiGLU), beside torch's gelu(approximate="tanh") * up on the same inputs.

    python benchmarks/bench_layers.py [--threads 2] [--quick] [--json out.json]

Shapes are [rows, F] with F = 2048 (Gemma 3 270M) and 6912 (a 1B-class MLP), rows 1 (decode)
and 512 (prefill); float32 and bfloat16 inputs, float32 output. Gelem/s counts output
elements; GB/s counts the bytes read and written. Every output is checked against
quanta.reference before it is timed (a wrong result prints no number). Medians of >= 10 runs.
"""
from __future__ import annotations

import _common

THREADS = _common.setup_threads(2)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import quanta  # noqa: E402
from quanta import _C, reference  # noqa: E402

try:
    import torch  # noqa: E402
except ImportError:
    torch = None

BF16 = np.dtype(ml_dtypes.bfloat16)


def check(got, gate, up, ref_fn, what):
    want = ref_fn(gate, up)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    if not err <= 4e-6:
        raise SystemExit(f"{what}: max error {err:.3g} relative to the largest value; not timing it")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--json", default=None, help="also write results to this file")
    args = ap.parse_args()
    quanta.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    best = _C._set_isa("best")
    paths = ["ref", "avx2", "avx512"][: ["ref", "avx2", "avx512"].index(best) + 1]
    print(f"quanta {quanta.__version__}, best path {best}, threads {args.threads}; torch "
          f"{torch.__version__ if torch is not None else 'not installed'}\n")
    shapes = [(1, 2048), (512, 2048)] if args.quick else [(1, 2048), (1, 6912), (512, 2048), (512, 6912)]
    rows, results = [], []
    for M, F in shapes:
        for dt in (np.float32, BF16):
            g = (rng.standard_normal((M, F)) * 3).astype(dt)
            u = rng.standard_normal((M, F)).astype(dt)
            out = np.empty((M, F), np.float32)
            nbytes = 2 * g.nbytes + out.nbytes
            cases = [(f"gelu_mul {p}", p, lambda: quanta.ops.gelu_mul(g, u, out=out), reference.gelu_mul)
                     for p in paths]
            cases.append(("silu_mul", best, lambda: quanta.ops.silu_mul(g, u, out=out), reference.silu_mul))
            if torch is not None:
                tg = torch.from_numpy(g.astype(np.float32) if dt == BF16 else g)
                tu = torch.from_numpy(u.astype(np.float32) if dt == BF16 else u)
                if dt == BF16:
                    tg, tu = tg.bfloat16(), tu.bfloat16()
                to = torch.from_numpy(out)

                def torch_gelu():
                    torch.mul(torch.nn.functional.gelu(tg, approximate="tanh").float(), tu.float(), out=to)

                cases.append(("torch gelu*up", None, torch_gelu, None))
            for name, path, fn, ref_fn in cases:
                if path is not None:
                    _C._set_isa(path)
                fn()
                if ref_fn is not None:
                    check(out, g, u, ref_fn, f"{name} [{M}, {F}] {np.dtype(dt)}")
                t = _common.median_time(fn, repeats=10, warmup=3, min_time=0.2)
                _C._set_isa("best")
                rows.append([f"[{M}, {F}]", str(np.dtype(dt)), name, f"{t * 1e6:.1f}",
                             f"{M * F / t / 1e9:.2f}", f"{nbytes / t / 1e9:.1f}"])
                results.append(dict(M=M, F=F, dtype=str(np.dtype(dt)), kernel=name, us=t * 1e6,
                                    gelem_s=M * F / t / 1e9, GBs=nbytes / t / 1e9))
    _common.print_table(["shape", "dtype", "kernel", "us", "Gelem/s", "GB/s"], rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
