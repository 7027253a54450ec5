"""Result types shared by every backend: one frozen record per detection set, and the letterbox.

Boxes are ``xyxy`` in source-image pixels (continuous coordinates, ``0 <= x <= width``).
Torch-free; numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class LetterboxInfo:
    """How a source image was placed in the square network input (top-left letterbox)."""

    scale: float  # network pixels per source pixel: S / max(src_w, src_h)
    new_w: int    # resized width in network pixels, round(src_w * scale) (half up), >= 1
    new_h: int    # resized height in network pixels
    src_w: int    # source image width in pixels
    src_h: int    # source image height in pixels


@dataclass(frozen=True)
class Detection:
    """One detection: ``box`` xyxy in source pixels, its score and the phrase it grounds."""

    box: tuple[float, float, float, float]
    score: float
    phrase_index: int
    phrase: str


def _frozen(array: Any, dtype: type, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A read-only copy of ``array`` as ``dtype`` with ``shape`` (-1 = any), or ValueError."""
    out = np.array(array, dtype=dtype, copy=True)
    empty_shape = [0 if s == -1 else s for s in shape]
    if out.size == 0 and 0 in empty_shape:  # [] and friends: give empty input its shape
        out = out.reshape(empty_shape)
    if out.ndim != len(shape) or any(s not in (-1, d) for s, d in zip(shape, out.shape)):
        want = "[" + ", ".join("N" if s == -1 else str(s) for s in shape) + "]"
        raise ValueError(f"Detections.{name} must have shape {want}, got {list(out.shape)}")
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class Detections:
    """The detections of one image, best first.

    boxes: float32 [N, 4] xyxy in source-image pixels. scores: float32 [N].
    phrase_index: int32 [N], an index into ``phrases`` (the prompt's phrase texts).
    The arrays are read-only copies made at construction.
    """

    boxes: np.ndarray
    scores: np.ndarray
    phrase_index: np.ndarray
    phrases: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        boxes = _frozen(self.boxes, np.float32, (-1, 4), "boxes")
        n = len(boxes)
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", _frozen(self.scores, np.float32, (n,), "scores"))
        object.__setattr__(self, "phrase_index",
                           _frozen(self.phrase_index, np.int32, (n,), "phrase_index"))
        object.__setattr__(self, "phrases", tuple(str(p) for p in self.phrases))
        bad = (self.phrase_index < 0) | (self.phrase_index >= len(self.phrases))
        if bad.any():
            raise ValueError(
                f"Detections.phrase_index {int(self.phrase_index[bad][0])} is out of range for "
                f"{len(self.phrases)} phrases"
            )

    @classmethod
    def empty(cls, phrases: Sequence[str] = ()) -> Detections:
        """No detections (for a prompt with ``phrases``)."""
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                   np.zeros(0, np.int32), tuple(phrases))

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, i: int) -> Detection:
        p = int(self.phrase_index[i])
        box = tuple(float(v) for v in self.boxes[i])
        return Detection(box, float(self.scores[i]), p, self.phrases[p])  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Detection]:
        return (self[i] for i in range(len(self)))

    def to_json(self, box_digits: int = 2, score_digits: int = 4) -> list[dict[str, Any]]:
        """``[{"phrase_index", "phrase", "box": [x1, y1, x2, y2], "score"}]``, best first."""
        return [
            {
                "phrase_index": d.phrase_index,
                "phrase": d.phrase,
                "box": [round(v, box_digits) for v in d.box],
                "score": round(d.score, score_digits),
            }
            for d in self
        ]
