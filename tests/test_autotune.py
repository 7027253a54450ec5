"""engines.autotune: the runtime times every CPU path a package has here and runs the fastest."""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from PIL import Image

import engines
from engines import autotune
from runtime import detect
from toy_package import make_toy_packages


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return make_toy_packages(tmp_path_factory.mktemp("autotune-toys"))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_time_paths_alternates_and_reports_medians():
    clock = FakeClock()
    calls = []

    def runner(label, seconds):
        def run():
            calls.append(label)
            clock.now += seconds
        return run

    ms = autotune.time_paths({"slow": runner("slow", 0.030), "fast": runner("fast", 0.010)},
                             budget_s=0.5, min_rounds=3, max_rounds=100, clock=clock)
    assert ms == pytest.approx({"slow": 30.0, "fast": 10.0})
    assert calls[:4] == ["slow", "slow", "fast", "fast"]             # two untimed runs each first
    assert calls[4:8] == ["slow", "fast", "slow", "fast"]             # then alternating rounds
    rounds = (len(calls) - 4) // 2
    assert rounds == 13  # 13 rounds x 40 ms = 0.52 s: the first round past the 0.5 s budget


def test_time_paths_stops_at_max_rounds():
    clock = FakeClock()

    def run():
        clock.now += 1.0

    calls = []
    autotune.time_paths({"a": lambda: (calls.append(1), run())}, budget_s=1e9, min_rounds=2, max_rounds=7,
                        clock=clock)
    assert len(calls) == 2 + 7


def test_cpu_paths_of_an_int8_package_include_its_integer_graph(toys):
    manifest = json.loads((toys["toy-int8"] / "manifest.json").read_text())
    labels = [p.label for p in autotune.cpu_paths(manifest)]
    assert labels[:2] == ["onnxruntime", "onnxruntime cpu_file"]
    fp32 = json.loads((toys["toy"] / "manifest.json").read_text())
    assert "onnxruntime cpu_file" not in [p.label for p in autotune.cpu_paths(fp32)]


def _reference_detect(e, package):
    ref = np.load(package / "reference" / "detector.npz")
    out = e.detect(ref["image"], ref["text_hidden"], ref["attention_mask"])
    return out, ref


def test_load_fastest_measures_then_remembers(toys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    package = toys["toy-int8"]
    manifest = json.loads((package / "manifest.json").read_text())
    labels = {p.label for p in autotune.cpu_paths(manifest)}
    with engines.load(package, "auto", fastest=True, threads=1) as e:
        choice = e.path_choice
        assert not choice.remembered and set(choice.ms) == labels
        assert choice.label == min(choice.ms, key=choice.ms.get)
        assert all(ms > 0 for ms in choice.ms.values())
        out, ref = _reference_detect(e, package)
        named = next(p for p in autotune.cpu_paths(manifest) if p.label == choice.label)
        with engines.load(package, named.backend, **named.load_options(1)) as direct:  # what it says it runs
            want, _ = _reference_detect(direct, package)
        for name in ("boxes", "token_logits", "centerness"):
            np.testing.assert_allclose(out[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    cache = tmp_path / "cache" / "fiber-edge" / autotune.CACHE_NAME
    entries = json.loads(cache.read_text())
    assert len(entries) == 1 and next(iter(entries.values()))["path"] == choice.label

    with engines.load(package, "auto", fastest=True, threads=1) as again:   # same key: not timed again
        assert again.path_choice.remembered and again.path_choice.label == choice.label
        assert again.path_choice.ms == pytest.approx(choice.ms)
        assert again.backend == ("openvino" if choice.label.startswith("openvino") else "onnxruntime")
    with engines.load(package, "auto", fastest=True, threads=2) as other:    # another thread count: timed
        assert not other.path_choice.remembered
    assert len(json.loads(cache.read_text())) == 2


def test_remembered_choice_is_what_opens(toys, tmp_path):
    """A cache entry naming the slower path is obeyed: the choice really comes from the cache."""
    package = toys["toy-int8"]
    manifest = json.loads((package / "manifest.json").read_text())
    paths = autotune.cpu_paths(manifest)
    key = autotune.cache_key(manifest, paths, 1)
    # per image the first path is fastest, but the cpu_file path starts far quicker
    ms = {p.label: 1.0 + i for i, p in enumerate(paths)}
    start = {p.label: 1.0 if p.label == "onnxruntime cpu_file" else 500.0 for p in paths}
    (tmp_path / autotune.CACHE_NAME).write_text(json.dumps(
        {key: {"path": paths[0].label, "ms": ms, "start_ms": start}}))
    opened = []

    def open_path(path, options):
        opened.append((path.label, options))
        return engines.load(package, path.backend, **options)

    with autotune.fastest_cpu_path(package, manifest, {"threads": 1}, open_path, cache_dir=tmp_path,
                                   runs=3) as e:
        assert e.path_choice.remembered and e.path_choice.label == "onnxruntime cpu_file"
        assert "quickest of" in e.path_choice.summary() and "for 3 images" in e.path_choice.summary()
    assert opened == [("onnxruntime cpu_file", {"verify": False, "use_cpu_file": True, "intra_op_threads": 1})]
    with autotune.fastest_cpu_path(package, manifest, {"threads": 1}, open_path, cache_dir=tmp_path) as e:
        assert e.path_choice.label == paths[0].label          # a stream: the fastest per image


def test_quickest_weighs_the_start_against_the_run_length():
    ms = {"openvino bf16": 17.0, "onnxruntime cpu_file": 36.0}
    start = {"openvino bf16": 1400.0, "onnxruntime cpu_file": 130.0}
    assert autotune.quickest(ms, start, None) == "openvino bf16"                # a camera or video
    assert autotune.quickest(ms, start, 1) == "onnxruntime cpu_file"            # 130 < 1400 ms
    assert autotune.quickest(ms, start, 60) == "onnxruntime cpu_file"           # 2254 < 2403 ms
    assert autotune.quickest(ms, start, 80) == "openvino bf16"                  # 2743 < 2974 ms
    assert autotune.quickest(ms, {}, 1) == "openvino bf16"                      # starts unknown


def test_an_entry_without_start_times_is_measured_again(toys, tmp_path):
    package = toys["toy"]
    manifest = json.loads((package / "manifest.json").read_text())
    paths = autotune.cpu_paths(manifest)
    key = autotune.cache_key(manifest, paths, 1)
    (tmp_path / autotune.CACHE_NAME).write_text(json.dumps(
        {key: {"path": paths[0].label, "ms": {p.label: 1.0 for p in paths}}}))
    with autotune.fastest_cpu_path(package, manifest, {"threads": 1},
                                   lambda p, o: engines.load(package, p.backend, **o),
                                   cache_dir=tmp_path, budget_s=0.05) as e:
        assert not e.path_choice.remembered and set(e.path_choice.start_ms) == {p.label for p in paths}
    entry = json.loads((tmp_path / autotune.CACHE_NAME).read_text())[key]
    assert set(entry["start_ms"]) == set(entry["ms"]) and min(entry["start_ms"].values()) > 0


def test_a_corrupt_cache_is_measured_again_and_rewritten(toys, tmp_path):
    package = toys["toy"]
    manifest = json.loads((package / "manifest.json").read_text())
    cache = tmp_path / autotune.CACHE_NAME
    cache.write_text("{not json")
    with autotune.fastest_cpu_path(package, manifest, {"threads": 1},
                                   lambda p, o: engines.load(package, p.backend, **o),
                                   cache_dir=tmp_path, budget_s=0.05) as e:
        assert not e.path_choice.remembered
    assert isinstance(json.loads(cache.read_text()), dict)


def test_an_unwritable_cache_still_runs(toys, tmp_path, capsys):
    package = toys["toy"]
    manifest = json.loads((package / "manifest.json").read_text())
    blocker = tmp_path / "file"
    blocker.write_text("x")  # the cache folder would have to be below a file
    with autotune.fastest_cpu_path(package, manifest, {"threads": 1},
                                   lambda p, o: engines.load(package, p.backend, **o),
                                   cache_dir=blocker / "sub", budget_s=0.05) as e:
        assert e.path_choice.cache is None
    assert "cannot remember the CPU path choice" in capsys.readouterr().err


def test_an_option_that_pins_a_path_keeps_the_manifest_rule(toys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with engines.load(toys["toy-int8"], "auto", fastest=True, use_cpu_file=True) as e:
        assert e.path_choice is None and e.backend == "onnxruntime"
    assert not (tmp_path / "fiber-edge" / autotune.CACHE_NAME).exists()


def test_cache_key_follows_the_detector_file_and_threads(toys):
    a = json.loads((toys["toy"] / "manifest.json").read_text())
    b = json.loads((toys["toy-int8"] / "manifest.json").read_text())
    paths = autotune.cpu_paths(a)
    assert autotune.cache_key(a, paths, 1) == autotune.cache_key(a, paths, 1)
    assert autotune.cache_key(a, paths, 1) != autotune.cache_key(a, paths, 2)
    assert autotune.cache_key(a, paths, 1) != autotune.cache_key(b, paths, 1)


def test_runtime_detect_names_the_fastest_path_first(toys, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(autotune.TIMED_RUNS):
        Image.fromarray(np.full((20, 30, 3), i, np.uint8)).save(images / f"{i:02d}.png")
    argv = ["--package", str(toys["toy-int8"]), str(images), "--prompt", "cat", "--json", "-", "--threads", "1"]
    assert detect.main(detect.get_args_parser().parse_args(argv)) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("fiber-detect: toy-int8 on ") and ", 1 threads, quickest of " in first, first
    assert f" here for {autotune.TIMED_RUNS} images (" in first and " ms to start, " in first and "; next " in first, first
    assert first.endswith("; measured now)"), first
    assert first.count(" ms/image") == 2 and len(first) < 200, first   # the choice and the runner-up only
    assert detect.main(detect.get_args_parser().parse_args(argv + ["--path-timings"])) == 0
    full = capsys.readouterr().err.splitlines()[0]
    when = re.search(r"; remembered from (\d{4}-\d\d-\d\d \d\d:\d\d)\)$", full)   # the first run's timing
    assert when and "open + first image " in full, full
    assert abs(time.time() - time.mktime(time.strptime(when.group(1), "%Y-%m-%d %H:%M"))) < 3600
    label = first[len("fiber-detect: toy-int8 on "):first.index(", 1 threads")]
    assert f"per image {label} " in full or f", {label} " in full, full   # every path listed


def test_path_choice_names_the_choice_and_the_runner_up():
    ms = {"openvino bf16": 14.6, "onnxruntime cpu_file": 40.2, "openvino f32": 22.5}
    start = {"openvino bf16": 496.0, "onnxruntime cpu_file": 344.0, "openvino f32": 1240.0}
    one = autotune.PathChoice("onnxruntime cpu_file", ms, False, None, start, runs=1)
    assert one.summary() == ("quickest of 3 CPU paths here for 1 image (344 ms to start, 40.2 ms/image; "
                             "next openvino bf16: 496 ms to start, 14.6 ms/image; measured now)")
    stream = autotune.PathChoice("openvino bf16", ms, True, None, start, runs=None)
    # remembered: milliseconds of another moment would read as this run's; their ratio holds
    assert stream.summary() == ("fastest of 3 CPU paths here (next openvino f32: 1.54x the time per image; "
                                "remembered)")
    assert "onnxruntime cpu_file 40.2 ms" in stream.summary(full=True)   # asked for: every path's ms
    four = autotune.PathChoice("onnxruntime cpu_file", ms, True, None, start, runs=4, measured="2026-12-05T09:41:07")
    assert four.summary() == ("quickest of 3 CPU paths here for 4 images (next openvino bf16: 1.16x the "
                              "time for 4 images; remembered from 2026-12-05 09:41)")   # (496+3*14.6)/(344+3*40.2)
    alone = autotune.PathChoice("openvino bf16", {"openvino bf16": 14.6}, True, None)
    assert alone.summary() == "fastest of 1 CPU paths here (remembered)"
    dated = autotune.PathChoice("openvino bf16", {"openvino bf16": 14.6}, True, None, measured="2026-12-05T09:41:07")
    assert dated.summary() == "fastest of 1 CPU paths here (remembered from 2026-12-05 09:41)"


def test_a_short_run_with_nothing_remembered_is_not_timed(toys, tmp_path, monkeypatch, capsys):
    """One image: timing every path (seconds; minutes for a large model on OpenVINO) would cost more
    than it could save, so ONNX Runtime's integer graph runs untimed and nothing is remembered."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "x.png")
    argv = ["--package", str(toys["toy-int8"]), str(tmp_path / "x.png"), "--prompt", "cat", "--json", "-"]
    assert detect.main(detect.get_args_parser().parse_args(argv)) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("fiber-detect: toy-int8 on onnxruntime cpu_file, not timed for 1 image: "), first
    assert f"{autotune.TIMED_RUNS}+ images time the " in first, first
    assert not (tmp_path / "cache" / "fiber-edge" / autotune.CACHE_NAME).exists()
