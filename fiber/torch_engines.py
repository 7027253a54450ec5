"""A torch ``FiberForGrounding`` behind the package interface (``engines.PackageEngines``), and the
runtime's ``Detector`` over it: the one torch evaluation path.

    detector = torch_detector(model, tokenizer=tokenizer_file(checkpoint), **EVAL_POSTPROCESS)
    dets = detector.detect(image_rgb_uint8, "the red star left of the blue ring", [[[4, 12]]])

``torch_engines(model, cfg, buckets)``: text = ``encode_text``, detector = ``detect``, with the
manifest sections of the package the model would export to (``fiber.package.package_sections``).
``runtime.predictor.Detector`` over it tokenises into the package's text buckets, pre-processes
as the package says (top-left letterbox, or the official input on the canvas), and post-processes
with the package's C post-processing (per phrase, or the official per-level rule), so a torch
model (trained, fake-quantised or not) is measured exactly as its exported package will be.
train.evaluate, compress's accuracy / agreement numbers and benchmarks.latency's torch reference
all run through it. The model runs on the device its parameters are on; numpy in and out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

import engines
from common import package as pkg
from engines.manifest import TensorSpec
from fiber.config import ModelConfig
from fiber.package import TOKENIZER_SRC, package_sections, resolve_buckets
from runtime.predictor import Detector


class TorchGraph:
    """One method of a torch model as an ``engines.Engine`` (numpy in, numpy float32 out, no grad)."""

    backend = "torch"

    def __init__(self, fn: Callable, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 device: torch.device | str = "cpu"):
        self.fn, self.inputs, self.outputs = fn, inputs, outputs
        self.device = torch.device(device)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])).to(self.device) for s in self.inputs]
        with torch.inference_mode():
            out = self.fn(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {s.name: o.float().cpu().numpy() for s, o in zip(self.outputs, out)}

    def close(self) -> None:
        pass


def _spec(name: str, shape: list, dtype: str) -> TensorSpec:
    return TensorSpec(name, tuple(shape), np.dtype(dtype))


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def torch_engines(model: torch.nn.Module, cfg: ModelConfig, buckets: Sequence[int],
                  tokenizer: Path | None = None) -> engines.PackageEngines:
    """A ``FiberForGrounding`` behind the package interface (text = encode_text, detector = detect).

    tokenizer: the checkpoint's own ``tokenizer.json`` (a converted official release: case-sensitive,
    as its package ships it), or None for the default WordPiece asset (lowercased). An official-input
    config gets the official input on its canvas and the per-level post-processing, as its package.
    Puts the model in eval mode."""
    d = cfg.text.hidden_size
    h, w = cfg.input_hw
    ids = _spec(pkg.INPUT_IDS, ["batch", "tokens"], "int64")
    mask = _spec(pkg.ATTENTION_MASK, ["batch", "tokens"], "int64")
    hidden = _spec(pkg.TEXT_HIDDEN, ["batch", "tokens", d], "float32")
    image = _spec(pkg.IMAGE, ["batch", 3, h, w], "float32")
    outs = [_spec(pkg.BOXES, ["batch", "anchors", 4], "float32"),
            _spec(pkg.TOKEN_LOGITS, ["batch", "anchors", "tokens"], "float32"),
            _spec(pkg.CENTERNESS, ["batch", "anchors"], "float32")]
    model.eval()
    levels = model.level_sizes(h, w) if cfg.input.style == "official" else ()
    source = Path(tokenizer) if tokenizer is not None else TOKENIZER_SRC
    sections = package_sections(cfg, buckets, levels, lowercase=tokenizer is None)
    sections["text"]["tokenizer"] = source.name
    manifest = {"name": f"{cfg.name} (torch)", **sections}
    device = _device(model)
    return engines.PackageEngines(TorchGraph(model.encode_text, [ids, mask], [hidden], device),
                                  TorchGraph(model.detect, [image, hidden, mask], outs, device),
                                  manifest, source.parent, "torch")


def torch_detector(model: torch.nn.Module, buckets: Sequence[int] | None = None,
                   tokenizer: Path | None = None, **options: Any) -> Detector:
    """``runtime.predictor.Detector`` over ``torch_engines(model, model.cfg, buckets, tokenizer)``.

    buckets: default the package's (``fiber.package.resolve_buckets``); options: the Detector's
    keyword arguments (e.g. ``fiber.data.evaluation.EVAL_POSTPROCESS``, ``per_phrase``)."""
    cfg: ModelConfig = model.cfg
    return Detector(torch_engines(model, cfg, resolve_buckets(cfg, buckets), tokenizer), **options)
