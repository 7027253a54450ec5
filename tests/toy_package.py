"""A tiny, contract-conforming model package built with onnx.helper (no torch), for engine tests.

`write_toy_package(out, ToyConfig(...))` writes a folder that follows docs/architecture.md
("Model package"): text.onnx, detector.onnx, tokenizer.json, manifest.json with sha256s, plus
reference/text.npz and reference/detector.npz (inputs and expected outputs, by tensor name)
computed by the numpy functions below, which are written independently of the ONNX graphs.

The toy graphs (D = hidden, C = channels, g = S / stride, N = g * g anchors):

    text:     h = LayerNorm(Embedding[input_ids] @ Wt + bt) * mask           -> text_hidden [B,T,D]
    detector: x = Relu(Conv_stride(image)) -> [B,N,C];  r = LayerNorm(x @ Wr + br)     [B,N,D]
              attn = Softmax(r @ text^T / sqrt(D) + (1 - mask) * finfo.min)          [B,N,T]
              r2 = r + attn @ text
              token_logits = (r2 @ Wp) @ text^T / sqrt(D) + logit_bias               [B,N,T]
              boxes = anchors + (r2 @ Wb + bb) * stride  (xyxy, input pixels)        [B,N,4]
              centerness = r2 @ wc + bc                                              [B,N]

The INT8 variant adds explicit QuantizeLinear/DequantizeLinear (symmetric, int8): per-tensor
activations and per-output-channel weights on the Conv and the weighted MatMuls (Wt, Wr, Wp, Wb),
with activation scales calibrated (max |x| / 127) on random inputs. Its optional CPU file
(`detector.cpu.onnx`) is ONNX Runtime's dynamic quantisation of the FP32 detector.

The weights use 7 of the 8 bits (|q| <= 63, ONNX Runtime's reduce_range) so that every x86 int8
kernel computes the toy graph exactly, which its numpy reference assumes. On a CPU without VNNI
(AVX2 only) ONNX Runtime's and OpenVINO's int8 GEMMs shift the activation to uint8 (0..255) and add
pairs of uint8 x int8 products in int16 with saturation (vpmaddubsw): 2 * 255 * 127 overflows
32767, 2 * 255 * 63 does not. Measured on an AVX2-only EPYC with full-range weights: text_hidden
off by 0.243 on both engines (TOL["int8"] allows 0.0036), and ONNX Runtime's MatMul output equal,
within 2e-7, to a numpy model of the saturating pair sums; VNNI (vpdpbusd) adds into int32 and is
exact either way. The shipped packages keep full-range weights; their tests state their tolerances.
The Conv bias is snapped to its int32 grid (scale s_image * s_Wc): ONNX Runtime's QLinearConv fusion
rounds a float bias to that grid, which moved one anchor's x across a rounding step (boxes off by
0.091 at batch 2, 32 tokens) before the snap.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from common import package as pkg
from common.atomic import atomic_dir

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_SRC = REPO / "fiber" / "assets" / "tokenizer.json"
OPSET = 17
IR_VERSION = 8
LN_EPS = 1e-5
MASK_MIN = float(np.finfo(np.float32).min)
W_QMAX = 63             # INT8 weights in 7 bits: exact on x86 int8 kernels without VNNI (module docstring)


@dataclass(frozen=True)
class ToyConfig:
    name: str = "toy"
    size: int = 32          # S: square network input
    stride: int = 8         # Conv kernel = stride; g = S / stride anchors per side
    channels: int = 8       # C: Conv output channels
    hidden: int = 16        # D: text hidden size
    vocab: int = 30522      # BERT WordPiece vocabulary (fiber/assets/tokenizer.json)
    int8: bool = False      # add explicit Q/DQ (an INT8 package)
    cpu_file: bool = False  # also write detector.cpu.onnx (ORT dynamic quantisation)
    seed: int = 0
    buckets: tuple[int, ...] = pkg.DEFAULT_BUCKETS


# ----------------------------------------------------------------------------- weights

def toy_weights(cfg: ToyConfig) -> dict[str, np.ndarray]:
    """Deterministic float32 weights for the toy graphs (and, for INT8, calibrated scales)."""
    rng = np.random.default_rng(cfg.seed)
    d, c, k = cfg.hidden, cfg.channels, cfg.stride

    def normal(*shape, std=1.0):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = {
        "E": normal(cfg.vocab, d),
        "Wt": normal(d, d, std=d ** -0.5), "bt": normal(d, std=0.1),
        "ln_t_g": 1 + normal(d, std=0.1), "ln_t_b": normal(d, std=0.1),
        "Wc": normal(c, 3, k, k, std=(3 * k * k) ** -0.5), "bc": normal(c, std=0.1),
        "Wr": normal(c, d, std=c ** -0.5), "br": normal(d, std=0.1),
        "ln_r_g": 1 + normal(d, std=0.1), "ln_r_b": normal(d, std=0.1),
        "Wp": normal(d, d, std=d ** -0.5),
        "logit_bias": np.array(-1.0, np.float32),
        "Wb": normal(d, 4, std=0.1), "bb": normal(4, std=0.1),
        "wc": normal(d, 1, std=d ** -0.5), "bcn": normal(1, std=0.1),
        "anchors": toy_anchors(cfg),
    }
    if cfg.int8:
        w.update(_calibrate(w, cfg, rng))
        bias_scale = (w["s_image"] * w["s_Wc"]).astype(np.float32)         # the int32 bias grid of QLinearConv
        w["bc"] = (np.rint(w["bc"] / bias_scale) * bias_scale).astype(np.float32)
    return w


def toy_anchors(cfg: ToyConfig) -> np.ndarray:
    """Anchor boxes [N, 4] xyxy in input pixels: one stride x stride cell per Conv output, row-major."""
    g = cfg.size // cfg.stride
    ys, xs = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    x0, y0 = xs.reshape(-1) * cfg.stride, ys.reshape(-1) * cfg.stride
    return np.stack([x0, y0, x0 + cfg.stride, y0 + cfg.stride], axis=1).astype(np.float32)


# Weighted ops that get Q/DQ in the INT8 variant: activation name -> weight name (+ weight axis).
_QUANTISED = {"emb": ("Wt", 1), "image": ("Wc", 0), "x": ("Wr", 1), "r2p": ("Wp", 1), "r2b": ("Wb", 1)}


def _calibrate(w: dict[str, np.ndarray], cfg: ToyConfig, rng) -> dict[str, np.ndarray]:
    """Per-tensor activation scales (max |x| / 127 over random inputs) + per-channel weight scales."""
    inputs = random_inputs(cfg, batch=4, tokens=cfg.buckets[0], rng=rng)
    acts: dict[str, np.ndarray] = {}
    hidden = _text(w, inputs["input_ids"], inputs["attention_mask"], acts, quant=None)
    _detector(w, inputs["image"], hidden, inputs["attention_mask"], cfg, acts, quant=None)
    scales = {f"s_{a}": np.array(np.abs(acts[a]).max() / 127, np.float32) for a in _QUANTISED}
    for weight, axis in _QUANTISED.values():
        other = tuple(i for i in range(w[weight].ndim) if i != axis)
        scales[f"s_{weight}"] = (np.abs(w[weight]).max(axis=other) / W_QMAX).astype(np.float32)
    return scales


def _qdq(x: np.ndarray, scale: np.ndarray, axis: int | None = None) -> np.ndarray:
    """QuantizeLinear + DequantizeLinear, symmetric int8, round half to even (ONNX semantics)."""
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    return (np.clip(np.rint(x / scale), -128, 127) * scale).astype(np.float32)


def _q_weight(w, name, quant):
    if quant is None:
        return w[name]
    return _qdq(w[name], w[f"s_{name}"], axis=dict(_QUANTISED.values())[name])


def _q_act(x, act, w, quant, acts):
    if acts is not None:
        acts[act] = x
    return x if quant is None else _qdq(x, w[f"s_{act}"])


# ----------------------------------------------------------------------------- numpy reference

def _layer_norm(x, g, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + LN_EPS) * g + b).astype(np.float32)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _text(w, input_ids, attention_mask, acts=None, quant=True):
    emb = _q_act(w["E"][input_ids], "emb", w, quant, acts)                       # [B, T, D]
    h = _layer_norm(emb @ _q_weight(w, "Wt", quant) + w["bt"], w["ln_t_g"], w["ln_t_b"])
    return (h * attention_mask[..., None].astype(np.float32)).astype(np.float32)


def _conv_stride(image, weight, bias, k):
    """Conv with kernel = stride = k, no padding: [B, 3, S, S] -> [B, N, C] (row-major cells)."""
    b, ch, s, _ = image.shape
    g = s // k
    patches = image.reshape(b, ch, g, k, g, k).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
    return patches @ weight.reshape(weight.shape[0], -1).T + bias


def _detector(w, image, text_hidden, attention_mask, cfg, acts=None, quant=True):
    d = cfg.hidden
    image = _q_act(image, "image", w, quant, acts)
    x = np.maximum(_conv_stride(image, _q_weight(w, "Wc", quant), w["bc"], cfg.stride), 0)
    x = _q_act(x.astype(np.float32), "x", w, quant, acts)                         # [B, N, C]
    r = _layer_norm(x @ _q_weight(w, "Wr", quant) + w["br"], w["ln_r_g"], w["ln_r_b"])
    bias = (1 - attention_mask.astype(np.float32))[:, None, :] * MASK_MIN         # [B, 1, T]
    text_t = text_hidden.transpose(0, 2, 1)                                       # [B, D, T]
    attn = _softmax((r @ text_t) / np.float32(np.sqrt(d)) + bias)                 # [B, N, T]
    r2 = r + attn @ text_hidden                                                   # [B, N, D]
    r2p = _q_act(r2, "r2p", w, quant, acts)
    logits = (r2p @ _q_weight(w, "Wp", quant)) @ text_t / np.float32(np.sqrt(d)) + w["logit_bias"]
    r2b = _q_act(r2, "r2b", w, quant, acts)
    boxes = w["anchors"] + (r2b @ _q_weight(w, "Wb", quant) + w["bb"]) * np.float32(cfg.stride)
    centerness = (r2 @ w["wc"] + w["bcn"])[..., 0]
    return {pkg.BOXES: boxes.astype(np.float32), pkg.TOKEN_LOGITS: logits.astype(np.float32),
            pkg.CENTERNESS: centerness.astype(np.float32)}


def reference_text(cfg: ToyConfig, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """text_hidden float32 [B, T, D] for int64 input_ids / attention_mask [B, T]."""
    w = toy_weights(cfg)
    return _text(w, input_ids, attention_mask, quant=True if cfg.int8 else None)


def reference_detector(cfg: ToyConfig, image, text_hidden, attention_mask) -> dict[str, np.ndarray]:
    """boxes [B,N,4] xyxy pixels, token_logits [B,N,T], centerness [B,N] (all float32)."""
    w = toy_weights(cfg)
    return _detector(w, image, text_hidden, attention_mask, cfg, quant=True if cfg.int8 else None)


def random_inputs(cfg: ToyConfig, batch: int = 1, tokens: int = 16, rng=None) -> dict[str, np.ndarray]:
    """image float32 [B,3,S,S], input_ids / attention_mask int64 [B,T] (trailing padding)."""
    rng = np.random.default_rng(1234) if rng is None else rng
    lengths = rng.integers(2, tokens + 1, size=batch)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1000, cfg.vocab, size=(batch, tokens)) * mask
    image = rng.standard_normal((batch, 3, cfg.size, cfg.size)).astype(np.float32)
    return {pkg.IMAGE: image, pkg.INPUT_IDS: ids.astype(np.int64), pkg.ATTENTION_MASK: mask}


# ----------------------------------------------------------------------------- ONNX graphs

class _Graph:
    """Accumulates nodes and initializers; names are generated from a counter."""

    def __init__(self, w: dict[str, np.ndarray], int8: bool):
        self.w, self.int8 = w, int8
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.count = 0

    def const(self, name: str, value: np.ndarray | None = None) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(self.w[name] if value is None else value, name)
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self.count += 1
        out = out or f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{op_type}_{self.count}", **attrs))
        return out

    def act(self, x: str, act: str) -> str:
        """Q/DQ an activation (per-tensor, symmetric) when INT8."""
        if not self.int8:
            return x
        zp = self.const(f"zp_{act}", np.array(0, np.int8))
        q = self.op("QuantizeLinear", x, self.const(f"s_{act}"), zp)
        return self.op("DequantizeLinear", q, f"s_{act}", zp)

    def weight(self, name: str) -> str:
        """A weight: a float initializer, or int8 values + per-channel DequantizeLinear when INT8."""
        if not self.int8:
            return self.const(name)
        axis = dict(_QUANTISED.values())[name]
        scale = self.w[f"s_{name}"]
        shape = [1] * self.w[name].ndim
        shape[axis] = -1
        q = np.clip(np.rint(self.w[name] / scale.reshape(shape)), -128, 127).astype(np.int8)
        self.const(f"{name}_int8", q)
        self.const(f"zp_{name}", np.zeros_like(scale, dtype=np.int8))
        return self.op("DequantizeLinear", f"{name}_int8", self.const(f"s_{name}"), f"zp_{name}", axis=axis)

    def model(self, name, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, list(self.inits.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="fiber-edge-tests")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def text_model(cfg: ToyConfig, w: dict[str, np.ndarray]) -> onnx.ModelProto:
    g = _Graph(w, cfg.int8)
    emb = g.act(g.op("Gather", g.const("E"), pkg.INPUT_IDS, axis=0), "emb")      # [B, T, D]
    h = g.op("Add", g.op("MatMul", emb, g.weight("Wt")), g.const("bt"))
    h = g.op("LayerNormalization", h, g.const("ln_t_g"), g.const("ln_t_b"), axis=-1, epsilon=LN_EPS)
    mask = g.op("Unsqueeze", g.op("Cast", pkg.ATTENTION_MASK, to=TensorProto.FLOAT),
                g.const("axis_last", np.array([-1], np.int64)))                  # [B, T, 1]
    g.op("Mul", h, mask, out=pkg.TEXT_HIDDEN)
    bt = ["batch", "tokens"]
    return g.model("text", [_vi(pkg.INPUT_IDS, TensorProto.INT64, bt),
                            _vi(pkg.ATTENTION_MASK, TensorProto.INT64, bt)],
                   [_vi(pkg.TEXT_HIDDEN, TensorProto.FLOAT, bt + [cfg.hidden])])


def detector_model(cfg: ToyConfig, w: dict[str, np.ndarray]) -> onnx.ModelProto:
    g = _Graph(w, cfg.int8)
    k, d, c = cfg.stride, cfg.hidden, cfg.channels
    inv_sqrt_d = g.const("inv_sqrt_d", np.array(1 / np.sqrt(d), np.float32))
    x = g.op("Conv", g.act(pkg.IMAGE, "image"), g.weight("Wc"), g.const("bc"), kernel_shape=[k, k], strides=[k, k])
    x = g.op("Reshape", g.op("Relu", x), g.const("shape_bcn", np.array([0, c, -1], np.int64)))
    x = g.act(g.op("Transpose", x, perm=[0, 2, 1]), "x")                         # [B, N, C]
    r = g.op("Add", g.op("MatMul", x, g.weight("Wr")), g.const("br"))
    r = g.op("LayerNormalization", r, g.const("ln_r_g"), g.const("ln_r_b"), axis=-1, epsilon=LN_EPS)
    mask = g.op("Cast", pkg.ATTENTION_MASK, to=TensorProto.FLOAT)
    bias = g.op("Mul", g.op("Sub", g.const("one", np.array(1, np.float32)), mask),
                g.const("mask_min", np.array(MASK_MIN, np.float32)))
    bias = g.op("Unsqueeze", bias, g.const("axis_1", np.array([1], np.int64)))  # [B, 1, T]
    text_t = g.op("Transpose", pkg.TEXT_HIDDEN, perm=[0, 2, 1])                 # [B, D, T]
    scores = g.op("Add", g.op("Mul", g.op("MatMul", r, text_t), inv_sqrt_d), bias)
    attn = g.op("Softmax", scores, axis=-1)                                     # [B, N, T]
    r2 = g.op("Add", r, g.op("MatMul", attn, pkg.TEXT_HIDDEN))                  # [B, N, D]
    proj = g.op("MatMul", g.act(r2, "r2p"), g.weight("Wp"))
    g.op("Add", g.op("Mul", g.op("MatMul", proj, text_t), inv_sqrt_d), g.const("logit_bias"),
         out=pkg.TOKEN_LOGITS)
    deltas = g.op("Add", g.op("MatMul", g.act(r2, "r2b"), g.weight("Wb")), g.const("bb"))
    g.op("Add", g.const("anchors"), g.op("Mul", deltas, g.const("stride", np.array(k, np.float32))),
         out=pkg.BOXES)
    cn = g.op("Add", g.op("MatMul", r2, g.const("wc")), g.const("bcn"))
    g.op("Squeeze", cn, g.const("axis_last", np.array([-1], np.int64)), out=pkg.CENTERNESS)
    return g.model("detector", [
        _vi(pkg.IMAGE, TensorProto.FLOAT, ["batch", 3, cfg.size, cfg.size]),
        _vi(pkg.TEXT_HIDDEN, TensorProto.FLOAT, ["batch", "tokens", d]),
        _vi(pkg.ATTENTION_MASK, TensorProto.INT64, ["batch", "tokens"]),
    ], [
        _vi(pkg.BOXES, TensorProto.FLOAT, ["batch", "anchors", 4]),
        _vi(pkg.TOKEN_LOGITS, TensorProto.FLOAT, ["batch", "anchors", "tokens"]),
        _vi(pkg.CENTERNESS, TensorProto.FLOAT, ["batch", "anchors"]),
    ])


# ----------------------------------------------------------------------------- the package

def _specs(model: onnx.ModelProto, which: str) -> list[dict]:
    dtypes = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64"}
    out = []
    for vi in getattr(model.graph, which):
        t = vi.type.tensor_type
        shape = [dim.dim_param or dim.dim_value for dim in t.shape.dim]
        out.append({"name": vi.name, "shape": shape, "dtype": dtypes[t.elem_type]})
    return out


def _manifest(cfg: ToyConfig, models: dict[str, onnx.ModelProto], files: dict[str, dict]) -> dict:
    graphs = {
        graph: {"file": f"{graph}.onnx", "inputs": _specs(m, "input"), "outputs": _specs(m, "output")}
        for graph, m in models.items()
    }
    graphs["detector"]["cpu_file"] = pkg.DETECTOR_CPU_GRAPH if cfg.cpu_file else None
    return {
        "format": pkg.FORMAT, "format_version": pkg.FORMAT_VERSION,
        "name": cfg.name, "precision": "int8" if cfg.int8 else "fp32",
        "model": {"name": "toy", "config": {k: v for k, v in asdict(cfg).items() if k != "name"}},
        "input": pkg.InputSpec((cfg.size, cfg.size)).to_json(),
        "text": pkg.TextSpec(tuple(cfg.buckets), cfg.hidden, 0, True).to_json(),
        "graphs": graphs,
        "postprocess": pkg.PostprocessSpec().to_json(),
        "files": files,
        "accuracy": {"split": None},
        "producer": {"fiber_edge": "0.1.0", "onnx": onnx.__version__, "tool": "tests/toy_package.py"},
    }


def _write_reference(folder: Path, cfg: ToyConfig) -> None:
    """reference/text.npz and reference/detector.npz: a B=1 input at the first bucket, with padding."""
    x = random_inputs(cfg, batch=1, tokens=cfg.buckets[0])
    x[pkg.ATTENTION_MASK][:, -3:] = 0                          # make sure there is padding
    x[pkg.INPUT_IDS][:, -3:] = 0
    hidden = reference_text(cfg, x[pkg.INPUT_IDS], x[pkg.ATTENTION_MASK])
    det = reference_detector(cfg, x[pkg.IMAGE], hidden, x[pkg.ATTENTION_MASK])
    (folder / "reference").mkdir()
    np.savez(folder / pkg.reference_file("text"), **{pkg.INPUT_IDS: x[pkg.INPUT_IDS],
             pkg.ATTENTION_MASK: x[pkg.ATTENTION_MASK], pkg.TEXT_HIDDEN: hidden})
    np.savez(folder / pkg.reference_file("detector"), **{pkg.IMAGE: x[pkg.IMAGE], pkg.TEXT_HIDDEN: hidden,
             pkg.ATTENTION_MASK: x[pkg.ATTENTION_MASK], **det})


def _write_cpu_file(folder: Path, cfg: ToyConfig, w: dict[str, np.ndarray]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = detector_model(ToyConfig(**{**asdict(cfg), "int8": False}), w)
    quantize_dynamic(fp32, folder / pkg.DETECTOR_CPU_GRAPH, op_types_to_quantize=["MatMul"],
                     per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)


def write_toy_package(out: str | Path, cfg: ToyConfig = ToyConfig(), overwrite: bool = False) -> Path:
    """Write the toy package to ``out`` (atomically) and return its path."""
    out = Path(out)
    w = toy_weights(cfg)
    models = {"text": text_model(cfg, w), "detector": detector_model(cfg, w)}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for graph, model in models.items():
            onnx.save(model, tmp / f"{graph}.onnx")
        (tmp / pkg.TOKENIZER).write_bytes(TOKENIZER_SRC.read_bytes())
        if cfg.cpu_file:
            _write_cpu_file(tmp, cfg, w)
        _write_reference(tmp, cfg)
        names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        files = {n: {"sha256": pkg.sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in names}
        (tmp / pkg.MANIFEST).write_text(json.dumps(_manifest(cfg, models, files), indent=2) + "\n")
    return out


def config_of(package: str | Path) -> ToyConfig:
    """The ToyConfig a toy package was written with (from its manifest)."""
    manifest = json.loads((Path(package) / pkg.MANIFEST).read_text())
    raw = dict(manifest["model"]["config"], name=manifest["name"])
    raw["buckets"] = tuple(raw["buckets"])
    return ToyConfig(**raw)


# ----------------------------------------------------------------------------- test helpers

def shipped_packages() -> list[Path]:
    """Packages shipped under models/ (each with a manifest.json); empty until the exporter ships them.
    Hidden folders are an exporter's work in progress (temp folder before the rename): not shipped."""
    return sorted(p.parent for p in (REPO / "models").glob("*/manifest.json") if not p.parent.name.startswith("."))


TOY_CONFIGS = {"toy": ToyConfig(), "toy-int8": ToyConfig(name="toy-int8", int8=True, cpu_file=True)}
PACKAGE_IDS = list(TOY_CONFIGS) + [p.name for p in shipped_packages()]


def make_toy_packages(root: Path) -> dict[str, Path]:
    """Write the toy FP32 and INT8 packages under ``root``; returns {id: path}."""
    return {name: write_toy_package(root / name, cfg) for name, cfg in TOY_CONFIGS.items()}


def package_path(package_id: str, toys: dict[str, Path]) -> Path:
    return toys[package_id] if package_id in toys else REPO / "models" / package_id


def copy_package(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def rewrite_file(package: Path, name: str, data: bytes) -> None:
    """Replace a package file *and* its manifest sha256 (a package exported broken, not tampered)."""
    (package / name).write_bytes(data)
    manifest = json.loads((package / pkg.MANIFEST).read_text())
    manifest["files"][name] = {"sha256": pkg.sha256_file(package / name), "bytes": len(data)}
    (package / pkg.MANIFEST).write_text(json.dumps(manifest, indent=2))


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str) -> None:
    """max |actual - expected| <= rtol * (1 + max |expected|), with the numbers in the message."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected))) if actual.size else 0.0
    bound = rtol * (1 + float(np.max(np.abs(expected))) if expected.size else 1.0)
    assert diff <= bound, f"{what}: max abs diff {diff:.3g} > {bound:.3g}"
