"""The one training loop: coarse, fine and distillation all call ``fit(task, cfg, out_dir)``.

Model-agnostic: everything stage-specific sits behind the small ``Task`` protocol below. The
loop runs unchanged in one process and under ``torchrun --nproc_per_node N`` (DDP; NCCL on
GPUs, gloo on CPUs) and does AMP (GPU), gradient accumulation, clipping, EMA, a seeded data
order, atomic pickle-free checkpoints with exact resume, progress (tqdm + RUN/metrics.jsonl)
and a NaN guard.

Batch size: ``TrainConfig.batch_size`` is GLOBAL (samples per optimiser step over all processes
and accumulation micro-steps); each process's micro-batch is
``batch_size / (world_size * grad_accum)``. With a per-sample mean loss, a run's result is thus
the same (up to float rounding) for any process count x accumulation with the same product.
Losses that couple samples across a batch (contrastive ITC, hard-negative ITM) see only the
micro-batch of one process.

Frozen extra modules (a distillation teacher): keep them on the task, not in the model that
``build_model`` returns; move them in ``task.setup(device)``. They are then not optimised, not
wrapped in DDP and not checkpointed. Model parameters left out of every param group (or with
``requires_grad=False``) are not optimised but are checkpointed. Trainable training-only modules
(feature-distillation projections) belong in the model, so they are optimised and checkpointed
for resume; ``task.final_state_dict`` drops them from ``RUN/final``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.cpu import cpu_flags, read_cpuinfo
from common.progress import is_terminal
from fiber.checkpoint import write_checkpoint
from train import checkpointing as ckpt
from train.distributed import (DataOrder, DistEnv, all_gather_object, all_reduce_mean_, barrier,
                               init_distributed, micro_batch_loader, rank_seed, shutdown,
                               to_device)
from train.schedule import (SCHEDULES, ModelEma, clip_and_norm, lr_factor, make_param_groups,
                            param_list, warmup_length)

AMP_MODES = ("auto", "off", "bf16", "fp16")
_RESERVED_LOG_KEYS = {"step", "epoch", "lr", "grad_norm", "samples_per_s", "elapsed_s"}


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000                   # optimiser steps in the whole run
    batch_size: int = 32                    # GLOBAL samples per optimiser step (see module doc)
    grad_accum: int = 1                     # micro-steps per optimiser step, per process
    lr: float = 1e-4                        # base lr; groups scale it by their "lr_mult"
    weight_decay: float = 0.01              # AdamW decay for groups that do not set their own
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW beta1 beta2
    eps: float = 1e-8                       # AdamW epsilon
    warmup_steps: int | None = None         # warm-up length in steps; overrides warmup_frac
    warmup_frac: float = 0.0                # warm-up length as a fraction of max_steps
    warmup_start: float = 0.0               # lr factor the warm-up starts from (GLIP: 1e-3)
    schedule: str = "linear"                # "linear" | "multistep" | "cosine" | "constant"
    milestones: tuple[float, ...] = (0.67, 0.89)  # multistep: fractions of max_steps
    gamma: float = 0.1                      # multistep: factor per milestone
    clip_grad: float | None = 1.0           # max global grad norm; None or 0 = no clipping
    ema_decay: float | None = None          # EMA of weights; None = off
    export_ema: bool = True                 # RUN/final holds the EMA weights when EMA is on
    amp: str = "auto"                       # "auto" (bf16/fp16 on GPU, off on CPU) | "off" | "bf16" | "fp16"
    log_every: int = 10                     # steps between metrics.jsonl records
    ckpt_every: int = 500                   # steps between checkpoints; 0 = only at the end
    keep_last: int = 3                      # checkpoints kept; 0 = all
    seed: int = 0                           # model init, data order, augmentation, dropout
    num_workers: int = 0                    # DataLoader worker processes per rank
    device: str = "auto"                    # "auto" | "cpu" | "cuda"
    find_unused_parameters: bool = True     # DDP: needed when some params get no grad in a step
    progress: bool = True                   # progress bar on rank 0 when stderr is a terminal
    tensorboard: bool = False               # also log to RUN/tensorboard if tensorboard is installed

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "milestones", tuple(self.milestones))
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ckpt_every", "keep_last", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if not all(0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing fractions in (0, 1), got {self.milestones}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.warmup_start <= 1:
            raise ValueError("warmup_frac must be in [0, 1) and warmup_start in [0, 1]")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps], got {self.warmup_steps}")
        if self.lr <= 0 or len(self.betas) != 2:
            raise ValueError("lr must be > 0 and betas a pair")

    @property
    def warmup(self) -> int:
        return warmup_length(self.max_steps, self.warmup_steps, self.warmup_frac)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {sorted(unknown)}")
        return cls(**d)


def add_train_args(parser: argparse.ArgumentParser, defaults: TrainConfig = TrainConfig()) -> None:
    """The ``TrainConfig`` options as ``--max-steps``, ``--batch-size``, ... (shared by every
    training CLI); ``defaults`` lets a stage set its own recipe. Read back with ``from_args``."""
    g = parser.add_argument_group("training loop")
    helps = field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        text = helps.get(f.name, f.name.replace("_", " ")).replace("%", "%%")
        if isinstance(default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif isinstance(default, tuple):
            g.add_argument(flag, type=float, nargs="+", default=default,
                           help=f"{text} (default: {' '.join(map(str, default))})")
        elif f.name in _OPTIONAL_ARGS:
            g.add_argument(flag, type=_OPTIONAL_ARGS[f.name], default=default,
                           help=f"{text}: a number, or 'none' (default: {default})")
        else:
            g.add_argument(flag, type=type(default), default=default, help=f"{text} (default: {default})")


def field_comments(cls: type) -> dict[str, str]:
    """{field: its ``# comment``} from a dataclass's source, continuation comment lines joined:
    the one place a config field is described doubles as its ``--help`` text."""
    import inspect
    import re

    out: dict[str, str] = {}
    last = None
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"^\s+(\w+):[^#]*#\s*(.*)$", line)
        if m:
            last = m.group(1)
            out[last] = m.group(2).strip()
        elif last and re.match(r"^\s+#\s*(.*)$", line):
            out[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    return out


def _optional(kind: type):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


_OPTIONAL_ARGS = {"warmup_steps": _optional(int), "clip_grad": _optional(float),
                  "ema_decay": _optional(float)}


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of arguments added by ``add_train_args``."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


class Task(Protocol):
    """What a training stage supplies. ``BaseTask`` gives defaults for the last four."""

    def build_model(self) -> nn.Module:
        """The trainable model (called after ``torch.manual_seed(cfg.seed)`` on every rank)."""

    def dataset(self, split: str) -> Sequence[Any]:
        """A map-style dataset of samples (``len`` + ``[i]``); the loop asks for "train"."""

    def collate(self, samples: list[Any]) -> Any:
        """Samples -> a batch (nested dict/list/tuple of tensors; tensors are moved to the device).
        Runs under a seed derived from (seed, epoch, step, chunk): randomness here is reproducible."""

    def loss(self, model: nn.Module, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """Scalar tensors: "loss" (what is optimised, the sum) plus parts for logging.
        ``model`` is the unwrapped model (called inside the DDP forward, so any method may be
        used); ``step`` = optimiser updates done so far (0 for the first batch). Return the
        same keys at every step and on every rank."""

    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict]:
        """AdamW groups: ``{"params": [...], "lr_mult": float (default 1), "weight_decay"?: float}``."""

    def checkpoint_config(self) -> dict:
        """JSON-able dict stored in every config.json, e.g. ``{"model": cfg.to_dict(), "task": "fine"}``."""

    def setup(self, device: torch.device) -> None:
        """Called once after the model is on ``device``: move frozen extras (teacher) there."""

    def final_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What ``RUN/final`` holds, given the model's (or EMA's) state_dict: a task may drop
        training-only tensors (distillation projections). Checkpoints keep everything."""


class BaseTask:
    """Defaults: one lr multiplier, no decay on biases/norms, nothing extra in config.json,
    ``RUN/final`` = the whole state_dict."""

    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict]:
        return make_param_groups(model, cfg.weight_decay)

    def checkpoint_config(self) -> dict:
        return {}

    def setup(self, device: torch.device) -> None:
        pass

    def final_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, out of memory, nothing to resume, ...)."""


class NonFiniteLossError(TrainingError):
    pass


class TrainingOutOfMemoryError(TrainingError):
    pass


@dataclass(frozen=True)
class FitResult:
    step: int                               # optimiser steps done
    run_dir: Path
    final_dir: Path                         # RUN/final: model.safetensors + config.json
    last_checkpoint: Path                   # RUN/checkpoints/step-NNNNNNN
    metrics: dict[str, float]               # the last logged record
    model: nn.Module = field(repr=False)    # the trained (raw, not EMA) model, on its device


def fit(task: Task, cfg: TrainConfig, out_dir: str | Path, resume: bool = False) -> FitResult:
    """Train ``task`` for ``cfg.max_steps`` optimiser steps, writing the run into ``out_dir``.

    ``resume=True`` continues from the latest checkpoint in ``out_dir`` (model, optimiser,
    schedule, EMA, grad scaler, RNG states, data position); without it an ``out_dir`` that
    already holds a run is refused. Raises ``TrainingError`` / ``ValueError`` with a message for
    the user; files already written stay intact.
    """
    out_dir = Path(out_dir)
    # checked before init_distributed: its rendezvous makes every rank check before any writes
    start_from = _check_run_dir(out_dir, resume)
    env = init_distributed(cfg.device)
    try:
        return _Trainer(task, cfg, out_dir, env, start_from).run()
    finally:
        shutdown(env)


def _check_run_dir(out_dir: Path, resume: bool) -> Path | None:
    latest = ckpt.latest_checkpoint(out_dir)
    if resume:
        if latest is None:
            raise TrainingError(f"resume: {out_dir} has no checkpoint to resume from "
                                f"(no {out_dir / 'checkpoints'}/step-*)")
        return latest
    existing = [p for p in (latest, out_dir / "final", out_dir / "metrics.jsonl")
                if p is not None and p.exists()]
    if existing:
        raise TrainingError(f"out dir {out_dir} already holds a run ({existing[0]}); resume it "
                            f"(--resume) or choose another --out")
    return None


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU flags (Linux /proc/cpuinfo) name AVX-512 BF16 or AMX BF16."""
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    if cpuinfo is None:
        return True  # cannot tell (not Linux): do not warn
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp`` on ``device``; None = full fp32.

    On CPUs only an explicit "bf16" enables autocast (CPUs with AVX-512 BF16 or AMX run the
    matmuls about 2x faster; "auto" stays fp32 there so default runs are exactly reproducible).
    fp16 needs a GPU (it needs loss scaling, which only the CUDA GradScaler provides here).
    """
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        if amp == "bf16":
            if not cpu_has_native_bf16():
                warnings.warn("amp 'bf16' on a CPU without native bf16 (no AVX-512 BF16 or AMX): autocast "
                              "is emulated here and about 10x slower than fp32 (measured on an AVX2 EPYC: "
                              "12 steps > 300 s vs 32 s); use --amp off", stacklevel=2)
            return torch.bfloat16
        raise ValueError(f"amp: {amp!r} needs a CUDA device (running on {device}); use 'bf16', "
                         f"'auto' or 'off'")
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e)))


class _LossModule(nn.Module):
    """Runs ``task.loss`` inside ``forward`` so DDP sees the whole loss computation."""

    def __init__(self, task: Task, model: nn.Module):
        super().__init__()
        self.task, self.model = task, model

    def forward(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        return self.task.loss(self.model, batch, step)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Trainer:
    def __init__(self, task: Task, cfg: TrainConfig, out_dir: Path, env: DistEnv,
                 start_from: Path | None):
        self.task, self.cfg, self.out, self.env = task, cfg, out_dir, env
        self.amp_dtype = resolve_amp(cfg.amp, env.device)
        _seed_all(cfg.seed)
        self.model = task.build_model().to(env.device)
        self.model.train()
        task.setup(env.device)
        self.optimizer = self._build_optimizer()
        self.params = param_list(self.optimizer.param_groups)
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.ema = ModelEma(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.dataset = task.dataset("train")
        self.order = DataOrder(len(self.dataset), cfg.batch_size, env.world_size,
                               cfg.grad_accum, cfg.seed)
        self.step, self.elapsed_before, self.elapsed_now, self.metrics = 0, 0.0, 0.0, {}
        _seed_all(rank_seed(cfg.seed, env.rank))  # the model init above used the same seed on all ranks
        if start_from is not None:
            self._restore(start_from)
        self.net = _LossModule(task, self.model)
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.net = DistributedDataParallel(
                self.net, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters)
        self.last_ckpt = start_from
        self.log = ckpt.MetricsLog(out_dir / "metrics.jsonl", env.is_main,
                                   self.step if start_from is not None else None)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        groups = self.task.param_groups(self.model, self.cfg)
        if not groups or not any(g["params"] for g in groups):
            raise ValueError("task.param_groups returned no parameters to optimise")
        groups = [{"lr_mult": 1.0, **g} for g in groups]
        for g in groups:
            g["lr"] = self.cfg.lr * g["lr_mult"]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=self.cfg.betas, eps=self.cfg.eps,
                                 weight_decay=self.cfg.weight_decay)

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> FitResult:
        from tqdm.auto import tqdm
        cfg = self.cfg
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.env.is_main and cfg.progress and is_terminal()))  # TTY only
        tb = _tensorboard(self.out, cfg.tensorboard and self.env.is_main)
        t0 = t_log = time.perf_counter()
        step_log = self.step
        try:
            while self.step < cfg.max_steps:
                epoch, first = self.order.position(self.step)
                last = min(self.order.steps_per_epoch, first + cfg.max_steps - self.step)
                batches = iter(micro_batch_loader(self.dataset, self.task.collate, self.order,
                                                  self.env, epoch, first, last, cfg.num_workers))
                for _ in range(first, last):
                    stats = self._train_step([next(batches) for _ in range(cfg.grad_accum)])
                    self.step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
                    if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                        now = time.perf_counter()
                        rate = (self.step - step_log) * cfg.batch_size / max(now - t_log, 1e-9)
                        self._log(stats, epoch, rate, self.elapsed_before + now - t0, bar, tb)
                        t_log, step_log = now, self.step
                    if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == cfg.max_steps:
                        self.elapsed_now = self.elapsed_before + time.perf_counter() - t0
                        self._save()
        finally:
            bar.close()
            self.log.close()
            if tb is not None:
                tb.close()
        return self._finish()

    def _train_step(self, micro: list[tuple[Any, int]]) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; returns rank-averaged stats."""
        cfg, opt = self.cfg, self.optimizer
        factor = lr_factor(self.step, schedule=cfg.schedule, max_steps=cfg.max_steps,
                           warmup=cfg.warmup, warmup_start=cfg.warmup_start,
                           milestones=cfg.milestones, gamma=cfg.gamma)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * g["lr_mult"] * factor
        opt.zero_grad(set_to_none=True)
        try:
            keys, sums = self._forward_backward(micro)
        except Exception as e:
            if _is_oom(e):
                raise TrainingOutOfMemoryError(
                    f"out of memory in step {self.step + 1} (micro-batch of {self.order.micro_batch} "
                    f"samples per process): lower --batch-size or raise --grad-accum (same global "
                    f"batch, smaller micro-batches); checkpoints already written are intact") from e
            raise
        stats = dict(zip(keys, all_reduce_mean_(self.env, sums).tolist()))
        if not all(math.isfinite(v) for v in stats.values()):
            raise NonFiniteLossError(f"non-finite loss at step {self.step + 1} ({_fmt(stats)}); "
                                     f"stopped, {self._last_good()}")
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        stats["grad_norm"] = clip_and_norm(self.params, cfg.clip_grad)
        if self.scaler is not None:
            self.scaler.step(opt)  # skips the update when fp16 grads overflowed
            self.scaler.update()
        elif not math.isfinite(stats["grad_norm"]):
            raise NonFiniteLossError(f"non-finite gradient norm at step {self.step + 1} "
                                     f"({_fmt(stats)}); stopped, {self._last_good()}")
        else:
            opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        stats["lr"] = cfg.lr * factor
        return stats

    def _forward_backward(self, micro: list[tuple[Any, int]]) -> tuple[list[str], torch.Tensor]:
        """Backward of every micro-batch (DDP syncs on the last); loss parts summed / accum."""
        accum, dev = self.cfg.grad_accum, self.env.device
        keys: list[str] = []
        sums = None
        for m, (batch, _) in enumerate(micro):
            last = m == accum - 1
            sync = self.net.no_sync() if self.env.distributed and not last else contextlib.nullcontext()
            with sync:
                with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    parts = self.net(to_device(batch, dev), self.step)
                keys = keys or _check_parts(parts)
                loss = parts["loss"].float() / accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            vals = torch.stack([parts[k].detach().float().reshape(()) for k in keys]) / accum
            sums = vals if sums is None else sums + vals
        return keys, sums.cpu()

    # ---- logging, checkpoints ---------------------------------------------------------------

    def _log(self, stats, epoch, rate, elapsed, bar, tb) -> None:
        rec = {"step": self.step, "epoch": epoch, **stats, "samples_per_s": rate, "elapsed_s": elapsed}
        self.metrics = rec
        bar.set_postfix(loss=f"{stats['loss']:.4f}", samples_s=f"{rate:.1f}")
        self.log.write(rec)
        if tb is not None:
            for k, v in stats.items():
                tb.add_scalar(f"train/{k}", v, self.step)

    def _last_good(self) -> str:
        return (f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt
                else "no checkpoint was written yet")

    def _trainer_state(self, rng: list[dict]) -> dict[str, Any]:
        epoch, in_epoch = self.order.position(self.step)
        return {
            "step": self.step, "world_size": self.env.world_size, "elapsed_s": self.elapsed_now,
            "train_config": dataclasses.asdict(self.cfg),
            "data": {"epoch": epoch, "step_in_epoch": in_epoch, "dataset_len": self.order.dataset_len,
                     "batch_size": self.cfg.batch_size, "seed": self.cfg.seed},
            "schedule": {"name": self.cfg.schedule, "step": self.step, "warmup": self.cfg.warmup,
                         "max_steps": self.cfg.max_steps},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng, "metrics": self.metrics,
        }

    def _save(self) -> None:
        """Checkpoint the current step: every rank checks weights, rank 0 writes, barriers around."""
        rng = all_gather_object(self.env, ckpt.capture_rng())
        states = [self.model.state_dict()] + ([self.ema.state_dict()] if self.ema else [])
        bad = [k for s in states for k, v in s.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteLossError(f"non-finite weights at step {self.step} ({bad[0]}, ...); "
                                     f"not checkpointed, {self._last_good()}")
        barrier(self.env)
        if self.env.is_main:
            config = ckpt.checkpoint_config(self.task.checkpoint_config(), self.step, "model")
            ckpt.save_step(self.out, self.step, self.model.state_dict(),
                           self.ema.state_dict() if self.ema else None, config,
                           self._trainer_state(rng), self.cfg.keep_last)
        barrier(self.env)
        self.last_ckpt = self.out / "checkpoints" / ckpt.step_dir_name(self.step)

    def _finish(self) -> FitResult:
        use_ema = self.ema is not None and self.cfg.export_ema
        final = self.out / "final"
        if self.env.is_main:
            weights = self.task.final_state_dict(
                self.ema.state_dict() if use_ema else self.model.state_dict())
            config = ckpt.checkpoint_config(self.task.checkpoint_config(), self.step,
                                            "ema" if use_ema else "model")
            write_checkpoint(final, weights, config, overwrite=True)
        barrier(self.env)
        return FitResult(step=self.step, run_dir=self.out, final_dir=final,
                         last_checkpoint=self.last_ckpt, metrics=self.metrics, model=self.model)

    def _restore(self, path: Path) -> None:
        state = ckpt.load_step(path)
        ts = state["trainer_state"]
        _check_resume_compatible(ts, self.cfg, self.order, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(ts["optimizer"])
        if self.scaler is not None and ts["scaler"] is not None:
            self.scaler.load_state_dict(ts["scaler"])
        if self.ema is not None:
            if state["ema"] is None:
                warnings.warn(f"{path} has no EMA weights; the EMA restarts from the current weights")
                self.ema = ModelEma(self.model, self.cfg.ema_decay)
            else:
                self.ema.load_state_dict(state["ema"])
        if len(ts["rng"]) == self.env.world_size:
            ckpt.restore_rng(ts["rng"][self.env.rank])
        else:
            warnings.warn(f"{path} was written by {len(ts['rng'])} processes, now {self.env.world_size}: "
                          "training RNG (dropout) reseeded, data order unchanged")
            _seed_all(rank_seed(self.cfg.seed, self.env.rank, ts["step"]))
        self.step, self.elapsed_before, self.metrics = ts["step"], ts["elapsed_s"], ts["metrics"]


def _check_resume_compatible(ts: dict, cfg: TrainConfig, order: DataOrder, path: Path) -> None:
    data = ts["data"]
    for name, now in (("batch_size", cfg.batch_size), ("seed", cfg.seed),
                      ("dataset_len", order.dataset_len)):
        if data[name] != now:
            raise TrainingError(f"resume: {path} was trained with {name}={data[name]}, now {now}; "
                                f"the data position would not carry over")
    old = ts["train_config"]
    changed = [k for k, v in dataclasses.asdict(cfg).items() if k in old and old[k] != v]
    if changed:
        warnings.warn(f"resume: train config differs from {path} in {changed}")


def _check_parts(parts: Any) -> list[str]:
    if not isinstance(parts, dict) or "loss" not in parts:
        raise TypeError("task.loss must return a dict of scalar tensors with a 'loss' key")
    clash = _RESERVED_LOG_KEYS & set(parts)
    if clash:
        raise ValueError(f"task.loss parts must not be named {sorted(clash)}")
    return ["loss"] + sorted(k for k in parts if k != "loss")


def _fmt(stats: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in stats.items())


def _tensorboard(out: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed; logging to metrics.jsonl only")
        return None
    return SummaryWriter(str(out / "tensorboard"))
