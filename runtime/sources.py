"""Frame sources with jetson-inference-style URIs: cameras, CSI, network streams, videos, images.

    with open_source("csi://0") as src:          # or 0, "/dev/video0", "v4l2:///dev/video0",
        for frame in src:                         # "rtsp://host/x", "file://clip.mp4", "clip.mp4",
            frame.image, frame.bgr, frame.index   # "photos/", ["a.jpg", "b.png"]

- Live sources (cameras, CSI, rtsp/rtp/http streams) run a capture thread that keeps only the
  newest frame: a slow consumer gets the latest picture, stale ones are dropped (``dropped``
  counts them). A source that stops delivering is reopened ``retries`` times, then iteration
  raises SourceError.
- Video files are read in order by a decode thread a few frames ahead (no drops).
- A ``prepare(frame)`` hook runs in the reader thread too (for videos and images on every
  frame, for live sources on every captured frame), so letterboxing overlaps inference.
- Images are decoded with Pillow (any mode: 16-bit, CMYK, RGBA, palette, gray; EXIF rotation
  applied) one ahead in a thread; an image that cannot be read becomes a Frame with ``error``
  set, so a run over many files goes on.

OpenCV is needed only for cameras, streams and videos (imported on first use). Frames are
uint8 [H, W, 3]; OpenCV frames are BGR (``Frame.bgr``), image files RGB. Torch-free.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from runtime.preprocess import to_rgb_uint8

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts",
    ".mts", ".3gp", ".ogv", ".h264", ".h265", ".mjpeg", ".mjpg",
})
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtp://", "rtmp://", "udp://", "http://", "https://")
LIVE_KINDS = ("camera", "csi", "stream")


class SourceError(RuntimeError):
    """A source that cannot be opened, or a live source that stopped delivering frames."""


class ImageReadError(ValueError):
    """An image file that cannot be decoded; ``reason`` says why without the path."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass(frozen=True)
class Frame:
    """One input: an image file or a video/camera frame.

    image: uint8 [H, W, 3] (BGR when ``bgr``, else RGB), or None when ``error`` says why not.
    name: the image path, or the video/camera URI (None for a request line without one).
    index: position in the source (for live sources the capture count: gaps are dropped frames).
    prepared: what the source's ``prepare`` hook made of the frame in the reader thread (e.g.
    ``Detector.preprocess``'s letterboxed input), or None.
    """

    image: np.ndarray | None
    name: str | None
    index: int
    bgr: bool = False
    error: str | None = None
    prepared: Any = None


@dataclass(frozen=True)
class SourceSpec:
    """A parsed input URI.

    kind: "camera" (location: int index or device path), "csi" (int sensor id), "stream" (URI),
    "video" (path) or "images" (tuple of image paths). uri: as the user wrote it.
    """

    kind: str
    location: Any
    uri: str

    @property
    def live(self) -> bool:
        return self.kind in LIVE_KINDS


# ---------------------------------------------------------------------------------------------
# URIs

def _strip(uri: str, prefix: str) -> str:
    return uri[len(prefix):] if uri.startswith(prefix) else uri


def image_files(folder: str | Path) -> list[Path]:
    """The files in ``folder`` with an image extension Pillow knows, sorted by name."""
    known = Image.registered_extensions()
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in known and not p.name.startswith("."))


def parse_uri(uri: str | int | Path | Sequence[str | Path]) -> SourceSpec:
    """What an input names. Raises SourceError for unknown schemes and missing paths.

    int N -> camera N; "/dev/videoN", "v4l2:///dev/videoN" -> camera; "csi://N" -> CSI sensor
    N; rtsp/rtsps/rtp/rtmp/udp/http(s) -> network stream; "file://" is optional before a path;
    a folder -> its images; a file with a video extension -> video; any other file -> image;
    a list -> those image files/folders, in order.
    """
    if isinstance(uri, bool):
        raise SourceError(f"not an input: {uri!r}")
    if isinstance(uri, int):
        if uri < 0:
            raise SourceError(f"camera {uri}: camera numbers are >= 0")
        return SourceSpec("camera", uri, f"camera {uri}")
    if isinstance(uri, (list, tuple)):
        specs = [parse_uri(u) for u in uri]
        bad = [s.uri for s in specs if s.kind != "images"]
        if bad or not specs:
            raise SourceError(f"a list of inputs must be image files or folders (not {bad or 'empty'})")
        return SourceSpec("images", tuple(p for s in specs for p in s.location), ", ".join(s.uri for s in specs))
    text = str(uri)
    if text.startswith("v4l2://") or text.startswith("/dev/video"):
        return SourceSpec("camera", _strip(text, "v4l2://"), text)
    if text.startswith("csi://"):
        sensor = text[len("csi://"):]
        if not sensor.isdigit():
            raise SourceError(f"{text}: expected csi://N with a sensor number N")
        return SourceSpec("csi", int(sensor), text)
    if text.startswith(STREAM_SCHEMES):
        return SourceSpec("stream", text, text)
    path_text = _strip(text, "file://")
    if "://" in path_text:
        raise SourceError(f"{text}: unsupported URI scheme (use a path, file://, /dev/videoN, "
                          "v4l2://, csi://N or rtsp://)")
    path = Path(path_text)
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise SourceError(f"{text}: folder has no image files")
        return SourceSpec("images", tuple(str(f) for f in files), text)
    if not path.exists() and not path.is_symlink():
        raise SourceError(f"{text}: no such file or folder")
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return SourceSpec("video", str(path), text)
    return SourceSpec("images", (str(path),), text)


def parse_inputs(uris: Iterable[str | int], missing_as_image: bool = False) -> list[SourceSpec]:
    """parse_uri for each input, with consecutive image inputs merged into one source.

    ``missing_as_image``: a path that does not exist (and has no video extension) becomes an
    image input whose decode fails ("no such file"), so a run over several inputs reports it
    as one failed input and goes on, instead of refusing the whole run.
    """
    out: list[SourceSpec] = []
    for uri in uris:
        spec = _missing_image(uri) if missing_as_image else None
        spec = spec or parse_uri(uri)
        if spec.kind == "images" and out and out[-1].kind == "images":
            last = out.pop()
            spec = SourceSpec("images", last.location + spec.location, f"{last.uri}, {spec.uri}")
        out.append(spec)
    return out


def _missing_image(uri: Any) -> SourceSpec | None:
    """An images spec for a plain path that does not exist (not a scheme, not a video name)."""
    if not isinstance(uri, (str, Path)):
        return None
    text = _strip(str(uri), "file://")
    path = Path(text)
    if ("://" in text or text.startswith("/dev/video") or path.exists() or path.is_symlink()
            or path.suffix.lower() in VIDEO_EXTENSIONS):
        return None
    return SourceSpec("images", (text,), str(uri))


# ---------------------------------------------------------------------------------------------
# Images (Pillow)

def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file with Pillow -> uint8 RGB [H, W, 3] (EXIF rotation applied).

    Any Pillow mode (16-bit, CMYK, RGBA, palette, gray, ...) via runtime.preprocess.to_rgb_uint8.
    Raises ImageReadError (a ValueError) naming the file and the problem.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ImageReadError(path, "is a folder, not an image file")
        if path.stat().st_size == 0:
            raise ImageReadError(path, "empty file (0 bytes)")
        with Image.open(path) as img:
            img.load()
            return to_rgb_uint8(_upright(img))
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file (Pillow cannot identify it)") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt data
        raise ImageReadError(path, f"unreadable image data ({e})") from None


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError, AttributeError):
        return img


# ---------------------------------------------------------------------------------------------
# Background reading

_DONE = object()


class Prefetcher:
    """Runs ``iterable`` in a daemon thread, up to ``depth`` items ahead, in order.

    Iterating yields its items; an exception raised by the iterable is re-raised here. close()
    stops the thread (items not yet taken are dropped).
    """

    def __init__(self, iterable: Iterable[Any], depth: int = 4, name: str = "prefetch"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(iterable),), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator[Any]) -> None:
        try:
            for item in it:
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(_Raised(e))
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5.0)


@dataclass
class _Raised:
    error: BaseException


# ---------------------------------------------------------------------------------------------
# Sources

class Capture(Protocol):
    """What sources need of ``cv2.VideoCapture``."""

    def read(self) -> tuple[bool, np.ndarray | None]: ...

    def release(self) -> None: ...


Prepare = Callable[[Frame], Any]


def _prepared(frame: Frame, prepare: Prepare | None) -> Frame:
    """``frame`` with ``prepare(frame)`` attached; a ValueError/OSError becomes its error."""
    if prepare is None or frame.error is not None:
        return frame
    try:
        return replace(frame, prepared=prepare(frame))
    except (ValueError, OSError) as e:
        return replace(frame, error=str(e))


class Source:
    """Iterable of Frame; ``live`` sources hand over the newest frame, the others every one."""

    live = False
    name = ""
    fps: float | None = None  # the source's frame rate when it says (videos, cameras)
    prepare: Prepare | None = None  # run on each frame in the reader thread

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ImageSource(Source):
    """Image files in order, decoded one ahead; unreadable ones become Frames with ``error``."""

    def __init__(self, paths: Sequence[str | Path], name: str = "images", prefetch: int = 2,
                 prepare: Prepare | None = None):
        self.paths = [str(p) for p in paths]
        self.name, self.prepare = name, prepare
        self._prefetch = prefetch
        self._reader: Prefetcher | None = None

    def _frames(self) -> Iterator[Frame]:
        for i, path in enumerate(self.paths):
            try:
                yield _prepared(Frame(read_image(path), path, i), self.prepare)
            except ImageReadError as e:
                yield Frame(None, path, i, error=e.reason)

    def __iter__(self) -> Iterator[Frame]:
        self.close()
        self._reader = Prefetcher(self._frames(), self._prefetch, name="image-reader")
        return iter(self._reader)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


class VideoSource(Source):
    """A video file, every frame in order (BGR), decoded a few frames ahead in a thread.

    ``capture`` is an opened cv2.VideoCapture (or anything with read/release). The first frame
    is read here, so an undecodable file is a SourceError at open.
    """

    def __init__(self, capture: Capture, name: str, fps: float | None = None, prefetch: int = 4,
                 prepare: Prepare | None = None):
        self.name, self.fps, self.prepare = name, fps, prepare
        self._cap = capture
        ok, first = capture.read()
        if not ok or first is None:
            capture.release()
            raise SourceError(f"{name}: cannot decode any frame (not a video, or an unsupported codec)")
        self._first: np.ndarray | None = first
        self._prefetch = prefetch
        self._reader: Prefetcher | None = None

    def _frames(self) -> Iterator[Frame]:
        index = 0
        if self._first is not None:
            first, self._first = self._first, None
            yield _prepared(Frame(first, self.name, 0, bgr=True), self.prepare)
            index = 1
        while True:
            ok, image = self._cap.read()
            if not ok or image is None:
                return
            yield _prepared(Frame(image, self.name, index, bgr=True), self.prepare)
            index += 1

    def __iter__(self) -> Iterator[Frame]:
        if self._reader is not None:
            raise SourceError(f"{self.name}: a video source can be iterated once")
        self._reader = Prefetcher(self._frames(), self._prefetch, name="video-reader")
        return iter(self._reader)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._cap.release()


class LiveSource(Source):
    """A camera or stream read by a capture thread that keeps only the newest frame.

    open_capture: opens the device and returns a Capture (raises SourceError when it cannot);
    called here unless an opened ``capture`` is given (a failure is immediate), and to reconnect. After a failed read the
    device is reopened up to ``retries`` times, ``retry_delay`` seconds apart; then iteration
    raises SourceError. ``dropped`` counts frames replaced before they were taken.
    """

    live = True

    def __init__(self, open_capture: Callable[[], Capture], name: str, retries: int = 3,
                 retry_delay: float = 1.0, fps: float | None = None, capture: Capture | None = None,
                 prepare: Prepare | None = None):
        self.name, self.fps, self.prepare = name, fps, prepare
        self.retries, self.retry_delay = retries, retry_delay
        self.dropped = 0
        self._open = open_capture
        self._cap: Capture | None = capture if capture is not None else open_capture()
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._seq = 0      # frames captured so far
        self._taken = 0    # seq of the last frame handed out
        self._error: SourceError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"capture {name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ok, image = self._cap.read() if self._cap is not None else (False, None)
            if ok and image is not None:
                frame = _prepared(Frame(image, self.name, self._seq, bgr=True), self.prepare)
                with self._cond:
                    if self._seq > self._taken:
                        self.dropped += 1
                    self._latest, self._seq = frame, self._seq + 1
                    self._cond.notify_all()
            elif not self._reconnect():
                return

    def _reconnect(self) -> bool:
        """Reopen the device after a failed read; False (error set) when every attempt fails."""
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        reason = "it stopped delivering frames"
        for _ in range(self.retries):
            if self._stop.wait(self.retry_delay):
                return False
            try:
                self._cap = self._open()
                return True
            except SourceError as e:
                reason = str(e)
        with self._cond:
            self._error = SourceError(
                f"{self.name}: lost ({reason}); gave up after {self.retries} reconnection attempts")
            self._cond.notify_all()
        return False

    def __iter__(self) -> Iterator[Frame]:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._seq > self._taken or self._error is not None
                                    or self._stop.is_set())
                if self._seq > self._taken:
                    frame, self._taken, self._latest = self._latest, self._seq, None
                elif self._error is not None:
                    raise self._error
                else:
                    return
            yield frame

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=5.0)
        if self._cap is not None and not self._thread.is_alive():
            self._cap.release()
            self._cap = None


# ---------------------------------------------------------------------------------------------
# OpenCV devices

def _cv2():
    try:
        import cv2
    except ImportError:
        raise SourceError("cameras, streams and videos need OpenCV: pip install opencv-python-headless "
                          "(or the system OpenCV on a Jetson)") from None
    return cv2


def has_gstreamer(cv2: Any) -> bool:
    info = cv2.getBuildInformation()
    return any(line.strip().startswith("GStreamer:") and "YES" in line for line in info.splitlines())


def csi_pipeline(sensor_id: int, width: int = 1280, height: int = 720, fps: int = 30, flip: int = 0) -> str:
    """The GStreamer pipeline that reads a Jetson MIPI CSI camera as BGR frames into OpenCV."""
    return (f"nvarguscamerasrc sensor-id={sensor_id} ! "
            f"video/x-raw(memory:NVMM), width=(int){width}, height=(int){height}, "
            f"framerate=(fraction){fps}/1, format=(string)NV12 ! "
            f"nvvidconv flip-method={flip} ! video/x-raw, format=(string)BGRx ! "
            "videoconvert ! video/x-raw, format=(string)BGR ! appsink drop=true max-buffers=1 sync=false")


def _camera_device(location: int | str) -> str | int:
    """The device to open; on Linux its /dev/videoN path must exist (clear error otherwise)."""
    if not sys.platform.startswith("linux"):
        return location
    device = f"/dev/video{location}" if isinstance(location, int) else str(location)
    if not os.path.exists(device):
        found = sorted(str(p) for p in Path("/dev").glob("video*"))
        raise SourceError(f"camera {location}: {device} does not exist "
                          f"(cameras here: {', '.join(found) if found else 'none'})")
    return location if isinstance(location, int) else device


def _configure(cap: Any, cv2: Any, width: int | None, height: int | None, fps: float | None) -> None:
    if width:
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
    if height:
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
    if fps:
        cap.set(cv2.CAP_PROP_FPS, fps)
    cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the driver queue adds latency; we keep the newest anyway


def _opener(spec: SourceSpec, width: int | None, height: int | None,
            fps: float | None, timeout_ms: int) -> Callable[[], Any]:
    """A function that opens ``spec``'s device with OpenCV, or raises SourceError."""
    cv2 = _cv2()
    if spec.kind == "csi" and not has_gstreamer(cv2):
        raise SourceError(f"{spec.uri}: CSI cameras need OpenCV built with GStreamer "
                          f"(this OpenCV {cv2.__version__} has none; on a Jetson use JetPack's python3-opencv)")

    def open_capture() -> Any:
        if spec.kind == "camera":
            api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
            cap = cv2.VideoCapture(_camera_device(spec.location), api)
        elif spec.kind == "csi":
            pipeline = csi_pipeline(spec.location, width or 1280, height or 720, int(fps or 30))
            cap = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
        else:
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
            cap = cv2.VideoCapture(spec.location, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{spec.uri}: cannot open it (device busy, unplugged or unreachable)")
        if spec.kind == "camera":
            _configure(cap, cv2, width, height, fps)
        return cap

    return open_capture


def open_source(uri: SourceSpec | str | int | Sequence[str], width: int | None = None,
                height: int | None = None, fps: float | None = None, retries: int = 3,
                retry_delay: float = 1.0, timeout_ms: int = 5000, prepare: Prepare | None = None) -> Source:
    """Open an input (a SourceSpec or anything parse_uri takes). Raises SourceError.

    width/height/fps: requested capture format for cameras (and CSI; default 1280x720 @ 30).
    retries/retry_delay: reconnection attempts for live sources. timeout_ms: network streams.
    prepare: run on each frame in the reader thread; its result is ``Frame.prepared``.
    """
    spec = uri if isinstance(uri, SourceSpec) else parse_uri(uri)
    if spec.kind == "images":
        return ImageSource(spec.location, name=spec.uri, prepare=prepare)
    if spec.kind == "video":
        cv2 = _cv2()
        cap = cv2.VideoCapture(spec.location)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{spec.uri}: cannot open it as a video (not a video, or an unsupported codec)")
        return VideoSource(cap, spec.uri, fps=cap.get(cv2.CAP_PROP_FPS) or None, prepare=prepare)
    opener = _opener(spec, width, height, fps, timeout_ms)
    cap = opener()
    rate = cap.get(_cv2().CAP_PROP_FPS) or None
    return LiveSource(opener, spec.uri, retries, retry_delay, fps=rate, capture=cap, prepare=prepare)
