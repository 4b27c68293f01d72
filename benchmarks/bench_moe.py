"""Mixture-of-Experts block on the CPU: decode (T=1) and prefill (T=512), side by side with
the `transformers` block in torch float32 when torch and transformers are installed.

    python benchmarks/bench_moe.py [--threads 2] [--quick] [--formats q4_0,q4_k,q8_0]
                                   [--models mixtral,qwen3] [--tokens 1,512] [--no-torch]

Shapes: Mixtral-like d=2048, ffn=5632, E=8, top-2; Qwen3-MoE-like d=2048, ffn=768, E=128,
top-8. Experts are distinct memory (each projection's experts are quantized from a few
random matrices, then stacked into new arrays). Decode: each call routes a different token
from a pool of 64, so the selected experts mostly come from memory; "of floor" = (bytes of
the top_k experts the call reads) / measured read bandwidth / time. Prefill: GOP/s
counting 2 * 3 * d * ffn per (token, expert) pair. Every configuration is checked against
quanta.reference (int8 activations modelled) before it is timed; a wrong result prints no
number. Medians of >= 10 runs (5 for prefill), same threads for quanta and torch.
"""
from __future__ import annotations

import _common

THREADS = _common.setup_threads(2)

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import quanta  # noqa: E402
from quanta import ops, reference  # noqa: E402
from quanta.formats import MoEExperts  # noqa: E402

MODELS = {
    "mixtral": dict(d=2048, ffn=5632, E=8, top_k=2, renormalize=True),
    "qwen3": dict(d=2048, ffn=768, E=128, top_k=8, renormalize=True),
}


def build_experts(rng, m, fmt, distinct=2):
    """E experts quantized from `distinct` random matrices per projection (fast), stacked
    into fresh arrays so every expert has its own memory."""
    E, d, ffn = m["E"], m["d"], m["ffn"]
    qs = {}
    for p, shape in (("gate_proj", (ffn, d)), ("up_proj", (ffn, d)), ("down_proj", (d, ffn))):
        base = [quanta.quantize((rng.standard_normal(shape) * 0.02).astype(np.float32), fmt)
                for _ in range(distinct)]
        qs[p] = [base[e % distinct] for e in range(E)]
    return MoEExperts(qs["gate_proj"], qs["up_proj"], qs["down_proj"])


def check(x, rw, ex, m):
    y = ops.moe(x, rw, ex, m["top_k"], renormalize=m["renormalize"])
    yr, _ = reference.moe(x, rw, ex, m["top_k"], renormalize=m["renormalize"], act_quant=True)
    err = np.linalg.norm(y - yr) / max(np.linalg.norm(yr), 1e-30)
    return err < 1e-4, err


def torch_block(m):
    try:
        import torch
        import transformers as tf
    except ImportError:
        return None
    torch.set_num_threads(THREADS)
    common = dict(hidden_size=m["d"], intermediate_size=m["ffn"], num_experts_per_tok=m["top_k"],
                  hidden_act="silu")
    if m["E"] == 8:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as B
        cfg = tf.MixtralConfig(num_local_experts=m["E"], **common)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as B
        cfg = tf.Qwen3MoeConfig(num_experts=m["E"], moe_intermediate_size=m["ffn"], norm_topk_prob=True,
                                **common)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    blk = B(cfg).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.02)
    return blk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--formats", default="q4_0,q4_k,q8_0")
    ap.add_argument("--models", default="mixtral,qwen3")
    ap.add_argument("--tokens", default="1,512")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    quanta.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    reps = 10 if args.quick else 20
    bw = _common.read_bandwidth(nbytes=(256 << 20) if args.quick else (1 << 30))
    print(f"quanta {quanta.__version__}, path {quanta.info()['isa']}, threads {args.threads}; "
          f"measured read bandwidth {bw / 1e9:.1f} GB/s\n")
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = []
    for mname in args.models.split(","):
        m = MODELS[mname]
        E, d, ffn, k = m["E"], m["d"], m["ffn"], m["top_k"]
        rw = (rng.standard_normal((E, d)) * 0.05).astype(np.float32)
        pool = rng.standard_normal((64, d)).astype(np.float32)
        blk = None if args.no_torch else torch_block(m)
        t_torch = {}
        if blk is not None:
            import torch
            with torch.no_grad():
                blk.gate.weight.copy_(torch.from_numpy(rw))
                for T in tokens:
                    if T == 1:
                        xs = [torch.from_numpy(pool[i:i + 1])[None] for i in range(64)]
                        it = iter(range(1 << 30))
                        t_torch[T] = _common.median_time(lambda: blk(xs[next(it) % 64]), repeats=reps)
                    else:
                        xt = torch.from_numpy(rng.standard_normal((T, d)).astype(np.float32))[None]
                        t_torch[T] = _common.median_time(lambda: blk(xt), repeats=5, warmup=1)
            del blk
        for fmt in args.formats.split(","):
            t0 = time.perf_counter()
            ex = build_experts(rng, m, fmt)
            ok, err = check(pool[:4], rw, ex, m)
            if not ok:
                rows.append([mname, fmt, "", "WRONG", f"rel err {err:.2e}", "", "", ""])
                continue
            for T in tokens:
                if T == 1:
                    it = iter(range(1 << 30))
                    xs = [pool[i:i + 1] for i in range(64)]
                    out = np.empty((1, d), np.float32)
                    t = _common.median_time(lambda: ops.moe(xs[next(it) % 64], rw, ex, k, out=out),
                                            repeats=reps * 3)
                    sel = ex.expert_nbytes * k
                    floor = sel / bw
                    tt = t_torch.get(T)
                    rows.append([mname, fmt, T, f"{t * 1e3:.3f}", f"{sel / t / 1e9:.1f} GB/s",
                                 f"{floor / t:.2f}", "" if tt is None else f"{tt * 1e3:.2f}",
                                 "" if tt is None else f"{tt / t:.1f}"])
                else:
                    x = rng.standard_normal((T, d)).astype(np.float32)
                    out = np.empty((T, d), np.float32)
                    t = _common.median_time(lambda: ops.moe(x, rw, ex, k, out=out), repeats=5, warmup=1)
                    gop = 2.0 * 3 * d * ffn * T * k
                    tt = t_torch.get(T)
                    rows.append([mname, fmt, T, f"{t * 1e3:.1f}", f"{gop / t / 1e9:.0f} GOP/s", "",
                                 "" if tt is None else f"{tt * 1e3:.1f}",
                                 "" if tt is None else f"{tt / t:.1f}"])
            print(f"  ({mname} {fmt}: built and checked in {time.perf_counter() - t0:.0f} s, "
                  f"rel err {err:.1e})", flush=True)
    print()
    _common.print_table(["model", "format", "T", "ms", "rate", "of floor", "torch f32 ms", "x torch"], rows)


if __name__ == "__main__":
    main()
