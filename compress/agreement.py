"""Agreement of two detectors on the same images: the INT8 guard where no labelled data fits the weights.

A converted official release with random values (or weights for which no labelled split exists
here) has no meaningful R@1, but INT8 must still reproduce what FP32 does. Both detectors run
through the runtime's ``Detector`` (the package's pre-processing, tokeniser and post-processing) in
grounding mode: score threshold 0, each phrase's best ``top_k`` boxes after the per-phrase NMS.

- ``agreement``: the share of the reference's top-K detections (over all images and phrases) that
  the other detector also returns: same phrase, box IoU >= ``iou`` (one-to-one, greedy in the
  reference's score order).
- ``top1_agreement``: per (image, phrase), the two best boxes have IoU >= ``iou``.
- ``max_abs_logit_diff``: max |token logit difference| over every anchor and real token;
  ``max_abs_centerness_diff`` (logits); ``mean_abs_box_diff_px`` (decoded boxes, canvas pixels);
  ``reference_logit_range``: the reference's own spread, max - min of its real-token logits
  (mean over images).

``passes``: the guard's verdict: agreement >= ``min_agreement``, or every logit within
``max_logit_diff`` of the reference. The second rule is for near-ties: when the reference's scores
barely differ between anchors (random weights: a logit range of ~1e-3), its top-K is decided by
differences far below any quantisation step, and a low agreement then says nothing about INT8;
logits equal within 0.05 (phrase probabilities within ~1.25%) do.

Torch-free apart from what the engines run (``fiber.torch_engines`` for a PyTorch model, or a
package opened with ``engines.load``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import engines
from common import package as pkg

DEFAULT_TOP_K = 5
DEFAULT_IOU = 0.5
DEFAULT_MAX_LOGIT_DIFF = 0.05
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PHOTO_PROMPT = "person. car. dog. cat. chair. bottle. cup. bicycle. bird. tree"


@dataclass(frozen=True)
class ProbeItem:
    """One image and the prompt to run on it."""
    image: Path
    prompt: str
    spans: list | None = None       # per phrase, [start, end) character spans (None: the ". " names)


def photo_items(folder: str | Path, prompt: str = PHOTO_PROMPT) -> list[ProbeItem]:
    """Every image file of ``folder`` (sorted) with one detection prompt; ValueError when none."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [ProbeItem(p, prompt) for p in files]


class _Recorder:
    """An ``engines.Engine`` that keeps its last outputs (the raw detector outputs)."""

    def __init__(self, inner):
        self.inner, self.last = inner, None
        self.inputs, self.outputs, self.backend = inner.inputs, inner.outputs, getattr(inner, "backend", "")

    def run(self, inputs):
        self.last = self.inner.run(inputs)
        return self.last

    def close(self) -> None:
        pass                        # the caller owns the wrapped engine


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes ``a`` [N, 4] and ``b`` [M, 4] -> [N, M] (continuous convention)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def match_detections(ref, other, iou: float = DEFAULT_IOU) -> tuple[int, int, int, int]:
    """(matched, reference detections, phrases whose best boxes agree, phrases with a reference box)
    for two ``runtime.types.Detections`` of one image and prompt (see the module docstring)."""
    matched, top1, phrases = 0, 0, 0
    for p in np.unique(ref.phrase_index):
        r = np.flatnonzero(ref.phrase_index == p)
        r = r[np.argsort(-ref.scores[r], kind="stable")]
        o = np.flatnonzero(other.phrase_index == p)
        o = o[np.argsort(-other.scores[o], kind="stable")]
        phrases += 1
        if not len(o):
            continue
        ious = _box_iou(ref.boxes[r].astype(np.float64), other.boxes[o].astype(np.float64))
        top1 += int(ious[0, 0] >= iou)
        free = np.ones(len(o), bool)
        for i in range(len(r)):
            cand = np.flatnonzero(free & (ious[i] >= iou))
            if len(cand):
                free[cand[np.argmax(ious[i, cand])]] = False
                matched += 1
    return matched, len(ref.scores), top1, phrases


@dataclass(frozen=True)
class Run:
    """One detector's result on one probe item: its Detections and raw outputs (batch row 0)."""
    detections: Any                 # runtime.types.Detections
    boxes: np.ndarray               # [N, 4] canvas pixels
    logits: np.ndarray              # [N, T_real] token logits on the real tokens
    centerness: np.ndarray          # [N] logits


def run_items(package_engines: engines.PackageEngines, items: Sequence[ProbeItem], top_k: int = DEFAULT_TOP_K,
              progress=None) -> list[Run]:
    """Run ``items`` through the runtime's Detector in grounding mode (threshold 0, each phrase's
    best ``top_k`` boxes); the engines stay open."""
    from runtime.predictor import Detector

    if not items:
        raise ValueError("agreement needs at least one image")
    rec = _Recorder(package_engines.detector)
    det = Detector(dataclasses.replace(package_engines, detector=rec), threshold=0.0, per_phrase=top_k)
    runs = []
    for item in (progress(items, desc="agreement", unit="image") if progress else items):
        dets = det.detect(item.image, item.prompt, item.spans)
        real = det.last_prompt.attention_mask[0].astype(bool)
        out = rec.last
        runs.append(Run(dets, out[pkg.BOXES][0], out[pkg.TOKEN_LOGITS][0][:, real], out[pkg.CENTERNESS][0]))
    return runs


def compare(reference: Sequence[Run], other: Sequence[Run], iou: float = DEFAULT_IOU) -> dict[str, Any]:
    """The agreement record of ``other`` against ``reference`` (the same items, in order)."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"agreement: {len(reference)} reference runs vs {len(other)} others")
    matched = total = top1 = phrases = 0
    logit_diff = ctr_diff = 0.0
    box_err, spread = [], []
    for r, o in zip(reference, other):
        m, n, t, p = match_detections(r.detections, o.detections, iou)
        matched, total, top1, phrases = matched + m, total + n, top1 + t, phrases + p
        diff = np.abs(r.logits.astype(np.float64) - o.logits)
        logit_diff = max(logit_diff, float(diff.max()) if diff.size else 0.0)
        spread.append(float(r.logits.max() - r.logits.min()) if r.logits.size else 0.0)
        ctr_diff = max(ctr_diff, float(np.abs(r.centerness.astype(np.float64) - o.centerness).max()))
        box_err.append(float(np.abs(r.boxes.astype(np.float64) - o.boxes).mean()))
    return {"images": len(reference),
            "iou": iou, "reference_detections": total, "matched": matched,
            "agreement": round(matched / max(total, 1), 4),
            "top1_agreement": round(top1 / max(phrases, 1), 4),
            "max_abs_logit_diff": round(logit_diff, 5), "max_abs_centerness_diff": round(ctr_diff, 5),
            "mean_abs_box_diff_px": round(float(np.mean(box_err)), 4),
            "reference_logit_range": round(float(np.mean(spread)), 6)}


def passes(record: dict[str, Any], min_agreement: float, max_logit_diff: float = DEFAULT_MAX_LOGIT_DIFF) -> str | None:
    """Why ``record`` passes the guard ("agreement" or "logit tolerance"), or None (module docstring)."""
    if record["agreement"] >= min_agreement:
        return "agreement"
    if record["max_abs_logit_diff"] <= max_logit_diff:
        return "logit tolerance"
    return None


def agreement(reference: engines.PackageEngines, other: engines.PackageEngines, items: Sequence[ProbeItem],
              top_k: int = DEFAULT_TOP_K, iou: float = DEFAULT_IOU, progress=None) -> dict[str, Any]:
    """Agreement of ``other`` with ``reference`` on ``items`` (module docstring); the engines stay open."""
    record = compare(run_items(reference, items, top_k, progress), run_items(other, items, top_k, progress), iou)
    return {**record, "top_k": top_k, "reference": reference.backend, "other": other.backend}
