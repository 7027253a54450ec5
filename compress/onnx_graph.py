"""ONNX graph plumbing shared by the exporter's graph rewrites: checking, tensor specs, op counts,
producer/consumer lookup, rewiring and dead-node removal, and a plain ONNX Runtime session.
Torch-free.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT64: "int64",
           TensorProto.INT32: "int32", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8",
           TensorProto.BOOL: "bool"}


class OnnxExportError(RuntimeError):
    """An exported graph that fails the ONNX checker or has an unexpected interface."""


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


def save(model: onnx.ModelProto, path: str | Path) -> None:
    """Save one self-contained ONNX file (packages stay far below protobuf's 2 GB)."""
    onnx.save_model(model, str(path))


class GraphIndex:
    """Producer/consumer maps and constant lookup over one ONNX graph (stale after edits: rebuild)."""

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


def same(a: np.ndarray | None, b: np.ndarray) -> bool:
    return a is not None and a.dtype == b.dtype and a.shape == b.shape and bool(np.all(a == b))


class Rewirer:
    """``rewire(old, new)``: every consumer of tensor ``old`` reads ``new`` instead (a graph output
    cannot be rewired). The consumer index is built once, so a rewrite that rewires hundreds of
    tensors costs one pass over the graph, not one per tensor (the golden DyHead INT8 export rewires 840).
    Nodes added after it was built are not seen; a node input changed behind its back is skipped.
    """

    def __init__(self, model: onnx.ModelProto):
        self.consumers: dict[str, list[tuple[Any, int]]] = defaultdict(list)
        for node in model.graph.node:
            for k, name in enumerate(node.input):
                self.consumers[name].append((node, k))
        self.outputs = {o.name for o in model.graph.output}

    def __call__(self, old: str, new: str) -> None:
        if old in self.outputs:
            raise OnnxExportError(f"cannot rewire graph output {old!r}")
        moved = [(node, k) for node, k in self.consumers.pop(old, []) if node.input[k] == old]
        for node, k in moved:
            node.input[k] = new
        self.consumers[new].extend(moved)


def remove_nodes(model: onnx.ModelProto, first_outputs: set[str]) -> None:
    """Remove the nodes whose first output is in ``first_outputs`` (tensor names are unique)."""
    keep = [n for n in model.graph.node if n.output[0] not in first_outputs]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def drop_unused(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nobody reads, then unused initializers. One pass from the dead
    nodes back through their inputs (a chain of N dead nodes costs one walk, not N sweeps)."""
    nodes = list(model.graph.node)
    reads: dict[str, int] = defaultdict(int)
    for node in nodes:
        for name in node.input:
            reads[name] += 1
    for out in model.graph.output:
        reads[out.name] += 1
    producer = {out: k for k, node in enumerate(nodes) for out in node.output}
    dead: set[int] = set()
    todo = [k for k, node in enumerate(nodes) if not any(reads[o] for o in node.output)]
    while todo:
        k = todo.pop()
        if k in dead:
            continue
        dead.add(k)
        for name in nodes[k].input:
            reads[name] -= 1
            p = producer.get(name)
            if reads[name] == 0 and p is not None and p not in dead and not any(reads[o] for o in nodes[p].output):
                todo.append(p)
    if dead:
        remove_nodes(model, {nodes[k].output[0] for k in dead})
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def plain_session(model: onnx.ModelProto | str | Path):
    """An ONNX Runtime CPU session with graph optimisations off (plain ONNX semantics)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    what = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(what, so, providers=["CPUExecutionProvider"])
