"""Image pre-processing: any image -> RGB uint8 -> letterboxed, normalised float32 CHW.

Two input specs (common.package.InputSpec, the manifest's ``input``): the letterbox below (a
square S x S canvas, or a fixed [H, W] one: ``compress.export --canvas``), and the official FIBER/GLIP fine test input (``official_input``: min/max-side resize with
PIL bilinear, BGR 0-255 normalisation, top-left on a fixed [H, W] canvas).

The conventions are docs/architecture.md's "Image side": scale ``s = S / max(h, w)`` (on an
[H, W] canvas ``min(H / h, W / w)``), resized
size ``(round(w*s), round(h*s))`` rounded half up (at least 1), bilinear with half-pixel centres
(OpenCV ``INTER_LINEAR``), placed top-left, ``(x/255 - mean)/std``, RGB, CHW, the rest 0.

``letterbox`` runs the C extension ``runtime._native`` and falls back (with one warning) to
``letterbox_ref``, the numpy reference that tests compare it with. Training and evaluation code
call the same functions, so every stage sees the same pixels. Torch-free.
"""
from __future__ import annotations

import functools
import importlib
import math
import warnings
from types import ModuleType
from typing import Any, Sequence

import numpy as np
from PIL import Image

from common.package import (IMAGENET_MEAN, IMAGENET_STD, INPUT_LETTERBOX, INPUT_OFFICIAL, InputSpec,
                            ResizeRule)
from runtime.types import LetterboxInfo


@functools.lru_cache(maxsize=None)
def load_native() -> ModuleType | None:
    """The C extension, or None (with one warning) when it is not built."""
    try:
        native = importlib.import_module("runtime._native")
        # Without the .so, the source folder runtime/_native/ imports as a namespace package.
        if not hasattr(native, "letterbox"):
            raise ImportError("found only the source folder runtime/_native/")
    except ImportError as e:
        warnings.warn(
            f"runtime._native is not built ({e}); using the slower numpy reference. "
            "Build it with `make native` or `pip install -e .`",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return native


def letterbox_info(src_w: int, src_h: int, size: int | tuple[int, int]) -> LetterboxInfo:
    """Where a ``src_w x src_h`` image lands in a ``size x size`` letterbox, or on an [H, W]
    canvas (``size`` a pair): scale ``min(H / src_h, W / src_w)`` (= S / max(h, w) when square)."""
    ch, cw = (size, size) if isinstance(size, int) else size
    scale = min(ch / src_h, cw / src_w)

    def resized(n: int, side: int) -> int:
        return min(side, max(1, math.floor(n * scale + 0.5)))

    return LetterboxInfo(scale, resized(src_w, cw), resized(src_h, ch), src_w, src_h)


def aspect_canvas(src_h: int, src_w: int, canvas_hw: tuple[int, int], stride: int = 32) -> tuple[int, int]:
    """The [H, W] canvas of about ``canvas_hw``'s pixels in a ``src_h x src_w`` frame's aspect, sides
    rounded to multiples of ``stride`` (what ``compress.export --canvas`` takes): 640 x 480 on 256 x
    256 -> 224 x 288, 1280 x 720 -> 192 x 352."""
    area = canvas_hw[0] * canvas_hw[1]
    side = lambda v: max(stride, int(v / stride + 0.5) * stride)  # noqa: E731
    return side(math.sqrt(area * src_h / src_w)), side(math.sqrt(area * src_w / src_h))


def canvas_fill(src_h: int, src_w: int, canvas_hw: tuple[int, int]) -> float:
    """The share of an [H, W] letterbox canvas that a ``src_h x src_w`` frame covers."""
    info = letterbox_info(src_w, src_h, canvas_hw)
    return info.new_w * info.new_h / (canvas_hw[0] * canvas_hw[1])


# ---------------------------------------------------------------------------------------------
# Input normalisation

def _uint8_from_array(a: np.ndarray) -> np.ndarray:
    """Any numeric image array -> uint8 of the same shape (see to_rgb_uint8 for the rules)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if a.dtype == np.uint16:
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if a.dtype.kind in "iu":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"integer image values must be in [0, 255] (got [{lo}, {hi}]); "
                "pass 16-bit images as uint16"
            )
        return a.astype(np.uint8)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
            raise ValueError("float images must hold finite values in [0, 1]")
        return np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    raise ValueError(f"not image data: array of dtype {a.dtype}")


def _array_from_pil(img: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> uint8 HxW or HxWx3 (16-bit modes scaled, alpha dropped)."""
    try:
        if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I: 16-bit data (e.g. 16-bit PNG)
            a = np.asarray(img).astype(np.int64)
            return _uint8_from_array(np.clip(a, 0, 65535).astype(np.uint16))
        if img.mode in ("P", "PA"):  # palette transparency only converts cleanly via RGBA
            img = img.convert("RGBA")
        return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"unreadable image data ({type(e).__name__}: {e})") from None


def to_rgb_uint8(image: Any, bgr: bool = False) -> np.ndarray:
    """Normalise an image to uint8 RGB [H, W, 3] (a view of the input where possible).

    Accepts a PIL image of any mode (palette, CMYK, RGBA, LA, 1, L, I;16, I, F, ...) or an
    array: [H, W], [H, W, 1] (gray), [H, W, 2] (gray + alpha), [H, W, 3], [H, W, 4] (alpha is
    dropped); ``bgr`` says a 3/4-channel array is BGR(A). dtypes: uint8; bool; uint16 (16-bit,
    scaled to 0..255); other integers holding 0..255; floats holding [0, 1].
    Raises ValueError for empty or non-image data and TypeError for non-arrays.
    """
    if isinstance(image, Image.Image):
        a, bgr = _array_from_pil(image), False
    elif isinstance(image, (np.ndarray, list, tuple)):
        try:
            a = np.asarray(image)
        except ValueError as e:
            raise ValueError(f"not image data: {e}") from None
    else:
        raise TypeError(f"expected a numpy array or a PIL image, got {type(image).__name__}")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 2, 3, 4)):
        raise ValueError(
            f"image must be HxW, HxWx1, HxWx2, HxWx3 or HxWx4, got shape {list(a.shape)}"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"empty image ({a.shape[0]} x {a.shape[1]} pixels)")
    a = _uint8_from_array(a)
    if a.ndim == 2 or a.shape[2] <= 2:
        gray = a if a.ndim == 2 else a[:, :, 0]
        return np.repeat(gray[:, :, None], 3, axis=2)
    return a[:, :, 2::-1] if bgr else a[:, :, :3]


# ---------------------------------------------------------------------------------------------
# Letterbox: numpy reference and the dispatching entry point

def _linear_taps(src_len: int, dst_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR taps on one axis: clamped index pairs and the second's weight."""
    f = ((np.arange(dst_len) + 0.5) * (src_len / dst_len) - 0.5).astype(np.float32)
    k = np.floor(f)
    a = f - k  # float32, as the C code
    k = k.astype(np.int64)
    return np.clip(k, 0, src_len - 1), np.clip(k + 1, 0, src_len - 1), a


def _check_src(src: Any) -> np.ndarray:
    a = np.asarray(src)
    if a.dtype != np.uint8:
        raise TypeError(f"src must be uint8, got {a.dtype}")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ValueError("src must be HxW, HxWx1, HxWx3 or HxWx4")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"src is an empty image ({a.shape[0]} x {a.shape[1]})")
    return a


def _check_out(out: Any) -> np.ndarray:
    if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.ndim != 3
            or out.shape[0] != 3 or out.shape[1] < 1 or out.shape[2] < 1
            or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError("out must be a writable C-contiguous float32 array of shape (3, H, W)")
    return out


def letterbox_ref(src: np.ndarray, out: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD, bgr_input: bool = False) -> LetterboxInfo:
    """numpy twin of ``runtime._native.letterbox``: fill ``out`` float32 [3, H, W] from ``src``
    (scale min(H / h, W / w): S / max(h, w) on a square S x S canvas).

    src: uint8 [H, W], [H, W, 1], [H, W, 3] (RGB, or BGR with ``bgr_input``) or [H, W, 4]
    (alpha ignored). Gray is replicated to RGB. Returns where the image landed.
    """
    a, out = _check_src(src), _check_out(out)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    else:
        a = a[:, :, 2::-1] if bgr_input else a[:, :, :3]
    info = letterbox_info(a.shape[1], a.shape[0], (out.shape[1], out.shape[2]))
    x0, x1, ax = _linear_taps(info.src_w, info.new_w)
    y0, y1, ay = _linear_taps(info.src_h, info.new_h)
    ax = ax[None, :, None]

    def resample_rows(rows: np.ndarray) -> np.ndarray:  # [nh, W, 3] uint8 -> [nh, nw, 3]
        p0, p1 = rows[:, x0].astype(np.float32), rows[:, x1].astype(np.float32)
        return p0 + ax * (p1 - p0)

    top, bottom = resample_rows(a[y0]), resample_rows(a[y1])
    v = top + ay[:, None, None] * (bottom - top)  # [nh, nw, 3]
    m = np.asarray(mean, np.float64)
    s = np.asarray(std, np.float64)
    out.fill(0.0)
    out[:, : info.new_h, : info.new_w] = ((v / 255.0 - m) / s).transpose(2, 0, 1)
    return info


def letterbox(src: np.ndarray, out: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, bgr_input: bool = False,
              use_native: bool = True) -> LetterboxInfo:
    """Letterbox ``src`` into ``out`` float32 [3, H, W] with the C extension (see letterbox_ref)."""
    native = load_native() if use_native else None
    if native is None:
        return letterbox_ref(src, out, mean, std, bgr_input)
    src = _check_src(src)
    scale, new_w, new_h = native.letterbox(src, _check_out(out), mean, std, bgr_input)
    return LetterboxInfo(scale, new_w, new_h, src.shape[1], src.shape[0])


# ---------------------------------------------------------------------------------------------
# The official FIBER/GLIP test input (min/max resize, PIL bilinear, BGR 0-255) on a fixed canvas

def official_resize_hw(h: int, w: int, rule: ResizeRule) -> tuple[int, int]:
    """(new_h, new_w) by the official test rule (maskrcnn_benchmark ``Resize.get_size``).

    s = min_size; if long/short * s > max_size: s = round(max_size * short / long) (Python's
    round, as the official code). The shorter side becomes s, the longer int(s * long / short).
    An image already at that size keeps it. s is at least 1 (the official code would give 0 for
    a 1 x 1000 strip).
    """
    size = rule.min_size
    lo, hi = float(min(h, w)), float(max(h, w))
    if hi / lo * size > rule.max_size:
        size = int(round(rule.max_size * lo / hi))
    size = max(1, size)
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return max(1, int(size * h / w)), size
    return size, max(1, int(size * w / h))


def canvas_resize_hw(h: int, w: int, spec: InputSpec) -> tuple[int, int]:
    """(new_h, new_w) of an h x w image on ``spec``'s canvas: the official rule, and when that
    does not fit the canvas, the image scaled down to fit it instead (aspect kept: scale
    f = min(H / h, W / w), sides rounded half up, at least 1)."""
    ch, cw = spec.size
    assert spec.resize is not None
    oh, ow = official_resize_hw(h, w, spec.resize)
    if oh <= ch and ow <= cw:
        return oh, ow
    f = min(ch / h, cw / w)
    return min(ch, max(1, math.floor(h * f + 0.5))), min(cw, max(1, math.floor(w * f + 0.5)))


def official_input(rgb: np.ndarray, out: np.ndarray, spec: InputSpec) -> LetterboxInfo:
    """Fill ``out`` float32 [3, H, W] from ``rgb`` uint8 [h, w, 3] as the official test transform.

    PIL bilinear resize (``torchvision.transforms.functional.resize`` on a PIL image), then in
    float32: x = u8 / 255, reordered to ``spec.channel_order``, x * pixel_scale, (x - mean) / std;
    the image sits top-left, the rest of the canvas is 0. With the official BGR 0-255 spec this
    reproduces the official ``input.images`` bit-exactly (tests/test_official_runtime.py).
    ``info.scale`` is new_w / w (the exact per-axis ratios are new_w / w and new_h / h).
    """
    a = np.asarray(rgb)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or 0 in a.shape:
        raise ValueError(f"rgb must be uint8 [h, w, 3], got {a.dtype} {list(a.shape)}")
    ch, cw = spec.size
    if out.dtype != np.float32 or out.shape != (3, ch, cw):
        raise ValueError(f"out must be float32 [3, {ch}, {cw}], got {out.dtype} {list(out.shape)}")
    h, w = a.shape[:2]
    nh, nw = canvas_resize_hw(h, w, spec)
    if (nh, nw) != (h, w):
        a = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((nw, nh), Image.BILINEAR))
    x = a.astype(np.float32) / np.float32(255.0)  # [nh, nw, 3] RGB
    if spec.channel_order == "BGR":
        x = x[:, :, ::-1]
    if spec.pixel_scale != 1.0:
        x = x * np.float32(spec.pixel_scale)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    out.fill(0.0)
    out[:, :nh, :nw] = x.transpose(2, 0, 1)
    return LetterboxInfo(nw / w, nw, nh, w, h)


class Preprocessor:
    """Prepares frames into one preallocated network input ``buffer`` float32 [1, 3, H, W].

    ``Preprocessor(S, mean, std)``: the square letterbox (C extension); ``Preprocessor((H, W), ...)``
    the letterbox on a fixed [H, W] canvas (scale min(H / h, W / w)). ``from_spec`` /
    ``from_manifest`` also take the official input spec (``common.package.InputSpec`` with a
    ``resize`` rule: official_input on the [H, W] canvas). The returned array *is* ``buffer``:
    the next call overwrites it (copy it to keep it, or use ``run`` with your own array).
    """

    def __init__(self, size: int | tuple[int, int], mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, use_native: bool = True):
        hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
        if len(hw) != 2 or min(int(v) for v in hw) < 1:
            raise ValueError(f"size must be S >= 1 or (H, W) >= 1, got {size}")
        if len(mean) != 3 or len(std) != 3 or not all(s != 0 for s in std):
            raise ValueError(f"mean and std need 3 values each, std non-zero (got {mean}, {std})")
        self._setup(InputSpec((int(hw[0]), int(hw[1])), "RGB", 1.0, tuple(float(m) for m in mean),
                              tuple(float(s) for s in std)), use_native)

    def _setup(self, spec: InputSpec, use_native: bool) -> None:
        self.spec = spec
        self.canvas_hw = spec.size                 # (H, W)
        self.size = max(spec.size)                 # S of a square canvas (else the longer side)
        self.mean = spec.mean
        self.std = spec.std
        self.use_native = use_native
        self.buffer = np.zeros((1, 3) + tuple(spec.size), np.float32)

    @classmethod
    def from_spec(cls, spec: InputSpec, use_native: bool = True) -> Preprocessor:
        """From a typed input spec (letterbox or official)."""
        if spec.style == INPUT_LETTERBOX and spec.channel_order == "RGB" and spec.pixel_scale == 1.0:
            return cls(spec.size, spec.mean, spec.std, use_native)
        if spec.style == INPUT_LETTERBOX:
            raise ValueError(f"unsupported package input spec {spec.to_json()} (a letterbox input "
                             "must be RGB with pixel_scale 1)")
        self = cls.__new__(cls)
        self._setup(spec, use_native)
        return self

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], use_native: bool = True) -> Preprocessor:
        """From a model package manifest's ``input`` section (common.package.InputSpec)."""
        return cls.from_spec(InputSpec.from_manifest(manifest), use_native)

    def run(self, image: Any, out: np.ndarray, bgr: bool = False) -> LetterboxInfo:
        """Fill ``out`` float32 [3, H, W] from ``image`` (array or PIL; see to_rgb_uint8)."""
        a = image
        if self.spec.style == INPUT_OFFICIAL:
            return official_input(to_rgb_uint8(a, bgr), out, self.spec)
        native_ok = (isinstance(a, np.ndarray) and a.dtype == np.uint8
                     and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))))
        if not native_ok:
            a, bgr = to_rgb_uint8(image, bgr), False
        return letterbox(a, out, self.mean, self.std, bgr, self.use_native)

    def __call__(self, image: Any, bgr: bool = False) -> tuple[np.ndarray, LetterboxInfo]:
        """``image`` (array or PIL; see to_rgb_uint8) -> (buffer, info). ``bgr``: OpenCV frames."""
        return self.buffer, self.run(image, self.buffer[0], bgr)
