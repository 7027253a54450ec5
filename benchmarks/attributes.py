"""Attribute-aware detection: does a package tell "red star" from "blue star"?

    python -m benchmarks.attributes --package models/fiber-nano [--package ...] [--images 200]
        [--seed 1414] [--sizes WxH,...] [--backend auto] [--threads N] [--threshold T] [--json OUT]

Freshly generated scenes (``fiber.data.synth.make_scene``, in memory; seed 1414 by default, apart
from the training (0), validation (1) and example (7) seeds), of the generator's mix of sizes
and aspects, or of ``--sizes`` (e.g. ``320x240,384x288``: what a 4:3 camera gives a package
exported with ``--canvas 224x288``). Each image is prompted, detection
style (". "-separated), with every (colour, kind) pair present plus two absent hard negatives: one
of a present kind in another colour and one of a present colour as another kind
("red star. blue star. red bolt"), in a shuffled order. The package runs through the runtime
(``runtime.predictor.Detector``, its default post-processing); a detection is a true positive
when it names the pair of a not yet matched object with IoU >= 0.5 (greedy, best score first),
otherwise a false positive (a wrong colour or kind, an absent phrase, a duplicate).
Precision = TP / detections, recall = matched objects / objects, at the package's default
threshold (or ``--threshold``), plus a sweep over thresholds (post-NMS filtering of one run at the
lowest threshold swept) and where the false positives come from.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common.atomic import atomic_write_text
from fiber.data.synth import COLOURS, DEFAULT_SIZES, KINDS, SynthConfig, make_scene, parse_size

SWEEP = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7)
IOU = 0.5


@dataclass(frozen=True)
class PromptedScene:
    image: np.ndarray                        # uint8 RGB [H, W, 3]
    prompt: str
    phrases: tuple[tuple[str, str], ...]     # (colour, kind) per phrase, prompt order
    boxes: np.ndarray                        # float32 [K, 4] xyxy, every object
    pairs: tuple[tuple[str, str], ...]       # (colour, kind) per object
    absent: tuple[int, ...]                  # indices of the phrases with no object


def hard_negatives(present: Sequence[tuple[str, str]], rng: np.random.Generator,
                   per_pool: int = 1) -> list[tuple[str, str]]:
    """``per_pool`` absent pairs of a present kind in another colour, then as many of a present
    colour as another kind."""
    have = set(present)
    same_kind = sorted({(c, k) for _, k in have for c in COLOURS} - have)
    same_colour = sorted({(c, k) for c, _ in have for k in KINDS} - have)
    out = []
    for pool in (same_kind, same_colour):
        for _ in range(per_pool):
            pool = [p for p in pool if p not in out]
            if pool:
                out.append(pool[int(rng.integers(len(pool)))])
    return out


def make_scenes(images: int, seed: int, absent_only: bool = False,
                sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES) -> list[PromptedScene]:
    """The prompted scenes; ``absent_only``: each prompt names only absent look-alikes (two of a
    present kind in another colour, two of a present colour as another kind: "red star" beside a
    red arrow), where every detection is a false positive. ``sizes``: (width, height) choices."""
    cfg = SynthConfig(images=images, seed=seed, sizes=tuple(sizes))
    out = []
    for i in range(images):
        image, scene = make_scene(cfg, i)
        pairs = tuple((o.colour, o.kind) for o in scene.objects)
        present = list(dict.fromkeys(pairs))
        rng = np.random.default_rng([seed, i, 14])
        negs = hard_negatives(present, rng, per_pool=2 if absent_only else 1)
        phrases = negs if absent_only else present + negs
        phrases = [phrases[j] for j in rng.permutation(len(phrases))]
        prompt = ". ".join(f"{c} {k}" for c, k in phrases)
        boxes = np.asarray([o.box for o in scene.objects], np.float32).reshape(-1, 4)
        out.append(PromptedScene(np.asarray(image), prompt, tuple(phrases), boxes, pairs,
                                 tuple(j for j, p in enumerate(phrases) if p in negs)))
    return out


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lo = np.maximum(box[:2], boxes[:, :2])
    hi = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def match(scene: PromptedScene, boxes: np.ndarray, scores: np.ndarray, phrase_index: np.ndarray,
          threshold: float) -> dict[str, int]:
    """Counts for one image at ``threshold``: tp, fp (and why), objects, matched."""
    keep = np.flatnonzero(scores >= threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    used = np.zeros(len(scene.pairs), bool)
    c = {"tp": 0, "fp": 0, "fp_absent_phrase": 0, "fp_wrong_pair": 0, "fp_duplicate_or_loc": 0,
         "fp_absent_same_colour": 0, "fp_absent_same_kind": 0, "objects": len(scene.pairs),
         "images_with_fp": 0}
    for d in keep:
        pair = scene.phrases[int(phrase_index[d])]
        ious = _iou(boxes[d], scene.boxes) if len(scene.boxes) else np.zeros(0)
        ok = np.flatnonzero((ious >= IOU) & ~used & np.array([p == pair for p in scene.pairs], bool))
        if len(ok):
            used[ok[np.argmax(ious[ok])]] = True
            c["tp"] += 1
            continue
        c["fp"] += 1
        if int(phrase_index[d]) in scene.absent:
            c["fp_absent_phrase"] += 1
            if len(ious) and ious.max() >= IOU:      # on an object: which word of it the phrase shares
                on = scene.pairs[int(np.argmax(ious))]
                c["fp_absent_same_colour"] += on[0] == pair[0]
                c["fp_absent_same_kind"] += on[1] == pair[1]
        elif len(ious) and ious.max() >= IOU and scene.pairs[int(np.argmax(ious))] != pair:
            c["fp_wrong_pair"] += 1
        else:
            c["fp_duplicate_or_loc"] += 1
    c["matched"] = int(used.sum())
    c["images_with_fp"] = int(c["fp"] > 0)
    return c


def _summary(counts: list[dict[str, int]]) -> dict[str, float]:
    tot = {k: sum(c[k] for c in counts) for k in counts[0]}
    dets = tot["tp"] + tot["fp"]
    p = tot["tp"] / dets if dets else 0.0
    r = tot["matched"] / tot["objects"] if tot["objects"] else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4),
            "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0, "detections": dets,
            "fp_per_image": round(tot["fp"] / len(counts), 4),
            "share_images_with_fp": round(tot["images_with_fp"] / len(counts), 4), **tot}


def measure(package: str | Path, scenes: Sequence[PromptedScene], backend: str = "auto",
            threads: int | None = None, threshold: float | None = None,
            sweep: Sequence[float] = SWEEP) -> dict:
    """Precision / recall of ``package`` on ``scenes`` at its default threshold (or ``threshold``)
    and over ``sweep``."""
    from runtime.predictor import Detector

    with Detector(package, backend=backend, threads=threads) as probe:
        default = probe.post.threshold
    at = default if threshold is None else threshold
    low = min([at, *sweep])
    runs = []
    t0 = time.perf_counter()
    with Detector(package, backend=backend, threads=threads, threshold=low) as det:
        name = det.backend
        for s in scenes:
            d = det.detect(s.image, s.prompt)
            runs.append((np.asarray(d.boxes), np.asarray(d.scores), np.asarray(d.phrase_index)))
    seconds = time.perf_counter() - t0
    table = lambda t: _summary([match(s, *r, t) for s, r in zip(scenes, runs)])  # noqa: E731
    return {"package": str(package), "backend": name, "threshold": at,
            "default_threshold": default, "at_threshold": table(at),
            "sweep": {f"{t:g}": table(t) for t in sweep}, "images": len(scenes),
            "seconds": round(seconds, 1)}


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``320x240,384x288`` -> ((320, 240), (384, 288)): the generator's WxH parser and size bound;
    argparse error naming the bad part."""
    sizes = tuple(parse_size(part) for part in text.split(","))
    try:
        SynthConfig(sizes=sizes)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return sizes


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("benchmarks.attributes", description=__doc__.split("\n\n")[0])
    p.add_argument("--package", action="append", required=True, type=Path,
                   help="model package folder (repeat to compare)")
    p.add_argument("--images", type=int, default=200, help="fresh scenes to generate")
    p.add_argument("--seed", type=int, default=1414, help="scene seed (training uses 0, validation 1)")
    p.add_argument("--sizes", type=_sizes, default=DEFAULT_SIZES, metavar="WxH,...",
                   help="scene sizes to draw from, width x height (default: the generator's mix of "
                        "aspects; e.g. 320x240,384x288 for a 4:3 camera)")
    p.add_argument("--backend", default="auto", help="runtime backend (auto: the package's default)")
    p.add_argument("--threads", type=int, default=None, help="backend CPU threads")
    p.add_argument("--threshold", type=float, default=None,
                   help="score threshold (default: each package's manifest value)")
    p.add_argument("--absent-only", action=argparse.BooleanOptionalAction, default=False,
                   help="prompt each scene with absent look-alikes only (two of a present kind in "
                        "another colour, two of a present colour as another kind): every detection "
                        "is a false positive; reports false positives per image and the share of "
                        "images with any")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p


def main(args: argparse.Namespace) -> int:
    if args.images < 1:
        print("benchmarks.attributes: --images must be >= 1", file=sys.stderr)
        return 2
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        print("benchmarks.attributes: --threshold must be in [0, 1]", file=sys.stderr)
        return 2
    for p in args.package:
        if not p.is_dir():
            print(f"benchmarks.attributes: --package {p}: does not exist", file=sys.stderr)
            return 2
    scenes = make_scenes(args.images, args.seed, args.absent_only, args.sizes)
    results = []
    try:
        for p in args.package:
            r = measure(p, scenes, args.backend, args.threads, args.threshold)
            a = r["at_threshold"]
            if args.absent_only:
                print(f"{p} ({r['backend']}) threshold {r['threshold']:g}, absent look-alikes only: "
                      f"{a['fp_per_image']:.3f} false positives per image, {a['share_images_with_fp']:.3f} "
                      f"of images with any ({a['fp_absent_same_colour']} on an object of the phrase's "
                      f"colour, {a['fp_absent_same_kind']} of its kind)", flush=True)
                results.append(r)
                continue
            print(f"{p} ({r['backend']}) threshold {r['threshold']:g}: precision {a['precision']:.3f} "
                  f"recall {a['recall']:.3f} ({a['detections']} detections, {a['objects']} objects; "
                  f"false positives: {a['fp_absent_phrase']} absent phrase, {a['fp_wrong_pair']} "
                  f"wrong colour/kind, {a['fp_duplicate_or_loc']} duplicate or misplaced)", flush=True)
            best = max(r["sweep"].items(), key=lambda kv: kv[1]["f1"])
            print(f"    best F1 over the sweep at {best[0]}: precision {best[1]['precision']:.3f} "
                  f"recall {best[1]['recall']:.3f}", flush=True)
            results.append(r)
    except (ValueError, OSError) as e:
        print(f"benchmarks.attributes: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        atomic_write_text(args.json, json.dumps({"images": args.images, "seed": args.seed,
                                                 "sizes": [list(wh) for wh in args.sizes],
                                                 "absent_only": args.absent_only, "iou": IOU,
                                                 "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
