"""FP8 checkpoints (float8_e4m3fn weights with 2-D block scales, as DeepSeek-V3 / Qwen3-FP8
publish them): loaded into quanta's fp8 format without changing a value."""
import json

import ml_dtypes
import numpy as np
import pytest

import quanta
from quanta.formats import QuantizedTensor
from quanta.io.safetensors import save_safetensors

D, F, L, H, KV, HD, V = 64, 128, 2, 4, 2, 16, 96


def _config(**extra):
    return dict(model_type="llama", hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                num_attention_heads=H, num_key_value_heads=KV, head_dim=HD, vocab_size=V, rms_norm_eps=1e-5,
                rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False, **extra)


def _fp8(w, block):
    """(float8 codes, scale_inv) with one scale per block: amax / 448."""
    bn, bk = block
    N, K = w.shape
    s = np.zeros((-(-N // bn), -(-K // bk)), np.float32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            s[i, j] = max(float(np.abs(blk).max()), 1e-8) / 448.0
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (blk / s[i, j]).astype(ml_dtypes.float8_e4m3fn)
    return q, s


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    rng = np.random.default_rng(0)
    block = (16, 32)
    fp8, ref = {}, {}
    shapes = {"self_attn.q_proj": (H * HD, D), "self_attn.k_proj": (KV * HD, D), "self_attn.v_proj": (KV * HD, D),
              "self_attn.o_proj": (D, H * HD), "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D),
              "mlp.down_proj": (D, F)}
    for name, w in (("model.embed_tokens.weight", rng.standard_normal((V, D))),
                    ("lm_head.weight", rng.standard_normal((V, D)) * 0.2), ("model.norm.weight", 1 + 0.1 * rng.standard_normal(D))):
        fp8[name] = ref[name] = w.astype(np.float32)
    for i in range(L):
        for n in ("input_layernorm", "post_attention_layernorm"):
            fp8[f"model.layers.{i}.{n}.weight"] = ref[f"model.layers.{i}.{n}.weight"] = \
                (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        for n, shape in shapes.items():
            w = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
            w[:, :8] *= 10  # a block with a much larger scale than its neighbours
            q, s = _fp8(w, block)
            fp8[f"model.layers.{i}.{n}.weight"] = q
            fp8[f"model.layers.{i}.{n}.weight_scale_inv"] = s
            sr = np.repeat(np.repeat(s, block[0], 0), block[1], 1)[:shape[0], :shape[1]]
            ref[f"model.layers.{i}.{n}.weight"] = q.astype(np.float32) * sr
    out = {}
    for tag, tensors, cfg in (("fp8", fp8, _config(quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                                      "weight_block_size": list(block)})),
                              ("ref", ref, _config())):
        d = tmp_path_factory.mktemp(tag)
        (d / "config.json").write_text(json.dumps(cfg))
        save_safetensors(str(d / "model.safetensors"), tensors)
        out[tag] = str(d)
    return out


def test_fp8_weights_load_exactly(folders):
    m = quanta.load(folders["fp8"], progress=False)
    r = quanta.load(folders["ref"], progress=False)
    q = m.decoder.blocks[0].attn.o.weight
    assert isinstance(q, QuantizedTensor) and q.format.kind == "lut" and q.format.bits == 8
    want = r.decoder.blocks[0].attn.o.weight
    np.testing.assert_array_equal(q.dequantize(), want)
    ids = np.arange(1, 40) % V
    a, b = m.forward(ids).astype(np.float64), r.forward(ids).astype(np.float64)
    assert ((a - b) ** 2).mean() / (b ** 2).mean() < 1e-10
    assert m.generate(ids.tolist(), max_tokens=8, return_tokens=True) == \
        r.generate(ids.tolist(), max_tokens=8, return_tokens=True)


def test_fp8_requantize_and_bad_scales(folders, tmp_path):
    m = quanta.load(folders["fp8"], quant="q8_0", progress=False)
    assert m.decoder.blocks[0].attn.o.weight.format.name == "q8_0"
    cfg = json.loads(open(folders["fp8"] + "/config.json").read())
    cfg["quantization_config"]["weight_block_size"] = [16, 16]  # disagrees with the stored scales
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    import shutil
    shutil.copy(folders["fp8"] + "/model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="weight_scale_inv"):
        quanta.load(str(tmp_path), progress=False)
