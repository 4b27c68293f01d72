"""Text <-> token ids, streaming detokenization and chat templates.

A thin layer over the `tokenizers` library (the Rust BPE engine), built either from a Hugging Face
`tokenizer.json` or from the vocabulary a GGUF file carries in its metadata:

    tok = Tokenizer.from_gguf(gguf_file.metadata)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt, add_special_tokens=False)            # list[int], each in [0, V)
    stream = tok.stream()
    for i in generated_ids: print(stream.add(i), end="")         # only complete characters
    print(stream.flush())

GGUF vocabularies (llama.cpp's `tokenizer.ggml.*` keys) come in two kinds we rebuild exactly:
  "gpt2"  byte-level BPE: tokens spelled in GPT-2's byte alphabet, ranked merges "a b", and a
          pre-tokenizer (regex splits) chosen by `tokenizer.ggml.pre`;
  "llama" SentencePiece BPE: tokens with scores, "\u2581" for a space, <0x00>..<0xFF> byte-fallback
          tokens; the merges are implied by the scores (any two adjacent pieces whose concatenation
          is a token may merge, the best-scoring concatenation first).
Text after a control or user-defined token gets the SentencePiece space prefix again, as llama.cpp
and the original Llama tokenizer.json do.

Chat templates are Jinja2 run only inside jinja2.sandbox.ImmutableSandboxedEnvironment; reaching
for an unsafe attribute raises jinja2.exceptions.SecurityError at once.
"""
from __future__ import annotations

import json
import os
import warnings
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
import tokenizers
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

__all__ = ["Tokenizer", "StreamDecoder", "UnsupportedTokenizerError"]


class UnsupportedTokenizerError(ValueError, NotImplementedError):
    """A well-formed vocabulary of a kind this module does not implement (e.g. GGUF "bert", "t5")."""


# llama.cpp token types (tokenizer.ggml.token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a chat turn. They join eos_ids only when the vocabulary marks them as control
# (special) tokens or generation_config lists them, so a plain-text "</s>" never stops generation.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>",
                "<|endoftext|>", "<|end|>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "</s>")

_SPACE = "\u2581"  # SentencePiece's visible space
_MAX_TEMPLATE_CHARS = 1 << 20

# ---------------------------------------------------------------------------------------------
# Pre-tokenizer regexes of byte-level BPE vocabularies, by `tokenizer.ggml.pre`.
# Each entry is applied in order, every match isolated into its own piece (llama.cpp's
# unicode_regex_split; a tokenizer.json's Sequence of Split(..., "isolated")).
# ---------------------------------------------------------------------------------------------
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_RE_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
              r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
             r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
             r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
              r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_DEEPSEEK_V3 = [
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]
_RE_DEEPSEEK_CODER = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+",
                      "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}"]
_RE_DEEPSEEK_LLM = [
    r"[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+",
    r"\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}+",
]
_RE_FALCON = [r"[\p{P}\$\+<=>\^~\|`]+", _RE_GPT2, r"[0-9][0-9][0-9]"]
_RE_BLOOM = [r" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"]

# name -> (regexes, ignore_merges, add_bos default). ignore_merges: a piece that is itself a token
# is taken whole before any merge (Llama 3's tokenizer.json sets it; llama.cpp does the same).
_PRE_TOKENIZERS: dict[str, tuple[list[str], bool, bool]] = {}


def _register(names: Iterable[str], regexes: list[str], ignore_merges: bool = False,
              add_bos: bool = False) -> None:
    for name in names:
        _PRE_TOKENIZERS[name] = (regexes, ignore_merges, add_bos)


_register(["default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de",
           "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code", "roberta-bpe", "gigachat",
           "trillion", "granite-docling", "exaone4", "mellum", "a.x-4.0"], [_RE_GPT2])
_register(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
           "lfm2"], [_RE_LLAMA3], ignore_merges=True, add_bos=True)
_register(["dbrx", "smaug-bpe", "chatglm-bpe", "glm4"], [_RE_LLAMA3])
_register(["qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan", "grok-2"],
          [_RE_QWEN2])
_register(["qwen35"], [_RE_QWEN35])
# Digits one by one, then GPT-2 (StarCoder's tokenizer.json: Digits(individual) + ByteLevel).
_register(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
          [r"\p{N}", _RE_GPT2])
_register(["gpt-4o", "llama4", "minimax-m2"], [_RE_GPT4O])
_register(["tekken"], [_RE_TEKKEN], ignore_merges=True, add_bos=True)
_register(["deepseek-v3", "hunyuan-dense"], _RE_DEEPSEEK_V3)
_register(["deepseek-coder"], _RE_DEEPSEEK_CODER)
_register(["deepseek-llm"], _RE_DEEPSEEK_LLM)
_register(["falcon"], _RE_FALCON)
_register(["poro-chat", "bloom", "gpt3-finnish"], _RE_BLOOM)
_register(["viking"], _RE_BLOOM + [r"\p{N}"])


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the
    other 68 bytes take the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# ---------------------------------------------------------------------------------------------
# Reading and checking GGUF metadata
# ---------------------------------------------------------------------------------------------
def _key_error(key: str, message: str) -> ValueError:
    return ValueError(f"{key}: {message}")


def _meta_strings(md: Mapping[str, Any], key: str, required: bool = True) -> list[str] | None:
    value = md.get(key)
    if value is None:
        if required:
            raise _key_error(key, "missing from the model metadata")
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
        raise _key_error(key, f"expected an array of strings, got {type(value).__name__}")
    out = list(value)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise _key_error(key, f"element {i} is {type(s).__name__}, expected str")
    return out


def _meta_numbers(md: Mapping[str, Any], key: str, n: int, kind: str) -> np.ndarray | None:
    """A numeric array (list or np.ndarray) of length n, as int64 (kind "i") or float64 ("f")."""
    value = md.get(key)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
        raise _key_error(key, f"expected a numeric array, got {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise _key_error(key, f"not a numeric array ({e})") from None
    if arr.ndim != 1:
        raise _key_error(key, f"expected a 1-D array, got shape {arr.shape}")
    if len(arr) != n:
        raise _key_error(key, f"has {len(arr)} entries but tokenizer.ggml.tokens has {n}")
    if kind == "i":
        if n and arr.dtype.kind not in "iu":
            raise _key_error(key, f"expected integers, got dtype {arr.dtype}")
        return arr.astype(np.int64)
    if n and arr.dtype.kind not in "iuf":
        raise _key_error(key, f"expected numbers, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise _key_error(key, "contains NaN or infinity")
    return out


def _meta_id(md: Mapping[str, Any], key: str, n: int) -> int | None:
    value = md.get(key)
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _key_error(key, f"expected a token id, got {type(value).__name__}")
    if not 0 <= int(value) < n:
        raise _key_error(key, f"token id {int(value)} is outside the vocabulary [0, {n})")
    return int(value)


def _meta_bool(md: Mapping[str, Any], key: str, default: bool) -> bool:
    value = md.get(key)
    if value is None:
        return default
    if not isinstance(value, (bool, np.bool_)):
        raise _key_error(key, f"expected a bool, got {type(value).__name__}")
    return bool(value)


def _meta_str(md: Mapping[str, Any], key: str) -> str | None:
    value = md.get(key)
    if value is not None and not isinstance(value, str):
        raise _key_error(key, f"expected a string, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# Building a tokenizers.Tokenizer from a GGUF vocabulary
# ---------------------------------------------------------------------------------------------
def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):  # a token appears twice: name the first repeat
        seen: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in seen:
                raise _key_error("tokenizer.ggml.tokens",
                                 f"token {t!r} appears twice (ids {seen[t]} and {i})")
            seen[t] = i
    return vocab


def _add_special(backend: tokenizers.Tokenizer, tokens: list[str], types: np.ndarray | None,
                 named: Iterable[int | None]) -> None:
    """Registers control (and unknown) tokens as special added tokens and user-defined ones as
    plain added tokens, so both are matched whole in the raw text and never split. A file without
    token types gets its named ids (bos, eos, ...) registered as special instead."""
    if types is None:
        special_ids = sorted({i for i in named if i is not None})
        user_ids: list[int] = []
    else:
        special_ids = np.flatnonzero(np.isin(types, (_CONTROL, _UNKNOWN))).tolist()
        user_ids = np.flatnonzero(types == _USER_DEFINED).tolist()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i in special_ids]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i in user_ids]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def _byte_level_backend(md: Mapping[str, Any], tokens: list[str], types: np.ndarray | None,
                        named: Iterable[int | None]) -> tuple[tokenizers.Tokenizer, bool]:
    """tokenizer.ggml.model == "gpt2". Returns the backend and the add-BOS default of its pre."""
    merges_raw = _meta_strings(md, "tokenizer.ggml.merges")
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())

    # Ordinary tokens are stored in the byte alphabet. A control / user-defined token keeps its raw
    # text (it is matched in the raw input); any other token outside the alphabet is respelled so
    # the BPE model can reach it.
    spelled = []
    for i, t in enumerate(tokens):
        raw_ok = types is not None and types[i] in (_CONTROL, _USER_DEFINED, _UNKNOWN)
        if raw_ok or set(t) <= alphabet:
            spelled.append(t)
        else:
            spelled.append("".join(spelling[b] for b in t.encode("utf-8")))
    vocab = _vocab_dict(spelled)

    merges = []
    for i, m in enumerate(merges_raw):
        cut = m.find(" ", 1)  # a merge's left part may itself start with a space
        if cut < 0:
            raise _key_error("tokenizer.ggml.merges", f"entry {i} {m!r} has no space separator")
        a, b = m[:cut], m[cut + 1:]
        for part in (a, b, a + b):
            if part not in vocab:
                raise _key_error("tokenizer.ggml.merges",
                                 f"entry {i} {m!r}: {part!r} is not in tokenizer.ggml.tokens")
        merges.append((a, b))

    pre_name = _meta_str(md, "tokenizer.ggml.pre") or "default"
    if pre_name not in _PRE_TOKENIZERS:
        warnings.warn(f"tokenizer.ggml.pre {pre_name!r} is not known; splitting text with the "
                      "GPT-2 pattern, which may tokenize differently from the model's own "
                      "tokenizer", stacklevel=3)
        pre_name = "gpt2"
    regexes, ignore_merges, add_bos_default = _PRE_TOKENIZERS[pre_name]

    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                              byte_fallback=False, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    _add_special(backend, spelled, types, named)
    return backend, add_bos_default


def _sentencepiece_merges(tokens: list[str], scores: np.ndarray, types: np.ndarray | None,
                          vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges two adjacent pieces whenever their concatenation is a piece, the
    highest-scoring concatenation first. As ranked merges: every split of every mergeable piece
    into two pieces, ordered by the merged piece's score, best first. Different pieces with equal
    scores rank by id here, where SentencePiece takes the leftmost pair; vocabularies trained as
    BPE give every piece its own score, so this only matters for hand-made ones."""
    mergeable = (np.ones(len(tokens), bool) if types is None
                 else np.isin(types, (_NORMAL, _USER_DEFINED)))
    # the pieces in rank order (score descending, then id): their splits come out ranked
    order = np.lexsort((np.arange(len(tokens)), -np.asarray(scores, np.float64)))
    merges = []
    for i in order[mergeable[order]].tolist():
        t = tokens[i]
        for cut in range(1, len(t)):
            a = t[:cut]
            if a in vocab:
                b = t[cut:]
                if b in vocab:
                    merges.append((a, b))
    return merges


def _sentencepiece_backend(md: Mapping[str, Any], tokens: list[str], types: np.ndarray | None,
                           unk_id: int | None, named: Iterable[int | None]) -> tokenizers.Tokenizer:
    """tokenizer.ggml.model == "llama": SentencePiece BPE with byte fallback."""
    scores = _meta_numbers(md, "tokenizer.ggml.scores", len(tokens), "f")
    if scores is None:
        raise _key_error("tokenizer.ggml.scores",
                         "missing; a SentencePiece vocabulary needs scores to rank its merges")
    vocab = _vocab_dict(tokens)
    merges = _sentencepiece_merges(tokens, scores, types, vocab)
    byte_fallback = all(f"<0x{b:02X}>" in vocab for b in range(256))
    if unk_id is None and "<unk>" in vocab:  # llama.cpp's default for SentencePiece
        unk_id = vocab["<unk>"]
    unk = tokens[unk_id] if unk_id is not None else None
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                                              fuse_unk=True, byte_fallback=byte_fallback))
    prefix = _meta_bool(md, "tokenizer.ggml.add_space_prefix", True)
    # The prefix is prepended to every stretch of text between added tokens (llama.cpp's rule),
    # and a leading space in the text is kept: " hi" -> "\u2581\u2581hi" as in SentencePiece.
    steps = ([normalizers.Prepend(_SPACE)] if prefix else []) + [normalizers.Replace(" ", _SPACE)]
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    _add_special(backend, tokens, types, named)
    return backend


# ---------------------------------------------------------------------------------------------
# Streaming detokenization
# ---------------------------------------------------------------------------------------------
class StreamDecoder:
    """Turns generated ids into text as it becomes final.

    Decoding one token at a time is wrong twice over: a character may span several byte tokens
    (byte-level BPE, SentencePiece <0xNN> fallback), and SentencePiece drops the leading space of
    the first token decoded. So ids accumulate, and each step decodes a window that starts a few
    tokens back (`prefix`): new text = decode(ids[prefix:]) minus decode(ids[prefix:read]). Text
    that ends in U+FFFD is an unfinished character and is held back until it completes.

    For text that is valid UTF-8 the pieces join to exactly decode(all ids). For invalid byte
    sequences a SentencePiece decode of everything turns a whole run of byte tokens into U+FFFD,
    while the stream keeps the valid bytes it already emitted.
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0    # ids before this have been emitted

    def _emit(self, final: bool) -> str:
        window = self._tok.decode(self._ids[self._prefix:], self._skip)
        done = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        if len(window) <= len(done) or (window.endswith("\ufffd") and not final):
            return ""
        # A decoder's output for a longer window extends that of a shorter one; if it ever did
        # not, the new characters are still those past the length already emitted.
        text = window[len(done):]
        self._prefix, self._read = self._read, len(self._ids)
        return text

    def add(self, token_id: int) -> str:
        """Appends one id; returns the text that became final (may be "")."""
        self._tok._check_ids([token_id])
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Text still held back (an unfinished character decodes to U+FFFD here)."""
        text = self._emit(final=True)
        self._ids, self._prefix, self._read = [], 0, 0
        return text


# ---------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------
class _ChatSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, except that touching an unsafe attribute (``''.__class__``,
    ``cycler.__init__``, ``list.append``) raises SecurityError right away instead of yielding an
    undefined value that would render as an empty string."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"chat template: access to attribute {attribute!r} of a "
                            f"{type(obj).__name__!r} object is not allowed")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; for
    inference it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attribute names."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat template: namespace attribute {name!r} is not allowed")


def _raise_exception(message: Any) -> None:
    raise ValueError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and '; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _make_dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


def _plain(value: Any) -> Any:
    """Template inputs rebuilt from plain JSON-like types, so no object with methods the sandbox
    does not know about (arrays, custom classes) reaches the template; others become "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _compile_template(source: str) -> jinja2.Template:
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True,
                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _make_dict
    return env.from_string(source)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def _config_token(config: Mapping[str, Any], key: str) -> str | None:
    """tokenizer_config.json writes a token as "text" or {"content": "text", ...}."""
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("content")
    if not isinstance(value, str):
        raise _key_error(f"tokenizer_config.{key}",
                         f"expected a string or {{'content': str}}, got {config.get(key)!r}")
    return value


def _config_template(config: Mapping[str, Any]) -> str | None:
    """chat_template is a string, or a list of {"name", "template"} of which "default" is used."""
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {d.get("name"): d.get("template") for d in value if isinstance(d, Mapping)}
        chosen = named.get("default")
        if isinstance(chosen, str):
            return chosen
        raise _key_error("tokenizer_config.chat_template",
                         f"a list of templates without a 'default' one (names: {sorted(map(str, named))})")
    raise _key_error("tokenizer_config.chat_template",
                     f"expected a string or a list of named templates, got {type(value).__name__}")


def _int_list(value: Any, key: str) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise _key_error(key, f"expected a token id or a list of ids, got {value!r}")
    return [int(v) for v in items]


class Tokenizer:
    """Encodes text to ids and back, streams detokenized text, renders chat templates.

    Attributes: vocab_size (V: ids are in [0, V)), bos_id, eos_ids (every id that ends a
    generation: eos, the chat end-of-turn token, generation_config's eos list), chat_template,
    bos_token / eos_token (their text, as the chat template sees them).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None, eos_ids: list[int],
                 chat_template: str | None, add_bos: bool | None, add_eos: bool | None,
                 eos_id: int | None = None, extra_template_tokens: Mapping[str, str] | None = None):
        """Prefer from_gguf / from_hf. add_bos / add_eos None: the backend's post-processor decides
        what encode(..., add_special_tokens=True) adds; a bool: exactly that is added."""
        self._backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_ids = list(dict.fromkeys(eos_ids))
        self.chat_template = chat_template
        self._add_bos = add_bos
        self._add_eos = add_eos
        self._eos_id = eos_id if eos_id is not None else (self.eos_ids[0] if self.eos_ids else None)
        self.bos_token = backend.id_to_token(bos_id) if bos_id is not None else None
        self.eos_token = backend.id_to_token(self._eos_id) if self._eos_id is not None else None
        self._template_tokens = {k: v for k, v in (extra_template_tokens or {}).items() if v}
        self._compiled: jinja2.Template | None = None
        if add_bos and bos_id is None:
            raise ValueError("add_bos_token is set but the vocabulary has no BOS token id")
        if add_eos and self._eos_id is None:
            raise ValueError("add_eos_token is set but the vocabulary has no EOS token id")

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> "Tokenizer":
        """From a GGUF file's metadata dict (numeric arrays as lists or np.ndarray)."""
        md = metadata
        model = _meta_str(md, "tokenizer.ggml.model")
        if model is None:
            raise _key_error("tokenizer.ggml.model", "missing; the file carries no tokenizer")
        if model not in ("gpt2", "llama"):
            raise UnsupportedTokenizerError(
                f"tokenizer.ggml.model: {model!r} vocabularies are not supported "
                "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)")
        tokens = _meta_strings(md, "tokenizer.ggml.tokens")
        n = len(tokens)
        if n == 0:
            raise _key_error("tokenizer.ggml.tokens", "is empty")
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # llama.cpp's naming
        types = _meta_numbers(md, "tokenizer.ggml.token_type", n, "i")
        ids = {k: _meta_id(md, f"tokenizer.ggml.{k}_token_id", n)
               for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}

        if model == "gpt2":
            backend, add_bos_default = _byte_level_backend(md, tokens, types, ids.values())
        else:
            backend = _sentencepiece_backend(md, tokens, types, ids["unknown"], ids.values())
            add_bos_default = True
        add_bos = _meta_bool(md, "tokenizer.ggml.add_bos_token", add_bos_default)
        add_eos = _meta_bool(md, "tokenizer.ggml.add_eos_token", False)
        for flag, which in ((add_bos, "bos"), (add_eos, "eos")):
            if flag and ids[which] is None:
                raise _key_error(f"tokenizer.ggml.{which}_token_id",
                                 f"missing while tokenizer.ggml.add_{which}_token is true")

        def is_control(i: int) -> bool:
            return types is None or types[i] == _CONTROL

        eos_ids = [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]
        eos_ids += [i for i, t in enumerate(tokens) if t in _END_OF_TURN and is_control(i)]
        template = _meta_str(md, "tokenizer.chat_template")
        names = {"unk_token": ids["unknown"], "pad_token": ids["padding"]}
        return cls(backend, bos_id=ids["bos"], eos_ids=eos_ids, chat_template=template,
                   add_bos=add_bos, add_eos=add_eos, eos_id=ids["eos"],
                   extra_template_tokens={k: tokens[v] for k, v in names.items() if v is not None})

    @classmethod
    def from_hf(cls, tokenizer_json: str | os.PathLike, tokenizer_config: Mapping | None = None,
                generation_config: Mapping | None = None) -> "Tokenizer":
        """From a Hugging Face tokenizer.json path and the parsed tokenizer_config.json and
        generation_config.json (either may be None). A chat_template.jinja beside tokenizer.json
        is used when tokenizer_config has no chat_template."""
        path = os.fspath(tokenizer_json)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        cfg = dict(tokenizer_config or {})
        gen = dict(generation_config or {})
        n = backend.get_vocab_size(with_added_tokens=True)

        def token_id(key: str) -> int | None:
            text = _config_token(cfg, key)
            if text is None:
                return None
            i = backend.token_to_id(text)
            if i is None:
                raise _key_error(f"tokenizer_config.{key}", f"{text!r} is not in the vocabulary")
            return i

        def check(ids: list[int], key: str) -> list[int]:
            for i in ids:
                if not 0 <= i < n:
                    raise _key_error(key, f"token id {i} is outside the vocabulary [0, {n})")
            return ids

        bos_id = token_id("bos_token")
        if bos_id is None and gen.get("bos_token_id") is not None:
            bos_id = check(_int_list(gen["bos_token_id"], "generation_config.bos_token_id"),
                           "generation_config.bos_token_id")[0]
        eos_id = token_id("eos_token")
        gen_eos = []
        if gen.get("eos_token_id") is not None:
            gen_eos = check(_int_list(gen["eos_token_id"], "generation_config.eos_token_id"),
                            "generation_config.eos_token_id")
        special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        turn = [backend.token_to_id(t) for t in _END_OF_TURN if t in special]
        eos_ids = ([eos_id] if eos_id is not None else []) + gen_eos + turn

        template = _config_template(cfg)
        if template is None:
            side = os.path.join(os.path.dirname(os.path.abspath(path)), "chat_template.jinja")
            if os.path.isfile(side):
                if os.path.getsize(side) > _MAX_TEMPLATE_CHARS:
                    raise ValueError(f"{side}: larger than {_MAX_TEMPLATE_CHARS} bytes")
                with open(side, encoding="utf-8") as f:
                    template = f.read()
        add_bos = cfg.get("add_bos_token")
        add_eos = cfg.get("add_eos_token")
        for key, v in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
            if v is not None and not isinstance(v, bool):
                raise _key_error(f"tokenizer_config.{key}", f"expected a bool, got {v!r}")
        if add_bos is not None or add_eos is not None:  # explicit flags replace the post-processor
            add_bos, add_eos = bool(add_bos), bool(add_eos)
        extra = {k: _config_token(cfg, k) for k in ("unk_token", "pad_token")}
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, chat_template=template,
                   add_bos=add_bos, add_eos=add_eos, eos_id=eos_id,
                   extra_template_tokens={k: v for k, v in extra.items() if v is not None})

    # --- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text ("<|im_start|>") are parsed as
        such; add_special_tokens adds the model's BOS/EOS where its configuration asks for them."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be str, got {type(text).__name__}")
        if self._add_bos is None and self._add_eos is None:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self._add_bos:
                ids = [self.bos_id] + ids
            if self._add_eos:
                ids = ids + [self._eos_id]
        return ids

    def _check_ids(self, ids: Sequence[int]) -> None:
        for i in ids:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"decode: token ids must be integers, got {type(i).__name__}")
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"decode: token id {int(i)} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list, tuple or 1-D integer array); special tokens omitted by default."""
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
                raise ValueError(f"decode: ids must be a 1-D integer array, got dtype {ids.dtype} "
                                 f"with shape {ids.shape}")
            ids = ids.tolist()
        ids = list(ids)
        self._check_ids(ids)
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A StreamDecoder for ids generated one at a time."""
        return StreamDecoder(self, skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of one id, as stored (byte-alphabet or "\u2581" spelling)."""
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # --- chat ---------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The conversation rendered as the model's prompt text (feed it to
        encode(..., add_special_tokens=False): the template writes BOS itself where it wants one).

        messages: [{"role": "system"|"user"|"assistant"|..., "content": str, ...}]. Extra keyword
        arguments (tools=..., documents=..., enable_thinking=...) reach the template as variables.
        Raises ValueError when the model has no template or the template calls raise_exception,
        jinja2.exceptions.SecurityError when it reaches for anything outside plain data.
        """
        if self.chat_template is None:
            raise ValueError("this model has no chat template (no tokenizer.chat_template / "
                             "tokenizer_config.chat_template); format the prompt yourself")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping)
                                                              for m in messages):
            raise TypeError("apply_chat_template: messages must be a list of dicts")
        if self._compiled is None:
            try:
                self._compiled = _compile_template(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"chat template does not parse: {e.message} "
                                 f"(template line {e.lineno})") from None
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     **self._template_tokens, "tools": None, "documents": None}
        variables.update(_plain(kwargs))
        variables["messages"] = _plain(messages)
        variables["add_generation_prompt"] = bool(add_generation_prompt)
        return self._compiled.render(**variables)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, chat_template={'yes' if self.chat_template else 'no'})")

    # --- saving -------------------------------------------------------------------------------
    def to_json(self) -> str:
        """This tokenizer as one JSON document: the `tokenizers` backend (its tokenizer.json
        object) and what the backend does not hold (BOS / EOS ids, chat template, add-BOS / EOS
        flags, template token texts). `from_saved` rebuilds an equal tokenizer from it."""
        return json.dumps({"quanta_tokenizer": 1, "backend": json.loads(self._backend.to_str()),
                           "bos_id": self.bos_id, "eos_id": self._eos_id, "eos_ids": self.eos_ids,
                           "chat_template": self.chat_template, "add_bos": self._add_bos,
                           "add_eos": self._add_eos, "template_tokens": self._template_tokens},
                          ensure_ascii=False)

    @classmethod
    def from_saved(cls, text: str) -> "Tokenizer":
        """The tokenizer that `to_json` wrote. Raises ValueError naming the field that is wrong."""
        if not isinstance(text, str):
            raise TypeError(f"from_saved: expected the str to_json wrote, got {type(text).__name__}")
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ValueError(f"saved tokenizer: invalid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("quanta_tokenizer") != 1:
            raise ValueError("saved tokenizer: not a document written by Tokenizer.to_json (version 1)")
        if not isinstance(d.get("backend"), dict):
            raise _key_error("saved tokenizer.backend", "missing or not an object")
        try:
            backend = tokenizers.Tokenizer.from_str(json.dumps(d["backend"]))
        except Exception as e:  # the Rust side raises a bare Exception for a malformed tokenizer
            raise _key_error("saved tokenizer.backend", f"not a valid tokenizer.json ({e})") from None
        n = backend.get_vocab_size(with_added_tokens=True)

        def token_id(key: str, value: Any) -> int | None:
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
                raise _key_error(f"saved tokenizer.{key}", f"expected a token id in [0, {n}), got {value!r}")
            return value

        eos_ids = d.get("eos_ids")
        if not isinstance(eos_ids, list):
            raise _key_error("saved tokenizer.eos_ids", f"expected a list of token ids, got {eos_ids!r}")
        eos_ids = [token_id("eos_ids", i) for i in eos_ids]
        template = d.get("chat_template")
        if template is not None and (not isinstance(template, str) or len(template) > _MAX_TEMPLATE_CHARS):
            raise _key_error("saved tokenizer.chat_template", f"expected null or a str of at most "
                             f"{_MAX_TEMPLATE_CHARS} characters")
        flags = {}
        for key in ("add_bos", "add_eos"):
            v = d.get(key)
            if v is not None and not isinstance(v, bool):
                raise _key_error(f"saved tokenizer.{key}", f"expected null or a bool, got {v!r}")
            flags[key] = v
        extra = d.get("template_tokens") or {}
        if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in extra.items()):
            raise _key_error("saved tokenizer.template_tokens", "expected an object of strings")
        return cls(backend, bos_id=token_id("bos_id", d.get("bos_id")), eos_ids=eos_ids,
                   chat_template=template, eos_id=token_id("eos_id", d.get("eos_id")),
                   extra_template_tokens=extra, **flags)
