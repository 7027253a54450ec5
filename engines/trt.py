"""TensorRT and TensorRT-RTX: the flavour adapter (one place for their differences) and the runner.

`TensorRT(backend)` imports ``tensorrt`` (datacenter / Jetson) or ``tensorrt_rtx`` (RTX GPUs) and
exposes the few calls whose spelling or behaviour differs. Their differences, as handled here:

- TensorRT-RTX is strongly-typed only and JIT-compiles kernels when the engine is loaded: its
  timing cache calls are deprecated no-ops, so no timing cache is used or written for it.
- TensorRT-RTX builds ahead of time without a GPU; its plan targets a list of compute capabilities
  (default: its portable set, compute capability 8.0 and newer; or ``--target-cc``).
- Datacenter TensorRT needs the GPU it builds for; its plan runs on that compute capability only.

`open_engine_dir` validates engine.json against the package (sha256s), the installed TensorRT
version and the device's compute capability before a plan is deserialised: engines carry code.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from common import package as pkg
from engines import cuda
from engines.deform import PLUGIN as DEFORM_PLUGIN
from engines.errors import BackendUnavailable, CudaError, EngineError, EngineMismatch, InputError
from engines.manifest import (
    TensorSpec, check_package_matches, read_engine_manifest, read_package, rebuild_command,
    recorded_package_path, validate_inputs,
)

log = logging.getLogger(__name__)

INSTALL_HINTS = {
    "tensorrt": "TensorRT is not installed: on Jetson use JetPack's python3-libnvinfer; on x86 pip install "
                "tensorrt-cu12 (or --backend tensorrt-rtx with pip install tensorrt-rtx-cu12)",
    "tensorrt-rtx": "TensorRT-RTX is not installed: pip install tensorrt-rtx-cu12 (x86-64 Linux/Windows, "
                    "for RTX GPUs; or --backend tensorrt with TensorRT)",
}
MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
RTX_DEFAULT_MIN_CC = (8, 0)   # TensorRT-RTX's default (portable) engines: compute capability 8.0+


def installed_backends() -> list[str]:
    """The TensorRT flavours that import here (never raises)."""
    found = []
    for backend in MODULES:
        try:
            TensorRT(backend)
            found.append(backend)
        except BackendUnavailable:
            pass
    return found


class TensorRT:
    """The imported TensorRT flavour, its logger, and the calls that differ between flavours."""

    def __init__(self, backend: str):
        if backend not in MODULES:
            raise EngineError(f"unknown TensorRT backend {backend!r}; expected one of {sorted(MODULES)}")
        try:
            self.trt = __import__(MODULES[backend])
        except (ImportError, OSError):  # OSError: bindings present but libraries missing
            raise BackendUnavailable(INSTALL_HINTS[backend]) from None
        self.backend = backend
        self.logger = _make_logger(self.trt)

    @property
    def is_rtx(self) -> bool:
        return self.backend == "tensorrt-rtx"

    @property
    def version(self) -> str:
        return str(self.trt.__version__)

    @property
    def uses_timing_cache(self) -> bool:
        return not self.is_rtx

    def errors(self) -> list[str]:
        """Error messages logged since the last call (and clears them)."""
        out, self.logger.errors = self.logger.errors, []
        return out

    def strongly_typed_network(self, builder):
        flag = 1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return builder.create_network(flag)

    def set_targets(self, config, targets: tuple[str, ...] | None) -> Any:
        """TensorRT-RTX: set the compute capabilities to compile for; returns what engine.json records."""
        if not self.is_rtx:
            return None
        if not targets:
            return "default"
        if targets == ("current",):
            config.num_compute_capabilities = 1
            config.set_compute_capability(self.trt.ComputeCapability.CURRENT, 0)
            return "current"
        config.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            value = getattr(self.trt.ComputeCapability, "SM" + cc.replace(".", ""), None)
            if value is None or not config.set_compute_capability(value, i):
                known = [f"{m[2:-1]}.{m[-1]}" for m in self.trt.ComputeCapability.__members__ if m.startswith("SM")]
                raise EngineError(f"--target-cc {cc}: not a TensorRT-RTX {self.version} target (known: {known})")
        return list(targets)

    def runtime(self):
        return self.trt.Runtime(self.logger)

    def has_plugin(self, name: str) -> bool:
        """Load libnvinfer_plugin's creators (what the ONNX parser and plans with plugin layers need)
        and tell whether one called ``name`` is registered (e.g. ModulatedDeformConv2d)."""
        try:
            init = getattr(self.trt, "init_libnvinfer_plugins", None)
            if init is not None:
                init(self.logger, "")
            registry = self.trt.get_plugin_registry()
            creators = getattr(registry, "all_creators", None) or getattr(registry, "plugin_creator_list", [])
            return any(getattr(c, "name", None) == name for c in creators)
        except (AttributeError, RuntimeError, TypeError):
            return False


def _make_logger(trt):
    """An ILogger that keeps errors (for our messages) and sends the rest to Python logging."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))
                log.debug("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.debug("TensorRT warning: %s", msg)

    return Logger()


# ----------------------------------------------------------------------------- device checks

def parse_cc(text: str) -> tuple[int, int]:
    major, minor = str(text).split(".")
    return int(major), int(minor)


def check_device(engine: Mapping[str, Any], device: cuda.DeviceInfo, rebuild: str) -> None:
    """Refuse (EngineMismatch) a plan that was not compiled for this GPU's compute capability."""
    built = engine["device"]
    targets = built.get("targets")
    here = f"this GPU ({device.name}) has compute capability {device.sm}"
    if targets == "default":
        if device.compute_capability < RTX_DEFAULT_MIN_CC:
            raise EngineMismatch(f"engine targets TensorRT-RTX's default compute capabilities (8.0 and newer); "
                                 f"{here}", rebuild)
        return
    if targets == "current" or targets is None:
        targets = [built.get("compute_capability")]
    if device.sm not in targets:
        raise EngineMismatch(f"engine was built for compute capability {', '.join(map(str, targets))} "
                             f"(on {built.get('name') or 'a CPU-only host'}); {here}", rebuild)


# ----------------------------------------------------------------------------- the runner

@dataclass(frozen=True)
class TrtOptions:
    package: str | None = None   # the package folder; None = the path recorded in engine.json
    device: int = 0              # CUDA device index
    verify: bool = True          # check the package files' and plans' sha256 on load


class TrtEngine:
    """One TensorRT plan (one graph of a package), run on one CUDA stream. Not thread-safe.

    One execution context per optimisation profile (one profile per text-length bucket), created
    on first use; device buffers grow as needed and are reused between calls.
    """

    def __init__(self, rt: TensorRT, plan: bytes, name: str, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], profiles: list[Mapping[str, Any]]):
        self.backend, self.name, self.inputs, self.outputs = rt.backend, name, inputs, outputs
        self._rt, self._profiles = rt, profiles
        self._runtime = rt.runtime()
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise EngineError(f"{name}: TensorRT cannot deserialise the plan: {'; '.join(rt.errors()) or '?'}")
        for spec in inputs + outputs:
            dtype = np.dtype(rt.trt.nptype(self._engine.get_tensor_dtype(spec.name)))
            if dtype != spec.dtype:
                raise EngineError(f"{name}: plan tensor {spec.name!r} is {dtype}, the manifest says {spec.dtype}")
        if self._engine.num_optimization_profiles != len(profiles):
            raise EngineError(f"{name}: plan has {self._engine.num_optimization_profiles} optimisation profiles, "
                              f"engine.json lists {len(profiles)}")
        self._stream = cuda.Stream()
        self._contexts: dict[int, Any] = {}
        self._device: dict[str, cuda.DeviceBuffer] = {}
        self._host: dict[str, cuda.HostBuffer] = {}

    def _profile_index(self, feeds: Mapping[str, np.ndarray]) -> int:
        """The profile whose (low, high) token range holds the inputs' "tokens" size."""
        with_tokens = [s for s in self.inputs if "tokens" in s.shape]
        if not with_tokens:
            return 0
        spec = with_tokens[0]
        tokens = feeds[spec.name].shape[spec.shape.index("tokens")]
        for i, p in enumerate(self._profiles):
            lo, hi = p["tokens"]
            if lo <= tokens <= hi:
                return i
        ranges = [tuple(p["tokens"]) for p in self._profiles]
        raise InputError(f"{self.name}: {tokens} tokens is outside every optimisation profile {ranges}")

    def _context(self, index: int):
        if index not in self._contexts:
            ctx = self._engine.create_execution_context()
            if ctx is None or not ctx.set_optimization_profile_async(index, self._stream.handle):
                raise EngineError(f"{self.name}: cannot create a context for profile {index}: {self._rt.errors()}")
            self._stream.synchronize()
            self._contexts[index] = ctx
        return self._contexts[index]

    def _buffers(self, name: str, nbytes: int) -> tuple[cuda.DeviceBuffer, cuda.HostBuffer]:
        if name not in self._device or self._device[name].nbytes < nbytes:
            for pool in (self._device, self._host):
                if name in pool:
                    pool.pop(name).close()
            self._device[name], self._host[name] = cuda.DeviceBuffer(nbytes), cuda.HostBuffer(nbytes)
        return self._device[name], self._host[name]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = validate_inputs(self.inputs, inputs, where=self.name)
        ctx = self._context(self._profile_index(feeds))
        for name, x in feeds.items():
            if not ctx.set_input_shape(name, x.shape):
                raise InputError(f"{self.name}: input {name!r} shape {x.shape} is outside the engine's profile")
            device, host = self._buffers(name, x.nbytes)
            host.view(x.shape, x.dtype)[...] = x
            cuda.copy_to_device(device, host.view(x.shape, x.dtype), self._stream)
            ctx.set_tensor_address(name, device.ptr)
        views = {}
        for spec in self.outputs:
            shape = tuple(ctx.get_tensor_shape(spec.name))
            nbytes = int(np.prod(shape, dtype=np.int64)) * spec.dtype.itemsize
            device, host = self._buffers(spec.name, nbytes)
            ctx.set_tensor_address(spec.name, device.ptr)
            views[spec.name] = (device, host.view(shape, spec.dtype))
        if not ctx.execute_async_v3(self._stream.handle):
            raise EngineError(f"{self.name}: TensorRT execution failed: {'; '.join(self._rt.errors()) or '?'}")
        for device, view in views.values():
            cuda.copy_to_host(view, device, self._stream)
        self._stream.synchronize()
        return {name: view.copy() for name, (_, view) in views.items()}

    def close(self) -> None:
        self._contexts.clear()
        for pool in (self._device, self._host):
            for buf in pool.values():
                buf.close()
            pool.clear()
        if self._stream is not None:
            self._stream.close()
        self._engine = self._runtime = self._stream = None


# ----------------------------------------------------------------------------- engine folders

def open_engine_dir(engine_dir: Path, backend: str, opts: TrtOptions):
    """(package path, package manifest, engine manifest, text engine, detector engine), all checked."""
    engine = read_engine_manifest(engine_dir)
    if backend not in ("auto", engine["backend"]):
        raise EngineError(f"{engine_dir} holds a {engine['backend']} engine, not {backend}")
    package = Path(opts.package) if opts.package else recorded_package_path(engine_dir, engine)
    rebuild = rebuild_command(engine, engine_dir, package)
    if not (package / pkg.MANIFEST).is_file():
        raise EngineError(f"{engine_dir}: its package {package} is not there (pass package=... to load)")
    manifest = read_package(package, verify=opts.verify)
    check_package_matches(engine, manifest, package, rebuild)
    rt = TensorRT(engine["backend"])
    if rt.version != engine["tensorrt"]["version"]:
        raise EngineMismatch(f"engine was built with {engine['backend']} {engine['tensorrt']['version']}, "
                             f"but {rt.version} is installed (plans only run on the version that built them)",
                             rebuild)
    plans = {graph: _read_plan(engine_dir, engine, graph, opts.verify, rebuild) for graph in ("text", "detector")}
    if engine.get("deform_conv") == "plugin" and not rt.has_plugin(DEFORM_PLUGIN):
        raise EngineMismatch(f"engine runs its deformable convs through TensorRT's {DEFORM_PLUGIN} plugin, and "
                             f"this TensorRT's libnvinfer_plugin has none (install TensorRT's plugin library, or "
                             f"rebuild with --deform-conv gridsample)", rebuild)
    try:
        cuda.set_device(opts.device)
        device = cuda.device_info(opts.device)
    except CudaError as e:
        raise EngineError(f"{engine_dir}: running a TensorRT engine needs an NVIDIA GPU: {e}") from None
    check_device(engine, device, rebuild)
    engines = []
    for graph, plan in plans.items():
        entry = engine["graphs"][graph]
        specs = [[TensorSpec.from_dict(d) for d in entry[k]] for k in ("inputs", "outputs")]
        engines.append(TrtEngine(rt, plan, f"{engine_dir.name}/{entry['plan']}", *specs, entry["profiles"]))
    return package, manifest, engine, engines[0], engines[1]


def _read_plan(engine_dir: Path, engine: Mapping[str, Any], graph: str, verify: bool, rebuild: str) -> bytes:
    entry = engine["graphs"][graph]
    path = engine_dir / entry["plan"]
    if not path.is_file():
        raise EngineMismatch(f"{path}: plan file missing", rebuild)
    data = path.read_bytes()
    if verify:
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise EngineMismatch(f"{path}: sha256 does not match engine.json (the plan was modified)", rebuild)
    return data
