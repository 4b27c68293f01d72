"""The quantization study at full size: every format / method of quanta.research.study.SPECS
on the default model, against its float32 weights (the Q4_1 GGUF dequantized), printed as
the README's Markdown table (and saved to benchmarks/results/quant_study.json).

    python benchmarks/bench_quant_study.py [--threads 2] [--calib 32] [--calib-len 512]
                                           [--eval 32768] [--window 512] [--awq-grid 20]

Calibration: --calib random windows of --calib-len tokens from the corpus' calibration part
(the 2012 Republican convention speeches); evaluation: the first --eval tokens of its eval
part (the Democratic convention speeches), non-overlapping windows of --window tokens. This
is a quality benchmark; the quantization seconds are printed for information only.
"""
from __future__ import annotations

import _common

THREADS = _common.setup_threads(2)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

from quanta.research import study  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--eval", type=int, default=32768)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--awq-grid", type=int, default=20)
    a = ap.parse_args()
    rows = study.run(n_calib=a.calib, calib_len=a.calib_len, n_eval=a.eval, window=a.window, awq_grid=a.awq_grid)
    print(f"SmolLM2-135M-Instruct; reference: its Q4_1 weights dequantized to float32; calibration "
          f"{a.calib} x {a.calib_len} tokens; eval {a.eval} tokens, windows of {a.window}; {a.threads} threads")
    print(study.markdown(rows))
    for r in rows[1:]:
        print(f"  {r.label}: quantized in {r.seconds:.1f} s")
    out = os.path.join(os.path.dirname(__file__), "results", "quant_study.json")
    with open(out, "w") as f:
        json.dump({"args": vars(a), "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
