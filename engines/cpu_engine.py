"""CPU engines: a package prepared once for ONNX Runtime or OpenVINO on the machine that runs it.

    python -m engines.build --package models/fiber-nano-int8 --backend openvino --out runs/engines/nano-ov
    python -m runtime.detect --engine runs/engines/nano-ov --image photo.jpg --prompt "cat"

The TensorRT engines' contract (engines/manifest.py) on a CPU: an engine folder with
``engine.json`` (backend, runtime version, CPU, the package's sha256s, the build command) next to
what the runtime loads instead of the package's ONNX files:

- onnxruntime: ``text.onnx`` / ``detector.onnx`` are ONNX Runtime's optimised models
  (``SessionOptions.optimized_model_filepath`` at the "extended" level: fused, constant-folded,
  portable across CPUs of the architecture); the detector is the package's CPU file when it
  names one (as the runtime runs it). Loaded with graph optimisation "all" (the CPU-specific
  layout passes) and no cache.
- openvino: ``text.xml/.bin`` / ``detector.xml/.bin``, the package's ONNX files converted to
  OpenVINO IR (weights as they are, no FP16 compression), and ``cache/``, OpenVINO's compiled
  model cache filled at build time for every text-length bucket the runtime will use, so the
  first frame does not pay for compilation.

Loading refuses (EngineMismatch, with the exact rebuild command) an engine whose package changed,
whose runtime version differs from the installed one (optimised models and compiled blobs are
version-specific) or that was built for another CPU architecture. Torch-free.
"""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from common import package as pkg
from common.atomic import atomic_dir, atomic_write_json
from engines.deform import deform_convs_in
from engines.errors import BackendUnavailable, BuildError, EngineError, EngineMismatch
from engines.manifest import (
    ENGINE_FORMAT, ENGINE_FORMAT_VERSION, ENGINE_JSON, GRAPHS, TensorSpec, check_package_matches, graph_file,
    graph_specs, package_record, read_engine_manifest, read_package, rebuild_command, recorded_package_path,
)
from engines.openvino import OpenVinoEngine, OpenVinoOptions, openvino_core, openvino_options
from engines.options import first_line
from engines.ort import OrtEngine, OrtOptions

CPU_BACKENDS = ("onnxruntime", "openvino")
OV_CACHE = "cache"


def runtime_version(backend: str) -> str:
    """The installed version of ``backend``'s Python package (BackendUnavailable when absent)."""
    try:
        if backend == "openvino":
            import openvino
            return str(openvino.__version__)
        import onnxruntime
        return str(onnxruntime.__version__)
    except ImportError:
        what = "OpenVINO is not installed: pip install 'fiber-edge[openvino]'" if backend == "openvino" \
            else "ONNX Runtime is not installed: pip install onnxruntime"
        raise BackendUnavailable(what) from None


def cpu_description() -> dict[str, Any]:
    """The build host's CPU: architecture (checked on load) and a name (informative)."""
    name = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"arch": platform.machine(), "name": name}


def _sha256(path: Path) -> str:
    return pkg.sha256_file(path)


# ----------------------------------------------------------------------------- build

def _dummy_inputs(specs: list[TensorSpec], tokens: int) -> dict[str, np.ndarray]:
    """Zeros of each input's shape with batch 1 and ``tokens`` tokens (mask: all real tokens)."""
    out = {}
    for s in specs:
        shape = [1 if d == "batch" else tokens if d == "tokens" else int(d) for d in s.shape]
        fill = 1 if s.name == pkg.ATTENTION_MASK else 0
        out[s.name] = np.full(shape, fill, dtype=s.dtype)
    return out


def _build_ort(package: Path, manifest: Mapping[str, Any], graph: str, tmp: Path) -> dict[str, Any]:
    import onnxruntime as onnxrt

    source = graph_file(package, manifest, graph, cpu=True)
    target = tmp / f"{graph}.onnx"
    so = onnxrt.SessionOptions()
    so.graph_optimization_level = onnxrt.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(target)
    try:
        onnxrt.InferenceSession(str(source), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types
        raise BuildError(f"{source}: onnxruntime cannot optimise it: {first_line(e)}") from None
    return {"model": target.name, "source": source.name, "graph_optimization": "extended",
            "files": {target.name: _sha256(target)}}


def _build_openvino(package: Path, manifest: Mapping[str, Any], graph: str, tmp: Path,
                    buckets: tuple[int, ...], threads: int) -> dict[str, Any]:
    import openvino as ov

    source = graph_file(package, manifest, graph, cpu=False)  # the Q/DQ file, as the runtime runs it
    xml = tmp / f"{graph}.xml"
    try:  # DeformConv becomes OpenVINO's DeformableConvolution-8 in the IR (engines.deform)
        ov.save_model(openvino_core().read_model(str(source)), str(xml), compress_to_fp16=False)
    except Exception as e:
        raise BuildError(f"{source}: OpenVINO cannot convert it: {first_line(e)}") from None
    inputs, outputs = graph_specs(manifest, graph)
    opts = openvino_options(OpenVinoOptions(threads=threads, cache_dir=str(tmp / OV_CACHE)),
                                manifest, graph)
    engine = OpenVinoEngine(xml, inputs, outputs, opts)  # compiles into tmp/cache
    try:
        for tokens in buckets if any("tokens" in s.shape for s in inputs) else (1,):
            engine.run(_dummy_inputs(inputs, tokens))  # static shapes: one compiled model per bucket
    finally:
        engine.close()
    return {"model": xml.name, "source": source.name, "static_shapes": bool(opts.static_shapes),
            "files": {p.name: _sha256(p) for p in (xml, xml.with_suffix(".bin"))}}


def build_cpu_engine(package: Path, backend: str, out: Path | None, overwrite: bool,
                     buckets: tuple[int, ...] | None, threads: int, command: str) -> Path:
    """Build the ``backend`` ("onnxruntime" | "openvino") engine folder of ``package``; its path."""
    if backend not in CPU_BACKENDS:
        raise BuildError(f"backend {backend!r} is not a CPU backend {list(CPU_BACKENDS)}")
    version = runtime_version(backend)
    manifest = read_package(package)
    buckets = tuple(buckets or pkg.TextSpec.from_manifest(manifest).buckets)
    precision = str(manifest.get("precision") or "fp32")
    out = out or Path("runs") / "engines" / f"{manifest.get('name', package.name)}-{backend}-{precision}"
    if out.exists() and not overwrite:
        raise BuildError(f"--out {out} already exists; pass --overwrite to replace it")
    started = time.time()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        graphs = {}
        for graph in GRAPHS:
            record = (_build_ort(package, manifest, graph, tmp) if backend == "onnxruntime"
                      else _build_openvino(package, manifest, graph, tmp, buckets, threads))
            inputs, outputs = graph_specs(manifest, graph)
            nodes = deform_convs_in(package / record["source"])
            graphs[graph] = {**record, "inputs": [s.to_dict() for s in inputs],
                             "outputs": [s.to_dict() for s in outputs],
                             "deform_conv": {"nodes": nodes, "path": "native"} if nodes else None}
        record = {
            "format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION,
            "backend": backend, "runtime": {"module": backend, "version": version},
            "device": {"cpu": cpu_description()},
            "precision": precision, "requested_precision": "auto",
            # DeformConv: ONNX Runtime's kernel / OpenVINO's DeformableConvolution-8 (engines.deform)
            "deform_conv": "native" if any(g["deform_conv"] for g in graphs.values()) else None,
            "package": package_record(package, manifest, out),
            "graphs": graphs, "buckets": list(buckets),
            "build": {"command": command, "threads": threads, "seconds": round(time.time() - started, 2)},
            "producer": {"fiber_edge": "0.1.0", "python": sys.version.split()[0]},
        }
        atomic_write_json(tmp / ENGINE_JSON, record)
        _make_readable(tmp)
    return out


def _make_readable(folder: Path) -> None:
    """Temp folders/files are created 0700/0600; an engine folder is meant to be shared (0755/0644)."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


# ----------------------------------------------------------------------------- load

def is_cpu_engine(engine: Mapping[str, Any]) -> bool:
    return engine.get("backend") in CPU_BACKENDS


def _check_files(engine_dir: Path, engine: Mapping[str, Any], rebuild: str) -> None:
    for graph in GRAPHS:
        for name, digest in engine["graphs"][graph]["files"].items():
            path = engine_dir / name
            if not path.is_file():
                raise EngineMismatch(f"{path}: missing from the engine folder", rebuild)
            if _sha256(path) != digest:
                raise EngineMismatch(f"{path}: sha256 does not match engine.json (the file was modified)", rebuild)


def open_cpu_engine_dir(engine_dir: Path, backend: str, opts: Mapping[str, Any]):
    """(package path, package manifest, engine manifest, text engine, detector engine), all checked.

    opts: ``package`` (default: the path in engine.json), ``threads`` / ``intra_op_threads``
    (CPU threads; default: the build's for OpenVINO, ONNX Runtime's own otherwise), ``verify``.
    """
    engine = read_engine_manifest(engine_dir)
    kind = engine["backend"]
    if backend not in ("auto", kind):
        raise EngineError(f"{engine_dir} holds a {kind} engine, not {backend}")
    known = {"package", "threads", "intra_op_threads", "verify"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise EngineError(f"unknown option(s) {unknown} for a {kind} engine folder; known: {sorted(known)}")
    package = Path(opts["package"]) if opts.get("package") else recorded_package_path(engine_dir, engine)
    rebuild = rebuild_command(engine, engine_dir, package)
    if not (package / pkg.MANIFEST).is_file():
        raise EngineError(f"{engine_dir}: its package {package} is not there (pass package=... to load)")
    verify = bool(opts.get("verify", True))
    manifest = read_package(package, verify=verify)
    check_package_matches(engine, manifest, package, rebuild)
    built, installed = engine["runtime"]["version"], runtime_version(kind)
    if built != installed:
        raise EngineMismatch(f"engine was built with {kind} {built}, but {installed} is installed "
                             f"({'compiled models' if kind == 'openvino' else 'optimised models'} are "
                             f"version-specific)", rebuild)
    arch = (engine.get("device", {}).get("cpu") or {}).get("arch")
    if arch and arch != platform.machine():
        raise EngineMismatch(f"engine was built on a {arch} CPU; this one is {platform.machine()}", rebuild)
    if verify:
        _check_files(engine_dir, engine, rebuild)
    threads = int(opts.get("threads") or opts.get("intra_op_threads") or 0)
    engines = []
    for graph in GRAPHS:
        entry = engine["graphs"][graph]
        specs = [[TensorSpec.from_dict(d) for d in entry[k]] for k in ("inputs", "outputs")]
        path = engine_dir / entry["model"]
        if kind == "onnxruntime":
            options = OrtOptions(intra_op_threads=threads, cache_dir="")
            engines.append(OrtEngine(path, *specs, options))
        else:
            options = OpenVinoOptions(threads=threads or int(engine["build"].get("threads") or 0),
                                          cache_dir=str(engine_dir / OV_CACHE),
                                          static_shapes=bool(entry.get("static_shapes")))
            engines.append(OpenVinoEngine(path, *specs, options))
    return package, manifest, engine, engines[0], engines[1]
