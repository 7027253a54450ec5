"""Task heads on top of the fused backbone.

- ``fiber.heads.coarse``: stage-1 heads (ITC transforms/poolers + temperature + feature queue, ITM,
  MLM) with the official coarse parameter names.
- ``fiber.heads.grounding``: stage-2 FPN and the GLIP-style dense grounding head.

``HeadOptions`` collects every head hyper-parameter. ``fiber.config.HeadConfig`` is the source of
truth for the fields it has; ``head_options`` fills the others with the defaults below until
``HeadConfig`` grows them (an unknown ``HeadConfig`` field is an error, so nothing is ignored).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HeadOptions:
    kind: str = "light"         # "light" (conv tower) | "dyhead" (official DyHead)
    fpn_channels: int = 64      # FPN and tower width (GLIP/FIBER: 256)
    num_convs: int = 2          # 3x3 conv + GN + ReLU blocks in the tower (FIBER DyHead: 6)
    anchor_scale: float = 8.0   # anchor side = anchor_scale x level stride (GLIP: 8)
    prior_prob: float = 0.01    # focal-loss prior: bias0 = -log((1 - p) / p)
    proj_dim: int = 64          # region-token alignment width (GLIP: = tower channels, 256)
    use_p6: bool = False        # extra stride-64 level from a strided 3x3 conv on P5
    use_p7: bool = False        # stride-128 level from a strided 3x3 conv on ReLU(P6) (needs use_p6)
    gn_groups: int = 16         # GroupNorm groups in the tower (FIBER: 16)
    queue_size: int = 1024      # ITC feature queue length (official: 4096)
    num_classes: int = 80       # DyHead cls_logits outputs / official score columns
    log_scale: float = 0.0      # initial log_scale of the alignment logits
    logit_clamp: float = 50000.0  # alignment logits clamped to +- this
    inference_th: float = 0.05  # post-processing: phrase score threshold (before centerness)
    pre_nms_top_n: int = 1000   # post-processing: candidates per level before NMS
    nms_th: float = 0.6         # post-processing: multi-label NMS IoU
    detections_per_img: int = 100  # post-processing: detections kept per image


def head_options(head_cfg: Any | None = None) -> HeadOptions:
    """``HeadOptions`` from a ``HeadConfig`` dataclass (or ``None`` for the defaults)."""
    if head_cfg is None:
        return HeadOptions()
    known = {f.name for f in dataclasses.fields(HeadOptions)}
    given = dataclasses.asdict(head_cfg)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"HeadConfig: unknown field(s) {unknown}; known: {sorted(known)}")
    return HeadOptions(**given)


__all__ = ["HeadOptions", "head_options"]
