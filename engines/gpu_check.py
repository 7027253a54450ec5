"""GPU check: TensorRT engines vs ONNX Runtime on the same inputs, compared and timed in one run.

    python -m engines.gpu_check --package models/fiber-nano --package models/fiber-nano-int8 \
        --backend auto --out runs/gpu_check

For each package it builds the engine (FP32 package -> fp16, INT8 package -> int8; or
``--precision``), loads it and the package on ONNX Runtime (CUDA provider when installed, else
CPU), runs both on the same inputs (the package's reference/ inputs when present, else seeded
random ones at every bucket), prints the max abs difference per output, then times the two
alternately (ort, trt, ort, trt, ...) and prints median milliseconds per graph. Results also go to
``<out>/gpu_check.json``. Called by benchmarks/gpu_check.sh.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import engines
from common import package as pkg
from common.atomic import atomic_write_json
from engines.manifest import load_reference, read_package


def sample_inputs(e: engines.PackageEngines, tokens: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Inputs for both graphs at ``tokens`` text length: reference/ ones if they have that length, else random."""
    ref_text = load_reference(e.package, e.manifest, "text")
    ref_det = load_reference(e.package, e.manifest, "detector")
    if ref_text and ref_det and ref_text[pkg.INPUT_IDS].shape[1] == tokens:
        return {"text": {s.name: ref_text[s.name] for s in e.text.inputs},
                "detector": {s.name: ref_det[s.name] for s in e.detector.inputs}}
    rng = np.random.default_rng(seed)
    size = e.manifest["input"]["size"]
    length = max(2, tokens - 3)
    mask = (np.arange(tokens) < length).astype(np.int64)[None]
    ids = rng.integers(1000, 20000, size=(1, tokens)).astype(np.int64) * mask
    hidden = e.encode_text(ids, mask)
    image = rng.standard_normal((1, 3, size[0], size[1])).astype(np.float32)
    return {"text": {pkg.INPUT_IDS: ids, pkg.ATTENTION_MASK: mask},
            "detector": {pkg.IMAGE: image, pkg.TEXT_HIDDEN: hidden, pkg.ATTENTION_MASK: mask}}


def max_abs_diffs(a: engines.PackageEngines, b: engines.PackageEngines, inputs) -> dict[str, float]:
    """Max |a - b| per output of both graphs, on the same inputs."""
    diffs = {}
    for graph in ("text", "detector"):
        out_a = getattr(a, graph).run(inputs[graph])
        out_b = getattr(b, graph).run(inputs[graph])
        for name in out_a:
            diffs[f"{graph}.{name}"] = float(np.max(np.abs(out_a[name].astype(np.float64) - out_b[name])))
    return diffs


def time_alternating(runs: dict[str, Callable[[], Any]], iters: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each callable, called in turn (a, b, a, b, ...) so drift hits all alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: float(np.median(v)) for name, v in times.items()}


def compare(a: engines.PackageEngines, b: engines.PackageEngines, iters: int) -> dict[str, Any]:
    """Differences at every bucket, then alternating timings at the largest bucket."""
    result: dict[str, Any] = {"a": a.backend, "b": b.backend, "diffs": {}, "ms": {}}
    buckets = list(pkg.TextSpec.from_manifest(a.manifest).buckets)
    for tokens in buckets:
        result["diffs"][str(tokens)] = max_abs_diffs(a, b, sample_inputs(a, tokens))
    inputs = sample_inputs(a, buckets[-1])
    for graph in ("text", "detector"):
        runs = {f"{e.backend}": (lambda e=e: getattr(e, graph).run(inputs[graph])) for e in (a, b)}
        result["ms"][graph] = time_alternating(runs, iters)
    return result


def _ort_device() -> str:
    import onnxruntime as ort

    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def check_package(package: Path, backend: str, precision: str, out: Path, iters: int) -> dict[str, Any]:
    from engines.build import BuildConfig, build_engines

    manifest = read_package(package)
    if precision == "auto":
        precision = "int8" if manifest.get("precision") == "int8" else "fp16"
    engine_dir = out / f"{manifest.get('name', package.name)}-{precision}"
    t = time.time()
    build_engines(BuildConfig(package=str(package), out=str(engine_dir), backend=backend,
                              precision=precision, overwrite=True))
    build_s = time.time() - t
    with engines.load(package, device=_ort_device()) as ort_e, engines.load(engine_dir) as trt_e:
        result = compare(ort_e, trt_e, iters)
    result.update(package=str(package), precision=precision, build_s=round(build_s, 1),
                  engine=str(engine_dir), ort_device=_ort_device())
    return result


def print_result(r: dict[str, Any]) -> None:
    print(f"\n== {r['package']} ({r['precision']}; {r['b']} build {r['build_s']} s; ORT on {r['ort_device']})")
    for tokens, diffs in r["diffs"].items():
        print(f"  max |ORT - TRT| at {tokens} tokens: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    for graph, ms in r["ms"].items():
        print(f"  {graph:9s} median ms: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("engines.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--package", action="append", required=True, help="model package (repeatable)")
    p.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "tensorrt-rtx"])
    p.add_argument("--precision", default="auto", choices=["auto", "int8", "fp16", "fp32"],
                   help="auto: int8 for an INT8 package, fp16 otherwise")
    p.add_argument("--iters", type=int, default=50, help="timed iterations per backend and graph")
    p.add_argument("--out", default="runs/gpu_check", help="folder for the engines and gpu_check.json")
    return p


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    results = []
    for package in args.package:
        try:
            results.append(check_package(Path(package), args.backend, args.precision, out, args.iters))
        except engines.EngineError as e:
            print(f"engines.gpu_check: {package}: {e}", file=sys.stderr)
            return 2
        print_result(results[-1])
    atomic_write_json(out / "gpu_check.json", results)
    print(f"\nwrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
