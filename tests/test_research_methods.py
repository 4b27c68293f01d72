"""quanta.research methods: GPTQ's C kernel against its NumPy reference (same codes and group
parameters, bit for bit), and on the default model's real activations each method lowers the
error it optimizes compared with round-to-nearest."""
import numpy as np
import pytest

import quanta
from quanta import formats as F
from quanta import reference as R
from quanta import research as RS
from quanta.research.methods import _scale_groups
from tolerances import assert_close


def _inputs(rng, N, K, correlated=False):
    w = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal((3 * K, K)) * rng.uniform(0.2, 3.0, K)
    if correlated:  # inputs near a low-dimensional subspace, as a transformer's are
        x = rng.standard_normal((3 * K, K // 8)) @ rng.standard_normal((K // 8, K)) + 0.1 * x
    x = x.astype(np.float32)
    return w, (x.T @ x / x.shape[0]).astype(np.float64), x


def _factor(H, cols, damp=0.01):
    Hd = H.copy()
    Hd[np.diag_indices(len(H))] += damp * np.mean(np.diag(Hd))
    Hp = Hd[np.ix_(cols, cols)]
    Li = np.linalg.inv(np.linalg.cholesky(Hp))
    return np.ascontiguousarray(np.linalg.cholesky(Li.T @ Li).T, dtype=np.float32)


@pytest.mark.parametrize("name,K", [("q4_0", 96), ("int4_g128_asym", 200), ("q4_1", 64), ("nf4", 128),
                                    ("q4_k", 256), ("q6_k", 300), ("int8", 70), ("fp8_e4m3", 64),
                                    ("int4_g128", 576)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_reference(name, K, act_order, rng):
    f = F.get(name)
    w, H, _ = _inputs(rng, 37, K)
    block = 128 if f.nested else 32
    qt = RS.gptq_matrix(w, H, f, block=block, act_order=act_order)
    cols = np.argsort(-(np.diag(H) + 0.01 * np.mean(np.diag(H))), kind="stable") if act_order else np.arange(K)
    codes, params, loss = R.gptq(w[:, cols], _factor(H, cols), f, cols=cols, block=block, static_params=act_order)
    np.testing.assert_array_equal(qt.unpacked_codes(), codes)
    for a, b in zip(R._group_params(qt), params):
        np.testing.assert_array_equal(a, b)
    g = f.group or f.kpad(K)
    s_, z_, o_ = (np.repeat(p, g, axis=1)[:, :K] for p in params)
    assert_close(qt.dequantize(), R._values(f, codes, s_, z_, o_), "gptq", name)
    # and the C loss agrees with the reference's
    Hd = H.copy()
    Hd[np.diag_indices(K)] += 0.01 * np.mean(np.diag(Hd))
    U = _factor(H, cols)
    arrays = {n: (None if s is None else np.zeros(s[0], s[1])) for n, s in f.array_specs(37, K).items()}
    if act_order:
        quanta._C.quantize(w, f._c, *(arrays[n] for n in F._ARRAYS))
    c_loss = quanta._C.gptq(np.ascontiguousarray(w[:, cols]), f._c, U, cols.astype(np.int64) if act_order else None,
                            block, int(act_order), *(arrays[n] for n in F._ARRAYS))
    assert c_loss == pytest.approx(loss, rel=1e-9)


def test_gptq_lowers_output_error_synthetic(rng):
    """On correlated inputs GPTQ's output error is well below RTN's for every kind of format."""
    for name in ("q4_0", "int4_g128", "int4_g128_asym", "nf4", "q4_k", "int8", "fp8_e4m3"):
        w, H, x = _inputs(rng, 48, 256, correlated=True)
        rtn = RS.layer_error(w, quanta.quantize(w, name), H)
        g = RS.layer_error(w, RS.gptq_matrix(w, H, name), H)
        ga = RS.layer_error(w, RS.gptq_matrix(w, H, name, act_order=True), H)
        assert g < 0.8 * rtn and ga < 0.8 * rtn, (name, rtn, g, ga)
        # layer_error: the mean squared output error over the rows of x and the outputs
        y = x.astype(np.float64) @ w.T
        yq = x.astype(np.float64) @ quanta.quantize(w, name).dequantize().T
        assert rtn == pytest.approx(np.mean((yq - y) ** 2), rel=1e-3)


def test_gptq_dead_inputs_and_errors(rng):
    w, H, _ = _inputs(rng, 16, 64)
    H[5, :] = H[:, 5] = 0.0  # an input that is always zero
    qt = RS.gptq_matrix(w, H, "q4_0")
    assert np.isfinite(qt.dequantize()).all()
    with pytest.raises(ValueError, match="must be \\[64, 64\\]"):
        RS.gptq_matrix(w, H[:32, :32], "q4_0")
    with pytest.raises(ValueError, match="finite"):
        RS.gptq_matrix(w, np.full((64, 64), np.nan), "q4_0")
    with pytest.raises(ValueError, match="damp"):
        RS.gptq_matrix(w, H, "q4_0", damp=-1)
    with pytest.raises(ValueError, match="positive definite"):
        RS.gptq_matrix(w, -np.eye(64), "q4_0", damp=0.0)
    f = F.get("q4_0")
    arrays = [None if s is None else np.zeros(s[0], s[1]) for s in f.array_specs(16, 64).values()]
    U = np.eye(64, dtype=np.float32)
    with pytest.raises(ValueError, match="column order needs"):
        quanta._C.gptq(w, f._c, U, np.arange(64, dtype=np.int64), 32, 0, *arrays)
    with pytest.raises(ValueError, match="must divide"):
        quanta._C.gptq(w, f._c, U, None, 48, 0, *arrays)
    with pytest.raises(ValueError, match="non-positive diagonal"):
        quanta._C.gptq(w, f._c, np.zeros((64, 64), np.float32), None, 32, 0, *arrays)
    with pytest.raises(ValueError, match="out of range"):
        quanta._C.gptq(w, f._c, U, np.full(64, 99, np.int64), 32, 1, *arrays)


def test_assign_mixed_budget():
    table = {"a": {"x2": (0.5, 200), "x4": (0.1, 400), "x8": (0.01, 800)},
             "b": {"x2": (0.05, 200), "x4": (0.04, 400), "x8": (0.001, 800)}}
    sizes = {"a": 100, "b": 100}
    assert RS.assign_mixed(table, 2.0, sizes) == {"a": "x2", "b": "x2"}
    assert RS.assign_mixed(table, 3.0, sizes) == {"a": "x4", "b": "x2"}  # the larger drop per bit first
    assert RS.assign_mixed(table, 8.0, sizes) == {"a": "x8", "b": "x8"}
    errs = []
    for budget in (2.0, 3.0, 4.0, 5.0, 6.0, 8.0):
        plan = RS.assign_mixed(table, budget, sizes)
        assert sum(table[n][plan[n]][1] for n in plan) <= budget * 200
        errs.append(sum(table[n][plan[n]][0] for n in plan))
    assert errs == sorted(errs, reverse=True)
    with pytest.raises(ValueError, match="budget"):
        RS.assign_mixed(table, 1.0, sizes)


# ---- on the default model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def fm():
    try:
        return RS.FloatModel.load(progress=False)
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def calib(fm):
    try:
        batches = RS.corpus.calibration_batches(fm.tokenizer, 4, 256)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return RS.collect(fm, batches, progress=False)


def test_collect_statistics(fm, calib):
    assert calib.rows == 1024
    cfg = fm.config
    assert set(calib.H) == {f"{i}.{s}" for i in range(cfg.n_layers) for s in ("attn_in", "o_in", "mlp_in", "down_in")}
    H = calib.hessian("3.down")
    assert H.shape == (cfg.intermediate_size,) * 2 and np.allclose(H, H.T)
    assert np.all(np.linalg.eigvalsh(H) > -1e-6 * np.abs(H).max())
    x = calib.sample["3.down_in"]
    assert x.shape == (256, cfg.intermediate_size)
    # the sampled rows are rows the layer saw: within the absmax, and their moment near H
    assert np.all(np.abs(x) <= calib.absmax["3.down_in"] + 1e-6)
    # layer 0's attention input, computed independently: RMSNorm of the embedded tokens
    batches = RS.corpus.calibration_batches(fm.tokenizer, 4, 256)
    h = np.concatenate([fm.tensors["embed"][b] for b in batches]).astype(np.float64)
    x0 = R.rmsnorm(h, fm.tensors["0.attn_norm"], fm.config.rms_eps)
    np.testing.assert_allclose(calib.H["0.attn_in"], x0.T @ x0 / len(x0), rtol=1e-4,
                               atol=1e-5 * np.abs(calib.H["0.attn_in"]).max())
    np.testing.assert_allclose(calib.absmax["0.attn_in"], np.abs(x0).max(axis=0), rtol=1e-5)


def test_gptq_beats_rtn_on_real_layers(fm, calib):
    for name in ("0.q", "7.o", "12.gate", "20.down"):
        w, H = fm.tensors[name], calib.hessian(name)
        for f in ("int4_g128", "q4_0", "int3_g64"):
            fmt = F.make(3, 64, "sym", name="int3_g64") if f == "int3_g64" else f
            rtn = RS.layer_error(w, quanta.quantize(w, fmt), H)
            g = RS.layer_error(w, RS.gptq_matrix(w, H, fmt), H)
            assert g < 0.7 * rtn, (name, f, rtn, g)


def _col_scale(fm, out, kind, prev, tie):
    """The per-input scale a method folded into `prev` (old / new)."""
    old, new = fm.tensors[prev], out[prev]
    if kind == "norm":
        return old / new
    s = np.linalg.norm(old, axis=1) / np.linalg.norm(new, axis=1)
    return s if tie is None else s[tie]


def test_awq_lowers_output_error(fm, calib):
    layers = (2, 15)
    chosen = {}
    out = RS.awq(fm, calib, "int4_g128", grid=10, progress=False, chosen=chosen)
    assert set(chosen) == {f"{i}.{s}" for i in range(fm.config.n_layers) for s in ("attn_in", "o_in", "mlp_in",
                                                                                     "down_in")}
    assert any(a > 0 for a, _ in chosen.values())
    rtn = RS.rtn(fm, "int4_g128", progress=False)
    for i in layers:
        for site, names, kind, prev, tie in _scale_groups(fm, i):
            if kind == "norm":  # the norm weight carries 1 / s
                np.testing.assert_allclose(_col_scale(fm, out, kind, prev, tie), chosen[site][1], rtol=1e-5)
                continue  # q/k/v and gate/up also read v / up rows rescaled by the o / down folds
            s = chosen[site][1].astype(np.float32)
            H = calib.H[site]
            for n in names:
                w = fm.tensors[n]
                w_eff = out[n].dequantize() / s  # the function AWQ's pair computes, in original inputs
                assert RS.layer_error(w, w_eff, H) <= RS.layer_error(w, rtn[n], H) * (1 + 1e-6), (n, chosen[site][0])
    # folding keeps the model's function: with a near-lossless format the logits stay as
    # close to the float model's as round-to-nearest's do
    ids = RS.corpus.tokens(fm.tokenizer, "eval", n=64)
    ref = fm.build().forward(ids)
    d_rtn = np.abs(fm.build(RS.rtn(fm, "q8_0", progress=False)).forward(ids) - ref).max()
    d_awq = np.abs(fm.build(RS.awq(fm, calib, "q8_0", grid=2, progress=False)).forward(ids) - ref).max()
    assert d_awq < 2 * d_rtn + 1e-3, (d_awq, d_rtn)


def test_smoothquant_lowers_w8a8_error(fm, calib):
    """W8A8 through the int8 kernels (activations rounded to int8 at run time) on sampled real
    activations: smoothing lowers the output error at the norm-fed inputs."""
    out = RS.smoothquant(fm, calib, alpha=0.5, progress=False)
    plain_total = smooth_total = 0.0
    for i in (1, 10, 25):
        for site, names, kind, prev, tie in _scale_groups(fm, i):
            if kind != "norm":
                continue
            x = calib.sample[site]
            s = _col_scale(fm, out, kind, prev, tie).astype(np.float32)
            xs = np.ascontiguousarray(x / s)
            for n in names:
                if n.endswith((".v", ".up")):  # their rows were rescaled by the o / down folds as well
                    continue
                w = fm.tensors[n]
                y = x @ w.T
                plain = quanta.ops.qmatmul(x, quanta.quantize(w, "int8"))
                smooth = quanta.ops.qmatmul(xs, out[n])
                plain_total += float(np.sum((plain - y) ** 2))
                smooth_total += float(np.sum((smooth - y) ** 2))
    assert smooth_total < 0.8 * plain_total, (plain_total, smooth_total)


def test_mixed_meets_budget(fm, calib):
    names = [n for n in fm.linear_names if n.startswith(("0.", "1."))]
    table = RS.sensitivity(fm, calib, ["q4_0", "q6_k", "q8_0"], names=names, progress=False)
    sizes = {n: fm.tensors[n].size for n in names}
    lo = min(min(b for _, b in table[n].values()) for n in names)
    for budget in (5.0, 6.5):
        plan = RS.assign_mixed(table, budget, sizes)
        bits = sum(table[n][plan[n]][1] for n in names) / sum(sizes.values())
        assert bits <= budget
    assert set(RS.assign_mixed(table, 6.5, sizes).values()) - {"q4_0"}  # some layers got more bits
    assert lo > 0


def test_method_output_loads_and_saves(fm, calib, tmp_path):
    out = RS.gptq(fm, calib, "int4_g128", names=["0.q", "0.k", "0.v", "5.down"], progress=False)
    model = fm.build(out)
    assert RS.bits_per_weight({**fm.tensors, **out}, ["0.q"]) == pytest.approx(out["0.q"].bits_per_weight)
    dst = tmp_path / "gptq.safetensors"
    fm.save(str(dst), out)
    again = quanta.load(str(dst), progress=False)
    ids = RS.corpus.tokens(fm.tokenizer, "eval", n=48)
    np.testing.assert_array_equal(again.forward(ids), model.forward(ids))
    with pytest.raises(ValueError, match="no tensor named"):
        fm.build({"99.q": out["0.q"]})
    with pytest.raises(ValueError, match="shape"):
        fm.build({"0.q": out["5.down"]})
