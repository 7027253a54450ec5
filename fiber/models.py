"""The two composite FIBER models: stage-1 pre-training and stage-2 grounding.

- ``FiberForPretraining(cfg)``: ``backbone.*`` + the coarse heads at the top level with the official
  names (``cross_modal_*``, ``itm_score.fc``, ``mlm_score.*``, ``temp``, queues). Its ``forward``
  runs the three coarse passes and returns a ``PretrainOutput``; ``pretraining_losses`` (pure) turns
  that into the losses. The fused passes use ``final_norms=False`` (the official coarse ``infer``).
- ``FiberForGrounding(cfg)``: ``backbone.*`` + ``fpn.*`` + ``head.*``. ``encode_text`` is what
  ``text.onnx`` computes, ``detect`` what ``detector.onnx`` computes (``final_norms=True``);
  ``forward`` = both, returning a ``GroundingOutput`` for ``fiber.losses.GroundingLoss``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from fiber.backbone import FusedOutput, build_backbone
from fiber.config import ModelConfig
from fiber.heads.coarse import CoarseHeads
from fiber.heads.dyhead import build_dyhead
from fiber.heads.grounding import GroundingOutput, build_fpn, build_grounding_head, fpn_strides
from fiber.losses import itc_loss, itm_labels, itm_loss, mlm_loss, sample_hard_negatives


def _tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]``."""
    return feature_map.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------- stage 1

@dataclass(frozen=True)
class PretrainOutput:
    """What the three coarse losses need (B pairs, D = text width, Q = filled queue length)."""
    image_feat: torch.Tensor     # [B, D] L2-normalised unfused image feature (ITC)
    text_feat: torch.Tensor      # [B, D] L2-normalised unfused text feature (ITC)
    temp: torch.Tensor           # [] clamped temperature
    image_queue: torch.Tensor    # [D, Q] queue contents *before* this batch was enqueued
    text_queue: torch.Tensor     # [D, Q]
    itm_logits: torch.Tensor     # [3B, 2] fused pairs: positives, (image, neg text), (neg image, text)
    itm_labels: torch.Tensor     # [3B] int64, 1 for the first B
    mlm_logits: torch.Tensor | None  # [B, T, V] on the masked text, or None without MLM input


class FiberForPretraining(CoarseHeads):
    """FusedBackbone + coarse heads (ITC, ITM with in-batch hard negatives, MLM)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(text_dim=cfg.text.hidden_size, image_dim=cfg.swin.stage_dims[-1],
                         vocab_size=cfg.text.vocab_size, queue_size=cfg.head.queue_size,
                         layer_norm_eps=cfg.text.layer_norm_eps)
        self.cfg = cfg
        self.backbone = build_backbone(cfg)

    def itc_features(self, image: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unimodal passes -> L2-normalised ``(image_feat [B, D], text_feat [B, D])``."""
        image_tokens = _tokens(self.backbone.forward_image(image)[-1])
        text = self.backbone.forward_text(input_ids, attention_mask)
        return self.itc_image_feat(image_tokens), self.itc_text_feat(text)

    def fused(self, image: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse fused pass -> ``(text [B, T, D], image tokens [B, L4, C4])`` (no final norms)."""
        out = self.backbone(image, input_ids, attention_mask, final_norms=False)
        return out.text, _tokens(out.image_stages[-1])

    def itm_forward(self, image: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits ``[B, 2]`` of the given (image, text) pairs."""
        text, image_tokens = self.fused(image, input_ids, attention_mask)
        return self.itm_logits(text, image_tokens)

    def mlm_forward(self, image: torch.Tensor, masked_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
        """MLM logits ``[B, T, V]`` of the masked text fused with its image."""
        text, _ = self.fused(image, masked_ids, attention_mask)
        return self.mlm_logits(text)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                mlm_input_ids: torch.Tensor | None = None, generator: torch.Generator | None = None,
                update_queue: bool | None = None) -> PretrainOutput:
        """One coarse step's forward (a single call, so DDP sees every head used).

        Args:
            image: float32 ``[B, 3, S, S]``; input_ids / attention_mask: int64 ``[B, T]``.
            mlm_input_ids: the masked ids (``fiber.losses.mask_tokens_for_mlm``) or None (no MLM).
            generator: RNG for the hard-negative sampling.
            update_queue: enqueue this batch's ITC features (default: ``self.training``).
        """
        image_feat, text_feat = self.itc_features(image, input_ids, attention_mask)
        temp = self.clamped_temp()
        image_queue, text_queue = self.queue_contents()
        with torch.no_grad():
            _, sim_i2t, sim_t2i = itc_loss(image_feat, text_feat, temp)
        text_neg, image_neg = sample_hard_negatives(sim_i2t, sim_t2i, generator)
        pair_image = torch.cat([image, image, image[image_neg]], dim=0)
        pair_ids = torch.cat([input_ids, input_ids[text_neg], input_ids], dim=0)
        pair_mask = torch.cat([attention_mask, attention_mask[text_neg], attention_mask], dim=0)
        logits = self.itm_forward(pair_image, pair_ids, pair_mask)
        mlm = None if mlm_input_ids is None else self.mlm_forward(image, mlm_input_ids, attention_mask)
        if self.training if update_queue is None else update_queue:
            self.enqueue(image_feat, text_feat)
        return PretrainOutput(image_feat, text_feat, temp, image_queue, text_queue, logits,
                              itm_labels(image.shape[0], image.device), mlm)


def pretraining_losses(out: PretrainOutput, mlm_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Pure function: ``{"loss_itc", "loss_itm", ["loss_mlm"], "loss"}`` (equal weights, as official)."""
    losses = {"loss_itc": itc_loss(out.image_feat, out.text_feat, out.temp, out.image_queue, out.text_queue)[0],
              "loss_itm": itm_loss(out.itm_logits, out.itm_labels)}
    if out.mlm_logits is not None:
        if mlm_labels is None:
            raise ValueError("pretraining losses: MLM logits given but no mlm_labels")
        losses["loss_mlm"] = mlm_loss(out.mlm_logits, mlm_labels)
    losses["loss"] = sum(losses.values())
    return losses


# ----------------------------------------------------------------------------- stage 2

class GroundingFeatures(NamedTuple):
    """What the grounding head reads: the FPN levels and the head's text input.

    levels: FPN maps ``[B, C_fpn, H_l, W_l]``, P3 first (strides 8, 16, 32(, 64(, 128))).
    embedded: ``[B, T, D]`` fused text states x attention mask (padding rows 0; the official
    language backbone's ``embedded``). fused: the backbone's ``FusedOutput`` (Swin stages, text)."""
    levels: list[torch.Tensor]
    embedded: torch.Tensor
    fused: FusedOutput


class FiberForGrounding(nn.Module):
    """FusedBackbone + FPN + grounding head (``backbone.*``, ``fpn.*``, ``head.*``); the head is the
    official DyHead when ``cfg.head.kind == "dyhead"`` (fiber.heads.dyhead, official ``rpn.head.*``
    names), the light conv tower otherwise (fiber.heads.grounding). Both return a ``GroundingOutput``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.fpn = build_fpn(cfg)
        self.head = build_dyhead(cfg) if cfg.head.kind == "dyhead" else build_grounding_head(cfg)

    def level_sizes(self, height: int, width: int) -> tuple[int, ...]:
        """Anchors per FPN level (P3 first) for an input of ``height x width`` pixels: the
        per-level split of the detector's N outputs that the official per-level pre-NMS top-N needs.
        Every level halves its input with rounding up (Swin pads odd grids, the P6/P7 convs have
        stride 2 and padding 1), so level l has ceil(H / s_l) x ceil(W / s_l) locations."""
        strides = fpn_strides(self.cfg.swin.patch_size, self.cfg.head.use_p6, self.cfg.head.use_p7)
        return tuple(-(-height // s) * -(-width // s) for s in strides)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """int64 ``[B, T]`` ids and mask -> ``text_hidden`` float32 ``[B, T, D]`` (``text.onnx``)."""
        return self.backbone.encode_text_prefix(input_ids, attention_mask)

    def forward_from_text(self, image: torch.Tensor, text_hidden: torch.Tensor,
                          attention_mask: torch.Tensor) -> GroundingOutput:
        """Image ``[B, 3, S, S]`` + cached ``text_hidden`` ``[B, T, D]`` -> ``GroundingOutput``."""
        return self.forward_with_features(image, text_hidden, attention_mask)[0]

    def forward_with_features(self, image: torch.Tensor, text_hidden: torch.Tensor,
                              attention_mask: torch.Tensor) -> tuple[GroundingOutput, FusedOutput]:
        """``forward_from_text`` that also returns the backbone's ``FusedOutput`` (the fused image
        stages and text states that feature distillation reads)."""
        levels, fused = self._levels(image, text_hidden, attention_mask)
        return self.head(levels, fused.text, attention_mask), fused

    def forward_features(self, image: torch.Tensor, text_hidden: torch.Tensor,
                         attention_mask: torch.Tensor) -> GroundingFeatures:
        """Fused backbone (every norm applied) + FPN: the head's inputs, ``GroundingFeatures``."""
        levels, fused = self._levels(image, text_hidden, attention_mask)
        embedded = fused.text * attention_mask.unsqueeze(-1).to(fused.text.dtype)
        return GroundingFeatures(levels, embedded, fused)

    def _levels(self, image: torch.Tensor, text_hidden: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[list[torch.Tensor], FusedOutput]:
        fused = self.backbone.forward_fused(image, text_hidden, attention_mask, final_norms=True)
        return self.fpn(fused.image_stages[1:]), fused

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> GroundingOutput:
        """Training forward: ``forward_from_text(image, encode_text(ids, mask), mask)``."""
        return self.forward_from_text(image, self.encode_text(input_ids, attention_mask), attention_mask)

    def detect(self, image: torch.Tensor, text_hidden: torch.Tensor, attention_mask: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What ``detector.onnx`` computes: ``(boxes [B, N, 4] xyxy network pixels,
        token_logits [B, N, T], centerness [B, N] logits)``."""
        out = self.forward_from_text(image, text_hidden, attention_mask)
        return out.boxes, out.token_logits, out.centerness

    def text_graph(self) -> nn.Module:
        """A module whose ``forward(input_ids, attention_mask)`` is ``encode_text`` (for export)."""
        return _Bound(self, "encode_text")

    def detector_graph(self) -> nn.Module:
        """A module whose ``forward(image, text_hidden, attention_mask)`` is ``detect`` (for export)."""
        return _Bound(self, "detect")


class _Bound(nn.Module):
    """Exposes one method of a model as ``forward`` (``torch.onnx.export`` calls ``forward``).

    Starts in the model's own train/eval mode: the exporter puts the wrapper's mode back onto the
    whole model afterwards, so a wrapper in the default train mode would switch dropout on.
    """

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method
        self.train(model.training)

    def forward(self, *args: torch.Tensor):
        return getattr(self.model, self.method)(*args)


def build_model(cfg: ModelConfig, task: str) -> nn.Module:
    """``task``: ``"coarse"`` -> ``FiberForPretraining``; ``"fine"`` -> ``FiberForGrounding``."""
    if task == "coarse":
        return FiberForPretraining(cfg)
    if task == "fine":
        return FiberForGrounding(cfg)
    raise ValueError(f"unknown model task '{task}'; known: coarse, fine")
