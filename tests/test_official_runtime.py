"""The official FIBER/GLIP fine inference semantics in the torch-free runtime, against golden/fine.

tests/data/golden/fine/README.md: §4 A (input), E3/E4 (anchors, box coder), §5 (post-processing),
§7 (tolerances). The detector graph's outputs are rebuilt here from the golden head tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import engines
from common.package import (OFFICIAL_BGR255_MEAN, OFFICIAL_BGR255_STD, InputSpec, PackageError,
                            PostprocessSpec, ResizeRule)
from fiber.tokenizer_files import roberta_tokenizer, write_tokenizer
from runtime.postprocess import official_candidates, postprocess_official
from runtime.predictor import Detector
from runtime.preprocess import Preprocessor, canvas_resize_hw, official_resize_hw
from runtime.types import LetterboxInfo

GOLDEN = Path(__file__).parent / "data" / "golden" / "fine"
CANVAS = (224, 288)
SPEC = InputSpec(CANVAS, "BGR", 255.0, OFFICIAL_BGR255_MEAN, OFFICIAL_BGR255_STD, ResizeRule(192, 288))
assert InputSpec.official(CANVAS, 192, 288) == SPEC


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return load_file(str(GOLDEN / "fiber_fine_small_io.safetensors"))


# ---------------------------------------------------------------------------------------------
# Input (§4 A)

def test_official_input_reproduces_the_golden_batch_bit_exactly(io):
    pre = Preprocessor.from_manifest({"input": SPEC.to_json()})
    assert pre.buffer.shape == (1, 3, *CANVAS) and pre.spec == SPEC
    for i in range(2):
        raw = io[f"input.image{i}_rgb_uint8"]
        out, info = pre(raw)
        assert [info.new_h, info.new_w] == io["input.image_sizes_hw"][i].tolist()
        assert [info.src_h, info.src_w] == io["input.orig_sizes_hw"][i].tolist()
        np.testing.assert_array_equal(out[0], io["input.images"][i])  # README: bit-exact
        # OpenCV frames (BGR) and PIL images give the same tensor
        np.testing.assert_array_equal(pre(np.ascontiguousarray(raw[:, :, ::-1]), bgr=True)[0][0],
                                      io["input.images"][i])


@pytest.mark.parametrize("hw,rule,want", [
    ((480, 640), (800, 1333), (800, 1066)),     # shorter side to 800, int() truncates
    ((1080, 1920), (800, 1333), (750, 1333)),   # long side capped: s = round(1333*1080/1920)
    ((800, 600), (800, 1333), (1066, 800)),
    ((600, 600), (800, 1333), (800, 800)),
    ((192, 278), (192, 288), (192, 278)),       # already there: kept
    ((200, 290), (192, 288), (192, 278)),       # golden image 0
    ((256, 232), (192, 288), (211, 192)),       # golden image 1
    ((1, 1000), (192, 288), (1, 1000)),         # s would round to 0: at least 1
])
def test_official_resize_rule(hw, rule, want):
    assert official_resize_hw(*hw, ResizeRule(*rule)) == want


def test_an_image_that_does_not_fit_the_canvas_is_scaled_down_to_fit():
    # 300 x 200 portrait: the rule gives 288 x 192, taller than the 224-row canvas
    assert official_resize_hw(300, 200, SPEC.resize) == (288, 192)
    assert canvas_resize_hw(300, 200, SPEC) == (224, 149)     # f = 224/300, aspect kept
    assert canvas_resize_hw(200, 290, SPEC) == (192, 278)     # fits: the official size
    assert canvas_resize_hw(1, 1000, SPEC) == (1, 288)
    pre = Preprocessor.from_spec(SPEC)
    out, info = pre(np.full((300, 200, 3), 200, np.uint8))
    assert (info.new_h, info.new_w, info.src_h, info.src_w) == (224, 149, 300, 200)
    assert np.all(out[0, :, :, 149:] == 0) and np.all(out[0, :, :224, :149] != 0)


def test_input_spec_round_trips_and_old_manifests_mean_the_letterbox():
    assert InputSpec.from_manifest({"input": SPEC.to_json()}) == SPEC
    old = {"size": [256, 256], "channel_order": "RGB", "mean": [0.485, 0.456, 0.406],
           "std": [0.229, 0.224, 0.225], "letterbox": "top-left", "pad_value": 0.0}
    spec = InputSpec.from_manifest({"input": old})
    assert spec.style == "letterbox" and spec.to_json() == old
    pre = Preprocessor.from_manifest({"input": old})
    assert pre.size == 256 and pre.canvas_hw == (256, 256) and pre.spec == spec


def test_letterbox_on_a_fixed_canvas():
    """A letterbox package exported with --canvas 224x288: scale min(H / h, W / w), top-left."""
    spec = InputSpec.from_manifest({"input": {"size": [224, 288]}})
    assert spec.style == "letterbox" and spec.size == (224, 288)
    pre = Preprocessor.from_spec(spec)
    assert pre.canvas_hw == (224, 288) and pre.buffer.shape == (1, 3, 224, 288)
    out, info = pre(np.full((480, 640, 3), 200, np.uint8))     # 4:3 landscape: fills the width
    assert (info.scale, info.new_w, info.new_h) == (0.45, 288, 216)
    assert np.all(out[0, :, :216] != 0) and np.all(out[0, :, 216:] == 0)
    out, info = pre(np.full((384, 256, 3), 200, np.uint8))     # portrait: fills the height
    assert (info.scale, info.new_w, info.new_h) == (224 / 384, 149, 224)
    assert np.all(out[0, :, :, :149] != 0) and np.all(out[0, :, :, 149:] == 0)


@pytest.mark.parametrize("change,match", [
    ({"size": [224, 300]}, "not a multiple of 32"),
    ({"channel_order": "BRG"}, "channel_order"),
    ({"resize": {"rule": "min-max", "min_size": 300, "max_size": 288}}, "min_size <= max_size"),
    ({"resize": {"rule": "longest-side"}}, "min-max"),
    ({"mean": [1, 2]}, "3 numbers"),
])
def test_bad_input_specs_are_package_errors(change, match):
    with pytest.raises(PackageError, match=match):
        InputSpec.from_manifest({"input": {**SPEC.to_json(), **change}})


def test_postprocess_spec_defaults_and_official():
    assert PostprocessSpec.from_manifest({}) == PostprocessSpec()
    official = PostprocessSpec("official", 0.05, 0.6, 40, 25, (1008, 252, 63, 20, 6))
    assert PostprocessSpec.from_manifest({"postprocess": official.to_json()}) == official
    with pytest.raises(PackageError, match="level_sizes"):
        PostprocessSpec.from_manifest({"postprocess": {"style": "official"}})
    with pytest.raises(PackageError, match="style"):
        PostprocessSpec.from_manifest({"postprocess": {"style": "glip"}})
    graphs = {"detector": {"outputs": [{"name": "boxes", "shape": ["batch", 1349, 4]}]}}
    official.check_anchors({"graphs": graphs})
    graphs["detector"]["outputs"][0]["shape"][1] = 1344
    with pytest.raises(PackageError, match="add up to 1349 anchors, the detector gives 1344"):
        official.check_anchors({"graphs": graphs})


# ---------------------------------------------------------------------------------------------
# Post-processing (§5) on detector-graph outputs rebuilt from the golden head tensors

LEVELS = ("p3", "p4", "p5", "p6", "p7")


def decode_official(reg: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """The official ATSS box coder's decode (README E4), float32: reg, anchors [N, 4]."""
    reg, anchors = reg.astype(np.float32), anchors.astype(np.float32)
    w = anchors[:, 2] - anchors[:, 0] + 1
    h = anchors[:, 3] - anchors[:, 1] + 1
    cx = (anchors[:, 2] + anchors[:, 0]) / 2
    cy = (anchors[:, 3] + anchors[:, 1]) / 2
    clip = np.float32(np.log(1000.0 / 16))
    dx, dy = reg[:, 0] / np.float32(10), reg[:, 1] / np.float32(10)
    dw = np.minimum(reg[:, 2] / np.float32(5), clip)
    dh = np.minimum(reg[:, 3] / np.float32(5), clip)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = np.exp(dw) * w, np.exp(dh) * h
    half = np.float32(0.5)
    return np.stack([pcx - half * (pw - 1), pcy - half * (ph - 1),
                     pcx + half * (pw - 1), pcy + half * (ph - 1)], axis=1)


def graph_outputs(io, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """What the detector graph gives for image i: boxes [N, 4], token_logits [N, T], centerness [N]."""
    boxes, logits, ctr, sizes = [], [], [], []
    for lv in LEVELS:
        reg = io[f"head.box_regression.{lv}"][i]                 # [4, H, W]
        reg = reg.transpose(1, 2, 0).reshape(-1, 4)              # [HW, 4] row-major (y, x)
        boxes.append(decode_official(reg, io[f"anchors.{lv}"]))
        logits.append(io[f"head.dot_product_logits.{lv}"][i])    # [HW, T]
        ctr.append(io[f"head.centerness.{lv}"][i].reshape(-1))   # [HW]
        sizes.append(len(reg))
    return np.concatenate(boxes), np.concatenate(logits), np.concatenate(ctr), sizes


def image_info(io, i: int) -> LetterboxInfo:
    (nh, nw), (h, w) = io["input.image_sizes_hw"][i].tolist(), io["input.orig_sizes_hw"][i].tolist()
    return LetterboxInfo(nw / w, nw, nh, w, h)


def by_score(boxes, scores, labels):
    order = np.lexsort((labels, -scores))  # score desc, then label
    return boxes[order], scores[order], labels[order]


F32 = np.float32
GOLDEN_POST = dict(threshold=0.05, pre_nms_top_k=40)  # README §1: PRE_NMS_TOP_N 40


@pytest.mark.parametrize("i", [0, 1])
def test_official_candidates_match_the_golden_nms_input(io, i):
    boxes, logits, ctr, sizes = graph_outputs(io, i)
    assert sizes == [1008, 252, 63, 20, 6]
    pm = io[f"input.phrase_token_map.caption{i}"]
    cb, cs, cl = official_candidates(boxes, logits, ctr, pm, sizes, image_info(io, i),
                                     **GOLDEN_POST)
    want = by_score(io[f"det.img{i}.prenms_boxes_resized"], io[f"det.img{i}.prenms_scores"],
                    io[f"det.img{i}.prenms_labels"].astype(np.int64) - 1)
    got = by_score(cb, cs, cl)
    assert len(cs) == (113, 102)[i]
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-3)


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("i", [0, 1])
def test_official_postprocess_matches_the_golden_detections(io, i, use_native):
    boxes, logits, ctr, sizes = graph_outputs(io, i)
    pm = io[f"input.phrase_token_map.caption{i}"]
    info = image_info(io, i)
    dets = postprocess_official(boxes, logits, ctr, pm, sizes, info, **GOLDEN_POST, nms_iou=0.6,
                                max_detections=25, use_native=use_native)
    assert len(dets) == 25 and np.all(np.diff(dets.scores) <= 0)  # 26 survive the NMS, 25 kept
    labels = io[f"det.img{i}.labels"].astype(np.int64) - 1
    want = by_score(io[f"det.img{i}.boxes_orig"], io[f"det.img{i}.scores"], labels)
    got = by_score(dets.boxes, dets.scores, dets.phrase_index.astype(np.int64))
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-3)
    # the same set in resized-image pixels
    resized = by_score(io[f"det.img{i}.boxes_resized"], io[f"det.img{i}.scores"], labels)[0]
    scale = np.array([info.new_w / info.src_w, info.new_h / info.src_h] * 2, np.float32)
    np.testing.assert_allclose(got[0] * scale, resized, rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Detector: the manifest picks the official input and post-processing

class _GoldenGraph:
    """A stand-in engine: checks its inputs against the golden batch, returns golden outputs."""

    def __init__(self, io, kind: str):
        self.io, self.kind, self.calls = io, kind, []

    def run(self, feeds):
        io = self.io
        if self.kind == "text":
            ids = feeds["input_ids"]
            self.calls.append(ids)
            i = [k for k in range(2) if np.array_equal(ids[0], io["text.input_ids"][k])]
            assert len(i) == 1, ids  # the runtime tokenises the captions as the official code
            return {"text_hidden": io["text.embedded"][i[0]][None]}
        image = feeds["image"]
        i = [k for k in range(2) if np.array_equal(image[0], io["input.images"][k])]
        assert len(i) == 1  # the official input, bit-exactly
        boxes, logits, ctr, _ = graph_outputs(io, i[0])
        return {"boxes": boxes[None], "token_logits": logits[None], "centerness": ctr[None]}

    def close(self):
        pass


def test_detector_runs_the_official_semantics_from_the_manifest(io, tmp_path):
    with safe_open(str(GOLDEN / "fiber_fine_small_io.safetensors"), "np") as f:
        meta = f.metadata()
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text(meta["tokenizer_vocab_json"], encoding="utf-8")
    (tmp_path / "tok" / "merges.txt").write_text(meta["tokenizer_merges_txt"], encoding="utf-8")
    write_tokenizer(roberta_tokenizer(tmp_path / "tok"), tmp_path / "tokenizer.json")
    post = PostprocessSpec("official", 0.05, 0.6, 40, 25, (1008, 252, 63, 20, 6))
    manifest = {"name": "golden-fine", "input": SPEC.to_json(), "postprocess": post.to_json(),
                "text": {"tokenizer": "tokenizer.json", "buckets": [16], "pad_id": 1,
                         "lowercase": False}}
    json.dumps(manifest)  # the manifest is plain JSON
    graphs = engines.PackageEngines(_GoldenGraph(io, "text"), _GoldenGraph(io, "detector"),
                                    manifest, tmp_path, "golden-stand-in")
    captions = json.loads(meta["queries"])
    with Detector(graphs) as det:
        assert det.input_hw == CANVAS and det.post.style == "official"
        for i in range(2):
            dets = det.detect(io[f"input.image{i}_rgb_uint8"], captions[i])
            assert dets.phrases == tuple(json.loads(meta["label_lists"])[i])
            np.testing.assert_array_equal(det.last_prompt.phrase_map,
                                          io[f"input.phrase_token_map.caption{i}"])
            want = by_score(io[f"det.img{i}.boxes_orig"], io[f"det.img{i}.scores"],
                            io[f"det.img{i}.labels"].astype(np.int64) - 1)
            got = by_score(dets.boxes, dets.scores, dets.phrase_index.astype(np.int64))
            np.testing.assert_array_equal(got[2], want[2])
            np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)
            np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-3)
            prepared = det.preprocess(io[f"input.image{i}_rgb_uint8"])  # the threaded path
            np.testing.assert_array_equal(prepared.tensor[0], io["input.images"][i])
            assert len(det.detect(prepared, captions[i])) == 25


@pytest.mark.parametrize("use_native", [True, False])
def test_official_postprocess_by_hand(use_native):
    # 4 anchors on one level, 2 phrases (tokens 1 and 2+3), canvas 100 x 100, source 200 x 100
    boxes = np.array([[10, 10, 50, 50], [12, 12, 52, 52], [60, 60, 90, 90], [-5, 0, 120, 40]], F32)
    logits = np.full((4, 5), -9.0, F32)
    logits[:, 1] = [2.0, 1.0, 0.0, -9.0]          # phrase 0
    logits[:, 2] = logits[:, 3] = [1.5, 3.0, -9.0, 0.5]  # phrase 1
    ctr = np.zeros(4, F32)                          # sigmoid 0.5
    pm = np.array([[0, 1, 0, 0, 0], [0, 0, 1, 1, 0]], F32)
    info = LetterboxInfo(0.5, 100, 100, 200, 200)
    run = lambda **kw: postprocess_official(boxes, logits, ctr, pm, [4], info, use_native=use_native,
                                            phrases=("a", "b"), **kw)
    sig = lambda x: 1 / (1 + np.exp(-x))
    d = run()
    # anchors 0/1 overlap (+1 IoU 0.82): suppressed within a phrase, not across phrases
    want = sorted((float(np.sqrt(sig(x) * 0.5)), p) for p, x in [(0, 2.0), (0, 0.0), (1, 3.0),
                                                                   (1, 0.5)])[::-1]
    np.testing.assert_allclose(d.scores, [w[0] for w in want], rtol=1e-6)  # best first
    assert d.phrase_index.tolist() == [w[1] for w in want]
    # clipped to the resized image [0, 99], then x * 200/100, y * 200/100
    np.testing.assert_allclose(d.boxes[d.phrase_index == 1][-1], [0, 0, 198, 80])
    assert len(run(one_label_per_box=True)) == 3     # anchor 0 (phrase 0) loses to anchor 1 (b)
    assert len(run(max_detections=2)) == 2 and len(run(per_phrase=1)) == 2
    assert len(run(threshold=0.99)) == 0 and run(threshold=0.99).phrases == ("a", "b")
    tied = postprocess_official(boxes[[0, 2]], logits[[0, 0]], ctr[:2], pm, [2], info,
                                max_detections=1, use_native=use_native)
    assert len(tied) == 2  # the kthvalue cut keeps every score >= the k-th: a tie keeps both
    with pytest.raises(ValueError, match="do not add up"):
        postprocess_official(boxes, logits, ctr, pm, [3], info)
