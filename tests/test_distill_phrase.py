"""Phrase-level distillation (compress.phrase_kd, ``compress.distill --kd-mode phrase``) from a
converted official teacher: the golden fine release (fiber-golden-fine: DyHead, a RoBERTa-style
byte-level BPE tokenizer, the official input) teaches fiber-tiny-test (WordPiece, letterbox, light
head). Checks the per-phrase scores and the two KD terms on hand-made inputs, the teacher's view of
a batch (its own tokens and input, boxes mapped to the student's pixels), the mode choice, and a
short CLI run whose final weights load as the plain student."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress import distill, phrase_kd
from fiber.box_ops import make_anchors
from fiber.config import get_config
from fiber.heads.grounding import GroundingOutput

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden" / "fine" / "fiber_fine_small_official.safetensors"
TOKENIZER = REPO / "tests" / "data" / "golden" / "fine_tokenizer"
STUDENT = "fiber-tiny-test"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_ck(tmp_path_factory):
    from fiber import checkpoint

    out = tmp_path_factory.mktemp("golden-teacher") / "ck"
    args = checkpoint.get_args_parser().parse_args([
        "convert-official", str(GOLDEN), "--config", "fiber-golden-fine", "--tokenizer", str(TOKENIZER),
        "--out", str(out)])
    assert checkpoint.main(args) == 0
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from fiber.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth") / "data"
    generate(SynthConfig(images=6, seed=0, sizes=((160, 128), (128, 160))), out)
    return out


def test_phrase_probs_are_mean_token_probabilities():
    logits = torch.tensor([[0.0, 2.0, -1.0, 5.0], [1.0, -3.0, 0.5, 0.0]])
    pm = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    from fiber.losses import phrase_probabilities

    got = phrase_probabilities(logits, pm)
    p = logits.sigmoid()
    want = torch.stack([(p[:, 1] + p[:, 2]) / 2, p[:, 0], torch.zeros(2)], dim=1)
    assert torch.allclose(got, want)


def _output(logits: torch.Tensor, boxes: torch.Tensor, anchors, sizes) -> GroundingOutput:
    return GroundingOutput(box_deltas=torch.zeros_like(boxes), boxes=boxes, token_logits=logits,
                           centerness=torch.zeros(boxes.shape[:2]), anchors=anchors, level_sizes=sizes)


def test_kd_terms_vanish_when_the_student_matches_the_teachers_targets():
    anchors = make_anchors([(8, 8), (4, 4)], (8, 16), 8.0, torch.device("cpu"), torch.float32)
    sizes, n = (64, 16), 80
    box = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    targets = [phrase_kd.TeacherBoxes(box, torch.tensor([0]), torch.tensor([0.9]))]
    pm = [torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.float32)]       # 2 phrases over 3 student tokens
    valid = [torch.tensor([True, True])]
    from fiber.losses import atss_assign
    assigned = atss_assign(anchors, sizes, box) >= 0
    assert assigned.sum() > 0
    # a student whose phrase-0 probability is 0.9 exactly where ATSS assigns the box, ~0 elsewhere,
    # and whose boxes are the teacher's box: both terms ~0
    logits = torch.full((1, n, 3), -30.0)
    logits[0, assigned, :2] = float(np.log(0.9 / 0.1))
    good = _output(logits, box.expand(1, n, 4).clone(), anchors, sizes)
    kd = phrase_kd.phrase_kd_losses(good, pm, targets, valid)
    assert float(kd["kd_phrase"]) < 1e-6 and float(kd["kd_box"]) < 1e-6
    # a flat student (probability 0.5 everywhere, boxes elsewhere): both terms clearly positive
    flat = _output(torch.zeros(1, n, 3), torch.tensor([90.0, 90.0, 100.0, 100.0]).expand(1, n, 4).clone(),
                   anchors, sizes)
    kd = phrase_kd.phrase_kd_losses(flat, pm, targets, valid)
    assert float(kd["kd_phrase"]) > 1.0 and float(kd["kd_box"]) > 1.0
    # a phrase without tokens on one side takes no part: only phrase 1 valid -> no targets, just negatives
    kd_invalid = phrase_kd.phrase_kd_losses(good, pm, targets, [torch.tensor([False, True])])
    assert float(kd_invalid["kd_phrase"]) < 1e-6


def test_teacher_view_of_a_batch_uses_its_own_tokens_input_and_pixels(teacher_ck, data_dir):
    from fiber.checkpoint import load_fine_model, tokenizer_file
    from train.data import load_stage2

    teacher, _ = load_fine_model(teacher_ck, "test")
    tcfg = teacher.cfg.with_canvas((128, 160))
    data = load_stage2(data_dir, get_config(STUDENT))
    view = phrase_kd.TeacherInputs(tcfg, tokenizer_file(teacher_ck), data.tok)
    np.random.seed(0)
    items = [data[i] for i in range(3)]
    assert all(it.spans for it in items)
    cache = data.cache
    batch = view.batch([cache.paths[it.image] for it in items], [it.prompt for it in items],
                       [it.spans for it in items], [cache.info(it.image).scale for it in items])
    assert tuple(batch["t_image"].shape) == (3, 3, 128, 160)
    assert batch["t_input_ids"].max() < tcfg.text.vocab_size             # the teacher's BPE ids
    for it, t_pm, s_pm in zip(items, batch["t_phrase_map"], batch["s_phrase_map"]):
        assert t_pm.shape[0] == s_pm.shape[0] == len(it.spans)            # same phrases, own tokens
        assert t_pm.shape[1] == batch["t_input_ids"].shape[1]
    # teacher canvas px -> source px -> student letterbox px, x and y
    info = cache.info(items[0].image)
    src_w, src_h = info.src_w, info.src_h
    h_t, w_t = 128, 160
    f = min(h_t / src_h, w_t / src_w)
    new_w = min(w_t, int(np.floor(src_w * f + 0.5)))
    assert batch["t_to_student"][0, 0] == pytest.approx(src_w / new_w * info.scale, rel=1e-5)


def test_mode_choice():
    golden, tiny = get_config("fiber-golden-fine"), get_config(STUDENT)
    assert distill.kd_mode("auto", tiny, golden) == "phrase"
    assert distill.kd_mode("auto", tiny, tiny) == "token"
    with pytest.raises(ValueError, match="tokenizer conventions differ"):
        distill.kd_mode("token", tiny, golden)


def test_cli_distils_from_the_converted_official_teacher(teacher_ck, data_dir, tmp_path, capsys):
    from fiber.checkpoint import load_fine_model
    from fiber.models import FiberForGrounding

    out = tmp_path / "run"
    args = distill.get_args_parser().parse_args([
        "--teacher", str(teacher_ck), "--teacher-canvas", "128x160", "--student-config", STUDENT,
        "--data", str(data_dir), "--out", str(out), "--max-steps", "3", "--batch-size", "3",
        "--log-every", "1", "--no-progress"])
    assert distill.main(args) == 0
    assert "(phrase KD)" in capsys.readouterr().out
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert {"kd_phrase", "kd_box", "kd_targets", "loss_gt", "loss_kd"} <= set(r)
        assert np.isfinite(r["loss"]) and r["kd_phrase"] > 0 and r["kd_targets"] > 0
    model, meta = load_fine_model(out, "evaluation")
    assert type(model) is FiberForGrounding and model.cfg.name == STUDENT
    assert meta["distill"]["mode"] == "phrase" and meta["distill"]["teacher_config"] == "fiber-golden-fine"
    assert meta["distill"]["init"] is None                                # towers differ: own init
