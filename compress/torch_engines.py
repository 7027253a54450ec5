"""A torch ``FiberForGrounding`` behind the package interface (``engines.PackageEngines``).

``torch_engines(model, cfg, buckets)``: text = ``encode_text``, detector = ``detect``, with the manifest
sections of the package the model would export to, so the runtime's ``Detector`` (bucketed
tokenisation, top-left letterbox, the C post-processing) measures a torch model (fake-quantised
or not) exactly as its exported package will be.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

import engines
from common import package as pkg
from compress.manifest import TOKENIZER_SRC, package_sections
from engines.manifest import TensorSpec
from fiber.config import ModelConfig


class TorchGraph:
    """One method of a torch model as an ``engines.Engine`` (numpy in, numpy out, no grad)."""

    backend = "torch"

    def __init__(self, fn, inputs: list[TensorSpec], outputs: list[TensorSpec]):
        self.fn, self.inputs, self.outputs = fn, inputs, outputs

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in self.inputs]
        with torch.inference_mode():
            out = self.fn(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {s.name: o.float().numpy() for s, o in zip(self.outputs, out)}

    def close(self) -> None:
        pass


def _spec(name: str, shape: list, dtype: str) -> TensorSpec:
    return TensorSpec(name, tuple(shape), np.dtype(dtype))


def torch_engines(model: torch.nn.Module, cfg: ModelConfig, buckets: Sequence[int],
                  tokenizer: Path | None = None) -> engines.PackageEngines:
    """A ``FiberForGrounding`` behind the package interface (text = encode_text, detector = detect).

    tokenizer: the checkpoint's own ``tokenizer.json`` (a converted official release: case-sensitive,
    as its package ships it), or None for the default WordPiece asset (lowercased). An official-input
    config gets the official input on its canvas and the per-level post-processing, as its package."""
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
    return engines.PackageEngines(TorchGraph(model.encode_text, [ids, mask], [hidden]),
                                  TorchGraph(model.detect, [image, hidden, mask], outs),
                                  manifest, source.parent, "torch")
