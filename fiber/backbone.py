"""FusedBackbone: Swin + text encoder with FIBER's fusion in the backbone (docs/architecture.md, "Model").

Parameter prefixes inside a composite model that holds this as ``backbone``: ``backbone.image.``
(official ``vit_model.``) and ``backbone.text.`` (official ``text_transformer.``).

Schedule (parallel co-attention, PROVENANCE.md §4): the image runs patch embedding, stages 1-2 and
the plain stage-3 blocks; the text runs embeddings and the plain layers (the *prefix*, what
``text.onnx`` computes). Then for each pair k the fused image block reads the text state that is
the input of the paired text layer, and the text layer reads the image tokens that are the input
of the paired block; both are updated together. A stage-4 pair reads the post-merge tokens.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fiber.config import ModelConfig
from fiber.layers import extended_mask
from fiber.swin import SwinTransformer
from fiber.text import TextEncoder


class FusedOutput(NamedTuple):
    """image_stages: 4 maps [B, C_s, H_s, W_s] float32 (stages 1-4, strides 4/8/16/32);
    text: [B, T, D] float32 fused text states (padding positions hold values too)."""
    image_stages: list[torch.Tensor]
    text: torch.Tensor


class FusedBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        pairs = cfg.pairs()
        dims = cfg.swin.stage_dims
        self.image = SwinTransformer(cfg.swin, text_dim=cfg.text.hidden_size,
                                     fused_blocks=tuple((s, b) for s, b, _ in pairs),
                                     i2t_prenorm=cfg.fusion.i2t_prenorm)
        self.text = TextEncoder(cfg.text, fused_layers={t: dims[s] for s, _, t in pairs},
                                t2i_norm=cfg.fusion.t2i_norm)
        # (stage, block) -> text layer index, for the fused schedule
        self._pair_of = {(s, b): t for s, b, t in pairs}

    # -- text prefix ----------------------------------------------------------------------
    def encode_text_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeddings + the text layers below the first fused layer (what ``text.onnx`` computes).

        input_ids, attention_mask: int64 [B, T] (mask 1 = real token). Returns float32 [B, T, D].
        """
        self.text.check_inputs(input_ids, attention_mask)
        h = self.text.embeddings(input_ids)
        mask = extended_mask(attention_mask, h.dtype)
        for layer in self.text.layers[:self.cfg.first_fused_text_layer]:
            h = layer(h, mask)
        return h

    # -- fused path -------------------------------------------------------------------------
    def forward_fused(self, image: torch.Tensor, text_prefix: torch.Tensor,
                      attention_mask: torch.Tensor, final_norms: bool = True) -> FusedOutput:
        """image: float32 [B, 3, S, S] (normalised; any [B, 3, H, W] under the "fixed-pad" window
        rule); text_prefix: [B, T, D] from
        ``encode_text_prefix``; attention_mask: int64 [B, T].

        ``final_norms=True``: stages 2-4 go through ``norm1..norm3`` and every text LayerNorm is
        applied. ``False`` reproduces the coarse ``infer`` quirk: raw stage outputs and no
        ``output.LayerNorm`` on the last text layer.
        """
        self.image.check_image(image)
        mask = extended_mask(attention_mask, text_prefix.dtype)
        last_layer = self.cfg.text.num_layers - 1
        (x, hw), t = self.image.embed(image), text_prefix
        maps = []
        for s, stage in enumerate(self.image.layers):
            for b, block in enumerate(stage.blocks):
                layer_idx = self._pair_of.get((s, b))
                if layer_idx is None:
                    x = block(x, hw=hw)
                    continue
                layer = self.text.layers[layer_idx]
                last_norm = final_norms or layer_idx != last_layer
                x, t = block(x, t, mask, hw=hw), layer(t, mask, image=x, last_norm=last_norm)
            out = self.image.stage_norm(s, x) if final_norms else x
            maps.append(self.image.to_map(out, s, hw))
            x, hw = self.image.merge(s, x, hw)
        return FusedOutput(maps, t)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                final_norms: bool = True) -> FusedOutput:
        """Whole fused pass: ``forward_fused(image, encode_text_prefix(ids, mask), mask)``."""
        prefix = self.encode_text_prefix(input_ids, attention_mask)
        return self.forward_fused(image, prefix, attention_mask, final_norms)

    # -- unimodal paths (ITC) ---------------------------------------------------------------
    def forward_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Swin alone, i2t skipped, stage norms applied: 4 maps [B, C_s, H_s, W_s]."""
        return self.image(image)

    def forward_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text encoder alone, t2i skipped, every LayerNorm applied: [B, T, D]."""
        return self.text(input_ids, attention_mask)

    # -- helpers ----------------------------------------------------------------------------
    def fusion_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every fusion parameter (names containing ``i2t`` / ``t2i``)."""
        return [(n, p) for n, p in self.named_parameters() if "i2t" in n or "t2i" in n]

    def set_gates(self, value: float) -> None:
        """Fill every ``alpha_i2t`` / ``alpha_t2i`` with ``value`` (tests, ablations)."""
        with torch.no_grad():
            for name, p in self.fusion_parameters():
                if name.endswith(("alpha_i2t", "alpha_t2i")):
                    p.fill_(value)


def build_backbone(cfg: ModelConfig) -> FusedBackbone:
    return FusedBackbone(cfg)
