"""The predictor: one image + a prompt -> Detections, on any backend, with a prompt cache.

    from runtime.predictor import Detector
    with Detector("models/fiber-nano-int8") as det:          # a package: ONNX Runtime (CPU)
        dets = det.detect("street.jpg", "person. red mug")    # Detections, boxes xyxy source pixels
        det.last_timing                                        # StageTimes(pre, text, network, post) ms

``text.onnx`` runs only when the prompt (or its phrase spans) changes: the encoded prompt and its
``text_hidden`` [1, T, D] are kept in a small LRU keyed by (prompt, spans). ``detector.onnx``
runs every call. Pre- and post-processing are runtime.preprocess / runtime.postprocess (the C
extension). Torch-free. A Detector is not thread-safe: one per thread.
"""
from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import engines
from common import package as pkg
from engines.manifest import ENGINE_JSON
from runtime.postprocess import postprocess, postprocess_official
from runtime.preprocess import Preprocessor
from runtime.sources import read_image
from runtime.tokenize import EncodedPrompt, PromptTokenizer
from runtime.types import Detections, LetterboxInfo

PhraseSpans = Sequence[Sequence[Sequence[int]]]  # per phrase, [start, end) char spans of the prompt


@dataclass(frozen=True)
class StageTimes:
    """Wall-clock milliseconds of one ``detect`` call, per stage.

    pre: image decode (paths only) + letterbox; text: tokenise + text.onnx (0-ish on a cache
    hit); network: detector.onnx; post: scores, top-k, NMS, box decode.
    """

    pre: float = 0.0
    text: float = 0.0
    network: float = 0.0
    post: float = 0.0

    @property
    def total(self) -> float:
        return self.pre + self.text + self.network + self.post

    def to_json(self, digits: int = 3) -> dict[str, float]:
        """``{"pre", "text", "network", "post", "total"}`` in ms."""
        d = {"pre": self.pre, "text": self.text, "network": self.network, "post": self.post,
             "total": self.total}
        return {k: round(v, digits) for k, v in d.items()}


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """A letterboxed network input from ``Detector.preprocess`` (own buffer; any thread)."""

    tensor: np.ndarray    # float32 [1, 3, H, W], normalised, placed top-left on the canvas
    info: LetterboxInfo   # where the source image landed (for mapping boxes back)
    pre_ms: float         # what making it cost (decode of a path included)


@dataclass(frozen=True)
class DetectorConfig:
    """What ``build_detector`` needs; None means "the package manifest's value"."""

    package: str                       # model package folder, or an engine folder (TensorRT)
    backend: str = "auto"              # auto | onnxruntime (ort) | openvino | tensorrt | tensorrt-rtx
    threads: int | None = None         # CPU threads of the backend (ORT intra-op / OpenVINO); None = its default
    threshold: float | None = None     # phrase score threshold in [0, 1]
    max_detections: int | None = None  # at most this many detections per image
    nms_iou: float | None = None       # per-phrase NMS IoU threshold
    pre_nms_top_k: int | None = None   # candidates kept per phrase before NMS
    prompt_cache_size: int = 8         # encoded prompts (+ text_hidden) kept, least recently used out
    use_native: bool = True            # C extension for pre/post (False: the numpy references)
    verify: bool = True                # check the package files' sha256 on load
    min_per_phrase: int = 0            # > 0: keep each phrase's best max(this, max_detections // P)
    per_phrase: int = 0                # > 0: grounding, each phrase's best K boxes (Flickr30k protocol)
    one_label_per_box: bool = False    # detection: NMS across phrases, a box keeps its best phrase
    fastest: bool = False              # backend "auto", a package: time the CPU paths, run the fastest
    expected_runs: int | None = None   # with fastest: the images to run (None: a stream), see engines.autotune


def build_detector(cfg: DetectorConfig) -> Detector:
    """``Detector(cfg.package, **the other fields)``: the fields are Detector's keyword arguments
    (tests/test_predictor.py holds the two to the same names and defaults)."""
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "package"}
    return Detector(cfg.package, **options)


@dataclass
class _CachedPrompt:
    encoded: EncodedPrompt
    text_hidden: np.ndarray  # float32 [1, T, D]


@dataclass(frozen=True)
class _PostParams:
    threshold: float       # phrase score threshold
    nms_iou: float         # per-phrase NMS IoU
    pre_nms_top_k: int     # candidates per phrase before NMS
    max_detections: int    # kept per image
    min_per_phrase: int    # > 0: keep each phrase's best max(this, max_detections // P) instead
    per_phrase: int = 0    # > 0: keep each phrase's best K (grounding)
    one_label_per_box: bool = False  # NMS across phrases instead of per phrase
    style: str = pkg.POST_LETTERBOX  # "letterbox" (postprocess) | "official" (postprocess_official)
    level_sizes: tuple[int, ...] = ()  # official: anchors per level
    phrase_score: str = pkg.PHRASE_SCORE_MEAN  # letterbox: "mean" | "min" over a phrase's tokens


def _engine_options(path: Path, backend: str, threads: int | None, verify: bool,
                    fastest: bool = False, expected_runs: int | None = None) -> dict[str, Any]:
    """engines.load options: the thread count goes to whichever CPU backend will run; ``fastest``
    (backend "auto" on a package) times the CPU paths and runs the quickest for ``expected_runs``
    images (None: the fastest per image; engines.autotune)."""
    opts: dict[str, Any] = {"verify": verify}
    is_engine_dir = (path / ENGINE_JSON).is_file()
    if fastest and backend == "auto" and not is_engine_dir:
        opts["fastest"] = True
        if expected_runs is not None:
            opts["runs"] = expected_runs
    if threads is None:
        return opts
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if is_engine_dir and _engine_backend(path) in ("onnxruntime", "openvino"):
        opts["threads"] = threads  # a CPU engine folder (engines/cpu_engine.py)
    elif backend == "openvino":
        opts["threads"] = threads
    elif backend in ("auto", "ort", "onnxruntime") and not is_engine_dir:
        opts["intra_op_threads"] = threads
    return opts  # TensorRT: the GPU does the work; threads do not apply


def _engine_backend(path: Path) -> str | None:
    """The "backend" of an engine folder's engine.json (None when unreadable: load will say why)."""
    try:
        return engines.manifest.read_engine_manifest(path).get("backend")
    except engines.EngineError:
        return None


def _post_params(manifest: Mapping[str, Any], threshold, nms_iou, pre_nms_top_k,
                 max_detections, min_per_phrase: int = 0, per_phrase: int = 0,
                 one_label_per_box: bool = False) -> _PostParams:
    spec = pkg.PostprocessSpec.from_manifest(manifest)  # missing keys: the defaults
    spec.check_anchors(manifest)

    def pick(value, default):
        return default if value is None else value

    p = _PostParams(float(pick(threshold, spec.threshold)), float(pick(nms_iou, spec.nms_iou)),
                    int(pick(pre_nms_top_k, spec.pre_nms_top_k)),
                    int(pick(max_detections, spec.max_detections)), int(min_per_phrase),
                    int(per_phrase), bool(one_label_per_box), spec.style, spec.level_sizes,
                    spec.phrase_score)
    if not 0.0 <= p.threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {p.threshold}")
    if not 0.0 <= p.nms_iou <= 1.0:
        raise ValueError(f"nms_iou must be in [0, 1], got {p.nms_iou}")
    if p.per_phrase < 0:
        raise ValueError(f"per_phrase must be >= 1 (or 0: off), got {p.per_phrase}")
    if p.max_detections < 1 or p.pre_nms_top_k < 1:
        raise ValueError(f"max_detections and pre_nms_top_k must be >= 1, got "
                         f"{p.max_detections}, {p.pre_nms_top_k}")
    return p


def _tokenizer(package: Path, manifest: Mapping[str, Any]) -> PromptTokenizer:
    try:
        text = pkg.TextSpec.from_manifest(manifest)
        return PromptTokenizer(package / text.tokenizer, buckets=text.buckets, lowercase=text.lowercase,
                               pad_id=text.pad_id)
    except (ValueError, TypeError) as e:
        raise engines.PackageInvalid(f"{package}: {e}") from None


class Detector:
    """Open-vocabulary detection with a model package (or TensorRT engine folder).

    package_or_engine: a package folder, an engine folder, or already loaded
    ``engines.PackageEngines`` (the Detector then owns and closes it). backend: see
    ``engines.load``. threads: CPU threads for ONNX Runtime / OpenVINO. threshold, nms_iou,
    pre_nms_top_k, max_detections: override the manifest's ``postprocess`` section. per_phrase K
    > 0: grounding, each phrase's best K boxes; one_label_per_box: NMS across phrases. fastest
    (backend "auto", a package): time every CPU path once per machine and run the fastest
    (engines.autotune; ``engines.path_choice`` holds the timings), or with ``expected_runs`` the
    quickest for that many images, counting each path's start (OpenVINO compiles on its first).
    Raises engines.EngineError (package/engine/backend unusable) or ValueError (bad settings).
    """

    def __init__(self, package_or_engine: str | Path | engines.PackageEngines, backend: str = "auto",
                 threads: int | None = None, threshold: float | None = None,
                 max_detections: int | None = None, nms_iou: float | None = None,
                 pre_nms_top_k: int | None = None, prompt_cache_size: int = 8,
                 use_native: bool = True, verify: bool = True, min_per_phrase: int = 0,
                 per_phrase: int = 0, one_label_per_box: bool = False, fastest: bool = False,
                 expected_runs: int | None = None):
        if prompt_cache_size < 1:
            raise ValueError(f"prompt_cache_size must be >= 1, got {prompt_cache_size}")
        if isinstance(package_or_engine, engines.PackageEngines):
            self.engines = package_or_engine
        else:
            path = Path(package_or_engine)
            self.engines = engines.load(path, backend, **_engine_options(path, backend, threads, verify, fastest,
                                                                        expected_runs))
        try:
            self.manifest = self.engines.manifest
            try:
                self.post = _post_params(self.manifest, threshold, nms_iou, pre_nms_top_k,
                                         max_detections, min_per_phrase, per_phrase,
                                         one_label_per_box)
                self.preprocessor = Preprocessor.from_manifest(self.manifest, use_native=use_native)
            except pkg.PackageError as e:
                raise engines.PackageInvalid(f"{self.engines.package}: {e}") from None
            self.tokenizer = _tokenizer(self.engines.package, self.manifest)
        except BaseException:
            self.engines.close()
            raise
        self.use_native = use_native
        self.prompt_cache_size = prompt_cache_size
        self._cache: OrderedDict[tuple, _CachedPrompt] = OrderedDict()
        self.text_runs = 0                         # text.onnx runs so far (cache misses)
        self.last_timing = StageTimes()
        self.last_prompt: EncodedPrompt | None = None

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> str:
        return self.engines.backend

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.engines.package.name))

    @property
    def input_size(self) -> int:
        """S: the square network input is S x S (a non-square canvas: its longer side)."""
        return self.preprocessor.size

    @property
    def input_hw(self) -> tuple[int, int]:
        """(H, W) of the network input canvas."""
        return self.preprocessor.canvas_hw

    # ------------------------------------------------------------------ prompts

    def prepare(self, prompt: str, phrases: PhraseSpans | None = None) -> EncodedPrompt:
        """Tokenise ``prompt`` and run text.onnx unless cached; the encoded prompt.

        phrases: per phrase, a list of [start, end) character spans of ``prompt``; default its
        ``". "``-separated names. ValueError for an empty prompt, one of only separators, or bad
        spans; a prompt over the token limit is truncated with a UserWarning (first time only).
        """
        return self._cached(prompt, phrases).encoded

    def _cached(self, prompt: str, phrases: PhraseSpans | None) -> _CachedPrompt:
        key = (prompt, None if phrases is None else _spans_key(phrases))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        encoded = self.tokenizer.encode(prompt, phrases)
        hidden = self.engines.encode_text(encoded.input_ids, encoded.attention_mask)
        self.text_runs += 1
        entry = _CachedPrompt(encoded, hidden)
        self._cache[key] = entry
        while len(self._cache) > self.prompt_cache_size:
            self._cache.popitem(last=False)
        return entry

    # ------------------------------------------------------------------ detection

    def preprocess(self, image: Any, bgr: bool = False) -> PreparedImage:
        """Prepare ``image`` (as ``detect`` takes it) in a new buffer; safe in another thread.

        Lets a reader thread prepare frame k+1 while the network runs on frame k; pass the
        result to ``detect`` in place of the image.
        """
        t0 = time.perf_counter()
        if isinstance(image, (str, Path)):
            image, bgr = read_image(image), False
        tensor = np.empty_like(self.preprocessor.buffer)
        info = self.preprocessor.run(image, tensor[0], bgr)
        return PreparedImage(tensor, info, (time.perf_counter() - t0) * 1e3)

    def detect(self, image: Any, prompt: str, phrases: PhraseSpans | None = None,
               bgr: bool = False) -> Detections:
        """Detect the prompt's phrases in ``image``; best first, boxes xyxy in source pixels.

        image: uint8 RGB [H, W, 3] array (any array/PIL mode runtime.preprocess.to_rgb_uint8
        takes; ``bgr`` for OpenCV frames), a PIL image, an image file path (decoded with
        Pillow) or a PreparedImage. The result's ``phrases`` are the prompt's phrase texts.
        Per-stage times are in ``self.last_timing``. Raises ValueError/OSError for a bad image
        or prompt.
        """
        t0 = time.perf_counter()
        entry = self._cached(prompt, phrases)
        t1 = time.perf_counter()
        if isinstance(image, PreparedImage):
            buffer, info, pre_ms = image.tensor, image.info, image.pre_ms
        else:
            if isinstance(image, (str, Path)):
                image, bgr = read_image(image), False
            buffer, info = self.preprocessor(image, bgr=bgr)
            pre_ms = (time.perf_counter() - t1) * 1e3
        t2 = time.perf_counter()
        out = self.engines.detect(buffer, entry.text_hidden, entry.encoded.attention_mask)
        t3 = time.perf_counter()
        p = self.post
        args = (out[pkg.BOXES][0], out[pkg.TOKEN_LOGITS][0], out[pkg.CENTERNESS][0],
                entry.encoded.phrase_map)
        opts = dict(threshold=p.threshold, nms_iou=p.nms_iou, pre_nms_top_k=p.pre_nms_top_k,
                    max_detections=p.max_detections, use_native=self.use_native,
                    phrases=entry.encoded.phrases, min_per_phrase=p.min_per_phrase,
                    per_phrase=p.per_phrase, one_label_per_box=p.one_label_per_box)
        if p.style == pkg.POST_OFFICIAL:
            dets = postprocess_official(*args, p.level_sizes, info, **opts)
        else:
            dets = postprocess(*args, info, **opts, phrase_score=p.phrase_score)
        t4 = time.perf_counter()
        self.last_prompt = entry.encoded
        self.last_timing = StageTimes(pre=pre_ms, text=(t1 - t0) * 1e3,
                                      network=(t3 - t2) * 1e3, post=(t4 - t3) * 1e3)
        return dets

    def close(self) -> None:
        self._cache.clear()
        self.engines.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _spans_key(phrases: PhraseSpans) -> tuple:
    """A hashable copy of phrase spans (TypeError-free for JSON lists; validation is later)."""
    try:
        return tuple(tuple(tuple(span) for span in spans) for spans in phrases)
    except TypeError:
        raise ValueError(f"phrases must be a list of lists of [start, end] spans, got {phrases!r}") from None
