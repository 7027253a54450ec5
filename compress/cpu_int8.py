"""The CPU variant of an INT8 detector (``detector.cpu.onnx``, named in graphs.detector.cpu_file).

``detector.onnx`` of an INT8 package is the explicit Q/DQ graph that TensorRT builds; ONNX Runtime's
CPU provider runs it too, but barely faster than FP32 (static Q/DQ turns into MatMulIntegerToFloat
plus a separate QuantizeLinear per activation, and the fixed cost of the many non-GEMM nodes stays).
The CPU variant is what engines.ort runs on the CPU provider instead. Methods:

- ``qdq-dynamic`` (default): derived from detector.onnx itself. Every ``x -> Q -> DQ -> MatMul <- DQ
  <- int8 W`` becomes one fused ``com.microsoft.DynamicQuantizeMatMul(x, W, w_scale, w_zero[, bias])``:
  the same int8 weights and per-channel scales as the TensorRT file, the activation quantised on the
  fly (per tensor, uint8) instead of with the calibrated scale, and the bias add folded in. What the
  sensitivity pass kept in FP32 stays FP32; Conv Q/DQ pairs stay as they are.
- ``dynamic``: ONNX Runtime ``quantize_dynamic`` of the FP32 detector: int8 per-channel weights,
  activations quantised on the fly inside fused DynamicQuantizeMatMul kernels (MatMul nodes only:
  quantising everything ruins the masked attention logits, see environment.md §3).
- ``none``: no CPU variant; the CPU runs detector.onnx.

Where the CPU time goes and what is default (AMD EPYC Zen 4: AVX-512 VNNI/BF16, no AMX;
fiber-nano, batch 1, T=16, 1 thread; benchmarks/int8_speed.py --matrix, alternating, 3 repeats on a
shared machine; speed-up over the FP32 detector.onnx on ONNX Runtime, whose shape arithmetic is
folded too, ~5% faster than before folding):

    INT8 Q/DQ detector.onnx on ONNX Runtime          1.1x
    INT8 detector.cpu.onnx (qdq-dynamic) on ORT       1.55x   (the ORT default for INT8)
    INT8 Q/DQ detector.onnx, OpenVINO, dynamic shapes 1.5x
    INT8 Q/DQ detector.onnx, OpenVINO, static shapes  1.95-2.0x (1.8x over FP32 on OpenVINO, static)
    the same with OpenVINO's bf16 hint                2.2x    (1.24x over FP32 on OpenVINO, bf16)

About half of the FP32 detector's time is not in GEMMs (LayerNorm, GELU, softmax, window
transposes, attention matmuls, head convs), which caps what INT8 GEMMs can give on ONNX Runtime:
the CPU file's DynamicQuantizeMatMuls run the weight GEMMs ~2.2x faster; static activation scales
(MatMulIntegerToFloat with uint8 zero point 128) and Q/DQ on the attention matmuls (compress.quantize
--attention) were no faster (measured); int8 head/FPN convs (QLinearConv) would save ~8% but need
calibrated conv output scales, which the Q/DQ file does not have. OpenVINO fuses more of the rest, so INT8 packages
name it as ``graphs.detector.cpu_backend`` when it passed the export's static-shape check
(compress.openvino_check); this file is what ONNX Runtime runs.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from common import package as pkg
from compress import onnx_export, onnx_graph

METHODS = ("qdq-dynamic", "dynamic", "none")
DEFAULT = "qdq-dynamic"
MS_DOMAIN = "com.microsoft"


def make_cpu_variant(method: str, model, qmodel, x: dict[str, np.ndarray], hidden: np.ndarray,
                     folder: Path) -> dict[str, Any]:
    """Write ``folder/detector.cpu.onnx`` with ``method``; returns its manifest entry (``cpu_variant``).

    model: the FP32 ``FiberForGrounding`` whose weights the package ships; qmodel: the same with
    modelopt quantizers; x / hidden: example inputs (see compress.export.example_inputs).
    """
    if method == "qdq-dynamic":
        return _qdq_dynamic(folder / pkg.DETECTOR_GRAPH, folder / pkg.DETECTOR_CPU_GRAPH)
    if method == "dynamic":
        return _dynamic(model, x, hidden, folder / pkg.DETECTOR_CPU_GRAPH)
    raise ValueError(f"unknown CPU INT8 method {method!r}; known: {', '.join(METHODS)}")


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _dynamic(model, x: dict[str, np.ndarray], hidden: np.ndarray, path: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="fiber-cpu-int8-") as scratch:
        fp32 = Path(scratch) / "detector.fp32.onnx"
        onnx_export.export_detector(model, x, hidden, fp32, qdq=False)
        with _quiet_root_logger():  # onnxruntime.quantization logs advice on the root logger
            quantize_dynamic(fp32, path, op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8)
    onnx_graph.check_graph(path)
    return {"method": "dynamic", "tool": "onnxruntime.quantization.quantize_dynamic",
            "op_types": ["MatMul"], "weights": "int8 per-channel", "activations": "uint8 per-tensor, dynamic"}


def _qdq_dynamic(qdq_path: Path, path: Path) -> dict[str, Any]:
    model = onnx.load(str(qdq_path))
    fused = qdq_to_dynamic(model)
    model.graph.name = "detector_cpu"
    onnx_graph.save(model, path)
    onnx_graph.check_graph(path)
    return {"method": "qdq-dynamic", "from": pkg.DETECTOR_GRAPH, "fused_matmuls": fused,
            "op": f"{MS_DOMAIN}.DynamicQuantizeMatMul", "weights": "the Q/DQ file's int8 weights and scales",
            "activations": "uint8 per-tensor, dynamic"}


def qdq_to_dynamic(model: onnx.ModelProto) -> int:
    """Rewrite Q/DQ MatMuls with an int8 constant weight into DynamicQuantizeMatMul (in place).

    Pattern: ``MatMul(DQ(Q(x, s, 0)), DQ(W_int8, w_scale, w_zero, axis=1 | per-tensor))`` with W 2-D.
    A following ``Add`` of a 1-D constant bias of N values is folded into the op's bias input.
    Returns the number of MatMuls rewritten.
    """
    g = onnx_graph.GraphIndex(model)
    replace: dict[str, onnx.NodeProto] = {}    # first output of the MatMul -> its replacement
    remove: set[str] = set()                   # first outputs of folded bias Adds
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        act, weight = g.producer.get(node.input[0]), g.producer.get(node.input[1])
        if not (_is_activation_dq(g, act) and _is_weight_dq(g, weight)):
            continue
        inputs = [g.producer[act.input[0]].input[0], weight.input[0], weight.input[1], weight.input[2]]
        out = node.output[0]
        bias = _bias_add(g, node, g.inits[weight.input[0]].dims[1])
        if bias is not None:
            inputs.append(bias[1])
            out = bias[0].output[0]
            remove.add(out)
        replace[node.output[0]] = helper.make_node("DynamicQuantizeMatMul", inputs, [out], domain=MS_DOMAIN,
                                                   name=(node.name or out) + "/dynamic")
    nodes = [replace.get(n.output[0], n) for n in model.graph.node if n.output[0] not in remove]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    fused = len(replace)
    onnx_graph.drop_unused(model)
    if fused and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused


def _is_activation_dq(g, dq) -> bool:
    """DQ(Q(x)) with a per-tensor scale (the calibrated activation pair)."""
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in g.inits:
        return False
    q = g.producer.get(dq.input[0])
    scale = g.const(dq.input[1])
    return q is not None and q.op_type == "QuantizeLinear" and scale is not None and scale.size == 1


def _is_weight_dq(g, dq) -> bool:
    """DQ of a 2-D int8 initializer, per-tensor or per output column (axis 1)."""
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in g.inits:
        return False
    w = g.inits[dq.input[0]]
    if w.data_type != onnx.TensorProto.INT8 or len(w.dims) != 2 or len(dq.input) < 3:
        return False
    scale = g.const(dq.input[1])
    axis = onnx_graph.attr(dq, "axis", 1)
    return scale is not None and (scale.size == 1 or (axis in (1, -1) and scale.size == w.dims[1]))


def _bias_add(g, matmul, n: int):
    """(the Add node, bias name) when the MatMul's only consumer adds a constant [N] bias."""
    users = g.consumers.get(matmul.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or matmul.output[0] in g.outputs:
        return None
    add = users[0]
    other = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
    bias = g.const(other)
    if bias is None or bias.dtype != np.float32 or bias.shape != (n,):
        return None
    return add, other
