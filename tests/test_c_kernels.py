"""Builds and runs the plain-C kernel tests (tests/c), normally and under ASan + UBSan."""
import os
import shutil
import subprocess

import pytest

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "c")


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None, reason="needs make and a C compiler")
@pytest.mark.parametrize("sanitize", ["0", "1"], ids=["plain", "asan-ubsan"])
def test_c_kernels(sanitize, tmp_path):
    build = str(tmp_path / "build")
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:halt_on_error=1", UBSAN_OPTIONS="halt_on_error=1")
    r = subprocess.run(["make", "-s", "-j2", "-C", HERE, f"SANITIZE={sanitize}", f"BUILD={build}", "run"],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "FAIL" not in r.stdout + r.stderr
