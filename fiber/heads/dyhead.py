"""FIBER's fine-grained head: GLIP's ``VLDyHead`` as FIBER configures it (golden/fine README D2-E4).

Parameter names are the official ``rpn.head.*`` names under ``head.`` (``convert-official`` maps
them by prefix): ``dyhead_tower.{0..5}.{DyConv.{0,1,2}.{conv,bn}, AttnConv.1, offset, relu.fc.{0,2}}``,
``cls_logits``, ``bbox_pred``, ``centerness``, ``dot_product_projection_text``, ``scales.{l}.scale``,
``log_scale``, ``bias_lang``, ``bias0``.

- **DyConv block** (x6, no fusion inside the head): every level ``l`` reads the block's *input*
  levels. ``om = offset(X_l)`` (3x3 conv, 27 channels): offsets ``om[:, :18]`` ((dy, dx) per tap),
  mask ``sigmoid(om[:, 18:])``. Branches, each a modulated deformable 3x3 conv + GroupNorm, all with
  level l's offsets/mask: ``DyConv.1(X_l)``; ``DyConv.2(X_{l-1})`` at stride 2 (l > 0);
  ``DyConv.0(X_{l+1})`` (l < last), upsampled to X_l's size (bilinear, align_corners=True). The
  last branch gets offsets of X_l's (larger) size and reads them as flat memory with its own output
  shape (``fiber.deform.flat_offsets``, README D3): the official CUDA kernel does that.
- **Scale attention**: per branch ``h_sigmoid(ReLU(AttnConv.1(GAP(F))))`` (one scalar per image,
  weights shared across branches); the level output is the mean of ``F * a`` over branches.
- **DyReLU**: ``y = h_sigmoid(fc(GAP(x)))`` split into a1, b1, a2, b2;
  ``max(x ((a1 - .5) 2 + 1) + (b1 - .5), x ((a2 - .5) 2) + (b2 - .5))``.
- **Predictors**: ``bbox_pred`` x ``scales[l]``, ``centerness``, and the dot-product token logits
  of ``fiber.heads.grounding`` (``alignment_logits``; the image projection is an Identity).
  ``cls_logits`` (``num_classes`` outputs, frozen) is kept so official checkpoints load whole; it is
  never computed (the official loss multiplies it by 0) and only sets the number of score columns
  of the official post-processor.
- **Anchors / box coder**: one anchor per location, side ``anchor_scale x stride``, with the
  inclusive-pixel (+1) conventions (``pixel_offset=1`` in ``fiber.box_ops``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fiber.box_ops import BoxCoder, make_anchors
from fiber.deform import ModulatedDeformConv, flat_offsets
from fiber.heads.grounding import (LOGIT_CLAMP, GroundingOutput, Scale, _flatten, alignment_logits,
                                   fpn_strides, project_text)

PIXEL_OFFSET = 1.0  # the official +1 box conventions (maskrcnn_benchmark TO_REMOVE)


class HSigmoid(nn.Module):
    """``relu6(x + 3) / 6``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3) / 6


class DyReLU(nn.Module):
    """Dynamic ReLU (K = 2 with bias): ``fc`` = Linear(C, C/4), ReLU, Linear(C/4, 4C), h_sigmoid."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(),
                                nn.Linear(channels // reduction, 4 * channels), HSigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.mean(dim=(2, 3)))[:, :, None, None]                            # [B, 4C, 1, 1]
        a1, b1, a2, b2 = torch.split(y, self.channels, dim=1)
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        return torch.max(x * a1 + (b1 - 0.5), x * a2 + (b2 - 0.5))


class Conv3x3Norm(nn.Module):
    """Modulated deformable 3x3 conv (padding 1, bias) + GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, gn_groups: int):
        super().__init__()
        self.conv = ModulatedDeformConv(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn = nn.GroupNorm(gn_groups, out_channels)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x, offset, mask))


class DyConv(nn.Module):
    """One DyHead block over all levels: ``forward([X_l [B, C, H_l, W_l]]) -> [Y_l]`` (same shapes)."""

    def __init__(self, channels: int, gn_groups: int):
        super().__init__()
        self.DyConv = nn.ModuleList([Conv3x3Norm(channels, channels, 1, gn_groups),
                                     Conv3x3Norm(channels, channels, 1, gn_groups),
                                     Conv3x3Norm(channels, channels, 2, gn_groups)])
        self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, 1), nn.ReLU())
        self.h_sigmoid = HSigmoid()
        self.relu = DyReLU(channels)
        self.offset = nn.Conv2d(channels, 27, 3, padding=1)  # PyTorch's default init, as official
        for m in [*self.DyConv.modules(), *self.AttnConv.modules()]:
            if isinstance(m, nn.Conv2d):  # GLIP's init_weights (the deformable convs are not nn.Conv2d)
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for level, x in enumerate(feats):
            om = self.offset(x)
            offset, mask = om[:, :18], om[:, 18:].sigmoid()
            branches = [self.DyConv[1](x, offset, mask)]
            if level > 0:
                branches.append(self.DyConv[2](feats[level - 1], offset, mask))
            if level < len(feats) - 1:
                nxt = feats[level + 1]
                conv = self.DyConv[0]
                ho, wo = conv.conv.output_hw(nxt.shape[-2], nxt.shape[-1])
                y = conv(nxt, flat_offsets(offset, ho, wo), flat_offsets(mask, ho, wo))
                branches.append(F.interpolate(y, size=(x.shape[-2], x.shape[-1]), mode="bilinear",
                                              align_corners=True))
            attn = self.h_sigmoid(torch.stack([self.AttnConv(f) for f in branches]))  # [n, B, 1, 1, 1]
            out.append(torch.mean(torch.stack(branches) * attn, dim=0))
        return [self.relu(y) for y in out]


class DyHead(nn.Module):
    """The official FIBER fine head (module docstring) -> ``GroundingOutput``.

    Args:
        channels: FPN / tower width (FIBER-B 256); also the token projection width.
        text_dim: width of the text states (``LANG_DIM``).
        strides: stride of each FPN level (P3-P7: 8, 16, 32, 64, 128).
        num_blocks: DyConv blocks (6); gn_groups: GroupNorm groups (16).
        num_classes: ``cls_logits`` outputs (``DYHEAD.NUM_CLASSES - 1``, 80).
        prior_prob: ``bias0`` and ``cls_logits`` bias init ``-log((1 - p) / p)``.
        log_scale: ``log_scale`` init (``DYHEAD.LOG_SCALE``, 0); clamp: logit clamp (5e4).
        anchor_scale: anchor side / stride (8).
    """

    def __init__(self, channels: int, text_dim: int, strides: Sequence[int], num_blocks: int = 6,
                 gn_groups: int = 16, num_classes: int = 80, prior_prob: float = 0.01,
                 log_scale: float = 0.0, clamp: float = LOGIT_CLAMP, anchor_scale: float = 8.0):
        super().__init__()
        if channels % gn_groups:
            raise ValueError(f"DyHead: {channels} channels not divisible by {gn_groups} GroupNorm groups")
        if channels % 4:
            raise ValueError(f"DyHead: {channels} channels not divisible by DyReLU's reduction 4")
        self.strides = tuple(int(s) for s in strides)
        self.anchor_scale = float(anchor_scale)
        self.clamp = float(clamp)
        self.box_coder = BoxCoder(pixel_offset=PIXEL_OFFSET)
        self.dyhead_tower = nn.Sequential(*[DyConv(channels, gn_groups) for _ in range(num_blocks)])
        bias_value = -math.log((1 - prior_prob) / prior_prob)
        self.cls_logits = nn.Conv2d(channels, num_classes, 1)
        self.bbox_pred = nn.Conv2d(channels, 4, 1)
        self.centerness = nn.Conv2d(channels, 1, 1)
        for conv in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, bias_value)
        self.cls_logits.requires_grad_(False)  # x0 in the official loss; never scored
        self.dot_product_projection_image = nn.Identity()
        self.dot_product_projection_text = nn.Linear(text_dim, channels)
        self.log_scale = nn.Parameter(torch.tensor([float(log_scale)]))
        self.bias_lang = nn.Parameter(torch.zeros(text_dim))
        self.bias0 = nn.Parameter(torch.tensor([bias_value]))
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])

    def tower(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """FPN maps ``[B, C, H_l, W_l]`` -> the 6-block tower's output maps (same shapes)."""
        return self.dyhead_tower(list(features))

    def forward(self, features: Sequence[torch.Tensor], text: torch.Tensor,
                attention_mask: torch.Tensor) -> GroundingOutput:
        """``features``: FPN maps P3..P7 ``[B, C, H_l, W_l]``; ``text`` final text states ``[B, T, D]``
        (multiplied by the mask here: the official ``embedded``); ``attention_mask`` ``[B, T]``."""
        if len(features) != len(self.strides):
            raise ValueError(f"DyHead: {len(features)} feature maps for {len(self.strides)} strides")
        tokens, token_bias = project_text(text, attention_mask, self.dot_product_projection_text,
                                          self.bias_lang, self.bias0)
        deltas, ctr, regions, sizes = [], [], [], []
        for level, x in enumerate(self.tower(features)):
            deltas.append(_flatten(self.scales[level](self.bbox_pred(x))))            # [B, HW, 4]
            ctr.append(_flatten(self.centerness(x)))                                   # [B, HW, 1]
            regions.append(_flatten(self.dot_product_projection_image(x)))             # [B, HW, C]
            sizes.append((x.shape[-2], x.shape[-1]))
        box_deltas = torch.cat(deltas, dim=1)
        logits = alignment_logits(torch.cat(regions, dim=1), tokens, token_bias, self.log_scale, self.clamp)
        anchors = make_anchors(sizes, self.strides, self.anchor_scale, box_deltas.device, box_deltas.dtype,
                               pixel_offset=PIXEL_OFFSET)
        return GroundingOutput(
            box_deltas=box_deltas,
            boxes=self.box_coder.decode(box_deltas, anchors),
            token_logits=logits,
            centerness=torch.cat(ctr, dim=1).squeeze(-1),
            anchors=anchors,
            level_sizes=tuple(int(h) * int(w) for h, w in sizes),
        )



def build_dyhead(cfg) -> DyHead:
    """The DyHead of a ``ModelConfig`` whose ``head.kind`` is "dyhead" (levels P3..P5(, P6(, P7)))."""
    h = cfg.head
    return DyHead(channels=h.fpn_channels, text_dim=cfg.text.hidden_size,
                  strides=fpn_strides(cfg.swin.patch_size, h.use_p6, h.use_p7), num_blocks=h.num_convs,
                  gn_groups=h.gn_groups, num_classes=h.num_classes, prior_prob=h.prior_prob,
                  log_scale=h.log_scale, clamp=h.logit_clamp, anchor_scale=h.anchor_scale)
