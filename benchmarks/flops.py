"""FLOPs per stage of a model package, counted from its ONNX graphs (torch-free).

    python -m benchmarks.flops --package models/fiber-nano [--tokens 16] [--json OUT]

A FLOP here is one multiply or one add of a multiply-accumulate: FLOPs = 2 x MACs, counted on the
ops that do the work (elementwise ops, softmax, norms are left out, as ``torch.utils.flop_counter``
does):

    MatMul, MatMulInteger, QLinearMatMul, FusedMatMul,     MACs = numel(output) x K (K: A's last dim)
      MatMulIntegerToFloat, DynamicQuantizeMatMul
    Gemm                                                   MACs = M x N x K
    Conv, ConvInteger, QLinearConv                         MACs = numel(output) x (C_in / group) x prod(kernel)
    ConvTranspose                                          MACs = numel(input) x (C_out / group) x prod(kernel)
    Einsum                                                 MACs = product of the sizes of all its indices

Shapes come from ONNX shape inference with the graph's symbolic dimensions fixed (batch 1, the
given text length); where inference cannot resolve a shape (the reshapes of window attention),
one ONNX Runtime run with those tensors exposed as outputs gives the exact ones.

The detector is split by the exporter's node names (``torch.onnx.export`` scopes):
``/patch_embed``, ``/blocks*``, ``/downsample*`` (Swin) before the fused blocks = "image
backbone"; the last K Swin blocks (K = fusion.num_fused_layers, counted in node order by their
``mlp/fc2``) = "fused image blocks"; ``/layer.*`` (the text layers inside detector.onnx, all fused)
= "fused text layers"; the ``i2t`` / ``t2i`` projections and attention products = "cross-attention";
``/fpn``, ``/head`` = "head"; anything else (e.g. a graph from another exporter) = "other".
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx
from onnx import shape_inference

from common import package as pkg
from fiber.flops import giga

# op type -> (index of operand A (the activations), index of operand B (the weights / 2nd operand))
MATMUL_OPS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "FusedMatMul": (0, 1),
              "MatMulIntegerToFloat": (0, 1), "DynamicQuantizeMatMul": (0, 1)}
# DeformConv (the DyHead's modulated deformable conv, opset 19): counted as the conv it is (the
# multiply-accumulates with W); its bilinear sampling (4 taps x C x K per output position) is not.
CONV_OPS = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3), "ConvTranspose": (0, 1),
            "DeformConv": (0, 1)}
COUNTED_OPS = frozenset(MATMUL_OPS) | frozenset(CONV_OPS) | {"Gemm", "Einsum"}

GROUPS = ("image backbone", "fused image blocks", "fused text layers", "cross-attention", "head", "other")
FUSED_GROUPS = ("fused image blocks", "fused text layers", "cross-attention")
_FC2 = re.compile(r"^/blocks[^/]*/mlp/fc2[^/]*/")
_IMAGE_SCOPES = ("patch_embed", "blocks", "downsample", "norm")


class FlopsError(ValueError):
    """A graph whose FLOPs cannot be counted (unreadable, unknown dims, a shape that stays unknown)."""


@dataclass(frozen=True)
class NodeFlops:
    name: str
    op_type: str
    macs: int
    group: str


@dataclass(frozen=True)
class GraphFlops:
    """The count of one graph at fixed input dims. flops = 2 x macs."""

    file: str
    dims: dict[str, int]                       # the symbolic dims as fixed for the count
    nodes: tuple[NodeFlops, ...] = field(repr=False)
    shapes_from: str                           # "onnx shape inference" (+ "onnxruntime run")

    @property
    def macs(self) -> int:
        return sum(n.macs for n in self.nodes)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def groups(self) -> dict[str, int]:
        """FLOPs per group, in GROUPS order, groups with no node left out."""
        out = {g: 0 for g in GROUPS}
        for n in self.nodes:
            out[n.group] += 2 * n.macs
        return {g: v for g, v in out.items() if v or any(n.group == g for n in self.nodes)}

    def by_op(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.op_type] = out.get(n.op_type, 0) + 2 * n.macs
        return out

    def to_json(self) -> dict[str, Any]:
        groups = self.groups()
        fused = sum(groups.get(g, 0) for g in FUSED_GROUPS)
        return {"file": self.file, "dims": self.dims, "flops": self.flops, "gflops": giga(self.flops),
                "groups_gflops": {g: giga(v) for g, v in groups.items()},
                "fused_layers_gflops": giga(fused),
                "by_op_gflops": {k: giga(v) for k, v in self.by_op().items()},
                "counted_nodes": len(self.nodes), "shapes_from": self.shapes_from}


# ----------------------------------------------------------------------------- shapes

def _fix_dims(model: onnx.ModelProto, dims: Mapping[str, int]) -> dict[str, int]:
    """Set every symbolic input dim from ``dims`` (in place); returns the dims used."""
    used = {}
    for vi in model.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                continue
            if d.dim_param not in dims:
                raise FlopsError(f"input {vi.name!r} has a symbolic dim {d.dim_param!r}; give its size "
                                 f"(known: {sorted(dims)})")
            used[d.dim_param] = int(dims[d.dim_param])
            d.dim_value = used[d.dim_param]
    return used


def _known_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Fully known shapes: initializers, Constant outputs and inferred value infos."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    shapes[n.output[0]] = tuple(a.t.dims)
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes.setdefault(vi.name, tuple(d.dim_value for d in t.shape.dim))
    return shapes


_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
             onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
             onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.BOOL: np.bool_}


def _run_shapes(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Exact shapes of ``names`` from one ONNX Runtime run on ones-valued inputs of the fixed dims."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    names = list(dict.fromkeys(names))
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    feeds = {}
    for vi in m.graph.input:
        t = vi.type.tensor_type
        shape = tuple(d.dim_value for d in t.shape.dim)
        feeds[vi.name] = np.ones(shape, _NP_TYPES.get(t.elem_type, np.float32))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        values = sess.run(names, feeds)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FlopsError(f"shapes not inferable and onnxruntime cannot run the graph: {first}") from None
    return {n: tuple(v.shape) for n, v in zip(names, values)}


def _operands(node: onnx.NodeProto) -> list[str]:
    """The tensors whose shapes the MAC count of ``node`` needs."""
    if node.op_type in MATMUL_OPS:
        a, b = MATMUL_OPS[node.op_type]
        return [node.input[a], node.input[b], node.output[0]]
    if node.op_type in CONV_OPS:
        a, w = CONV_OPS[node.op_type]
        return [node.input[a], node.input[w], node.output[0]]
    if node.op_type == "Gemm":
        return [node.input[0], node.input[1]]
    return [*node.input]  # Einsum


# ----------------------------------------------------------------------------- MACs per op

def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of one counted node, given the shapes of its operands."""
    op = node.op_type
    if op in MATMUL_OPS:
        a, _, out = (shapes[n] for n in _operands(node))
        return math.prod(out) * a[-1]
    if op == "ConvTranspose":
        x, w, _ = (shapes[n] for n in _operands(node))
        return math.prod(x) * math.prod(w[1:])           # W: [C_in, C_out / g, k...]
    if op in CONV_OPS:
        _, w, out = (shapes[n] for n in _operands(node))
        return math.prod(out) * math.prod(w[1:])         # W: [C_out, C_in / g, k...]
    if op == "Gemm":
        a, b = (shapes[n] for n in _operands(node))
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else a
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return m * n * k
    if op == "Einsum":
        return _einsum_macs(_attr(node, "equation", b"").decode(), [shapes[n] for n in node.input])
    raise FlopsError(f"{node.name or node.op_type}: op {op} is not counted")


def _einsum_macs(equation: str, shapes: list[tuple[int, ...]]) -> int:
    """Product of every index's size (one MAC per point of the full index space)."""
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs, shapes):
        if "..." in term:
            raise FlopsError(f"einsum {equation!r}: ellipsis is not supported")
        for letter, size in zip(term, shape):
            sizes[letter] = max(sizes.get(letter, 1), size)
    return math.prod(sizes.values())


# ----------------------------------------------------------------------------- groups

def _scope(name: str) -> str:
    parts = name.split("/")
    return parts[1] if name.startswith("/") and len(parts) > 2 else ""


def fiber_groups(nodes: list[onnx.NodeProto], image_blocks: int | None, fused: int | None) -> list[str]:
    """The group of each counted node of a FIBER detector graph (see the module docstring).

    nodes: the counted nodes in graph (execution) order; image_blocks: sum of the Swin depths;
    fused: K. Without both, or when the graph's ``mlp/fc2`` count is not ``image_blocks``, the
    fused image blocks stay in "image backbone".
    """
    fc2_seen = sum(1 for n in nodes if _FC2.match(n.name))
    split = image_blocks is not None and fused is not None and fc2_seen == image_blocks
    first_fused = (image_blocks - fused) if split else None
    out, block = [], 0
    for n in nodes:
        scope = _scope(n.name)
        if scope.startswith(("fpn", "head")):
            group = "head"
        elif re.search(r"i2t|t2i", n.name) or (re.fullmatch(r"blocks[^/]*", scope)
                                                 and n.name.count("/") == 2 and n.op_type in MATMUL_OPS):
            group = "cross-attention"   # named i2t/t2i layers, and the i2t attention products
        elif scope.startswith("layer."):
            group = "fused text layers"
        elif scope.startswith(_IMAGE_SCOPES):
            group = "fused image blocks" if first_fused is not None and block >= first_fused else "image backbone"
        else:
            group = "other"
        out.append(group)
        if _FC2.match(n.name):
            block += 1
    return out


# ----------------------------------------------------------------------------- graphs and packages

def count_graph(model: onnx.ModelProto | str | Path, dims: Mapping[str, int],
                groups: Callable[[list[onnx.NodeProto]], list[str]] | None = None,
                file: str | None = None) -> GraphFlops:
    """Count the FLOPs of ``model`` with its symbolic input dims set from ``dims``.

    groups: maps the counted nodes (graph order) to a group name each (default: "other").
    Raises FlopsError.
    """
    if not isinstance(model, onnx.ModelProto):
        file = file or Path(model).name
        try:
            model = onnx.load(str(model))
        except Exception as e:
            raise FlopsError(f"{model}: not a readable ONNX file: {e}") from None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    used = _fix_dims(m, dims)
    try:
        m = shape_inference.infer_shapes(m, data_prop=True)
        via = "onnx shape inference"
    except Exception:  # inference is best effort: onnxruntime fills in below
        via = "onnxruntime run"
    shapes = _known_shapes(m)
    counted = [n for n in m.graph.node if n.op_type in COUNTED_OPS]
    missing = [t for n in counted for t in _operands(n) if t not in shapes]
    if missing:
        shapes.update(_run_shapes(m, missing))
        via = via if via == "onnxruntime run" else via + " + onnxruntime run"
    names = groups(counted) if groups else ["other"] * len(counted)
    nodes = tuple(NodeFlops(n.name, n.op_type, node_macs(n, shapes), g) for n, g in zip(counted, names))
    return GraphFlops(file or m.graph.name, used, nodes, via)


def detector_grouper(manifest: Mapping[str, Any]) -> Callable[[list[onnx.NodeProto]], list[str]]:
    """``fiber_groups`` with the Swin depths and K from the package's model config (if it has them)."""
    cfg = (manifest.get("model") or {}).get("config") or {}
    depths = (cfg.get("swin") or {}).get("depths")
    k = (cfg.get("fusion") or {}).get("num_fused_layers")
    blocks = int(sum(depths)) if isinstance(depths, list) else None
    return lambda nodes: fiber_groups(nodes, blocks, k if isinstance(k, int) else None)


def default_tokens(manifest: Mapping[str, Any]) -> int:
    """The first text bucket of the package: what a short prompt is padded to."""
    buckets = (manifest.get("text") or {}).get("buckets") or pkg.DEFAULT_BUCKETS
    return int(buckets[0])


def package_flops(package: str | Path, tokens: int | None = None, verify: bool = True
                  ) -> dict[str, GraphFlops]:
    """``{"text": ..., "detector": ...}`` for a model package at batch 1 and ``tokens`` text tokens.

    Counts detector.onnx (the file TensorRT builds; a CPU variant does the same work). Raises
    common.package.PackageError for a package that does not verify, FlopsError otherwise.
    """
    package = Path(package)
    manifest = pkg.load_package_manifest(package, verify=verify)
    tokens = tokens or default_tokens(manifest)
    dims = {"batch": 1, "tokens": tokens}
    graphs = manifest["graphs"]
    return {
        "text": count_graph(package / graphs["text"]["file"], dims),
        "detector": count_graph(package / graphs["detector"]["file"], dims, detector_grouper(manifest)),
    }


# ----------------------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=__doc__.split("\n")[0])
    p.add_argument("--package", required=True, action="append", help="model package (repeatable)")
    p.add_argument("--tokens", type=int, default=None, help="text length T (default: the first bucket)")
    p.add_argument("--json", default=None, help="also write the counts here (atomically)")
    return p


def main(args: argparse.Namespace) -> int:
    from common.atomic import atomic_write_json

    if args.tokens is not None and args.tokens < 1:
        print("benchmarks.flops: --tokens must be >= 1", file=sys.stderr)
        return 2
    out = {}
    for package in args.package:
        try:
            counts = package_flops(package, args.tokens)
        except (pkg.PackageError, FlopsError) as e:
            print(f"benchmarks.flops: {package}: {e}", file=sys.stderr)
            return 2
        out[package] = {g: c.to_json() for g, c in counts.items()}
        for graph, c in counts.items():
            print(f"{package} {graph:8s} {c.flops / 1e9:9.4f} GFLOP  (dims {c.dims}, shapes: {c.shapes_from})")
            if graph == "detector":
                for group, v in c.groups().items():
                    print(f"    {group:20s} {v / 1e9:9.4f} GFLOP  {100 * v / max(c.flops, 1):5.1f}%")
    if args.json:
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
