"""OpenVINO engine: runs a package's ONNX files (the Q/DQ INT8 ``detector.onnx`` too, with int8 kernels).

With ``static_shapes`` every distinct set of input shapes (batch x token bucket) gets its own model
compiled for those static shapes, on first use: OpenVINO's CPU plugin then folds all shape
arithmetic and picks static kernels (the fiber-nano INT8 detector runs ~1.3x faster than compiled
with dynamic shapes). OpenVINO 2026.4 has bugs on that path for some graphs (a segfault while
compiling the toy test detector; wrong FPN convolutions in the fiber-tiny-test INT8 detector with
snippets off), so it is not the blanket default: ``static_shapes=None`` follows the package
manifest's ``graphs.<graph>.openvino.static_shapes``, which compress.export sets only after
OpenVINO reproduced the graph's reference outputs with static shapes in a child process
(``check_against_reference``). ``performance_hint="LATENCY"`` (default) runs one stream.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from engines.errors import BackendUnavailable, EngineError
from engines.manifest import TensorSpec, validate_inputs
from engines.options import choice, default_cache_dir, first_line, make_options

_OV_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
OV_MAX_SHAPES = 8     # static_shapes: compiled models kept per engine (least recently used dropped)


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
            choice("precision_hint", self.precision_hint, ("f32", "bf16", "f16"))
        if self.performance_hint is not None:
            choice("performance_hint", self.performance_hint, _OV_HINTS)
        if self.num_streams is not None and (not isinstance(self.num_streams, int) or self.num_streams < 1):
            raise EngineError(f"option num_streams={self.num_streams!r} must be an integer >= 1 or None")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise EngineError(f"option threads={self.threads!r} must be an integer >= 0")


def openvino_core():
    """An ``openvino.Core`` whose ONNX reader knows ``DeformConv`` (engines.deform: OpenVINO's own
    DeformableConvolution-8, ``bilinear_interpolation_pad=True``). Every ONNX file goes through one."""
    import openvino as ov

    from engines.deform import openvino_extensions

    core = ov.Core()
    for extension in openvino_extensions():
        core.add_extension(extension)
    return core


def cache_folder(config: Mapping[str, Any]) -> str:
    """The sub-folder of the compiled-model cache for the compile properties ``config``.

    OpenVINO 2026.4's cache key leaves INFERENCE_PRECISION_HINT out for a Q/DQ model: a bf16
    compile of the INT8 detector imported the blob of an earlier f32 compile and corrupted the heap
    (a crash at the next inference or at close, on AMX). Each set of properties gets its own folder."""
    if not config:
        return "default"
    text = ",".join(f"{k}={v}" for k, v in sorted(config.items()))
    precision = str(config.get("INFERENCE_PRECISION_HINT", "default")).lower()
    return f"{precision}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


class OpenVinoEngine:
    """One ONNX file compiled by OpenVINO (``openvino`` package). Same interface as OrtEngine.

    With ``static_shapes`` the model is compiled for each distinct set of input shapes on first
    use (at most OV_MAX_SHAPES kept); otherwise once, with the file's dynamic dims.
    """

    backend = "openvino"

    def __init__(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 opts: OpenVinoOptions = OpenVinoOptions()):
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise BackendUnavailable("OpenVINO is not installed: pip install openvino") from None
        self.path, self.inputs, self.outputs, self.opts = Path(path), inputs, outputs, opts
        self._core = openvino_core()
        if opts.cache_dir != "":
            root = Path(opts.cache_dir) if opts.cache_dir else default_cache_dir() / "openvino"
            self._core.set_property({"CACHE_DIR": str(root / cache_folder(self.config()))})
        try:
            self._model = self._core.read_model(str(self.path))
        except Exception as e:
            raise EngineError(f"{self.path}: OpenVINO cannot load it: {first_line(e)}") from None
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
            raise EngineError(f"{self.path}: OpenVINO cannot compile it: {first_line(e)}") from None
        return compiled, compiled.create_infer_request(), {o.get_any_name(): o for o in compiled.outputs}

    def _request(self, feeds: Mapping[str, np.ndarray]) -> tuple[Any, Any, dict[str, Any]]:
        key = tuple((name, x.shape) for name, x in sorted(feeds.items())) if self.opts.static_shapes else ()
        if key not in self._requests:
            model = self._model.clone()
            try:
                model.reshape({name: list(shape) for name, shape in key})
            except Exception as e:
                raise EngineError(f"{self.path.name}: OpenVINO cannot reshape it to "
                                  f"{dict(key)}: {first_line(e)}") from None
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
            raise EngineError(f"{self.path.name}: OpenVINO failed: {first_line(e)}") from None
        return {s.name: np.array(result[ports[s.name]], copy=True) for s in self.outputs}

    def close(self) -> None:
        self._requests = {}
        self._model = None


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
    with np.load(reference, allow_pickle=False) as z:
        ref = {k: z[k] for k in z.files}
    names = [i.get_any_name() for i in openvino_core().read_model(str(path)).inputs]
    inputs = [TensorSpec(n, tuple(ref[n].shape), ref[n].dtype) for n in names]
    outputs = [TensorSpec(n, tuple(v.shape), v.dtype) for n, v in ref.items() if n not in names]
    engine = OpenVinoEngine(Path(path), inputs, outputs, make_options(OpenVinoOptions, opts, "openvino"))
    got = engine.run({n: ref[n] for n in names})
    engine.close()
    return {s.name: float(np.max(np.abs(got[s.name].astype(np.float64) - ref[s.name]))
                          / (1.0 + np.max(np.abs(ref[s.name])))) for s in outputs}
