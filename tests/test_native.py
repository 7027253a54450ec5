"""runtime._native against its numpy twins, OpenCV and hand-checked cases; argument checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.package import IMAGENET_MEAN, IMAGENET_STD
from runtime import _native
from runtime.postprocess import (decode_boxes_ref, ml_nms_ref, nms_ref, phrase_scores_ref,
                                 topk_ref)
from runtime.preprocess import letterbox_ref

if not hasattr(_native, "letterbox"):  # only the source folder imported: the .so is missing
    raise ImportError("runtime._native is not built: run `make native` or `pip install -e .`")

FEW = settings(max_examples=40, deadline=None)
MEAN, STD = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)


# ---------------------------------------------------------------------------------------------
# letterbox

@st.composite
def images(draw):
    """uint8 images of odd sizes (1x1, very wide/tall), 1/3/4 channels or 2-D, odd layouts."""
    h, w = draw(st.sampled_from([(1, 1), (1, 300), (300, 1), (2, 3)])
                | st.tuples(st.integers(1, 40), st.integers(1, 40)))
    ch = draw(st.sampled_from([None, 1, 3, 4]))
    seed = draw(st.integers(0, 2**32 - 1))
    shape = (h, w) if ch is None else (h, w, ch)
    layout = draw(st.sampled_from(["contiguous", "row_stride", "flipped"]))
    rng = np.random.default_rng(seed)
    if layout == "row_stride":  # rows padded, as a crop of a wider frame
        big = rng.integers(0, 256, (h, w + 5) + shape[2:], dtype=np.uint8)
        return big[:, 2:w + 2]
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    return img[::-1, ::-1] if layout == "flipped" else img


@FEW
@given(img=images(), hw=st.integers(1, 48).map(lambda s: (s, s)) | st.tuples(st.integers(1, 48), st.integers(1, 48)),
       bgr=st.booleans())
def test_letterbox_matches_numpy_reference(img, hw, bgr):
    """Square S x S canvases and fixed [H, W] ones (a letterbox package's --canvas)."""
    out_c = np.full((3,) + hw, np.nan, np.float32)  # padding must be written, not assumed
    out_ref = np.full((3,) + hw, np.nan, np.float32)
    scale, new_w, new_h = _native.letterbox(img, out_c, IMAGENET_MEAN, IMAGENET_STD, bgr)
    info = letterbox_ref(img, out_ref, IMAGENET_MEAN, IMAGENET_STD, bgr)
    assert (scale, new_w, new_h) == (info.scale, info.new_w, info.new_h)
    np.testing.assert_allclose(out_c, out_ref, rtol=0, atol=1e-5)
    assert not out_c[:, new_h:, :].any() and not out_c[:, :, new_w:].any()


@pytest.mark.parametrize("h,w,size", [(480, 640, 256), (7, 5, 32), (100, 37, 256), (1, 1, 16),
                                      (3, 1000, 64), (512, 512, 256), (20, 10, 40),
                                      (480, 640, (224, 288)), (384, 256, (224, 288)), (240, 320, (64, 32))])
def test_letterbox_matches_opencv_inter_linear(h, w, size):
    import cv2  # here, not at module level: without OpenCV only this comparison fails, not the whole file

    ch, cw = (size, size) if isinstance(size, int) else size
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = np.zeros((3, ch, cw), np.float32)
    scale, new_w, new_h = _native.letterbox(img, out, IMAGENET_MEAN, IMAGENET_STD, False)
    # The contract: s = S / max(h, w) on a square canvas, min(H / h, W / w) on an H x W one, sizes
    # rounded half up (independent arithmetic here).
    assert scale == (size / max(h, w) if isinstance(size, int) else min(ch / h, cw / w))
    assert new_w <= cw and new_h <= ch and (new_w == cw or new_h == ch)
    assert (new_w, new_h) == (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
    expected = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pixels = (out[:, :new_h, :new_w].transpose(1, 2, 0) * STD + MEAN) * 255.0
    # cv2 works in 11-bit fixed point and rounds to uint8; we keep floats.
    assert np.abs(pixels - expected).max() <= 1.0


def test_letterbox_channel_order_gray_alpha_and_padding():
    size = 8
    rgb = np.zeros((4, 2, 3), np.uint8)
    rgb[..., 0] = 255  # pure red, 4 rows x 2 cols -> 8 x 4 at the top-left
    red = (np.array([1.0, 0.0, 0.0]) - MEAN) / STD
    for src, bgr in [(rgb, False), (rgb[..., ::-1].copy(), True),
                     (np.concatenate([rgb, np.full((4, 2, 1), 7, np.uint8)], 2), False)]:
        out = np.full((3, size, size), 9.0, np.float32)
        assert _native.letterbox(src, out, IMAGENET_MEAN, IMAGENET_STD, bgr) == (2.0, 4, 8)
        np.testing.assert_allclose(out[:, :, :4], np.broadcast_to(red[:, None, None], (3, 8, 4)),
                                   atol=1e-6)
        assert not out[:, :, 4:].any()
    gray = np.full((2, 2), 51, np.uint8)
    for src in (gray, gray[:, :, None]):
        out = np.zeros((3, 4, 4), np.float32)
        _native.letterbox(src, out, IMAGENET_MEAN, IMAGENET_STD)
        np.testing.assert_allclose(out[:, 0, 0], (0.2 - MEAN) / STD, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# phrase_scores

@FEW
@given(n=st.integers(0, 20), t=st.integers(0, 10), p=st.integers(0, 5),
       dtype=st.sampled_from([np.float32, np.uint8, np.bool_]), seed=st.integers(0, 2**32 - 1))
def test_phrase_scores_matches_numpy_reference(n, t, p, dtype, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 8, (n, t)).astype(np.float32)
    logits[rng.random((n, t)) < 0.1] = 120.0  # saturating sigmoid, both signs
    logits[rng.random((n, t)) < 0.1] = -120.0
    ctr = rng.normal(0, 4, n).astype(np.float32)
    pmap = (rng.random((p, t)) < 0.4).astype(dtype)
    got = _native.phrase_scores(logits, ctr, pmap)
    assert got.dtype == np.float32 and got.shape == (n, p)
    np.testing.assert_allclose(got, phrase_scores_ref(logits, ctr, pmap), rtol=1e-5, atol=1e-7)


def test_phrase_scores_by_hand():
    def sig(x):
        return 1 / (1 + math.exp(-x))

    logits = np.array([[0.0, 2.0, -1.0], [3.0, -3.0, 0.5]], np.float32)
    ctr = np.array([0.0, 1.0], np.float32)
    pmap = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 0]], np.uint8)  # last phrase has no tokens
    got = _native.phrase_scores(logits, ctr, pmap)
    want = [[(sig(2) + sig(-1)) / 2 * 0.5, sig(0) * 0.5, 0.0],
            [(sig(-3) + sig(0.5)) / 2 * sig(1), sig(3) * sig(1), 0.0]]
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# nms, nms_per_class, topk

@st.composite
def detections(draw):
    """Boxes on a coarse grid (many overlaps, duplicates, degenerate boxes) and tied scores."""
    n = draw(st.integers(0, 30))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    xy = rng.integers(0, 6, (n, 2)) * 4
    wh = rng.integers(0, 5, (n, 2)) * 4  # 0 = degenerate box
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.integers(0, 5, n).astype(np.float32) / 4  # ties are common
    classes = rng.integers(0, 3, n).astype(draw(st.sampled_from([np.int32, np.int64])))
    return boxes, scores, classes


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union if union > 0 else 0.0


def _check_greedy(keep, boxes, scores, classes, thr):
    """The definition of greedy NMS, checked pair by pair in plain Python."""
    n = len(scores)
    rank = sorted(range(n), key=lambda i: (-scores[i], i))
    assert list(keep) == [i for i in rank if i in set(keep)]  # kept ones in rank order
    pos = {i: r for r, i in enumerate(rank)}
    for i in range(n):
        rivals = [k for k in keep if k != i and classes[k] == classes[i] and pos[k] < pos[i]]
        suppressed = any(_iou(boxes[k], boxes[i]) > thr for k in rivals)
        assert (i in keep) == (not suppressed), i


@FEW
@given(det=detections(), thr=st.sampled_from([0.0, 0.3, 0.5, 0.6, 1.0]))
def test_nms_matches_reference_and_definition(det, thr):
    boxes, scores, classes = det
    keep = _native.nms(boxes, scores, thr)
    assert keep.dtype == np.int64
    np.testing.assert_array_equal(keep, nms_ref(boxes, scores, thr))
    _check_greedy(keep.tolist(), boxes.tolist(), scores.tolist(), [0] * len(scores), thr)
    keep_pc = _native.nms_per_class(boxes, scores, classes, thr)
    np.testing.assert_array_equal(keep_pc, nms_ref(boxes, scores, thr, classes))
    _check_greedy(keep_pc.tolist(), boxes.tolist(), scores.tolist(), classes.tolist(), thr)


def test_nms_per_class_equals_separate_runs():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (60, 2))], 1).astype(np.float32)
    scores = rng.random(60).astype(np.float32)
    classes = rng.integers(0, 4, 60)
    keep = _native.nms_per_class(boxes, scores, classes, 0.5)
    parts = [np.flatnonzero(classes == c)[_native.nms(boxes[classes == c], scores[classes == c],
                                                      0.5)] for c in range(4)]
    merged = np.concatenate(parts)
    np.testing.assert_array_equal(keep, merged[np.argsort(-scores[merged], kind="stable")])


def test_nms_nan_scores_go_last_and_nan_boxes_never_suppress():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [np.nan, 0, 10, 10]], np.float32)
    scores = np.array([np.nan, 0.5, 0.9], np.float32)
    np.testing.assert_array_equal(_native.nms(boxes, scores, 0.5), [2, 1])
    np.testing.assert_array_equal(nms_ref(boxes, scores, 0.5), [2, 1])


def _iou_plus1_f32(a, b):
    """The official CUDA devIoU, scalar by scalar in float32 (+1 pixel convention)."""
    a, b, one = [np.float32(v) for v in a], [np.float32(v) for v in b], np.float32(1)
    w = max(min(a[2], b[2]) - max(a[0], b[0]) + one, np.float32(0))
    h = max(min(a[3], b[3]) - max(a[1], b[1]) + one, np.float32(0))
    sa = (a[2] - a[0] + one) * (a[3] - a[1] + one)
    sb = (b[2] - b[0] + one) * (b[3] - b[1] + one)
    return w * h / (sa + sb - w * h)


@FEW
@given(det=detections(), thr=st.sampled_from([0.0, 0.3, 0.5, 0.6, 1.0]),
       jitter=st.booleans(), agnostic=st.booleans())
def test_ml_nms_matches_reference_and_definition(det, thr, jitter, agnostic):
    boxes, scores, classes = det
    if jitter:  # off-grid coordinates too
        boxes = boxes + np.random.default_rng(len(boxes)).uniform(-1, 1, boxes.shape).astype(F)
    labels = None if agnostic else classes
    keep = _native.ml_nms(boxes, scores, labels, thr)
    assert keep.dtype == np.int64 and np.all(np.diff(keep) > 0)  # ascending index order
    np.testing.assert_array_equal(keep, ml_nms_ref(boxes, scores, labels, thr))
    rank = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    pos = {i: r for r, i in enumerate(rank)}
    same = [0] * len(scores) if agnostic else classes.tolist()
    thr32 = np.float32(thr)
    for i in range(len(scores)):  # greedy: kept iff no kept, better box of its label overlaps
        rivals = [k for k in keep if k != i and same[k] == same[i] and pos[k] < pos[i]]
        suppressed = any(_iou_plus1_f32(boxes[k], boxes[i]) > thr32 for k in rivals)
        assert (i in set(keep.tolist())) == (not suppressed), i


def test_ml_nms_uses_the_plus_one_iou_and_labels():
    # +1 IoU 4/6 = 0.67 > 0.6 (the continuous IoU would be 0.5); the third box has another label
    boxes = np.array([[0, 0, 1, 2], [0, 0, 1, 1], [0, 0, 1, 1]], F)
    scores = np.array([0.5, 0.9, 0.7], F)
    for fn in (_native.ml_nms, ml_nms_ref):
        np.testing.assert_array_equal(fn(boxes, scores, np.array([3, 3, 4]), 0.6), [1, 2])
        np.testing.assert_array_equal(fn(boxes, scores, None, 0.6), [1])
        np.testing.assert_array_equal(fn(boxes, scores, np.array([3, 3, 4]), 0.7), [0, 1, 2])
    assert _native.nms(boxes, scores, 0.6).tolist() == [1, 0]  # plain nms: continuous IoU


@FEW
@given(n=st.integers(0, 50), k=st.integers(0, 60), seed=st.integers(0, 2**32 - 1))
def test_topk_matches_reference_and_sorted(n, k, seed):
    scores = np.random.default_rng(seed).integers(0, 6, n).astype(np.float32)
    got = _native.topk(scores, k)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, topk_ref(scores, k))
    assert got.tolist() == sorted(range(n), key=lambda i: (-scores[i], i))[:k]


# ---------------------------------------------------------------------------------------------
# decode_boxes

@FEW
@given(n=st.integers(0, 20), scale=st.floats(0.01, 20), seed=st.integers(0, 2**32 - 1))
def test_decode_boxes_matches_reference(n, scale, seed):
    boxes = np.random.default_rng(seed).uniform(-50, 400, (n, 4)).astype(np.float32)
    got = _native.decode_boxes(boxes, scale, 300, 200)
    np.testing.assert_array_equal(got, decode_boxes_ref(boxes, scale, 300, 200))
    assert got.shape == (n, 4) and (got >= 0).all()
    assert (got[:, [0, 2]] <= 300).all() and (got[:, [1, 3]] <= 200).all()


def test_decode_boxes_by_hand():
    boxes = np.array([[10, 20, 30, 40], [-5, 100, 600, np.nan]], np.float32)
    got = _native.decode_boxes(boxes, 0.5, 640, 180)
    np.testing.assert_array_equal(got, [[20, 40, 60, 80], [0, 180, 640, 0]])


# ---------------------------------------------------------------------------------------------
# Bad arguments and empty inputs

F = np.float32


@pytest.mark.parametrize("call,exc,match", [
    (lambda: _native.nms(np.zeros((2, 4)), np.zeros(2, F), 0.5), TypeError,
     "boxes must be float32, got float64"),
    (lambda: _native.nms(np.zeros((2, 3), F), np.zeros(2, F), 0.5), ValueError, "shapes disagree"),
    (lambda: _native.nms(np.zeros((2, 4), F), np.zeros(3, F), 0.5), ValueError, "shapes disagree"),
    (lambda: _native.nms(np.zeros((4, 8), F)[:, ::2], np.zeros(4, F), 0.5), ValueError,
     "C-contiguous"),
    (lambda: _native.nms(np.zeros((2, 4), F), np.zeros(2, F), 1.5), ValueError, r"\[0, 1\]"),
    (lambda: _native.nms([[0, 0, 1, 1]], np.zeros(1, F), 0.5), TypeError, "buffer protocol"),
    (lambda: _native.nms_per_class(np.zeros((2, 4), F), np.zeros(2, F), np.zeros(2, F), 0.5),
     TypeError, "classes must be int32 or int64"),
    (lambda: _native.ml_nms(np.zeros((2, 4), F), np.zeros(2, F), np.zeros(2, F), 0.5),
     TypeError, "classes must be int32 or int64"),
    (lambda: _native.ml_nms(np.zeros((2, 4), F), np.zeros(3, F), None, 0.5), ValueError,
     "shapes disagree"),
    (lambda: _native.ml_nms(np.zeros((2, 4), F), np.zeros(2, F), None, -0.1), ValueError,
     r"\[0, 1\]"),
    (lambda: _native.topk(np.zeros((2, 2), F), 1), ValueError, "1 dimension"),
    (lambda: _native.topk(np.zeros(2, F), -1), ValueError, "k must be"),
    (lambda: _native.phrase_scores(np.zeros((2, 3), F), np.zeros(2, F), np.zeros((1, 4), F)),
     ValueError, "shapes disagree"),
    (lambda: _native.phrase_scores(np.zeros((2, 3), F), np.zeros(2, F),
                                   np.zeros((1, 3), np.int64)), TypeError,
     "phrase_map must be float32, uint8 or bool"),
    (lambda: _native.decode_boxes(np.zeros((2, 4), F), 0.0, 10, 10), ValueError, "scale > 0"),
    (lambda: _native.decode_boxes(np.zeros((2, 5), F), 1.0, 10, 10), ValueError, r"\[N, 4\]"),
    (lambda: _native.letterbox(np.zeros((0, 4, 3), np.uint8), np.zeros((3, 8, 8), F),
                               IMAGENET_MEAN, IMAGENET_STD), ValueError, "empty image"),
    (lambda: _native.letterbox(np.zeros((4, 4, 3), F), np.zeros((3, 8, 8), F),
                               IMAGENET_MEAN, IMAGENET_STD), TypeError, "src must be uint8"),
    (lambda: _native.letterbox(np.zeros((4, 4, 2), np.uint8), np.zeros((3, 8, 8), F),
                               IMAGENET_MEAN, IMAGENET_STD), ValueError, "HxWx3"),
    (lambda: _native.letterbox(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 8, 9), F),
                               IMAGENET_MEAN, IMAGENET_STD), ValueError, r"\(3, H, W\)"),
    (lambda: _native.letterbox(np.zeros((4, 4, 3), np.uint8), np.zeros((3, 0, 9), F),
                               IMAGENET_MEAN, IMAGENET_STD), ValueError, r"\(3, H, W\)"),
    (lambda: _native.letterbox(np.zeros((4, 4, 3), np.uint8), np.zeros((3, 8, 8), F),
                               (0.5, 0.5), IMAGENET_STD), ValueError, "mean must be"),
    (lambda: _native.letterbox(np.zeros((4, 4, 3), np.uint8), np.zeros((3, 8, 8), F),
                               IMAGENET_MEAN, (1, 0, 1)), ValueError, "non-zero"),
])
def test_bad_arguments_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_letterbox_refuses_read_only_out():
    out = np.zeros((3, 8, 8), F)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="writable"):
        _native.letterbox(np.zeros((4, 4, 3), np.uint8), out, IMAGENET_MEAN, IMAGENET_STD)


def test_empty_inputs():
    e4, e1 = np.zeros((0, 4), F), np.zeros(0, F)
    assert _native.nms(e4, e1, 0.5).shape == (0,)
    assert _native.nms_per_class(e4, e1, np.zeros(0, np.int64), 0.5).shape == (0,)
    assert _native.ml_nms(e4, e1, np.zeros(0, np.int64), 0.5).shape == (0,)
    assert _native.ml_nms(e4, e1, None, 0.5).shape == (0,)
    assert ml_nms_ref(e4, e1, None, 0.5).shape == (0,)
    assert _native.topk(e1, 5).shape == (0,)
    assert _native.decode_boxes(e4, 2.0, 10, 10).shape == (0, 4)
    assert _native.phrase_scores(np.zeros((0, 5), F), e1, np.ones((3, 5), F)).shape == (0, 3)
    assert _native.phrase_scores(np.zeros((4, 5), F), np.zeros(4, F),
                                 np.zeros((0, 5), F)).shape == (4, 0)
