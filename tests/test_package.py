"""Package-level behaviour: info, CLI, ISA masking, threads, imports without a GPU."""
import json
import os
import subprocess
import sys

import pytest

import quanta


def run_py(code, **env):
    e = dict(os.environ)
    e.update(env)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_info_fields():
    d = quanta.info()
    assert d["version"] == quanta.__version__
    assert d["isa"] in ("ref", "avx2", "avx512")
    assert d["num_threads"] == quanta.get_num_threads() >= 1
    assert isinstance(d["cuda_built"], bool)


def test_cli_info_and_demo():
    r = subprocess.run([sys.executable, "-m", "quanta", "info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "CPU path" in r.stdout and "threads" in r.stdout
    r = subprocess.run([sys.executable, "-m", "quanta", "demo", "--size", "512", "--batch", "8", "--format", "q4_0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "relative error" in r.stdout


@pytest.mark.parametrize("mask,expect", [("avx512", ("avx2", "ref")), ("avx2", ("ref",)), ("avx512,avx2", ("ref",))])
def test_disable_isa(mask, expect):
    hw = quanta.info()["hw_isa"]
    out = run_py("import quanta, json; print(json.dumps(quanta.info()['isa']))", QUANTA_DISABLE_ISA=mask)
    isa = json.loads(out)
    if hw == "ref":
        assert isa == "ref"
    else:
        assert isa in expect


def test_omp_num_threads_honoured():
    assert run_py("import quanta; print(quanta.get_num_threads())", OMP_NUM_THREADS="1") == "1"
    assert run_py("import quanta; print(quanta.get_num_threads())", OMP_NUM_THREADS="3") == "3"


def test_set_num_threads(threads):
    quanta.set_num_threads(1)
    assert quanta.get_num_threads() == 1
    with pytest.raises(ValueError, match="set_num_threads"):
        quanta.set_num_threads(0)


def test_import_without_gpu_never_fails():
    out = run_py("import quanta; print(quanta.cuda.available())", CUDA_VISIBLE_DEVICES="")
    assert out in ("True", "False")
