"""A tiny regression task for the training-loop tests, and a torchrun entry for test_torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/_toy_task.py \
        --out RUN --cfg '{"max_steps": 4, ...}' --task '{"dropout": 0.0}' --dump DIR [--resume]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.loop import BaseTask, TrainConfig, fit  # noqa: E402
from train.schedule import make_param_groups  # noqa: E402


class ToyCrash(Exception):
    """Simulates a killed run (raised from the loss at a chosen step)."""


class ToyTask(BaseTask):
    """y = x . w + 0.1 sin(3 x0): an MLP with optional dropout; parts "mse" and "aux".

    ``aug_noise`` adds Gaussian noise to x in ``collate`` (exercises the seeded data RNG);
    ``nan_at`` / ``crash_at`` / ``oom_at``: 0-based optimiser step at which the loss returns NaN,
    raises ToyCrash, or raises torch.OutOfMemoryError.
    """

    def __init__(self, n: int = 40, dim: int = 6, hidden: int = 16, dropout: float = 0.0,
                 aug_noise: float = 0.0, nan_at: int | None = None, crash_at: int | None = None,
                 oom_at: int | None = None):
        self.n, self.dim, self.hidden, self.dropout = n, dim, hidden, dropout
        self.aug_noise, self.nan_at, self.crash_at, self.oom_at = aug_noise, nan_at, crash_at, oom_at
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, generator=g)
        self.y = (self.x @ w + 0.1 * torch.sin(3 * self.x[:, 0]))[:, None]
        self.steps_seen: list[int] = []

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.dim, self.hidden), nn.Tanh(), nn.Dropout(self.dropout),
                             nn.Linear(self.hidden, 1))

    def dataset(self, split: str):
        return [{"x": self.x[i], "y": self.y[i], "index": i} for i in range(self.n)]

    def collate(self, samples: list[dict]) -> dict:
        x = torch.stack([s["x"] for s in samples])
        if self.aug_noise:
            x = x + self.aug_noise * torch.randn_like(x)
        return {"x": x, "y": torch.stack([s["y"] for s in samples]),
                "index": torch.tensor([s["index"] for s in samples])}

    def loss(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        self.steps_seen.append(step)
        if step == self.crash_at:
            raise ToyCrash(f"simulated crash at step {step}")
        if step == self.oom_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        pred = model(batch["x"])
        mse = ((pred - batch["y"]) ** 2).mean()
        aux = 0.01 * pred.abs().mean()
        if step == self.nan_at:
            mse = mse * float("nan")
        return {"loss": mse + aux, "mse": mse, "aux": aux}

    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict]:
        return make_param_groups(model, cfg.weight_decay, lr_mults=[("3.", 2.0)])

    def checkpoint_config(self) -> dict:
        return {"model": {"dim": self.dim, "hidden": self.hidden}, "task": "toy"}


def tiny_config(**kw) -> TrainConfig:
    """A fast CPU config: 8 samples per step, no bar, checkpoints every 2 steps."""
    base = dict(max_steps=6, batch_size=8, lr=0.01, warmup_steps=1, log_every=1, ckpt_every=2,
                keep_last=0, device="cpu", progress=False)
    return TrainConfig(**{**base, **kw})


def main(args: argparse.Namespace) -> int:
    task = ToyTask(**json.loads(args.task))
    cfg = tiny_config(**json.loads(args.cfg))
    try:
        result = fit(task, cfg, args.out, resume=args.resume)
    except ToyCrash:
        return 3
    from safetensors.torch import save_file
    rank = int(os.environ.get("RANK", "0"))
    Path(args.dump).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()},
              str(Path(args.dump) / f"rank{rank}.safetensors"))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cfg", default="{}")
    p.add_argument("--task", default="{}")
    p.add_argument("--dump", required=True)
    p.add_argument("--resume", action="store_true")
    sys.exit(main(p.parse_args()))
