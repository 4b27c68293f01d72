"""quanta.cuda: finding the CUDA extension, the driver and the devices.

Everywhere: importing never fails, built() agrees with the files on disk, and without a GPU
available() is False, devices() is [] and require() raises a RuntimeError saying why (not
built / no driver / no device). Marked gpu, and skipped cleanly without a device: device
properties and the kernel self-test that checks the toolchain on real hardware.
"""
import importlib.machinery
import os
import subprocess
import sys
import threading

import pytest

import quanta
import quanta.cuda as cuda

HAVE_GPU = cuda.available()


def gpu_test(fn):
    """Marks a test gpu and skips it, with the reason, where no device can be used."""
    skip = pytest.mark.skipif(not HAVE_GPU, reason=f"no CUDA GPU: {cuda.unavailable_reason()}")
    return pytest.mark.gpu(skip(fn))


needs_extension = pytest.mark.skipif(not cuda.built(), reason="quanta._cuda was not built (no nvcc)")
no_gpu_only = pytest.mark.skipif(HAVE_GPU, reason="a GPU is available here")


def run_python(code, **env):
    """Run `code` in a fresh interpreter that finds this quanta; returns stdout."""
    pkg_parent = os.path.dirname(os.path.dirname(quanta.__file__))
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, os.environ.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                       timeout=120)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


# ---- everywhere ----

def test_import_never_fails_without_a_visible_device():
    out = run_python(
        "import sys, quanta, quanta.cuda as c\n"
        "print('quanta._cuda' in sys.modules)\n"  # loaded on first use, not by import
        "print(c.built(), c.available(), c.device_count(), c.devices())\n"
        "try:\n    c.require()\nexcept RuntimeError as e:\n    print('raised', e)\n",
        CUDA_VISIBLE_DEVICES="")
    loaded, answers, raised = out.splitlines()[:3]
    assert loaded == "False"
    assert answers.split(" ", 1)[1] == "False 0 []"
    assert raised.startswith("raised no CUDA GPU can be used: ")


def test_built_matches_extension_file():
    pkg = os.path.dirname(quanta.__file__)
    files = [f for f in os.listdir(pkg)
             if f.startswith("_cuda.") and f.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))]
    assert cuda.built() == bool(files)


def test_answers_agree():
    n = cuda.device_count()
    assert isinstance(n, int) and n >= 0
    assert cuda.available() == (n > 0)
    assert len(cuda.devices()) == n
    assert (cuda.unavailable_reason() is None) == (n > 0)
    info = cuda.info()
    assert info["built"] == cuda.built() and info["available"] == cuda.available()
    assert info["devices"] == cuda.devices()


@no_gpu_only
def test_without_gpu_require_explains():
    assert cuda.available() is False
    assert cuda.device_count() == 0
    assert cuda.devices() == []
    reason = cuda.unavailable_reason()
    known = ("without its CUDA extension", "driver", "device", "cannot be loaded")
    assert any(w in reason for w in known), reason
    with pytest.raises(RuntimeError, match="no CUDA GPU can be used: ") as e:
        cuda.require()
    assert reason in str(e.value)
    with pytest.raises(RuntimeError, match="no CUDA GPU can be used: "):
        cuda.selftest(0)


def test_not_built_message(monkeypatch):
    monkeypatch.setattr(cuda, "_loaded", (None, "No module named 'quanta._cuda'"))
    monkeypatch.setattr(cuda, "built", lambda: False)
    assert cuda.available() is False and cuda.device_count() == 0 and cuda.devices() == []
    assert cuda.runtime_version() is None and cuda.driver_version() is None and cuda.built_archs() == ()
    with pytest.raises(RuntimeError, match="without its CUDA extension: nvcc was not found") as e:
        cuda.require()
    assert "QUANTA_CUDA=1" in str(e.value)


def test_broken_extension_message(monkeypatch):
    monkeypatch.setattr(cuda, "_loaded", (None, "undefined symbol: qn_nothing"))
    monkeypatch.setattr(cuda, "built", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be loaded: undefined symbol: qn_nothing"):
        cuda.require()


@needs_extension
def test_versions_and_archs():
    assert cuda.runtime_version() >= 11080  # the first CUDA that targets sm_90
    drv = cuda.driver_version()
    assert isinstance(drv, int) and drv >= 0
    archs = cuda.built_archs()
    assert archs and all(a >= 75 for a in archs) and list(archs) == sorted(archs)


@needs_extension
def test_selftest_argument_errors():
    from quanta import _cuda
    with pytest.raises(TypeError, match="selftest: dev must be an int, got str"):
        _cuda.selftest("0")
    # out of range: ValueError with a device, RuntimeError (the reason) without one
    with pytest.raises(ValueError if HAVE_GPU else RuntimeError):
        _cuda.selftest(cuda.device_count())
    with pytest.raises(ValueError if HAVE_GPU else RuntimeError):
        _cuda.selftest(-1)


@needs_extension
def test_threads_agree():
    expected = (cuda.device_count(), cuda.devices())
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append((cuda.device_count(), cuda.devices()))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == expected for r in results)


# ---- with a GPU ----

@gpu_test
def test_devices_are_sane():
    devs = cuda.devices()
    assert len(devs) == cuda.device_count() >= 1
    for i, d in enumerate(devs):
        assert d["index"] == i
        assert isinstance(d["name"], str) and d["name"]
        assert ":" in d["pci_bus_id"]
        assert d["compute_capability"] >= (7, 5)
        assert d["total_memory"] >= 1 << 30
        assert d["sm_count"] > 0 and d["warp_size"] == 32
        assert d["max_threads_per_block"] >= 1024 and d["max_threads_per_sm"] >= d["max_threads_per_block"]
        smem = (d["shared_memory_per_block"], d["shared_memory_per_block_optin"], d["shared_memory_per_sm"])
        assert 0 < smem[0] <= smem[1] <= smem[2]
        assert d["l2_cache"] > 0 and d["clock_khz"] > 0
        if not d["integrated"]:
            assert d["memory_bus_bits"] > 0 and d["memory_clock_khz"] > 0
            assert 50 < d["memory_bandwidth_gbs"] < 20000


@gpu_test
def test_selftest_runs_on_every_device():
    archs = cuda.built_archs()
    for d in cuda.devices():
        arch = cuda.selftest(d["index"])
        major, minor = d["compute_capability"]
        # SASS built for this GPU, or PTX for an older arch that the driver compiled for it
        assert arch // 10 in archs and arch // 10 <= 10 * major + minor, (arch, d["name"])


@gpu_test
def test_selftest_out_of_range():
    with pytest.raises(ValueError, match=r"selftest: device \d+ is out of range"):
        cuda.selftest(cuda.device_count())


# ---- device arrays and qmatmul: what runs without a GPU ----

import gc  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from tolerances import assert_close  # noqa: E402

QMATMUL_FORMATS = ["q4_0", "q4_1", "q4_k", "q5_k", "q6_k", "q8_0", "int4_g128", "int4_g128_asym", "int8", "nf4",
                   "fp8_e4m3", "fp8_e5m2"]


class FakeCAI:
    """Describes GPU memory through __cuda_array_interface__ only (nothing is allocated)."""

    def __init__(self, shape, typestr="<f2", strides=None, ptr=0x10000):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False),
                                         "version": 3, "strides": strides, "stream": None}


def fake_device_qt(qt):
    """A CudaQuantizedTensor over fake device addresses: enough for argument checks, which must
    all happen before anything touches a device."""
    arrays = [None if a is None else cuda.Array._wrap(None, 0x1000 * (i + 1), a.shape, a.dtype, a.strides, 0,
                                                      None)
              for i, a in enumerate(qt.arrays)]
    return cuda.CudaQuantizedTensor(qt.format, qt.shape, 0, *arrays)


@pytest.fixture(scope="module")
def small_qt():
    w = np.random.default_rng(3).standard_normal((40, 256)).astype(np.float32)
    return quanta.quantize(w, "q4_0")


@no_gpu_only
def test_without_gpu_arrays_raise_no_cuda_device(small_qt):
    with pytest.raises(RuntimeError, match="^no CUDA device: "):
        cuda.Array((4, 4))
    with pytest.raises(RuntimeError, match="^no CUDA device: "):
        cuda.to_device(np.zeros(3, np.float32))
    with pytest.raises(RuntimeError, match="^no CUDA device: "):
        cuda.Stream()
    with pytest.raises(RuntimeError, match="^no CUDA device: "):
        small_qt.to("cuda")
    with pytest.raises(RuntimeError, match="^no CUDA device: "):
        cuda.asarray(FakeCAI((2, 256)))
    assert cuda.memory_stats() == {"live": 0, "cached": 0}
    cuda.empty_cache()


@no_gpu_only
def test_without_gpu_qmatmul_raises_no_cuda_device(small_qt):
    x = FakeCAI((3, 256))
    with pytest.raises(RuntimeError, match="^no CUDA device: "):
        quanta.ops.qmatmul(x, fake_device_qt(small_qt))


def test_import_does_not_load_extension_for_numpy_ops():
    out = run_python(
        "import sys, numpy as np, quanta\n"
        "w = quanta.quantize(np.ones((16, 64), np.float32), 'q8_0')\n"
        "quanta.ops.qmatmul(np.ones((2, 64), np.float32), w)\n"
        "print('quanta._cuda' in sys.modules)\n")
    assert out.strip() == "False"


def test_qmatmul_gpu_x_needs_gpu_weight(small_qt):
    with pytest.raises(TypeError, match=r"w.to\('cuda'\)"):
        quanta.ops.qmatmul(FakeCAI((3, 256)), small_qt)
    with pytest.raises(TypeError, match=r"w.to\('cuda'\)"):
        quanta.ops.matmul(FakeCAI((3, 256)), small_qt)
    with pytest.raises(TypeError, match=r"w is a numpy array .*quanta.cuda.to_device\(w\)"):
        quanta.ops.matmul(FakeCAI((3, 256)), np.zeros((40, 256), np.float32))


def test_qmatmul_numpy_x_with_gpu_weight(small_qt):
    with pytest.raises(TypeError, match=r"w lives on cuda:0 .*to_device"):
        quanta.ops.qmatmul(np.zeros((3, 256), np.float32), fake_device_qt(small_qt))


def test_qmatmul_argument_checks_before_the_device(small_qt):
    w = fake_device_qt(small_qt)
    q = quanta.ops.qmatmul
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got float64"):
        q(FakeCAI((3, 256), "<f8"), w)
    with pytest.raises(TypeError, match="unsupported __cuda_array_interface__ typestr"):
        q(FakeCAI((3, 256), "<c8"), w)
    with pytest.raises(ValueError, match=r"x must have shape \(M, 256\), got float16 with shape \(3, 128\)"):
        q(FakeCAI((3, 128)), w)
    with pytest.raises(ValueError, match="x rows must be contiguous"):
        q(FakeCAI((3, 256), strides=(1024, 4)), w)
    with pytest.raises(ValueError, match="row stride"):
        q(FakeCAI((3, 256), strides=(300, 2)), w)
    with pytest.raises(ValueError, match="C-contiguous"):
        q(FakeCAI((2, 3, 256), strides=(2048, 512, 2)), w)
    with pytest.raises(ValueError, match="path must be one of"):
        cuda.qmatmul(FakeCAI((3, 256)), w, path="fast")
    with pytest.raises(ValueError, match=r"out must have shape \(3, 40\)"):
        q(FakeCAI((3, 256)), w, out=FakeCAI((3, 41), "<f4"))
    with pytest.raises(TypeError, match="out must be float32, float16 or bfloat16"):
        q(FakeCAI((3, 256)), w, out=FakeCAI((3, 40), "<i4"))
    with pytest.raises(ValueError, match="backend must be 'auto' for GPU arrays"):
        q(FakeCAI((3, 256)), w, backend="reference")


def test_matmul_argument_checks_before_the_device():
    w = FakeCAI((40, 256), "<f2", ptr=0x20000)
    m = quanta.ops.matmul
    with pytest.raises(TypeError, match="matmul: x must be float32, float16 or bfloat16, got float64"):
        m(FakeCAI((3, 256), "<f8"), w)
    with pytest.raises(ValueError, match=r"x must have shape \(M, 256\), got float16 with shape \(3, 128\)"):
        m(FakeCAI((3, 128)), w)
    with pytest.raises(ValueError, match="matmul: x rows must be contiguous"):
        m(FakeCAI((3, 256), strides=(1024, 4)), w)
    with pytest.raises(ValueError, match="matmul: x row stride"):
        m(FakeCAI((3, 256), strides=(300, 2)), w)
    with pytest.raises(TypeError, match="matmul: w must be float32, float16 or bfloat16, got float64"):
        m(FakeCAI((3, 256)), FakeCAI((40, 256), "<f8"))
    with pytest.raises(TypeError, match="unsupported __cuda_array_interface__ typestr"):
        m(FakeCAI((3, 256)), FakeCAI((40, 256), "<c8"))
    with pytest.raises(ValueError, match=r"w must have shape \(N, K\), got float16 with shape \(2, 40, 256"):
        m(FakeCAI((3, 256)), FakeCAI((2, 40, 256)))
    with pytest.raises(ValueError, match=r"matmul: w must have N > 0 and K > 0, got shape \(0, 256\)"):
        m(FakeCAI((3, 256)), FakeCAI((0, 256)))
    with pytest.raises(ValueError, match="matmul: w rows must be contiguous"):
        m(FakeCAI((3, 256)), FakeCAI((40, 256), strides=(1024, 4)))
    with pytest.raises(ValueError, match="matmul: w row stride"):
        m(FakeCAI((3, 256)), FakeCAI((40, 256), strides=(300, 2)))
    with pytest.raises(TypeError, match="matmul: x is a GPU array, so w must be a GPU array"):
        m(FakeCAI((3, 256)), [[0.0] * 256] * 40)
    with pytest.raises(ValueError, match=r"matmul: out must have shape \(3, 40\)"):
        m(FakeCAI((3, 256)), w, out=FakeCAI((3, 41), "<f4"))
    with pytest.raises(TypeError, match="matmul: out must be float32, float16 or bfloat16"):
        m(FakeCAI((3, 256)), w, out=FakeCAI((3, 40), "<i4"))
    with pytest.raises(ValueError, match="matmul: out rows must be contiguous"):
        m(FakeCAI((3, 256)), w, out=FakeCAI((3, 40), "<f4", strides=(320, 8)))
    with pytest.raises(ValueError, match="matmul: path must be one of"):
        cuda.matmul(FakeCAI((3, 256)), w, path="fp8")
    with pytest.raises(TypeError, match="matmul_path: w_dtype must be float32, float16 or bfloat16"):
        cuda.matmul_path(np.float16, np.int8, 4)


def test_matmul_numpy_x_with_gpu_weight():
    with pytest.raises(TypeError, match=r"w lives on the GPU .*quanta.cuda.to_device\(x\)"):
        quanta.ops.matmul(np.zeros((3, 256), np.float32), FakeCAI((40, 256)))


@no_gpu_only
def test_without_gpu_matmul_raises_no_cuda_device():
    for x, w in ((FakeCAI((3, 256)), FakeCAI((40, 256), ptr=0x20000)),
                 (FakeCAI((2, 3, 256), "<f4"), FakeCAI((40, 256), "<f4", ptr=0x20000))):
        with pytest.raises(RuntimeError, match="^no CUDA device: "):
            quanta.ops.matmul(x, w)
    with pytest.raises(RuntimeError, match="^no CUDA device: "):
        cuda.matmul_path(np.float16, np.float16, 64)


@needs_extension
def test_matmul_binding_checks_before_the_device():
    """qn_cuda_matmul checks its arguments before asking for a device: these run anywhere."""
    from quanta import _cuda
    with pytest.raises(TypeError, match="matmul takes 15 positional arguments, got 2"):
        _cuda.matmul(1, 2)
    with pytest.raises(TypeError, match="matmul_path takes 4 positional arguments, got 3"):
        _cuda.matmul_path(0, 0, 1)
    with pytest.raises(TypeError, match="matmul: x must be a non-negative int address"):
        _cuda.matmul(0, 0, 4, "x", 0, 8, 0, 0, 8, 1, 4, 8, 0, 0, 0)
    # y, ydt, ldy, x, xdt, ldx, w, wdt, ldw, M, N, K, path, device, stream
    ok = [0x1000, 0, 4, 0x2000, 1, 8, 0x3000, 1, 8, 3, 4, 8, 0, 0, 0]

    def call(**changes):
        args = list(ok)
        names = "y ydt ldy x xdt ldx w wdt ldw M N K path device stream".split()
        for k, v in changes.items():
            args[names.index(k)] = v
        return _cuda.matmul(*args)

    with pytest.raises(ValueError, match="dtype codes must be 0, 1 or 2, got x 1, w 3, y 0"):
        call(wdt=3)
    with pytest.raises(ValueError, match="M = -1 out of range"):
        call(M=-1)
    with pytest.raises(ValueError, match=r"w shape \(0, 8\) out of range"):
        call(N=0)
    with pytest.raises(ValueError, match=r"w shape \(4, 0\) out of range"):
        call(K=0, ldx=0, ldw=0)
    with pytest.raises(ValueError, match="row strides ldx = 7, ldw = 8, ldy = 4 are below K = 8, N = 4"):
        call(ldx=7)
    with pytest.raises(ValueError, match="row strides ldx = 8, ldw = 8, ldy = 3 are below K = 8, N = 4"):
        call(ldy=3)
    with pytest.raises(ValueError, match="unknown path 3"):
        call(path=3)
    with pytest.raises(ValueError, match="must not be NULL"):
        call(w=0)
    assert call(M=0, x=0, w=0, y=0) is None  # nothing to do: no device is touched


def test_cuda_quantized_tensor_checks(small_qt):
    w = fake_device_qt(small_qt)
    assert w.shape == small_qt.shape and w.format == small_qt.format and w.device == 0
    assert w.nbytes == small_qt.nbytes
    assert "device=cuda:0" in repr(w)
    with pytest.raises(AttributeError):
        w.shape = (1, 1)
    codes = w.codes
    with pytest.raises(ValueError, match="scales is missing"):
        cuda.CudaQuantizedTensor(small_qt.format, small_qt.shape, 0, codes, None)
    with pytest.raises(TypeError, match="scales must be a quanta.cuda.Array"):
        cuda.CudaQuantizedTensor(small_qt.format, small_qt.shape, 0, codes, small_qt.scales)
    with pytest.raises(ValueError, match="codes must be C-contiguous uint8 with shape"):
        cuda.CudaQuantizedTensor(small_qt.format, (64, 256), 0, codes, w.scales)


def test_array_interfaces_without_device_calls():
    a = cuda.Array._wrap(None, 0xABC000, (3, 5), np.float16, (10, 2), 1, cuda.Stream.__new__(cuda.Stream))
    a.stream.device, a.stream.handle, a.stream._owned = 1, 0, False
    cai = a.__cuda_array_interface__
    assert cai == {"shape": (3, 5), "typestr": "<f2", "data": (0xABC000, False), "version": 3, "strides": None,
                   "stream": 1}
    assert a.__dlpack_device__() == (2, 1)
    assert a.ndim == 2 and a.size == 15 and a.nbytes == 30 and a.is_c_contiguous and len(a) == 3
    s = cuda.Array._wrap(None, 0xABC000, (3, 4), np.float16, (20, 2), 1, a.stream)
    assert not s.is_c_contiguous and s.__cuda_array_interface__["strides"] == (20, 2)
    r = a.reshape(-1)
    assert r.shape == (15,) and r.ptr == a.ptr
    with pytest.raises(ValueError, match="C-contiguous"):
        s.reshape(12)
    assert cuda.describe(FakeCAI((2, 3), "<f4")) == ((2, 3), np.dtype(np.float32), (12, 4))
    assert cuda.describe(np.zeros(3)) is None


def test_asarray_rejects_host_arrays():
    with pytest.raises(TypeError, match="to_device"):
        cuda.asarray(np.zeros(3))
    with pytest.raises(TypeError, match="expected a GPU array"):
        cuda.asarray([1, 2, 3])
    assert not cuda.is_device_array(np.zeros(3))
    assert cuda.is_device_array(FakeCAI((1,)))


def test_array_argument_checks():
    with pytest.raises(ValueError, match="device must be"):
        cuda.Array((2,), device=-1)
    with pytest.raises(ValueError, match="device must be"):
        cuda.Array((2,), device="gpu")
    with pytest.raises(ValueError, match="shape must be non-negative"):
        cuda.Array((2, -1))
    with pytest.raises(TypeError, match="unsupported dtype"):
        cuda.Array((2,), dtype=np.complex64)


@needs_extension
def test_dlpack_capsules_round_trip_in_c():
    """The DLPack ABI code (export, import, deleters) runs without a device: addresses only."""
    from quanta import _cuda

    class Owner:
        pass

    for versioned in (0, 1):
        owner = Owner()
        base = sys.getrefcount(owner)
        cap = _cuda.dlpack_export(owner, 0x7000, (2, 3), (3, 1), 4, 16, 2, 1, versioned, versioned)
        assert sys.getrefcount(owner) == base + 1
        name = "dltensor_versioned" if versioned else "dltensor"
        assert f'"{name}"' in repr(cap)
        keeper, ptr, shape, strides, dtype, device, readonly = _cuda.dlpack_import(cap)
        assert (ptr, shape, strides, dtype, device, readonly) == (0x7000, (2, 3), (3, 1), (4, 16, 1), (2, 1),
                                                                  bool(versioned))
        assert f'"used_{name}"' in repr(cap)
        with pytest.raises(TypeError, match="unconsumed DLPack capsule"):
            _cuda.dlpack_import(cap)
        del cap
        gc.collect()
        assert sys.getrefcount(owner) == base + 1  # the importer's keeper holds it
        del keeper
        assert sys.getrefcount(owner) == base
        # a capsule nobody consumes releases the owner when it dies
        cap = _cuda.dlpack_export(owner, 0x7000, (4,), (1,), 2, 32, 2, 0, versioned, 0)
        del cap
        assert sys.getrefcount(owner) == base


@needs_extension
def test_binding_argument_errors():
    from quanta import _cuda
    with pytest.raises(TypeError, match="qmatmul takes 19 positional arguments"):
        _cuda.qmatmul(1, 2)
    with pytest.raises(TypeError, match="fmt must be the .* bytes of a quanta format"):
        _cuda.qmatmul(b"x", *([0] * 18))
    with pytest.raises(ValueError, match="ptr must be a non-negative int address"):
        _cuda.dlpack_export(None, -1, (), (), 2, 32, 2, 0, 0, 0)
    with pytest.raises(TypeError, match="shape and strides must be tuples"):
        _cuda.dlpack_export(None, 0, [1], (1,), 2, 32, 2, 0, 0, 0)


# ---- device arrays and qmatmul on a GPU ----

def _x(rng, M, K, dtype):
    return rng.standard_normal((M, K)).astype(np.float32).astype(dtype)


def _gpu_tolerance(fmt, path):
    return "qmatmul_gpu_fp8" if path == "fp8" else "qmatmul_gpu"


@gpu_test
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, np.uint8,
                                   np.int64])
def test_to_device_round_trip(rng, dtype):
    a = (rng.standard_normal((7, 13)) * 4).astype(dtype)
    d = cuda.to_device(a)
    assert d.shape == a.shape and d.dtype == a.dtype and d.strides == a.strides
    np.testing.assert_array_equal(d.numpy().view(np.uint8), a.view(np.uint8))
    e = cuda.to_device(np.zeros((0, 4), dtype))
    assert e.numpy().shape == (0, 4)


@gpu_test
def test_allocator_reuses_and_releases():
    cuda.empty_cache()
    base = cuda.memory_stats()
    for _ in range(50):
        a = cuda.Array((1000, 1000), np.float32)
        del a
    stats = cuda.memory_stats()
    assert stats["live"] == base["live"] and stats["cached"] >= 4_000_000
    cuda.empty_cache()
    assert cuda.memory_stats()["cached"] == 0


@gpu_test
def test_streams_order_work(rng):
    s = cuda.Stream(0)
    a = cuda.to_device(rng.standard_normal((64, 64)).astype(np.float32), stream=s)
    b = a.copy()
    s.synchronize()
    np.testing.assert_array_equal(b.numpy(), a.numpy())
    assert cuda.default_stream(0).handle == 0 and a.__cuda_array_interface__["stream"] == s.handle


@gpu_test
@pytest.mark.parametrize("fmt", QMATMUL_FORMATS)
@pytest.mark.parametrize("M", [1, 7, 16, 64, 300])
def test_qmatmul_gpu_vs_cpu(rng, fmt, M):
    from quanta import reference
    N, K = 80, 512
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    qt = quanta.quantize(w, fmt)
    wd = qt.to("cuda")
    path = cuda.qmatmul_path(wd, M)
    for dtype in (np.float16, ml_dtypes.bfloat16, np.float32):
        x = _x(rng, M, K, dtype)
        y = quanta.ops.qmatmul(cuda.to_device(x), wd).numpy()
        assert y.dtype == np.float32 and y.shape == (M, N)
        assert_close(y, reference.qmatmul(x, qt), _gpu_tolerance(fmt, path), f"{fmt} M={M} x {np.dtype(dtype)}")
        assert_close(y, quanta.ops.qmatmul(x, qt), "qmatmul_float_x" if path != "fp8" else "qmatmul_gpu_fp8",
                     f"{fmt} M={M}: GPU vs CPU")


@gpu_test
@pytest.mark.parametrize("fmt", ["q4_0", "q6_k", "int8", "nf4", "fp8_e4m3"])
def test_qmatmul_paths_agree(rng, fmt):
    from quanta import reference
    N, K, M = 70, 768, 40
    qt = quanta.quantize((rng.standard_normal((N, K)) * 0.05).astype(np.float32), fmt)
    wd = qt.to("cuda")
    x = _x(rng, M, K, np.float16)
    xd = cuda.to_device(x)
    ref = reference.qmatmul(x, qt)
    major, minor = cuda.devices()[0]["compute_capability"]
    paths = ["gemv"] + (["gemm"] if major >= 8 else []) + (["fp8"] if fmt == "fp8_e4m3" and (major, minor) >= (8, 9)
                                                           else [])
    for p in paths:
        y = cuda.qmatmul(xd, wd, path=p).numpy()
        assert_close(y, ref, _gpu_tolerance(fmt, p), f"{fmt} path {p}")
    if "fp8" not in paths:
        with pytest.raises(NotImplementedError):
            cuda.qmatmul(xd, wd, path="fp8")


@gpu_test
@pytest.mark.parametrize("fmt", ["q8_0", "q4_k", "int4_g128_asym", "nf4"])
def test_qmatmul_gemm_split_k(rng, fmt):
    """Few rows against a long K: the tensor-core path splits K across blocks (q8_0's 37 chunks
    leave an odd count to the last split) and sums the partials in a fixed order, so a call
    repeated gives the same bits."""
    from quanta import reference
    if cuda.devices()[0]["compute_capability"] < (8, 0):
        pytest.skip("the tensor-core path needs sm_80+")
    N, K = 72, 1184 if fmt == "q8_0" else 1280
    qt = quanta.quantize((rng.standard_normal((N, K)) * 0.05).astype(np.float32), fmt)
    wd = qt.to("cuda")
    for M in (1, 5, 16, 17, 64):
        for dtype in (np.float16, np.float32):
            x = _x(rng, M, K, dtype)
            xd = cuda.to_device(x)
            y = cuda.qmatmul(xd, wd, path="gemm").numpy()
            assert_close(y, reference.qmatmul(x, qt), _gpu_tolerance(fmt, "gemm"), f"{fmt} M={M} {np.dtype(dtype)}")
            np.testing.assert_array_equal(cuda.qmatmul(xd, wd, path="gemm").numpy(), y)


@gpu_test
@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "q4_0"])
def test_qmatmul_odd_shapes_strided_and_out(rng, fmt):
    from quanta import reference
    N, K = 37, 96 if fmt != "q4_0" else 160  # per-row formats pad K to 128
    qt = quanta.quantize((rng.standard_normal((N, K)) * 0.05).astype(np.float32), fmt)
    wd = qt.to("cuda")
    for M in (1, 5, 33, 129):
        wide = _x(rng, M, K + 24, np.float16)
        xd = cuda.to_device(wide)
        view = cuda.Array._wrap(xd, xd.ptr, (M, K), xd.dtype, xd.strides, xd.device, xd.stream)
        out = cuda.Array((M, N), np.float16)
        res = quanta.ops.qmatmul(view, wd, out=out)
        assert res is out
        path = cuda.qmatmul_path(wd, M)
        assert_close(out.numpy().astype(np.float32), reference.qmatmul(wide[:, :K], qt),
                     _gpu_tolerance(fmt, path), f"{fmt} M={M}")
    y = quanta.ops.qmatmul(cuda.to_device(_x(rng, 6, K, np.float32)).reshape(2, 3, K), wd)
    assert y.shape == (2, 3, N)
    assert quanta.ops.qmatmul(cuda.Array((0, K), np.float16), wd).shape == (0, N)


@gpu_test
def test_weights_round_trip(rng):
    for fmt in QMATMUL_FORMATS:
        qt = quanta.quantize(rng.standard_normal((33, 256)).astype(np.float32), fmt)
        back = qt.to("cuda").to("cpu")
        for a, b in zip(qt.arrays, back.arrays):
            assert (a is None and b is None) or np.array_equal(a, b)


@gpu_test
def test_dlpack_and_cai_with_torch(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    a = rng.standard_normal((5, 7)).astype(np.float32)
    d = cuda.to_device(a)
    t = torch.from_dlpack(d)
    assert t.is_cuda and t.data_ptr() == d.ptr
    np.testing.assert_array_equal(t.cpu().numpy(), a)
    tb = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
    q = cuda.asarray(tb)
    assert q.dtype == ml_dtypes.bfloat16 and q.ptr == tb.data_ptr()
    np.testing.assert_array_equal(q.numpy().view(np.uint16), tb.cpu().view(torch.int16).numpy().view(np.uint16))
    tv = torch.randn(6, 10, device="cuda")[:, :8]
    qv = cuda.asarray(tv)  # CAI with strides
    assert qv.strides == (40, 4)
    np.testing.assert_array_equal(qv.numpy(), tv.cpu().numpy())
    qt = quanta.quantize(rng.standard_normal((24, 64)).astype(np.float32), "q8_0")
    y = quanta.ops.qmatmul(torch.randn(3, 64, device="cuda", dtype=torch.float16), qt.to("cuda"))
    assert y.shape == (3, 24)


@gpu_test
def test_dlpack_and_cai_with_cupy(rng):
    cp = pytest.importorskip("cupy")
    a = rng.standard_normal((5, 7)).astype(np.float32)
    d = cuda.to_device(a)
    np.testing.assert_array_equal(cp.asnumpy(cp.asarray(d)), a)
    np.testing.assert_array_equal(cp.asnumpy(cp.from_dlpack(d)), a)
    c = cp.arange(12, dtype=cp.float16).reshape(3, 4)
    np.testing.assert_array_equal(cuda.asarray(c).numpy(), cp.asnumpy(c))


@gpu_test
def test_qmatmul_gpu_errors(rng):
    qt = quanta.quantize(rng.standard_normal((16, 64)).astype(np.float32), "q4_0")
    wd = qt.to("cuda")
    with pytest.raises(NotImplementedError, match="FP8 path"):
        cuda.qmatmul(cuda.to_device(_x(rng, 32, 64, np.float16)), wd, path="fp8")
    with pytest.raises(ValueError, match="out of range"):
        cuda.Stream(cuda.device_count())


# ---- float matmul on a GPU ----

MM_DTYPES = [np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]


def _mm_tolerance(x_dtype, w_dtype, M, path="auto"):
    """Tensor cores sum with truncation (see tolerances.py); every other path is plain fp32."""
    if path == "auto":
        path = cuda.matmul_path(x_dtype, w_dtype, M)
    return "matmul_gpu_tc" if path == "gemm" else "matmul_f32"


def _strided_view(a, cols):
    """A quanta Array viewing the first `cols` columns of the 2-D Array a (rows stay a's pitch)."""
    return cuda.Array._wrap(a, a.ptr, (a.shape[0], cols), a.dtype, a.strides, a.device, a.stream)


@gpu_test
@pytest.mark.parametrize("N,K", [(67, 259), (131, 320), (33, 1100)])
@pytest.mark.parametrize("M", [1, 5, 16, 17, 64, 300])
def test_matmul_gpu_vs_float64(rng, M, N, K):
    """Every (x, w) dtype pair against float64 on the rounded inputs. K = 259 leaves rows
    misaligned (element loads), K = 320 aligned (16-byte loads, cp.async), K = 1100 spans
    several GEMV x tiles for M > 4."""
    from quanta import reference
    for xdt in MM_DTYPES:
        for wdt in MM_DTYPES:
            x, w = _x(rng, M, K, xdt), _x(rng, N, K, wdt)
            xd, wd = cuda.to_device(x), cuda.to_device(w)
            y = quanta.ops.matmul(xd, wd)
            assert isinstance(y, cuda.Array) and y.dtype == np.float32 and y.shape == (M, N)
            what = f"M={M} N={N} K={K} x {xdt} w {wdt} [{cuda.matmul_path(xdt, wdt, M)}]"
            assert_close(y.numpy(), reference.matmul(x, w), _mm_tolerance(xdt, wdt, M), what)
            np.testing.assert_array_equal(xd.numpy().view(np.uint8), x.view(np.uint8))  # inputs unchanged
            np.testing.assert_array_equal(wd.numpy().view(np.uint8), w.view(np.uint8))


@gpu_test
@pytest.mark.parametrize("xdt,wdt", [(np.float16, np.float16), (ml_dtypes.bfloat16, ml_dtypes.bfloat16),
                                     (np.float32, np.float16), (np.float16, ml_dtypes.bfloat16)])
def test_matmul_gpu_paths_agree(rng, xdt, wdt):
    from quanta import reference
    N, K, M = 70, 264, 40
    x, w = _x(rng, M, K, xdt), _x(rng, N, K, wdt)
    xd, wd = cuda.to_device(x), cuda.to_device(w)
    ref = reference.matmul(x, w)
    tc = np.dtype(xdt) == np.dtype(wdt) and cuda.devices()[0]["compute_capability"] >= (8, 0)
    for p in ["gemv", "fma"] + (["gemm"] if tc else []):
        y = cuda.matmul(xd, wd, path=p)
        assert_close(y.numpy(), ref, _mm_tolerance(xdt, wdt, M, p), f"path {p}")
        np.testing.assert_array_equal(y.numpy(), cuda.matmul(xd, wd, path=p).numpy())  # deterministic
    if not tc:
        with pytest.raises(NotImplementedError, match="tensor-core path needs"):
            cuda.matmul(xd, wd, path="gemm")
    assert cuda.matmul_path(xdt, wdt, 16) == "gemv"
    assert cuda.matmul_path(xdt, wdt, 17) == ("gemm" if tc else "fma")


@gpu_test
@pytest.mark.parametrize("M", [1, 7, 129])
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_matmul_gpu_wide(rng, M, dtype):
    """N past two blocks per SM: full-width GEMV blocks and the 128 x 128 tensor-core tiles (with
    column and row tails); K off 8 too (element loads, no cp.async)."""
    from quanta import reference
    sms = cuda.devices()[0]["sm_count"]
    N = 128 * sms + 3
    for K in (136, 131):
        x, w = _x(rng, M, K, dtype), _x(rng, N, K, dtype)
        y = quanta.ops.matmul(cuda.to_device(x), cuda.to_device(w)).numpy()
        assert_close(y, reference.matmul(x, w), _mm_tolerance(dtype, dtype, M), f"M={M} N={N} K={K}")


@gpu_test
def test_matmul_gpu_long_k(rng):
    """M = 1 with K past one 8192-input x tile."""
    from quanta import reference
    for wdt in (np.float16, np.float32):
        x, w = _x(rng, 1, 8200, np.float32), _x(rng, 45, 8200, wdt)
        y = quanta.ops.matmul(cuda.to_device(x), cuda.to_device(w)).numpy()
        assert_close(y, reference.matmul(x, w), "matmul_f32", f"w {np.dtype(wdt)}")


@gpu_test
@pytest.mark.parametrize("M", [1, 5, 33, 129])
def test_matmul_gpu_strided_out_and_shapes(rng, M):
    from quanta import reference
    N, K = 37, 96
    xw = _x(rng, M, K + 24, np.float16)
    ww = _x(rng, N, K + 8, np.float16)
    xd, wd = cuda.to_device(xw), cuda.to_device(ww)
    x, w = _strided_view(xd, K), _strided_view(wd, K)
    ref = reference.matmul(xw[:, :K], ww[:, :K])
    tol = _mm_tolerance(np.float16, np.float16, M)
    # out= float32 with rows wider than N: the columns past N are left alone
    wide = cuda.to_device(np.full((M, N + 5), 7.0, np.float32))
    res = quanta.ops.matmul(x, w, out=_strided_view(wide, N))
    assert res.shape == (M, N)
    got = wide.numpy()
    assert_close(got[:, :N], ref, tol, f"M={M} strided")
    assert np.all(got[:, N:] == 7.0)
    # float16 / bfloat16 out: the float32 result rounded once
    y32 = cuda.matmul(x, w).numpy()
    for odt in (np.float16, ml_dtypes.bfloat16):
        out = cuda.Array((M, N), odt)
        assert cuda.matmul(x, w, out=out) is out
        np.testing.assert_array_equal(out.numpy().view(np.uint16), y32.astype(odt).view(np.uint16))
    # float32 x on float32 weights, strided both ways
    xf, wf = cuda.to_device(xw.astype(np.float32)), cuda.to_device(ww.astype(np.float32))
    y = cuda.matmul(_strided_view(xf, K), _strided_view(wf, K)).numpy()
    assert_close(y, ref, "matmul_f32", f"M={M} float32 strided")


@gpu_test
def test_matmul_gpu_shapes_and_streams(rng):
    from quanta import reference
    N, K = 24, 40
    w = _x(rng, N, K, np.float16)
    wd = cuda.to_device(w)
    x3 = _x(rng, 6, K, np.float32)
    y = quanta.ops.matmul(cuda.to_device(x3).reshape(2, 3, K), wd)
    assert y.shape == (2, 3, N)
    assert_close(y.numpy().reshape(6, N), reference.matmul(x3, w), "matmul_f32", "3-D x")
    y1 = quanta.ops.matmul(cuda.to_device(x3[0]), wd)
    assert y1.shape == (N,)
    assert_close(y1.numpy()[None], reference.matmul(x3[:1], w), "matmul_f32", "1-D x")
    assert quanta.ops.matmul(cuda.Array((0, K), np.float16), wd).shape == (0, N)
    s = cuda.Stream(0)
    xs = cuda.to_device(x3, stream=s)
    ys = cuda.matmul(xs, wd)  # runs on x's stream
    assert ys.stream is s
    s.synchronize()
    assert_close(ys.numpy(), reference.matmul(x3, w), "matmul_f32", "stream")


@gpu_test
def test_matmul_gpu_errors(rng):
    xd = cuda.to_device(_x(rng, 4, 32, np.float16))
    with pytest.raises(TypeError, match=r"quanta.cuda.to_device\(w\)"):
        quanta.ops.matmul(xd, _x(rng, 8, 32, np.float16))
    with pytest.raises(ValueError, match=r"x must have shape \(M, 16\)"):
        quanta.ops.matmul(xd, cuda.to_device(_x(rng, 8, 16, np.float16)))
    with pytest.raises(NotImplementedError, match="both float16 or both bfloat16, got x float16, w float32"):
        cuda.matmul(xd, cuda.to_device(_x(rng, 8, 32, np.float32)), path="gemm")
    if cuda.device_count() >= 2:
        with pytest.raises(ValueError, match="x is on cuda:0, w on cuda:1"):
            cuda.matmul(xd, cuda.to_device(_x(rng, 8, 32, np.float16), device=1))


@gpu_test
def test_matmul_gpu_with_torch(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    from quanta import reference
    x = torch.randn(70, 96, device="cuda", dtype=torch.float16)
    w = torch.randn(50, 96, device="cuda", dtype=torch.float16)
    y = quanta.ops.matmul(x, w)
    ref = reference.matmul(x.cpu().numpy(), w.cpu().numpy())
    tol = _mm_tolerance(np.float16, np.float16, 70)
    assert_close(y.numpy(), ref, tol, "torch f16")
    out = torch.empty(70, 50, device="cuda", dtype=torch.float32)
    quanta.ops.matmul(x, w, out=out)
    torch.cuda.synchronize()
    assert_close(out.cpu().numpy(), ref, tol, "torch out")
    x32 = x.float()
    y = quanta.ops.matmul(x32, w)
    assert_close(y.numpy(), ref, _mm_tolerance(np.float32, np.float16, 70), "torch float32 x")
