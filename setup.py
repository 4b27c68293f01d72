"""Build of quanta's native code.

quanta._C: every C file under csrc/ (plain C11 + OpenMP). Files named *_avx2.c and
*_avx512.c get their ISA flags and nothing else does, so no AVX instruction reaches a CPU
without it; the dispatch table picks a path at import.

quanta._cuda: built only when nvcc is found (QUANTA_CUDA=auto, the default), always with
QUANTA_CUDA=1, never with QUANTA_CUDA=0. QUANTA_CUDA_ARCHS="80;86;89;90" narrows the
architectures. A CPU-only build always succeeds.
"""
import os
import shutil
import subprocess
import sys
from glob import glob

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))

ISA_FLAGS = {
    "_avx2": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
                "-mavx512dq", "-mavx512vnni"],
}
BASE_FLAGS = ["-std=c11", "-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off",
              "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter",
              "-Wno-missing-field-initializers", "-Wno-cast-function-type"]
if os.environ.get("QUANTA_SANITIZE"):
    BASE_FLAGS += ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                   "-fno-omit-frame-pointer", "-O1", "-g"]


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


def find_nvcc():
    mode = os.environ.get("QUANTA_CUDA", "auto").lower()
    if mode in ("0", "off", "no", "false"):
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        cand = os.path.join(cuda_home, "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else None
    if nvcc is None and mode in ("1", "on", "yes", "true"):
        sys.exit("QUANTA_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    return nvcc


def cuda_archs():
    env = os.environ.get("QUANTA_CUDA_ARCHS")
    archs = [a.strip() for a in env.replace(",", ";").split(";") if a.strip()] if env else ["80", "86", "89", "90"]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
    return flags


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
        cu = [s for s in ext.sources if s.endswith(".cu")]
        cc = [s for s in ext.sources if not s.endswith(".cu")]
        objects = []
        os.makedirs(self.build_temp, exist_ok=True)
        for src in cu:
            obj = os.path.join(self.build_temp, os.path.splitext(src)[0] + ".o")
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            if not self.force and os.path.exists(obj) and os.path.getmtime(obj) >= max(
                    os.path.getmtime(p) for p in [src] + ext.depends):
                objects.append(obj)
                continue
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                   "-Xcompiler", "-fvisibility=hidden", "--expt-relaxed-constexpr",
                   "-cudart", "static"] + [f"-I{d}" for d in ext.include_dirs] + cuda_archs()
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            objects.append(obj)
        objects += self._compile_groups(ext, [([], cc)])
        cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        libdirs = [os.path.join(cuda_home, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib")]
        libdirs = [d for d in libdirs if os.path.isdir(d)]
        link = [f"-L{d}" for d in libdirs] + ["-lcudart_static", "-lstdc++", "-lpthread", "-ldl", "-lrt"]
        self._link(ext, objects, link)

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

nvcc = find_nvcc()
if nvcc and glob(os.path.join(ROOT, "cuda", "*.cu")):
    cuda_ext = Extension(
        "quanta._cuda",
        sources=rel(glob(os.path.join(ROOT, "cuda", "*.cu")) + glob(os.path.join(ROOT, "cuda", "py", "*.c"))),
        include_dirs=[np.get_include(), "csrc", "cuda",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")],
        depends=headers + rel(glob(os.path.join(ROOT, "cuda", "*.cuh")) + glob(os.path.join(ROOT, "cuda", "*.h"))))
    cuda_ext.nvcc = nvcc
    ext_modules.append(cuda_ext)

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
