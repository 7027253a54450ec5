"""Engines: ONNX Runtime / OpenVINO sessions and TensorRT plans behind one interface (torch-free).

    import engines
    with engines.load("models/fiber-nano-int8") as e:               # a package: ONNX Runtime (CPU)
        hidden = e.encode_text(input_ids, attention_mask)            # [B, T, D] float32
        out = e.detect(image, hidden, attention_mask)                # boxes, token_logits, centerness
    engines.load("runs/engines/fiber-nano-int8")                     # an engine folder: TensorRT

``load(path, backend="auto", **opts)``: ``path`` is a model package (manifest.json) or an engine
folder (engine.json + TensorRT plans, or a CPU engine of ONNX Runtime / OpenVINO, built by
``python -m engines.build``). Backends: "auto", "onnxruntime",
"openvino", "tensorrt", "tensorrt-rtx". ``opts`` are the fields of OrtOptions / OpenVinoOptions /
TrtOptions; an unknown option is an error. Every failure is an EngineError subclass
(engines.errors) with one clear message.

"auto": TensorRT for an engine folder; for a package the CPU backend its manifest names in
``graphs.detector.cpu_backend`` (compress.export writes "openvino" for INT8 packages: OpenVINO runs
the Q/DQ detector.onnx with int8 kernels, measured fastest on x86 CPUs) when OpenVINO is installed,
otherwise ONNX Runtime. "auto" takes the options of both CPU backends and gives each its own
(``intra_op_threads`` and ``threads`` stand for each other); ``auto_cpu_backend`` tells which
backend and options without loading anything. ``load(package, "auto", fastest=True)`` instead times
every CPU path this machine can run for the package and opens the fastest (engines.autotune; the
choice is remembered per machine, and ``PackageEngines.path_choice`` says what was measured);
``runtime.detect`` does this by default.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from common import package as pkg
from engines.errors import (
    BackendUnavailable, BuildError, CudaError, EngineError, EngineMismatch, InputError, PackageInvalid,
)
from engines.deform import package_has_deform_conv
from engines.manifest import ENGINE_JSON, TensorSpec, read_package

__all__ = [
    "load", "auto_cpu_backend", "Engine", "PackageEngines", "TensorSpec", "BACKENDS", "EngineError",
    "BackendUnavailable", "BuildError", "CudaError", "EngineMismatch", "InputError", "PackageInvalid",
]

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt", "tensorrt-rtx")
_ALIASES = {"ort": "onnxruntime", "trt": "tensorrt", "trt-rtx": "tensorrt-rtx"}


class Engine(Protocol):
    """One graph of a package on one backend: numpy in, numpy out (device buffers stay inside)."""

    backend: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@dataclass
class PackageEngines:
    """The text and detector engines of one package, its manifest and (TensorRT) the engine manifest."""

    text: Engine
    detector: Engine
    manifest: dict[str, Any]
    package: Path
    backend: str
    engine_manifest: dict[str, Any] | None = field(default=None)
    deform_conv: str | None = field(default=None)  # how the DyHead's DeformConv nodes run: "native" (ONNX
                                                   # Runtime's kernel / OpenVINO's DeformableConvolution-8),
                                                   # "plugin" / "gridsample" (TensorRT, engine.json); None: none
    path_choice: Any = field(default=None)  # engines.autotune.PathChoice when "auto" timed the CPU paths

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """int64 [B, T] ids and mask (1 = real token) -> text_hidden float32 [B, T, D]."""
        out = self.text.run({pkg.INPUT_IDS: input_ids, pkg.ATTENTION_MASK: attention_mask})
        return out[pkg.TEXT_HIDDEN]

    def detect(self, image: np.ndarray, text_hidden: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """image float32 [B, 3, S, S] (normalised, letterboxed top-left), text_hidden [B, T, D], mask int64 [B, T]
        -> boxes [B, N, 4] (xyxy, network-input pixels), token_logits [B, N, T], centerness [B, N] (logits)."""
        return self.detector.run({pkg.IMAGE: image, pkg.TEXT_HIDDEN: text_hidden, pkg.ATTENTION_MASK: attention_mask})

    def close(self) -> None:
        for engine in (self.text, self.detector):
            engine.close()

    def __enter__(self) -> "PackageEngines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | Path, backend: str = "auto", **opts: Any) -> PackageEngines:
    """Open a package (ONNX Runtime / OpenVINO) or an engine folder (TensorRT), fully validated."""
    path = Path(path)
    backend = _ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise EngineError(f"backend {backend!r} is not one of {list(BACKENDS)}")
    if (path / ENGINE_JSON).is_file():
        return _load_engine_dir(path, backend, opts)
    if not path.exists():
        raise EngineError(f"{path}: does not exist (expected a model package or an engine folder)")
    if not (path / pkg.MANIFEST).is_file():
        raise EngineError(f"{path}: neither a model package ({pkg.MANIFEST}) nor an engine folder ({ENGINE_JSON})")
    if backend in ("tensorrt", "tensorrt-rtx"):
        raise EngineError(_build_first(path, backend))
    return _load_package(path, backend, opts)


def _build_first(package: Path, backend: str) -> str:
    """Why a package cannot run on TensorRT as it is, with a build command for the TensorRT
    flavour that is installed here (not the one asked for when only the other one is)."""
    from engines.trt import INSTALL_HINTS, installed_backends

    found = installed_backends()
    build = "python -m engines.build --package {} --backend {} --out ENGINE_DIR"
    if backend in found:
        return f"{package} is a model package; build a {backend} engine from it first: {build.format(package, backend)}"
    if found:
        return (f"{package} is a model package, and {backend} is not installed here but {found[0]} is: "
                f"build a {found[0]} engine from it first: {build.format(package, found[0])}")
    return (f"{package} is a model package; build a {backend} engine from it first, on the target device: "
            f"{build.format(package, backend)} (here: {INSTALL_HINTS[backend]})")


def _load_package(path: Path, backend: str, opts: Mapping[str, Any]) -> PackageEngines:
    from engines import autotune

    opts = dict(opts)
    fastest = bool(opts.pop("fastest", False))
    runs = opts.pop("runs", None)
    manifest = read_package(path, verify=bool(opts.get("verify", True)))
    if backend == "auto" and fastest and set(opts) <= autotune.TUNABLE_OPTIONS:
        return autotune.fastest_cpu_path(
            path, manifest, opts, lambda p, o: _open_package(path, manifest, p.backend, o), runs=runs)
    if backend == "auto":
        backend, opts = auto_cpu_backend(manifest, opts)
    return _open_package(path, manifest, backend, opts)


def _open_package(path: Path, manifest: dict[str, Any], backend: str, opts: Mapping[str, Any]) -> PackageEngines:
    from engines import openvino, ort
    from engines.options import make_options

    cls = openvino.OpenVinoOptions if backend == "openvino" else ort.OrtOptions
    options = make_options(cls, opts, backend)
    text, detector = ort.open_package(path, manifest, backend, options)
    return PackageEngines(text, detector, manifest, path, backend,
                          deform_conv="native" if package_has_deform_conv(manifest) else None)


def auto_cpu_backend(manifest: Mapping[str, Any], opts: Mapping[str, Any] | None = None
                     ) -> tuple[str, dict[str, Any]]:
    """(backend, its options) that "auto" uses for a package with ``manifest`` and options ``opts``.

    "auto" takes the options of both CPU backends (OrtOptions and OpenVinoOptions fields; anything
    else is an error) and hands each backend its own. OpenVINO when ``graphs.detector.cpu_backend``
    is "openvino", the ``openvino`` module is installed and the caller did not ask for something
    only ONNX Runtime does (``use_cpu_file=True``, a GPU ``device``); ONNX Runtime otherwise.
    ``intra_op_threads`` and ``threads`` stand for each other when only one is given.
    """
    from engines import openvino, ort
    from engines.options import option_names

    opts = dict(opts or {})
    ort_fields, ov_fields = option_names(ort.OrtOptions), option_names(openvino.OpenVinoOptions)
    unknown = sorted(set(opts) - ort_fields - ov_fields)
    if unknown:
        raise EngineError(f"unknown option(s) {unknown} for backend 'auto'; "
                          f"known: {sorted(ort_fields | ov_fields)}")
    detector = manifest.get("graphs", {}).get("detector", {})
    ort_only = (opts.get("use_cpu_file") is True or str(opts.get("device", "cpu")).lower() != "cpu"
                or openvino_int8_saturates(manifest))
    if (detector.get("cpu_backend", "onnxruntime") == "openvino" and not ort_only
            and importlib.util.find_spec("openvino") is not None):
        chosen = {k: v for k, v in opts.items() if k in ov_fields and k != "device"}
        if "intra_op_threads" in opts and "threads" not in opts:
            chosen["threads"] = opts["intra_op_threads"]
        return "openvino", chosen
    chosen = {k: v for k, v in opts.items() if k in ort_fields}
    if "threads" in opts and "intra_op_threads" not in opts:
        chosen["intra_op_threads"] = opts["threads"]
    return "onnxruntime", chosen


def openvino_int8_saturates(manifest: Mapping[str, Any]) -> bool:
    """True for an INT8 package on an x86 CPU without VNNI: OpenVINO's int8 kernels add uint8 x int8
    pairs in saturating int16 there (fiber-nano INT8 on an AVX2 EPYC: R@1 77.8 on OpenVINO vs 81.6
    FP32; ONNX Runtime runs the same package exactly, engines.ort), so "auto" leaves OpenVINO out."""
    from engines.options import int8_pairs_saturate

    return manifest.get("precision") == "int8" and int8_pairs_saturate()


def _load_engine_dir(path: Path, backend: str, opts: Mapping[str, Any]) -> PackageEngines:
    from engines import cpu_engine, trt
    from engines.manifest import read_engine_manifest
    from engines.options import make_options

    kind = read_engine_manifest(path)["backend"]
    if cpu_engine.is_cpu_engine({"backend": kind}):
        package, manifest, engine, text, detector = cpu_engine.open_cpu_engine_dir(path, backend, opts)
        return PackageEngines(text, detector, manifest, package, kind, engine, engine.get("deform_conv"))
    if backend in ("onnxruntime", "openvino"):
        raise EngineError(f"{path} is a {kind} engine folder; load its package for {backend}")
    options = make_options(trt.TrtOptions, opts, "tensorrt")
    package, manifest, engine, text, detector = trt.open_engine_dir(path, backend, options)
    return PackageEngines(text, detector, manifest, package, engine["backend"], engine, engine.get("deform_conv"))
