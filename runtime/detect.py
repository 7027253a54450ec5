"""``python -m runtime.detect`` (console script ``fiber-detect``): detect what you type.

    python -m runtime.detect --camera 0 --prompt "person. red mug. the dog on the left"
    python -m runtime.detect csi://0 --prompt "person" --save out.mp4 --headless
    python -m runtime.detect --image photos/ --prompt "cat. dog" --json out.jsonl --save annotated/
    python -m runtime.detect --requests requests.jsonl --json out.jsonl

Inputs (jetson-inference URIs, see runtime.sources): ``--camera N``, ``/dev/videoN``,
``v4l2:///dev/videoN``, ``csi://N``, ``rtsp://...``, ``file://...``, video files, image files,
folders of images; or ``--requests FILE.jsonl`` with one ``{"image": path, "prompt": str,
"phrases": [[[start, end], ...], ...]}`` per line (``phrases`` optional: character spans of the
prompt, one list per phrase; relative image paths are looked up next to the requests file first).

Each input writes one JSON line to ``--json`` (``-`` = stdout, streamed; a file appears when the
run ends): ``{"image", ["frame",] "prompt", "phrases", "detections": [{"phrase_index", "phrase",
"box": [x1, y1, x2, y2], "score"}], "timing_ms": {"pre", "text", "network", "post", "total"}}``
(boxes in source pixels; "warnings" when the prompt was truncated), or ``{"image", ["frame",]
"error"}`` for an input that failed (a missing or unreadable image file among the inputs is
one failed input); the run goes on. Exit status: 0 every input processed, 1 some or all inputs
failed, 2 arguments, package or source unusable (one line on stderr), 130 Ctrl-C before the
first input, 141 (as for SIGPIPE) when the reader of ``--json -`` went away (``| head -1``).

Detection mode (default): phrases scoring above the package's calibrated threshold, NMS per
phrase (``--one-label-per-box``: across phrases). Grounding mode (``--per-phrase K``): each
phrase's best K boxes whatever their score. The first stderr line names the backend.

While running, a prompt typed on stdin (a TTY, or with ``--prompt-from-stdin``) replaces the
current one; Ctrl-C or the end of the stream stops cleanly. Network-only and end-to-end FPS and
a per-stage timing table are printed at the end (and every ``--stats-every`` s for live inputs).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO


from common.package import INPUT_LETTERBOX
from engines import EngineError, openvino_int8_saturates
from runtime.draw import backend as draw_backend
from runtime.draw import draw_detections
from runtime.outputs import ImageSink, JsonlWriter, StageStats, UsageError, VideoSink, make_sink
from runtime.packages import DEFAULT_PACKAGES, REPO, default_package
from runtime.predictor import Detector, DetectorConfig, build_detector
from runtime.preprocess import aspect_canvas, canvas_fill, letterbox_info
from runtime.sources import (
    VIDEO_EXTENSIONS, Frame, ImageReadError, Prefetcher, SourceError, SourceSpec, open_source,
    parse_inputs, read_image,
)
from runtime.types import Detections

PROG = "fiber-detect"
BACKENDS = ("auto", "tensorrt", "tensorrt-rtx", "ort", "onnxruntime", "openvino")
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a Unix tool whose reader left


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Open-vocabulary detection with a fiber-edge "
                                "model package on cameras, videos, images and request files.")
    src = p.add_argument_group("inputs")
    src.add_argument("inputs", nargs="*", metavar="URI", help="camera/stream URIs, video or image files, folders")
    src.add_argument("--input", action="append", default=[], metavar="URI", help="an input URI (repeatable)")
    src.add_argument("--camera", type=int, action="append", default=[], metavar="N", help="camera N (/dev/videoN)")
    src.add_argument("--video", action="append", default=[], metavar="FILE", help="a video file (repeatable)")
    src.add_argument("--image", nargs="+", action="extend", default=[], metavar="FILE",
                     help="image files or folders")
    src.add_argument("--requests", metavar="FILE.jsonl", help="one {image, prompt, phrases?} per line")
    src.add_argument("--resolution", metavar="WxH", help="camera capture size, e.g. 1280x720")
    src.add_argument("--max-frames", type=int, metavar="N", help="stop after N inputs/frames in total")
    m = p.add_argument_group("model")
    m.add_argument("--prompt", help='class names joined by ". ", e.g. "person. red mug"')
    m.add_argument("--prompt-from-stdin", action=argparse.BooleanOptionalAction, default=None,
                   help="read new prompts from stdin while running (default: when stdin is a TTY)")
    where = m.add_mutually_exclusive_group()
    where.add_argument("--package", help="model package folder (default: models/fiber-nano-int8)")
    where.add_argument("--engine", help="TensorRT engine folder (python -m engines.build)")
    m.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: TensorRT for an engine folder; for a package OpenVINO when installed and the "
                        "package prefers it, else ONNX Runtime")
    m.add_argument("--threshold", type=float,
                   help="phrase score threshold (default: the package's calibrated one; 0 with --per-phrase)")
    m.add_argument("--max-detections", type=int, help="per input (default: the package's)")
    mode = m.add_mutually_exclusive_group()
    mode.add_argument("--per-phrase", type=int, metavar="K",
                      help="grounding mode: each phrase's best K boxes (Flickr30k/MDETR protocol; "
                           "every phrase is taken to be in the image)")
    mode.add_argument("--one-label-per-box", action=argparse.BooleanOptionalAction, default=False,
                      help="detection mode: NMS across phrases, so a box keeps only its highest-scoring "
                           "phrase (default: per-phrase NMS, as FIBER/GLIP evaluate)")
    m.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime / OpenVINO")
    m.add_argument("--fastest-path", action=argparse.BooleanOptionalAction, default=True,
                   help="with --backend auto and a package: time every CPU path this machine has "
                        "(ONNX Runtime, its integer graph, OpenVINO f32/bf16) once and remember "
                        "the times in ~/.cache/fiber-edge; a camera or video runs the fastest per "
                        "frame, a list of images the quickest for its length (OpenVINO compiles on "
                        "its first image; --no-fastest-path: the package's own choice)")
    out = p.add_argument_group("outputs")
    out.add_argument("--json", metavar="OUT.jsonl", help="one JSON line per input ('-' = stdout)")
    out.add_argument("--save", metavar="OUT", help="annotated video (video/camera input) or image folder")
    out.add_argument("--show", action=argparse.BooleanOptionalAction, default=None,
                     help="display annotated frames (default: for live inputs when a display is available)")
    out.add_argument("--headless", dest="show", action="store_const", const=False, help="same as --no-show")
    out.add_argument("--stats-every", type=float, default=5.0, metavar="S", help="live stats period, seconds")
    out.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                     help="no per-image lines (stats and errors are still printed)")
    out.add_argument("--path-timings", action=argparse.BooleanOptionalAction, default=False,
                     help="the first log line lists every CPU path's timings, not only the chosen "
                          "path's and the runner-up's")
    return p


# ---------------------------------------------------------------------------------------------
# Setup: package, inputs, prompt

def _package(args: argparse.Namespace) -> Path:
    chosen = args.engine or args.package
    if chosen:
        return Path(chosen)
    found = default_package()
    if found is None:
        raise UsageError("no --package/--engine given and no default package "
                         f"(models/{DEFAULT_PACKAGES[0]}) found in {Path.cwd()} or {REPO}")
    return found


def _resolution(text: str | None) -> tuple[int | None, int | None]:
    if not text:
        return None, None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w > 0 and h > 0:
            return w, h
    except ValueError:
        pass
    raise UsageError(f"--resolution {text!r}: expected WxH, e.g. 1280x720")


def _input_specs(args: argparse.Namespace) -> list[SourceSpec]:
    uris: list[Any] = [*args.inputs, *args.input, *args.camera, *args.video, *args.image]
    if args.requests and uris:
        raise UsageError("--requests cannot be combined with other inputs")
    if not args.requests and not uris:
        raise UsageError("no input: give --camera N, --video FILE, --image FILE..., a URI, or --requests FILE.jsonl")
    try:
        return parse_inputs(uris, missing_as_image=True)  # a missing file: one failed input
    except SourceError as e:
        raise UsageError(str(e)) from None


def _check_args(args: argparse.Namespace, specs: list[SourceSpec]) -> None:
    if args.prompt is None and not args.requests:
        raise UsageError("--prompt is required (class names joined by '. ', e.g. \"person. red mug\")")
    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.max_detections is not None and args.max_detections < 1:
        raise UsageError(f"--max-detections must be >= 1, got {args.max_detections}")
    if args.per_phrase is not None and args.per_phrase < 1:
        raise UsageError(f"--per-phrase must be >= 1 (boxes per phrase), got {args.per_phrase}")
    streams = [s for s in specs if s.kind != "images"]
    if args.save and Path(args.save).suffix.lower() in VIDEO_EXTENSIONS:
        if len(streams) != 1 or len(specs) != 1:
            raise UsageError(f"--save {args.save}: a video file needs exactly one video/camera input "
                             "(give a folder to save several)")


def _image_count(args: argparse.Namespace, specs: list[SourceSpec]) -> int | None:
    """How many images the run will detect on: the image inputs' count, or the requests file's
    non-empty lines; None for a stream (camera, video) or an unreadable requests file."""
    if args.requests:
        try:
            with open(args.requests, encoding="utf-8") as f:
                return sum(1 for line in f if line.strip())
        except (OSError, UnicodeDecodeError):
            return None  # _run_requests says what is wrong with it
    if any(s.kind != "images" for s in specs):
        return None
    return sum(len(s.location) for s in specs)


def _detector(args: argparse.Namespace, specs: list[SourceSpec]) -> Detector:
    grounding = args.per_phrase is not None
    threshold = 0.0 if grounding and args.threshold is None else args.threshold
    cfg = DetectorConfig(package=str(_package(args)), backend=args.backend, threads=args.threads,
                         threshold=threshold, max_detections=args.max_detections,
                         per_phrase=args.per_phrase or 0, one_label_per_box=args.one_label_per_box,
                         fastest=args.fastest_path, expected_runs=_image_count(args, specs))
    try:
        return build_detector(cfg)
    except (EngineError, ValueError, OSError) as e:
        what = "engine" if args.engine else "package"
        text = str(e)  # most messages start with the path already: say it once
        raise UsageError(f"{what} {text}" if text.startswith(cfg.package) else f"{what} {cfg.package}: {text}") from None


def _check_prompt(detector: Detector, prompt: str | None) -> None:
    if prompt is None:
        return
    try:
        detector.prepare(prompt)
    except ValueError as e:
        raise UsageError(f"--prompt {prompt!r}: {e}") from None


CANVAS_HINT_FILL = 0.85  # below this share of the canvas, a live source's first frame gets the hint


def canvas_hint(frame_hw: tuple[int, int], detector: Detector) -> str | None:
    """One line for a camera or video whose frames fill less than CANVAS_HINT_FILL of a letterbox
    package's canvas: the canvas of the frames' aspect to export the model on instead (about
    as many pixels, docs/results.md section 16). None when the canvas fits."""
    h, w = frame_hw
    canvas = tuple(detector.input_hw)
    if detector.preprocessor.spec.style != INPUT_LETTERBOX or min(h, w) < 1:
        return None
    fill, better = canvas_fill(h, w, canvas), aspect_canvas(h, w, canvas)
    if fill >= CANVAS_HINT_FILL or better == canvas or canvas_fill(h, w, better) <= fill:
        return None
    gain = letterbox_info(w, h, better).scale / letterbox_info(w, h, canvas).scale
    return (f"{PROG}: {w}x{h} frames fill {fill:.0%} of this package's {canvas[0]}x{canvas[1]} canvas; "
            f"exported on {better[0]}x{better[1]} (compress.export --canvas {better[0]}x{better[1]}, or make "
            f"package-nano-camera CAMERA_CANVAS={better[0]}x{better[1]}) the model sees them {gain:.2f}x larger "
            f"for about the same time (docs/results.md section 16)")


def backend_line(detector: Detector, threads: int | None, path_timings: bool = False) -> str:
    """``fiber-detect: <model>[ (HxW canvas)] on <backend>[, N threads][, deformable convs: PATH][: hint]``:
    the canvas of a letterbox package exported on a non-square one (``compress.export --canvas``), the
    backend chosen, for a DyHead how its DeformConv nodes run (native / plugin / gridsample), and how to
    get the faster one when a package made for OpenVINO runs on ONNX Runtime for want of it."""
    choice = getattr(detector.engines, "path_choice", None)  # engines.autotune.PathChoice
    where = choice.label if choice is not None else detector.backend
    (h, w), spec = detector.input_hw, detector.preprocessor.spec
    canvas = f" ({h}x{w} canvas)" if spec.style == INPUT_LETTERBOX and h != w else ""
    line = f"{PROG}: {detector.name}{canvas} on {where}" + (f", {threads} threads" if threads else "")
    if choice is not None and (choice.ms or choice.note):
        line += f", {choice.summary(full=path_timings)}"
    deform = getattr(detector.engines, "deform_conv", None)  # a DyHead's DeformConv path (engines.deform)
    if deform:
        line += f", deformable convs: {deform}"
    wanted = (detector.manifest.get("graphs", {}).get("detector", {}) or {}).get("cpu_backend")
    if (detector.backend == "onnxruntime" and wanted == "openvino"
            and importlib.util.find_spec("openvino") is None
            and not openvino_int8_saturates(detector.manifest)):  # no VNNI: OpenVINO int8 clips
        line += (" (OpenVINO, an extra, is often faster on x86 CPUs; the fastest path is picked by timing: "
                 "pip install 'fiber-edge[openvino]')")
    return line


# ---------------------------------------------------------------------------------------------
# Live prompts

class PromptInput:
    """Reads prompts typed on ``stream`` in a daemon thread; ``poll()`` gives the newest one."""

    def __init__(self, stream: TextIO):
        self._lock = threading.Lock()
        self._pending: str | None = None
        self._thread = threading.Thread(target=self._run, args=(stream,), name="prompt-input", daemon=True)
        self._thread.start()

    def _run(self, stream: TextIO) -> None:
        for line in stream:
            text = line.strip()
            if text:
                with self._lock:
                    self._pending = text

    def poll(self) -> str | None:
        with self._lock:
            text, self._pending = self._pending, None
        return text


# ---------------------------------------------------------------------------------------------
# Requests

@dataclass(frozen=True)
class Item:
    """One unit of work: a frame (or why it failed) and its prompt (None: the current one)."""

    frame: Frame
    prompt: str | None = None
    phrases: Any = None


def _request_lines(path: str) -> list[tuple[int, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--requests {path}: cannot read it ({e})") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _parse_request(line: str, lineno: int, base: Path, default_prompt: str | None,
                   prepare: Callable[[Frame], Any]) -> Item:
    """A request line -> Item with the decoded image, or with a frame error saying what is wrong."""
    where = f"line {lineno}"
    try:
        req = json.loads(line)
    except json.JSONDecodeError as e:
        return Item(Frame(None, None, lineno, error=f"{where}: not valid JSON ({e.msg})"))
    if not isinstance(req, dict) or not isinstance(req.get("image"), str):
        return Item(Frame(None, None, lineno, error=f'{where}: needs an "image" path string'))
    name, prompt = req["image"], req.get("prompt", default_prompt)
    if not isinstance(prompt, str):
        return Item(Frame(None, name, lineno, error=f'{where}: needs a "prompt" string'))
    path = Path(name)
    if not path.is_absolute() and (base / path).exists():  # next to the requests file first
        path = base / path
    try:
        frame = Frame(read_image(path), name, lineno)
    except ImageReadError as e:
        return Item(Frame(None, name, lineno, error=e.reason), prompt)
    try:
        frame = replace(frame, prepared=prepare(frame))
    except (ValueError, OSError) as e:
        frame = replace(frame, error=str(e))
    return Item(frame, prompt, req.get("phrases"))


def _request_items(path: str, default_prompt: str | None, prepare: Callable[[Frame], Any]) -> Iterator[Item]:
    """Parsed, decoded and letterboxed request lines (run in a reader thread)."""
    base = Path(path).parent
    return (_parse_request(line, n, base, default_prompt, prepare) for n, line in _request_lines(path))


# ---------------------------------------------------------------------------------------------
# The loop

def _gui_available() -> bool:
    try:
        import cv2

        cv2.namedWindow(PROG)
        return True
    except Exception:  # ImportError, or cv2.error from a build without a GUI backend
        return False


def _want_show(choice: bool | None, live: bool) -> bool:
    """--show: yes; --no-show/--headless: no; default: for live inputs when a window can open."""
    if choice is False:
        return False
    display = (not sys.platform.startswith("linux") or bool(os.environ.get("DISPLAY"))
               or bool(os.environ.get("WAYLAND_DISPLAY")))
    if choice is None and not (live and display):
        return False
    if display and _gui_available():  # probing a GUI build without a display can abort
        return True
    if choice:
        raise UsageError("--show needs a display and OpenCV with a GUI (opencv-python, "
                         "not opencv-python-headless); use --headless")
    return False


class Runner:
    """Runs inputs through a Detector; writes JSON lines, annotated output and stats."""

    def __init__(self, detector: Detector, args: argparse.Namespace, log: TextIO):
        self.detector, self.args, self.log = detector, args, log
        self.json = JsonlWriter(args.json)
        self.stats = StageStats()
        self.prompt: str | None = args.prompt
        self.prompts: PromptInput | None = None
        self.show = False
        self.stop = False
        self.announced = False
        self.canvas_checked = False  # a camera's or video's first frame checked against the canvas
        if args.save or args.show:
            draw_backend()  # import OpenCV before the clock starts

    def prepare(self, frame: Frame) -> Any:
        """The letterboxed network input of a frame; runs in the sources' reader threads."""
        return self.detector.preprocess(frame.image, bgr=frame.bgr)

    def say(self, text: str) -> None:
        print(text, file=self.log, flush=True)

    # ---------------------------------------------------------- one input

    def process(self, item: Item, with_frame: bool, sink: VideoSink | ImageSink | None) -> Detections | None:
        """Detect one input and write its JSON line; draw, save and show when asked."""
        frame = item.frame
        record: dict[str, Any] = {"image": frame.name, "frame": frame.index} if with_frame else {"image": frame.name}
        prompt = self.prompt if item.prompt is None else item.prompt
        dets, error = None, frame.error
        if error is None:
            if with_frame and not self.canvas_checked and frame.image is not None:
                self.canvas_checked = True
                hint = None if self.args.quiet else canvas_hint(frame.image.shape[:2], self.detector)
                if hint:
                    self.say(hint)
            image = frame.image if frame.prepared is None else frame.prepared
            try:
                dets = self.detector.detect(image, prompt, item.phrases, bgr=frame.bgr)
            except (ValueError, OSError, EngineError) as e:
                error = str(e)
        if dets is None:
            record["error"] = error
            self.stats.failed += 1
            where = f"{frame.name} frame {frame.index}" if with_frame else f"{frame.name or 'requests'}"
            print(f"{PROG}: {where}: {error}", file=sys.stderr, flush=True)
        else:
            self.stats.ok += 1
            record.update(self._result(prompt, dets))
            self._output(frame, dets, sink)
        self.json.write(record)
        return dets

    def _result(self, prompt: str, dets: Detections) -> dict[str, Any]:
        t = self.detector.last_timing
        for stage in ("pre", "text", "network", "post"):
            self.stats.add(stage, getattr(t, stage))
        out = {"prompt": prompt, "phrases": list(dets.phrases), "detections": dets.to_json(),
               "timing_ms": t.to_json()}
        encoded = self.detector.last_prompt
        if encoded is not None and encoded.truncated:
            out["warnings"] = [f"prompt truncated to {self.detector.tokenizer.max_tokens} tokens"]
        return out

    def _output(self, frame: Frame, dets: Detections, sink: VideoSink | ImageSink | None) -> None:
        if sink is None and not self.show:
            return
        t0 = time.perf_counter()
        drawn = draw_detections(frame.image, dets, bgr=frame.bgr)
        if sink is not None:
            sink.write(frame, drawn)
        self.stats.add("draw", (time.perf_counter() - t0) * 1e3)
        if self.show:
            import cv2

            cv2.imshow(PROG, drawn if frame.bgr else drawn[:, :, ::-1])
            if cv2.waitKey(1) & 0xFF in (ord("q"), 27):  # q or Esc
                self.stop = True

    # ---------------------------------------------------------- a stream of inputs

    def _new_prompt(self) -> None:
        text = self.prompts.poll() if self.prompts else None
        if text is None or text == self.prompt:
            return
        try:
            self.detector.prepare(text)
        except ValueError as e:
            self.say(f"{PROG}: prompt {text!r} ignored: {e}")
            return
        self.prompt = text
        self.say(f"{PROG}: prompt is now {text!r}")

    def _say_result(self, item: Item, dets: Detections) -> None:
        best = ", ".join(f"{d.phrase} {d.score:.2f}" for d in list(dets)[:3])
        more = ", ..." if len(dets) > 3 else ""
        noun = "detection" if len(dets) == 1 else "detections"
        self.say(f"{item.frame.name}: {len(dets)} {noun}{f' ({best}{more})' if best else ''} "
                 f"in {self.detector.last_timing.total:.1f} ms")

    def run(self, items: Iterator[Item], with_frame: bool, sink: VideoSink | ImageSink | None,
            live: bool) -> None:
        """Process items until they end, --max-frames or q/Esc (Ctrl-C propagates)."""
        if not self.announced:  # the run's first log line: what runs this model, and how
            print(backend_line(self.detector, self.args.threads, self.args.path_timings),
                  file=sys.stderr, flush=True)
            self.announced = True
        last_stats = t_wait = time.perf_counter()
        if self.stats.start is None:
            self.stats.start = t_wait
        for item in items:
            t0 = time.perf_counter()
            self.stats.add("wait", (t0 - t_wait) * 1e3)
            self._new_prompt()
            dets = self.process(item, with_frame, sink)
            self.stats.frames += 1
            t_wait = self.stats.end = time.perf_counter()
            self.stats.add("total", (t_wait - t0) * 1e3)
            if dets is not None and not with_frame and not self.args.quiet:
                self._say_result(item, dets)
            if live and t_wait - last_stats >= self.args.stats_every:
                self.say(f"{PROG}: {self.stats.fps_line()}")
                last_stats = t_wait
            if self.stop or (self.args.max_frames and self.stats.frames >= self.args.max_frames):
                self.stop = True
                return

    def report(self) -> None:
        self.stats.text_runs = self.detector.text_runs
        self.say(f"{PROG}: {self.stats.fps_line()}")
        if self.stats.frames:
            self.say(self.stats.table())


def _run_requests(runner: Runner, args: argparse.Namespace) -> None:
    items = Prefetcher(_request_items(args.requests, args.prompt, runner.prepare), depth=2, name="request-reader")
    sink = make_sink(args.save, None, None)
    try:
        runner.run(iter(items), with_frame=False, sink=sink, live=False)
    finally:
        items.close()
        if sink is not None:
            sink.close()


def _run_sources(runner: Runner, specs: list[SourceSpec], args: argparse.Namespace) -> None:
    width, height = _resolution(args.resolution)
    for spec in specs:
        if runner.stop:
            return
        with open_source(spec, width=width, height=height, prepare=runner.prepare) as source:
            runner.show = _want_show(args.show, spec.live)
            stdin = args.prompt_from_stdin
            if runner.prompts is None and (stdin or (stdin is None and spec.kind != "images" and sys.stdin.isatty())):
                runner.prompts = PromptInput(sys.stdin)
                runner.say(f"{PROG}: type a new prompt and press Enter to change it")
            sink = make_sink(args.save, spec, source.fps)
            try:
                frames = (Item(f) for f in source)
                runner.run(frames, with_frame=spec.kind != "images", sink=sink, live=spec.live)
            finally:
                if sink is not None:
                    sink.close()
                if runner.show:
                    import cv2

                    cv2.destroyWindow(PROG)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace, log: TextIO) -> int:
    specs = _input_specs(args)
    _check_args(args, specs)
    _resolution(args.resolution)
    with _detector(args, specs) as detector:
        _check_prompt(detector, args.prompt)
        runner = Runner(detector, args, log)
        fatal = None
        try:
            if args.requests:
                _run_requests(runner, args)
            else:
                _run_sources(runner, specs, args)
        except SourceError as e:
            fatal = str(e)
        except KeyboardInterrupt:
            runner.say(f"{PROG}: interrupted")
        finally:
            runner.json.close()
        if runner.stats.frames or not fatal:
            runner.report()
    if fatal:
        raise UsageError(fatal)
    return 1 if runner.stats.failed else 0


def main(args: argparse.Namespace) -> int:
    """Run the CLI; the exit status (0 all processed, 1 some failed, 2 unusable, 130 Ctrl-C)."""
    log = sys.stderr if args.json == "-" else sys.stdout
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")       # one clear line of ours instead of
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")    # OpenCV's and FFmpeg's probing noise
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return _run(args, log)
        except UsageError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
            return 130
        except BrokenPipeError:  # `... --json - | head -1`: the reader left; stop quietly
            _silence_stdout()
            return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured)
        pass


def cli() -> None:
    """The ``fiber-detect`` console script."""
    sys.exit(main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
