"""Soak test: many frames through the whole runtime, watching resident memory (RSS).

    python -m benchmarks.soak --package models/fiber-nano-int8 [--frames 10000] [--max-growth-mb 50]

A short 640x480 video is generated and played in a loop (each pass reopens it, as a user
restarting a clip would) through runtime.sources (decode + letterbox thread), Detector.detect,
runtime.draw and the CLI's JSON record (serialised, then dropped). The prompt changes every
``--prompt-every`` frames, cycling through more prompts than the prompt cache holds, so cache
eviction and text.onnx re-runs are part of the soak. RSS is sampled every ``--sample-every``
frames; growth = final RSS - RSS after ``--warmup`` frames (allocator pools and lazy
initialisation settle first). Exit status 1 when growth exceeds ``--max-growth-mb``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.e2e_fps import write_video
from runtime.draw import draw_detections
from runtime.predictor import Detector
from runtime.sources import open_source

PROMPTS = tuple(f"person. {thing}" for thing in (
    "red mug", "dog", "bicycle", "traffic light", "laptop", "chair", "bottle", "cat", "umbrella",
    "backpack", "car", "bird"))


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def frames_forever(video: Path, detector: Detector):
    """Frames of ``video`` in a loop, letterboxed in the reader thread."""
    def prepare(frame):
        return detector.preprocess(frame.image, bgr=frame.bgr)

    while True:
        with open_source(str(video), prepare=prepare) as source:
            yield from source


def soak(detector: Detector, video: Path, frames: int, warmup: int, sample_every: int,
         prompt_every: int, draw: bool, log=print) -> dict[str, float]:
    """Run ``frames`` frames; {"baseline_mb", "final_mb", "peak_mb", "growth_mb", "fps", ...}."""
    baseline = peak = rss_mb()
    t0 = time.perf_counter()
    stream = frames_forever(video, detector)
    for n, frame in enumerate(stream):
        if n == frames:
            stream.close()  # stops the reader thread now, not at garbage collection
            break
        prompt = PROMPTS[(n // prompt_every) % len(PROMPTS)]
        dets = detector.detect(frame.prepared, prompt)
        record = {"image": frame.name, "frame": frame.index, "prompt": prompt,
                  "phrases": list(dets.phrases), "detections": dets.to_json(),
                  "timing_ms": detector.last_timing.to_json()}
        json.dumps(record)
        if draw:
            draw_detections(frame.image, dets, bgr=frame.bgr)
        if n + 1 == warmup:
            baseline = rss_mb()
        if (n + 1) % sample_every == 0:
            now = rss_mb()
            peak = max(peak, now)
            log(f"frame {n + 1:6d}  rss {now:8.1f} MiB  ({now - baseline:+.1f} since warm-up)  "
                f"text runs {detector.text_runs}")
    seconds = time.perf_counter() - t0
    final = rss_mb()
    return {"frames": frames, "seconds": seconds, "fps": frames / seconds, "baseline_mb": baseline,
            "final_mb": final, "peak_mb": max(peak, final), "growth_mb": final - baseline,
            "text_runs": detector.text_runs}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", help="model package or engine folder (default: models/fiber-nano-int8)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--threshold", type=float, help="score threshold (default: the package's)")
    p.add_argument("--frames", type=int, default=10_000)
    p.add_argument("--video-frames", type=int, default=120, help="length of the looped clip")
    p.add_argument("--warmup", type=int, help="frames before the baseline RSS (default: 5%%, >= 20)")
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--prompt-every", type=int, default=250)
    p.add_argument("--draw", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-growth-mb", type=float, default=50.0)
    return p


def main(args: argparse.Namespace) -> int:
    from runtime.packages import default_package

    package = args.package or default_package()
    if package is None:
        print("soak: error: no --package and no models/fiber-nano-int8", file=sys.stderr)
        return 2
    warmup = args.warmup if args.warmup is not None else max(20, args.frames // 20)
    if not 0 < warmup < args.frames:
        print(f"soak: error: --warmup {warmup} must be in (0, --frames)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, \
            Detector(package, args.backend, threads=args.threads, threshold=args.threshold) as det:
        video = write_video(Path(tmp) / "soak.avi", args.video_frames)
        r = soak(det, video, args.frames, warmup, args.sample_every, args.prompt_every, args.draw)
    ok = r["growth_mb"] <= args.max_growth_mb
    print(f"soak: {r['frames']} frames in {r['seconds']:.1f} s ({r['fps']:.1f} FPS), "
          f"text.onnx ran {r['text_runs']}x | RSS {r['baseline_mb']:.1f} MiB after {warmup} warm-up "
          f"frames -> {r['final_mb']:.1f} MiB (peak {r['peak_mb']:.1f}) | growth "
          f"{r['growth_mb']:+.1f} MiB ({'within' if ok else 'OVER'} the {args.max_growth_mb:g} MiB limit)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
