"""compress.calibrate: the default score threshold chosen on held-out data (F1 of phrase-correct
boxes at IoU 0.5, prompts with present phrases and absent hard negatives), written to the
manifest with its sweep and used by the runtime as its default.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from common import package as pkg
from compress import calibrate as cal
from fiber.data.synth import SynthConfig, generate
from runtime.predictor import Detector
from runtime.types import Detections
from toy_package import copy_package, make_toy_packages


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return make_toy_packages(tmp_path_factory.mktemp("toys"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "val"
    generate(SynthConfig(images=4, seed=3), out)
    return out


# ----------------------------------------------------------------------------- pure parts

def test_match_needs_the_right_phrase_and_iou():
    truth = (np.array([[0, 0, 10, 10]], np.float32), np.zeros((0, 4), np.float32))  # phrase 1 absent
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 11], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    phrase = np.array([0, 0, 1, 0])
    # the best box of phrase 0 matches; its duplicate does not (box used); the absent phrase never;
    # a box elsewhere does not
    assert cal.match(scores, phrase, boxes, truth).tolist() == [True, False, False, False]
    assert cal.match(scores[::-1], phrase[::-1], boxes[::-1], truth).tolist() == [False, False, False, True]


def test_sweep_and_best_pick_the_f1_maximum():
    scores = np.array([0.9, 0.8, 0.6, 0.3, 0.2])
    correct = np.array([True, True, False, True, False])
    curve = cal.sweep(scores, correct, num_truth=4, thresholds=(0.0, 0.5, 0.85, 0.95))
    assert curve["precision"] == [0.6, 0.6667, 1.0, 1.0]
    assert curve["recall"] == [0.75, 0.5, 0.25, 0.0]
    i = cal.best(curve)
    assert curve["thresholds"][i] == 0.0 and curve["f1"][i] == max(curve["f1"])
    assert cal.best({"f1": [0.5, 0.7, 0.7, 0.7, 0.6]}) == 2  # a plateau: its middle
    assert cal.choose(curve, "f1") == i


def test_balanced_rule_picks_the_highest_min_of_precision_and_recall():
    # fiber-nano phase 7's held-out sweep, 0.23 ... 0.28: F1 peaks at 0.25 (precision 0.899),
    # precision and recall balance at 0.26
    curve = {"thresholds": [0.23, 0.24, 0.25, 0.26, 0.27, 0.28],
             "precision": [0.8836, 0.8929, 0.8992, 0.9043, 0.9102, 0.9138],
             "recall": [0.9301, 0.9237, 0.9172, 0.9075, 0.9007, 0.8932],
             "f1": [0.9062, 0.908, 0.9081, 0.9059, 0.9054, 0.9034]}
    assert curve["thresholds"][cal.choose(curve, "f1")] == 0.25
    assert curve["thresholds"][cal.choose(curve)] == 0.26          # balanced is the default
    # equal minimums: the higher F1, then the middle
    tie = {"precision": [0.8, 0.9, 0.9, 0.9], "recall": [0.95, 0.95, 0.9, 0.9], "f1": [0.87, 0.92, 0.9, 0.9]}
    assert cal.balanced(tie) == 1
    assert cal.balanced({"precision": [0.9, 0.9, 0.9], "recall": [0.9, 0.9, 0.9], "f1": [0.9, 0.9, 0.9]}) == 1
    with pytest.raises(ValueError, match="rule must be one of balanced, f1"):
        cal.choose(curve, "recall")


def test_items_name_present_pairs_and_absent_hard_negatives(data):
    doc = json.loads((data / "detection.json").read_text())
    items = cal.detection_items(data, negatives=2, noise=3, seed=0)
    real = [it for it in items if not isinstance(it.image, np.ndarray)]
    assert len(real) == len(doc["images"]) and len(items) == len(real) + 3
    colours = {a["attributes"]["colour"] for a in doc["annotations"]}
    for it in real:
        present = [p for p, b in zip(it.phrases, it.boxes) if len(b)]
        absent = [p for p, b in zip(it.phrases, it.boxes) if not len(b)]
        assert len(absent) == 2 and len(set(it.phrases)) == len(it.phrases)
        for p in it.phrases:
            assert p.split(" ", 1)[0] in colours  # "colour kind"
        kinds, cols = {p.split(" ", 1)[1] for p in present}, {p.split(" ", 1)[0] for p in present}
        assert all(p.split(" ", 1)[1] in kinds or p.split(" ", 1)[0] in cols for p in absent)  # hard
        assert it.prompt == ". ".join(it.phrases)
    noise = items[len(real):]
    assert {it.image.shape[0] for it in noise} == {1, 64, 320} and not any(len(b) for it in noise for b in it.boxes)


def test_an_oracle_detector_gets_a_threshold_between_right_and_wrong(data):
    """Right boxes score 0.7-0.9, wrong ones (absent phrases, noise) 0.1-0.4: the chosen threshold
    lies between, with precision and recall 1."""
    items = cal.detection_items(data, negatives=2, noise=3)
    by_prompt = {it.prompt: it for it in items if not isinstance(it.image, np.ndarray)}
    rng = np.random.default_rng(0)

    def detect(image, prompt):
        it = by_prompt.get(prompt) if not isinstance(image, np.ndarray) else None
        phrases = prompt.split(". ")
        rows = []
        for p in range(len(phrases)):
            for box in (it.boxes[p] if it else ()):
                rows.append((box, rng.uniform(0.7, 0.9), p))
            rows.append((np.array([0, 0, 5, 5], np.float32), rng.uniform(0.1, 0.4), p))
        return Detections(np.array([r[0] for r in rows], np.float32), np.array([r[1] for r in rows], np.float32),
                          np.array([r[2] for r in rows], np.int32), tuple(phrases))

    record = cal.calibrate(detect, items)
    assert 0.5 <= record["threshold"] <= 0.6 and record["precision"] == 1.0 and record["recall"] == 1.0
    assert len(record["sweep"]["thresholds"]) == 100 and record["boxes"] > 0


# ----------------------------------------------------------------------------- the package

def test_calibrated_threshold_is_written_and_used_by_the_runtime(toys, data, tmp_path):
    package = copy_package(toys["toy-int8"], tmp_path / "pkg")
    before = pkg.read_manifest(package)
    record = cal.calibrate_package(package, data, negatives=2, noise=2, threads=1)
    manifest = cal.write_calibration(package, record)
    assert manifest["postprocess"]["threshold"] == record["threshold"]
    assert {k: v for k, v in manifest["postprocess"].items() if k != "threshold"} == \
        {k: v for k, v in before["postprocess"].items() if k != "threshold"}
    cal_rec = pkg.read_manifest(package)["calibration"]
    assert cal_rec["images"] == 4 and cal_rec["noise_images"] == 2 and cal_rec["iou"] == 0.5
    assert set(cal_rec["sweep"]) == {"thresholds", "precision", "recall", "f1"}
    i = cal_rec["sweep"]["thresholds"].index(cal_rec["threshold"])
    low = [min(p, r) for p, r in zip(cal_rec["sweep"]["precision"], cal_rec["sweep"]["recall"])]
    assert cal_rec["rule"] == "balanced" and low[i] == max(low) and cal_rec["f1"] == cal_rec["sweep"]["f1"][i]
    pkg.load_package_manifest(package, verify=True)  # files (and the package digest) unchanged
    assert pkg.package_digest(manifest) == pkg.package_digest(before)
    with Detector(package) as det:
        assert det.post.threshold == record["threshold"]


def test_cli_writes_and_refuses_bad_input(toys, data, tmp_path, capsys):
    package = copy_package(toys["toy"], tmp_path / "pkg")
    argv = ["--package", str(package), "--data", str(data), "--threads", "1", "--noise", "1"]
    assert cal.main(cal.get_args_parser().parse_args(argv + ["--dry-run"])) == 0
    assert "calibration" not in pkg.read_manifest(package) and "would set" in capsys.readouterr().out
    assert cal.main(cal.get_args_parser().parse_args(argv)) == 0
    out = capsys.readouterr().out
    t = pkg.read_manifest(package)["postprocess"]["threshold"]
    assert f"postprocess.threshold = {t}" in out
    assert cal.main(cal.get_args_parser().parse_args(["--package", str(package), "--data", str(tmp_path)])) == 2
    assert "no detection.json" in capsys.readouterr().err
    assert cal.main(cal.get_args_parser().parse_args(argv + ["--negatives", "-1"])) == 2


# ----------------------------------------------------------------------------- compress.export

def test_export_calibrates_on_held_out_data(tmp_path, data):
    from compress.export import ExportConfig, export_package
    from test_export import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt")
    result = export_package(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "pkg"), data=str(data),
                                         threads=1))
    m = pkg.read_manifest(result.path)
    assert m["calibration"]["data"] == str(data) and m["calibration"]["images"] == 4
    assert m["postprocess"]["threshold"] == m["calibration"]["threshold"]
    assert m["accuracy"]["split"] == str(data)
    with Detector(result.path) as det:
        assert det.post.threshold == m["calibration"]["threshold"]
    off = export_package(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "off"), data=str(data),
                                      threads=1, calibrate=False))
    assert "calibration" not in pkg.read_manifest(off.path)
