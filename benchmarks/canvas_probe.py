"""How much a canvas that follows each image's aspect would give: the attribute metric of a fine
checkpoint through the runtime's post-processing, with the network input prepared by a per-image
canvas rule instead of the package's fixed canvas.

    python -m benchmarks.canvas_probe --checkpoint runs/nano-p7 --rule area [--area 256]
        [--images 400] [--seed 1234] [--one-label-per-box] [--contrast-kinds] [--json OUT]

Rules: ``square`` (the package's S x S letterbox, S = ``--area``), ``area`` (scale ``A / sqrt(h w)``
so the image keeps its aspect at about A x A pixels, the canvas its size rounded up to 32) and
``native`` (the image at its own size, rounded up to 32). The PyTorch model runs any canvas (the
coarse Swin pads each grid to its stage's window); packages run one fixed canvas
(``compress.export --canvas``), so this measures a rule no package implements yet. Each rule is
reported at its balanced threshold (highest min(precision, recall)) over a sweep, with the
absent-look-alikes-only rate there (``benchmarks.attributes``'s scenes and matching).

``--one-label-per-box``: the runtime's NMS across phrases (each box keeps its best phrase).
``--contrast-kinds``: each prompt also names every kind of the generated world it does not name
("... . triangle. arrow. moon"), boxes are one label each, and a box whose best phrase is such a
contrast kind is dropped: a look-alike claimed by its own kind no longer counts for the prompt.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from benchmarks.attributes import SWEEP, _summary, make_scenes, match
from common.atomic import atomic_write_text
from fiber.data.synth import KINDS
from runtime.preprocess import letterbox, letterbox_info

RULES = ("square", "area", "native")
STRIDE = 32


def canvas_for(h: int, w: int, rule: str, area: int) -> tuple[float, int, int, int, int]:
    """(scale, new_w, new_h, canvas_h, canvas_w) of an ``h x w`` image under ``rule``."""
    if rule == "square":  # the runtime's own letterbox geometry
        info = letterbox_info(w, h, area)
        return info.scale, info.new_w, info.new_h, area, area
    s = 1.0 if rule == "native" else area / math.sqrt(h * w)
    nw, nh = max(1, math.floor(w * s + 0.5)), max(1, math.floor(h * s + 0.5))
    return s, nw, nh, -(-nh // STRIDE) * STRIDE, -(-nw // STRIDE) * STRIDE


class CanvasRule:
    """A stand-in for the Detector's preprocessor: the runtime's letterbox on a per-image canvas."""

    def __init__(self, rule: str, area: int, mean, std):
        self.rule, self.area, self.mean, self.std = rule, area, mean, std
        self.pixels: list[int] = []

    def __call__(self, image: np.ndarray, bgr: bool = False):
        h, w = image.shape[:2]
        _, nw, nh, ch, cw = canvas_for(h, w, self.rule, self.area)
        # the runtime's letterbox into the resized region exactly, then the canvas's padding
        inner = np.zeros((3, nh, nw), np.float32)
        info = letterbox(np.ascontiguousarray(image), inner, self.mean, self.std, bgr)
        buf = np.zeros((1, 3, ch, cw), np.float32)
        buf[0, :, :nh, :nw] = inner
        self.pixels.append(ch * cw)
        return buf, info


def contrast_kinds_prompt(prompt: str, named_kinds) -> str:
    """``prompt`` followed by every kind of ``KINDS`` not in ``named_kinds``, as phrases of their own."""
    named = set(named_kinds)
    return ". ".join([prompt, *(k for k in KINDS if k not in named)])


def probe(checkpoint: str, rule: str, area: int, images: int, seed: int, one_label_per_box: bool = False,
          contrast_kinds: bool = False) -> dict:
    from fiber.checkpoint import load_fine_model, tokenizer_file
    from fiber.data.evaluation import EVAL_POSTPROCESS
    from fiber.torch_engines import torch_detector

    model, meta = load_fine_model(checkpoint, "canvas probe")
    sweep = sorted({round(float(t), 2) for t in np.arange(0.18, 0.45, 0.01)} | set(SWEEP))
    one_label_per_box = one_label_per_box or contrast_kinds
    out: dict = {"checkpoint": checkpoint, "rule": rule, "area": area, "images": images, "seed": seed,
                 "one_label_per_box": one_label_per_box, "contrast_kinds": contrast_kinds}
    with torch_detector(model, tokenizer=tokenizer_file(meta["path"]),
                        **{**EVAL_POSTPROCESS, "threshold": min(sweep),
                           "one_label_per_box": one_label_per_box}) as det:
        det.preprocessor = pre = CanvasRule(rule, area, det.preprocessor.mean, det.preprocessor.std)
        for absent in (False, True):
            scenes = make_scenes(images, seed, absent_only=absent)
            runs = []
            for s in scenes:
                prompt = contrast_kinds_prompt(s.prompt, [k for _, k in s.phrases]) if contrast_kinds else s.prompt
                d = det.detect(s.image, prompt)
                own = np.asarray(d.phrase_index) < len(s.phrases)      # not a contrast kind's box
                runs.append((np.asarray(d.boxes)[own], np.asarray(d.scores)[own], np.asarray(d.phrase_index)[own]))
            table = {t: _summary([match(s, *r, t) for s, r in zip(scenes, runs)]) for t in sweep}
            if not absent:
                bal = max(table, key=lambda t: (min(table[t]["precision"], table[t]["recall"]), table[t]["f1"]))
                best = max(table, key=lambda t: table[t]["f1"])
                out["standard"] = {"balanced_threshold": bal, "at_balanced": table[bal],
                                   "best_f1_threshold": best, "best_f1": table[best]["f1"]}
                out["pixels_vs_square"] = round(float(np.mean(pre.pixels)) / area**2, 3)
            else:
                out["absent_only_at_balanced"] = table[out["standard"]["balanced_threshold"]]
    return out


def main(args: argparse.Namespace) -> int:
    if args.images < 1 or args.area < STRIDE:
        print(f"benchmarks.canvas_probe: --images must be >= 1 and --area >= {STRIDE}", file=sys.stderr)
        return 2
    if not Path(args.checkpoint).exists():
        print(f"benchmarks.canvas_probe: --checkpoint {args.checkpoint}: does not exist", file=sys.stderr)
        return 2
    r = probe(args.checkpoint, args.rule, args.area, args.images, args.seed, args.one_label_per_box,
              args.contrast_kinds)
    a, b = r["standard"]["at_balanced"], r["absent_only_at_balanced"]
    print(f"{args.rule} (area {args.area}: {r['pixels_vs_square']:.3f}x the pixels of {args.area} x {args.area}): best F1 "
          f"{r['standard']['best_f1']:.4f}; balanced threshold {r['standard']['balanced_threshold']:g}: "
          f"precision {a['precision']:.3f} recall {a['recall']:.3f}; absent look-alikes only there: "
          f"{b['fp_per_image']:.3f} false positives per image, {b['share_images_with_fp']:.3f} of images")
    if args.json:
        atomic_write_text(args.json, json.dumps(r, indent=1) + "\n")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("benchmarks.canvas_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="fine checkpoint folder or run folder")
    p.add_argument("--rule", choices=RULES, default="area", help="per-image canvas rule")
    p.add_argument("--area", type=int, default=256, help="side of the square whose pixels the canvas keeps")
    p.add_argument("--images", type=int, default=400, help="fresh scenes (and as many absent-only ones)")
    p.add_argument("--seed", type=int, default=1234, help="scene seed")
    p.add_argument("--one-label-per-box", action="store_true", help="NMS across phrases: each box keeps its best phrase")
    p.add_argument("--contrast-kinds", action="store_true",
                   help="also name every kind the prompt does not, one label per box, drop the boxes those kinds win")
    p.add_argument("--json", type=Path, default=None, help="write the result here (atomically)")
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
