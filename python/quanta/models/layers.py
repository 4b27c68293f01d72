"""Building blocks of the decoder: Linear (quantized or float weight), Embedding, and
row-wise fusion of projections that share an input (q/k/v, gate/up).

The decode loop calls the C kernels directly (``_C.qmatmul``, ``_C.matmul``) with
arguments validated once here, so a call costs about a microsecond of Python.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import ml_dtypes
import numpy as np

from .. import _C
from ..formats import PANEL, QuantizedTensor

_BF16 = np.dtype(ml_dtypes.bfloat16)
_FLOAT_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, _BF16: 2}


def is_float_array(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype in _FLOAT_CODES


class Linear:
    """y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]), float32 x and y.

    weight: a QuantizedTensor (any format) or a float32 / float16 / bfloat16 array [N, K]
    (float weights run on the fp32-accumulating float matmul). bias: None or float [N].
    """

    __slots__ = ("weight", "bias", "N", "K", "_q", "_tail")

    def __init__(self, weight, bias: Optional[np.ndarray] = None):
        if isinstance(weight, QuantizedTensor):
            self._q = True
            N, K = weight.shape
            self._tail = (weight.format._c, N, K, *weight.arrays)
        elif is_float_array(weight) and weight.ndim == 2:
            self._q = False
            weight = np.ascontiguousarray(weight)
            N, K = weight.shape
            self._tail = (weight, _FLOAT_CODES[weight.dtype])
        else:
            raise TypeError(f"Linear: weight must be a QuantizedTensor or a 2-D float32/float16/bfloat16 array, "
                            f"got {type(weight).__name__} {getattr(weight, 'dtype', '')} {getattr(weight, 'shape', '')}")
        self.weight, self.N, self.K = weight, int(N), int(K)
        if bias is not None:
            bias = np.ascontiguousarray(np.asarray(bias, dtype=np.float32).reshape(-1))
            if bias.shape != (self.N,):
                raise ValueError(f"Linear: bias must have {self.N} values, got {bias.size}")
        self.bias = bias

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """x float32 [M, K] with contiguous rows; out float32 [M, N] C-contiguous."""
        if self._q:
            _C.qmatmul(x, 0, *self._tail, out)
        else:
            _C.matmul(x, 0, self._tail[0], self._tail[1], out)
        if self.bias is not None:
            np.add(out, self.bias, out=out)
        return out

    def plan_tuple(self) -> tuple:
        """This layer as `_C.decoder_plan` takes it."""
        if self._q:
            return ("q", self._tail[0], self.N, self.K, *self._tail[3:], self.bias)
        return ("f", self.N, self.K, self._tail[0], self._tail[1], self.bias)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)

    @property
    def format(self) -> str:
        return str(self.weight.format) if self._q else str(self.weight.dtype)

    def __repr__(self) -> str:
        return f"Linear({self.N}x{self.K}, {self.format}{', bias' if self.bias is not None else ''})"


def fuse_rows(weights: Sequence) -> Optional[object]:
    """One weight holding the rows of several (same K, same format), or None when they
    cannot be joined without a copy that changes bytes: quantized parts must share a format
    and all but the last have N divisible by the 16-row panel."""
    if all(isinstance(w, QuantizedTensor) for w in weights):
        f, K = weights[0].format, weights[0].shape[1]
        if any(w.format != f or w.shape[1] != K for w in weights):
            return None
        if any(w.shape[0] % PANEL for w in weights[:-1]):
            return None
        arrays = tuple(None if a is None else np.concatenate([w.arrays[i] for w in weights], axis=0)
                       for i, a in enumerate(weights[0].arrays))
        return QuantizedTensor(f, (sum(w.shape[0] for w in weights), K), *arrays)
    if all(is_float_array(w) for w in weights):
        if len({w.dtype for w in weights}) != 1 or len({w.shape[1] for w in weights}) != 1:
            return None
        return np.concatenate(weights, axis=0)
    return None


def fuse_bias(biases: List[Optional[np.ndarray]], sizes: List[int]) -> Optional[np.ndarray]:
    if all(b is None for b in biases):
        return None
    return np.concatenate([np.zeros(n, np.float32) if b is None else np.asarray(b, np.float32).reshape(-1)
                           for b, n in zip(biases, sizes)])


class Embedding:
    """Token embedding table [V, D]: a float array or a QuantizedTensor (rows dequantized
    on lookup, 16-row panel at a time, so the table stays in its compact format).

    scale: factor on the looked-up rows (Gemma: sqrt(D)). As transformers and Gemma's own code
    compute it, a float16 / bfloat16 table is scaled in its dtype: the factor (via float32) and
    the product rounded to it; float32 and quantized tables are scaled in float32.
    """

    __slots__ = ("weight", "V", "D", "scale", "_panels")

    _CACHED_PANELS = 512  # dequantized 16-row panels kept (decode looks up one token at a time)

    def __init__(self, weight, scale: float = 1.0):
        if not (isinstance(weight, QuantizedTensor) or (is_float_array(weight) and weight.ndim == 2)):
            raise TypeError(f"Embedding: weight must be a QuantizedTensor or a 2-D float array, got "
                            f"{type(weight).__name__}")
        self.weight = weight
        self.V, self.D = (int(s) for s in weight.shape)
        self.scale = float(scale)
        self._panels = {}

    def __call__(self, ids: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.V):
            bad = int(ids[(ids < 0) | (ids >= self.V)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.V})")
        if out is None:
            out = np.empty((ids.size, self.D), np.float32)
        w = self.weight
        if isinstance(w, QuantizedTensor):
            panels = ids // PANEL
            for p in np.unique(panels):
                rows = self._panel(int(p))
                sel = panels == p
                out[sel] = rows[ids[sel] - int(p) * PANEL]
        elif w.dtype == np.float32:
            np.take(w, ids.reshape(-1), axis=0, out=out)
        else:
            rows = w[ids.reshape(-1)]
            if self.scale != 1.0:
                rows = rows * w.dtype.type(np.float32(self.scale))
            out[...] = rows
            return out
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        return out

    def _panel(self, p: int) -> np.ndarray:
        rows = self._panels.pop(p, None)
        if rows is None:
            rows = self._dequantize_panel(p)
            if len(self._panels) >= self._CACHED_PANELS:
                self._panels.pop(next(iter(self._panels), None), None)  # least recently used
        self._panels[p] = rows
        return rows

    def _dequantize_panel(self, p: int) -> np.ndarray:
        w = self.weight
        n = min(PANEL, self.V - p * PANEL)
        sub = QuantizedTensor(w.format, (n, self.D), *(None if a is None else a[p:p + 1] for a in w.arrays))
        return sub.dequantize()
