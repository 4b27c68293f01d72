"""Build of quanta's native code.

quanta._C: every C file under csrc/ (plain C11 + OpenMP). Files named *_avx2.c and
*_avx512.c get their ISA flags and nothing else does, so no AVX instruction reaches a CPU
without it; the dispatch table picks a path at import.

quanta._cuda: cuda/*.cu through nvcc, cuda/py/*.c and csrc/qn_common.c through gcc, linked
with the static CUDA runtime (the wheel needs only the driver). QUANTA_CUDA=auto (default)
builds it when nvcc is found and this machine has an NVIDIA driver, and goes on CPU-only if
that build fails; QUANTA_CUDA=1 requires it (e.g. to build on a machine without a GPU, as CI
does to compile-check the CUDA sources); QUANTA_CUDA=0 skips it. nvcc is $CUDA_HOME/bin/nvcc, else the one on PATH, else
/usr/local/cuda/bin/nvcc. QUANTA_CUDA_ARCHS="80;86;89;90" (the default, less what this nvcc
lacks) lists the SASS targets; PTX for the newest also goes in, for later GPUs.
"""
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from glob import glob

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = os.path.dirname(os.path.abspath(__file__))

ISA_FLAGS = {
    "_avx2": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
                "-mavx512dq", "-mavx512vnni"],
}
C_FLAGS = ["-std=c11", "-O3", "-fno-math-errno", "-ffp-contract=off",
           "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter",
           "-Wno-missing-field-initializers", "-Wno-cast-function-type"]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer", "-O1", "-g"] if os.environ.get("QUANTA_SANITIZE") else []
BASE_FLAGS = C_FLAGS + ["-fopenmp"] + SANITIZE_FLAGS


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def c_sources():
    srcs = glob(os.path.join(ROOT, "csrc", "*.c")) + glob(os.path.join(ROOT, "csrc", "kernels", "*.c")) \
        + glob(os.path.join(ROOT, "csrc", "py", "*.c"))
    return rel(srcs)


def isa_of(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    for suffix in ISA_FLAGS:
        if stem.endswith(suffix):
            return suffix
    return None


def cuda_mode():
    raw = os.environ.get("QUANTA_CUDA", "auto").strip().lower()
    if raw in ("0", "off", "no", "false"):
        return "0"
    if raw in ("1", "on", "yes", "true"):
        return "1"
    if raw in ("", "auto"):
        return "auto"
    sys.exit(f"QUANTA_CUDA must be auto, 0 or 1, got {raw!r}")


def nvidia_driver_present():
    """Whether this machine has an NVIDIA driver (a GPU the build could serve)."""
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def find_nvcc(mode):
    if mode == "0":
        return None
    if mode == "auto" and not nvidia_driver_present():
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [home and os.path.join(home, "bin", "nvcc"), shutil.which("nvcc"),
                  "/usr/local/cuda/bin/nvcc"]
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    if mode == "1":
        sys.exit("QUANTA_CUDA=1 but nvcc was not found: put it on PATH or set CUDA_HOME")
    return None


def nvcc_query(nvcc, *args):
    """nvcc's stdout and stderr for `args`, or "" when it cannot run them."""
    try:
        r = subprocess.run([nvcc, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout + r.stderr if r.returncode == 0 else ""


def cuda_static_libdir(nvcc):
    """The folder holding libcudart_static.a. nvcc may be a wrapper script (so its real path says
    nothing about the toolkit) and toolkits differ (lib64/, lib/, targets/<arch>/lib/), so ask
    nvcc which folders it links from, then try the usual ones under its TOP and CUDA_HOME."""
    dry = nvcc_query(nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull)
    dirs, tops = [], []
    for line in dry.splitlines():
        line = line.removeprefix("#$ ").strip()
        if line.startswith("LIBRARIES="):
            words = [w.strip('"') for w in line[len("LIBRARIES="):].split()]
            dirs += [w[2:] for w in words if w.startswith("-L")]
        elif line.startswith("TOP="):
            tops.append(line[len("TOP="):])
    tops += [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    for top in filter(None, tops):
        dirs += [os.path.join(top, "lib64"), os.path.join(top, "lib")]
        dirs += glob(os.path.join(top, "targets", "*", "lib"))
    for d in dirs:
        if os.path.isfile(os.path.join(d, "libcudart_static.a")):
            return os.path.normpath(d)
    raise CompileError(f"libcudart_static.a was not found next to {nvcc} (looked in {', '.join(dirs)})")


DEFAULT_CUDA_ARCHS = ["80", "86", "89", "90"]  # A100, RTX 30xx/A10/A40, L4/L40/RTX 40xx, H100/H200


def cuda_archs(nvcc):
    """(gencode flags, description): SASS for each arch in QUANTA_CUDA_ARCHS (default
    DEFAULT_CUDA_ARCHS, less those this nvcc cannot target) plus PTX for the newest."""
    env = os.environ.get("QUANTA_CUDA_ARCHS", "").strip()
    words = [w.strip().lower() for w in env.replace(",", ";").replace(" ", ";").split(";") if w.strip()]
    archs = [w.removeprefix("sm_").removeprefix("compute_").replace(".", "") for w in words]
    archs = archs or DEFAULT_CUDA_ARCHS
    for a in archs:
        if not (a[:-1] if a[-1:] in ("a", "f") else a).isdigit():
            sys.exit(f"QUANTA_CUDA_ARCHS: {a!r} is not an architecture like 90 or sm_90 (got {env!r})")
    listed = nvcc_query(nvcc, "--list-gpu-arch").split()
    supported = {w.removeprefix("compute_") for w in listed if w.startswith("compute_")}
    note = ""
    if supported:
        base = lambda a: a.rstrip("af")  # noqa: E731 - 90a and 100f are variants of 90 and 100
        missing = [a for a in archs if base(a) not in supported]
        if missing and env:
            sys.exit(f"QUANTA_CUDA_ARCHS: {nvcc} cannot target {', '.join(missing)}; it supports "
                     f"{', '.join(sorted(supported, key=lambda a: int(base(a))))}")
        if missing:
            note = f" (default; this nvcc cannot target {', '.join(missing)})"
        archs = [a for a in archs if a not in missing]
    if not archs:
        sys.exit(f"{nvcc} supports none of the default architectures {DEFAULT_CUDA_ARCHS}: "
                 "set QUANTA_CUDA_ARCHS")
    archs = sorted(dict.fromkeys(archs), key=lambda a: (int(a.rstrip("af")), a))
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # PTX is forward compatible only without an a/f suffix: the driver JIT-compiles it for newer GPUs.
    plain = [a for a in archs if a.isdigit()]
    if plain:
        flags += ["-gencode", f"arch=compute_{plain[-1]},code=compute_{plain[-1]}"]
    desc = "SASS " + " ".join(f"sm_{a}" for a in archs) + (f", PTX compute_{plain[-1]}" if plain else "")
    return flags, desc + (note or ("" if env else " (default)"))


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def nvcc_version(nvcc):
    out = nvcc_query(nvcc, "--version")
    marker = "release "
    return out[out.index(marker) + len(marker):].split(",")[0] if marker in out else "?"


class BuildExt(build_ext):
    """Per-file flags: ISA files get their -m flags; .cu files go through nvcc."""

    def build_extension(self, ext):
        if ext.name == "quanta._C":
            return self._build_c(ext)
        if ext.name == "quanta._cuda":
            return self._build_cuda(ext)
        return super().build_extension(ext)

    def _compile_groups(self, ext, groups):
        objects = []
        for extra, srcs in groups:
            objects += self.compiler.compile(
                srcs, output_dir=self.build_temp, include_dirs=ext.include_dirs,
                extra_postargs=BASE_FLAGS + extra, depends=ext.depends)
        return objects

    def _build_c(self, ext):
        plain = [s for s in ext.sources if isa_of(s) is None]
        groups = [([], plain)] + [(flags, [s for s in ext.sources if isa_of(s) == suf])
                                  for suf, flags in ISA_FLAGS.items()]
        groups = [(f, s) for f, s in groups if s]
        objects = self._compile_groups(ext, groups)
        self._link(ext, objects, ["-fopenmp"] + (["-fsanitize=address,undefined"] if os.environ.get("QUANTA_SANITIZE") else []))

    def _build_cuda(self, ext):
        nvcc = ext.nvcc
        gencode, desc = cuda_archs(nvcc)
        libdir = cuda_static_libdir(nvcc)
        print(f"quanta._cuda: nvcc {nvcc_version(nvcc)} at {nvcc}: {desc}")
        temp = os.path.join(self.build_temp, "_cuda")  # csrc/qn_common.c also goes into _C: own objects
        cu = [s for s in ext.sources if s.endswith(".cu")]
        cc = [s for s in ext.sources if not s.endswith(".cu")]
        jobs = max(1, min(len(cu), os.cpu_count() or 1))
        flags = ["-O3", "-std=c++17", "-Xcompiler=-fPIC,-fvisibility=hidden,-Wall",
                 "--expt-relaxed-constexpr", f"--threads={max(1, (os.cpu_count() or 1) // jobs)}"] \
            + [f"-I{d}" for d in ext.include_dirs] + gencode
        newest_dep = max(os.path.getmtime(p) for p in ext.depends) if ext.depends else 0
        todo, objects = [], []
        for src in cu:
            obj = os.path.join(temp, os.path.splitext(src)[0] + ".o")
            cmd = [nvcc, "-c", src, "-o", obj] + flags
            objects.append(obj)
            stamp = obj + ".cmd"  # the command that made obj: changing archs or flags rebuilds it
            if not self.force and os.path.exists(obj) and read_text(stamp) == " ".join(cmd) \
                    and os.path.getmtime(obj) >= max(newest_dep, os.path.getmtime(src)):
                continue
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            todo.append((cmd, stamp))

        def compile_one(job):
            cmd, stamp = job
            print(" ".join(cmd), flush=True)
            rc = subprocess.call(cmd, cwd=ROOT)
            if rc != 0:
                raise CompileError(f"nvcc failed (exit {rc}) on {cmd[2]}; QUANTA_CUDA=0 skips the CUDA "
                                   "build, QUANTA_CUDA_ARCHS narrows it")
            with open(stamp, "w") as f:
                f.write(" ".join(cmd))

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(compile_one, todo))
        objects += self.compiler.compile(cc, output_dir=temp, include_dirs=ext.include_dirs,
                                         extra_postargs=C_FLAGS, depends=ext.depends)
        # --exclude-libs keeps cudart's symbols out of our dynamic symbol table, so another
        # library's CUDA runtime in the same process (CuPy, PyTorch) is never interposed.
        self._link(ext, objects, [f"-L{libdir}", "-lcudart_static", "-lstdc++", "-lpthread", "-ldl", "-lrt",
                                  "-Wl,--exclude-libs,ALL"])

    def _link(self, ext, objects, extra_link):
        ext_path = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(ext_path), exist_ok=True)
        self.compiler.link_shared_object(
            objects, ext_path, libraries=self.get_libraries(ext), library_dirs=ext.library_dirs,
            extra_postargs=extra_link, export_symbols=self.get_export_symbols(ext),
            build_temp=self.build_temp, target_lang="c")


headers = rel(glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True))
ext_modules = [Extension("quanta._C", sources=c_sources(),
                         include_dirs=[np.get_include(), "csrc"], depends=headers)]

CUDA_MODE = cuda_mode()
cuda_sources = glob(os.path.join(ROOT, "cuda", "*.cu"))
nvcc = find_nvcc(CUDA_MODE) if cuda_sources else None
if nvcc:
    cuda_ext = Extension(
        "quanta._cuda",
        sources=rel(cuda_sources + glob(os.path.join(ROOT, "cuda", "py", "*.c"))
                    + [os.path.join(ROOT, "csrc", "qn_common.c")]),
        include_dirs=["csrc", "cuda"],
        depends=headers + rel(glob(os.path.join(ROOT, "cuda", "**", "*.h"), recursive=True)
                              + glob(os.path.join(ROOT, "cuda", "*.cuh"))),
        optional=CUDA_MODE == "auto")  # a failed CUDA build then warns and leaves a CPU-only package
    cuda_ext.nvcc = nvcc
    ext_modules.append(cuda_ext)
elif cuda_sources and CUDA_MODE == "0":
    print("quanta._cuda: skipped (QUANTA_CUDA=0)")
elif cuda_sources and not nvidia_driver_present():
    print("quanta._cuda: skipped, no NVIDIA driver on this machine (QUANTA_CUDA=1 builds it anyway)")
elif cuda_sources:
    print("quanta._cuda: skipped, nvcc not found (put it on PATH or set CUDA_HOME; "
          "QUANTA_CUDA=1 makes this an error)")

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
