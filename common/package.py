"""The model-package contract: file names, tensor names and the manifest (docs/architecture.md).

The exporter (compress/) writes packages with these names; engines/ and runtime/ read them.
Torch-free and numpy-free on purpose: it is imported by every stage.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT = "fiber-edge-package"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
TEXT_GRAPH = "text.onnx"
DETECTOR_GRAPH = "detector.onnx"
DETECTOR_CPU_GRAPH = "detector.cpu.onnx"
TOKENIZER = "tokenizer.json"

# text.onnx
INPUT_IDS = "input_ids"            # int64 [B, T]
ATTENTION_MASK = "attention_mask"  # int64 [B, T], 1 = real token
TEXT_HIDDEN = "text_hidden"        # float32 [B, T, D]
# detector.onnx (inputs: IMAGE, TEXT_HIDDEN, ATTENTION_MASK)
IMAGE = "image"                    # float32 [B, 3, S, S], normalised, letterboxed top-left
BOXES = "boxes"                    # float32 [B, N, 4], xyxy in network-input pixels
TOKEN_LOGITS = "token_logits"      # float32 [B, N, T]
CENTERNESS = "centerness"          # float32 [B, N], logits

TEXT_INPUTS = (INPUT_IDS, ATTENTION_MASK)
TEXT_OUTPUTS = (TEXT_HIDDEN,)
DETECTOR_INPUTS = (IMAGE, TEXT_HIDDEN, ATTENTION_MASK)
DETECTOR_OUTPUTS = (BOXES, TOKEN_LOGITS, CENTERNESS)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BUCKETS = (16, 32, 64)


class PackageError(ValueError):
    """A model package that is missing, malformed, tampered with or of an unknown version."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_versioned_json(path: Path, fmt: str, max_version: int, sections: tuple[str, ...],
                        what: str, remedy: str, error: type[Exception]) -> dict[str, Any]:
    """Parse a ``{"format": fmt, "format_version": N, ...}`` file (package manifest, engine.json):
    ``error`` with the path and the problem when it is unreadable, of another format, of a newer
    version than this code reads (``remedy`` says what to do) or lacks one of ``sections``."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: unreadable {what}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise error(f"{path}: 'format' is not {fmt!r}")
    version = doc.get("format_version")
    if not isinstance(version, int):
        raise error(f"{path}: 'format_version' missing or not an integer")
    if version > max_version:
        raise error(f"{path}: {what.split()[0]} format_version {version} is newer than this fiber-edge "
                    f"reads ({max_version}); {remedy}")
    for key in sections:
        if key not in doc:
            raise error(f"{path}: {what} has no {key!r} section")
    return doc


def read_manifest(package: str | Path) -> dict[str, Any]:
    """Parse ``package/manifest.json`` and check its format and version (not the hashes)."""
    package = Path(package)
    path = package / MANIFEST
    if not package.exists():
        raise PackageError(f"{package}: does not exist (expected a model package folder)")
    if not package.is_dir():
        raise PackageError(f"{package}: not a folder (expected a model package)")
    if not path.is_file():
        raise PackageError(f"{package}: no {MANIFEST} (not a model package)")
    return read_versioned_json(path, FORMAT, FORMAT_VERSION, ("files", "graphs", "input", "text"),
                               "package manifest", "upgrade fiber-edge or re-export the package",
                               PackageError)


def verify_files(package: str | Path, manifest: dict[str, Any]) -> None:
    """Check every file listed in the manifest exists and has the recorded sha256."""
    package = Path(package)
    for name, info in manifest["files"].items():
        path = package / name
        if not path.is_file():
            raise PackageError(f"{package}: {name} is listed in the manifest but missing")
        digest = sha256_file(path)
        if digest != info.get("sha256"):
            raise PackageError(
                f"{path}: sha256 {digest[:16]}... does not match the manifest "
                f"({str(info.get('sha256'))[:16]}...): the file was modified or corrupted"
            )


def load_package_manifest(package: str | Path, verify: bool = True) -> dict[str, Any]:
    manifest = read_manifest(package)
    if verify:
        verify_files(package, manifest)
    return manifest


def package_digest(manifest: dict[str, Any]) -> str:
    """One sha256 that names a package's content: the hash of its files' hashes."""
    h = hashlib.sha256()
    for name in sorted(manifest["files"]):
        h.update(name.encode())
        h.update(manifest["files"][name]["sha256"].encode())
    return h.hexdigest()


# Optional reference data inside a package (added by the engines work): reference/<graph>.npz holds
# one set of the graph's inputs and the expected outputs, keyed by tensor name; listed in "files".
REFERENCE_DIR = "reference"


def reference_file(graph: str) -> str:
    """Relative path of the reference inputs/outputs of ``graph`` ("text" or "detector")."""
    return f"{REFERENCE_DIR}/{graph}.npz"
