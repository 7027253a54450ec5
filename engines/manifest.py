"""Tensor specs, input validation, package access and the engine manifest (engine.json).

engine.json (format_version 1), written by engines.build next to the plans:

    {"format": "fiber-edge-engine", "format_version": 1,
     "backend": "tensorrt" | "tensorrt-rtx",
     "tensorrt": {"module": "tensorrt_rtx", "version": "1.7.1.116"},
     "device": {"name": str | null, "compute_capability": "8.7" | null,   # the build host's GPU
                "targets": ["8.7"] | "default" | "current"},              # what the plan runs on
     "precision": "int8" | "fp16" | "fp32", "graph_precision": {"text": "fp16", "detector": "int8"},
     "package": {"path": "../models/fiber-nano-int8", "name": ..., "digest": sha256,
                 "files": {"text.onnx": sha256, ...}},
     "graphs": {"text": {"plan": "text.plan", "sha256": ..., "bytes": ..., "inputs": [spec],
                         "outputs": [spec], "profiles": [{"tokens": [1, 16], "shapes":
                         {name: {"min": [...], "opt": [...], "max": [...]}}}]}, "detector": {...}},
     "buckets": [16, 32, 64],
     "build": {"command": "python -m engines.build ...", "strongly_typed": true,
               "workspace_mb": ..., "fp32_ops": [...], "timing_cache": "timing.cache" | null,
               "flags": [...], "seconds": ...},
     "producer": {"fiber_edge": "0.1.0"}}

A spec is {"name", "shape", "dtype"} with strings for dynamic dimensions ("batch", "tokens"),
exactly as in the package manifest.

CPU engines (engines/cpu_engine.py: "backend": "onnxruntime" | "openvino") have the same
"package", "graphs" (specs, plus "model": the file loaded and "files": {name: sha256}), "buckets"
and "build" sections, "runtime": {"module", "version"} instead of "tensorrt", and "device":
{"cpu": {"arch", "name"}}.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from common import package as pkg
from engines.errors import EngineError, EngineMismatch, InputError, PackageInvalid

ENGINE_FORMAT = "fiber-edge-engine"
ENGINE_FORMAT_VERSION = 1
ENGINE_JSON = "engine.json"
GRAPHS = ("text", "detector")
GRAPH_IO = {"text": (pkg.TEXT_INPUTS, pkg.TEXT_OUTPUTS), "detector": (pkg.DETECTOR_INPUTS, pkg.DETECTOR_OUTPUTS)}


# ----------------------------------------------------------------------------- tensor specs

@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]   # ints are fixed sizes, strings name dynamic dims ("batch", "tokens")
    dtype: np.dtype                # e.g. np.dtype("float32"), np.dtype("int64")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), tuple(d["shape"]), np.dtype(d["dtype"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.name}


def graph_specs(manifest: Mapping[str, Any], graph: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The (inputs, outputs) specs of ``graph`` from a package manifest, checked against the contract."""
    try:
        entry = manifest["graphs"][graph]
        inputs = [TensorSpec.from_dict(d) for d in entry["inputs"]]
        outputs = [TensorSpec.from_dict(d) for d in entry["outputs"]]
    except (KeyError, TypeError, ValueError) as e:
        raise PackageInvalid(f"manifest: graphs.{graph} has no valid inputs/outputs ({e!r})") from None
    want_in, want_out = GRAPH_IO[graph]
    for kind, specs, want in (("inputs", inputs, want_in), ("outputs", outputs, want_out)):
        if sorted(s.name for s in specs) != sorted(want):
            raise PackageInvalid(f"manifest: graphs.{graph}.{kind} are {[s.name for s in specs]}, "
                                 f"the package contract says {list(want)}")
    return inputs, outputs


def validate_inputs(specs: list[TensorSpec], inputs: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    """Check names, types, dtypes, ranks, fixed sizes and shared dynamic dims; return contiguous arrays.

    A dynamic dimension name used by several inputs (e.g. "tokens" in text_hidden [B,T,D] and
    attention_mask [B,T]) must have the same size in all of them.
    """
    names = {s.name for s in specs}
    missing = sorted(names - set(inputs))
    unknown = sorted(set(inputs) - names)
    if missing or unknown:
        raise InputError(f"{where}: inputs must be {sorted(names)}; missing {missing}, unexpected {unknown}")
    sizes: dict[str, tuple[int, str]] = {}
    out = {}
    for spec in specs:
        x = inputs[spec.name]
        if not isinstance(x, np.ndarray):
            raise InputError(f"{where}: input {spec.name!r} is a {type(x).__name__}, expected a numpy array")
        if x.dtype != spec.dtype:
            raise InputError(f"{where}: input {spec.name!r} has dtype {x.dtype}, expected {spec.dtype}")
        if x.ndim != len(spec.shape):
            raise InputError(f"{where}: input {spec.name!r} has shape {x.shape}, expected rank "
                             f"{len(spec.shape)} {list(spec.shape)}")
        for axis, (dim, size) in enumerate(zip(spec.shape, x.shape)):
            if isinstance(dim, int) and dim != size:
                raise InputError(f"{where}: input {spec.name!r} has shape {x.shape}, expected {list(spec.shape)}")
            if isinstance(dim, str):
                seen = sizes.setdefault(dim, (size, spec.name))
                if seen[0] != size:
                    raise InputError(f"{where}: dimension {dim!r} is {seen[0]} in {seen[1]!r} but {size} "
                                     f"in {spec.name!r} (axis {axis})")
        out[spec.name] = np.ascontiguousarray(x)
    return out


# ----------------------------------------------------------------------------- packages

def read_package(package: str | Path, verify: bool = True) -> dict[str, Any]:
    """The package manifest (format/version checked; every file's sha256 checked when ``verify``)."""
    try:
        return pkg.load_package_manifest(package, verify=verify)
    except pkg.PackageError as e:
        raise PackageInvalid(str(e)) from None
    except (KeyError, TypeError, AttributeError) as e:
        raise PackageInvalid(f"{package}: malformed manifest ({e!r})") from None


def graph_file(package: str | Path, manifest: Mapping[str, Any], graph: str, cpu: bool = False) -> Path:
    """Path of the ONNX file of ``graph``; with ``cpu`` the detector's CPU variant when the manifest names one."""
    entry = manifest["graphs"].get(graph)
    if not isinstance(entry, dict) or not entry.get("file"):
        raise PackageInvalid(f"{package}: manifest has no graphs.{graph}.file")
    name = entry.get("cpu_file") if cpu and entry.get("cpu_file") else entry["file"]
    if name not in manifest["files"]:
        raise PackageInvalid(f"{package}: {name} is not listed in the manifest's files (no sha256 to check)")
    return Path(package) / name


def load_reference(package: str | Path, manifest: Mapping[str, Any], graph: str) -> dict[str, np.ndarray] | None:
    """The package's reference/<graph>.npz (inputs + expected outputs by tensor name), or None."""
    name = pkg.reference_file(graph)
    if name not in manifest["files"]:
        return None
    try:
        with np.load(Path(package) / name, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise PackageInvalid(f"{Path(package) / name}: unreadable reference data: {e}") from None


# ----------------------------------------------------------------------------- engine.json

def read_engine_manifest(engine_dir: str | Path) -> dict[str, Any]:
    """Parse ``engine_dir/engine.json`` and check its format and version (not the hashes)."""
    path = Path(engine_dir) / ENGINE_JSON
    if not path.is_file():
        raise EngineError(f"{engine_dir}: no {ENGINE_JSON} (not an engine folder)")
    doc = pkg.read_versioned_json(path, ENGINE_FORMAT, ENGINE_FORMAT_VERSION,
                                  ("backend", "device", "package", "graphs", "build"),
                                  "engine manifest", "upgrade fiber-edge or rebuild the engine",
                                  EngineError)
    runtime = "runtime" if doc["backend"] in ("onnxruntime", "openvino") else "tensorrt"
    if runtime not in doc:  # TensorRT engines record "tensorrt", CPU engines "runtime"
        raise EngineError(f"{path}: engine manifest has no {runtime!r} section")
    return doc


def package_record(package: Path, manifest: Mapping[str, Any], engine_dir: Path) -> dict[str, Any]:
    """engine.json's "package" section; the path is stored relative to the engine folder when possible."""
    try:
        rel = Path(os.path.relpath(package.resolve(), engine_dir.resolve()))
    except ValueError:
        rel = package.resolve()
    return {"path": rel.as_posix(), "name": manifest.get("name"), "digest": pkg.package_digest(manifest),
            "files": {name: info["sha256"] for name, info in sorted(manifest["files"].items())}}


def recorded_package_path(engine_dir: Path, engine: Mapping[str, Any]) -> Path:
    path = Path(engine["package"]["path"])
    return path if path.is_absolute() else Path(os.path.normpath(engine_dir / path))


def check_package_matches(engine: Mapping[str, Any], manifest: Mapping[str, Any], package: Path,
                          rebuild: str) -> None:
    """Refuse (EngineMismatch) an engine built from another package than ``package``."""
    want = engine["package"]
    digest = pkg.package_digest(manifest)
    if want.get("digest") != digest:
        files = {n: i["sha256"] for n, i in manifest["files"].items()}
        changed = sorted(n for n in set(files) | set(want.get("files", {}))
                         if files.get(n) != want.get("files", {}).get(n))
        raise EngineMismatch(
            f"engine was built from package {want.get('name')!r} (digest {str(want.get('digest'))[:12]}), "
            f"but {package} ({manifest.get('name')!r}, digest {digest[:12]}) differs in {changed}",
            rebuild)


def rebuild_command(engine: Mapping[str, Any], engine_dir: Path, package: Path) -> str:
    """The engines.build command that rebuilds ``engine_dir`` from ``package`` with the same settings."""
    build = engine.get("build", {})
    args = ["python", "-m", "engines.build", "--package", str(package), "--backend", str(engine.get("backend")),
            "--precision", str(engine.get("requested_precision") or engine.get("precision"))]
    if build.get("workspace_mb"):
        args += ["--workspace", str(build["workspace_mb"])]
    if engine.get("buckets"):
        args += ["--buckets", ",".join(str(b) for b in engine["buckets"])]
    if build.get("target_cc"):
        args += ["--target-cc", ",".join(build["target_cc"])]
    if build.get("keep_fp32"):
        args += ["--keep-fp32", ",".join(build["keep_fp32"])]
    if build.get("opt_level") is not None:
        args += ["--opt-level", str(build["opt_level"])]
    if build.get("threads"):  # CPU engines (OpenVINO's compiled models are made for a thread count)
        args += ["--threads", str(build["threads"])]
    return shlex.join(args + ["--out", str(engine_dir), "--overwrite"])
