"""Stage 1, coarse-grained pre-training (ITC + ITM + MLM) on image-caption pairs.

    python -m train.coarse --config fiber-nano --data data/synth-train --out runs/nano/coarse \\
        [--max-steps N] [--batch-size B] [--resume] [--late-fusion] [--text-init minilm] ...

Reads ``DATA/pairs.jsonl`` (+ its images), writes the run folder of ``train.loop.fit``:
``RUN/checkpoints/step-*``, ``RUN/metrics.jsonl`` and ``RUN/final`` (``config.json`` task
"coarse"), which ``train.fine --init RUN`` reads. Runs unchanged under
``torchrun --nproc_per_node N -m train.coarse ...``. Every TrainConfig field is a flag
(``--lr``, ``--grad-accum``, ``--ema-decay``, ...); defaults below are the recipe's.
"""
from __future__ import annotations

import argparse
import sys

from train.data import load_stage1
from train.loop import TrainConfig, fit, train_config_from_args
from train.tasks import (CoarseOptions, CoarseTask, add_stage_args, model_config,
                         progress_bar, run_cli, world_size)

# fiber.md §2 (AdamW betas 0.9/0.98, decay 0.01, 10% warm-up then linear decay); the lr is
# higher than the official 1e-5 because nothing here starts pretrained.
DEFAULTS = TrainConfig(max_steps=1000, batch_size=16, lr=2e-4, betas=(0.9, 0.98), weight_decay=0.01,
                       warmup_frac=0.1, schedule="linear", clip_grad=1.0, ckpt_every=100,
                       log_every=10)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("train.coarse", description=__doc__.split("\n\n")[0])
    add_stage_args(p, DEFAULTS)
    p.add_argument("--mlm-prob", type=float, default=0.15, help="MLM token selection probability")
    return p


def _run(args: argparse.Namespace) -> str:
    cfg = model_config(args.config, args.late_fusion)
    train_cfg = train_config_from_args(args)
    micro = train_cfg.batch_size // (world_size() * train_cfg.grad_accum)
    if micro < 2:
        raise ValueError(f"--batch-size {train_cfg.batch_size}: ITM hard negatives need at least 2 "
                         f"pairs per micro-batch, got {micro} (world size {world_size()} x "
                         f"--grad-accum {train_cfg.grad_accum})")
    data = load_stage1(args.data, cfg, progress_bar(train_cfg.progress))
    task = CoarseTask(cfg, data, CoarseOptions(mlm_prob=args.mlm_prob, text_init=args.text_init))
    result = fit(task, train_cfg, args.out, resume=args.resume)
    loss = result.metrics.get("loss", float("nan"))
    return (f"coarse '{cfg.name}': {result.step} steps on {len(data)} pairs, last logged loss "
            f"{loss:.4f}; weights in {result.final_dir}")


def main(args: argparse.Namespace) -> int:
    return run_cli("train.coarse", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
