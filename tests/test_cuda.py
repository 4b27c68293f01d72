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
