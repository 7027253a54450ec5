"""Build TensorRT / TensorRT-RTX engines from a model package (the TensorRT Python builder API).

    python -m engines.build --package models/fiber-nano-int8 --backend tensorrt-rtx \
        --precision auto --out runs/engines/fiber-nano-int8
    python -m engines.build --package models/fiber-nano-int8 --backend openvino --out runs/engines/nano-ov

``--backend onnxruntime`` (``ort``) / ``openvino`` build CPU engines instead (engines/cpu_engine.py:
ONNX Runtime's optimised models, OpenVINO IR plus its compiled-model cache), with the same
engine.json and refusal rules; the rest of this docstring is about TensorRT.

Writes, atomically (a temp folder renamed at the end; nothing is left behind on failure):
``text.plan``, ``detector.plan``, ``timing.cache`` (TensorRT only) and ``engine.json``
(engines/manifest.py). Every network is strongly typed, so the ONNX types decide the precision:

- int8: the package's explicit Q/DQ graphs are built as they are (INT8 where the exporter put
  Q/DQ, the package's float type elsewhere); a graph of the package without Q/DQ is built as fp16.
- fp16: the FP32 ONNX is rewritten to FP16 first (`to_fp16`), keeping LayerNormalization, Softmax
  and the other ops in `FP32_OPS` (plus ``--keep-fp32``) in FP32 with Casts around them. This one
  path serves TensorRT 10 and 11 (which dropped the FP16 builder flag) and TensorRT-RTX
  (strongly typed only). Float constants beyond the FP16 range (the -3.4e38 attention-mask fill)
  become -1e4, which still zeroes a masked softmax weight.
- fp32: the FP32 ONNX as it is.  fp8: needs an FP8 Q/DQ package and compute capability >= 8.9.
- auto: int8 (fp8) for a Q/DQ package, fp16 otherwise.

One optimisation profile per text-length bucket: tokens in (previous bucket, bucket], opt = max =
the bucket, batch 1 (the runtime pads prompts to a bucket).

Deformable convolutions (ONNX ``DeformConv``, the DyHead's): ``--deform-conv auto`` uses TensorRT's
``ModulatedDeformConv2d`` plugin when libnvinfer_plugin has it ("plugin", FP32/FP16) and otherwise,
and always on TensorRT-RTX (which has no such plugin), rewrites them to GridSample + Conv before
parsing ("gridsample", engines/deform.py; its sampling coordinates stay FP32 in fp16 builds). Either
way they run in the graph's float type, never INT8. engine.json records the choice as
``deform_conv`` (None when the package has none).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from common import package as pkg
from common.atomic import atomic_dir, atomic_write_bytes, atomic_write_json
from engines import cuda
from engines.errors import BackendUnavailable, BuildError, CudaError, EngineError
from engines.manifest import (
    ENGINE_FORMAT, ENGINE_FORMAT_VERSION, ENGINE_JSON, TensorSpec, graph_file, graph_specs,
    package_record, read_package,
)
from engines.cpu_engine import build_cpu_engine
from engines.deform import FP32_SCOPE, PLUGIN, deform_convs_in, lower_deform_conv
from engines.trt import INSTALL_HINTS, TensorRT, installed_backends, parse_cc

CPU_CHOICES = ("onnxruntime", "ort", "openvino")

PRECISIONS = ("auto", "int8", "fp16", "fp32", "fp8")
DEFORM_CHOICES = ("auto", "plugin", "gridsample")  # how DeformConv nodes are built (see the docstring)
FP32_OPS = (  # kept in FP32 by to_fp16: the known FP16 failures of Swin/BERT, and ops with fp32-only inputs
    "LayerNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSumSquare", "Pow", "Sqrt",
    "Reciprocal", "Resize", "Upsample", "Range", "CumSum", "TopK", "NonMaxSuppression", "RoiAlign",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
)
FP16_MAX, FP16_CLAMP = 65504.0, 1e4
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class BuildConfig:
    package: str                               # model package folder
    out: str | None = None                     # engine folder; None = runs/engines/<name>-<backend>-<precision>
    backend: str = "auto"                      # "tensorrt" | "tensorrt-rtx" | "auto" (whichever is installed)
    precision: str = "auto"                    # one of PRECISIONS
    workspace_mb: int | None = None            # builder workspace limit; None = TensorRT's default
    timing_cache: str | None = None            # timing cache to start from and update (TensorRT only)
    buckets: tuple[int, ...] | None = None     # text-length buckets; None = the package's
    target_cc: tuple[str, ...] | None = None   # TensorRT-RTX targets ("8.6", ..., or "current"); None = default
    keep_fp32: tuple[str, ...] = ()            # extra ONNX op types to keep in FP32 in fp16 builds
    opt_level: int | None = None               # builder optimisation level (0-5); None = default (3)
    device: int = 0                            # CUDA device to build for (TensorRT)
    deform_conv: str = "auto"                  # DeformConv: "auto" | "plugin" | "gridsample" (DEFORM_CHOICES)
    overwrite: bool = False                    # replace an existing engine folder
    fp32_ops: tuple[str, ...] = field(default=FP32_OPS, repr=False)


# ----------------------------------------------------------------------------- FP16 rewrite

def _to_half(array):
    """float32 -> float16; values beyond the FP16 range (e.g. finfo(float32).min mask fills) -> +-1e4."""
    import numpy as np

    a = np.asarray(array, dtype=np.float32)
    a = np.where(np.abs(a) > FP16_MAX, np.sign(a) * FP16_CLAMP, a)
    return a.astype(np.float16)


def _retype_attributes(node) -> None:
    """An FP16-region node: Cast(to=float) -> float16; float Constant/ConstantOfShape values -> float16."""
    from onnx import AttributeProto, TensorProto, numpy_helper

    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH or attr.type == AttributeProto.GRAPHS:
            raise BuildError(f"fp16: node {node.name!r} ({node.op_type}) has a subgraph; build with --precision fp32")
        if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16
        elif attr.name == "value" and attr.type == AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(numpy_helper.from_array(_to_half(numpy_helper.to_array(attr.t)), attr.t.name))
        elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
            values = [attr.f] if attr.name == "value_float" else list(attr.floats)
            array = _to_half(values if attr.name == "value_floats" else values[0])
            attr.Clear()
            attr.name, attr.type = "value", AttributeProto.TENSOR
            attr.t.CopyFrom(numpy_helper.from_array(array))


def to_fp16(model, fp32_ops: tuple[str, ...] = FP32_OPS):
    """Rewrite an FP32 ONNX model to FP16, keeping ``fp32_ops`` nodes, nodes named under
    ``engines.deform.FP32_SCOPE`` (deformable-conv sampling coordinates) and graph inputs/outputs FP32.

    Every float tensor gets an fp32 and/or fp16 version on demand: float initializers are
    converted, other tensors get a Cast where a node of the other precision consumes them.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    g = shape_inference.infer_shapes(model).graph
    is_float = {vi.name: vi.type.tensor_type.elem_type == TensorProto.FLOAT
                for vi in [*g.input, *g.value_info, *g.output]}
    inits = {i.name: i for i in g.initializer}
    is_float.update({n: i.data_type == TensorProto.FLOAT for n, i in inits.items()})
    outputs = {o.name for o in g.output}
    versions = {n: {"fp32": n} for n, f in is_float.items() if f and (n in inits or n in {i.name for i in g.input})}
    nodes, half_inits = [], []

    def get(name: str, want: str) -> str:
        v = versions[name]
        if want not in v:
            new = f"{name}__{want}"
            if name in inits:
                half_inits.append(numpy_helper.from_array(_to_half(numpy_helper.to_array(inits[name])), new))
            else:
                to = TensorProto.FLOAT16 if want == "fp16" else TensorProto.FLOAT
                nodes.append(helper.make_node("Cast", [next(iter(v.values()))], [new], name=f"{new}_cast", to=to))
            v[want] = new
        return v[want]

    for node in g.node:
        keep = node.op_type in fp32_ops or node.domain not in ("", "ai.onnx") or node.name.startswith(FP32_SCOPE)
        mode = "fp32" if keep else "fp16"
        n = onnx.NodeProto()
        n.CopyFrom(node)
        n.input[:] = [get(x, mode) if x in versions else x for x in node.input]
        if mode == "fp16":
            _retype_attributes(n)
        for i, out in enumerate(node.output):
            if out not in is_float:
                raise BuildError(f"fp16: cannot infer the type of {out!r} (node {node.name!r}, {node.op_type}); "
                                 f"build with --precision fp32")
            if is_float[out] and mode == "fp16" and out in outputs:
                n.output[i] = f"{out}__fp16"
        nodes.append(n)
        for i, out in enumerate(node.output):
            if not is_float[out]:
                continue
            versions[out] = {mode: n.output[i]}
            if n.output[i] != out:  # an FP16 graph output: Cast back to its FP32 name
                nodes.append(helper.make_node("Cast", [n.output[i]], [out], name=f"{out}_to_fp32",
                                              to=TensorProto.FLOAT))
                versions[out]["fp32"] = out
    used = {x for n in nodes for x in n.input}
    initializers = [i for i in g.initializer if i.name in used] + half_inits
    graph = helper.make_graph(nodes, g.name, list(g.input), list(g.output), initializers)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="fiber-edge engines.to_fp16")
    out.ir_version = model.ir_version
    return out


# ----------------------------------------------------------------------------- building one graph

def _parse(rt: TensorRT, builder, path: Path, model_bytes: bytes | None):
    network = rt.strongly_typed_network(builder)
    parser = rt.trt.OnnxParser(network, rt.logger)
    ok = parser.parse(model_bytes, str(path)) if model_bytes is not None else parser.parse_from_file(str(path))
    if not ok:
        errors = [f"node {e.node()} {e.node_name()!r} ({e.node_operator()}): {e.desc()}"
                  for e in (parser.get_error(i) for i in range(parser.num_errors))]
        errors = errors or rt.errors() or ["unknown parser error"]
        raise BuildError(f"{path}: the ONNX parser of {rt.backend} {rt.version} failed:\n  " + "\n  ".join(errors))
    return network, parser


def quantization_of(rt: TensorRT, network) -> str | None:
    """"int8" / "fp8" / "int4" / "fp4" when the parsed network has explicit Q/DQ, else None."""
    kinds = set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == rt.trt.LayerType.QUANTIZE:
            kinds.add(layer.get_output(0).dtype)
        elif layer.type == rt.trt.LayerType.DEQUANTIZE:
            kinds.add(layer.get_input(0).dtype)
    names = {rt.trt.DataType.INT8: "int8", rt.trt.DataType.FP8: "fp8", rt.trt.DataType.INT4: "int4",
             rt.trt.DataType.FP4: "fp4"}
    found = sorted(names.get(k, str(k)) for k in kinds)
    return "fp8" if "fp8" in found else (found[0] if found else None)


def profiles_for(specs: list[TensorSpec], buckets: tuple[int, ...]) -> list[dict[str, Any]]:
    """One profile per bucket: "tokens" in (previous bucket, bucket], opt = max = bucket; batch 1."""
    if not any("tokens" in s.shape for s in specs):
        buckets = (0,)
    profiles, lo = [], 1
    for bucket in sorted(buckets):
        shapes = {}
        for s in specs:
            ranges = [_dim_range(s.name, dim, lo, bucket) for dim in s.shape]
            lows, highs = [r[0] for r in ranges], [r[1] for r in ranges]
            shapes[s.name] = {"min": lows, "opt": highs, "max": highs}
        profiles.append({"tokens": [lo, bucket] if bucket else None, "shapes": shapes})
        lo = bucket + 1
    return profiles


def _dim_range(name: str, dim: int | str, lo: int, bucket: int) -> tuple[int, int]:
    if isinstance(dim, int):
        return dim, dim
    if dim == "tokens":
        return lo, bucket
    if dim == "batch":
        return 1, 1
    raise BuildError(f"input {name!r} has dynamic dimension {dim!r}; only 'batch' and 'tokens' can be bounded "
                     f"by the build")


def _configure(rt: TensorRT, builder, cfg: BuildConfig, profiles, timing_cache):
    config = builder.create_builder_config()
    if cfg.workspace_mb:
        config.set_memory_pool_limit(rt.trt.MemoryPoolType.WORKSPACE, cfg.workspace_mb << 20)
    if cfg.opt_level is not None:
        config.builder_optimization_level = cfg.opt_level
    if timing_cache is not None:
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    targets = rt.set_targets(config, cfg.target_cc)
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, s in p["shapes"].items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    return config, targets


def _build_plan(rt: TensorRT, builder, network, config, path: Path) -> bytes:
    rt.errors()
    try:
        plan = builder.build_serialized_network(network, config)
    except (RuntimeError, MemoryError) as e:
        plan, error = None, str(e)
    else:
        error = ""
    if plan is None:
        errors = "; ".join(rt.errors()) or error or "no error message"
        hint = " (out of memory? try a smaller --workspace, or free the GPU)" if "memory" in errors.lower() else ""
        raise BuildError(f"{path}: {rt.backend} {rt.version} could not build an engine: {errors}{hint}")
    return bytes(plan)


# ----------------------------------------------------------------------------- precision plan

def graph_precision(requested: str, quant: str | None, package: str, path: Path) -> str:
    """The precision one graph is built in, given the request and the graph's Q/DQ type."""
    if requested == "auto":
        return quant or "fp16"
    if quant and requested != quant:
        raise BuildError(f"{path} is quantised ({quant.upper()} Q/DQ): package {package} builds with --precision "
                         f"{quant} or auto; for {requested} build the FP32 package")
    return quant or ("fp16" if requested in ("int8", "fp8") else requested)


def _check_request(requested: str, quants: Mapping[str, str | None], package: str,
                   device: cuda.DeviceInfo | None, targets: tuple[str, ...] | None, rt: TensorRT) -> None:
    """Refuse a request the package or the target hardware cannot serve (before anything is built)."""
    other = sorted({q for q in quants.values() if q not in (None, "int8", "fp8")})
    if other:
        raise BuildError(f"package {package} has {', '.join(other).upper()} Q/DQ; engines.build supports INT8 and FP8")
    if requested in ("int8", "fp8") and requested not in quants.values():
        example = " (e.g. models/fiber-nano-int8)" if requested == "int8" else ""
        raise BuildError(f"--precision {requested}: package {package} has no {requested.upper()} Q/DQ nodes; "
                         f"{requested.upper()} needs a package quantised with explicit Q/DQ{example}")
    if requested == "fp8" or "fp8" in quants.values():
        ccs = [device.compute_capability] if device else [parse_cc(t) for t in targets or () if t != "current"]
        if not ccs and rt.is_rtx:
            raise BuildError("fp8 needs compute capability >= 8.9, and TensorRT-RTX's default targets include "
                             "8.0/8.6: pass --target-cc 8.9,12.0")
        low = [f"{a}.{b}" for a, b in ccs if (a, b) < (8, 9)]
        if low:
            where = f"this device ({device.name})" if device else "--target-cc"
            raise BuildError(f"fp8 needs compute capability >= 8.9; {where} has {', '.join(low)} (e.g. Jetson Orin "
                             f"is 8.7): build the INT8 or FP16 engine instead")


# ----------------------------------------------------------------------------- deformable convolutions

def deform_path(rt: TensorRT, requested: str, nodes: int, path: Path) -> str | None:
    """How ``nodes`` DeformConv nodes of ``path`` are built: "plugin" | "gridsample" (None: no nodes)."""
    if requested not in DEFORM_CHOICES:
        raise BuildError(f"--deform-conv {requested!r} is not one of {list(DEFORM_CHOICES)}")
    if nodes == 0:
        return None
    if requested == "gridsample":
        return "gridsample"
    if rt.is_rtx:
        if requested == "plugin":
            raise BuildError(f"{path}: --deform-conv plugin: TensorRT-RTX has no {PLUGIN} plugin for its "
                             f"{nodes} DeformConv nodes; use --deform-conv auto (the GridSample rewrite)")
        return "gridsample"
    if rt.has_plugin(PLUGIN):  # also loads libnvinfer_plugin for the parser
        return "plugin"
    if requested == "plugin":
        raise BuildError(f"{path} has {nodes} DeformConv nodes and TensorRT {rt.version}'s libnvinfer_plugin has "
                         f"no {PLUGIN} plugin: install TensorRT >= 10.1 with its plugin library "
                         f"(libnvinfer_plugin), or build with --deform-conv auto / gridsample (the GridSample rewrite)")
    return "gridsample"


def _load_onnx(path: Path):
    try:
        import onnx
    except ImportError:
        raise BackendUnavailable("fp16 builds and DyHead packages rewrite the ONNX with the onnx package: "
                                 "pip install onnx") from None
    try:
        return onnx.load(str(path))
    except Exception as e:
        raise BuildError(f"{path}: onnx cannot read it: {e}") from None


# ----------------------------------------------------------------------------- the whole build

def _backend(name: str) -> TensorRT:
    if name != "auto":
        return TensorRT(name)
    found = installed_backends()
    if not found:
        raise BackendUnavailable(INSTALL_HINTS["tensorrt"])
    return TensorRT(found[0])


def _device(rt: TensorRT, cfg: BuildConfig) -> cuda.DeviceInfo | None:
    try:
        cuda.set_device(cfg.device)
        return cuda.device_info(cfg.device)
    except CudaError as e:
        if not rt.is_rtx or cfg.target_cc == ("current",):
            raise BuildError(f"{rt.backend} builds for the GPU it runs on, and there is none here ({e}); on a "
                             f"CPU-only host use --backend tensorrt-rtx (ahead-of-time build)") from None
        return None


def overall_precision(precisions: Mapping[str, str]) -> str:
    """One word for engine.json and folder names: int8 if any graph is int8, else the widest float type."""
    values = set(precisions.values())
    return "int8" if "int8" in values else max(values, key=["fp8", "fp16", "fp32"].index)


def default_out(package: Path, manifest: Mapping[str, Any], backend: str, precision: str) -> Path:
    return Path("runs") / "engines" / f"{manifest.get('name', package.name)}-{backend}-{precision}"


def build_engines(cfg: BuildConfig) -> Path:
    """Build both graphs of ``cfg.package``; returns the engine folder. Raises EngineError subclasses."""
    if cfg.precision not in PRECISIONS:
        raise BuildError(f"--precision {cfg.precision!r} is not one of {list(PRECISIONS)}")
    package = Path(cfg.package)
    manifest = read_package(package)
    rt = _backend(cfg.backend)
    device = _device(rt, cfg)
    buckets = tuple(cfg.buckets or pkg.TextSpec.from_manifest(manifest).buckets)
    started = time.time()
    builder = rt.trt.Builder(rt.logger)
    graphs, precisions, results, deform = {}, {}, {}, {}
    for graph in ("text", "detector"):
        path = graph_file(package, manifest, graph)
        nodes = deform_convs_in(path)
        deform[graph] = {"nodes": nodes, "path": deform_path(rt, cfg.deform_conv, nodes, path)}
        lowered = (lower_deform_conv(_load_onnx(path)).SerializeToString()
                   if deform[graph]["path"] == "gridsample" else None)
        network, parser = _parse(rt, builder, path, lowered)  # the parser owns the weights: keep it alive
        graphs[graph] = (path, network, parser, quantization_of(rt, network))
    _check_request(cfg.precision, {g: v[3] for g, v in graphs.items()}, str(package), device, cfg.target_cc, rt)
    for graph, (path, _, _, quant) in graphs.items():
        precisions[graph] = graph_precision(cfg.precision, quant, str(package), path)
    out = Path(cfg.out) if cfg.out else default_out(package, manifest, rt.backend, overall_precision(precisions))
    if out.exists() and not cfg.overwrite:
        raise BuildError(f"--out {out} already exists; pass --overwrite to replace it")
    timing_cache = _timing_cache(rt, cfg)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        for graph, (path, network, parser, quant) in graphs.items():
            precision = precisions[graph]
            if precision == "fp16":
                network, parser = _parse(rt, builder, path,
                                         _fp16_bytes(path, cfg, deform[graph]["path"] == "gridsample"))
            specs = graph_specs(manifest, graph)
            profiles = profiles_for(specs[0], buckets)
            config, targets = _configure(rt, builder, cfg, profiles, timing_cache)
            plan = _build_plan(rt, builder, network, config, path)
            atomic_write_bytes(tmp / f"{graph}.plan", plan)
            # deformable convs run in the graph's float type (fp16 or the package's fp32), never INT8/FP8
            results[graph] = {**_graph_record(graph, plan, precision, specs, profiles, config, rt),
                              "deform_conv": {**deform[graph], "precision": "fp16" if precision == "fp16" else "fp32"}
                              if deform[graph]["nodes"] else None}
        if timing_cache is not None:
            atomic_write_bytes(tmp / TIMING_CACHE, bytes(timing_cache.serialize()))
        record = _engine_record(cfg, rt, device, targets, manifest, package, out, buckets, results, started)
        atomic_write_json(tmp / ENGINE_JSON, record)
        _make_readable(tmp)
    if timing_cache is not None and cfg.timing_cache:
        atomic_write_bytes(cfg.timing_cache, (out / TIMING_CACHE).read_bytes())
    return out


def _make_readable(folder: Path) -> None:
    """Temp folders/files are created 0700/0600; an engine folder is meant to be shared (0755/0644)."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _fp16_bytes(path: Path, cfg: BuildConfig, lower: bool = False) -> bytes:
    """The FP16 rewrite of ``path`` (after the DeformConv -> GridSample rewrite when ``lower``)."""
    model = _load_onnx(path)
    if lower:
        model = lower_deform_conv(model)
    return to_fp16(model, tuple(cfg.fp32_ops) + tuple(cfg.keep_fp32)).SerializeToString()


def _timing_cache(rt: TensorRT, cfg: BuildConfig):
    if not rt.uses_timing_cache:
        return None
    path = Path(cfg.timing_cache) if cfg.timing_cache else None
    data = path.read_bytes() if path and path.is_file() else b""
    config = rt.trt.Builder(rt.logger).create_builder_config()
    cache = config.create_timing_cache(data)
    if cache is None:
        raise BuildError(f"--timing-cache {path}: {rt.backend} cannot read it (another TensorRT version?)")
    return cache


def _graph_record(graph, plan: bytes, precision, specs, profiles, config, rt: TensorRT) -> dict[str, Any]:
    flags = [name for name, flag in rt.trt.BuilderFlag.__members__.items() if config.get_flag(flag)]
    return {"plan": f"{graph}.plan", "sha256": hashlib.sha256(plan).hexdigest(), "bytes": len(plan),
            "precision": precision, "inputs": [s.to_dict() for s in specs[0]],
            "outputs": [s.to_dict() for s in specs[1]], "profiles": profiles, "flags": flags}


def _engine_record(cfg, rt, device, targets, manifest, package, out, buckets, results, started) -> dict[str, Any]:
    precisions = {g: r["precision"] for g, r in results.items()}
    overall = overall_precision(precisions)
    deform = sorted({r["deform_conv"]["path"] for r in results.values() if r.get("deform_conv")})
    return {
        "format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION,
        "backend": rt.backend, "tensorrt": {"module": rt.trt.__name__, "version": rt.version},
        "device": {"name": device.name if device else None, "compute_capability": device.sm if device else None,
                   "targets": targets if rt.is_rtx else [device.sm]},
        "precision": overall, "requested_precision": cfg.precision, "graph_precision": precisions,
        "deform_conv": deform[0] if len(deform) == 1 else (deform or None),
        "package": package_record(package, manifest, out),
        "graphs": results, "buckets": list(buckets),
        "build": {"strongly_typed": True, "workspace_mb": cfg.workspace_mb, "opt_level": cfg.opt_level,
                  "fp32_ops": list(cfg.fp32_ops) + list(cfg.keep_fp32) if "fp16" in precisions.values() else [],
                  "timing_cache": TIMING_CACHE if rt.uses_timing_cache else None,
                  "target_cc": list(cfg.target_cc) if cfg.target_cc else None, "keep_fp32": list(cfg.keep_fp32),
                  "deform_conv": cfg.deform_conv,
                  "seconds": round(time.time() - started, 2)},
        "producer": {"fiber_edge": "0.1.0", "python": sys.version.split()[0]},
    }


# ----------------------------------------------------------------------------- CLI

def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("engines.build", description="Build TensorRT engines (GPU) or ONNX Runtime / "
                                "OpenVINO engines (CPU) from a model package.")
    p.add_argument("--package", required=True, help="model package folder (manifest.json, text.onnx, detector.onnx)")
    p.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "tensorrt-rtx", *CPU_CHOICES],
                   help="auto: tensorrt if installed, else tensorrt-rtx; onnxruntime (ort) / openvino: a CPU "
                        "engine (optimised model / compiled-model cache)")
    p.add_argument("--threads", type=int, default=0,
                   help="openvino: CPU threads the cached compiled models are made for (0: OpenVINO's default)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: int8 for a Q/DQ package, fp16 otherwise")
    p.add_argument("--workspace", type=int, default=None, metavar="MB", help="builder workspace limit in MiB")
    p.add_argument("--timing-cache", default=None, metavar="FILE",
                   help="timing cache to start from and update (a copy is always saved beside the plans)")
    p.add_argument("--buckets", type=_ints, default=None,
                   help="text-length buckets, e.g. 16,32,64 (default: the package's)")
    p.add_argument("--target-cc", type=_names, default=None, metavar="CC[,CC]",
                   help="TensorRT-RTX compute capabilities to compile for (e.g. 8.6,8.9 or current)")
    p.add_argument("--keep-fp32", type=_names, default=(), metavar="OPS",
                   help="more ONNX op types kept FP32 in fp16 builds (e.g. Add,Mul)")
    p.add_argument("--opt-level", type=int, default=None, choices=range(6), help="builder optimisation level")
    p.add_argument("--deform-conv", default="auto", choices=DEFORM_CHOICES,
                   help="DeformConv nodes (DyHead packages): auto = TensorRT's ModulatedDeformConv2d plugin when "
                        "present, else (and on TensorRT-RTX) the GridSample rewrite; plugin / gridsample force one")
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.add_argument("--out", default=None, help="engine folder (default: runs/engines/<package>-<backend>-<precision>)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing engine folder (only once the new one is complete)")
    return p


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    return BuildConfig(package=args.package, out=args.out, backend=args.backend, precision=args.precision,
                       workspace_mb=args.workspace, timing_cache=args.timing_cache, buckets=args.buckets,
                       target_cc=args.target_cc, keep_fp32=args.keep_fp32, opt_level=args.opt_level,
                       device=args.device, overwrite=args.overwrite, deform_conv=args.deform_conv)


def _main_cpu(args: argparse.Namespace) -> int:
    backend = "onnxruntime" if args.backend == "ort" else args.backend
    ignored = [flag for flag, value, default in (
        ("--precision", args.precision, "auto"), ("--workspace", args.workspace, None),
        ("--timing-cache", args.timing_cache, None), ("--target-cc", args.target_cc, None),
        ("--keep-fp32", args.keep_fp32, ()), ("--opt-level", args.opt_level, None),
        ("--deform-conv", args.deform_conv, "auto")) if value != default]
    if ignored:
        print(f"engines.build: {', '.join(ignored)} apply to TensorRT builds only; a {backend} engine runs "
              "the package's own precision", file=sys.stderr)
        return 2
    if args.threads < 0:
        print(f"engines.build: --threads must be >= 0, got {args.threads}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "engines.build", "--package", args.package, "--backend", backend,
                          *(["--threads", str(args.threads)] if args.threads else []),
                          *(["--buckets", ",".join(map(str, args.buckets))] if args.buckets else []),
                          "--out", "OUT"])
    try:
        out = build_cpu_engine(Path(args.package), backend, Path(args.out) if args.out else None, args.overwrite,
                               args.buckets, args.threads, command)
    except (EngineError, OSError) as e:
        print(f"engines.build: {e}", file=sys.stderr)
        return 2
    engine = json.loads((out / ENGINE_JSON).read_text())
    print(f"wrote {out} ({backend} {engine['runtime']['version']}; {engine['precision']}; "
          f"{engine['build']['seconds']} s)")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.backend in CPU_CHOICES:
        return _main_cpu(args)
    if args.threads:
        print("engines.build: --threads applies to CPU engines (--backend onnxruntime / openvino)", file=sys.stderr)
        return 2
    try:
        out = build_engines(config_from_args(args))
    except (EngineError, OSError) as e:  # OSError: --out appeared meanwhile, disk full, permissions
        print(f"engines.build: {e}", file=sys.stderr)
        return 2
    engine = json.loads((out / ENGINE_JSON).read_text())
    sizes = ", ".join(f"{g} {r['precision']} {r['bytes'] / 1e6:.1f} MB" for g, r in engine["graphs"].items())
    print(f"wrote {out} ({engine['backend']} {engine['tensorrt']['version']}; {sizes}; "
          f"{engine['build']['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
