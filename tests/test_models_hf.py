"""Every supported architecture against Hugging Face transformers.

Tiny random float32 models (hidden 64, heads 4 / kv heads 2, head_dim 16, vocab 300) are
built with transformers, saved with save_pretrained (safetensors) and loaded with
quanta.load. Checked: prefill logits (normalized MSE <= 1e-6), decode over the paged cache
(teacher-forced logits, and greedy ids against transformers' generate), batched generation
against each prompt alone, fused-expert and sharded checkpoints, transformers 4.x config
keys, q8_0 weights, float16 / bfloat16 / int8 / fp8 KV caches, and the warning or error
when config.json and the tensors disagree. Gemma 3 also: the multimodal checkpoint layout,
configs before layer_types, a final logit softcap, and bfloat16 embedding scaling.
"""
import json
import os
import warnings

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import quanta  # noqa: E402
from quanta.kv_cache import KVCache  # noqa: E402

VOCAB = 300
BF16 = np.dtype(ml_dtypes.bfloat16)
NMSE_FLOAT = 1e-6
IDS = [int(t) for t in np.random.default_rng(7).integers(0, VOCAB, 32)]

_BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
             bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
_MOE = dict(num_experts_per_tok=2)

# name -> (transformers config class, overrides of _BASE)
SPECS = {
    "llama": ("LlamaConfig", {}),
    "llama_rope3": ("LlamaConfig", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True, num_hidden_layers=3)),
    "llama_bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", {}),
    "qwen2_swa": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3": ("Qwen3Config", {}),
    "mixtral": ("MixtralConfig", dict(_MOE, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(_MOE, num_hidden_layers=3, num_experts=8, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, decoder_sparse_step=2,
                                         mlp_only_layers=[2], norm_topk_prob=False)),
    "qwen2_moe_nobias": ("Qwen2MoeConfig", dict(_MOE, num_experts=4, moe_intermediate_size=32,
                                                shared_expert_intermediate_size=64, qkv_bias=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_MOE, num_experts=6, moe_intermediate_size=32, norm_topk_prob=True,
                                         mlp_only_layers=[0])),
    "olmoe": ("OlmoeConfig", dict(_MOE, num_experts=4, intermediate_size=64, norm_topk_prob=False)),
    # local layers (window 8, theta 1e4) and a global one (theta 1e6, linear factor 8), and a
    # softmax scale 1 / sqrt(24) that is not 1 / sqrt(head_dim)
    "gemma3": ("Gemma3TextConfig", dict(
        num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=24, tie_word_embeddings=True,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                         "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1_000_000.0)})),
    "gemma3_softcap": ("Gemma3TextConfig", dict(sliding_window=8, sliding_window_pattern=2,
                                                final_logit_softcapping=3.0)),
}


def _hf_model(name: str, seed: int = 0):
    cls_name, over = SPECS[name]
    cfg = getattr(transformers, cls_name)(**dict(_BASE, **over))
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    # transformers' init (std 0.02) gives nearly flat logits: scale every matrix to unit
    # gain on its input dimension, perturb the norm weights around 1 and the biases around 0
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            elif "norm" in pname:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.3)
        if cfg.tie_word_embeddings:
            model.tie_weights()
    return model


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _hf_greedy(model, ids, n: int):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             num_beams=1, pad_token_id=0)
    return out[0, len(ids):].tolist()


def nmse(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.mean((got - ref) ** 2) / np.mean(ref ** 2))


class Pair:
    """A transformers model, its saved folder and the quanta model loaded from it."""

    def __init__(self, name, hf, path, qm):
        self.name, self.hf, self.path, self.qm = name, hf, path, qm
        self.ref_logits = _hf_logits(hf, IDS)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: one thread for torch and for the quanta kernels, so that idle
    workers of either do not spin against the other (thread-count independence of the
    kernels is tested with the kernels)."""
    n_torch, n_quanta = torch.get_num_threads(), quanta.get_num_threads()
    torch.set_num_threads(1)
    quanta.set_num_threads(1)
    yield
    torch.set_num_threads(n_torch)
    quanta.set_num_threads(n_quanta)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> Pair, each built once per module."""
    built = {}

    def get(name: str) -> Pair:
        if name not in built:
            hf = _hf_model(name)
            path = str(tmp_path_factory.mktemp(name))
            hf.save_pretrained(path, safe_serialization=True)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a tensor left unused would be a wrong model
                built[name] = Pair(name, hf, path, quanta.load(path, progress=False))
        return built[name]
    return get


@pytest.fixture(params=list(SPECS))
def pair(request, pairs):
    return pairs(request.param)


def _decode_logits(model, ids, prompt_len: int, kv_dtype) -> np.ndarray:
    """Logits [T, V]: prefill of ids[:prompt_len] into a paged cache, then one decode step
    per remaining token (teacher-forced), on the decoder directly."""
    cfg, dec = model.config, model.decoder
    cache = KVCache(cfg.n_layers, 8, 8, cfg.n_kv_heads, cfg.head_dim, kv_dtype)
    cache.add_sequence(0)
    ids = np.asarray(ids, np.int32)
    slots = cache.reserve(0, prompt_len)
    cu = np.array([0, prompt_len], np.int32)
    rows = [dec.prefill(ids[:prompt_len], np.arange(prompt_len, dtype=np.int32), cu, cache, slots)]
    for t in range(prompt_len, ids.size):
        slots = cache.reserve(0, 1)
        rows.append(dec.decode(ids[t:t + 1], np.array([t], np.int32), cache, slots, cache.block_tables([0]),
                               np.array([t + 1], np.int32)))
    return np.concatenate(rows)


# ---- float32: exact up to rounding ------------------------------------------------------------

def test_config_read(pair):
    c, h = pair.qm.config, pair.hf.config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (h.num_hidden_layers, 4, 2, 16)
    assert c.tie_embeddings == bool(h.tie_word_embeddings)
    if pair.name == "mistral":
        assert c.layer_windows == [8, 8]
    elif pair.name == "qwen2_swa":
        assert c.layer_windows == [None, 8]
    elif pair.name == "gemma3":
        assert c.layer_windows == [8, 8, None]
        assert (c.rope_local_theta, c.rope_theta, c.rope_scaling["factor"]) == (10000.0, 1e6, 8.0)
        assert c.attn_scale == pytest.approx(24 ** -0.5) and c.embed_scale == 8.0
    elif pair.name == "gemma3_softcap":
        assert c.layer_windows == [8, None] and c.final_softcap == 3.0
    else:
        assert c.layer_windows == [None] * c.n_layers
    assert c.qkv_bias == (pair.name in ("qwen2", "qwen2_swa", "qwen2_moe", "llama_bias"))
    if pair.name == "qwen2_moe":
        assert c.moe_layers == [False, True, False]
    if pair.name == "qwen3_moe":
        assert c.moe_layers == [False, True]


def test_logits_match(pair):
    got = pair.qm.forward(IDS)
    err = nmse(got, pair.ref_logits)
    assert err <= NMSE_FLOAT, f"{pair.name}: normalized MSE {err:.3g}"
    assert np.array_equal(got.argmax(-1), pair.ref_logits.argmax(-1))


def test_prefix_logits_match(pair):
    # a prompt shorter than any window, and one of odd length
    for n in (5, 19):
        err = nmse(pair.qm.forward(IDS[:n]), _hf_logits(pair.hf, IDS[:n]))
        assert err <= NMSE_FLOAT, f"{pair.name}, {n} tokens: normalized MSE {err:.3g}"


def test_decode_logits_match(pair):
    # prefill 6 tokens, decode 26 one by one: crosses the window of 8 and several cache blocks
    got = _decode_logits(pair.qm, IDS, 6, "float32")
    err = nmse(got, pair.ref_logits)
    assert err <= NMSE_FLOAT, f"{pair.name}: decode normalized MSE {err:.3g}"


def test_greedy_generate_matches(pair):
    prompt = IDS[:12]  # longer than the window of 8: decode runs past it from the first step
    ref = _hf_greedy(pair.hf, prompt, 16)
    got = pair.qm.generate(prompt, max_tokens=16, temperature=0, kv_dtype="float32", return_tokens=True)
    assert got == ref, pair.name


@pytest.mark.parametrize("name", ["mistral", "qwen2_moe"])
def test_batched_generate_equals_single(name, pairs):
    pr = pairs(name)
    prompts = [IDS[:3], IDS[5:20], IDS[10:17]]  # decode crosses the window of 8 at different steps
    batch = pr.qm.generate(prompts, max_tokens=12, kv_dtype="float32", return_tokens=True)
    alone = [pr.qm.generate(p, max_tokens=12, kv_dtype="float32", return_tokens=True) for p in prompts]
    assert batch == alone
    assert batch == [_hf_greedy(pr.hf, p, 12) for p in prompts]


def test_generate_stops_at_eos(pairs):
    pr = pairs("llama")
    full = pr.qm.generate(IDS[:12], max_tokens=16, kv_dtype="float32", return_tokens=True)
    k = 5
    qm = quanta.load(pr.path, progress=False)
    qm.config.eos_token_id = full[k]
    got = qm.generate(IDS[:12], max_tokens=16, kv_dtype="float32", return_tokens=True)
    assert got == full[:full.index(full[k]) + 1]
    assert qm.generate(IDS[:12], max_tokens=16) == ""  # no tokenizer: no text


def test_return_tokens_with_stream_raises(pairs):
    with pytest.raises(ValueError, match="return_tokens"):
        pairs("llama").qm.generate(IDS[:4], max_tokens=2, stream=True, return_tokens=True)


# ---- checkpoint layouts ---------------------------------------------------------------------

def test_sharded_checkpoint(pairs, tmp_path):
    pr = pairs("llama_tied")
    pr.hf.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    qm = quanta.load(str(tmp_path), progress=False)
    assert nmse(qm.forward(IDS), pr.ref_logits) <= NMSE_FLOAT


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_fused_expert_checkpoint(name, pairs, tmp_path):
    """Experts stored stacked as transformers holds them in memory: gate_up_proj [E, 2I, D]
    (gate rows first) and down_proj [E, D, I]."""
    from safetensors.torch import save_file
    pr = pairs(name)
    sd = {k: v.contiguous() for k, v in pr.hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(open(os.path.join(pr.path, "config.json")).read())
    qm = quanta.load(str(tmp_path), progress=False)
    assert nmse(qm.forward(IDS), pr.ref_logits) <= NMSE_FLOAT


def _copy_with_config(src: str, dst, drop=(), **changes):
    """A copy of the checkpoint folder src in dst with config.json keys dropped / changed."""
    import shutil
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), dst / f)
    cfg = json.loads((dst / "config.json").read_text())
    for k in drop:
        cfg.pop(k, None)
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("name", ["llama_rope3", "qwen2_swa"])
def test_legacy_config_keys(name, pairs, tmp_path):
    """config.json as transformers 4.x wrote it: top-level rope_theta / rope_scaling and no
    layer_types (Qwen2's window then starts at max_window_layers)."""
    pr = pairs(name)
    rope = dict(pr.hf.config.to_dict()["rope_parameters"])
    path = _copy_with_config(pr.path, tmp_path, drop=["rope_parameters", "layer_types"],
                             rope_theta=rope.pop("rope_theta"),
                             rope_scaling=None if rope["rope_type"] == "default" else rope)
    qm = quanta.load(path, progress=False)
    assert qm.config.layer_windows == pr.qm.config.layer_windows
    assert nmse(qm.forward(IDS), pr.ref_logits) <= NMSE_FLOAT


# ---- low precision ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "qwen2_moe"])
def test_q8_0_weights(name, pairs):
    pr = pairs(name)
    qm = quanta.load(pr.path, quant="q8_0", progress=False)
    assert all(str(l.format) == "q8_0" for l in qm.decoder.linears())
    if name == "qwen2_moe":
        moe = qm.decoder.blocks[1].mlp
        assert moe.experts is not None and moe.shared is not None  # the fused C path
    err = nmse(qm.forward(IDS), pr.ref_logits)
    assert err < 5e-3, f"{name} q8_0: normalized MSE {err:.3g}"  # about 1e-3: weights and activations rounded
    got = qm.generate(IDS[:12], max_tokens=8, kv_dtype="float32", return_tokens=True)
    ref = _hf_greedy(pr.hf, IDS[:12], 8)
    assert got[:2] == ref[:2] and sum(a == b for a, b in zip(got, ref)) >= 5, (got, ref)
    dec = _decode_logits(qm, IDS, 6, "float32")
    assert nmse(dec, qm.forward(IDS)) <= NMSE_FLOAT  # decode agrees with prefill on the same weights


@pytest.mark.parametrize("kv_dtype, tol", [("float16", 2e-6), ("bfloat16", 1e-4), ("int8", 2e-3),
                                           ("fp8_e4m3", 3e-2)])
def test_low_precision_kv_cache(kv_dtype, tol, pairs):
    pr = pairs("mistral")
    dec = _decode_logits(pr.qm, IDS, 6, kv_dtype)
    assert np.isfinite(dec).all()
    err = nmse(dec, pr.ref_logits)
    assert err < tol, f"kv {kv_dtype}: normalized MSE {err:.3g}"
    got = pr.qm.generate([IDS[:12], IDS[:5]], max_tokens=16, kv_dtype=kv_dtype, return_tokens=True)
    assert [len(g) for g in got] == [16, 16]
    assert all(0 <= t < VOCAB for g in got for t in g)
    assert got[0][:2] == _hf_greedy(pr.hf, IDS[:12], 2)


def test_tensors_the_config_does_not_use_warn(pairs, tmp_path):
    path = _copy_with_config(pairs("llama").path, tmp_path, num_hidden_layers=1)
    with pytest.warns(UserWarning, match=r"not used by the llama configuration, e\.g\. \['1\."):
        quanta.load(path, progress=False)


def test_config_contradicting_the_weights_raises(pairs, tmp_path):
    path = _copy_with_config(pairs("qwen2_moe").path, tmp_path, mlp_only_layers=[1, 2])
    with pytest.raises(ValueError, match="no tensor for '1.gate'"):
        quanta.load(path, progress=False)


# ---- Gemma 3 ----------------------------------------------------------------------------------

def test_gemma3_runs_op_by_op(pairs):
    """The fused decode step runs Llama-style blocks only; Gemma's blocks go op by op."""
    qm = pairs("gemma3").qm
    assert not qm.config.llama_block and qm.decoder._plan is None
    assert pairs("llama").qm.decoder._plan is not None


def test_gemma3_multimodal_checkpoint(pairs, tmp_path):
    """A Gemma3ForConditionalGeneration folder: model_type gemma3 with the text model's config
    in text_config (only what differs from the defaults), tensors under
    model.language_model.*, and image-encoder tensors the text decoder does not read."""
    from safetensors.numpy import load_file, save_file
    pr = pairs("gemma3")
    sd = load_file(os.path.join(pr.path, "model.safetensors"))
    sd = {k.replace("model.", "model.language_model.", 1): v for k, v in sd.items()}
    sd["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((4, 3, 2), np.float32)
    sd["model.multi_modal_projector.mm_input_projection_weight"] = np.zeros((4, 64), np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    text = json.loads(open(os.path.join(pr.path, "config.json")).read())
    for k, v in dict(rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", attention_bias=False).items():
        assert text.pop(k) == v  # Gemma3TextConfig's defaults, left to the reader
    cfg = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text,
           "vision_config": {"model_type": "siglip_vision_model"}, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qm = quanta.load(str(tmp_path), progress=False)
    assert nmse(qm.forward(IDS), pr.ref_logits) <= NMSE_FLOAT


def test_gemma3_legacy_config(pairs, tmp_path):
    """config.json as transformers 4.x wrote Gemma 3: rope_theta, rope_local_base_freq and
    rope_scaling at the top, and a sliding_window_pattern instead of layer_types."""
    pr = pairs("gemma3")
    drop = ["rope_parameters", "layer_types", "_sliding_window_pattern"]
    path = _copy_with_config(pr.path, tmp_path, drop=drop, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                             sliding_window_pattern=3, rope_scaling={"rope_type": "linear", "factor": 8.0})
    qm = quanta.load(path, progress=False)
    assert qm.config.layer_windows == [8, 8, None]
    assert nmse(qm.forward(IDS), pr.ref_logits) <= NMSE_FLOAT


@pytest.mark.parametrize("change, match", [(dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
                                           (dict(hidden_activation="gelu"), "hidden_activation"),
                                           (dict(use_bidirectional_attention=True), "bidirectional")])
def test_gemma3_unsupported_config_raises(pairs, tmp_path, change, match):
    path = _copy_with_config(pairs("gemma3").path, tmp_path, **change)
    with pytest.raises(quanta.models.ConfigError, match=match):
        quanta.load(path, progress=False)


def test_gemma3_save_and_reload(pairs, tmp_path):
    """A quanta model file keeps Gemma's fields and its norms (stored as the multiplier 1 + w)."""
    pr = pairs("gemma3")
    dst = str(tmp_path / "gemma3.safetensors")
    quanta.models.save_model(pr.path, dst, None, progress=False)
    qm = quanta.load(dst, progress=False)
    assert qm.config == pr.qm.config
    assert nmse(qm.forward(IDS), pr.ref_logits) <= NMSE_FLOAT


def test_gemma3_bfloat16_embedding_scale():
    """A bfloat16 table is scaled as transformers does: by sqrt(D) rounded to bfloat16, the
    product rounded to bfloat16 (sqrt(40) = 6.32 becomes 6.3125)."""
    from quanta.models.layers import Embedding
    emb = transformers.models.gemma3.modeling_gemma3.Gemma3TextScaledWordEmbedding(50, 40, None, 40 ** 0.5)
    torch.manual_seed(0)
    with torch.no_grad():
        emb.weight.normal_()
    emb = emb.to(torch.bfloat16)
    ids = np.array([0, 7, 49, 7], np.int64)
    with torch.no_grad():
        want = emb(torch.from_numpy(ids)).float().numpy()
    table = emb.weight.detach().float().numpy().astype(BF16)
    np.testing.assert_array_equal(Embedding(table, 40 ** 0.5)(ids), want)
    np.testing.assert_array_equal(Embedding(table.astype(np.float32), 40 ** 0.5)(ids),
                                  table[ids].astype(np.float32) * np.float32(40 ** 0.5))
