"""The package's default score threshold, chosen on held-out data: where precision and recall of
detection with present phrases and absent hard negatives balance, recorded in the manifest with the sweep.

    python -m compress.calibrate --package models/fiber-nano-int8 --data data/synth-calib [--limit 200]

For every held-out image of ``DATA/detection.json`` the prompt names each phrase present in it
(with colour attributes, as fiber.data.synth writes them: "red star"; else the category name) and
``--negatives`` absent hard negatives (the same kind in a colour not present, the same colour on a
kind not present; plain categories: absent categories), shuffled. ``--noise`` pure-noise images
(every phrase absent) join in, so that a 1x1 or noise frame gets nothing at the default. The
package runs through the runtime (the default post-processing with threshold 0: one run gives
every threshold's result, because per-phrase NMS only lets a higher score suppress a lower one).
A detection is correct when its phrase is right and its box has IoU >= 0.5 with an unmatched
ground-truth box of that phrase (greedy, best score first); precision and recall are swept over
thresholds 0.00 ... 0.99, and the chosen one becomes ``postprocess.threshold``:

- ``--rule balanced`` (default): the highest ``min(precision, recall)``, i.e. where the package adds
  about as many wrong boxes as it misses objects (precision = recall <=> FP = FN), ties broken by
  F1. A default run should give every object its box and nothing for absent phrases: both errors
  count, and neither is traded for a sliver of F1. On a flat F1 curve the F1 maximum falls on
  either side by noise (fiber-nano phase 7: F1 0.9081 at 0.25 with precision 0.899, 0.9059 at the
  balanced 0.26 with 0.904 / 0.908).
- ``--rule f1``: the highest F1 (on a plateau of equal F1 its middle).

The manifest gets ``calibration``:

    {"threshold", "rule", "precision", "recall", "f1", "iou": 0.5, "data", "images", "noise_images",
     "negatives", "seed", "phrases", "boxes", "backend",
     "sweep": {"thresholds": [...], "precision": [...], "recall": [...], "f1": [...]}}

The manifest's "files" (and so the package digest, and engines built from it) do not change.
compress.export runs this with ``--calibrate DIR``. Torch-free.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from common import package as pkg
from common.progress import Progress, progress_line

IOU = 0.5
DEFAULT_NOISE = 8       # pure-noise images (1x1, 64x64, 320x320) added to the held-out ones
GRID = tuple(round(i / 100, 2) for i in range(100))  # 0.00 ... 0.99


@dataclass(frozen=True)
class Item:
    """One held-out image and its prompt: phrases (present first is not implied: shuffled) and
    the ground-truth boxes per phrase (xyxy pixels; none for an absent phrase)."""

    image: Any                    # a path, or uint8 [H, W, 3] (noise images)
    phrases: tuple[str, ...]
    boxes: tuple[np.ndarray, ...]  # per phrase float32 [K, 4]

    @property
    def prompt(self) -> str:
        return ". ".join(self.phrases)


# ----------------------------------------------------------------------------- the items

def _phrase(ann: dict, kinds: dict[int, str]) -> str:
    colour = (ann.get("attributes") or {}).get("colour")
    kind = kinds[ann["category_id"]]
    return f"{colour} {kind}" if colour else kind


def _negatives(present: set[str], kinds: Sequence[str], colours: Sequence[str], n: int,
               rng: np.random.Generator) -> list[str]:
    """``n`` absent phrases, hard ones first: a present kind in another colour, a present colour on
    another kind; plain categories (no colours): absent categories."""
    if not colours:
        pool = [k for k in kinds if k not in present]
        return [pool[i] for i in rng.permutation(len(pool))[:n]]
    pairs = [p.split(" ", 1) for p in present]
    hard = {f"{c} {k}" for _, k in pairs for c in colours} | {f"{c} {k}" for c, _ in pairs for k in kinds}
    hard = sorted(hard - present)
    return [hard[i] for i in rng.permutation(len(hard))[:n]]


def detection_items(data: str | Path, negatives: int = 2, limit: int | None = None, noise: int = 0,
                    seed: int = 0) -> list[Item]:
    """The calibration items of a data folder's detection.json (see the module docstring)."""
    path = Path(data) / "detection.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        kinds = {int(c["id"]): str(c["name"]) for c in doc["categories"]}
        images = sorted(doc["images"], key=lambda im: im["id"])
        anns: dict[int, list[dict]] = {}
        for a in doc["annotations"]:
            if not a.get("iscrowd"):
                anns.setdefault(int(a["image_id"]), []).append(a)
    except FileNotFoundError:
        raise ValueError(f"{data}: no detection.json (calibration needs boxes with their phrases)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO detection file ({e!r})") from None
    colours = sorted({(a.get("attributes") or {}).get("colour") for v in anns.values() for a in v} - {None})
    rng = np.random.default_rng(seed)
    items = []
    for im in images[:limit] if limit else images:
        groups: dict[str, list] = {}
        for a in anns.get(int(im["id"]), []):
            x, y, w, h = a["bbox"]
            groups.setdefault(_phrase(a, kinds), []).append([x, y, x + w, y + h])
        if not groups:
            continue
        phrases = list(groups) + _negatives(set(groups), sorted(kinds.values()), colours, negatives, rng)
        order = rng.permutation(len(phrases))
        phrases = [phrases[i] for i in order]
        boxes = [np.asarray(groups.get(p, np.zeros((0, 4))), np.float32).reshape(-1, 4) for p in phrases]
        items.append(Item(Path(data) / im["file_name"], tuple(phrases), tuple(boxes)))
    for i in range(noise):  # every phrase absent
        src = items[i % len(items)] if items else None
        if src is None:
            break
        side = (1, 64, 320)[i % 3]  # a 1x1 frame, small and full-size noise
        image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        items.append(Item(image, src.phrases, tuple(np.zeros((0, 4), np.float32) for _ in src.phrases)))
    return items


# ----------------------------------------------------------------------------- matching and sweep

def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)  # noqa: E731
    union = area(box) + area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match(scores: np.ndarray, phrase_index: np.ndarray, boxes: np.ndarray,
          truth: Sequence[np.ndarray], iou: float = IOU) -> np.ndarray:
    """bool [N]: detection i is correct (greedy, best score first: its phrase's unmatched
    ground-truth box of highest IoU, if >= ``iou``). Scores/phrases/boxes of one image."""
    used = [np.zeros(len(t), bool) for t in truth]
    correct = np.zeros(len(scores), bool)
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        gt = truth[int(phrase_index[i])]
        if not len(gt):
            continue
        overlap = np.where(used[int(phrase_index[i])], -1.0, _iou(np.asarray(boxes[i], np.float64), gt))
        j = int(np.argmax(overlap))
        if overlap[j] >= iou:
            used[int(phrase_index[i])][j] = True
            correct[i] = True
    return correct


def sweep(scores: np.ndarray, correct: np.ndarray, num_truth: int,
          thresholds: Iterable[float] = GRID) -> dict[str, list[float]]:
    """Precision, recall and F1 of the detections scoring > t, for each threshold t (the runtime
    keeps scores > threshold). No detection above t: precision 1 (nothing claimed)."""
    scores, correct = np.asarray(scores, np.float64), np.asarray(correct, bool)
    out: dict[str, list[float]] = {"thresholds": [], "precision": [], "recall": [], "f1": []}
    for t in thresholds:
        kept = scores > t
        tp, n = int(correct[kept].sum()), int(kept.sum())
        p = tp / n if n else 1.0
        r = tp / num_truth if num_truth else 0.0
        f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
        for key, value in (("thresholds", t), ("precision", p), ("recall", r), ("f1", f1)):
            out[key].append(round(float(value), 4))
    return out


RULES = ("balanced", "f1")


def best(curve: dict[str, list[float]]) -> int:
    """Index of the highest F1; on a plateau of equal F1, its middle (the margin to both sides)."""
    f1 = np.asarray(curve["f1"])
    top = np.flatnonzero(f1 == f1.max())
    return int(top[len(top) // 2])


def balanced(curve: dict[str, list[float]]) -> int:
    """Index of the highest ``min(precision, recall)``; among equal ones the highest F1, then the
    middle of those."""
    low = np.minimum(np.asarray(curve["precision"]), np.asarray(curve["recall"]))
    top = np.flatnonzero(low == low.max())
    f1 = np.asarray(curve["f1"])[top]
    top = top[f1 == f1.max()]
    return int(top[len(top) // 2])


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"calibration rule must be one of {', '.join(RULES)}, got {rule!r}")


def choose(curve: dict[str, list[float]], rule: str = "balanced") -> int:
    """The index ``rule`` (``RULES``) picks on ``curve``."""
    check_rule(rule)
    return balanced(curve) if rule == "balanced" else best(curve)


# ----------------------------------------------------------------------------- the package

def calibrate(detect: Callable[[Any, str], Any], items: Sequence[Item], iou: float = IOU,
              progress: Progress | None = None, rule: str = "balanced") -> dict[str, Any]:
    """Run ``detect(image, prompt) -> Detections`` (threshold 0) on every item; the sweep and the
    threshold ``rule`` picks. ``progress``: e.g. common.progress.progress_line(), called as
    ``progress(items, desc=...)``."""
    check_rule(rule)   # before the package runs
    scores, correct, truth = [], [], 0
    for item in (progress(items, desc="calibration", unit="image") if progress else items):
        dets = detect(item.image, item.prompt)
        scores.append(np.asarray(dets.scores, np.float64))
        correct.append(match(dets.scores, dets.phrase_index, dets.boxes, item.boxes, iou))
        truth += sum(len(b) for b in item.boxes)
    curve = sweep(np.concatenate(scores) if scores else np.zeros(0), np.concatenate(correct) if correct
                  else np.zeros(0, bool), truth)
    i = choose(curve, rule)
    return {"threshold": curve["thresholds"][i], "rule": rule, "precision": curve["precision"][i],
            "recall": curve["recall"][i], "f1": curve["f1"][i], "iou": iou, "boxes": truth,
            "phrases": sum(len(it.phrases) for it in items), "sweep": curve}


def calibrate_package(package: str | Path, data: str | Path, negatives: int = 2, limit: int | None = None,
                      noise: int = 0, seed: int = 0, backend: str = "auto", threads: int | None = None,
                      progress: Progress | None = None, rule: str = "balanced") -> dict[str, Any]:
    """The calibration record of ``package`` on ``data`` (nothing written)."""
    from runtime.predictor import Detector

    items = detection_items(data, negatives, limit, noise, seed)
    if not any(len(b) for it in items for b in it.boxes):
        raise ValueError(f"{data}: no ground-truth boxes to calibrate on")
    t0 = time.perf_counter()
    with Detector(package, backend=backend, threads=threads, threshold=0.0) as det:
        record = calibrate(det.detect, items, progress=progress, rule=rule)
        used = det.backend
    return {**record, "data": str(data), "images": sum(isinstance(it.image, Path) for it in items),
            "noise_images": sum(not isinstance(it.image, Path) for it in items), "negatives": negatives,
            "seed": seed, "backend": used, "seconds": round(time.perf_counter() - t0, 1)}


def write_calibration(package: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Set the manifest's ``postprocess.threshold`` and ``calibration`` (atomically); the manifest."""
    package = Path(package)
    manifest = pkg.read_manifest(package)
    manifest.setdefault("postprocess", {})["threshold"] = record["threshold"]
    manifest["calibration"] = record
    pkg.write_manifest(package, manifest)
    return manifest


# ----------------------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--package", required=True, help="model package whose manifest gets the threshold")
    p.add_argument("--data", required=True, help="held-out data folder with detection.json (not the training data)")
    p.add_argument("--negatives", type=int, default=2, help="absent hard-negative phrases per prompt")
    p.add_argument("--noise", type=int, default=DEFAULT_NOISE, help="pure-noise images (every phrase absent) added")
    p.add_argument("--limit", type=int, default=None, help="first N images only (default: all)")
    p.add_argument("--seed", type=int, default=0, help="negatives, prompt order and noise images")
    p.add_argument("--rule", choices=RULES, default="balanced",
                   help="balanced: the highest min(precision, recall) (as many wrong boxes as missed "
                        "objects); f1: the highest F1")
    p.add_argument("--backend", default="auto", help="runtime backend the package is run on")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=False,
                   help="print the sweep, do not write the manifest")
    return p


def main(args: argparse.Namespace) -> int:
    for flag, value, low in (("--negatives", args.negatives, 0), ("--noise", args.noise, 0),
                             ("--limit", args.limit, 1)):
        if value is not None and value < low:
            print(f"compress.calibrate: {flag} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    try:
        pkg.read_manifest(args.package)
        record = calibrate_package(args.package, args.data, args.negatives, args.limit, args.noise, args.seed,
                                   args.backend, args.threads, progress_line(), args.rule)
        if not args.dry_run:
            write_calibration(args.package, record)
    except (ValueError, OSError, RuntimeError) as e:  # PackageError, EngineError, bad data
        print(f"compress.calibrate: {e}", file=sys.stderr)
        return 2
    c = record["sweep"]
    for i in range(0, len(c["thresholds"]), 5):
        print(f"  > {c['thresholds'][i]:.2f}: precision {c['precision'][i]:.3f} recall {c['recall'][i]:.3f} "
              f"F1 {c['f1'][i]:.3f}")
    print(f"{'would set' if args.dry_run else 'set'} {args.package} postprocess.threshold = {record['threshold']} "
          f"(precision {record['precision']}, recall {record['recall']}, F1 {record['f1']}; "
          f"{record['images']} images + {record['noise_images']} noise, {record['phrases']} phrases, "
          f"{record['boxes']} boxes, {record['backend']}, {record['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
