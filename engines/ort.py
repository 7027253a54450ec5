"""ONNX Runtime engine: runs a package's ONNX files directly (the default CPU backend).

The CPU execution provider by default, CUDA / TensorRT providers when installed and asked for;
thread counts, spinning and graph optimisation level; on the CPU provider the optimised model is
cached (key: the source file's sha256, the ORT version, the level and the CPU architecture) and
reused on the next load. When the manifest names ``graphs.detector.cpu_file`` (the package's CPU
INT8 variant), the CPU provider runs that file for the detector. ``open_package`` opens a
package's two graphs on ONNX Runtime or on OpenVINO (``engines.openvino``).

On an x86 CPU without VNNI (``int8_pairs_saturate``) the CPU file's DynamicQuantizeMatMul weights
are loaded as uint8 (w + 128, zero point + 128: the same numbers), so that ONNX Runtime runs its
U8U8 kernel (int16 widening, exact) instead of U8S8, whose vpmaddubsw saturates pairs of uint8
activation x int8 weight products: on an AVX2-only EPYC the golden-fine INT8 CPU file kept 0.700 of
FP32's top-5 boxes (max |logit diff| 2.07) as stored and 0.95 (0.36) with uint8 weights. For the
same reason an INT8 package's Q/DQ graphs run there with ONNX Runtime's Q/DQ fusion off
(``session.disable_quant_qdq``): each DequantizeLinear -> float op -> QuantizeLinear as written,
no saturating int8 kernel. On the shipped fiber-nano INT8 detector, relative to its reference
outputs: fused 7.0e-2 (centerness), unfused 3.7e-2, at about the same speed (35.5 vs 37.2 ms).

On a small CPU shared with other work, spinning threads steal the cores the other threads need:
``allow_spinning=False`` halved the fiber-nano detector's latency on a busy 2-core machine.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from common import package as pkg
from common.atomic import atomic_write_json
from engines.errors import BackendUnavailable, EngineError
from engines.manifest import TensorSpec, graph_file, graph_specs, validate_inputs
from engines.openvino import OpenVinoEngine, OpenVinoOptions, openvino_options
from engines.options import choice, default_cache_dir, first_line, int8_pairs_saturate

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(bool)": "bool"}
_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_LEVELS = ("disable", "basic", "extended", "all")


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
        choice("device", self.device, _PROVIDERS)
        choice("graph_optimization", self.graph_optimization, _LEVELS)


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
                 opts: OrtOptions = OrtOptions(), sha256: str | None = None, uint8_weights: bool = False,
                 unfused_qdq: bool = False):
        import onnxruntime as ort

        self.path, self.inputs, self.outputs, self.opts = Path(path), inputs, outputs, opts
        self.uint8_weights = uint8_weights    # DynamicQuantizeMatMul weights loaded as uint8 (module docstring)
        self.unfused_qdq = unfused_qdq        # Q/DQ pairs not fused into int8 kernels (module docstring)
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
        if self.unfused_qdq:
            so.add_session_config_entry("session.disable_quant_qdq", "1")
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
                return ort.InferenceSession(self._source(), so, providers=providers)
            if not _cache_valid(*cache):
                self._write_cache(ort, *cache)
            self.cached_model = cache[0]
            so = self._session_options(ort, self.opts.graph_optimization)  # "all": + layout passes, per CPU
            return ort.InferenceSession(str(cache[0]), so, providers=providers)
        except EngineError:
            raise
        except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise EngineError(f"{self.path}: onnxruntime cannot load it: {first_line(e)}") from None

    def _cache_paths(self, ort, sha256: str | None) -> tuple[Path, Path] | None:
        """(cached model, sidecar json), or None when caching does not apply (off, not CPU, no optimisation)."""
        if self.opts.cache_dir == "" or self.opts.device != "cpu" or self.opts.graph_optimization == "disable":
            return None
        root = Path(self.opts.cache_dir) if self.opts.cache_dir else default_cache_dir() / "ort"
        sha256 = sha256 or pkg.sha256_file(self.path)
        key = f"{sha256[:32]}-ort{ort.__version__}-{_cache_level(self.opts.graph_optimization)}-{platform.machine()}"
        key += "-u8w" if self.uint8_weights else ""
        key += "-noqdq" if self.unfused_qdq else ""
        return root / f"{key}.onnx", root / f"{key}.json"

    def _write_cache(self, ort, model: Path, sidecar: Path) -> None:
        """Optimise up to "extended" (portable across CPUs; "all" adds CPU-specific layouts at load)."""
        model.parent.mkdir(parents=True, exist_ok=True)
        tmp = model.with_name(f".{model.name}.{os.getpid()}.tmp")
        so = self._session_options(ort, _cache_level(self.opts.graph_optimization))
        so.optimized_model_filepath = str(tmp)
        try:
            ort.InferenceSession(self._source(), so, providers=["CPUExecutionProvider"])
            os.replace(tmp, model)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        atomic_write_json(sidecar, {"source": str(self.path), "sha256": pkg.sha256_file(model)})

    def _source(self) -> str | bytes:
        """The file's path, or its bytes with uint8 DynamicQuantizeMatMul weights."""
        if not self.uint8_weights:
            return str(self.path)
        import onnx

        model = onnx.load(str(self.path))
        uint8_dynamic_weights(model)
        return model.SerializeToString()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = validate_inputs(self.inputs, inputs, where=self.path.name)
        names = [s.name for s in self.outputs]
        try:
            values = self._session.run(names, feeds)
        except Exception as e:
            raise EngineError(f"{self.path.name}: onnxruntime failed: {first_line(e)}") from None
        return dict(zip(names, values))

    def close(self) -> None:
        self._session = None


def uint8_dynamic_weights(model) -> int:
    """Store every DynamicQuantizeMatMul's int8 weight and zero point (initializer or Constant) as
    uint8 + 128, in place: the same values, run by ONNX Runtime's U8U8 kernel. Returns the ops changed."""
    from onnx import numpy_helper

    tensors = {i.name: i for i in model.graph.initializer}
    tensors.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                    if n.op_type == "Constant" and n.attribute[0].name == "value"})
    done: set[str] = set()
    count = 0
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeMatMul" or len(node.input) < 4 or not node.input[3]:
            continue
        for name in (node.input[1], node.input[3]):
            t = tensors[name]
            value = numpy_helper.to_array(t)
            if name in done or value.dtype != np.int8:
                continue
            t.CopyFrom(numpy_helper.from_array((value.astype(np.int16) + 128).astype(np.uint8), t.name))
            done.add(name)
        count += 1
    return count


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
            cpu_file = path.name == manifest["graphs"][graph].get("cpu_file")
            saturates = opts.device == "cpu" and int8_pairs_saturate()
            engines.append(OrtEngine(path, *specs, opts, sha256=manifest["files"][path.name]["sha256"],
                                     uint8_weights=cpu_file and saturates,
                                     unfused_qdq=saturates and not cpu_file and manifest.get("precision") == "int8"))
    return tuple(engines)
