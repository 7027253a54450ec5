"""BERT/RoBERTa-style post-LN text encoder with FIBER's text->image (t2i) fusion in the top layers.

Parameter names follow Hugging Face / the official checkpoints (``text_transformer.*``, fiber.md §6)
under the prefix ``backbone.text.``. The pooler is not part of the encoder (FIBER's heads have
their own); the converter drops the official one.

t2i semantics (tests/data/golden/PROVENANCE.md §4): the query is the raw self-attention output
(``attention.output.dense``, before residual and LayerNorm), keys/values are the image tokens that
are the *input* of the paired Swin block, no image mask; ``a = a + alpha_t2i * t2i(a, img)``, then
the residual + ``attention.output.LayerNorm``. ``crossattention_t2i.output.LayerNorm`` exists so
official coarse keys load, and is unused; the fine layouts have no such tensor (``t2i_norm=False``,
``FusionConfig.t2i_norm``). The same layer serves the fine model (golden/fine README §4 C3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fiber.config import TextConfig
from fiber.layers import QKVAttention, extended_mask


class TextEmbeddings(nn.Module):
    """word + position + token_type[0], LayerNorm, dropout: ids int64 [B, T] -> [B, T, D]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id)
        pos_pad = cfg.pad_token_id if cfg.position_style == "roberta" else None
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, d, padding_idx=pos_pad)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """int64 [B, T]. "bert": 0..T-1. "roberta": pad + cumulative count of non-pad tokens, and
        pad tokens get pad (so positions start at pad + 1)."""
        if self.cfg.position_style == "roberta":
            real = input_ids.ne(self.cfg.pad_token_id).long()
            return torch.cumsum(real, dim=1) * real + self.cfg.pad_token_id
        return torch.cumsum(torch.ones_like(input_ids), dim=1) - 1

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = (self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids(input_ids))
             + self.token_type_embeddings.weight[0])
        return self.dropout(self.LayerNorm(x))


class DenseOutput(nn.Module):
    """``dense`` + dropout, and a ``LayerNorm`` the caller applies (BERT's *Output modules);
    ``norm=False``: no LayerNorm at all (the fine ``crossattention_t2i``)."""

    def __init__(self, d_in: int, d_out: int, eps: float, dropout: float, norm: bool = True):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps) if norm else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(x))


class Attention(nn.Module):
    """``self`` (query/key/value) + ``output`` (dense, LayerNorm); used for self- and t2i attention."""

    def __init__(self, cfg: TextConfig, kv_dim: int | None = None, output_norm: bool = True):
        super().__init__()
        d = cfg.hidden_size
        self.self = QKVAttention(d, cfg.num_heads, kv_dim, attn_drop=cfg.dropout)
        self.output = DenseOutput(d, d, cfg.layer_norm_eps, cfg.dropout, output_norm)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention + output dense (no residual, no LayerNorm). x: [B, T, D] -> [B, T, D]."""
        return self.output(self.self(x, context, mask))


class Intermediate(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class TextLayer(nn.Module):
    """Post-LN transformer layer; ``image_dim`` set = fused layer with ``crossattention_t2i``
    (``t2i_norm``: whether it carries the unused ``output.LayerNorm`` of the coarse layout)."""

    def __init__(self, cfg: TextConfig, image_dim: int | None = None, t2i_norm: bool = True):
        super().__init__()
        self.attention = Attention(cfg)
        self.fused = image_dim is not None
        if self.fused:
            self.crossattention_t2i = Attention(cfg, kv_dim=image_dim, output_norm=t2i_norm)
            self.alpha_t2i = nn.Parameter(torch.zeros(1))
        self.intermediate = Intermediate(cfg.hidden_size, cfg.intermediate_size)
        self.output = DenseOutput(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, image: torch.Tensor | None = None,
                last_norm: bool = True) -> torch.Tensor:
        """h: [B, T, D]; mask: additive [B, 1, 1, T]; image: [B, L, C_img] (input tokens of the
        paired Swin block) or None for the unimodal path. ``last_norm=False`` skips
        ``output.LayerNorm`` (the coarse fused-path quirk). Returns [B, T, D]."""
        a = self.attention(h, mask=mask)
        if image is not None and self.fused:
            a = a + self.alpha_t2i * self.crossattention_t2i(a, context=image)
        a = self.attention.output.LayerNorm(a + h)
        out = self.output(self.intermediate(a)) + a
        return self.output.LayerNorm(out) if last_norm else out


class Encoder(nn.Module):
    def __init__(self, layers: list[TextLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TextEncoder(nn.Module):
    """Embeddings + ``encoder.layer.{i}``. ``fused_layers`` maps a layer index to the image width
    its t2i keys/values read; ``t2i_norm`` see ``TextLayer``."""

    def __init__(self, cfg: TextConfig, fused_layers: dict[int, int] | None = None, t2i_norm: bool = True):
        super().__init__()
        fused_layers = fused_layers or {}
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder([TextLayer(cfg, fused_layers.get(i), t2i_norm) for i in range(cfg.num_layers)])
        self.init_weights()

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    def init_weights(self, std: float = 0.02) -> None:
        """BERT init: N(0, std) linears and embeddings, zero biases and padding rows, unit LNs,
        fusion gates at 0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if isinstance(m, TextLayer) and m.fused:
                nn.init.zeros_(m.alpha_t2i)

    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if torch.jit.is_tracing():  # shapes come from the example input; keep the trace clean
            return
        if input_ids.ndim != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"input_ids and attention_mask must both be [B, T]; got "
                             f"{list(input_ids.shape)} and {list(attention_mask.shape)}")
        if input_ids.shape[1] > self.cfg.max_length:
            raise ValueError(f"text length {input_ids.shape[1]} exceeds the position table "
                             f"(at most {self.cfg.max_length} tokens)")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unimodal path: all layers, no cross-attention, every LayerNorm. ids/mask int64 [B, T]
        -> [B, T, D] float32."""
        self.check_inputs(input_ids, attention_mask)
        h = self.embeddings(input_ids)
        mask = extended_mask(attention_mask, h.dtype)
        for layer in self.layers:
            h = layer(h, mask)
        return h
