"""runtime.postprocess / preprocess / types: the pipeline by hand, C vs numpy, inputs, fallback."""
from __future__ import annotations

import json
import math
import sys
import types
import warnings

import numpy as np
import pytest
from PIL import Image

from runtime import postprocess as post
from runtime import preprocess as pre
from common.prompts import parse_phrases, phrase_token_map
from runtime.postprocess import postprocess
from runtime.preprocess import Preprocessor, letterbox_info, letterbox_ref, to_rgb_uint8
from runtime.types import Detections, LetterboxInfo


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# postprocess

def _hand_case():
    """4 anchors, 6 tokens, 2 phrases (tokens {1} and {3, 4}) on a 200x100 source, S = 100."""
    info = letterbox_info(200, 100, 100)  # scale 0.5, 100 x 50 at the top-left
    boxes = np.array([[10, 10, 30, 30],    # phrase 0, best
                      [11, 10, 31, 30],    # phrase 0, overlaps anchor 0 -> suppressed
                      [10, 10, 30, 30],    # phrase 1: same box, other phrase -> kept
                      [80, 40, 120, 60]],  # below threshold for both (but x2 past the image)
                     np.float32)
    lo = -10.0
    logits = np.full((4, 6), lo, np.float32)
    logits[0, 1], logits[1, 1] = 3.0, 2.0
    logits[2, 3], logits[2, 4] = 1.0, 0.0
    centerness = np.array([2.0, 2.0, 0.5, -9.0], np.float32)
    pmap = np.zeros((2, 6), np.float32)
    pmap[0, 1] = pmap[1, 3] = pmap[1, 4] = 1
    return info, boxes, logits, centerness, pmap


@pytest.mark.parametrize("use_native", [True, False])
def test_postprocess_by_hand(use_native):
    info, boxes, logits, ctr, pmap = _hand_case()
    det = postprocess(boxes, logits, ctr, pmap, info, use_native=use_native,
                      phrases=("cat", "red mug"))
    s0 = _sig(3.0) * _sig(2.0)
    s2 = (_sig(1.0) + _sig(0.0)) / 2 * _sig(0.5)
    assert s0 > s2  # so anchor 0 comes first
    np.testing.assert_allclose(det.scores, [s0, s2], rtol=1e-6)
    np.testing.assert_array_equal(det.phrase_index, [0, 1])
    np.testing.assert_array_equal(det.boxes, [[20, 20, 60, 60], [20, 20, 60, 60]])
    assert det.phrases == ("cat", "red mug")
    # lower the threshold: anchor 3 appears, its box clipped to the 200 x 100 image
    det = postprocess(boxes, logits, ctr, pmap, info, threshold=0.0, nms_iou=0.6,
                      use_native=use_native)
    clipped = [160, 80, 200, 100]
    assert clipped in det.boxes.tolist()
    assert len(det) == 4  # anchors 0, 2, and 3 for both phrases
    # max_detections and pre_nms_top_k
    assert len(postprocess(boxes, logits, ctr, pmap, info, threshold=0.0, max_detections=1,
                           use_native=use_native)) == 1
    det = postprocess(boxes, logits, ctr, pmap, info, threshold=0.0, nms_iou=1.0,
                      pre_nms_top_k=1, use_native=use_native)
    assert sorted(det.phrase_index.tolist()) == [0, 1]  # one per phrase, no NMS at IoU 1


@pytest.mark.parametrize("seed", range(4))
def test_postprocess_native_equals_numpy(seed):
    rng = np.random.default_rng(seed)
    n, t, p = 300, 16, 3
    xy = rng.uniform(0, 200, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (n, 2))], 1).astype(np.float32)
    logits = rng.normal(-2, 2, (n, t)).astype(np.float32)
    ctr = rng.normal(0, 1, n).astype(np.float32)
    pmap = (rng.random((p, t)) < 0.3).astype(np.float32)
    info = letterbox_info(500, 300, 256)
    a = postprocess(boxes, logits, ctr, pmap, info, pre_nms_top_k=40, max_detections=30)
    b = postprocess(boxes, logits, ctr, pmap, info, pre_nms_top_k=40, max_detections=30,
                    use_native=False)
    assert len(a) > 5
    np.testing.assert_array_equal(a.phrase_index, b.phrase_index)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)


def test_postprocess_empty_and_bad_inputs():
    info = letterbox_info(10, 10, 32)
    det = postprocess(np.zeros((0, 4)), np.zeros((0, 5)), np.zeros(0), np.ones((2, 5)), info)
    assert len(det) == 0 and det.phrases == ("0", "1") and det.boxes.shape == (0, 4)
    det = postprocess(np.zeros((3, 4)), np.zeros((3, 5)), np.zeros(3), np.zeros((0, 5)), info)
    assert len(det) == 0
    with pytest.raises(ValueError, match="phrase names"):
        postprocess(np.zeros((3, 4)), np.zeros((3, 5)), np.zeros(3), np.ones((2, 5)), info,
                    phrases=("a",))
    with pytest.raises(ValueError, match="need boxes"):
        postprocess(np.zeros((3, 4)), np.zeros((2, 5)), np.zeros(3), np.ones((2, 5)), info)


# ---------------------------------------------------------------------------------------------
# phrases

@pytest.mark.parametrize("prompt,names", [
    ("person", ["person"]),
    ("person. red mug. the dog on the left", ["person", "red mug", "the dog on the left"]),
    ("person. red mug.", ["person", "red mug"]),
    ("  cat .  . dog  ", ["cat", "dog"]),
    ("Grüße. 猫", ["Grüße", "猫"]),
])
def test_parse_phrases(prompt, names):
    spans = parse_phrases(prompt)
    assert [prompt[s:e] for [(s, e)] in spans] == names


@pytest.mark.parametrize("prompt", ["", "   ", ". . .", ".", " .  . "])
def test_parse_phrases_rejects_empty(prompt):
    with pytest.raises(ValueError, match="no phrases"):
        parse_phrases(prompt)


def test_phrase_token_map():
    # "[CLS] red mug . dog [SEP] [PAD]" over "red mug. dog"
    offsets = [(0, 0), (0, 3), (4, 7), (7, 8), (9, 12), (0, 0)]
    m = phrase_token_map(offsets, [[(0, 7)], [(9, 12)], [(0, 3), (9, 12)], [(2, 5)]], 7)
    assert m.dtype == np.float32 and m.shape == (4, 7)
    np.testing.assert_array_equal(m, [[0, 1, 1, 0, 0, 0, 0],
                                      [0, 0, 0, 0, 1, 0, 0],
                                      [0, 1, 0, 0, 1, 0, 0],
                                      [0, 1, 1, 0, 0, 0, 0]])  # partial overlaps count


# ---------------------------------------------------------------------------------------------
# types

def test_detections_record():
    d = Detections([[1, 2, 3, 4.5]], [0.25], [1], ("cat", "dog"))
    assert len(d) == 1 and d.boxes.dtype == np.float32 and d.phrase_index.dtype == np.int32
    assert d[0].phrase == "dog" and d[0].box == (1.0, 2.0, 3.0, 4.5)
    out = json.loads(json.dumps(d.to_json()))
    assert out == [{"phrase_index": 1, "phrase": "dog", "box": [1, 2, 3, 4.5], "score": 0.25}]
    with pytest.raises(ValueError):
        d.boxes[0, 0] = 7  # read-only
    e = Detections.empty(("a",))
    assert len(e) == 0 and e.to_json() == [] and e.boxes.shape == (0, 4)
    with pytest.raises(ValueError, match="out of range"):
        Detections([[1, 2, 3, 4]], [0.5], [2], ("cat", "dog"))
    with pytest.raises(ValueError, match="shape"):
        Detections([[1, 2, 3, 4]], [0.5, 0.4], [0], ("cat",))


# ---------------------------------------------------------------------------------------------
# to_rgb_uint8 and Preprocessor

def _pil(mode: str, size=(5, 4)) -> Image.Image:
    return Image.new("RGB", size, (200, 100, 50)).convert(mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr",
                                  "I", "I;16", "F"])
def test_to_rgb_uint8_pil_modes(mode):
    img = _pil(mode) if mode != "I;16" else Image.fromarray(np.full((4, 5), 65535, np.uint16))
    a = to_rgb_uint8(img)
    assert a.dtype == np.uint8 and a.shape == (4, 5, 3)


def test_to_rgb_uint8_values():
    a16 = np.array([[0, 257 * 100, 65535]], np.uint16)
    assert to_rgb_uint8(a16)[0, :, 0].tolist() == [0, 100, 255]
    assert to_rgb_uint8(Image.fromarray(a16))[0, :, 1].tolist() == [0, 100, 255]  # I;16
    palette = Image.new("P", (2, 2))
    palette.putpalette([10, 20, 30] * 256)
    palette.info["transparency"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_rgb_uint8(palette)[0, 0].tolist() == [10, 20, 30]
    cmyk = Image.new("CMYK", (1, 1), (0, 0, 0, 0))
    assert to_rgb_uint8(cmyk)[0, 0].tolist() == [255, 255, 255]
    bgra = np.array([[[1, 2, 3, 4]]], np.uint8)
    assert to_rgb_uint8(bgra, bgr=True)[0, 0].tolist() == [3, 2, 1]
    assert to_rgb_uint8(np.array([[0.0, 1.0]]))[0, :, 2].tolist() == [0, 255]
    assert to_rgb_uint8(np.array([[True]]))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("bad,exc,match", [
    (np.zeros((0, 5, 3), np.uint8), ValueError, "empty image"),
    (np.zeros((5,), np.uint8), ValueError, "HxW"),
    (np.zeros((2, 2, 5), np.uint8), ValueError, "HxW"),
    (np.array([["a", "b"]]), ValueError, "not image data"),
    (np.array([[1.5]]), ValueError, r"\[0, 1\]"),
    (np.array([[300]], np.int32), ValueError, "uint16"),
    ("photo.jpg", TypeError, "numpy array or a PIL image"),
])
def test_to_rgb_uint8_rejects(bad, exc, match):
    with pytest.raises(exc, match=match):
        to_rgb_uint8(bad)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match="unreadable image data"):
        to_rgb_uint8(Image.open(path))


def test_preprocessor_reuses_buffer_and_matches_reference():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)  # BGR, as from OpenCV
    p = Preprocessor(32)
    out, info = p(frame, bgr=True)
    assert out is p.buffer and out.shape == (1, 3, 32, 32)
    assert info == LetterboxInfo(32 / 50, 32, 19, 50, 30)
    ref = np.empty((3, 32, 32), np.float32)
    letterbox_ref(frame[:, :, ::-1], ref)
    np.testing.assert_allclose(out[0], ref, atol=1e-5)
    out2, _ = p(Image.fromarray(frame[:, :, ::-1]))  # PIL RGB gives the same pixels
    assert out2 is out
    np.testing.assert_allclose(out2[0], ref, atol=1e-5)
    manifest = {"input": {"size": [32, 32], "channel_order": "RGB", "mean": [0.5] * 3,
                          "std": [0.25] * 3, "letterbox": "top-left", "pad_value": 0.0}}
    assert Preprocessor.from_manifest(manifest).mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("stand_in", [
    None,                                  # the import fails
    types.ModuleType("runtime._native"),   # no .so: runtime/_native/ is a namespace package
])
def test_missing_extension_falls_back_with_one_warning(monkeypatch, stand_in):
    monkeypatch.setitem(sys.modules, "runtime._native", stand_in)
    pre.load_native.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="not built") as record:
            p = Preprocessor(16)
            out, _ = p(np.full((4, 4, 3), 128, np.uint8))
            post.nms(np.zeros((1, 4), np.float32), np.ones(1, np.float32), 0.5)
        assert len([w for w in record if "not built" in str(w.message)]) == 1
        assert np.isfinite(out).all()
    finally:
        pre.load_native.cache_clear()


@pytest.mark.parametrize("use_native", [True, False])
def test_min_per_phrase_keeps_the_best_of_every_phrase(use_native):
    # 6 well separated boxes; phrase 0 owns tokens 0-1 and scores high on every box, phrase 1
    # (token 2) scores lower everywhere: a plain top-2 would keep only phrase-0 boxes.
    boxes = np.array([[i * 20, 0, i * 20 + 10, 10] for i in range(6)], np.float32)
    logits = np.zeros((6, 3), np.float32)
    logits[:, :2] = np.linspace(4, 2, 6)[:, None]
    logits[:, 2] = np.linspace(1, -1, 6)
    phrase_map = np.array([[1, 1, 0], [0, 0, 1]], np.float32)
    info = LetterboxInfo(scale=1.0, new_w=200, new_h=200, src_w=200, src_h=200)
    args = (boxes, logits, np.full(6, 5.0, np.float32), phrase_map, info)
    top2 = postprocess(*args, threshold=0.0, max_detections=2, use_native=use_native)
    assert top2.phrase_index.tolist() == [0, 0]
    per = postprocess(*args, threshold=0.0, max_detections=2, min_per_phrase=3, use_native=use_native)
    assert sorted(per.phrase_index.tolist()) == [0, 0, 0, 1, 1, 1]
    assert np.all(np.diff(per.scores) <= 0)  # still best first
    for p in (0, 1):  # each phrase keeps its own best boxes, in order
        assert per.boxes[per.phrase_index == p][:, 0].tolist() == [0.0, 20.0, 40.0]


# ---------------------------------------------------------------------------------------------
# the phrase-score rule (manifest postprocess.phrase_score)

@pytest.mark.parametrize("use_native", [True, False])
def test_min_rule_scores_a_phrase_by_its_weakest_token(use_native):
    """"red mug" = tokens 3 and 4 at anchor 2 with logits 1 and 0: the mean rule gives
    (s(1) + s(0)) / 2 x s(0.5), the minimum s(0) x s(0.5); a one-token phrase is the same under both."""
    info, boxes, logits, ctr, pmap = _hand_case()
    det = postprocess(boxes, logits, ctr, pmap, info, use_native=use_native, phrase_score="min")
    np.testing.assert_allclose(det.scores, [_sig(3.0) * _sig(2.0), _sig(0.0) * _sig(0.5)], rtol=1e-6)
    np.testing.assert_array_equal(det.phrase_index, [0, 1])
    # a threshold between the two rules' scores keeps the phrase under the mean and drops it under the minimum
    between = (_sig(0.0) + (_sig(1.0) + _sig(0.0)) / 2) / 2 * _sig(0.5)
    kept = {rule: postprocess(boxes, logits, ctr, pmap, info, threshold=between, use_native=use_native,
                              phrase_score=rule).phrase_index.tolist() for rule in ("mean", "min")}
    assert kept == {"mean": [0, 1], "min": [0]}
    scores = post.phrase_scores_ref(logits, ctr, pmap, "min")
    assert scores.dtype == np.float32 and scores.shape == (4, 2)
    with pytest.raises(ValueError, match="phrase score rule 'max'"):
        post.phrase_scores_ref(logits, ctr, pmap, "max")


def test_phrase_score_rule_in_the_manifest():
    from common.package import PackageError, PostprocessSpec
    assert "phrase_score" not in PostprocessSpec().to_json()          # the default is not written
    spec = PostprocessSpec(phrase_score="min")
    assert spec.to_json()["phrase_score"] == "min"
    assert PostprocessSpec.from_manifest({"postprocess": spec.to_json()}) == spec
    with pytest.raises(PackageError, match="phrase_score 'max' is not one of mean, min"):
        PostprocessSpec.from_manifest({"postprocess": {"phrase_score": "max"}})
    with pytest.raises(PackageError, match="must be 'mean' for style 'official'"):
        PostprocessSpec("official", level_sizes=(4,), phrase_score="min")
