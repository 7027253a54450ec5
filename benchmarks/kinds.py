"""Does a model know the kind of each object? Every kind of the generated world is offered at once.

    python -m benchmarks.kinds (--package DIR | --checkpoint RUN) [--images 300] [--seed 4242]
        [--threads N] [--json OUT]

``benchmarks.attributes`` prompts the present pairs plus two hard negatives, so the right phrase
is nearly always in the prompt and the model only has to rank a few. Here each fresh scene
(``fiber.data.synth``, seed 4242 by default: apart from the training, validation, example and
attribute seeds) is prompted with all twelve kind names in a shuffled order ("moon. hexagon. star.
..."), as a detection vocabulary is. An object is named by the best-scoring detection whose box has
IoU >= 0.5 with it (the evaluation's post-processing, ``fiber.data.evaluation.EVAL_POSTPROCESS``,
at a threshold of 0.02, so that a weak but right kind still counts); the report gives the share named right, overall and by kind, size and texture,
and the most frequent confusions (kind -> what it was named, "none" when no box covers it).

A package runs through the runtime (``runtime.predictor.Detector``); a fine checkpoint through the
same post-processing over the PyTorch model (``fiber.torch_engines``), on the square letterbox of
its config.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks.attributes import IOU, _iou
from common.atomic import atomic_write_text
from fiber.data.synth import KINDS, SynthConfig, make_scene

THRESHOLD = 0.02
NONE = "none"


def name_objects(objects: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: Sequence[str]) -> list[str]:
    """The name each object [K, 4] gets: the label of the best-scoring detection (boxes [D, 4],
    scores [D], labels [D]) with IoU >= 0.5 with it; ``NONE`` when none covers it."""
    out = []
    for box in np.asarray(objects, np.float32).reshape(-1, 4):
        if len(boxes) == 0:
            out.append(NONE)
            continue
        cover = np.flatnonzero(_iou(box, np.asarray(boxes, np.float32)) >= IOU)
        out.append(labels[int(cover[np.argmax(np.asarray(scores)[cover])])] if len(cover) else NONE)
    return out


def _shares(hits: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    return {k: {"right": round(a / b, 4), "objects": b} for k, (a, b) in sorted(hits.items())}


def measure(detector, images: int, seed: int) -> dict:
    """Kind accuracy of ``detector`` (a runtime Detector) on ``images`` fresh scenes."""
    cfg = SynthConfig(images=images, seed=seed)
    by: dict[str, dict[str, list[int]]] = {"kind": defaultdict(lambda: [0, 0]),
                                           "size": defaultdict(lambda: [0, 0]),
                                           "texture": defaultdict(lambda: [0, 0])}
    confusions: Counter = Counter()
    right = total = 0
    for i in range(images):
        image, scene = make_scene(cfg, i)
        order = np.random.default_rng([seed, i]).permutation(len(KINDS))
        kinds = [KINDS[j] for j in order]
        d = detector.detect(image, ". ".join(kinds))
        labels = [kinds[int(p)] for p in np.asarray(d.phrase_index)]
        named = name_objects(np.array([o.box for o in scene.objects], np.float32).reshape(-1, 4),
                             np.asarray(d.boxes), np.asarray(d.scores), labels)
        for o, n in zip(scene.objects, named):
            ok = n == o.kind
            right += ok
            total += 1
            for part, value in (("kind", o.kind), ("size", o.size), ("texture", o.texture)):
                by[part][value][0] += ok
                by[part][value][1] += 1
            if not ok:
                confusions[f"{o.kind} -> {n}"] += 1
    return {"images": images, "seed": seed, "objects": total, "right": round(right / max(total, 1), 4),
            **{f"by_{part}": _shares(h) for part, h in by.items()},
            "confusions": dict(confusions.most_common(15))}


def model_detector(args: argparse.Namespace, threshold: float, purpose: str):
    """A detector for ``--package`` (the runtime) or ``--checkpoint`` (the PyTorch model through the
    same post-processing), the evaluation's post-processing at ``threshold``; and its name."""
    from fiber.data.evaluation import EVAL_POSTPROCESS

    options = {**EVAL_POSTPROCESS, "threshold": threshold}
    if args.package is not None:
        from runtime.predictor import Detector
        return Detector(args.package, threads=args.threads, **options), str(args.package)
    from fiber.checkpoint import load_fine_model, tokenizer_file
    from fiber.torch_engines import torch_detector

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    model, meta = load_fine_model(str(args.checkpoint), purpose)
    return torch_detector(model, tokenizer=tokenizer_file(meta["path"]), **options), str(args.checkpoint)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--package`` | ``--checkpoint`` (one required) and ``--threads``: what ``model_detector`` reads."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--package", type=Path, help="model package folder (runs through the runtime)")
    src.add_argument("--checkpoint", type=Path, help="fine checkpoint or run folder (PyTorch)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's)")


def missing_model(args: argparse.Namespace) -> str | None:
    """"--package X: does not exist" (or --checkpoint) when the model ``add_model_arguments`` names is
    not there; None when it is."""
    flag, source = (("--package", args.package) if args.package is not None
                    else ("--checkpoint", args.checkpoint))
    return None if source.exists() else f"{flag} {source}: does not exist"


def main(args: argparse.Namespace) -> int:
    if args.images < 1:
        print("benchmarks.kinds: --images must be >= 1", file=sys.stderr)
        return 2
    problem = missing_model(args)
    if problem:
        print(f"benchmarks.kinds: {problem}", file=sys.stderr)
        return 2
    try:
        det, name = model_detector(args, THRESHOLD, "benchmarks.kinds")
        with det:
            r = measure(det, args.images, args.seed)
    except (ValueError, OSError) as e:
        print(f"benchmarks.kinds: error: {e}", file=sys.stderr)
        return 2
    r = {"model": name, **r}
    kinds = ", ".join(f"{k} {v['right']:.2f}" for k, v in r["by_kind"].items())
    sizes = ", ".join(f"{k} {v['right']:.2f}" for k, v in r["by_size"].items())
    print(f"{name}: the right kind for {r['right']:.3f} of {r['objects']} objects when all {len(KINDS)} "
          f"kinds are offered")
    print(f"    by kind: {kinds}")
    print(f"    by size: {sizes}")
    print("    most confused: " + ", ".join(f"{k} ({v})" for k, v in list(r["confusions"].items())[:6]))
    if args.json:
        atomic_write_text(args.json, json.dumps(r, indent=1) + "\n")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("benchmarks.kinds", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--images", type=int, default=300, help="fresh scenes")
    p.add_argument("--seed", type=int, default=4242, help="scene seed")
    p.add_argument("--json", type=Path, default=None, help="write the result here (atomically)")
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
