"""Quantized matmul on the CPU: decode GEMV and prefill GEMM, side by side with NumPy.

    python benchmarks/bench_qmatmul.py [--threads 2] [--quick] [--formats q4_0,q8_0]
    python benchmarks/bench_qmatmul.py --device cuda [--quick] [--formats ...]

Decode (M=1): effective weight GB/s (bytes of the quantized matrix / time), the ratio to
NumPy float32 ``x @ W.T`` (OpenBLAS sgemv) on the same shape, and the fraction of the read
bandwidth this script measures. Weights rotate through copies (>= 320 MB) so they come
from memory. Prefill (M = 16, 64, 512): GOP/s (2*M*N*K / time) and the ratio to NumPy
float32. Every kernel's output is checked against quanta.reference before it is timed;
a wrong result prints no number. Medians of >= 10 runs; thread counts equal.

--device cuda: the GPU kernels (quanta.cuda.qmatmul on device-resident weights) beside
PyTorch: float16 ``x @ W.T`` (cuBLAS) next to quanta.cuda.matmul on the same float16
weights (its GEMV for M <= 16, mma.sync tensor cores above), every format, and
``torch._scaled_mm`` (FP8 e4m3 tensor cores, per-row scales) beside fp8_e4m3, for N = K =
4096 and 8192 and M = 1, 16, 64, 512, 2048: effective weight GB/s against the read bandwidth
the script measures (torch.sum over 1 GiB), TFLOP/s, and the speed-up over cuBLAS float16.
Weights rotate through copies so they come from memory, not L2. Outputs (their first 64
rows) are checked against quanta.reference before anything is timed; timing is GPU time
from CUDA events over >= 60 calls queued back to back behind a torch.cuda._sleep, so host
launch overhead is not in it. Without a usable GPU it exits with the reason.
"""
from __future__ import annotations

import _common

THREADS = _common.setup_threads(2)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

import quanta  # noqa: E402
from quanta import reference  # noqa: E402

ALL_FORMATS = ["q4_0", "q4_1", "q4_k", "q5_k", "q6_k", "q8_0", "int8", "int4_g128", "int4_g128_asym",
               "nf4", "fp8_e4m3"]


def check(y, x, qt):
    yr = reference.qmatmul(x, qt, act_quant=qt.format.kind != "lut")
    err = np.linalg.norm(y - yr) / max(np.linalg.norm(yr), 1e-30)
    return err < 1e-4, err


def copy_qt(qt):
    return quanta.QuantizedTensor(qt.format, qt.shape, *[None if a is None else a.copy() for a in qt.arrays])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--formats", default=",".join(ALL_FORMATS))
    ap.add_argument("--json", default=None, help="also write results to this file")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    if args.device == "cuda":
        return main_cuda(args)
    quanta.set_num_threads(args.threads)
    fmts = args.formats.split(",")
    rng = np.random.default_rng(0)
    reps = 10 if args.quick else 20
    bw = _common.read_bandwidth()
    print(f"quanta {quanta.__version__}, path {quanta.info()['isa']}, threads {args.threads}; "
          f"measured read bandwidth {bw / 1e9:.1f} GB/s\n")
    results = {"threads": args.threads, "read_bandwidth_GBs": bw / 1e9, "gemv": [], "gemm": []}

    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    rows = []
    for N, K in shapes:
        w = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
        x = rng.standard_normal((1, K)).astype(np.float32)
        rot = _common.Rotator(lambda: w.copy(), w.nbytes)
        t_np = _common.median_time(lambda: x @ rot.next().T, repeats=reps)
        rows.append([f"{N}x{K}", "numpy f32", f"{w.nbytes / 1e6:.1f}", f"{t_np * 1e3:.3f}",
                     f"{w.nbytes / t_np / 1e9:.1f}", "1.00", f"{w.nbytes / t_np / bw:.2f}"])
        del rot
        for name in fmts:
            qt = quanta.quantize(w, name)
            ok, err = check(quanta.ops.qmatmul(x, qt), x, qt)
            if not ok:
                rows.append([f"{N}x{K}", name, "", "WRONG", f"rel err {err:.2e}", "", ""])
                continue
            rot = _common.Rotator(lambda: copy_qt(qt), qt.nbytes)
            out = np.empty((1, N), np.float32)
            t = _common.median_time(lambda: quanta.ops.qmatmul(x, rot.next(), out=out), repeats=reps)
            gbs = qt.nbytes / t / 1e9
            rows.append([f"{N}x{K}", name, f"{qt.nbytes / 1e6:.1f}", f"{t * 1e3:.3f}", f"{gbs:.1f}",
                         f"{t_np / t:.2f}", f"{gbs * 1e9 / bw:.2f}"])
            results["gemv"].append({"shape": [N, K], "format": name, "ms": t * 1e3, "GBs": gbs,
                                    "x_numpy": t_np / t, "frac_bw": gbs * 1e9 / bw})
            del rot
    print("Decode GEMV, M=1 (weights from memory)")
    _common.print_table(["N x K", "format", "MB", "ms", "GB/s", "x numpy f32", "of read bw"], rows)

    rows = []
    N = K = 4096
    w = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
    for M in ([16, 512] if args.quick else [16, 64, 512]):
        x = rng.standard_normal((M, K)).astype(np.float32)
        r = 5 if M == 512 else reps
        t_np = _common.median_time(lambda: x @ w.T, repeats=r)
        ops = 2.0 * M * N * K
        rows.append([M, "numpy f32", f"{t_np * 1e3:.2f}", f"{ops / t_np / 1e9:.0f}", "1.00"])
        for name in fmts:
            qt = quanta.quantize(w, name)
            ok, err = check(quanta.ops.qmatmul(x, qt), x, qt)
            if not ok:
                rows.append([M, name, "WRONG", f"rel err {err:.2e}", ""])
                continue
            out = np.empty((M, N), np.float32)
            t = _common.median_time(lambda: quanta.ops.qmatmul(x, qt, out=out), repeats=r)
            rows.append([M, name, f"{t * 1e3:.2f}", f"{ops / t / 1e9:.0f}", f"{t_np / t:.2f}"])
            results["gemm"].append({"M": M, "shape": [N, K], "format": name, "ms": t * 1e3,
                                    "GOPs": ops / t / 1e9, "x_numpy": t_np / t})
    print(f"\nPrefill GEMM, N = K = {N}")
    _common.print_table(["M", "format", "ms", "GOP/s", "x numpy f32"], rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


# ---- GPU ----

def _gpu_time(fns, torch, launches):
    """Seconds per call of the launchers `fns` (called in turn, `launches` calls in all) on the
    default stream, from CUDA events. The stream is first held by torch.cuda._sleep for longer
    than the host takes to queue the calls, so they run back to back and host overhead is not
    timed; if the GPU reaches the start event before the queue is full, the hold is doubled
    and the run repeated. Without torch: host wall time, host overhead included."""
    import time
    for f in fns:
        f()
    if torch is None:
        from quanta import cuda
        sync = cuda.default_stream(0).synchronize
        sync()
        t0 = time.perf_counter()
        for i in range(launches):
            fns[i % len(fns)]()
        sync()
        return (time.perf_counter() - t0) / launches, True
    torch.cuda.synchronize()
    hold = 20_000_000  # cycles (~10 ms)
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(hold)
        start.record()
        for i in range(launches):
            fns[i % len(fns)]()
        end.record()
        queued_in_time = not start.query()
        end.synchronize()
        if queued_in_time:
            return start.elapsed_time(end) / 1e3 / launches, False
        hold *= 2
    return start.elapsed_time(end) / 1e3 / launches, True


def _read_bandwidth(torch):
    """GB/s of torch.sum over 1 GiB of float32 (a pure read), median of 5 (CUDA events)."""
    big = torch.ones(1 << 28, device="cuda")
    ts = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        big.sum()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / 1e3)
    del big
    return (1 << 30) / float(np.median(ts[1:])) / 1e9


def main_cuda(args):
    import sys

    from quanta import cuda
    if not cuda.available():
        sys.exit(f"bench_qmatmul --device cuda: no CUDA device: {cuda.unavailable_reason()}")
    try:
        import torch
        if not torch.cuda.is_available():
            torch = None
    except ImportError:
        torch = None
    dev = cuda.devices()[0]
    cc = dev["compute_capability"]
    peak = dev["memory_bandwidth_gbs"]
    bw = _read_bandwidth(torch) if torch is not None else peak
    print(f"quanta {quanta.__version__} on {dev['name']} (sm_{cc[0]}{cc[1]}), memory bandwidth: {peak:.0f} GB/s "
          f"peak, {bw:.0f} GB/s measured (torch.sum over 1 GiB); torch "
          f"{torch.__version__ if torch is not None else 'not available: host wall time, launch overhead included'}")
    print("Weights rotate through copies (>= 256 MB in all) so every call reads them from memory, not L2.\n")
    fmts = args.formats.split(",")
    rng = np.random.default_rng(0)
    launches = 60 if args.quick else 200
    results = {"device": dev["name"], "bandwidth_gbs": bw, "peak_gbs": peak, "rows": []}
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (8192, 8192)]
    Ms = [1, 16, 512] if args.quick else [1, 4, 16, 64, 512, 2048]

    def copies(nbytes):
        return max(2, min(32, -(-(256 << 20) // nbytes)))

    for N, K in shapes:
        w = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
        w16 = w.astype(np.float16)
        f16_bytes = N * K * 2
        w16d = [cuda.to_device(w16) for _ in range(copies(f16_bytes))]
        wt = [torch.from_numpy(w16).to("cuda") for _ in range(len(w16d))] if torch is not None else None
        have_fp8 = torch is not None and cc >= (8, 9)
        if have_fp8:
            w_scale = (wt[0].float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0).float()
            w8 = [(t.float() / w_scale).to(torch.float8_e4m3fn) for t in wt]
        qts = {name: quanta.quantize(w, name) for name in fmts}
        qds = {name: [qt.to("cuda") for _ in range(copies(qt.nbytes))] for name, qt in qts.items()}
        rows = []
        for M in Ms:
            x = rng.standard_normal((M, K)).astype(np.float16)
            xd = cuda.to_device(x)
            xc = x[:64].astype(np.float32)  # rows checked against the reference
            flops = 2.0 * M * N * K
            t_ref = None

            def row(name, path, nbytes, t, bound):
                gbs = nbytes / t / 1e9
                r = [M, name + (f" [{path}]" if path else "") + (" *" if bound else ""), f"{nbytes / 1e6:.1f}",
                     f"{t * 1e6:.1f}", f"{gbs:.0f}", f"{100 * gbs / bw:.0f}%", f"{flops / t / 1e12:.1f}",
                     f"{t_ref / t:.2f}" if t_ref else ""]
                rows.append(r)
                results["rows"].append({"N": N, "K": K, "M": M, "kernel": name, "path": path, "us": t * 1e6,
                                        "GBs": gbs, "frac_bw": gbs / bw, "TFLOPs": flops / t / 1e12,
                                        "x_cublas_f16": t_ref / t if t_ref else None})

            if torch is not None:
                xt = torch.from_numpy(x).to("cuda")
                t_ref, bound = _gpu_time([lambda t=t: xt @ t.T for t in wt], torch, launches)
                row("torch f16 (cuBLAS)", "", f16_bytes, t_ref, bound)
            path = cuda.matmul_path(np.float16, np.float16, M)
            y = cuda.matmul(xd, w16d[0]).numpy()[:64].astype(np.float32)
            err = np.linalg.norm(y - reference.matmul(xc, w16)) / np.linalg.norm(reference.matmul(xc, w16))
            out = cuda.Array((M, N), np.float16)
            if err > 1e-3:
                rows.append([M, f"quanta matmul f16 [{path}]", "", "WRONG", f"rel err {err:.2e}", "", "", ""])
            else:
                t, bound = _gpu_time([lambda d=d: cuda.matmul(xd, d, out=out) for d in w16d], torch, launches)
                row("quanta matmul f16", path, f16_bytes, t, bound)
            for name, qt in qts.items():
                wd = qds[name]
                path = cuda.qmatmul_path(wd[0], M)
                y = cuda.qmatmul(xd, wd[0]).numpy()[:64]
                yr = reference.qmatmul(xc, qt)
                err = np.linalg.norm(y - yr) / max(np.linalg.norm(yr), 1e-30)
                if err > (6e-2 if path == "fp8" else 1e-2):
                    rows.append([M, f"{name} [{path}]", "", "WRONG", f"rel err {err:.2e}", "", "", ""])
                    continue
                t, bound = _gpu_time([lambda d=d: cuda.qmatmul(xd, d, out=out) for d in wd], torch, launches)
                row(name, path, qt.nbytes, t, bound)
                main_row, main_res, t_main = len(rows) - 1, len(results["rows"]) - 1, t
                alt = {"gemv": "gemm", "gemm": "gemv"}.get(path) if 1 < M <= 16 and cc >= (8, 0) else None
                if alt:  # the path "auto" did not take, for choosing the crossover
                    ya = cuda.qmatmul(xd, wd[0], path=alt).numpy()[:64]
                    if np.linalg.norm(ya - yr) > 1e-2 * np.linalg.norm(yr):
                        rows.append([M, f"{name} [{alt}]", "", "WRONG", "", "", "", ""])
                    else:
                        ta, bound = _gpu_time([lambda d=d: cuda.qmatmul(xd, d, out=out, path=alt) for d in wd],
                                              torch, launches)
                        row(name, alt + ", forced", qt.nbytes, ta, bound)
                if name == "fp8_e4m3" and have_fp8 and M >= 16:
                    xt32 = torch.from_numpy(x).to("cuda").float()
                    x_scale = xt32.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
                    x8 = (xt32 / x_scale).to(torch.float8_e4m3fn)
                    fns = [lambda b=b: torch._scaled_mm(x8, b.T, scale_a=x_scale, scale_b=w_scale.T,
                                                        out_dtype=torch.float16) for b in w8]
                    ys = fns[0]().float().cpu().numpy()[:64]
                    yr8 = reference.matmul(xc, w)
                    e8 = np.linalg.norm(ys - yr8) / np.linalg.norm(yr8)
                    if e8 > 6e-2:
                        rows.append([M, "torch._scaled_mm e4m3", "", "WRONG", f"rel err {e8:.2e}", "", "", ""])
                    else:
                        t8, bound = _gpu_time(fns, torch, launches)
                        row("torch._scaled_mm e4m3", "", N * K, t8, bound)
                        # the ratio goes on the "auto" row, which a forced-path row may follow
                        results["rows"][main_res]["x_scaled_mm"] = t8 / t_main
                        rows[main_row][-1] += f" ({t8 / t_main:.2f}x _scaled_mm)"
        print(f"N = {N}, K = {K}, x float16. GB/s = weight bytes / time; % = of the measured bandwidth; "
              f"last column = time of cuBLAS float16 / time (* = launch-bound: host overhead included)")
        _common.print_table(["M", "kernel [path]", "MB", "us", "GB/s", "% bw", "TFLOP/s", "x cuBLAS f16"], rows)
        print()
        del w16d, wt, qds
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
