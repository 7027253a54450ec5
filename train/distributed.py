"""Process group set-up (torchrun env vars) and the seeded, rank-sharded data pipeline.

One code path for a single process and for ``torchrun --nproc_per_node N``: ``init_distributed``
reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and starts NCCL on GPUs, gloo on CPUs.

Data order: every epoch has one global permutation derived from ``(seed, epoch)`` alone. The
optimiser step ``k`` of the epoch uses the global batch ``perm[k*B:(k+1)*B]`` (``B`` = global
batch size, remainder dropped), split into ``world_size * grad_accum`` equal chunks; chunk
``c = micro * world_size + rank`` is what ``rank`` sees in micro-step ``micro``. So the same
seed gives the same samples per optimiser step whatever the number of processes, and the data
position is fully described by the step.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when init_distributed started the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; "cuda" -> ``cuda:LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistEnv:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_gather_object(env: DistEnv, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` in a single process."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean_(env: DistEnv, t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (a no-op in a single process)."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world_size
    return t


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The global sample order of ``epoch``: int64 [n], a function of ``(seed, epoch)`` only."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(n)


def chunk_seed(seed: int, epoch: int, step_in_epoch: int, chunk: int) -> int:
    """The RNG seed for building (augmenting, masking) one micro-batch chunk: independent of rank
    count, worker count and resumption."""
    return int(np.random.SeedSequence([seed, epoch, step_in_epoch, chunk, 1]).generate_state(1)[0])


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a rank's training RNG (dropout, sampling inside the loss) from ``step`` on."""
    return int(np.random.SeedSequence([seed, rank, step, 2]).generate_state(1)[0])


@dataclass(frozen=True)
class DataOrder:
    """Which dataset indices a process uses at each optimiser step (see module docstring)."""
    dataset_len: int
    batch_size: int      # global, per optimiser step
    world_size: int
    grad_accum: int
    seed: int

    def __post_init__(self):
        parts = self.world_size * self.grad_accum
        if self.batch_size % parts:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by world_size "
                             f"{self.world_size} x grad_accum {self.grad_accum}")
        if self.dataset_len < self.batch_size:
            raise ValueError(f"the training set has {self.dataset_len} samples, fewer than "
                             f"one batch (batch_size {self.batch_size})")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.world_size * self.grad_accum)

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_len // self.batch_size

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, step_in_epoch)`` of the 0-based optimiser step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def chunk(self, perm: np.ndarray, step_in_epoch: int, micro: int, rank: int) -> tuple[list[int], int]:
        """``(indices, chunk id)`` of one micro-batch of ``rank``."""
        c = micro * self.world_size + rank
        start = step_in_epoch * self.batch_size + c * self.micro_batch
        return perm[start:start + self.micro_batch].tolist(), c


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed python ``random``, numpy's global RNG and torch's CPU RNG for the block, then put the
    caller's states back, so data building never moves the training RNG (dropout etc.)."""
    import random
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a nested dict/list/tuple to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class MicroBatches(Dataset):
    """This rank's micro-batches for optimiser steps [first, last) of one epoch, in order.

    Item ``j`` is ``(batch, n_samples)`` for step ``first + j // accum``, micro-step ``j % accum``,
    built under ``chunk_seed`` so any worker count gives the same batches.
    """

    def __init__(self, dataset: Sequence, collate: Callable[[list], Any], order: DataOrder,
                 rank: int, epoch: int, first: int, last: int):
        self.dataset, self.collate, self.order, self.rank = dataset, collate, order, rank
        self.epoch, self.first, self.last = epoch, first, last
        self.perm = epoch_permutation(order.seed, epoch, order.dataset_len)

    def __len__(self) -> int:
        return (self.last - self.first) * self.order.grad_accum

    def __getitem__(self, j: int) -> tuple[Any, int]:
        k, micro = self.first + j // self.order.grad_accum, j % self.order.grad_accum
        idx, chunk = self.order.chunk(self.perm, k, micro, self.rank)
        with isolated_rng(chunk_seed(self.order.seed, self.epoch, k, chunk)):
            return self.collate([self.dataset[i] for i in idx]), len(idx)


def _identity(x: Any) -> Any:
    return x


def micro_batch_loader(dataset: Sequence, collate: Callable[[list], Any], order: DataOrder,
                       env: DistEnv, epoch: int, first: int, last: int, num_workers: int) -> DataLoader:
    """A DataLoader over ``MicroBatches``: no shuffling, no draw from the global torch RNG
    (its own generator), so worker processes only prefetch and never change the result."""
    items = MicroBatches(dataset, collate, order, env.rank, epoch, first, last)
    return DataLoader(items, batch_size=None, shuffle=False, num_workers=num_workers,
                      collate_fn=_identity, pin_memory=env.device.type == "cuda",
                      generator=torch.Generator().manual_seed(order.seed))
