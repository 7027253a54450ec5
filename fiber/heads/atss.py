"""The official ATSS post-processing of FIBER's fine model in torch (golden/fine README §5).

GLIP/FIBER ``ATSSPostProcessor`` (eval mode, dot-product token logits, ``SCORE_AGG: MEAN``), per
image and FPN level:

1. ``p = sigmoid(token_logits)``; the score of (anchor, phrase) is the **mean of p** over the
   phrase's tokens (probabilities, not logits).
2. Candidates: score > ``inference_th``, tested **before** centerness.
3. At most ``pre_nms_top_n`` candidates per level, the best by ``score x sigmoid(centerness)``.
4. Final score ``sqrt(score x sigmoid(centerness))``; boxes (already decoded against the anchors
   with the +1 coder) clipped to ``[0, w - 1] x [0, h - 1]`` of the image's resized size.

Then over all levels: multi-label NMS (``ml_nms``: +1 IoU, suppression only within a label, IoU >
``nms_th``) and, if more than ``detections_per_img`` survive, those with a score >= the k-th
smallest (k = n - D + 1, in float32) are kept.

Labels are 1-based phrase ids (row ``p`` of the phrase->token map is label ``p + 1``). Inputs are
what ``FiberForGrounding.detect`` returns plus the per-level anchor counts; boxes are in
network-input pixels (= resized-image pixels: the image sits top-left on the canvas).
``resize_boxes`` maps them to original-image pixels as the official evaluators do.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fiber.box_ops import box_iou

PIXEL_OFFSET = 1.0  # the official +1 IoU and clipping conventions


@dataclass(frozen=True)
class PostprocessLimits:
    """The official post-processing limits (``MODEL.ATSS.*``); ``num_classes`` = score columns
    (``cls_logits`` outputs, 80): a prompt may have at most that many phrases."""
    inference_th: float = 0.05
    pre_nms_top_n: int = 1000
    nms_th: float = 0.6
    detections_per_img: int = 100
    num_classes: int = 80

    @classmethod
    def from_head(cls, head_cfg) -> "PostprocessLimits":
        """From a ``fiber.config.HeadConfig``."""
        return cls(head_cfg.inference_th, head_cfg.pre_nms_top_n, head_cfg.nms_th,
                   head_cfg.detections_per_img, head_cfg.num_classes)


@dataclass(frozen=True)
class Detections:
    """One image's detections: ``boxes`` ``[K, 4]`` float32 xyxy pixels, ``scores`` ``[K]``,
    ``labels`` ``[K]`` int64 1-based phrase ids."""
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def sorted(self) -> "Detections":
        """By score, descending (then label)."""
        order = sorted(range(len(self)), key=lambda i: (-float(self.scores[i]), int(self.labels[i])))
        idx = torch.tensor(order, dtype=torch.long)
        return Detections(self.boxes[idx], self.scores[idx], self.labels[idx])


def phrase_scores(token_logits: torch.Tensor, phrase_token_map: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` logits, ``[P, T]`` binary phrase->token map -> ``[N, P]`` mean token probability."""
    probs = token_logits.sigmoid()
    cols = []
    for p, row in enumerate(phrase_token_map):
        idx = torch.nonzero(row > 0).flatten()
        if idx.numel() == 0:
            raise ValueError(f"post-processing: phrase {p + 1} has no tokens")
        cols.append(probs[:, idx].mean(-1))
    return torch.stack(cols, dim=1) if cols else probs.new_zeros(probs.shape[0], 0)


def candidates(boxes: torch.Tensor, token_logits: torch.Tensor, centerness: torch.Tensor,
               level_sizes: Sequence[int], phrase_token_map: torch.Tensor, image_hw: tuple[int, int],
               limits: PostprocessLimits = PostprocessLimits()) -> Detections:
    """One image's pre-NMS candidates (steps 1-4 of the module docstring), levels concatenated.

    ``boxes`` ``[N, 4]`` decoded xyxy, ``token_logits`` ``[N, T]``, ``centerness`` ``[N]`` logits,
    ``level_sizes`` anchors per level (sum N), ``image_hw`` the resized image's (height, width).
    """
    if sum(level_sizes) != boxes.shape[0]:
        raise ValueError(f"post-processing: level sizes {tuple(level_sizes)} do not add up to {boxes.shape[0]} anchors")
    if phrase_token_map.shape[0] > limits.num_classes:
        raise ValueError(f"post-processing: {phrase_token_map.shape[0]} phrases, at most {limits.num_classes}")
    height, width = image_hw
    out_boxes, out_scores, out_labels = [], [], []
    start = 0
    for size in level_sizes:
        sl = slice(start, start + size)
        start += size
        scores = phrase_scores(token_logits[sl], phrase_token_map)                  # [HW, P]
        cand = scores > limits.inference_th
        top_n = min(int(cand.sum()), limits.pre_nms_top_n)
        scores = scores * centerness[sl].sigmoid()[:, None]
        vals, top = scores[cand].topk(top_n)
        loc_cls = torch.nonzero(cand)[top]
        loc = loc_cls[:, 0] + sl.start
        b = boxes[loc]
        b = torch.stack((b[:, 0].clamp(0, width - PIXEL_OFFSET), b[:, 1].clamp(0, height - PIXEL_OFFSET),
                         b[:, 2].clamp(0, width - PIXEL_OFFSET), b[:, 3].clamp(0, height - PIXEL_OFFSET)), dim=1)
        out_boxes.append(b)
        out_scores.append(vals.sqrt())
        out_labels.append(loc_cls[:, 1] + 1)
    return Detections(torch.cat(out_boxes), torch.cat(out_scores), torch.cat(out_labels))


def ml_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_th: float) -> torch.Tensor:
    """maskrcnn_benchmark's multi-label NMS (the CUDA ``ml_nms``): greedy in descending score order,
    a box suppresses later boxes of **its label** with +1 IoU > ``iou_th``. Returns the kept
    indices in ascending order (the official output keeps the input order)."""
    order = torch.argsort(scores, descending=True, stable=True)
    iou, _ = box_iou(boxes[order], boxes[order], pixel_offset=PIXEL_OFFSET)
    same = labels[order][:, None] == labels[order][None, :]
    suppress = (iou > iou_th) & same
    removed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(i)
        removed |= suppress[i]
    return torch.sort(order[torch.tensor(keep, dtype=torch.long)]).values


def select(dets: Detections, limits: PostprocessLimits = PostprocessLimits()) -> Detections:
    """Multi-label NMS, then the official ``detections_per_img`` cut (score >= k-th smallest)."""
    keep = ml_nms(dets.boxes, dets.scores, dets.labels, limits.nms_th)
    dets = Detections(dets.boxes[keep], dets.scores[keep], dets.labels[keep])
    n, top = len(dets), limits.detections_per_img
    if n > top > 0:
        thresh = torch.kthvalue(dets.scores.float(), n - top + 1).values
        keep = torch.nonzero(dets.scores >= thresh).flatten()
        dets = Detections(dets.boxes[keep], dets.scores[keep], dets.labels[keep])
    return dets


def postprocess(boxes: torch.Tensor, token_logits: torch.Tensor, centerness: torch.Tensor,
                level_sizes: Sequence[int], phrase_token_maps: Sequence[torch.Tensor],
                image_sizes: Sequence[tuple[int, int]], limits: PostprocessLimits = PostprocessLimits(),
                ) -> list[Detections]:
    """The official post-processor over a batch: ``boxes`` ``[B, N, 4]``, ``token_logits``
    ``[B, N, T]``, ``centerness`` ``[B, N]`` (``FiberForGrounding.detect``), one phrase->token map
    ``[P_i, T]`` and one resized (height, width) per image -> ``Detections`` per image, sorted by
    score (descending), boxes in resized-image pixels."""
    if not len(phrase_token_maps) == len(image_sizes) == boxes.shape[0]:
        raise ValueError(f"post-processing: {boxes.shape[0]} images, {len(phrase_token_maps)} phrase maps, "
                         f"{len(image_sizes)} image sizes")
    with torch.no_grad():
        return [select(candidates(boxes[i], token_logits[i], centerness[i], level_sizes, phrase_token_maps[i],
                                  tuple(image_sizes[i]), limits), limits).sorted()
                for i in range(boxes.shape[0])]


def resize_boxes(boxes: torch.Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> torch.Tensor:
    """``BoxList.resize``: xyxy boxes of an image of size ``from_hw`` -> the same boxes at ``to_hw``
    (x times to_w / from_w, y times to_h / from_h; the evaluators' map to original pixels)."""
    rw, rh = float(to_hw[1]) / float(from_hw[1]), float(to_hw[0]) / float(from_hw[0])
    return torch.stack((boxes[:, 0] * rw, boxes[:, 1] * rh, boxes[:, 2] * rw, boxes[:, 3] * rh), dim=1)
