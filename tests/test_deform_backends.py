"""Deformable convolution (ONNX DeformConv) on every backend from one package (engines/deform.py).

- ``lower_deform_conv``: ONNX Runtime on the GridSample rewrite equals ONNX Runtime's DeformConv
  (random inputs: stride 2, dilation 2, no bias / no mask, a 1-pixel-high map, batch 2, opset 22,
  the DyHead's flat-offset Reshape/Slice read); FP16 builds keep its sampling coordinates FP32.
- OpenVINO: the frontend extension (DeformableConvolution-8, bilinear_interpolation_pad) matches
  ONNX Runtime on single nodes and on a small DyHead package's detector (reference/detector.npz),
  through engines.load and through an ``engines.build --backend openvino`` engine folder.
- TensorRT-RTX (builder runs without a GPU): ``engines.build`` builds FP32 / FP16 engines of the
  small DyHead package with ``deform_conv: gridsample`` in engine.json; the datacenter-TensorRT
  choice (plugin when libnvinfer_plugin has it, else the rewrite; a clear line when forced) on a
  stand-in TensorRT.
- runtime.detect's first stderr line names the deform-conv path.
"""
from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import engines
from common import package as pkg
from engines import build
from engines.deform import (
    FP32_SCOPE, DeformConvError, count_deform_convs, lower_deform_conv, openvino_extensions,
)
from engines.errors import BuildError

LOWER_TOL = 1e-4      # the rewrite vs ONNX Runtime's DeformConv (absolute, values O(10))
OV_NODE_TOL = 1e-4    # OpenVINO's DeformableConvolution-8 vs ONNX Runtime, one node
PACKAGE_TOL = 1e-4    # a whole detector vs its reference outputs, relative to 1 + max |ref|

try:
    import tensorrt_rtx  # noqa: F401
    HAS_RTX = True
except ImportError:
    HAS_RTX = False
try:
    import openvino  # noqa: F401
    HAS_OV = True
except ImportError:
    HAS_OV = False
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu12)")
needs_ov = pytest.mark.skipif(not HAS_OV, reason="OpenVINO is not installed")


# ----------------------------------------------------------------------------- single nodes

def _out_size(size, k, stride, pad, dilation):
    return (size + 2 * pad - (dilation * (k - 1) + 1)) // stride + 1


def deform_model(b, c, o, h, w, k=3, stride=1, pad=1, dilation=1, bias=True, mask=True, opset=19,
                 flat_from=None, seed=0):
    """One DeformConv node (and its random feeds). ``flat_from=(H2, W2)``: the offsets and mask are
    computed at another size and read flat with the output's shape (Reshape/Slice/Reshape, as the
    DyHead's exported graph does)."""
    ho, wo = _out_size(h, k, stride, pad, dilation), _out_size(w, k, stride, pad, dilation)
    taps = k * k
    rng = np.random.default_rng(seed)
    shapes = {"x": [b, c, h, w], "w": [o, c, k, k], "b": [o]}
    nodes, inits = [], []
    off_name, mask_name = "offset", "mask"
    if flat_from is None:
        shapes.update({"offset": [b, 2 * taps, ho, wo], "mask": [b, taps, ho, wo]})
    else:
        h2, w2 = flat_from
        assert h2 * w2 >= ho * wo
        shapes.update({"offset_big": [b, 2 * taps, h2, w2], "mask_big": [b, taps, h2, w2]})
        for name, ch in (("offset", 2 * taps), ("mask", taps)):
            inits += [helper.make_tensor(f"{name}_flat", TensorProto.INT64, [2], [b, -1]),
                      helper.make_tensor(f"{name}_end", TensorProto.INT64, [1], [ch * ho * wo]),
                      helper.make_tensor(f"{name}_shape", TensorProto.INT64, [4], [b, ch, ho, wo])]
            nodes += [helper.make_node("Reshape", [f"{name}_big", f"{name}_flat"], [f"{name}_2d"]),
                      helper.make_node("Slice", [f"{name}_2d", "zero1", f"{name}_end", "one1"], [f"{name}_cut"]),
                      helper.make_node("Reshape", [f"{name}_cut", f"{name}_shape"], [name])]
        inits += [helper.make_tensor("zero1", TensorProto.INT64, [1], [0]),
                  helper.make_tensor("one1", TensorProto.INT64, [1], [1])]
    names = ["x", "w", off_name, "b" if bias else "", mask_name if mask else ""]
    while not names[-1]:
        names.pop()
    nodes.append(helper.make_node("DeformConv", names, ["y"], name="dcn", kernel_shape=[k, k],
                                  strides=[stride] * 2, pads=[pad] * 4, dilations=[dilation] * 2))
    graph_inputs = [n for n in shapes if n in names or n.endswith("_big")]
    if flat_from is not None and not mask:
        graph_inputs.remove("mask_big")
        nodes = [n for n in nodes if not any(i.startswith("mask") for i in n.input)]
    feeds = {}
    for n in graph_inputs:
        if n.startswith("mask"):
            feeds[n] = rng.random(shapes[n]).astype(np.float32)
        else:
            feeds[n] = (rng.standard_normal(shapes[n]) * (3.0 if n.startswith("offset") else 1.0)).astype(np.float32)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in graph_inputs]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, o, ho, wo])
    model = helper.make_model(helper.make_graph(nodes, "dcn", inputs, [out], inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    return model, feeds


def run_ort(model, feeds, outputs=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


CASES = {  # id: (b, c, o, h, w, keyword arguments)
    "basic": (2, 4, 5, 7, 9, {}),
    "stride2": (1, 3, 4, 8, 10, {"stride": 2}),
    "stride2-odd": (2, 3, 3, 7, 5, {"stride": 2}),
    "dilation2": (1, 2, 3, 9, 9, {"pad": 2, "dilation": 2}),
    "no-bias": (1, 3, 2, 6, 6, {"bias": False}),
    "no-mask": (1, 3, 2, 6, 6, {"mask": False}),
    "one-row": (1, 3, 2, 1, 5, {}),
    "one-pixel": (1, 2, 2, 1, 1, {}),
    "opset22": (1, 3, 2, 5, 6, {"opset": 22}),
    "flat-offsets": (2, 4, 4, 4, 6, {"flat_from": (8, 12)}),
    "flat-offsets-stride2": (1, 4, 4, 8, 12, {"stride": 2, "flat_from": (8, 12)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gridsample_rewrite_matches_onnxruntime_deformconv(case):
    b, c, o, h, w, kw = CASES[case]
    model, feeds = deform_model(b, c, o, h, w, **kw)
    lowered = lower_deform_conv(model)
    assert count_deform_convs(model) == 1 and count_deform_convs(lowered) == 0
    assert count_deform_convs(model) == 1, "the input model is not changed"
    ops = {n.op_type for n in lowered.graph.node}
    assert {"GridSample", "Conv"} <= ops
    onnx.checker.check_model(lowered)
    want = run_ort(model, feeds)[0]
    got = run_ort(lowered, feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=LOWER_TOL, rtol=LOWER_TOL)
    # the offsets matter: zero offsets give another result (so the comparison can fail)
    zero = {k: (np.zeros_like(v) if k.startswith("offset") else v) for k, v in feeds.items()}
    assert np.abs(run_ort(lowered, zero)[0] - want).max() > 0.01


def test_a_model_without_deformconv_comes_back_unchanged():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    assert lower_deform_conv(model).SerializeToString() == model.SerializeToString()


def test_groups_are_refused_with_the_reason():
    model, _ = deform_model(1, 4, 4, 5, 5)
    for node in model.graph.node:
        if node.op_type == "DeformConv":
            node.attribute.append(helper.make_attribute("offset_group", 2))
    with pytest.raises(DeformConvError, match="offset_group=2; only 1 and 1 can be lowered"):
        lower_deform_conv(model)


def test_fp16_build_keeps_the_sampling_coordinates_fp32():
    """to_fp16 after the rewrite: GridSample and the coordinate arithmetic stay FP32 (an FP16 P3
    coordinate is only good to 0.25 px), the sampled values' Mul and the Conv run FP16; ONNX Runtime
    on the result stays close to the FP32 DeformConv."""
    model, feeds = deform_model(1, 8, 8, 24, 40, stride=1, seed=3)
    lowered = lower_deform_conv(model)
    half = build.to_fp16(lowered)
    onnx.checker.check_model(half)
    inferred = onnx.shape_inference.infer_shapes(half).graph
    types_ = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    types_.update({i.name: i.data_type for i in half.graph.initializer})
    grid_sample = next(n for n in half.graph.node if n.op_type == "GridSample")
    assert grid_sample.name.startswith(FP32_SCOPE)
    assert [types_[i] for i in grid_sample.input] == [TensorProto.FLOAT, TensorProto.FLOAT]
    conv = next(n for n in half.graph.node if n.op_type == "Conv")
    assert types_[conv.input[1]] == TensorProto.FLOAT16
    want = run_ort(model, feeds)[0]
    got = run_ort(half, feeds)[0]
    assert np.abs(got - want).max() / (1 + np.abs(want).max()) < 5e-3


@needs_ov
@pytest.mark.parametrize("case", ["basic", "stride2", "dilation2", "no-bias", "no-mask", "one-row", "flat-offsets"])
def test_openvino_extension_matches_onnxruntime(case, tmp_path):
    import openvino as ov

    b, c, o, h, w, kw = CASES[case]
    model, feeds = deform_model(b, c, o, h, w, **kw)
    onnx.save(model, tmp_path / "dcn.onnx")
    core = ov.Core()
    for extension in openvino_extensions():
        core.add_extension(extension)
    ov_model = core.read_model(str(tmp_path / "dcn.onnx"))
    assert "DeformableConvolution" in {op.get_type_name() for op in ov_model.get_ops()}
    got = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feeds)[0]
    np.testing.assert_allclose(got, run_ort(model, feeds)[0], atol=OV_NODE_TOL, rtol=OV_NODE_TOL)


# ----------------------------------------------------------------------------- a small DyHead package

@pytest.fixture(scope="module")
def dyhead(tmp_path_factory):
    from dyhead_package import make_dyhead_package

    return make_dyhead_package(tmp_path_factory.mktemp("dyhead"))


@pytest.fixture(scope="module")
def reference(dyhead):
    with np.load(dyhead / pkg.reference_file("detector")) as z:
        return {k: z[k] for k in z.files}


def _rel(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / (1 + np.abs(b).max()))


def _det_inputs(reference):
    return {k: reference[k] for k in pkg.DETECTOR_INPUTS}


def test_package_carries_the_canonical_op_with_flat_offsets(dyhead):
    model = onnx.load(str(dyhead / pkg.DETECTOR_GRAPH))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    deform = [n for n in model.graph.node if n.op_type == "DeformConv"]
    assert len(deform) == 13                      # one DyConv block: 5 levels x 3 branches - 2
    assert sum(producers.get(n.input[2]) == "Reshape" for n in deform) == 4   # the flat reads
    manifest = pkg.read_manifest(dyhead)
    assert max(manifest["parity"]["max_rel_diff_vs_torch"].values()) < 1e-3   # PyTorch vs ONNX Runtime


def test_rewritten_detector_matches_the_package_on_onnxruntime(dyhead, reference):
    model = onnx.load(str(dyhead / pkg.DETECTOR_GRAPH))
    lowered = lower_deform_conv(model)
    assert count_deform_convs(lowered) == 0
    outs = run_ort(lowered, _det_inputs(reference), list(pkg.DETECTOR_OUTPUTS))
    for name, got in zip(pkg.DETECTOR_OUTPUTS, outs):
        assert _rel(got, reference[name]) < PACKAGE_TOL, name


@needs_ov
def test_openvino_runs_the_dyhead_package(dyhead, reference):
    with engines.load(dyhead, "openvino", cache_dir="") as e:
        assert e.deform_conv == "native"
        got = e.detector.run(_det_inputs(reference))
    for name in pkg.DETECTOR_OUTPUTS:
        assert _rel(got[name], reference[name]) < PACKAGE_TOL, name
    with engines.load(dyhead, "onnxruntime") as e:
        assert e.deform_conv == "native"


@needs_ov
def test_openvino_engine_folder_has_native_deformable_convolution(dyhead, reference, tmp_path):
    import openvino as ov

    out = tmp_path / "ov"
    args = build.get_args_parser().parse_args(["--package", str(dyhead), "--backend", "openvino", "--out", str(out)])
    assert build.main(args) == 0
    record = json.loads((out / "engine.json").read_text())
    assert record["deform_conv"] == "native"
    assert record["graphs"]["detector"]["deform_conv"] == {"nodes": 13, "path": "native"}
    assert record["graphs"]["text"]["deform_conv"] is None
    ops = {op.get_type_name() for op in ov.Core().read_model(str(out / "detector.xml")).get_ops()}
    assert "DeformableConvolution" in ops
    with engines.load(out) as e:
        assert e.deform_conv == "native"
        got = e.detector.run(_det_inputs(reference))
    for name in pkg.DETECTOR_OUTPUTS:
        assert _rel(got[name], reference[name]) < PACKAGE_TOL, name


@pytest.fixture(scope="module")
def rtx_engine(dyhead, tmp_path_factory):
    """``rtx_engine(precision)``: the DyHead package built by engines.build for TensorRT-RTX, once per
    precision for the module, in-process (``build.main``); the refusal below runs it as a program."""
    root, built = tmp_path_factory.mktemp("rtx"), {}

    def get(precision: str) -> Path:
        if precision not in built:
            out = root / f"rtx-{precision}"
            args = build.get_args_parser().parse_args(["--package", str(dyhead), "--backend", "tensorrt-rtx",
                                                       "--precision", precision, "--out", str(out)])
            assert build.main(args) == 0
            built[precision] = out
        return built[precision]
    return get


@needs_rtx
@pytest.mark.trt
# fp16 only: the precision an RTX GPU runs, and the one whose rewrite keeps the sampling coordinates
# FP32 (test_fp16_build_keeps_the_sampling_coordinates_fp32); an fp32 build of the same parsed
# network (12 s) tested no other path, and test_trt_build builds fp32 plans.
@pytest.mark.parametrize("precision", ["fp16"])
def test_tensorrt_rtx_builds_the_dyhead_package(rtx_engine, precision):
    out = rtx_engine(precision)
    record = json.loads((out / "engine.json").read_text())
    assert record["deform_conv"] == "gridsample" and record["build"]["deform_conv"] == "auto"
    assert record["graphs"]["detector"]["deform_conv"] == {"nodes": 13, "path": "gridsample", "precision": precision}
    assert record["graphs"]["text"]["deform_conv"] is None
    assert record["graphs"]["detector"]["bytes"] > 0 and (out / "detector.plan").is_file()


@needs_rtx
@pytest.mark.trt
def test_tensorrt_rtx_refuses_the_plugin_path_in_one_line(dyhead, tmp_path, capsys):
    args = build.get_args_parser().parse_args(["--package", str(dyhead), "--backend", "tensorrt-rtx",
                                               "--deform-conv", "plugin", "--out", str(tmp_path / "e")])
    assert build.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "TensorRT-RTX has no ModulatedDeformConv2d plugin" in err and "--deform-conv auto" in err
    assert not (tmp_path / "e").exists()


@needs_rtx
@pytest.mark.trt
def test_a_plugin_engine_is_refused_where_the_plugin_is_missing(rtx_engine, tmp_path):
    """A plan with plugin layers needs libnvinfer_plugin's creator when it is loaded: without it,
    loading stops before deserialising, with the rebuild command."""
    out = Path(shutil.copytree(rtx_engine("fp16"), tmp_path / "e"))
    record = json.loads((out / "engine.json").read_text())
    record["deform_conv"] = "plugin"              # as a datacenter TensorRT with the plugin writes it
    (out / "engine.json").write_text(json.dumps(record))
    with pytest.raises(engines.EngineMismatch, match="ModulatedDeformConv2d plugin, and this TensorRT's "
                                                     "libnvinfer_plugin has none") as e:
        engines.load(out)
    assert "--deform-conv gridsample" in str(e.value) and "engines.build" in str(e.value)


def _fake_tensorrt(creators: list[str], rtx: bool = False):
    """engines.trt.TensorRT.has_plugin over a stand-in TensorRT module whose registry holds ``creators``."""
    from engines.trt import TensorRT

    registry = types.SimpleNamespace(all_creators=[types.SimpleNamespace(name=n) for n in creators])
    module = types.SimpleNamespace(init_libnvinfer_plugins=lambda logger, ns: True,
                                   get_plugin_registry=lambda: registry)
    rt = types.SimpleNamespace(trt=module, logger=None, is_rtx=rtx, version="10.0.1", backend="tensorrt")
    rt.has_plugin = lambda name: TensorRT.has_plugin(rt, name)
    return rt


@needs_rtx
def test_has_plugin_reads_the_plugin_registry():
    from engines.trt import TensorRT

    rt = TensorRT("tensorrt-rtx")
    assert rt.has_plugin("ROIAlign_TRT") and not rt.has_plugin("ModulatedDeformConv2d")


def test_datacenter_tensorrt_uses_the_plugin_when_it_is_there():
    path = Path("pkg/detector.onnx")
    with_plugin = _fake_tensorrt(["ROIAlign_TRT", "ModulatedDeformConv2d"])
    without = _fake_tensorrt(["ROIAlign_TRT"])
    assert build.deform_path(with_plugin, "auto", 78, path) == "plugin"
    assert build.deform_path(without, "auto", 78, path) == "gridsample"
    assert build.deform_path(with_plugin, "gridsample", 78, path) == "gridsample"
    assert build.deform_path(without, "plugin", 0, path) is None          # nothing to build
    assert build.deform_path(_fake_tensorrt([], rtx=True), "auto", 78, path) == "gridsample"
    with pytest.raises(BuildError) as e:
        build.deform_path(without, "plugin", 78, path)
    message = str(e.value)
    assert "\n" not in message and "78 DeformConv nodes" in message and "no ModulatedDeformConv2d plugin" in message
    assert "--deform-conv auto / gridsample" in message and "TensorRT >= 10.1" in message


def test_detect_names_the_deform_conv_path_first(dyhead, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    from runtime import detect

    args = detect.get_args_parser().parse_args([
        "--package", str(dyhead), "--image", str(tmp_path / "a.png"), "--prompt", "a red circle",
        "--backend", "onnxruntime", "--json", str(tmp_path / "out.jsonl"), "--headless"])
    assert detect.main(args) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first == "fiber-detect: fiber-tiny-dyhead-test on onnxruntime, deformable convs: native", first
    assert json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])["phrases"] == ["a red circle"]
