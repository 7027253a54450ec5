"""Accuracy of model packages on every backend, through the runtime (the code path users run).

    python -m benchmarks.accuracy --package models/fiber-nano-int8 [--package ...] --data data/synth-val
        [--backend default|onnxruntime,openvino,...] [--checkpoint CKPT] [--limit N] [--threads N]
        [--json OUT]

Each package x backend (the subjects of ``benchmarks.latency``; ``--checkpoint``: PyTorch eager
through the same Detector) runs ``runtime.predictor.Detector.detect`` with the evaluation
protocol's post-processing (``EVAL_POSTPROCESS``, as ``compress.export`` and ``train.evaluate``
measure theirs) under ``fiber.data.evaluation.evaluate``: R@1/5/10 (Flickr30k ANY-box, also split by relation), referring
accuracy, COCO mAP (pycocotools), in percent. ``--data``: a folder with ``grounding.json`` and/or
``detection.json``. Torch-free unless a checkpoint is given.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import engines
from benchmarks.latency import (DEFAULT_BACKENDS, Subject, one_line, progress_bar, label_subjects, open_subject,
                                parse_backends, plan_subjects)
from common import package as pkg
from fiber.data.evaluation import EVAL_POSTPROCESS, evaluate
from fiber.data.formats import DataFormatError, DetectionDataset, GroundingDataset, load_detection, load_grounding

GROUNDING_FILE, DETECTION_FILE = "grounding.json", "detection.json"
METRICS = ("R@1", "R@5", "R@10", "R@1_relation", "R@1_no_relation", "refexp", "refexp_relation",
           "mAP", "AP50", "AP75", "phrases", "refexps", "detection_images")


@dataclass(frozen=True)
class EvalSets:
    grounding: GroundingDataset | None
    detection: DetectionDataset | None
    folder: str


def load_data(folder: str | Path) -> EvalSets:
    """The grounding and/or detection annotations of a data folder (fiber.data.synth layout).

    Raises DataFormatError naming the folder when it is missing, has neither file, or a file is
    malformed.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataFormatError(f"data folder {root}: no such directory")
    g, d = root / GROUNDING_FILE, root / DETECTION_FILE
    if not g.is_file() and not d.is_file():
        raise DataFormatError(f"data folder {root}: no annotations ({GROUNDING_FILE} or {DETECTION_FILE})")
    return EvalSets(load_grounding(g) if g.is_file() else None,
                    load_detection(d) if d.is_file() else None, str(root))


def _finite(value: Any) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    v = float(value)
    return round(v, 2) if math.isfinite(v) else None


def evaluate_detector(detector: Any, data: EvalSets, limit: int | None, progress: Callable | None = None
                      ) -> dict[str, float | int | None]:
    """METRICS of one runtime Detector (percent; None for a metric over no items), ranked with
    the evaluation protocol's post-processing (EVAL_POSTPROCESS) on the Detector's engines."""
    from runtime.predictor import Detector

    ranked = Detector(detector.engines, **EVAL_POSTPROCESS)  # not closed: the engines are the caller's

    def predict(image, prompt: str, spans: list):
        return ranked.detect(image, prompt, spans)

    metrics = evaluate(predict, grounding=data.grounding, detection=data.detection, limit=limit, progress=progress)
    return {k: _finite(metrics[k]) for k in METRICS if k in metrics}


@dataclass(frozen=True)
class AccuracyConfig:
    packages: tuple[str, ...] = ()
    data: str = ""
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    explicit_backends: bool = False
    checkpoints: tuple[str, ...] = ()
    roles: tuple[tuple[str, str], ...] = ()
    limit: int | None = None               # first N grounding entries and detection images
    threads: int | None = None
    progress: bool = True


def run_accuracy(cfg: AccuracyConfig) -> dict[str, Any]:
    """Evaluate every subject. Never raises for bad data, packages or backends: the result says
    ``status`` ("ok" | "not measured" | "failed") and the reason, at the top (data) or per subject."""
    out: dict[str, Any] = {"config": {**asdict(cfg), "roles": dict(cfg.roles)}, "subjects": []}
    try:
        data = load_data(cfg.data)
    except DataFormatError as e:
        return {**out, "status": "not measured", "reason": str(e)}
    out["data"] = {"folder": data.folder, "limit": cfg.limit,
                   "grounding_entries": len(data.grounding.samples) if data.grounding else 0,
                   "detection_images": len(data.detection.images) if data.detection else 0}
    subjects, out["unavailable"] = plan_subjects(cfg.packages, cfg.backends, cfg.explicit_backends,
                                                 cfg.checkpoints, dict(cfg.roles))
    progress = progress_bar(cfg.progress)
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fiber-acc-")))
        out["subjects"] = [_one(s, cfg, data, scratch, progress) for s in subjects]
    out["status"] = "ok" if all(s["status"] == "ok" for s in out["subjects"]) else "partial"
    return out


def _one(subject: Subject, cfg: AccuracyConfig, data: EvalSets, scratch: Path, progress) -> dict[str, Any]:
    try:
        opened = open_subject(subject, cfg.threads, scratch)
    except (engines.EngineError, pkg.PackageError, ValueError, OSError, ImportError) as e:
        return {"package": subject.package, "backend": subject.backend, "role": subject.role,
                "status": "failed", "reason": one_line(e)}
    with opened.detector:
        label_subjects([opened])
        t0 = time.perf_counter()
        try:
            metrics = evaluate_detector(opened.detector, data, cfg.limit, progress)
        except (engines.EngineError, DataFormatError, ValueError, OSError) as e:
            return {**opened.describe(), "status": "failed", "reason": one_line(e)}
    return {**opened.describe(), "status": "ok", "metrics": metrics,
            "seconds": round(time.perf_counter() - t0, 1)}


def format_table(result: dict[str, Any]) -> str:
    if result.get("status") == "not measured":
        return f"accuracy not measured: {result['reason']}"
    keys = ("R@1", "R@5", "R@10", "refexp", "mAP")
    lines = [f"{'subject':40s} " + " ".join(f"{k:>8s}" for k in keys)]
    for s in result["subjects"]:
        if s["status"] != "ok":
            lines.append(f"{s['package']} @ {s['backend']}: {s['status']}: {s['reason']}")
            continue
        cells = ["n/a" if s["metrics"].get(k) is None else f"{s['metrics'][k]:.2f}" for k in keys]
        lines.append(f"{s['label'][:40]:40s} " + " ".join(f"{c:>8s}" for c in cells))
    for b, why in result.get("unavailable", {}).items():
        lines.append(f"{b}: not available: {why}")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--package", action="append", default=[], help="model package or engine folder (repeatable)")
    p.add_argument("--data", required=True, help="folder with grounding.json and/or detection.json")
    p.add_argument("--backend", default="default",
                   help="comma-separated: onnxruntime,openvino,tensorrt,tensorrt-rtx ('default': where present)")
    p.add_argument("--checkpoint", action="append", default=[], help="fine checkpoint: PyTorch eager (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="first N grounding entries and detection images")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per engine")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on stderr")
    p.add_argument("--json", default=None, help="write the results here (atomically)")
    return p


def main(args: argparse.Namespace) -> int:
    """Exit 0: every subject evaluated; 1: some failed (reasons on stderr); 2: bad arguments or data."""
    from common.atomic import atomic_write_json

    try:
        if not args.package and not args.checkpoint:
            raise ValueError("give at least one --package (or a --checkpoint)")
        if args.limit is not None and args.limit < 1:
            raise ValueError("--limit must be >= 1")
        backends, explicit = parse_backends(args.backend)
    except ValueError as e:
        print(f"benchmarks.accuracy: {e}", file=sys.stderr)
        return 2
    cfg = AccuracyConfig(tuple(args.package), args.data, backends, explicit, tuple(args.checkpoint), (),
                         args.limit, args.threads, args.progress)
    result = run_accuracy(cfg)
    if args.json:
        atomic_write_json(args.json, result)
    if result.get("status") == "not measured":
        print(f"benchmarks.accuracy: {result['reason']}", file=sys.stderr)
        return 2
    print(format_table(result))
    failed = [s for s in result["subjects"] if s["status"] != "ok"]
    for s in failed:
        print(f"benchmarks.accuracy: {s['package']} on {s['backend']}: {s['reason']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
