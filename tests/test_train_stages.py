"""Both training stages on fiber-tiny-test and a few generated images: the data pipeline (pixels
as served, boxes and positive maps, seeded detection prompts), the Task objects (each stage's
loss finite and falling on a tiny overfit), the CLIs end to end (coarse -> fine via --init,
checkpoints + metrics.jsonl), their refusals (other config, bad data, nothing to resume), and
a 2-process torchrun of train.fine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fiber.config import get_config
from fiber.data.formats import load_detection, load_grounding
from fiber.data.synth import SynthConfig, generate
from runtime.preprocess import letterbox
from fiber.data.evaluation import load_image_rgb
from train import coarse, fine
from train.data import Stage2Options, load_stage1, load_stage2
from train.loop import TrainConfig
from train.tasks import CoarseTask, FineTask, load_init, model_config

ROOT = Path(__file__).resolve().parents[1]
CFG = get_config("fiber-tiny-test")
S = CFG.swin.img_size
TINY_RUN = ["--config", "fiber-tiny-test", "--max-steps", "2", "--batch-size", "4",
            "--log-every", "1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    generate(SynthConfig(images=8, seed=0, sizes=((160, 128), (128, 160))), out)
    return out


@pytest.fixture(scope="module")
def coarse_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "coarse"
    args = coarse.get_args_parser().parse_args(["--data", str(data_dir), "--out", str(out)] + TINY_RUN)
    assert coarse.main(args) == 0
    return out


def _fine(data_dir, out, *extra):
    args = fine.get_args_parser().parse_args(
        ["--data", str(data_dir), "--out", str(out)] + TINY_RUN + list(extra))
    return fine.main(args)


# ----------------------------------------------------------------------------- data


def test_cached_pixels_are_the_serving_letterbox(data_dir):
    data = load_stage1(data_dir, CFG)
    for i in range(len(data.cache)):
        want = np.zeros((3, S, S), np.float32)
        info = letterbox(load_image_rgb(data.cache.paths[i]), want, CFG.image_mean, CFG.image_std)
        got = data.cache.batch([i])[0].numpy()
        # uint8 storage rounds the bilinear value: < 0.5 / 255 / min(std) in normalised units
        np.testing.assert_allclose(got, want, atol=0.5 / 255 / min(CFG.image_std) + 1e-5)
        assert info.new_w < S or info.new_h < S
        assert not got[:, info.new_h:, :].any() and not got[:, :, info.new_w:].any()
    batch = data.collate([data[0], data[1]])
    assert batch["input_ids"][:, 0].tolist() == [101, 101]  # [CLS]
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() == batch["input_ids"].shape[1]
    assert (batch["input_ids"][torch.arange(2), lengths - 1] == 102).all()  # [SEP] ends each


def _token_texts(text, item, row):
    """The characters of the tokens a positive-map row marks (via a fresh tokenisation)."""
    from train.data import raw_tokenizer
    enc = raw_tokenizer().encode(text.lower())
    assert enc.ids == item.input_ids.tolist()
    return [text[s:e] for t, (s, e) in enumerate(enc.offsets) if row[t] > 0]


def test_grounding_samples_map_boxes_and_phrase_tokens(data_dir):
    data = load_stage2(data_dir, CFG, Stage2Options(detection=False))
    source = load_grounding(data_dir / "grounding.json")
    for i, s in enumerate(source.samples):
        item = data[i]
        scale = S / max(s.width, s.height)
        for phrase in s.phrases:
            for box in phrase.boxes:
                hits = np.abs(item.boxes - box * scale).max(1) < 1e-3
                assert hits.sum() == 1, (s.caption, phrase.text)
                words = _token_texts(s.caption, item, item.positive_map[hits][0])
                spans = [s.caption[a:b] for a, b in phrase.spans]
                assert words and all(any(w in sp for sp in spans) for w in words), (words, spans)
        assert len(item.boxes) == len({tuple(b) for p in s.phrases for b in p.boxes.tolist()})


def test_detection_prompts_are_seeded_and_name_their_boxes(data_dir):
    data = load_stage2(data_dir, CFG, Stage2Options(grounding=False))
    source = load_detection(data_dir / "detection.json")
    names = dict(source.categories)
    prompts = []
    for seed in (0, 0, 1, 2, 3):
        np.random.seed(seed)
        prompts.append([data[i].prompt for i in range(len(data))])
    assert prompts[0] == prompts[1] and len({tuple(p) for p in prompts}) > 2
    np.random.seed(5)
    for i, im in enumerate(source.images):
        item = data[i]
        scale = S / max(im.width, im.height)
        for box, cat in zip(im.boxes, im.category_ids.tolist()):
            hits = np.abs(item.boxes - box * scale).max(1) < 1e-3
            assert hits.sum() == 1  # every class fits the 32-token prompt of the tiny config
            assert "".join(_token_texts(item.prompt, item, item.positive_map[hits][0])) == \
                names[cat].replace(" ", "")


# ----------------------------------------------------------------------------- tasks


def _overfit(task, steps, lr):
    torch.manual_seed(0)
    model = task.build_model().eval()       # no dropout: the fall is the optimiser's
    model.backbone.set_gates(0.5)            # exercise the fused path
    np.random.seed(0)
    torch.manual_seed(0)
    batch = task.collate([task.dataset("train")[i] for i in range(4)])
    opt = torch.optim.AdamW([p for g in task.param_groups(model, TrainConfig()) for p in g["params"]],
                            lr=lr, weight_decay=0.0)
    history = []
    for step in range(steps):
        parts = task.loss(model, batch, step)
        assert all(torch.isfinite(v) for v in parts.values()), parts
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in parts.items()})
    return history


def test_coarse_task_losses_fall_on_a_tiny_overfit(data_dir):
    task = CoarseTask(CFG, load_stage1(data_dir, CFG))
    history = _overfit(task, 25, 2e-3)
    assert set(history[0]) == {"loss", "loss_itc", "loss_itm", "loss_mlm"}
    for k in history[0]:
        assert history[-1][k] < history[0][k], (k, history[0][k], history[-1][k])
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]


def test_fine_task_losses_fall_on_a_tiny_overfit(data_dir):
    task = FineTask(CFG, load_stage2(data_dir, CFG))
    history = _overfit(task, 25, 2e-3)
    assert set(history[0]) == {"loss", "loss_token", "loss_box", "loss_centerness"}
    for k in history[0]:
        assert history[-1][k] < history[0][k], (k, history[0][k], history[-1][k])
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]


def test_fine_param_groups_scale_the_text_tower(data_dir):
    from train.tasks import FineOptions
    task = FineTask(CFG, load_stage2(data_dir, CFG), options=FineOptions(text_lr_mult=0.1))
    model = task.build_model()
    names = {id(p): n for n, p in model.named_parameters()}
    for g in task.param_groups(model, TrainConfig()):
        for p in g["params"]:
            assert g["lr_mult"] == (0.1 if names[id(p)].startswith("backbone.text.") else 1.0)


def test_fine_param_groups_fusion_lr_mult_covers_both_towers_fusion(data_dir):
    """--fusion-lr-mult: every i2t / t2i parameter (image and text tower) at that multiplier,
    the rest of the text tower still at text_lr_mult."""
    from train.tasks import FineOptions
    task = FineTask(CFG, load_stage2(data_dir, CFG),
                    options=FineOptions(text_lr_mult=0.1, fusion_lr_mult=5.0))
    model = task.build_model()
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in task.param_groups(model, TrainConfig()):
        for p in g["params"]:
            n = names[id(p)]
            fused = "i2t" in n or "t2i" in n
            want = 5.0 if fused else 0.1 if n.startswith("backbone.text.") else 1.0
            assert g["lr_mult"] == want, n
            seen.add(("t2i" in n, "i2t" in n))
    assert (True, False) in seen and (False, True) in seen  # both towers' fusion present
    assert task.checkpoint_config()["stage"]["fusion_lr_mult"] == 5.0


def test_fine_param_groups_position_lr_mult(data_dir):
    import dataclasses
    from train.tasks import FineOptions
    cfg = CFG.replace(head=dataclasses.replace(CFG.head, position_features=True))
    task = FineTask(cfg, load_stage2(data_dir, cfg),
                    options=FineOptions(text_lr_mult=0.1, position_lr_mult=10.0))
    model = task.build_model()
    names = {id(p): n for n, p in model.named_parameters()}
    mults = {names[id(p)]: g["lr_mult"] for g in task.param_groups(model, TrainConfig()) for p in g["params"]}
    assert mults.pop("head.position_text") == 10.0
    assert set(mults.values()) == {0.1, 1.0}


def test_position_from_relations_trains_position_text_only_on_relation_samples(data_dir):
    """--position-from-relations: a batch without relation or superlative text sends no gradient to
    the head's position_text, one with them does; the rest of the model learns from both, and
    the mask is cleared after the forward pass."""
    import dataclasses
    from train.tasks import FineOptions
    cfg = CFG.replace(head=dataclasses.replace(CFG.head, position_features=True))
    data = load_stage2(data_dir, cfg, Stage2Options(detection=False))
    task = FineTask(cfg, data, options=FineOptions(position_from_relations=True))
    model = task.build_model().train()
    with torch.no_grad():
        model.head.position_text.normal_()  # a non-zero map, so the text side gets gradient too
    rel = [i for i, s in enumerate(data.grounding) if s.has_relation][:2]
    plain = [i for i, s in enumerate(data.grounding) if not s.has_relation][:2]
    grads = []
    for idx in (plain, rel):
        model.zero_grad()
        batch = task.collate([data[i] for i in idx])
        assert batch["has_relation"].tolist() == [bool(idx is rel)] * 2
        task.loss(model, batch, 0)["loss"].backward()
        assert model.head.position_grad_mask is None
        grads.append((model.head.position_text.grad.norm().item(),
                      model.head.dot_product_projection_text.weight.grad.norm().item()))
    assert grads[0][0] == 0.0 and grads[1][0] > 0
    assert grads[0][1] > 0 and grads[1][1] > 0


@pytest.mark.parametrize("flag", [["--position-aux", "1"], ["--position-from-relations"],
                                  ["--position-lr-mult", "10"]])
def test_position_flags_need_a_config_with_position_features(flag, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _fine(data_dir, out, "--init", "none", *flag) == 2
    err = capsys.readouterr().err.strip()
    assert flag[0] in err and "position_features" in err and "\n" not in err
    assert not out.exists()


def test_side_named_reads_the_synthetic_relations_and_superlatives():
    from train.data import SIDES, side_named
    cases = {"the leftmost red star": "left", "the red star to the left of the blue ring": "left",
             "the red star that is right of the big ring": "right", "the topmost ring": "above",
             "the red star above the ring": "above", "the lowest pink moon": "below",
             "the blue ring under the red star": "below", "the rightmost star": "right"}
    for text, side in cases.items():
        assert side_named(text) == SIDES.index(side), text
    assert side_named("two red stars and a leftover ring") == -1


def test_position_loss_pulls_side_phrases_their_way_and_others_to_zero(data_dir):
    import dataclasses
    from train.tasks import POSITION_TARGET, FineOptions, position_loss
    maps = [torch.tensor([[0.0, 1.0, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0, 0.0]])]
    side = torch.tensor([0, -1])  # sample 0 names "left", sample 1 no side
    q = torch.zeros(2, 4, 2)
    assert position_loss(q, maps, side).item() == pytest.approx(0.5)  # 1 for sample 0, 0 for 1
    q[0, 1:3] = torch.tensor([-POSITION_TARGET, 0.0])
    assert position_loss(q, maps, side).item() == pytest.approx(0.0)
    q[0, 0] = 5.0  # a token outside every phrase does not count
    q[1, 1] = torch.tensor([0.0, POSITION_TARGET])
    assert position_loss(q, maps, side).item() == pytest.approx(0.5)
    # in a training step: logged as loss_position, side phrases of the batch from the captions
    cfg = CFG.replace(head=dataclasses.replace(CFG.head, position_features=True))
    data = load_stage2(data_dir, cfg, Stage2Options(detection=False))
    task = FineTask(cfg, data, options=FineOptions(position_aux=1.0))
    model = task.build_model().train()
    rel = [i for i, s in enumerate(data.grounding) if s.has_relation][:2]
    batch = task.collate([data[i] for i in rel])
    assert (batch["side"] >= 0).all()
    losses = task.loss(model, batch, 0)
    assert losses["loss_position"].item() == pytest.approx(1.0)  # q starts at zero
    losses["loss"].backward()
    assert model.head.position_text.grad.norm() > 0


def test_relation_repeat_repeats_only_relation_entries(data_dir):
    plain = load_stage2(data_dir, CFG)
    rel = [s for s in plain.grounding if s.has_relation]
    assert rel, "the synthetic data has relation entries"
    twice = load_stage2(data_dir, CFG, Stage2Options(relation_repeat=3))
    assert len(twice) == len(plain) + 2 * len(rel)
    ids = [s.id for s in twice.grounding]
    assert ids[:len(plain.grounding)] == [s.id for s in plain.grounding]
    assert ids[len(plain.grounding):] == [s.id for s in rel] * 2
    extra = len(plain.grounding)  # a repeated entry gives the same sample as its original
    first = ids.index(ids[extra])
    a, b = twice[first], twice[extra]
    assert a.prompt == b.prompt and np.array_equal(a.boxes, b.boxes) and a.image == b.image
    with pytest.raises(ValueError, match="relation-repeat"):
        load_stage2(data_dir, CFG, Stage2Options(relation_repeat=0))


def test_late_fusion_config_has_no_fused_layers():
    late = model_config("fiber-tiny-test", late_fusion=True)
    assert late == model_config("fiber-tiny-test-late")
    assert late.name == "fiber-tiny-test-late" and late.fusion.num_fused_layers == 0
    assert late.replace(name=CFG.name, fusion=CFG.fusion) == CFG  # everything else identical
    from fiber.models import FiberForGrounding
    assert not [n for n, _ in FiberForGrounding(late).named_parameters() if "i2t" in n or "t2i" in n]


# ----------------------------------------------------------------------------- CLIs


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_coarse_then_fine_end_to_end(coarse_run, data_dir, tmp_path):
    for run, task in ((coarse_run, "coarse"), (tmp_path / "fine", "fine")):
        if task == "fine":
            assert _fine(data_dir, run, "--init", str(coarse_run)) == 0
        recs = _records(run)
        assert [r["step"] for r in recs] == [1, 2]
        assert all(np.isfinite(r["loss"]) for r in recs)
        assert (run / "checkpoints/step-0000002/model.safetensors").is_file()
        meta = json.loads((run / "final/config.json").read_text())
        assert meta["task"] == task and meta["model"]["name"] == "fiber-tiny-test"
    keys = set(_records(coarse_run)[0]) & {"loss_itc", "loss_itm", "loss_mlm"}
    assert len(keys) == 3
    # --init: the coarse backbone goes in, coarse heads stay out, FPN/head are fresh
    from safetensors.torch import load_file
    state, report = load_init(coarse_run, CFG)
    coarse_final = load_file(str(coarse_run / "final/model.safetensors"))
    assert all(k.startswith("backbone.") for k in state)
    assert all(torch.equal(state[k], coarse_final[k]) for k in state)
    assert "itm_score.fc.weight" in report.dropped and any(k.startswith("head.") for k in report.fresh)


def test_init_grows_into_position_features_and_nothing_else(coarse_run):
    """A checkpoint without the head's position features initialises a config that adds them (the
    new parameter starts at zero); any other difference is still refused."""
    import dataclasses
    from fiber.checkpoint import CheckpointError
    grown = CFG.replace(head=dataclasses.replace(CFG.head, position_features=True))
    state, report = load_init(coarse_run, grown)
    assert "head.position_text" in report.fresh and state.keys() == load_init(coarse_run, CFG)[0].keys()
    other = grown.replace(head=dataclasses.replace(grown.head, num_convs=CFG.head.num_convs + 1))
    with pytest.raises(CheckpointError, match="differs from the registered"):
        load_init(coarse_run, other)


def test_fine_refuses_an_init_of_another_config(coarse_run, data_dir, tmp_path, capsys):
    out = tmp_path / "late"
    assert _fine(data_dir, out, "--init", str(coarse_run), "--late-fusion") == 2
    err = capsys.readouterr().err.strip()
    assert "'fiber-tiny-test'" in err and "'fiber-tiny-test-late'" in err and "\n" not in err
    assert not out.exists()


def test_fine_only_from_scratch_runs(data_dir, tmp_path):
    assert _fine(data_dir, tmp_path / "scratch", "--init", "none") == 0
    assert json.loads((tmp_path / "scratch/final/config.json").read_text())["stage"]["init"] == "none"


@pytest.mark.parametrize("problem", ["missing_dir", "malformed_json", "missing_image"])
def test_bad_data_is_one_clear_line_and_writes_nothing(problem, data_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    if problem != "missing_dir":
        import shutil
        shutil.copytree(data_dir, bad)
        if problem == "malformed_json":
            (bad / "grounding.json").write_text('{"images": [')
        else:
            (bad / "images/000003.png").unlink()
    out = tmp_path / "run"
    assert _fine(bad, out, "--init", "none") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.fine: error:") and "\n" not in err
    assert {"missing_dir": "no such data folder", "malformed_json": "grounding.json",
            "missing_image": "000003.png"}[problem] in err
    assert not out.exists()


def test_resume_with_nothing_to_resume_and_coarse_batch_of_one(data_dir, tmp_path, capsys):
    assert _fine(data_dir, tmp_path / "empty", "--init", "none", "--resume") == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    args = coarse.get_args_parser().parse_args(
        ["--data", str(data_dir), "--out", str(tmp_path / "c")] + TINY_RUN + ["--batch-size", "1"])
    assert coarse.main(args) == 2
    assert "at least 2 pairs" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_fine_refuses_a_finished_run_and_text_init_that_does_not_fit(coarse_run, data_dir, tmp_path, capsys):
    assert _fine(data_dir, coarse_run, "--init", "none") == 2   # out already holds a run
    assert "already holds a run" in capsys.readouterr().err
    assert _fine(data_dir, tmp_path / "m", "--init", "none", "--text-init", "minilm") == 2
    assert "minilm" in capsys.readouterr().err.lower()
    assert not (tmp_path / "m" / "final").exists()


@pytest.mark.parametrize("stage", [coarse, fine])
def test_resumed_stage_ends_with_the_same_weights(stage, data_dir, tmp_path):
    """Stop after 2 steps, resume to 4: bitwise the weights (incl. the ITC queue) of a straight
    4-step run. Detection prompts, MLM masks, hard negatives and dropout all draw randomness."""
    from safetensors.torch import load_file
    extra = ["--init", "none"] if stage is fine else []
    common = ["--config", "fiber-tiny-test", "--batch-size", "4", "--schedule", "constant",
              "--warmup-steps", "0", "--no-progress", "--data", str(data_dir)] + extra

    def run(out, steps, *more):
        args = stage.get_args_parser().parse_args(common + ["--out", str(out), "--max-steps", str(steps), *more])
        assert stage.main(args) == 0

    run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    with pytest.warns(UserWarning, match="max_steps"):
        run(tmp_path / "resumed", 4, "--resume")
    a = load_file(str(tmp_path / "straight/final/model.safetensors"))
    b = load_file(str(tmp_path / "resumed/final/model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fine_under_torchrun_two_processes(coarse_run, data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train.fine", "--data", str(data_dir), "--out", str(out), "--init", str(coarse_run),
           *TINY_RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("init from") == 1  # the note comes from rank 0 only
    assert [r["step"] for r in _records(out)] == [1, 2]
    state = json.loads((out / "checkpoints/step-0000002/trainer_state.json").read_text())["state"]
    assert state["world_size"] == 2
    assert (out / "final/model.safetensors").is_file()
