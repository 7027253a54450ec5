"""train.evaluate / fiber.torch_engines: a tiny trained model gives a complete, finite report; the
same path (the runtime Detector over the torch model) fed the ground truth scores 100 (so the
evaluation path is not what limits a model); the torch Detector takes the package's manifest
sections (text buckets, letterbox or official input, post-processing style); bad checkpoints and
data are one clear line."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fiber.config import get_config
from fiber.data.evaluation import EVAL_POSTPROCESS, evaluate, load_image_rgb
from fiber.data.formats import load_detection, load_grounding
from fiber.data.prompts import build_detection_prompt
from fiber.data.synth import SynthConfig, generate
from fiber.package import package_sections, resolve_buckets
from fiber.torch_engines import torch_detector
from train import evaluate as ev
from train import fine

CFG = get_config("fiber-tiny-test")
S = CFG.swin.img_size
METRICS = ("R@1", "R@5", "R@10", "R@1_relation", "R@1_no_relation", "R@10_no_relation", "refexp",
           "mAP", "AP50", "AP75", "phrases", "refexps", "detection_images")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "val"
    generate(SynthConfig(images=6, seed=1, sizes=((160, 128), (128, 160), (144, 144))), out)
    return out


@pytest.fixture(scope="module")
def fine_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fine"
    args = fine.get_args_parser().parse_args(
        ["--config", "fiber-tiny-test", "--data", str(data_dir), "--out", str(out), "--init", "none",
         "--max-steps", "3", "--batch-size", "4", "--no-progress"])
    assert fine.main(args) == 0
    return out


def test_tiny_trained_model_report_is_complete_and_finite(fine_run, data_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ev.get_args_parser().parse_args(["--checkpoint", str(fine_run), "--data", str(data_dir),
                                            "--json", str(out), "--no-progress", "--split-name", "tiny"])
    assert ev.main(args) == 0
    assert "R@1" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["split"] == "tiny" and report["model"] == "fiber-tiny-test" and report["step"] == 3
    assert report["checkpoint"].endswith("final")
    m = report["metrics"]
    for k in METRICS:
        assert m[k] is not None and math.isfinite(m[k]), k
    assert m["phrases"] == m["phrases_relation"] + m["phrases_no_relation"] > 0
    assert m["detection_images"] == 6 and m["refexps"] > 0
    assert all(0 <= m[k] <= 100 for k in ("R@1", "R@5", "R@10", "refexp", "mAP"))
    assert m["R@1"] <= m["R@5"] <= m["R@10"]


# ----------------------------------------------------------------------------- ground truth


class _GroundTruthModel(nn.Module):
    """Stands in for FiberForGrounding: one anchor per ground-truth box, exactly on the box (in
    network pixels), with +20 logits on its phrase's tokens, -20 elsewhere, centerness +20."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.current = None  # (boxes [G, 4] network px, phrase index [G], phrase_map [P, T])

    def encode_text(self, input_ids, attention_mask):
        return torch.zeros(*input_ids.shape, 4)

    def detect(self, image, text_hidden, attention_mask):
        boxes, phrase, pmap = self.current
        boxes = torch.cat([torch.as_tensor(boxes, dtype=torch.float32), torch.tensor([[0.0, 0.0, 1.0, 1.0]])])
        logits = torch.full((len(boxes), attention_mask.shape[1]), -20.0)
        for a, p in enumerate(phrase):
            logits[a, torch.from_numpy(pmap[p] > 0)] = 20.0
        return boxes[None], logits[None], torch.full((1, len(boxes)), 20.0)


def _key(image: np.ndarray, prompt: str) -> tuple[str, str]:
    return hashlib.sha1(image.tobytes()).hexdigest(), prompt


def _ground_truth(data_dir) -> dict:
    """(image hash, prompt) -> (boxes [G, 4] source px, phrase index [G]) for every prompt the
    harness will ask about."""
    truth = {}
    for s in load_grounding(data_dir / "grounding.json"):
        boxes = [(b, p) for p, ph in enumerate(s.phrases) for b in ph.boxes]
        truth[_key(load_image_rgb(s.image), s.caption)] = boxes
    det = load_detection(data_dir / "detection.json")
    prompt, _ = build_detection_prompt(det.category_names)
    order = {c: i for i, (c, _) in enumerate(det.categories)}
    for im in det:
        truth[_key(load_image_rgb(im.image), prompt)] = [
            (b, order[c]) for b, c in zip(im.boxes, im.category_ids.tolist())]
    return truth


def test_ground_truth_through_the_predictor_scores_100(data_dir):
    model = _GroundTruthModel(CFG)
    predictor = torch_detector(model, **EVAL_POSTPROCESS)
    truth = _ground_truth(data_dir)

    def predict(image, prompt, spans):
        pairs = truth[_key(image, prompt)]
        scale = S / max(image.shape[:2])  # the letterbox: top-left, one scale
        boxes = np.asarray([b for b, _ in pairs], np.float32).reshape(-1, 4) * scale
        model.current = (boxes, [p for _, p in pairs], predictor.tokenizer.encode(prompt, spans).phrase_map)
        return predictor.detect(image, prompt, spans)

    m = evaluate(predict, data_dir / "grounding.json", data_dir / "detection.json")
    for k in ("R@1", "R@5", "R@10", "R@1_relation", "R@1_no_relation", "refexp", "mAP", "AP50", "AP75"):
        assert m[k] == pytest.approx(100.0), (k, m[k])
    assert m["phrases"] > 0 and m["refexps"] > 0


def test_the_torch_detector_takes_the_package_sections_of_its_config():
    """Letterbox config: the manifest sections compress.export writes, its buckets, its square
    input; an official-input DyHead config: the official input on the canvas and the per-level
    post-processing, boxes in source pixels."""
    from fiber.models import FiberForGrounding
    from dyhead_package import CANVAS, dyhead_config

    torch.manual_seed(0)
    model = FiberForGrounding(CFG)
    with torch_detector(model) as det:
        buckets = resolve_buckets(CFG, None)
        want = package_sections(CFG, buckets)
        assert {k: det.manifest[k] for k in want} == want
        assert det.tokenizer.buckets == buckets == (16, 32) and det.input_hw == (S, S)
        assert det.post.style == "letterbox" and det.backend == "torch"
    dy = dyhead_config()
    model = FiberForGrounding(dy)
    with torch_detector(model, threshold=0.0) as det:
        assert det.input_hw == CANVAS and det.post.style == "official"
        assert det.post.level_sizes == tuple(model.level_sizes(*CANVAS)) and len(det.post.level_sizes) == 5
        image = np.random.default_rng(0).integers(0, 255, (50, 120, 3), dtype=np.uint8)
        dets = det.detect(image, "a red circle. a blue square")
        assert len(dets.boxes) > 0 and dets.phrases == ("a red circle", "a blue square")
        assert dets.boxes[:, [0, 2]].max() <= 120 and dets.boxes[:, [1, 3]].max() <= 50


def test_bad_checkpoint_and_data_are_one_clear_line(fine_run, data_dir, tmp_path, capsys):
    cases = [(tmp_path / "nowhere", data_dir, "no such directory"),
             (fine_run, tmp_path / "nodata", "no such data folder"),
             (fine_run, tmp_path, "neither grounding.json nor detection.json")]
    for ckpt, data, message in cases:
        args = ev.get_args_parser().parse_args(["--checkpoint", str(ckpt), "--data", str(data),
                                                "--json", str(tmp_path / "e.json"), "--no-progress"])
        assert ev.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert not (tmp_path / "e.json").exists()
