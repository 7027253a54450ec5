"""torch -> ONNX: the package's two graphs from a ``FiberForGrounding``.

- ``export_graph``: the legacy TorchScript exporter (``dynamo=False``), the one exporter that traces
  modelopt's quantizers (the dynamo exporter fails on their data-dependent amax checks), under
  ``torch.inference_mode`` (needed: it turns the quantizers' amax buffers into constants).
- ``export_text`` / ``export_detector``: ``text_graph()`` / ``detector_graph()`` wrappers exported,
  rewritten (word table, Q/DQ clean-up, shape folding) and checked; ``ort_reference`` runs a graph
  with ONNX Runtime's graph optimisations off (the plain ONNX semantics, for reference outputs).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch

from common import package as pkg
from compress.onnx_graph import OnnxExportError, check_graph, count_ops, plain_session, save
from compress.qdq import clean_qdq
from compress.shape_folding import fold_shape_arithmetic, fold_shape_ifs, set_static_dims
from compress.word_table import int8_word_table
from fiber.deform import DEFORM_CONV_OPSET

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


def detector_opset(cfg) -> int:
    """ONNX opset of a config's detector graph: the DyHead's DeformConv needs 19; the light head's
    graphs stay at ``OPSET``."""
    return max(OPSET, DEFORM_CONV_OPSET) if cfg.head.kind == "dyhead" else OPSET


def export_detector(model, x: dict[str, np.ndarray], hidden: np.ndarray, path: Path,
                    qdq: bool, fold_shapes: bool = True) -> onnx.ModelProto:
    """detector.onnx: ``detect`` (Swin + fused layers + FPN + head + box decode); with ``qdq`` the
    model carries modelopt quantizers and the Q/DQ graph is cleaned (clean_qdq). Shape arithmetic
    fixed by the image size is folded into constants (fold_shape_arithmetic)."""
    args = (to_torch(x[pkg.IMAGE]), to_torch(hidden), to_torch(x[pkg.ATTENTION_MASK]))
    export_graph(model.detector_graph(), args, path, pkg.DETECTOR_INPUTS, pkg.DETECTOR_OUTPUTS,
                 DETECTOR_DYNAMIC_AXES, opset=detector_opset(model.cfg))
    with torch.inference_mode():
        shapes = {name: tuple(t.shape) for name, t in zip(pkg.DETECTOR_OUTPUTS, model.detect(*args))}
    graph = onnx.load(str(path))
    probes = detector_probes(x, hidden, max_batch=2 if x[pkg.IMAGE][0, 0].size > LARGE_CANVAS else 3)
    fold_shape_ifs(graph, probes[:2])
    if qdq:
        clean_qdq(graph)
        if not count_ops(graph, "QuantizeLinear"):
            raise OnnxExportError("the INT8 detector has no Q/DQ nodes (every quantizer is disabled)")
    if fold_shapes:   # off: the shape arithmetic stays computed (runtimes fold it when they load the graph)
        fold_shape_arithmetic(graph, probes[:-1], probes[-1])
    return _finish(graph, path, shapes)


LARGE_CANVAS = 800 * 1024   # pixels: above it the shape-folding probes stop at batch 2 (memory)


def detector_probes(x: dict[str, np.ndarray], hidden: np.ndarray, max_batch: int = 3) -> list[dict[str, np.ndarray]]:
    """Detector inputs of different batch and token counts: the example (batch 1), then batch 2 /
    +5 tokens, batch 3 / +2 tokens and (the last, for checks) batch 2 / +9 tokens; added tokens are
    padding. ``max_batch=2`` (large canvases: FIBER-B at 800x1344 needs ~4 GB of activations per
    image in an optimisations-off session) makes the third batch 1 / +2 tokens."""
    one = {pkg.IMAGE: x[pkg.IMAGE], pkg.TEXT_HIDDEN: hidden, pkg.ATTENTION_MASK: x[pkg.ATTENTION_MASK]}
    out = [one]
    third = (3, 2) if max_batch >= 3 else (1, 2)
    for batch, extra in ((2, 5), third, (2, 9)):
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
    session = plain_session(path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))
