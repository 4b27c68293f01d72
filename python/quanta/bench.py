"""Timing helpers shared by ``python -m quanta bench`` and benchmarks/bench_generate.py: one
prefill into a fresh KV cache, greedy decode steps, and a model's weight summary.

The KV cache is allocated before the clock starts; what is timed is the decoder's own work
(model.decoder.prefill / model.decoder.decode) and, for decode, the argmax that picks the
next token.
"""
from __future__ import annotations

import time
import numpy as np

from .kv_cache import KVCache

BLOCK = 16  # KV cache block size (tokens)


def _cache(model, tokens: int) -> KVCache:
    cfg = model.config
    cache = KVCache(cfg.n_layers, -(-tokens // BLOCK), BLOCK, cfg.n_kv_heads, cfg.head_dim, model.kv_dtype)
    cache.add_sequence(0)
    return cache


def prefill(model, ids: np.ndarray) -> tuple[float, np.ndarray]:
    """(seconds, logits [1, V] of the last token) of one prefill of `ids` (int32 [T]) that
    also fills a fresh KV cache."""
    T = ids.size
    cache = _cache(model, T)
    slots = cache.reserve(0, T)
    pos = np.arange(T, dtype=np.int32)
    cu = np.array([0, T], np.int32)
    rows = np.array([T - 1], np.int32)
    t0 = time.perf_counter()
    logits = model.decoder.prefill(ids, pos, cu, cache, slots, logit_rows=rows)
    return time.perf_counter() - t0, logits


def prefill_rate(model, ids: np.ndarray) -> float:
    """Tokens per second of one prefill of `ids` that also fills a fresh KV cache."""
    return ids.size / prefill(model, ids)[0]


def greedy_decode(model, prompt: np.ndarray, n: int) -> tuple[float, list[int]]:
    """(seconds of n greedy decode steps after `prompt`, the n + 1 greedy tokens: the first
    from the prefill, which is not timed, then one per decode step)."""
    dec = model.decoder
    P = prompt.size
    cache = _cache(model, P + n)
    slots = cache.reserve(0, P)
    logits = dec.prefill(prompt, np.arange(P, dtype=np.int32), np.array([0, P], np.int32), cache, slots,
                         logit_rows=np.array([P - 1], np.int32))
    tok = int(np.argmax(logits[0]))
    out = [tok]
    t0 = time.perf_counter()
    for i in range(n):
        pos = P + i
        slots = cache.reserve(0, 1)
        tables = cache.block_tables([0])
        logits = dec.decode(np.array([tok], np.int32), np.array([pos], np.int32), cache, slots, tables,
                            np.array([pos + 1], np.int32))
        tok = int(np.argmax(logits[0]))
        out.append(tok)
    return time.perf_counter() - t0, out


def decode_rate(model, prompt: np.ndarray, n: int) -> float:
    """Tokens per second of n greedy decode steps after `prompt` (the prefill is not timed)."""
    return n / greedy_decode(model, prompt, n)[0]


def weights(model):
    """(weight count, {format: bytes}) of the tensors the decoder reads."""
    d = model.decoder
    seen, n, by_fmt = set(), 0, {}

    def add(fmt, nbytes):
        by_fmt[fmt] = by_fmt.get(fmt, 0) + int(nbytes)

    for lin in d.linears():
        if id(lin.weight) in seen:
            continue
        seen.add(id(lin.weight))
        n += lin.N * lin.K + (0 if lin.bias is None else lin.bias.size)
        add(lin.format, lin.weight.nbytes)
    if id(d.embed.weight) not in seen:
        n += d.embed.V * d.embed.D
        e = d.embed.weight
        add(str(getattr(e, "format", None) or e.dtype), e.nbytes)
    n += d.norm.size
    for b in d.blocks:
        n += b.attn_norm.size + b.ffn_norm.size
        n += sum(v.size for v in (b.attn.q_norm, b.attn.k_norm) if v is not None)
        mlp = b.mlp
        if getattr(mlp, "router", None) is not None:
            n += mlp.router.size
        experts = getattr(mlp, "experts", None)
        if experts is not None:
            n += experts.E * 3 * experts.ffn * experts.d
            for f in experts.formats:
                add(str(f), experts.nbytes / 3)
        shared = getattr(mlp, "shared", None)
        if shared is not None:
            n += 3 * shared.ffn * shared.d
            for f in shared.formats:
                add(str(f), shared.nbytes / 3)
    return n, by_fmt


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
