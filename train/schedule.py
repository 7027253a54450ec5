"""Optimisation helpers shared by every training task: lr schedule, param groups, clipping, EMA.

The learning rate is a pure function of the optimiser step (``lr_factor``), so the "scheduler
state" to checkpoint is just the step. Param groups carry an ``lr_mult``; the loop sets
``group["lr"] = base_lr * lr_mult * lr_factor(step)`` before every optimiser step.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

SCHEDULES = ("linear", "multistep", "cosine", "constant")


def warmup_length(max_steps: int, warmup_steps: int | None, warmup_frac: float) -> int:
    """Warm-up length in optimiser steps: ``warmup_steps`` if given, else ``round(frac * max)``."""
    if warmup_steps is not None:
        return warmup_steps
    return int(round(warmup_frac * max_steps))


def lr_factor(step: int, *, schedule: str, max_steps: int, warmup: int, warmup_start: float = 0.0,
              milestones: Sequence[float] = (), gamma: float = 0.1) -> float:
    """Multiplier of the base lr for the update taken at 0-based optimiser step ``step``.

    Warm-up: linear from ``warmup_start`` towards 1, reaching 1 at step ``warmup``
    (``start + (1 - start) * (step + 1) / warmup`` for ``step < warmup``, so no update is wasted
    at lr 0). After it:
      - "linear": decays linearly to 0 at ``max_steps``;
      - "cosine": half-cosine from 1 to 0 at ``max_steps``;
      - "multistep": ``gamma ** k``, k = number of milestones (fractions of ``max_steps``) passed;
      - "constant": 1.
    """
    if step < warmup:
        return warmup_start + (1.0 - warmup_start) * (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        return gamma ** sum(step >= round(m * max_steps) for m in milestones)
    progress = (step - warmup) / max(1, max_steps - warmup)  # in [0, 1)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule: unknown {schedule!r}, expected one of {SCHEDULES}")


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights, gates and other 0/1-d parameters get no weight decay (fiber.md)."""
    return param.ndim <= 1 or name.endswith(".bias")


def make_param_groups(model: nn.Module, weight_decay: float,
                      lr_mults: Sequence[tuple[str, float]] = (),
                      no_decay: Callable[[str, nn.Parameter], bool] = is_no_decay) -> list[dict]:
    """AdamW param groups by (lr multiplier, decay / no decay).

    ``lr_mults``: ``(substring, mult)`` rules; the first rule whose substring occurs in the
    parameter name decides its multiplier (default 1). FIBER coarse, for example, uses
    ``[("cross_modal", 5), ("i2t", 5), ("t2i", 5), ("head", 5)]``. Frozen parameters
    (``requires_grad=False``) are left out. Each group: ``{"params", "lr_mult", "weight_decay",
    "name"}``.
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = next((m for s, m in lr_mults if s in name), 1.0)
        groups.setdefault((float(mult), no_decay(name, p)), []).append(p)
    return [{"params": ps, "lr_mult": mult, "weight_decay": 0.0 if nd else weight_decay,
             "name": f"lr_x{mult:g}" + ("_no_decay" if nd else "")}
            for (mult, nd), ps in sorted(groups.items())]


class ModelEma:
    """Exponential moving average of a model's parameters and buffers.

    ``ema = decay * ema + (1 - decay) * current`` after every optimiser step for floating
    tensors; integer buffers (counters, indices) are copied. Keys are the model's
    ``state_dict`` keys, so ``ema.state_dict()`` loads into the model for evaluation/export.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) ^ set(tensors))
        if missing:
            raise KeyError(f"EMA state does not match the model: keys {missing[:5]} differ")
        for k, v in tensors.items():
            self.shadow[k].copy_(v)


def clip_and_norm(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Global L2 norm of the gradients before clipping; clips to ``max_norm`` when it is > 0."""
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def param_list(groups: Iterable[dict]) -> list[nn.Parameter]:
    """All parameters of ``groups``, in order."""
    return [p for g in groups for p in g["params"]]
