"""train/loop.py and helpers on a toy regression task (CPU, each test well under a few seconds)."""
from __future__ import annotations

import argparse
import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _toy_task import ToyCrash, ToyTask, tiny_config
from train import checkpointing as ckpt
from train import loop
from train.distributed import DataOrder, epoch_permutation
from train.loop import (NonFiniteLossError, TrainConfig, TrainingError, TrainingOutOfMemoryError,
                        add_train_args, fit, resolve_amp, train_config_from_args)
from train.schedule import clip_and_norm, lr_factor


def _weights(path):
    return load_file(str(path / "model.safetensors"))


# ---- schedule --------------------------------------------------------------------------------

def test_lr_schedules_by_hand():
    kw = dict(max_steps=10, warmup=2)
    f = lambda s, name, **extra: lr_factor(s, schedule=name, **{**kw, **extra})  # noqa: E731
    assert [f(s, "linear") for s in (0, 1, 2, 6, 9)] == pytest.approx([0.5, 1, 1, 0.5, 0.125])
    assert f(6, "cosine") == pytest.approx(0.5) and f(2, "cosine") == pytest.approx(1.0)
    assert f(5, "constant") == 1.0
    ms = dict(warmup=0, milestones=(0.5, 0.8), gamma=0.1)
    assert [f(s, "multistep", **ms) for s in (4, 5, 7, 8)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert f(0, "linear", warmup=4, warmup_start=1e-3) == pytest.approx(1e-3 + 0.999 / 4)


# ---- data order ------------------------------------------------------------------------------

def test_epoch_permutation_is_seeded_and_changes_per_epoch():
    a, b = epoch_permutation(0, 0, 50), epoch_permutation(0, 1, 50)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, epoch_permutation(0, 0, 50))
    assert not np.array_equal(a, b) and not np.array_equal(a, epoch_permutation(1, 0, 50))


def test_chunks_cover_the_global_batch_for_any_world_size():
    perm = epoch_permutation(3, 0, 40)
    for step in range(5):
        want = sorted(perm[step * 8:(step + 1) * 8].tolist())
        for world, accum in ((1, 1), (1, 2), (2, 1), (2, 2), (4, 2)):
            order = DataOrder(40, 8, world, accum, 3)
            got = [order.chunk(perm, step, m, r) for m in range(accum) for r in range(world)]
            assert sorted(i for idx, _ in got for i in idx) == want
            assert sorted(c for _, c in got) == list(range(world * accum))  # chunk ids are global


def test_data_order_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        DataOrder(40, 8, 1, 3, 0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        DataOrder(5, 8, 1, 1, 0)


# ---- the loop --------------------------------------------------------------------------------

def test_loss_falls_and_metrics_are_logged(tmp_path):
    res = fit(ToyTask(), tiny_config(max_steps=30, log_every=5, ckpt_every=0), tmp_path / "run")
    recs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "mse", "aux", "lr", "grad_norm", "samples_per_s", "elapsed_s", "epoch"):
        assert all(math.isfinite(r[key]) for r in recs), key
    first = fit(ToyTask(), tiny_config(max_steps=1), tmp_path / "one").metrics["loss"]
    assert recs[-1]["loss"] < first / 3
    assert res.step == 30 and (res.final_dir / "model.safetensors").exists()


def test_loss_gets_the_step_number(tmp_path):
    task = ToyTask()
    fit(task, tiny_config(max_steps=3, grad_accum=2), tmp_path / "run")
    assert task.steps_seen == [0, 0, 1, 1, 2, 2]


def test_accumulation_equals_the_full_batch(tmp_path):
    runs = [fit(ToyTask(), tiny_config(grad_accum=a), tmp_path / f"a{a}") for a in (1, 2, 4)]
    ref = runs[0].model.state_dict()
    for r in runs[1:]:
        for k, v in r.model.state_dict().items():
            torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=1e-5)


def test_grad_norm_is_the_unclipped_norm_of_the_batch_gradient(tmp_path):
    task = ToyTask(n=8)  # one batch = the whole set, so the data order cannot matter
    res = fit(task, tiny_config(max_steps=1, clip_grad=1e-3), tmp_path / "run")
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.collate(task.dataset("train"))
    task.loss(model, batch, 1)["loss"].backward()
    want = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert res.metrics["grad_norm"] == pytest.approx(float(want), rel=1e-5)
    assert res.metrics["grad_norm"] > 1e-3  # so clipping was active


def test_clip_and_norm_clips():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert clip_and_norm([p], None) == pytest.approx(5.0) and p.grad.norm() == pytest.approx(5.0)
    assert clip_and_norm([p], 1.0) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)


def test_param_group_lr_multipliers_and_decay(tmp_path):
    fit(ToyTask(), tiny_config(max_steps=2, schedule="constant"), tmp_path / "run")
    groups = ckpt.load_step(tmp_path / "run/checkpoints/step-0000002")[
        "trainer_state"]["optimizer"]["param_groups"]
    by_mult = {(g["lr_mult"], g["weight_decay"]): g["lr"] for g in groups}
    assert by_mult == {(1.0, 0.0): 0.01, (1.0, 0.01): 0.01, (2.0, 0.0): 0.02, (2.0, 0.01): 0.02}


def test_ema_follows_its_formula_and_is_exported(tmp_path):
    task = ToyTask()
    fit(task, tiny_config(max_steps=2, ckpt_every=1, ema_decay=0.9), tmp_path / "run")
    torch.manual_seed(0)
    w0 = task.build_model().state_dict()
    w1 = _weights(tmp_path / "run/checkpoints/step-0000001")
    w2 = _weights(tmp_path / "run/checkpoints/step-0000002")
    ema = load_file(str(tmp_path / "run/checkpoints/step-0000002/ema.safetensors"))
    for k in w0:
        torch.testing.assert_close(ema[k], 0.81 * w0[k] + 0.09 * w1[k] + 0.1 * w2[k])
        assert not torch.equal(ema[k], w2[k])
    final = _weights(tmp_path / "run/final")
    assert all(torch.equal(final[k], ema[k]) for k in ema)
    assert json.loads((tmp_path / "run/final/config.json").read_text())["weights"] == "ema"


def test_checkpoint_layout_is_pickle_free(tmp_path):
    fit(ToyTask(), tiny_config(max_steps=2, ema_decay=0.99), tmp_path / "run")
    d = tmp_path / "run/checkpoints/step-0000002"
    assert {p.name for p in d.iterdir()} == {"model.safetensors", "ema.safetensors", "config.json",
                                             "trainer_state.json", "trainer_state.safetensors"}
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step-0000002"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["format"] == "fiber-edge-checkpoint" and cfg["task"] == "toy" and cfg["step"] == 2
    state = json.loads((d / "trainer_state.json").read_text())["state"]
    assert state["data"] == {"epoch": 0, "step_in_epoch": 2, "dataset_len": 40, "batch_size": 8,
                             "seed": 0}
    tensors = load_file(str(d / "trainer_state.safetensors"))
    assert tensors["state.rng.0.torch_cpu"].dtype == torch.uint8
    assert any(k.startswith("state.optimizer.state.") and k.endswith("exp_avg_sq") for k in tensors)
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".*"))


def test_keep_last(tmp_path):
    fit(ToyTask(), tiny_config(max_steps=8, ckpt_every=2, keep_last=2), tmp_path / "run")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [6, 8]
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step-0000008"


def test_fresh_run_refuses_an_existing_run(tmp_path):
    fit(ToyTask(), tiny_config(max_steps=2), tmp_path / "run")
    before = _weights(tmp_path / "run/final")
    with pytest.raises(TrainingError, match="already holds a run.*--resume"):
        fit(ToyTask(), tiny_config(max_steps=2, lr=0.5), tmp_path / "run")
    after = _weights(tmp_path / "run/final")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_with_nothing_to_resume(tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint to resume"):
        fit(ToyTask(), tiny_config(), tmp_path / "empty", resume=True)
    assert not (tmp_path / "empty").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"step 5 \(loss=nan.*mse=nan.*step-0000004"):
        fit(ToyTask(nan_at=4), tiny_config(max_steps=8), tmp_path / "run")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2, 4]
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "run/checkpoints/step-0000004").values())
    assert not (tmp_path / "run/final").exists()


def test_out_of_memory_gives_advice_and_keeps_checkpoints(tmp_path):
    with pytest.raises(TrainingOutOfMemoryError, match="step 4 .*--grad-accum"):
        fit(ToyTask(oom_at=3), tiny_config(max_steps=8), tmp_path / "run")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2]


def test_amp_modes_on_cpu(monkeypatch):
    assert resolve_amp("auto", torch.device("cpu")) is None
    assert resolve_amp("off", torch.device("cpu")) is None
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_amp("fp16", torch.device("cpu"))


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16.*use --amp off"):
        assert resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16


def test_cpu_has_native_bf16_reads_the_flags():
    assert loop.cpu_has_native_bf16("flags\t: fpu avx2 avx512f avx512_bf16 amx_tile")
    assert loop.cpu_has_native_bf16("flags : fpu amx_bf16 amx_int8")
    assert not loop.cpu_has_native_bf16("flags\t: fpu sse4_2 avx2 fma avx512f avx512_vnni")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 AMP and CUDA autocast)")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_gpu_trains_and_resumes(tmp_path, amp):
    cfg = tiny_config(device="cuda", amp=amp, ema_decay=0.9)
    with pytest.raises(ToyCrash):
        fit(ToyTask(crash_at=3), cfg, tmp_path / "run")
    res = fit(ToyTask(), cfg, tmp_path / "run", resume=True)
    assert res.step == 6 and math.isfinite(res.metrics["loss"])
    assert next(res.model.parameters()).device.type == "cuda"
    state = ckpt.load_step(tmp_path / "run/checkpoints/step-0000006")["trainer_state"]
    assert (state["scaler"] is not None) == (amp == "fp16")


def test_bf16_autocast_on_cpu_trains_and_resumes(tmp_path):
    cfg = tiny_config(amp="bf16", ema_decay=0.9)
    with pytest.raises(ToyCrash):
        fit(ToyTask(crash_at=3), cfg, tmp_path / "run")
    res = fit(ToyTask(), cfg, tmp_path / "run", resume=True)
    assert res.step == 6 and math.isfinite(res.metrics["loss"])
    # master weights stay fp32; only the autocast region computes in bf16
    assert all(p.dtype == torch.float32 for p in res.model.parameters())


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"max_step": 3})


def test_cli_arguments_round_trip():
    parser = argparse.ArgumentParser()
    add_train_args(parser, TrainConfig(lr=3e-4))
    cfg = train_config_from_args(parser.parse_args(
        ["--max-steps", "5", "--ema-decay", "0.99", "--no-progress", "--betas", "0.9", "0.98",
         "--clip-grad", "none", "--schedule", "cosine"]))
    assert (cfg.max_steps, cfg.ema_decay, cfg.progress, cfg.betas, cfg.clip_grad, cfg.schedule,
            cfg.lr) == (5, 0.99, False, (0.9, 0.98), None, "cosine", 3e-4)


def test_nested_state_round_trip():
    state = {"state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}},
             "groups": [{"betas": (0.9, 0.98), "params": [0], "x": None}]}
    tensors: dict = {}
    meta = json.loads(json.dumps(ckpt.to_json_and_tensors(state, "s", tensors)))
    back = ckpt.from_json_and_tensors(meta, tensors)
    assert back["groups"] == state["groups"] and list(back["state"]) == [0]
    assert torch.equal(back["state"][0]["m"], state["state"][0]["m"])
