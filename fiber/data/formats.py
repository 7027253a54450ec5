"""Typed, validated readers for grounding (MDETR / Flickr30k Entities style), COCO detection and
image-text JSONL files. Torch-free.

Conventions:
- Boxes are ``xyxy`` float32 pixels of the source image (files store COCO ``[x, y, w, h]``).
- Spans are half-open character spans ``(start, end)`` into the caption.
- Box policy: a box may stick out of its image by at most ``BOX_TOLERANCE`` px (annotation
  rounding, Flickr's 1-based corners); it is then clipped to the image. A box further out, or one
  with a non-positive width or height, is an error.
- Every problem raises ``DataFormatError`` naming the file, the record and the problem.

Grounding files: one ``images`` entry per (image, caption) pair, with ``file_name``, ``height``,
``width`` and ``caption``; annotations with ``image_id``, ``bbox`` and ``tokens_positive``.
Phrases come from the entry's ``tokens_positive_eval`` when present (one list of spans per phrase;
the synthetic generator also lists phrases that have no box there); an annotation belongs to every
phrase that one of its spans overlaps, and an annotation that overlaps none becomes a phrase of its
own. Without ``tokens_positive_eval`` (e.g. MDETR's RefCOCO files) annotations with overlapping
``tokens_positive`` form one phrase. An annotation with no ``tokens_positive`` refers to the whole
caption. ``task`` defaults to "refexp" for RefCOCO/+/g entries
(``dataset_name``) and "caption" otherwise; ``has_relation`` defaults to False.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from common.prompts import Span

BOX_TOLERANCE = 1.0  # px a box may exceed its image before it is an error (it is then clipped)
REFEXP_DATASETS = ("refcoco", "refcoco+", "refcocog")


class DataFormatError(ValueError):
    """A dataset file that is missing, malformed or inconsistent (message names file and record)."""


@dataclass(frozen=True, eq=False)
class Phrase:
    text: str                    # the caption's text under the spans, joined by " "
    spans: tuple[Span, ...]      # char spans into the caption
    boxes: np.ndarray            # float32 [K, 4] xyxy pixels; K = 0 for a phrase with no object


@dataclass(frozen=True, eq=False)
class GroundingSample:
    id: int                      # the entry id in the file
    image: Path                  # image_root / file_name
    file_name: str
    width: int
    height: int
    caption: str
    phrases: tuple[Phrase, ...]
    task: str                    # "caption" | "refexp"
    has_relation: bool           # the text uses a spatial relation / superlative


@dataclass(frozen=True, eq=False)
class GroundingDataset:
    path: Path
    image_root: Path
    samples: tuple[GroundingSample, ...]
    categories: tuple[tuple[int, str], ...]  # (id, name) sorted by id

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> GroundingSample:
        return self.samples[i]

    def __iter__(self) -> Iterator[GroundingSample]:
        return iter(self.samples)


@dataclass(frozen=True, eq=False)
class DetectionImage:
    id: int
    image: Path
    file_name: str
    width: int
    height: int
    boxes: np.ndarray            # float32 [K, 4] xyxy pixels (clipped to the image)
    category_ids: np.ndarray     # int64 [K]
    iscrowd: np.ndarray          # bool [K]
    annotation_ids: np.ndarray   # int64 [K]


@dataclass(frozen=True, eq=False)
class DetectionDataset:
    path: Path
    image_root: Path
    images: tuple[DetectionImage, ...]
    categories: tuple[tuple[int, str], ...]  # (id, name) sorted by id

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> DetectionImage:
        return self.images[i]

    def __iter__(self) -> Iterator[DetectionImage]:
        return iter(self.images)

    @property
    def category_names(self) -> list[str]:
        """Category names in sorted id order (the evaluation prompt's order)."""
        return [name for _, name in self.categories]

    def to_coco(self, images: Sequence[DetectionImage] | None = None) -> dict:
        """A COCO ground-truth dict (for pycocotools) of ``images`` (default: all)."""
        images = self.images if images is None else images
        anns = []
        for im in images:
            for box, cat, crowd, aid in zip(im.boxes.tolist(), im.category_ids.tolist(),
                                            im.iscrowd.tolist(), im.annotation_ids.tolist()):
                w, h = box[2] - box[0], box[3] - box[1]
                anns.append({"id": aid, "image_id": im.id, "category_id": cat,
                             "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": int(crowd)})
        return {"images": [{"id": im.id, "file_name": im.file_name, "width": im.width,
                            "height": im.height} for im in images],
                "annotations": anns,
                "categories": [{"id": i, "name": n} for i, n in self.categories]}


@dataclass(frozen=True)
class Pair:
    image: Path
    caption: str


# ------------------------------------------------------------------------------ helpers


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: cannot read: {e}") from None
    if not text.strip():
        raise DataFormatError(f"{path}: empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: "
                              f"{e.msg}") from None


def _record(kind: str, index: int, rec: Any) -> str:
    rid = rec.get("id") if isinstance(rec, dict) else None
    return f"{kind}[{index}]" + (f" (id {rid})" if rid is not None else "")


def _field(path: Path, where: str, rec: dict, key: str, kind: type | tuple) -> Any:
    if key not in rec:
        raise DataFormatError(f"{path}: {where}: missing {key!r}")
    value = rec[key]
    if kind is int and isinstance(value, str) and value.strip().isdigit():
        return int(value)  # MDETR's Flickr files store height/width as strings
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataFormatError(f"{path}: {where}: {key!r} must be {names}, got {value!r}")
    return value


def _records(path: Path, data: Any, key: str) -> list:
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected a JSON object with {key!r}, "
                              f"got {type(data).__name__}")
    recs = data.get(key)
    if not isinstance(recs, list):
        raise DataFormatError(f"{path}: missing or non-list {key!r}")
    for i, rec in enumerate(recs):
        if not isinstance(rec, dict):
            raise DataFormatError(f"{path}: {key}[{i}]: expected an object, got {rec!r}")
    return recs


def _categories(path: Path, data: dict, required: bool) -> tuple[tuple[int, str], ...]:
    cats = data.get("categories")
    if cats is None and not required:
        return ()
    out = {}
    for i, c in enumerate(_records(path, data, "categories")):
        where = _record("categories", i, c)
        cid, name = _field(path, where, c, "id", int), _field(path, where, c, "name", str)
        if cid in out:
            raise DataFormatError(f"{path}: {where}: duplicate category id {cid}")
        out[cid] = name
    return tuple(sorted(out.items()))


def _image_header(path: Path, where: str, rec: dict) -> tuple[int, str, int, int]:
    iid = _field(path, where, rec, "id", int)
    name = _field(path, where, rec, "file_name", str)
    w, h = _field(path, where, rec, "width", int), _field(path, where, rec, "height", int)
    if w <= 0 or h <= 0:
        raise DataFormatError(f"{path}: {where}: non-positive image size {w}x{h}")
    return iid, name, w, h


def _box(path: Path, where: str, rec: dict, width: int, height: int) -> list[float]:
    """COCO [x, y, w, h] -> xyxy, clipped within BOX_TOLERANCE, else an error."""
    b = rec.get("bbox")
    if not (isinstance(b, list) and len(b) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in b)):
        raise DataFormatError(f"{path}: {where}: 'bbox' must be 4 finite numbers [x, y, w, h], "
                              f"got {b!r}")
    x, y, w, h = (float(v) for v in b)
    if w <= 0 or h <= 0:
        raise DataFormatError(f"{path}: {where}: box {b} has non-positive width or height")
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        raise DataFormatError(f"{path}: {where}: box {b} lies outside the {width}x{height} image")
    return [max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))]


def _spans(path: Path, where: str, value: Any, caption: str, key: str) -> tuple[Span, ...]:
    if not isinstance(value, list):
        raise DataFormatError(f"{path}: {where}: {key!r} must be a list of [start, end], "
                              f"got {value!r}")
    out = []
    for s in value:
        if not (isinstance(s, (list, tuple)) and len(s) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in s)):
            raise DataFormatError(f"{path}: {where}: {key!r} has a bad span {s!r}")
        if not 0 <= s[0] < s[1] <= len(caption):
            raise DataFormatError(f"{path}: {where}: span {list(s)} is outside the caption "
                                  f"(length {len(caption)}) or empty")
        out.append((s[0], s[1]))
    return tuple(out)


def _overlaps(a: tuple[Span, ...], b: tuple[Span, ...]) -> bool:
    return any(s0 < e1 and s1 < e0 for s0, e0 in a for s1, e1 in b)


# ---------------------------------------------------------------------------- grounding


def _task(path: Path, where: str, rec: dict) -> str:
    task = rec.get("task")
    if task is None:
        return "refexp" if rec.get("dataset_name") in REFEXP_DATASETS else "caption"
    if task not in ("caption", "refexp"):
        raise DataFormatError(f"{path}: {where}: 'task' must be 'caption' or 'refexp', "
                              f"got {task!r}")
    return task


def _phrases(caption: str, eval_spans: list[tuple[Span, ...]] | None,
             anns: list[tuple[tuple[Span, ...], list[float]]]) -> tuple[Phrase, ...]:
    """Group annotation boxes into phrases (see the module docstring)."""
    groups: list[tuple[Span, ...]] = list(eval_spans or [])
    boxes: list[list[list[float]]] = [[] for _ in groups]
    for spans, box in anns:
        hits = [p for p, g in enumerate(groups) if _overlaps(spans, g)]
        if not hits:
            groups.append(spans)
            boxes.append([])
            hits = [len(groups) - 1]
        for p in hits:
            boxes[p].append(box)
    return tuple(Phrase(" ".join(caption[s:e] for s, e in g), g,
                        np.asarray(b, np.float32).reshape(-1, 4)) for g, b in zip(groups, boxes))


def load_grounding(path: str | Path, image_root: str | Path | None = None) -> GroundingDataset:
    """Read an MDETR / Flickr30k-Entities style grounding file (or the generator's grounding.json).

    ``image_root``: folder that ``file_name`` is relative to (default: the file's folder).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    data = _read_json(path)
    entries = _records(path, data, "images")
    if not entries:
        raise DataFormatError(f"{path}: 'images' is empty")
    headers, anns_by_entry = {}, {}
    for i, rec in enumerate(entries):
        where = _record("images", i, rec)
        iid, name, w, h = _image_header(path, where, rec)
        if iid in headers:
            raise DataFormatError(f"{path}: {where}: duplicate image id {iid}")
        caption = _field(path, where, rec, "caption", str)
        if not caption.strip():
            raise DataFormatError(f"{path}: {where}: empty caption")
        ev = rec.get("tokens_positive_eval")
        if ev is not None:
            if not isinstance(ev, list):
                raise DataFormatError(f"{path}: {where}: 'tokens_positive_eval' must be a list")
            ev = [_spans(path, where, p, caption, "tokens_positive_eval") for p in ev]
        rel = rec.get("has_relation", False)
        if not isinstance(rel, bool):
            raise DataFormatError(f"{path}: {where}: 'has_relation' must be true or false")
        headers[iid] = (name, w, h, caption, ev, _task(path, where, rec), rel)
        anns_by_entry[iid] = []
    for i, rec in enumerate(_records(path, data, "annotations")):
        where = _record("annotations", i, rec)
        iid = _field(path, where, rec, "image_id", int)
        if iid not in headers:
            raise DataFormatError(f"{path}: {where}: image_id {iid} is not in 'images'")
        name, w, h, caption = headers[iid][:4]
        spans = _spans(path, where, rec.get("tokens_positive", []), caption, "tokens_positive")
        spans = spans or ((0, len(caption)),)  # a box that names no words: the whole text
        anns_by_entry[iid].append((spans, _box(path, where, rec, w, h)))
    samples = []
    for iid, (name, w, h, caption, ev, task, rel) in headers.items():
        samples.append(GroundingSample(iid, root / name, name, w, h, caption,
                                       _phrases(caption, ev, anns_by_entry[iid]), task, rel))
    return GroundingDataset(path, root, tuple(samples), _categories(path, data, required=False))


# ---------------------------------------------------------------------------- detection


def load_detection(path: str | Path, image_root: str | Path | None = None) -> DetectionDataset:
    """Read a COCO detection file (``images``, ``annotations``, ``categories``).

    ``image_root``: folder that ``file_name`` is relative to (default: the file's folder).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    data = _read_json(path)
    records = _records(path, data, "images")
    if not records:
        raise DataFormatError(f"{path}: 'images' is empty")
    categories = _categories(path, data, required=True)
    if not categories:
        raise DataFormatError(f"{path}: 'categories' is empty")
    known = {c for c, _ in categories}
    headers, anns = {}, {}
    for i, rec in enumerate(records):
        where = _record("images", i, rec)
        iid, name, w, h = _image_header(path, where, rec)
        if iid in headers:
            raise DataFormatError(f"{path}: {where}: duplicate image id {iid}")
        headers[iid], anns[iid] = (name, w, h), []
    seen = set()
    for i, rec in enumerate(_records(path, data, "annotations")):
        where = _record("annotations", i, rec)
        aid, iid = _field(path, where, rec, "id", int), _field(path, where, rec, "image_id", int)
        cat = _field(path, where, rec, "category_id", int)
        if iid not in headers:
            raise DataFormatError(f"{path}: {where}: image_id {iid} is not in 'images'")
        if cat not in known:
            raise DataFormatError(f"{path}: {where}: category_id {cat} is not in 'categories'")
        if aid in seen:
            raise DataFormatError(f"{path}: {where}: duplicate annotation id {aid}")
        seen.add(aid)
        _, w, h = headers[iid]
        anns[iid].append((_box(path, where, rec, w, h), cat, bool(rec.get("iscrowd", 0)), aid))
    images = []
    for iid, (name, w, h) in headers.items():
        a = anns[iid]
        images.append(DetectionImage(
            iid, root / name, name, w, h,
            np.asarray([x[0] for x in a], np.float32).reshape(-1, 4),
            np.asarray([x[1] for x in a], np.int64), np.asarray([x[2] for x in a], bool),
            np.asarray([x[3] for x in a], np.int64)))
    return DetectionDataset(path, root, tuple(images), categories)


# -------------------------------------------------------------------------------- pairs


def load_pairs(path: str | Path, image_root: str | Path | None = None) -> tuple[Pair, ...]:
    """Read image-caption pairs, one JSON object ``{"image", "caption"}`` per line.

    Blank lines are skipped. ``image_root``: what ``image`` is relative to (default: the file's
    folder).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: cannot read: {e}") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: line {n}: malformed JSON: {e.msg}") from None
        if not isinstance(rec, dict):
            raise DataFormatError(f"{path}: line {n}: expected an object, got {rec!r}")
        image = _field(path, f"line {n}", rec, "image", str)
        caption = _field(path, f"line {n}", rec, "caption", str)
        if not caption.strip():
            raise DataFormatError(f"{path}: line {n}: empty caption")
        pairs.append(Pair(root / image, caption))
    if not pairs:
        raise DataFormatError(f"{path}: empty file (no pairs)")
    return tuple(pairs)
