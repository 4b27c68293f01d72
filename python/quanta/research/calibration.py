"""Calibration: a model's float weights as canonical tensors, and statistics of the inputs of
its linear layers over calibration text.

`FloatModel.load(path)` dequantizes every tensor of a model file to float32 (for the default
model, a Q4_1 GGUF, "full precision" means these dequantized weights) and builds quanta models
from any mix of float and quantized canonical tensors. `collect(fm, batches)` runs the float
model over calibration sequences and records, at each of the four inputs of a Llama-style
block (the attention input shared by q/k/v, the o projection's input, the MLP input shared by
gate/up, the down projection's input):

    H       float64 [K, K]  sum over rows of x x^T / rows (the second moment; GPTQ's Hessian
                            is 2 H, the factor does not change its solution)
    absmax  float32 [K]     max |x| per input channel (SmoothQuant)
    sample  float32 [S, K]  S rows drawn uniformly without replacement (seeded) for checks
                            that need real activations, e.g. int8 activation rounding
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Dict, Iterable, Optional

import numpy as np

from ..formats import QuantizedTensor

# canonical linear name suffix -> the input it reads
SITES = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in",
         "down": "down_in"}
LINEARS = tuple(SITES)


def layer_linears(n_layers: int):
    """Canonical names of the block linears: 0.q, 0.k, ..., (n-1).down."""
    return [f"{i}.{s}" for i in range(n_layers) for s in LINEARS]


def site_of(name: str) -> str:
    """'3.gate' -> '3.mlp_in'."""
    i, s = name.split(".", 1)
    return f"{i}.{SITES[s]}"


@dataclasses.dataclass
class FloatModel:
    """A model as float32 canonical tensors (see quanta.models.weights) plus its config and
    tokenizer. `tensors` maps names to float32 arrays; nothing here is quantized."""

    config: object
    tensors: Dict[str, np.ndarray]
    tokenizer: object = None
    path: Optional[str] = None

    @classmethod
    def load(cls, path: Optional[str] = None, progress: bool = True) -> "FloatModel":
        """Reads a model (GGUF, HF folder, quanta file; None: the default model) and
        dequantizes every tensor to float32."""
        from ..models import read_source
        from ..models.weights import dequantize_any
        cfg, tensors, tok = read_source(path)
        if cfg.is_moe or cfg.post_norms or cfg.mlp_act != "silu":
            raise NotImplementedError(f"quanta.research works on dense Llama-style models (SwiGLU, pre-norm); "
                                      f"{cfg.arch} is not one")
        out = {name: np.ascontiguousarray(dequantize_any(w), dtype=np.float32) for name, w in
               _progress(tensors.items(), progress, "dequantizing", len(tensors))}
        return cls(cfg, out, tok, path)

    @property
    def linear_names(self):
        return layer_linears(self.config.n_layers)

    def build(self, tensors: Optional[Dict[str, object]] = None, label: Optional[str] = None):
        """A quanta Model from these tensors with `tensors` (name -> float array or
        QuantizedTensor) replacing some of them. Unchanged tensors are shared, not copied."""
        from ..models import Model
        from ..models.build import build_decoder
        merged = dict(self.tensors)
        if tensors:
            unknown = sorted(set(tensors) - set(merged))
            if unknown:
                raise ValueError(f"build: no tensor named {unknown[0]!r} in this model")
            for name, w in tensors.items():
                if tuple(w.shape) != tuple(merged[name].shape):
                    raise ValueError(f"build: {name} has shape {tuple(w.shape)}, the model's is "
                                     f"{tuple(merged[name].shape)}")
            merged.update(tensors)
        cfg = copy.deepcopy(self.config)
        decoder = build_decoder(cfg, merged, None, progress=False)
        return Model(decoder, cfg, self.tokenizer, None, label)

    def save(self, dst: str, tensors: Optional[Dict[str, object]] = None):
        """Writes these tensors (with `tensors` replacing some) as a quanta model file that
        `quanta.load(dst)` reads back as the model `build(tensors)` gives."""
        from ..models.save import save_model
        merged = dict(self.tensors)
        merged.update(tensors or {})
        return save_model(None, dst, None, progress=False,
                          source=(copy.deepcopy(self.config), merged, self.tokenizer))


def bits_per_weight(tensors: Dict[str, object], names: Iterable[str], float_bits: int = 32) -> float:
    """Stored bits per weight over the named matrices (quantized: their bytes, including
    scales and row padding; float arrays: float_bits)."""
    bits = n = 0
    for name in names:
        w = tensors[name]
        size = int(np.prod(w.shape))
        bits += 8 * w.nbytes if isinstance(w, QuantizedTensor) else float_bits * size
        n += size
    return bits / n


def _progress(it, enabled: bool, desc: str, total: Optional[int] = None):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, total=total, leave=False)


class _Site:
    """Running statistics of one linear input."""

    def __init__(self, K: int, sample_rows: int, rng: np.random.Generator):
        self.H = np.zeros((K, K), np.float64)
        self.absmax = np.zeros(K, np.float32)
        self.rows = 0
        self.S = sample_rows
        self.sample = np.zeros((0, K), np.float32)
        self.keys = np.zeros(0)
        self._rng = rng

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        self.H += (x.T @ x).astype(np.float64)  # float32 product per call, float64 running sum
        np.maximum(self.absmax, np.abs(x).max(axis=0), out=self.absmax)
        # a uniform sample without replacement: the S rows with the smallest random keys
        keys = np.concatenate([self.keys, self._rng.random(x.shape[0])])
        rows = np.concatenate([self.sample, x])
        if keys.size > self.S:
            keep = np.argpartition(keys, self.S - 1)[:self.S]
            keys, rows = keys[keep], rows[keep]
        self.keys, self.sample = keys, rows
        self.rows += x.shape[0]


class _Tap:
    """Stands in for a Linear: records its input, then runs it."""

    __slots__ = ("linear", "site")

    def __init__(self, linear, site: _Site):
        self.linear, self.site = linear, site

    def __call__(self, x, out):
        self.site.add(x)
        return self.linear(x, out)

    def __getattr__(self, name):
        return getattr(self.linear, name)


@dataclasses.dataclass
class Calibration:
    """Input statistics per site ('3.attn_in', ...): H, absmax, sample (see the module
    docstring), and the number of rows each saw."""

    H: Dict[str, np.ndarray]
    absmax: Dict[str, np.ndarray]
    sample: Dict[str, np.ndarray]
    rows: int

    def hessian(self, name: str) -> np.ndarray:
        """H of the input of a linear given by its canonical name ('3.gate')."""
        return self.H[site_of(name)]


def collect(fm: FloatModel, batches, sample_rows: int = 256, seed: int = 0, progress: bool = True) -> Calibration:
    """Runs the float model over `batches` (int token sequences, e.g. from
    `corpus.calibration_batches`) and returns the input statistics of every block linear."""
    batches = [np.asarray(b) for b in batches]
    if not batches or any(b.ndim != 1 or b.size < 1 or b.dtype.kind not in "iu" for b in batches):
        raise ValueError("collect: batches must be a non-empty list of non-empty 1-D integer token arrays")
    model = fm.build(label="float32")
    rng = np.random.default_rng(seed)
    sites: Dict[str, _Site] = {}

    def tap(i: int, kind: str, linear):
        K = linear.K
        site = sites.setdefault(f"{i}.{kind}", _Site(K, sample_rows, rng))
        return _Tap(linear, site)

    for i, blk in enumerate(model.decoder.blocks):
        a, m = blk.attn, blk.mlp
        if a.qkv is not None:
            a.qkv = tap(i, "attn_in", a.qkv)
        else:
            site = tap(i, "attn_in", a.q).site
            a.q = _Tap(a.q, site)  # one record for the three: k and v read the same rows
        a.o = tap(i, "o_in", a.o)
        if m.gate_up is not None:
            m.gate_up = tap(i, "mlp_in", m.gate_up)
        else:
            m.gate = tap(i, "mlp_in", m.gate)
        m.down = tap(i, "down_in", m.down)
    dec = model.decoder
    for ids in _progress(batches, progress, "calibrating"):
        ids = ids.astype(np.int32)
        dec.prefill(ids, np.arange(ids.size, dtype=np.int32), logit_rows=np.array([ids.size - 1]))
    rows = next(iter(sites.values())).rows
    return Calibration({k: s.H / s.rows for k, s in sites.items()}, {k: s.absmax for k, s in sites.items()},
                       {k: s.sample for k, s in sites.items()}, rows)
