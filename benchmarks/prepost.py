"""Pre+post-processing latency per frame: the C extension vs the numpy reference vs OpenCV.

    python -m benchmarks.prepost [--frames 300] [--size 256]

One 640x480 BGR camera frame and a realistic detector output (N = 1344 anchors for a 256 input
at strides 8/16/32, T = 32 tokens, P = 4 phrases, a few objects) go through three paths, timed
interleaved in one run (A B C A B C ...) so that machine noise hits all three alike:

  native  Preprocessor (runtime._native.letterbox) + postprocess(use_native=True)
  numpy   letterbox_ref + postprocess(use_native=False)
  opencv  cv2.resize + numpy normalise/CHW + numpy scores + cv2.dnn.NMSBoxesBatched

Prints the median milliseconds of each and the ratios numpy/native and opencv/native (the
target: >= 3x and > 1x).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import numpy as np

from common.package import IMAGENET_MEAN, IMAGENET_STD, PostprocessSpec
from runtime.postprocess import phrase_scores_ref, postprocess
from runtime.preprocess import Preprocessor, letterbox_info, letterbox_ref, load_native
from runtime.types import LetterboxInfo

STRIDES = (8, 16, 32)
PHRASE_TOKENS = ((1,), (3, 4), (6, 7, 8), (10,))  # token positions of the 4 phrases (T = 32)
_POST = PostprocessSpec()  # a package's defaults
THRESHOLD, NMS_IOU, TOP_K, MAX_DET = _POST.threshold, _POST.nms_iou, _POST.pre_nms_top_k, _POST.max_detections


def make_frame(rng: np.random.Generator, width: int = 640, height: int = 480) -> np.ndarray:
    """A BGR uint8 [H, W, 3] frame: smooth gradients plus noise (content does not matter)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def make_detector_output(rng: np.random.Generator, size: int, tokens: int = 32,
                         objects: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """boxes [N, 4] xyxy, token_logits [N, T], centerness [N] for an S x S input, phrase_map."""
    centres = np.concatenate([
        np.stack(np.meshgrid(np.arange(size // s), np.arange(size // s)), -1).reshape(-1, 2)
        * s + s / 2 for s in STRIDES
    ]).astype(np.float32)  # [N, 2]
    n = len(centres)
    half = rng.uniform(8, 48, (n, 2)).astype(np.float32)
    boxes = np.concatenate([centres - half, centres + half], 1)
    logits = rng.normal(-7.0, 1.5, (n, tokens)).astype(np.float32)
    centerness = rng.normal(-2.0, 1.0, n).astype(np.float32)
    for _ in range(objects):  # anchors near an object see its phrase and regress to its box
        c, wh = rng.uniform(0, size, 2), rng.uniform(16, 96, 2)
        near = np.linalg.norm(centres - c, axis=1) < 24
        obj = np.concatenate([c - wh / 2, c + wh / 2]).astype(np.float32)
        boxes[near] = obj + rng.normal(0.0, 3.0, (near.sum(), 4)).astype(np.float32)
        phrase = PHRASE_TOKENS[rng.integers(len(PHRASE_TOKENS))]
        logits[np.ix_(near, phrase)] = rng.normal(1.0, 1.0, (near.sum(), len(phrase)))
        centerness[near] = rng.normal(1.0, 0.5, near.sum())
    phrase_map = np.zeros((len(PHRASE_TOKENS), tokens), np.float32)
    for p, toks in enumerate(PHRASE_TOKENS):
        phrase_map[p, list(toks)] = 1.0
    return boxes, logits, centerness, phrase_map


def opencv_path(frame: np.ndarray, out: np.ndarray, outputs: tuple, cv2) -> int:
    """The OpenCV-based pipeline a user would write; returns the number of detections."""
    size = out.shape[-1]
    info = letterbox_info(frame.shape[1], frame.shape[0], size)
    resized = cv2.resize(frame, (info.new_w, info.new_h), interpolation=cv2.INTER_LINEAR)
    rgb = resized[:, :, ::-1].astype(np.float32) * np.float32(1 / 255)
    out.fill(0.0)
    out[:, : info.new_h, : info.new_w] = ((rgb - np.float32(IMAGENET_MEAN))
                                          / np.float32(IMAGENET_STD)).transpose(2, 0, 1)
    boxes, logits, centerness, phrase_map = outputs
    scores = phrase_scores_ref(logits, centerness, phrase_map)
    anchor, phrase = np.nonzero(scores > THRESHOLD)
    cand = np.clip(boxes[anchor] / np.float32(info.scale), 0,
                   np.float32([info.src_w, info.src_h] * 2))
    xywh = np.concatenate([cand[:, :2], cand[:, 2:] - cand[:, :2]], 1)
    keep = cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores[anchor, phrase].tolist(),
                                   phrase.tolist(), THRESHOLD, NMS_IOU, top_k=TOP_K)
    return min(len(keep), MAX_DET)


def time_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


def measure(frames: int, size: int, seed: int = 0, cv2=None
            ) -> tuple[dict[str, list[float]], dict[str, int], tuple]:
    """Time the three paths interleaved: ({path: ms per frame}, {path: detections}, detector outputs).

    Paths "native", "numpy" and "opencv" (the last only when ``cv2`` is given). Needs the C
    extension (runtime._native).
    """
    if cv2 is not None:
        cv2.setNumThreads(1)  # the C path is single-threaded; compare like with like
    rng = np.random.default_rng(seed)
    frame = make_frame(rng)
    outputs = make_detector_output(rng, size)
    pre = Preprocessor(size)
    ref_out = np.zeros((3, size, size), np.float32)
    cv_out = np.zeros_like(ref_out)

    def native() -> int:
        _, info = pre(frame, bgr=True)
        return len(postprocess(*outputs, info, THRESHOLD, NMS_IOU, TOP_K, MAX_DET))

    def reference() -> int:
        info: LetterboxInfo = letterbox_ref(frame, ref_out, bgr_input=True)
        return len(postprocess(*outputs, info, THRESHOLD, NMS_IOU, TOP_K, MAX_DET,
                               use_native=False))

    paths = {"native": native, "numpy": reference}
    if cv2 is not None:
        paths["opencv"] = lambda: opencv_path(frame, cv_out, outputs, cv2)
    counts = {name: fn() for name, fn in paths.items()}  # warm-up, and a sanity check
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(frames):
        for name, fn in paths.items():
            times[name].append(time_ms(fn))
    return times, counts, outputs


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=300, help="timed frames per path")
    parser.add_argument("--size", type=int, default=256, help="network input size S")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        import cv2
    except ImportError:
        print("benchmarks.prepost: opencv-python-headless is needed for the OpenCV path",
              file=sys.stderr)
        return 2
    if load_native() is None:
        print("benchmarks.prepost: runtime._native is not built (run `make native`)",
              file=sys.stderr)
        return 2
    if args.frames < 1 or args.size < 32:
        print("benchmarks.prepost: need --frames >= 1 and --size >= 32", file=sys.stderr)
        return 2
    times, counts, outputs = measure(args.frames, args.size, args.seed, cv2)
    med = {name: statistics.median(t) for name, t in times.items()}

    n, t = outputs[1].shape
    print(f"pre+post per frame: 640x480 BGR -> {args.size}x{args.size}, N={n} anchors, T={t} "
          f"tokens, P={len(PHRASE_TOKENS)} phrases, {args.frames} frames interleaved")
    print(f"{'path':8s} {'median ms':>10s} {'p10 ms':>8s} {'p90 ms':>8s} {'detections':>11s}")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10) if len(ts) > 1 else [ts[0]] * 9
        print(f"{name:8s} {med[name]:10.3f} {q[0]:8.3f} {q[-1]:8.3f} {counts[name]:11d}")
    r_np, r_cv = med["numpy"] / med["native"], med["opencv"] / med["native"]
    print(f"numpy/native {r_np:.2f}x (target >= 3)   opencv/native {r_cv:.2f}x (target > 1)")
    print(f"targets met: {'yes' if r_np >= 3 and r_cv > 1 else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
