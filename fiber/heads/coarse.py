"""Stage-1 (coarse) heads with the official FIBER/METER parameter names (fiber.md §1.4, §2).

``CoarseHeads`` owns, at the top level of the module that inherits it (so the keys match the
official checkpoint: ``cross_modal_*``, ``itm_score.fc``, ``mlm_score.*``, ``temp``, queues):

- fused path: ``cross_modal_text_transform`` (D -> D), ``cross_modal_image_transform`` (C4 -> D),
  ``cross_modal_text_pooler`` (Linear + tanh on token 0), ``cross_modal_image_pooler`` (same, on
  the token average); ``itm_score.fc`` = Linear(2D, 2) on ``cat(text_cls, image_cls)``;
- ITC path: ``cross_modal_{text,image}_transform_itc`` and ``..._pooler_itc`` on the *unfused*
  features, then L2 normalisation; learnable ``temp`` (init 0.07, clamped to [0.001, 1]);
  feature queues ``image_queue`` / ``text_queue`` ``[D, Q]`` with ``queue_ptr`` / ``queue_total``
  (all-gathered across ranks under DDP when enqueuing, as ALBEF);
- ``mlm_score``: transform (dense D -> D, GELU, LayerNorm), ``decoder`` D -> vocab without bias and
  not tied to the word embeddings, and a separate ``bias``; it reads the fused text *after*
  ``cross_modal_text_transform``.

Weights are initialised as the official ``init_weights``: Linear N(0, 0.02) with zero bias,
LayerNorm (1, 0).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Pooler(nn.Module):
    """``tanh(dense(x[:, 0]))``: ``[B, L, D]`` -> ``[B, D]``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class ITMHead(nn.Module):
    """``fc``: Linear(2D, 2) on the concatenated fused text/image CLS features."""

    def __init__(self, in_features: int):
        super().__init__()
        self.fc = nn.Linear(in_features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class MLMTransform(nn.Module):
    """BERT ``BertPredictionHeadTransform``: dense, GELU, LayerNorm."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """``[B, T, D]`` -> vocabulary logits ``[B, T, V]`` (untied decoder + separate bias)."""

    def __init__(self, hidden: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.transform = MLMTransform(hidden, eps)
        self.decoder = nn.Linear(hidden, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias


class CoarseHeads(nn.Module):
    """The stage-1 heads (see the module docstring). Subclasses add the backbone.

    Args:
        text_dim: fused/unfused text width D (also the ITC/ITM width, as official ``hidden_size``).
        image_dim: channels C4 of the last Swin stage.
        vocab_size: MLM vocabulary; ``layer_norm_eps``: eps of the MLM LayerNorm.
        queue_size: ITC queue length Q (0 disables the queue).
    """

    def __init__(self, text_dim: int, image_dim: int, vocab_size: int, queue_size: int = 1024,
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        self.cross_modal_text_transform = nn.Linear(text_dim, text_dim)
        self.cross_modal_image_transform = nn.Linear(image_dim, text_dim)
        self.cross_modal_text_transform_itc = nn.Linear(text_dim, text_dim)
        self.cross_modal_image_transform_itc = nn.Linear(image_dim, text_dim)
        self.cross_modal_text_pooler = Pooler(text_dim)
        self.cross_modal_image_pooler = Pooler(text_dim)
        self.cross_modal_text_pooler_itc = Pooler(text_dim)
        self.cross_modal_image_pooler_itc = Pooler(text_dim)
        self.itm_score = ITMHead(2 * text_dim)
        self.mlm_score = MLMHead(text_dim, vocab_size, layer_norm_eps)
        self.apply(_init_weights)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.queue_size = int(queue_size)
        self.register_buffer("image_queue", torch.zeros(text_dim, self.queue_size))
        self.register_buffer("text_queue", torch.zeros(text_dim, self.queue_size))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue_total", torch.zeros(1, dtype=torch.long))

    # -- ITC (unfused) ------------------------------------------------------------------------
    def itc_text_feat(self, text: torch.Tensor) -> torch.Tensor:
        """Unfused text states ``[B, T, D]`` -> L2-normalised ``[B, D]`` (token 0 through the pooler)."""
        return F.normalize(self.cross_modal_text_pooler_itc(self.cross_modal_text_transform_itc(text)), dim=-1)

    def itc_image_feat(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Unfused final image tokens ``[B, L, C4]`` -> L2-normalised ``[B, D]`` (token mean, pooler)."""
        x = self.cross_modal_image_transform_itc(image_tokens).mean(dim=1, keepdim=True)
        return F.normalize(self.cross_modal_image_pooler_itc(x), dim=-1)

    def clamped_temp(self) -> torch.Tensor:
        """Clamp ``temp`` in place to [0.001, 1] (as the official code) and return it."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 1.0)
        return self.temp

    # -- fused: ITM and MLM ---------------------------------------------------------------------
    def fused_cls_feats(self, text: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Fused text ``[B, T, D]`` and image tokens ``[B, L, C4]`` -> ``cat(text_cls, image_cls)`` ``[B, 2D]``."""
        text_cls = self.cross_modal_text_pooler(self.cross_modal_text_transform(text))
        image = self.cross_modal_image_transform(image_tokens).mean(dim=1, keepdim=True)
        return torch.cat([text_cls, self.cross_modal_image_pooler(image)], dim=-1)

    def itm_logits(self, text: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Fused pair -> ITM logits ``[B, 2]`` (index 1 = match)."""
        return self.itm_score(self.fused_cls_feats(text, image_tokens))

    def mlm_logits(self, text: torch.Tensor) -> torch.Tensor:
        """Fused text ``[B, T, D]`` -> vocabulary logits ``[B, T, V]``."""
        return self.mlm_score(self.cross_modal_text_transform(text))

    # -- queue ----------------------------------------------------------------------------------
    def queue_contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part of the queues: ``(image [D, n], text [D, n])``, detached copies."""
        n = min(int(self.queue_total), self.queue_size)
        return self.image_queue[:, :n].detach().clone(), self.text_queue[:, :n].detach().clone()

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> None:
        """Push ``[B, D]`` features (gathered from all ranks under DDP) into the ring buffers."""
        if self.queue_size == 0:
            return
        image_feat, text_feat = _all_gather(image_feat.detach()), _all_gather(text_feat.detach())
        n = image_feat.shape[0]
        idx = (int(self.queue_ptr) + torch.arange(n, device=image_feat.device)) % self.queue_size
        if n > self.queue_size:  # only the newest Q survive
            keep = slice(n - self.queue_size, n)
            idx, image_feat, text_feat = idx[keep], image_feat[keep], text_feat[keep]
        self.image_queue[:, idx] = image_feat.t().to(self.image_queue.dtype)
        self.text_queue[:, idx] = text_feat.t().to(self.text_queue.dtype)
        self.queue_ptr[0] = (int(self.queue_ptr) + n) % self.queue_size
        self.queue_total[0] = min(int(self.queue_total) + n, self.queue_size)


def _init_weights(module: nn.Module) -> None:
    """Official ``objectives.init_weights``."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every DDP rank along dim 0 (no gradient); identity otherwise."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
