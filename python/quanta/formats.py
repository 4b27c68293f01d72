"""Quantized weight formats: one parameterized layout, named presets, and `QuantizedTensor`.

A weight matrix W[N, K] (N outputs, K inputs) is quantized in groups of `group` consecutive
inputs of one row (``group=None``: one group per row). A format is a point of this space:

=========  ==========================================================================
bits       2, 3, 4, 5, 6, 8
group      16, 32, 64, 128, 256, or None (per row)
kind       "sym":  w = s * (q - 2^(bits-1))
           "asym": w = s * q + m  (offset="min")  or  w = s * (q - z)  (offset="zero")
           "lut":  w = s * lut[q]   (NF4, FP4, FP8 E4M3/E5M2 or any 2^bits table)
scale      "fp16", "bf16", "fp32"; GGUF K-quants keep their nested super-block scales
=========  ==========================================================================

Presets: q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k (GGUF: same values, converted without loss,
and ``QuantizedTensor.to_gguf`` gives back GGUF's bytes), int8 (per row), int4_g128,
int4_g128_asym (GPTQ/AWQ style), nf4 (bitsandbytes' table, blocks of 64), fp8_e4m3,
fp8_e5m2 (per-row scale). `make()` returns any other point, e.g.
``make(bits=3, group=64, kind="asym")``; every point runs on the SIMD kernels.
"""
from __future__ import annotations

import dataclasses
import functools
import html
from typing import Optional, Sequence, Union

import ml_dtypes
import numpy as np

from . import _C

PANEL, CHUNK, SUPER = _C.PANEL, _C.CHUNK, _C.SUPER

_KINDS = {"sym": 0, "asym": 1, "lut": 2}
_OFFSETS = {None: 0, "min": 1, "zero": 2}
_SCALES = {"fp32": 0, "fp16": 1, "bf16": 2, "nested_u6": 3, "nested_i8": 4}
_RULES = {"default": 0, "q4_0": 1, "q8_0": 2, "q4_1": 3, "kquant": 4}
_LUT_KINDS = {"table": 0, "fp8_e4m3": 1, "fp8_e5m2": 2}
_BITS = (2, 3, 4, 5, 6, 8)
_GROUPS = (16, 32, 64, 128, 256, None)

# NF4: the 16 quantiles of a unit normal distribution, normalized to [-1, 1]
# (Dettmers et al., QLoRA, 2023; the values bitsandbytes uses).
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 E2M1 (OCP microscaling): codes 0-7 positive, 8-15 their negatives.
FP4_TABLE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _fp8_table(kind: str) -> tuple:
    """Values of the 256 FP8 codes; codes past the largest finite value (E4M3's NaN,
    E5M2's inf/NaN) read as that largest value, the same as the SIMD decoder."""
    codes = np.arange(256, dtype=np.uint8)
    mag, sign = codes & 0x7F, codes & 0x80
    if kind == "fp8_e4m3":
        mag = np.minimum(mag, 0x7E)
        dt = ml_dtypes.float8_e4m3fn
    else:
        mag = np.minimum(mag, 0x7B)
        dt = ml_dtypes.float8_e5m2
    return tuple(float(v) for v in (mag | sign).astype(np.uint8).view(dt).astype(np.float32))


_NAMED_LUTS = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}


@dataclasses.dataclass(frozen=True)
class Format:
    """A point of the quantized-format space (see the module docstring)."""

    bits: int
    group: Optional[int] = 32
    kind: str = "sym"
    offset: Optional[str] = None
    scale: str = "fp16"
    rule: str = "default"
    lut: Optional[tuple] = None
    lut_kind: str = "table"
    name: Optional[str] = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.bits not in _BITS:
            raise ValueError(f"Format: bits must be one of {_BITS}, got {self.bits!r}")
        if self.group not in _GROUPS:
            raise ValueError(f"Format: group must be one of {_GROUPS} (None = per row), got {self.group!r}")
        if self.kind not in _KINDS:
            raise ValueError(f"Format: kind must be 'sym', 'asym' or 'lut', got {self.kind!r}")
        if self.offset not in _OFFSETS:
            raise ValueError(f"Format: offset must be 'min', 'zero' or None, got {self.offset!r}")
        if self.scale not in _SCALES:
            raise ValueError(f"Format: scale must be one of {tuple(_SCALES)}, got {self.scale!r}")
        if self.rule not in _RULES:
            raise ValueError(f"Format: rule must be one of {tuple(_RULES)}, got {self.rule!r}")
        if self.lut_kind not in _LUT_KINDS:
            raise ValueError(f"Format: lut_kind must be one of {tuple(_LUT_KINDS)}, got {self.lut_kind!r}")
        if (self.kind == "asym") != (self.offset is not None):
            raise ValueError("Format: asym formats need offset='min' or 'zero'; others take none")
        if self.kind == "lut":
            if self.lut is None or len(self.lut) != 1 << self.bits:
                raise ValueError(f"Format: a lut format with {self.bits} bits needs {1 << self.bits} table entries")
            if not all(np.isfinite(self.lut)):
                raise ValueError("Format: lut entries must be finite")
            if not any(v != 0 for v in self.lut):
                raise ValueError("Format: lut must have a non-zero entry")
        elif self.lut is not None:
            raise ValueError("Format: only kind='lut' takes a table")
        self._c  # the C side checks the remaining combinations

    @functools.cached_property
    def _c(self) -> bytes:
        lut = None if self.lut is None else np.asarray(self.lut, dtype=np.float32)
        return _C.make_format(self.bits, self.group or 0, _KINDS[self.kind], _OFFSETS[self.offset],
                              _SCALES[self.scale], _RULES[self.rule], _LUT_KINDS[self.lut_kind], lut)

    @property
    def nested(self) -> bool:
        return self.scale.startswith("nested")

    def _scale_dtype(self):
        return {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16, "nested_u6": np.uint8,
                "nested_i8": np.int8}[self.scale]

    def check_k(self, K: int) -> None:
        """Raises ValueError unless K is positive (any K fits: see `kpad`)."""
        if K <= 0:
            raise ValueError(f"{self}: K must be positive, got {K}")

    def kpad(self, K: int) -> int:
        """K padded to whole chunks of 32, groups and (nested) super-blocks of 256: the
        stored width of a row. The padding holds code 0 and meets zero activations, so a
        K that is not a multiple of the group costs bytes, not accuracy."""
        unit = SUPER if self.nested else max(CHUNK, self.group or 0)
        return -(-K // unit) * unit

    def array_specs(self, N: int, K: int) -> dict:
        """Shapes and dtypes of the arrays that hold an [N, K] matrix: name -> (shape, dtype) or None."""
        self.check_k(K)
        n_panels = -(-N // PANEL)
        Kp = self.kpad(K)
        ng = Kp // self.group if self.group else 1
        sd = self._scale_dtype()
        specs = {"codes": ((n_panels, (Kp // CHUNK) * 64 * self.bits), np.uint8),
                 "scales": ((n_panels, ng, PANEL), sd), "offsets": None, "supers": None, "super_mins": None}
        if self.offset is not None:
            specs["offsets"] = ((n_panels, ng, PANEL), np.uint8 if (self.offset == "zero" or self.nested) else sd)
        if self.nested:
            specs["supers"] = ((n_panels, Kp // SUPER, PANEL), np.float16)
            if self.scale == "nested_u6":
                specs["super_mins"] = ((n_panels, Kp // SUPER, PANEL), np.float16)
        return specs

    def bits_per_weight(self, K: int = 4096) -> float:
        """Stored bits per weight of a row of K inputs (codes, scales, offsets, super-scales)."""
        specs = self.array_specs(PANEL, K)
        total = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in (v for v in specs.values() if v))
        return 8.0 * total / (PANEL * K)

    @property
    def gguf_type(self):
        """The GGUF tensor type this format is the exact image of, or None."""
        import gguf
        return {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
                "q5_0": gguf.GGMLQuantizationType.Q5_0, "q5_1": gguf.GGMLQuantizationType.Q5_1,
                "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_k": gguf.GGMLQuantizationType.Q4_K,
                "q5_k": gguf.GGMLQuantizationType.Q5_K, "q6_k": gguf.GGMLQuantizationType.Q6_K}.get(self.name)

    def __str__(self) -> str:
        if self.name:
            return self.name
        g = f"g{self.group}" if self.group else "per-row"
        extra = f"-{self.offset}" if self.offset else ""
        return f"{self.kind}{extra}{self.bits}-{g}-{self.scale}"


def make(bits: int, group: Optional[int] = 32, kind: str = "sym", offset: Optional[str] = None,
         scale: str = "fp16", lut: Union[None, str, Sequence[float]] = None, name: Optional[str] = None) -> Format:
    """Any point of the format space.

    ``kind="asym"`` defaults to ``offset="min"`` (a float minimum per group, as q4_1);
    ``offset="zero"`` stores an integer zero point (GPTQ/AWQ). ``kind="lut"`` takes
    ``lut="nf4"``, ``"fp4"``, ``"fp8_e4m3"``, ``"fp8_e5m2"`` or 2^bits floats.
    """
    lut_kind = "table"
    if kind == "asym" and offset is None:
        offset = "min"
    if kind == "lut":
        if lut is None:
            raise ValueError("make: kind='lut' needs lut= ('nf4', 'fp4', 'fp8_e4m3', 'fp8_e5m2' or a table)")
        if isinstance(lut, str):
            if lut in ("fp8_e4m3", "fp8_e5m2"):
                if bits != 8:
                    raise ValueError(f"make: {lut} needs bits=8, got {bits}")
                lut_kind, lut = lut, _fp8_table(lut)
            elif lut in _NAMED_LUTS:
                if bits != 4:
                    raise ValueError(f"make: {lut} needs bits=4, got {bits}")
                lut = _NAMED_LUTS[lut]
            else:
                raise ValueError(f"make: unknown table {lut!r}")
        lut = tuple(float(v) for v in np.asarray(lut, dtype=np.float32).ravel())
    return Format(bits=bits, group=group, kind=kind, offset=offset, scale=scale, lut=lut, lut_kind=lut_kind,
                  name=name)


PRESETS = {
    "q4_0": Format(4, 32, "sym", None, "fp16", "q4_0", name="q4_0"),
    "q4_1": Format(4, 32, "asym", "min", "fp16", "q4_1", name="q4_1"),
    "q5_0": Format(5, 32, "sym", None, "fp16", "q4_0", name="q5_0"),
    "q5_1": Format(5, 32, "asym", "min", "fp16", "q4_1", name="q5_1"),
    "q8_0": Format(8, 32, "sym", None, "fp16", "q8_0", name="q8_0"),
    "q4_k": Format(4, 32, "asym", "min", "nested_u6", "kquant", name="q4_k"),
    "q5_k": Format(5, 32, "asym", "min", "nested_u6", "kquant", name="q5_k"),
    "q6_k": Format(6, 16, "sym", None, "nested_i8", "kquant", name="q6_k"),
    "int8": Format(8, None, "sym", None, "fp32", "q8_0", name="int8"),
    "int4_g128": Format(4, 128, "sym", None, "fp16", name="int4_g128"),
    "int4_g128_asym": Format(4, 128, "asym", "zero", "fp16", name="int4_g128_asym"),
    "nf4": make(4, 64, "lut", scale="fp32", lut="nf4", name="nf4"),
    "fp8_e4m3": make(8, None, "lut", scale="fp32", lut="fp8_e4m3", name="fp8_e4m3"),
    "fp8_e5m2": make(8, None, "lut", scale="fp32", lut="fp8_e5m2", name="fp8_e5m2"),
}


def get(fmt: Union[str, Format]) -> Format:
    """A Format from a preset name or a Format."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str):
        try:
            return PRESETS[fmt.lower()]
        except KeyError:
            raise ValueError(f"unknown format {fmt!r}; presets: {', '.join(PRESETS)}") from None
    raise TypeError(f"format must be a preset name or a quanta.formats.Format, got {type(fmt).__name__}")


# ---------------------------------------------------------------------------------------------
# QuantizedTensor
# ---------------------------------------------------------------------------------------------

_ARRAYS = ("codes", "scales", "offsets", "supers", "super_mins")


def _to_panels(a: np.ndarray, dtype) -> np.ndarray:
    """[N, G] per-row values -> panel layout [n_panels, G, 16] (rows padded with zeros)."""
    N, G = a.shape
    npan = -(-N // PANEL)
    out = np.zeros((npan * PANEL, G), dtype=dtype)
    out[:N] = a
    return np.ascontiguousarray(out.reshape(npan, PANEL, G).transpose(0, 2, 1))


def _from_panels(a: np.ndarray, N: int) -> np.ndarray:
    """Panel layout [n_panels, G, 16] -> [N, G]."""
    npan, G, _ = a.shape
    return a.transpose(0, 2, 1).reshape(npan * PANEL, G)[:N]


class QuantizedTensor:
    """A quantized matrix W[N, K] in quanta's panel layout (see csrc/qn_formats.h).

    Attributes: ``shape`` (N, K), ``format``, ``nbytes``, ``bits_per_weight``, and the
    arrays ``codes``, ``scales``, ``offsets``, ``supers``, ``super_mins`` (None where the
    format has none). Build one with `quanta.quantize(w, fmt)` or `from_gguf`.
    """

    __slots__ = ("shape", "format") + _ARRAYS

    def __init__(self, fmt: Union[str, Format], shape, codes, scales, offsets=None, supers=None, super_mins=None):
        fmt = get(fmt)
        N, K = (int(v) for v in shape)
        if N <= 0:
            raise ValueError(f"QuantizedTensor: N must be positive, got shape {(N, K)}")
        specs = fmt.array_specs(N, K)
        given = dict(codes=codes, scales=scales, offsets=offsets, supers=supers, super_mins=super_mins)
        for name in _ARRAYS:
            spec, arr = specs[name], given[name]
            if spec is None:
                if arr is not None:
                    raise ValueError(f"QuantizedTensor: format {fmt} has no {name}")
                continue
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"QuantizedTensor: {name} must be a numpy array, got {type(arr).__name__}")
            shp, dt = spec
            if arr.dtype != np.dtype(dt) or arr.shape != shp:
                raise ValueError(f"QuantizedTensor: {name} must be {np.dtype(dt)} with shape {shp}, "
                                 f"got {arr.dtype} with shape {arr.shape}")
            if not arr.flags.c_contiguous:
                raise ValueError(f"QuantizedTensor: {name} must be C-contiguous")
        object.__setattr__(self, "shape", (N, K))
        object.__setattr__(self, "format", fmt)
        for name in _ARRAYS:
            object.__setattr__(self, name, given[name])

    def __setattr__(self, name, value):
        raise AttributeError("QuantizedTensor is immutable")

    def __reduce__(self):
        return (QuantizedTensor, (self.format, self.shape) + self.arrays)

    @property
    def arrays(self) -> tuple:
        return tuple(getattr(self, n) for n in _ARRAYS)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays if a is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def to(self, device) -> "QuantizedTensor":
        """"cpu": this tensor; "cuda" / "cuda:N" / N: a `quanta.cuda.CudaQuantizedTensor` holding
        the same bytes on GPU N (copied once; ops.qmatmul on GPU arrays uses it)."""
        if isinstance(device, str) and device.strip().lower() == "cpu":
            return self
        from . import cuda
        return cuda.CudaQuantizedTensor.from_host(self, device)

    def dequantize(self) -> np.ndarray:
        """float32 W[N, K]: s*(q - z), s*q + m or s*lut[q], one float32 rounding each
        (for GGUF presets, equal to ``gguf.quants.dequantize`` of ``to_gguf()``)."""
        return _C.dequantize(self.format._c, self.shape[0], self.shape[1], *self.arrays)

    def unpacked_codes(self) -> np.ndarray:
        """uint8 codes[N, K] (values 0 .. 2^bits - 1)."""
        N, K = self.shape
        Kp = self.format.kpad(K)
        return np.ascontiguousarray(_C.unpack_codes(self.codes, self.format.bits, N, Kp)[:, :K])

    def __repr__(self) -> str:
        N, K = self.shape
        return (f"QuantizedTensor(shape=({N}, {K}), format={self.format}, "
                f"bits_per_weight={self.bits_per_weight:.3f}, nbytes={self.nbytes})")

    def _repr_html_(self) -> str:
        N, K = self.shape
        rows = [("shape", f"({N}, {K})"), ("format", str(self.format)),
                ("bits / weight", f"{self.bits_per_weight:.3f}"), ("bytes", f"{self.nbytes:,}")]
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                       for k, v in rows)
        return f"<table><caption>QuantizedTensor</caption>{body}</table>"

    # ---- GGUF ----------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, data: np.ndarray, qtype, shape) -> "QuantizedTensor":
        """The matrix W[N, K] stored as GGUF blocks of type `qtype` (raw uint8 bytes)."""
        from . import _gguf_blocks
        return _gguf_blocks.from_gguf(data, qtype, shape)

    def to_gguf(self):
        """(GGMLQuantizationType, uint8 array [N, row bytes]) with GGUF's exact bytes;
        for the GGUF presets only."""
        from . import _gguf_blocks
        return _gguf_blocks.to_gguf(self)


def quantize(w: np.ndarray, fmt: Union[str, Format]) -> QuantizedTensor:
    """Quantize W[N, K] (any float dtype; converted to float32) to `fmt`, in C with OpenMP.

    For q4_0, q4_1, q5_0, q5_1 and q8_0 the bytes equal those of ``gguf.quants.quantize``.
    """
    fmt = get(fmt)
    if not isinstance(w, np.ndarray):
        raise TypeError(f"quantize: w must be a numpy array, got {type(w).__name__}")
    if w.ndim != 2:
        raise ValueError(f"quantize: w must be 2-D [N, K], got shape {w.shape}")
    if w.dtype.kind != "f" and w.dtype != np.dtype(ml_dtypes.bfloat16):
        raise TypeError(f"quantize: w must be a float array, got {w.dtype}")
    N, K = w.shape
    if N == 0 or K == 0:
        raise ValueError(f"quantize: w must not be empty, got shape {w.shape}")
    fmt.check_k(K)
    w32 = w if (w.dtype == np.float32 and w.strides[1] == 4) else np.ascontiguousarray(w, dtype=np.float32)
    arrays = {name: (None if spec is None else np.empty(spec[0], spec[1]))
              for name, spec in fmt.array_specs(N, K).items()}
    _C.quantize(w32, fmt._c, *(arrays[n] for n in _ARRAYS))
    return QuantizedTensor(fmt, (N, K), **arrays)


# ---- Mixture-of-Experts weights -----------------------------------------------------------

_PROJ = ("gate_proj", "up_proj", "down_proj")


def _stack(name: str, qts) -> tuple:
    """One projection's experts -> (format, (N, K), arrays concatenated along the panel axis)."""
    qts = list(qts)
    if not qts:
        raise ValueError(f"{name} must hold at least one QuantizedTensor")
    for e, q in enumerate(qts):
        if not isinstance(q, QuantizedTensor):
            raise TypeError(f"{name}[{e}] must be a quanta.QuantizedTensor, got {type(q).__name__}")
        if q.shape != qts[0].shape:
            raise ValueError(f"{name}[{e}] has shape {q.shape}, expert 0 has {qts[0].shape}")
        if q.format != qts[0].format:
            raise ValueError(f"{name}[{e}] has format {q.format}, expert 0 has {qts[0].format}")
    arrays = tuple(None if a is None else np.concatenate([q.arrays[i] for q in qts], axis=0)
                   for i, a in enumerate(qts[0].arrays))
    return qts[0].format, qts[0].shape, arrays


class MoEExperts:
    """The routed experts of one MoE block, stacked for the fused kernel.

    Expert e computes ``down_proj[e] @ (silu(gate_proj[e] @ x) * up_proj[e] @ x)`` with
    gate_proj[e], up_proj[e] of shape (ffn, d) and down_proj[e] of shape (d, ffn). All
    experts of one projection share one format (projections may differ: e.g. q4_k gate/up
    and q6_k down). Build it once per layer; the three projections are stored stacked
    (each array of all E experts concatenated along its panel axis, as GGUF stores
    expert tensors), so a call validates 15 arrays whatever E is.

    ``MoEExperts(gate_proj=[E QuantizedTensor], up_proj=[...], down_proj=[...])``,
    ``MoEExperts.from_float(gate[E, ffn, d], up[E, ffn, d], down[E, d, ffn], fmt)``, or
    ``MoEExperts.coerce(obj)`` for a dict with those three keys or a list of per-expert
    dicts. Attributes: E, d, ffn, formats (gate, up, down), nbytes, expert_nbytes;
    ``experts[e]`` gives expert e's three QuantizedTensors (views, no copy).
    """

    __slots__ = ("E", "d", "ffn", "formats", "_arrays", "_c", "nbytes")

    def __init__(self, gate_proj, up_proj, down_proj):
        fg, sg, ag = _stack("experts.gate_proj", gate_proj)
        fu, su, au = _stack("experts.up_proj", up_proj)
        fd, sd, ad = _stack("experts.down_proj", down_proj)
        E = len(list(gate_proj))
        if len(list(up_proj)) != E or len(list(down_proj)) != E:
            raise ValueError(f"experts: gate_proj, up_proj and down_proj must hold the same number of "
                             f"experts, got {E}, {len(list(up_proj))}, {len(list(down_proj))}")
        ffn, d = sg
        if su != sg:
            raise ValueError(f"experts.up_proj must have the shape of gate_proj {sg}, got {su}")
        if sd != (d, ffn):
            raise ValueError(f"experts.down_proj must have shape {(d, ffn)}, got {sd}")
        object.__setattr__(self, "E", E)
        object.__setattr__(self, "d", d)
        object.__setattr__(self, "ffn", ffn)
        object.__setattr__(self, "formats", (fg, fu, fd))
        object.__setattr__(self, "_arrays", (ag, au, ad))
        object.__setattr__(self, "_c", (fg._c, fu._c, fd._c, E, d, ffn, ag, au, ad))
        nbytes = sum(a.nbytes for arrs in (ag, au, ad) for a in arrs if a is not None)
        object.__setattr__(self, "nbytes", nbytes)

    def __setattr__(self, name, value):
        raise AttributeError("MoEExperts is immutable")

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert's three matrices."""
        return self.nbytes // self.E

    def __len__(self) -> int:
        return self.E

    def __getitem__(self, e: int) -> dict:
        if not -self.E <= e < self.E:
            raise IndexError(f"expert {e} out of range for {self.E} experts")
        e %= self.E
        out = {}
        for name, fmt, arrays, shape in zip(_PROJ, self.formats, self._arrays,
                                            ((self.ffn, self.d), (self.ffn, self.d), (self.d, self.ffn))):
            np_ = -(-shape[0] // PANEL)
            out[name] = QuantizedTensor(fmt, shape, *(None if a is None else a[e * np_:(e + 1) * np_]
                                                      for a in arrays))
        return out

    @classmethod
    def from_float(cls, gate, up, down, fmt, fmt_down=None) -> "MoEExperts":
        """Quantize float gate[E, ffn, d], up[E, ffn, d], down[E, d, ffn] (down in fmt_down if given)."""
        fd = fmt if fmt_down is None else fmt_down
        return cls([quantize(np.asarray(g), fmt) for g in gate], [quantize(np.asarray(u), fmt) for u in up],
                   [quantize(np.asarray(w), fd) for w in down])

    @classmethod
    def coerce(cls, obj) -> "MoEExperts":
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, dict):
            missing = [k for k in _PROJ if k not in obj]
            if missing:
                raise ValueError(f"experts: dict needs keys {_PROJ}, missing {missing}")
            return cls(obj["gate_proj"], obj["up_proj"], obj["down_proj"])
        if isinstance(obj, (list, tuple)) and obj and all(isinstance(o, dict) for o in obj):
            return cls(*([o[p] for o in obj] for p in _PROJ))
        raise TypeError(f"experts must be a quanta.formats.MoEExperts, a dict of gate_proj/up_proj/down_proj "
                        f"lists or a list of per-expert dicts, got {type(obj).__name__}")

    def __repr__(self) -> str:
        f = ", ".join(str(x) for x in self.formats)
        return f"MoEExperts(E={self.E}, d={self.d}, ffn={self.ffn}, formats=({f}), nbytes={self.nbytes})"


class SharedExpert:
    """A shared expert applied to every token (Qwen2-MoE, DeepSeek, Llama-4): gate_proj,
    up_proj (ffn, d), down_proj (d, ffn) QuantizedTensors, and an optional float gate[d]
    (Qwen2-MoE's shared_expert_gate): the output is scaled by sigmoid(x . gate).
    ``SharedExpert.coerce`` accepts a dict with those keys ("gate" optional)."""

    __slots__ = ("d", "ffn", "formats", "gate", "_c", "nbytes", "_qts")

    def __init__(self, gate_proj, up_proj, down_proj, gate=None):
        fg, sg, ag = _stack("shared.gate_proj", [gate_proj])
        fu, su, au = _stack("shared.up_proj", [up_proj])
        fd, sd, ad = _stack("shared.down_proj", [down_proj])
        ffn, d = sg
        if su != sg:
            raise ValueError(f"shared.up_proj must have the shape of gate_proj {sg}, got {su}")
        if sd != (d, ffn):
            raise ValueError(f"shared.down_proj must have shape {(d, ffn)}, got {sd}")
        if gate is not None:
            gate = np.ascontiguousarray(np.asarray(gate, dtype=np.float32).reshape(-1))
            if gate.shape != (d,):
                raise ValueError(f"shared.gate must have {d} values, got {gate.size}")
        object.__setattr__(self, "d", d)
        object.__setattr__(self, "ffn", ffn)
        object.__setattr__(self, "formats", (fg, fu, fd))
        object.__setattr__(self, "gate", gate)
        object.__setattr__(self, "_qts", (gate_proj, up_proj, down_proj))
        object.__setattr__(self, "_c", (fg._c, fu._c, fd._c, ffn, ag, au, ad, gate))
        object.__setattr__(self, "nbytes", gate_proj.nbytes + up_proj.nbytes + down_proj.nbytes)

    def __setattr__(self, name, value):
        raise AttributeError("SharedExpert is immutable")

    def __getitem__(self, name: str):
        return dict(zip(_PROJ, self._qts))[name]

    @classmethod
    def coerce(cls, obj) -> "SharedExpert":
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, dict):
            missing = [k for k in _PROJ if k not in obj]
            if missing:
                raise ValueError(f"shared: dict needs keys {_PROJ} (and optionally 'gate'), "
                                 f"missing {missing}")
            return cls(obj["gate_proj"], obj["up_proj"], obj["down_proj"], obj.get("gate"))
        raise TypeError(f"shared must be None, a quanta.formats.SharedExpert or a dict, "
                        f"got {type(obj).__name__}")
