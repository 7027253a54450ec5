"""runtime.sources: URI parsing, Pillow image decoding of every mode, image/video/live sources.

Live sources run against a scripted fake capture (no camera here): newest-frame hand-over,
reconnection, and the clear error when a camera is gone for good.
"""
from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest
from PIL import Image

from runtime.sources import (
    Frame, ImageReadError, ImageSource, LiveSource, Prefetcher, SourceError, csi_pipeline,
    has_gstreamer, open_source, parse_inputs, parse_uri, read_image,
)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def files(tmp_path):
    """A folder with two PNGs, a video and a note, plus an empty folder."""
    (tmp_path / "imgs").mkdir()
    for name in ("b.png", "a.png"):
        Image.fromarray(_rgb(8, 8)).save(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "clip.mp4").write_bytes(b"")
    return tmp_path


# ----------------------------------------------------------------------------- URIs

def test_parse_uri_kinds(files):
    assert parse_uri(0) == parse_uri(0) and parse_uri(0).kind == "camera" and parse_uri(0).location == 0
    assert parse_uri("/dev/video2").location == "/dev/video2"
    assert parse_uri("v4l2:///dev/video1").location == "/dev/video1"
    assert (parse_uri("csi://1").kind, parse_uri("csi://1").location) == ("csi", 1)
    for uri in ("rtsp://user:pw@10.0.0.2:554/stream", "rtp://@:1234", "http://cam/x.mjpg"):
        spec = parse_uri(uri)
        assert spec.kind == "stream" and spec.location == uri and spec.live
    folder = parse_uri(f"file://{files / 'imgs'}")
    assert folder.kind == "images" and not folder.live
    assert [p.rsplit("/", 1)[1] for p in folder.location] == ["a.png", "b.png"]  # sorted, no .txt
    assert parse_uri(str(files / "clip.mp4")).kind == "video"
    assert parse_uri(f"file://{files / 'imgs' / 'notes.txt'}").kind == "images"  # fails at decode


@pytest.mark.parametrize("uri,message", [
    ("csi://front", "csi://N"),
    ("ftp://host/x", "unsupported URI scheme"),
    ("/no/such/file.jpg", "no such file or folder"),
    (-1, "camera numbers are >= 0"),
])
def test_parse_uri_errors(uri, message):
    with pytest.raises(SourceError, match=message):
        parse_uri(uri)


def test_empty_folder_and_list_rules(files):
    with pytest.raises(SourceError, match="no image files"):
        parse_uri(str(files / "empty"))
    with pytest.raises(SourceError, match="image files or folders"):
        parse_uri([str(files / "clip.mp4")])
    specs = parse_inputs([str(files / "imgs" / "a.png"), str(files / "imgs"), str(files / "clip.mp4"),
                          str(files / "imgs" / "b.png")])
    assert [s.kind for s in specs] == ["images", "video", "images"]
    assert len(specs[0].location) == 3  # consecutive image inputs merged into one source


def test_csi_needs_gstreamer():
    pipeline = csi_pipeline(1, 640, 480, 15)
    assert "nvarguscamerasrc sensor-id=1" in pipeline and "width=(int)640" in pipeline
    assert pipeline.endswith("appsink drop=true max-buffers=1 sync=false")
    # Without GStreamer: a clear refusal. With it (a Jetson): no nvargus camera here -> cannot open.
    match = "cannot open" if has_gstreamer(cv2) else "GStreamer"
    with pytest.raises(SourceError, match=match):
        open_source("csi://0")


def test_missing_camera_is_a_clear_error():
    with pytest.raises(SourceError, match=r"/dev/video97 does not exist"):
        open_source(97)
    with pytest.raises(SourceError, match=r"/dev/video98 does not exist"):
        open_source("v4l2:///dev/video98")


# ----------------------------------------------------------------------------- images

def test_read_image_modes(tmp_path):
    rgb = _rgb(6, 7)
    gray = rgb[:, :, 0]
    cases = {
        "rgba.png": (Image.fromarray(np.dstack([rgb, np.full((6, 7), 9, np.uint8)])), rgb),
        "gray.png": (Image.fromarray(gray), np.repeat(gray[:, :, None], 3, 2)),
        "sixteen.png": (Image.fromarray(gray.astype(np.uint16) * 257),
                        np.repeat(gray[:, :, None], 3, 2)),  # v * 257 / 65535 * 255 == v
    }
    pal = Image.fromarray(gray).convert("P")
    cases["palette.png"] = (pal, np.asarray(pal.convert("RGB")))
    for name, (img, want) in cases.items():
        img.save(tmp_path / name)
        got = read_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (6, 7, 3), name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_read_image_cmyk_and_shapes(tmp_path):
    Image.new("CMYK", (5, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)  # red ink
    red = read_image(tmp_path / "cmyk.jpg")
    assert red.shape == (4, 5, 3) and red[..., 0].min() > 200 and red[..., 1:].max() < 60
    Image.fromarray(_rgb(1, 1)).save(tmp_path / "one.png")
    Image.fromarray(_rgb(10, 4000)).save(tmp_path / "wide.png")
    assert read_image(tmp_path / "one.png").shape == (1, 1, 3)
    assert read_image(tmp_path / "wide.png").shape == (10, 4000, 3)


def test_read_image_applies_exif_rotation(tmp_path):
    img = Image.fromarray(_rgb(2, 5))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert read_image(tmp_path / "rot.jpg").shape == (5, 2, 3)


def test_read_image_errors(tmp_path):
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "folder.png").mkdir()
    expected = {"truncated.jpg": "unreadable image data", "empty.png": "empty file",
                "text.jpg": "not an image file", "folder.png": "is a folder", "gone.png": "no such file"}
    for name, reason in expected.items():
        with pytest.raises(ImageReadError, match=reason) as info:
            read_image(tmp_path / name)
        assert info.value.path.endswith(name) and isinstance(info.value, ValueError)


def test_image_source_keeps_going_past_bad_files(tmp_path):
    Image.fromarray(_rgb(3, 3)).save(tmp_path / "ok1.png")
    (tmp_path / "bad.png").write_text("x")
    Image.fromarray(_rgb(4, 4)).save(tmp_path / "ok2.png")
    paths = [tmp_path / n for n in ("ok1.png", "bad.png", "ok2.png")]
    with ImageSource(paths, prepare=lambda f: f.image.shape) as src:
        frames = list(src)
    assert [f.index for f in frames] == [0, 1, 2]
    assert [f.error is None for f in frames] == [True, False, True]
    assert frames[1].image is None and "not an image" in frames[1].error
    assert [f.prepared for f in frames] == [(3, 3, 3), None, (4, 4, 3)]  # hook ran on good frames


# ----------------------------------------------------------------------------- video

def _write_video(path, frames: int, size=(64, 48)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), 20 * i, np.uint8))  # gray level = frame number
    writer.release()


def test_video_source_reads_every_frame_in_order(tmp_path):
    _write_video(tmp_path / "v.avi", 9)
    with open_source(str(tmp_path / "v.avi")) as src:
        assert not src.live and src.fps == pytest.approx(10)
        frames = []
        for f in src:
            frames.append(f)
            threading.Event().wait(0.002)  # a slow consumer must not lose frames of a file
    assert [f.index for f in frames] == list(range(9))
    assert all(f.bgr and f.image.shape == (48, 64, 3) for f in frames)
    levels = [float(f.image.mean()) for f in frames]
    np.testing.assert_allclose(levels, [20 * i for i in range(9)], atol=4)


def test_unreadable_video_is_a_source_error(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(SourceError, match="broken.mp4"):
        open_source(str(tmp_path / "broken.mp4"))


# ----------------------------------------------------------------------------- live

class FakeCamera:
    """read() hands out frames 0..n-1 (gray level = number), then fails (unplugged)."""

    def __init__(self, n: int, gate: threading.Event | None = None):
        self.n, self.i, self.gate = n, 0, gate
        self.delivered = threading.Event()
        self.released = False

    def read(self):
        if self.i == self.n:
            self.delivered.set()
            if self.gate is not None:
                self.gate.wait()
            return False, None
        self.i += 1
        return True, np.full((2, 2, 3), self.i - 1, np.uint8)

    def release(self):
        self.released = True


def test_live_source_hands_over_the_newest_frame():
    gate = threading.Event()
    cam = FakeCamera(10, gate)
    src = LiveSource(lambda: cam, "fake", retries=0)
    assert cam.delivered.wait(5.0)
    frame = next(iter(src))  # the consumer was slow: all 10 arrived, it gets the newest only
    assert frame.index == 9 and frame.bgr and int(frame.image[0, 0, 0]) == 9
    assert src.dropped == 9
    gate.set()
    src.close()
    assert cam.released


def test_live_source_reconnects_then_gives_up():
    opened = []

    def reopen():
        opened.append(len(opened))
        if len(opened) in (2, 4, 5):  # a reconnection that fails, then the camera is gone
            raise SourceError("unplugged")
        return FakeCamera(3)

    src = LiveSource(reopen, "cam0", retries=2, retry_delay=0.001, prepare=lambda f: "ok")
    got = []
    with pytest.raises(SourceError, match=r"cam0: lost \(unplugged\); gave up after 2 reconnection"):
        for frame in src:
            got.append(frame)
    assert len(opened) == 5  # first open, failed + successful reconnect, two failed retries
    assert 1 <= len(got) <= 6 and all(f.prepared == "ok" for f in got)
    assert [f.index for f in got] == sorted(f.index for f in got)
    src.close()


def test_prefetcher_reraises_and_stops():
    def items():
        yield 1
        yield 2
        raise ValueError("boom")

    got = []
    with pytest.raises(ValueError, match="boom"):
        for item in Prefetcher(items(), depth=1):
            got.append(item)
    assert got == [1, 2]
    endless = Prefetcher(iter(int, 1), depth=2)  # never ends on its own
    it = iter(endless)
    assert next(it) == 0
    endless.close()
    assert not endless._thread.is_alive()


def test_frame_is_frozen():
    f = Frame(None, "x", 0, error="e")
    with pytest.raises(AttributeError):
        f.index = 1  # type: ignore[misc]
