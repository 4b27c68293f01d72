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
from typing import Any, Optional, Union

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


# ---------------------------------------------------------------------------------------------
# Device arrays
# ---------------------------------------------------------------------------------------------

import atexit  # noqa: E402
import math  # noqa: E402
import threading  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

_BF16 = np.dtype(ml_dtypes.bfloat16)
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_E5M2 = np.dtype(ml_dtypes.float8_e5m2)
# numpy dtype <-> DLPack (type code, bits): kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4,
# kDLBool 6, kDLFloat8_e4m3fn 10, kDLFloat8_e5m2 12
_DLPACK_CODES = {np.dtype(np.bool_): (6, 8), _BF16: (4, 16), _E4M3: (10, 8), _E5M2: (12, 8)}
for _t in (np.int8, np.int16, np.int32, np.int64):
    _DLPACK_CODES[np.dtype(_t)] = (0, 8 * np.dtype(_t).itemsize)
for _t in (np.uint8, np.uint16, np.uint32, np.uint64):
    _DLPACK_CODES[np.dtype(_t)] = (1, 8 * np.dtype(_t).itemsize)
for _t in (np.float16, np.float32, np.float64):
    _DLPACK_CODES[np.dtype(_t)] = (2, 8 * np.dtype(_t).itemsize)
_DLPACK_DTYPES = {v: k for k, v in _DLPACK_CODES.items()}
_KDL_CUDA, _KDL_CUDA_MANAGED = 2, 13


def _device_module():
    """quanta._cuda, or RuntimeError("no CUDA device: <why>") before anything touches a GPU."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"no CUDA device: {reason}")
    return _load()[0]


def _check_device(device) -> int:
    if isinstance(device, str):
        name = device.strip().lower()
        if name == "cuda":
            return 0
        if name.startswith("cuda:") and name[5:].isdigit():
            return int(name[5:])
        raise ValueError(f"device must be an int, 'cuda' or 'cuda:N', got {device!r}")
    if not isinstance(device, (int, np.integer)) or isinstance(device, bool) or device < 0:
        raise ValueError(f"device must be an int >= 0, 'cuda' or 'cuda:N', got {device!r}")
    return int(device)


class Stream:
    """A CUDA stream of one device. ``Stream(device)`` creates a non-blocking stream (destroyed
    with the object); `default_stream(device)` is the device's legacy default stream.
    ``__cuda_stream__`` follows the CUDA stream protocol, so CuPy/PyTorch can adopt it."""

    __slots__ = ("device", "handle", "_owned")

    def __init__(self, device: Union[int, str] = 0, handle: Optional[int] = None):
        dev = _check_device(device)
        mod = _device_module()
        if dev >= mod.device_count():
            raise ValueError(f"Stream: device {dev} is out of range: {mod.device_count()} visible")
        self.device = dev
        self._owned = handle is None
        self.handle = mod.stream_create(dev) if handle is None else int(handle)

    @property
    def cai_stream(self) -> int:
        """The stream as `__cuda_array_interface__` writes it (1: the legacy default stream)."""
        return 1 if self.handle == 0 else self.handle

    def synchronize(self) -> None:
        """Block until all work queued on this stream has finished."""
        _load()[0].stream_synchronize(self.device, self.handle)

    def wait(self, other: "Stream") -> None:
        """Make this stream wait (on the GPU) for the work queued so far on `other`."""
        _load()[0].stream_wait(self.device, self.handle, other.handle)

    def __cuda_stream__(self):
        return (0, self.handle)

    def __del__(self):
        if getattr(self, "_owned", False) and self.handle:
            mod = _load()[0]
            try:
                mod.stream_destroy(self.device, self.handle)
            except Exception:  # noqa: BLE001 - nothing to report to during teardown
                pass
            self.handle = 0

    def __repr__(self) -> str:
        return f"Stream(device={self.device}, handle={self.handle:#x})"


_default_streams: dict = {}
_streams_lock = threading.Lock()


def default_stream(device: Union[int, str] = 0) -> Stream:
    """The legacy default stream of `device` (handle 0), the stream every call uses unless told."""
    dev = _check_device(device)
    with _streams_lock:
        s = _default_streams.get(dev)
        if s is None:
            s = _default_streams[dev] = Stream(dev, handle=0)
    return s


def _stream_arg(stream, device: int) -> Stream:
    if stream is None:
        return default_stream(device)
    if not isinstance(stream, Stream):
        raise TypeError(f"stream must be a quanta.cuda.Stream or None, got {type(stream).__name__}")
    if stream.device != device:
        raise ValueError(f"stream belongs to device {stream.device}, the array to device {device}")
    return stream


def _c_strides(shape, itemsize) -> tuple:
    strides, acc = [], itemsize
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(strides))


class Array:
    """An n-dimensional array in GPU memory.

    ``Array(shape, dtype=float32, device=0, stream=None)`` allocates (uninitialized) from
    quanta's caching allocator; `to_device` copies a NumPy array in, `.numpy()` copies back,
    `asarray` wraps CuPy/PyTorch/JAX arrays without a copy. Attributes: shape, dtype (NumPy;
    bfloat16 and fp8 are ml_dtypes'), strides (bytes, NumPy's convention), device, stream,
    ptr, nbytes. Exports ``__cuda_array_interface__`` (v3) and ``__dlpack__``.
    """

    __slots__ = ("_owner", "ptr", "shape", "dtype", "strides", "device", "stream", "readonly", "__weakref__")

    def __init__(self, shape, dtype=np.float32, device: Union[int, str] = 0, stream: Optional[Stream] = None):
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(n) for n in shape)
        if any(n < 0 for n in shape):
            raise ValueError(f"Array: shape must be non-negative, got {shape}")
        dtype = np.dtype(dtype)
        if dtype not in _DLPACK_CODES:
            raise TypeError(f"Array: unsupported dtype {dtype}")
        dev = _check_device(device)
        mod = _device_module()
        st = _stream_arg(stream, dev)
        nbytes = math.prod(shape) * dtype.itemsize
        buf = mod.Buffer(dev, nbytes, st.handle)
        self._init(buf, buf.ptr, shape, dtype, _c_strides(shape, dtype.itemsize), dev, st, False)

    def _init(self, owner, ptr, shape, dtype, strides, device, stream, readonly):
        self._owner = owner
        self.ptr = int(ptr)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.strides = tuple(strides)
        self.device = device
        self.stream = stream
        self.readonly = bool(readonly)

    @classmethod
    def _wrap(cls, owner, ptr, shape, dtype, strides, device, stream, readonly=False) -> "Array":
        """An Array over memory that `owner` keeps alive (no allocation, no device call)."""
        a = cls.__new__(cls)
        a._init(owner, ptr, shape, dtype, strides, device, stream, readonly)
        return a

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: math.prod(self.shape))
    itemsize = property(lambda self: self.dtype.itemsize)
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    @property
    def is_c_contiguous(self) -> bool:
        if self.size <= 1:
            return True
        want = _c_strides(self.shape, self.itemsize)
        return all(s == c for s, c, n in zip(self.strides, want, self.shape) if n != 1)

    def _rows(self):
        """(rows, row pitch in bytes) when the array is a stack of contiguous rows, else None."""
        if self.is_c_contiguous:
            return 1, self.nbytes
        inner = self.ndim == 2 and (self.strides[1] == self.itemsize or self.shape[1] == 1)
        if inner and self.strides[0] > 0:
            return self.shape[0], self.strides[0]
        return None

    def copy(self, stream: Optional[Stream] = None) -> "Array":
        """A C-contiguous copy on the same device (contiguous or row-strided 2-D arrays)."""
        rows = self._rows()
        if rows is None:
            raise NotImplementedError(f"copy: only contiguous or row-strided 2-D arrays, got strides "
                                      f"{self.strides}")
        st = self.stream if stream is None else _stream_arg(stream, self.device)
        out = Array(self.shape, self.dtype, self.device, st)
        n, pitch = rows
        width = self.nbytes // max(n, 1)
        spitch = pitch if n > 1 else width
        _load()[0].copy_2d(out.ptr, width, self.ptr, spitch, width, n, self.device, st.handle)
        return out

    def numpy(self) -> np.ndarray:
        """A NumPy copy (waits for the array's stream)."""
        src = self if self.is_c_contiguous else self.copy()
        out = np.empty(self.shape, self.dtype)
        if out.nbytes:
            _device_module().d2h(out, src.ptr, self.device, src.stream.handle)
        return out

    def reshape(self, *shape) -> "Array":
        """A view with another shape (C-contiguous arrays only; one -1 allowed)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(n) for n in shape)
        if shape.count(-1) == 1:
            known = math.prod(n for n in shape if n != -1)
            shape = tuple(self.size // known if n == -1 and known else n for n in shape)
        if math.prod(shape) != self.size:
            raise ValueError(f"reshape: cannot reshape {self.shape} into {shape}")
        if not self.is_c_contiguous:
            raise ValueError("reshape: the array must be C-contiguous")
        return Array._wrap(self, self.ptr, shape, self.dtype, _c_strides(shape, self.itemsize), self.device,
                           self.stream, self.readonly)

    # ---- interchange ----

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, self.readonly),
                "version": 3,
                "strides": None if self.is_c_contiguous else self.strides, "stream": self.stream.cai_stream}

    def __dlpack_device__(self) -> tuple:
        return (_KDL_CUDA, self.device)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        """A DLPack capsule: "dltensor_versioned" (DLPack 1.1) when max_version >= (1, 0), else
        the legacy "dltensor". `stream` is the consumer's: None or 1 the legacy default stream,
        2 the per-thread default, -1 no synchronization, else a stream handle; the consumer's
        stream is made to wait for the work queued on this array's stream."""
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise BufferError(f"__dlpack__: the array lives on {self.__dlpack_device__()}, cannot export to "
                              f"{tuple(dl_device)} without a copy")
        if copy:
            raise BufferError("__dlpack__: copy=True is not supported; use .copy() first")
        if stream == 0:
            raise ValueError("__dlpack__: stream=0 is ambiguous for CUDA; use 1 (legacy default) or 2")
        mod = _device_module()
        if stream != -1:
            consumer = 0 if stream in (None, 1) else int(stream)
            if consumer != self.stream.handle:
                mod.stream_wait(self.device, consumer, self.stream.handle)
        versioned = max_version is not None and tuple(max_version)[0] >= 1
        code, bits = _DLPACK_CODES[self.dtype]
        estrides = tuple(s // self.itemsize for s in self.strides)
        return mod.dlpack_export(self, self.ptr, self.shape, estrides, code, bits, _KDL_CUDA, self.device,
                                 int(versioned), int(self.readonly))

    def __repr__(self) -> str:
        return f"quanta.cuda.Array(shape={self.shape}, dtype={self.dtype}, device={self.device})"

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]


def empty(shape, dtype=np.float32, device: Union[int, str] = 0, stream: Optional[Stream] = None) -> Array:
    """An uninitialized Array."""
    return Array(shape, dtype, device, stream)


def to_device(a, device: Union[int, str] = 0, stream: Optional[Stream] = None) -> Array:
    """Copy a NumPy array (or anything np.asarray takes) to GPU `device`."""
    host = np.ascontiguousarray(a)
    if host.dtype not in _DLPACK_CODES:
        raise TypeError(f"to_device: unsupported dtype {host.dtype}")
    out = Array(host.shape, host.dtype, device, stream)
    if host.nbytes:
        _load()[0].h2d(out.ptr, host.reshape(-1).view(np.uint8), out.device, out.stream.handle)
    return out


def _cai_dtype(typestr: str) -> np.dtype:
    try:
        dt = np.dtype(typestr)
    except TypeError:
        raise TypeError(f"asarray: unsupported __cuda_array_interface__ typestr {typestr!r}") from None
    if dt not in _DLPACK_CODES:
        raise TypeError(f"asarray: unsupported __cuda_array_interface__ typestr {typestr!r} "
                        "(bfloat16 and fp8 arrays travel through DLPack)")
    return dt


def _cai_of(obj) -> Optional[dict]:
    """obj's __cuda_array_interface__, or None when it has none or its typestr names no type
    ("<V2": torch's bfloat16) and DLPack, which names the type, can be used instead."""
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None and hasattr(obj, "__dlpack__"):
        try:
            void = np.dtype(cai["typestr"]).kind == "V"
        except TypeError:
            void = True
        if void:
            return None
    return cai


def describe(obj) -> Optional[tuple]:
    """(shape, dtype, strides in bytes) of a GPU array without touching the device or consuming
    anything, or None when `obj` exposes no `__cuda_array_interface__` (quanta Arrays do)."""
    if isinstance(obj, Array):
        return obj.shape, obj.dtype, obj.strides
    cai = _cai_of(obj)
    if cai is None:
        return None
    shape = tuple(int(n) for n in cai["shape"])
    dt = _cai_dtype(cai["typestr"])
    strides = cai.get("strides")
    strides = _c_strides(shape, dt.itemsize) if strides is None else tuple(int(s) for s in strides)
    return shape, dt, strides


def is_device_array(obj) -> bool:
    """Whether `obj` is GPU memory quanta can use without a copy: a quanta.cuda.Array, a
    `__cuda_array_interface__` object or a DLPack producer on a CUDA device."""
    if isinstance(obj, Array) or hasattr(obj, "__cuda_array_interface__"):
        return True
    dev = getattr(obj, "__dlpack_device__", None)
    if dev is None or isinstance(obj, np.ndarray):
        return False
    try:
        return int(dev()[0]) in (_KDL_CUDA, _KDL_CUDA_MANAGED)
    except Exception:  # noqa: BLE001 - a producer that cannot say where it lives is not ours
        return False


def asarray(obj, stream: Optional[Stream] = None) -> Array:
    """A quanta.cuda.Array viewing `obj`'s GPU memory, without a copy.

    Accepts a quanta Array (returned as is), any object with ``__cuda_array_interface__``
    (v2/v3; its "stream" is waited on by `stream`, default the device's default stream) or
    with ``__dlpack__`` on a CUDA device (asked for a versioned capsule first). The result
    keeps `obj` (or the DLPack producer's tensor) alive. NumPy arrays raise TypeError: use
    `to_device` to copy them.
    """
    if isinstance(obj, Array):
        return obj
    if isinstance(obj, np.ndarray):
        raise TypeError("asarray: a numpy array lives on the CPU; copy it with quanta.cuda.to_device")
    cai = _cai_of(obj)
    if cai is not None:
        shape, dt, strides = describe(obj)
        if cai.get("mask") is not None:
            raise ValueError("asarray: masked __cuda_array_interface__ arrays are not supported")
        ptr, readonly = cai["data"]
        mod = _device_module()
        dev = mod.pointer_device(ptr) if ptr else (stream.device if stream is not None else 0)
        if dev < 0:
            raise ValueError(f"asarray: address {ptr:#x} of __cuda_array_interface__ is not device memory")
        st = _stream_arg(stream, dev)
        theirs = cai.get("stream")
        if theirs is not None:
            if theirs == 0:
                raise ValueError("asarray: __cuda_array_interface__ stream 0 is disallowed (v3)")
            mod.stream_wait(dev, st.handle, 0 if theirs == 1 else int(theirs))
        return Array._wrap(obj, ptr, shape, dt, strides, dev, st, readonly)
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        dtype_, dev = (int(v) for v in obj.__dlpack_device__())
        if dtype_ not in (_KDL_CUDA, _KDL_CUDA_MANAGED):
            raise TypeError(f"asarray: the DLPack producer lives on device type {dtype_}, not CUDA (2); "
                            "copy CPU arrays with quanta.cuda.to_device")
        mod = _device_module()
        st = _stream_arg(stream, dev)
        try:
            cap = obj.__dlpack__(stream=st.cai_stream, max_version=(1, 1))
        except TypeError:
            cap = obj.__dlpack__(stream=st.cai_stream)
        owner, ptr, shape, estrides, (code, bits, lanes), (dtype_, dev2), readonly = mod.dlpack_import(cap)
        dt = _DLPACK_DTYPES.get((code, bits))
        if dt is None or lanes != 1:
            raise TypeError(f"asarray: unsupported DLPack dtype (code {code}, bits {bits}, lanes {lanes})")
        strides = (_c_strides(shape, dt.itemsize) if estrides is None
                   else tuple(s * dt.itemsize for s in estrides))
        return Array._wrap(owner, ptr, shape, dt, strides, dev2, st, readonly)
    raise TypeError(f"asarray: expected a GPU array (__cuda_array_interface__ or __dlpack__), got "
                    f"{type(obj).__name__}")


def empty_cache() -> None:
    """Return every cached, unused block of device memory to CUDA (done at exit too)."""
    mod = _load()[0]
    if mod is not None and hasattr(mod, "empty_cache"):
        mod.empty_cache()


def memory_stats() -> dict:
    """Bytes held by live Arrays ("live") and by the allocator's cache ("cached")."""
    mod = _load()[0]
    if mod is None or not hasattr(mod, "memory_stats"):
        return {"live": 0, "cached": 0}
    live, cached = mod.memory_stats()
    return {"live": live, "cached": cached}


def _release_at_exit():
    if _loaded is not None and _loaded[0] is not None and hasattr(_loaded[0], "empty_cache"):
        try:
            _loaded[0].empty_cache()
        except Exception:  # noqa: BLE001 - the driver may already be gone
            pass


atexit.register(_release_at_exit)


# ---------------------------------------------------------------------------------------------
# Quantized weights on a GPU, and the quantized matmul
# ---------------------------------------------------------------------------------------------

_ARRAY_NAMES = ("codes", "scales", "offsets", "supers", "super_mins")
_X_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, _BF16: 2}
_PATHS = {"auto": 0, "gemv": 1, "gemm": 2, "fp8": 3}


class CudaQuantizedTensor:
    """A `quanta.QuantizedTensor` whose arrays live on a GPU (the same bytes, same panel
    layout). Made by ``qt.to("cuda")``; ``.to("cpu")`` copies it back. Attributes: shape,
    format, device, nbytes and the Arrays codes, scales, offsets, supers, super_mins."""

    __slots__ = ("shape", "format", "device") + _ARRAY_NAMES

    def __init__(self, fmt, shape, device: int, codes, scales, offsets=None, supers=None, super_mins=None):
        from .formats import get
        object.__setattr__(self, "format", get(fmt))
        object.__setattr__(self, "shape", (int(shape[0]), int(shape[1])))
        object.__setattr__(self, "device", int(device))
        specs = self.format.array_specs(*self.shape)
        for name, arr in zip(_ARRAY_NAMES, (codes, scales, offsets, supers, super_mins)):
            spec = specs[name]
            if (spec is None) != (arr is None):
                what = "missing" if arr is None else "not expected"
                raise ValueError(f"CudaQuantizedTensor: {name} is {what} for format {self.format}")
            if arr is not None:
                if not isinstance(arr, Array):
                    raise TypeError(f"CudaQuantizedTensor: {name} must be a quanta.cuda.Array, got "
                                    f"{type(arr).__name__}")
                if arr.shape != tuple(spec[0]) or arr.dtype != np.dtype(spec[1]) or not arr.is_c_contiguous:
                    raise ValueError(f"CudaQuantizedTensor: {name} must be C-contiguous {np.dtype(spec[1])} "
                                     f"with shape {spec[0]}, got {arr.dtype} with shape {arr.shape}")
                if arr.device != self.device:
                    raise ValueError(f"CudaQuantizedTensor: {name} is on device {arr.device}, "
                                     f"not {self.device}")
            object.__setattr__(self, name, arr)

    def __setattr__(self, name, value):
        raise AttributeError("CudaQuantizedTensor is immutable")

    @classmethod
    def from_host(cls, qt, device: Union[int, str] = 0,
                  stream: Optional[Stream] = None) -> "CudaQuantizedTensor":
        dev = _check_device(device)
        arrays = [None if a is None else to_device(a, dev, stream) for a in qt.arrays]
        return cls(qt.format, qt.shape, dev, *arrays)

    @property
    def arrays(self) -> tuple:
        return tuple(getattr(self, n) for n in _ARRAY_NAMES)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays if a is not None)

    def to(self, device):
        """"cpu" gives a `QuantizedTensor` (a copy); "cuda[:N]" this tensor or a copy on device N."""
        from .formats import QuantizedTensor
        if isinstance(device, str) and device.strip().lower() == "cpu":
            arrays = (None if a is None else a.numpy() for a in self.arrays)
            return QuantizedTensor(self.format, self.shape, *arrays)
        dev = _check_device(device)
        return self if dev == self.device else CudaQuantizedTensor.from_host(self.to("cpu"), dev)

    def __repr__(self) -> str:
        N, K = self.shape
        return (f"CudaQuantizedTensor(shape=({N}, {K}), format={self.format}, device=cuda:{self.device}, "
                f"nbytes={self.nbytes})")


def _x_rows(op: str, x, K: int, stream) -> tuple:
    """Checks a GPU operand x[..., K] without touching the device: (x, shape, dtype, ldx), x
    imported with `asarray` when it is a DLPack producer (to learn its shape)."""
    desc = describe(x)
    if desc is None:
        x = asarray(x, stream)  # DLPack producers: imported (no copy) to learn the shape
        desc = describe(x)
    shape, dt, strides = desc
    if dt not in _X_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {dt} with shape {shape}")
    if len(shape) == 0 or shape[-1] != K:
        raise ValueError(f"{op}: x must have shape (M, {K}), got {dt} with shape {shape}")
    if K > 1 and strides[-1] != dt.itemsize:
        raise ValueError(f"{op}: x rows must be contiguous (last stride {dt.itemsize}), got strides "
                         f"{strides}")
    if len(shape) == 1:
        ldx = K
    elif len(shape) == 2:
        ldx = strides[0] // dt.itemsize if shape[0] > 1 else K
        if ldx < K or strides[0] % dt.itemsize:
            raise ValueError(f"{op}: x row stride must be a multiple of {dt.itemsize} bytes and >= K, "
                             f"got strides {strides}")
    else:
        if strides != _c_strides(shape, dt.itemsize):
            raise ValueError(f"{op}: x with more than 2 dimensions must be C-contiguous")
        ldx = K
    return x, shape, dt, ldx


def _out_rows(op: str, out, M: int, N: int, stream) -> int:
    """Checks an optional GPU output of M x N elements without touching the device (beyond
    importing a DLPack producer); returns its row stride in elements (N when out is None)."""
    if out is None:
        return N
    oshape, odt, ostrides = describe(out) if describe(out) is not None else describe(asarray(out, stream))
    if odt not in _X_DTYPES:
        raise TypeError(f"{op}: out must be float32, float16 or bfloat16, got {odt}")
    if math.prod(oshape) != M * N or (oshape[-1:] != (N,)) or (len(oshape) == 2 and oshape[0] != M):
        raise ValueError(f"{op}: out must have shape ({M}, {N}), got {odt} with shape {oshape}")
    if N > 1 and ostrides[-1] != odt.itemsize:
        raise ValueError(f"{op}: out rows must be contiguous, got strides {ostrides}")
    if len(oshape) > 2 and ostrides != _c_strides(oshape, odt.itemsize):
        raise ValueError(f"{op}: out with more than 2 dimensions must be C-contiguous")
    return ostrides[0] // odt.itemsize if len(oshape) == 2 and oshape[0] > 1 else N


def qmatmul(x, w: CudaQuantizedTensor, out=None, path: str = "auto", stream: Optional[Stream] = None):
    """y[M, N] = x[M, K] @ W[N, K]^T on the GPU that holds w (see `quanta.ops.qmatmul`).

    x: a GPU array (quanta Array, CAI or DLPack object) of float32, float16 or bfloat16,
    shape (M, K), (K,) or (..., K) with contiguous rows. out: optional GPU array (M, N) of
    float32, float16 or bfloat16 with contiguous rows; default a new float32 Array. Returns
    out, or the new Array shaped (..., N). Runs on `stream` (default: the stream of x when x
    is a quanta Array, else the device's default stream).
    path: "auto" (GEMV for M <= 4, else GEMM); "gemv", "gemm" or "fp8" force a kernel
    (tests, benchmarks). Numerics: GEMV: fp32 math; GEMM: f16 (x float16) or bf16 (x bfloat16
    / float32) tensor-core tiles with fp32 accumulation, K split across blocks for small M;
    "fp8" (fp8_e4m3 weights, sm_89+): x cast to e4m3 with a per-row scale, e4m3 tensor cores.
    """
    if not isinstance(w, CudaQuantizedTensor):
        raise TypeError(f"qmatmul: x is a GPU array, so w must be a GPU tensor: move the weight once with "
                        f"w.to('cuda') (got {type(w).__name__})")
    if path not in _PATHS:
        raise ValueError(f"qmatmul: path must be one of {tuple(_PATHS)}, got {path!r}")
    N, K = w.shape
    x, shape, dt, ldx = _x_rows("qmatmul", x, K, stream)
    lead = shape[:-1]
    M = math.prod(lead)
    ldy = _out_rows("qmatmul", out, M, N, stream)
    mod = _device_module()
    xa = asarray(x, stream)
    if xa.device != w.device:
        raise ValueError(f"qmatmul: x is on cuda:{xa.device}, w on cuda:{w.device}")
    st = _stream_arg(stream, w.device) if stream is not None else xa.stream
    if out is None:
        ya = Array(lead + (N,), np.float32, w.device, st)
    else:
        ya = asarray(out, st)
        if ya.device != w.device:
            raise ValueError(f"qmatmul: out is on cuda:{ya.device}, w on cuda:{w.device}")
    if M == 0:
        return out if out is not None else ya
    fmt = w.format._c
    _, ws_bytes = mod.qmatmul_plan(fmt, N, K, M, w.device, _PATHS[path])
    ws = Array((ws_bytes,), np.uint8, w.device, st) if ws_bytes else None
    ptrs = [0 if a is None else a.ptr for a in w.arrays]
    mod.qmatmul(fmt, N, K, *ptrs, ya.ptr, _X_DTYPES[ya.dtype], ldy, xa.ptr, _X_DTYPES[dt], ldx, M,
                0 if ws is None else ws.ptr, _PATHS[path], w.device, st.handle)
    return out if out is not None else ya


def qmatmul_path(w: CudaQuantizedTensor, M: int) -> str:
    """The kernel qmatmul's "auto" picks for this weight and M on w's device."""
    mod = _device_module()
    code, _ = mod.qmatmul_plan(w.format._c, w.shape[0], w.shape[1], int(M), w.device, _PATHS["auto"])
    return {v: k for k, v in _PATHS.items()}[code]


# ---------------------------------------------------------------------------------------------
# Float matmul
# ---------------------------------------------------------------------------------------------

_MM_PATHS = {"auto": 0, "gemv": 1, "gemm": 2, "fma": 4}


def _w_rows(w, stream) -> tuple:
    """Checks a float weight w[N, K] on the GPU without touching the device: (w, N, K, dtype,
    ldw), w imported with `asarray` when it is a DLPack producer."""
    if isinstance(w, np.ndarray):
        raise TypeError(f"matmul: x is a GPU array but w is a numpy array ({w.dtype} with shape {w.shape}): "
                        "copy the weight to the GPU once with quanta.cuda.to_device(w) and pass that")
    desc = describe(w)
    if desc is None:
        if not is_device_array(w):
            raise TypeError(f"matmul: x is a GPU array, so w must be a GPU array (quanta.cuda.Array, CUDA "
                            f"array interface or DLPack on CUDA), got {type(w).__name__}: copy it with "
                            "quanta.cuda.to_device(w)")
        w = asarray(w, stream)
        desc = describe(w)
    shape, dt, strides = desc
    if dt not in _X_DTYPES:
        raise TypeError(f"matmul: w must be float32, float16 or bfloat16, got {dt} with shape {shape}")
    if len(shape) != 2:
        raise ValueError(f"matmul: w must have shape (N, K), got {dt} with shape {shape}")
    N, K = shape
    if N == 0 or K == 0:
        raise ValueError(f"matmul: w must have N > 0 and K > 0, got shape ({N}, {K})")
    if K > 1 and strides[1] != dt.itemsize:
        raise ValueError(f"matmul: w rows must be contiguous (last stride {dt.itemsize}), got strides "
                         f"{strides}")
    ldw = strides[0] // dt.itemsize if N > 1 else K
    if ldw < K or strides[0] % dt.itemsize:
        raise ValueError(f"matmul: w row stride must be a multiple of {dt.itemsize} bytes and >= K, got "
                         f"strides {strides}")
    return w, N, K, dt, ldw


def matmul(x, w, out=None, stream: Optional[Stream] = None, *, path: str = "auto"):
    """y[M, N] = x[M, K] @ w[N, K]^T on the GPU, fp32 accumulation (see `quanta.ops.matmul`).

    x: a GPU array (quanta Array, CAI or DLPack object) of float32, float16 or bfloat16,
    shape (M, K), (K,) or (..., K) with contiguous rows (a 2-D x may be row-strided, e.g.
    ``x[:, :K]`` of a wider array). M may be 0.
    w: a GPU array of float32, float16 or bfloat16 (x's dtype or another), shape (N, K) with
    N, K >= 1 and contiguous rows (row-strided allowed), on x's device. A NumPy w is a
    TypeError: copy it once with ``quanta.cuda.to_device(w)`` and keep the copy.
    out: optional GPU array (M, N) of float32, float16 or bfloat16 with contiguous rows,
    written in place; default a new float32 Array shaped (..., N). Returns out or that Array.
    stream: where it runs; default the stream of x when x is a quanta Array, else the
    device's default stream.
    path: "auto"; "gemv", "gemm" or "fma" force a kernel (tests, benchmarks):
      gemv  M <= 16 under "auto": a warp per two weight rows, 16-byte loads, fp32 FMA;
      gemm  M > 16, x and w both float16 or both bfloat16, sm_80+: tensor cores (mma.sync
            m16n8k16: exact products, fp32 accumulation); other dtypes raise NotImplementedError;
      fma   M > 16 otherwise (float32 or mixed dtypes): tiled fp32 FMA.
    No path rounds x or w below their own dtype: a float32 x stays float32 (pass x in w's
    16-bit dtype to get tensor cores at large M). Results are deterministic.
    """
    if path not in _MM_PATHS:
        raise ValueError(f"matmul: path must be one of {tuple(_MM_PATHS)}, got {path!r}")
    w, N, K, wdt, ldw = _w_rows(w, stream)
    x, shape, dt, ldx = _x_rows("matmul", x, K, stream)
    lead = shape[:-1]
    M = math.prod(lead)
    ldy = _out_rows("matmul", out, M, N, stream)
    mod = _device_module()
    xa, wa = asarray(x, stream), asarray(w, stream)
    if xa.device != wa.device:
        raise ValueError(f"matmul: x is on cuda:{xa.device}, w on cuda:{wa.device}")
    st = _stream_arg(stream, wa.device) if stream is not None else xa.stream
    if out is None:
        ya = Array(lead + (N,), np.float32, wa.device, st)
    else:
        ya = asarray(out, st)
        if ya.device != wa.device:
            raise ValueError(f"matmul: out is on cuda:{ya.device}, w on cuda:{wa.device}")
    if M == 0:
        return out if out is not None else ya
    mod.matmul(ya.ptr, _X_DTYPES[ya.dtype], ldy, xa.ptr, _X_DTYPES[dt], ldx, wa.ptr, _X_DTYPES[wdt], ldw,
               M, N, K, _MM_PATHS[path], wa.device, st.handle)
    return out if out is not None else ya


def matmul_path(x_dtype, w_dtype, M: int, device: Union[int, str] = 0) -> str:
    """The kernel matmul's "auto" picks for these dtypes and M on `device`."""
    xd, wd = np.dtype(x_dtype), np.dtype(w_dtype)
    for name, d in (("x_dtype", xd), ("w_dtype", wd)):
        if d not in _X_DTYPES:
            raise TypeError(f"matmul_path: {name} must be float32, float16 or bfloat16, got {d}")
    code = _device_module().matmul_path(_X_DTYPES[xd], _X_DTYPES[wd], int(M), _check_device(device))
    return {v: k for k, v in _MM_PATHS.items()}[code]


__all__ = ["Array", "CudaQuantizedTensor", "Stream", "asarray", "available", "built", "built_archs",
           "default_stream", "device_count", "devices", "driver_version", "empty", "empty_cache", "info",
           "is_device_array", "matmul", "matmul_path", "memory_stats", "qmatmul", "qmatmul_path", "require",
           "runtime_version", "selftest", "to_device", "unavailable_reason"]
