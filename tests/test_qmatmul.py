"""qmatmul against the float64 reference, across formats, shapes, dtypes, ISA paths, threads."""
import gc
import sys
import threading

import ml_dtypes
import numpy as np
import pytest

import quanta
from quanta import _C
from quanta import formats as F
from quanta import reference as R
from tolerances import assert_close

PRESETS = list(F.PRESETS)
EXTRA = [F.make(3, 64, "asym"), F.make(2, 16, "sym", scale="bf16"), F.make(5, 128, "asym", offset="zero"),
         F.make(6, 32, "sym", scale="fp32"), F.make(8, 256, "asym", offset="zero", scale="bf16"),
         F.make(4, 16, "lut", lut="fp4"), F.make(5, 32, "lut", lut=np.linspace(-1, 1, 32)),
         F.make(6, 64, "lut", lut=np.linspace(-2, 1, 64)), F.make(8, 32, "lut", lut=np.linspace(-1, 3, 256)),
         F.make(8, None, "asym")]


def _w(rng, N, K):
    return (rng.standard_normal((N, K)) * np.exp(0.5 * rng.standard_normal((N, 1)))).astype(np.float32)


def check(x, qt, y, what=""):
    lut = qt.format.kind == "lut"
    yr = R.qmatmul(x, qt, act_quant=not lut)
    assert_close(y, yr, "qmatmul_lut" if lut else "qmatmul_int", what)
    if not lut:  # the int8 activations stay close to float math
        assert_close(y, R.qmatmul(x, qt), "qmatmul_float_x", what)


@pytest.mark.parametrize("fmt", PRESETS + EXTRA, ids=str)
def test_formats_vs_reference(rng, fmt, isa):
    fmt = F.get(fmt)
    K = 512 if fmt.group != 16 else 272
    if fmt.nested:
        K = 512
    for M, N in [(1, 37), (5, 64), (17, 19)]:
        w = _w(rng, N, K)
        qt = quanta.quantize(w, fmt)
        x = rng.standard_normal((M, K)).astype(np.float32)
        check(x, qt, quanta.ops.qmatmul(x, qt), f"{fmt} M={M} N={N} {isa}")


@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q6_k", "int8", "nf4", "fp8_e4m3", "int4_g128_asym"])
def test_isa_paths_bitwise_equal(rng, fmt):
    """Every kernel path performs the same float operations: results are bitwise equal."""
    from conftest import supported_isas
    N, K = 53, 768
    qt = quanta.quantize(_w(rng, N, K), fmt)
    for M in (1, 3, 6, 130):
        x = rng.standard_normal((M, K)).astype(np.float32)
        ys = {}
        try:
            for isa in supported_isas():
                _C._set_isa(isa)
                ys[isa] = quanta.ops.qmatmul(x, qt)
        finally:
            _C._set_isa("best")
        for isa, y in ys.items():
            np.testing.assert_array_equal(y, ys["ref"], err_msg=f"{fmt} M={M}: {isa} != ref")


@pytest.mark.parametrize("shape", [(1, 1, 32), (2, 1, 64), (1, 3, 96), (7, 13, 160), (3, 31, 352), (0, 16, 64),
                                   (61, 67, 256), (200, 17, 64)])
def test_odd_shapes(rng, shape):
    M, N, K = shape
    for fmt in ("q8_0", "int4_g128" if K % 128 == 0 else "q4_1", "nf4" if K % 64 == 0 else "fp8_e5m2"):
        qt = quanta.quantize(_w(rng, N, K), fmt)
        x = rng.standard_normal((M, K)).astype(np.float32)
        y = quanta.ops.qmatmul(x, qt)
        assert y.shape == (M, N) and y.dtype == np.float32
        check(x, qt, y, f"{fmt} {shape}")


def test_per_row_odd_k(rng):
    for K in (1, 5, 33, 100, 300):
        for fmt in ("int8", "fp8_e4m3", F.make(4, None, "asym", offset="zero")):
            qt = quanta.quantize(_w(rng, 21, K), fmt)
            x = rng.standard_normal((4, K)).astype(np.float32)
            check(x, qt, quanta.ops.qmatmul(x, qt), f"{fmt} K={K}")


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_low_precision_x(rng, dtype):
    for fmt in ("q4_k", "nf4", "int8"):
        qt = quanta.quantize(_w(rng, 40, 512), fmt)
        x = rng.standard_normal((6, 512)).astype(dtype)
        y = quanta.ops.qmatmul(x, qt)
        check(x.astype(np.float32), qt, y, f"{fmt} x {np.dtype(dtype)}")


def test_strided_x_and_out(rng):
    qt = quanta.quantize(_w(rng, 48, 256), "q4_0")
    big = rng.standard_normal((9, 400)).astype(np.float32)
    big[:, 256:] = np.nan  # the gap holds NaN: it must never be read
    x = big[:, :256]
    y = quanta.ops.qmatmul(x, qt)
    np.testing.assert_array_equal(y, quanta.ops.qmatmul(np.ascontiguousarray(x), qt))
    out_big = np.full((9, 70), -7.0, np.float32)
    out = out_big[:, 10:58]
    r = quanta.ops.qmatmul(x, qt, out=out)
    assert r is out
    np.testing.assert_array_equal(out, y)
    assert np.all(out_big[:, :10] == -7.0) and np.all(out_big[:, 58:] == -7.0)  # guard columns untouched


def test_shapes_1d_and_batched(rng):
    qt = quanta.quantize(_w(rng, 32, 128), "q8_0")
    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    y = quanta.ops.qmatmul(x, qt)
    assert y.shape == (2, 3, 32)
    np.testing.assert_array_equal(y.reshape(6, 32), quanta.ops.qmatmul(x.reshape(6, 128), qt))
    y1 = quanta.ops.qmatmul(x[0, 0], qt)
    assert y1.shape == (32,)
    np.testing.assert_array_equal(y1, y[0, 0])


def test_batch_invariance(rng):
    """A row's result does not depend on the other rows or on M."""
    qt = quanta.quantize(_w(rng, 64, 512), "q4_k")
    x = rng.standard_normal((300, 512)).astype(np.float32)
    y = quanta.ops.qmatmul(x, qt)
    for i in (0, 5, 131, 299):
        np.testing.assert_array_equal(quanta.ops.qmatmul(x[i:i + 1], qt), y[i:i + 1])


def test_thread_count_and_determinism(rng, threads):
    qt = quanta.quantize(_w(rng, 300, 1024), "q4_0")
    x = rng.standard_normal((70, 1024)).astype(np.float32)
    quanta.set_num_threads(1)
    y1 = quanta.ops.qmatmul(x, qt)
    for n in (2, 3, 4):
        quanta.set_num_threads(n)
        np.testing.assert_array_equal(quanta.ops.qmatmul(x, qt), y1)
    quanta.set_num_threads(2)
    for _ in range(250):
        np.testing.assert_array_equal(quanta.ops.qmatmul(x[:3], qt), y1[:3])


def test_reference_backend(rng):
    qt = quanta.quantize(_w(rng, 16, 64), "q4_0")
    x = rng.standard_normal((3, 64)).astype(np.float32)
    assert_close(quanta.ops.qmatmul(x, qt, backend="reference"), quanta.ops.qmatmul(x, qt), "qmatmul_int")
    with pytest.raises(ValueError, match="backend"):
        quanta.ops.qmatmul(x, qt, backend="gpu-please")


def test_inputs_unchanged(rng):
    qt = quanta.quantize(_w(rng, 20, 256), "q5_k" if False else "q4_1")
    before = [a.copy() for a in qt.arrays if a is not None]
    x = rng.standard_normal((4, 256)).astype(np.float32)
    xc = x.copy()
    quanta.ops.qmatmul(x, qt)
    np.testing.assert_array_equal(x, xc)
    for a, b in zip([a for a in qt.arrays if a is not None], before):
        np.testing.assert_array_equal(a, b)


def test_empty_batch(rng):
    qt = quanta.quantize(_w(rng, 20, 64), "q8_0")
    y = quanta.ops.qmatmul(np.zeros((0, 64), np.float32), qt)
    assert y.shape == (0, 20)


def test_bad_arguments(rng):
    qt = quanta.quantize(_w(rng, 20, 64), "q8_0")
    x = rng.standard_normal((3, 64)).astype(np.float32)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got float64"):
        quanta.ops.qmatmul(x.astype(np.float64), qt)
    with pytest.raises(TypeError, match="x must be a numpy array"):
        quanta.ops.qmatmul(x.tolist(), qt)
    with pytest.raises(ValueError, match=r"x must have shape \(M, 64\)"):
        quanta.ops.qmatmul(x[:, :32], qt)
    with pytest.raises(ValueError, match="x must have contiguous rows"):
        quanta.ops.qmatmul(np.asfortranarray(x), qt)
    with pytest.raises(TypeError, match="w must be a quanta.QuantizedTensor"):
        quanta.ops.qmatmul(x, np.ones((20, 64), np.float32))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 20\)"):
        quanta.ops.qmatmul(x, qt, out=np.empty((3, 21), np.float32))
    with pytest.raises(TypeError, match="out must be float32"):
        quanta.ops.qmatmul(x, qt, out=np.empty((3, 20), np.float64))
    ro = np.empty((3, 20), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        quanta.ops.qmatmul(x, qt, out=ro)
    buf = np.zeros(64 * 3 + 20 * 3, np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        _C.qmatmul(buf[:192].reshape(3, 64), 0, qt.format._c, 20, 64, *qt.arrays, buf[100:160].reshape(3, 20))
    # the binding re-checks what Python could get wrong
    with pytest.raises(ValueError, match="codes must have shape"):
        _C.qmatmul(x, 0, qt.format._c, 40, 64, *qt.arrays, None)
    with pytest.raises(TypeError, match="format must be"):
        _C.qmatmul(x, 0, b"junk", 20, 64, *qt.arrays, None)
    with pytest.raises(TypeError, match="expected 11 arguments"):
        _C.qmatmul(x, 0)
    with pytest.raises(ValueError, match="scales must have shape"):
        _C.qmatmul(x, 0, qt.format._c, 20, 64, qt.codes, qt.scales[:, :1].copy(), None, None, None, None)
    misaligned = np.frombuffer(np.zeros(3 * 64 * 4 + 1, np.uint8)[1:].data, np.float32).reshape(3, 64)
    with pytest.raises(ValueError, match="not aligned"):
        _C.qmatmul(misaligned, 0, qt.format._c, 20, 64, *qt.arrays, None)


def test_no_leaks(rng):
    qt = quanta.quantize(_w(rng, 32, 128), "q4_0")
    x = rng.standard_normal((2, 128)).astype(np.float32)
    out = np.empty((2, 32), np.float32)
    refs = [sys.getrefcount(a) for a in (x, out, qt.codes, qt.scales)]
    for _ in range(10000):
        quanta.ops.qmatmul(x, qt, out=out)
    gc.collect()
    assert [sys.getrefcount(a) for a in (x, out, qt.codes, qt.scales)] == refs
    import tracemalloc
    tracemalloc.start()
    for _ in range(2000):
        quanta.ops.qmatmul(x, qt)
    snap1 = tracemalloc.take_snapshot()
    for _ in range(10000):
        quanta.ops.qmatmul(x, qt)
    snap2 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in snap2.compare_to(snap1, "filename"))
    assert grown < 64 * 1024, grown


def test_threads_calling_at_once(rng):
    qt = quanta.quantize(_w(rng, 96, 512), "q4_k")
    xs = [rng.standard_normal((3, 512)).astype(np.float32) for _ in range(8)]
    expect = [quanta.ops.qmatmul(x, qt) for x in xs]
    errors = []

    def work(i):
        for _ in range(100):
            if not np.array_equal(quanta.ops.qmatmul(xs[i], qt), expect[i]):
                errors.append(i)
                return

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


def test_extreme_values(rng):
    qt = quanta.quantize(_w(rng, 16, 256), "q4_0")
    x = np.zeros((3, 256), np.float32)
    x[1] = 1e30
    x[2, 7] = -3e38
    y = quanta.ops.qmatmul(x, qt)
    assert np.all(y[0] == 0)
    assert np.all(np.isfinite(y[1]))
    check(x[:1], qt, y[:1])
