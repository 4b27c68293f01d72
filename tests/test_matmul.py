"""quanta._C.matmul: y[M, N] = x[M, K] @ w[N, K]^T in fp32 for fp32/fp16/bf16 x and w.

Oracle: float64 NumPy on inputs already rounded to their dtype, within the worst-case bound
of fp32 accumulation for the kernel's summation order (chains of at most 256 fused
multiply-adds, then at most K/256 + 4 additions). Every ISA path performs the same float
operations, so the paths (and thread counts) are compared with each other bitwise.
"""
import glob
import importlib.util
import os
import sys
import threading

import ml_dtypes
import numpy as np
import pytest

try:
    from quanta import _C
except ImportError:  # a kernels-only checkout: load the extension without the Python layer
    _path = glob.glob(os.path.join(os.path.dirname(__file__), "..", "python", "quanta", "_C*.so"))[0]
    _spec = importlib.util.spec_from_file_location("quanta._C", _path)
    _C = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_C)

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float32": (np.dtype(np.float32), 0), "float16": (np.dtype(np.float16), 1), "bfloat16": (BF16, 2)}
ISAS = ["ref", "avx2", "avx512"]

# shapes (M, N, K): both formulations (M <= 32 dot, M > 32 gemm), primes, K off the SIMD
# width, several K blocks (256) and column tiles (384), tails of every micro-kernel
SHAPES = [(1, 1, 1), (1, 7, 5), (1, 131, 257), (2, 67, 33), (3, 50, 100), (5, 37, 47), (8, 65, 513),
          (13, 17, 16), (13, 1, 300), (31, 49, 17), (32, 97, 255), (33, 97, 255), (39, 385, 129),
          (45, 13, 1030), (61, 400, 61), (270, 41, 37)]


def rand(shape, dtype, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32).astype(dtype)


def matmul(x, w, out=None):
    return _C.matmul(x, DTYPES[x.dtype.name][1], w, DTYPES[w.dtype.name][1], out)


def assert_close(y, x, w):
    """|y - x @ w^T| <= n * 2^-24 * (|x| @ |w|^T) elementwise, n the longest chain of roundings."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = x64 @ w64.T
    K = x.shape[1]
    n = min(K, 256) + -(-K // 256) + 5
    bound = n * 2.0 ** -24 * (np.abs(x64) @ np.abs(w64).T) + 1e-30
    err = np.abs(y.astype(np.float64) - ref)
    if not np.all(err <= bound):
        i = np.unravel_index(np.argmax(err / bound), err.shape)
        rel_l2 = np.linalg.norm(err) / max(np.linalg.norm(ref), 1e-30)
        pytest.fail(f"max abs error {err.max():.3g}, relative L2 error {rel_l2:.3g}, worst at {i}: "
                    f"{y[i]!r} vs {ref[i]!r} (bound {bound[i]:.3g})")


@pytest.fixture
def isa_switch():
    yield _C._set_isa
    _C._set_isa("best")


@pytest.fixture
def threads_switch():
    n = _C.get_num_threads()
    yield _C.set_num_threads
    _C.set_num_threads(n)


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_matches_float64(M, N, K):
    x, w = rand((M, K), np.float32, 1), rand((N, K), np.float32, 2)
    y = matmul(x, w)
    assert y.dtype == np.float32 and y.shape == (M, N)
    assert_close(y, x, w)


@pytest.mark.parametrize("M", [3, 40])  # dot and gemm formulations
@pytest.mark.parametrize("wdt", ["float32", "bfloat16"])
def test_error_at_most_twice_naive_fp32(M, wdt):
    """The low-precision rule: no worse than 2x a naive fp32 loop (rounded products, one
    running sum in k order), in relative L2 error against float64."""
    N, K = 64, 4096
    x, w = rand((M, K), np.float32, 27), rand((N, K), DTYPES[wdt][0], 28)
    xf, wf = x.astype(np.float32), w.astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    naive = np.add.accumulate(xf[:, None, :] * wf[None, :, :], axis=2, dtype=np.float32)[..., -1]
    err = np.linalg.norm(matmul(x, w) - ref)
    assert err <= 2 * np.linalg.norm(naive - ref), (err, np.linalg.norm(naive - ref))


@pytest.mark.parametrize("xdt", list(DTYPES))
@pytest.mark.parametrize("wdt", list(DTYPES))
@pytest.mark.parametrize("M,N,K", [(1, 131, 257), (4, 19, 31), (41, 385, 129)])
def test_dtype_pairs(xdt, wdt, M, N, K):
    x, w = rand((M, K), DTYPES[xdt][0], 3), rand((N, K), DTYPES[wdt][0], 4)
    assert_close(matmul(x, w), x, w)


@pytest.mark.parametrize("xdt,wdt", [("float32", "float32"), ("float32", "float16"), ("bfloat16", "float32"),
                                     ("float16", "bfloat16"), ("bfloat16", "bfloat16")])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_isa_paths_bitwise(isa_switch, xdt, wdt, M, N, K):
    x, w = rand((M, K), DTYPES[xdt][0], 5), rand((N, K), DTYPES[wdt][0], 6)
    results = {}
    for isa in ISAS:
        got = isa_switch(isa)
        if got in results:
            continue  # the CPU lacks this path
        results[got] = matmul(x, w)
    for isa, y in results.items():
        np.testing.assert_array_equal(y.view(np.uint32), results["ref"].view(np.uint32), err_msg=isa)


@pytest.mark.parametrize("M,N,K", [(1, 1000, 300), (7, 200, 999), (64, 800, 600)])
def test_thread_count_bitwise(threads_switch, M, N, K):
    x, w = rand((M, K), np.float32, 7), rand((N, K), np.float16, 8)
    ys = []
    for n in (1, 2, 3):
        threads_switch(n)
        ys.append(matmul(x, w))
    for y in ys[1:]:
        np.testing.assert_array_equal(y.view(np.uint32), ys[0].view(np.uint32))


@pytest.mark.parametrize("M", [1, 5, 40])
def test_strided_rows(M):
    K, N = 77, 45
    wide = rand((M, K + 13), np.float32, 9)
    x = wide[:, :K]                         # rows longer than K
    w = rand((2 * N, K), BF16, 10)[::2]     # every other row
    big = np.full((M, N + 6), -7.0, np.float32)
    out = big[:, 3:N + 3]
    y = matmul(x, w, out)
    assert y is out
    assert_close(y, np.ascontiguousarray(x), np.ascontiguousarray(w))
    np.testing.assert_array_equal(big[:, :3], -7.0)
    np.testing.assert_array_equal(big[:, N + 3:], -7.0)


def test_single_row_and_column():
    x, w = rand((1, 33), np.float16, 11), rand((1, 33), np.float32, 12)
    assert_close(matmul(x, w), x, w)
    x2 = rand((50, 33), np.float32, 13)  # gemm formulation
    assert_close(matmul(x2, w), x2, w)


def test_empty_m():
    w = rand((5, 16), np.float32, 14)
    y = matmul(np.zeros((0, 16), np.float32), w)
    assert y.shape == (0, 5) and y.dtype == np.float32
    out = np.zeros((0, 5), np.float32)
    assert matmul(np.zeros((0, 16), np.float32), w, out) is out


@pytest.mark.parametrize("wshape", [(0, 16), (5, 0)])
def test_empty_n_or_k_raises(wshape):
    with pytest.raises(ValueError, match="matmul: w"):
        matmul(np.zeros((3, wshape[1]), np.float32), np.zeros(wshape, np.float32))


def test_out_is_written_and_returned():
    x, w = rand((12, 40), np.float32, 15), rand((30, 40), np.float16, 16)
    out = np.full((12, 30), np.nan, np.float32)
    assert matmul(x, w, out) is out
    assert_close(out, x, w)


def test_inputs_unchanged():
    x, w = rand((20, 70), BF16, 17), rand((33, 70), np.float16, 18)
    xc, wc = x.copy(), w.copy()
    matmul(x, w)
    np.testing.assert_array_equal(x.view(np.uint16), xc.view(np.uint16))
    np.testing.assert_array_equal(w.view(np.uint16), wc.view(np.uint16))


def test_nonfinite_propagate():
    x, w = rand((40, 40), np.float32, 19), rand((6, 40), np.float32, 20)
    x[2, 5], x[4, 7], w[3, 9] = np.inf, np.nan, -np.inf
    for m in (slice(0, 3), slice(0, 40)):  # dot and gemm formulations
        y = matmul(np.ascontiguousarray(x[m]), w)
        with np.errstate(invalid="ignore"):
            ref = x[m].astype(np.float64) @ w.astype(np.float64).T
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
        np.testing.assert_array_equal(np.isinf(y), np.isinf(ref))


X = np.zeros((3, 8), np.float32)
W = np.zeros((4, 8), np.float32)


@pytest.mark.parametrize("args,exc,match", [
    ((X.astype(np.float64), 0, W, 0, None), TypeError, r"matmul: x must be float32 with shape \(M, 8\), got float64"),
    ((X, 0, W.astype(np.int32), 0, None), TypeError, r"matmul: w must be float32 with shape \(N, K\), got int32"),
    ((X, 1, W, 0, None), TypeError, r"matmul: x must be float16"),
    ((X, 0, W.astype(BF16), 1, None), TypeError, r"matmul: w must be float16 .*got bfloat16"),
    ((X, 3, W, 0, None), ValueError, r"matmul: xdtype must be 0 \(float32\)"),
    ((X, 0, W, "f4", None), TypeError, r"matmul: wdtype must be an int"),
    ((X[:, :7], 0, W, 0, None), ValueError, r"matmul: x must be float32 with shape \(M, 8\), got float32 with shape \(3, 7\)"),
    ((X[0], 0, W, 0, None), ValueError, r"matmul: x must be float32 with shape \(M, 8\), got float32 with shape \(8,\)"),
    ((X, 0, W[None], 0, None), ValueError, r"matmul: w must be float32 with shape \(N, K\)"),
    ((X.tolist(), 0, W, 0, None), TypeError, r"matmul: x must be a numpy array"),
    ((np.zeros((3, 16), np.float32)[:, ::2], 0, W, 0, None), ValueError, r"matmul: x must have contiguous rows"),
    ((X, 0, W, 0, np.zeros((3, 5), np.float32)), ValueError, r"matmul: out must be float32 with shape \(3, 4\)"),
    ((X, 0, W, 0, np.zeros((3, 4), np.float64)), TypeError, r"matmul: out must be float32"),
    ((X, 0, W, 0), TypeError, r"matmul: expected 5 arguments"),
])
def test_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        _C.matmul(*args)


def test_out_readonly_or_overlapping():
    x, w = rand((4, 8), np.float32, 21), rand((4, 8), np.float32, 22)
    ro = np.zeros((4, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="matmul: out must be writeable"):
        matmul(x, w, ro)
    buf = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="matmul: out overlaps x"):
        _C.matmul(buf, 0, w, 0, buf[:, :4])
    with pytest.raises(ValueError, match="matmul: out overlaps w"):
        _C.matmul(x, 0, buf, 0, buf[:, 4:])


def test_broadcast_rows_rejected():
    x = np.broadcast_to(np.ones(8, np.float32), (3, 8))
    with pytest.raises(ValueError, match="matmul: rows of x must not overlap"):
        _C.matmul(x, 0, W, 0, None)


def test_no_reference_growth():
    x, w = rand((9, 20), np.float32, 23), rand((7, 20), np.float16, 24)
    out = np.zeros((9, 7), np.float32)
    before = [sys.getrefcount(a) for a in (x, w, out)]
    for _ in range(200):
        matmul(x, w, out)
        matmul(x, w)
    assert [sys.getrefcount(a) for a in (x, w, out)] == before


def test_threads_calling_at_once():
    x, w = rand((16, 300), np.float32, 25), rand((500, 300), BF16, 26)
    want = matmul(x, w)
    got = [None] * 4

    def work(i):
        for _ in range(5):
            got[i] = matmul(x, w)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for g in got:
        np.testing.assert_array_equal(g, want)
