"""quanta — hand-written C (SIMD + OpenMP) and CUDA kernels for LLM inference on NumPy arrays.

    import quanta, numpy as np
    w = quanta.quantize(np.random.randn(4096, 4096).astype(np.float32), "q4_k")
    y = quanta.ops.qmatmul(np.random.randn(1, 4096).astype(np.float32), w)
"""
from . import _C
from . import cuda, formats, io, ops, reference
from ._info import info, print_info
from .formats import Format, MoEExperts, QuantizedTensor, SharedExpert, quantize
from .kv_cache import KVCache, KVCacheFullError
from .models import Model, load

__version__ = "0.1.0"


def set_num_threads(n: int) -> None:
    """Threads every kernel uses (default: OMP_NUM_THREADS, else all cores)."""
    _C.set_num_threads(int(n))


def get_num_threads() -> int:
    return _C.get_num_threads()


__all__ = ["cuda", "io", "KVCache", "KVCacheFullError", "Format", "QuantizedTensor", "MoEExperts", "SharedExpert",
           "quantize", "ops", "formats", "reference", "info", "print_info", "set_num_threads", "get_num_threads",
           "__version__", "load", "Model"]
