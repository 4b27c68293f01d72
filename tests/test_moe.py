"""Mixture-of-Experts: routing, silu_mul and the fused block against quanta.reference (and
the MoE blocks of `transformers` when torch and transformers are importable)."""
import ml_dtypes
import numpy as np
import pytest
from tolerances import assert_close

import quanta
from quanta import _C, ops, reference
from quanta.formats import MoEExperts, SharedExpert

BF16 = np.dtype(ml_dtypes.bfloat16)

# name -> moe_route keyword arguments (E is chosen by the test)
ROUTES = {
    "mixtral": dict(top_k=2, scoring="softmax", renormalize=True),
    "qwen2_moe": dict(top_k=4, scoring="softmax", renormalize=False),
    "qwen3_moe": dict(top_k=8, scoring="softmax", renormalize=True),
    "deepseek_v3": dict(top_k=4, scoring="sigmoid", renormalize=True, n_group=4, topk_group=2,
                        routed_scaling=2.5, bias="random"),
    "sigmoid_bias_nogroup": dict(top_k=3, scoring="sigmoid", renormalize=True, bias="random"),
    "llama4": dict(top_k=1, scoring="sigmoid", renormalize=False),
    "top1_softmax": dict(top_k=1, scoring="softmax", renormalize=True),
    "topE": dict(top_k="E", scoring="softmax", renormalize=False),
    "topE_sigmoid": dict(top_k="E", scoring="sigmoid", renormalize=True),
}


def route_kwargs(name, E, rng):
    kw = dict(ROUTES[name])
    if kw.get("top_k") == "E":
        kw["top_k"] = E
    if kw.get("bias") == "random":
        kw["bias"] = (rng.standard_normal(E) * 0.1).astype(np.float32)
    return kw


def check_route(logits, kw, what):
    w, ids = ops.moe_route(logits, **kw)
    wr, idr = reference.moe_route(logits, kw["top_k"], kw.get("scoring", "softmax"),
                                  kw.get("renormalize", True), kw.get("bias"), kw.get("n_group"),
                                  kw.get("topk_group"), kw.get("routed_scaling", 1.0))
    assert w.dtype == np.float32 and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, idr, err_msg=what)
    assert_close(w, wr, "moe_route", what)
    return w, ids


# ---- routing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ROUTES))
@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["f32", "f16", "bf16"])
def test_route_variants(rng, name, dtype):
    for T, E in [(1, 16), (37, 32), (5, 256), (64, 8)]:
        kw = route_kwargs(name, E, rng)
        if kw["top_k"] > E or (kw.get("n_group") and E % kw["n_group"]):
            continue
        logits = (rng.standard_normal((T, E)) * 2).astype(dtype)
        before = logits.copy()
        check_route(logits, kw, f"{name} T={T} E={E} {dtype}")
        np.testing.assert_array_equal(logits.view(np.uint8), before.view(np.uint8))


def test_route_sorted_and_normalized(rng):
    logits = rng.standard_normal((50, 64)).astype(np.float32)
    w, ids = ops.moe_route(logits, 8)
    assert np.all(np.diff(w, axis=1) <= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    assert all(len(set(r)) == 8 for r in ids.tolist())
    w2, _ = ops.moe_route(logits, 8, renormalize=False, routed_scaling=3.0)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(w2, 3.0 * np.take_along_axis(p, ids, 1), rtol=2e-6)


@pytest.mark.parametrize("name", list(ROUTES))
def test_route_ties(rng, name):
    E = 16
    kw = route_kwargs(name, E, rng)
    kw.pop("bias", None)
    same = np.zeros((3, E), np.float32)
    w, ids = check_route(same, kw, f"{name} all tied")
    np.testing.assert_array_equal(ids, np.tile(np.arange(kw["top_k"]), (3, 1)))
    # pairs of equal logits: the lower id comes first
    row = np.repeat(rng.standard_normal(E // 2).astype(np.float32), 2)
    check_route(row[None, :], kw, f"{name} pairwise ties")
    # few distinct values
    few = rng.integers(0, 3, (20, E)).astype(np.float32)
    check_route(few, kw, f"{name} few values")


def test_route_ties_with_bias():
    E = 8
    bias = np.zeros(E, np.float32)
    logits = np.zeros((2, E), np.float32)
    w, ids = ops.moe_route(logits, 3, scoring="sigmoid", bias=bias, n_group=4, topk_group=2)
    np.testing.assert_array_equal(ids, [[0, 1, 2]] * 2)
    np.testing.assert_allclose(w, 1 / 3, rtol=1e-6)


def test_llama4_is_sigmoid_of_top_logit(rng):
    logits = rng.standard_normal((40, 16)).astype(np.float32) * 3
    w, ids = ops.moe_route(logits, 1, scoring="sigmoid", renormalize=False)
    np.testing.assert_array_equal(ids[:, 0], logits.argmax(1))
    np.testing.assert_allclose(w[:, 0], 1 / (1 + np.exp(-logits.max(1).astype(np.float64))), rtol=1e-6)


def test_deepseek_groups_restrict_choice(rng):
    E, ng = 16, 4
    logits = np.full((1, E), -5.0, np.float32)
    logits[0, 0] = 5.0  # group 0: one strong expert, one weak -> group key low
    logits[0, 4:6] = 2.0  # group 1: two good experts
    logits[0, 8:10] = 1.5  # group 2
    w, ids = ops.moe_route(logits, 3, scoring="sigmoid", n_group=ng, topk_group=2, renormalize=False)
    assert set(ids[0].tolist()) <= set(range(4, 12)) | {0}
    kw = dict(top_k=3, scoring="sigmoid", renormalize=False, n_group=ng, topk_group=2)
    check_route(logits, kw, "groups")


def test_route_extreme_logits(rng):
    logits = (rng.standard_normal((20, 32)) * 1e4).astype(np.float32)
    for kw in [dict(top_k=4), dict(top_k=4, scoring="sigmoid"), dict(top_k=32, renormalize=False)]:
        w, _ = ops.moe_route(logits, **kw)
        assert np.all(np.isfinite(w))
    T0 = np.zeros((0, 8), np.float32)
    w, ids = ops.moe_route(T0, 2)
    assert w.shape == (0, 2) and ids.shape == (0, 2)


def test_route_threads_and_strided(rng, threads):
    logits = rng.standard_normal((300, 128 + 7)).astype(np.float32)[:, :128]
    res = []
    for n in (1, 2, 3):
        quanta.set_num_threads(n)
        res.append(ops.moe_route(logits, 8, scoring="sigmoid", bias=np.linspace(0, .1, 128), n_group=8,
                                 topk_group=4))
    for w, i in res[1:]:
        np.testing.assert_array_equal(w, res[0][0])
        np.testing.assert_array_equal(i, res[0][1])
    w, i = ops.moe_route(np.ascontiguousarray(logits), 8, scoring="sigmoid", bias=np.linspace(0, .1, 128),
                         n_group=8, topk_group=4)
    np.testing.assert_array_equal(w, res[0][0])


def test_route_bad_arguments(rng):
    L = rng.standard_normal((4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="top_k"):
        ops.moe_route(L, 0)
    with pytest.raises(ValueError, match="top_k"):
        ops.moe_route(L, 9)
    with pytest.raises(ValueError, match="scoring"):
        ops.moe_route(L, 2, scoring="relu")
    with pytest.raises(ValueError, match="n_group"):
        ops.moe_route(L, 2, n_group=3, topk_group=1)
    with pytest.raises(ValueError, match="topk_group"):
        ops.moe_route(L, 2, n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="top_k"):
        ops.moe_route(L, 5, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="bias"):
        ops.moe_route(L, 2, bias=np.zeros(7))
    with pytest.raises(TypeError, match="logits"):
        ops.moe_route(L.astype(np.float64), 2)
    with pytest.raises(ValueError, match="logits"):
        ops.moe_route(L[0], 2)
    with pytest.raises(ValueError, match="top_k"):  # the binding checks too
        _C.moe_route(L, 0, 9, 0, 1, None, 0, 0, 1.0)
    with pytest.raises(ValueError, match="scoring"):
        _C.moe_route(L, 0, 2, 5, 1, None, 0, 0, 1.0)
    with pytest.raises(ValueError, match="n_group"):
        _C.moe_route(L, 0, 2, 0, 1, None, 3, 1, 1.0)


# ---- silu_mul --------------------------------------------------------------------------------

def test_silu_mul(rng):
    for shape in [(1, 5), (7, 333), (64, 1024), (3,), (0, 4)]:
        g = (rng.standard_normal(shape) * 4).astype(np.float32)
        u = rng.standard_normal(shape).astype(np.float32)
        g0, u0 = g.copy(), u.copy()
        y = ops.silu_mul(g, u)
        assert_close(y, reference.silu_mul(g, u), "silu_mul", f"shape {shape}")
        np.testing.assert_array_equal(g, g0)
        np.testing.assert_array_equal(u, u0)
        ops.silu_mul(g, u, out=g)
        np.testing.assert_array_equal(g, y)
    big = np.array([[-1e4, 1e4, -100.0, 0.0, np.inf]], np.float32)
    y = ops.silu_mul(big, np.ones_like(big))
    np.testing.assert_allclose(y[0, :4], [0.0, 1e4, 0.0, 0.0], rtol=1e-7, atol=1e-30)  # exp clamps at 87
    assert y[0, 4] == np.inf
    with pytest.raises(ValueError, match="up"):
        ops.silu_mul(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    with pytest.raises(TypeError, match="gate"):
        ops.silu_mul(np.zeros((2, 3)), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        ops.silu_mul(np.zeros((4, 6), np.float32)[:, :3], np.zeros((4, 3), np.float32))


# ---- the fused block ------------------------------------------------------------------------

def make_experts(rng, E, d, ffn, fmt, fmt_down=None, scale=0.1):
    g = (rng.standard_normal((E, ffn, d)) * scale).astype(np.float32)
    u = (rng.standard_normal((E, ffn, d)) * scale).astype(np.float32)
    w = (rng.standard_normal((E, d, ffn)) * scale).astype(np.float32)
    return MoEExperts.from_float(g, u, w, fmt, fmt_down)


def make_shared(rng, d, ffn, fmt, gated=True):
    q = lambda *s: quanta.quantize((rng.standard_normal(s) * 0.1).astype(np.float32), fmt)  # noqa: E731
    gate = rng.standard_normal(d).astype(np.float32) if gated else None
    return SharedExpert(q(ffn, d), q(ffn, d), q(d, ffn), gate)


def is_lut(ex):
    return all(f.kind == "lut" for f in ex.formats)


def check_moe(x, rw, ex, kw, shared=None, what=""):
    y, counts = ops.moe(x, rw, ex, shared=shared, return_counts=True, **kw)
    args = (kw["top_k"], kw.get("scoring", "softmax"), kw.get("renormalize", True), kw.get("bias"),
            kw.get("n_group"), kw.get("topk_group"), kw.get("routed_scaling", 1.0), shared)
    yr, cr = reference.moe(x, rw, ex, *args, act_quant=not is_lut(ex))
    np.testing.assert_array_equal(counts, cr, err_msg=what)
    assert_close(y, yr, "moe_lut" if is_lut(ex) else "moe_int", what)
    if not is_lut(ex):
        yf, _ = reference.moe(x, rw, ex, *args, act_quant=False)
        assert_close(y, yf, "moe_float_x", what)
    return y, counts


@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q8_0", "nf4", "int4_g128_asym", "q6_k"])
def test_moe_formats(rng, fmt):
    E, d, ffn = 8, 256, 96 if fmt in ("q4_0", "q8_0") else 256
    ex = make_experts(rng, E, d, ffn, fmt)
    rw = rng.standard_normal((E, d)).astype(np.float32)
    for T in (1, 5, 40):
        x = rng.standard_normal((T, d)).astype(np.float32)
        check_moe(x, rw, ex, dict(top_k=2), what=f"{fmt} T={T}")


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "llama4", "topE"])
def test_moe_route_variants(rng, name):
    E, d, ffn, T = 16, 64, 64, 23
    ex = make_experts(rng, E, d, ffn, "q8_0")
    rw = rng.standard_normal((E, d)).astype(np.float32)
    x = rng.standard_normal((T, d)).astype(np.float32)
    shared = None
    if name in ("qwen2_moe", "deepseek_v3", "llama4"):
        shared = make_shared(rng, d, 32, "q8_0", gated=name == "qwen2_moe")
    check_moe(x, rw, ex, route_kwargs(name, E, rng), shared, name)


def test_moe_mixed_formats_and_shared(rng):
    E, d, ffn = 4, 128, 64
    ex = make_experts(rng, E, d, ffn, "q4_0", fmt_down="q8_0")
    rw = rng.standard_normal((E, d)).astype(np.float32)
    x = rng.standard_normal((9, d)).astype(np.float32)
    check_moe(x, rw, ex, dict(top_k=2), make_shared(rng, d, 96, "q4_0"), "mixed formats + gated shared")
    check_moe(x, rw, ex, dict(top_k=2), make_shared(rng, d, 32, "q8_0", gated=False), "ungated shared")
    exl = make_experts(rng, E, d, ffn, "nf4")
    check_moe(x, rw, exl, dict(top_k=3), make_shared(rng, d, 64, "nf4"), "lut + shared")


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["f16", "bf16"])
def test_moe_low_precision_x(rng, dtype):
    E, d, ffn = 8, 64, 64
    ex = make_experts(rng, E, d, ffn, "q8_0")
    rw = rng.standard_normal((E, d)).astype(np.float32)
    x = rng.standard_normal((11, d)).astype(dtype)
    y = ops.moe(x, rw, ex, 2)
    y32 = ops.moe(x.astype(np.float32), rw, ex, 2)
    np.testing.assert_array_equal(y, y32)


def test_moe_edge_routing(rng):
    """Zero-token experts, all tokens to one expert, top_k = E, T = 1, T = 0, E = 256."""
    E, d, ffn = 8, 64, 32
    ex = make_experts(rng, E, d, ffn, "q8_0")
    x = rng.standard_normal((30, d)).astype(np.float32)
    rw = np.zeros((E, d), np.float32)
    rw[5] = x.sum(0) * 0  # all logits equal except for the bias: every token to expert 5
    bias = np.zeros(E, np.float32)
    bias[5] = 1.0
    y, c = check_moe(x, rw, ex, dict(top_k=1, scoring="sigmoid", bias=bias), what="all to one")
    np.testing.assert_array_equal(c, [0, 0, 0, 0, 0, 30, 0, 0])
    rw = rng.standard_normal((E, d)).astype(np.float32)
    check_moe(x, rw, ex, dict(top_k=E, renormalize=False), what="top_k = E")
    check_moe(x[:1], rw, ex, dict(top_k=2), what="T = 1")
    y, c = ops.moe(x[:0], rw, ex, 2, return_counts=True)
    assert y.shape == (0, d) and c.sum() == 0
    ex256 = make_experts(rng, 256, 32, 32, "q8_0")
    rw256 = rng.standard_normal((256, 32)).astype(np.float32)
    x3 = rng.standard_normal((3, 32)).astype(np.float32)
    y, c = check_moe(x3, rw256, ex256, dict(top_k=8), what="E = 256, T = 3")
    assert (c == 0).sum() >= 256 - 24


@pytest.mark.slow
def test_moe_long(rng):
    E, d, ffn = 16, 64, 64
    ex = make_experts(rng, E, d, ffn, "q4_0")
    rw = rng.standard_normal((E, d)).astype(np.float32)
    x = rng.standard_normal((4096, d)).astype(np.float32)
    check_moe(x, rw, ex, dict(top_k=4), what="T = 4096")


def test_moe_4096_tokens_small(rng):
    E, d, ffn = 8, 32, 32
    ex = make_experts(rng, E, d, ffn, "q8_0")
    rw = rng.standard_normal((E, d)).astype(np.float32)
    x = rng.standard_normal((4096, d)).astype(np.float32)
    y, c = ops.moe(x, rw, ex, 2, return_counts=True)
    assert c.sum() == 4096 * 2
    # batch invariance: a token's output does not depend on the other tokens
    np.testing.assert_array_equal(ops.moe(x[100:101], rw, ex, 2), y[100:101])
    np.testing.assert_array_equal(ops.moe(x[:777], rw, ex, 2), y[:777])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_router_logits_route_moe(rng, dtype):
    """moe routes on router_logits (quanta's float matmul): its logits match x @ router_w^T
    in float64, and moe equals moe_experts under the routing of those logits."""
    E, d, ffn, T, k = 16, 96, 32, 7, 4
    ex = make_experts(rng, E, d, ffn, "q8_0")
    x = rng.standard_normal((T, d)).astype(dtype)
    rw = (rng.standard_normal((E, d)) * 0.1).astype(np.float32)
    logits = ops.router_logits(x, rw)
    assert logits.dtype == np.float32 and logits.shape == (T, E)
    assert_close(logits, x.astype(np.float64) @ rw.astype(np.float64).T, "matmul_f32", "router logits")
    w, ids = ops.moe_route(logits, k)
    np.testing.assert_array_equal(ops.moe(x, rw, ex, k), ops.moe_experts(x, w, ids, ex))
    with pytest.raises(ValueError, match="router_w"):
        ops.moe(x, rw[:, :-1], ex, k)


def test_moe_experts_given_routing(rng):
    E, d, ffn, T = 6, 64, 32, 10
    ex = make_experts(rng, E, d, ffn, "q8_0")
    x = rng.standard_normal((T, d)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:3] for _ in range(T)]).astype(np.int32)
    w = rng.random((T, 3)).astype(np.float32)
    y, c = ops.moe_experts(x, w, ids, ex, return_counts=True)
    yr, cr = reference.moe_experts(x, w, ids, ex, act_quant=True)
    np.testing.assert_array_equal(c, cr)
    assert_close(y, yr, "moe_int", "given routing")
    bad = ids.copy()
    bad[3, 1] = E
    with pytest.raises(ValueError, match=r"ids\[3, 1\]"):
        ops.moe_experts(x, w, bad, ex)
    bad[3, 1] = -1
    with pytest.raises(ValueError, match="ids"):
        ops.moe_experts(x, w, bad, ex)
    dup = ids.copy()
    dup[2, 1] = dup[2, 0]
    with pytest.raises(ValueError, match="ids"):
        ops.moe_experts(x, w, dup, ex)
    with pytest.raises(ValueError, match="weights"):
        ops.moe_experts(x, w[:, :2], ids, ex)


def test_moe_bad_experts(rng):
    E, d, ffn = 4, 64, 32
    q = lambda *s, f="q8_0": quanta.quantize(rng.standard_normal(s).astype(np.float32), f)  # noqa: E731
    g = [q(ffn, d) for _ in range(E)]
    u = [q(ffn, d) for _ in range(E)]
    dn = [q(d, ffn) for _ in range(E)]
    with pytest.raises(ValueError, match=r"experts.up_proj\[2\]"):
        MoEExperts(g, u[:2] + [q(ffn + 16, d)] + u[3:], dn)
    with pytest.raises(ValueError, match=r"experts.gate_proj\[1\].*format"):
        MoEExperts(g[:1] + [q(ffn, d, f="q4_0")] + g[2:], u, dn)
    with pytest.raises(ValueError, match="experts.down_proj"):
        MoEExperts(g, u, [q(d, ffn * 2) for _ in range(E)])
    with pytest.raises(ValueError, match="number of experts"):
        MoEExperts(g, u[:3], dn)
    with pytest.raises(TypeError, match=r"experts.gate_proj\[0\]"):
        MoEExperts([np.zeros((ffn, d))] * E, u, dn)
    ex = MoEExperts(g, u, dn)
    x = rng.standard_normal((3, d)).astype(np.float32)
    rw = rng.standard_normal((E, d)).astype(np.float32)
    with pytest.raises(ValueError, match="router_w"):
        ops.moe(x, rw[:3], ex, 2)
    with pytest.raises(ValueError, match="x must"):
        ops.moe(x[:, :32], rw, ex, 2)
    with pytest.raises(ValueError, match="top_k"):
        ops.moe(x, rw, ex, 5)
    with pytest.raises(ValueError, match="shared"):
        ops.moe(x, rw, ex, 2, shared=make_shared(rng, 32, 32, "q8_0"))
    # the binding re-checks the stacked arrays it hands to C
    c = list(ex._c)
    c[6] = (c[6][0][:-1],) + c[6][1:]
    with pytest.raises(ValueError, match="experts.gate_proj"):
        _C.moe(x, 0, x @ rw.T, 0, 2, 0, 1, None, 0, 0, 1.0, None, None, tuple(c), None, None, None)
    # dict and list-of-dicts forms
    y = ops.moe(x, rw, ex, 2)
    np.testing.assert_array_equal(ops.moe(x, rw, dict(gate_proj=g, up_proj=u, down_proj=dn), 2), y)
    np.testing.assert_array_equal(ops.moe(x, rw, [ex[e] for e in range(E)], 2), y)


def test_moe_isa_paths_equal(rng):
    from conftest import supported_isas
    E, d, ffn = 8, 128, 64
    for fmt in ("q4_0", "q8_0", "nf4"):
        ex = make_experts(rng, E, d, ffn, fmt)
        rw = rng.standard_normal((E, d)).astype(np.float32)
        x = rng.standard_normal((13, d)).astype(np.float32)
        sh = make_shared(rng, d, 64, fmt)
        ys = {}
        try:
            for isa in supported_isas():
                _C._set_isa(isa)
                ys[isa] = ops.moe(x, rw, ex, 3, shared=sh)
        finally:
            _C._set_isa("best")
        for isa, y in ys.items():
            np.testing.assert_array_equal(y, ys["ref"], err_msg=f"{fmt}: {isa} != ref")


def test_moe_threads_deterministic_inputs_unchanged(rng, threads):
    E, d, ffn = 16, 128, 64
    ex = make_experts(rng, E, d, ffn, "q4_0")
    rw = rng.standard_normal((E, d)).astype(np.float32)
    x = rng.standard_normal((200, d)).astype(np.float32)
    sh = make_shared(rng, d, 64, "q8_0")
    snap = [x.copy(), rw.copy()] + [a.copy() for arrs in ex._arrays for a in arrs if a is not None]
    ys = []
    for n in (1, 2, 3):
        quanta.set_num_threads(n)
        ys.append(ops.moe(x, rw, ex, 4, shared=sh))
    for y in ys[1:]:
        np.testing.assert_array_equal(y, ys[0])
    for _ in range(5):
        np.testing.assert_array_equal(ops.moe(x, rw, ex, 4, shared=sh), ys[0])
    after = [x, rw] + [a for arrs in ex._arrays for a in arrs if a is not None]
    for a, b in zip(snap, after):
        np.testing.assert_array_equal(a, b)
    out = np.full((200, d), np.nan, np.float32)
    assert ops.moe(x, rw, ex, 4, shared=sh, out=out) is out
    np.testing.assert_array_equal(out, ys[0])
    # strided x rows
    xw = np.full((200, d + 8), np.nan, np.float32)
    xw[:, :d] = x
    np.testing.assert_array_equal(ops.moe(xw[:, :d], rw, ex, 4, shared=sh), ys[0])


def test_moe_reference_backend(rng):
    E, d, ffn = 4, 64, 64
    ex = make_experts(rng, E, d, ffn, "nf4")
    rw = rng.standard_normal((E, d)).astype(np.float32)
    x = rng.standard_normal((5, d)).astype(np.float32)
    assert_close(ops.moe(x, rw, ex, 2), ops.moe(x, rw, ex, 2, backend="reference"), "moe_lut", "backend")


# ---- against transformers ------------------------------------------------------------------

def _hf_modules():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return torch


def _hf_block(name, E, d, ffn, top_k, torch, shared_ffn=64):
    import transformers as tf
    common = dict(hidden_size=d, intermediate_size=ffn, num_experts_per_tok=top_k, hidden_act="silu")
    if name == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as B
        cfg = tf.MixtralConfig(num_local_experts=E, **common)
        kw = dict(top_k=top_k, scoring="softmax", renormalize=True)
    elif name == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as B
        cfg = tf.Qwen2MoeConfig(num_experts=E, moe_intermediate_size=ffn, norm_topk_prob=False,
                                shared_expert_intermediate_size=shared_ffn, **common)
        kw = dict(top_k=top_k, scoring="softmax", renormalize=False)
    elif name == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as B
        cfg = tf.Qwen3MoeConfig(num_experts=E, moe_intermediate_size=ffn, norm_topk_prob=True, **common)
        kw = dict(top_k=top_k, scoring="softmax", renormalize=True)
    elif name == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as B
        cfg = tf.OlmoeConfig(num_experts=E, norm_topk_prob=False, **common)
        kw = dict(top_k=top_k, scoring="softmax", renormalize=False)
    elif name == "deepseek_v3":
        try:
            from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as B
        except ImportError:
            pytest.skip("transformers has no DeepseekV3MoE")
        cfg = tf.DeepseekV3Config(n_routed_experts=E, moe_intermediate_size=ffn, n_shared_experts=1,
                                  n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                                  **common)
        kw = dict(top_k=top_k, scoring="sigmoid", renormalize=True, n_group=4, topk_group=2,
                  routed_scaling=2.5)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    blk = B(cfg).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
        for nm, b in blk.named_buffers():
            if "bias" in nm:
                b.copy_(torch.randn(b.shape) * 0.05)
    return blk, kw


def _hf_expert_weights(blk, E):
    """(gate[E, ffn, d], up, down[E, d, ffn]) as float32 numpy, v5 stacked or v4 module lists."""
    ex = blk.experts
    if hasattr(ex, "gate_up_proj"):
        gu = ex.gate_up_proj.detach().numpy()
        ffn = gu.shape[1] // 2
        return gu[:, :ffn], gu[:, ffn:], ex.down_proj.detach().numpy()
    get = lambda m, a, b: getattr(m, a, None) or getattr(m, b)  # noqa: E731
    g = np.stack([get(ex[e], "gate_proj", "w1").weight.detach().numpy() for e in range(E)])
    u = np.stack([get(ex[e], "up_proj", "w3").weight.detach().numpy() for e in range(E)])
    dn = np.stack([get(ex[e], "down_proj", "w2").weight.detach().numpy() for e in range(E)])
    return g, u, dn


def _set_hf_expert_weights(blk, g, u, dn, torch):
    ex = blk.experts
    with torch.no_grad():
        if hasattr(ex, "gate_up_proj"):
            ex.gate_up_proj.copy_(torch.from_numpy(np.concatenate([g, u], axis=1)))
            ex.down_proj.copy_(torch.from_numpy(dn))
        else:
            for e in range(len(ex)):
                for names, w in ((("gate_proj", "w1"), g), (("up_proj", "w3"), u), (("down_proj", "w2"), dn)):
                    m = getattr(ex[e], names[0], None) or getattr(ex[e], names[1])
                    m.weight.copy_(torch.from_numpy(w[e]))


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
@pytest.mark.parametrize("fmt", ["nf4", "q8_0"])
def test_against_transformers(rng, name, fmt):
    torch = _hf_modules()
    E, d, ffn, top_k, T = 8, 64, 64, 2, 17
    blk, kw = _hf_block(name, E, d, ffn, top_k, torch)
    g, u, dn = _hf_expert_weights(blk, E)
    ex = MoEExperts.from_float(g, u, dn, fmt)
    # the torch block gets the dequantized weights, so only the kernels' arithmetic differs
    deq = [np.stack([ex[e][p].dequantize() for e in range(E)]) for p in ("gate_proj", "up_proj", "down_proj")]
    _set_hf_expert_weights(blk, *deq, torch)
    shared = None
    sm = getattr(blk, "shared_expert", None) or getattr(blk, "shared_experts", None)
    if sm is not None:
        qs = [quanta.quantize(getattr(sm, p).weight.detach().numpy(), fmt)
              for p in ("gate_proj", "up_proj", "down_proj")]
        sgate = getattr(blk, "shared_expert_gate", None)
        shared = SharedExpert(*qs, None if sgate is None else sgate.weight.detach().numpy()[0])
        with torch.no_grad():
            for p, q in zip(("gate_proj", "up_proj", "down_proj"), qs):
                getattr(sm, p).weight.copy_(torch.from_numpy(q.dequantize()))
    router = blk.gate.weight.detach().numpy()
    if "bias" in str(kw) or name == "deepseek_v3":
        kw["bias"] = blk.gate.e_score_correction_bias.detach().numpy().astype(np.float32)
    x = rng.standard_normal((T, d)).astype(np.float32)
    with torch.no_grad():
        yt = blk(torch.from_numpy(x)[None]).numpy()[0]
    y = ops.moe(x, router, ex, shared=shared, **kw)
    assert_close(y, yt, "moe_torch_f32" if fmt == "nf4" else "moe_float_x", f"{name} {fmt}")


# ---- reliability ---------------------------------------------------------------------------

def test_moe_no_leaks(rng):
    import gc
    import sys
    import tracemalloc
    E, d, ffn = 4, 64, 64
    ex = make_experts(rng, E, d, ffn, "q8_0")
    sh = make_shared(rng, d, 64, "q8_0")
    rw = rng.standard_normal((E, d)).astype(np.float32)
    x = rng.standard_normal((3, d)).astype(np.float32)
    out = np.empty((3, d), np.float32)
    logits = x @ rw.T
    arrays = (x, out, logits) + tuple(a for arrs in ex._arrays for a in arrs if a is not None)
    refs = [sys.getrefcount(a) for a in arrays]
    for _ in range(3000):
        ops.moe(x, rw, ex, 2, shared=sh, out=out)
        ops.moe_route(logits, 2)
    gc.collect()
    assert [sys.getrefcount(a) for a in arrays] == refs
    tracemalloc.start()
    for _ in range(500):
        ops.moe(x, rw, ex, 2, return_counts=True)
    snap1 = tracemalloc.take_snapshot()
    for _ in range(3000):
        ops.moe(x, rw, ex, 2, return_counts=True)
    snap2 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in snap2.compare_to(snap1, "filename"))
    assert grown < 64 * 1024, grown


def test_moe_threads_calling_at_once(rng):
    import threading
    E, d, ffn = 8, 64, 64
    ex = make_experts(rng, E, d, ffn, "q4_0")
    rw = rng.standard_normal((E, d)).astype(np.float32)
    xs = [rng.standard_normal((5, d)).astype(np.float32) for _ in range(8)]
    expect = [ops.moe(x, rw, ex, 2) for x in xs]
    errors = []

    def work(i):
        for _ in range(100):
            if not np.array_equal(ops.moe(xs[i], rw, ex, 2), expect[i]):
                errors.append(i)
                return

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
