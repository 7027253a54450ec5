"""End-to-end FPS vs network-only FPS on a video file, measured side by side in one run.

    python -m benchmarks.e2e_fps --package models/fiber-nano-int8 [--frames 300] [--backend auto]

A 640x480 video (moving coloured boxes, MJPG .avi by default) is generated in a temp folder
(or --video FILE is used), then, interleaved so machine noise hits both alike:

  network-only  detector.onnx alone on one preprocessed frame with cached text states
                (the jetson-inference "Network FPS": no decode, no pre/post)
  end-to-end    runtime.sources video decode + letterbox (in the reader thread, overlapping the
                network, as the CLI does) + network + post per frame through Detector.detect;
                no drawing, no output

and prints both FPS, the ratio (target: end-to-end >= 0.85x network-only) and where the
end-to-end time goes. ``--min-ratio R`` exits 1 below R (for CI).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from runtime.predictor import Detector
from runtime.sources import open_source

PROMPT = "person. red mug. the dog on the left. a bicycle"


def write_video(path: Path, frames: int, width: int = 640, height: int = 480, codec: str = "MJPG",
                fps: float = 30.0) -> Path:
    """A synthetic video: coloured rectangles moving over a gradient, ``frames`` long."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path} with codec {codec}")
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 96)], -1).astype(np.uint8)
    for i in range(frames):
        frame = base.copy()
        for k, color in enumerate(((0, 0, 255), (0, 200, 0), (255, 128, 0))):
            cx = (i * (3 + k) * 4 + k * 200) % (width - 120)
            cy = 60 + k * 120
            cv2.rectangle(frame, (cx, cy), (cx + 100, cy + 90), color, -1)
        writer.write(frame)
    writer.release()
    return path


def network_only_fps(detector: Detector, frame: np.ndarray, iterations: int) -> float:
    """detector.onnx alone, repeated on one letterboxed frame with the prompt's text states."""
    enc = detector.prepare(PROMPT)
    hidden = detector.engines.encode_text(enc.input_ids, enc.attention_mask)
    buffer, _ = detector.preprocessor(frame, bgr=True)
    image = buffer.copy()
    detector.engines.detect(image, hidden, enc.attention_mask)  # warm-up
    t0 = time.perf_counter()
    for _ in range(iterations):
        detector.engines.detect(image, hidden, enc.attention_mask)
    return iterations / (time.perf_counter() - t0)


def end_to_end_fps(detector: Detector, video: Path) -> tuple[float, int, dict[str, float]]:
    """(FPS, frames, mean ms per stage incl. 'wait' for the decoder) over the whole video."""
    stages = {"wait": 0.0, "pre": 0.0, "text": 0.0, "network": 0.0, "post": 0.0}
    n = 0
    def prepare(frame):  # letterbox in the decode thread, overlapping the network
        return detector.preprocess(frame.image, bgr=frame.bgr)

    with open_source(str(video), prepare=prepare) as source:
        t0 = t_wait = time.perf_counter()
        for frame in source:
            t = time.perf_counter()
            stages["wait"] += t - t_wait
            detector.detect(frame.prepared, PROMPT)
            timing = detector.last_timing
            for s in ("pre", "text", "network", "post"):
                stages[s] += getattr(timing, s) / 1e3
            n += 1
            t_wait = time.perf_counter()
        wall = t_wait - t0
    return n / wall, n, {k: v / max(n, 1) * 1e3 for k, v in stages.items()}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", help="model package or engine folder (default: models/fiber-nano-int8)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime / OpenVINO")
    p.add_argument("--threshold", type=float, help="score threshold (default: the package's)")
    p.add_argument("--video", help="an existing video file instead of the generated one")
    p.add_argument("--frames", type=int, default=300, help="frames in the generated video")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--codec", default="MJPG", choices=("MJPG", "mp4v"))
    p.add_argument("--rounds", type=int, default=3, help="interleaved network/e2e rounds (median)")
    p.add_argument("--min-ratio", type=float, help="exit 1 when end-to-end/network-only is below this")
    return p


def main(args: argparse.Namespace) -> int:
    from runtime.packages import default_package

    package = args.package or default_package()
    if package is None:
        print("e2e_fps: error: no --package and no models/fiber-nano-int8", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, Detector(package, args.backend, threads=args.threads,
                                                                threshold=args.threshold) as det:
        suffix = ".avi" if args.codec == "MJPG" else ".mp4"
        video = Path(args.video) if args.video else write_video(
            Path(tmp) / f"e2e{suffix}", args.frames, args.width, args.height, args.codec)
        with open_source(str(video)) as source:
            first = next(iter(source)).image
        end_to_end_fps(det, video)  # warm-up: caches, page cache, thread start
        net, e2e, breakdown = [], [], []
        for _ in range(args.rounds):
            net.append(network_only_fps(det, first, args.frames))
            fps, frames, stages = end_to_end_fps(det, video)
            e2e.append(fps)
            breakdown.append(stages)
    net_fps, e2e_fps = statistics.median(net), statistics.median(e2e)
    ratio = e2e_fps / net_fps
    print(f"package {package} | backend {det.backend} | input {det.input_hw[0]}x{det.input_hw[1]} | "
          f"video {video.name} {first.shape[1]}x{first.shape[0]}, {frames} frames")
    print(f"network-only  {net_fps:9.1f} FPS   ({1000 / net_fps:.2f} ms)")
    print(f"end-to-end    {e2e_fps:9.1f} FPS   ({1000 / e2e_fps:.2f} ms)   decode + pre + network + post")
    print(f"ratio         {ratio:9.3f}       (target >= 0.85)")
    mean = {k: statistics.median(b[k] for b in breakdown) for k in breakdown[0]}
    print("end-to-end per frame, ms: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    return 1 if args.min_ratio is not None and ratio < args.min_ratio else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
