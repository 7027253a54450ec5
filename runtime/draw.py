"""Draw detections on frames: boxes, phrase labels and scores, one stable colour per phrase.

OpenCV draws when it is installed (fast, ASCII labels: other characters show as "?"), else
Pillow (any character its default font has). Boxes are the Detections' xyxy source pixels.
Torch-free.
"""
from __future__ import annotations

import colorsys
import functools
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from runtime.types import Detections

RGB = tuple[int, int, int]


@functools.lru_cache(maxsize=1024)
def phrase_color(phrase: str) -> RGB:
    """A bright RGB colour that depends only on the phrase text (the same in every run)."""
    hue = (zlib.crc32(phrase.encode("utf-8")) % 3600) / 3600.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _label(phrase: str, score: float, scores: bool) -> str:
    return f"{phrase} {score:.2f}" if scores else phrase


@functools.lru_cache(maxsize=1)
def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def backend() -> str:
    """"opencv" or "pillow": what draw_detections uses (imports OpenCV now, not mid-stream)."""
    return "opencv" if _cv2() is not None else "pillow"


def _thickness(image: np.ndarray) -> int:
    return max(1, round(max(image.shape[:2]) / 400))


def _draw_cv2(cv2: Any, out: np.ndarray, dets: Detections, bgr: bool, scores: bool) -> None:
    thick = _thickness(out)
    font_scale = 0.4 * thick
    for d in dets:
        rgb = phrase_color(d.phrase)
        color = rgb[::-1] if bgr else rgb
        x1, y1, x2, y2 = (int(round(v)) for v in d.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thick)
        text = _label(d.phrase, d.score, scores).encode("ascii", "replace").decode("ascii")
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        top = y1 - th - base - 2 if y1 - th - base - 2 >= 0 else y1  # inside the box at the top edge
        cv2.rectangle(out, (x1, top), (x1 + tw + 2, top + th + base + 2), color, -1)
        cv2.putText(out, text, (x1 + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (0, 0, 0), 1, cv2.LINE_AA)


def _draw_pil(out: np.ndarray, dets: Detections, bgr: bool, scores: bool) -> None:
    rgb_view = out[:, :, ::-1] if bgr else out
    img = Image.fromarray(np.ascontiguousarray(rgb_view))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    thick = _thickness(out)
    for d in dets:
        color = phrase_color(d.phrase)
        x1, y1, x2, y2 = d.box
        draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=color, width=thick)
        text = _label(d.phrase, d.score, scores)
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        h = bottom - top + 2
        ty = y1 - h if y1 - h >= 0 else y1
        draw.rectangle((x1, ty, x1 + right - left + 2, ty + h), fill=color)
        draw.text((x1 + 1, ty), text, fill=(0, 0, 0), font=font)
    drawn = np.asarray(img)
    out[...] = drawn[:, :, ::-1] if bgr else drawn


def draw_detections(image: np.ndarray, detections: Detections, bgr: bool = False,
                    scores: bool = True, use_opencv: bool = True) -> np.ndarray:
    """A copy of ``image`` uint8 [H, W, 3] (RGB, or BGR with ``bgr``) with the detections drawn.

    Each box in its phrase's colour with a "phrase score" label above it (inside the box when
    there is no room above). ``use_opencv=False`` forces the Pillow path.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"draw_detections needs uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    out = np.array(image, copy=True, order="C")  # writable even when the input is read-only
    cv2 = _cv2() if use_opencv else None
    if cv2 is not None:
        _draw_cv2(cv2, out, detections, bgr, scores)
    else:
        _draw_pil(out, detections, bgr, scores)
    return out
