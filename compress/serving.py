"""The serving protocol inside compression: one way to measure accuracy for torch models and packages.

Every accuracy number of the compression stage (the sensitivity pass, the FP32 and INT8 numbers in
a package manifest, the accuracy guard) comes from the *runtime*: ``runtime.predictor.Detector``
(bucketed tokenisation, top-left letterbox, the C post-processing) driven by
``fiber.data.evaluation.evaluate``. A package is opened with ``engines.load``; a torch model is
wrapped by ``torch_engines`` into the same ``engines.PackageEngines`` interface, so a fake-quantised
torch model is measured exactly as its exported package will be.

- ``package_sections(cfg, buckets)``: the ``input`` / ``text`` / ``postprocess`` manifest sections.
- ``EvalData`` / ``find_data(dir)``: the grounding and/or detection files of a data folder.
- ``evaluate_engines(engines, data)``: the accuracy dict ``{"R@1", "R@5", "R@10", "mAP", "refexp"}``
  in percent (None where the data has no such items).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

import engines
from common import package as pkg
from engines.manifest import TensorSpec
from fiber.config import ModelConfig
from fiber.data.evaluation import EVAL_POSTPROCESS, evaluate
from fiber.data.formats import DetectionDataset, GroundingDataset, load_detection, load_grounding

TOKENIZER_SRC = Path(__file__).resolve().parents[1] / "fiber" / "assets" / pkg.TOKENIZER
POSTPROCESS = {"threshold": 0.05, "nms_iou": 0.6, "pre_nms_top_k": 1000, "max_detections": 100}
ACCURACY_KEYS = ("R@1", "R@5", "R@10", "mAP", "refexp")
GROUNDING_FILE, DETECTION_FILE = "grounding.json", "detection.json"


def package_sections(cfg: ModelConfig, buckets: Sequence[int]) -> dict[str, Any]:
    """The manifest's ``input``, ``text`` and ``postprocess`` sections for ``cfg`` (docs/architecture.md)."""
    s = cfg.swin.img_size
    return {
        "input": {"size": [s, s], "channel_order": "RGB", "mean": list(cfg.image_mean),
                  "std": list(cfg.image_std), "letterbox": "top-left", "pad_value": 0.0},
        "text": {"tokenizer": pkg.TOKENIZER, "max_tokens": int(max(buckets)),
                 "buckets": [int(b) for b in buckets], "hidden_size": cfg.text.hidden_size,
                 "pad_id": cfg.text.pad_token_id, "lowercase": True},
        "postprocess": dict(POSTPROCESS),
    }


def resolve_buckets(cfg: ModelConfig, buckets: Sequence[int] | None) -> tuple[int, ...]:
    """The text buckets of a package: given ones (ascending, >= 3, <= max_text_len) or the defaults
    that fit ``cfg.max_text_len``. ValueError naming the problem."""
    if buckets is None:
        chosen = tuple(b for b in pkg.DEFAULT_BUCKETS if b <= cfg.max_text_len) or (cfg.max_text_len,)
    else:
        chosen = tuple(sorted({int(b) for b in buckets}))
    if not chosen or chosen[0] < 3:
        raise ValueError(f"text buckets must be >= 3 tokens, got {list(chosen)}")
    if chosen[-1] > cfg.max_text_len:
        raise ValueError(f"text bucket {chosen[-1]} exceeds the {cfg.max_text_len} tokens of config "
                         f"'{cfg.name}' (max_text_len)")
    return chosen


# ----------------------------------------------------------------------------- torch engines

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


def torch_engines(model: torch.nn.Module, cfg: ModelConfig, buckets: Sequence[int]) -> engines.PackageEngines:
    """A ``FiberForGrounding`` behind the package interface (text = encode_text, detector = detect)."""
    s, d = cfg.swin.img_size, cfg.text.hidden_size
    ids = _spec(pkg.INPUT_IDS, ["batch", "tokens"], "int64")
    mask = _spec(pkg.ATTENTION_MASK, ["batch", "tokens"], "int64")
    hidden = _spec(pkg.TEXT_HIDDEN, ["batch", "tokens", d], "float32")
    image = _spec(pkg.IMAGE, ["batch", 3, s, s], "float32")
    outs = [_spec(pkg.BOXES, ["batch", "anchors", 4], "float32"),
            _spec(pkg.TOKEN_LOGITS, ["batch", "anchors", "tokens"], "float32"),
            _spec(pkg.CENTERNESS, ["batch", "anchors"], "float32")]
    model.eval()
    manifest = {"name": f"{cfg.name} (torch)", **package_sections(cfg, buckets)}
    return engines.PackageEngines(TorchGraph(model.encode_text, [ids, mask], [hidden]),
                                  TorchGraph(model.detect, [image, hidden, mask], outs),
                                  manifest, TOKENIZER_SRC.parent, "torch")


# ----------------------------------------------------------------------------- data and evaluation

@dataclass(frozen=True)
class EvalData:
    """What to evaluate on: a grounding and/or a detection dataset (loaded)."""
    grounding: GroundingDataset | None = None
    detection: DetectionDataset | None = None
    source: str = ""                                  # the folder, for the manifest's "split"

    def subset(self, grounding: int | None = None, detection: int | None = None,
               tail: bool = False) -> "EvalData":
        """The first (or, with ``tail``, the last) entries/images of each dataset."""
        def cut(items: tuple, n: int | None) -> tuple:
            if n is None or n >= len(items):
                return items
            return items[-n:] if tail else items[:n]

        g = self.grounding and dataclasses.replace(self.grounding, samples=cut(self.grounding.samples, grounding))
        d = self.detection and dataclasses.replace(self.detection, images=cut(self.detection.images, detection))
        return EvalData(g, d, self.source)


def find_data(folder: str | Path) -> EvalData:
    """The ``grounding.json`` and/or ``detection.json`` of a data folder (fiber.data.synth layout).

    Raises ValueError when the folder is missing or has neither file; DataFormatError (a
    ValueError) for a malformed file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data folder {folder}: no such directory")
    g, d = folder / GROUNDING_FILE, folder / DETECTION_FILE
    if not g.is_file() and not d.is_file():
        raise ValueError(f"data folder {folder}: has neither {GROUNDING_FILE} nor {DETECTION_FILE}")
    return EvalData(load_grounding(g) if g.is_file() else None,
                    load_detection(d) if d.is_file() else None, str(folder))


def evaluate_engines(package_engines: engines.PackageEngines, data: EvalData,
                     progress=None) -> dict[str, float | None]:
    """Run the runtime Detector over ``data``; ``{"R@1", "R@5", "R@10", "mAP", "refexp"}`` in percent.

    The Detector does not close ``package_engines`` here (the caller owns them).
    """
    from runtime.predictor import Detector

    # the evaluation protocol's ranking; not closed: that would close the caller's engines
    detector = Detector(package_engines, **EVAL_POSTPROCESS)

    def predict(image: np.ndarray, prompt: str, spans: list):
        return detector.detect(image, prompt, spans)

    metrics = evaluate(predict, grounding=data.grounding, detection=data.detection, progress=progress)
    return {k: _finite(metrics.get(k)) for k in ACCURACY_KEYS}


def _finite(value: Any) -> float | None:
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), 3)
