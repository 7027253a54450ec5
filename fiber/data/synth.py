"""A generated grounding benchmark: scenes of coloured shapes with language that needs the image.

    python -m fiber.data.synth --out DIR --images N --seed S [--size WxH ...] [--overwrite]

Writes into DIR (atomically: a temp folder renamed at the end):

    images/NNNNNN.png   RGB scenes, longer side 256-384 px by default
    pairs.jsonl         stage 1 pairs, one {"image", "caption"} per line (paths relative to DIR)
    grounding.json      MDETR / Flickr30k-Entities COCO style: one "images" entry per (image, text)
                        pair with caption, task ("caption" | "refexp"), has_relation and
                        tokens_positive_eval (char spans per phrase, boxless phrases included);
                        annotations with bbox [x, y, w, h], tokens_positive, phrase_ids (index into
                        that entry's tokens_positive_eval)
    detection.json      plain COCO; categories = the shape kinds (ids 1..K in KINDS order);
                        annotations carry an extra "attributes" {colour, size, texture}

Scenes: 3-8 objects drawn from a few kinds and colours per scene (so distractors share the kind or
the colour of a target), often a "twin" (same kind, colour, size and texture, elsewhere) so that
only a spatial relation picks one of them, sizes small/medium/large, textures solid/striped/dotted/
checkered, bounded overlaps, clutter (lines, muted blobs) and flat/gradient/noise backgrounds.
Everything is drawn at ``supersample`` x resolution and box-filtered down (smooth edges); boxes are
the tight extent of each drawn shape, xyxy float pixels (multiples of 1/supersample).

Language:
- captions name 1-4 (colour, kind) groups: "a large striped red star, two blue squares and a green
  heart" (a group with several instances is one phrase with several boxes); 40% add an absent
  object, "... but no yellow moon": the phrase "yellow moon" has no box.
- referring expressions, one target box each, the phrase is the referent noun phrase:
  attributes only ("the small dotted red star"), superlatives ("the leftmost green circle") or a
  relation to a uniquely described anchor ("the red star left of the blue ring", phrase "the red
  star"). has_relation is true for the last two. Every expression is checked to pick exactly one
  object, with margins.

Determinism: image i is drawn from ``numpy.random.default_rng([seed, i])`` only, and every file is
written in a fixed order and format, so the same config gives byte-identical output.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.atomic import atomic_dir

FORMAT_VERSION = 1

KINDS = ("circle", "square", "triangle", "star", "ring", "heart",
         "cross", "diamond", "hexagon", "arrow", "moon", "bolt")
COLOURS = {  # name -> nominal RGB; each object is jittered around it
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 40),
    "green": (50, 170, 60), "blue": (40, 90, 220), "purple": (140, 60, 190),
    "pink": (245, 120, 190), "brown": (130, 80, 40),
}
SIZES = {"small": (16, 26), "medium": (34, 50), "large": (62, 90)}  # longer side, px at 256
TEXTURES = ("solid", "striped", "dotted", "checkered")
TEXTURE_WORDS = {"solid": "plain", "striped": "striped", "dotted": "dotted",
                 "checkered": "checkered"}
DEFAULT_SIZES = ((256, 256), (320, 256), (256, 320), (320, 240), (240, 320), (384, 256),
                 (256, 384), (352, 288), (288, 352), (384, 288), (288, 384), (320, 320))
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
RELATIONS = {  # relation -> phrasings
    "left": ("left of", "to the left of"), "right": ("right of", "to the right of"),
    "above": ("above",), "below": ("below", "under"),
}
SUPERLATIVES = {"left": "leftmost", "right": "rightmost", "above": "topmost", "below": "lowest"}


@dataclass(frozen=True)
class SynthConfig:
    images: int = 1000                   # number of images
    seed: int = 0                        # image i uses default_rng([seed, i])
    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES  # (width, height) choices
    supersample: int = 2                 # draw at this scale, box-filter down
    min_objects: int = 3                 # objects per scene (before placement failures)
    max_objects: int = 8
    p_twin: float = 0.5                  # chance a scene gets a same-kind/colour/size/texture twin
    p_absent: float = 0.4                # chance a caption names an absent object
    refexps_per_image: int = 2           # referring expressions per image (when possible)
    png_compress_level: int = 1          # zlib level; 1 keeps generation fast

    def __post_init__(self):
        if self.images < 1:
            raise ValueError(f"images must be >= 1, got {self.images}")
        if not self.sizes:
            raise ValueError("sizes must name at least one WxH")
        for w, h in self.sizes:
            if not (128 <= w <= 1024 and 128 <= h <= 1024):
                raise ValueError(f"image size {w}x{h} outside 128..1024 per side")
        if not 1 <= self.supersample <= 4:
            raise ValueError(f"supersample must be 1..4, got {self.supersample}")
        if not 1 <= self.min_objects <= self.max_objects <= 12:
            raise ValueError("need 1 <= min_objects <= max_objects <= 12")


@dataclass(frozen=True)
class SceneObject:
    kind: str
    colour: str
    size: str
    texture: str
    box: tuple[float, float, float, float]  # tight xyxy, float pixels

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Expression:
    """One (image, text) pair: phrases are (char spans, indices of the objects they name)."""
    task: str                                   # "caption" | "refexp"
    text: str
    phrases: tuple[tuple[tuple[tuple[int, int], ...], tuple[int, ...]], ...]
    has_relation: bool = False


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    objects: tuple[SceneObject, ...]
    expressions: tuple[Expression, ...] = field(default=())


# --------------------------------------------------------------------------------- shapes


def _regular(n: int, r_in: float | None = None, start: float = -90.0) -> np.ndarray:
    """Unit-box polygon: n points (2n alternating with r_in for a star), first at ``start``."""
    count = n * 2 if r_in else n
    ang = np.deg2rad(start + np.arange(count) * 360.0 / count)
    r = np.ones(count) * 0.5
    if r_in:
        r[1::2] = r_in
    return np.stack([0.5 + r * np.cos(ang), 0.5 + r * np.sin(ang)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], 1)


def _normalise(p: np.ndarray) -> np.ndarray:
    p = p - p.min(0)
    return p / p.max(0)


POLYGONS = {k: _normalise(np.asarray(v, dtype=np.float64)) for k, v in {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "hexagon": _regular(6, start=0.0),
    "star": _regular(5, r_in=0.2),
    "cross": [(1, 0), (2, 0), (2, 1), (3, 1), (3, 2), (2, 2), (2, 3), (1, 3), (1, 2), (0, 2),
              (0, 1), (1, 1)],
    "arrow": [(0, 0.35), (0.55, 0.35), (0.55, 0.08), (1, 0.5), (0.55, 0.92), (0.55, 0.65),
              (0, 0.65)],
    "heart": _heart(),
    "bolt": [(0.55, 0), (0.1, 0.56), (0.45, 0.56), (0.3, 1), (0.9, 0.4), (0.55, 0.4), (0.8, 0)],
}.items()}
MAX_TILT = {"square": 8, "diamond": 8, "arrow": 8, "triangle": 12, "star": 15, "hexagon": 15,
            "cross": 12, "heart": 12, "bolt": 12}  # degrees of random rotation


def _shape_points(kind: str, rng: np.random.Generator) -> np.ndarray:
    """The kind's polygon in the unit box, randomly tilted (arrows point in one of 4 ways)."""
    p = POLYGONS[kind] - 0.5
    angle = rng.uniform(-1, 1) * MAX_TILT[kind]
    if kind == "arrow":
        angle += 90.0 * rng.integers(4)
    a = np.deg2rad(angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return _normalise(p @ rot.T)


def _shape_mask(kind: str, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """An 'L' mask of size (w, h) with the shape at 255 filling the box."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if kind in ("circle", "ring", "moon"):
        draw.ellipse((0, 0, w - 1, h - 1), fill=255)
        if kind == "ring":
            t = rng.uniform(0.24, 0.32)
            draw.ellipse((w * t, h * t, w * (1 - t) - 1, h * (1 - t) - 1), fill=0)
        elif kind == "moon":
            dx = w * rng.uniform(0.42, 0.52) * (1 if rng.random() < 0.5 else -1)
            draw.ellipse((dx, -h * 0.08, w - 1 + dx, h * 1.0), fill=0)
    else:
        pts = _shape_points(kind, rng) * [w - 1, h - 1]
        draw.polygon([tuple(q) for q in pts.tolist()], fill=255)
    return mask


def _texture_fill(texture: str, w: int, h: int, period: float, main, second,
                  rng: np.random.Generator) -> Image.Image:
    """RGB patch (w, h) with the texture: main colour with ``second`` stripes/dots/checks."""
    y, x = np.ogrid[0:h, 0:w]
    if texture == "striped":
        a = np.deg2rad(45.0 * rng.integers(4))
        on = ((x * np.cos(a) + y * np.sin(a)) // (period / 2)) % 2 == 0
    elif texture == "dotted":
        fx, fy = (x % period) - period / 2, (y % period) - period / 2
        on = fx * fx + fy * fy < (0.3 * period) ** 2
    else:  # checkered
        on = ((x // (period / 2)) + (y // (period / 2))) % 2 == 0
    on = np.broadcast_to(on, (h, w))[..., None]
    patch = np.where(on, np.asarray(second, np.uint8), np.asarray(main, np.uint8))
    return Image.fromarray(patch.astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- rendering


def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.22), rng.uniform(0.35, 0.92))
    return int(r * 255), int(g * 255), int(b * 255)


def _background(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [h, w, 3]: flat, linear gradient or smooth noise, always low saturation."""
    style = rng.integers(3)
    c1 = np.asarray(_muted(rng), np.float32)
    if style == 0:
        img = np.broadcast_to(c1, (h, w, 3)).copy()
    elif style == 1:
        c2 = np.asarray(_muted(rng), np.float32)
        a = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        t = x * np.cos(a) + y * np.sin(a)
        t = ((t - t.min()) / max(float(t.max() - t.min()), 1.0))[..., None]
        img = c1 * (1 - t) + c2 * t
    else:
        # mostly luminance noise (a shared channel), a little chroma, fine grain on top
        coarse = rng.normal(0, 1, (h // 32 + 2, w // 32 + 2, 3)).astype(np.float32)
        coarse = coarse[..., :1] * 22 + coarse * 5
        up = np.stack([np.asarray(Image.fromarray(coarse[..., c], "F").resize(
            (w, h), Image.BILINEAR)) for c in range(3)], -1)
        img = c1 + up + rng.normal(0, 4, (h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _clutter(draw: ImageDraw.ImageDraw, w: int, h: int, ss: int, rng: np.random.Generator) -> None:
    """Distractor marks that are not objects: thin lines and irregular muted blobs."""
    for _ in range(rng.integers(0, 5)):
        x0, x1 = rng.uniform(0, w * ss, 2)
        y0, y1 = rng.uniform(0, h * ss, 2)
        draw.line((x0, y0, x1, y1), fill=_muted(rng), width=int(ss * rng.integers(1, 3)))
    for _ in range(rng.integers(0, 4)):
        n = int(rng.integers(6, 10))
        r = rng.uniform(4, 15) * ss * rng.uniform(0.5, 1.0, n)
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        cx, cy = rng.uniform(0, w * ss), rng.uniform(0, h * ss)
        pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1)
        draw.polygon([tuple(q) for q in pts.tolist()], fill=_muted(rng))


def _overlap_ok(box, boxes) -> bool:
    """Allow overlaps, but keep every object mostly visible (bounded IoU and coverage)."""
    x0, y0, x1, y1 = box
    area = (x1 - x0) * (y1 - y0)
    for b in boxes:
        iw = min(x1, b[2]) - max(x0, b[0])
        ih = min(y1, b[3]) - max(y0, b[1])
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        other = (b[2] - b[0]) * (b[3] - b[1])
        if inter / (area + other - inter) > 0.2 or inter / other > 0.3 or inter / area > 0.3:
            return False
    return True


def _sample_specs(cfg: SynthConfig, rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    """(kind, colour, size, texture) per object; few kinds and colours per scene -> distractors."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    kinds = list(rng.choice(KINDS, size=int(rng.integers(2, 5)), replace=False))
    colours = list(rng.choice(list(COLOURS), size=int(rng.integers(2, 5)), replace=False))
    specs = []
    for _ in range(n):
        kind = (kinds[rng.integers(len(kinds))] if rng.random() < 0.85
                else KINDS[rng.integers(len(KINDS))])
        colour = (colours[rng.integers(len(colours))] if rng.random() < 0.85
                  else tuple(COLOURS)[rng.integers(len(COLOURS))])
        size = ("small", "medium", "large")[rng.choice(3, p=(0.35, 0.4, 0.25))]
        texture = "solid" if size == "small" or rng.random() < 0.4 else TEXTURES[rng.integers(1, 4)]
        specs.append((str(kind), str(colour), size, texture))
    if n >= 2 and rng.random() < cfg.p_twin:
        specs[-1] = specs[int(rng.integers(n - 1))]  # a twin: only position tells the two apart
    return specs


def _place(spec, w: int, h: int, taken: list, rng: np.random.Generator):
    """A nominal integer box (x0, y0, bw, bh) for the object, or None after 30 tries."""
    scale = min(w, h) / 256.0
    lo, hi = SIZES[spec[2]]
    side = rng.uniform(lo, hi) * scale
    aspect = rng.uniform(0.8, 1.25)
    bw, bh = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    if spec[0] == "moon":
        bw *= 1.6  # the crescent keeps about 60% of its disc's width
    bw, bh = max(int(round(bw)), 14), max(int(round(bh)), 14)  # >= ~12 px drawn
    for _ in range(30):
        x0 = int(rng.integers(2, w - bw - 1))
        y0 = int(rng.integers(2, h - bh - 1))
        if _overlap_ok((x0, y0, x0 + bw, y0 + bh), taken):
            return x0, y0, bw, bh
    return None


def render_scene(cfg: SynthConfig,
                 rng: np.random.Generator) -> tuple[Image.Image, list[SceneObject]]:
    """Draw one scene. Returns the RGB image (final size) and its objects (tight xyxy boxes)."""
    w, h = cfg.sizes[int(rng.integers(len(cfg.sizes)))]
    ss = cfg.supersample
    canvas = Image.fromarray(_background(w, h, rng), "RGB")
    if ss > 1:
        canvas = canvas.resize((w * ss, h * ss), Image.NEAREST)
    _clutter(ImageDraw.Draw(canvas), w, h, ss, rng)
    objects, taken = [], []
    for spec in _sample_specs(cfg, rng):
        placed = _place(spec, w, h, taken, rng)
        if placed is None:
            continue
        x0, y0, bw, bh = placed
        taken.append((x0, y0, x0 + bw, y0 + bh))
        kind, colour, size, texture = spec
        mask = _shape_mask(kind, bw * ss, bh * ss, rng)
        jitter = np.asarray(COLOURS[colour]) + rng.integers(-18, 19, 3)
        main = tuple(int(c) for c in np.clip(jitter, 0, 255))
        if texture == "solid":
            canvas.paste(main, (x0 * ss, y0 * ss, (x0 + bw) * ss, (y0 + bh) * ss), mask)
        else:
            second = (235, 235, 235) if rng.random() < 0.6 else (30, 30, 30)
            period = max(6.0, min(bw, bh) / 3.0) * ss
            fill = _texture_fill(texture, bw * ss, bh * ss, period, main, second, rng)
            canvas.paste(fill, (x0 * ss, y0 * ss), mask)
        l, t, r, b = mask.getbbox()
        box = ((x0 * ss + l) / ss, (y0 * ss + t) / ss, (x0 * ss + r) / ss, (y0 * ss + b) / ss)
        objects.append(SceneObject(kind, colour, size, texture, box))
    if ss > 1:
        canvas = canvas.reduce(ss)  # box filter: anti-aliased edges
    return canvas, objects


# ------------------------------------------------------------------------------ language

Span = tuple[int, int]


class _Text:
    """Builds a string piece by piece and records the char span of each phrase."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0

    def add(self, s: str) -> None:
        self.parts.append(s)
        self.length += len(s)

    def phrase(self, s: str) -> Span:
        start = self.length
        self.add(s)
        return start, self.length

    def text(self) -> str:
        return "".join(self.parts)


def _plural(kind: str) -> str:
    return kind + ("es" if kind.endswith("s") else "s")


def _article(words: list[str]) -> str:
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _words(o: SceneObject, extra: tuple[str, ...]) -> list[str]:
    """'[size] [texture] colour kind' with the attributes named in ``extra``."""
    words = [o.size] if "size" in extra else []
    if "texture" in extra:
        words.append(TEXTURE_WORDS[o.texture])
    return words + [o.colour, o.kind]


def _matching(objects, o: SceneObject, extra: tuple[str, ...]) -> list[int]:
    """Indices of the objects that the description of ``o`` with ``extra`` attributes fits."""
    return [i for i, p in enumerate(objects)
            if p.kind == o.kind and p.colour == o.colour
            and ("size" not in extra or p.size == o.size)
            and ("texture" not in extra or p.texture == o.texture)]


EXTRAS = ((), ("size",), ("texture",), ("size", "texture"))


def _unique_extras(objects, t: int) -> list[tuple[str, ...]]:
    return [e for e in EXTRAS if _matching(objects, objects[t], e) == [t]]


def _absent_pair(objects, rng: np.random.Generator) -> tuple[str, str] | None:
    """A (colour, kind) not in the scene that shares the colour or the kind of one that is."""
    present = {(o.colour, o.kind) for o in objects}
    colours = [c for c in COLOURS if any(o.colour == c for o in objects)]
    kinds = [k for k in KINDS if any(o.kind == k for o in objects)]
    cands = [(c, k) for c in colours for k in KINDS if (c, k) not in present]
    cands += [(c, k) for k in kinds for c in COLOURS if (c, k) not in present]
    return cands[int(rng.integers(len(cands)))] if cands else None


def make_caption(objects, rng: np.random.Generator, p_absent: float) -> Expression:
    """Name 1-4 (colour, kind) groups (all their boxes), maybe one absent object (no box)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, o in enumerate(objects):
        groups.setdefault((o.colour, o.kind), []).append(i)
    keys = list(groups)
    order = rng.permutation(len(keys))[: int(rng.integers(1, 5))]
    tb, phrases = _Text(), []
    tb.add(("", "", "a picture of ", "an image with ")[rng.integers(4)])
    for j, g in enumerate(order):
        if j:
            tb.add(" and " if j == len(order) - 1 else ", ")
        (colour, kind), idx = keys[g], groups[keys[g]]
        if len(idx) == 1:
            o = objects[idx[0]]
            extra = tuple(a for a, p in (("size", 0.4), ("texture", 0.5))
                          if rng.random() < p and not (a == "texture" and o.texture == "solid"))
            text = _article(_words(o, extra))
        else:
            text = f"{NUMBERS[len(idx)]} {colour} {_plural(kind)}"
        phrases.append(((tb.phrase(text),), tuple(idx)))
    if rng.random() < p_absent and (absent := _absent_pair(objects, rng)):
        tb.add(", but no ")
        phrases.append(((tb.phrase(f"{absent[0]} {absent[1]}"),), ()))
    return Expression("caption", tb.text(), tuple(phrases), has_relation=False)


def _superlatives(objects, t: int, margin: float) -> list[str]:
    """Directions in which ``t`` is the clear extreme of >= 2 objects of its colour and kind."""
    same = [i for i in _matching(objects, objects[t], ()) if i != t]
    if not same:
        return []
    o, others = objects[t], [objects[i] for i in same]
    found = []
    for d, key in (("left", lambda p: p.cx), ("right", lambda p: -p.cx),
                   ("above", lambda p: p.cy), ("below", lambda p: -p.cy)):
        if all(key(o) + margin <= key(p) for p in others):
            found.append(d)
    return found


def _holds(rel: str, o: SceneObject, a: SceneObject) -> bool:
    """``o`` is clearly ``rel`` the anchor: its centre is beyond the anchor's near edge."""
    return {"left": o.cx <= a.box[0] - 2, "right": o.cx >= a.box[2] + 2,
            "above": o.cy <= a.box[1] - 2, "below": o.cy >= a.box[3] + 2}[rel]


def _not_holds(rel: str, o: SceneObject, a: SceneObject) -> bool:
    """``o`` is clearly not ``rel`` the anchor: its centre is on the other side of the anchor's."""
    return {"left": o.cx >= a.cx, "right": o.cx <= a.cx,
            "above": o.cy >= a.cy, "below": o.cy <= a.cy}[rel]


def _relations(objects, t: int) -> list[tuple[int, str, tuple[str, ...]]]:
    """(anchor, relation, anchor extras) that pick ``t`` among >= 2 objects of its colour/kind."""
    same = _matching(objects, objects[t], ())
    if len(same) < 2:
        return []
    found = []
    for a in range(len(objects)):
        if a in same or not (extras := _unique_extras(objects, a)):
            continue
        for rel in RELATIONS:
            if _holds(rel, objects[t], objects[a]) and all(
                    _not_holds(rel, objects[m], objects[a]) for m in same if m != t):
                found.append((a, rel, extras[0]))
    return found


def _refexp_candidates(objects, margin: float) -> list[tuple]:
    """Every valid referring expression plan: (type, target, detail)."""
    cands = []
    for t in range(len(objects)):
        cands += [("attribute", t, e) for e in _unique_extras(objects, t)[:1]]
        cands += [("superlative", t, d) for d in _superlatives(objects, t, margin)]
        cands += [("relation", t, r) for r in _relations(objects, t)]
    return cands


def _phrase_refexp(objects, plan: tuple, rng: np.random.Generator) -> Expression:
    kind, t, detail = plan
    o, tb = objects[t], _Text()
    if kind == "attribute":
        extra = detail if detail or rng.random() < 0.5 else EXTRAS[rng.integers(1, 4)]
        if not detail:  # optional words: leave out "plain" for solid objects
            extra = tuple(a for a in extra if not (a == "texture" and o.texture == "solid"))
        span = tb.phrase("the " + " ".join(_words(o, extra)))
        return Expression("refexp", tb.text(), (((span,), (t,)),), has_relation=False)
    if kind == "superlative":
        span = tb.phrase(f"the {SUPERLATIVES[detail]} {o.colour} {o.kind}")
        return Expression("refexp", tb.text(), (((span,), (t,)),), has_relation=True)
    anchor, rel, anchor_extra = detail
    span = tb.phrase(f"the {o.colour} {o.kind}")
    words = RELATIONS[rel]
    tb.add((" ", " that is ")[rng.integers(2)] + words[rng.integers(len(words))] + " the ")
    tb.add(" ".join(_words(objects[anchor], anchor_extra)))
    return Expression("refexp", tb.text(), (((span,), (t,)),), has_relation=True)


def make_refexps(objects, rng: np.random.Generator, count: int, margin: float) -> list[Expression]:
    """Up to ``count`` expressions for distinct targets; relations and superlatives preferred."""
    cands = _refexp_candidates(objects, margin)
    out, used = [], set()
    weights = {"attribute": 0.35, "superlative": 0.2, "relation": 0.45}
    for _ in range(count):
        pool = [c for c in cands if c[1] not in used]
        if not pool:
            break
        types = [k for k in weights if any(c[0] == k for c in pool)]
        p = np.asarray([weights[k] for k in types])
        kind = types[int(rng.choice(len(types), p=p / p.sum()))]
        pool = [c for c in pool if c[0] == kind]
        plan = pool[int(rng.integers(len(pool)))]
        used.add(plan[1])
        out.append(_phrase_refexp(objects, plan, rng))
    return out


def make_scene(cfg: SynthConfig, index: int) -> tuple[Image.Image, Scene]:
    """Image ``index`` of the dataset and its language, from ``default_rng([seed, index])``."""
    rng = np.random.default_rng([cfg.seed, index])
    image, objects = render_scene(cfg, rng)
    margin = 0.02 * min(image.size) + 2
    exprs = [make_caption(objects, rng, cfg.p_absent)] if objects else []
    exprs += make_refexps(objects, rng, cfg.refexps_per_image, margin)
    return image, Scene(image.width, image.height, tuple(objects), tuple(exprs))


# -------------------------------------------------------------------------------- output


def _xywh(box) -> list[float]:
    x0, y0, x1, y1 = box
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


class _Writer:
    """Accumulates the COCO-style records of every scene, in a fixed order."""

    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        self.entries: list[dict] = []
        self.grounding_anns: list[dict] = []
        self.det_images: list[dict] = []
        self.det_anns: list[dict] = []
        self.pairs: list[str] = []

    def add(self, index: int, file_name: str, scene: Scene) -> None:
        w, h = scene.width, scene.height
        self.det_images.append({"id": index, "file_name": file_name, "height": h, "width": w})
        for o in scene.objects:
            bbox = _xywh(o.box)
            self.det_anns.append({
                "id": len(self.det_anns) + 1, "image_id": index, "bbox": bbox,
                "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0,
                "category_id": KINDS.index(o.kind) + 1,
                "attributes": {"colour": o.colour, "size": o.size, "texture": o.texture}})
        for e in scene.expressions:
            if e.task == "caption":
                self.pairs.append(json.dumps({"image": file_name, "caption": e.text}))
            self._add_expression(index, file_name, w, h, scene.objects, e)

    def _add_expression(self, index, file_name, w, h, objects, e: Expression) -> None:
        entry_id = len(self.entries)
        self.entries.append({
            "id": entry_id, "file_name": file_name, "height": h, "width": w, "caption": e.text,
            "task": e.task, "has_relation": e.has_relation, "dataset_name": "synth",
            "original_img_id": index,
            "tokens_positive_eval": [[list(s) for s in spans] for spans, _ in e.phrases]})
        for p, (spans, idx) in enumerate(e.phrases):
            for i in idx:
                bbox = _xywh(objects[i].box)
                self.grounding_anns.append({
                    "id": len(self.grounding_anns) + 1, "image_id": entry_id, "bbox": bbox,
                    "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0,
                    "category_id": KINDS.index(objects[i].kind) + 1,
                    "tokens_positive": [list(s) for s in spans], "phrase_ids": p})

    def write(self, root: Path) -> None:
        info = {"description": "fiber-edge synthetic grounding benchmark",
                "format_version": FORMAT_VERSION, "config": _config_dict(self.cfg)}
        cats = [{"id": i + 1, "name": k, "supercategory": "shape"} for i, k in enumerate(KINDS)]
        grounding = {"info": info, "images": self.entries, "annotations": self.grounding_anns,
                     "categories": cats}
        detection = {"info": info, "images": self.det_images, "annotations": self.det_anns,
                     "categories": cats}
        dump = lambda obj: json.dumps(obj, separators=(",", ":")) + "\n"  # noqa: E731
        (root / "grounding.json").write_text(dump(grounding))
        (root / "detection.json").write_text(dump(detection))
        (root / "pairs.jsonl").write_text("".join(p + "\n" for p in self.pairs))


def _config_dict(cfg: SynthConfig) -> dict:
    d = asdict(cfg)
    d["sizes"] = [list(s) for s in cfg.sizes]
    return d


def generate(cfg: SynthConfig, out: str | Path, overwrite: bool = False, progress=None) -> dict:
    """Render the dataset into ``out`` atomically. Returns counts and timing.

    ``progress``: optional wrapper over the image index iterable (e.g. tqdm).
    Raises FileExistsError if ``out`` exists and not ``overwrite``.
    """
    start = time.perf_counter()
    writer = _Writer(cfg)
    indices = range(cfg.images)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        for i in (progress(indices) if progress else indices):
            image, scene = make_scene(cfg, i)
            name = f"images/{i:06d}.png"
            image.save(tmp / name, format="PNG", compress_level=cfg.png_compress_level)
            writer.add(i, name, scene)
        writer.write(tmp)
    seconds = time.perf_counter() - start
    return {"images": cfg.images, "entries": len(writer.entries),
            "grounding_boxes": len(writer.grounding_anns), "objects": len(writer.det_anns),
            "seconds": seconds, "images_per_s": cfg.images / max(seconds, 1e-9)}


# ----------------------------------------------------------------------------------- CLI


def parse_size(text: str) -> tuple[int, int]:
    """``"320x256"`` -> (320, 256); argparse error naming the text (the bound is SynthConfig's)."""
    try:
        w, h = (int(v) for v in text.strip().lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text.strip()!r}: expected WxH, e.g. 320x256") from None
    return w, h


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fiber.data.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created atomically)")
    p.add_argument("--images", type=int, default=1000, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=parse_size, nargs="+", default=None,
                   help="image sizes WxH to choose from (default: 12 sizes, longer side 256-384)")
    p.add_argument("--supersample", type=int, default=2)
    p.add_argument("--refexps-per-image", type=int, default=2)
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing --out folder")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def main(args: argparse.Namespace) -> int:
    try:
        cfg = SynthConfig(images=args.images, seed=args.seed, supersample=args.supersample,
                          sizes=tuple(args.size) if args.size else DEFAULT_SIZES,
                          refexps_per_image=args.refexps_per_image)
    except ValueError as e:
        print(f"fiber.data.synth: bad arguments: {e}", file=sys.stderr)
        return 2
    progress = None
    if args.progress:
        try:
            from tqdm import tqdm
            progress = lambda it: tqdm(it, desc="images", unit="img")  # noqa: E731
        except ImportError:
            pass
    if Path(args.out).exists() and not args.overwrite:
        print(f"fiber.data.synth: --out {args.out}: already exists (pass --overwrite)",
              file=sys.stderr)
        return 2
    try:
        stats = generate(cfg, args.out, overwrite=args.overwrite, progress=progress)
    except OSError as e:
        print(f"fiber.data.synth: --out {args.out}: cannot write: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {stats['images']} images, {stats['entries']} grounding entries, "
          f"{stats['objects']} objects in {stats['seconds']:.1f} s "
          f"({stats['images_per_s']:.1f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
