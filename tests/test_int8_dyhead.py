"""INT8 of official fine (DyHead) models: a random ``fiber-tiny-dyhead-test`` checkpoint (the
official architecture: fixed-pad Swin, fused text layers, P3-P7 FPN and one DyConv block, on the
official input at 64 x 96; tests/dyhead_package.py) quantised by compress.quantize and exported as an
INT8 package. Converting the official release itself is tested in test_official_e2e and
test_checkpoint; the rules below read module names, which the tiny and the released models share.

- The fused backbones (Swin, the fused text layers, the cross-attention) and the FPN get int8
  quantizers; the whole DyHead (deformable convs, offset convs, GroupNorm, DyReLU, predictors) stays
  FP32 by rule, so no Q/DQ reaches a DeformConv in detector.onnx.
- The guard is the FP32/INT8 agreement (compress.agreement): recorded in quant.json and, for the
  package's graphs on ONNX Runtime, in the manifest; below the margin the export writes nothing.
- The agreement measure itself and the agreement-mode greedy FP32 selection, on hand-made inputs.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

import engines
from common import package as pkg
from compress import agreement, export, quantize
from dyhead_package import CANVAS as CANVAS_HW
from dyhead_package import dyhead_config, make_dyhead_checkpoint
from runtime.types import Detections
from test_export import make_data, run_cli

CANVAS = f"{CANVAS_HW[0]}x{CANVAS_HW[1]}"   # --canvas HxW: the tiny config's own official canvas
ORT_VS_PLAIN_QDQ = 8e-2   # detector.onnx on ONNX Runtime (optimised) vs reference/detector.npz, relative
SMALL = ["--calib-images", "8", "--min-calib-images", "4", "--agreement-images", "4", "--batch-size", "4",
         "--threads", "1", "--canvas", CANVAS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny DyHead checkpoint (dyhead_package: gates opened, offsets of several pixels),
    synthetic data and its QDIR (agreement guard)."""
    root = tmp_path_factory.mktemp("int8-dyhead")
    ck = make_dyhead_checkpoint(root)
    data = make_data(root / "data", images=12)
    result = run_cli("compress.quantize", "--checkpoint", str(ck), "--data", str(data),
                     "--out", str(root / "qdir"), *SMALL)
    assert result.returncode == 0, result.stderr
    return {"root": root, "ck": ck, "data": data, "qdir": root / "qdir", "cfg": dyhead_config()}


@pytest.fixture(scope="module")
def tiny_int8(tiny):
    out = tiny["root"] / "pkg-int8"
    result = run_cli("compress.export", "--checkpoint", str(tiny["ck"]), "--out", str(out),
                     "--int8", str(tiny["qdir"]), "--canvas", CANVAS, "--threads", "1", "--no-openvino-check")
    assert result.returncode == 0, result.stderr
    assert "agreement int8 vs FP32" in result.stdout
    return out


def test_backbones_int8_dyhead_fp32_by_rule(tiny):
    from safetensors.torch import load_file

    meta = json.loads((tiny["qdir"] / quantize.QUANT_JSON).read_text())
    assert meta["guard"] == "agreement" and meta["calibration"]["canvas"] == list(CANVAS_HW)
    assert meta["calibration"]["images"] == 8 and len(meta["agreement_items"]) == 4
    calibrated = {it["image"] for it in meta["agreement_items"]}
    assert len(calibrated) == 4                               # distinct held-out images
    final = meta["agreement"]["final"]
    assert meta["within_margin"] is (final["agreement"] >= meta["agreement"]["min_agreement"])
    assert 0.0 <= final["agreement"] <= 1.0 and final["reference_detections"] > 0 and final["top_k"] == 5
    assert final["max_abs_logit_diff"] > 0                    # INT8 is not FP32
    assert "head.*" in meta["fp32_by_rule"]
    amax = load_file(str(tiny["qdir"] / quantize.AMAX_FILE))
    assert not any(k.startswith("head.") for k in amax)       # DyHead: deform, offset, GN, DyReLU, predictors
    assert any(k.startswith("backbone.image.layers.2.blocks.") and ".mlp.fc1." in k for k in amax)
    assert any(".attn.qkv_i2t." in k for k in amax)           # image <- text cross-attention
    assert any("crossattention_t2i" in k for k in amax)        # text <- image cross-attention
    first = tiny["cfg"].first_fused_text_layer                   # the fused text layers, and only they
    assert any(k.startswith(f"backbone.text.encoder.layer.{first}.intermediate") for k in amax)
    assert not any(k.startswith((f"backbone.text.encoder.layer.{first - 1}.", "backbone.text.embeddings"))
                   for k in amax)
    assert any(k.startswith("fpn.") for k in amax)


def test_int8_package_has_qdq_on_the_backbone_and_none_at_deformconv(tiny_int8):
    graph = onnx.load(str(tiny_int8 / pkg.DETECTOR_GRAPH)).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    deform = [n for n in graph.node if n.op_type == "DeformConv"]
    assert len(deform) == 13                      # one DyConv block: 5 levels x 3 branches - 2
    for n in deform:
        assert not any(producer[i].op_type == "DequantizeLinear" for i in n.input if i in producer), n.name
        assert not any(c.op_type == "QuantizeLinear" for c in consumers.get(n.output[0], [])), n.name
    fed = [c.name for n in graph.node if n.op_type == "DequantizeLinear" for c in consumers.get(n.output[0], [])]
    # node names are the exporter's module scopes: "/blocks.N/..." Swin, "/layer.N/..." text, "/head/..."
    assert fed and not any("/head/" in name or "dyhead" in name for name in fed)
    assert sum(name.startswith("/blocks.") for name in fed) > 50
    assert any(name.startswith("/layer.") and "crossattention_t2i" in name for name in fed)
    assert any(name.startswith("/fpn/") for name in fed)
    manifest = pkg.read_manifest(tiny_int8)
    assert manifest["precision"] == "int8" and manifest["graphs"]["detector"]["qdq"]["QuantizeLinear"] > 0


def test_int8_package_runs_on_onnxruntime_with_its_agreement_in_the_manifest(tiny_int8, tiny):
    from runtime.predictor import Detector

    manifest = pkg.read_manifest(tiny_int8)
    acc = manifest["accuracy"]
    assert acc["guard"] == "agreement"
    least = acc["agreement"]["min_agreement"]
    for key in ("int8", "int8_cpu"):
        rec = acc["agreement"][key]
        assert least <= rec["agreement"] <= 1.0 and rec["images"] == 4 and rec["reference"] == "PyTorch FP32"
        assert "ONNX Runtime" in rec["other"] and rec["max_abs_logit_diff"] > 0
    assert manifest["quantization"]["guard"] == "agreement"
    assert "openvino" not in manifest["graphs"]["detector"]             # --no-openvino-check: not checked,
    assert manifest["graphs"]["detector"]["cpu_backend"] == "onnxruntime"  # so not OpenVINO's by default
    ref = np.load(tiny_int8 / pkg.reference_file("detector"))
    with engines.load(tiny_int8, "onnxruntime", cache_dir="", use_cpu_file=False) as e:
        out = e.detect(ref[pkg.IMAGE], ref[pkg.TEXT_HIDDEN], ref[pkg.ATTENTION_MASK])
    for name in pkg.DETECTOR_OUTPUTS:   # ORT's fused int8 kernels vs plain Q/DQ semantics: a rounding that
        # flips by one step propagates through the Swin blocks and the fused layers (4.2e-2 on the
        # logits of the golden-fine model's 24 blocks and 6 fused layers)
        assert np.abs(out[name] - ref[name]).max() <= ORT_VS_PLAIN_QDQ * (1 + np.abs(ref[name]).max()), name
    image = sorted((tiny["data"] / "images").iterdir())[0]
    with Detector(tiny_int8, backend="onnxruntime", threshold=0.0, per_phrase=3) as det:
        dets = det.detect(image, "a red circle")
        h, w = det.preprocess(image).info.src_h, det.preprocess(image).info.src_w
    assert len(dets.scores) > 0
    assert (dets.boxes >= -1e-3).all() and (dets.boxes[:, [0, 2]] <= w + 1e-3).all()
    assert (dets.boxes[:, [1, 3]] <= h + 1e-3).all()


def test_agreement_guard_refuses_below_the_margin(tiny_int8, tiny, tmp_path, monkeypatch):
    """_measure_agreement on the written package with the comparison forced low: the guard's error."""
    model, mcfg, meta = export.load_fine_model(tiny["ck"])
    mcfg = mcfg.with_canvas(CANVAS_HW)
    model.cfg = mcfg
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_int8, copy)
    real = agreement.compare
    monkeypatch.setattr(agreement, "compare", lambda a, b, iou=0.5: {**real(a, b, iou), "agreement": 0.1})
    cfg = export.ExportConfig(checkpoint=str(tiny["ck"]), out=str(tmp_path / "unused"), threads=1)
    buckets = tuple(pkg.read_manifest(copy)["text"]["buckets"])
    with pytest.raises(export.AccuracyGuardError, match="keeps 0.100 of FP32's top-5 boxes"):
        export._measure_agreement(cfg, copy, model, mcfg, buckets, {"dir": tiny["qdir"], "info": {}}, meta)


# ----------------------------------------------------------------------------- the measure itself

def _dets(boxes, scores, phrases, n_phrases=2):
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                      np.asarray(phrases, np.int32), tuple(f"p{i}" for i in range(n_phrases)))


def test_match_detections_needs_the_same_phrase_and_iou():
    ref = _dets([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], [0.9, 0.8, 0.7], [0, 0, 1])
    same = _dets([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], [0.5, 0.6, 0.7], [0, 0, 1])
    assert agreement.match_detections(ref, same) == (3, 3, 1, 2)   # p0's best box differs: top-1 1 of 2
    other_phrase = _dets([[0, 0, 10, 10]], [0.9], [1])
    assert agreement.match_detections(ref, other_phrase) == (1, 3, 1, 2)
    shifted = _dets([[6, 6, 16, 16], [20, 20, 30, 30]], [0.9, 0.8], [0, 0])   # IoU 16/184 < 0.5
    assert agreement.match_detections(ref, shifted) == (1, 3, 0, 2)
    one = _dets([[0, 0, 10, 10]], [0.9], [0])                                 # one-to-one matching
    twice = _dets([[0, 0, 10, 10], [0, 0, 10, 9]], [0.9, 0.8], [0, 0])
    assert agreement.match_detections(twice, one)[:2] == (1, 2)


def test_guard_resolution_and_agreement_mode_keeps_the_worst_group():
    from fiber.config import get_config

    golden_cfg, nano = get_config("fiber-golden-fine"), get_config("fiber-nano")
    assert quantize.resolve_guard("auto", golden_cfg, None) == "agreement"
    assert quantize.resolve_guard("auto", nano, None) == "agreement"          # no labels
    with pytest.raises(quantize.QuantizeError, match="--guard agreement"):
        quantize.resolve_guard("recall", nano, None)
    assert quantize.fp32_rule("head.dyhead_tower.0.offset.input_quantizer", golden_cfg)
    assert quantize.fp32_rule("head.bbox_pred.input_quantizer", nano) is None

    class Quantizer:
        def __init__(self):
            self.on = True

        def enable(self):
            self.on = True

        def disable(self):
            self.on = False

    class Model:
        def __init__(self):
            self.q = {"a": Quantizer(), "b": Quantizer()}

        def get_submodule(self, name):
            return self.q[name]

    model = Model()

    class StubJudge(quantize.Judge):
        def __init__(self):
            self.guard, self.min_agreement, self.fp32 = "agreement", 0.8, {"R@1": None}
            self.max_logit_diff = 0.05

        def measure(self, m):   # group "b" in FP32 lifts agreement to 0.9
            value = 0.9 if not m.q["b"].on else 0.6
            return {"accuracy": {"R@1": None}, "R@1": None, "output_error": 1 - value,
                    "agreement": {"agreement": value, "max_abs_logit_diff": 1.0}}

    judge = StubJudge()
    rows = quantize.sensitivity_pass(model, judge, {"a": ["a"], "b": ["b"]})
    assert [r["group"] for r in rows] == ["b", "a"] and rows[0]["recovered"] == pytest.approx(30.0)
    kept, final = quantize.keep_worst_in_fp32(model, judge, rows, {"a": ["a"], "b": ["b"]}, max_drop=1.0)
    assert kept == ["b"] and final["agreement"]["agreement"] == 0.9 and judge.ok(final, 1.0)


def test_the_guard_passes_on_agreement_or_on_near_equal_logits():
    rec = {"agreement": 0.58, "max_abs_logit_diff": 1.6e-4}     # random FIBER-B: FP32 scores near-tied
    assert agreement.passes(rec, 0.8) == "logit tolerance"
    assert agreement.passes({**rec, "agreement": 0.9}, 0.8) == "agreement"
    assert agreement.passes({**rec, "max_abs_logit_diff": 0.3}, 0.8) is None
    assert agreement.passes({**rec, "max_abs_logit_diff": 0.3}, 0.8, max_logit_diff=0.5) == "logit tolerance"
