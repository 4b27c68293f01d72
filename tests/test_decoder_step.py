"""The fused decode step (_C.decoder_step: every dense layer of one token per sequence in
one C call) against the op-by-op path, and its argument checks."""
import numpy as np
import pytest

import quanta
from quanta import _C
from quanta.kv_cache import KVCache
from tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(str(path))
    return quanta.load(str(path), quant={"lm_head": "q8_0", "*": "q4_0"}, progress=False)


def _decode(dec, cfg, B, kv, steps=12, prompt=5):
    cache = KVCache(cfg.n_layers, 8 * B, 4, cfg.n_kv_heads, cfg.head_dim, kv)
    for s in range(B):
        cache.add_sequence(s)
    ids = np.arange(3, 3 + prompt, dtype=np.int32)
    slots = np.concatenate([cache.reserve(s, prompt + s) for s in range(B)])
    toks = np.concatenate([np.arange(3, 3 + prompt + s, dtype=np.int32) for s in range(B)])
    pos = np.concatenate([np.arange(prompt + s, dtype=np.int32) for s in range(B)])
    cu = np.concatenate([[0], np.cumsum([prompt + s for s in range(B)])]).astype(np.int32)
    dec.prefill(toks, pos, cu, cache, slots, logit_rows=cu[1:] - 1)
    lens = np.array([prompt + s for s in range(B)], np.int32)
    tok, out = np.full(B, 7, np.int32), []
    for _ in range(steps):
        s = np.concatenate([cache.reserve(j, 1) for j in range(B)])
        lg = dec.decode(tok, lens, cache, s, cache.block_tables(range(B)), lens + 1)
        out.append(lg)
        tok, lens = lg.argmax(1).astype(np.int32), lens + 1
    return np.stack(out)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("kv", ["float32", "float16", "bfloat16"])
def test_fused_step_equals_op_by_op(model, B, kv):
    dec, cfg = model.decoder, model.config
    assert dec._plan is not None
    fused = _decode(dec, cfg, B, kv)
    plan, dec._plan = dec._plan, None
    try:
        ops = _decode(dec, cfg, B, kv)
    finally:
        dec._plan = plan
    np.testing.assert_array_equal(fused, ops)


def _args(model, B=1):
    dec, cfg = model.decoder, model.config
    cache = KVCache(cfg.n_layers, 4, 4, cfg.n_kv_heads, cfg.head_dim, "float16")
    res = np.zeros((B, cfg.hidden_size), np.float32)
    delta = np.ones((B, cfg.hidden_size), np.float32)
    return [dec._plan, res, delta, cache.k_all, cache.v_all, 1, np.zeros((B, 2), np.int32),
            np.ones(B, np.int32), np.zeros(B, np.int32), np.zeros(B, np.int64)]


def test_step_runs_and_rejects_bad_arguments(model):
    a = _args(model)
    _C.decoder_step(*a)
    assert np.isfinite(a[2]).all()
    bad = [(5, 3, "float caches"), (9, np.array([10 ** 6], np.int64), "slots"), (9, np.array([-1], np.int64), "slots"),
           (7, np.array([0], np.int32), "seq_lens"), (7, np.array([9], np.int32), "seq_lens"),
           (6, np.array([[7, 0]], np.int32), "block_tables"), (1, np.zeros((1, 3), np.float32), "res"),
           (2, np.zeros((2, a[1].shape[1]), np.float32), "delta"), (3, a[3].astype(np.float32), "k_cache"),
           (0, "not a plan", "capsule|plan"), (9, np.zeros(1, np.int32), "slots")]
    for i, val, word in bad:
        b = list(a)
        b[i] = val
        with pytest.raises((ValueError, TypeError), match=word):
            _C.decoder_step(*b)
    b = list(a)
    b[1] = b[2]
    with pytest.raises(ValueError, match="overlap"):
        _C.decoder_step(*b)


def test_layers_with_and_without_fused_projections(tmp_path):
    """Layer 0's k in another format (q, k, v not fusable there), layer 1 fused: the op path
    runs both kinds, decode equals prefill's logits."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(str(path))
    m = quanta.load(str(path), quant={"0.k": "q8_0", "*": "q4_0"}, progress=False)
    blocks = m.decoder.blocks
    assert blocks[0].attn.qkv is None and blocks[1].attn.qkv is not None and m.decoder._plan is None
    ids = list(range(3, 12))
    full = m.forward(ids)
    toks = m.generate(ids[:5], max_tokens=4, return_tokens=True, kv_dtype="float32")
    assert len(toks) == 4
    step = _decode(m.decoder, m.config, 1, "float32", steps=2)
    assert np.isfinite(step).all() and np.isfinite(full).all()
