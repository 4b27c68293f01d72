"""quanta.info(): version, kernel paths, threads, CUDA."""
from __future__ import annotations

from . import _C


def info() -> dict:
    """Version, the path each kernel family uses on this CPU, thread count, CUDA status."""
    from . import __version__, cuda
    c = _C.info()
    isa = c["isa"]
    kernels = {
        "qmatmul (int formats)": f"{isa}" + (" (VNNI)" if isa == "avx512" else ""),
        "qmatmul (lut formats)": isa,
        "quantize": "scalar C + OpenMP (vectorized by the compiler)",
        "matmul (float weights)": isa,
        "attention (prefill, paged decode)": isa,
        "rmsnorm, rope, silu_mul": "baseline C, vectorized by the compiler",
        "moe routing and experts": f"C + qmatmul ({isa})",
    }
    return {"version": __version__, "isa": isa, "hw_isa": c["hw_isa"], "kernels": kernels,
            "num_threads": c["num_threads"], "openmp": c["openmp"], "cpu_features": c["features"],
            "cuda_built": cuda.built(), "cuda_devices": cuda.devices() if cuda.built() else [],
            "cuda_unavailable": None if cuda.available() else cuda.unavailable_reason()}


def print_info() -> None:
    d = info()
    print(f"quanta {d['version']}")
    print(f"  CPU path     : {d['isa']} (hardware supports {d['hw_isa']}; QUANTA_DISABLE_ISA masks levels)")
    for k, v in d["kernels"].items():
        print(f"  {k:<34}: {v}")
    print(f"  threads      : {d['num_threads']} (OpenMP {'on' if d['openmp'] else 'off'})")
    feats = ", ".join(k for k, v in d["cpu_features"].items() if v) or "none"
    print(f"  CPU features : {feats}")
    if not d["cuda_built"]:
        print("  CUDA         : not built (nvcc was not found at install; reinstall with QUANTA_CUDA=1)")
    elif not d["cuda_devices"]:
        print(f"  CUDA         : built, unusable here: {d['cuda_unavailable']}")
    else:
        for i, dev in enumerate(d["cuda_devices"]):
            print(f"  CUDA device {i}: {dev}")
