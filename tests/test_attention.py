"""Attention (prefill and paged decode) against the float64 reference, torch SDPA when it is
installed, across dtypes, masks, GQA ratios, head dims, ISA paths and thread counts."""
import ml_dtypes
import numpy as np
import pytest

import quanta
from quanta import _C
from quanta import reference as R
from tolerances import assert_close

try:
    import torch
except ImportError:  # torch is an optional oracle
    torch = None

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float32, np.float16, BF16]


def qkv(rng, T, S, H, Hkv, D, dtype=np.float32, scale=1.0):
    q = (rng.standard_normal((T, H, D)) * scale).astype(dtype)
    k = rng.standard_normal((S, Hkv, D)).astype(dtype)
    v = rng.standard_normal((S, Hkv, D)).astype(dtype)
    return q, k, v


def run_and_check(q, k, v, what, key="attention", **kw):
    copies = [a.copy() for a in (q, k, v)]
    o = quanta.ops.attention(q, k, v, **kw)
    for a, c in zip((q, k, v), copies):  # inputs unchanged
        np.testing.assert_array_equal(a.view(np.uint8), c.view(np.uint8))
    assert o.dtype == np.float32 and o.shape == q.shape
    assert_close(o, R.attention(q, k, v, **kw), key, what)
    return o


# ---- prefill ----

@pytest.mark.parametrize("D", [64, 80, 96, 128, 256, 72, 33, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_head_dims(rng, isa, D, causal):
    for T, S in [(1, 1), (37, 37), (70, 130), (130, 70)]:
        q, k, v = qkv(rng, T, S, 4, 2, D)
        run_and_check(q, k, v, f"D={D} T={T} S={S} causal={causal} {isa}", causal=causal)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 2), (16, 2), (8, 1)])
def test_gqa_mqa(rng, isa, H, Hkv):
    q, k, v = qkv(rng, 45, 77, H, Hkv, 64)
    run_and_check(q, k, v, f"H={H} Hkv={Hkv} {isa}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
def test_dtypes(rng, isa, dtype):
    q, k, v = qkv(rng, 66, 66, 4, 2, 128, dtype)
    run_and_check(q, k, v, f"{np.dtype(dtype)} {isa}")
    run_and_check(q, k, v, f"{np.dtype(dtype)} window {isa}", causal=False, window=9)


def _naive_low_precision(q, k, v, dtype, causal):
    """Attention computed in the inputs' own precision (products in fp32, every result
    rounded to dtype): the baseline of the 2x rule."""
    T, H, D = q.shape
    G = H // k.shape[1]
    mask = R.attention_mask(T, k.shape[0], causal, None)
    o = np.zeros(q.shape, dtype)
    sc = np.array(1 / np.sqrt(D), dtype)
    for h in range(H):
        s = (q[:, h].astype(np.float32) @ k[:, h // G].astype(np.float32).T).astype(dtype) * sc
        s = np.where(mask, s, np.array(-np.inf, dtype)).astype(dtype)
        p = np.exp((s - s.max(axis=1, keepdims=True)).astype(dtype)).astype(dtype)
        p = (p / p.sum(axis=1, keepdims=True, dtype=dtype)).astype(dtype)
        o[:, h] = (p.astype(np.float32) @ v[:, h // G].astype(np.float32)).astype(dtype)
    return o


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["f16", "bf16"])
def test_low_precision_2x_rule(rng, dtype):
    """Error vs float64 (on the float64 values of the rounded inputs) is at most 2x that of a
    naive implementation computing in the inputs' precision."""
    for causal in (True, False):
        q, k, v = qkv(rng, 96, 96, 4, 2, 128, dtype, scale=2.0)
        exact = R.attention(q, k, v, causal=causal)
        ours = np.linalg.norm(quanta.ops.attention(q, k, v, causal=causal) - exact)
        naive = np.linalg.norm(_naive_low_precision(q, k, v, dtype, causal).astype(np.float64) - exact)
        assert ours <= 2 * naive, f"{np.dtype(dtype)} causal={causal}: error {ours:.3e} > 2 x naive {naive:.3e}"


def test_masks(rng, isa):
    q, k, v = qkv(rng, 50, 120, 4, 2, 64)
    for causal in (True, False):
        for window in (0, 1, 7, 64, 500):
            run_and_check(q, k, v, f"causal={causal} window={window} {isa}", causal=causal, window=window)
    run_and_check(q, k, v, f"softcap {isa}", softcap=5.0, scale=0.5)
    run_and_check(q, k, v, f"softcap window {isa}", softcap=30.0, window=20)


def test_fully_masked_rows_are_zero(rng, isa):
    """Causal with S < T: the first T - S queries see no key."""
    q, k, v = qkv(rng, 90, 20, 4, 2, 64)
    o = run_and_check(q, k, v, f"S<T {isa}", causal=True)
    assert np.all(o[:70] == 0) and np.all(np.isfinite(o))
    assert np.all(np.abs(o[70:]).sum(axis=-1) > 0)


def test_empty(rng, isa):
    q, k, v = qkv(rng, 0, 10, 4, 2, 64)
    assert quanta.ops.attention(q, k, v).shape == (0, 4, 64)
    q, k, v = qkv(rng, 7, 0, 4, 2, 64)
    o = quanta.ops.attention(q, k, v, causal=False)
    assert o.shape == (7, 4, 64) and np.all(o == 0)


def test_large_logits_stay_finite(rng, isa):
    q, k, v = qkv(rng, 64, 64, 2, 1, 64)
    q *= np.float32(1e4 / np.sqrt(64) / 8)  # logits of order +-1e4
    for causal in (True, False):
        o = run_and_check(q, k, v, f"large logits {isa}", causal=causal)
        assert np.all(np.isfinite(o))


def test_varlen(rng, isa):
    cq = np.array([0, 5, 5, 70, 71, 140], np.int32)
    ck = np.array([0, 9, 12, 77, 77, 200], np.int32)
    q, k, v = qkv(rng, int(cq[-1]), int(ck[-1]), 8, 2, 80)
    for causal in (True, False):
        o = run_and_check(q, k, v, f"varlen causal={causal} {isa}", causal=causal, cu_seqlens_q=cq,
                          cu_seqlens_k=ck, window=30 if not causal else None)
        for s in range(len(cq) - 1):  # each sequence alone gives the same rows
            a, b, c, d = cq[s], cq[s + 1], ck[s], ck[s + 1]
            o1 = quanta.ops.attention(q[a:b], k[c:d], v[c:d], causal=causal, window=30 if not causal else None)
            np.testing.assert_allclose(o[a:b], o1, rtol=0, atol=1e-6)


def test_isa_paths_against_ref(rng):
    from conftest import supported_isas
    cases = [dict(T=67, S=67, H=4, Hkv=1, D=128, kw={}), dict(T=5, S=300, H=8, Hkv=8, D=96, kw=dict(causal=False)),
             dict(T=33, S=90, H=6, Hkv=2, D=33, kw=dict(window=17, softcap=3.0))]
    for dtype in DTYPES:
        for c in cases:
            q, k, v = qkv(rng, c["T"], c["S"], c["H"], c["Hkv"], c["D"], dtype)
            outs = {}
            try:
                for isa in supported_isas():
                    _C._set_isa(isa)
                    outs[isa] = quanta.ops.attention(q, k, v, **c["kw"])
            finally:
                _C._set_isa("best")
            for isa, o in outs.items():
                assert_close(o, outs["ref"], "attention_isa", f"{isa} vs ref {np.dtype(dtype)} {c}")


def test_threads_do_not_change_results(rng, threads):
    q, k, v = qkv(rng, 200, 200, 4, 2, 64)
    outs = []
    for n in (1, 2, 3):
        quanta.set_num_threads(n)
        outs.append(quanta.ops.attention(q, k, v))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_out_argument(rng):
    q, k, v = qkv(rng, 20, 30, 4, 2, 64)
    out = np.full((20, 4, 64), np.nan, np.float32)
    r = quanta.ops.attention(q, k, v, out=out)
    assert r is out
    np.testing.assert_array_equal(out, quanta.ops.attention(q, k, v))
    with pytest.raises(ValueError, match="out"):
        quanta.ops.attention(q, k, v, out=np.zeros((20, 4, 63), np.float32))
    with pytest.raises(TypeError, match="out"):
        quanta.ops.attention(q, k, v, out=np.zeros((20, 4, 64), np.float64))


def test_bad_arguments(rng):
    q, k, v = qkv(rng, 8, 8, 6, 4, 32)
    with pytest.raises(ValueError, match="Hkv"):
        quanta.ops.attention(q, k, v)
    q, k, v = qkv(rng, 8, 8, 4, 2, 32)
    with pytest.raises(TypeError, match="q"):
        quanta.ops.attention(q.astype(np.float64), k, v)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        quanta.ops.attention(q, k.astype(np.float16), v)
    with pytest.raises(TypeError, match="v"):
        quanta.ops.attention(q, k, [1.0])
    with pytest.raises(ValueError, match="v"):
        quanta.ops.attention(q, k, v[:, :, :16].copy())
    with pytest.raises(ValueError, match="k"):
        quanta.ops.attention(q, k[:, :, :16].copy(), v)
    with pytest.raises(ValueError, match="q"):
        quanta.ops.attention(q[:, :, ::2], k, v)
    with pytest.raises(ValueError, match="q"):
        quanta.ops.attention(q[0], k, v)
    with pytest.raises(ValueError, match="window"):
        quanta.ops.attention(q, k, v, window=-1)
    with pytest.raises(ValueError, match="softcap"):
        quanta.ops.attention(q, k, v, softcap=0.0)
    good = np.array([0, 3, 8], np.int32)
    for bad, exc in [(np.array([0, 5, 3, 8], np.int32), "non-decreasing"), (np.array([0, 3, 7], np.int32), "number"),
                     (np.array([1, 3, 8], np.int32), r"\[0\] must be 0")]:
        with pytest.raises(ValueError, match="cu_seqlens_q.*" + exc if exc != "number" else "cu_seqlens_q"):
            quanta.ops.attention(q, k, v, cu_seqlens_q=bad, cu_seqlens_k=good if len(bad) == 3 else
                                 np.array([0, 1, 2, 8], np.int32))
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        quanta.ops.attention(q, k, v, cu_seqlens_q=good.astype(np.int64), cu_seqlens_k=good)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        quanta.ops.attention(q, k, v, cu_seqlens_q=good, cu_seqlens_k=good[:2])
    with pytest.raises(ValueError, match="together"):
        quanta.ops.attention(q, k, v, cu_seqlens_q=good)


# ---- torch oracle (optional) ----

@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("H,Hkv", [(8, 8), (8, 2), (8, 1)])
def test_against_torch_sdpa(rng, H, Hkv):
    import torch.nn.functional as F
    for T, S, causal, window in [(64, 64, True, None), (40, 100, True, None), (100, 40, False, None),
                                 (77, 77, False, 10), (50, 90, True, 13)]:
        q, k, v = qkv(rng, T, S, H, Hkv, 128)
        o = quanta.ops.attention(q, k, v, causal=causal, window=window)
        tq, tk, tv = (torch.from_numpy(a).permute(1, 0, 2)[None] for a in (q, k, v))
        mask = torch.from_numpy(R.attention_mask(T, S, causal, window))
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, enable_gqa=True)[0].permute(1, 0, 2)
        ref = torch.nan_to_num(ref).numpy()  # torch gives NaN on fully masked rows; we give zeros
        ref[~R.attention_mask(T, S, causal, window).any(axis=1)] = 0
        assert_close(o, ref, "attention_torch", f"torch T={T} S={S} causal={causal} window={window}")
        if T == S and causal and window is None:  # is_causal agrees with bottom-right alignment when T == S
            with torch.no_grad():
                ref2 = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)[0].permute(1, 0, 2)
            assert_close(o, ref2.numpy(), "attention_torch", "torch is_causal")


# ---- paged KV cache and decode ----

KV_DTYPES = ["float32", "float16", "bfloat16", "int8", "fp8_e4m3"]


def filled_cache(rng, dtype, lens, Hkv=2, D=64, block_size=16, n_blocks=None, n_layers=2, layer=1, chunks=3):
    """A cache holding len(lens) sequences (ids 0..), each appended in a few chunks at `layer`."""
    need = sum(-(-n // block_size) for n in lens)
    c = quanta.KVCache(n_layers, n_blocks or need + 3, block_size, Hkv, D, dtype)
    for s, n in enumerate(lens):
        c.add_sequence(s)
        for part in np.array_split(np.arange(n), chunks):
            c.append(layer, s, rng.standard_normal((len(part), Hkv, D)).astype(np.float32),
                     rng.standard_normal((len(part), Hkv, D)).astype(np.float32))
    return c


def gathered(cache, layer, seq_id):
    """float32 k, v [n, Hkv, D] of one sequence, dequantized."""
    k, v = cache.dequantized(layer)
    n = int(cache.seq_lens([seq_id], layer)[0])
    ids = cache.block_tables([seq_id])[0][: -(-n // cache.block_size)]
    return (k[ids].reshape(-1, *k.shape[2:])[:n].astype(np.float32),
            v[ids].reshape(-1, *v.shape[2:])[:n].astype(np.float32))


@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_paged_vs_reference_and_prefill(rng, isa, dtype):
    lens = [1, 5, 16, 17, 0, 700, 1100]  # shorter than a block, empty, several 256-key splits
    c = filled_cache(rng, dtype, lens)
    ids = list(range(len(lens)))
    bt, sl = c.block_tables(ids), c.seq_lens(ids, 1)
    q = rng.standard_normal((len(lens), 8, 64)).astype(np.float32)
    copies = [a.copy() for a in (q, bt, sl, c.k[1], c.v[1])]
    o = quanta.ops.paged_attention(q, c, 1, bt, sl)
    for a, b in zip((q, bt, sl, c.k[1], c.v[1]), copies):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    key = "attention_i8_cache" if dtype == "int8" else "attention"
    assert_close(o, quanta.ops.paged_attention(q, c, 1, bt, sl, backend="reference"), key, f"{dtype} {isa}")
    assert np.all(o[4] == 0)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        k, v = gathered(c, 1, b)
        ref = quanta.ops.attention(q[b][None], k, v, causal=True)[0]
        assert_close(o[b], ref, "attention_i8_cache" if dtype == "int8" else "paged_vs_prefill",
                     f"{dtype} seq {b} (len {n}) {isa}")


@pytest.mark.parametrize("window", [0, 3, 255, 256, 600, 5000])
def test_paged_sliding_window(rng, isa, window):
    """The query (the newest position) sees the last window + 1 keys: equal to the reference
    and to prefill attention with the same window over the gathered keys."""
    lens = [1, 5, 300, 1100]
    c = filled_cache(rng, "float16", lens)
    ids = list(range(len(lens)))
    bt, sl = c.block_tables(ids), c.seq_lens(ids, 1)
    q = rng.standard_normal((len(lens), 8, 64)).astype(np.float32)
    o = quanta.ops.paged_attention(q, c, 1, bt, sl, window=window)
    assert_close(o, quanta.ops.paged_attention(q, c, 1, bt, sl, window=window, backend="reference"), "attention",
                 f"window {window} {isa}")
    for b in ids:
        k, v = gathered(c, 1, b)
        ref = quanta.ops.attention(q[b][None], k, v, causal=True, window=window)[0]
        assert_close(o[b], ref, "paged_vs_prefill", f"window {window} seq {b} {isa}")
    with pytest.raises(ValueError, match="window"):
        quanta.ops.paged_attention(q, c, 1, bt, sl, window=-1)


@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 64), (8, 2, 128), (16, 2, 80), (8, 1, 96), (4, 1, 72), (6, 3, 33),
                                     (4, 2, 256)])
def test_paged_gqa_and_head_dims(rng, isa, H, Hkv, D):
    lens = [3, 530]
    for dtype in ("float16", "int8"):
        c = filled_cache(rng, dtype, lens, Hkv=Hkv, D=D, block_size=32)
        ids = [0, 1]
        q = rng.standard_normal((2, H, D)).astype(np.float16)
        o = quanta.ops.paged_attention(q, c, 1, c.block_tables(ids), c.seq_lens(ids, 1))
        r = quanta.ops.paged_attention(q, c, 1, c.block_tables(ids), c.seq_lens(ids, 1), backend="reference")
        assert_close(o, r, "attention_i8_cache" if dtype == "int8" else "attention",
                     f"H={H} Hkv={Hkv} D={D} {dtype} {isa}")


def test_paged_softcap_and_large_logits(rng, isa):
    c = filled_cache(rng, "float32", [40, 600])
    ids = [0, 1]
    q = (rng.standard_normal((2, 4, 64)) * 1e3).astype(np.float32)  # logits of order 1e4
    for softcap in (None, 20.0):
        o = quanta.ops.paged_attention(q, c, 1, c.block_tables(ids), c.seq_lens(ids, 1), softcap=softcap)
        assert np.all(np.isfinite(o))
        r = quanta.ops.paged_attention(q, c, 1, c.block_tables(ids), c.seq_lens(ids, 1), softcap=softcap,
                                       backend="reference")
        assert_close(o, r, "attention", f"softcap={softcap} {isa}")


def test_paged_threads_do_not_change_results(rng, threads):
    c = filled_cache(rng, "int8", [1500])
    q = rng.standard_normal((1, 8, 64)).astype(np.float32)
    outs = []
    for n in (1, 2, 3):
        quanta.set_num_threads(n)
        outs.append(quanta.ops.paged_attention(q, c, 1, c.block_tables([0]), c.seq_lens([0], 1)))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3"])
def test_quantized_append_policy(rng, dtype):
    c = quanta.KVCache(1, 4, 8, 2, 16, dtype)
    c.add_sequence("a")
    big = rng.standard_normal((3, 2, 16)).astype(np.float32) * 4
    c.append(0, "a", big, big)
    codes, scale = c.k[0][0, :3].copy(), c.k_scale[0][0].copy()
    small = big[:2] * 0.1  # fits the current scale: earlier codes stay exact
    c.append(0, "a", small, small)
    np.testing.assert_array_equal(c.k[0][0, :3].view(np.uint8), codes.view(np.uint8))
    np.testing.assert_array_equal(c.k_scale[0][0], scale)
    huge = big[:1] * 10  # needs a larger scale: earlier rows are requantized
    c.append(0, "a", huge, huge)
    assert np.all(c.k_scale[0][0] > scale)
    k, _ = c.dequantized(0)
    want = np.concatenate([big, small, huge])
    step = c.k_scale[0][0][None, :, None]
    rel = 0.5 if dtype == "int8" else 0.0625 * 448  # half a step (int8); e4m3 relative half-ulp
    err = np.abs(k[0, :6] - want)
    bound = (2 * rel * step) if dtype == "int8" else np.maximum(2 * 0.0625 * np.abs(want), 2 * step * 2 ** -9 * 448)
    assert np.all(err <= bound + 1e-6), err.max()
    # accuracy vs the float keys
    assert np.linalg.norm(k[0, :6] - want) / np.linalg.norm(want) < (0.02 if dtype == "int8" else 0.06)


def test_cache_allocator_and_full_error(rng):
    c = quanta.KVCache(2, 3, 4, 1, 8, np.float16)
    c.add_sequence(7)
    x = rng.standard_normal((9, 1, 8)).astype(np.float32)
    c.append(0, 7, x, x)
    assert c.free_blocks == 0 and c.seq_lens([7], 0)[0] == 9
    before = [a.copy() for a in c.k + c.v]
    c.add_sequence(8)
    with pytest.raises(quanta.KVCacheFullError, match="blocks"):
        c.append(0, 8, x[:1], x[:1])
    with pytest.raises(MemoryError, match="nothing was written"):
        c.append(0, 7, x[:4], x[:4])  # 13 tokens need a 4th block
    for a, b in zip(c.k + c.v, before):
        np.testing.assert_array_equal(a, b)
    assert c.seq_lens([7, 8], 0).tolist() == [9, 0]
    c.append(0, 7, x[:3], x[:3])  # fills the last block exactly
    assert c.seq_lens([7], 0)[0] == 12
    c.append(1, 7, x[:2], x[:2])  # another layer reuses the sequence's blocks
    assert c.seq_lens([7], 1)[0] == 2 and c.free_blocks == 0
    c.free_sequence(7)
    assert c.free_blocks == 3
    c.append(0, 8, x, x)
    assert c.block_tables([8]).tolist() == [[0, 1, 2]]
    with pytest.raises(KeyError):
        c.append(0, 7, x, x)
    with pytest.raises(ValueError, match="already exists"):
        c.add_sequence(8)
    with pytest.raises(ValueError, match="k must have shape"):
        c.append(0, 8, x[:, :, :4], x)
    with pytest.raises(ValueError, match="layer"):
        c.append(2, 8, x, x)
    with pytest.raises(TypeError, match="dtype"):
        quanta.KVCache(1, 1, 1, 1, 1, np.int16)


def test_paged_bad_arguments(rng):
    c = filled_cache(rng, "float16", [20, 3], Hkv=2, D=32, block_size=8)
    ids = [0, 1]
    bt, sl = c.block_tables(ids), c.seq_lens(ids, 1)
    q = rng.standard_normal((2, 4, 32)).astype(np.float32)
    quanta.ops.paged_attention(q, c, 1, bt, sl)
    bad = bt.copy()
    bad[0, 1] = c.n_blocks
    with pytest.raises(ValueError, match=r"block_tables\[0, 1\]"):
        quanta.ops.paged_attention(q, c, 1, bad, sl)
    bad[0, 1] = -1
    with pytest.raises(ValueError, match="block_tables"):
        quanta.ops.paged_attention(q, c, 1, bad, sl)
    with pytest.raises(ValueError, match=r"seq_lens\[1\]"):
        quanta.ops.paged_attention(q, c, 1, bt, np.array([20, 100], np.int32))
    with pytest.raises(ValueError, match="seq_lens"):
        quanta.ops.paged_attention(q, c, 1, bt, np.array([-1, 3], np.int32))
    with pytest.raises(TypeError, match="block_tables"):
        quanta.ops.paged_attention(q, c, 1, bt.astype(np.int64), sl)
    with pytest.raises(TypeError, match="seq_lens"):
        quanta.ops.paged_attention(q, c, 1, bt, [20, 3])
    with pytest.raises(ValueError, match="seq_lens"):
        quanta.ops.paged_attention(q, c, 1, bt, sl[:1])
    with pytest.raises(ValueError, match="Hkv"):
        quanta.ops.paged_attention(rng.standard_normal((2, 3, 32)).astype(np.float32), c, 1, bt, sl)
    with pytest.raises(ValueError, match="q"):
        quanta.ops.paged_attention(rng.standard_normal((2, 4, 16)).astype(np.float32), c, 1, bt, sl)
    with pytest.raises(TypeError, match="q"):
        quanta.ops.paged_attention(q.astype(np.float64), c, 1, bt, sl)
    with pytest.raises(ValueError, match="layer"):
        quanta.ops.paged_attention(q, c, 5, bt, sl)
    with pytest.raises(TypeError, match="cache"):
        quanta.ops.paged_attention(q, None, 1, bt, sl)


# ---- binding hygiene ----

def test_threads_calling_at_once_agree(rng):
    import threading
    q, k, v = qkv(rng, 100, 150, 8, 2, 64)
    c = filled_cache(rng, "int8", [300, 20])
    bt, sl = c.block_tables([0, 1]), c.seq_lens([0, 1], 1)
    qd = rng.standard_normal((2, 8, 64)).astype(np.float32)
    want = quanta.ops.attention(q, k, v), quanta.ops.paged_attention(qd, c, 1, bt, sl)
    bad = []

    def work():
        for _ in range(20):
            a, b = quanta.ops.attention(q, k, v), quanta.ops.paged_attention(qd, c, 1, bt, sl)
            if not (np.array_equal(a, want[0]) and np.array_equal(b, want[1])):
                bad.append(1)

    ts = [threading.Thread(target=work) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad


def test_no_reference_leaks(rng):
    import sys
    q, k, v = qkv(rng, 9, 9, 4, 2, 32)
    out = np.empty((9, 4, 32), np.float32)
    c = filled_cache(rng, "float16", [9], Hkv=2, D=32)
    bt, sl = c.block_tables([0]), c.seq_lens([0], 1)
    qd = q[:1].copy()
    od = np.empty((1, 4, 32), np.float32)
    objs = (q, k, v, out, bt, sl, qd, od, c.k[1], c.v[1])
    before = [sys.getrefcount(o) for o in objs]
    for _ in range(2000):
        quanta.ops.attention(q, k, v, out=out)
        quanta.ops.paged_attention(qd, c, 1, bt, sl, out=od)
        try:
            quanta.ops.attention(q, k[:, :1, :16].copy(), v)
        except ValueError:
            pass
    assert [sys.getrefcount(o) for o in objs] == before
