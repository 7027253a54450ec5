"""Export a fine-tuned checkpoint to a model package (FP32, or INT8 with explicit Q/DQ).

    python -m compress.export --checkpoint CKPT --out PKG [--int8 QDIR|auto] [--data DIR]
        [--max-drop 1.0] [--buckets 16,32,64] [--cpu-int8 dynamic|none] [--overwrite]

The package (docs/architecture.md, "Model package"), written into a temp folder and renamed at the
end (a failed export leaves nothing):

    text.onnx          embeddings + the unfused text layers (FP32 compute in every package: it runs
                       once per prompt); the word-embedding table (most of the file) stored as
                       per-row int8 rows read back by Gather -> Cast -> Sub -> Mul (--text-words fp32: as is)
    detector.onnx      Swin, the fused layers of both sides, FPN, head, box decode; FP32, or INT8
                       with explicit Q/DQ (modelopt PTQ from ``compress.quantize``) that TensorRT
                       (strongly typed) and ONNX Runtime run
    detector.cpu.onnx  INT8 packages: the CPU variant (compress.cpu_int8), named in
                       graphs.detector.cpu_file; engines.ort runs it on the CPU provider
    graphs.detector.cpu_backend  the CPU backend engines.load("auto") picks: "openvino" for an INT8
                       package when OpenVINO with static shapes reproduces reference/detector.npz
                       (graphs.detector.openvino, checked in a child process: the fastest CPU path
                       measured, see compress.cpu_int8), else and for FP32 "onnxruntime" (an FP32
                       export checks OpenVINO only with --openvino-check)
    tokenizer.json, reference/text.npz, reference/detector.npz (inputs + ONNX Runtime outputs with
                       graph optimisations off, checked against PyTorch at export), manifest.json

With ``--data DIR`` (a held-out split: grounding.json and/or detection.json) the manifest's
``accuracy`` holds FP32 and INT8 numbers measured by running the package itself through the runtime
(runtime.predictor.Detector on ONNX Runtime) with fiber.data.evaluation; an INT8 package's FP32
baseline is the float model it ships, with its word table, through the same Detector over the
torch adapter (fiber.torch_engines). INT8 exports need it: the
accuracy guard refuses a package whose INT8 R@1 (Q/DQ file and CPU file on ONNX Runtime, and the
Q/DQ file on OpenVINO when it is installed) is more than ``--max-drop`` points below FP32, naming
the worst layers from QDIR/sensitivity.json, and writes nothing.

The default score threshold (``postprocess.threshold``) is chosen on held-out data when there is
some with boxes (``--calibration-data DIR``, else ``--data``'s detection.json; ``--no-calibrate``
keeps 0.05): compress.calibrate runs the package through the runtime with prompts naming the
phrases present plus absent hard negatives, and records the threshold its rule picks
(``--calibration-rule``: balanced precision and recall by default, or the F1 maximum) and the sweep
in the manifest's ``calibration``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch

import engines
from common import package as pkg
from common.atomic import atomic_dir
from common.progress import progress_line
from engines.options import int8_pairs_saturate
from compress import calibrate, cpu_int8, onnx_export, onnx_graph, word_table
from compress.accuracy import EvalData, evaluate_engines, find_data
from compress.openvino_check import apply_check, check_openvino, openvino_installed
from fiber import checkpoint as checkpoint_io
from fiber.checkpoint import CheckpointError
from fiber.config import ModelConfig, parse_canvas
from fiber.models import FiberForGrounding
from fiber.package import TOKENIZER_SRC, package_sections, resolve_buckets

TEXT_WORDS = ("int8", "fp32")   # how text.onnx stores its word-embedding table
FP32_TOL = 1e-3     # ONNX vs PyTorch, relative to 1 + max |torch|: FP32 graphs must agree this well
REFERENCE_PROMPT = "a red circle. two blue squares. the small green star left of the ring"


class ExportError(ValueError):
    """An export that cannot be done (bad checkpoint, data, options) or that fails a check."""


class AccuracyGuardError(ExportError):
    """The INT8 package loses more R@1 than allowed; nothing was written."""


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str                        # fine-tuned checkpoint folder (train.fine / compress.distill)
    out: str                               # package folder to write
    int8: str | None = None                # QDIR from compress.quantize, "auto" (quantize now), None = FP32
    data: str | None = None                # held-out data folder for the accuracy numbers (INT8: required)
    max_drop: float = 1.0                  # accuracy guard: allowed INT8 R@1 drop in points
    buckets: tuple[int, ...] | None = None  # text buckets; None = (16, 32, 64) up to max_text_len
    overwrite: bool = False                # replace an existing package
    config: str | None = None              # refuse a checkpoint of another config name
    name: str | None = None                # package name; default <config> or <config>-int8
    cpu_int8: str = cpu_int8.DEFAULT       # CPU variant of INT8 packages (compress.cpu_int8.METHODS)
    eval_limit: int | None = None          # evaluate only the first N entries / images
    threads: int | None = None             # ONNX Runtime threads of the accuracy runs
    text_words: str = "int8"               # text.onnx word-embedding table: "int8" (per row) or "fp32"
    canvas: tuple[int, int] | None = None  # the detector's [H, W] canvas, official or letterbox (default: the config's)
    calibrate: bool = True                 # choose postprocess.threshold on held-out data (compress.calibrate)
    calibration_data: str | None = None    # its held-out folder (detection.json); None = data
    calibration_rule: str = "balanced"     # compress.calibrate.RULES: balanced (max min(P, R)) or f1
    memory_check: bool = True              # refuse (one line, nothing written) when MemAvailable < the estimate
    fold_shapes: bool = True               # fold the detector's shape arithmetic (its probes: the export's peak memory)
    openvino_check: bool | None = None     # check OpenVINO with static shapes on the detector (None: INT8 only)


@dataclass
class ExportResult:
    path: Path
    manifest: dict[str, Any] = field(repr=False)


# ----------------------------------------------------------------------------- model loading

def load_fine_model(checkpoint: str | Path, expect_name: str | None = None
                    ) -> tuple[FiberForGrounding, ModelConfig, dict[str, Any]]:
    """``fiber.checkpoint.load_fine_model`` for export: (model in eval mode, its config, meta); ExportError."""
    try:
        model, meta = checkpoint_io.load_fine_model(checkpoint, "export", expect_name=expect_name)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    return model, model.cfg, meta


# ----------------------------------------------------------------------------- memory

# Peak RSS of an FP32 export: a fixed part (libraries) plus copies of the weights (the torch model,
# the ONNX protos being folded and checked, optimisations-off ONNX Runtime sessions) plus
# activations that grow with the canvas (the shape-folding probes, the PyTorch parity run).
# Fitted to FIBER-B (252 M parameters, docs/results.md "FIBER-B at real scale"): 14.5 GiB at
# 512x672, over 18.8 GiB at 800x1344 (killed there with the machine's memory spent).
EXPORT_BASE_BYTES = 1 << 30
EXPORT_WEIGHT_COPIES = 13.0
EXPORT_BYTES_PER_PIXEL = 6200.0            # x H x W of the canvas
# --no-fold-shapes (no probe runs): FIBER-B at 800x1344 peaked at 8.5 GiB
NO_FOLD_WEIGHT_COPIES, NO_FOLD_BYTES_PER_PIXEL = 7.0, 1000.0


def export_memory_estimate(params: int, canvas_hw: tuple[int, int], fold_shapes: bool = True) -> int:
    """Bytes an FP32 export of a ``params``-parameter model at ``canvas_hw`` is expected to peak at."""
    h, w = canvas_hw
    copies, per_pixel = ((EXPORT_WEIGHT_COPIES, EXPORT_BYTES_PER_PIXEL) if fold_shapes
                         else (NO_FOLD_WEIGHT_COPIES, NO_FOLD_BYTES_PER_PIXEL))
    return int(EXPORT_BASE_BYTES + copies * 4 * params + per_pixel * h * w)


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(params: int, canvas_hw: tuple[int, int], fold_shapes: bool = True) -> None:
    """ExportError (one line: what is needed, what is free, what to change) when the estimate
    exceeds the memory available now."""
    need, free = export_memory_estimate(params, canvas_hw, fold_shapes), available_memory()
    if free is not None and need > free:
        gib = 2 ** 30
        raise ExportError(
            f"not enough memory for this export: about {need / gib:.1f} GiB needed ({params / 1e6:.0f} M parameters "
            f"at canvas {canvas_hw[0]}x{canvas_hw[1]}), {free / gib:.1f} GiB available; free memory (stop other "
            f"jobs), export a smaller --canvas{'' if not fold_shapes else ', pass --no-fold-shapes (about ' + format(export_memory_estimate(params, canvas_hw, False) / gib, '.1f') + ' GiB)'}, "
            f"or pass --no-memory-check to try anyway")


# ----------------------------------------------------------------------------- example inputs

@dataclass(frozen=True)
class TokenizerSource:
    """The tokenizer a package ships: the checkpoint's own ``tokenizer.json`` (a converted official
    release: RoBERTa byte-level BPE, case-sensitive) or the default WordPiece asset (lowercased)."""
    path: Path = TOKENIZER_SRC
    lowercase: bool = True

    @classmethod
    def of_checkpoint(cls, folder: str | Path) -> "TokenizerSource":
        own = checkpoint_io.tokenizer_file(folder)
        return cls(own, lowercase=False) if own is not None else cls()


def example_inputs(cfg: ModelConfig, tokens: int, seed: int = 0,
                   tokenizer: TokenizerSource = TokenizerSource()) -> dict[str, np.ndarray]:
    """B=1 inputs: the reference prompt padded to ``tokens`` (with padding) and a seeded image of
    the config's input size (``cfg.input_hw``: the official canvas or the square letterbox)."""
    from runtime.tokenize import PromptTokenizer

    tok = PromptTokenizer(tokenizer.path, buckets=(tokens,), lowercase=tokenizer.lowercase,
                          pad_id=cfg.text.pad_token_id)
    enc = tok.encode(REFERENCE_PROMPT[: 3 * tokens])   # short enough to leave padding in the bucket
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((1, 3, *cfg.input_hw)).astype(np.float32)
    return {pkg.INPUT_IDS: enc.input_ids, pkg.ATTENTION_MASK: enc.attention_mask, pkg.IMAGE: image}


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / (1 + max |b|)."""
    return float(np.max(np.abs(a.astype(np.float64) - b)) / (1.0 + np.max(np.abs(b)))) if b.size else 0.0


def write_graphs(tmp: Path, model: FiberForGrounding, qmodel: FiberForGrounding | None, cfg: ModelConfig,
                 buckets: Sequence[int], cpu_method: str, text_words: str,
                 tokenizer: TokenizerSource = TokenizerSource(), fold_shapes: bool = True,
                 openvino_check: bool | None = None,
                 shipped: tuple[FiberForGrounding, tuple[np.ndarray, np.ndarray] | None] | None = None
                 ) -> dict[str, Any]:
    """Write text.onnx, detector.onnx (+ the CPU variant), tokenizer.json and reference/*.npz into
    ``tmp``; check ONNX against PyTorch. ``text_words``: "int8" stores text.onnx's word-embedding
    table as per-row int8 (the text parity check is then against the model with that table read
    back), "fp32" as it is; ``shipped``: ``shipped_text_model(model, text_words)`` when the caller
    already holds it. Returns the manifest's ``graphs`` and ``parity`` parts."""
    x = example_inputs(cfg, buckets[0], tokenizer=tokenizer)
    text_model, words = shipped if shipped is not None else shipped_text_model(model, text_words)
    text_graph, words_info = onnx_export.export_text(text_model, x, tmp / pkg.TEXT_GRAPH, words)
    text_in = {pkg.INPUT_IDS: x[pkg.INPUT_IDS], pkg.ATTENTION_MASK: x[pkg.ATTENTION_MASK]}
    hidden = onnx_export.ort_reference(tmp / pkg.TEXT_GRAPH, text_in)[pkg.TEXT_HIDDEN]
    det_model = qmodel if qmodel is not None else model
    det_graph = onnx_export.export_detector(det_model, x, hidden, tmp / pkg.DETECTOR_GRAPH, qdq=qmodel is not None,
                                            fold_shapes=fold_shapes)
    det_in = {pkg.IMAGE: x[pkg.IMAGE], pkg.TEXT_HIDDEN: hidden, pkg.ATTENTION_MASK: x[pkg.ATTENTION_MASK]}
    det_out = onnx_export.ort_reference(tmp / pkg.DETECTOR_GRAPH, det_in)
    parity = _parity(text_model, det_model, text_in, hidden, det_in, det_out, quantised=qmodel is not None)
    shutil.copyfile(tokenizer.path, tmp / pkg.TOKENIZER)
    (tmp / pkg.REFERENCE_DIR).mkdir()
    np.savez(tmp / pkg.reference_file("text"), **text_in, **{pkg.TEXT_HIDDEN: hidden})
    np.savez(tmp / pkg.reference_file("detector"), **det_in, **det_out)
    graphs = {"text": _graph_entry(pkg.TEXT_GRAPH, text_graph, "fp32"),
              "detector": _graph_entry(pkg.DETECTOR_GRAPH, det_graph, "int8" if qmodel is not None else "fp32")}
    graphs["text"]["word_embeddings"] = words_info or {"dtype": "float32"}
    graphs["detector"]["cpu_file"] = None
    graphs["detector"]["cpu_backend"] = "onnxruntime"
    if openvino_check is None:
        openvino_check = qmodel is not None
    if openvino_check:
        int8 = qmodel is not None
        check = check_openvino(tmp / pkg.DETECTOR_GRAPH, tmp / pkg.reference_file("detector"), int8=int8)
        apply_check(graphs["detector"], check, int8=int8)  # FP32: ONNX Runtime stays the default
    if qmodel is not None and cpu_method != "none":
        info = cpu_int8.make_cpu_variant(cpu_method, model, qmodel, x, hidden, tmp)
        graphs["detector"]["cpu_file"] = pkg.DETECTOR_CPU_GRAPH
        graphs["detector"]["cpu_variant"] = info
    if qmodel is not None:
        graphs["text"]["note"] = "FP32 compute on purpose: text.onnx runs once per prompt, not per frame"
        graphs["detector"]["qdq"] = onnx_graph.count_ops(det_graph, "QuantizeLinear", "DequantizeLinear")
    return {"graphs": graphs, "parity": parity}


def shipped_text_model(model: FiberForGrounding, text_words: str
                       ) -> tuple[FiberForGrounding, tuple[np.ndarray, np.ndarray] | None]:
    """(the model with the word table text.onnx stores, its int8 ``(q, scale)`` or None):
    ``text_words`` "fp32": ``model`` itself; "int8": ``int8_word_embeddings(model)``."""
    return (model, None) if text_words == "fp32" else int8_word_embeddings(model)


def int8_word_embeddings(model: FiberForGrounding) -> tuple[FiberForGrounding, tuple[np.ndarray, np.ndarray]]:
    """A copy of ``model`` whose word-embedding table holds its per-row int8 values read back, and
    those ``(q, scale)`` (word_table.quantize_rows); ``model`` is not changed."""
    import copy

    words = model.backbone.text.embeddings.word_embeddings
    q, scale = word_table.quantize_rows(words.weight.detach().float().numpy())
    text_model = copy.deepcopy(model)
    with torch.no_grad():
        text_model.backbone.text.embeddings.word_embeddings.weight.copy_(
            torch.from_numpy(word_table.dequantize_rows(q, scale)))
    return text_model, (q, scale)


def _parity(model, det_model, text_in, hidden, det_in, det_out, quantised: bool) -> dict[str, Any]:
    """ONNX (optimisations off) vs PyTorch on the reference inputs; FP32 must agree within FP32_TOL."""
    with torch.inference_mode():
        t_hidden = model.encode_text(*(onnx_export.to_torch(text_in[k]) for k in pkg.TEXT_INPUTS)).numpy()
        t_det = det_model.detect(*(onnx_export.to_torch(det_in[k]) for k in pkg.DETECTOR_INPUTS))
    diffs = {"text_hidden": max_rel_diff(hidden, t_hidden)}
    diffs.update({name: max_rel_diff(det_out[name], t.numpy()) for name, t in zip(pkg.DETECTOR_OUTPUTS, t_det)})
    limits = {k: FP32_TOL for k in diffs} if not quantised else {"text_hidden": FP32_TOL}
    bad = [f"{k} {diffs[k]:.3g} > {limits[k]:.3g}" for k in limits if diffs[k] > limits[k]]
    if bad:
        raise ExportError(f"ONNX Runtime and PyTorch disagree on the reference inputs: {', '.join(bad)}")
    return {"max_rel_diff_vs_torch": {k: round(v, 8) for k, v in diffs.items()},
            "detector_vs": "fake-quantised PyTorch" if quantised else "PyTorch"}


def _graph_entry(file: str, graph: onnx.ModelProto, precision: str) -> dict[str, Any]:
    return {"file": file, "precision": precision, "inputs": onnx_graph.io_specs(graph, "input"),
            "outputs": onnx_graph.io_specs(graph, "output")}


# ----------------------------------------------------------------------------- manifest

def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``folder`` except the manifest: ``{relpath: {"sha256", "bytes"}}``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != pkg.MANIFEST)
    return {p.relative_to(folder).as_posix(): {"sha256": pkg.sha256_file(p), "bytes": p.stat().st_size}
            for p in files}


def build_manifest(name: str, cfg: ModelConfig, buckets: Sequence[int], parts: dict[str, Any],
                   files: dict, precision: str, extra: dict[str, Any], level_sizes: Sequence[int] = (),
                   lowercase: bool = True) -> dict[str, Any]:
    return {
        "format": pkg.FORMAT, "format_version": pkg.FORMAT_VERSION,
        "name": name, "precision": precision,
        "model": {"name": cfg.name, "config": cfg.to_dict()},
        **package_sections(cfg, buckets, level_sizes, lowercase),
        "graphs": parts["graphs"],
        "files": files,
        "accuracy": {"split": None},
        "parity": parts["parity"],
        **extra,
        "producer": {"fiber_edge": "0.1.0", "torch": torch.__version__, "onnx": onnx.__version__,
                     "tool": "compress.export"},
    }


# ----------------------------------------------------------------------------- accuracy

def evaluate_package(folder: Path, data: EvalData, use_cpu_file: bool, threads: int | None = None,
                     backend: str = "onnxruntime") -> dict[str, float | None]:
    """The package in ``folder`` (manifest written) on ``backend`` (CPU), through the runtime."""
    opts: dict[str, Any] = {"cache_dir": "", "use_cpu_file": use_cpu_file}
    if threads:
        opts["threads" if backend == "openvino" else "intra_op_threads"] = threads
    with engines.load(folder, backend, **opts) as e:
        return evaluate_engines(e, data, progress=progress_line())  # a stderr line on a terminal only


def guard(fp32: dict, int8: dict, max_drop: float, what: str, sensitivity: Path | None) -> None:
    """AccuracyGuardError when ``int8`` R@1 is more than ``max_drop`` points below ``fp32``."""
    r_fp, r_q = fp32.get("R@1"), int8.get("R@1")
    if r_fp is None or r_q is None:
        raise ExportError("the accuracy guard needs R@1, but the data has no grounding phrases "
                          f"(give --data a folder with {'grounding.json'})")
    drop = r_fp - r_q
    if drop > max_drop:
        raise AccuracyGuardError(
            f"accuracy guard: INT8 R@1 of {what} is {r_q:.2f}, {drop:.2f} points below FP32 {r_fp:.2f} "
            f"(allowed: {max_drop}); {worst_layers(sensitivity)}. Nothing was written. Re-run "
            "compress.quantize with --sensitivity (keeps the worst layers in FP32), --qat-steps, or "
            "allow a larger --max-drop")


def worst_layers(sensitivity: Path | None, n: int = 5) -> str:
    """'worst layers: a (+x R@1), ...' from sensitivity.json, or how to get them."""
    if sensitivity is None or not sensitivity.is_file():
        return "no sensitivity.json: run compress.quantize --sensitivity to rank the layers"
    try:
        groups = json.loads(sensitivity.read_text())["groups"][:n]
        shown = ", ".join(f"{g['group']} (+{g['recovered']:.2f} R@1, err {g['output_error']:.3g})" for g in groups)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{sensitivity} is unreadable ({e!r})"
    return f"worst layers (sensitivity.json): {shown}"


# ----------------------------------------------------------------------------- export

def export_package(cfg: ExportConfig) -> ExportResult:
    """Write the package ``cfg.out`` (atomically). Raises ExportError / AccuracyGuardError,
    FileExistsError (existing out without overwrite), ValueError for bad data."""
    if cfg.int8 is not None and cfg.data is None and not _agreement_guarded(cfg.int8):
        raise ExportError("--int8 needs --data (a held-out split): the accuracy guard compares INT8 with FP32 R@1")
    if cfg.text_words not in TEXT_WORDS:
        raise ExportError(f"--text-words {cfg.text_words!r} is not one of {list(TEXT_WORDS)}")
    if cfg.cpu_int8 not in cpu_int8.METHODS:
        raise ExportError(f"--cpu-int8 {cfg.cpu_int8!r} is not one of {list(cpu_int8.METHODS)}")
    if cfg.calibration_rule not in calibrate.RULES:
        raise ExportError(f"--calibration-rule {cfg.calibration_rule!r} is not one of {list(calibrate.RULES)}")
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"output {out} already exists (pass --overwrite to replace it)")
    model, mcfg, meta = load_fine_model(cfg.checkpoint, cfg.config)
    if cfg.canvas is not None:
        try:
            mcfg = mcfg.with_canvas(cfg.canvas)
        except ValueError as e:
            raise ExportError(f"--canvas: {e}") from None
        model.cfg = mcfg
    try:
        buckets = resolve_buckets(mcfg, cfg.buckets)
    except ValueError as e:
        raise ExportError(f"--buckets: {e}") from None
    if cfg.memory_check:
        check_memory(sum(p.numel() for p in model.parameters()), mcfg.input_hw, cfg.fold_shapes)
    data = find_data(cfg.data) if cfg.data else None
    if data is not None and cfg.eval_limit:
        data = data.subset(cfg.eval_limit, cfg.eval_limit)
    with tempfile.TemporaryDirectory(prefix="fiber-export-") as scratch:
        qmodel, model, quant = _quantised(cfg, model, mcfg, Path(scratch))
        with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
            # the float model with the word table text.onnx stores: written, and (INT8) the baseline
            shipped = shipped_text_model(model, cfg.text_words)
            manifest = _write_package(cfg, tmp, model, qmodel, mcfg, buckets, quant, meta, shipped)
            float_model = shipped[0] if quant is not None else None   # FP32: the package is what is measured
            shipped = None
            accuracy = {"split": data.source if data else None}
            if quant is not None and quant["info"].get("guard") == "agreement":
                accuracy.update(_measure_agreement(cfg, tmp, model, mcfg, buckets, quant, meta))
            elif data is not None:
                accuracy.update(_measure(cfg, tmp, float_model, mcfg, buckets, data, quant, meta))
            del float_model
            manifest["accuracy"] = accuracy
            pkg.write_manifest(tmp, manifest)
            if cfg.calibrate and (cfg.calibration_data or cfg.data):
                manifest = _calibrate(cfg, tmp)
    return ExportResult(out, manifest)


def _calibrate(cfg: ExportConfig, tmp: Path) -> dict[str, Any]:
    """The package's default threshold from the held-out sweep (compress.calibrate), in its manifest."""
    folder = cfg.calibration_data or cfg.data
    if not (Path(folder) / "detection.json").is_file():
        if cfg.calibration_data:
            raise ExportError(f"--calibration-data {folder}: no detection.json (boxes with their phrases)")
        return pkg.read_manifest(tmp)  # grounding-only data: the threshold stays the default
    record = calibrate.calibrate_package(tmp, folder, limit=cfg.eval_limit, threads=cfg.threads,
                                         noise=calibrate.DEFAULT_NOISE,
                                         progress=progress_line(), rule=cfg.calibration_rule)
    return calibrate.write_calibration(tmp, record)


def _quantised(cfg: ExportConfig, model, mcfg: ModelConfig, scratch: Path):
    """(qmodel or None, the float model whose weights the package ships, quant info or None)."""
    if cfg.int8 is None:
        return None, model, None
    from compress import quantize

    qdir = Path(cfg.int8)
    if cfg.int8 == "auto":
        qdir = scratch / "quant"
        quantize.quantize(quantize.QuantizeConfig(checkpoint=cfg.checkpoint, data=cfg.data, out=str(qdir),
                                                  config=cfg.config, max_drop=cfg.max_drop, sensitivity=True,
                                                  canvas=cfg.canvas))
    try:
        qmodel, float_model, info = quantize.load_quantized(qdir, cfg.checkpoint, mcfg)
    except quantize.QuantizeError as e:
        raise ExportError(str(e)) from None
    return qmodel, float_model, {"dir": qdir, "info": info}


def _write_package(cfg: ExportConfig, tmp: Path, model, qmodel, mcfg: ModelConfig, buckets, quant, meta,
                   shipped) -> dict[str, Any]:
    tokenizer = TokenizerSource.of_checkpoint(meta["path"])
    parts = write_graphs(tmp, model, qmodel, mcfg, buckets, cfg.cpu_int8, cfg.text_words, tokenizer,
                         fold_shapes=cfg.fold_shapes, openvino_check=cfg.openvino_check, shipped=shipped)
    parts["graphs"]["detector"]["shape_arithmetic"] = "folded" if cfg.fold_shapes else "computed"
    precision = "int8" if qmodel is not None else "fp32"
    name = cfg.name or (f"{mcfg.name}-int8" if qmodel is not None else mcfg.name)
    extra: dict[str, Any] = {"checkpoint": {"path": str(cfg.checkpoint), "task": meta.get("task")}}
    distilled = distillation_record(meta, model)
    if distilled is not None:
        extra["distillation"] = distilled
    if quant is not None:
        extra["quantization"] = quant["info"]
    level_sizes = model.level_sizes(*mcfg.input_hw) if mcfg.input.style == "official" else ()
    manifest = build_manifest(name, mcfg, buckets, parts, file_table(tmp), precision, extra, level_sizes,
                              tokenizer.lowercase)
    pkg.write_manifest(tmp, manifest)
    return manifest


def distillation_record(meta: dict[str, Any], student: FiberForGrounding) -> dict[str, Any] | None:
    """The manifest's ``distillation`` for a checkpoint written by compress.distill (None otherwise):
    the teacher and its config, the KD weights, both detectors' GFLOPs at batch 1 (from the
    configs) and the teacher's held-out accuracy when its run folder holds train.evaluate's
    ``eval.json`` (``TEACHER_RUN/eval.json`` next to ``TEACHER_RUN/final``)."""
    kd = meta.get("distill")
    if not isinstance(kd, dict):
        return None
    from fiber.flops import giga, model_flops
    from fiber.config import get_config

    record: dict[str, Any] = {k: kd.get(k) for k in ("teacher", "teacher_config", "weights")}
    tokens = pkg.DEFAULT_BUCKETS[0]
    student_flops = model_flops(student, tokens)["detector"]
    try:
        teacher_cfg = get_config(str(kd.get("teacher_config")))
    except ValueError:
        teacher_cfg = None            # a teacher config that is not a named one: FLOPs not known here
    teacher_flops = model_flops(FiberForGrounding(teacher_cfg).eval(), tokens)["detector"] if teacher_cfg else None
    record["detector_gflops"] = {"student": giga(student_flops),
                                 "teacher": giga(teacher_flops) if teacher_flops else None,
                                 "tokens": tokens}
    record["flops_ratio"] = round(teacher_flops / student_flops, 2) if teacher_flops else None
    record["teacher_accuracy"] = None
    teacher_eval = Path(str(kd.get("teacher", ""))).parent / "eval.json"
    if kd.get("teacher") and teacher_eval.is_file():
        try:
            ev = json.loads(teacher_eval.read_text())
            record["teacher_accuracy"] = {"split": ev.get("split"), "step": ev.get("step"),
                                          **{k: round(float(ev["metrics"][k]), 3)
                                             for k in ("R@1", "R@5", "R@10", "mAP") if k in ev["metrics"]}}
        except (OSError, ValueError, KeyError, TypeError):
            pass                      # unreadable: the record says "not known" rather than failing
    return record


def _measure(cfg: ExportConfig, tmp: Path, float_model, mcfg, buckets, data: EvalData, quant, meta
             ) -> dict[str, Any]:
    """FP32 (and INT8) accuracy of the package through the runtime; runs the guard for INT8.

    An INT8 package's FP32 baseline is ``float_model``: the float model it ships, with the package's
    word table (``shipped_text_model``, made once for the graphs and this), through the runtime's
    Detector over the torch adapter (fiber.torch_engines): the same tokeniser, buckets, pre- and
    post-processing as the package, without exporting an FP32 twin. Unused for an FP32 package."""
    t0 = time.perf_counter()
    if quant is None:
        return {"fp32": evaluate_package(tmp, data, False, cfg.threads),
                "seconds": round(time.perf_counter() - t0, 1)}
    from fiber.torch_engines import torch_engines

    tokenizer = checkpoint_io.tokenizer_file(meta["path"])
    with torch_engines(float_model, mcfg, buckets, tokenizer) as baseline:
        out = {"fp32": evaluate_engines(baseline, data, progress=progress_line())}
    out["int8"] = evaluate_package(tmp, data, False, cfg.threads)
    sensitivity = Path(quant["dir"]) / "sensitivity.json"
    guard(out["fp32"], out["int8"], cfg.max_drop, pkg.DETECTOR_GRAPH + " (Q/DQ)", sensitivity)
    if (tmp / pkg.DETECTOR_CPU_GRAPH).is_file():
        out["int8_cpu"] = evaluate_package(tmp, data, True, cfg.threads)
        guard(out["fp32"], out["int8_cpu"], cfg.max_drop, pkg.DETECTOR_CPU_GRAPH, sensitivity)
    if openvino_installed():
        out["int8_openvino"] = evaluate_package(tmp, data, False, cfg.threads, backend="openvino")
        if int8_pairs_saturate():
            # OpenVINO's int8 kernels add uint8 x int8 pairs in saturating int16 on an x86 CPU without
            # VNNI (fiber-nano INT8: R@1 77.8 vs FP32 81.6 on an AVX2 EPYC); the runtime does not run
            # INT8 packages on OpenVINO there (engines.auto_cpu_backend, engines.autotune), so this
            # path is measured and recorded but is not the one guarded on this CPU
            out["int8_openvino_saturating_cpu"] = True
        else:
            guard(out["fp32"], out["int8_openvino"], cfg.max_drop, pkg.DETECTOR_GRAPH + " on OpenVINO",
                  sensitivity)
    out["max_drop"] = cfg.max_drop
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _agreement_guarded(int8: str) -> bool:
    """Is ``int8`` a QDIR whose guard is the FP32/INT8 agreement (it then holds its own images)?"""
    if int8 == "auto":
        return False
    from compress import quantize

    try:
        return quantize.read_quant_json(Path(int8)).get("guard") == "agreement"
    except quantize.QuantizeError:
        return False                  # reported where the QDIR is loaded


def _measure_agreement(cfg: ExportConfig, tmp: Path, model, mcfg, buckets, quant, meta) -> dict[str, Any]:
    """The agreement guard of an INT8 package whose QDIR was guarded by agreement
    (compress.agreement): the package's detector.onnx (and CPU file) on ONNX Runtime against the FP32
    PyTorch model whose weights it ships, on the QDIR's held-out images; AccuracyGuardError below
    the QDIR's min_agreement. Returns the manifest's ``accuracy`` entries."""
    from compress import agreement as ag
    from compress import quantize
    from fiber.torch_engines import torch_engines

    t0 = time.perf_counter()
    qmeta = quantize.read_quant_json(Path(quant["dir"]))
    items = [ag.ProbeItem(Path(i["image"]), i["prompt"], i.get("spans")) for i in qmeta.get("agreement_items", [])]
    missing = [str(i.image) for i in items if not i.image.is_file()]
    if not items or missing:
        raise ExportError(f"{quant['dir']}: the agreement guard's held-out images are "
                          f"{'missing: ' + ', '.join(missing[:3]) if missing else 'not recorded'}; re-run compress.quantize")
    top_k = int(qmeta["agreement"]["final"].get("top_k") or ag.DEFAULT_TOP_K)
    least = float(qmeta["agreement"]["min_agreement"])
    tol = float(qmeta["agreement"].get("max_logit_diff", ag.DEFAULT_MAX_LOGIT_DIFF))
    tokenizer = checkpoint_io.tokenizer_file(meta["path"])
    reference = ag.run_items(torch_engines(model, mcfg, buckets, tokenizer), items, top_k, progress=progress_line())
    out: dict[str, Any] = {}
    for key, use_cpu, graph in (("int8", False, pkg.DETECTOR_GRAPH + " (Q/DQ)"),
                                ("int8_cpu", True, pkg.DETECTOR_CPU_GRAPH)):
        if use_cpu and not (tmp / pkg.DETECTOR_CPU_GRAPH).is_file():
            continue
        opts: dict[str, Any] = {"cache_dir": "", "use_cpu_file": use_cpu}
        if cfg.threads:
            opts["intra_op_threads"] = cfg.threads
        with engines.load(tmp, "onnxruntime", **opts) as e:
            record = ag.compare(reference, ag.run_items(e, items, top_k, progress=progress_line()))
        verdict = ag.passes(record, least, tol)
        out[key] = {**record, "top_k": top_k, "reference": "PyTorch FP32", "other": f"{graph} on ONNX Runtime",
                    "passed_by": verdict}
        if verdict is None:
            raise AccuracyGuardError(
                f"accuracy guard: {graph} keeps {record['agreement']:.3f} of FP32's top-{top_k} boxes per phrase "
                f"(allowed: at least {least}) and its max |logit diff| {record['max_abs_logit_diff']:.4g} exceeds "
                f"{tol}; "
                f"{worst_layers(Path(quant['dir']) / 'sensitivity.json')}. Nothing was written. Re-run "
                "compress.quantize with --sensitivity or allow a lower --min-agreement")
    return {"guard": "agreement", "agreement": {**out, "min_agreement": least, "max_logit_diff": tol},
            "seconds": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------- CLI

def _buckets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--buckets must be comma-separated integers, got {text!r}") from None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint folder")
    p.add_argument("--out", required=True, help="model package folder to write")
    p.add_argument("--int8", default=None, metavar="QDIR|auto",
                   help="INT8 package from a compress.quantize folder ('auto': quantize with defaults now)")
    p.add_argument("--data", default=None, help="held-out data folder (grounding.json / detection.json)")
    p.add_argument("--max-drop", type=float, default=1.0, help="accuracy guard: allowed INT8 R@1 drop (points)")
    p.add_argument("--buckets", type=_buckets, default=None, help="text buckets, e.g. 16,32,64")
    p.add_argument("--canvas", type=parse_canvas, default=None, metavar="HxW",
                   help="the fixed canvas the detector runs at (multiples of 32). Official-input configs: e.g. "
                        "512x672 for an edge deployment (default the config's, FIBER-B 800x1344); images are "
                        "resized by the official rule and scaled down to fit it. Letterbox configs: e.g. "
                        "224x288 for a 4:3 camera (default the square img_size); images are scaled to fit it")
    p.add_argument("--cpu-int8", default=cpu_int8.DEFAULT, choices=cpu_int8.METHODS,
                   help="CPU variant of an INT8 package's detector (detector.cpu.onnx)")
    p.add_argument("--config", default=None, help="refuse a checkpoint whose config has another name")
    p.add_argument("--name", default=None, help="package name (default: <config>[-int8])")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N entries/images")
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime CPU threads")
    p.add_argument("--text-words", default="int8", choices=TEXT_WORDS,
                   help="text.onnx's word-embedding table: per-row int8 (4x smaller file) or fp32")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing package folder")
    p.add_argument("--fold-shapes", action=argparse.BooleanOptionalAction, default=True,
                   help="fold the detector's shape arithmetic into constants (--no-fold-shapes: skip its "
                        "probe runs, the export's memory peak; FIBER-B at 800x1344 needs >19 GB with them)")
    p.add_argument("--openvino-check", action=argparse.BooleanOptionalAction, default=None,
                   help="check that OpenVINO with static shapes reproduces the detector's reference outputs "
                        "(a child process, seconds; minutes at FIBER-B size), so that OpenVINO may compile "
                        "it for static shapes, ~1.2-1.3x faster (default: INT8 packages only)")
    p.add_argument("--memory-check", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse to start when the memory available is below the export's estimated peak")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="choose the default score threshold on held-out data (compress.calibrate: "
                        "phrase-correct boxes, prompts with absent hard negatives; see --calibration-rule)")
    p.add_argument("--calibration-rule", choices=calibrate.RULES, default="balanced",
                   help="balanced: the highest min(precision, recall), as many wrong boxes as missed "
                        "objects; f1: the highest F1")
    p.add_argument("--calibration-data", default=None, metavar="DIR",
                   help="held-out folder with detection.json for --calibrate (default: --data)")
    return p


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    return ExportConfig(checkpoint=args.checkpoint, out=args.out, int8=args.int8, data=args.data,
                        max_drop=args.max_drop, buckets=args.buckets, overwrite=args.overwrite,
                        config=args.config, name=args.name, cpu_int8=args.cpu_int8,
                        eval_limit=args.eval_limit, threads=args.threads, text_words=args.text_words,
                        calibrate=args.calibrate, calibration_data=args.calibration_data,
                        calibration_rule=args.calibration_rule,
                        canvas=args.canvas, memory_check=args.memory_check, fold_shapes=args.fold_shapes,
                       openvino_check=args.openvino_check)


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = export_package(config_from_args(args))
    except (ExportError, FileExistsError, ValueError, onnx_graph.OnnxExportError, engines.EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = result.manifest
    sizes = ", ".join(f"{n} {f['bytes'] / 1e6:.2f} MB" for n, f in m["files"].items() if n.endswith(".onnx"))
    print(f"wrote {result.path} ({m['precision']}): {sizes}")
    for key, a in m["accuracy"].get("agreement", {}).items():
        if isinstance(a, dict):
            print(f"  agreement {key} vs FP32: {a['agreement']:.3f} of the top-{a['top_k']} boxes per phrase "
                  f"(top-1 {a['top1_agreement']:.3f}), max |logit diff| {a['max_abs_logit_diff']:.4g}")
    for key in ("fp32", "int8", "int8_cpu", "int8_openvino"):
        if key in m["accuracy"]:
            print(f"  accuracy {key}: " + ", ".join(f"{k} {v}" for k, v in m["accuracy"][key].items()))
    if "calibration" in m:
        c = m["calibration"]
        print(f"  default threshold {c['threshold']} (held-out precision {c['precision']}, recall {c['recall']}, "
              f"F1 {c['f1']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
