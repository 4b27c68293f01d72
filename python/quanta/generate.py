"""Text generation over a paged KV cache: sampling, stop conditions, streaming, batches.

Several prompts run together: one prefill of all prompts (concatenated, attention within
each), then one decode step per token for every unfinished sequence, all in one cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import numpy as np

from .kv_cache import KVCache


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")


def probabilities(logits: np.ndarray, p: SamplingParams, history: Optional[Sequence[int]] = None) -> np.ndarray:
    """float64 [V]: the distribution a token is drawn from, given float logits [V].

    Repetition penalty first (on the ids in history: a positive logit divided by it, a
    negative one multiplied); then with temperature 0 all mass on the first maximum; else
    softmax(logits / temperature) restricted to the top_k largest logits (0: all), to
    tokens with probability >= min_p times the largest, and to the smallest set of most
    likely tokens whose mass reaches top_p, renormalized."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1).copy()
    if not np.isfinite(x).any():
        raise ValueError("sampling: every logit is -inf or NaN")
    if p.repetition_penalty != 1.0 and history is not None and len(history):
        ids = np.unique(np.asarray(history, np.int64))
        ids = ids[(ids >= 0) & (ids < x.size)]
        v = x[ids]
        x[ids] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if p.temperature == 0:
        probs = np.zeros_like(x)
        probs[int(np.argmax(x))] = 1.0
        return probs
    x = x / p.temperature
    if 0 < p.top_k < x.size:
        kth = np.partition(x, -p.top_k)[-p.top_k]
        x = np.where(x >= kth, x, -np.inf)
    x -= x.max()
    probs = np.exp(x)
    probs /= probs.sum()
    if p.min_p > 0:
        probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    if p.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        csum = np.cumsum(probs[order])
        n = min(int(np.searchsorted(csum, p.top_p)) + 1, x.size)
        keep = np.zeros_like(probs)
        keep[order[:n]] = 1.0
        probs *= keep
    return probs / probs.sum()


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator,
           history: Optional[Sequence[int]] = None) -> int:
    """One token id drawn from `probabilities(logits, p, history)` (argmax when greedy)."""
    if p.temperature == 0 and (p.repetition_penalty == 1.0 or not history):
        return int(np.argmax(logits))
    probs = probabilities(logits, p, history)
    if p.temperature == 0:
        return int(np.argmax(probs))
    return int(rng.choice(probs.size, p=probs))


@dataclass
class _Seq:
    idx: int
    prompt: List[int]
    out: List[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    finish_reason: Optional[str] = None
    decoder: object = None


def _stop_cut(text: str, stops: Sequence[str]) -> int:
    """Index of the first stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still start a stop string (not streamed yet)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def run(model, prompts: List[List[int]], max_tokens: int, params: SamplingParams, seed: Optional[int],
        stop: Sequence[str], eos_ids: Sequence[int], kv_dtype, block_size: int = 16) -> Iterator[tuple]:
    """Yields (sequence index, text piece) as text becomes final, then (index, None, reason,
    token ids) once per sequence when it finishes: reason "stop" or "length", the ids it
    generated (a list of int). The cache lives for this call only."""
    dec, cfg = model.decoder, model.config
    tok = model.tokenizer
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty after tokenization (nothing to condition on)")
        if len(p) + max_tokens > cfg.max_position:
            raise ValueError(f"prompt {i}: {len(p)} tokens + max_tokens {max_tokens} exceed the model's context "
                             f"of {cfg.max_position} tokens")
    rng = np.random.default_rng(seed)
    penalize = params.repetition_penalty != 1.0
    eos = set(int(e) for e in eos_ids)
    seqs = [_Seq(i, list(p)) for i, p in enumerate(prompts)]
    for s in seqs:
        s.decoder = tok.stream() if tok is not None else None
    total = sum(-(-(len(p) + max_tokens) // block_size) for p in prompts)
    cache = KVCache(cfg.n_layers, max(total, 1), block_size, cfg.n_kv_heads, cfg.head_dim, kv_dtype)
    for s in seqs:
        cache.add_sequence(s.idx)

    def emit(s: _Seq, tid: int) -> None:
        """Appends token tid to s, decodes it, applies eos / stop strings / max_tokens."""
        s.out.append(tid)
        if tid in eos:
            s.done, s.finish_reason = True, "stop"
            piece = s.decoder.flush() if s.decoder is not None else ""
        else:
            piece = s.decoder.add(tid) if s.decoder is not None else ""
        s.text += piece
        if stop:
            cut = _stop_cut(s.text, stop)
            if cut >= 0:
                s.text = s.text[:cut]
                s.done, s.finish_reason = True, "stop"
                return
        if len(s.out) >= max_tokens and not s.done:
            s.done, s.finish_reason = True, "length"
            if s.decoder is not None:
                s.text += s.decoder.flush()

    streamed = [0] * len(seqs)

    def pieces(s: _Seq):
        keep = 0 if s.done else _held_back(s.text, stop)
        end = len(s.text) - keep
        if end > streamed[s.idx]:
            out = s.text[streamed[s.idx]:end]
            streamed[s.idx] = end
            return out
        return ""

    if max_tokens == 0:
        for s in seqs:
            yield s.idx, None, "length", []
        return
    # prefill: all prompts at once
    ids = np.concatenate([np.asarray(s.prompt, np.int32) for s in seqs])
    pos = np.concatenate([np.arange(len(s.prompt), dtype=np.int32) for s in seqs])
    cu = np.zeros(len(seqs) + 1, np.int32)
    cu[1:] = np.cumsum([len(s.prompt) for s in seqs])
    slots = np.concatenate([cache.reserve(s.idx, len(s.prompt)) for s in seqs])
    def step(rows: List[_Seq], logits: np.ndarray):
        """Samples one token for each of rows, yields their events."""
        for row, s in enumerate(rows):
            tid = sample(logits[row], params, rng, (s.prompt + s.out) if penalize else None)
            emit(s, tid)
            piece = pieces(s)
            if piece:
                yield s.idx, piece
            if s.done:
                yield s.idx, None, s.finish_reason, list(s.out)

    logits = dec.prefill(ids, pos, cu, cache, slots, logit_rows=cu[1:] - 1)
    try:
        yield from step(seqs, logits)
        while True:
            live = [s for s in seqs if not s.done]
            if not live:
                return
            ids = np.array([s.out[-1] for s in live], np.int32)
            pos = np.array([len(s.prompt) + len(s.out) - 1 for s in live], np.int32)
            slots = np.concatenate([cache.reserve(s.idx, 1) for s in live])
            tables = cache.block_tables([s.idx for s in live])
            lens = pos + 1
            yield from step(live, dec.decode(ids, pos, cache, slots, tables, lens.astype(np.int32)))
    finally:
        for s in seqs:
            cache.free_sequence(s.idx)
