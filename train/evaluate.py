"""Evaluate a fine checkpoint on a grounding/detection split with the shared harness.

    python -m train.evaluate --checkpoint runs/nano/fine --data data/synth-val \\
        --json runs/nano/eval.json [--limit N] [--split-name NAME] [--device auto]

``--checkpoint``: a checkpoint folder (``model.safetensors`` + ``config.json``) or a run folder
(its ``final/``). ``--data``: a folder with ``grounding.json`` and/or ``detection.json``.
Metrics (percent) come from ``fiber.data.evaluation.evaluate`` over the runtime's ``Detector`` on
the torch model (``fiber.torch_engines.torch_detector``: the text buckets, image pre-processing and
post-processing of the package the checkpoint would export to) ranked with the protocol's
``EVAL_POSTPROCESS``: R@1/5/10 (Flickr30k ANY-box; also ``_relation`` / ``_no_relation``),
referring accuracy (``refexp``, ``refexp_relation``), COCO mAP / AP50 / AP75. The JSON (written
atomically) holds them under ``"metrics"`` (NaN, a metric over no items, as null) with the
checkpoint, split and post-processing settings; a small table goes to stdout.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from common.atomic import atomic_write_json
from fiber.checkpoint import load_fine_model, tokenizer_file
from fiber.data.evaluation import EVAL_POSTPROCESS, evaluate
from fiber.data.formats import DataFormatError
from fiber.torch_engines import torch_detector
from train.data import DETECTION_FILE, GROUNDING_FILE
from train.distributed import resolve_device
from train.tasks import progress_bar, run_cli

EVAL_FORMAT = "fiber-edge-eval"
TABLE = (("R@1", "R@5", "R@10"), ("R@1_relation", "R@1_no_relation"), ("refexp", "refexp_relation"),
         ("mAP", "AP50", "AP75"))


def data_files(data_dir: str | Path) -> tuple[Path | None, Path | None]:
    """``(grounding.json or None, detection.json or None)`` of a data folder; DataFormatError
    when the folder is missing or has neither."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataFormatError(f"{root}: no such data folder")
    grounding, detection = root / GROUNDING_FILE, root / DETECTION_FILE
    found = (grounding if grounding.is_file() else None, detection if detection.is_file() else None)
    if found == (None, None):
        raise DataFormatError(f"{root}: neither {GROUNDING_FILE} nor {DETECTION_FILE} found")
    return found


def run_evaluation(checkpoint: str | Path, data_dir: str | Path, limit: int | None = None,
                   split_name: str | None = None, device: str = "auto",
                   post: Mapping[str, Any] = EVAL_POSTPROCESS, progress=None) -> dict:
    """Load, predict, score -> the JSON-able report (see the module docstring)."""
    grounding, detection = data_files(data_dir)
    dev = resolve_device(device)
    model, meta = load_fine_model(checkpoint, "evaluation", dev)
    start = time.perf_counter()
    with torch_detector(model, tokenizer=tokenizer_file(meta["path"]), **post) as detector:
        metrics = evaluate(detector.detect, grounding, detection, limit=limit, progress=progress)
    return {
        "format": EVAL_FORMAT, "format_version": 1,
        "checkpoint": meta["path"], "model": model.cfg.name, "task": meta.get("task"),
        "step": meta.get("step"), "split": split_name or Path(data_dir).name,
        "data": str(data_dir), "limit": limit, "postprocess": dict(post),
        "seconds": round(time.perf_counter() - start, 2),
        "metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in metrics.items()},
    }


def format_table(report: dict) -> str:
    """A few lines: one row of metric names and values per group."""
    m = report["metrics"]
    lines = [f"{report['model']} on {report['split']} ({report['checkpoint']})"]
    for group in TABLE:
        present = [k for k in group if k in m]
        if present:
            lines.append("  ".join(f"{k:>16}" for k in present))
            lines.append("  ".join(f"{_fmt(m[k]):>16}" for k in present))
    counts = [f"{k}={m[k]}" for k in ("phrases", "refexps", "detection_images") if k in m]
    lines.append(", ".join(counts) + f"; {report['seconds']:.1f} s")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="fine checkpoint folder or run folder")
    p.add_argument("--data", required=True, type=Path, help="folder with grounding.json / detection.json")
    p.add_argument("--json", required=True, type=Path, help="report to write (atomically)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N grounding entries and detection images")
    p.add_argument("--split-name", default=None, help="name recorded in the report (default: data folder name)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on stderr")
    return p


def _run(args: argparse.Namespace) -> str:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    report = run_evaluation(args.checkpoint, args.data, args.limit, args.split_name, args.device,
                            progress=progress_bar(args.progress))
    atomic_write_json(args.json, report)
    return format_table(report) + f"\nwrote {args.json}"


def main(args: argparse.Namespace) -> int:
    return run_cli("train.evaluate", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
