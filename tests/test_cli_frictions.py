"""The frictions a new user met on a fresh clone, each pinned: ``runtime.detect`` in a
pipe, missing inputs among several, package error wording, the backend named in the first log
line, grounding (``--per-phrase``) and detection (``--one-label-per-box``) modes.

In-process ``main(args)`` with capsys, except the broken pipe, which needs a real pipe.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from runtime import detect
from runtime.detect import get_args_parser, main
from runtime.postprocess import postprocess
from runtime.preprocess import Preprocessor
from runtime.types import LetterboxInfo
from toy_package import REPO, make_toy_packages

PROMPT = "person. red mug"


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return make_toy_packages(tmp_path_factory.mktemp("toys"))


@pytest.fixture(scope="module")
def toy(toys):
    return toys["toy"]


def _image(path, h=24, w=32, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def run_cli(argv, capsys):
    rc = main(get_args_parser().parse_args([str(a) for a in argv]))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _lines(text):
    return [json.loads(line) for line in text.splitlines()]


# ----------------------------------------------------------------------------- pipes

def test_json_to_a_closed_pipe_exits_quietly(toy, tmp_path):
    images = [_image(tmp_path / f"{i}.png", seed=i) for i in range(30)]
    cmd = (f"{sys.executable} -m runtime.detect --package {toy} --prompt cat --json - --image "
           + " ".join(map(str, images)) + " | head -1")
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert len(proc.stdout.splitlines()) == 1 and json.loads(proc.stdout)["image"] == str(images[0])
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == detect.EXIT_BROKEN_PIPE, proc.stderr


# ----------------------------------------------------------------------------- missing inputs

def test_missing_file_among_inputs_is_one_failed_input(toy, tmp_path, capsys):
    good, missing = _image(tmp_path / "good.png"), tmp_path / "missing.jpg"
    rc, out, err = run_cli(["--package", toy, "--prompt", PROMPT, "--json", "-", "--image", good, missing], capsys)
    assert rc == 1
    first, second = _lines(out)
    assert first["image"] == str(good) and "detections" in first
    assert second == {"image": str(missing), "error": "no such file"}
    assert f"{missing}: no such file" in err and "2 inputs (1 ok, 1 failed)" in err
    assert "end-to-end" in err


def test_all_inputs_missing_exit_1_and_no_fps(toy, tmp_path, capsys):
    missing = [tmp_path / "a.jpg", tmp_path / "b.png"]
    rc, out, err = run_cli(["--package", toy, "--prompt", PROMPT, "--json", "-", "--image", *missing], capsys)
    assert rc == 1
    assert [r["error"] for r in _lines(out)] == ["no such file", "no such file"]
    assert "2 inputs (0 ok, 2 failed)" in err and "no input was processed, so no FPS" in err
    assert "FPS |" not in err and "end-to-end" not in err


def test_missing_video_is_still_unusable_exit_2(toy, tmp_path, capsys):
    rc, out, err = run_cli(["--package", toy, "--prompt", PROMPT, tmp_path / "clip.mp4"], capsys)
    assert rc == 2 and "no such file or folder" in err and out == ""


# ----------------------------------------------------------------------------- package errors

def test_package_errors_name_the_path_once(toy, tmp_path, capsys):
    img = _image(tmp_path / "x.png")
    missing = tmp_path / "nope"
    rc, _, err = run_cli(["--package", missing, img, "--prompt", "x"], capsys)
    assert rc == 2 and err.count(str(missing)) == 1 and "does not exist" in err, err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_cli(["--package", empty, img, "--prompt", "x"], capsys)
    assert rc == 2 and err.count(str(empty)) == 1 and "neither a model package" in err, err
    assert err.startswith(f"fiber-detect: error: package {empty}: ")


# ----------------------------------------------------------------------------- backend line

def test_first_stderr_line_names_the_backend(toy, tmp_path, capsys):
    img = _image(tmp_path / "x.png")
    rc, out, err = run_cli(["--package", toy, img, "--prompt", "cat", "--threads", "1", "--no-fastest-path"],
                           capsys)
    assert rc == 0
    assert err.splitlines()[0] == "fiber-detect: toy on onnxruntime, 1 threads"


def test_backend_line_suggests_openvino_when_the_package_wants_it(toy, monkeypatch):
    class Fake:
        name, backend = "fiber-nano-int8", "onnxruntime"
        manifest = {"graphs": {"detector": {"cpu_backend": "openvino"}}}
        engines = None  # a light-head package: no DeformConv path to name
        input_hw, preprocessor = (256, 256), Preprocessor(256)

    monkeypatch.setattr(detect.importlib.util, "find_spec", lambda name: None)
    line = detect.backend_line(Fake(), None)
    assert line.startswith("fiber-detect: fiber-nano-int8 on onnxruntime (OpenVINO")
    assert "pip install 'fiber-edge[openvino]'" in line
    import engines.options

    Fake.manifest = {"precision": "int8", "graphs": {"detector": {"cpu_backend": "openvino"}}}
    monkeypatch.setattr(engines.options, "int8_pairs_saturate", lambda cpuinfo=None: True)
    assert detect.backend_line(Fake(), None) == "fiber-detect: fiber-nano-int8 on onnxruntime"  # no VNNI: no hint
    monkeypatch.setattr(engines.options, "int8_pairs_saturate", lambda cpuinfo=None: False)
    assert "pip install 'fiber-edge[openvino]'" in detect.backend_line(Fake(), None)
    Fake.backend = "openvino"
    assert detect.backend_line(Fake(), 2) == "fiber-detect: fiber-nano-int8 on openvino, 2 threads"
    # a letterbox package exported on a camera's canvas (compress.export --canvas 224x288) says so
    Fake.input_hw, Fake.preprocessor = (224, 288), Preprocessor((224, 288))
    assert detect.backend_line(Fake(), 2) == "fiber-detect: fiber-nano-int8 (224x288 canvas) on openvino, 2 threads"


# ----------------------------------------------------------------------------- modes

@pytest.mark.parametrize("k", ["0", "-3"])
def test_per_phrase_below_one_exit_2(toy, tmp_path, capsys, k):
    rc, out, err = run_cli(["--package", toy, _image(tmp_path / "x.png"), "--prompt", "x", "--per-phrase", k],
                           capsys)
    assert rc == 2 and err == f"fiber-detect: error: --per-phrase must be >= 1 (boxes per phrase), got {k}\n"


def test_per_phrase_returns_k_boxes_per_phrase(toy, tmp_path, capsys):
    img = _image(tmp_path / "x.png", 64, 64)
    rc, out, _ = run_cli(["--package", toy, img, "--prompt", "person. red mug. cat", "--per-phrase", "2",
                          "--json", "-"], capsys)
    assert rc == 0
    (rec,) = _lines(out)
    per = [sum(d["phrase_index"] == p for d in rec["detections"]) for p in range(3)]
    assert per == [2, 2, 2], rec["detections"]


def test_only_absent_phrases_no_detections_exit_0(toys, tmp_path, capsys):
    """The default threshold is the manifest's calibrated one: above every score of this (random)
    toy model, so nothing of "unicorn. dragon" is found; an empty result, not an error."""
    from compress.calibrate import write_calibration
    from toy_package import copy_package

    package = copy_package(toys["toy"], tmp_path / "pkg")
    write_calibration(package, {"threshold": 0.99, "sweep": {}})
    img = _image(tmp_path / "x.png")
    rc, out, err = run_cli(["--package", package, img, "--prompt", "unicorn. dragon", "--json", "-"], capsys)
    assert rc == 0 and _lines(out)[0]["detections"] == [] and "error" not in _lines(out)[0]
    rc, out, _ = run_cli(["--package", package, img, "--prompt", "unicorn. dragon", "--json", "-",
                          "--threshold", "0"], capsys)
    assert rc == 0 and len(_lines(out)[0]["detections"]) > 0  # --threshold overrides the manifest


def _two_phrase_outputs():
    """Anchors 0/1: (almost) the same box, phrase a best at anchor 0, phrase b at anchor 1; anchor
    2: a separate box where only phrase b scores. One token per phrase (T = 2)."""
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 30]], np.float32)
    token_logits = np.array([[3.0, -1.0], [1.0, 2.0], [-9.0, 4.0]], np.float32)
    centerness = np.full(3, 5.0, np.float32)
    return boxes, token_logits, centerness, np.eye(2, dtype=np.float32)


@pytest.mark.parametrize("use_native", [True, False])
def test_one_label_per_box_keeps_the_best_phrase(use_native):
    boxes, logits, ctr, pm = _two_phrase_outputs()
    kw = dict(info=LetterboxInfo(scale=1.0, new_w=40, new_h=40, src_w=40, src_h=40), threshold=0.05,
              use_native=use_native, phrases=("a", "b"))
    per_phrase_nms = postprocess(boxes, logits, ctr, pm, **kw)
    assert sorted(d.phrase for d in per_phrase_nms) == ["a", "b", "b"]  # the left box once per phrase
    one = postprocess(boxes, logits, ctr, pm, one_label_per_box=True, **kw)
    assert [(d.phrase, tuple(np.round(d.box))) for d in one] == [("b", (20, 20, 30, 30)), ("a", (0, 0, 10, 10))]
    grounding = postprocess(boxes, logits, ctr, pm, per_phrase=1, max_detections=1, **{**kw, "threshold": 0.0})
    assert sorted(d.phrase for d in grounding) == ["a", "b"]  # K per phrase whatever max_detections says


# ----------------------------------------------------------------------------- --help

CLIS = ("train.fine", "train.coarse", "train.evaluate", "compress.export", "compress.quantize", "compress.repack",
        "compress.distill", "engines.build", "runtime.detect", "benchmarks.report", "benchmarks.latency",
        "benchmarks.accuracy", "benchmarks.int8_speed", "benchmarks.machine", "benchmarks.flops")


@pytest.mark.parametrize("module", CLIS)
def test_every_flag_has_help_and_the_description_is_whole(module):
    import importlib

    parser = importlib.import_module(module).get_args_parser()
    missing = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert not missing, f"{module}: flags without help: {missing}"
    assert parser.description and parser.description.rstrip().endswith("."), parser.description
    parser.format_help()  # every help string formats (a stray % would raise)


# ----------------------------------------------------------------------------- benchmarks.report

@pytest.mark.parametrize("flag", ["--data", "--package", "--compare", "--teacher"])
def test_report_checks_paths_before_benchmarking(toy, tmp_path, capsys, monkeypatch, flag):
    from benchmarks import report

    monkeypatch.setattr(report, "build_report", lambda *a, **k: pytest.fail("benchmarked before checking"))
    paths = {"--package": str(toy), "--data": str(tmp_path)}
    paths[flag] = str(tmp_path / "nonexistent")
    argv = [a for k, v in paths.items() for a in (k, v)] + ["--out", str(tmp_path / "rep")]
    assert report.main(report.get_args_parser().parse_args(argv)) == 2
    err = capsys.readouterr().err
    assert err == f"benchmarks.report: {flag} {tmp_path / 'nonexistent'}: does not exist\n"
    assert not (tmp_path / "rep").exists()


# ----------------------------------------------------------------------------- TensorRT flavours

@pytest.mark.parametrize("installed,asked,suggested", [
    (["tensorrt-rtx"], "tensorrt", "tensorrt-rtx"),
    (["tensorrt"], "tensorrt-rtx", "tensorrt"),
    (["tensorrt", "tensorrt-rtx"], "tensorrt", "tensorrt"),
    ([], "tensorrt", "tensorrt"),
])
def test_tensorrt_on_a_package_suggests_the_installed_flavour(toy, monkeypatch, installed, asked, suggested):
    import engines
    from engines import trt

    monkeypatch.setattr(trt, "installed_backends", lambda: list(installed))
    with pytest.raises(engines.EngineError) as e:
        engines.load(toy, asked)
    text = str(e.value)
    assert f"python -m engines.build --package {toy} --backend {suggested} --out ENGINE_DIR" in text
    assert f"--backend {asked if asked != suggested else 'none'} " not in text
    if not installed:
        assert "not installed" in text


# ----------------------------------------------------------------------------- drawing

def _label_rows(drawn, color, x, y_box):
    """Rows above y_box where column x..x+20 shows ``color`` (the label's filled background)."""
    strip = drawn[:y_box, x:x + 20]
    return int((strip == np.asarray(color, np.uint8)).all(axis=2).any(axis=1).sum())


@pytest.mark.parametrize("use_opencv", [True, False])
def test_best_label_is_drawn_on_top(use_opencv):
    from runtime.draw import draw_detections, phrase_color
    from runtime.types import Detections

    image = np.zeros((200, 300, 3), np.uint8)
    box = [50, 80, 150, 180]
    dets = Detections(np.array([box, box], np.float32), np.array([0.9, 0.3], np.float32),  # best first,
                      np.array([0, 1], np.int32), ("dog", "cat"))                         # as postprocess
    drawn = draw_detections(image, dets, use_opencv=use_opencv)
    assert _label_rows(drawn, phrase_color("dog"), 50, 80) > 0
    assert _label_rows(drawn, phrase_color("cat"), 50, 80) == 0  # covered by the better label


@pytest.mark.parametrize("use_opencv", [True, False])
def test_label_size_follows_the_image(use_opencv):
    from runtime.draw import draw_detections, phrase_color
    from runtime.types import Detections

    heights = []
    for side in (120, 2000):
        image = np.zeros((side, side, 3), np.uint8)
        y = side // 2
        dets = Detections(np.array([[10, y, side // 2, side - 10]], np.float32), np.array([0.5], np.float32),
                          np.array([0], np.int32), ("person",))
        heights.append(_label_rows(draw_detections(image, dets, use_opencv=use_opencv), phrase_color("person"),
                                   10, y))
    assert 10 <= heights[0] <= 24 and heights[1] >= 40, heights
