"""Stage-2 (fine-grained) heads: an FPN over the fused image stages and a GLIP-style dense head.

FPN (maskrcnn_benchmark names): lateral 1x1 ``fpn_inner{2,3,4}`` and output 3x3 ``fpn_layer{2,3,4}``
over image stages 2-4 (strides 8/16/32), nearest-neighbour top-down path; optional P6 (stride 64)
from a stride-2 3x3 conv on P5 (``top_blocks.p6``) and P7 (stride 128) from a stride-2 3x3 conv on
ReLU(P6) (``top_blocks.p7``): the official fine FPN (``LastLevelP6P7``, P6 on P5 since in and out
widths are equal) is ``use_p6 + use_p7``; the small edge configs stop at P5 or P6. Official
``fusion_backbone.backbone.fpn.*`` keys map onto ``fpn.*`` by prefix.

Head (GLIP ``VLDyHead`` with ``USE_DOT_PRODUCT_TOKEN_LOSS``, ``EARLY_FUSE_ON: False`` as in FIBER):

- **What differs from DyHead**: the tower is a plain stack of ``3x3 conv + GroupNorm + ReLU`` shared
  across levels. There are no modulated deformable convs (no ``offset`` conv), no scale-aware
  attention across neighbouring levels (``DyConv`` mixes levels l-1/l/l+1), no spatial attention
  and no task attention (DyReLU). It exports to plain ONNX/TensorRT ops and quantises cleanly.
- ``bbox_pred`` (4 deltas per location, multiplied by a per-level learnable ``scales.{l}``) and
  ``centerness`` (1 logit), both 1x1 convs on the tower features, init N(0, 0.01), bias 0.
- Word-region alignment, exactly GLIP's dot-product token path: text states ``h`` [B, T, D] are
  zeroed at padding (``embedded = hidden * mask``), L2-normalised to ``e``; tokens are projected
  ``t = dot_product_projection_text(e / 2)`` (Linear(D, proj_dim)); region features are the tower
  features through ``dot_product_projection_image`` (Identity when ``proj_dim`` equals the tower
  width, as in GLIP; otherwise a 1x1 conv), *not* normalised; then
  ``logit[a, j] = <f_a, t_j> / exp(log_scale) + (e_j . bias_lang + bias0)``, clamped to +-5e4.
  ``log_scale`` starts at 0, ``bias_lang`` at 0 and ``bias0`` at ``-log((1 - p) / p)`` (p = 0.01).
  Padding tokens therefore get ``<f_a, b_text> + bias0``: meaningless values that the loss masks
  and that consumers must ignore (the runtime only reads tokens of a phrase).
- ``position_features`` (not in GLIP or FIBER; fiber-nano): two more channels on each side of the
  dot product. A location's are its anchor centre over the input width and height minus 0.5 (in
  [-0.5, 0.5]) times ``POSITION_SCALE``; a token's are ``(e_j / 2) @ position_text`` from its own
  normalised text state, ``position_text`` ``[D, 2]`` starting at zero (the head is unchanged until
  it learns). So ``logit[a, j] += POSITION_SCALE * <p_a, (e_j / 2) @ position_text>``: a token can
  prefer a side of the image. Region features are otherwise translation-equivariant, so identical
  twins score alike and "the red star left of the blue ring" or "the leftmost red star" is a coin
  toss between them (in the synthetic data a relation's target is also the extreme of its twins in
  that direction). The token side reads the text state, not the projected token: a first version
  that added ``p_a @ W`` to the region feature (so the token's direction was ``W t_j``) stayed at
  zero, the bilinear saddle of section 8 of docs/results.md (the projected tokens had no direction
  component for ``W`` to grow from, and ``W`` was zero for them to grow one).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fiber.box_ops import BoxCoder, make_anchors

LOGIT_CLAMP = 50000.0  # GLIP CLAMP_DOT_PRODUCT
POSITION_SCALE = 32.0  # position_features: the normalised centres [-0.5, 0.5] times this


@dataclass(frozen=True)
class GroundingOutput:
    """Dense predictions, flattened over FPN levels (level by level, row-major within a level).

    N = number of anchors, T = text length. Boxes are xyxy in network-input pixels.
    """
    box_deltas: torch.Tensor     # [B, N, 4] float32, BoxCoder deltas w.r.t. ``anchors``
    boxes: torch.Tensor          # [B, N, 4] float32, decoded xyxy pixels (not clipped)
    token_logits: torch.Tensor   # [B, N, T] float32, region-token alignment logits
    centerness: torch.Tensor     # [B, N] float32, centerness logits
    anchors: torch.Tensor        # [N, 4] float32, xyxy pixels, shared by the batch
    level_sizes: tuple[int, ...]  # anchors per level, sums to N (ATSS picks candidates per level)


class FPN(nn.Module):
    """Feature pyramid over image stages 2-4 -> ``[P3, P4, P5(, P6)]`` maps ``[B, C_out, H_l, W_l]``.

    ``in_channels``: channels of stages 2, 3, 4 (strides 8, 16, 32 for patch size 4).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, use_p6: bool = False,
                 use_p7: bool = False):
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"FPN: expected the channels of 3 image stages (2-4), got {tuple(in_channels)}")
        if use_p7 and not use_p6:
            raise ValueError("FPN: P7 is computed from P6 (use_p7 needs use_p6)")
        for level, c in zip((2, 3, 4), in_channels):
            setattr(self, f"fpn_inner{level}", _kaiming_conv(c, out_channels, 1))
            setattr(self, f"fpn_layer{level}", _kaiming_conv(out_channels, out_channels, 3))
        self.top_blocks = LastLevelP6(out_channels, use_p7) if use_p6 else None

    @property
    def num_levels(self) -> int:
        return 3 if self.top_blocks is None else 3 + self.top_blocks.num_levels

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``features``: stage 2, 3, 4 maps ``[B, C_s, H_s, W_s]`` -> list of ``[B, C_out, H, W]``."""
        c3, c4, c5 = features
        inner = self.fpn_inner4(c5)
        outs = [self.fpn_layer4(inner)]
        for lateral, inner_conv, layer_conv in ((c4, self.fpn_inner3, self.fpn_layer3),
                                                (c3, self.fpn_inner2, self.fpn_layer2)):
            lat = inner_conv(lateral)
            inner = lat + F.interpolate(inner, size=lat.shape[-2:], mode="nearest")
            outs.insert(0, layer_conv(inner))
        if self.top_blocks is not None:
            outs.extend(self.top_blocks(outs[-1]))
        return outs


class LastLevelP6(nn.Module):
    """P6 = 3x3 stride-2 conv on P5; with ``p7``, P7 = 3x3 stride-2 conv on ReLU(P6)
    (maskrcnn_benchmark ``LastLevelP6P7`` with equal in/out widths, so it reads P5, not C5)."""

    def __init__(self, channels: int, p7: bool = False):
        super().__init__()
        self.p6 = _kaiming_conv(channels, channels, 3, stride=2)
        self.p7 = _kaiming_conv(channels, channels, 3, stride=2) if p7 else None

    @property
    def num_levels(self) -> int:
        return 1 if self.p7 is None else 2

    def forward(self, p5: torch.Tensor) -> list[torch.Tensor]:
        """P5 [B, C, H, W] -> [P6] or [P6, P7]."""
        p6 = self.p6(p5)
        return [p6] if self.p7 is None else [p6, self.p7(F.relu(p6))]


class Scale(nn.Module):
    """A learnable scalar multiplier (``scale`` [1], init 1)."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class GroundingHead(nn.Module):
    """GLIP-style dense grounding head with a plain conv tower (see the module docstring).

    Args:
        in_channels: FPN width (also the tower width).
        text_dim: width D of the fused text states.
        strides: stride of each FPN level in input pixels, e.g. ``(8, 16, 32)``.
        num_convs, proj_dim, prior_prob, anchor_scale, gn_groups: see ``fiber.config.HeadConfig``.
    """

    def __init__(self, in_channels: int, text_dim: int, strides: Sequence[int], num_convs: int = 2,
                 proj_dim: int | None = None, prior_prob: float = 0.01, anchor_scale: float = 8.0,
                 gn_groups: int = 16, position_features: bool = False):
        super().__init__()
        if in_channels % gn_groups:
            raise ValueError(f"grounding head: {in_channels} channels not divisible by {gn_groups} GroupNorm groups")
        proj_dim = in_channels if proj_dim is None else proj_dim
        self.strides = tuple(int(s) for s in strides)
        self.anchor_scale = float(anchor_scale)
        self.box_coder = BoxCoder()
        self.tower = nn.Sequential(*[m for _ in range(num_convs) for m in (
            _normal_conv(in_channels, in_channels, 3), nn.GroupNorm(gn_groups, in_channels), nn.ReLU())])
        self.bbox_pred = _normal_conv(in_channels, 4, 1)
        self.centerness = _normal_conv(in_channels, 1, 1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])
        self.dot_product_projection_image = (nn.Identity() if proj_dim == in_channels
                                             else _normal_conv(in_channels, proj_dim, 1))
        self.dot_product_projection_text = nn.Linear(text_dim, proj_dim)
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.bias_lang = nn.Parameter(torch.zeros(text_dim))
        self.bias0 = nn.Parameter(torch.tensor([-math.log((1 - prior_prob) / prior_prob)]))
        self.position_text = nn.Parameter(torch.zeros(text_dim, 2)) if position_features else None
        # training only: a [B] bool mask of the samples whose gradient reaches position_text (set
        # by the training task per batch; None = every sample)
        self.position_grad_mask: torch.Tensor | None = None
        self.last_position_query: torch.Tensor | None = None  # training only: q [B, T, 2] of the last pass

    def forward(self, features: Sequence[torch.Tensor], text: torch.Tensor,
                attention_mask: torch.Tensor) -> GroundingOutput:
        """``features``: FPN maps ``[B, C, H_l, W_l]``; ``text`` fused states ``[B, T, D]`` float32;
        ``attention_mask`` ``[B, T]`` int64 (1 = token, 0 = padding)."""
        if len(features) != len(self.strides):
            raise ValueError(f"grounding head: {len(features)} feature maps for {len(self.strides)} strides")
        tokens, token_bias = self.project_text(text, attention_mask)
        deltas, ctr, regions, sizes = [], [], [], []
        for level, x in enumerate(features):
            x = self.tower(x)
            deltas.append(_flatten(self.scales[level](self.bbox_pred(x))))         # [B, HW, 4]
            ctr.append(_flatten(self.centerness(x)))                                # [B, HW, 1]
            regions.append(_flatten(self.dot_product_projection_image(x)))          # [B, HW, P]
            sizes.append((x.shape[-2], x.shape[-1]))
        box_deltas = torch.cat(deltas, dim=1)
        regions = torch.cat(regions, dim=1)                                         # [B, N, P]
        anchors = make_anchors(sizes, self.strides, self.anchor_scale, box_deltas.device, box_deltas.dtype)
        logits = alignment_logits(regions, tokens, token_bias, self.log_scale)      # [B, N, T]
        if self.position_text is not None:
            logits = logits + self.position_logits(anchors, sizes[0], text, attention_mask).to(logits.dtype)
        return GroundingOutput(
            box_deltas=box_deltas,
            boxes=self.box_coder.decode(box_deltas, anchors),
            token_logits=logits,
            centerness=torch.cat(ctr, dim=1).squeeze(-1),
            anchors=anchors,
            level_sizes=tuple(int(h) * int(w) for h, w in sizes),
        )

    def position_logits(self, anchors: torch.Tensor, first_size: tuple[int, int], text: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        """``POSITION_SCALE * <p_a, (e_j / 2) @ position_text>`` ``[B, N, T]``: ``p_a`` the anchor
        centres over the input size (level 0's grid times its stride) minus 0.5, ``e_j`` the
        normalised text states (zero at padding), as in ``project_text``."""
        h, w = first_size[0] * self.strides[0], first_size[1] * self.strides[0]
        centre = (anchors[:, :2] + anchors[:, 2:]) / 2
        p = centre / torch.tensor([w, h], dtype=centre.dtype, device=centre.device) - 0.5   # [N, 2]
        e = F.normalize(text * attention_mask.unsqueeze(-1).to(text.dtype), p=2, dim=-1)
        q = (e / 2.0) @ self.position_text.to(e.dtype)                                    # [B, T, 2]
        if self.training:
            self.last_position_query = q
        if self.training and self.position_grad_mask is not None:
            q = torch.where(self.position_grad_mask.to(q.device)[:, None, None], q, q.detach())
        return POSITION_SCALE * torch.matmul(p.to(q.dtype), q.transpose(1, 2))             # [B, N, T]

    def project_text(self, text: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused text ``[B, T, D]`` -> projected tokens ``[B, T, P]`` and per-token bias ``[B, T]``."""
        return project_text(text, attention_mask, self.dot_product_projection_text, self.bias_lang, self.bias0)


def project_text(text: torch.Tensor, attention_mask: torch.Tensor, projection: nn.Module,
                 bias_lang: torch.Tensor, bias0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GLIP's token side of the alignment: ``e = normalize(text * mask)`` (a zero row stays 0),
    tokens ``projection(e / 2)`` ``[B, T, P]`` and per-token bias ``e . bias_lang + bias0`` ``[B, T]``."""
    embedded = text * attention_mask.unsqueeze(-1).to(text.dtype)
    e = F.normalize(embedded, p=2, dim=-1)
    tokens = projection(e / 2.0)
    return tokens, torch.matmul(e, bias_lang) + bias0


def alignment_logits(regions: torch.Tensor, tokens: torch.Tensor, token_bias: torch.Tensor,
                     log_scale: torch.Tensor, clamp: float = LOGIT_CLAMP) -> torch.Tensor:
    """``<region, token> / exp(log_scale) + token_bias``, clamped to +-``clamp``:
    regions ``[B, N, P]``, tokens ``[B, T, P]``, token_bias ``[B, T]`` -> ``[B, N, T]``."""
    logits = torch.matmul(regions, tokens.transpose(1, 2)) / log_scale.exp() + token_bias[:, None, :]
    return logits.clamp(min=-clamp, max=clamp)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]`` (row-major locations, as the anchors)."""
    return x.flatten(2).transpose(1, 2)


def _kaiming_conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    """maskrcnn_benchmark ``conv_with_kaiming_uniform``: kaiming_uniform(a=1), bias 0."""
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)
    return conv


def _normal_conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    """GLIP head init: N(0, 0.01) weights, bias 0."""
    conv = nn.Conv2d(cin, cout, k, padding=k // 2)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


def stage_channels(embed_dim: int) -> tuple[int, int, int]:
    """Swin channels of stages 2, 3, 4 for a given ``embed_dim``."""
    return (embed_dim * 2, embed_dim * 4, embed_dim * 8)


def fpn_strides(patch_size: int, use_p6: bool, use_p7: bool = False) -> tuple[int, ...]:
    """Strides of P3..P5(, P6(, P7)) for a Swin with ``patch_size`` (4 -> 8, 16, 32(, 64(, 128)))."""
    extra = (2 if use_p7 else 1) if use_p6 else 0
    return tuple(patch_size * 2 ** (k + 1) for k in range(3 + extra))


def build_fpn(cfg) -> FPN:
    """FPN for a ``ModelConfig`` (reads ``cfg.swin.embed_dim`` and ``cfg.head``)."""
    opts = cfg.head
    return FPN(stage_channels(cfg.swin.embed_dim), opts.fpn_channels, opts.use_p6, opts.use_p7)


def build_grounding_head(cfg) -> GroundingHead:
    """Grounding head for a ``ModelConfig`` (text width ``cfg.text.hidden_size``)."""
    opts = cfg.head
    return GroundingHead(
        in_channels=opts.fpn_channels, text_dim=cfg.text.hidden_size,
        strides=fpn_strides(cfg.swin.patch_size, opts.use_p6, opts.use_p7), num_convs=opts.num_convs,
        proj_dim=opts.proj_dim, prior_prob=opts.prior_prob, anchor_scale=opts.anchor_scale,
        gn_groups=opts.gn_groups, position_features=opts.position_features)
