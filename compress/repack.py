"""Store an existing package's text.onnx word-embedding table as per-row int8, and re-measure it.

    python -m compress.repack --package models/fiber-nano --out OUT --data DIR [--baseline FP32PKG]
        [--max-drop 1.0] [--threads N] [--overwrite]

For packages exported before ``compress.export`` stored that table as int8 (``--text-words``), or
whose checkpoint is gone: text.onnx is rewritten the way the exporter writes it
(``word_table.quantize_rows`` + ``int8_gather_table`` on the one Gather that reads ``input_ids``),
reference/text.npz is recomputed (ONNX Runtime, optimisations off), every other file is copied
unchanged, and the manifest's ``graphs.text.word_embeddings``, ``files`` and ``accuracy`` are
rewritten, with what was done under ``repack`` (the old text.onnx's sha256 and the new hidden
states' max difference from the old on the reference prompt).

``--data`` (a held-out split) re-measures every accuracy entry the package has through the runtime.
The old numbers are the guard: the repacked package is refused (nothing written) if a re-measured
R@1 is more than ``--max-drop`` points below the same entry before. An INT8 package's FP32 baseline
is the ``accuracy.fp32`` of ``--baseline`` (its FP32 twin, repacked first); without it the old
baseline is kept and the manifest says so.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import engines
from common import package as pkg
from common.atomic import atomic_dir
from compress import onnx_export, onnx_graph, word_table
from compress.export import AccuracyGuardError, ExportError, evaluate_package, file_table, max_rel_diff
from compress.openvino_check import openvino_installed
from compress.accuracy import find_data

# accuracy entry -> how to run it: (use the CPU file, backend)
RUNS = {"fp32": (False, "onnxruntime"), "int8": (False, "onnxruntime"),
        "int8_cpu": (True, "onnxruntime"), "int8_openvino": (False, "openvino")}


def shrink_text_graph(path: Path) -> dict[str, Any]:
    """Rewrite ``path`` (a text.onnx) in place with its word table as per-row int8; the table info."""
    graph = onnx.load(str(path))
    name = word_table.word_table(graph)
    table = onnx.numpy_helper.to_array(next(i for i in graph.graph.initializer if i.name == name))
    if table.dtype != np.float32 or table.ndim != 2:
        raise ExportError(f"{path}: the word table is {table.dtype} {table.shape}, not float32 2-D")
    info = word_table.int8_word_table(graph, *word_table.quantize_rows(table))
    onnx_graph.save(graph, path)
    onnx_graph.check_graph(path)
    return info


def repack(package: Path, out: Path, data_dir: str | None, baseline: Path | None = None,
           max_drop: float = 1.0, threads: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the repacked ``package`` to ``out`` (atomically); returns its manifest."""
    try:
        manifest = pkg.load_package_manifest(package)
    except (pkg.PackageError, FileNotFoundError) as e:
        raise ExportError(f"--package {package}: {e}") from None
    if manifest["graphs"]["text"].get("word_embeddings", {}).get("dtype") == "int8":
        raise ExportError(f"--package {package}: its text.onnx word table is int8 already")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists (pass --overwrite to replace it)")
    base_fp32 = None
    if baseline is not None:
        base = pkg.load_package_manifest(baseline)
        if base["precision"] != "fp32" or "fp32" not in base.get("accuracy", {}):
            raise ExportError(f"--baseline {baseline}: not an FP32 package with measured accuracy")
        base_fp32 = base["accuracy"]["fp32"]
    data = find_data(data_dir) if data_dir else None
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name in manifest["files"]:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package / name, tmp / name)
        words = shrink_text_graph(tmp / pkg.TEXT_GRAPH)
        with np.load(package / pkg.reference_file("text")) as z:
            ref = {k: z[k] for k in z.files}
        feeds = {k: ref[k] for k in pkg.TEXT_INPUTS}
        hidden = onnx_export.ort_reference(tmp / pkg.TEXT_GRAPH, feeds)[pkg.TEXT_HIDDEN]
        np.savez(tmp / pkg.reference_file("text"), **feeds, **{pkg.TEXT_HIDDEN: hidden})
        manifest["graphs"]["text"]["word_embeddings"] = words
        manifest["repack"] = {"tool": "compress.repack", "from": str(package),
                              "text_onnx_sha256_before": manifest["files"][pkg.TEXT_GRAPH]["sha256"],
                              "text_hidden_max_rel_diff_vs_before": round(max_rel_diff(hidden, ref[pkg.TEXT_HIDDEN]), 6)}
        manifest["files"] = file_table(tmp)
        pkg.write_manifest(tmp, manifest)
        if data is not None:
            manifest["accuracy"] = _remeasure(tmp, manifest["accuracy"], data, base_fp32, max_drop, threads)
            pkg.write_manifest(tmp, manifest)
    return manifest


def _remeasure(folder: Path, before: dict, data, base_fp32: dict | None, max_drop: float,
               threads: int | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    after = dict(before, split=data.source)
    for key, (cpu_file, backend) in RUNS.items():
        if key not in before or (key == "fp32" and "int8" in before):
            continue
        if backend == "openvino" and not openvino_installed():
            raise ExportError(f"the package has an {key} accuracy entry but OpenVINO is not installed")
        after[key] = evaluate_package(folder, data, cpu_file, threads, backend=backend)
        r_old, r_new = before[key].get("R@1"), after[key].get("R@1")
        if r_old is not None and r_new is not None and r_old - r_new > max_drop:
            raise AccuracyGuardError(f"repack guard: {key} R@1 {r_new:.2f} with the int8 word table is "
                                     f"{r_old - r_new:.2f} points below {r_old:.2f} before (allowed: "
                                     f"{max_drop}). Nothing was written")
    if "int8" in before:
        after["fp32"] = base_fp32 if base_fp32 is not None else before["fp32"]
        after["fp32_source"] = "--baseline" if base_fp32 is not None else "not re-measured (no --baseline)"
    after["seconds"] = round(time.perf_counter() - t0, 1)
    return after


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress.repack", description=__doc__.split("\n")[0])
    p.add_argument("--package", required=True, type=Path, help="model package folder to repack")
    p.add_argument("--out", required=True, type=Path, help="package folder to write")
    p.add_argument("--data", default=None, help="held-out data folder: re-measure the accuracy entries")
    p.add_argument("--baseline", type=Path, default=None, help="INT8 packages: the repacked FP32 twin")
    p.add_argument("--max-drop", type=float, default=1.0, help="allowed R@1 drop per entry (points)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime / OpenVINO CPU threads")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing --out (it may be --package itself)")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        m = repack(args.package, args.out, args.data, args.baseline, args.max_drop, args.threads, args.overwrite)
    except (ExportError, FileExistsError, ValueError, onnx_graph.OnnxExportError, engines.EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    w = m["graphs"]["text"]["word_embeddings"]
    print(f"wrote {args.out}: word table {w['bytes_fp32'] / 1e6:.1f} -> {w['bytes'] / 1e6:.1f} MB, text hidden "
          f"max rel diff {m['repack']['text_hidden_max_rel_diff_vs_before']:.2e}")
    for key in RUNS:
        if key in m["accuracy"]:
            print(f"  accuracy {key}: {json.dumps(m['accuracy'][key])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
