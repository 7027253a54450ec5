"""Exact resume: a run killed after a checkpoint and resumed ends bitwise equal to one that was
never interrupted (model, EMA, optimiser state, metrics), with accumulation, EMA, dropout, data
augmentation and epoch boundaries in play."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from _toy_task import ToyCrash, ToyTask, tiny_config
from train import checkpointing as ckpt
from train.loop import TrainingError, fit

# 40 samples / 8 per step = 5 steps per epoch, so 12 steps cross two epoch boundaries
TASK = dict(dropout=0.2, aug_noise=0.1)
CFG = dict(max_steps=12, grad_accum=2, ema_decay=0.95, ckpt_every=3, warmup_steps=2,
           schedule="cosine")


def _tensors(run, name):
    return load_file(str(run / "checkpoints/step-0000012" / name))


def _records(run):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")} for r in recs]


def _assert_same_run(a, b):
    for name in ("model.safetensors", "ema.safetensors", "trainer_state.safetensors"):
        ta, tb = _tensors(a, name), _tensors(b, name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}:{k}"
    assert _records(a) == _records(b)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    fit(ToyTask(**TASK), tiny_config(**CFG), run)
    return run


def test_resume_is_exact(uninterrupted, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ToyCrash):  # dies in step 8, after the step-6 checkpoint and 7 log lines
        fit(ToyTask(crash_at=7, **TASK), tiny_config(**CFG), run)
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()][-1] == 7
    res = fit(ToyTask(**TASK), tiny_config(**CFG), run, resume=True)
    assert res.step == 12
    _assert_same_run(uninterrupted, run)  # includes metrics.jsonl cut back to step 6, then 7..12
    ref, got = load_file(str(uninterrupted / "final/model.safetensors")), load_file(str(run / "final/model.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_resume_is_not_trivially_equal(uninterrupted, tmp_path):
    """Control: a different seed gives different weights, so the equality above means something."""
    run = tmp_path / "run"
    fit(ToyTask(**TASK), tiny_config(**{**CFG, "seed": 1}), run)
    a, b = _tensors(uninterrupted, "model.safetensors"), _tensors(run, "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def _toy_cli(run, dump, task: dict, cfg: dict, resume: bool = False):
    """One ToyTask training in a fresh interpreter through tests/_toy_task.py (exit 3 = ToyCrash)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "tests/_toy_task.py"), "--out", str(run), "--dump", str(dump),
           "--task", json.dumps(task), "--cfg", json.dumps(cfg)] + (["--resume"] if resume else [])
    env = {**os.environ, "PYTHONPATH": str(repo)}
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)


def test_worker_processes_and_resume_keep_the_data_order(uninterrupted, tmp_path):
    """DataLoader worker processes (fork) only prefetch: the crashed-and-resumed run with 2 workers
    equals the uninterrupted one without. It trains in a fresh interpreter, as the CLIs do: forking
    workers from this pytest process, after other tests loaded OpenVINO / ONNX Runtime / modelopt
    (their thread pools), crashed the parent with SIGSEGV in CI."""
    run, dump = tmp_path / "run", tmp_path / "dump"
    cfg = {**CFG, "num_workers": 2}
    crashed = _toy_cli(run, dump, {**TASK, "crash_at": 4}, cfg)
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    resumed = _toy_cli(run, dump, TASK, cfg, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(uninterrupted, run)


def test_resume_of_a_finished_run_is_a_no_op(uninterrupted, tmp_path):
    task = ToyTask(**TASK)
    res = fit(task, tiny_config(**CFG), uninterrupted, resume=True)
    assert res.step == 12 and task.steps_seen == []
    assert [s for s, _ in ckpt.list_checkpoints(uninterrupted)][-1] == 12


def test_resume_refuses_a_changed_batch_size(tmp_path):
    run = tmp_path / "run"
    fit(ToyTask(), tiny_config(max_steps=2), run)
    with pytest.raises(TrainingError, match="batch_size=8, now 16"):
        fit(ToyTask(), tiny_config(max_steps=4, batch_size=16), run, resume=True)
