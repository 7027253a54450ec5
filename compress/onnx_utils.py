"""ONNX helpers of the exporter: torch -> ONNX, checking, tensor specs and Q/DQ clean-up.

- ``export_graph``: the legacy TorchScript exporter (``dynamo=False``), the one exporter that traces
  modelopt's quantizers (the dynamo exporter fails on their data-dependent amax checks), under
  ``torch.inference_mode`` (needed: it turns the quantizers' amax buffers into constants).
- ``check_graph``: ``onnx.checker.check_model(full_check=True)`` with one clear error.
- ``export_text`` / ``export_detector``: the package's two graphs from a ``FiberForGrounding``
  (``text_graph()`` / ``detector_graph()`` wrappers), checked; ``ort_reference`` runs a graph with
  ONNX Runtime's graph optimisations off (the plain ONNX semantics, for reference outputs).
- ``io_specs``: ``[{"name", "shape", "dtype"}]`` of a graph's inputs or outputs, read from the file
  (dynamic dims are their names, e.g. "batch", "tokens").
- ``fold_shape_arithmetic``: the shape computations the legacy exporter writes (Shape / Gather /
  Concat chains feeding every Reshape) become constants where the fixed image size decides them,
  Reshape targets keep only the batch / token dims dynamic (0 or -1): ~1000 fewer nodes in the
  fiber-nano detector, ~5% faster on ONNX Runtime; checked on example inputs of other sizes.
- ``clean_qdq``: what the Q/DQ graph of a modelopt-quantised model needs before it ships:
  weight QuantizeLinear folded into int8 initializers (4x smaller, the canonical
  ``int8 W -> DequantizeLinear -> MatMul/Conv`` pattern that TensorRT and ONNX Runtime fuse;
  a ``W -> Q -> DQ -> Transpose`` chain becomes ``int8 W^T -> DQ(axis swapped)``), no-op float->float
  Casts removed, and duplicate Q/DQ pairs on one tensor (q/k/v each quantise the same input)
  merged into one.
- ``quantize_rows`` / ``int8_gather_table``: a large embedding table stored as int8 rows with one
  float scale per row (symmetric, max |row| / 127; kept as uint8 + 128 for TensorRT), read as
  ``Gather -> Cast -> Sub -> Mul(Gather(scale))``: the word embeddings are most of text.onnx (30522 x 384 floats = 47 MB of 55 MB in
  fiber-nano), and a per-row int8 table is exact for a model whose table already holds the
  dequantised values, which is how the exporter uses it (parity stays an FP32 check).
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from common import package as pkg

OPSET = 17
TEXT_DYNAMIC_AXES = {
    pkg.INPUT_IDS: {0: "batch", 1: "tokens"},
    pkg.ATTENTION_MASK: {0: "batch", 1: "tokens"},
    pkg.TEXT_HIDDEN: {0: "batch", 1: "tokens"},
}
DETECTOR_DYNAMIC_AXES = {
    pkg.IMAGE: {0: "batch"},
    pkg.TEXT_HIDDEN: {0: "batch", 1: "tokens"},
    pkg.ATTENTION_MASK: {0: "batch", 1: "tokens"},
    pkg.BOXES: {0: "batch"},
    pkg.TOKEN_LOGITS: {0: "batch", 2: "tokens"},
    pkg.CENTERNESS: {0: "batch"},
}
_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT64: "int64",
           TensorProto.INT32: "int32", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8",
           TensorProto.BOOL: "bool"}


class OnnxExportError(RuntimeError):
    """An exported graph that fails the ONNX checker or has an unexpected interface."""


def export_graph(module: Any, args: tuple, path: str | Path, input_names: Sequence[str],
                 output_names: Sequence[str], dynamic_axes: dict, opset: int = OPSET) -> None:
    """``torch.onnx.export`` with the legacy exporter; the module is left in eval mode.

    The exporter restores the wrapper's train/eval mode onto the model afterwards, so the module
    is put back into eval mode explicitly (an export must never switch dropout on).
    """
    module.eval()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer warnings
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                          input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic_axes, do_constant_folding=True)
    module.eval()


def check_graph(path: str | Path) -> None:
    """``onnx.checker.check_model(path, full_check=True)`` (strict shape inference included)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxExportError(f"{path}: the ONNX checker rejects the graph: {first}") from None


def io_specs(model: onnx.ModelProto, which: str) -> list[dict[str, Any]]:
    """``which`` = "input" | "output": ``[{"name", "shape", "dtype"}]`` of the graph, in order."""
    initializers = {i.name for i in model.graph.initializer}
    out = []
    for vi in getattr(model.graph, which):
        if vi.name in initializers:
            continue
        t = vi.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": vi.name, "shape": shape, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type))})
    return out


def count_ops(model: onnx.ModelProto, *op_types: str) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        if not op_types or node.op_type in op_types:
            counts[node.op_type] += 1
    return dict(counts)


# ----------------------------------------------------------------------------- package graphs

def to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def export_text(model, x: dict[str, np.ndarray], path: Path,
                int8_words: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[onnx.ModelProto, dict | None]:
    """text.onnx: ``encode_text`` (embeddings + unfused text layers), dynamic batch and tokens.
    ``int8_words = (q, scale)``: the word-embedding table (the one Gather that reads ``input_ids``)
    is stored as int8 rows (``int8_gather_table``); ``model``'s table must hold
    ``dequantize_rows(q, scale)``, so the graph equals the model. Returns (graph, table info or None)."""
    export_graph(model.text_graph(), (to_torch(x[pkg.INPUT_IDS]), to_torch(x[pkg.ATTENTION_MASK])),
                 path, pkg.TEXT_INPUTS, pkg.TEXT_OUTPUTS, TEXT_DYNAMIC_AXES)
    graph = onnx.load(str(path))
    if count_ops(graph, "QuantizeLinear"):
        raise OnnxExportError("text.onnx has Q/DQ nodes: the text prefix must stay FP32")
    info = None if int8_words is None else int8_word_table(graph, *int8_words)
    return _finish(graph, path, {}), info


def word_table(graph: onnx.ModelProto) -> str:
    """The name of a text graph's word-embedding table: the one initializer Gathered by ``input_ids``."""
    inits = {i.name for i in graph.graph.initializer}
    tables = [n.input[0] for n in graph.graph.node
              if n.op_type == "Gather" and n.input[1] == pkg.INPUT_IDS and n.input[0] in inits]
    if len(tables) != 1:
        raise OnnxExportError(f"a text graph has one Gather of an initializer by {pkg.INPUT_IDS}, "
                              f"this one has {len(tables)} (not a fiber-edge text graph, or already int8)")
    return tables[0]


def int8_word_table(graph: onnx.ModelProto, q: np.ndarray, scale: np.ndarray) -> dict[str, Any]:
    """``int8_gather_table`` on the text graph's word table; the manifest's ``word_embeddings``."""
    table = word_table(graph)
    return {"table": table, "dtype": "int8", "scale": "per row, symmetric (max |row| / 127)",
            **int8_gather_table(graph, table, q, scale)}


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 of a 2-D float table: ``(q int8 [V, D], scale float32 [V])`` with
    ``scale = max |row| / 127`` (1 for an all-zero row); ``q * scale[:, None]`` is the table read back."""
    table = np.asarray(table, dtype=np.float32)
    if table.ndim != 2:
        raise ValueError(f"an embedding table is 2-D, got shape {table.shape}")
    amax = np.abs(table).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 table that an int8 Gather table stands for (the same float32 product as ONNX Mul)."""
    return q.astype(np.float32) * scale[:, None]


def int8_gather_table(model: onnx.ModelProto, table: str, q: np.ndarray, scale: np.ndarray) -> dict[str, int]:
    """Replace the float initializer ``table``, read only by ``Gather(axis=0)`` nodes, with the int8
    rows ``q`` and per-row ``scale``: each ``Gather(table, ids)`` becomes ``Mul(Sub(Cast(Gather(q + 128,
    ids)), 128), Gather(scale[:, None], ids))``. The rows are stored as uint8 with the offset 128
    because TensorRT admits int8 constants only in front of DequantizeLinear, and a DequantizeLinear
    of the whole table would dequantise all of it on every run; the offset is exact in float32, so
    the graph computes exactly ``dequantize_rows(q, scale)[ids]``. Returns the bytes before/after."""
    inits = {i.name: i for i in model.graph.initializer}
    if table not in inits:
        raise OnnxExportError(f"no initializer named {table!r} to store as int8")
    readers = [n for n in model.graph.node if table in n.input]
    bad = [n.name for n in readers if n.op_type != "Gather" or n.input[0] != table or (attr(n, "axis", 0) or 0) != 0]
    if not readers or bad:
        raise OnnxExportError(f"initializer {table!r} must be read only as Gather data on axis 0 (not by {bad})")
    old = inits[table]
    if list(old.dims) != list(q.shape) or scale.shape != (q.shape[0],):
        raise OnnxExportError(f"int8 table {q.shape} / scale {scale.shape} do not match {table!r} {list(old.dims)}")
    q_name, s_name, zero = f"{table}.int8", f"{table}.scale", f"{table}.zero"
    model.graph.initializer.remove(old)
    model.graph.initializer.extend([
        numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8), q_name),
        numpy_helper.from_array(scale.astype(np.float32)[:, None], s_name),
        numpy_helper.from_array(np.array(128.0, dtype=np.float32), zero)])
    nodes = list(model.graph.node)
    for node in readers:
        ids, out = node.input[1], node.output[0]
        base = node.name or out
        at = nodes.index(node)
        nodes[at:at + 1] = [
            helper.make_node("Gather", [q_name, ids], [f"{out}.int8"], name=f"{base}.int8", axis=0),
            helper.make_node("Cast", [f"{out}.int8"], [f"{out}.cast"], name=f"{base}.cast", to=TensorProto.FLOAT),
            helper.make_node("Sub", [f"{out}.cast", zero], [f"{out}.float"], name=f"{base}.offset"),
            helper.make_node("Gather", [s_name, ids], [f"{out}.scale"], name=f"{base}.scale", axis=0),
            helper.make_node("Mul", [f"{out}.float", f"{out}.scale"], [out], name=f"{base}.dequant"),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return {"bytes_fp32": int(q.size * 4), "bytes": int(q.size + scale.size * 4)}


def export_detector(model, x: dict[str, np.ndarray], hidden: np.ndarray, path: Path,
                    qdq: bool) -> onnx.ModelProto:
    """detector.onnx: ``detect`` (Swin + fused layers + FPN + head + box decode); with ``qdq`` the
    model carries modelopt quantizers and the Q/DQ graph is cleaned (clean_qdq). Shape arithmetic
    fixed by the image size is folded into constants (fold_shape_arithmetic)."""
    args = (to_torch(x[pkg.IMAGE]), to_torch(hidden), to_torch(x[pkg.ATTENTION_MASK]))
    export_graph(model.detector_graph(), args, path, pkg.DETECTOR_INPUTS, pkg.DETECTOR_OUTPUTS,
                 DETECTOR_DYNAMIC_AXES)
    with torch.inference_mode():
        shapes = {name: tuple(t.shape) for name, t in zip(pkg.DETECTOR_OUTPUTS, model.detect(*args))}
    graph = onnx.load(str(path))
    probes = detector_probes(x, hidden)
    fold_shape_ifs(graph, probes[:2])
    if qdq:
        clean_qdq(graph)
        if not count_ops(graph, "QuantizeLinear"):
            raise OnnxExportError("the INT8 detector has no Q/DQ nodes (every quantizer is disabled)")
    fold_shape_arithmetic(graph, probes[:-1], probes[-1])
    return _finish(graph, path, shapes)


def detector_probes(x: dict[str, np.ndarray], hidden: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Detector inputs of different batch and token counts: the example (batch 1), then batch 2 /
    +5 tokens, batch 3 / +2 tokens and (the last, for checks) batch 2 / +9 tokens; added tokens are
    padding."""
    one = {pkg.IMAGE: x[pkg.IMAGE], pkg.TEXT_HIDDEN: hidden, pkg.ATTENTION_MASK: x[pkg.ATTENTION_MASK]}
    out = [one]
    for batch, extra in ((2, 5), (3, 2), (2, 9)):
        pad = ((0, 0), (0, extra))
        out.append({pkg.IMAGE: np.concatenate([x[pkg.IMAGE]] * batch),
                    pkg.TEXT_HIDDEN: np.concatenate([np.pad(hidden, pad + ((0, 0),))] * batch),
                    pkg.ATTENTION_MASK: np.concatenate([np.pad(x[pkg.ATTENTION_MASK], pad)] * batch)})
    return out


def _finish(graph: onnx.ModelProto, path: Path, shapes: dict) -> onnx.ModelProto:
    set_static_dims(graph, shapes)
    graph.producer_name = "fiber-edge compress.export"
    save(graph, path)
    check_graph(path)
    return graph


def ort_reference(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's outputs from ONNX Runtime with graph optimisations off (plain ONNX semantics)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


# ----------------------------------------------------------------------------- Q/DQ clean-up

class _Graph:
    """Producer/consumer maps and constant lookup over one ONNX graph (rebuilt after edits)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in model.graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in model.graph.output}

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output, else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        if node is not None and node.op_type == "Identity":
            return self.const(node.input[0])
        return None


def attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


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
    g = _Graph(model)
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
                or not _same(g.const(dq.input[1]), scale) or not _same(g.const(dq.input[2]), zero)):
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
                _rewire(model, t.output[0], dq.output[0])
                remove.add(t.output[0])
        name = f"{q.input[0]}_int8"
        model.graph.initializer.append(numpy_helper.from_array(wq, name))
        dq.input[0] = name
        _set_axis(dq, axis if scale.size > 1 else None)
        remove.add(q.output[0])
        folds += 1
    _remove_nodes(model, remove)
    return folds


def _same(a: np.ndarray | None, b: np.ndarray) -> bool:
    return a is not None and a.dtype == b.dtype and a.shape == b.shape and bool(np.all(a == b))


def _set_axis(node, axis: int | None) -> None:
    keep = [a for a in node.attribute if a.name != "axis"]
    del node.attribute[:]
    node.attribute.extend(keep)
    if axis is not None:
        node.attribute.append(helper.make_attribute("axis", axis))


def _rewire(model: onnx.ModelProto, old: str, new: str) -> None:
    """Every consumer (and graph output) of tensor ``old`` reads ``new`` instead."""
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new
    for out in model.graph.output:
        if out.name == old:
            raise OnnxExportError(f"cannot rewire graph output {old!r}")


def graph_index(model: onnx.ModelProto) -> "_Graph":
    """Producer / consumer / constant lookup over ``model`` (stale after edits: rebuild)."""
    return _Graph(model)


def _remove_nodes(model: onnx.ModelProto, first_outputs: set[str]) -> None:
    """Remove the nodes whose first output is in ``first_outputs`` (tensor names are unique)."""
    keep = [n for n in model.graph.node if n.output[0] not in first_outputs]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _remove_noop_casts(model: onnx.ModelProto) -> int:
    """Cast(to=FLOAT) of a float tensor (modelopt adds them around quantizers) -> removed."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    outputs = {o.name for o in model.graph.output}
    remove = set()
    for node in model.graph.node:
        if (node.op_type == "Cast" and attr(node, "to") == types.get(node.input[0], -1)
                and node.output[0] not in outputs):
            _rewire(model, node.output[0], node.input[0])
            remove.add(node.output[0])
    _remove_nodes(model, remove)
    return len(remove)


def _merge_duplicate_qdq(model: onnx.ModelProto) -> int:
    """Q/DQ pairs on the same tensor with equal scale, zero point and axis -> one pair."""
    g = _Graph(model)
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
        _rewire(model, dq.output[0], seen[key])
        remove.update({q.output[0], dq.output[0]})
    _remove_nodes(model, remove)
    return len(remove) // 2


def drop_unused(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nobody reads, then unused initializers."""
    while True:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = {n.output[0] for n in model.graph.node if not any(o in used for o in n.output)}
        if not dead:
            break
        _remove_nodes(model, dead)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


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


def save(model: onnx.ModelProto, path: str | Path) -> None:
    """Save one self-contained ONNX file (packages stay far below protobuf's 2 GB)."""
    onnx.save_model(model, str(path))


def set_static_dims(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                    dynamic: frozenset[str] = frozenset({"batch", "tokens"})) -> None:
    """Give graph outputs their concrete sizes where the exporter left a made-up symbol.

    ``shapes``: an example run's output shapes. Dims named in ``dynamic`` stay symbolic; others
    (e.g. the anchor count N, fixed by the input size) become ``dim_value``.
    """
    for out in model.graph.output:
        if out.name not in shapes:
            continue
        for dim, size in zip(out.type.tensor_type.shape.dim, shapes[out.name]):
            if dim.dim_param not in dynamic:
                dim.Clear()
                dim.dim_value = int(size)


def fold_shape_ifs(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]]) -> int:
    """Inline ``If`` nodes whose condition is the same for every example in ``feeds``.

    The legacy exporter writes ``squeeze(-1)`` on a tensor of unknown shape as
    ``If(shape(x)[-1] == 1, Squeeze, Identity)``; the condition only depends on static sizes, but
    OpenVINO loses the output's name through the If and TensorRT builds a conditional. Each
    condition is evaluated with ONNX Runtime on two or more example inputs of different batch and
    token sizes; when all agree, the taken branch replaces the If. Returns the number inlined.
    """
    import onnxruntime as ort

    ifs = [n for n in model.graph.node if n.op_type == "If"]
    if not ifs:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for n in ifs:
        probe.graph.output.append(helper.make_tensor_value_info(n.input[0], TensorProto.BOOL, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    results = [session.run(None, f) for f in feeds]
    folded = 0
    for k, node in enumerate(ifs):
        values = {bool(np.asarray(r[k]).reshape(-1)[0]) for r in results}
        if len(values) != 1:
            continue
        branch = attr(node, "then_branch" if values.pop() else "else_branch")
        if len(branch.output) != len(node.output) or branch.input:
            continue
        _inline_branch(model, node, branch)
        folded += 1
    drop_unused(model)
    return folded


def _inline_branch(model: onnx.ModelProto, node, branch) -> None:
    """Replace ``node`` (an If) by the nodes of ``branch``, renaming its outputs to the If's."""
    rename = {b.name: o for b, o in zip(branch.output, node.output)}
    prefix = (node.name or node.output[0]) + "/"
    local = {o for n in branch.node for o in n.output}
    new_nodes = []
    for n in branch.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.name = prefix + (n.name or n.op_type)
        for i, name in enumerate(copy.input):
            if name in local:
                copy.input[i] = rename.get(name, prefix + name)
        for i, name in enumerate(copy.output):
            copy.output[i] = rename.get(name, prefix + name)
        new_nodes.append(copy)
    nodes = list(model.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.output[0] == node.output[0])
    nodes[at:at + 1] = new_nodes
    del model.graph.node[:]
    model.graph.node.extend(nodes)


# ----------------------------------------------------------------------------- shape arithmetic

FOLD_MAX_ELEMENTS = 4096    # shape-derived values larger than this stay computed (e.g. big masks)


def fold_shape_arithmetic(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]],
                          check: dict[str, np.ndarray]) -> dict[str, int]:
    """Replace shape arithmetic whose value never changes by constants (in place).

    The legacy exporter computes every reshape target from ``Shape`` of a tensor: the detector
    carries hundreds of Shape / Gather / Unsqueeze / Concat / Slice nodes whose values are fixed by
    the image size, and only the batch and token dims really vary. Every tensor that depends on the
    graph inputs only through their shapes and feeds a real computation is evaluated with ONNX
    Runtime on ``feeds`` (examples of different batch and token counts); when all agree it becomes
    an initializer. A Reshape target that differs gets 0 ("copy the input dim") where it equals the
    input's dim in every example and -1 for one remaining varying entry; otherwise it stays.

    The folded graph must reproduce the original outputs on every feed and on ``check`` (another
    batch / token count), else the model is restored and OnnxExportError raised. Graphs with
    subgraphs (If, Loop) are left alone. Returns {"nodes_before", "nodes_after", "folded", "reshapes"}.
    """
    before = len(model.graph.node)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in model.graph.node for a in n.attribute):
        return {"nodes_before": before, "nodes_after": before, "folded": 0, "reshapes": 0}
    original = onnx.ModelProto()
    original.CopyFrom(model)
    g = _Graph(model)
    frontier = _shape_frontier(model, g)
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape" and n.input[1] in frontier]
    values, data_shapes = _probe_values(model, frontier, [r.input[0] for r in reshapes], feeds)
    folded = {}
    for name in frontier:
        vals = [v[name] for v in values]
        if vals[0].size <= FOLD_MAX_ELEMENTS and all(_same(v, vals[0]) for v in vals[1:]):
            folded[name] = vals[0]
    new_targets = {}
    for r in reshapes:
        if r.input[1] not in folded and attr(r, "allowzero", 0) == 0:
            target = _reshape_target([v[r.input[1]] for v in values], [d[r.input[0]] for d in data_shapes])
            if target is not None:
                new_targets[r.output[0]] = target
    _replace_with_constants(model, folded, new_targets)
    drop_unused(model)
    try:
        _check_same_outputs(original, model, [*feeds, check])
    except OnnxExportError:
        model.CopyFrom(original)
        raise
    return {"nodes_before": before, "nodes_after": len(model.graph.node), "folded": len(folded),
            "reshapes": len(new_targets)}


def _shape_frontier(model: onnx.ModelProto, g: "_Graph") -> list[str]:
    """Tensors computed from input *shapes* and constants only that a data computation (or the
    graph output) reads."""
    const = set(g.inits)
    data = {i.name for i in model.graph.input if i.name not in const}
    derived: set[str] = set()
    for node in model.graph.node:                          # nodes are in topological order
        ins = [i for i in node.input if i]
        if node.op_type in ("Shape", "Size"):
            derived.update(node.output)
        elif any(i in data for i in ins) or (not ins and node.op_type != "Constant"):
            data.update(node.output)                        # (inputless ops other than Constant: random)
        elif all(i in const for i in ins):
            const.update(node.output)
        else:
            derived.update(node.output)
    frontier = {i for n in model.graph.node if any(o in data for o in n.output) for i in n.input if i in derived}
    frontier.update(o.name for o in model.graph.output if o.name in derived)
    return sorted(frontier)


def _probe_values(model: onnx.ModelProto, names: Sequence[str], shape_of: Sequence[str],
                  feeds: Sequence[dict[str, np.ndarray]]) -> tuple[list[dict], list[dict]]:
    """Per feed: {name: value} of ``names`` and {name: shape} of the tensors ``shape_of``."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    shape_names = {t: f"{t}/probe_shape" for t in shape_of}
    probe.graph.node.extend(helper.make_node("Shape", [t], [s]) for t, s in shape_names.items())
    outs = list(names) + list(shape_names.values())
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in outs)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    values, shapes = [], []
    for f in feeds:
        got = dict(zip(outs, session.run(outs, f)))
        values.append({n: np.asarray(got[n]) for n in names})
        shapes.append({t: got[s] for t, s in shape_names.items()})
    return values, shapes


def _reshape_target(targets: list[np.ndarray], data_shapes: list[np.ndarray]) -> np.ndarray | None:
    """One Reshape target valid for every example: fixed entries, 0 = copy the input dim, one -1."""
    resolved = [_resolve_target(t, d) for t, d in zip(targets, data_shapes)]
    if any(r is None for r in resolved) or len({r.shape for r in resolved}) != 1:
        return None
    out = resolved[0].copy()
    for i in range(out.size):
        column = [int(r[i]) for r in resolved]
        if len(set(column)) == 1:
            continue
        copies = all(i < len(d) and int(d[i]) == c for d, c in zip(data_shapes, column))
        out[i] = 0 if copies else -1
    if np.count_nonzero(out == -1) > 1 or any(not np.array_equal(_resolve_target(out, d), r)
                                               for d, r in zip(data_shapes, resolved)):
        return None
    return out


def _resolve_target(target: np.ndarray, shape: np.ndarray) -> np.ndarray | None:
    """The concrete output shape of Reshape(data of ``shape``, ``target``) (allowzero = 0)."""
    if target.ndim != 1:
        return None
    out = np.array([int(shape[i]) if v == 0 and i < len(shape) else int(v) for i, v in enumerate(target)],
                   np.int64)
    known = int(np.prod(out[out != -1]))
    if np.count_nonzero(out == -1) == 1 and known > 0:
        out[out == -1] = int(np.prod(shape)) // known
    return out if (out >= 0).all() and int(np.prod(out)) == int(np.prod(shape)) else None


def _replace_with_constants(model: onnx.ModelProto, folded: dict[str, np.ndarray],
                            targets: dict[str, np.ndarray]) -> None:
    """Consumers of each folded tensor read an initializer; the Reshapes in ``targets`` (keyed by
    their output) read their new target."""
    for name, value in folded.items():
        if any(out.name == name for out in model.graph.output):
            raise OnnxExportError(f"graph output {name!r} is constant")
        const = f"{name}/folded"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), const))
        _rewire(model, name, const)
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.output[0] in targets:
            const = f"{node.output[0]}/target"
            model.graph.initializer.append(numpy_helper.from_array(targets[node.output[0]], const))
            node.input[1] = const


def _check_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]]) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sa, sb = (ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]) for m in (a, b))
    names = [o.name for o in sa.get_outputs()]
    for f in feeds:
        shapes = {k: v.shape for k, v in f.items()}
        try:
            got = sb.run(names, f)
        except Exception as e:  # onnxruntime's own error types
            raise OnnxExportError(f"folding shape arithmetic broke the graph for inputs {shapes}: "
                                  f"{str(e).strip().splitlines()[0]}") from None
        for name, x, y in zip(names, sa.run(names, f), got):
            if x.shape != y.shape or not np.allclose(x, y, rtol=1e-6, atol=1e-6):
                raise OnnxExportError(f"folding shape arithmetic changed output {name!r} for inputs {shapes}")
