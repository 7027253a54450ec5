"""Q/DQ clean-up of a modelopt-quantised detector graph before it ships (``clean_qdq``).

Weight QuantizeLinear folded into int8 initializers (4x smaller, the canonical
``int8 W -> DequantizeLinear -> MatMul/Conv`` pattern that TensorRT and ONNX Runtime fuse; a
``W -> Q -> DQ -> Transpose`` chain becomes ``int8 W^T -> DQ(axis swapped)``), no-op float->float
Casts removed, and duplicate Q/DQ pairs on one tensor (q/k/v each quantise the same input) merged
into one.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.onnx_graph import GraphIndex, Rewirer, attr, count_ops, drop_unused, remove_nodes, same

def _quantize(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear to int8: round half to even, saturate, per-axis when ``scale`` is 1-D."""
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * w.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    q = np.rint(w.astype(np.float32) / scale.astype(np.float32)) + zero.astype(np.float32)
    return np.clip(q, -128, 127).astype(np.int8)


def _fold_weights(model: onnx.ModelProto) -> int:
    """W (float constant) -> Q -> DQ [-> Transpose] becomes int8 W -> DQ. Returns the folds made."""
    g = GraphIndex(model)
    rewire = Rewirer(model)
    remove, folds = set(), 0
    for q in list(model.graph.node):
        if q.op_type != "QuantizeLinear" or len(q.input) < 3:
            continue
        w, scale, zero = g.const(q.input[0]), g.const(q.input[1]), g.const(q.input[2])
        dqs = g.consumers[q.output[0]]
        if w is None or scale is None or zero is None or zero.dtype != np.int8 or len(dqs) != 1:
            continue
        dq = dqs[0]
        if (dq.op_type != "DequantizeLinear" or q.output[0] in g.outputs
                or not same(g.const(dq.input[1]), scale) or not same(g.const(dq.input[2]), zero)):
            continue
        axis = attr(q, "axis", 1)
        axis = axis + w.ndim if axis < 0 else axis
        wq = _quantize(w, scale, zero, axis)
        users = g.consumers[dq.output[0]]
        transposes = [u for u in users if u.op_type == "Transpose"]
        if w.ndim == 2 and len(users) == 1 and len(transposes) == 1 and dq.output[0] not in g.outputs:
            t = transposes[0]
            perm = list(attr(t, "perm", [1, 0]))
            if perm == [1, 0]:      # fold the transpose too: DQ(axis) on W^T uses the other axis
                wq, axis = wq.T.copy(), 1 - axis
                rewire(t.output[0], dq.output[0])
                remove.add(t.output[0])
        name = f"{q.input[0]}_int8"
        model.graph.initializer.append(numpy_helper.from_array(wq, name))
        dq.input[0] = name
        _set_axis(dq, axis if scale.size > 1 else None)
        remove.add(q.output[0])
        folds += 1
    remove_nodes(model, remove)
    return folds


def _set_axis(node, axis: int | None) -> None:
    keep = [a for a in node.attribute if a.name != "axis"]
    del node.attribute[:]
    node.attribute.extend(keep)
    if axis is not None:
        node.attribute.append(helper.make_attribute("axis", axis))


def _remove_noop_casts(model: onnx.ModelProto) -> int:
    """Cast(to=FLOAT) of a float tensor (modelopt adds them around quantizers) -> removed."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    outputs = {o.name for o in model.graph.output}
    rewire = Rewirer(model)
    remove = set()
    for node in model.graph.node:
        if (node.op_type == "Cast" and attr(node, "to") == types.get(node.input[0], -1)
                and node.output[0] not in outputs):
            rewire(node.output[0], node.input[0])
            remove.add(node.output[0])
    remove_nodes(model, remove)
    return len(remove)


def _merge_duplicate_qdq(model: onnx.ModelProto) -> int:
    """Q/DQ pairs on the same tensor with equal scale, zero point and axis -> one pair."""
    g = GraphIndex(model)
    rewire = Rewirer(model)
    seen: dict[tuple, str] = {}
    remove = set()
    for q in list(model.graph.node):
        if q.op_type != "QuantizeLinear" or len(q.input) < 3:
            continue
        dqs = g.consumers[q.output[0]]
        scale, zero = g.const(q.input[1]), g.const(q.input[2])
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear" or scale is None or zero is None:
            continue
        key = (q.input[0], scale.tobytes(), zero.tobytes(), attr(q, "axis", 1))
        dq = dqs[0]
        if key not in seen:
            seen[key] = dq.output[0]
            continue
        if dq.output[0] in g.outputs:
            continue
        rewire(dq.output[0], seen[key])
        remove.update({q.output[0], dq.output[0]})
    remove_nodes(model, remove)
    return len(remove) // 2


def clean_qdq(model: onnx.ModelProto) -> dict[str, int]:
    """Clean a modelopt Q/DQ graph in place (see the module docstring); returns what was done."""
    stats = {"noop_casts": _remove_noop_casts(model)}
    stats["merged_qdq"] = _merge_duplicate_qdq(model)
    stats["folded_weights"] = _fold_weights(model)
    drop_unused(model)
    counts = count_ops(model, "QuantizeLinear", "DequantizeLinear")
    stats["quantize_linear"] = counts.get("QuantizeLinear", 0)
    stats["dequantize_linear"] = counts.get("DequantizeLinear", 0)
    return stats
