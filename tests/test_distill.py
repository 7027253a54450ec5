"""compress.distill on tiny models: teacher = fiber-tiny-test (a random model with fused gates
open and a spread-out head, so it has confident anchors), student = a smaller tiny config
registered here. Checks the KD formulas against hand-written ones, that the terms vanish for a
student that equals its teacher and fall on a tiny overfit, the teacher -> student tensor copy,
exact resume through the CLI, a RUN/final that loads as the plain student, and the refusals."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from compress import distill
from compress.distill import (DistillOptions, DistillStudent, DistillTask, FeatureProjections,
                              KDWeights, bernoulli_kl, distillation_losses, init_from_teacher,
                              logit_kd, parse_kd_weights)
from fiber.checkpoint import save_checkpoint
from fiber.config import FusionConfig, get_config, register_config
from fiber.data.synth import SynthConfig, generate
from fiber.models import FiberForGrounding
from train.data import load_stage2
from fiber.checkpoint import load_fine_model

TEACHER = get_config("fiber-tiny-test")
# Narrower Swin (4 vs 8), 3 text layers (vs 4), K = 2 (vs 3); same input, strides, head, tokenizer.
STUDENT = register_config(dataclasses.replace(
    TEACHER, name="fiber-tiny-test-student",
    swin=dataclasses.replace(TEACHER.swin, embed_dim=4, depths=(2, 2, 1, 1), num_heads=(1, 1, 2, 2)),
    text=dataclasses.replace(TEACHER.text, num_layers=3),
    fusion=FusionConfig(num_fused_layers=2)))
KD_KEYS = {"kd_logits", "kd_box", "kd_ctr", "kd_feat"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher(seed: int = 0) -> FiberForGrounding:
    """A random fiber-tiny-test with open gates and a head whose probabilities and boxes spread."""
    torch.manual_seed(seed)
    t = FiberForGrounding(TEACHER)
    t.backbone.set_gates(0.5)
    with torch.no_grad():
        t.head.bias0.fill_(0.0)
        t.head.log_scale.fill_(-1.0)
        t.head.bbox_pred.weight.normal_(0, 0.1)
        t.head.centerness.weight.normal_(0, 0.3)
    return t.eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    generate(SynthConfig(images=8, seed=0, sizes=((160, 128), (128, 160))), out)
    return out


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "final"
    save_checkpoint(path, _teacher().state_dict(), TEACHER, {"task": "fine"})
    return path


def _batch(task, n=4):
    np.random.seed(0)
    return task.collate([task.dataset("train")[i] for i in range(n)])


# ----------------------------------------------------------------------------- formulas


def test_kd_formulas_match_hand_written_ones():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 3, generator=g) * 3, torch.randn(2, 5, 3, generator=g) * 3
    q, p = s.double().sigmoid(), t.double().sigmoid()
    kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    torch.testing.assert_close(bernoulli_kl(s, t).double(), kl, rtol=1e-4, atol=1e-6)
    assert (bernoulli_kl(s, t) > -1e-6).all() and bernoulli_kl(t, t).abs().max() < 1e-6

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    tau, beta = 2.0, 2.0
    qt, pt = (s.double() / tau).sigmoid(), (t.double() / tau).sigmoid()
    bce = -(pt * qt.log() + (1 - pt) * (1 - qt).log())
    want = tau ** 2 * ((qt - pt).abs() ** beta * bce * mask[:, None, :]).sum() / 3.0
    got = logit_kd(s, t, mask, torch.tensor(3.0), tau, beta)
    assert math.isclose(got.item(), want.item(), rel_tol=1e-4)
    assert logit_kd(t, t, mask, torch.tensor(1.0), tau, beta).item() == 0.0
    # padding columns do not count, whatever their values
    s2 = s.clone()
    s2[0, :, 2] = 40.0
    assert math.isclose(logit_kd(s2, t, mask, torch.tensor(3.0), tau, beta).item(), want.item(), rel_tol=1e-4)


def test_kd_weights_parse_and_refuse():
    assert parse_kd_weights("logits=2, feat=0") == KDWeights(logits=2.0, box=1.0, ctr=1.0, feat=0.0)
    for bad in ("logit=1", "box", "box=x", "ctr=-1"):
        with pytest.raises(ValueError):
            parse_kd_weights(bad)


# ----------------------------------------------------------------------------- task


def test_student_equal_to_its_teacher_starts_at_the_kd_minimum(data_dir):
    """Same architecture + init from the teacher: logit/box/ctr (and, with identity projections,
    feature) terms are ~0; a student from another seed is clearly above that."""
    teacher = _teacher()
    data = load_stage2(data_dir, TEACHER)
    opts = DistillOptions(conf_threshold=0.0)     # every anchor gets box/ctr KD
    task = DistillTask(TEACHER, teacher, data, opts)
    batch = _batch(task)

    def kd_of(model):
        mask = batch["attention_mask"]
        with torch.no_grad():
            s_out, s_f = model.eval().forward_with_features(batch["image"], model.encode_text(batch["input_ids"], mask), mask)
            t_out, t_f = teacher.forward_with_features(batch["image"], teacher.encode_text(batch["input_ids"], mask), mask)
            return distillation_losses(s_out, t_out, model.kd_proj(s_f), model.kd_proj.targets(t_f), mask, opts)

    torch.manual_seed(1)
    same = kd_of(task.build_model())
    assert task.init_report.mismatched == () and task.init_report.fresh == ()
    assert same["kd_anchors"] > 50           # the test is not vacuous: anchors carry box/ctr KD
    for k in KD_KEYS:
        assert abs(same[k].item()) < 1e-5, (k, same[k])
    torch.manual_seed(1)
    other = kd_of(DistillTask(TEACHER, teacher, data, dataclasses.replace(opts, init_from_teacher=False)).build_model())
    for k in KD_KEYS:
        assert other[k].item() > 1e-3, (k, other[k])


def test_init_from_teacher_copies_exactly_the_matching_tensors():
    teacher_state = _teacher().state_dict()
    torch.manual_seed(3)
    fresh = DistillStudent(STUDENT, TEACHER)
    torch.manual_seed(3)
    student = DistillStudent(STUDENT, TEACHER)
    report = init_from_teacher(student, teacher_state)
    after, before = student.state_dict(), fresh.state_dict()
    copied = set(report.copied)
    for key, value in after.items():
        fits = key in teacher_state and teacher_state[key].shape == value.shape
        assert (key in copied) == (fits and not key.startswith("kd_proj.")), key
        ref = teacher_state[key] if key in copied else before[key]
        assert torch.equal(value, ref), key
    # named examples: embeddings and text self-attention fit; Swin (4 vs 8 wide) and the text
    # layer-1 t2i key (image width 16 vs 32) do not; its query (16 -> 16) does
    assert "backbone.text.embeddings.word_embeddings.weight" in copied
    assert "backbone.text.encoder.layer.2.attention.self.query.weight" in copied
    assert "backbone.image.patch_embed.proj.weight" in report.mismatched
    t2i = "backbone.text.encoder.layer.1.crossattention_t2i"
    assert {f"{t2i}.self.query.weight"} <= copied and f"{t2i}.self.key.weight" in report.mismatched
    assert not any(k.startswith("kd_proj.") for k in report.copied + report.mismatched + report.fresh)
    params = dict(student.named_parameters())
    assert report.copied_params == sum(params[k].numel() for k in copied if k in params)
    assert report.student_params == sum(p.numel() for n, p in params.items() if not n.startswith("kd_proj."))
    assert 0 < report.copied_params < report.student_params


def test_projections_reach_the_teacher_widths():
    proj = FeatureProjections(STUDENT, TEACHER)
    assert sorted(proj.image) == ["stage3", "stage4"]      # student fused blocks: stages 3 and 4
    assert proj.image["stage3"].weight.shape == (32, 16, 1, 1)
    assert torch.equal(proj.text.weight, torch.eye(16))    # equal widths: identity start


def test_kd_terms_fall_on_a_tiny_overfit(data_dir):
    teacher = _teacher()
    # box/ctr weighted up: box regression moves slowly (BoxCoder weights 10, 10, 5, 5)
    task = DistillTask(STUDENT, teacher, load_stage2(data_dir, STUDENT),
                       DistillOptions(init_from_teacher=False, weights=KDWeights(box=10.0, ctr=10.0)))
    torch.manual_seed(0)
    model = task.build_model().eval()
    model.backbone.set_gates(0.5)
    batch = _batch(task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    history = []
    for step in range(30):
        parts = task.loss(model, batch, step)
        assert all(torch.isfinite(v) for v in parts.values()), parts
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in parts.items()})
    first, last = history[0], history[-1]
    assert KD_KEYS | {"loss", "loss_gt", "loss_kd", "loss_token", "loss_box", "loss_centerness",
                      "kd_anchors"} == set(first)
    assert first["kd_anchors"] > 0
    weighted = first["kd_logits"] + 10 * first["kd_box"] + 10 * first["kd_ctr"] + first["kd_feat"]
    assert math.isclose(first["loss"], first["loss_gt"] + weighted, rel_tol=1e-5)
    assert math.isclose(first["loss_kd"], weighted, rel_tol=1e-5)
    for k, factor in (("kd_logits", 0.7), ("kd_feat", 0.7), ("kd_ctr", 0.7), ("kd_box", 0.9), ("loss", 0.7)):
        assert last[k] < factor * first[k], (k, first[k], last[k])
    assert not any(p.grad is not None for p in teacher.parameters())


# ----------------------------------------------------------------------------- CLI


def _cli(teacher, data_dir, out, *extra):
    args = distill.get_args_parser().parse_args(
        ["--teacher", str(teacher), "--student-config", STUDENT.name, "--data", str(data_dir),
         "--out", str(out), "--batch-size", "4", "--schedule", "constant", "--warmup-steps", "0",
         "--log-every", "1", "--ckpt-every", "2", "--no-progress", *extra])
    return distill.main(args)


def test_cli_run_final_is_a_plain_student_and_resume_is_exact(teacher_ckpt, data_dir, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _cli(teacher_ckpt, data_dir, straight, "--max-steps", "4") == 0
    assert "tensors copied" in capsys.readouterr().out
    recs = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(KD_KEYS | {"loss_gt", "loss_kd"} <= set(r) and np.isfinite(r["loss"]) for r in recs)

    model, meta = load_fine_model(straight, "evaluation")         # strict load as a plain student
    assert type(model) is FiberForGrounding and model.cfg == STUDENT
    assert meta["task"] == "fine" and meta["distill"]["teacher_config"] == TEACHER.name
    assert meta["distill"]["init"]["tensors_copied"] > 0
    final = load_file(str(straight / "final/model.safetensors"))
    step4 = load_file(str(straight / "checkpoints/step-0000004/model.safetensors"))
    assert not any(k.startswith("kd_proj.") for k in final)
    assert {k for k in step4 if k.startswith("kd_proj.")} == {
        f"kd_proj.{k}" for k in FeatureProjections(STUDENT, TEACHER).state_dict()}

    assert _cli(teacher_ckpt, data_dir, resumed, "--max-steps", "2") == 0
    half = load_file(str(resumed / "final/model.safetensors"))
    with pytest.warns(UserWarning, match="max_steps"):
        assert _cli(teacher_ckpt, data_dir, resumed, "--max-steps", "4", "--resume") == 0
    again = load_file(str(resumed / "checkpoints/step-0000004/model.safetensors"))
    assert again.keys() == step4.keys() and all(torch.equal(again[k], step4[k]) for k in step4)
    assert any(not torch.equal(half[k], final[k]) for k in final)     # steps 3-4 changed weights


def test_cli_refusals(teacher_ckpt, data_dir, tmp_path, capsys):
    big = register_config(dataclasses.replace(
        STUDENT, name="fiber-tiny-test-student-128", swin=dataclasses.replace(STUDENT.swin, img_size=128)))
    out = tmp_path / "run"
    cases = [
        (["--student-config", big.name], ["input size 128 px vs 64 px", big.name]),
        (["--teacher", str(tmp_path)], ["neither a checkpoint folder"]),
        (["--student-config", "fiber-nope"], ["unknown config 'fiber-nope'"]),
    ]
    coarse = tmp_path / "coarse"
    save_checkpoint(coarse, FiberForGrounding(TEACHER).backbone.state_dict(), TEACHER, {"task": "coarse"})
    cases.append((["--teacher", str(coarse)], ["'coarse' checkpoint"]))
    for extra, needles in cases:
        args = distill.get_args_parser().parse_args(
            ["--teacher", str(teacher_ckpt), "--student-config", STUDENT.name, "--data", str(data_dir),
             "--out", str(out), "--max-steps", "1", "--batch-size", "4", "--no-progress", *extra])
        assert distill.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("compress.distill: error:") and "\n" not in err, err
        assert all(n in err for n in needles), err
        assert not out.exists()
    with pytest.raises(SystemExit) as e:
        distill.get_args_parser().parse_args(["--teacher", "t", "--student-config", "s", "--data", "d",
                                              "--out", "o", "--kd-weights", "logits=1,foo=2"])
    assert e.value.code == 2


def test_zero_kd_weights_train_on_the_gt_loss_without_the_teacher(data_dir):
    """Every KD weight 0 (the init-only ablation): the loss is the GT loss of the same student and
    the teacher never runs; with weights on, the teacher runs and adds to it."""
    teacher = _teacher()
    data = load_stage2(data_dir, TEACHER)
    off = DistillTask(STUDENT, teacher, data, DistillOptions(weights=KDWeights(0, 0, 0, 0)))
    on = DistillTask(STUDENT, teacher, data, DistillOptions())
    batch = _batch(off)
    torch.manual_seed(0)
    model = off.build_model().eval()
    calls = []
    real = teacher.forward_with_features
    teacher.forward_with_features = lambda *a, **k: calls.append(1) or real(*a, **k)
    with torch.no_grad():
        got = off.loss(model, batch, 0)
        assert not calls and got["loss_kd"].item() == 0 and got["loss"].item() == got["loss_gt"].item()
        with_kd = on.loss(model, batch, 0)
    assert calls and abs(with_kd["loss_gt"].item() - got["loss"].item()) < 1e-6
    assert with_kd["loss"].item() > with_kd["loss_gt"].item()


def test_export_records_the_teacher_flops_and_accuracy(teacher_ckpt, data_dir, tmp_path):
    from compress.export import distillation_record

    out = tmp_path / "kd"
    assert _cli(teacher_ckpt, data_dir, out, "--max-steps", "1") == 0
    model, meta = load_fine_model(out, "evaluation")
    (teacher_ckpt.parent / "eval.json").write_text(json.dumps(
        {"split": "synth-val", "step": 7, "metrics": {"R@1": 41.25, "R@5": 90.0, "R@10": 95.5, "mAP": 12.0}}))
    try:
        rec = distillation_record(meta, model)
    finally:
        (teacher_ckpt.parent / "eval.json").unlink()
    assert rec["teacher_config"] == TEACHER.name and rec["teacher"] == meta["distill"]["teacher"]
    gf = rec["detector_gflops"]
    assert 0 < gf["student"] < gf["teacher"]          # the student is the narrower Swin, K = 2
    assert rec["flops_ratio"] == pytest.approx(gf["teacher"] / gf["student"], rel=0.01)
    assert rec["teacher_accuracy"] == {"split": "synth-val", "step": 7, "R@1": 41.25, "R@5": 90.0,
                                       "R@10": 95.5, "mAP": 12.0}
    assert distillation_record({"task": "fine"}, model) is None      # trained alone: no record
    unnamed = distillation_record({**meta, "distill": {**meta["distill"], "teacher_config": "not-registered"}}, model)
    assert unnamed["flops_ratio"] is None and unnamed["detector_gflops"]["teacher"] is None
    assert unnamed["detector_gflops"]["student"] == gf["student"]
