"""Detector output -> Detections: phrase scores, threshold, top-k, per-phrase NMS, box decode.

Scoring follows FIBER/GLIP inference: a phrase's score at an anchor is the mean of
sigmoid(token logit) over the phrase's tokens times sigmoid(centerness). Each step runs in the C
extension ``runtime._native`` and has a numpy twin here (``*_ref``) that tests compare it with.
Training and evaluation code (torch) call ``postprocess`` too, so it is a pure numpy function.
Boxes are xyxy pixels: network-input pixels in, source-image pixels out. Torch-free.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from runtime.preprocess import load_native
from runtime.types import Detections, LetterboxInfo

Span = tuple[int, int]  # [start, end) character offsets into a prompt


# ---------------------------------------------------------------------------------------------
# numpy references of the C functions

def _sigmoid(x: np.ndarray) -> np.ndarray:
    """float32 sigmoid without overflow warnings (the same two branches as the C code)."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def phrase_scores_ref(token_logits: np.ndarray, centerness: np.ndarray,
                      phrase_map: np.ndarray) -> np.ndarray:
    """[N, T] logits, [N] centerness logits, [P, T] token weights -> float32 [N, P].

    score[n, p] = sum_t w[p, t] sigmoid(l[n, t]) / sum_t w[p, t] * sigmoid(c[n]); a phrase whose
    weights do not sum to > 0 scores 0. With 0/1 weights this is the mean over its tokens.
    """
    w = np.asarray(phrase_map).astype(np.float32)
    wsum = w.sum(axis=1)
    mean = (_sigmoid(token_logits) @ w.T) / np.where(wsum > 0, wsum, 1.0)
    scores = np.where(wsum > 0, mean, 0.0) * _sigmoid(centerness)[:, None]
    return scores.astype(np.float32).reshape(len(token_logits), len(w))


def _order_desc(scores: np.ndarray) -> np.ndarray:
    """Indices by score descending, ties by index, NaN last (as the C merge sort)."""
    return np.argsort(-np.asarray(scores, np.float32), kind="stable")


def topk_ref(scores: np.ndarray, k: int) -> np.ndarray:
    """int64 indices of the k largest of float32 [N] (descending; ties: lower index first)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return _order_desc(scores)[:k].astype(np.int64)


def _side(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    d = hi - lo
    return np.where(d > 0, d, 0.0)  # NaN and negative -> 0, as the C code


def _iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU (float64) of one xyxy box with [M, 4] boxes; 0 where the union is empty."""
    ix1 = np.where(box[0] > boxes[:, 0], box[0], boxes[:, 0])
    iy1 = np.where(box[1] > boxes[:, 1], box[1], boxes[:, 1])
    ix2 = np.where(box[2] < boxes[:, 2], box[2], boxes[:, 2])
    iy2 = np.where(box[3] < boxes[:, 3], box[3], boxes[:, 3])
    inter = _side(ix1, ix2) * _side(iy1, iy2)
    union = (_side(box[0], box[2]) * _side(box[1], box[3])
             + _side(boxes[:, 0], boxes[:, 2]) * _side(boxes[:, 1], boxes[:, 3])) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms_ref(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
            classes: np.ndarray | None = None) -> np.ndarray:
    """Greedy NMS on xyxy float32 [N, 4]; int64 kept indices by score descending.

    A box is dropped when its IoU with a kept, higher-ranked box of the same class (all one
    class when ``classes`` is None) is > iou_threshold.
    """
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    b = np.asarray(boxes, np.float32).astype(np.float64).reshape(-1, 4)
    order = _order_desc(scores)
    dead = np.zeros(len(order), bool)
    keep = []
    for pos, i in enumerate(order):
        if dead[i]:
            continue
        keep.append(i)
        rest = order[pos + 1:]
        hit = _iou_one(b[i], b[rest]) > iou_threshold
        if classes is not None:
            hit &= classes[rest] == classes[i]
        dead[rest[hit]] = True
    return np.asarray(keep, np.int64)


def decode_boxes_ref(boxes: np.ndarray, scale: float, src_w: int, src_h: int) -> np.ndarray:
    """xyxy float32 [N, 4] network-input pixels -> source pixels: / scale, clipped, NaN -> 0."""
    if not (scale > 0 and np.isfinite(scale)) or src_w < 1 or src_h < 1:
        raise ValueError(f"need scale > 0 and src_w, src_h >= 1, got {scale}, {src_w}, {src_h}")
    v = np.asarray(boxes, np.float32).reshape(-1, 4) / np.float32(scale)
    hi = np.array([src_w, src_h, src_w, src_h], np.float32)
    return np.where(v > 0, np.where(v < hi, v, hi), np.float32(0)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Dispatch: the C extension when built and wanted, else the reference

def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def phrase_scores(token_logits: np.ndarray, centerness: np.ndarray, phrase_map: np.ndarray,
                  use_native: bool = True) -> np.ndarray:
    """See phrase_scores_ref; float32 [N, P]."""
    native = load_native() if use_native else None
    if native is None:
        return phrase_scores_ref(token_logits, centerness, phrase_map)
    pm = np.asarray(phrase_map)
    pm = np.ascontiguousarray(pm if pm.dtype in (np.uint8, np.bool_) else pm.astype(np.float32))
    return native.phrase_scores(_f32(token_logits), _f32(centerness), pm)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        classes: np.ndarray | None = None, use_native: bool = True) -> np.ndarray:
    """See nms_ref; int64 kept indices by score descending."""
    native = load_native() if use_native else None
    if native is None:
        return nms_ref(boxes, scores, iou_threshold, classes)
    if classes is None:
        return native.nms(_f32(boxes), _f32(scores), iou_threshold)
    return native.nms_per_class(_f32(boxes), _f32(scores),
                                np.ascontiguousarray(classes, np.int64), iou_threshold)


def topk(scores: np.ndarray, k: int, use_native: bool = True) -> np.ndarray:
    native = load_native() if use_native else None
    return topk_ref(scores, k) if native is None else native.topk(_f32(scores), k)


def decode_boxes(boxes: np.ndarray, info: LetterboxInfo, use_native: bool = True) -> np.ndarray:
    """Network-input xyxy [N, 4] -> source-image pixels of the image ``info`` describes."""
    native = load_native() if use_native else None
    if native is None:
        return decode_boxes_ref(boxes, info.scale, info.src_w, info.src_h)
    return native.decode_boxes(_f32(boxes), info.scale, info.src_w, info.src_h)


# ---------------------------------------------------------------------------------------------
# Phrases

def parse_phrases(prompt: str) -> list[list[Span]]:
    """Character spans of the class names in a ``". "``-separated prompt, one span per phrase.

    ``"person. red mug."`` -> ``[[(0, 6)], [(8, 15)]]``: names are stripped of whitespace and
    trailing periods; empty names are skipped. ValueError when no name is left.
    """
    spans: list[list[Span]] = []
    start = 0
    for part in prompt.split(". "):
        name = part.strip().rstrip(".").rstrip()
        if name:
            s = start + part.index(name)
            spans.append([(s, s + len(name))])
        start += len(part) + 2
    if not spans:
        raise ValueError(f"prompt {prompt!r} has no phrases (it is empty or only separators)")
    return spans


def phrase_token_map(offsets: Sequence[Span], phrase_spans: Sequence[Sequence[Span]],
                     num_tokens: int) -> np.ndarray:
    """float32 [P, num_tokens]: 1 where token t's character span overlaps one of phrase p's.

    offsets: one (start, end) per real token (special tokens have (0, 0) and never belong);
    tokens past ``len(offsets)`` (padding) belong to no phrase.
    """
    out = np.zeros((len(phrase_spans), num_tokens), np.float32)
    for t, (ts, te) in enumerate(offsets[:num_tokens]):
        if te <= ts:
            continue
        for p, spans in enumerate(phrase_spans):
            if any(ts < e and s < te for s, e in spans):
                out[p, t] = 1.0
    return out


# ---------------------------------------------------------------------------------------------
# The whole post-processing of one image

def _candidates(scores: np.ndarray, threshold: float, top_k: int,
                use_native: bool) -> np.ndarray:
    """Flat indices into scores [N, P] (anchor-major) above threshold, top_k per phrase."""
    flat = scores.ravel()
    idx = np.flatnonzero(flat > threshold)
    num_phrases = scores.shape[1]
    phrase = idx % num_phrases if num_phrases else idx
    counts = np.bincount(phrase, minlength=num_phrases)
    if (counts <= top_k).all():
        return idx
    parts = []
    for p in range(num_phrases):
        sel = idx[phrase == p]
        parts.append(sel[topk(flat[sel], top_k, use_native)] if len(sel) > top_k else sel)
    return np.sort(np.concatenate(parts))


def postprocess(boxes: np.ndarray, token_logits: np.ndarray, centerness: np.ndarray,
                phrase_map: np.ndarray, info: LetterboxInfo, threshold: float = 0.05,
                nms_iou: float = 0.6, pre_nms_top_k: int = 1000, max_detections: int = 100,
                use_native: bool = True, phrases: Sequence[str] | None = None,
                min_per_phrase: int = 0, per_phrase: int = 0,
                one_label_per_box: bool = False) -> Detections:
    """The detector outputs of ONE image (no batch dim) -> Detections in source pixels.

    boxes float32 [N, 4] xyxy network-input pixels; token_logits float32 [N, T]; centerness
    float32 [N] (logits); phrase_map [P, T] (phrase_token_map). Steps: phrase scores [N, P];
    per phrase keep scores > threshold, then its pre_nms_top_k best; decode boxes to source
    pixels (clipped); NMS per phrase at nms_iou; the best max_detections overall, best first.
    ``phrases`` names the P phrases in the result (default "0", "1", ...).

    ``min_per_phrase`` > 0 (evaluation: R@10 needs ten boxes of every phrase) instead keeps
    each phrase's best ``max(min_per_phrase, max_detections // P)`` detections.

    ``per_phrase`` K > 0 (grounding, the Flickr30k/MDETR protocol): each phrase's best K boxes
    after its NMS, whatever ``max_detections`` says (P x K at most), best first.
    ``one_label_per_box`` (detection): NMS across phrases instead of per phrase, so overlapping
    boxes of different phrases keep only the highest-scoring (box, phrase).
    """
    boxes = np.asarray(boxes).reshape(-1, 4)
    token_logits = np.asarray(token_logits)
    phrase_map = np.asarray(phrase_map)
    num_phrases = phrase_map.shape[0] if phrase_map.ndim == 2 else -1
    if token_logits.ndim != 2 or num_phrases < 0 or len(boxes) != len(token_logits):
        raise ValueError(
            f"need boxes [N, 4], token_logits [N, T], phrase_map [P, T]; got {list(boxes.shape)},"
            f" {list(token_logits.shape)}, {list(phrase_map.shape)}"
        )
    if pre_nms_top_k < 0 or max_detections < 0 or per_phrase < 0:
        raise ValueError(f"pre_nms_top_k, max_detections and per_phrase must be >= 0, got "
                         f"{pre_nms_top_k}, {max_detections}, {per_phrase}")
    names = tuple(str(p) for p in range(num_phrases)) if phrases is None else tuple(phrases)
    if len(names) != num_phrases:
        raise ValueError(f"{len(names)} phrase names for a phrase_map of {num_phrases} rows")

    scores = phrase_scores(token_logits, centerness, phrase_map, use_native)  # [N, P]
    cand = _candidates(scores, threshold, pre_nms_top_k, use_native)
    anchor, phrase = (cand // num_phrases, cand % num_phrases) if num_phrases else (cand, cand)
    cand_boxes = decode_boxes(boxes[anchor], info, use_native)
    cand_scores = scores.ravel()[cand]
    keep = nms(cand_boxes, cand_scores, nms_iou, None if one_label_per_box else phrase, use_native)
    if per_phrase > 0:
        keep = keep[_first_per_class(phrase[keep], per_phrase)]
    elif min_per_phrase > 0:
        keep = keep[_first_per_class(phrase[keep], max(min_per_phrase, max_detections // max(1, num_phrases)))]
    else:
        keep = keep[:max_detections]
    return Detections(cand_boxes[keep], cand_scores[keep], phrase[keep].astype(np.int32), names)


def _first_per_class(classes: np.ndarray, per_class: int) -> np.ndarray:
    """bool mask: the first ``per_class`` entries of every class (order preserved)."""
    order = np.argsort(classes, kind="stable")
    sorted_classes = classes[order]
    starts = np.searchsorted(sorted_classes, sorted_classes, side="left")
    rank = np.empty(len(classes), np.int64)
    rank[order] = np.arange(len(classes)) - starts
    return rank < per_class
