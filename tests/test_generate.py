"""Generation through the public API on a tiny GGUF model: sampling distributions against a
direct NumPy definition, seeds, stop strings, streaming, batches, limits, bad arguments and
Ctrl-C."""
import os
import signal
import threading
import time

import numpy as np
import pytest

import quanta
from quanta.generate import SamplingParams, probabilities, sample
from tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(str(path))
    return quanta.load(str(path), progress=False)


def _expected(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, penalty=1.0, history=()):
    """The sampling distribution written out step by step in float64."""
    x = np.array(logits, np.float64)
    for t in set(history):
        x[t] = x[t] / penalty if x[t] > 0 else x[t] * penalty
    z = np.exp((x - x.max()) / temperature)
    p = z / z.sum()
    alive = np.ones(x.size, bool)
    if top_k:
        alive &= x >= np.sort(x)[-top_k]
    p = np.where(alive, p, 0)
    p /= p.sum()
    if min_p:
        p = np.where(p >= min_p * p.max(), p, 0)
        p /= p.sum()
    if top_p < 1:
        order = sorted(range(x.size), key=lambda i: (-p[i], i))
        mass, keep = 0.0, []
        for i in order:
            keep.append(i)
            mass += p[i]
            if mass >= top_p:
                break
        p = np.where(np.isin(np.arange(x.size), keep), p, 0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.6),
                                dict(min_p=0.2), dict(temperature=1.3, top_k=8, top_p=0.9, min_p=0.05),
                                dict(penalty=1.5, history=(0, 3, 3, 7))])
def test_probabilities_match_the_definition(kw):
    logits = np.random.default_rng(3).standard_normal(40).astype(np.float32) * 2
    params = SamplingParams(temperature=kw.get("temperature", 1.0), top_k=kw.get("top_k", 0),
                            top_p=kw.get("top_p", 1.0), min_p=kw.get("min_p", 0.0),
                            repetition_penalty=kw.get("penalty", 1.0))
    got = probabilities(logits, params, kw.get("history"))
    np.testing.assert_allclose(got, _expected(logits, **kw), rtol=1e-12, atol=1e-15)


def test_draws_follow_the_distribution():
    logits = np.array([2.0, 1.0, 0.5, -1.0, 0.0], np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    p = probabilities(logits, params)
    rng = np.random.default_rng(0)
    n = 20000
    counts = np.bincount([sample(logits, params, rng) for _ in range(n)], minlength=5)
    assert counts[p == 0].sum() == 0
    np.testing.assert_allclose(counts / n, p, atol=0.015)


def test_greedy_is_argmax_and_penalty_changes_it():
    logits = np.array([0.1, 3.0, 2.9], np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, SamplingParams(), rng) == 1
    assert sample(logits, SamplingParams(repetition_penalty=2.0), rng, history=[1]) == 2


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5),
                                 dict(min_p=1.0), dict(repetition_penalty=0)])
def test_bad_sampling_arguments_raise(model, bad):
    with pytest.raises(ValueError):
        model.generate("hello", max_tokens=2, **bad)


def test_seeded_sampling_is_reproducible(model):
    kw = dict(max_tokens=24, temperature=1.0, top_k=20, seed=7)
    a, b = model.generate("the cat", **kw), model.generate("the cat", **kw)
    assert a == b and len(a) > 0
    others = {model.generate("the cat", **dict(kw, seed=s)) for s in range(8, 12)}
    assert len(others | {a}) > 1


def test_stream_pieces_join_to_the_text(model):
    for kw in (dict(), dict(temperature=0.9, seed=3), dict(stop=["e"])):
        text = model.generate("in the", max_tokens=40, **kw)
        pieces = list(model.generate("in the", max_tokens=40, stream=True, **kw))
        assert "".join(pieces) == text
        assert all(isinstance(p, str) and p for p in pieces)


def test_stop_strings_end_the_text_before_them(model):
    full = model.generate("the", max_tokens=60)
    stop = full[10:12]
    assert len(stop) == 2
    cut = model.generate("the", max_tokens=60, stop=[stop, "zzzz"])
    assert cut == full[:full.index(stop)]
    assert stop not in cut


def test_batch_equals_one_by_one(model):
    prompts = ["the", "in a house there was", "an"]
    batch = model.generate(prompts, max_tokens=20)
    assert batch == [model.generate(p, max_tokens=20) for p in prompts]
    events = list(model.generate(prompts, max_tokens=5, stream=True))
    assert {i for i, _ in events} <= {0, 1, 2}
    for i in range(3):
        assert "".join(p for j, p in events if j == i) == model.generate(prompts[i], max_tokens=5)


def test_limits_and_bad_prompts(model):
    assert model.generate("the", max_tokens=0) == ""
    assert len(model.generate("the", max_tokens=7, return_tokens=True)) == 7
    with pytest.raises(ValueError, match="empty"):
        model.generate([[]], max_tokens=3)
    with pytest.raises(ValueError, match="context"):
        model.generate("the", max_tokens=model.config.max_position)
    with pytest.raises(ValueError, match="vocabulary|token ids"):
        model.generate([10 ** 6], max_tokens=2)
    with pytest.raises(ValueError):
        model.generate([], max_tokens=2)
    with pytest.raises(ValueError, match="max_tokens"):
        model.generate("the", max_tokens=-1)


@pytest.mark.parametrize("kv", ["float32", "bfloat16", "int8", "fp8_e4m3"])
def test_kv_cache_dtypes(model, kv):
    ref = model.generate("the", max_tokens=12, kv_dtype="float32", return_tokens=True)
    got = model.generate("the", max_tokens=12, kv_dtype=kv, return_tokens=True)
    assert len(got) == 12
    if kv == "float32":
        assert got == ref


@pytest.mark.skipif(os.name != "posix", reason="SIGINT delivery to the own process")
def test_ctrl_c_stops_generation_promptly_and_the_model_stays_usable(model):
    before = model.generate("the", max_tokens=16)
    sent = []

    def interrupt():
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(0.3, interrupt)
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        model.generate("the", max_tokens=model.config.max_position - 8)
    caught = time.perf_counter()
    timer.join()
    assert caught - t0 < 30, "the generation finished before the interrupt"
    assert caught - sent[0] < 0.5
    assert model.generate("the", max_tokens=16) == before
