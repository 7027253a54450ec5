"""Per-stage latency of model packages on several backends, measured side by side in one run.

    python -m benchmarks.latency --package models/fiber-nano-int8 --package models/fiber-nano
        [--backend default|onnxruntime,openvino,tensorrt,tensorrt-rtx] [--checkpoint CKPT]
        [--runs 50] [--warmup 5] [--threads N] [--image FILE] [--prompt TEXT] [--json OUT]

Subjects: every package on every backend (an engine folder: TensorRT), plus PyTorch eager FP32
(``--checkpoint``, the reference) through the same runtime Detector (``fiber.torch_engines``),
so every subject pays the same tokenisation and C pre/post-processing. ``--backend default`` is
ONNX Runtime, OpenVINO and TensorRT / TensorRT-RTX where present; an absent one is listed as "not
available: <reason>" (a backend named explicitly and absent is a failure: exit status 1). On the ONNX
Runtime CPU provider an INT8 package runs its ``detector.cpu.onnx`` when it has one (what
``engines.load`` picks); OpenVINO runs the Q/DQ ``detector.onnx``.

Input: a 640x480 generated scene (``fiber.data.synth``) and a prompt of its objects' names
(``--image``/``--prompt`` to override). One sample of a subject = ``prepare(other prompt)`` (evicts
the prompt: cache size 1), timed ``prepare(prompt)`` (tokenise + text.onnx: the uncached text
stage), then ``detect(frame, prompt)`` (a cache hit) whose ``last_timing`` gives pre, text (cached),
network and post. Uncached total = pre + uncached text + network + post.

Alternation: warm-up, then ``--runs`` rounds of A B C ...; each turn of a subject is ``--settle``
untimed samples (they absorb the previous engine's spinning threads) followed by ``--block`` timed
ones. Statistics: median, p90, p99 (numpy linear interpolation), mean, min. FPS: network-only =
1000 / median network ms, end-to-end = 1000 / median total ms (one frame after another, no
overlap). Memory: the process RSS a subject added (after opening and warm-up) and the process peak
RSS. Also the pre/post-processing paths of ``benchmarks.prepost`` (C extension vs numpy vs OpenCV).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import engines
from common import package as pkg

STAGES = ("pre", "text", "network", "post", "total", "text_uncached", "total_uncached")
CPU_BACKENDS = ("onnxruntime", "openvino")
GPU_BACKENDS = ("tensorrt", "tensorrt-rtx")
DEFAULT_BACKENDS = CPU_BACKENDS + GPU_BACKENDS
TORCH = "pytorch"
FRAME_SIZE = (640, 480)
KEEP_SAMPLES = ("network", "total")  # raw samples kept in the JSON (for distribution plots)


# ----------------------------------------------------------------------------- statistics

def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    return float(np.percentile(np.asarray(values, np.float64), q))


def summarize(values: Sequence[float], digits: int = 3) -> dict[str, float | int]:
    """``{"median", "p90", "p99", "mean", "min", "runs"}`` of a list of milliseconds."""
    if not len(values):
        raise ValueError("summarize needs at least one value")
    v = np.asarray(values, np.float64)
    return {"median": round(percentile(v, 50), digits), "p90": round(percentile(v, 90), digits),
            "p99": round(percentile(v, 99), digits), "mean": round(float(v.mean()), digits),
            "min": round(float(v.min()), digits), "runs": int(v.size)}


def ratio(numerator: float | None, denominator: float | None, digits: int = 2) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, digits)


# ----------------------------------------------------------------------------- alternation

def schedule(labels: Sequence[str], rounds: int, block: int, settle: int) -> list[tuple[str, bool]]:
    """The call order: per round, each label ``settle`` untimed then ``block`` timed times.

    Returns ``[(label, timed), ...]``: A A(t) B B(t) C C(t) A A(t) ... for settle 1, block 1.
    """
    if rounds < 1 or block < 1 or settle < 0:
        raise ValueError(f"need rounds >= 1, block >= 1, settle >= 0; got {rounds}, {block}, {settle}")
    order = []
    for _ in range(rounds):
        for label in labels:
            order += [(label, False)] * settle + [(label, True)] * block
    return order


def alternate(runners: Mapping[str, Callable[[], Mapping[str, float]]], rounds: int, block: int = 1,
              settle: int = 1, warmup: int = 0, progress: Callable | None = None
              ) -> dict[str, dict[str, list[float]]]:
    """Run ``runners`` interleaved (``schedule``); ``{label: {key: [timed values...]}}``.

    Each runner returns one sample: a mapping of stage name -> milliseconds. ``warmup`` untimed
    samples of every runner come first (A x warmup, B x warmup, ...).
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    out: dict[str, dict[str, list[float]]] = {label: {} for label in runners}
    order = schedule(list(runners), rounds, block, settle)
    for label, timed in (progress(order, desc="latency", unit="run") if progress else order):
        sample = runners[label]()
        if timed:
            for key, value in sample.items():
                out[label].setdefault(key, []).append(float(value))
    return out


# ----------------------------------------------------------------------------- subjects

@dataclass(frozen=True)
class Subject:
    """One thing to time: a package (or engine folder, or checkpoint) on a backend."""

    package: str                  # package folder, engine folder, or (backend "pytorch") checkpoint
    backend: str                  # onnxruntime | openvino | tensorrt | tensorrt-rtx | pytorch
    role: str = "package"         # free text for the report: "main", "compare", "teacher", "reference"


@dataclass
class Opened:
    """An opened subject: the runtime Detector and what the report says about it."""

    subject: Subject
    detector: Any                 # runtime.predictor.Detector
    name: str                     # package (manifest) name, or the checkpoint's config name
    model: str                    # the model config name (pairs an INT8 package with its FP32 one)
    precision: str                # fp32 | int8 | fp16 ...
    detector_file: str            # the detector graph that runs (detector.onnx, detector.cpu.onnx, plan)
    digest: str | None            # common.package.package_digest of the package
    label: str = ""
    rss_added: float = 0.0        # MB of process RSS that opening + warming it up added

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "package": self.subject.package, "backend": self.subject.backend,
                "role": self.subject.role, "name": self.name, "model": self.model,
                "precision": self.precision, "detector_file": self.detector_file, "sha256": self.digest}


def parse_backends(text: str) -> tuple[tuple[str, ...], bool]:
    """``(backends, explicit)``: "default" -> every backend where present (explicit False)."""
    if text.strip() in ("", "default"):
        return DEFAULT_BACKENDS, False
    names = []
    for raw in text.split(","):
        name = {"ort": "onnxruntime", "trt": "tensorrt", "trt-rtx": "tensorrt-rtx"}.get(raw.strip(), raw.strip())
        if name not in DEFAULT_BACKENDS:
            raise ValueError(f"--backend {raw.strip()!r} is not one of {list(DEFAULT_BACKENDS)}")
        names.append(name)
    return tuple(dict.fromkeys(names)), True


def backend_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None when it can (never raises)."""
    if backend == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "OpenVINO is not installed (pip install openvino)"
        return None
    if backend in GPU_BACKENDS:
        from engines import cuda, trt

        try:
            trt.TensorRT(backend)
        except engines.EngineError as e:
            return str(e)
        try:
            if cuda.device_count() < 1:
                return "no CUDA GPU on this machine"
        except engines.EngineError as e:
            return f"no usable CUDA GPU ({e})"
    return None


def is_engine_dir(path: str | Path) -> bool:
    from engines.manifest import ENGINE_JSON

    return (Path(path) / ENGINE_JSON).is_file()


def plan_subjects(packages: Sequence[str], backends: Sequence[str], explicit: bool,
                  checkpoints: Sequence[str] = (), roles: Mapping[str, str] | None = None
                  ) -> tuple[list[Subject], dict[str, str]]:
    """(subjects to open, {backend: why not available}) for every package x available backend.

    An engine folder runs on the backend it was built for (engine.json: TensorRT, ONNX Runtime or
    OpenVINO). With ``explicit`` an unavailable backend still makes
    subjects (they fail on opening, with the reason); otherwise it is only listed as not available.
    """
    roles = roles or {}
    unavailable = {b: r for b in backends if (r := backend_unavailable(b))}
    subjects = [Subject(c, TORCH, roles.get(c, "reference")) for c in checkpoints]
    for p in packages:
        role = roles.get(p, "package")
        if is_engine_dir(p):
            subjects.append(Subject(p, "auto", role))
            continue
        for b in backends:
            if b not in unavailable or explicit:
                subjects.append(Subject(p, b, role))
    return subjects, unavailable


def open_subject(subject: Subject, threads: int | None, scratch: Path) -> Opened:
    """A runtime Detector for ``subject``. Raises engines.EngineError, common.package.PackageError,
    ValueError or OSError with a clear message."""
    from runtime.predictor import Detector

    if subject.backend == TORCH:
        return _open_checkpoint(subject, threads)
    why = backend_unavailable(subject.backend) if subject.backend != "auto" else None
    if why:
        raise engines.BackendUnavailable(f"{subject.backend}: {why}")
    source = subject.package
    if subject.backend in GPU_BACKENDS and not is_engine_dir(source):
        source = str(_build_engine(source, subject.backend, scratch))
    det = Detector(source, subject.backend, threads=threads, prompt_cache_size=1)
    manifest = det.manifest
    model = str((manifest.get("model") or {}).get("name", det.name))
    detector_path = getattr(det.engines.detector, "path", None)
    return Opened(subject, det, det.name, model, str(manifest.get("precision", "fp32")),
                  Path(detector_path).name if detector_path else "?", pkg.package_digest(manifest))


def _build_engine(package: str, backend: str, scratch: Path) -> Path:
    """A TensorRT(-RTX) engine folder for ``package`` built into ``scratch`` (precision auto)."""
    from engines.build import BuildConfig, build_engines

    out = scratch / f"{Path(package).name}-{backend}"
    return build_engines(BuildConfig(package=package, out=str(out), backend=backend))


def _open_checkpoint(subject: Subject, threads: int | None) -> Opened:
    """PyTorch eager FP32: the checkpoint behind the package interface, in the runtime Detector."""
    import torch

    from fiber.checkpoint import CheckpointError, load_fine_model, tokenizer_file
    from fiber.torch_engines import torch_detector

    if threads:
        torch.set_num_threads(threads)
    try:
        model, meta = load_fine_model(subject.package, "the torch reference")
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    cfg = model.cfg
    det = torch_detector(model, tokenizer=tokenizer_file(meta["path"]), prompt_cache_size=1)
    return Opened(subject, det, cfg.name, cfg.name, "fp32", "torch eager", None)


def label_subjects(opened: Sequence[Opened]) -> None:
    """Unique, readable labels: "<name> <backend>" (PyTorch: "eager"), " (teacher)" for the teacher,
    "#k" for a repeated pair."""
    seen: dict[str, int] = {}
    for o in opened:
        backend = "eager" if o.subject.backend == TORCH else o.detector.backend
        base = f"{o.name} {backend}" + (" (teacher)" if o.subject.role == "teacher" else "")
        seen[base] = seen.get(base, 0) + 1
        o.label = base if seen[base] == 1 else f"{base} #{seen[base]}"


# ----------------------------------------------------------------------------- input

def scene_frame(seed: int = 0, size: tuple[int, int] = FRAME_SIZE) -> tuple[np.ndarray, str, str]:
    """(RGB uint8 [H, W, 3] generated scene, its prompt, another prompt of the same length).

    The prompt names the scene's objects ("red star. blue square. ..."), as a user would.
    """
    from fiber.data.synth import SynthConfig, render_scene

    cfg = SynthConfig(images=1, seed=seed, sizes=(size,), min_objects=4, max_objects=6)
    image, objects = render_scene(cfg, np.random.default_rng([seed, 0]))
    names = list(dict.fromkeys(f"{o.colour} {o.kind}" for o in objects))
    return np.asarray(image), ". ".join(names), ". ".join(reversed(names))


def load_frame(path: str | Path) -> np.ndarray:
    from runtime.sources import read_image

    return read_image(path)


class SampleRunner:
    """One latency sample of an opened subject (see the module docstring)."""

    def __init__(self, detector: Any, frame: np.ndarray, prompt: str, other_prompt: str):
        self.det, self.frame, self.prompt, self.other = detector, frame, prompt, other_prompt

    def __call__(self) -> dict[str, float]:
        self.det.prepare(self.other)                  # evicts `prompt` (cache size 1)
        t0 = time.perf_counter()
        self.det.prepare(self.prompt)                 # tokenise + text.onnx: the uncached text stage
        text_uncached = (time.perf_counter() - t0) * 1e3
        self.det.detect(self.frame, self.prompt)      # a cache hit
        t = self.det.last_timing
        return {"pre": t.pre, "text": t.text, "network": t.network, "post": t.post, "total": t.total,
                "text_uncached": text_uncached, "total_uncached": t.pre + text_uncached + t.network + t.post}


# ----------------------------------------------------------------------------- memory

def rss_mb() -> float:
    """Resident set size of this process now, MB (Linux /proc; 0.0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KB


# ----------------------------------------------------------------------------- the benchmark

@dataclass(frozen=True)
class LatencyConfig:
    packages: tuple[str, ...] = ()         # model packages or engine folders
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    explicit_backends: bool = False        # an absent backend is a failure, not "not available"
    checkpoints: tuple[str, ...] = ()      # fine checkpoints: PyTorch eager FP32 references
    roles: tuple[tuple[str, str], ...] = ()  # (package or checkpoint, role) for the report
    runs: int = 50                         # alternation rounds (timed samples per subject = runs x block)
    block: int = 1                         # timed samples per turn
    settle: int = 1                        # untimed samples per turn
    warmup: int = 5                        # untimed samples per subject before the rounds
    threads: int | None = None             # CPU threads per engine (ORT intra-op / OpenVINO / torch)
    image: str | None = None               # a frame instead of the generated 640x480 scene
    prompt: str | None = None              # a prompt instead of the scene's object names
    prepost_frames: int = 200              # frames of the C / numpy / OpenCV pre+post comparison (0: skip)
    seed: int = 0
    progress: bool = True


def run_latency(cfg: LatencyConfig) -> dict[str, Any]:
    """Open every subject, alternate, summarise. Subjects that cannot be opened are reported with
    ``status`` "failed" and the reason; nothing here raises for a bad package or backend."""
    frame, prompt, other = scene_frame(cfg.seed)
    source = f"generated scene {FRAME_SIZE[0]}x{FRAME_SIZE[1]} (fiber.data.synth, seed {cfg.seed})"
    if cfg.image:
        frame, source = load_frame(cfg.image), cfg.image
    if cfg.prompt:
        prompt, other = cfg.prompt, cfg.prompt + " ."
    subjects, unavailable = plan_subjects(cfg.packages, cfg.backends, cfg.explicit_backends,
                                          cfg.checkpoints, dict(cfg.roles))
    out: dict[str, Any] = {
        "config": {**asdict(cfg), "roles": dict(cfg.roles)},
        "input": {"source": source, "width": int(frame.shape[1]), "height": int(frame.shape[0]), "prompt": prompt},
        "unavailable": unavailable, "subjects": [],
    }
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fiber-bench-")))
        opened, failed = _open_all(subjects, cfg.threads, scratch, stack, frame, prompt, other, cfg.warmup)
        runners = {o.label: SampleRunner(o.detector, frame, prompt, other) for o in opened}
        times = alternate(runners, cfg.runs, cfg.block, cfg.settle, 0, progress_bar(cfg.progress)) if runners else {}
        out["subjects"] = [_subject_result(o, times[o.label]) for o in opened] + failed
        if opened:
            out["input"]["tokens"] = int(opened[0].detector.last_prompt.input_ids.shape[1])
    out["prepost"] = measure_prepost(cfg.prepost_frames, _input_size(out), cfg.seed)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["ratios"] = latency_ratios(out)
    return out


def progress_bar(enabled: bool):
    """A stderr progress line when ``enabled`` and stderr is a terminal, else None."""
    from common.progress import progress_line

    return progress_line(enabled)


def _open_all(subjects, threads, scratch, stack, frame, prompt, other, warmup):
    """Open and warm up each subject; (opened, failure records)."""
    opened, failed = [], []
    for s in subjects:
        before = rss_mb()
        try:
            o = open_subject(s, threads, scratch)
            stack.callback(o.detector.close)
            runner = SampleRunner(o.detector, frame, prompt, other)
            for _ in range(max(1, warmup)):
                runner()
        except (engines.EngineError, pkg.PackageError, ValueError, OSError, ImportError) as e:
            failed.append({"package": s.package, "backend": s.backend, "role": s.role, "status": "failed",
                           "reason": one_line(e)})
            continue
        o.rss_added = rss_mb() - before
        opened.append(o)
    label_subjects(opened)
    return opened, failed


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _subject_result(o: Opened, samples: Mapping[str, list[float]]) -> dict[str, Any]:
    stages = {k: summarize(samples[k]) for k in STAGES if samples.get(k)}
    net, total = stages["network"]["median"], stages["total"]["median"]
    return {**o.describe(), "status": "ok", "stages": stages,
            "network_fps": round(1000.0 / net, 2) if net else None,
            "e2e_fps": round(1000.0 / total, 2) if total else None,
            "e2e_over_network": ratio(net, total, 3),
            "uncached_over_cached": ratio(stages["total_uncached"]["median"], total, 3),
            "rss_added_mb": round(o.rss_added, 1),
            "samples": {k: [round(v, 3) for v in samples[k]] for k in KEEP_SAMPLES}}


def _input_size(result: Mapping[str, Any]) -> int:
    """The network input size S of the first package measured (256 when none)."""
    for s in result["subjects"]:
        if s.get("status") == "ok" and s["backend"] != TORCH:
            try:
                return int(pkg.read_manifest(s["package"])["input"]["size"][0])
            except (pkg.PackageError, KeyError, ValueError, TypeError):
                pass
    return 256


def measure_prepost(frames: int, size: int, seed: int = 0) -> dict[str, Any]:
    """``benchmarks.prepost`` paths, interleaved: per path stats (ms) and the ratios to native."""
    if frames < 1:
        return {"status": "skipped", "reason": "prepost frames 0"}
    from benchmarks import prepost
    from runtime.preprocess import load_native

    if load_native() is None:
        return {"status": "not measured", "reason": "runtime._native is not built (make native)"}
    try:
        import cv2
    except ImportError:
        cv2 = None
    times, counts, _ = prepost.measure(frames, size, seed, cv2)
    paths = {name: summarize(t) for name, t in times.items()}
    out = {"status": "ok", "frames": frames, "size": size, "paths": paths, "detections": counts,
           "numpy_over_native": ratio(paths["numpy"]["median"], paths["native"]["median"])}
    if "opencv" in paths:
        out["opencv_over_native"] = ratio(paths["opencv"]["median"], paths["native"]["median"])
    else:
        out["opencv"] = "not measured: OpenCV (cv2) is not installed"
    return out


def measure_video(package: str, backend: str, threads: int | None, frames: int, rounds: int) -> dict[str, Any]:
    """End-to-end FPS on a generated 640x480 video (decode + letterbox in the reader thread,
    overlapping the network, as ``runtime.detect`` does) vs network-only FPS, interleaved in rounds:
    ``benchmarks.e2e_fps``. Medians over the rounds. Never raises for a bad package/backend/codec."""
    from benchmarks import e2e_fps
    from runtime.predictor import Detector
    from runtime.sources import open_source

    try:
        with tempfile.TemporaryDirectory(prefix="fiber-video-") as tmp, \
                Detector(package, backend, threads=threads) as det:
            video = e2e_fps.write_video(Path(tmp) / "e2e.avi", frames)
            with open_source(str(video)) as source:
                first = next(iter(source)).image
            e2e_fps.end_to_end_fps(det, video)  # warm-up
            net, e2e = [], []
            for _ in range(rounds):
                net.append(e2e_fps.network_only_fps(det, first, frames))
                e2e.append(e2e_fps.end_to_end_fps(det, video)[0])
            name, used = det.name, det.backend
    except (engines.EngineError, pkg.PackageError, ValueError, OSError, RuntimeError, ImportError, StopIteration) as e:
        return {"status": "not measured", "reason": one_line(e)}
    net_fps, e2e_fps_ = float(np.median(net)), float(np.median(e2e))
    return {"status": "ok", "package": package, "name": name, "backend": used, "frames": frames, "rounds": rounds,
            "prompt": e2e_fps.PROMPT, "network_fps": round(net_fps, 2), "e2e_fps": round(e2e_fps_, 2),
            "e2e_over_network": round(e2e_fps_ / net_fps, 3)}


def latency_ratios(result: Mapping[str, Any]) -> dict[str, Any]:
    """The ratios of one run: INT8 vs FP32 network (same model, same backend; and the fastest INT8
    CPU path vs FP32 on ONNX Runtime), each subject's end-to-end/network FPS and uncached/cached."""
    ok = [s for s in result["subjects"] if s.get("status") == "ok"]
    out: dict[str, Any] = {"int8_vs_fp32": []}
    for q in (s for s in ok if s["precision"] == "int8"):
        for f in (s for s in ok if s["precision"] == "fp32" and s["model"] == q["model"] and s["backend"] != TORCH):
            if f["backend"] in (q["backend"], "onnxruntime"):
                out["int8_vs_fp32"].append({
                    "int8": q["label"], "fp32": f["label"],
                    "fp32_over_int8_network": ratio(f["stages"]["network"]["median"], q["stages"]["network"]["median"]),
                    "fp32_over_int8_total": ratio(f["stages"]["total"]["median"], q["stages"]["total"]["median"])})
    return out


# ----------------------------------------------------------------------------- printing

def format_table(result: Mapping[str, Any]) -> str:
    lines = [f"input: {result['input']['source']}, prompt {result['input']['prompt']!r}",
             f"{'subject':36s} {'stage':14s} {'median':>9s} {'p90':>9s} {'p99':>9s}  ms"]
    for s in result["subjects"]:
        if s.get("status") != "ok":
            lines.append(f"{s['package']} @ {s['backend']}: {s['status']}: {s['reason']}")
            continue
        for stage, st in s["stages"].items():
            lines.append(f"{s['label'][:36]:36s} {stage:14s} {st['median']:9.3f} {st['p90']:9.3f} {st['p99']:9.3f}")
        lines.append(f"{'':36s} network {s['network_fps']} FPS, end-to-end {s['e2e_fps']} FPS "
                     f"(x{s['e2e_over_network']}), uncached/cached prompt x{s['uncached_over_cached']}, "
                     f"+{s['rss_added_mb']} MB RSS")
    for b, why in result["unavailable"].items():
        lines.append(f"{b}: not available: {why}")
    pp = result["prepost"]
    if pp.get("status") == "ok":
        cells = ", ".join(f"{k} {v['median']:.3f} ms" for k, v in pp["paths"].items())
        lines.append(f"pre+post per frame: {cells}; numpy/native x{pp['numpy_over_native']}, "
                     f"opencv/native x{pp.get('opencv_over_native')}")
    for r in result["ratios"]["int8_vs_fp32"]:
        lines.append(f"INT8 vs FP32 network: {r['fp32']} / {r['int8']} = x{r['fp32_over_int8_network']}")
    lines.append(f"peak RSS {result['peak_rss_mb']} MB")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n")[0])
    p.add_argument("--package", action="append", default=[], help="model package or engine folder (repeatable)")
    p.add_argument("--backend", default="default",
                   help="comma-separated: onnxruntime,openvino,tensorrt,tensorrt-rtx ('default': where present)")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="fine checkpoint: PyTorch eager FP32 reference (repeatable)")
    p.add_argument("--runs", type=int, default=50, help="alternation rounds")
    p.add_argument("--block", type=int, default=1, help="timed samples per subject per round")
    p.add_argument("--settle", type=int, default=1, help="untimed samples per subject per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed samples per subject first")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per engine (default: the backend's)")
    p.add_argument("--image", default=None, help="an image file instead of the generated 640x480 scene")
    p.add_argument("--prompt", default=None, help="a prompt instead of the scene's object names")
    p.add_argument("--prepost-frames", type=int, default=200, help="frames for C vs numpy vs OpenCV (0: skip)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on stderr")
    p.add_argument("--json", default=None, help="write the results here (atomically)")
    return p


def config_from_args(args: argparse.Namespace) -> LatencyConfig:
    """LatencyConfig from the CLI; ValueError naming a bad argument."""
    if not args.package and not args.checkpoint:
        raise ValueError("give at least one --package (or a --checkpoint)")
    if args.runs < 1 or args.block < 1 or args.settle < 0 or args.warmup < 0:
        raise ValueError("need --runs >= 1, --block >= 1, --settle >= 0, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if args.image and not Path(args.image).is_file():
        raise ValueError(f"--image {args.image}: no such file")
    backends, explicit = parse_backends(args.backend)
    return LatencyConfig(tuple(args.package), backends, explicit, tuple(args.checkpoint), (), args.runs, args.block,
                         args.settle, args.warmup, args.threads, args.image, args.prompt,
                         args.prepost_frames, progress=args.progress)


def main(args: argparse.Namespace) -> int:
    """Exit 0: everything measured; 1: some subject failed (see its reason); 2: bad arguments."""
    from common.atomic import atomic_write_json

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"benchmarks.latency: {e}", file=sys.stderr)
        return 2
    result = run_latency(cfg)
    print(format_table(result))
    if args.json:
        atomic_write_json(args.json, result)
    failed = [s for s in result["subjects"] if s.get("status") != "ok"]
    for s in failed:
        print(f"benchmarks.latency: {s['package']} on {s['backend']}: {s['reason']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
