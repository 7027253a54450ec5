"""Two processes under torchrun (gloo, CPU): the run is killed, resumed, writes one set of files,
the ranks end in sync, and the result equals one process with the same global batch (world 2 x
accum 1 == world 1 x accum 2: the same samples per step, see train/distributed.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _toy_task import ToyTask, tiny_config
from train import checkpointing as ckpt
from train.loop import fit

ROOT = Path(__file__).resolve().parents[1]
TASK = dict(aug_noise=0.1)  # no dropout: its RNG is per rank, so it would differ from 1 process
CFG = dict(max_steps=6, ema_decay=0.9, ckpt_every=2)


def _torchrun(out: Path, dump: Path, cfg: dict, task: dict, resume: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests/_toy_task.py"), "--out", str(out), "--dump", str(dump),
           "--cfg", json.dumps(cfg), "--task", json.dumps(task)] + (["--resume"] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_two_process_run_resumes_and_matches_one_process(tmp_path):
    ref = fit(ToyTask(**TASK), tiny_config(**CFG, grad_accum=2), tmp_path / "single")

    run, dump = tmp_path / "ddp", tmp_path / "dump"
    crashed = _torchrun(run, dump, CFG, {**TASK, "crash_at": 3}, resume=False)
    assert crashed.returncode != 0, crashed.stderr[-2000:]
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    done = _torchrun(run, dump, CFG, TASK, resume=True)
    assert done.returncode == 0, done.stderr[-3000:]

    # ranks in sync, and equal to the single process up to float summation order
    r0, r1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    want = ref.model.state_dict()
    for k in want:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], want[k], atol=1e-5, rtol=1e-4)
    final = load_file(str(run / "final/model.safetensors"))  # the EMA, written once by rank 0
    single = load_file(str(tmp_path / "single/final/model.safetensors"))
    for k in single:
        torch.testing.assert_close(final[k], single[k], atol=1e-5, rtol=1e-4)

    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # one writer, cut back to the checkpoint on resume
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4, 6]
    state = ckpt.load_step(run / "checkpoints/step-0000006")["trainer_state"]
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not list(run.rglob(".*"))  # no temp folders left behind
