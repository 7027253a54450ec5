"""Checkpoints without pickle: safetensors for tensors, JSON for structure and scalars.

Layout of a run folder::

    RUN/checkpoints/step-0000100/   model.safetensors, ema.safetensors (when EMA is on),
                                    config.json, trainer_state.json, trainer_state.safetensors
    RUN/checkpoints/latest          "step-0000100\\n" (written after the folder is complete)
    RUN/final/                      model.safetensors, config.json (the "checkpoint" artefact)

Both folders are written by ``fiber.checkpoint.write_checkpoint`` (the one checkpoint writer); a
step folder adds the EMA weights and the trainer state to it.

Nested state (optimiser, grad scaler, RNG) is split by ``to_json_and_tensors`` into a JSON tree
where each tensor is replaced by ``{"__tensor__": key}`` and a flat ``{key: tensor}`` dict.
Each folder is written into a temporary sibling and renamed (``common.atomic.atomic_dir``), so a
``step-*`` folder is either complete or absent; "latest" is resolved by scanning for the highest
step, the pointer file is for people and other tools.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from common.atomic import atomic_write_text
from fiber.checkpoint import save_tensors, write_checkpoint

TRAINER_STATE_FORMAT = "fiber-edge-trainer-state"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


# ---- nested state <-> (JSON, flat tensors) ------------------------------------------------

def to_json_and_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of ``obj`` with tensors moved into ``tensors`` under ``prefix.path`` keys.

    Handles dicts (str or int keys), lists, tuples, tensors and JSON scalars; int-keyed dicts
    and tuples are tagged so ``from_json_and_tensors`` restores them exactly.
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) for k in obj):
            return {"__intkeys__": {str(k): to_json_and_tensors(v, f"{prefix}.{k}", tensors)
                                    for k, v in obj.items()}}
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"{prefix}: dict keys must be all str or all int")
        return {k: to_json_and_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_json_and_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{prefix}: cannot store a {type(obj).__name__} without pickle")


def from_json_and_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``to_json_and_tensors``."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__intkeys__"}:
            return {int(k): from_json_and_tensors(v, tensors) for k, v in obj["__intkeys__"].items()}
        if set(obj) == {"__tuple__"}:
            return tuple(from_json_and_tensors(v, tensors) for v in obj["__tuple__"])
        return {k: from_json_and_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json_and_tensors(v, tensors) for v in obj]
    return obj


# ---- RNG states ---------------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    """This process's RNG states: torch CPU/CUDA as uint8 tensors, python/numpy as JSON-able."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


# ---- folders ------------------------------------------------------------------------------

def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, ``[(step, path)]`` sorted by step (temp folders ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def checkpoint_config(task_config: dict, step: int, weights: str) -> dict:
    """config.json's entries after the format header (``write_checkpoint`` adds it): what the task
    supplies (e.g. "model", "task"), the step and which weights ("model" or "ema")."""
    clash = {"format", "format_version", "step", "weights"} & set(task_config)
    if clash:
        raise ValueError(f"task checkpoint config must not set reserved keys {sorted(clash)}")
    return {**task_config, "step": step, "weights": weights}


def save_step(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
              ema_state: dict[str, torch.Tensor] | None, config: dict,
              trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Write ``RUN/checkpoints/step-NNNNNNN`` atomically, update ``latest``, prune old ones.

    ``trainer_state`` may hold tensors anywhere (they go to trainer_state.safetensors). Older
    checkpoints are deleted only after the new one is complete; ``keep_last`` <= 0 keeps all.
    """
    root = Path(run_dir) / "checkpoints"
    path = root / step_dir_name(step)
    tensors: dict[str, torch.Tensor] = {}
    meta = to_json_and_tensors(trainer_state, "state", tensors)
    meta = {"format": TRAINER_STATE_FORMAT, "format_version": FORMAT_VERSION, "state": meta}

    def trainer_files(tmp: Path) -> None:
        if ema_state is not None:
            save_tensors(tmp / "ema.safetensors", ema_state)
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1) + "\n")
        save_tensors(tmp / "trainer_state.safetensors", tensors)

    write_checkpoint(path, model_state, config, overwrite=True, extra_files=trainer_files)
    atomic_write_text(root / "latest", path.name + "\n")
    if keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_step(path: str | Path) -> dict[str, Any]:
    """Read a step checkpoint folder: ``{"model", "ema" (or None), "config", "trainer_state"}``."""
    path = Path(path)
    meta = json.loads((path / "trainer_state.json").read_text())
    if meta.get("format") != TRAINER_STATE_FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}/trainer_state.json: not a {TRAINER_STATE_FORMAT} "
                         f"v<={FORMAT_VERSION} file")
    tensors = load_file(str(path / "trainer_state.safetensors"))
    ema = path / "ema.safetensors"
    return {
        "model": load_file(str(path / "model.safetensors")),
        "ema": load_file(str(ema)) if ema.exists() else None,
        "config": json.loads((path / "config.json").read_text()),
        "trainer_state": from_json_and_tensors(meta["state"], tensors),
    }


class MetricsLog:
    """``RUN/metrics.jsonl``: one JSON object per logged step, appended and flushed (rank 0).

    On resume the file is first cut back (atomically) to the records with ``step <= resume_step``
    so a run that died after its last checkpoint does not log those steps twice; a torn last
    line from a crash is dropped too.
    """

    def __init__(self, path: str | Path, enabled: bool, resume_step: int | None = None):
        self.path = Path(path)
        self._f = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            atomic_write_text(self.path, "".join(_records_up_to(self.path, resume_step)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _records_up_to(path: Path, step: int) -> list[str]:
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn write from a crash
        if isinstance(rec, dict) and rec.get("step", step + 1) <= step:
            keep.append(line + "\n")
    return keep
