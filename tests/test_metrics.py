"""Metrics on hand-computed cases, and coco_map against pycocotools called directly."""
import contextlib
import copy
import io
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fiber.data.metrics import box_iou, coco_map, recall_at_k, referring_accuracy


def test_box_iou_hand_cases():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    b = np.array([[5, 5, 15, 15], [20, 20, 30, 30], [0, 0, 10, 10], [0, 0, 10, 20]], np.float32)
    iou = box_iou(a, b)
    assert iou.shape == (4, 4)
    np.testing.assert_allclose(np.diag(iou), [25 / 175, 0.0, 1.0, 0.5])
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 4)
    assert box_iou(a, np.zeros((0, 4))).shape == (4, 0)
    assert box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]])[0, 0] == 0.0  # degenerate, no NaN


GT = np.array([[0, 0, 10, 10]], np.float64)
HIT = [0, 0, 10, 10]
MISS = [50, 50, 60, 60]


def test_recall_at_k_any_box_protocol():
    preds = [
        # hit at rank 2 (scores unsorted on purpose): R@1 miss, R@5 hit
        (np.array([HIT, MISS, MISS]), np.array([0.8, 0.9, 0.1])),
        # hit at rank 1
        (np.array([HIT]), np.array([0.3])),
        # no gt: excluded whatever is predicted
        (np.array([MISS]), np.array([0.9])),
        # ANY-box: the top box matches the second of two gt boxes
        (np.array([[100, 100, 110, 110]]), np.array([0.5])),
        # hit only at rank 6: R@10 only
        (np.array([MISS] * 5 + [HIT]), np.arange(6, 0, -1) / 10),
    ]
    gts = [GT, GT, np.zeros((0, 4)), np.array([[0, 0, 10, 10], [100, 100, 110, 110]]), GT]
    r = recall_at_k(preds, gts)
    assert r == {"R@1": 50.0, "R@5": 75.0, "R@10": 100.0, "phrases": 4}
    # IoU exactly 0.5 counts; no predictions is a miss
    r = recall_at_k([(np.array([[0, 0, 10, 20]]), np.array([1.0])), (np.zeros((0, 4)), np.zeros(0))],
                    [GT, GT], ks=(1,))
    assert r == {"R@1": 50.0, "phrases": 2}
    assert math.isnan(recall_at_k([], [])["R@1"])


def test_referring_accuracy():
    preds = [(np.array([HIT, MISS]), np.array([0.9, 0.1])),   # top-1 hits
             (np.array([HIT, MISS]), np.array([0.1, 0.9])),   # right box only second
             (np.zeros((0, 4)), np.zeros(0))]                 # nothing predicted
    assert referring_accuracy(preds, [GT, GT, GT]) == pytest.approx(100 / 3)
    assert math.isnan(referring_accuracy([], []))
    with pytest.raises(ValueError):
        referring_accuracy(preds, [GT])


def _gt():
    images = [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [100, 100, 40, 60], "area": 2400, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 10000, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 1, "bbox": [120, 20, 30, 30], "area": 900, "iscrowd": 0}]
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "star"}, {"id": 2, "name": "ring"}]}


def _pycocotools(gt, dets):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [100 * s for s in ev.stats[:3]]


def test_coco_map_matches_pycocotools():
    dets = [{"image_id": 1, "category_id": 1, "bbox": [12, 8, 50, 52], "score": 0.9},
            {"image_id": 1, "category_id": 2, "bbox": [100, 110, 40, 40], "score": 0.6},
            {"image_id": 1, "category_id": 1, "bbox": [150, 150, 20, 20], "score": 0.95},
            {"image_id": 2, "category_id": 1, "bbox": [5, 0, 95, 90], "score": 0.7},
            {"image_id": 2, "category_id": 2, "bbox": [120, 20, 30, 30], "score": 0.4}]
    got = coco_map(_gt(), dets)
    want = _pycocotools(_gt(), dets)
    assert [got["AP"], got["AP50"], got["AP75"]] == pytest.approx(want)
    assert 0 < got["AP"] < 100


def test_coco_map_hand_cases():
    gt = {"images": [{"id": 1, "width": 200, "height": 200}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100],
                           "area": 10000, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "star"}]}
    # IoU 0.62: a true positive at thresholds 0.50, 0.55, 0.60 of the ten -> AP 30, AP50 100, AP75 0
    r = coco_map(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 62], "score": 0.5}])
    assert (r["AP"], r["AP50"], r["AP75"]) == pytest.approx((30.0, 100.0, 0.0))
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0} for a in _gt()["annotations"]]
    assert coco_map(_gt(), perfect) == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})
    assert coco_map(_gt(), []) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_map(_gt(), [{"image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
