"""INT8 post-training quantisation of a fine-tuned FIBER with NVIDIA modelopt, a per-layer
sensitivity pass and optional quantisation-aware fine-tuning.

    python -m compress.quantize --checkpoint CKPT --data DIR --out QDIR [--calib-images 512]
        [--method max|entropy|percentile] [--sensitivity] [--max-drop 1.0] [--qat-steps N]

What is quantised (modelopt.torch.quantization, explicit INT8 as TensorRT wants it): the inputs
(per-tensor, symmetric, calibrated) and weights (per-output-channel, symmetric) of every
``nn.Linear`` and ``nn.Conv2d`` of the detector path; with ``--attention`` also both operands of
the attention matmuls that run through ``fiber.layers.Attend`` (q and k of q k^T, the softmax
probabilities and v; per-tensor symmetric int8, calibrated like every activation; ``QuantMatMul``
registers the MatMul module with modelopt). LayerNorm, GELU, softmax, residual adds, the box
decode and attention called as the plain ``fiber.layers.attend`` function (the Swin window and
i2t attention) stay FP32. The text prefix (the layers of text.onnx) is not quantised: it
runs once per prompt. ``--attention`` is off by default: on fiber-nano with every attention
(Swin windows included, through a local Attend patch) it made the detector ~10% slower on
OpenVINO and ~3% slower on ONNX Runtime, at the same R@1.

Calibration: ``--calib-images`` distinct images of DIR (grounding entries, else detection images),
each with a realistic prompt from the dataset (its caption; the class-name prompt for detection
images), letterboxed and tokenised exactly like serving (runtime.preprocess / runtime.tokenize).
The last ``--eval-entries`` grounding entries (their images excluded from calibration) are the
held-out subset on which accuracy is measured through the runtime (compress.accuracy).

Sensitivity (``--sensitivity``): quantizer groups (by module kind, e.g. "t2i.out (gated)",
"ln_adjacent" = every activation right after a LayerNorm; and by block, e.g. "image.stage3.block1")
are switched back to FP32 one at a time; the R@1 each recovers on the held-out subset and the
output error it removes rank them (QDIR/sensitivity.json, worst first). While INT8 R@1 is more than
``--max-drop`` below FP32, the worst groups stay FP32 (greedily, kept only when R@1 does not get
worse). ``--qat-steps N`` then fine-tunes the fake-quantised model with train.loop.fit and the fine
task (QDIR/qat/ holds the fine-tuned weights as a checkpoint).

Official fine models (DyHead; ``fiber-b-fine``, ``fiber-golden-fine``): calibration and held-out
images are prepared by the official input rule on the config's canvas (``--canvas HxW`` for another)
and prompts tokenised with the checkpoint's own tokenizer, as their packages do. The whole DyHead
stays FP32 by rule (``FP32_BY_RULE_PREFIX``): its modulated deformable convs (TensorRT's plugin has
no INT8), the offset convs that feed them, GroupNorm, scale attention, DyReLU and the predictors;
the fused backbones (Swin, RoBERTa's fused layers, the cross-attention) and the FPN get INT8.

Guard (``--guard``): "recall" (R@1 on held-out grounding entries, above) or "agreement", for weights
no labelled data here fits (a converted official release, random FIBER-B): the last
``--agreement-images`` images are held out and run through FP32 and fake-quantised INT8 in
grounding mode (compress.agreement: top-K detections per phrase, same phrase and box IoU >= 0.5;
max |logit| difference); the sensitivity pass then ranks groups by the agreement they recover and
keeps the worst in FP32 while agreement < ``--min-agreement``. "auto": agreement for official
(DyHead) configs or data without grounding entries, recall otherwise. DATA may also be a folder of
photos (no json): each gets a fixed detection prompt.

QDIR (written atomically; no pickle): quant.json (settings, checkpoint sha256, disabled quantizers,
FP32/INT8 accuracy on the subset), amax.safetensors (every quantizer's amax), sensitivity.json,
qat/ (optional). ``load_quantized`` re-applies it to a fresh model (compress.export --int8 QDIR).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import io
import json
import re
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from common.atomic import atomic_dir
from common.package import sha256_file
from common.progress import progress_line
from compress.accuracy import EvalData, evaluate_engines, find_data
from fiber.checkpoint import (WEIGHTS_FILE, CheckpointError, load_checkpoint, load_fine_model, load_model_state,
                              resolve_checkpoint_dir, save_checkpoint, tokenizer_file)
from fiber.config import ModelConfig, parse_canvas
from fiber.models import FiberForGrounding
from fiber.package import TOKENIZER_SRC, input_spec, resolve_buckets
from fiber.torch_engines import torch_engines

QUANT_FORMAT, QUANT_VERSION = "fiber-edge-quant", 1
QUANT_JSON, AMAX_FILE, SENSITIVITY_JSON, QAT_DIR = "quant.json", "amax.safetensors", "sensitivity.json", "qat"
METHODS = ("max", "entropy", "percentile")
GROUPINGS = ("all", "kinds", "blocks")
QUANTISED_MODULES = ("nn.Linear", "nn.Conv2d")
MATMUL_MODULE = "MatMul"                       # fiber.layers.MatMul, registered by register_matmul
QUANTIZER_SUFFIXES = ("input_quantizer", "weight_quantizer", "other_quantizer")
NOT_QUANTISED = ["LayerNorm", "GELU", "softmax", "attention matmuls without Attend (Swin window, i2t)",
                 "residual adds", "box decode", "text prefix (text.onnx)"]


# Quantizers that stay FP32 whatever the sensitivity says, and why.
FP32_BY_RULE = {
    "fpn.fpn_layer4.input_quantizer":
        "OpenVINO 2026.4 miscompiles a quantised conv whose FP32 output feeds both a Q/DQ conv and the "
        "top-down Resize (the FPN top level): the whole stride-32 level comes out wrong (logits off by "
        "~0.5-1.0); TensorRT and ONNX Runtime are fine. One 3x3 conv on the coarsest map, negligible time.",
}


# Module-name prefixes that stay FP32 for a head kind, and why.
FP32_BY_RULE_PREFIX = {
    "dyhead": ("head.", "the DyHead stays FP32/FP16: its modulated deformable convs have no INT8 (TensorRT's "
                        "ModulatedDeformConv2d plugin is FP32/FP16 only), so the offset convs that feed them, "
                        "GroupNorm, scale attention, DyReLU and the 1x1 predictors stay with them; no Q/DQ "
                        "reaches a DeformConv"),
}
GUARDS = ("auto", "recall", "agreement")


def fp32_rule(name: str, cfg: ModelConfig) -> str | None:
    """Why quantizer ``name`` stays FP32 whatever the sensitivity says (None: it may be INT8)."""
    if name in FP32_BY_RULE:
        return FP32_BY_RULE[name]
    prefix = FP32_BY_RULE_PREFIX.get(cfg.head.kind)
    if prefix is not None and name.startswith(prefix[0]):
        return prefix[1]
    return None


class QuantizeError(ValueError):
    """Bad quantisation input (too few images, wrong checkpoint/QDIR, ...) with a clear message."""


@dataclass(frozen=True)
class QuantizeConfig:
    checkpoint: str                  # fine-tuned checkpoint folder
    data: str                        # data folder: grounding.json and/or detection.json + images
    out: str                         # QDIR to write
    calib_images: int = 512          # distinct calibration images (fewer if DIR has fewer)
    min_calib_images: int = 64       # refuse to calibrate on fewer
    method: str = "max"              # activation calibration: max | entropy | percentile
    percentile: float = 99.99        # for method "percentile"
    sensitivity: bool = False        # rank quantizer groups, keep the worst in FP32 while over max_drop
    groups: str = "all"              # sensitivity groups: "kinds" (module kinds) | "blocks" | "all"
    max_drop: float = 1.0            # allowed INT8 R@1 drop on the held-out subset (points)
    eval_entries: int = 64           # held-out grounding entries (the tail of DIR) for accuracy
    qat_steps: int = 0               # quantisation-aware fine-tuning steps (0 = PTQ only)
    qat_lr: float = 1e-5             # QAT learning rate
    qat_batch_size: int = 8          # QAT global batch size
    batch_size: int = 8              # calibration batch size
    attention: bool = False          # also quantise the Attend matmuls (q, k, probabilities, v)
    buckets: tuple[int, ...] | None = None  # text buckets (default: the package defaults)
    config: str | None = None        # refuse a checkpoint of another config name
    overwrite: bool = False          # replace an existing QDIR
    seed: int = 0
    guard: str = "auto"              # "recall" | "agreement" | "auto" (module docstring)
    min_agreement: float = 0.8       # agreement guard: least share of FP32's top-K detections INT8 keeps
    agreement_images: int = 8        # held-out images of the agreement guard (the tail of DATA)
    agreement_top_k: int = 5         # boxes per phrase compared
    max_logit_diff: float = 0.05     # agreement guard: also passes when every logit is this close (near-ties)
    canvas: tuple[int, int] | None = None  # the canvas to calibrate at (official or letterbox; default the config's)

    def __post_init__(self):
        if self.groups not in GROUPINGS:
            raise QuantizeError(f"--groups {self.groups!r} is not one of {', '.join(GROUPINGS)}")
        if self.method not in METHODS:
            raise QuantizeError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.calib_images < self.min_calib_images:
            raise QuantizeError(f"--calib-images {self.calib_images} is below the minimum of "
                                f"{self.min_calib_images} calibration images")
        if self.guard not in GUARDS:
            raise QuantizeError(f"--guard {self.guard!r} is not one of {', '.join(GUARDS)}")
        if not 0.0 <= self.min_agreement <= 1.0 or self.agreement_images < 1 or self.agreement_top_k < 1:
            raise QuantizeError("--min-agreement must be in [0, 1], --agreement-images and --agreement-top-k >= 1")
        if self.qat_steps < 0 or self.eval_entries < 1 or self.batch_size < 1:
            raise QuantizeError("--qat-steps must be >= 0, --eval-entries and --batch-size >= 1")


# ----------------------------------------------------------------------------- modelopt

def modelopt_config(method: str, attention: bool = False) -> dict[str, Any]:
    """INT8 for Linear/Conv2d: weights per-channel (axis 0), inputs per-tensor; symmetric. With
    ``attention`` also both operands of every ``fiber.layers.MatMul`` (per-tensor).

    No calibration algorithm: ``calibrate`` runs it (max for weights; max or a histogram method
    for activations).
    """
    calibrator = "max" if method == "max" else "histogram"
    activation = {"num_bits": 8, "axis": None, "calibrator": calibrator}
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for cls in QUANTISED_MODULES:
        entries.append({"quantizer_name": "*weight_quantizer", "parent_class": cls,
                        "cfg": {"num_bits": 8, "axis": 0}})
        entries.append({"quantizer_name": "*input_quantizer", "parent_class": cls, "cfg": activation})
    if attention:
        for which in ("*input_quantizer", "*other_quantizer"):
            entries.append({"quantizer_name": which, "parent_class": MATMUL_MODULE, "cfg": activation})
    return {"quant_cfg": entries, "algorithm": None}


# Libraries whose modelopt plugins (loaded whenever they are installed) fiber-edge never needs: it
# quantises its own modules. transformers comes with the MiniLM text package; its plugins cost ~2 s
# of every process's first modelopt import.
MODELOPT_HIDDEN = frozenset({"transformers", "sentence_transformers", "accelerate", "diffusers", "peft", "trl",
                             "vllm", "megatron", "transformer_engine", "apex", "fairscale", "torch_geometric"})


class _HideFromModelopt(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in MODELOPT_HIDDEN:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def modelopt_quantization():
    """``modelopt.torch.quantization``; its first import in a process runs with MODELOPT_HIDDEN
    hidden, so modelopt skips their plugins (it treats them as not installed). A library imported
    before that keeps its plugin; afterwards each imports as usual."""
    name = "modelopt.torch.quantization"
    if name not in sys.modules:
        finder = _HideFromModelopt()
        sys.meta_path.insert(0, finder)
        try:
            importlib.import_module(name)
        finally:
            sys.meta_path.remove(finder)
    return sys.modules[name]


def register_matmul() -> None:
    """Teach modelopt to quantise ``fiber.layers.MatMul`` (once per process)."""
    mtq = modelopt_quantization()
    from modelopt.torch.quantization.nn import QuantModuleRegistry, TensorQuantizer
    from modelopt.torch.quantization.nn.modules.quant_module import QuantModule
    from modelopt.torch.quantization.tensor_quant import QUANT_DESC_8BIT_PER_TENSOR

    from fiber.layers import MatMul

    if MatMul in QuantModuleRegistry:
        return

    class QuantMatMul(QuantModule):
        """``a @ b`` with ``input_quantizer`` on a and ``other_quantizer`` on b."""

        def _setup(self):
            self._register_temp_attribute("input_quantizer", TensorQuantizer(QUANT_DESC_8BIT_PER_TENSOR))
            self._register_temp_attribute("other_quantizer", TensorQuantizer(QUANT_DESC_8BIT_PER_TENSOR))

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return super().forward(self.input_quantizer(a), self.other_quantizer(b))

    mtq.register(original_cls=MatMul, quantized_cls=QuantMatMul)


def insert_quantizers(model: FiberForGrounding, method: str = "max", attention: bool = False) -> FiberForGrounding:
    """Add (uncalibrated) modelopt quantizers to ``model`` in place; the text prefix gets none."""
    mtq = modelopt_quantization()

    register_matmul()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # modelopt prints
        warnings.simplefilter("ignore")
        mtq.quantize(model, modelopt_config(method, attention), forward_loop=None)
    for name in quantizer_names(model, enabled_only=True):
        if _in_text_prefix(name, model.cfg) or fp32_rule(name, model.cfg) is not None:
            _quantizer(model, name).disable()
    return model


def _in_text_prefix(name: str, cfg: ModelConfig) -> bool:
    m = re.match(r"backbone\.text\.encoder\.layer\.(\d+)\.", name)
    return name.startswith("backbone.text.embeddings.") or (m is not None and int(m.group(1)) < cfg.first_fused_text_layer)


def _quantizer(model: torch.nn.Module, name: str):
    return model.get_submodule(name)


def quantizer_names(model: torch.nn.Module, enabled_only: bool = False) -> list[str]:
    """Names of the model's TensorQuantizers (``<module>.input_quantizer`` / ``weight_quantizer`` /
    ``other_quantizer`` (a MatMul's second operand)); output quantizers are never used."""
    modelopt_quantization()
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [n for n, m in model.named_modules() if isinstance(m, TensorQuantizer)
            and n.endswith(QUANTIZER_SUFFIXES) and (m.is_enabled or not enabled_only)]


@torch.no_grad()
def calibrate(model: FiberForGrounding, loop: Callable[[FiberForGrounding], None], method: str,
              percentile: float = 99.99) -> None:
    """Collect statistics with ``loop(model)`` and load every enabled quantizer's amax."""
    modelopt_quantization()
    from modelopt.torch.quantization.model_calib import enable_stats_collection
    from modelopt.torch.quantization.nn import TensorQuantizer

    model.eval()
    enable_stats_collection(model)
    loop(model)
    for _, q in model.named_modules():
        if not isinstance(q, TensorQuantizer) or q._disabled:
            continue
        calib = getattr(q, "_calibrator", None)
        if calib is None:
            continue
        if type(calib).__name__ == "HistogramCalibrator":
            kwargs = {"percentile": percentile} if method == "percentile" else {}
            q.load_calib_amax(method, **kwargs)
        else:
            q.load_calib_amax()
        q.enable_quant()
        q.disable_calib()


def amax_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every enabled quantizer's amax (float32, CPU)."""
    out = {}
    for name in quantizer_names(model, enabled_only=True):
        amax = _quantizer(model, name).amax
        if amax is None:
            raise QuantizeError(f"quantizer {name} has no amax (it saw no calibration data)")
        out[name] = amax.detach().float().cpu().contiguous().clone()
    return out


def set_enabled(model: torch.nn.Module, names: Sequence[str], enabled: bool) -> None:
    for name in names:
        q = _quantizer(model, name)
        q.enable() if enabled else q.disable()


# ----------------------------------------------------------------------------- quantizer groups

KINDS: tuple[tuple[str, str], ...] = (
    ("attn.qk (q, k)", r"\.attend\.qk$"),
    ("attn.pv (probs, v)", r"\.attend\.pv$"),
    ("image.patch_embed", r"^backbone\.image\.patch_embed\."),
    ("image.patch_merging", r"\.downsample\.reduction$"),
    ("swin.qkv", r"\.blocks\.\d+\.attn\.qkv$"),
    ("swin.proj", r"\.blocks\.\d+\.attn\.proj$"),
    ("swin.mlp.fc1", r"\.blocks\.\d+\.mlp\.fc1$"),
    ("swin.mlp.fc2", r"\.blocks\.\d+\.mlp\.fc2$"),
    ("i2t.qkv", r"\.attn\.(qkv_i2t|qkv_text_i2t)$"),
    ("i2t.out (gated)", r"\.attn\.proj_i2t$"),
    ("t2i.qkv", r"\.crossattention_t2i\.self\.(query|key|value)$"),
    ("t2i.out (gated)", r"\.crossattention_t2i\.output\.dense$"),
    ("text.self_attn.qkv", r"\.attention\.self\.(query|key|value)$"),
    ("text.self_attn.out", r"\.attention\.output\.dense$"),
    ("text.ffn.in", r"\.intermediate\.dense$"),
    ("text.ffn.out", r"\.encoder\.layer\.\d+\.output\.dense$"),
    ("fpn", r"^fpn\."),
    ("head.tower", r"^head\.tower\."),
    ("head.outputs", r"^head\.(bbox_pred|centerness|dot_product_projection_image|dot_product_projection_text)$"),
)
# Modules whose *input* is a LayerNorm output (or the L2-normalised text of the head).
LN_ADJACENT = (r"\.attn\.qkv$|\.mlp\.fc1$|\.downsample\.reduction$|\.attn\.qkv_i2t$|\.attn\.qkv_text_i2t$"
               r"|\.attention\.self\.(query|key|value)$|\.intermediate\.dense$"
               r"|\.crossattention_t2i\.self\.query$|^head\.dot_product_projection_text$")
BLOCKS = ((r"^backbone\.image\.layers\.(\d+)\.blocks\.(\d+)\.", lambda m: f"image.stage{int(m[1]) + 1}.block{m[2]}"),
          (r"^backbone\.image\.layers\.(\d+)\.downsample\.", lambda m: f"image.stage{int(m[1]) + 1}.merge"),
          (r"^backbone\.text\.encoder\.layer\.(\d+)\.", lambda m: f"text.layer{m[1]}"),
          (r"^fpn\.", lambda m: "fpn"), (r"^head\.", lambda m: "head"))


def quantizer_groups(names: Sequence[str], grouping: str = "all") -> dict[str, list[str]]:
    """Group quantizer names ("<module>.input_quantizer"/"...weight_quantizer") by module kind
    ("kind:..."; with the LayerNorm-adjacent activations) and by block ("block:..."); ``grouping``
    keeps "kinds", "blocks" or "all". A quantizer belongs to several groups."""
    groups: dict[str, list[str]] = {}
    for name in names:
        module, _, which = name.rpartition(".")
        for kind, pattern in KINDS:
            if re.search(pattern, module):
                groups.setdefault(f"kind:{kind}", []).append(name)
                break
        else:
            groups.setdefault("kind:other", []).append(name)
        if which == "input_quantizer" and re.search(LN_ADJACENT, module):
            groups.setdefault("kind:ln_adjacent", []).append(name)
        for pattern, label in BLOCKS:
            m = re.match(pattern, module)
            if m:
                groups.setdefault(f"block:{label(m)}", []).append(name)
                break
    if grouping != "all":
        keep = "kind:" if grouping == "kinds" else "block:"
        groups = {g: n for g, n in groups.items() if g.startswith(keep)}
    return groups


# ----------------------------------------------------------------------------- data

@dataclass(frozen=True)
class CalibItem:
    image: Path
    prompt: str
    spans: list | None             # per phrase, char spans (None: the prompt's ". " names)


def split_data(data: EvalData, calib_images: int, eval_entries: int) -> tuple[list[CalibItem], EvalData]:
    """(calibration items: distinct images with a prompt each, the held-out evaluation subset).

    The held-out subset is the last ``eval_entries`` grounding entries; calibration uses other
    images only.
    """
    held = data.subset(grounding=eval_entries, detection=0, tail=True)
    held = EvalData(held.grounding, None, data.source)
    held_images = {s.image for s in held.grounding.samples} if held.grounding else set()
    return data_items(data, held_images)[:calib_images], held


def split_agreement(items: Sequence[CalibItem], calib_images: int, agreement_images: int
                    ) -> tuple[list[CalibItem], list[CalibItem]]:
    """(calibration items, the held-out agreement items: the last ``agreement_images``)."""
    if len(items) <= agreement_images:
        raise QuantizeError(f"the agreement guard holds out {agreement_images} images, but the data has only "
                            f"{len(items)} distinct images")
    return list(items[:-agreement_images])[:calib_images], list(items[-agreement_images:])


def load_items(folder: str | Path) -> tuple[EvalData | None, list[CalibItem]]:
    """A data folder's (EvalData, every distinct image with a prompt) or, for a folder of photos
    without grounding.json / detection.json, (None, the photos with compress.agreement's prompt)."""
    folder = Path(folder)
    if folder.is_dir() and not any((folder / f).is_file() for f in ("grounding.json", "detection.json")):
        from compress.agreement import photo_items

        return None, [CalibItem(it.image, it.prompt, None) for it in photo_items(folder)]
    data = find_data(folder)
    return data, data_items(data)


def data_items(data: EvalData, exclude: set | frozenset = frozenset()) -> list[CalibItem]:
    """Distinct images of ``data`` (not in ``exclude``) with a prompt each: grounding entries with
    their caption, then detection images with the class-name prompt."""
    items, seen = [], set(exclude)
    if data.grounding is not None:
        for s in data.grounding.samples:
            if s.image not in seen:
                seen.add(s.image)
                items.append(CalibItem(s.image, s.caption, [[list(sp) for sp in p.spans] for p in s.phrases]))
    if data.detection is not None:
        from fiber.data.prompts import build_detection_prompt

        prompt, spans = build_detection_prompt(data.detection.category_names)
        for im in data.detection.images:
            if im.image not in seen:
                seen.add(im.image)
                items.append(CalibItem(im.image, prompt, [[list(s)] for s in spans]))
    return items


def model_input(cfg: ModelConfig, buckets: Sequence[int], tokenizer: Path | None = None):
    """(runtime Preprocessor, PromptTokenizer) of the package ``cfg`` exports to: its input
    (``fiber.package.input_spec``, the rule the manifest is written by); the checkpoint's own
    tokenizer (case-sensitive) or the default WordPiece asset (lowercased)."""
    from runtime.preprocess import Preprocessor
    from runtime.tokenize import PromptTokenizer

    pre = Preprocessor.from_spec(input_spec(cfg))
    tok = PromptTokenizer(tokenizer or TOKENIZER_SRC, buckets=buckets, lowercase=tokenizer is None,
                          pad_id=cfg.text.pad_token_id)
    return pre, tok


def calibration_batches(items: Sequence[CalibItem], model: FiberForGrounding, buckets: Sequence[int],
                        batch_size: int, tokenizer: Path | None = None
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(image [B,3,H,W], text_hidden [B,T,D], mask [B,T]) batches, pre-processed like serving
    (``model_input``; ``tokenizer``: the checkpoint's own tokenizer.json or None)."""
    from fiber.data.evaluation import load_image_rgb

    cfg = model.cfg
    pre, tok = model_input(cfg, buckets, tokenizer)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = np.concatenate([pre(load_image_rgb(it.image))[0].copy() for it in chunk])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # truncation of long prompts is expected
            enc = [tok.encode(it.prompt, it.spans) for it in chunk]
        t = max(e.input_ids.shape[1] for e in enc)
        ids = np.full((len(enc), t), tok.pad_id, np.int64)
        mask = np.zeros((len(enc), t), np.int64)
        for i, e in enumerate(enc):
            ids[i, :e.input_ids.shape[1]], mask[i, :e.input_ids.shape[1]] = e.input_ids[0], e.attention_mask[0]
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        with torch.inference_mode():
            hidden = model.encode_text(ids_t, mask_t)
        yield torch.from_numpy(images), hidden.clone(), mask_t


# ----------------------------------------------------------------------------- measuring

class Judge:
    """Accuracy on the held-out subset (R@1 through the runtime), output error vs FP32 and, with
    ``agreement_items``, the agreement of the quantised model's detections with FP32's
    (compress.agreement). ``guard`` "recall" or "agreement" decides what ``score`` / ``ok`` read."""

    def __init__(self, fp32: FiberForGrounding, held: EvalData, probe: list, buckets: Sequence[int],
                 tokenizer: Path | None = None, agreement_items: Sequence[CalibItem] = (),
                 guard: str = "recall", min_agreement: float = 0.8, top_k: int = 5, max_logit_diff: float = 0.05):
        from compress.agreement import ProbeItem

        self.held, self.probe, self.buckets, self.tokenizer = held, probe, buckets, tokenizer
        self.guard, self.min_agreement, self.top_k = guard, min_agreement, top_k
        self.max_logit_diff = max_logit_diff
        self.items = [ProbeItem(it.image, it.prompt, it.spans) for it in agreement_items]
        with torch.inference_mode():
            self.reference = [fp32.detect(*b) for b in probe]
        self.fp32 = self.accuracy(fp32)
        self.fp32_runs = self._runs(fp32) if self.items else None

    def engines(self, model: FiberForGrounding):
        return torch_engines(model, model.cfg, self.buckets, self.tokenizer)

    def accuracy(self, model: FiberForGrounding) -> dict[str, float | None]:
        if self.held.grounding is None or not len(self.held.grounding):
            return {"R@1": None}
        return evaluate_engines(self.engines(model), self.held, progress=progress_line())

    def _runs(self, model: FiberForGrounding) -> list:
        from compress.agreement import run_items

        return run_items(self.engines(model), self.items, self.top_k, progress=progress_line())

    def agreement(self, model: FiberForGrounding) -> dict[str, Any] | None:
        """compress.agreement's record of ``model`` against FP32 (None without agreement items)."""
        from compress.agreement import compare

        if not self.items:
            return None
        return {**compare(self.fp32_runs, self._runs(model)), "top_k": self.top_k,
                "reference": "PyTorch FP32", "other": "fake-quantised PyTorch"}

    def score(self, m: dict[str, Any]) -> float | None:
        """What the guard reads: R@1, or the agreement in percent."""
        if self.guard == "agreement":
            return None if m.get("agreement") is None else 100.0 * m["agreement"]["agreement"]
        return m.get("R@1")

    def ok(self, m: dict[str, Any], max_drop: float) -> bool:
        """Within the guard's margin: R@1 at most ``max_drop`` below FP32, or agreement >= min_agreement."""
        if self.guard == "agreement":
            from compress.agreement import passes

            return m.get("agreement") is not None and passes(m["agreement"], self.min_agreement,
                                                              self.max_logit_diff) is not None
        return drop(self.fp32, m["accuracy"]) <= max_drop

    @torch.inference_mode()
    def output_error(self, model: FiberForGrounding) -> float:
        """Mean over probe batches of NMSE(token logits on real tokens) + NMSE(centerness) +
        mean |box error| / S."""
        total = 0.0
        for (image, hidden, mask), (boxes, logits, ctr) in zip(self.probe, self.reference):
            qb, ql, qc = model.detect(image, hidden, mask)
            real = mask[:, None, :].expand_as(logits).bool()
            total += float(((ql - logits)[real] ** 2).mean() / (logits[real].var() + 1e-12))
            total += float(((qc - ctr) ** 2).mean() / (ctr.var() + 1e-12))
            total += float((qb - boxes).abs().mean() / max(model.cfg.input_hw))
        return total / max(len(self.probe), 1)

    def measure(self, model: FiberForGrounding) -> dict[str, Any]:
        acc = self.accuracy(model)
        return {"accuracy": acc, "R@1": acc.get("R@1"), "output_error": self.output_error(model),
                "agreement": self.agreement(model)}


def drop(fp32: dict, current: dict) -> float:
    """FP32 R@1 minus current R@1 (0 when R@1 is unavailable)."""
    if fp32.get("R@1") is None or current.get("R@1") is None:
        return 0.0
    return float(fp32["R@1"]) - float(current["R@1"])


def sensitivity_pass(model: FiberForGrounding, judge: Judge, groups: dict[str, list[str]],
                     progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Switch each group to FP32 alone; records sorted worst first (most R@1 recovered, then the
    most output error removed)."""
    base = judge.measure(model)
    rows = []
    for group, names in groups.items():
        set_enabled(model, names, False)
        m = judge.measure(model)
        set_enabled(model, names, True)
        new, old = judge.score(m), judge.score(base)
        recovered = (new - old) if new is not None and old is not None else 0.0
        rows.append({"group": group, "quantizers": len(names), "R@1_fp32_group": m["R@1"],
                     **({"agreement_fp32_group": m["agreement"]["agreement"]} if m.get("agreement") else {}),
                     "recovered": round(recovered, 3),
                     "output_error": m["output_error"],
                     "error_removed": base["output_error"] - m["output_error"]})
        if progress:
            progress(f"  {group}: R@1 {m['R@1']}, {judge.guard} score {judge.score(m)}, "
                     f"output error {m['output_error']:.4g}")
    rows.sort(key=lambda r: (-r["recovered"], -r["error_removed"]))
    return rows


def keep_worst_in_fp32(model: FiberForGrounding, judge: Judge, rows: list[dict], groups: dict[str, list[str]],
                       max_drop: float, progress: Callable[[str], None] | None = None
                       ) -> tuple[list[str], dict[str, Any]]:
    """Greedy: while outside the guard's margin (``judge.ok``: R@1 more than ``max_drop`` below FP32,
    or agreement below the minimum), switch the next-worst group to FP32; keep it so only when the
    guard's score does not get worse. Returns (groups kept in FP32, the final measurement)."""
    current = judge.measure(model)
    kept: list[str] = []
    for row in rows:
        if judge.ok(current, max_drop):
            break
        if row["recovered"] <= 0 and row["error_removed"] <= 0:
            continue
        set_enabled(model, groups[row["group"]], False)
        m = judge.measure(model)
        new, old = judge.score(m), judge.score(current)
        if new is not None and old is not None and new < old:
            set_enabled(model, groups[row["group"]], True)
            continue
        kept.append(row["group"])
        current = m
        if progress:
            progress(f"  keep {row['group']} in FP32: R@1 {m['R@1']}, {judge.guard} score {judge.score(m)}")
    return kept, current


# ----------------------------------------------------------------------------- QAT

def quantisation_aware_training(model: FiberForGrounding, cfg: QuantizeConfig, run_dir: Path) -> dict[str, Any]:
    """Fine-tune the fake-quantised ``model`` in place with train.loop.fit and the fine task."""
    from train.data import load_stage2
    from train.loop import TrainConfig, fit
    from train.tasks import FineTask

    class QatTask(FineTask):
        def build_model(self):
            return model

    data = load_stage2(cfg.data, model.cfg)
    train_cfg = TrainConfig(max_steps=cfg.qat_steps, batch_size=cfg.qat_batch_size, lr=cfg.qat_lr,
                            warmup_steps=0, schedule="constant", ckpt_every=0, keep_last=1,
                            seed=cfg.seed, device="cpu", progress=False, log_every=max(1, cfg.qat_steps // 5))
    result = fit(QatTask(model.cfg, data), train_cfg, run_dir)
    model.eval()
    return {"steps": result.step, "lr": cfg.qat_lr, "batch_size": cfg.qat_batch_size,
            "last_loss": result.metrics.get("loss")}


def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's own weights (no quantizer buffers)."""
    return {k: v for k, v in model.state_dict().items() if "_quantizer." not in k}


# ----------------------------------------------------------------------------- the pipeline

@dataclass
class QuantizeResult:
    path: Path
    meta: dict[str, Any]


def _checkpoint_dir(checkpoint: str | Path) -> Path:
    try:
        return resolve_checkpoint_dir(checkpoint)
    except CheckpointError as e:
        raise QuantizeError(str(e)) from None


def load_fine(checkpoint: str | Path, expect_name: str | None = None) -> tuple[FiberForGrounding, ModelConfig]:
    """``fiber.checkpoint.load_fine_model`` for quantisation: (model in eval mode, its config); QuantizeError."""
    try:
        model, _ = load_fine_model(checkpoint, "quantisation", expect_name=expect_name)
    except CheckpointError as e:
        raise QuantizeError(str(e)) from None
    return model, model.cfg


def quantize(cfg: QuantizeConfig, log: Callable[[str], None] | None = None) -> QuantizeResult:
    """PTQ (+ sensitivity, + QAT) of ``cfg.checkpoint``; writes ``cfg.out``. Raises QuantizeError,
    FileExistsError, ValueError (bad data)."""
    log = log or (lambda s: None)
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"output {out} already exists (pass --overwrite to replace it)")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    cfg = replace(cfg, checkpoint=str(_checkpoint_dir(cfg.checkpoint)))  # RUN -> RUN/final
    fp32, mcfg = load_fine(cfg.checkpoint, cfg.config)
    if cfg.canvas is not None:
        try:
            mcfg = mcfg.with_canvas(tuple(cfg.canvas))
        except ValueError as e:
            raise QuantizeError(f"--canvas: {e}") from None
        fp32.cfg = mcfg
    try:
        buckets = resolve_buckets(mcfg, cfg.buckets)
    except ValueError as e:
        raise QuantizeError(f"--buckets: {e}") from None
    tokenizer = tokenizer_file(cfg.checkpoint)
    data, every = load_items(cfg.data)
    guard = resolve_guard(cfg.guard, mcfg, data)
    agreement_items: list[CalibItem] = []
    if guard == "agreement":
        held = EvalData(None, None, str(cfg.data))
        items, agreement_items = split_agreement(every, cfg.calib_images, cfg.agreement_images)
        where = f"{len(agreement_items)} held-out images for the agreement guard"
    else:
        items, held = split_data(data, cfg.calib_images, cfg.eval_entries)
        where = f"{cfg.eval_entries} grounding entries for evaluation"
    if len(items) < cfg.min_calib_images:
        raise QuantizeError(f"data {cfg.data}: only {len(items)} calibration images (after holding out "
                            f"{where}); at least {cfg.min_calib_images} are needed")
    log(f"calibrating on {len(items)} images ({cfg.method}) at {mcfg.input_hw[0]}x{mcfg.input_hw[1]}; guard: "
        f"{guard} ({where})")
    qmodel = _copy_model(fp32)
    insert_quantizers(qmodel, cfg.method, cfg.attention)
    bar = progress_line()  # a stderr line on a terminal only
    batches = lambda: calibration_batches(items, fp32, buckets, cfg.batch_size, tokenizer)  # noqa: E731
    total = -(-len(items) // cfg.batch_size)
    t_cal = time.perf_counter()
    calibrate(qmodel, lambda m: [m.detect(*b) for b in (bar(batches(), desc="calibration", total=total, unit="batch")
                                                        if bar else batches())],
              cfg.method, cfg.percentile)
    log(f"calibrated in {time.perf_counter() - t_cal:.1f} s")
    probe = list(calibration_batches(items[:min(2 * cfg.batch_size, 4 if guard == "agreement" else len(items))],
                                     fp32, buckets, cfg.batch_size, tokenizer))
    judge = Judge(fp32, held, probe, buckets, tokenizer, agreement_items, guard, cfg.min_agreement,
                  cfg.agreement_top_k, cfg.max_logit_diff)
    ptq = judge.measure(qmodel)
    log(f"FP32 R@1 {judge.fp32.get('R@1')}; INT8 PTQ R@1 {ptq['R@1']} (output error {ptq['output_error']:.4g})"
        + (f"; agreement {_agreement_line(ptq['agreement'])}" if ptq["agreement"] else ""))
    groups = quantizer_groups(quantizer_names(qmodel, enabled_only=True), cfg.groups)
    rows, kept, final = None, [], ptq
    if cfg.sensitivity:
        log(f"sensitivity pass over {len(groups)} groups")
        rows = sensitivity_pass(qmodel, judge, groups, log)
        kept, final = keep_worst_in_fp32(qmodel, judge, rows, groups, cfg.max_drop, log)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        qat = None
        if cfg.qat_steps:
            log(f"QAT: {cfg.qat_steps} steps")
            qat = quantisation_aware_training(qmodel, cfg, tmp / ".qat-run")
            save_checkpoint(tmp / QAT_DIR, float_state(qmodel), mcfg, {"task": "fine", "qat": qat})
            _remove_tree(tmp / ".qat-run")
            final = judge.measure(qmodel)
        meta = _quant_meta(cfg, mcfg, items, held, judge, ptq, final, kept, groups, qmodel, qat,
                           time.perf_counter() - t0)
        if final.get("agreement"):
            log(f"final agreement {_agreement_line(final['agreement'])}")
        _save_amax(tmp / AMAX_FILE, amax_state(qmodel))
        (tmp / QUANT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        if rows is not None:
            (tmp / SENSITIVITY_JSON).write_text(json.dumps(_sensitivity_doc(judge, ptq, final, rows, kept, cfg),
                                                           indent=2) + "\n")
    return QuantizeResult(out, meta)


def resolve_guard(guard: str, mcfg: ModelConfig, data: EvalData | None) -> str:
    """"auto" -> "agreement" for official (DyHead) configs and data without grounding entries, else
    "recall"; "recall" without grounding entries is refused."""
    has_grounding = data is not None and data.grounding is not None and len(data.grounding) > 0
    if guard == "auto":
        return "agreement" if mcfg.head.kind == "dyhead" or not has_grounding else "recall"
    if guard == "recall" and not has_grounding:
        raise QuantizeError("--guard recall needs grounding entries (grounding.json) in --data; "
                            "use --guard agreement for data without labels that fit the weights")
    return guard


def _agreement_line(a: dict[str, Any]) -> str:
    return (f"{a['agreement']:.3f} of FP32's top-{a.get('top_k')} boxes per phrase kept (top-1 "
            f"{a['top1_agreement']:.3f}) on {a['images']} images, max |logit diff| {a['max_abs_logit_diff']:.4g}")


def _copy_model(model: FiberForGrounding) -> FiberForGrounding:
    copy = FiberForGrounding(model.cfg)  # the same config (and canvas) as the FP32 model
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _save_amax(path: Path, amax: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(amax, str(path), metadata={"format": QUANT_FORMAT})


def _quant_meta(cfg: QuantizeConfig, mcfg: ModelConfig, items, held: EvalData, judge: Judge, ptq, final,
                kept: list[str], groups: dict[str, list[str]], qmodel, qat, seconds: float) -> dict[str, Any]:
    disabled = sorted({n for g in kept for n in groups[g]})
    return {
        "format": QUANT_FORMAT, "format_version": QUANT_VERSION,
        "model": mcfg.name, "config": mcfg.to_dict(),
        "checkpoint": {"path": str(cfg.checkpoint),
                       "sha256": sha256_file(Path(cfg.checkpoint) / WEIGHTS_FILE)},
        "weights": QAT_DIR if qat else "checkpoint",
        "method": cfg.method, "percentile": cfg.percentile if cfg.method == "percentile" else None,
        "scheme": {"weights": "int8 per-output-channel symmetric (axis 0)",
                   "activations": "int8 per-tensor symmetric, calibrated",
                   "modules": list(QUANTISED_MODULES) + ([MATMUL_MODULE] if cfg.attention else []),
                   "attention": cfg.attention, "fp32": NOT_QUANTISED},
        "calibration": {"data": str(cfg.data), "images": len(items), "batch_size": cfg.batch_size,
                        "canvas": list(mcfg.input_hw)},
        "held_out": {"grounding_entries": len(held.grounding) if held.grounding else 0,
                     "agreement_images": len(judge.items)},
        "accuracy": {"fp32": judge.fp32, "int8_ptq": ptq["accuracy"], "int8": final["accuracy"],
                     "output_error_ptq": ptq["output_error"], "output_error": final["output_error"]},
        "guard": judge.guard,
        "agreement": ({"ptq": ptq["agreement"], "final": final["agreement"], "min_agreement": cfg.min_agreement,
                       "max_logit_diff": cfg.max_logit_diff}
                      if judge.guard == "agreement" else None),
        "agreement_items": [{"image": str(it.image), "prompt": it.prompt, "spans": it.spans} for it in judge.items],
        "max_drop": cfg.max_drop,
        "within_margin": judge.ok(final, cfg.max_drop),
        "fp32_groups": kept,
        "fp32_by_rule": {**FP32_BY_RULE, **({f"{FP32_BY_RULE_PREFIX[mcfg.head.kind][0]}*":
                                              FP32_BY_RULE_PREFIX[mcfg.head.kind][1]}
                                             if mcfg.head.kind in FP32_BY_RULE_PREFIX else {})},
        "disabled": disabled,
        "quantizers": {"enabled": len(quantizer_names(qmodel, enabled_only=True)),
                       "total": len(quantizer_names(qmodel))},
        "amax": AMAX_FILE,
        "qat": qat,
        "seconds": round(seconds, 1),
        "producer": {"tool": "compress.quantize", "torch": torch.__version__, "modelopt": _modelopt_version()},
    }


def _sensitivity_doc(judge: Judge, ptq, final, rows, kept, cfg: QuantizeConfig) -> dict[str, Any]:
    doc = {"metric": "R@1 on the held-out subset (percent) through the runtime; output_error = "
                     "NMSE(token logits) + NMSE(centerness) + mean |box error| / S on probe batches",
           "fp32": judge.fp32.get("R@1"), "int8_all": ptq["R@1"], "int8_final": final["R@1"],
           "max_drop": cfg.max_drop, "kept_fp32": kept, "not_quantised": NOT_QUANTISED,
           "groups": rows}
    if judge.guard == "agreement":
        doc.update(metric="agreement (percent of FP32's top-K boxes per phrase that INT8 keeps, compress.agreement) "
                          "on the held-out images; output_error as for R@1",
                   fp32=100.0, int8_all=judge.score(ptq), int8_final=judge.score(final),
                   min_agreement=cfg.min_agreement)
    return doc


def _modelopt_version() -> str:
    import modelopt

    return modelopt.__version__


# ----------------------------------------------------------------------------- re-applying QDIR

def read_quant_json(qdir: Path) -> dict[str, Any]:
    path = qdir / QUANT_JSON
    if not path.is_file():
        raise QuantizeError(f"{qdir}: no {QUANT_JSON} (not a compress.quantize folder)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise QuantizeError(f"{path}: unreadable ({e})") from None
    if meta.get("format") != QUANT_FORMAT or not isinstance(meta.get("format_version"), int):
        raise QuantizeError(f"{path}: not a {QUANT_FORMAT} file")
    if meta["format_version"] > QUANT_VERSION:
        raise QuantizeError(f"{path}: format_version {meta['format_version']} is newer than this code reads")
    return meta


def load_quantized(qdir: str | Path, checkpoint: str | Path, mcfg: ModelConfig
                   ) -> tuple[FiberForGrounding, FiberForGrounding, dict[str, Any]]:
    """Re-apply QDIR to fresh models: (quantised model, FP32 model with the same weights, summary).

    Refuses a QDIR made for another config or another checkpoint (sha256 of its weights).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    qdir = Path(qdir)
    meta = read_quant_json(qdir)
    if meta.get("config") != mcfg.to_dict():
        raise QuantizeError(f"{qdir} was made for config '{meta.get('model')}', the checkpoint is "
                            f"'{mcfg.name}' (or the configs differ)")
    checkpoint = _checkpoint_dir(checkpoint)
    digest = sha256_file(checkpoint / WEIGHTS_FILE)
    if meta["checkpoint"].get("sha256") != digest:
        raise QuantizeError(f"{qdir} was calibrated on another checkpoint ({meta['checkpoint'].get('path')}); "
                            f"re-run compress.quantize on {checkpoint}")
    weights = qdir / QAT_DIR if meta.get("weights") == QAT_DIR else Path(checkpoint)
    state, _, _ = load_checkpoint(weights)
    fp32 = FiberForGrounding(mcfg)
    load_model_state(fp32, state, source=str(weights))
    qmodel = FiberForGrounding(mcfg)
    load_model_state(qmodel, state, source=str(weights))
    insert_quantizers(qmodel.eval(), meta.get("method", "max"), bool(meta.get("scheme", {}).get("attention")))
    try:
        amax = load_file(str(qdir / AMAX_FILE))
    except (SafetensorError, OSError) as e:
        raise QuantizeError(f"{qdir / AMAX_FILE}: unreadable ({e})") from None
    set_enabled(qmodel, meta.get("disabled", []), False)
    enabled = set(quantizer_names(qmodel, enabled_only=True))
    if enabled != set(amax):
        extra, missing = sorted(set(amax) - enabled), sorted(enabled - set(amax))
        raise QuantizeError(f"{qdir / AMAX_FILE} does not fit the model: {len(missing)} quantizers without amax "
                            f"{missing[:3]}, {len(extra)} unknown {extra[:3]}")
    for name, value in amax.items():
        _quantizer(qmodel, name).amax = value
    summary = {"method": meta.get("method"), "calibration_images": meta["calibration"]["images"],
               "fp32_groups": meta.get("fp32_groups", []), "disabled_quantizers": len(meta.get("disabled", [])),
               "quantizers": meta.get("quantizers"), "qat": meta.get("qat"), "scheme": meta.get("scheme"),
               "subset_accuracy": meta.get("accuracy"), "guard": meta.get("guard", "recall"),
               "agreement": meta.get("agreement")}
    return qmodel.eval(), fp32.eval(), summary


# ----------------------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint folder")
    p.add_argument("--data", required=True, help="data folder (grounding.json / detection.json + images)")
    p.add_argument("--out", required=True, help="QDIR to write")
    p.add_argument("--calib-images", type=int, default=512, help="distinct calibration images")
    p.add_argument("--min-calib-images", type=int, default=64, help="refuse fewer calibration images")
    p.add_argument("--method", default="max", choices=METHODS, help="activation calibration")
    p.add_argument("--percentile", type=float, default=99.99, help="for --method percentile")
    p.add_argument("--sensitivity", action=argparse.BooleanOptionalAction, default=False,
                   help="rank quantizer groups; keep the worst in FP32 while over --max-drop")
    p.add_argument("--groups", default="all", choices=GROUPINGS, help="sensitivity groups")
    p.add_argument("--max-drop", type=float, default=1.0, help="allowed INT8 R@1 drop (points)")
    p.add_argument("--eval-entries", type=int, default=64, help="held-out grounding entries (tail of DATA)")
    p.add_argument("--qat-steps", type=int, default=0, help="quantisation-aware fine-tuning steps")
    p.add_argument("--qat-lr", type=float, default=1e-5, help="learning rate of the QAT steps")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=False,
                   help="also quantise the attention matmuls that run through fiber.layers.Attend")
    p.add_argument("--guard", default="auto", choices=GUARDS,
                   help="what the guard and the sensitivity pass read: held-out R@1 ('recall') or FP32/INT8 "
                        "agreement ('agreement', for weights no labelled data fits); auto: agreement for "
                        "DyHead configs and data without grounding entries")
    p.add_argument("--min-agreement", type=float, default=0.8,
                   help="agreement guard: least share of FP32's top-K boxes per phrase INT8 must keep")
    p.add_argument("--agreement-images", type=int, default=8, help="held-out images of the agreement guard")
    p.add_argument("--max-logit-diff", type=float, default=0.05,
                   help="agreement guard: also passes when INT8 reproduces every token logit this closely (the "
                        "FP32 top-K of near-tied scores, e.g. random weights, is not INT8's to keep)")
    p.add_argument("--agreement-top-k", type=int, default=5, help="boxes per phrase the agreement compares")
    p.add_argument("--canvas", type=parse_canvas, default=None, metavar="HxW",
                   help="calibrate at this canvas (export the package with the same): an official-input "
                        "config's, or a letterbox config's fixed canvas (e.g. 224x288 for a 4:3 camera)")
    p.add_argument("--config", default=None, help="refuse a checkpoint whose config has another name")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing --out folder")
    return p


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = QuantizeConfig(checkpoint=args.checkpoint, data=args.data, out=args.out,
                             calib_images=args.calib_images, min_calib_images=args.min_calib_images,
                             method=args.method, percentile=args.percentile, sensitivity=args.sensitivity,
                             groups=args.groups,
                             max_drop=args.max_drop, eval_entries=args.eval_entries, qat_steps=args.qat_steps,
                             qat_lr=args.qat_lr, batch_size=args.batch_size, attention=args.attention,
                             config=args.config, guard=args.guard, min_agreement=args.min_agreement,
                             agreement_images=args.agreement_images, agreement_top_k=args.agreement_top_k,
                             max_logit_diff=args.max_logit_diff,
                             canvas=args.canvas,
                             overwrite=args.overwrite)
        result = quantize(cfg, log=lambda s: print(s, flush=True))
    except (QuantizeError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    acc = result.meta["accuracy"]
    agree = result.meta.get("agreement")
    score = (f"agreement {agree['final']['agreement']:.3f} (max |logit diff| {agree['final']['max_abs_logit_diff']:.4g})"
             if agree else f"FP32 R@1 {acc['fp32'].get('R@1')}, INT8 R@1 {acc['int8'].get('R@1')}")
    print(f"wrote {result.path}: {score}, FP32 groups {result.meta['fp32_groups'] or 'none'}, "
          f"{result.meta['seconds']} s")
    if agree and not result.meta["within_margin"]:
        print(f"warning: INT8 keeps fewer than {cfg.min_agreement} of FP32's top boxes; compress.export will "
              "refuse it (try --sensitivity)", file=sys.stderr)
    elif not result.meta["within_margin"]:
        print(f"warning: INT8 is still more than {cfg.max_drop} R@1 below FP32 on the held-out subset; "
              "compress.export will refuse it (try --sensitivity, --qat-steps)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
