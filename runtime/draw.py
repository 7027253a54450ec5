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


def _text_height(image: np.ndarray) -> int:
    """Label text height in pixels: ~2.2% of the longer side, at least 10 (readable on 320x240,
    not dominating a 4K frame)."""
    return max(10, round(max(image.shape[:2]) * 0.022))


def _ascending(dets: Detections) -> list[int]:
    """Draw order: lowest score first, so the best label ends up on top of overlapping ones."""
    return [int(i) for i in np.argsort(np.asarray(dets.scores), kind="stable")]


def _label_origin(x1: int, y1: int, w: int, h: int, image_w: int) -> tuple[int, int]:
    """Top-left of a w x h label: above the box, inside it at the top edge when there is no room
    above; shifted left to stay inside the image."""
    top = y1 - h if y1 - h >= 0 else y1
    return max(0, min(x1, image_w - w)), top


def _ink(rgb: RGB) -> RGB:
    """Black or white text, whichever reads better on the label's ``rgb`` background."""
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


def _draw_cv2(cv2: Any, out: np.ndarray, dets: Detections, bgr: bool, scores: bool) -> None:
    thick = _thickness(out)
    font = cv2.FONT_HERSHEY_SIMPLEX
    font_scale = cv2.getFontScaleFromHeight(font, _text_height(out), 1)
    weight = max(1, round(font_scale * 1.5))
    pad = max(1, weight)
    for i in _ascending(dets):
        d = dets[i]
        rgb = phrase_color(d.phrase)
        color, ink = (rgb[::-1], _ink(rgb)[::-1]) if bgr else (rgb, _ink(rgb))
        x1, y1, x2, y2 = (int(round(v)) for v in d.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thick)
        text = _label(d.phrase, d.score, scores).encode("ascii", "replace").decode("ascii")
        (tw, th), base = cv2.getTextSize(text, font, font_scale, weight)
        w, h = tw + 2 * pad, th + base + 2 * pad
        lx, ly = _label_origin(x1, y1, w, h, out.shape[1])
        cv2.rectangle(out, (lx, ly), (lx + w, ly + h), color, -1)  # filled background
        cv2.putText(out, text, (lx + pad, ly + pad + th), font, font_scale, ink, weight, cv2.LINE_AA)


@functools.lru_cache(maxsize=16)
def _pil_font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _draw_pil(out: np.ndarray, dets: Detections, bgr: bool, scores: bool) -> None:
    rgb_view = out[:, :, ::-1] if bgr else out
    img = Image.fromarray(np.ascontiguousarray(rgb_view))
    draw = ImageDraw.Draw(img)
    font = _pil_font(_text_height(out))
    thick = _thickness(out)
    pad = max(1, thick)
    for i in _ascending(dets):
        d = dets[i]
        color = phrase_color(d.phrase)
        x1, y1, x2, y2 = d.box
        draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=color, width=thick)
        text = _label(d.phrase, d.score, scores)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        lx, ly = _label_origin(int(round(x1)), int(round(y1)), w, h, out.shape[1])
        draw.rectangle((lx, ly, lx + w, ly + h), fill=color)  # filled background
        draw.text((lx + pad - left, ly + pad - top), text, fill=_ink(color), font=font)
    drawn = np.asarray(img)
    out[...] = drawn[:, :, ::-1] if bgr else drawn


def draw_detections(image: np.ndarray, detections: Detections, bgr: bool = False,
                    scores: bool = True, use_opencv: bool = True) -> np.ndarray:
    """A copy of ``image`` uint8 [H, W, 3] (RGB, or BGR with ``bgr``) with the detections drawn.

    Each box in its phrase's colour with a "phrase score" label above it (inside the box when
    there is no room above) on a filled background in that colour, text sized to the image;
    drawn lowest score first, so where labels overlap the best one is on top.
    ``use_opencv=False`` forces the Pillow path.
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
