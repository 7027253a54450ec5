"""Blocks shared by the image and text towers.

Attention is built from ``nn.Linear`` + matmul/softmax (not ``nn.MultiheadAttention``): that keeps
every projection visible to INT8 quantisation and lets the legacy ONNX exporter (opset 17) keep the
text length dynamic. ``Attend`` is ``attend`` as a module whose two matmuls are ``MatMul``
submodules, so quantisation tools (compress.quantize) can put quantizers on q, k, the attention
probabilities and v; it has no parameters. No forward branches on tensor values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def extended_mask(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive key mask from a padding mask.

    attention_mask: int64 or bool [B, T], 1 = real token, 0 = padding.
    Returns ``(1 - mask) * finfo(dtype).min`` as [B, 1, 1, T] in ``dtype`` (transformers' convention).
    """
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, H*d] -> [B, H, N, d]."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] -> [B, N, H*d]."""
    return x.transpose(1, 2).flatten(2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           bias: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
           dropout: nn.Module | None = None, matmuls: tuple = (torch.matmul, torch.matmul)) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v.

    q: [B, H, N, d], k and v: [B, H, M, d], bias: additive, broadcastable to [B, H, N, M], or a
    tuple of such terms added one after the other (so an exporter cannot fold them into one
    constant of the broadcast shape).
    ``matmuls``: the (scores, output) matmul callables (``Attend`` passes its MatMul modules).
    Returns [B, H, N, d].
    """
    qk, pv = matmuls
    scores = qk(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    for term in (bias if isinstance(bias, tuple) else (bias,)):
        if term is not None:
            scores = scores + term
    probs = scores.softmax(dim=-1)
    if dropout is not None:
        probs = dropout(probs)
    return pv(probs, v)


class MatMul(nn.Module):
    """``a @ b`` as a module (no parameters): a place for quantizers on both operands."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class Attend(nn.Module):
    """``attend`` with its matmuls as submodules: ``qk`` (scaled q [.., N, d] @ k^T [.., d, M]) and
    ``pv`` (probabilities [.., N, M] @ v [.., M, d]). Same math and shapes as ``attend``."""

    def __init__(self):
        super().__init__()
        self.qk = MatMul()
        self.pv = MatMul()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                dropout: nn.Module | None = None) -> torch.Tensor:
        return attend(q, k, v, bias, dropout, (self.qk, self.pv))


class QKVAttention(nn.Module):
    """Multi-head attention with separate ``query`` / ``key`` / ``value`` linears (BERT names).

    Self-attention when ``context`` is None, cross-attention otherwise. The output projection is
    not part of this module (BERT keeps it in ``attention.output.dense``).
    """

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None, attn_drop: float = 0.0):
        super().__init__()
        kv_dim = dim if kv_dim is None else kv_dim
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)
        self.dropout = nn.Dropout(attn_drop)
        self.attend = Attend()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, dim]; context: [B, M, kv_dim] (default x); mask: additive [B, 1, 1, M].
        Returns [B, N, dim] (heads merged, before any output projection)."""
        context = x if context is None else context
        q = split_heads(self.query(x), self.num_heads)
        k = split_heads(self.key(context), self.num_heads)
        v = split_heads(self.value(context), self.num_heads)
        return merge_heads(self.attend(q, k, v, mask, self.dropout))


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> dropout -> fc2 -> dropout (timm/Swin names)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def init_linear_and_norm(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal(std) Linear weights, zero biases, unit LayerNorms (timm / BERT style)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
