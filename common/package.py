"""The model-package contract: file names, tensor names and the manifest (docs/architecture.md).

The exporter (compress/) writes packages with these names; engines/ and runtime/ read them.
Torch-free and numpy-free on purpose: it is imported by every stage.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from common.atomic import atomic_write_text

FORMAT = "fiber-edge-package"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
TEXT_GRAPH = "text.onnx"
DETECTOR_GRAPH = "detector.onnx"
DETECTOR_CPU_GRAPH = "detector.cpu.onnx"
TOKENIZER = "tokenizer.json"

# text.onnx
INPUT_IDS = "input_ids"            # int64 [B, T]
ATTENTION_MASK = "attention_mask"  # int64 [B, T], 1 = real token
TEXT_HIDDEN = "text_hidden"        # float32 [B, T, D]
# detector.onnx (inputs: IMAGE, TEXT_HIDDEN, ATTENTION_MASK)
IMAGE = "image"                    # float32 [B, 3, H, W] canvas (letterbox or official), normalised
BOXES = "boxes"                    # float32 [B, N, 4], xyxy in network-input pixels
TOKEN_LOGITS = "token_logits"      # float32 [B, N, T]
CENTERNESS = "centerness"          # float32 [B, N], logits

TEXT_INPUTS = (INPUT_IDS, ATTENTION_MASK)
TEXT_OUTPUTS = (TEXT_HIDDEN,)
DETECTOR_INPUTS = (IMAGE, TEXT_HIDDEN, ATTENTION_MASK)
DETECTOR_OUTPUTS = (BOXES, TOKEN_LOGITS, CENTERNESS)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BUCKETS = (16, 32, 64)
LONG_BUCKETS = (128, 256)  # default buckets past DEFAULT_BUCKETS, for configs with long prompts (FIBER-B: 256)


def text_buckets(max_text_len: int, buckets: Sequence[int] | None = None, config: str = "") -> tuple[int, ...]:
    """The one rule for text buckets (package, engines and torch evaluation pad prompts alike): the
    given ones (ascending, >= 3, <= max_text_len) or the defaults (16, 32, 64, 128, 256) that fit
    ``max_text_len`` (256: all five; 64: 16, 32, 64). ValueError naming the problem."""
    if buckets is None:
        chosen = tuple(b for b in DEFAULT_BUCKETS + LONG_BUCKETS if b <= max_text_len) or (max_text_len,)
    else:
        chosen = tuple(sorted({int(b) for b in buckets}))
    if not chosen or chosen[0] < 3:
        raise ValueError(f"text buckets must be >= 3 tokens, got {list(chosen)}")
    if chosen[-1] > max_text_len:
        raise ValueError(f"text bucket {chosen[-1]} exceeds the {max_text_len} tokens of config "
                         f"'{config}' (max_text_len)")
    return chosen


class PackageError(ValueError):
    """A model package that is missing, malformed, tampered with or of an unknown version."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_versioned_json(path: Path, fmt: str, max_version: int, sections: tuple[str, ...],
                        what: str, remedy: str, error: type[Exception]) -> dict[str, Any]:
    """Parse a ``{"format": fmt, "format_version": N, ...}`` file (package manifest, engine.json):
    ``error`` with the path and the problem when it is unreadable, of another format, of a newer
    version than this code reads (``remedy`` says what to do) or lacks one of ``sections``."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: unreadable {what}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise error(f"{path}: 'format' is not {fmt!r}")
    version = doc.get("format_version")
    if not isinstance(version, int):
        raise error(f"{path}: 'format_version' missing or not an integer")
    if version > max_version:
        raise error(f"{path}: {what.split()[0]} format_version {version} is newer than this fiber-edge "
                    f"reads ({max_version}); {remedy}")
    for key in sections:
        if key not in doc:
            raise error(f"{path}: {what} has no {key!r} section")
    return doc


def read_manifest(package: str | Path) -> dict[str, Any]:
    """Parse ``package/manifest.json`` and check its format and version (not the hashes)."""
    package = Path(package)
    path = package / MANIFEST
    if not package.exists():
        raise PackageError(f"{package}: does not exist (expected a model package folder)")
    if not package.is_dir():
        raise PackageError(f"{package}: not a folder (expected a model package)")
    if not path.is_file():
        raise PackageError(f"{package}: no {MANIFEST} (not a model package)")
    return read_versioned_json(path, FORMAT, FORMAT_VERSION, ("files", "graphs", "input", "text"),
                               "package manifest", "upgrade fiber-edge or re-export the package",
                               PackageError)


def write_manifest(package: str | Path, manifest: Mapping[str, Any]) -> None:
    """Write ``package/manifest.json`` (atomically: temp file + rename)."""
    atomic_write_text(Path(package) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def verify_files(package: str | Path, manifest: dict[str, Any]) -> None:
    """Check every file listed in the manifest exists and has the recorded sha256."""
    package = Path(package)
    for name, info in manifest["files"].items():
        path = package / name
        if not path.is_file():
            raise PackageError(f"{package}: {name} is listed in the manifest but missing")
        digest = sha256_file(path)
        if digest != info.get("sha256"):
            raise PackageError(
                f"{path}: sha256 {digest[:16]}... does not match the manifest "
                f"({str(info.get('sha256'))[:16]}...): the file was modified or corrupted"
            )


def load_package_manifest(package: str | Path, verify: bool = True) -> dict[str, Any]:
    manifest = read_manifest(package)
    if verify:
        verify_files(package, manifest)
    return manifest


def package_digest(manifest: dict[str, Any]) -> str:
    """One sha256 that names a package's content: the hash of its files' hashes."""
    h = hashlib.sha256()
    for name in sorted(manifest["files"]):
        h.update(name.encode())
        h.update(manifest["files"][name]["sha256"].encode())
    return h.hexdigest()


# Optional reference data inside a package: reference/<graph>.npz holds
# one set of the graph's inputs and the expected outputs, keyed by tensor name; listed in "files".
REFERENCE_DIR = "reference"


def reference_file(graph: str) -> str:
    """Relative path of the reference inputs/outputs of ``graph`` ("text" or "detector")."""
    return f"{REFERENCE_DIR}/{graph}.npz"


# ---------------------------------------------------------------------------------------------
# Typed views of the manifest's "input" and "postprocess" sections (docs/architecture.md).
# A manifest without these keys (a package exported before the official fine model) reads as the
# letterbox style: letterbox (square, or a fixed [H, W] canvas), RGB, x/255, per-phrase post-processing.

INPUT_LETTERBOX = "letterbox"   # [H, W] canvas, scale min(H / h, W / w), bilinear half-pixel
INPUT_OFFICIAL = "official"     # official FIBER/GLIP test resize on a fixed [H, W] canvas
POST_LETTERBOX = "letterbox"    # per-phrase threshold / top-k / NMS (runtime.postprocess.postprocess)
POST_OFFICIAL = "official"      # the official ATSSPostProcessor (runtime.postprocess.postprocess_official)
# A phrase's score from its tokens' probabilities: FIBER/GLIP's mean, or the minimum (a model
# trained with word targets, train.fine --word-targets: a phrase holds where all its words do).
PHRASE_SCORE_MEAN = "mean"
PHRASE_SCORE_MIN = "min"
PHRASE_SCORES = (PHRASE_SCORE_MEAN, PHRASE_SCORE_MIN)

# The official fine configs' values (GLIP/FIBER yaml: INPUT.PIXEL_MEAN / PIXEL_STD, TO_BGR255).
OFFICIAL_BGR255_MEAN = (103.53, 116.28, 123.675)
OFFICIAL_BGR255_STD = (57.375, 57.12, 58.395)


def _field(section: Mapping[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    value = section.get(key, default)
    try:
        if kind is int and (isinstance(value, bool) or int(value) != value):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        raise PackageError(f"manifest {where}.{key} must be {kind.__name__}, got {value!r}") from None


def _triple(section: Mapping[str, Any], key: str, default: tuple[float, ...], where: str):
    value = section.get(key, default)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3:
        raise PackageError(f"manifest {where}.{key} must be 3 numbers, got {value!r}")
    return out


@dataclass(frozen=True)
class ResizeRule:
    """The official test resize (maskrcnn_benchmark ``Resize.get_size``, GLIP/FIBER fine).

    s = min_size; if long/short * s > max_size: s = round(max_size * short / long). The shorter
    side becomes s, the longer int(s * long / short) (truncated). PIL bilinear (antialiased).
    """

    min_size: int                       # INPUT.MIN_SIZE_TEST (800 official, 192 golden)
    max_size: int                       # INPUT.MAX_SIZE_TEST (1333 official, 288 golden)
    size_divisibility: int = 32         # DATALOADER.SIZE_DIVISIBILITY; the canvas is a multiple
    interpolation: str = "pil-bilinear"  # the only one implemented

    def to_json(self) -> dict[str, Any]:
        return {"rule": "min-max", "min_size": self.min_size, "max_size": self.max_size,
                "size_divisibility": self.size_divisibility, "interpolation": self.interpolation}


@dataclass(frozen=True)
class InputSpec:
    """The manifest's ``input`` section: how an RGB uint8 image becomes the network input.

    x = pixel / 255 * pixel_scale in ``channel_order``, then (x - mean) / std per channel; the
    resized image sits top-left on the [H, W] canvas, the rest is ``pad_value`` (0 = the mean
    colour, padding after normalisation). ``resize`` None: the letterbox (scale min(H / h, W / w),
    S / max(h, w) on a square canvas; bilinear with half-pixel centres). ``resize`` set: the official rule, and an image whose
    resized size does not fit the canvas is scaled down to fit it (aspect kept).
    """

    size: tuple[int, int]                          # canvas [H, W] (the detector graph's input)
    channel_order: str = "RGB"                     # of the network input: "RGB" | "BGR"
    pixel_scale: float = 1.0                       # 1: x/255 (ImageNet style); 255: 0-255 (official)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per channel, in channel_order
    std: tuple[float, float, float] = IMAGENET_STD
    resize: ResizeRule | None = None               # None: the letterbox
    letterbox: str = "top-left"                    # where the image sits (the only placement)
    pad_value: float = 0.0                         # after normalisation

    def __post_init__(self) -> None:
        h, w = self.size
        problems = []
        if h < 1 or w < 1:
            problems.append(f"size {list(self.size)} must be positive")
        if self.channel_order not in ("RGB", "BGR"):
            problems.append(f"channel_order {self.channel_order!r} is not RGB or BGR")
        if not self.pixel_scale > 0 or any(not s != 0 for s in self.std):
            problems.append("pixel_scale must be > 0 and std non-zero")
        if self.letterbox != "top-left" or self.pad_value != 0.0:
            problems.append("only a top-left placement with pad_value 0 is supported")
        if self.resize is not None:
            r = self.resize
            if not 1 <= r.min_size <= r.max_size or r.size_divisibility < 1:
                problems.append(f"resize needs 1 <= min_size <= max_size, got {r}")
            elif h % r.size_divisibility or w % r.size_divisibility:
                problems.append(f"canvas {list(self.size)} is not a multiple of {r.size_divisibility}")
            if r.interpolation != "pil-bilinear":
                problems.append(f"resize interpolation {r.interpolation!r} is not 'pil-bilinear'")
        if problems:
            raise PackageError("manifest input: " + "; ".join(problems))

    @property
    def style(self) -> str:
        return INPUT_LETTERBOX if self.resize is None else INPUT_OFFICIAL

    @classmethod
    def official(cls, canvas_hw: tuple[int, int], min_size: int, max_size: int,
                 size_divisibility: int = 32) -> InputSpec:
        """The official fine input (BGR 0-255, official mean/std) on an [H, W] canvas."""
        return cls((int(canvas_hw[0]), int(canvas_hw[1])), "BGR", 255.0, OFFICIAL_BGR255_MEAN,
                   OFFICIAL_BGR255_STD, ResizeRule(int(min_size), int(max_size), int(size_divisibility)))

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> InputSpec:
        """From ``manifest["input"]``; PackageError naming the bad field."""
        sec = manifest.get("input")
        if not isinstance(sec, Mapping):
            raise PackageError("manifest has no 'input' section")
        size = sec.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
            raise PackageError(f"manifest input.size must be [H, W] integers, got {size!r}")
        resize = None
        raw = sec.get("resize")
        if raw is not None:
            if not isinstance(raw, Mapping) or raw.get("rule", "min-max") != "min-max":
                raise PackageError(f"manifest input.resize must be a 'min-max' rule, got {raw!r}")
            resize = ResizeRule(_field(raw, "min_size", int, None, "input.resize"),
                                _field(raw, "max_size", int, None, "input.resize"),
                                _field(raw, "size_divisibility", int, 32, "input.resize"),
                                str(raw.get("interpolation", "pil-bilinear")))
        return cls((size[0], size[1]), str(sec.get("channel_order", "RGB")),
                   _field(sec, "pixel_scale", float, 1.0, "input"),
                   _triple(sec, "mean", IMAGENET_MEAN, "input"),
                   _triple(sec, "std", IMAGENET_STD, "input"), resize,
                   str(sec.get("letterbox", "top-left")), _field(sec, "pad_value", float, 0.0, "input"))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"size": list(self.size), "channel_order": self.channel_order,
                             "mean": list(self.mean), "std": list(self.std),
                             "letterbox": self.letterbox, "pad_value": self.pad_value}
        if self.resize is not None or self.pixel_scale != 1.0:
            d["pixel_scale"] = self.pixel_scale
        if self.resize is not None:
            d["resize"] = self.resize.to_json()
        return d


@dataclass(frozen=True)
class TextSpec:
    """The manifest's ``text`` section: how a prompt becomes token ids for text.onnx."""

    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # padded lengths (the engines' profiles); the last is max_tokens
    hidden_size: int | None = None              # D of text_hidden (None: not recorded)
    pad_id: int | None = None                   # None: the tokenizer's [PAD] / <pad>
    lowercase: bool = False                     # lowercase prompts before tokenising
    tokenizer: str = TOKENIZER                  # file name inside the package

    @property
    def max_tokens(self) -> int:
        return max(self.buckets)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> TextSpec:
        """From ``manifest["text"]`` (missing keys: the defaults); PackageError naming a bad field."""
        sec = manifest.get("text")
        if not isinstance(sec, Mapping):
            raise PackageError("manifest has no 'text' section")
        buckets = sec.get("buckets") or DEFAULT_BUCKETS
        if not isinstance(buckets, (list, tuple)):
            raise PackageError(f"manifest text.buckets must be a list, got {buckets!r}")
        return cls(tuple(_field({"n": b}, "n", int, None, "text.buckets") for b in buckets),
                   None if sec.get("hidden_size") is None else _field(sec, "hidden_size", int, None, "text"),
                   None if sec.get("pad_id") is None else _field(sec, "pad_id", int, None, "text"),
                   bool(sec.get("lowercase", False)), str(sec.get("tokenizer", TOKENIZER)))

    def to_json(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "max_tokens": self.max_tokens, "buckets": list(self.buckets),
                "hidden_size": self.hidden_size, "pad_id": self.pad_id, "lowercase": self.lowercase}


@dataclass(frozen=True)
class PostprocessSpec:
    """The manifest's ``postprocess`` section: detector outputs -> detections.

    style "letterbox" (default): per phrase, threshold the phrase score (x centerness), its
    pre_nms_top_k best, NMS per phrase, the best max_detections. style "official": the
    official ATSSPostProcessor per level (``level_sizes`` anchors each, in the order of the
    detector's N outputs): threshold before centerness, pre_nms_top_k per level, sqrt score,
    clip, multi-label NMS with +1 IoU, the kthvalue cut to max_detections.

    phrase_score: how a phrase's score is made from its tokens' probabilities (``PHRASE_SCORES``):
    "mean" (FIBER/GLIP; the default, and the only rule of style "official") or "min". Written to
    the manifest only when not the default.
    """

    style: str = POST_LETTERBOX
    threshold: float = 0.05            # MODEL.ATSS.INFERENCE_TH
    nms_iou: float = 0.6               # MODEL.ATSS.NMS_TH
    pre_nms_top_k: int = 1000          # letterbox: per phrase; official: per level (PRE_NMS_TOP_N)
    max_detections: int = 100          # MODEL.ATSS.DETECTIONS_PER_IMG
    level_sizes: tuple[int, ...] = ()  # official only: anchors per FPN level, sum = N
    phrase_score: str = PHRASE_SCORE_MEAN

    def __post_init__(self) -> None:
        if self.style not in (POST_LETTERBOX, POST_OFFICIAL):
            raise PackageError(f"manifest postprocess.style {self.style!r} is not "
                               f"{POST_LETTERBOX!r} or {POST_OFFICIAL!r}")
        if self.phrase_score not in PHRASE_SCORES:
            raise PackageError(f"manifest postprocess.phrase_score {self.phrase_score!r} is not one of "
                               f"{', '.join(PHRASE_SCORES)}")
        if self.style == POST_OFFICIAL and self.phrase_score != PHRASE_SCORE_MEAN:
            raise PackageError("manifest postprocess.phrase_score must be 'mean' for style 'official'")
        if self.style == POST_OFFICIAL and (not self.level_sizes
                                            or any(n < 1 for n in self.level_sizes)):
            raise PackageError("manifest postprocess.level_sizes must list the anchors per level "
                               f"(positive integers) for style 'official', got {list(self.level_sizes)}")

    def check_anchors(self, manifest: Mapping[str, Any]) -> None:
        """PackageError when ``level_sizes`` disagree with the detector's recorded N (boxes
        [batch, N, 4] in ``graphs.detector.outputs``, when N is a number)."""
        if self.style != POST_OFFICIAL:
            return
        outputs = ((manifest.get("graphs") or {}).get("detector") or {}).get("outputs") or []
        for spec in outputs:
            shape = spec.get("shape") if isinstance(spec, Mapping) else None
            if spec.get("name") == BOXES and isinstance(shape, list) and len(shape) == 3 \
                    and isinstance(shape[1], int) and shape[1] != sum(self.level_sizes):
                raise PackageError(f"manifest postprocess.level_sizes add up to "
                                   f"{sum(self.level_sizes)} anchors, the detector gives {shape[1]}")

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> PostprocessSpec:
        """From ``manifest["postprocess"]`` (missing section or keys: the defaults)."""
        sec = manifest.get("postprocess") or {}
        if not isinstance(sec, Mapping):
            raise PackageError(f"manifest postprocess must be an object, got {sec!r}")
        levels = sec.get("level_sizes", ())
        if not isinstance(levels, (list, tuple)):
            raise PackageError(f"manifest postprocess.level_sizes must be a list, got {levels!r}")
        d = cls()
        return cls(str(sec.get("style", d.style)),
                   _field(sec, "threshold", float, d.threshold, "postprocess"),
                   _field(sec, "nms_iou", float, d.nms_iou, "postprocess"),
                   _field(sec, "pre_nms_top_k", int, d.pre_nms_top_k, "postprocess"),
                   _field(sec, "max_detections", int, d.max_detections, "postprocess"),
                   tuple(_field({"n": n}, "n", int, None, "postprocess.level_sizes") for n in levels),
                   str(sec.get("phrase_score", d.phrase_score)))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"threshold": self.threshold, "nms_iou": self.nms_iou,
                             "pre_nms_top_k": self.pre_nms_top_k,
                             "max_detections": self.max_detections}
        if self.style != POST_LETTERBOX:
            d = {"style": self.style, **d, "level_sizes": list(self.level_sizes)}
        if self.phrase_score != PHRASE_SCORE_MEAN:
            d["phrase_score"] = self.phrase_score
        return d
