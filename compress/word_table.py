"""The text graph's word-embedding table stored as per-row int8.

``quantize_rows`` / ``int8_gather_table``: a large embedding table stored as int8 rows with one
float scale per row (symmetric, max |row| / 127; kept as uint8 + 128 for TensorRT), read as
``Gather -> Cast -> Sub -> Mul(Gather(scale))``: the word embeddings are most of text.onnx (30522 x
384 floats = 47 MB of 55 MB in fiber-nano), and a per-row int8 table is exact for a model whose
table already holds the dequantised values, which is how the exporter uses it (parity stays an FP32
check). Used by ``compress.export`` and ``compress.repack``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from common import package as pkg
from compress.onnx_graph import OnnxExportError, attr

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
