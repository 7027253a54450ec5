"""Grounding and detection metrics (numpy; COCO mAP through pycocotools). Torch-free.

Boxes are ``xyxy`` pixels. Every metric is returned in percent (0-100); a metric over zero
items is NaN.
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Sequence

import numpy as np

IOU_THRESHOLD = 0.5


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every pair: a [N, 4], b [M, 4] xyxy -> float64 [N, M]. Empty boxes give 0."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _percent(hits: int, total: int) -> float:
    return 100.0 * hits / total if total else float("nan")


def _ranked(boxes, scores) -> np.ndarray:
    """Boxes [N, 4] sorted by descending score (ties keep their order)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if len(scores) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    return boxes[np.argsort(-scores, kind="stable")]


def _first_hit(boxes, scores, gt) -> int | None:
    """Rank (0-based) of the first prediction with IoU >= 0.5 with ANY gt box, or None."""
    ranked = _ranked(boxes, scores)
    if not len(ranked):
        return None
    hits = (box_iou(ranked, gt) >= IOU_THRESHOLD).any(1)
    return int(np.argmax(hits)) if hits.any() else None


def recall_at_k(predictions: Sequence[tuple[np.ndarray, np.ndarray]],
                gts: Sequence[np.ndarray], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Phrase grounding recall, Flickr30k Entities ANY-box protocol.

    predictions[i] = (boxes [N, 4], scores [N]) for phrase i; gts[i] = its gt boxes [K, 4].
    A phrase is a hit at k if any of its k best-scored boxes has IoU >= 0.5 with any of its gt
    boxes. Phrases with no gt box are excluded. Returns {"R@k": percent} and "phrases" (count).
    """
    if len(predictions) != len(gts):
        raise ValueError(f"{len(predictions)} predictions but {len(gts)} ground truths")
    ranks = []
    for (boxes, scores), gt in zip(predictions, gts):
        gt = np.asarray(gt, np.float64).reshape(-1, 4)
        if len(gt):
            ranks.append(_first_hit(boxes, scores, gt))
    n = len(ranks)
    out = {f"R@{k}": _percent(sum(r is not None and r < k for r in ranks), n) for k in ks}
    out["phrases"] = n
    return out


def referring_accuracy(predictions: Sequence[tuple[np.ndarray, np.ndarray]],
                       gts: Sequence[np.ndarray]) -> float:
    """Percent of expressions whose top-scored box has IoU >= 0.5 with (any of) its gt box(es).
    An expression without predictions is a miss. NaN when there are no expressions."""
    if len(predictions) != len(gts):
        raise ValueError(f"{len(predictions)} predictions but {len(gts)} ground truths")
    hits = [_first_hit(boxes, scores, np.asarray(gt, np.float64).reshape(-1, 4)) == 0
            for (boxes, scores), gt in zip(predictions, gts)]
    return _percent(sum(hits), len(hits))


def coco_map(coco_gt: dict, detections: Sequence[dict]) -> dict[str, float]:
    """COCO box AP through pycocotools' COCOeval: {"AP", "AP50", "AP75"} in percent.

    coco_gt: a COCO dict (images, annotations with bbox [x, y, w, h], area, iscrowd; categories).
    detections: COCO results, dicts {"image_id", "category_id", "bbox": [x, y, w, h], "score"}.
    No detections gives 0; a category set with no gt at all gives NaN (COCOeval's -1).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        has_gt = any(not a.get("iscrowd", 0) for a in coco_gt.get("annotations", []))
        value = 0.0 if has_gt else float("nan")
        return {"AP": value, "AP50": value, "AP75": value}
    known = {im["id"] for im in coco_gt.get("images", [])}
    unknown = sorted({d["image_id"] for d in detections} - known)
    if unknown:
        raise ValueError(f"detections for image ids not in the ground truth: {unknown[:5]}")
    gt = copy.deepcopy(coco_gt)
    gt.setdefault("info", {})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        dt = coco.loadRes([dict(d) for d in detections])
        ev = COCOeval(coco, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in ev.stats[:3]]
    return {k: (100.0 * s if s >= 0 else float("nan")) for k, s in zip(("AP", "AP50", "AP75"),
                                                                         stats)}
