"""Attention on the CPU: causal prefill GFLOP/s beside torch SDPA, paged decode KV GB/s.

    python benchmarks/bench_attention.py [--threads 2] [--quick] [--json out.json]

Prefill: H=32, Hkv=8, D=128, T = S in (512, 2048, 4096), float32, causal; GFLOP/s counts
4 * T * S * D * H / 2 (QK^T and PV over the causal half) and the ratio to
torch.nn.functional.scaled_dot_product_attention (is_causal, enable_gqa) on the CPU with
the same thread count, when torch is installed. Decode: B = 1 and 8 sequences of 4k..32k
keys in a paged cache (float16 and int8, block size 64), H=32, Hkv=8, D=128; effective GB/s
counts the K and V bytes (and scales) read, beside the read bandwidth this script measures;
small caches rotate through copies so they come from memory. Every output is checked (against
quanta.reference on a slice of heads, or torch) before it is timed: a wrong result prints no
number. Medians of >= 5 runs.
"""
from __future__ import annotations

import _common

THREADS = _common.setup_threads(2)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

import quanta  # noqa: E402
from quanta import reference  # noqa: E402

try:
    import torch  # noqa: E402
    import torch.nn.functional as F  # noqa: E402
except ImportError:
    torch = None


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def prefill(args, rng, reps):
    H, Hkv, D = 32, 8, 128
    G = H // Hkv
    rows, res = [], []
    for T in ([512, 2048] if args.quick else [512, 2048, 4096]):
        q = rng.standard_normal((T, H, D)).astype(np.float32)
        k = rng.standard_normal((T, Hkv, D)).astype(np.float32)
        v = rng.standard_normal((T, Hkv, D)).astype(np.float32)
        out = np.empty_like(q)
        o = quanta.ops.attention(q, k, v, causal=True, out=out)
        err = rel_err(o[:, :G], reference.attention(q[:, :G], k[:, :1], v[:, :1], causal=True))
        if err > 1e-4:
            rows.append([T, "quanta", "WRONG", f"rel err {err:.1e}", ""])
            continue
        flops = 4.0 * T * T * D * H / 2
        r = max(3, reps // (T // 512))
        t = _common.median_time(lambda: quanta.ops.attention(q, k, v, causal=True, out=out), repeats=r, warmup=1)
        t_t = None
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(a).permute(1, 0, 2)[None] for a in (q, k, v))

            def sdpa():
                with torch.no_grad():
                    return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)

            e_t = rel_err(o, sdpa()[0].permute(1, 0, 2).numpy().astype(np.float64))
            if e_t < 1e-4:
                t_t = _common.median_time(sdpa, repeats=r, warmup=1)
            rows.append([T, "torch sdpa", f"{t_t * 1e3:.1f}" if t_t else f"differs {e_t:.1e}",
                         f"{flops / t_t / 1e9:.1f}" if t_t else "", "1.00" if t_t else ""])
        rows.append([T, "quanta", f"{t * 1e3:.1f}", f"{flops / t / 1e9:.1f}", f"{t_t / t:.2f}" if t_t else "-"])
        res.append({"T": T, "ms": t * 1e3, "GFLOPs": flops / t / 1e9, "torch_ms": t_t and t_t * 1e3,
                    "x_torch": t_t / t if t_t else None})
    print(f"Prefill, causal, H={H} Hkv={Hkv} D={D}, float32, {THREADS} threads")
    _common.print_table(["T = S", "impl", "ms", "GFLOP/s", "x torch"], rows)
    return res


def make_cache(rng, dtype, B, n, H=32, Hkv=8, D=128, bs=64):
    c = quanta.KVCache(1, B * (-(-n // bs)), bs, Hkv, D, dtype)
    for b in range(B):
        c.add_sequence(b)
        for s in range(0, n, 8192):
            m = min(8192, n - s)
            c.append(0, b, rng.standard_normal((m, Hkv, D)).astype(np.float32),
                     rng.standard_normal((m, Hkv, D)).astype(np.float32))
    return c


def copy_cache(c):
    d = quanta.KVCache.__new__(quanta.KVCache)
    d.__dict__.update(c.__dict__)
    d.k = [a.copy() for a in c.k]
    d.v = [a.copy() for a in c.v]
    return d


def cache_bytes(c, B, n):
    per_tok = 2 * c.n_kv_heads * c.head_dim * c.dtype.itemsize
    blocks = B * (-(-n // c.block_size))
    return B * n * per_tok + (2 * blocks * c.n_kv_heads * 4 if c.quantized else 0)


def decode(args, rng, reps, bw):
    H, D = 32, 128
    rows, res = [], []
    for B in (1, 8):
        for n in ([4096, 16384] if args.quick else [4096, 16384, 32768]):
            for dtype in ("float16", "int8"):
                c = make_cache(rng, dtype, B, n)
                ids = list(range(B))
                bt, sl = c.block_tables(ids), c.seq_lens(ids, 0)
                q = rng.standard_normal((B, H, D)).astype(np.float32)
                out = np.empty((B, H, D), np.float32)
                o = quanta.ops.paged_attention(q, c, 0, bt, sl, out=out)
                kd, vd = c.dequantized(0)
                r0 = reference.paged_attention(q[:1], kd, vd, bt[:1], sl[:1])
                err = rel_err(o[:1], r0)
                if err > 1e-4:
                    rows.append([B, n, dtype, "", "WRONG", f"rel err {err:.1e}", ""])
                    continue
                del kd, vd
                nbytes = cache_bytes(c, B, n)
                copies = [c] + [copy_cache(c) for _ in range(max(0, min(8, (256 << 20) // nbytes) - 1))]
                state = {"i": 0}

                def call():
                    state["i"] = (state["i"] + 1) % len(copies)
                    quanta.ops.paged_attention(q, copies[state["i"]], 0, bt, sl, out=out)

                t = _common.median_time(call, repeats=reps, warmup=2)
                gbs = nbytes / t / 1e9
                rows.append([B, n, dtype, f"{nbytes / 1e6:.0f}", f"{t * 1e3:.2f}", f"{gbs:.1f}", f"{gbs * 1e9 / bw:.2f}"])
                res.append({"B": B, "keys": n, "cache": dtype, "MB": nbytes / 1e6, "ms": t * 1e3, "GBs": gbs,
                            "frac_bw": gbs * 1e9 / bw})
                del copies, c
    print(f"\nPaged decode, H={H} Hkv=8 D={D}, block 64, {THREADS} threads; read bandwidth {bw / 1e9:.1f} GB/s")
    _common.print_table(["B", "keys", "cache", "MB", "ms", "KV GB/s", "of read bw"], rows)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--json", default=None, help="also write results to this file")
    ap.add_argument("--only", choices=["prefill", "decode"], default=None)
    args = ap.parse_args()
    quanta.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    reps = 5 if args.quick else 10
    bw = _common.read_bandwidth()
    print(f"quanta {quanta.__version__}, path {quanta.info()['isa']}, threads {args.threads}; torch "
          f"{torch.__version__ if torch is not None else 'not installed'}; read bandwidth {bw / 1e9:.1f} GB/s\n")
    results = {"threads": args.threads, "read_bandwidth_GBs": bw / 1e9}
    if args.only in (None, "prefill"):
        results["prefill"] = prefill(args, rng, reps)
    if args.only in (None, "decode"):
        results["decode"] = decode(args, rng, reps, bw)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
