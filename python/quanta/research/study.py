"""The quantization study: many formats and methods on one model, measured in one pass.

`run(...)` loads the float model (for the default model: its Q4_1 weights dequantized to
float32 — "full precision" below means those weights), collects calibration statistics from
the calibration part of the corpus, quantizes the block linears with each entry of `SPECS`
(format x method), and evaluates all of them against the float model on the eval part with
`metrics.evaluate` (perplexity over strided windows, KL divergence, top-1 agreement). The
notebook (notebooks/quantization_study.ipynb) runs it small; benchmarks/bench_quant_study.py
runs it at full size and prints the README table.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Optional, Sequence

from .. import formats as F
from . import corpus, methods
from .calibration import FloatModel, bits_per_weight, collect
from .metrics import evaluate

INT3_G64 = F.make(3, 64, "sym", name="int3_g64")
INT2_G64 = F.make(2, 64, "asym", offset="zero", name="int2_g64")

# (label, format, method); "mixed" picks per-layer formats from MIXED_CANDIDATES
SPECS = [
    ("q8_0", "q8_0", "rtn"),
    ("q6_k", "q6_k", "rtn"),
    ("q4_k", "q4_k", "rtn"),
    ("q4_0", "q4_0", "rtn"),
    ("int4_g128 RTN", "int4_g128", "rtn"),
    ("int4_g128 AWQ", "int4_g128", "awq"),
    ("int4_g128 GPTQ", "int4_g128", "gptq"),
    ("nf4", "nf4", "rtn"),
    ("fp8_e4m3", "fp8_e4m3", "rtn"),
    ("int3_g64", INT3_G64, "rtn"),
    ("int2_g64", INT2_G64, "rtn"),
    ("mixed 4.5 bpw", None, "mixed"),
]
MIXED_CANDIDATES = (INT3_G64, "q4_0", "q5_0", "q6_k", "q8_0")
MIXED_BUDGET = 4.5


@dataclasses.dataclass
class Row:
    label: str
    method: str
    bits_per_weight: float   # stored bits per weight of the block linears (scales and padding included)
    ppl: float
    delta_ppl: float
    kl: float
    top1: float
    seconds: float           # quantization time (calibration not included)


def quantize_all(fm: FloatModel, calib, specs=SPECS, awq_grid: int = 20, progress: bool = True) -> Dict[str, dict]:
    """label -> tensors for each spec; also returns timings under the key '_seconds'."""
    out, secs = {}, {}
    for label, fmt, method in specs:
        t0 = time.perf_counter()
        if method == "rtn":
            t = methods.rtn(fm, fmt, progress=progress)
        elif method == "gptq":
            t = methods.gptq(fm, calib, fmt, progress=progress)
        elif method == "awq":
            t = methods.awq(fm, calib, fmt, grid=awq_grid, progress=progress)
        elif method == "smoothquant":
            t = methods.smoothquant(fm, calib, fmt=fmt, progress=progress)
        elif method == "mixed":
            t = methods.mixed(fm, calib, MIXED_CANDIDATES, MIXED_BUDGET, progress=progress)
        else:
            raise ValueError(f"unknown method {method!r}")
        out[label] = t
        secs[label] = time.perf_counter() - t0
    out["_seconds"] = secs
    return out


def run(path: Optional[str] = None, n_calib: int = 32, calib_len: int = 512, n_eval: int = 16384,
        window: int = 512, stride: Optional[int] = None, specs: Sequence = SPECS, awq_grid: int = 20,
        progress: bool = True) -> List[Row]:
    """Quantizes and evaluates every spec; rows in the order of `specs`, after a first row
    for the float model itself."""
    fm = FloatModel.load(path, progress=progress)
    calib = collect(fm, corpus.calibration_batches(fm.tokenizer, n_calib, calib_len), progress=progress)
    tensors = quantize_all(fm, calib, specs, awq_grid, progress)
    secs = tensors.pop("_seconds")
    ids = corpus.tokens(fm.tokenizer, "eval", n=n_eval)
    ref = fm.build(label="float32")
    models = {label: fm.build(t, label=label) for label, t in tensors.items()}
    res = evaluate(models, ids, reference=ref, window=window, stride=stride, progress=progress)
    return table(fm, specs, tensors, secs, res)


def table(fm: FloatModel, specs, tensors: Dict[str, dict], seconds: Dict[str, float], results) -> List[Row]:
    """Rows for the reference and each spec from `evaluate`'s results."""
    names = fm.linear_names
    rows = [Row("float32 (dequantized Q4_1)", "-", 32.0, results["reference"].ppl, 0.0, 0.0, 1.0, 0.0)]
    for label, fmt, method in specs:
        r = results[label]
        rows.append(Row(label, method, bits_per_weight({**fm.tensors, **tensors[label]}, names), r.ppl,
                        r.delta_ppl, r.kl, r.top1, seconds[label]))
    return rows


def markdown(rows: List[Row]) -> str:
    """The rows as a Markdown table."""
    head = "| format / method | bits per weight | perplexity | Δ ppl | KL (nats) | top-1 agree |\n|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        lines.append(f"| {r.label} | {r.bits_per_weight:.2f} | {r.ppl:.3f} | {r.delta_ppl:+.3f} | {r.kl:.4f} | "
                     f"{r.top1:.3f} |")
    return "\n".join(lines)
