"""Box utilities for the grounding head and its losses (pure torch functions).

Conventions:
- ``xyxy``: ``[x1, y1, x2, y2]`` in network-input pixels, continuous coordinates (a pixel ``i``
  covers ``[i, i + 1)``; no ``+1`` width convention, unlike maskrcnn_benchmark's ``TO_REMOVE``).
  ``pixel_offset=1`` (``box_iou``, ``BoxCoder``, anchors) switches to that inclusive-pixel
  convention, which the official FIBER/GLIP DyHead uses (golden/fine README E3/E4, §5, §6):
  width = x2 - x1 + 1, centre (x1 + x2) / 2. The default 0 is the light head's convention.
- ``cxcywh``: ``[cx, cy, w, h]`` in the same pixel units.
- Box deltas (``BoxCoder``): ``[dx, dy, dw, dh]`` relative to an anchor, scaled by the weights
  ``(10, 10, 5, 5)`` as in GLIP/ATSS.

Everything here is traceable by ``torch.onnx.export`` (no data-dependent Python control flow).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# GLIP/ATSS box-coder weights (wx, wy, ww, wh).
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Largest allowed dw/dh before exp (maskrcnn_benchmark's log(1000 / 16)).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` xyxy -> ``[..., 4]`` cxcywh."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` cxcywh -> ``[..., 4]`` xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` xyxy -> ``[...]`` area (negative widths/heights count as 0)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor,
            pixel_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of ``[N, 4]`` and ``[M, 4]`` xyxy boxes -> ``(iou [N, M], union [N, M])``.

    Empty unions (two degenerate boxes) give IoU 0, not NaN. ``pixel_offset=1``: maskrcnn's
    ``boxlist_iou`` (areas ``(x2 - x1 + 1)(y2 - y1 + 1)``, intersection sides ``+1`` clamped at 0).
    """
    if pixel_offset:
        return _box_iou_inclusive(boxes1, boxes2, pixel_offset)
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union.clamp(min=1e-12), union


def _box_iou_inclusive(boxes1: torch.Tensor, boxes2: torch.Tensor,
                       off: float) -> tuple[torch.Tensor, torch.Tensor]:
    area1 = (boxes1[:, 2] - boxes1[:, 0] + off) * (boxes1[:, 3] - boxes1[:, 1] + off)
    area2 = (boxes2[:, 2] - boxes2[:, 0] + off) * (boxes2[:, 3] - boxes2[:, 1] + off)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt + off).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = area1[:, None] + area2 - inter
    return inter / union, union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of ``[N, 4]`` x ``[M, 4]`` xyxy -> ``[N, M]``."""
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing.clamp(min=1e-12)


def paired_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise GIoU of ``[P, 4]`` and ``[P, 4]`` xyxy boxes -> ``[P]``.

    As GLIP's ``GIoULoss``: a predicted box with ``x2 < x1`` (or ``y2 < y1``) is collapsed to zero
    width (height) so the loss stays defined; ``eps`` keeps the divisions finite.
    """
    x1, y1 = boxes1[:, 0], boxes1[:, 1]
    x2, y2 = torch.max(x1, boxes1[:, 2]), torch.max(y1, boxes1[:, 3])
    area1 = (x2 - x1) * (y2 - y1)
    area2 = box_area(boxes2)
    iw = (torch.min(x2, boxes2[:, 2]) - torch.max(x1, boxes2[:, 0])).clamp(min=0)
    ih = (torch.min(y2, boxes2[:, 3]) - torch.max(y1, boxes2[:, 1])).clamp(min=0)
    inter = iw * ih
    union = area1 + area2 - inter + eps
    ew = torch.max(x2, boxes2[:, 2]) - torch.min(x1, boxes2[:, 0])
    eh = torch.max(y2, boxes2[:, 3]) - torch.min(y1, boxes2[:, 1])
    enclosing = ew * eh + eps
    return inter / union - (enclosing - union) / enclosing


class BoxCoder:
    """Anchor-relative box deltas with weights ``(wx, wy, ww, wh)`` (GLIP/ATSS: ``(10, 10, 5, 5)``).

    ``encode(boxes, anchors)`` and ``decode(deltas, anchors)`` take ``[..., 4]`` tensors that
    broadcast against each other (e.g. deltas ``[B, N, 4]`` with anchors ``[N, 4]``); boxes and
    anchors are xyxy pixels. ``decode`` clamps ``dw``/``dh`` at ``log(1000/16)`` before ``exp``.

    ``pixel_offset=1``: the official ATSS ``BoxCoder`` (golden/fine README E4): widths
    ``x2 - x1 + 1`` of anchors and boxes, centres ``(x1 + x2) / 2``, decoded boxes
    ``[cx - (w - 1) / 2, .., cx + (w - 1) / 2, ..]``, with the official order of operations.
    """

    def __init__(self, weights: Sequence[float] = BOX_CODER_WEIGHTS, clip: float = BBOX_XFORM_CLIP,
                 pixel_offset: float = 0.0):
        if len(weights) != 4:
            raise ValueError(f"box coder weights: expected 4 values, got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.clip = float(clip)
        self.pixel_offset = float(pixel_offset)

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """xyxy ``boxes`` relative to xyxy ``anchors`` -> deltas ``[..., 4]``. Boxes need positive size."""
        wx, wy, ww, wh = self.weights
        if self.pixel_offset:
            return self._encode_inclusive(boxes, anchors)
        a = box_xyxy_to_cxcywh(anchors)
        b = box_xyxy_to_cxcywh(boxes)
        dx = wx * (b[..., 0] - a[..., 0]) / a[..., 2]
        dy = wy * (b[..., 1] - a[..., 1]) / a[..., 3]
        dw = ww * torch.log(b[..., 2] / a[..., 2])
        dh = wh * torch.log(b[..., 3] / a[..., 3])
        return torch.stack((dx, dy, dw, dh), dim=-1)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Deltas ``[..., 4]`` applied to xyxy ``anchors`` -> xyxy boxes ``[..., 4]``."""
        wx, wy, ww, wh = self.weights
        if self.pixel_offset:
            return self._decode_inclusive(deltas, anchors)
        a = box_xyxy_to_cxcywh(anchors.to(deltas.dtype))
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.clip)
        dh = (deltas[..., 3] / wh).clamp(max=self.clip)
        cx = dx * a[..., 2] + a[..., 0]
        cy = dy * a[..., 3] + a[..., 1]
        w = torch.exp(dw) * a[..., 2]
        h = torch.exp(dh) * a[..., 3]
        return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)

    def _encode_inclusive(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        off = self.pixel_offset
        wx, wy, ww, wh = self.weights
        ex_w = anchors[..., 2] - anchors[..., 0] + off
        ex_h = anchors[..., 3] - anchors[..., 1] + off
        ex_cx = (anchors[..., 2] + anchors[..., 0]) / 2
        ex_cy = (anchors[..., 3] + anchors[..., 1]) / 2
        gt_w = boxes[..., 2] - boxes[..., 0] + off
        gt_h = boxes[..., 3] - boxes[..., 1] + off
        gt_cx = (boxes[..., 2] + boxes[..., 0]) / 2
        gt_cy = (boxes[..., 3] + boxes[..., 1]) / 2
        return torch.stack((wx * (gt_cx - ex_cx) / ex_w, wy * (gt_cy - ex_cy) / ex_h,
                            ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)), dim=-1)

    def _decode_inclusive(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        off = self.pixel_offset
        wx, wy, ww, wh = self.weights
        anchors = anchors.to(deltas.dtype)
        widths = anchors[..., 2] - anchors[..., 0] + off
        heights = anchors[..., 3] - anchors[..., 1] + off
        ctr_x = (anchors[..., 2] + anchors[..., 0]) / 2
        ctr_y = (anchors[..., 3] + anchors[..., 1]) / 2
        dw = (deltas[..., 2] / ww).clamp(max=self.clip)
        dh = (deltas[..., 3] / wh).clamp(max=self.clip)
        cx = deltas[..., 0] / wx * widths + ctr_x
        cy = deltas[..., 1] / wy * heights + ctr_y
        w = torch.exp(dw) * widths
        h = torch.exp(dh) * heights
        return torch.stack((cx - 0.5 * (w - off), cy - 0.5 * (h - off),
                            cx + 0.5 * (w - off), cy + 0.5 * (h - off)), dim=-1)


def level_anchors(height: int, width: int, stride: int, size: float,
                  device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                  pixel_offset: float = 0.0) -> torch.Tensor:
    """One square anchor per location of an ``height x width`` map -> ``[height * width, 4]`` xyxy.

    Location ``(i, j)`` (row, column) is centred on ``((j + 0.5) * stride, (i + 0.5) * stride)``,
    the centre of the input pixels it covers; the anchor is ``size x size``. Rows are in raster
    order (row-major), matching ``feature.flatten(2)``.

    ``pixel_offset=1``: maskrcnn's anchor generator (golden/fine README E3): the anchor at
    ``(i, j)`` is ``[s*j + (s-1)/2 - (S-1)/2, s*i + (s-1)/2 - (S-1)/2, s*j + (s-1)/2 + (S-1)/2, ...]``
    (the first P3 anchor of stride 8, size 64 is ``[-28, -28, 35, 35]``).
    """
    if pixel_offset:
        cell = torch.tensor([(stride - pixel_offset) / 2 - (size - pixel_offset) / 2] * 2
                            + [(stride - pixel_offset) / 2 + (size - pixel_offset) / 2] * 2,
                            device=device, dtype=dtype)
        shift_x = torch.arange(width, device=device, dtype=dtype) * stride
        shift_y = torch.arange(height, device=device, dtype=dtype) * stride
        sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        sx, sy = sx.reshape(-1), sy.reshape(-1)
        return torch.stack((sx, sy, sx, sy), dim=1) + cell
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * stride
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    cx, cy = cx.reshape(-1), cy.reshape(-1)
    half = size / 2
    return torch.stack((cx - half, cy - half, cx + half, cy + half), dim=-1)


def make_anchors(feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int], anchor_scale: float,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                 pixel_offset: float = 0.0) -> torch.Tensor:
    """Anchors for all FPN levels, concatenated level by level -> ``[sum(H_l * W_l), 4]`` xyxy.

    Level ``l`` has anchors of size ``anchor_scale * strides[l]`` (GLIP: 8 x stride);
    ``pixel_offset`` as in ``level_anchors``.
    """
    if len(feature_sizes) != len(strides):
        raise ValueError(f"anchors: {len(feature_sizes)} feature sizes but {len(strides)} strides")
    return torch.cat([level_anchors(h, w, s, anchor_scale * s, device, dtype, pixel_offset)
                      for (h, w), s in zip(feature_sizes, strides)], dim=0)
