"""Quantization methods. Each returns canonical tensors (name -> QuantizedTensor, plus the
float tensors a method rescales) that `FloatModel.build` turns into a quanta Model and
`FloatModel.save` into a file `quanta.load` reads; the block linears (q, k, v, o, gate, up,
down of every layer) are quantized, the embedding / output head stay as they are.

    rtn          round to nearest, every format (quanta.quantize)
    gptq         GPTQ (Frantar et al., 2023): column by column, each rounding error spread over
                 the columns not yet quantized by the inverse Hessian of the layer's inputs;
                 lazy batched updates, optional activation order, any format (C, per row panel)
    awq          AWQ (Lin et al., 2024): per-input-channel scales s = a^alpha from the inputs'
                 RMS a, alpha chosen on a grid to minimize the layer-output error, weights
                 quantized as W diag(s) and 1/s folded into the previous op
    smoothquant  SmoothQuant (Xiao et al., 2023) for W8A8: s = absmax(x)^alpha /
                 absmax(W)^(1 - alpha) moves activation outliers into the weights; int8 weights,
                 and the integer kernels quantize activations to int8 (VNNI) at run time
    assign_mixed per-layer formats under a bits-per-weight budget from measured sensitivity

Folding (AWQ, SmoothQuant): a scale on the inputs of q/k/v is divided out of the attention
RMSNorm weight, of gate/up out of the MLP RMSNorm weight, of down out of up's rows, of o out
of v's rows (with grouped-query attention the scales of the heads sharing one v head are
tied, so one v row serves them all). The model computes the same function in float; only
the rounding changes.

Errors are measured on the layer outputs over all calibration rows through the second moment
H = X^T X / rows: mean ||x dW^T||^2 = trace(dW H dW^T) / N (`layer_error`).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Union

import numpy as np

from .. import _C
from .. import formats as F
from ..formats import QuantizedTensor
from .calibration import Calibration, FloatModel, _progress, site_of


def _fmt(fmt) -> F.Format:
    return F.get(fmt)


def layer_error(w: np.ndarray, w_hat, H: np.ndarray) -> float:
    """Mean squared layer-output error per output over the calibration rows:
    trace((W_hat - W) H (W_hat - W)^T) / N, H the inputs' second moment [K, K]."""
    wh = w_hat.dequantize() if isinstance(w_hat, QuantizedTensor) else np.asarray(w_hat, np.float32)
    d = (wh - np.asarray(w, np.float32)).astype(np.float32)
    return float(np.einsum("nk,nk->", d @ H.astype(np.float32), d, dtype=np.float64)) / d.shape[0]


# ---- RTN ------------------------------------------------------------------------------------

def rtn(fm: FloatModel, fmt, names: Optional[Iterable[str]] = None, progress: bool = True) -> Dict[str, object]:
    """Round-to-nearest: every block linear (or `names`) quantized to `fmt`."""
    f = _fmt(fmt)
    names = list(fm.linear_names if names is None else names)
    return {n: F.quantize(fm.tensors[n], f) for n in _progress(names, progress, f"rtn {f}")}


# ---- GPTQ -----------------------------------------------------------------------------------

def gptq_matrix(w: np.ndarray, H: np.ndarray, fmt, block: int = 128, damp: float = 0.01,
                act_order: bool = False, static_groups: Optional[bool] = None) -> QuantizedTensor:
    """GPTQ of one matrix W[N, K] given its inputs' second moment H[K, K].

    damp: fraction of the mean diagonal added to H's diagonal (H must be invertible).
    act_order: process columns by decreasing H diagonal (largest inputs first); the group
    parameters are then fixed from the original W beforehand (static groups), since quanta's
    groups are contiguous in the input order. static_groups: force that choice either way.
    block: columns per lazy batch (a divisor or multiple of the group / super-block).
    """
    f = _fmt(fmt)
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"gptq: w must be 2-D [N, K], got shape {w.shape}")
    N, K = w.shape
    H = np.array(H, np.float64)
    if H.shape != (K, K):
        raise ValueError(f"gptq: H must be [{K}, {K}] for w of shape {w.shape}, got {H.shape}")
    if not np.all(np.isfinite(H)) or not np.all(np.isfinite(w)):
        raise ValueError("gptq: w and H must be finite")
    if not 0 <= damp < 1:
        raise ValueError(f"gptq: damp must lie in [0, 1), got {damp}")
    w = w.copy()
    dead = np.diag(H) == 0  # inputs that are always zero: their weights never matter
    H[dead, dead] = 1.0
    w[:, dead] = 0.0
    H[np.diag_indices(K)] += damp * np.mean(np.diag(H))
    static = act_order if static_groups is None else bool(static_groups)
    arrays = {n: (None if spec is None else np.zeros(spec[0], spec[1])) for n, spec in f.array_specs(N, K).items()}
    if static:
        _C.quantize(w, f._c, *(arrays[n] for n in F._ARRAYS))  # RTN parameters of the original rows
    cols = None
    if act_order:
        cols = np.argsort(-np.diag(H), kind="stable").astype(np.int64)
        H = H[np.ix_(cols, cols)]
        w = np.ascontiguousarray(w[:, cols])
    try:
        L = np.linalg.cholesky(H)
        Hinv = np.linalg.inv(L).T @ np.linalg.inv(L)  # H^-1 = L^-T L^-1
        U = np.ascontiguousarray(np.linalg.cholesky(Hinv).T, dtype=np.float32)
    except np.linalg.LinAlgError:
        raise ValueError("gptq: H is not positive definite even after damping; raise damp") from None
    _C.gptq(w, f._c, U, cols, int(block), int(static), *(arrays[n] for n in F._ARRAYS))
    return QuantizedTensor(f, (N, K), **arrays)


def gptq(fm: FloatModel, calib: Calibration, fmt, block: int = 128, damp: float = 0.01, act_order: bool = False,
         names: Optional[Iterable[str]] = None, progress: bool = True) -> Dict[str, object]:
    """GPTQ of every block linear (or `names`) with the Hessians of `calib`."""
    f = _fmt(fmt)
    names = list(fm.linear_names if names is None else names)
    return {n: gptq_matrix(fm.tensors[n], calib.hessian(n), f, block, damp, act_order)
            for n in _progress(names, progress, f"gptq {f}")}


# ---- scaling methods (AWQ, SmoothQuant) -----------------------------------------------------

def _scale_groups(fm: FloatModel, layer: int):
    """(site, linears reading it, previous op kind, previous op name, tie) per scalable input.
    tie maps an input channel of the linears to the row of the previous op it scales."""
    cfg = fm.config
    p = f"{layer}."
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    rep = H // Hkv
    # o's input channel h * hd + d comes from v's row (h // rep) * hd + d
    o_tie = ((np.arange(H * hd) // hd) // rep) * hd + np.arange(H * hd) % hd
    return [(p + "o_in", [p + "o"], "rows", p + "v", o_tie),
            (p + "down_in", [p + "down"], "rows", p + "up", None),
            (p + "attn_in", [p + "q", p + "k", p + "v"], "norm", p + "attn_norm", None),
            (p + "mlp_in", [p + "gate", p + "up"], "norm", p + "ffn_norm", None)]


def _tied(s: np.ndarray, tie: Optional[np.ndarray]) -> np.ndarray:
    """Scales constant over the channels sharing one previous-op row (geometric mean)."""
    if tie is None:
        return s
    n = int(tie.max()) + 1
    logs = np.bincount(tie, weights=np.log(s), minlength=n) / np.bincount(tie, minlength=n)
    return np.exp(logs)[tie]


def _fold(out: Dict[str, np.ndarray], kind: str, prev: str, s_prev: np.ndarray, fm: FloatModel) -> None:
    """Divides the previous op's output (norm weight or rows, with its bias) by s_prev."""
    w = out.get(prev, fm.tensors[prev])
    if kind == "norm":
        out[prev] = (w / s_prev).astype(np.float32)
    else:
        out[prev] = (w / s_prev[:, None]).astype(np.float32)
        bias = prev + "_bias"
        if bias in fm.tensors:
            out[bias] = (out.get(bias, fm.tensors[bias]) / s_prev).astype(np.float32)


def _prev_scale(s: np.ndarray, tie: Optional[np.ndarray], n_prev: int) -> np.ndarray:
    if tie is None:
        return s
    sp = np.ones(n_prev)
    sp[tie] = s
    return sp


def awq(fm: FloatModel, calib: Calibration, fmt, grid: int = 20, progress: bool = True,
        chosen: Optional[dict] = None) -> Dict[str, object]:
    """AWQ: for each input of each block, scales s = a^alpha / sqrt(max * min) with a the
    channels' RMS over the calibration rows, alpha in {0, 1/grid, ..., (grid-1)/grid} chosen
    to minimize the summed `layer_error` of the linears reading that input (alpha = 0 is RTN,
    so the chosen scales never do worse than RTN on that objective); weights quantized as
    W diag(s), 1/s folded into the previous op. Returns the quantized linears and the
    rescaled norms and rows; `chosen` (a dict), when given, receives site -> (alpha, s).
    The o and down inputs go first: their scales fold into v's and up's rows, which are
    then quantized (rescaled) with q/k and gate."""
    f = _fmt(fmt)
    if grid < 1:
        raise ValueError(f"awq: grid must be >= 1, got {grid}")
    out: Dict[str, object] = {}
    chosen = {} if chosen is None else chosen
    for layer in _progress(range(fm.config.n_layers), progress, f"awq {f}"):
        for site, names, kind, prev, tie in _scale_groups(fm, layer):
            Hs = calib.H[site]
            a = np.sqrt(np.maximum(np.diag(Hs), 0.0))
            a = _tied(np.maximum(a, 1e-8 * max(a.max(), 1e-30)), tie)
            ws = [out.get(n, fm.tensors[n]) for n in names]  # v / up: rows rescaled by a fold above
            Hf = Hs.astype(np.float32)
            best = (np.inf, 0.0, None)
            for g in range(grid):
                alpha = g / grid
                s = a ** alpha
                s = s / np.sqrt(s.max() * s.min())
                qs = [F.quantize((w * s).astype(np.float32), f) for w in ws]
                err = 0.0
                for w, q in zip(ws, qs):
                    d = q.dequantize() / s.astype(np.float32) - w
                    err += float(np.einsum("nk,nk->", d @ Hf, d, dtype=np.float64))
                if err < best[0]:
                    best = (err, alpha, (s, qs))
            _, alpha, (s, qs) = best
            chosen[site] = (alpha, s)
            for n, q in zip(names, qs):
                out[n] = q
            n_prev = fm.tensors[prev].shape[0]
            _fold(out, kind, prev, _prev_scale(s, tie, n_prev), fm)
    return out


def smoothquant(fm: FloatModel, calib: Calibration, alpha: float = 0.5, fmt="int8",
                progress: bool = True) -> Dict[str, object]:
    """SmoothQuant for W8A8: s_j = absmax(x_j)^alpha / absmax(W[:, j])^(1 - alpha) over the
    linears reading input j, weights quantized as W diag(s) to `fmt` (default int8 per row;
    the integer kernels quantize activations to int8 per block at run time), 1/s folded
    into the previous op."""
    f = _fmt(fmt)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha must lie in [0, 1], got {alpha}")
    if f.kind == "lut":
        raise ValueError(f"smoothquant: {f} is a lookup-table format; its kernels keep activations in float")
    out: Dict[str, object] = {}
    for layer in _progress(range(fm.config.n_layers), progress, f"smoothquant {f}"):
        for site, names, kind, prev, tie in _scale_groups(fm, layer):
            ws = [out.get(n, fm.tensors[n]) for n in names]
            xa = np.maximum(calib.absmax[site].astype(np.float64), 1e-5)
            wa = np.maximum(np.max([np.abs(w).max(axis=0) for w in ws], axis=0).astype(np.float64), 1e-5)
            s = _tied(xa ** alpha / wa ** (1.0 - alpha), tie)
            for n, w in zip(names, ws):
                out[n] = F.quantize((w * s).astype(np.float32), f)
            _fold(out, kind, prev, _prev_scale(s, tie, fm.tensors[prev].shape[0]), fm)
    return out


# ---- mixed precision ------------------------------------------------------------------------

def sensitivity(fm: FloatModel, calib: Calibration, candidates: Sequence, names: Optional[Iterable[str]] = None,
                progress: bool = True) -> Dict[str, Dict[str, tuple]]:
    """name -> format name -> (relative layer-output error, stored bits) for each candidate
    format (RTN), the error normalized by the layer's output power trace(W H W^T)."""
    fmts = [_fmt(c) for c in candidates]
    names = list(fm.linear_names if names is None else names)
    table = {}
    for n in _progress(names, progress, "sensitivity"):
        w, H = fm.tensors[n], calib.hessian(n)
        power = layer_error(np.zeros_like(w), w, H)
        row = {}
        for f in fmts:
            q = F.quantize(w, f)
            row[str(f)] = (layer_error(w, q, H) / max(power, 1e-30), 8 * q.nbytes)
        table[n] = row
    return table


def assign_mixed(table: Dict[str, Dict[str, tuple]], budget_bpw: float, sizes: Dict[str, int]) -> Dict[str, str]:
    """Per-linear formats minimizing the summed relative output error under a budget of
    budget_bpw stored bits per weight over all the linears: start from each layer's smallest
    format, then repeatedly take the upgrade with the largest error drop per extra bit that
    still fits (a greedy walk along the convex hull of each layer's error-vs-bits curve)."""
    names = list(table)
    total = sum(sizes[n] for n in names)
    budget = budget_bpw * total
    options = {}
    for n in names:
        opts = sorted(table[n].items(), key=lambda kv: kv[1][1])
        hull = []  # lower convex hull of (bits, error), error decreasing
        for name, (err, bits) in opts:
            if hull and err >= hull[-1][1]:
                continue
            while len(hull) >= 2:
                (_, e1, b1), (_, e2, b2) = hull[-2], hull[-1]
                if (e1 - e2) * (bits - b2) <= (e2 - err) * (b2 - b1):  # middle point above the chord
                    hull.pop()
                else:
                    break
            hull.append((name, err, bits))
        options[n] = hull
    pick = {n: 0 for n in names}
    used = sum(options[n][0][2] for n in names)
    if used > budget:
        raise ValueError(f"assign_mixed: even the smallest formats need {used / total:.3f} bits per weight, "
                         f"above the budget of {budget_bpw}")
    while True:
        best, gain = None, 0.0
        for n in names:
            i = pick[n]
            if i + 1 < len(options[n]):
                _, e0, b0 = options[n][i]
                _, e1, b1 = options[n][i + 1]
                if used - b0 + b1 <= budget:
                    g = (e0 - e1) / max(b1 - b0, 1)
                    if g > gain:
                        best, gain = n, g
        if best is None:
            break
        i = pick[best]
        used += options[best][i + 1][2] - options[best][i][2]
        pick[best] = i + 1
    return {n: options[n][pick[n]][0] for n in names}


def mixed(fm: FloatModel, calib: Calibration, candidates: Sequence, budget_bpw: float,
          progress: bool = True) -> Dict[str, object]:
    """Mixed precision: `assign_mixed` over measured `sensitivity`, then RTN per layer.
    Returns the quantized linears (each one's `.format` tells the assignment)."""
    table = sensitivity(fm, calib, candidates, progress=progress)
    sizes = {n: int(np.prod(fm.tensors[n].shape)) for n in table}
    plan = assign_mixed(table, budget_bpw, sizes)
    by_name = {str(_fmt(c)): _fmt(c) for c in candidates}
    return {n: F.quantize(fm.tensors[n], by_name[plan[n]]) for n in plan}
