"""What a model says on a few images for a few prompts: `make demo`'s check on a training run,
without exporting it.

    python -m benchmarks.prompt_probe (--checkpoint RUN | --package DIR) [--image PATH ...]
        [--prompt P ...] [--floor 0.1] [--threshold T] [--json OUT]

Each image is run with each prompt through the evaluation's post-processing
(``fiber.data.evaluation.EVAL_POSTPROCESS``: per-phrase NMS, as ``runtime.detect`` by default) and
every box scoring at least ``--floor`` is printed with its phrase, best first. Boxes at or above
``--threshold`` (when a package is given and no threshold is, the package's default, as ``runtime.detect`` reads it) are
marked ``*``: the labels ``runtime.detect`` would draw. Defaults: the images of ``examples/`` and
`make demo`'s prompt. Several ``--prompt`` values show how one phrase's score moves with the rest of
the prompt (docs/results.md sections 24-25: "blue star" on a blue triangle, alone and beside "blue
bolt").

A package runs through the runtime (``runtime.predictor.Detector``); a fine checkpoint through the
same post-processing over the PyTorch model (``fiber.torch_engines``), on its config's square
letterbox.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from benchmarks.kinds import add_model_arguments, missing_model, model_detector
from common.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DEMO_PROMPT = "blue star. red star. brown star. blue bolt"   # the Makefile's DEMO_PROMPT
EXAMPLES = REPO / "examples"


def probe(detector, images: Iterable[tuple[str, np.ndarray]], prompts: Sequence[str],
          floor: float) -> list[dict]:
    """One record per (image, prompt): the boxes scoring >= ``floor``, best first, each
    {"phrase", "score", "box"} (box xyxy in image pixels, rounded to whole pixels)."""
    out = []
    for name, image in images:
        for prompt in prompts:
            d = detector.detect(image, prompt)
            rows = [{"phrase": d.phrases[int(p)], "score": round(float(s), 3),
                     "box": [int(round(float(v))) for v in b]}
                    for b, s, p in zip(d.boxes, d.scores, d.phrase_index) if s >= floor]
            rows.sort(key=lambda r: -r["score"])
            out.append({"image": name, "prompt": prompt, "detections": rows})
    return out


def format_record(record: dict, threshold: float | None) -> str:
    """``image | prompt: phrase score [box], ...`` with ``*`` on the boxes at or above the threshold."""
    items = [f"{'*' if threshold is not None and r['score'] >= threshold else ''}{r['phrase']} "
             f"{r['score']:.2f} {r['box']}" for r in record["detections"]]
    return f"{record['image']} | {record['prompt']}: " + (", ".join(items) or "-")


def _images(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
        else:
            files.append(p)
    return files


def _package_threshold(package: Path) -> float:
    """The package's default threshold: the one ``runtime.detect`` uses when none is given."""
    from common.package import PostprocessSpec, read_manifest

    return PostprocessSpec.from_manifest(read_manifest(package)).threshold


def main(args: argparse.Namespace) -> int:
    name = "benchmarks.prompt_probe"
    problem = missing_model(args)
    if problem:
        print(f"{name}: {problem}", file=sys.stderr)
        return 2
    if not 0.0 <= args.floor <= 1.0:
        print(f"{name}: --floor must be in [0, 1], got {args.floor}", file=sys.stderr)
        return 2
    prompts = args.prompt or [DEMO_PROMPT]
    if any(not p.strip() for p in prompts):
        print(f"{name}: --prompt: an empty prompt", file=sys.stderr)
        return 2
    missing = [p for p in args.image if not p.exists()]
    if missing:
        print(f"{name}: --image {missing[0]}: does not exist", file=sys.stderr)
        return 2
    files = _images(args.image)
    if not files:
        print(f"{name}: --image: no .png or .jpg files in {', '.join(map(str, args.image))}", file=sys.stderr)
        return 2
    from runtime.sources import read_image

    try:
        threshold = args.threshold
        if threshold is None and args.package is not None:
            threshold = _package_threshold(args.package)
        det, _ = model_detector(args, args.floor, name)
        images = [(f.name, read_image(f)) for f in files]
        with det:
            records = probe(det, images, prompts, args.floor)
    except (ValueError, OSError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    for r in records:
        print(format_record(r, threshold))
    if args.json:
        atomic_write_text(args.json, json.dumps({"model": str(args.package or args.checkpoint), "threshold": threshold,
                                                 "floor": args.floor, "records": records}, indent=1) + "\n")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("benchmarks.prompt_probe", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--image", type=Path, nargs="+", default=[EXAMPLES],
                   help="image files or folders of them (default: examples/)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt; repeat for several (default: make demo's)")
    p.add_argument("--floor", type=float, default=0.1, help="lowest score printed (default 0.1)")
    p.add_argument("--threshold", type=float, default=None,
                   help="mark boxes at or above it with * (default: a package's calibrated threshold)")
    p.add_argument("--json", type=Path, default=None, help="write the records here (atomically)")
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
