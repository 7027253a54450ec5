"""Detector output -> Detections: phrase scores, threshold, top-k, per-phrase NMS, box decode.

Scoring follows FIBER/GLIP inference: a phrase's score at an anchor is the mean of
sigmoid(token logit) over the phrase's tokens times sigmoid(centerness) (or the minimum, for a
package whose manifest says ``postprocess.phrase_score: "min"``). Each step runs in the C
extension ``runtime._native`` and has a numpy twin here (``*_ref``) that tests compare it with.
Training and evaluation code (torch) call ``postprocess`` too, so it is a pure numpy function.
Boxes are xyxy pixels: network-input pixels in, source-image pixels out. Torch-free.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from common.package import PHRASE_SCORE_MEAN, PHRASE_SCORE_MIN, PHRASE_SCORES, PostprocessSpec
from runtime.preprocess import load_native
from runtime.types import Detections, LetterboxInfo

_DEFAULT = PostprocessSpec()  # a package's post-processing defaults (the manifest may set others)


# ---------------------------------------------------------------------------------------------
# numpy references of the C functions

def _sigmoid(x: np.ndarray) -> np.ndarray:
    """float32 sigmoid without overflow warnings (the same two branches as the C code)."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def phrase_scores_ref(token_logits: np.ndarray, centerness: np.ndarray,
                      phrase_map: np.ndarray, rule: str = PHRASE_SCORE_MEAN) -> np.ndarray:
    """[N, T] logits, [N] centerness logits, [P, T] token weights -> float32 [N, P].

    score[n, p] = sum_t w[p, t] sigmoid(l[n, t]) / sum_t w[p, t] * sigmoid(c[n]); a phrase whose
    weights do not sum to > 0 scores 0. With 0/1 weights this is the mean over its tokens.
    ``rule`` "min" (common.package.PHRASE_SCORES): the lowest probability of the tokens with
    w > 0 instead of the weighted mean.
    """
    if rule == PHRASE_SCORE_MIN:
        return _phrase_minima(token_logits, centerness, phrase_map)
    if rule != PHRASE_SCORE_MEAN:
        raise ValueError(f"phrase score rule {rule!r} is not one of {', '.join(PHRASE_SCORES)}")
    w = np.asarray(phrase_map).astype(np.float32)
    wsum = w.sum(axis=1)
    mean = (_sigmoid(token_logits) @ w.T) / np.where(wsum > 0, wsum, 1.0)
    scores = np.where(wsum > 0, mean, 0.0) * _sigmoid(centerness)[:, None]
    return scores.astype(np.float32).reshape(len(token_logits), len(w))


def _phrase_minima(token_logits: np.ndarray, centerness: np.ndarray, phrase_map: np.ndarray) -> np.ndarray:
    """phrase_scores_ref's "min" rule: sigmoid(min over the phrase's tokens of the logit) x
    sigmoid(centerness) (the sigmoid is monotonic, so the minimum is taken on logits)."""
    logits = np.asarray(token_logits, np.float32)
    marks = np.asarray(phrase_map) > 0
    scores = np.zeros((len(logits), len(marks)), np.float32)
    for p, tokens in enumerate(marks):
        if tokens.any():
            scores[:, p] = _sigmoid(logits[:, tokens].min(axis=1))
    return (scores * _sigmoid(np.asarray(centerness, np.float32))[:, None]).astype(np.float32)


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
    b = np.asarray(boxes, np.float32).astype(np.float64).reshape(-1, 4)
    return _greedy_nms(b, scores, classes, _iou_one, iou_threshold)


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray | None, iou, threshold) -> np.ndarray:
    """The greedy loop both NMS twins share: by score descending (ties: lower index first), drop
    every later box of the same class (all one class when ``classes`` is None) whose
    ``iou(kept_box, boxes) > threshold``. int64 kept indices in rank order."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {threshold}")
    order = _order_desc(scores)
    dead = np.zeros(len(order), bool)
    keep = []
    for pos, i in enumerate(order):
        if dead[i]:
            continue
        keep.append(i)
        rest = order[pos + 1:]
        hit = iou(boxes[i], boxes[rest]) > threshold
        if classes is not None:
            hit &= classes[rest] == classes[i]
        dead[rest[hit]] = True
    return np.asarray(keep, np.int64)


def _iou_plus1(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """float32 IoU of one box with [M, 4] boxes, +1 convention, as the official CUDA devIoU."""
    one, zero = np.float32(1), np.float32(0)
    left, right = np.fmax(box[0], boxes[:, 0]), np.fmin(box[2], boxes[:, 2])
    top, bottom = np.fmax(box[1], boxes[:, 1]), np.fmin(box[3], boxes[:, 3])
    inter = np.fmax(right - left + one, zero) * np.fmax(bottom - top + one, zero)
    sa = (box[2] - box[0] + one) * (box[3] - box[1] + one)
    sb = (boxes[:, 2] - boxes[:, 0] + one) * (boxes[:, 3] - boxes[:, 1] + one)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return inter / (sa + sb - inter)


def ml_nms_ref(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray | None,
               iou_threshold: float) -> np.ndarray:
    """numpy twin of ``runtime._native.ml_nms``: the official multi-label NMS.

    Greedy by score descending (ties: lower index first); a box is dropped when a kept,
    higher-ranked box of the same label (all one label when ``labels`` is None) has +1-convention
    float32 IoU > iou_threshold. int64 kept indices in ascending index order (the official order).
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.sort(_greedy_nms(b, scores, labels, _iou_plus1, np.float32(iou_threshold)))


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
                  use_native: bool = True, rule: str = PHRASE_SCORE_MEAN) -> np.ndarray:
    """See phrase_scores_ref; float32 [N, P]. The C extension computes the mean rule; the minimum
    is numpy's (a few columns per phrase)."""
    native = load_native() if use_native and rule == PHRASE_SCORE_MEAN else None
    if native is None:
        return phrase_scores_ref(token_logits, centerness, phrase_map, rule)
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


def ml_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray | None,
           iou_threshold: float, use_native: bool = True) -> np.ndarray:
    """See ml_nms_ref; int64 kept indices, ascending."""
    native = load_native() if use_native else None
    if native is None:
        return ml_nms_ref(boxes, scores, labels, iou_threshold)
    lab = None if labels is None else np.ascontiguousarray(labels, np.int64)
    return native.ml_nms(_f32(boxes).reshape(-1, 4), _f32(scores), lab, iou_threshold)


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
                phrase_map: np.ndarray, info: LetterboxInfo, threshold: float = _DEFAULT.threshold,
                nms_iou: float = _DEFAULT.nms_iou, pre_nms_top_k: int = _DEFAULT.pre_nms_top_k,
                max_detections: int = _DEFAULT.max_detections,
                use_native: bool = True, phrases: Sequence[str] | None = None,
                min_per_phrase: int = 0, per_phrase: int = 0,
                one_label_per_box: bool = False, phrase_score: str = _DEFAULT.phrase_score) -> Detections:
    """The detector outputs of ONE image (no batch dim) -> Detections in source pixels.

    boxes float32 [N, 4] xyxy network-input pixels; token_logits float32 [N, T]; centerness
    float32 [N] (logits); phrase_map [P, T] (common.prompts.phrase_token_map). Steps: phrase scores [N, P];
    per phrase keep scores > threshold, then its pre_nms_top_k best; decode boxes to source
    pixels (clipped); NMS per phrase at nms_iou; the best max_detections overall, best first.
    ``phrases`` names the P phrases in the result (default "0", "1", ...).

    ``min_per_phrase`` > 0 (evaluation: R@10 needs ten boxes of every phrase) instead keeps
    each phrase's best ``max(min_per_phrase, max_detections // P)`` detections.

    ``per_phrase`` K > 0 (grounding, the Flickr30k/MDETR protocol): each phrase's best K boxes
    after its NMS, whatever ``max_detections`` says (P x K at most), best first.
    ``one_label_per_box`` (detection): NMS across phrases instead of per phrase, so overlapping
    boxes of different phrases keep only the highest-scoring (box, phrase).
    ``phrase_score``: the rule of the phrase scores ("mean" or "min", the manifest's
    ``postprocess.phrase_score``).
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

    scores = phrase_scores(token_logits, centerness, phrase_map, use_native, phrase_score)  # [N, P]
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


# ---------------------------------------------------------------------------------------------
# The official FIBER/GLIP fine post-processing (ATSSPostProcessor, eval mode)

def _top_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores by score descending (ties: lower index first), in
    O(n + k log k): a partition finds the k-th largest, only the survivors are sorted."""
    n = len(scores)
    if n > k:
        kth = np.partition(scores, n - k)[n - k]
        above = np.flatnonzero(scores > kth)
        sel = np.concatenate([above, np.flatnonzero(scores == kth)[:k - len(above)]])
    else:
        sel = np.arange(n)
    return sel[_order_desc(scores[sel])]


def official_candidates(boxes: np.ndarray, token_logits: np.ndarray, centerness: np.ndarray,
                        phrase_map: np.ndarray, level_sizes: Sequence[int], info: LetterboxInfo,
                        threshold: float = _DEFAULT.threshold,
                        pre_nms_top_k: int = _DEFAULT.pre_nms_top_k) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidates that reach the official multi-label NMS (golden/fine README §5, 1-5).

    boxes float32 [N, 4] decoded xyxy canvas pixels (official box coder), token_logits [N, T],
    centerness [N] logits, all levels concatenated (``level_sizes`` anchors per level, row-major
    within a level); phrase_map [P, T] 0/1. Per level: score[a, p] = mean over p's tokens of
    sigmoid(logit); (anchor, phrase) pairs with score > threshold (before centerness); at most
    ``pre_nms_top_k`` of them, the largest score x sigmoid(centerness); final score
    sqrt(score x sigmoid(centerness)); boxes clipped to [0, new_w - 1] x [0, new_h - 1] of the
    resized image (``info``). Returns (boxes float32 [M, 4] resized-image pixels, scores float32
    [M], phrase int64 [M], 0-based), levels in order, each level's by score descending.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    logits = np.asarray(token_logits, np.float32)
    ctr = np.asarray(centerness, np.float32).reshape(-1)
    pm = np.asarray(phrase_map)
    n = len(boxes)
    if logits.ndim != 2 or pm.ndim != 2 or len(logits) != n or len(ctr) != n \
            or pm.shape[1] != logits.shape[1]:
        raise ValueError(f"need boxes [N, 4], token_logits [N, T], centerness [N], phrase_map "
                         f"[P, T]; got {list(boxes.shape)}, {list(logits.shape)}, "
                         f"{list(ctr.shape)}, {list(pm.shape)}")
    if sum(level_sizes) != n or any(k < 1 for k in level_sizes):
        raise ValueError(f"level_sizes {list(level_sizes)} do not add up to the {n} anchors")
    if pre_nms_top_k < 1:
        raise ValueError(f"pre_nms_top_k must be >= 1, got {pre_nms_top_k}")
    anchor, label, mean = _phrase_means_above(logits, pm, threshold)  # (anchor, phrase) row-major
    ctr = _sigmoid(ctr)
    hi = np.array([info.new_w - 1, info.new_h - 1] * 2, np.float32)
    out_boxes, out_scores, out_labels = [], [], []
    bounds = np.searchsorted(anchor, np.cumsum([0, *level_sizes]))  # anchor is sorted
    for lo, up in zip(bounds[:-1], bounds[1:]):
        a, lab = anchor[lo:up], label[lo:up]
        score = mean[lo:up] * ctr[a]
        sel = _top_desc(score, pre_nms_top_k)
        out_boxes.append(np.clip(boxes[a[sel]], np.float32(0), hi))
        out_scores.append(np.sqrt(score[sel]))
        out_labels.append(lab[sel])
    return (np.concatenate(out_boxes).astype(np.float32).reshape(-1, 4),
            np.concatenate(out_scores).astype(np.float32), np.concatenate(out_labels))


def _phrase_means_above(logits: np.ndarray, phrase_map: np.ndarray,
                        threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (anchor, phrase) pairs whose mean token probability is > threshold, row-major (as
    the official ``nonzero()`` over [N, P]): (anchor int64 [M], phrase int64 [M], mean f32 [M]).

    A mean can only pass when one of its tokens does, so anchors are first screened on the
    logits (max over the phrase's tokens > logit(threshold), with a margin); only those get
    sigmoids. This keeps an 80-phrase prompt on ~20k anchors cheap.
    """
    num_phrases = phrase_map.shape[0]
    cols = np.flatnonzero((phrase_map > 0).any(axis=0))
    col_of = np.zeros(phrase_map.shape[1], np.int64)
    col_of[cols] = np.arange(len(cols))
    if threshold <= 0.0:
        screen = -np.inf
    elif threshold >= 1.0:
        screen = np.inf
    else:
        screen = np.log(threshold / (1.0 - threshold)) - 1e-3
    # np.take, not logits[:, cols]: fancy indexing along axis 1 is ~10x slower here
    used = np.take(logits, cols, axis=1)                        # [N, C]
    anchors, phrases, means = [], [], []
    for p in range(num_phrases):  # the mean of probabilities, not of logits
        tokens = col_of[np.flatnonzero(phrase_map[p] > 0)]
        if not len(tokens):
            continue
        sub = np.take(used, tokens, axis=1)                     # [N, k]
        top = sub[:, 0].copy()  # column by column: a reduce over a short axis is slow in numpy
        for j in range(1, len(tokens)):
            np.maximum(top, sub[:, j], out=top)
        rows = np.flatnonzero(top > screen)
        prob = _sigmoid(sub[rows])                              # [R, k]
        m = prob[:, 0].copy()
        for j in range(1, len(tokens)):
            m += prob[:, j]
        m /= np.float32(len(tokens))
        keep = m > threshold
        anchors.append(rows[keep])
        phrases.append(np.full(int(keep.sum()), p, np.int64))
        means.append(m[keep])
    if not anchors:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    anchor, phrase, mean = np.concatenate(anchors), np.concatenate(phrases), np.concatenate(means)
    order = np.argsort(anchor * num_phrases + phrase, kind="stable")
    return anchor[order], phrase[order], mean[order]


def postprocess_official(boxes: np.ndarray, token_logits: np.ndarray, centerness: np.ndarray,
                         phrase_map: np.ndarray, level_sizes: Sequence[int], info: LetterboxInfo,
                         threshold: float = _DEFAULT.threshold, pre_nms_top_k: int = _DEFAULT.pre_nms_top_k,
                         nms_iou: float = _DEFAULT.nms_iou, max_detections: int = _DEFAULT.max_detections,
                         use_native: bool = True,
                         phrases: Sequence[str] | None = None, min_per_phrase: int = 0,
                         per_phrase: int = 0, one_label_per_box: bool = False) -> Detections:
    """The detector outputs of ONE image -> Detections in source pixels, the official way.

    official_candidates, then the multi-label NMS (ml_nms: same phrase only, +1 IoU >
    ``nms_iou``), then the official cut: when more than ``max_detections`` survive, those with
    score >= the k-th smallest survivor score, k = n - max_detections + 1 (ties could keep
    more). Boxes go from resized-image to source pixels as the official ``BoxList.resize``:
    x * src_w / new_w, y * src_h / new_h (``info`` from the official Preprocessor). The result is
    best first (the official order is the concatenation order; only the set is the contract).

    Options beyond the official eval, as ``postprocess`` has them: ``per_phrase`` K > 0 keeps each
    phrase's best K after NMS instead of the cut; ``min_per_phrase`` keeps each phrase's best
    max(min_per_phrase, max_detections // P); ``one_label_per_box`` runs the NMS across phrases.
    """
    num_phrases = np.asarray(phrase_map).shape[0] if np.ndim(phrase_map) == 2 else -1
    names = tuple(str(p) for p in range(max(num_phrases, 0))) if phrases is None else tuple(phrases)
    if len(names) != num_phrases:
        raise ValueError(f"{len(names)} phrase names for a phrase_map of {num_phrases} rows")
    if max_detections < 1 or per_phrase < 0 or min_per_phrase < 0:
        raise ValueError(f"max_detections must be >= 1 and per_phrase, min_per_phrase >= 0, got "
                         f"{max_detections}, {per_phrase}, {min_per_phrase}")
    cb, cs, cl = official_candidates(boxes, token_logits, centerness, phrase_map, level_sizes,
                                     info, threshold, pre_nms_top_k)
    keep = ml_nms(cb, cs, None if one_label_per_box else cl, nms_iou, use_native)
    if per_phrase > 0 or min_per_phrase > 0:
        keep = keep[_order_desc(cs[keep])]
        k = per_phrase if per_phrase > 0 else max(min_per_phrase, max_detections // max(1, num_phrases))
        keep = keep[_first_per_class(cl[keep], k)]
    else:
        if len(keep) > max_detections:
            kept_scores = cs[keep]
            kth = np.partition(kept_scores, len(keep) - max_detections)[len(keep) - max_detections]
            keep = keep[kept_scores >= kth]
        keep = keep[_order_desc(cs[keep])]
    ratio = np.array([info.src_w / info.new_w, info.src_h / info.new_h] * 2, np.float32)
    return Detections(cb[keep] * ratio, cs[keep], cl[keep].astype(np.int32), names)
