"""runtime.predictor.Detector on the toy packages (and any shipped package under models/).

The wiring check compares the Detector (ONNX Runtime + C extension) with the same pipeline
composed from independent numpy parts: the toy package's numpy reference of its graphs,
letterbox_ref and postprocess(use_native=False). Backend parity: ONNX Runtime vs OpenVINO.
"""
from __future__ import annotations

import dataclasses
import inspect
import time
import warnings

import numpy as np
import pytest
from PIL import Image

import engines
from common import package as pkg
from runtime.postprocess import postprocess
from runtime.predictor import Detector, DetectorConfig, PreparedImage, StageTimes, build_detector
from runtime.preprocess import letterbox_ref
from runtime.types import Detections
from toy_package import PACKAGE_IDS, assert_close, config_of, make_toy_packages, package_path, reference_detector, reference_text

PROMPT = "person. red mug. the dog"


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return make_toy_packages(tmp_path_factory.mktemp("toys"))


@pytest.fixture(params=PACKAGE_IDS)
def package(request, toys):
    return package_path(request.param, toys)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 48x80 RGB test image (not square, so the letterbox pads)."""
    return np.random.default_rng(7).integers(0, 256, (48, 80, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def toy_detector(toys):
    with Detector(toys["toy"], threshold=0.3, max_detections=20) as det:
        yield det


def test_matches_numpy_composition_of_the_pipeline(toys, image):
    cfg = config_of(toys["toy"])
    with Detector(toys["toy"], threshold=0.3, max_detections=20) as det:
        got = det.detect(image, PROMPT)
        enc = det.prepare(PROMPT)
    hidden = reference_text(cfg, enc.input_ids, enc.attention_mask)
    buffer = np.zeros((3, cfg.size, cfg.size), np.float32)
    info = letterbox_ref(image, buffer)
    out = reference_detector(cfg, buffer[None], hidden, enc.attention_mask)
    want = postprocess(out[pkg.BOXES][0], out[pkg.TOKEN_LOGITS][0], out[pkg.CENTERNESS][0],
                       enc.phrase_map, info, threshold=0.3, max_detections=20, use_native=False,
                       phrases=enc.phrases)
    assert isinstance(got, Detections) and 0 < len(want) <= 20
    assert got.phrases == ("person", "red mug", "the dog")
    np.testing.assert_array_equal(got.phrase_index, want.phrase_index)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)
    np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-2)
    assert (got.boxes[:, 2] <= 80).all() and (got.boxes[:, 3] <= 48).all()  # source pixels


def _confident(d: Detections, floor: float) -> Detections:
    keep = d.scores >= floor  # away from the threshold, where tiny backend differences flip membership
    return Detections(d.boxes[keep], d.scores[keep], d.phrase_index[keep], d.phrases)


def test_onnxruntime_and_openvino_give_the_same_detections(package, image):
    precision = engines.load(package, "onnxruntime", verify=False).manifest["precision"]
    tol = 1e-3 if precision == "fp32" else 2e-2
    results = {}
    for backend in ("onnxruntime", "openvino"):
        # the same (Q/DQ) detector.onnx on both: ORT's CPU-only INT8 file is another model
        opts = {"use_cpu_file": False} if backend == "onnxruntime" else {}
        with Detector(engines.load(package, backend, **opts), threshold=0.2) as det:
            assert det.backend == backend
            results[backend] = _confident(det.detect(image, PROMPT), 0.2 + 5 * tol)
    ort, ov = results["onnxruntime"], results["openvino"]
    assert type(ort) is type(ov) is Detections and ort.phrases == ov.phrases
    assert len(ort) == len(ov)
    np.testing.assert_array_equal(ort.phrase_index, ov.phrase_index)
    assert_close(ov.scores, ort.scores, tol, "scores")
    assert_close(ov.boxes, ort.boxes, tol, "boxes")


def test_prompt_cache_runs_text_once_per_prompt(toys, image):
    with Detector(toys["toy"], prompt_cache_size=2) as det:
        calls = []
        run = det.engines.text.run
        det.engines.text.run = lambda feeds: calls.append(feeds[pkg.INPUT_IDS].copy()) or run(feeds)
        first = det.detect(image, PROMPT)
        for _ in range(3):
            again = det.detect(image, PROMPT)
        assert len(calls) == 1 and det.text_runs == 1
        np.testing.assert_array_equal(first.boxes, again.boxes)
        det.detect(image, "cat")
        assert len(calls) == 2
        det.detect(image, PROMPT)                      # still cached (LRU of 2)
        assert len(calls) == 2
        det.detect(image, PROMPT, [[[0, 6]], [[8, 15]]])  # same text, other spans -> new entry
        assert len(calls) == 3
        det.detect(image, "cat")                       # evicted by the spans entry -> runs again
        assert len(calls) == 4
        assert det.last_timing.text > 0 and det.last_prompt.prompt == "cat"   # "cat" was encoded again


def test_image_forms_agree(toy_detector, image, tmp_path):
    Image.fromarray(image).save(tmp_path / "x.png")
    ref = toy_detector.detect(image, PROMPT)
    assert len(ref) > 0
    variants = {
        "path": toy_detector.detect(tmp_path / "x.png", PROMPT),
        "str path": toy_detector.detect(str(tmp_path / "x.png"), PROMPT),
        "PIL": toy_detector.detect(Image.fromarray(image), PROMPT),
        "BGR": toy_detector.detect(np.ascontiguousarray(image[:, :, ::-1]), PROMPT, bgr=True),
        "prepared": toy_detector.detect(toy_detector.preprocess(image), PROMPT),
    }
    for name, got in variants.items():
        np.testing.assert_array_equal(got.boxes, ref.boxes, err_msg=name)
        np.testing.assert_array_equal(got.scores, ref.scores, err_msg=name)
    prepared = toy_detector.preprocess(image)
    assert isinstance(prepared, PreparedImage) and prepared.tensor.shape == (1, 3, 32, 32)
    assert prepared.tensor is not toy_detector.preprocess(image).tensor  # own buffer per call


def test_timing(toys, image):
    """Every stage is measured (> 0), the stages fit inside the call's wall time, and a cached
    prompt costs less text time than encoding it."""
    with Detector(toys["toy"]) as det:
        start = time.perf_counter()
        det.detect(image, PROMPT)
        wall_ms = (time.perf_counter() - start) * 1e3
        first = det.last_timing
        det.detect(image, PROMPT)
        cached = det.last_timing
    assert isinstance(first, StageTimes)
    assert first.pre > 0 and first.text > 0 and first.network > 0 and first.post > 0
    assert first.total <= wall_ms
    assert cached.text < first.text
    assert first.to_json()["total"] == pytest.approx(first.pre + first.text + first.network + first.post, abs=2e-3)
    assert sorted(first.to_json()) == ["network", "post", "pre", "text", "total"]


def test_threshold_and_max_detections_overrides(toys, image):
    """The overrides cut the default-ranked list exactly where they say (scores sorted best first)."""
    with Detector(toys["toy"], threshold=0.0) as det:
        full = det.detect(image, PROMPT)
    assert len(full) > 3 and (np.diff(full.scores) <= 0).all()
    cut = float(full.scores[3])                      # three detections score above it
    assert cut < full.scores[2]
    with Detector(toys["toy"], threshold=cut) as det:
        above = det.detect(image, PROMPT)
    with Detector(toys["toy"], threshold=0.0, max_detections=2) as det:
        best2 = det.detect(image, PROMPT)
    np.testing.assert_array_equal(above.scores, full.scores[:3])
    np.testing.assert_array_equal(above.boxes, full.boxes[:3])
    np.testing.assert_array_equal(best2.scores, full.scores[:2])


def test_phrase_spans_name_the_phrases(toy_detector, image):
    prompt = "a red mug on a wooden table"
    dets = toy_detector.detect(image, prompt, phrases=[[[2, 9]], [[15, 21], [22, 27]]])
    assert dets.phrases == ("red mug", "wooden table")
    assert len(dets) > 0 and set(dets.phrase_index.tolist()) <= {0, 1}


def test_bad_prompts_raise_and_long_prompts_truncate(toy_detector, image):
    for prompt in ("", "   ", ". . .", " . "):
        with pytest.raises(ValueError):
            toy_detector.detect(image, prompt)
    with pytest.raises(ValueError, match="outside the prompt"):
        toy_detector.detect(image, "cat", phrases=[[[0, 9]]])
    long_prompt = ". ".join(f"object number {i}" for i in range(60))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dets = toy_detector.detect(image, long_prompt)
    assert any("truncated" in str(w.message) for w in caught)
    assert toy_detector.last_prompt.truncated and len(dets.phrases) == 60
    assert toy_detector.last_prompt.input_ids.shape == (1, 64)


def test_non_ascii_prompt(toy_detector, image):
    dets = toy_detector.detect(image, "café au lait. 猫. Straße")
    assert dets.phrases == ("café au lait", "猫", "Straße")
    assert len(dets) > 0


def test_detector_config_fields_are_the_detectors_keyword_arguments():
    """DetectorConfig and Detector list the same options with the same defaults (no drift)."""
    params = list(inspect.signature(Detector).parameters.values())[1:]
    fields = [f for f in dataclasses.fields(DetectorConfig) if f.name != "package"]
    assert [(p.name, p.default) for p in params] == [(f.name, f.default) for f in fields]


def test_build_detector_and_bad_settings(toys, tmp_path):
    det = build_detector(DetectorConfig(package=str(toys["toy"]), backend="ort", threads=1,
                                        max_detections=5))
    assert det.backend == "onnxruntime" and det.post.max_detections == 5 and det.input_size == 32
    det.close()
    with pytest.raises(ValueError, match="threshold"):
        Detector(toys["toy"], threshold=1.5)
    with pytest.raises(engines.EngineError, match="neither a model package"):
        Detector(tmp_path)
    with pytest.raises(engines.EngineError, match="engine from it first"):  # the flavour installed here
        Detector(toys["toy"], backend="tensorrt")
