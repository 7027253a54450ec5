"""Where in the network two look-alike kinds are told apart: a linear probe at each depth.

    python -m benchmarks.feature_probe --checkpoint RUN [--pairs hexagon/circle,cross/arrow]
        [--images 1000] [--seed 4242] [--json OUT]

For each object of a pair's two kinds in fresh square 256 x 256 scenes (``fiber.data.synth``,
seed 4242 by default), the feature at the object's centre cell is read at every depth of the light-head
models (fiber-nano and the like): the patch embedding, the three Swin stage outputs that feed the
FPN, the FPN's first (stride 8) level and the head's tower output there (the region feature the
phrase logit's dot product reads). A ridge classifier (standardised features, lambda 30) is fit on
half of the objects and scored on the other half; 0.5 is chance. A depth where a pair sits at
chance has nothing a later layer could read to score one kind above the other
(docs/results.md section 23).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_text
from fiber.data.synth import KINDS, SynthConfig, make_scene

DEPTHS = ("patch_embed", "stage2", "stage3", "stage4", "fpn_p3", "tower_p3")
LAMBDA = 30.0
SCENE = 256            # square scenes of this side, letterboxed onto the model's square canvas


def ridge_probe(x: np.ndarray, y: np.ndarray, lam: float = LAMBDA, seed: int = 0) -> float:
    """Held-out accuracy of a ridge classifier of 0/1 labels ``y`` [N] on features ``x`` [N, D]:
    standardised on, and fit to, a random half; scored on the other half."""
    x, y = np.asarray(x, np.float64), np.asarray(y)
    if len(y) < 4 or len(set(y.tolist())) < 2:
        raise ValueError(f"a probe needs objects of both kinds, got {len(y)} objects")
    idx = np.random.default_rng(seed).permutation(len(y))
    fit, test = idx[:len(y) // 2], idx[len(y) // 2:]
    mu, sd = x[fit].mean(0), x[fit].std(0) + 1e-6
    a = np.c_[(x - mu) / sd, np.ones(len(y))]
    w = np.linalg.solve(a[fit].T @ a[fit] + lam * np.eye(a.shape[1]), a[fit].T @ (2.0 * y[fit] - 1.0))
    return float(((a[test] @ w > 0) == (y[test] == 1)).mean())


def _grid(t) -> np.ndarray:
    """A hooked output -> [C, H, W] of the first image (token sequences [B, L, C] of a square grid)."""
    t = (t[0] if isinstance(t, (list, tuple)) else t).detach().float()
    if t.dim() == 3:
        side = int(round(t.shape[1] ** 0.5))
        return t[0].T.reshape(-1, side, side).numpy()
    return t[0].numpy()


def collect(checkpoint: str, pairs, images: int, seed: int) -> tuple[dict, dict]:
    """Centre-cell features per (pair, depth) and 0/1 labels per pair (1: the pair's first kind)."""
    from fiber.checkpoint import load_fine_model, tokenizer_file
    from fiber.torch_engines import torch_detector

    model, meta = load_fine_model(checkpoint, "benchmarks.feature_probe")
    if not hasattr(model.head, "tower"):
        raise ValueError(f"{checkpoint}: the probe reads the light head's tower; this model has another head")
    model.eval()
    seen: dict = {}
    image_side = model.cfg.swin.img_size
    modules = {"patch_embed": model.backbone.image.patch_embed, "stage2": model.backbone.image.norm1,
               "stage3": model.backbone.image.norm2, "stage4": model.backbone.image.norm3,
               "fpn_p3": model.fpn, "tower_p3": model.head.tower}
    for name, module in modules.items():   # the first call of each per image: the stride-8 level
        module.register_forward_hook(lambda m, a, out, name=name: seen.setdefault(name, out))
    feats: dict = {(p, d): [] for p in pairs for d in DEPTHS}
    labels: dict = {p: [] for p in pairs}
    cfg = SynthConfig(images=images, seed=seed, sizes=((SCENE, SCENE),))
    scale = image_side / SCENE             # a square scene fills the square canvas: no padding
    with torch_detector(model, tokenizer=tokenizer_file(meta["path"])) as det:
        for i in range(images):
            image, scene = make_scene(cfg, i)
            seen.clear()
            det.detect(image, ". ".join(sorted({k for p in pairs for k in p})))
            grids = {d: _grid(seen[d]) for d in DEPTHS}
            for o in scene.objects:
                cx, cy = (o.box[0] + o.box[2]) / 2 * scale, (o.box[1] + o.box[3]) / 2 * scale
                for p in (p for p in pairs if o.kind in p):
                    labels[p].append(int(o.kind == p[0]))
                    for d, g in grids.items():
                        stride = image_side / g.shape[-1]
                        x, y = min(int(cx / stride), g.shape[2] - 1), min(int(cy / stride), g.shape[1] - 1)
                        feats[(p, d)].append(g[:, y, x])
    return feats, labels


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    out = []
    for item in text.split(","):
        a, _, b = item.strip().partition("/")
        if a not in KINDS or b not in KINDS or a == b:
            raise argparse.ArgumentTypeError(f"{item!r}: want two different kinds as A/B, from {', '.join(KINDS)}")
        out.append((a, b))
    return tuple(out)


def main(args: argparse.Namespace) -> int:
    if args.images < 1:
        print("benchmarks.feature_probe: --images must be >= 1", file=sys.stderr)
        return 2
    if not args.checkpoint.exists():
        print(f"benchmarks.feature_probe: --checkpoint {args.checkpoint}: does not exist", file=sys.stderr)
        return 2
    try:
        feats, labels = collect(str(args.checkpoint), args.pairs, args.images, args.seed)
        table = {f"{a}/{b}": {"objects": len(labels[(a, b)]),
                              **{d: round(ridge_probe(np.array(feats[((a, b), d)]), np.array(labels[(a, b)])), 3)
                                 for d in DEPTHS}} for a, b in args.pairs}
    except (ValueError, OSError) as e:
        print(f"benchmarks.feature_probe: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint}: held-out accuracy of a linear probe at each object's centre (0.5 = chance)")
    print("    pair              objects  " + "  ".join(f"{d:>11}" for d in DEPTHS))
    for pair, row in table.items():
        print(f"    {pair:<17} {row['objects']:>7}  " + "  ".join(f"{row[d]:>11.3f}" for d in DEPTHS))
    if args.json:
        atomic_write_text(args.json, json.dumps({"checkpoint": str(args.checkpoint), "images": args.images,
                                                 "seed": args.seed, "lambda": LAMBDA, "probe": table}, indent=1) + "\n")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("benchmarks.feature_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="fine checkpoint or run folder (light head)")
    p.add_argument("--pairs", type=_pairs, default=_pairs("hexagon/circle,cross/arrow,star/arrow"),
                   help="look-alike pairs as A/B, comma-separated")
    p.add_argument("--images", type=int, default=1000, help="fresh scenes")
    p.add_argument("--seed", type=int, default=4242, help="scene seed")
    p.add_argument("--json", type=Path, default=None, help="write the result here (atomically)")
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
