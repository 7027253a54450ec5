"""Accuracy of a package or a torch model, measured through the runtime.

Every accuracy number of the compression stage (the sensitivity pass, the FP32 and INT8 numbers in
a package manifest, the accuracy guard) comes from ``runtime.predictor.Detector`` driven by
``fiber.data.evaluation.evaluate`` over ``engines.PackageEngines`` (a package opened with
``engines.load`` or a torch model behind ``fiber.torch_engines``).

- ``EvalData`` / ``find_data(dir)``: the grounding and/or detection files of a data folder.
- ``evaluate_engines(engines, data)``: the accuracy dict ``{"R@1", "R@5", "R@10", "mAP", "refexp"}``
  in percent (None where the data has no such items).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import engines
from fiber.data.evaluation import EVAL_POSTPROCESS, evaluate
from fiber.data.formats import DetectionDataset, GroundingDataset, load_detection, load_grounding

ACCURACY_KEYS = ("R@1", "R@5", "R@10", "mAP", "refexp")
GROUNDING_FILE, DETECTION_FILE = "grounding.json", "detection.json"


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
