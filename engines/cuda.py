"""One checked wrapper over cuda-python's runtime API (``cuda.bindings.runtime``).

Every call goes through `_call`, which raises CudaError naming the call and the CUDA error. Memory
and streams have explicit lifetimes: `DeviceBuffer`, `HostBuffer` (pinned) and `Stream` free
themselves on `close()` or at the end of a ``with`` block (and, as a last resort, when collected).

The module imports without cuda-python and without a driver; the first call then raises
CudaError("cuda-python is not installed ...") or CudaError("no CUDA driver ...").
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from engines.errors import CudaError

try:  # import-guarded: CPU-only machines have no (usable) cuda-python
    from cuda.bindings import runtime as _rt
except ImportError:  # pragma: no cover - depends on the machine
    _rt = None

_NO_DRIVER = ("cudaErrorInsufficientDriver", "cudaErrorNoDevice", "cudaErrorInitializationError")


def _runtime():
    if _rt is None:
        raise CudaError("cuda-python is not installed: pip install cuda-python")
    return _rt


def _call(name: str, *args):
    """Run ``cuda.bindings.runtime.<name>(*args)``; return its values, raise CudaError on failure."""
    rt = _runtime()
    try:
        result = getattr(rt, name)(*args)
    except Exception as e:  # cuda-python raises (e.g. DynamicLibNotFoundError) when the driver is absent
        raise CudaError(f"{name} failed: no CUDA driver ({type(e).__name__}: {e})") from None
    err, values = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        code = getattr(err, "name", str(err))
        text = rt.cudaGetErrorString(err)[1]
        text = text.decode() if isinstance(text, bytes) else str(text)
        hint = ": no CUDA driver or no NVIDIA GPU on this machine" if code in _NO_DRIVER else ""
        raise CudaError(f"{name} failed with {code} ({int(err)}): {text}{hint}")
    return values[0] if len(values) == 1 else values


# ----------------------------------------------------------------------------- devices

@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str                          # e.g. "NVIDIA GeForce RTX 4090", "Orin"
    compute_capability: tuple[int, int]  # (major, minor), e.g. (8, 7) on Jetson Orin
    total_memory: int                  # bytes

    @property
    def sm(self) -> str:
        """Compute capability as "major.minor" (the form engine.json records)."""
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def device_count() -> int:
    return _call("cudaGetDeviceCount")


def available() -> bool:
    """True when cuda-python, a driver and at least one GPU are present (never raises)."""
    try:
        return device_count() > 0
    except CudaError:
        return False


def device_info(index: int = 0) -> DeviceInfo:
    props = _call("cudaGetDeviceProperties", index)
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(index, name, (props.major, props.minor), props.totalGlobalMem)


def set_device(index: int) -> None:
    _call("cudaSetDevice", index)


# ----------------------------------------------------------------------------- resources

class _Resource:
    """Something freed exactly once: by close(), a with block, or the garbage collector."""

    _free_call = ""

    def __init__(self, handle):
        self._handle = handle

    @property
    def closed(self) -> bool:
        return self._handle is None

    def _live(self):
        if self._handle is None:
            raise CudaError(f"{type(self).__name__} used after close()")
        return self._handle

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            _call(self._free_call, handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # never raise from a finaliser (the interpreter may be shutting down)
            pass


class Stream(_Resource):
    """A CUDA stream (``cudaStreamCreate``)."""

    _free_call = "cudaStreamDestroy"

    def __init__(self):
        super().__init__(_call("cudaStreamCreate"))

    @property
    def handle(self) -> int:
        """The stream as an integer (what TensorRT's execute_async_v3 takes)."""
        return int(self._live())

    def synchronize(self) -> None:
        _call("cudaStreamSynchronize", self._live())


class DeviceBuffer(_Resource):
    """``nbytes`` of device memory (``cudaMalloc``)."""

    _free_call = "cudaFree"

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        super().__init__(_call("cudaMalloc", max(self.nbytes, 1)))

    @property
    def ptr(self) -> int:
        return int(self._live())


class HostBuffer(_Resource):
    """``nbytes`` of pinned host memory (``cudaMallocHost``), viewable as a numpy array."""

    _free_call = "cudaFreeHost"

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        super().__init__(_call("cudaMallocHost", max(self.nbytes, 1)))

    @property
    def ptr(self) -> int:
        return int(self._live())

    def view(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A numpy array over the first bytes of the buffer (valid until close())."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes > self.nbytes:
            raise CudaError(f"HostBuffer of {self.nbytes} bytes cannot hold {shape} {dtype} ({nbytes} bytes)")
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype, count=nbytes // dtype.itemsize).reshape(shape)


# ----------------------------------------------------------------------------- copies

def _kind(name: str):
    return getattr(_runtime().cudaMemcpyKind, name)


def _host_ptr(array: np.ndarray) -> int:
    if not array.flags.c_contiguous:
        raise CudaError("memcpy needs a C-contiguous host array (use np.ascontiguousarray)")
    return array.ctypes.data


def copy_to_device(dst: DeviceBuffer, src: np.ndarray, stream: Stream) -> None:
    """Asynchronous host -> device copy of ``src`` into the start of ``dst``."""
    if src.nbytes > dst.nbytes:
        raise CudaError(f"copy of {src.nbytes} bytes into a DeviceBuffer of {dst.nbytes}")
    _call("cudaMemcpyAsync", dst.ptr, _host_ptr(src), src.nbytes, _kind("cudaMemcpyHostToDevice"), stream.handle)


def copy_to_host(dst: np.ndarray, src: DeviceBuffer, stream: Stream) -> None:
    """Asynchronous device -> host copy into ``dst`` (pinned for true asynchrony); sync before reading."""
    if dst.nbytes > src.nbytes:
        raise CudaError(f"copy of {dst.nbytes} bytes out of a DeviceBuffer of {src.nbytes}")
    _call("cudaMemcpyAsync", _host_ptr(dst), src.ptr, dst.nbytes, _kind("cudaMemcpyDeviceToHost"), stream.handle)
