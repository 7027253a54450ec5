"""Engines that run a package's ONNX files directly: ONNX Runtime (default) and OpenVINO (optional).

ONNX Runtime: the CPU execution provider by default, CUDA / TensorRT providers when installed and
asked for; thread counts, spinning and graph optimisation level; on the CPU provider the optimised
model is cached (key: the source file's sha256, the ORT version, the level and the CPU
architecture) and reused on the next load. When the manifest names ``graphs.detector.cpu_file``
(the package's CPU INT8 variant), the CPU provider runs that file for the detector.

OpenVINO reads the same ONNX files (the Q/DQ INT8 ``detector.onnx`` too, with int8 kernels). With
``static_shapes`` every distinct set of input shapes (batch x token bucket) gets its own model
compiled for those static shapes, on first use: OpenVINO's CPU plugin then folds all shape
arithmetic and picks static kernels (the fiber-nano INT8 detector runs ~1.3x faster than compiled
with dynamic shapes). OpenVINO 2026.4 has bugs on that path for some graphs (a segfault while
compiling the toy test detector; wrong FPN convolutions in the fiber-tiny-test INT8 detector with
snippets off), so it is not the blanket default: ``static_shapes=None`` follows the package
manifest's ``graphs.<graph>.openvino.static_shapes``, which compress.export sets only after
OpenVINO reproduced the graph's reference outputs with static shapes in a child process
(``check_against_reference``).

On a small CPU shared with other work, spinning threads steal the cores the other threads need:
``allow_spinning=False`` (ONNX Runtime) halved the fiber-nano detector's latency on a busy 2-core
machine. OpenVINO's ``performance_hint="LATENCY"`` (default) runs one stream.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from common import package as pkg
from common.atomic import atomic_write_json
from engines.errors import BackendUnavailable, EngineError
from engines.manifest import TensorSpec, graph_file, graph_specs, validate_inputs

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(bool)": "bool"}
_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_LEVELS = ("disable", "basic", "extended", "all")
_OV_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
OV_MAX_SHAPES = 8     # static_shapes: compiled models kept per engine (least recently used dropped)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fiber-edge"


@dataclass(frozen=True)
class OrtOptions:
    device: str = "cpu"                  # execution provider: "cpu" | "cuda" | "tensorrt"
    intra_op_threads: int = 0            # threads inside an op; 0 = onnxruntime's default
    inter_op_threads: int = 0            # threads across ops; 0 = onnxruntime's default
    graph_optimization: str = "all"      # "disable" | "basic" | "extended" | "all"
    allow_spinning: bool = True          # session.intra_op/inter_op.allow_spinning: idle threads busy-wait
                                         # (ORT's default; False is faster and steadier on a shared CPU)
    cache_dir: str | None = None         # optimised-model cache: None = ~/.cache/fiber-edge/ort, "" = off
    use_cpu_file: bool | None = None     # run graphs.detector.cpu_file: None = when named and device "cpu"
    verify: bool = True                  # check every package file's sha256 on load

    def __post_init__(self):
        _choice("device", self.device, _PROVIDERS)
        _choice("graph_optimization", self.graph_optimization, _LEVELS)


@dataclass(frozen=True)
class OpenVinoOptions:
    device: str = "CPU"                  # OpenVINO device name
    threads: int = 0                     # INFERENCE_NUM_THREADS; 0 = OpenVINO's default
    precision_hint: str | None = "f32"   # INFERENCE_PRECISION_HINT: "f32" | "bf16" | "f16" | None (device
                                         # default: bf16 on AMX CPUs, which changes FP32 results by ~1e-2)
    performance_hint: str | None = "LATENCY"  # PERFORMANCE_HINT: "LATENCY" | "THROUGHPUT" |
                                         # "CUMULATIVE_THROUGHPUT" | None (OpenVINO's default)
    num_streams: int | None = None       # NUM_STREAMS; None = what the performance hint picks (LATENCY: 1)
    static_shapes: bool | None = None    # compile per distinct input shapes (batch, tokens) on first use;
                                         # None = graphs.<graph>.openvino.static_shapes of the manifest
    snippets: bool | None = None         # SNIPPETS_MODE (fused kernels); None = OpenVINO's default (on)
    cache_dir: str | None = None         # compiled-model cache: None = ~/.cache/fiber-edge/openvino, "" = off
    use_cpu_file: bool = False           # default: the same (Q/DQ) detector.onnx that TensorRT builds
    verify: bool = True                  # check every package file's sha256 on load

    def __post_init__(self):
        if self.precision_hint is not None:
            _choice("precision_hint", self.precision_hint, ("f32", "bf16", "f16"))
        if self.performance_hint is not None:
            _choice("performance_hint", self.performance_hint, _OV_HINTS)
        if self.num_streams is not None and (not isinstance(self.num_streams, int) or self.num_streams < 1):
            raise EngineError(f"option num_streams={self.num_streams!r} must be an integer >= 1 or None")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise EngineError(f"option threads={self.threads!r} must be an integer >= 0")


def _choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise EngineError(f"option {name}={value!r} is not one of {sorted(allowed)}")


def option_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def make_options(cls, opts: Mapping[str, Any], backend: str):
    """``cls(**opts)`` with one clear EngineError for an unknown option name."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise EngineError(f"unknown option(s) {unknown} for backend {backend!r}; known: {known}")
    return cls(**opts)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _check_session_io(path: Path, which: str, specs: list[TensorSpec], actual: list[tuple[str, str, int]]) -> None:
    """The file's own inputs/outputs (name, dtype, rank) must be the manifest's."""
    want = {s.name: (s.dtype.name, len(s.shape)) for s in specs}
    got = {name: (dtype, rank) for name, dtype, rank in actual}
    if want != got:
        raise EngineError(f"{path}: {which} are {got} (name: (dtype, rank)) but the manifest says {want}")


# ----------------------------------------------------------------------------- ONNX Runtime

class OrtEngine:
    """One ONNX file in an onnxruntime.InferenceSession. ``run`` takes and returns numpy arrays."""

    backend = "onnxruntime"

    def __init__(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 opts: OrtOptions = OrtOptions(), sha256: str | None = None):
        import onnxruntime as ort

        self.path, self.inputs, self.outputs, self.opts = Path(path), inputs, outputs, opts
        providers = _PROVIDERS[opts.device]
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendUnavailable(f"onnxruntime {ort.__version__} has no {missing[0]} (device={opts.device!r});"
                                     f" install onnxruntime-gpu with CUDA/TensorRT, or use device='cpu'")
        self.cached_model: Path | None = None
        self._session = self._open(ort, providers, sha256)
        if self._session.get_providers()[0] != providers[0]:
            raise BackendUnavailable(f"{self.path}: onnxruntime fell back from {providers[0]} to "
                                     f"{self._session.get_providers()[0]}")
        io = [(i.name, _ORT_DTYPES.get(i.type, i.type), len(i.shape)) for i in self._session.get_inputs()]
        _check_session_io(self.path, "inputs", inputs, io)
        io = [(o.name, _ORT_DTYPES.get(o.type, o.type), len(o.shape)) for o in self._session.get_outputs()]
        _check_session_io(self.path, "outputs", outputs, io)

    def _session_options(self, ort, level: str):
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.opts.intra_op_threads
        so.inter_op_num_threads = self.opts.inter_op_threads
        spin = "1" if self.opts.allow_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        return so

    def _open(self, ort, providers: list[str], sha256: str | None):
        cache = self._cache_paths(ort, sha256)
        try:
            if not cache:
                so = self._session_options(ort, self.opts.graph_optimization)
                return ort.InferenceSession(str(self.path), so, providers=providers)
            if not _cache_valid(*cache):
                self._write_cache(ort, *cache)
            self.cached_model = cache[0]
            so = self._session_options(ort, self.opts.graph_optimization)  # "all": + layout passes, per CPU
            return ort.InferenceSession(str(cache[0]), so, providers=providers)
        except EngineError:
            raise
        except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise EngineError(f"{self.path}: onnxruntime cannot load it: {_first_line(e)}") from None

    def _cache_paths(self, ort, sha256: str | None) -> tuple[Path, Path] | None:
        """(cached model, sidecar json), or None when caching does not apply (off, not CPU, no optimisation)."""
        if self.opts.cache_dir == "" or self.opts.device != "cpu" or self.opts.graph_optimization == "disable":
            return None
        root = Path(self.opts.cache_dir) if self.opts.cache_dir else default_cache_dir() / "ort"
        sha256 = sha256 or pkg.sha256_file(self.path)
        key = f"{sha256[:32]}-ort{ort.__version__}-{_cache_level(self.opts.graph_optimization)}-{platform.machine()}"
        return root / f"{key}.onnx", root / f"{key}.json"

    def _write_cache(self, ort, model: Path, sidecar: Path) -> None:
        """Optimise up to "extended" (portable across CPUs; "all" adds CPU-specific layouts at load)."""
        model.parent.mkdir(parents=True, exist_ok=True)
        tmp = model.with_name(f".{model.name}.{os.getpid()}.tmp")
        so = self._session_options(ort, _cache_level(self.opts.graph_optimization))
        so.optimized_model_filepath = str(tmp)
        try:
            ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
            os.replace(tmp, model)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        atomic_write_json(sidecar, {"source": str(self.path), "sha256": pkg.sha256_file(model)})

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = validate_inputs(self.inputs, inputs, where=self.path.name)
        names = [s.name for s in self.outputs]
        try:
            values = self._session.run(names, feeds)
        except Exception as e:
            raise EngineError(f"{self.path.name}: onnxruntime failed: {_first_line(e)}") from None
        return dict(zip(names, values))

    def close(self) -> None:
        self._session = None


def _cache_level(level: str) -> str:
    return "extended" if level == "all" else level


def _cache_valid(model: Path, sidecar: Path) -> bool:
    """A cached model is reused only when it is complete and unmodified (sha256 in its sidecar)."""
    if not (model.is_file() and sidecar.is_file()):
        return False
    try:
        return json.loads(sidecar.read_text()).get("sha256") == pkg.sha256_file(model)
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------- OpenVINO

class OpenVinoEngine:
    """One ONNX file compiled by OpenVINO (``openvino`` package). Same interface as OrtEngine.

    With ``static_shapes`` the model is compiled for each distinct set of input shapes on first
    use (at most OV_MAX_SHAPES kept); otherwise once, with the file's dynamic dims.
    """

    backend = "openvino"

    def __init__(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 opts: OpenVinoOptions = OpenVinoOptions()):
        try:
            import openvino as ov
        except ImportError:
            raise BackendUnavailable("OpenVINO is not installed: pip install openvino") from None
        self.path, self.inputs, self.outputs, self.opts = Path(path), inputs, outputs, opts
        self._core = ov.Core()
        if opts.cache_dir != "":
            cache = Path(opts.cache_dir) if opts.cache_dir else default_cache_dir() / "openvino"
            self._core.set_property({"CACHE_DIR": str(cache)})
        try:
            self._model = self._core.read_model(str(self.path))
        except Exception as e:
            raise EngineError(f"{self.path}: OpenVINO cannot load it: {_first_line(e)}") from None
        names = {name for o in self._model.outputs for name in o.get_names()}
        missing = [s.name for s in outputs if s.name not in names]
        if missing:
            raise EngineError(f"{self.path}: outputs {missing} of the manifest are not in the file")
        self._requests: dict[tuple, tuple[Any, Any, dict[str, Any]]] = {}  # shapes -> (compiled, request,
                                                                            # ports), LRU order
        if not opts.static_shapes:
            self._requests[()] = self._compile(self._model)

    def config(self) -> dict[str, Any]:
        """The OpenVINO compile properties these options give."""
        config: dict[str, Any] = {}
        if self.opts.threads:
            config["INFERENCE_NUM_THREADS"] = self.opts.threads
        if self.opts.precision_hint:
            config["INFERENCE_PRECISION_HINT"] = self.opts.precision_hint
        if self.opts.performance_hint:
            config["PERFORMANCE_HINT"] = self.opts.performance_hint
        if self.opts.num_streams is not None:
            config["NUM_STREAMS"] = self.opts.num_streams
        if self.opts.snippets is False:
            config["SNIPPETS_MODE"] = "DISABLE"
        return config

    def _compile(self, model) -> tuple[Any, Any, dict[str, Any]]:
        try:
            compiled = self._core.compile_model(model, self.opts.device, self.config())
        except Exception as e:
            raise EngineError(f"{self.path}: OpenVINO cannot compile it: {_first_line(e)}") from None
        return compiled, compiled.create_infer_request(), {o.get_any_name(): o for o in compiled.outputs}

    def _request(self, feeds: Mapping[str, np.ndarray]) -> tuple[Any, Any, dict[str, Any]]:
        key = tuple((name, x.shape) for name, x in sorted(feeds.items())) if self.opts.static_shapes else ()
        if key not in self._requests:
            model = self._model.clone()
            try:
                model.reshape({name: list(shape) for name, shape in key})
            except Exception as e:
                raise EngineError(f"{self.path.name}: OpenVINO cannot reshape it to "
                                  f"{dict(key)}: {_first_line(e)}") from None
            self._requests[key] = self._compile(model)
            while len(self._requests) > OV_MAX_SHAPES:
                self._requests.pop(next(iter(self._requests)))
        self._requests[key] = self._requests.pop(key)        # most recently used last
        return self._requests[key]

    @property
    def compiled_shapes(self) -> int:
        """How many compiled models (input-shape sets) the engine holds."""
        return len(self._requests)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = validate_inputs(self.inputs, inputs, where=self.path.name)
        _, request, ports = self._request(feeds)
        try:
            result = request.infer(feeds)
        except Exception as e:
            raise EngineError(f"{self.path.name}: OpenVINO failed: {_first_line(e)}") from None
        return {s.name: np.array(result[ports[s.name]], copy=True) for s in self.outputs}

    def close(self) -> None:
        self._requests = {}
        self._model = None


# ----------------------------------------------------------------------------- packages

def open_package(package: Path, manifest: Mapping[str, Any], backend: str, opts: OrtOptions | OpenVinoOptions):
    """(text engine, detector engine) for a verified package, on "onnxruntime" or "openvino"."""
    use_cpu = opts.use_cpu_file if opts.use_cpu_file is not None else opts.device == "cpu"
    engines = []
    for graph in ("text", "detector"):
        path = graph_file(package, manifest, graph, cpu=use_cpu)
        specs = graph_specs(manifest, graph)
        if backend == "openvino":
            engines.append(OpenVinoEngine(path, *specs, openvino_options(opts, manifest, graph)))
        else:
            engines.append(OrtEngine(path, *specs, opts, sha256=manifest["files"][path.name]["sha256"]))
    return tuple(engines)


def openvino_options(opts: OpenVinoOptions, manifest: Mapping[str, Any], graph: str) -> OpenVinoOptions:
    """``opts`` with ``static_shapes`` decided: the caller's, else what the manifest validated."""
    if opts.static_shapes is not None:
        return opts
    checked = (manifest["graphs"].get(graph) or {}).get("openvino") or {}
    return replace(opts, static_shapes=bool(checked.get("static_shapes", False)))


def check_against_reference(path: str | Path, reference: str | Path, **opts: Any) -> dict[str, float]:
    """Max |out - ref| / (1 + max |ref|) per output of the ONNX file ``path`` on OpenVINO (``opts``:
    OpenVinoOptions fields) for the inputs stored in the npz ``reference`` (its other arrays are the
    expected outputs). compress.export runs this in a child process: a compiler crash must not take
    the export down."""
    import openvino as ov

    with np.load(reference, allow_pickle=False) as z:
        ref = {k: z[k] for k in z.files}
    names = [i.get_any_name() for i in ov.Core().read_model(str(path)).inputs]
    inputs = [TensorSpec(n, tuple(ref[n].shape), ref[n].dtype) for n in names]
    outputs = [TensorSpec(n, tuple(v.shape), v.dtype) for n, v in ref.items() if n not in names]
    engine = OpenVinoEngine(Path(path), inputs, outputs, make_options(OpenVinoOptions, opts, "openvino"))
    got = engine.run({n: ref[n] for n in names})
    engine.close()
    return {s.name: float(np.max(np.abs(got[s.name].astype(np.float64) - ref[s.name]))
                          / (1.0 + np.max(np.abs(ref[s.name])))) for s in outputs}
