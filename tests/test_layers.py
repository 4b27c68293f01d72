"""RMSNorm (with the fused residual add), add, silu_mul, gelu_mul and RoPE (NeoX / interleaved,
linear, Llama-3 and YaRN frequencies) against the float64 reference."""
import math

import ml_dtypes
import numpy as np
import pytest

import quanta
from quanta import _C
from quanta import reference as R
from tolerances import assert_close

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float32, np.float16, BF16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 64), (7, 4096), (3, 5, 33), (1,), (0, 8)])
def test_rmsnorm(rng, dtype, shape):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    xc = x.copy()
    y = quanta.ops.rmsnorm(x, w, eps=1e-5)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(x.view(np.uint8), xc.view(np.uint8))
    assert_close(y, R.rmsnorm(x, w, 1e-5), "layer_f32", f"rmsnorm {np.dtype(dtype)} {shape}")


def test_rmsnorm_fused_residual(rng):
    x = rng.standard_normal((6, 80)).astype(np.float16)
    res = rng.standard_normal((6, 80)).astype(np.float32)
    w = rng.standard_normal(80).astype(np.float32)
    want_res = res.astype(np.float64) + x.astype(np.float64)
    want = R.rmsnorm(x, w, 1e-6, residual=res)
    out = np.empty((6, 80), np.float32)
    assert quanta.ops.rmsnorm(x, w, residual=res, out=out) is out
    assert_close(res, want_res, "layer_f32", "residual updated in place")
    assert_close(out, want, "layer_f32", "norm of the updated residual")
    with pytest.raises(ValueError, match="residual"):
        quanta.ops.rmsnorm(x, w, residual=res[:3])
    with pytest.raises(ValueError, match="weight"):
        quanta.ops.rmsnorm(x, w[:40])
    with pytest.raises(TypeError, match="weight"):
        quanta.ops.rmsnorm(x, w.astype(np.float64))
    with pytest.raises(TypeError, match="x"):
        quanta.ops.rmsnorm(x.astype(np.int32), w)
    with pytest.raises(ValueError, match="out"):
        quanta.ops.rmsnorm(x, w, residual=res, out=res)  # the residual cannot also be the output


def test_add(rng):
    a = rng.standard_normal((5, 300)).astype(np.float32)
    b = rng.standard_normal((5, 300)).astype(BF16)
    want = a.astype(np.float64) + b.astype(np.float64)
    assert_close(quanta.ops.add(a, b), want, "layer_f32", "add")
    assert quanta.ops.add(a, b, out=a) is a  # in place on the residual stream
    assert_close(a, want, "layer_f32", "add in place")
    with pytest.raises(ValueError, match="same shape"):
        quanta.ops.add(a, b[:2])
    with pytest.raises(ValueError, match="out"):
        quanta.ops.add(a, b, out=a[:, ::2])


def test_silu_mul_paths_agree_bitwise(rng, isa):
    """Every kernel path (ref, AVX2, AVX-512) gives the scalar loop's bits, odd lengths,
    in place, and the extremes included."""
    g = (rng.standard_normal(4099) * 8).astype(np.float32)
    g[:6] = [-1e4, 1e4, 0.0, -87.5, 88.5, np.nan]
    u = rng.standard_normal(4099).astype(np.float32)
    got = quanta.ops.silu_mul(g, u)
    quanta._C._set_isa("ref")
    want = quanta.ops.silu_mul(g, u)
    quanta._C._set_isa(isa)
    np.testing.assert_array_equal(got, want)
    g2 = g.copy()
    quanta.ops.silu_mul(g2, u, out=g2)
    np.testing.assert_array_equal(g2, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
def test_silu_mul(rng, dtype):
    g = (rng.standard_normal((9, 1000)) * 5).astype(dtype)
    u = rng.standard_normal((9, 1000)).astype(dtype)
    g[0, :4] = [-1e4, 1e4, 0, -90] if dtype != np.float16 else [-6e4, 6e4, 0, -90]
    y = quanta.ops.silu_mul(g, u)
    assert np.all(np.isfinite(y))
    assert_close(y, R.silu_mul(g, u), "layer_f32", f"silu_mul {np.dtype(dtype)}")
    with pytest.raises(TypeError, match="up"):
        quanta.ops.silu_mul(g, u.astype(np.float64))
    with pytest.raises(ValueError, match="same shape"):
        quanta.ops.silu_mul(g, u[:, :10].copy())


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("shape", [(9, 1000), (1, 1), (3, 17), (0, 5), (1, 4099)])
def test_gelu_mul(rng, isa, dtype, shape):
    g = (rng.standard_normal(shape) * 4).astype(dtype)
    u = rng.standard_normal(shape).astype(dtype)
    if g.size >= 6:
        g.flat[:6] = [-1e4, 1e4, 0, -90, 90, -5] if dtype != np.float16 else [-6e4, 6e4, 0, -90, 90, -5]
    g0, u0 = g.copy(), u.copy()
    y = quanta.ops.gelu_mul(g, u)
    assert y.dtype == np.float32 and y.shape == shape and np.all(np.isfinite(y))
    np.testing.assert_array_equal(g.view(np.uint8), g0.view(np.uint8))
    np.testing.assert_array_equal(u.view(np.uint8), u0.view(np.uint8))
    assert_close(y, R.gelu_mul(g, u), "gelu_mul", f"gelu_mul {isa} {np.dtype(dtype)} {shape}")
    _C._set_isa("ref")
    np.testing.assert_array_equal(quanta.ops.gelu_mul(g, u), y)  # every path gives _ref's bits


def test_gelu_mul_matches_torch(rng):
    torch = pytest.importorskip("torch")
    g = (rng.standard_normal(5000) * 3).astype(np.float32)
    u = rng.standard_normal(5000).astype(np.float32)
    want = (torch.nn.functional.gelu(torch.from_numpy(g), approximate="tanh") * torch.from_numpy(u)).numpy()
    assert_close(quanta.ops.gelu_mul(g, u), want, "gelu_mul", "gelu_mul vs torch gelu(approximate='tanh')")


def test_gelu_mul_out_and_errors(rng):
    g = rng.standard_normal((4, 33)).astype(np.float32)
    u = rng.standard_normal((4, 33)).astype(np.float32)
    want = quanta.ops.gelu_mul(g, u)
    out = np.empty_like(g)
    assert quanta.ops.gelu_mul(g, u, out=out) is out
    np.testing.assert_array_equal(out, want)
    assert quanta.ops.gelu_mul(g, u, out=g) is g  # in place on the gate
    np.testing.assert_array_equal(g, want)
    with pytest.raises(TypeError, match="up must have gate's dtype"):
        quanta.ops.gelu_mul(g, u.astype(np.float16))
    with pytest.raises(TypeError, match="gate"):
        quanta.ops.gelu_mul(g.astype(np.float64), u)
    with pytest.raises(ValueError, match="same shape"):
        quanta.ops.gelu_mul(g, u[:, :10].copy())
    with pytest.raises(ValueError, match="C-contiguous"):
        quanta.ops.gelu_mul(g[:, ::2], u[:, ::2])
    with pytest.raises(ValueError, match="out"):
        quanta.ops.gelu_mul(g, u, out=np.empty((4, 32), np.float32))
    flat = np.zeros(200, np.float32)
    with pytest.raises(ValueError, match="gelu_mul: out must be gate, up, or not overlap them"):
        quanta._C.gelu_mul(flat[:100], flat[50:150].copy(), 0, flat[1:101])


SCALINGS = [None, {"rope_type": "linear", "factor": 2.0},
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192},
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}]


@pytest.mark.parametrize("style", ["neox", "interleaved"])
@pytest.mark.parametrize("scaling", SCALINGS, ids=["plain", "linear", "llama3", "yarn"])
def test_rope(rng, style, scaling):
    T, H, Hkv, D = 11, 8, 2, 128
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    k = rng.standard_normal((T, Hkv, D)).astype(np.float32)
    pos = np.array([0, 1, 2, 17, 100, 4095, 4096, 8191, 30000, 131071, 1_000_000], np.int32)
    q0, k0 = q.copy(), k.copy()
    quanta.ops.rope(q, k, pos, theta=500000.0, style=style, scaling=scaling)
    inv, att = quanta.ops.rope_frequencies(D, 500000.0, scaling)
    assert_close(q, R.rope(q0, pos, inv, att, style == "neox"), "layer_f32", f"rope q {style} {scaling}")
    assert_close(k, R.rope(k0, pos, inv, att, style == "neox"), "layer_f32", f"rope k {style} {scaling}")
    assert np.allclose(q[0], q0[0] * att, atol=1e-6)  # position 0: no rotation


def test_rope_partial_and_errors(rng):
    q = rng.standard_normal((4, 2, 96)).astype(np.float32)
    q0 = q.copy()
    pos = np.arange(4, dtype=np.int32) * 7
    quanta.ops.rope(q, None, pos, rotary_dim=32)
    np.testing.assert_array_equal(q[..., 32:], q0[..., 32:])
    inv, _ = quanta.ops.rope_frequencies(32)
    assert_close(q, R.rope(q0, pos, inv), "layer_f32", "partial rotary")
    with pytest.raises(ValueError, match="rotary_dim"):
        quanta.ops.rope(q, None, pos, rotary_dim=33)
    with pytest.raises(TypeError, match="positions"):
        quanta.ops.rope(q, None, pos.astype(np.int64))
    with pytest.raises(ValueError, match="positions"):
        quanta.ops.rope(q, None, pos[:2])
    with pytest.raises(TypeError, match="x"):
        quanta.ops.rope(q.astype(np.float16), None, pos)
    with pytest.raises(ValueError, match="style"):
        quanta.ops.rope(q, None, pos, style="gptj")


def test_rope_frequency_scalings():
    D, theta = 128, 500000.0
    base, _ = quanta.ops.rope_frequencies(D, theta)
    np.testing.assert_allclose(base, theta ** (-np.arange(0, D, 2) / D))
    l3, att = quanta.ops.rope_frequencies(D, theta, SCALINGS[2])
    wavelen = 2 * math.pi / base
    assert att == 1.0
    np.testing.assert_array_equal(l3[wavelen < 8192 / 4], base[wavelen < 8192 / 4])      # high frequencies kept
    np.testing.assert_allclose(l3[wavelen > 8192], base[wavelen > 8192] / 8)             # low ones / factor
    mid = (wavelen >= 2048) & (wavelen <= 8192)
    assert np.all((l3[mid] <= base[mid]) & (l3[mid] >= base[mid] / 8))
    y, att = quanta.ops.rope_frequencies(D, 10000.0, SCALINGS[3])
    b2, _ = quanta.ops.rope_frequencies(D, 10000.0)
    assert att == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert y[0] == b2[0] and y[-1] == pytest.approx(b2[-1] / 4)  # extrapolated / interpolated ends
    assert np.all(np.diff(y) < 0)
    with pytest.raises(ValueError, match="rope_type"):
        quanta.ops.rope_frequencies(D, scaling={"rope_type": "dynamic", "factor": 2.0})
