"""``python -m runtime.detect`` on the toy package: JSON lines, bad inputs, exit statuses, --save,
video frames, live prompt changes, Ctrl-C, a camera that disappears; torch stays out; the e2e
and soak benchmark scripts run (short).

Most runs call ``main(args)`` in-process (fast); the exit-status-2 and torch checks run the real
command in a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

import runtime.detect as detect
from benchmarks import e2e_fps, soak
from runtime.detect import get_args_parser, main
from runtime.draw import draw_detections, phrase_color
from runtime.predictor import Detector
from runtime.sources import Frame, LiveSource, Source, SourceError
from runtime.types import Detections
from toy_package import PACKAGE_IDS, REPO, make_toy_packages, package_path

PROMPT = "person. red mug"
RECORD_KEYS = {"image", "prompt", "phrases", "detections", "timing_ms"}


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return make_toy_packages(tmp_path_factory.mktemp("toys"))


@pytest.fixture(scope="module")
def toy(toys):
    return toys["toy"]


@pytest.fixture(params=PACKAGE_IDS)
def package(request, toys):
    return package_path(request.param, toys)


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def run_cli(argv, capsys):
    rc = main(get_args_parser().parse_args([str(a) for a in argv]))
    out = capsys.readouterr()
    return rc, out.out, out.err


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_record(rec, width, height):
    """The schema of a processed input; boxes inside the image; phrase names consistent."""
    assert RECORD_KEYS <= set(rec) and "error" not in rec
    assert sorted(rec["timing_ms"]) == ["network", "post", "pre", "text", "total"]
    t = rec["timing_ms"]
    assert t["network"] > 0 and min(t.values()) >= 0          # text is ~0 on a prompt-cache hit
    assert abs(t["total"] - (t["pre"] + t["text"] + t["network"] + t["post"])) <= 0.003  # rounded to 3 digits
    for d in rec["detections"]:
        assert sorted(d) == ["box", "phrase", "phrase_index", "score"]
        assert d["phrase"] == rec["phrases"][d["phrase_index"]] and 0 < d["score"] <= 1
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= width and 0 <= x2 <= width and 0 <= y1 <= height and 0 <= y2 <= height


# ----------------------------------------------------------------------------- images

def test_folder_of_images_one_line_each(package, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    sizes = {"a.png": (40, 60), "b.jpg": (30, 20), "c.png": (16, 16)}
    for name, (h, w) in sizes.items():
        Image.fromarray(_rgb(h, w, len(name))).save(tmp_path / "in" / name)
    rc, out, err = run_cli(["--package", package, "--image", tmp_path / "in", "--prompt", PROMPT,
                            "--json", tmp_path / "out.jsonl", "--threshold", "0.3", "--no-fastest-path"],
                           capsys)  # the library's default path (INT8 paths differ in the last digits)
    assert rc == 0, err
    records = read_jsonl(tmp_path / "out.jsonl")
    assert [r["image"].rsplit("/", 1)[1] for r in records] == sorted(sizes)
    with Detector(package, threshold=0.3) as det:
        for rec in records:
            name = rec["image"].rsplit("/", 1)[1]
            check_record(rec, sizes[name][1], sizes[name][0])
            assert rec["prompt"] == PROMPT and rec["phrases"] == ["person", "red mug"]
            assert rec["detections"] == det.detect(rec["image"], PROMPT).to_json()  # = the library
            n = len(rec["detections"])
            assert f"{name}: {n} detection{'' if n == 1 else 's'}" in out, out   # "1 detection", "0 detections"
    assert "network-only" in out and "end-to-end" in out
    table = [line.split()[0] for line in out.splitlines()[-9:]]
    assert {"pre", "text", "network", "post", "total"} <= set(table)  # the per-stage timing table


def test_json_to_stdout_moves_the_log_to_stderr(toy, tmp_path, capsys):
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "x.png")
    rc, out, err = run_cli(["--package", toy, tmp_path / "x.png", "--prompt", "cat", "--json", "-"], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["phrases"] == ["cat"]
    assert "end-to-end" in err


@pytest.fixture
def odd_images(tmp_path):
    """Images that must work: every Pillow mode we promise, 1x1 and 4000x10."""
    rgb, gray = _rgb(24, 32), _rgb(24, 32)[:, :, 0]
    d = tmp_path / "odd"
    d.mkdir()
    Image.fromarray(gray.astype(np.uint16) * 257).save(d / "sixteen.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(np.dstack([rgb, np.full(gray.shape, 128, np.uint8)])).save(d / "rgba.png")
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    Image.fromarray(gray).save(d / "gray.png")
    Image.fromarray(_rgb(1, 1)).save(d / "one.png")
    Image.fromarray(_rgb(10, 4000)).save(d / "wide.png")
    return d


@pytest.fixture
def bad_images(tmp_path):
    """Files that must fail one by one: truncated, empty, garbage, text, (unreadable)."""
    d = tmp_path / "bad"
    d.mkdir()
    Image.fromarray(_rgb(64, 64)).save(d / "full.jpg")
    data = (d / "full.jpg").read_bytes()
    (d / "full.jpg").unlink()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "empty.png").write_bytes(b"")
    (d / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (d / "notes.txt").write_text("not an image\n")
    reasons = {"truncated.jpg": "unreadable image data", "empty.png": "empty file",
               "garbage.jpg": "not an image file", "notes.txt": "not an image file"}
    if os.geteuid() != 0:  # root reads anything: no permission error to provoke
        (d / "locked.png").write_bytes(b"\x89PNG")
        (d / "locked.png").chmod(0)
        reasons["locked.png"] = "permission denied"
    return d, reasons


def test_bad_inputs_fail_one_by_one_and_the_run_goes_on(toy, tmp_path, odd_images, bad_images, capsys):
    bad_dir, reasons = bad_images
    good = sorted(odd_images.iterdir())
    order = [good[0], *(bad_dir / n for n in reasons), *good[1:]]  # bad ones in the middle
    rc, out, err = run_cli(["--package", toy, "--prompt", PROMPT, "--json", tmp_path / "o.jsonl",
                            "--image", *order], capsys)
    assert rc == 1
    records = read_jsonl(tmp_path / "o.jsonl")
    assert [r["image"] for r in records] == [str(p) for p in order]
    for path, rec in zip(order, records):
        if path.name in reasons:
            assert set(rec) == {"image", "error"} and reasons[path.name] in rec["error"], rec
            assert f"{path}: " in err  # one stderr line per failed input, naming it
        else:
            img = Image.open(path)
            check_record(rec, img.width, img.height)
    assert f"{len(order)} inputs ({len(good)} ok, {len(reasons)} failed)" in out


def test_requests_file(toy, tmp_path, capsys):
    Image.fromarray(_rgb(20, 30)).save(tmp_path / "rgb.png")
    long_prompt = ". ".join(f"thing number {i}" for i in range(60))
    lines = [
        {"image": "rgb.png", "prompt": "a red mug on a table", "phrases": [[[2, 9]], [[15, 20]]]},
        {"image": str(tmp_path / "rgb.png"), "prompt": "cat. dog"},
        "this is not json",
        {"prompt": "no image"},
        {"image": "rgb.png", "prompt": ""},
        {"image": "rgb.png", "prompt": ". . ."},
        {"image": "rgb.png", "prompt": "cat", "phrases": [[[0, 99]]]},
        {"image": "missing.png", "prompt": "cat"},
        {"image": "rgb.png", "prompt": long_prompt},
        {"image": "rgb.png", "prompt": "café. 猫"},
        {"image": "rgb.png"},  # takes --prompt
    ]
    text = "\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines)
    (tmp_path / "req.jsonl").write_text(text + "\n\n", encoding="utf-8")
    rc, out, err = run_cli(["--package", toy, "--requests", tmp_path / "req.jsonl", "--prompt", "person",
                            "--json", tmp_path / "out.jsonl"], capsys)
    assert rc == 1
    r = read_jsonl(tmp_path / "out.jsonl")
    assert len(r) == len(lines)
    assert r[0]["phrases"] == ["red mug", "table"] and r[1]["phrases"] == ["cat", "dog"]
    with Detector(toy) as det:
        want = det.detect(tmp_path / "rgb.png", "a red mug on a table", [[[2, 9]], [[15, 20]]])
    assert r[0]["detections"] == want.to_json()
    errors = {2: "not valid JSON", 3: '"image"', 4: "empty", 5: "no phrases", 6: "outside the prompt",
              7: "no such file"}
    for i, words in errors.items():
        assert set(r[i]) == {"image", "error"} and words in r[i]["error"], r[i]
    assert r[2]["image"] is None and r[7]["image"] == "missing.png"
    assert r[8]["warnings"] == ["prompt truncated to 64 tokens"] and len(r[8]["phrases"]) == 60
    assert "warning: prompt of" in err and "truncated" in err
    assert r[9]["phrases"] == ["café", "猫"] and "猫" in (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    assert r[10]["prompt"] == "person"
    for i in (0, 1, 8, 9, 10):
        check_record(r[i], 30, 20)


def test_save_draws_boxes_in_the_phrase_colour(toy, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    image = _rgb(60, 90)
    Image.fromarray(image).save(tmp_path / "in" / "scene.png")
    rc, _, err = run_cli(["--package", toy, "--image", tmp_path / "in", "--prompt", "red mug",
                          "--threshold", "0", "--max-detections", "1", "--save", tmp_path / "ann",
                          "--json", tmp_path / "o.jsonl"], capsys)
    assert rc == 0, err
    (det,) = read_jsonl(tmp_path / "o.jsonl")[0]["detections"]
    drawn = np.asarray(Image.open(tmp_path / "ann" / "scene.png"))
    assert drawn.shape == image.shape and (drawn != image).any()
    x1, y1, _, y2 = (int(round(v)) for v in det["box"])
    x1, y1, y2 = min(x1, 89), min(y1, 59), min(y2, 59)
    column = drawn[y1:y2 + 1, x1]  # the box's left edge (and the label fill above it)
    assert len(column) and (column == phrase_color("red mug")).all()


# ----------------------------------------------------------------------------- video

def _write_video(path, frames=12, size=(64, 48)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), 15 * i, np.uint8))
    writer.release()
    return path


def test_video_frame_by_frame_with_max_frames_and_save(toy, tmp_path, capsys):
    video = _write_video(tmp_path / "clip.avi")
    rc, out, err = run_cli(["--package", toy, "--video", video, "--prompt", PROMPT, "--max-frames", 5,
                            "--json", tmp_path / "v.jsonl", "--save", tmp_path / "out.avi", "--headless"],
                           capsys)
    assert rc == 0, err
    records = read_jsonl(tmp_path / "v.jsonl")
    assert [r["frame"] for r in records] == [0, 1, 2, 3, 4]
    assert all(r["image"] == str(video) for r in records)
    for r in records:
        check_record(r, 64, 48)
    cap = cv2.VideoCapture(str(tmp_path / "out.avi"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 5 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 64
    assert not list(tmp_path.glob(".*tmp*"))  # temp files renamed away


def test_a_video_of_another_aspect_gets_one_canvas_hint(toy, tmp_path, capsys):
    """8:3 frames on the toy's square 32 x 32 canvas fill 38% of it: one line names the canvas to
    export on (32 x 64, where they would be twice as large)."""
    video = _write_video(tmp_path / "clip.avi", size=(128, 48))
    rc, out, err = run_cli(["--package", toy, "--video", video, "--prompt", PROMPT, "--max-frames", 3,
                            "--json", tmp_path / "v.jsonl", "--headless"], capsys)
    assert rc == 0, err
    hints = [line for line in (out + err).splitlines() if "frames fill" in line]
    assert len(hints) == 1, out + err
    assert hints[0].startswith("fiber-detect: 128x48 frames fill 38% of this package's 32x32 canvas; "), hints
    assert "--canvas 32x64" in hints[0] and "2.00x larger" in hints[0]


def test_canvas_hint_rules():
    from runtime.detect import canvas_hint
    from runtime.preprocess import Preprocessor

    class Fake:
        def __init__(self, hw):
            self.input_hw, self.preprocessor = hw, Preprocessor(hw)

    line = canvas_hint((480, 640), Fake((256, 256)))
    assert "640x480 frames fill 75% of this package's 256x256 canvas" in line
    assert "--canvas 224x288" in line and "1.12x larger" in line
    assert "--canvas 192x352" in canvas_hint((720, 1280), Fake((256, 256)))
    assert canvas_hint((480, 640), Fake((224, 288))) is None        # the camera's own canvas
    assert canvas_hint((300, 300), Fake((256, 256))) is None        # square on square
    assert "--canvas 256x256" in canvas_hint((300, 300), Fake((224, 288)))


def test_prompt_typed_while_running_takes_effect(toy, tmp_path, capsys, monkeypatch):
    typed = iter([None, ". .", "cat", None, None, None])

    class ScriptedPrompts:
        def __init__(self, stream):
            pass

        def poll(self):
            return next(typed)

    monkeypatch.setattr(detect, "PromptInput", ScriptedPrompts)
    video = _write_video(tmp_path / "clip.avi")
    rc, out, _ = run_cli(["--package", toy, video, "--prompt", PROMPT, "--prompt-from-stdin",
                          "--max-frames", 4, "--json", tmp_path / "v.jsonl"], capsys)
    assert rc == 0
    prompts = [r["prompt"] for r in read_jsonl(tmp_path / "v.jsonl")]
    assert prompts == [PROMPT, PROMPT, "cat", "cat"]
    assert "prompt '. .' ignored" in out and "prompt is now 'cat'" in out


def test_prompt_input_thread_reads_lines():
    r, w = os.pipe()
    with open(r, "r") as reader, open(w, "w") as writer:
        prompts = detect.PromptInput(reader)
        writer.write("first\n\n  second  \n")
        writer.close()
        prompts._thread.join(5)
        assert prompts.poll() == "second" and prompts.poll() is None


class FakeSource(Source):
    """Two frames, then Ctrl-C."""

    def __iter__(self):
        for i in range(2):
            yield Frame(_rgb(8, 8, i), "fake://0", i, bgr=True)
        raise KeyboardInterrupt


def test_ctrl_c_stops_cleanly(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(detect, "open_source", lambda spec, **kw: FakeSource())
    rc, out, _ = run_cli(["--package", toy, "--camera", 0, "--prompt", "cat", "--headless",
                          "--json", tmp_path / "c.jsonl"], capsys)
    assert rc == 0 and "interrupted" in out and "2 inputs (2 ok, 0 failed)" in out
    assert [r["frame"] for r in read_jsonl(tmp_path / "c.jsonl")] == [0, 1]


def test_camera_that_disappears_is_retried_then_exit_2(toy, tmp_path, capsys, monkeypatch):
    opens = []

    class Camera:
        def __init__(self):
            self.left = 3

        def read(self):
            self.left -= 1
            return (True, _rgb(8, 8)) if self.left >= 0 else (False, None)

        def release(self):
            pass

    def reopen():
        opens.append(1)
        if len(opens) > 1:
            raise SourceError("/dev/video0 is gone")
        return Camera()

    monkeypatch.setattr(detect, "open_source", lambda spec, prepare=None, **kw: LiveSource(
        reopen, spec.uri, retries=2, retry_delay=0.001, prepare=prepare))
    rc, out, err = run_cli(["--package", toy, "--camera", 0, "--prompt", "cat", "--headless",
                            "--json", tmp_path / "c.jsonl"], capsys)
    assert rc == 2 and len(opens) == 3
    assert err.strip().splitlines()[-1].startswith("fiber-detect: error: camera 0: lost")
    assert "gave up after 2 reconnection attempts" in err
    assert len(read_jsonl(tmp_path / "c.jsonl")) >= 1  # frames before the loss were written


# ----------------------------------------------------------------------------- exit status 2

@pytest.mark.parametrize("argv,message", [
    (["--prompt", "x"], "no input"),
    (["IMG"], "--prompt is required"),
    (["IMG", "--prompt", ". ."], "has no phrases"),
    (["IMG", "--prompt", ""], "prompt is empty"),
    (["IMG", "--prompt", "x", "--backend", "tensorrt"], "engine from it first"),
    (["IMG", "--prompt", "x", "--max-frames", "0"], "--max-frames"),
    (["--camera", "0", "--prompt", "x", "--resolution", "big"], "--resolution"),
    (["BROKEN_VIDEO", "--prompt", "x"], "cannot open it as a video"),
    (["csi://zero", "--prompt", "x"], "csi://N"),
    (["IMG", "--requests", "REQ", "--prompt", "x"], "cannot be combined"),
    (["IMG", "--prompt", "x", "--show"], "--show needs a display"),
    (["IMG", "--prompt", "x", "--threshold", "1.5"], "--threshold"),
    (["IMG", "--prompt", "x", "--save", "out.mp4"], "exactly one video/camera input"),
    (["--requests", "NOPE", "--prompt", "x"], "cannot read it"),
])
def test_unusable_arguments_exit_2(toy, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "x.png")
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
    (tmp_path / "r.jsonl").write_text("{}\n")
    subst = {"IMG": tmp_path / "x.png", "BROKEN_VIDEO": tmp_path / "broken.mp4", "REQ": tmp_path / "r.jsonl",
             "NOPE": tmp_path / "nope.jsonl"}
    rc, out, err = run_cli(["--package", toy, *(subst.get(a, a) for a in argv)], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("fiber-detect: error: ") and message in err, err
    assert out == ""


def _cli_subprocess(*argv):
    return subprocess.run([sys.executable, "-m", "runtime.detect", *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_missing_camera_and_bad_package_one_line_exit_2(toy, tmp_path):
    cam = _cli_subprocess("--package", toy, "--camera", "9", "--prompt", "person")
    assert cam.returncode == 2, cam.stderr
    assert len(cam.stderr.splitlines()) == 1 and cam.stdout == ""
    assert cam.stderr.startswith("fiber-detect: error: camera 9: /dev/video9 does not exist")
    pkg = _cli_subprocess("--package", tmp_path / "nope", "--image", toy / "tokenizer.json", "--prompt", "x")
    assert pkg.returncode == 2 and len(pkg.stderr.splitlines()) == 1
    assert pkg.stderr.startswith(f"fiber-detect: error: package {tmp_path / 'nope'}") and pkg.stdout == ""


def test_runtime_detect_never_imports_torch_or_fiber(toy, tmp_path):
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "x.png")
    code = f"""
import sys
import runtime.detect
heavy = lambda: sorted(m for m in sys.modules if m == "torch" or m == "fiber" or m.startswith(("torch.", "fiber.")))
assert not heavy(), heavy()
rc = runtime.detect.main(runtime.detect.get_args_parser().parse_args(
    ["--package", {str(toy)!r}, {str(tmp_path / 'x.png')!r}, "--prompt", "cat", "--save", {str(tmp_path / 's')!r}]))
assert rc == 0, rc
assert not heavy(), heavy()
print("clean")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("clean"), proc.stderr


def test_without_opencv_images_work_and_videos_say_why(toy, tmp_path):
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "x.png")
    video = _write_video(tmp_path / "clip.avi", frames=2)
    code = f"""
import sys
sys.modules["cv2"] = None  # as if OpenCV were not installed
from runtime.detect import get_args_parser, main
args = ["--package", {str(toy)!r}, "--prompt", "cat", "--headless", "--no-fastest-path"]
assert main(get_args_parser().parse_args(args + [{str(tmp_path / 'x.png')!r}, "--save", {str(tmp_path / 's')!r}])) == 0
sys.exit(main(get_args_parser().parse_args(args + [{str(video)!r}])))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["fiber-detect: toy on onnxruntime",  # the image run's first line
                                        "fiber-detect: error: cameras, streams and videos need OpenCV: pip "
                                        "install opencv-python-headless (or the system OpenCV on a Jetson)"]
    assert (tmp_path / "s" / "x.png").is_file()  # drawn with Pillow


@pytest.mark.parametrize("use_opencv", [True, False])
@pytest.mark.parametrize("bgr", [False, True])
def test_draw_uses_the_phrase_colour(use_opencv, bgr):
    image = np.zeros((50, 80, 3), np.uint8)
    dets = Detections(np.array([[10, 20, 60, 45]], np.float32), np.array([0.9], np.float32),
                      np.array([1], np.int32), ("person", "red mug"))
    drawn = draw_detections(image, dets, bgr=bgr, use_opencv=use_opencv)
    want = np.array(phrase_color("red mug"))[::-1 if bgr else 1]
    assert (drawn[22:46, 10] == want).all() and (drawn[22:46, 60] == want).all()  # left/right edges
    assert (drawn[:, :8] == 0).all() and (image == 0).all()  # nothing else touched, input kept
    assert phrase_color("red mug") == phrase_color("red mug") != phrase_color("person")


# ----------------------------------------------------------------------------- benchmarks (short)

def test_e2e_and_soak_scripts_run_short(toy, capsys):
    rc = e2e_fps.main(e2e_fps.get_args_parser().parse_args(
        ["--package", str(toy), "--frames", "12", "--rounds", "1", "--width", "64", "--height", "48"]))
    out = capsys.readouterr().out
    assert rc == 0 and "network-only" in out and "ratio" in out
    rc = soak.main(soak.get_args_parser().parse_args(
        ["--package", str(toy), "--frames", "40", "--video-frames", "15", "--sample-every", "20",
         "--prompt-every", "10"]))
    out = capsys.readouterr().out
    assert rc == 0 and "soak: 40 frames" in out and "text.onnx ran 4x" in out
