"""A model shared beyond one call: pickled (as its path and options) to worker processes,
and used by several threads at once."""
import concurrent.futures as cf
import multiprocessing
import os
import pickle

import pytest

import quanta
from tiny_gguf import write_tiny_gguf

PROMPTS = ["the", "in a house", "an apple", "there was", "the end of", "and then"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(str(path))
    return quanta.load(str(path), quant="q4_0", progress=False)


def test_pickles_as_path_and_options(model):
    blob = pickle.dumps(model)
    assert len(blob) < 4096  # the path and options, not the weights
    again = pickle.loads(blob)
    assert again.quant == "q4_0" and again.path == model.path
    assert again.generate("the", max_tokens=12) == model.generate("the", max_tokens=12)


def _generate(m, prompt):
    return m.generate(prompt, max_tokens=10)


def test_threads_share_one_model(model):
    serial = [_generate(model, p) for p in PROMPTS * 2]
    with cf.ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda p: _generate(model, p), PROMPTS * 2))
    assert threaded == serial


def _worker_generate(args):
    m, prompt = args
    return m.generate(prompt, max_tokens=10)


def test_worker_processes_receive_the_model(model):
    serial = [_generate(model, p) for p in PROMPTS[:4]]
    ctx = multiprocessing.get_context("spawn")
    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per worker, as a batch job would set it
    try:
        with cf.ProcessPoolExecutor(2, mp_context=ctx) as pool:
            got = list(pool.map(_worker_generate, [(model, p) for p in PROMPTS[:4]]))
    finally:
        if env is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env
    assert got == serial


def test_model_without_a_path_does_not_pickle(model):
    from quanta.models import Model
    m = Model(model.decoder, model.config, model.tokenizer, None)
    with pytest.raises(TypeError, match="path"):
        pickle.dumps(m)


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_repeated_load_and_release_does_not_grow(model):
    import gc
    for _ in range(5):
        quanta.load(model.path, progress=False).generate("the", max_tokens=2)
    gc.collect()
    base = _rss_mb()
    for _ in range(30):
        m = quanta.load(model.path, progress=False)
        m.generate("the", max_tokens=2)
        del m
    gc.collect()
    assert _rss_mb() - base < 16
