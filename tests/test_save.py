"""quanta model files (quanta.models.save): a re-quantized model written to one .safetensors file
loads back into the same bytes (logits bit for bit), and a damaged file is rejected with a
ModelFileError naming the field."""
import json
import pickle
import warnings

import numpy as np
import pytest

import quanta
from quanta import formats
from quanta.formats import QuantizedTensor
from quanta.io import ModelFileError, read_safetensors, save_safetensors
from quanta.models import load, save_model
from quanta.models.save import format_from_str, format_to_str
from tiny_gguf import write_tiny_gguf

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matrices are too small to gain from threads, and a busy machine makes
    thread barriers slow; results do not depend on the thread count."""
    n = quanta.get_num_threads()
    quanta.set_num_threads(1)
    yield
    quanta.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    paths = {kind: d / f"{kind}.gguf" for kind in ("dense", "tied", "moe")}
    write_tiny_gguf(paths["dense"])
    write_tiny_gguf(paths["tied"], tied=True)
    write_tiny_gguf(paths["moe"], experts=4)
    return paths


def _quiet(fn, *args, **kwargs):
    """Runs fn with the per-tensor "K does not fit" warnings of the tiny model silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def _weights(model):
    """name -> QuantizedTensor or array of everything the decoder holds (for byte comparison)."""
    d = model.decoder
    out = {"embed": d.embed.weight, "lm_head": d.lm_head.weight, "norm": d.norm}
    for i, b in enumerate(d.blocks):
        for j, lin in enumerate(b.attn.linears() + (b.mlp.linears() if hasattr(b.mlp, "linears") else [])):
            out[f"{i}.linear{j}"] = lin.weight
        if getattr(b.mlp, "experts", None) is not None:
            for e in range(b.mlp.experts.E):
                for proj, qt in b.mlp.experts[e].items():
                    out[f"{i}.expert{e}.{proj}"] = qt
        out[f"{i}.attn_norm"], out[f"{i}.ffn_norm"] = b.attn_norm, b.ffn_norm
    return out


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        x, y = wa[name], wb[name]
        if isinstance(x, QuantizedTensor):
            assert isinstance(y, QuantizedTensor) and x.format == y.format and x.shape == y.shape, name
            for p, q in zip(x.arrays, y.arrays):
                assert (p is None) == (q is None), name
                if p is not None:
                    assert p.dtype == q.dtype and np.array_equal(p.view(np.uint8), q.view(np.uint8)), name
        else:
            assert x.dtype == y.dtype and np.array_equal(x, y), name


QUANTS = ["q8_0", "q4_0", "q4_1", "nf4", "int8", "float16", None,
          {"*.down": "q8_0", "lm_head": "q4_1", "embed": "float16", "*": "q4_0"},
          formats.make(bits=3, group=32, kind="asym")]


@pytest.mark.parametrize("kind", ["dense", "tied", "moe"])
@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: str(q)[:24])
def test_saved_model_equals_requantized_model(models, kind, quant, tmp_path):
    src, dst = models[kind], tmp_path / "m.safetensors"
    report = _quiet(save_model, src, dst, quant, progress=False)
    saved = load(dst)
    fresh = _quiet(load, src, quant=quant, progress=False)
    np.testing.assert_array_equal(saved.forward(PROMPT), fresh.forward(PROMPT))
    _assert_same_weights(saved, fresh)
    assert saved.config.to_dict() == fresh.config.to_dict()
    assert saved.generate(PROMPT, max_tokens=8) == fresh.generate(PROMPT, max_tokens=8)
    _, md = read_safetensors(dst)
    assert report.bytes_after == sum(a.nbytes for a in read_safetensors(dst)[0].values())
    assert sum(r[0] for r in report.rows.values()) == len(json.loads(md["quanta.formats"])) + sum(
        1 for k in read_safetensors(dst)[0] if k.rsplit(".", 1)[-1] not in
        ("codes", "scales", "offsets", "supers", "super_mins"))
    assert "total" in report.table() and f"{report.bytes_after:,}" in report.table()


def test_tied_embedding_is_stored_once(models, tmp_path):
    dst = tmp_path / "tied.safetensors"
    _quiet(save_model, models["tied"], dst, "q8_0", progress=False)
    names = json.loads(read_safetensors(dst)[1]["quanta.formats"])
    assert "embed" in names and "lm_head" not in names
    m = load(dst)
    assert m.decoder.embed.weight is m.decoder.lm_head.weight
    # different formats for the two uses of the table: both are stored
    _quiet(save_model, models["tied"], dst, {"lm_head": "q4_1", "*": "q8_0"}, progress=False)
    names = json.loads(read_safetensors(dst)[1]["quanta.formats"])
    assert names["embed"] == "q8_0" and names["lm_head"] == "q4_1"


def test_weights_are_memory_mapped(models, tmp_path):
    dst = tmp_path / "m.safetensors"
    _quiet(save_model, models["dense"], dst, "q8_0", progress=False)
    emb = load(dst).decoder.embed.weight
    assert isinstance(emb, QuantizedTensor)
    for a in (emb.codes, emb.scales):
        assert not a.flags.writeable and not a.flags.owndata


def test_tokenizer_round_trip(models, tmp_path):
    dst = tmp_path / "m.safetensors"
    _quiet(save_model, models["dense"], dst, "q8_0", progress=False)
    a, b = load(dst).tokenizer, load(models["dense"]).tokenizer
    text = "the then <|im_start|>in an\u00e9 \u4e2d 12"
    assert a.encode(text) == b.encode(text)
    ids = b.encode(text)
    assert a.decode(ids) == b.decode(ids)
    assert (a.bos_id, a.eos_ids, a.vocab_size) == (b.bos_id, b.eos_ids, b.vocab_size)
    msgs = [{"role": "user", "content": "hi"}]
    assert a.apply_chat_template(msgs) == b.apply_chat_template(msgs)


def test_resave_and_pickle(models, tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _quiet(save_model, models["dense"], first, {"*.down": "q8_0", "*": "q4_0"}, progress=False)
    save_model(first, second, None, progress=False)
    a, b = load(first), load(second)
    _assert_same_weights(a, b)
    c = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(c.forward(PROMPT), a.forward(PROMPT))
    # a quanta file re-quantized at load starts from its stored (q4_0) values
    q = _quiet(load, first, quant="q8_0", progress=False)
    w = a.decoder.lm_head.weight.dequantize()
    got = q.decoder.lm_head.weight
    want = formats.quantize(w, "q8_0")
    assert np.array_equal(got.codes, want.codes) and np.array_equal(got.scales, want.scales)


def test_format_strings():
    for name, fmt in formats.PRESETS.items():
        assert format_to_str(fmt) == name and format_from_str(name) == fmt
    custom = formats.make(bits=3, group=64, kind="asym", offset="zero", scale="bf16")
    s = format_to_str(custom)
    assert s.startswith("{") and format_from_str(s) == custom
    table = formats.make(bits=2, group=16, kind="lut", lut=[-1.5, -0.5, 0.5, 1.5])
    assert format_from_str(format_to_str(table)) == table
    with pytest.raises(ValueError, match="unknown format 'q9_9'"):
        format_from_str("q9_9")
    with pytest.raises(ValueError, match="bits must be one of"):
        format_from_str(json.dumps({"bits": 7}))
    with pytest.raises(ValueError, match="fields of quanta.formats.Format"):
        format_from_str(json.dumps({"bits": 4, "evil": 1}))
    with pytest.raises(ValueError, match="lut must be a list of numbers"):
        format_from_str(json.dumps({"bits": 2, "kind": "lut", "lut": "abcd"}))


def test_save_rejects_bad_arguments(models, tmp_path):
    with pytest.raises(ValueError, match=r"must be a \.safetensors file"):
        save_model(models["dense"], tmp_path / "m.gguf", "q8_0")
    with pytest.raises(ValueError, match="unknown format 'q9'"):
        save_model(models["dense"], tmp_path / "m.safetensors", "q9")
    with pytest.raises(FileNotFoundError, match="no such file"):
        save_model(tmp_path / "missing.gguf", tmp_path / "m.safetensors", "q8_0")
    assert not (tmp_path / "m.safetensors").exists()


# ---- damaged files ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good(models, tmp_path_factory):
    dst = tmp_path_factory.mktemp("good") / "good.safetensors"
    _quiet(save_model, models["dense"], dst, {"lm_head": "q4_1", "*": "q8_0"}, progress=False)
    tensors, md = read_safetensors(dst)
    return {k: np.array(v) for k, v in tensors.items()}, dict(md)


def _edit(md, key, fn):
    d = json.loads(md[key])
    fn(d)
    md[key] = json.dumps(d)


def _cfg(**kw):
    return lambda d: d.update(kw)


CORRUPTIONS = [
    # (what is changed, field named by the error, message part)
    ("no quanta metadata", lambda t, m: m.clear(), "__metadata__", "not a quanta model file"),
    ("newer file format", lambda t, m: m.update({"quanta.file_format": "2"}), "quanta.file_format", "'2'"),
    ("config not JSON", lambda t, m: m.update({"quanta.config": "{nope"}), "quanta.config", "invalid JSON"),
    ("config a list", lambda t, m: m.update({"quanta.config": "[]"}), "quanta.config",
     "must hold a JSON dict"),
    ("config unknown field", lambda t, m: _edit(m, "quanta.config", _cfg(evil=1)), "quanta.config", "evil"),
    ("config missing field", lambda t, m: _edit(m, "quanta.config", lambda d: d.pop("n_heads")),
     "quanta.config", "n_heads"),
    ("config wrong type", lambda t, m: _edit(m, "quanta.config", _cfg(n_layers="2")), "quanta.config",
     "n_layers must be an int"),
    ("config bad value", lambda t, m: _edit(m, "quanta.config", _cfg(n_kv_heads=3)), "quanta.config",
     "not a multiple"),
    ("config bad rope", lambda t, m: _edit(m, "quanta.config", _cfg(rope_scaling={"rope_type": "magic"})),
     "quanta.config", "rope_scaling"),
    ("duplicate JSON key", lambda t, m: m.update({"quanta.formats": '{"0.q": "q8_0", "0.q": "q8_0"}'}),
     "quanta.formats", "duplicate key"),
    ("unknown format", lambda t, m: _edit(m, "quanta.formats", lambda d: d.update({"0.q": "q9_9"})),
     "quanta.formats['0.q']", "unknown format 'q9_9'"),
    ("format without shape", lambda t, m: _edit(m, "quanta.shapes", lambda d: d.pop("0.q")),
     "quanta.shapes", "0.q"),
    ("bad shape", lambda t, m: _edit(m, "quanta.shapes", lambda d: d.update({"0.q": [64, -1]})),
     "quanta.shapes['0.q']", "positive ints"),
    ("shape disagrees with arrays",
     lambda t, m: _edit(m, "quanta.shapes", lambda d: d.update({"0.q": [80, 64]})), "0.q.codes",
     "must be uint8 with shape"),
    ("missing array", lambda t, m: t.pop("lm_head.offsets"), "lm_head.offsets", "missing"),
    ("array of the wrong dtype", lambda t, m: t.update({"0.q.scales": t["0.q.scales"].astype(np.float32)}),
     "0.q.scales", "must be float16"),
    ("array the format lacks", lambda t, m: t.update({"0.q.offsets": t["0.q.scales"]}), "0.q.offsets",
     "has no offsets"),
    ("orphan quantized array", lambda t, m: t.update({"9.q.codes": t["0.q.codes"]}), "9.q.codes",
     "without an entry"),
    ("integer float tensor", lambda t, m: t.update({"norm": t["norm"].astype(np.int32)}), "norm",
     "float tensors must be"),
    ("bad tokenizer", lambda t, m: m.update({"quanta.tokenizer": '{"quanta_tokenizer": 1}'}),
     "quanta.tokenizer", "backend"),
    ("tokenizer id out of range", lambda t, m: m.update({"quanta.tokenizer": json.dumps(
        dict(json.loads(m["quanta.tokenizer"]), bos_id=10 ** 6))}), "quanta.tokenizer", "bos_id"),
]


@pytest.mark.parametrize("what,change,field,message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_damaged_file_is_rejected(good, tmp_path, what, change, field, message):
    tensors, md = dict(good[0]), dict(good[1])
    change(tensors, md)
    path = tmp_path / "bad.safetensors"
    save_safetensors(path, tensors, md)
    with pytest.raises(ModelFileError) as info:
        load(path)
    assert info.value.field == field, str(info.value)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_plain_safetensors_file_points_to_the_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"model.embed_tokens.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(ModelFileError, match="pass the folder holding config.json"):
        load(path)
