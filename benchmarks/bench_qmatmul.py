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
``torch._scaled_mm`` (FP8 e4m3 tensor cores, per-row scales) beside fp8_e4m3. Decode M = 1
reports effective weight GB/s against the device's peak bandwidth; prefill M = 16, 64, 512,
2048 reports TFLOP/s. Outputs are checked against quanta.reference before anything is
timed; timing is the mean over >= 50 back-to-back launches between two synchronizations
(CUDA events through torch when it is installed). Without a usable GPU it exits with the
reason.
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

def _gpu_time(fn, sync, iters):
    """Mean seconds per call of fn over `iters` back-to-back launches (after a warm-up)."""
    import time
    try:
        import torch
        use_events = torch.cuda.is_available()
    except ImportError:
        use_events = False
    for _ in range(3):
        fn()
    sync()
    if use_events:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def main_cuda(args):
    import sys

    from quanta import cuda
    if not cuda.available():
        sys.exit(f"bench_qmatmul --device cuda: no CUDA device: {cuda.unavailable_reason()}")
    try:
        import torch
        have_torch = torch.cuda.is_available()
    except ImportError:
        torch, have_torch = None, False
    dev = cuda.devices()[0]
    cc = dev["compute_capability"]
    peak = dev["memory_bandwidth_gbs"]
    print(f"quanta {quanta.__version__} on {dev['name']} (sm_{cc[0]}{cc[1]}), peak memory bandwidth "
          f"{peak:.0f} GB/s; torch {'%s' % torch.__version__ if have_torch else 'not available'}\n")
    fmts = args.formats.split(",")
    rng = np.random.default_rng(0)
    iters = 50 if args.quick else 200
    sync = cuda.default_stream(0).synchronize
    results = {"device": dev["name"], "gemv": [], "gemm": [], "matmul_f16": []}
    N = K = 4096
    w = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
    wt = torch.from_numpy(w).to("cuda", torch.float16) if have_torch else None
    w16 = w.astype(np.float16)
    w16d = cuda.to_device(w16)
    if have_torch and cc >= (8, 9):
        w_amax = wt.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        w_scale = (w_amax / 448.0).float()
        w8 = (wt.float() / w_scale).to(torch.float8_e4m3fn)
    rows = []
    for M in ([1, 16, 512] if args.quick else [1, 16, 64, 512, 2048]):
        x = rng.standard_normal((M, K)).astype(np.float16)
        xd = cuda.to_device(x)
        flops = 2.0 * M * N * K
        ref_x = x.astype(np.float32)
        if have_torch:
            xt = torch.from_numpy(x).to("cuda")
            t = _gpu_time(lambda: xt @ wt.T, torch.cuda.synchronize, iters)
            rows.append([M, "torch f16 (cuBLAS)", f"{N * K * 2 / 1e6:.1f}", f"{t * 1e6:.1f}",
                         f"{N * K * 2 / t / 1e9:.0f}", f"{flops / t / 1e12:.2f}"])
        path = cuda.matmul_path(np.float16, np.float16, M)
        y = cuda.matmul(xd, w16d).numpy()
        yr = reference.matmul(x, w16)
        err = np.linalg.norm(y - yr) / max(np.linalg.norm(yr), 1e-30)
        if err > 1e-4:
            rows.append([M, f"quanta matmul f16 [{path}]", "", "WRONG", f"rel err {err:.2e}", ""])
        else:
            out = cuda.Array((M, N), np.float16)
            t = _gpu_time(lambda: cuda.matmul(xd, w16d, out=out), sync, iters)
            rows.append([M, f"quanta matmul f16 [{path}]", f"{N * K * 2 / 1e6:.1f}", f"{t * 1e6:.1f}",
                         f"{N * K * 2 / t / 1e9:.0f}", f"{flops / t / 1e12:.2f}"])
            gbs = N * K * 2 / t / 1e9
            results["matmul_f16"].append({"M": M, "path": path, "us": t * 1e6, "GBs": gbs,
                                          "TFLOPs": flops / t / 1e12, "frac_peak_bw": gbs / peak})
        for name in fmts:
            qt = quanta.quantize(w, name)
            wd = qt.to("cuda")
            path = cuda.qmatmul_path(wd, M)
            y = cuda.qmatmul(xd, wd).numpy()
            yr = reference.qmatmul(ref_x, qt)
            err = np.linalg.norm(y - yr) / max(np.linalg.norm(yr), 1e-30)
            if err > (6e-2 if path == "fp8" else 1e-2):
                rows.append([M, f"{name} [{path}]", "", "WRONG", f"rel err {err:.2e}", ""])
                continue
            out = cuda.Array((M, N), np.float16)
            t = _gpu_time(lambda: cuda.qmatmul(xd, wd, out=out), sync, iters)
            gbs = qt.nbytes / t / 1e9
            rows.append([M, f"{name} [{path}]", f"{qt.nbytes / 1e6:.1f}", f"{t * 1e6:.1f}", f"{gbs:.0f}",
                         f"{flops / t / 1e12:.2f}"])
            results["gemv" if M == 1 else "gemm"].append(
                {"M": M, "format": name, "path": path, "us": t * 1e6, "GBs": gbs, "TFLOPs": flops / t / 1e12,
                 "frac_peak_bw": gbs / peak})
            if name == "fp8_e4m3" and have_torch and cc >= (8, 9) and M >= 16:
                xt32 = torch.from_numpy(x).to("cuda").float()
                x_scale = (xt32.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0)
                x8 = (xt32 / x_scale).to(torch.float8_e4m3fn)
                fn = lambda: torch._scaled_mm(x8, w8.T, scale_a=x_scale, scale_b=w_scale.T,  # noqa: E731
                                              out_dtype=torch.float16)
                ys = fn().float().cpu().numpy()
                yr8 = reference.matmul(ref_x, w)
                e8 = np.linalg.norm(ys - yr8) / np.linalg.norm(yr8)
                if e8 > 6e-2:
                    rows.append([M, "torch._scaled_mm e4m3", "", "WRONG", f"rel err {e8:.2e}", ""])
                else:
                    t = _gpu_time(fn, torch.cuda.synchronize, iters)
                    rows.append([M, "torch._scaled_mm e4m3", f"{N * K / 1e6:.1f}", f"{t * 1e6:.1f}",
                                 f"{N * K / t / 1e9:.0f}", f"{flops / t / 1e12:.2f}"])
    print(f"N = K = {N}, x float16; GB/s = weight bytes / time")
    _common.print_table(["M", "kernel [path]", "MB", "us", "GB/s", "TFLOP/s"], rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
