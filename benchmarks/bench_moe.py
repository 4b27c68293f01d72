"""Mixture-of-Experts block on the CPU: decode (T=1) and prefill (T=512), side by side with
the `transformers` block in torch float32 when torch and transformers are installed.

    python benchmarks/bench_moe.py [--threads 2] [--quick] [--formats q4_0,q4_k,q8_0]
                                   [--models mixtral,qwen3] [--tokens 1,512] [--no-torch]

Shapes: Mixtral-like d=2048, ffn=5632, E=8, top-2; Qwen3-MoE-like d=2048, ffn=768, E=128,
top-8. Experts are distinct memory (each projection's experts are quantized from a few
random matrices, then stacked into new arrays). Decode: each call routes a different token
from a pool of 64 and takes the next of >= 2 copies of the experts (>= 256 MB beyond one
copy), so the selected experts come from memory, not the L3; "of floor" = (bytes of
the top_k experts the call reads) / read bandwidth / time, the median over rounds that each
probe the bandwidth right before timing (this machine's bandwidth wanders). Prefill: GOP/s
counting 2 * 3 * d * ffn per (token, expert) pair. Every configuration is checked against
quanta.reference (int8 activations modelled) before it is timed; a wrong result prints no
number. The torch block (MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock, fused expert
weights gate_up_proj [E, 2 ffn, d] and down_proj [E, d, ffn] as in transformers 5) holds the
dequantized quanta weights and router, and must match quanta.reference without activation
quantization before it is timed; it runs with torch.set_num_threads(threads), under each of
its experts implementations (grouped_mm, the transformers default, and eager), and the
faster counts. Medians of >= 10 runs (5 for prefill), same threads for quanta and torch.
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
    into fresh arrays so every expert has its own memory. Also returns, per projection, the
    dequantized float32 matrices (expert e uses number e % distinct)."""
    E, d, ffn = m["E"], m["d"], m["ffn"]
    qs, deq = {}, {}
    for p, shape in (("gate_proj", (ffn, d)), ("up_proj", (ffn, d)), ("down_proj", (d, ffn))):
        base = [quanta.quantize((rng.standard_normal(shape) * 0.02).astype(np.float32), fmt)
                for _ in range(distinct)]
        qs[p] = [base[e % distinct] for e in range(E)]
        deq[p] = [reference.dequantize(b).astype(np.float32) for b in base]
    return MoEExperts(qs["gate_proj"], qs["up_proj"], qs["down_proj"]), deq


def copy_experts(ex):
    """The same experts in fresh memory (MoEExperts stacks its arrays anew)."""
    return MoEExperts(*([ex[e][p] for e in range(ex.E)] for p in ("gate_proj", "up_proj", "down_proj")))


def rel_err(y, yr):
    return float(np.linalg.norm(y - yr) / max(np.linalg.norm(yr), 1e-30))


# quanta vs reference.moe(act_quant=True), relative L2 per token: float32 accumulation
# (~1e-7), and an int8 code of silu(g) * up that rounds the other way when the kernel's
# float32 h and the reference's float64 h straddle a half step, which moves that expert's
# output by about one code in 127 * sqrt(ffn / 3) (~1e-3 here). A wrong kernel is off by O(1).
CHECK_TOL = 5e-3


def check(x, rw, ex, m):
    y = ops.moe(x, rw, ex, m["top_k"], renormalize=m["renormalize"])
    yr, _ = reference.moe(x, rw, ex, m["top_k"], renormalize=m["renormalize"], act_quant=True)
    err = max(rel_err(y[t], yr[t]) for t in range(len(x)))
    return err < CHECK_TOL, err


TORCH_IMPLS = ("grouped_mm", "eager")


def torch_block(m):
    """The transformers block for model m in float32, or None without torch/transformers."""
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
    cfg._experts_implementation = TORCH_IMPLS[0]
    blk = B(cfg).eval()
    blk.requires_grad_(False)
    return blk


def load_torch_weights(blk, rw, deq, E):
    """Router and experts of blk <- rw[E, d] and the dequantized quanta weights."""
    import torch
    ex = blk.experts
    with torch.no_grad():
        blk.gate.weight.copy_(torch.from_numpy(rw))
        n = len(deq["gate_proj"])
        if hasattr(ex, "gate_up_proj"):  # transformers 5: fused [E, 2 ffn, d] and [E, d, ffn]
            gu = [torch.from_numpy(np.concatenate([deq["gate_proj"][i], deq["up_proj"][i]])) for i in range(n)]
            for e in range(E):
                ex.gate_up_proj[e].copy_(gu[e % n])
                ex.down_proj[e].copy_(torch.from_numpy(deq["down_proj"][e % n]))
        else:  # transformers 4: a list of per-expert MLPs (Mixtral w1 = gate, w3 = up, w2 = down)
            for e, mod in enumerate(ex):
                names = ("w1", "w3", "w2") if hasattr(mod, "w1") else ("gate_proj", "up_proj", "down_proj")
                for name, p in zip(names, ("gate_proj", "up_proj", "down_proj")):
                    getattr(mod, name).weight.copy_(torch.from_numpy(deq[p][e % n]))


def torch_forward(blk, x):
    y = blk(x)
    return y[0] if isinstance(y, tuple) else y


def check_torch(blk, x, rw, ex, m):
    """Relative error of the torch block (every implementation) against quanta.reference
    with the same float weights (no activation quantization); the largest one."""
    import torch
    yr, _ = reference.moe(x, rw, ex, m["top_k"], renormalize=m["renormalize"])
    err = 0.0
    with torch.no_grad():
        for impl in TORCH_IMPLS:
            blk.experts.config._experts_implementation = impl
            yt = torch_forward(blk, torch.from_numpy(x)[None])[0].numpy()
            err = max(err, rel_err(yt.astype(np.float64), yr))
    return err


def time_torch(blk, pool, rng, tokens, reps):
    """{T: (seconds, implementation)}: the faster implementation's median per T."""
    import torch
    d = pool.shape[1]
    best = {}
    with torch.no_grad():
        for impl in TORCH_IMPLS:
            blk.experts.config._experts_implementation = impl
            for T in tokens:
                if T == 1:
                    xs = [torch.from_numpy(pool[i:i + 1])[None] for i in range(64)]
                    it = iter(range(1 << 30))
                    t = _common.median_time(lambda: torch_forward(blk, xs[next(it) % 64]), repeats=reps)
                else:
                    xt = torch.from_numpy(rng.standard_normal((T, d)).astype(np.float32))[None]
                    t = _common.median_time(lambda: torch_forward(blk, xt), repeats=5, warmup=1)
                print(f"  (torch {impl} T={T}: {t * 1e3:.2f} ms)", flush=True)
                if T not in best or t < best[T][0]:
                    best[T] = (t, impl)
    return best


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
        for fmt in args.formats.split(","):
            t0 = time.perf_counter()
            ex, deq = build_experts(rng, m, fmt)
            ok, err = check(pool[:4], rw, ex, m)
            if not ok:
                rows.append([mname, fmt, "", "WRONG", f"rel err {err:.2e}", "", "", "", ""])
                continue
            if blk is not None:
                # the torch block computes the same function on these (dequantized) weights;
                # float32 timings do not depend on the values, so it is timed once per model
                load_torch_weights(blk, rw, deq, E)
                terr = check_torch(blk, pool[:4], rw, ex, m)
                if terr >= 1e-4:
                    print(f"  torch block does not match the reference ({mname} {fmt}): rel err {terr:.2e}; "
                          "no torch numbers")
                    blk, t_torch = None, {}
                elif not t_torch:
                    t_torch = time_torch(blk, pool, rng, tokens, reps)
            for T in tokens:
                tt, impl = t_torch.get(T, (None, ""))
                if T == 1:
                    it = iter(range(1 << 30))
                    xs = [pool[i:i + 1] for i in range(64)]
                    out = np.empty((1, d), np.float32)
                    sel = ex.expert_nbytes * k
                    rot = _common.Rotator(lambda: copy_experts(ex), ex.nbytes, 2 * ex.nbytes + (256 << 20))
                    t, of_floor, _ = _common.time_against_bandwidth(
                        lambda: ops.moe(xs[next(it) % 64], rw, rot.next(), k, out=out), sel,
                        rounds=3 if args.quick else 9, repeats=reps)
                    rows.append([mname, fmt, T, f"{t * 1e3:.3f}", f"{sel / t / 1e9:.1f} GB/s",
                                 f"{of_floor:.2f}", "" if tt is None else f"{tt * 1e3:.2f}", impl,
                                 "" if tt is None else f"{tt / t:.1f}"])
                else:
                    x = rng.standard_normal((T, d)).astype(np.float32)
                    out = np.empty((T, d), np.float32)
                    t = _common.median_time(lambda: ops.moe(x, rw, ex, k, out=out), repeats=5, warmup=1)
                    gop = 2.0 * 3 * d * ffn * T * k
                    rows.append([mname, fmt, T, f"{t * 1e3:.1f}", f"{gop / t / 1e9:.0f} GOP/s", "",
                                 "" if tt is None else f"{tt * 1e3:.1f}", impl,
                                 "" if tt is None else f"{tt / t:.1f}"])
            msg = f"  ({mname} {fmt}: built and checked in {time.perf_counter() - t0:.0f} s, rel err {err:.1e}"
            print(msg + ("" if blk is None else f", torch rel err {terr:.1e}") + ")", flush=True)
        del blk
    print()
    _common.print_table(["model", "format", "T", "ms", "rate", "of floor", "torch f32 ms", "torch impl", "x torch"],
                        rows)


if __name__ == "__main__":
    main()
