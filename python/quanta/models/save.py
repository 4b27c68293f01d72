"""quanta model files: a re-quantized model in one .safetensors file that `quanta.load` reads back.

    save_model("model.gguf", "model-q4_k.safetensors", "q4_k")
    model = quanta.models.load("model-q4_k.safetensors")    # the same bytes, no re-quantizing

Layout (plain safetensors; every metadata value is a str):
  tensors   canonical names (see weights.py). A QuantizedTensor W[N, K] is stored as its arrays
            "<name>.codes", "<name>.scales" and, where its format has them, ".offsets",
            ".supers", ".super_mins" (panel layout, dtypes as Format.array_specs); float tensors
            (norms, biases, routers, float matrices) as they are.
  metadata  "quanta.file_format"  "1"
            "quanta.version"      the quanta version that wrote the file
            "quanta.config"       ModelConfig.to_dict() as JSON
            "quanta.formats"      JSON {name: format}: a preset name ("q4_k"), or for any other
                                  point of the format space a JSON object of the Format fields
            "quanta.shapes"       JSON {name: [N, K]} for the quantized tensors
            "quanta.tokenizer"    Tokenizer.to_json() (absent when the source has no tokenizer)
A tied embedding is stored once, as "embed". Reading maps the file and checks every field
(formats, array shapes and dtypes, config) before the decoder is built.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Dict, Optional, Tuple

import numpy as np

from .. import formats
from ..formats import Format, QuantizedTensor
from .build import _progress
from .config import ConfigError, ModelConfig
from .weights import GGUFBlocks, prepare_matrix, prepare_vector, quant_rule

FILE_FORMAT = "1"
_ARRAYS = ("codes", "scales", "offsets", "supers", "super_mins")
# canonical names (last component) the decoder reads as float32 vectors
_VECTORS = {"attn_norm", "ffn_norm", "norm", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm", "router",
            "shared_gate", "post_attn_norm", "post_ffn_norm"}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_MAX_DIM = 1 << 31

__all__ = ["save_model", "SaveReport", "read_model_file", "format_to_str", "format_from_str"]


# ---- formats as strings ---------------------------------------------------------------------

def format_to_str(fmt: Format) -> str:
    """A preset's name, or the Format's fields as a JSON object for any other point."""
    if fmt.name in formats.PRESETS and formats.PRESETS[fmt.name] == fmt:
        return fmt.name
    d = dataclasses.asdict(fmt)
    if d["lut"] is not None:
        d["lut"] = list(d["lut"])
    return json.dumps(d)


def format_from_str(s: str) -> Format:
    """The Format `format_to_str` wrote. Raises ValueError for an unknown or invalid format."""
    if not isinstance(s, str):
        raise ValueError(f"a format must be a str, got {type(s).__name__}")
    if not s.startswith("{"):
        return formats.get(s)
    try:
        d = json.loads(s)
    except ValueError as e:
        raise ValueError(f"format {s[:80]!r} is not valid JSON ({e})") from None
    fields = {f.name for f in dataclasses.fields(Format)}
    if not isinstance(d, dict) or not set(d) <= fields or "bits" not in d:
        raise ValueError(f"format {s[:80]!r}: expected an object with the fields of quanta.formats.Format "
                         f"({', '.join(sorted(fields))})")
    if d.get("lut") is not None:
        if not isinstance(d["lut"], list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in d["lut"]):
            raise ValueError(f"format {s[:80]!r}: lut must be a list of numbers")
        d["lut"] = tuple(float(v) for v in d["lut"])
    try:
        return Format(**d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"format {s[:80]!r}: {e}") from None


# ---- saving -----------------------------------------------------------------------------------

@dataclasses.dataclass
class SaveReport:
    """What save_model wrote: per format (a preset name, "float32", ...) the number of tensors,
    weights and bytes; the source's and the file's tensor bytes; seconds taken."""
    path: str
    rows: Dict[str, Tuple[int, int, int]]     # format -> (tensors, weights, bytes)
    bytes_before: int
    bytes_after: int
    file_bytes: int
    seconds: float

    def table(self) -> str:
        """The summary as a text table."""
        lines = [f"{'format':<16} {'tensors':>8} {'weights':>14} {'bytes':>14} {'bits/weight':>12}"]
        for name, (n, w, b) in sorted(self.rows.items(), key=lambda kv: -kv[1][2]):
            lines.append(f"{name:<16} {n:>8} {w:>14,} {b:>14,} {8 * b / max(w, 1):>12.3f}")
        tn = sum(r[0] for r in self.rows.values())
        tw = sum(r[1] for r in self.rows.values())
        lines.append(f"{'total':<16} {tn:>8} {tw:>14,} {self.bytes_after:>14,} "
                     f"{8 * self.bytes_after / max(tw, 1):>12.3f}")
        ratio = self.bytes_after / max(self.bytes_before, 1)
        lines.append(f"tensor bytes {_human(self.bytes_before)} -> {_human(self.bytes_after)} "
                     f"({ratio:.2f}x); file {_human(self.file_bytes)}; {self.seconds:.1f} s")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _source_nbytes(w) -> int:
    if isinstance(w, GGUFBlocks):
        return int(w.data.nbytes)
    return int(w.nbytes)


def _plain(v):
    """NumPy scalars and arrays in a config (read from GGUF metadata) as JSON values."""
    if isinstance(v, (np.generic, np.ndarray)):
        return v.tolist()
    raise TypeError(f"config value {v!r} of type {type(v).__name__} cannot be saved as JSON")


def _is_vector(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in _VECTORS


def _order(name: str):
    """Layer tensors in layer order, then embed / norm / lm_head."""
    head, _, rest = name.partition(".")
    return (0, int(head), rest) if head.isdigit() else (1, 0, name)


def save_model(src: Optional[str], dst: str, quant, progress: bool = True, source=None) -> SaveReport:
    """Converts a model (src: a GGUF file, a Hugging Face folder, a quanta file, or None for the
    default model) with `quant` (as in `load`: a format name, "float16", a Format, or a dict of
    patterns on canonical names) and writes one .safetensors file that `load(dst)` rebuilds
    into the model `load(src, quant=quant)` gives, byte for byte. Returns a SaveReport.
    source: (config, canonical tensors, tokenizer) to write instead of reading src (tensors
    may already be QuantizedTensors, e.g. from quanta.research).
    """
    from .. import __version__
    from ..io.safetensors import save_safetensors
    from . import read_source

    dst = os.fspath(dst)
    if not dst.endswith(".safetensors"):
        raise ValueError(f"save_model: the destination must be a .safetensors file, got {dst!r}")
    t0 = time.perf_counter()
    rule = quant_rule(quant)  # bad format names fail before the source is read
    cfg, tensors, tok = read_source(src) if source is None else source
    if "embed" not in tensors:
        raise ValueError(f"{src}: model file has no tensor for 'embed' (architecture {cfg.arch})")

    prepared: Dict[str, object] = {}
    before = 0
    bar = _progress(len(tensors), progress)
    for name in sorted(tensors, key=_order):
        w = tensors[name]
        before += _source_nbytes(w)
        if name in ("embed", "lm_head"):
            continue
        if _is_vector(name):
            prepared[name] = prepare_vector(name, w).reshape(tuple(w.shape))
        else:
            prepared[name] = prepare_matrix(name, w, rule(name))
        if bar is not None:
            bar.update(1)
    # embed and lm_head exactly as build_decoder prepares them; a shared table is stored once
    embed_raw, head_raw = tensors["embed"], tensors.get("lm_head")
    if head_raw is None:
        cfg.tie_embeddings = True  # as build_decoder records it, also when both uses are stored
        head = prepare_matrix("lm_head", embed_raw, rule("lm_head"))
        same = rule("embed") is None or rule("embed") == rule("lm_head")
        embed = head if same else prepare_matrix("embed", embed_raw, rule("embed"))
    else:
        head = prepare_matrix("lm_head", head_raw, rule("lm_head"))
        embed = prepare_matrix("embed", embed_raw, rule("embed"))
    prepared["embed"] = embed
    if head is not embed:
        prepared["lm_head"] = head
    if bar is not None:
        bar.update(len(tensors) - bar.n)
        bar.close()

    arrays: Dict[str, np.ndarray] = {}
    fmts: Dict[str, str] = {}
    shapes: Dict[str, list] = {}
    rows: Dict[str, list] = {}
    for name, w in prepared.items():
        if isinstance(w, QuantizedTensor):
            fmts[name] = format_to_str(w.format)
            label = str(w.format)
            shapes[name] = list(w.shape)
            for a, arr in zip(_ARRAYS, w.arrays):
                if arr is not None:
                    arrays[f"{name}.{a}"] = arr
            n, nbytes = w.shape[0] * w.shape[1], w.nbytes
        else:
            arr = np.asarray(w)
            label = str(arr.dtype)
            arrays[name] = arr
            n, nbytes = arr.size, arr.nbytes
        r = rows.setdefault(label, [0, 0, 0])
        r[0] += 1
        r[1] += int(n)
        r[2] += int(nbytes)

    metadata = {"quanta.file_format": FILE_FORMAT, "quanta.version": __version__,
                "quanta.config": json.dumps(cfg.to_dict(), default=_plain), "quanta.formats": json.dumps(fmts),
                "quanta.shapes": json.dumps(shapes)}
    if tok is not None:
        metadata["quanta.tokenizer"] = tok.to_json()
    save_safetensors(dst, arrays, metadata)
    return SaveReport(dst, {k: tuple(v) for k, v in rows.items()}, before,
                      sum(a.nbytes for a in arrays.values()), os.path.getsize(dst), time.perf_counter() - t0)


# ---- reading ----------------------------------------------------------------------------------

def _json(path: str, md: dict, key: str, kind: type):
    from ..io.errors import ModelFileError
    from ..io.safetensors import parse_json_strict
    if key not in md:
        raise ModelFileError(path, key, None, "missing from the metadata (not a quanta model file)")
    v = parse_json_strict(md[key], path, key, None)
    if not isinstance(v, kind):
        raise ModelFileError(path, key, None, f"must hold a JSON {kind.__name__}, got {type(v).__name__}")
    return v


_INTS = ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
         "max_position", "n_experts", "top_k", "moe_intermediate_size", "shared_expert_intermediate_size")
_OPT_INTS = ("rotary_dim", "sliding_window", "bos_token_id")
_FLOATS = ("rms_eps", "rope_theta", "embed_scale")
_OPT_FLOATS = ("attn_scale", "rope_local_theta", "final_softcap")
_BOOLS = ("tie_embeddings", "qkv_bias", "norm_topk_prob", "post_norms")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _config_type_error(d: dict) -> Optional[str]:
    """What is wrong with the types of a saved config's fields, or None."""
    for k in _INTS:
        if k in d and not _is_int(d[k]):
            return f"{k} must be an int, got {d[k]!r}"
    for k in _OPT_INTS:
        if d.get(k) is not None and not _is_int(d[k]):
            return f"{k} must be an int or null, got {d[k]!r}"
    for k in _FLOATS:
        if k in d and (isinstance(d[k], bool) or not isinstance(d[k], (int, float))):
            return f"{k} must be a number, got {d[k]!r}"
    for k in _OPT_FLOATS:
        if d.get(k) is not None and (isinstance(d[k], bool) or not isinstance(d[k], (int, float))):
            return f"{k} must be a number or null, got {d[k]!r}"
    for k in _BOOLS:
        if k in d and not isinstance(d[k], bool):
            return f"{k} must be true or false, got {d[k]!r}"
    for k in ("arch", "rope_style", "mlp_act"):
        if k in d and not isinstance(d[k], str):
            return f"{k} must be a str, got {d[k]!r}"
    if d.get("qk_norm") not in (None, "head", "full"):
        return f"qk_norm must be null, 'head' or 'full', got {d['qk_norm']!r}"
    rs = d.get("rope_scaling")
    if rs is not None and not (isinstance(rs, dict) and rs.get("rope_type") in ("linear", "llama3", "yarn")):
        return f"rope_scaling must be null or an object with rope_type linear, llama3 or yarn, got {rs!r:.80}"
    lw = d.get("layer_windows", [])
    if not (isinstance(lw, list) and all(w is None or (_is_int(w) and w > 0) for w in lw)):
        return f"layer_windows must be a list of positive ints or nulls, got {str(lw)[:80]}"
    ml = d.get("moe_layers", [])
    if not (isinstance(ml, list) and all(isinstance(m, bool) for m in ml)):
        return f"moe_layers must be a list of true / false, got {str(ml)[:80]}"
    eos = d.get("eos_token_id")
    if not (eos is None or _is_int(eos) or (isinstance(eos, list) and all(_is_int(e) for e in eos))):
        return f"eos_token_id must be null, an int or a list of ints, got {str(eos)[:80]}"
    return None


def _config(path: str, d: dict) -> ModelConfig:
    from ..io.errors import ModelFileError
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    required = {f.name for f in dataclasses.fields(ModelConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown, missing = sorted(set(d) - names), sorted(required - set(d))
    if unknown or missing:
        raise ModelFileError(path, "quanta.config", None,
                             f"unknown fields {unknown}, missing fields {missing}")
    problem = _config_type_error(d)
    if problem is not None:
        raise ModelFileError(path, "quanta.config", None, problem)
    try:
        return ModelConfig(**d)
    except ConfigError as e:
        raise ModelFileError(path, "quanta.config", None, str(e)) from None


def read_model_file(path: str):
    """(ModelConfig, canonical tensors, Tokenizer or None) of a quanta model file; tensors are
    QuantizedTensors and float arrays that view the mapped file (read-only, not copied).
    Raises ModelFileError (a ValueError) naming the field that is wrong."""
    from ..io.errors import ModelFileError
    from ..io.safetensors import read_safetensors

    raw, md = read_safetensors(path)
    if "quanta.config" not in md:
        raise ModelFileError(path, "__metadata__", None, "has no quanta.config: not a quanta model file "
                             "(for a Hugging Face checkpoint, pass the folder holding config.json)")
    ff = md.get("quanta.file_format")
    if ff != FILE_FORMAT:
        raise ModelFileError(path, "quanta.file_format", None,
                             f"{ff!r} is not a file format this quanta reads (expected {FILE_FORMAT!r})")
    cfg = _config(path, _json(path, md, "quanta.config", dict))
    fmts = _json(path, md, "quanta.formats", dict)
    shapes = _json(path, md, "quanta.shapes", dict)
    if set(fmts) != set(shapes):
        odd = sorted(set(fmts) ^ set(shapes))
        raise ModelFileError(path, "quanta.shapes", None,
                             f"must name the tensors of quanta.formats; differs in {odd[:5]}")

    tensors: Dict[str, object] = {}
    taken = set()
    for name, fs in fmts.items():
        field = f"quanta.formats[{name!r}]"
        try:
            fmt = format_from_str(fs)
        except ValueError as e:
            raise ModelFileError(path, field, None, str(e)) from None
        shape = shapes[name]
        if not (isinstance(shape, list) and len(shape) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < _MAX_DIM for v in shape)):
            raise ModelFileError(path, f"quanta.shapes[{name!r}]", None,
                                 f"must be [N, K] with positive ints below {_MAX_DIM}, got {str(shape)[:80]}")
        N, K = shape
        try:
            specs = fmt.array_specs(N, K)
        except ValueError as e:
            raise ModelFileError(path, f"quanta.shapes[{name!r}]", None, str(e)) from None
        arrays = {}
        for a in _ARRAYS:
            key = f"{name}.{a}"
            spec = specs[a]
            if spec is None:
                if key in raw:
                    raise ModelFileError(path, key, None, f"format {fmt} has no {a} array")
                arrays[a] = None
                continue
            if key not in raw:
                raise ModelFileError(path, key, None, f"missing (format {fmt} of an {N}x{K} matrix needs it)")
            arr, (shp, dt) = raw[key], spec
            if arr.dtype != np.dtype(dt) or arr.shape != tuple(shp):
                raise ModelFileError(path, key, None,
                                     f"must be {np.dtype(dt)} with shape {tuple(shp)} for format {fmt} of an "
                                     f"{N}x{K} matrix, got {arr.dtype} with shape {arr.shape}")
            arrays[a] = arr
            taken.add(key)
        tensors[name] = QuantizedTensor(fmt, (N, K), **arrays)
    for key, arr in raw.items():
        if key in taken:
            continue
        if key.rsplit(".", 1)[-1] in _ARRAYS:
            raise ModelFileError(path, key, None, "a quantized array without an entry in quanta.formats")
        if arr.dtype.name not in _FLOAT_DTYPES or arr.ndim not in (1, 2) or arr.size == 0:
            raise ModelFileError(path, key, None, f"float tensors must be non-empty 1-D or 2-D float32, "
                                 f"float16 or bfloat16, got {arr.dtype} with shape {arr.shape}")
        tensors[key] = arr

    tok = None
    if "quanta.tokenizer" in md:
        from ..tokenizer import Tokenizer
        try:
            tok = Tokenizer.from_saved(md["quanta.tokenizer"])
        except (TypeError, ValueError) as e:
            raise ModelFileError(path, "quanta.tokenizer", None, str(e)) from None
    return cfg, tensors, tok
