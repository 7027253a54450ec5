"""The fastest way to run a package on this CPU: measured once per machine, then remembered.

Which CPU path wins depends on the processor more than on the model. On a Zen 4 with AVX-512
BF16, OpenVINO's bf16 mode halves the FP32 detector's time and its int8 kernels gain little on
top; on an AVX2-only EPYC (no VNNI, no BF16) OpenVINO's int8 kernels are slower than its f32 ones
and ONNX Runtime's integer graph (``detector.cpu.onnx``) is the fastest (docs/results.md). A
rule written on one machine is wrong on the other, so ``fastest_cpu_path`` times every path this
install can run for the package, in alternating rounds on the same inputs, keeps the fastest open
and remembers the choice in ``~/.cache/fiber-edge/cpu-paths.json`` under a key made of the
detector file's sha256, the processor, the thread count and the backend versions. A later load
with the same key opens the remembered path at once.

The steady-state winner is not always the quickest for a short run: OpenVINO compiles the
detector on its first inference (0.4-1.4 s for the fiber-nano INT8 detector even from its
compiled-model cache, quiet or beside other work), where ONNX Runtime has paid its set-up when the
session opened. So the timing also records each path's time to open and to run the first
inference, and a caller that knows how many images it will run (``runs``: runtime.detect on a
list of images) gets the path with the least expected total, ``open + first + (runs - 1) *
steady``; a stream (camera, video: ``runs`` None) gets the steady-state winner. An entry written
before start times were recorded is measured again. The first inference is timed in the tuning
process, whose OpenVINO compile fills the cache, so it overstates OpenVINO's later starts: the
choice leans to ONNX Runtime for runs of tens of images, which a compile would not have paid for
anyway. A run of fewer than ``TIMED_RUNS`` images that finds nothing remembered is not timed at
all: it runs on ONNX Runtime, which starts quickest, and leaves the timing to a longer run.

Every path runs the package's own graphs: ONNX Runtime runs ``detector.onnx`` (Q/DQ for INT8) or
the integer ``detector.cpu.onnx`` that compress.export checked against it; OpenVINO compiles
``detector.onnx`` at f32 precision, or at bf16 only where the processor has native bf16 (where
bf16 is also OpenVINO's own default). An INT8 package on an x86 CPU without VNNI is not offered to
OpenVINO: its int8 kernels saturate there (``engines.openvino_int8_saturates``).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from common import package as pkg
from common.atomic import atomic_write_bytes
from common.cpu import cpu_flags, cpu_model, read_cpuinfo
from engines.options import default_cache_dir

CACHE_NAME = "cpu-paths.json"
# A run of fewer images, with no timings remembered, is not worth timing every path for: timing
# opens each path and runs it for ~2 s (fiber-nano; minutes for a FIBER-B package on OpenVINO),
# while ONNX Runtime, which starts quickest, loses at most ~25 ms per image to the fastest path
# (fiber-nano INT8 on a Zen 4 and a Sapphire Rapids: 340 ms to start and 38-40 ms per image, against
# 500 ms and 11-15 ms on OpenVINO bf16).
TIMED_RUNS = 20
# The "auto" options a timed choice honours; any other option pins a path, and "auto" then follows
# the manifest's rule (engines.auto_cpu_backend).
TUNABLE_OPTIONS = frozenset({"threads", "intra_op_threads", "verify", "cache_dir"})


@dataclass(frozen=True)
class CpuPath:
    """One way to run a package on the CPU: a backend and the options that select the path."""

    label: str                                   # e.g. "onnxruntime cpu_file", "openvino f32"
    backend: str                                 # "onnxruntime" | "openvino"
    options: tuple[tuple[str, Any], ...] = ()

    def load_options(self, threads: int | None) -> dict[str, Any]:
        opts = dict(self.options)
        if threads:
            opts["threads" if self.backend == "openvino" else "intra_op_threads"] = threads
        return opts


@dataclass(frozen=True)
class PathChoice:
    """What ``fastest_cpu_path`` chose and why: the median ms of every path, and where from."""

    label: str
    ms: dict[str, float]                          # path label -> median detector ms
    remembered: bool                              # True: read from the cache, not measured now
    cache: str | None                             # the cache file (None: not written)
    start_ms: dict[str, float] = field(default_factory=dict)  # path label -> open + first inference ms
    runs: int | None = None                       # the run length chosen for (None: a stream)
    note: str = ""                                # why nothing was timed, when that is the case
    measured: str = ""                            # when the remembered timings were taken (ISO time)

    def summary(self, full: bool = False) -> str:
        """Why this path: its time and the runner-up's (``full``: every path's, in ms). Remembered
        timings give the runner-up's time as a multiple of this path's instead of milliseconds."""
        if not self.ms:
            return self.note
        how = "measured now"
        if self.remembered:   # timings of another run, on this machine at another moment: say when
            how = f"remembered from {self.measured[:16].replace('T', ' ')}" if self.measured else "remembered"
        counted = self.runs is not None and all(label in self.start_ms for label in self.ms)
        if full:
            ranked = sorted(self.ms.items(), key=lambda kv: kv[1])
            times = ", ".join(f"{label} {ms:.1f} ms" for label, ms in ranked)
            if not counted:
                return f"fastest of {len(self.ms)} CPU paths here ({times}; {how})"
            starts = ", ".join(f"{label} {self.start_ms[label]:.0f} ms" for label, _ in ranked)
            return (f"quickest of {len(self.ms)} CPU paths here for {self._images()} (per image {times}; "
                    f"open + first image {starts}; {how})")
        if counted:
            cost = lambda label: run_ms(self.ms, self.start_ms, self.runs, label)  # noqa: E731
            what = lambda label: f"{self.start_ms[label]:.0f} ms to start, {self.ms[label]:.1f} ms/image"  # noqa: E731
            head = f"quickest of {len(self.ms)} CPU paths here for {self._images()}"
            per = f"the time for {self._images()}"
        else:
            cost = self.ms.get
            what = lambda label: f"{self.ms[label]:.1f} ms/image"  # noqa: E731
            head = f"fastest of {len(self.ms)} CPU paths here"
            per = "the time per image"
        others = sorted((label for label in self.ms if label != self.label), key=cost)
        if self.remembered:
            # Timings of another moment: the machine's load then scales every path alike (they ran
            # in alternating rounds), so the ratio holds while the milliseconds would read as this
            # run's. The run's own stage table gives its times.
            parts = ([f"next {others[0]}: {cost(others[0]) / cost(self.label):.2f}x {per}"]
                     if others and cost(self.label) > 0 else [])
        else:
            parts = [what(self.label)] + ([f"next {others[0]}: {what(others[0])}"] if others else [])
        return f"{head} ({'; '.join(parts + [how])})"

    def _images(self) -> str:
        return f"{self.runs} image" + ("s" if self.runs != 1 else "")


def quickest(ms: Mapping[str, float], start_ms: Mapping[str, float], runs: int | None) -> str:
    """The path label with the least expected time: the steady-state fastest for a stream (``runs``
    None) or when a path's start is unknown, else the least ``start + (runs - 1) * ms``."""
    if runs is None or any(label not in start_ms for label in ms):
        return min(ms, key=ms.get)
    return min(ms, key=lambda label: run_ms(ms, start_ms, runs, label))


def run_ms(ms: Mapping[str, float], start_ms: Mapping[str, float], runs: int, label: str) -> float:
    """The expected time of ``runs`` images on path ``label``: open + first + (runs - 1) * steady."""
    return start_ms[label] + (max(runs, 1) - 1) * ms[label]


@functools.lru_cache(maxsize=1)
def openvino_has_bf16() -> bool:
    """True when OpenVINO's CPU plugin reports native bf16 (AVX-512 BF16 or AMX); asked once per
    process (it starts an OpenVINO Core)."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # not installed, or a build without the property: no bf16 path
        return False


def cpu_paths(manifest: Mapping[str, Any]) -> list[CpuPath]:
    """Every CPU path this install can run for a package with ``manifest``."""
    detector = manifest.get("graphs", {}).get("detector", {}) or {}
    paths = [CpuPath("onnxruntime", "onnxruntime", (("use_cpu_file", False),))]
    if detector.get("cpu_file"):
        paths.append(CpuPath("onnxruntime cpu_file", "onnxruntime", (("use_cpu_file", True),)))
    from engines import openvino_int8_saturates

    if importlib.util.find_spec("openvino") is not None and not openvino_int8_saturates(manifest):
        paths.append(CpuPath("openvino f32", "openvino", (("precision_hint", "f32"),)))
        if openvino_has_bf16():
            paths.append(CpuPath("openvino bf16", "openvino", (("precision_hint", "bf16"),)))
    return paths


def _processor() -> str:
    """The CPU model and its instruction-set flags, as one string."""
    cpuinfo = read_cpuinfo()
    if cpuinfo is None:
        return f"{platform.processor()}|{platform.machine()}"
    return f"{cpu_model(cpuinfo)}|{' '.join(sorted(cpu_flags(cpuinfo)))}"


def _versions() -> str:
    found = []
    for name in ("onnxruntime", "openvino"):
        mod = sys.modules.get(name)
        if mod is None and importlib.util.find_spec(name) is not None:
            mod = importlib.import_module(name)
        found.append(f"{name}={getattr(mod, '__version__', 'absent') if mod else 'absent'}")
    return ",".join(found)


def cache_key(manifest: Mapping[str, Any], paths: list[CpuPath], threads: int | None) -> str:
    """Detector file(s), processor, threads, backend versions and the candidate set, hashed."""
    detector = manifest.get("graphs", {}).get("detector", {}) or {}
    files = manifest.get("files", {})
    shas = [files.get(detector.get(k) or "", {}).get("sha256", "") for k in ("file", "cpu_file")]
    parts = [*shas, _processor(), f"threads={threads or 0}", f"cores={os.cpu_count()}", _versions(),
             ";".join(p.label for p in paths)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; an unreadable or malformed file counts as empty (it is rewritten)."""
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remember(path: Path, key: str, entry: dict[str, Any]) -> str | None:
    """Add ``entry`` under ``key`` (atomic rewrite); the file written, or None when it cannot be."""
    data = read_cache(path)
    data[key] = entry
    try:
        atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
        return str(path)
    except OSError as e:
        print(f"fiber-edge: cannot remember the CPU path choice in {path}: {e}", file=sys.stderr)
        return None


def detector_inputs(engines, tokens: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Representative detector inputs for ``engines`` (a PackageEngines): seeded noise on the
    package's canvas, ``text_hidden`` from its own text graph for ``tokens`` ids (3 of them padding;
    small ids, which every tokenizer has: the official golden package's vocabulary holds 1000)."""
    rng = np.random.default_rng(seed)
    h, w = pkg.InputSpec.from_manifest(engines.manifest).size
    mask = np.ones((1, tokens), np.int64)
    mask[:, tokens - 3:] = 0
    ids = rng.integers(5, 100, size=(1, tokens)).astype(np.int64) * mask  # within any real vocabulary
    hidden = engines.encode_text(ids, mask)
    image = rng.standard_normal((1, 3, h, w)).astype(np.float32)
    return {pkg.IMAGE: image, pkg.TEXT_HIDDEN: hidden, pkg.ATTENTION_MASK: mask}


def time_paths(runners: Mapping[str, Callable[[], Any]], budget_s: float = 2.0, min_rounds: int = 5,
               max_rounds: int = 40, clock: Callable[[], float] = time.perf_counter,
               first_ms: dict[str, float] | None = None) -> dict[str, float]:
    """Median ms of each runner, in alternating rounds (two untimed runs each first) until at least
    ``min_rounds`` rounds and ``budget_s`` seconds, or ``max_rounds``, are done. ``first_ms``, when
    given, receives the ms of each runner's first run (an OpenVINO path compiles in it)."""
    for label, run in runners.items():
        t0 = clock()
        run()
        if first_ms is not None:
            first_ms[label] = (clock() - t0) * 1e3
        run()
    times: dict[str, list[float]] = {label: [] for label in runners}
    start = clock()
    for done in range(1, max_rounds + 1):
        for label, run in runners.items():
            t0 = clock()
            run()
            times[label].append((clock() - t0) * 1e3)
        if done >= min_rounds and clock() - start >= budget_s:
            break
    return {label: float(np.median(v)) for label, v in times.items()}


def fastest_cpu_path(package: Path, manifest: Mapping[str, Any], opts: Mapping[str, Any],
                     open_path: Callable[[CpuPath, dict[str, Any]], Any], *,
                     cache_dir: Path | None = None, budget_s: float = 2.0, runs: int | None = None):
    """The package opened on its fastest CPU path (a PackageEngines with ``path_choice`` set).

    ``opts``: the caller's "auto" options (threads or intra_op_threads; the package is already
    verified);
    ``open_path(path, options)`` opens the package on one path. With a single candidate nothing is
    timed. The timings are remembered under ``cache_dir`` (default ~/.cache/fiber-edge). ``runs``:
    how many images the caller will run (None: a stream), see ``quickest``.
    """
    threads = opts.get("threads") or opts.get("intra_op_threads") or None
    base: dict[str, Any] = {"verify": False}  # the caller's read_package checked every file's sha256
    if "cache_dir" in opts:
        base["cache_dir"] = opts["cache_dir"]
    paths = cpu_paths(manifest)
    by_label = {p.label: p for p in paths}
    cache = Path(cache_dir or default_cache_dir()) / CACHE_NAME
    key = cache_key(manifest, paths, threads)
    hit = read_cache(cache).get(key)
    if (isinstance(hit, dict) and isinstance(hit.get("ms"), dict) and set(hit["ms"]) == set(by_label)
            and isinstance(hit.get("start_ms"), dict) and set(hit["start_ms"]) == set(by_label)):
        ms = {k: float(v) for k, v in hit["ms"].items()}
        start = {k: float(v) for k, v in hit["start_ms"].items()}
        label = quickest(ms, start, runs)
        engines = open_path(by_label[label], {**base, **by_label[label].load_options(threads)})
        engines.path_choice = PathChoice(label, ms, True, str(cache), start, runs,
                                         measured=str(hit.get("measured") or ""))
        return engines
    if len(paths) == 1:
        engines = open_path(paths[0], {**base, **paths[0].load_options(threads)})
        engines.path_choice = PathChoice(paths[0].label, {}, False, None)
        return engines
    if runs is not None and runs < TIMED_RUNS:
        chosen = [p for p in paths if p.backend == "onnxruntime"][-1]   # the integer graph when there is one
        engines = open_path(chosen, {**base, **chosen.load_options(threads)})
        note = (f"not timed for {runs} image{'s' if runs != 1 else ''}: ONNX Runtime starts quickest; a "
                f"camera, a video or {TIMED_RUNS}+ images time the {len(paths)} CPU paths once")
        engines.path_choice = PathChoice(chosen.label, {}, False, None, runs=runs, note=note)
        return engines
    opened: dict[str, Any] = {}
    start: dict[str, float] = {}
    try:
        for p in paths:
            t0 = time.perf_counter()
            opened[p.label] = open_path(p, {**base, **p.load_options(threads)})
            start[p.label] = (time.perf_counter() - t0) * 1e3
        feeds = detector_inputs(next(iter(opened.values())))
        runners = {label: (lambda e=e: e.detector.run(feeds)) for label, e in opened.items()}
        first: dict[str, float] = {}
        ms = time_paths(runners, budget_s=budget_s, first_ms=first)
        start = {label: start[label] + first[label] for label in ms}
    except BaseException:
        for e in opened.values():
            e.close()
        raise
    best = quickest(ms, start, runs)
    for label, e in opened.items():
        if label != best:
            e.close()
    where = remember(cache, key, {"path": min(ms, key=ms.get), "ms": ms, "start_ms": start,
                                  "package": str(package), "threads": threads,
                                  "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
    engines = opened[best]
    engines.path_choice = PathChoice(best, ms, False, where, start, runs)
    return engines
