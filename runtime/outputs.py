"""Where ``runtime.detect`` writes: JSON lines, annotated videos / images, per-stage timing.

Every output appears complete or not at all: JSON lines and videos are written under a temporary
name and renamed on close; each annotated image is written atomically.
"""
from __future__ import annotations

import json
import os
import sys
from collections import deque
from io import BytesIO
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image

from common.atomic import atomic_write_bytes
from runtime.sources import VIDEO_EXTENSIONS, Frame, SourceSpec

STAGES = ("wait", "pre", "text", "network", "post", "draw", "total")
IMAGE_SAVE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}


class UsageError(Exception):
    """Arguments, package, source or output that cannot be used: exit status 2."""


# ---------------------------------------------------------------------------------------------
# Outputs

class JsonlWriter:
    """JSON lines to a file (written to a temp name, renamed when closed) or stdout ("-")."""

    def __init__(self, target: str | None):
        self.path = None if target in (None, "-") else Path(target)
        self._stream: TextIO | None = sys.stdout if target == "-" else None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                self._stream = open(self._tmp, "w", encoding="utf-8")
            except OSError as e:
                raise UsageError(f"--json {target}: cannot write it ({e.strerror or e})") from None

    def write(self, record: dict[str, Any]) -> None:
        if self._stream is not None:
            self._stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            if self.path is None:
                self._stream.flush()  # stdout: a consumer reads as we go

    def close(self) -> None:
        if self.path is not None and self._stream is not None:
            self._stream.close()
            os.replace(self._tmp, self.path)
        self._stream = None


class VideoSink:
    """Annotated frames into a video file (temp name, renamed on close); mp4v, MJPG for .avi."""

    def __init__(self, path: Path, fps: float | None):
        self.path, self.fps = path, fps if fps and 0 < fps < 1000 else 30.0
        self._tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
        self._writer = None

    def write(self, frame: Frame, image: np.ndarray) -> None:
        import cv2  # only videos need OpenCV (the sources imported it already)

        bgr = image if frame.bgr else image[:, :, ::-1]
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fourcc = cv2.VideoWriter_fourcc(*("MJPG" if self.path.suffix.lower() == ".avi" else "mp4v"))
            self._writer = cv2.VideoWriter(str(self._tmp), fourcc, self.fps, (bgr.shape[1], bgr.shape[0]))
            if not self._writer.isOpened():
                raise UsageError(f"--save {self.path}: OpenCV cannot write this video format")
        self._writer.write(np.ascontiguousarray(bgr))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            os.replace(self._tmp, self.path)
            self._writer = None


class ImageSink:
    """Annotated images into a folder, each written atomically, named after its input."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._used: set[str] = set()

    def _name(self, source: str) -> str:
        src = Path(source)
        suffix = src.suffix.lower() if src.suffix.lower() in IMAGE_SAVE_FORMATS else ".png"
        name, n = src.stem + suffix, 1
        while name in self._used:
            name, n = f"{src.stem}_{n}{suffix}", n + 1
        self._used.add(name)
        return name

    def write(self, frame: Frame, image: np.ndarray) -> None:
        name = self._name(frame.name)
        buf = BytesIO()
        rgb = image[:, :, ::-1] if frame.bgr else image
        Image.fromarray(np.ascontiguousarray(rgb)).save(buf, IMAGE_SAVE_FORMATS[Path(name).suffix])
        atomic_write_bytes(self.folder / name, buf.getvalue())

    def close(self) -> None:
        pass


def make_sink(save: str | None, spec: SourceSpec | None, fps: float | None) -> VideoSink | ImageSink | None:
    if not save:
        return None
    out = Path(save)
    if spec is None or spec.kind == "images":
        if out.exists() and not out.is_dir():
            raise UsageError(f"--save {save}: exists and is not a folder (image inputs save into a folder)")
        return ImageSink(out)
    if out.suffix.lower() in VIDEO_EXTENSIONS:
        return VideoSink(out, fps)
    label = f"{spec.kind}{spec.location}" if spec.kind in ("camera", "csi") else spec.location
    stem = "".join(c if c.isalnum() else "_" for c in Path(str(label)).stem) or spec.kind
    return VideoSink(out / f"{stem}.mp4", fps)


# ---------------------------------------------------------------------------------------------
# Timing

class StageStats:
    """Per-stage milliseconds: means over the run, percentiles over the last ``window`` values.

    End-to-end FPS = processed inputs / wall time from the first request for an input to the end
    of the last one (waiting for the source included); network-only FPS = 1000 / mean network ms.
    No FPS when no input was processed (every input failed).
    """

    def __init__(self, window: int = 2048):
        self.sums = {s: 0.0 for s in STAGES}
        self.counts = {s: 0 for s in STAGES}
        self.recent = {s: deque(maxlen=window) for s in STAGES}
        self.frames = self.ok = self.failed = self.text_runs = 0
        self.start: float | None = None
        self.end: float | None = None

    def add(self, stage: str, ms: float) -> None:
        self.sums[stage] += ms
        self.counts[stage] += 1
        self.recent[stage].append(ms)

    def mean(self, stage: str) -> float:
        return self.sums[stage] / self.counts[stage] if self.counts[stage] else 0.0

    def fps_line(self) -> str:
        wall = (self.end - self.start) if self.start is not None and self.end is not None else 0.0
        head = f"{self.frames} inputs ({self.ok} ok, {self.failed} failed) in {wall:.2f} s"
        if not self.ok:  # failed inputs cost ~nothing: a rate over them would be meaningless
            return f"{head} | no input was processed, so no FPS"
        net = self.mean("network")
        net_fps = f"{1000.0 / net:.1f}" if net > 0 else "-"
        e2e = f"{self.ok / wall:.1f}" if wall > 0 else "-"
        return f"{head} | network-only {net_fps} FPS | end-to-end {e2e} FPS"

    def table(self) -> str:
        rows = [f"{'stage':<8} {'mean ms':>9} {'p50':>9} {'p90':>9} {'max':>9} {'count':>7}"]
        for s in STAGES:
            v = np.asarray(self.recent[s], np.float64)
            if v.size:
                p50, p90 = np.percentile(v, [50, 90])
                rows.append(f"{s:<8} {self.mean(s):9.3f} {p50:9.3f} {p90:9.3f} {v.max():9.3f} "
                            f"{self.counts[s]:7d}")
        rows.append(f"text.onnx ran {self.text_runs}x; wait = waiting for the source; "
                    "total = one loop iteration")
        return "\n".join(rows)
