"""The evaluation harness shared by train.evaluate, compress.export and benchmarks.accuracy.

``predict(image_rgb_uint8 [H, W, 3], prompt: str, phrase_spans: list[list[[s, e]]])`` returns an
object with ``.boxes`` float32 [N, 4] xyxy source-image pixels, ``.scores`` [N] and
``.phrase_index`` int [N] (index into ``phrase_spans``): the runtime's ``Detections`` and the torch
evaluator's output both fit. Torch-free.

Protocols (percent): R@1/5/10 over every phrase with a box of every grounding entry (captions and
referring expressions; Flickr30k ANY-box), also split by the entry's ``has_relation``; referring
accuracy (top-1 IoU >= 0.5) over ``task == "refexp"`` entries; COCO mAP (pycocotools) over the
detection file with one prompt of all category names in sorted id order.

Post-processing is part of the protocol (``EVAL_POSTPROCESS``): every predictor that reports
numbers (torch, packages through the runtime, every backend) ranks with it, so R@5/R@10 and mAP
are comparable: threshold 0 (rank everything), per-phrase NMS at 0.6, and each phrase's best 10
boxes kept (R@10 needs ten), otherwise 100 detections per image (COCO).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from common.package import PostprocessSpec
from fiber.data.formats import (DataFormatError, DetectionDataset, GroundingDataset,
                                load_detection, load_grounding)
from fiber.data.metrics import coco_map, recall_at_k, referring_accuracy
from fiber.data.prompts import build_detection_prompt
from runtime.sources import ImageReadError, read_image

KS = (1, 5, 10)
_SERVING = PostprocessSpec()  # a package's defaults; the protocol changes the threshold and adds min_per_phrase
EVAL_POSTPROCESS = {"threshold": 0.0, "nms_iou": _SERVING.nms_iou, "pre_nms_top_k": _SERVING.pre_nms_top_k,
                    "max_detections": _SERVING.max_detections, "min_per_phrase": 10}
Predict = Callable[[np.ndarray, str, list], Any]


def load_image_rgb(path: str | Path) -> np.ndarray:
    """Decode a dataset image to uint8 [H, W, 3] RGB with the runtime's decoder
    (``runtime.sources.read_image``: EXIF rotation applied, any Pillow mode), so training, evaluation
    and serving see the same pixels. DataFormatError naming the file when it cannot be read."""
    try:
        return np.ascontiguousarray(read_image(path))
    except ImageReadError as e:
        problem = "image file not found" if e.reason == "no such file" else f"cannot decode image: {e.reason}"
        raise DataFormatError(f"{path}: {problem}") from None


def _outputs(det: Any, num_phrases: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and unpack predict's result: boxes [N, 4], scores [N], phrase_index [N]."""
    try:
        boxes = np.asarray(det.boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(det.scores, np.float64).reshape(-1)
        index = np.asarray(det.phrase_index).reshape(-1)
    except (AttributeError, ValueError) as e:
        raise ValueError(f"predict returned a bad result for {where}: {e}") from None
    if not (len(boxes) == len(scores) == len(index)):
        raise ValueError(f"predict returned {len(boxes)} boxes, {len(scores)} scores and "
                         f"{len(index)} phrase indices for {where}")
    if len(index) and (index.min() < 0 or index.max() >= num_phrases):
        raise ValueError(f"predict returned a phrase_index outside 0..{num_phrases - 1} "
                         f"for {where}")
    return boxes, scores, index.astype(np.int64)


class _ImageCache:
    """Decodes each image once while consecutive entries share it (captions + refexps)."""

    def __init__(self) -> None:
        self.path, self.image = None, None

    def __call__(self, path: Path) -> np.ndarray:
        if path != self.path:
            self.path, self.image = path, load_image_rgb(path)
        return self.image


def _grounding(predict: Predict, data: GroundingDataset, limit, progress) -> dict[str, float]:
    samples = data.samples[:limit] if limit else data.samples
    phrases: dict[str, list] = {"all": [], "relation": [], "no_relation": []}
    gts: dict[str, list] = {"all": [], "relation": [], "no_relation": []}
    refexp_pred, refexp_gt, refexp_rel = [], [], []
    images = _ImageCache()
    for s in (progress(samples, desc="grounding") if progress else samples):
        spans = [[list(sp) for sp in p.spans] for p in s.phrases]
        boxes, scores, index = _outputs(predict(images(s.image), s.caption, spans), len(spans),
                                        f"grounding entry {s.id} ({s.file_name})")
        split = "relation" if s.has_relation else "no_relation"
        for p, phrase in enumerate(s.phrases):
            if not len(phrase.boxes):
                continue
            pred = (boxes[index == p], scores[index == p])
            for key in ("all", split):
                phrases[key].append(pred)
                gts[key].append(phrase.boxes)
            if s.task == "refexp" and not any(len(q.boxes) for q in s.phrases[:p]):
                refexp_pred.append(pred)
                refexp_gt.append(phrase.boxes)
                refexp_rel.append(s.has_relation)
    out: dict[str, float] = {}
    for key, suffix in (("all", ""), ("relation", "_relation"), ("no_relation", "_no_relation")):
        r = recall_at_k(phrases[key], gts[key], KS)
        out.update({f"R@{k}{suffix}": r[f"R@{k}"] for k in KS})
        out[f"phrases{suffix}"] = r["phrases"]
    out["refexp"] = referring_accuracy(refexp_pred, refexp_gt)
    rel = [i for i, r in enumerate(refexp_rel) if r]
    out["refexp_relation"] = referring_accuracy([refexp_pred[i] for i in rel],
                                                [refexp_gt[i] for i in rel])
    out["refexps"] = len(refexp_gt)
    return out


def _detection(predict: Predict, data: DetectionDataset, limit, progress) -> dict[str, float]:
    images = data.images[:limit] if limit else data.images
    prompt, spans = build_detection_prompt(data.category_names)
    phrase_spans = [[list(s)] for s in spans]
    cat_ids = np.asarray([c for c, _ in data.categories], np.int64)
    results = []
    for im in (progress(images, desc="detection") if progress else images):
        boxes, scores, index = _outputs(predict(load_image_rgb(im.image), prompt, phrase_spans),
                                        len(spans), f"detection image {im.id} ({im.file_name})")
        for box, score, cat in zip(boxes.tolist(), scores.tolist(), cat_ids[index].tolist()):
            results.append({"image_id": im.id, "category_id": cat, "score": score,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    ap = coco_map(data.to_coco(images), results)
    return {"mAP": ap["AP"], "AP50": ap["AP50"], "AP75": ap["AP75"],
            "detection_images": len(images)}


def evaluate(predict: Predict, grounding: GroundingDataset | str | Path | None = None,
             detection: DetectionDataset | str | Path | None = None, limit: int | None = None,
             progress: Callable | None = None) -> dict[str, float]:
    """Run ``predict`` over the datasets and return the metrics (percent; NaN over no items).

    grounding / detection: a loaded dataset or the path of its file (images relative to it).
    limit: evaluate only the first ``limit`` grounding entries and detection images.
    progress: e.g. ``tqdm``; called as ``progress(items, desc=...)``.
    Keys: R@1, R@5, R@10, phrases, the same with _relation / _no_relation, refexp,
    refexp_relation, refexps (grounding); mAP, AP50, AP75, detection_images (detection).
    """
    if grounding is None and detection is None:
        raise ValueError("evaluate needs a grounding or a detection dataset")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    out: dict[str, float] = {}
    if grounding is not None:
        if not isinstance(grounding, GroundingDataset):
            grounding = load_grounding(grounding)
        out.update(_grounding(predict, grounding, limit, progress))
    if detection is not None:
        if not isinstance(detection, DetectionDataset):
            detection = load_detection(detection)
        out.update(_detection(predict, detection, limit, progress))
    return out
