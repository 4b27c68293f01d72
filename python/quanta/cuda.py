"""quanta.cuda — whether quanta can use a GPU here, which ones, and if not, why.

The extension quanta._cuda exists only when nvcc was found at install time, and even then a
machine may lack the driver or a device. This module imports it on first use and never
raises on import, so `import quanta` works everywhere. Code that needs a GPU calls
`require()`, which returns the extension module or raises RuntimeError saying why not.

    >>> import quanta.cuda
    >>> quanta.cuda.available(), [d["name"] for d in quanta.cuda.devices()]
    (True, ['NVIDIA H100 80GB HBM3'])
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional

_EXTENSION = __name__.rpartition(".")[0] + "._cuda"
_loaded: Optional[tuple] = None  # (module or None, import error text or None) once tried


def _load() -> tuple:
    global _loaded
    if _loaded is None:
        try:
            from . import _cuda
            _loaded = (_cuda, None)
        except ImportError as e:
            _loaded = (None, str(e))
    return _loaded


def built() -> bool:
    """Whether the CUDA extension was built (nvcc was found when quanta was installed)."""
    return importlib.util.find_spec(_EXTENSION) is not None


def device_count() -> int:
    """Usable CUDA devices: 0 without the extension, a driver or a device."""
    mod = _load()[0]
    return mod.device_count() if mod is not None else 0


def available() -> bool:
    """Whether at least one GPU can run quanta's CUDA kernels."""
    return device_count() > 0


def unavailable_reason() -> Optional[str]:
    """Why no GPU can be used, as a sentence; None when one can."""
    mod, err = _load()
    if mod is None:
        if not built():
            return ("quanta was installed without its CUDA extension: nvcc was not found at install time "
                    "(or QUANTA_CUDA=0 was set, or the CUDA build failed). Reinstall it with QUANTA_CUDA=1 "
                    "where nvcc is on PATH or CUDA_HOME is set, e.g. `QUANTA_CUDA=1 pip install "
                    "--force-reinstall --no-binary quanta quanta` (`QUANTA_CUDA=1 pip install -e .` in a "
                    "source checkout); QUANTA_CUDA=1 makes a missing nvcc or a failed build an error")
        return f"quanta's CUDA extension is installed but cannot be loaded: {err}"
    reason = mod.unavailable_reason()
    if reason is not None and "device" in reason and "CUDA_VISIBLE_DEVICES" in os.environ:
        reason += f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})"
    return reason


def require():
    """The extension module quanta._cuda, or RuntimeError saying why no GPU can be used."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"no CUDA GPU can be used: {reason}")
    return _load()[0]


def devices() -> list[dict[str, Any]]:
    """One dict per usable device, in CUDA's order (after CUDA_VISIBLE_DEVICES); [] without one.

    Keys: index, name, pci_bus_id, compute_capability (major, minor), total_memory (bytes),
    sm_count, max_threads_per_block, max_threads_per_sm, warp_size, shared_memory_per_block,
    shared_memory_per_block_optin, shared_memory_per_sm, l2_cache (bytes), clock_khz,
    memory_clock_khz, memory_bus_bits, memory_bandwidth_gbs (peak, 1e9 B/s), integrated.
    Values a driver does not report are 0.
    """
    return _load()[0].devices() if available() else []


def runtime_version() -> Optional[int]:
    """CUDA runtime linked into the extension, 1000 * major + 10 * minor; None if not built."""
    mod = _load()[0]
    return mod.runtime_version() if mod is not None else None


def driver_version() -> Optional[int]:
    """CUDA version the installed driver supports (0: no driver); None if not built."""
    mod = _load()[0]
    return mod.driver_version() if mod is not None else None


def built_archs() -> tuple[int, ...]:
    """Compute capabilities the extension carries code for, e.g. (80, 86, 89, 90); () if not built."""
    mod = _load()[0]
    return tuple(int(a) // 10 for a in mod.ARCH_LIST.split(",") if a.isdigit()) if mod is not None else ()


def selftest(dev: int = 0) -> int:
    """Run a tiny kernel on device `dev` and check what it wrote; returns the __CUDA_ARCH__ of
    the code that ran (900 on an H100). RuntimeError when no GPU can be used or the check fails."""
    return require().selftest(dev)


def info() -> dict[str, Any]:
    """Everything above in one dict, for bug reports."""
    return {"built": built(), "available": available(), "unavailable_reason": unavailable_reason(),
            "built_archs": built_archs(), "runtime_version": runtime_version(),
            "driver_version": driver_version(), "devices": devices()}


__all__ = ["available", "built", "built_archs", "device_count", "devices", "driver_version", "info",
           "require", "runtime_version", "selftest", "unavailable_reason"]
