"""FP32 vs INT8 detector latency on this CPU, side by side in one run.

    python -m benchmarks.int8_speed --package-fp32 P1 --package-int8 P2 [--backend auto]
        [--threads 2] [--tokens 16] [--rounds 30] [--block 5] [--repeats 1] [--spin] [--matrix]
        [--json OUT]

Both packages are opened with ``engines.load`` (exactly what the runtime runs: "auto" is each
package's default CPU path, i.e. the manifest's graphs.detector.cpu_backend - OpenVINO for an
INT8 package exported by compress.export, ONNX Runtime for FP32; on the ONNX Runtime CPU provider
an INT8 package's ``detector.cpu.onnx`` when its manifest names one). The detector of each is
timed on the same inputs (batch 1, ``--tokens`` text tokens, 3 of them padding), after warm-up, in
alternating blocks (A x block, B x block, A ...; the first run of every block is dropped, so one
engine's idle threads never overlap the other's timed runs). Prints the median and p10/p90
milliseconds of each and the ratio of the medians to the first candidate (FP32 on ONNX Runtime in
``--matrix``) and to FP32 on the same backend with the same settings. ``--repeats N`` runs the whole
alternation N times and prints every repeat's ratios (the spread on a shared machine).

ONNX Runtime runs with ``allow_spinning`` off unless ``--spin``: on a small CPU shared with other
work, spinning threads slow every engine down and make the numbers noisy (both sides get the same
setting). ``--matrix`` times every CPU path of the two packages instead, plus what runtime.detect
runs by default (each package on the fastest of its paths, engines.autotune, remembered per machine),
and ends with the ratio of the INT8 package's default path to the fastest FP32 path (``run_matrix``:
the same measurement for benchmarks.report). A path that forces OpenVINO's static shapes on a package
whose manifest did not validate them is first checked in a child process (compress.openvino_check;
OpenVINO 2026.4 segfaults compiling some graphs that way) and left out, with the reason, when it fails.
A benchmark, not a test: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import engines
from common import package as pkg
from compress.openvino_check import check_openvino
from engines.autotune import detector_inputs

BACKENDS = ("auto", "onnxruntime", "openvino")


FP32_DEFAULT = "fp32 runtime default (fastest)"
INT8_DEFAULT = "int8 runtime default (fastest)"
TARGET = 1.3    # issue 14: the INT8 package's default path vs the fastest way to run the FP32 package


@dataclass(frozen=True)
class Candidate:
    label: str
    package: str
    backend: str                      # "auto" | "onnxruntime" | "openvino"
    options: tuple[tuple[str, Any], ...] = ()
    baseline: str | None = None       # label of the FP32 candidate on the same backend and settings


def candidates(fp32: str, int8: str, backend: str, matrix: bool, threads: int, spin: bool = False
               ) -> list[Candidate]:
    """What to time: the two packages on ``backend``, or (``matrix``) every CPU path."""
    ort = (("intra_op_threads", threads), ("inter_op_threads", 1), ("allow_spinning", spin), ("cache_dir", ""))
    ov = (("threads", threads), ("cache_dir", ""))
    if not matrix:
        auto = (("intra_op_threads", threads), ("cache_dir", ""))
        opts = {"openvino": ov, "onnxruntime": ort, "auto": auto}[backend]
        same = None if backend == "auto" else f"fp32 {backend}"     # "auto" may pick two backends
        return [Candidate(f"fp32 {backend}", fp32, backend, opts),
                Candidate(f"int8 {backend}", int8, backend, opts, baseline=same)]
    f32, bf16 = ov + (("precision_hint", "f32"),), ov + (("precision_hint", "bf16"),)
    static, dyn = (("static_shapes", True),), (("static_shapes", False),)
    return [
        Candidate("fp32 onnxruntime", fp32, "onnxruntime", ort),
        Candidate("fp32 openvino f32 static", fp32, "openvino", f32 + static),
        Candidate("fp32 openvino f32 dynamic", fp32, "openvino", f32 + dyn),
        Candidate("fp32 openvino bf16-hint static", fp32, "openvino", bf16 + static),
        Candidate("int8 onnxruntime Q/DQ", int8, "onnxruntime", ort + (("use_cpu_file", False),),
                  baseline="fp32 onnxruntime"),
        Candidate("int8 onnxruntime cpu_file", int8, "onnxruntime", ort + (("use_cpu_file", True),),
                  baseline="fp32 onnxruntime"),
        # static shapes only where the package's manifest says OpenVINO was checked with them
        Candidate("int8 openvino Q/DQ f32", int8, "openvino", f32, baseline="fp32 openvino f32 static"),
        Candidate("int8 openvino Q/DQ f32 dynamic", int8, "openvino", f32 + dyn,
                  baseline="fp32 openvino f32 dynamic"),
        Candidate("int8 openvino Q/DQ bf16-hint", int8, "openvino", bf16,
                  baseline="fp32 openvino bf16-hint static"),
        # what runtime.detect runs by default: the fastest of the package's paths (engines.autotune)
        Candidate(FP32_DEFAULT, fp32, "auto", (("fastest", True), ("threads", threads))),
        Candidate(INT8_DEFAULT, int8, "auto", (("fastest", True), ("threads", threads))),
    ]


def time_side_by_side(runners: dict[str, Any], rounds: int, block: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per run of each ``runners[label]()``, in alternating blocks (first of each dropped)."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(rounds):
        for label, run in runners.items():
            run()                                   # dropped: absorbs the previous engine's spin
            for _ in range(block - 1):
                t0 = time.perf_counter()
                run()
                times[label].append((time.perf_counter() - t0) * 1e3)
    return times


def summarize(cands: list[Candidate], times: dict[str, list[float]]) -> list[dict[str, Any]]:
    med = {label: float(np.median(v)) for label, v in times.items()}
    first = cands[0].label
    rows = []
    for c in cands:
        v = np.asarray(times[c.label])
        row = {"label": c.label, "median_ms": round(med[c.label], 3), "p10_ms": round(float(np.percentile(v, 10)), 3),
               "p90_ms": round(float(np.percentile(v, 90)), 3), "runs": int(v.size),
               f"speedup_vs_{first}": round(med[first] / med[c.label], 3)}
        if c.baseline in med:             # absent when that path was left out (``checked_static``)
            row["speedup_vs_same_backend_fp32"] = round(med[c.baseline] / med[c.label], 3)
        rows.append(row)
    return rows


def spread(repeats: list[list[dict[str, Any]]], key: str) -> dict[str, list[float]]:
    """Per label, the ratio ``key`` of every repeat (labels without it are left out)."""
    out: dict[str, list[float]] = {}
    for rows in repeats:
        for r in rows:
            if key in r:
                out.setdefault(r["label"], []).append(r[key])
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_speed", description=__doc__.split("\n")[0])
    p.add_argument("--package-fp32", required=True, help="FP32 model package")
    p.add_argument("--package-int8", required=True, help="INT8 model package")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                   help="both packages on this backend ('auto': each package's default CPU path)")
    p.add_argument("--matrix", action=argparse.BooleanOptionalAction, default=False,
                   help="time every CPU path of the two packages")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per engine")
    p.add_argument("--spin", action=argparse.BooleanOptionalAction, default=False,
                   help="let ONNX Runtime's idle threads spin (its default; noisy on a shared CPU)")
    p.add_argument("--tokens", type=int, default=16, help="text tokens T (3 of them padding)")
    p.add_argument("--rounds", type=int, default=30, help="alternation rounds")
    p.add_argument("--block", type=int, default=5, help="runs per engine per round (the first is dropped)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per path before timing")
    p.add_argument("--repeats", type=int, default=1, help="run the whole alternation this many times")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def _static_ok(package: str) -> tuple[bool, str]:
    """Can OpenVINO run ``package``'s detector with static shapes here? The manifest's word when
    compress.export checked it, else a check against the package's reference outputs in a child."""
    manifest = pkg.read_manifest(package)
    detector = manifest["graphs"]["detector"]
    if (detector.get("openvino") or {}).get("static_shapes"):
        return True, "validated by compress.export"
    r = check_openvino(Path(package) / detector.get("file", pkg.DETECTOR_GRAPH),
                       Path(package) / pkg.reference_file("detector"),
                       int8=manifest.get("precision") == "int8")
    return bool(r["static_shapes"]), str(r["checked"])


def checked_static(cands: list[Candidate]) -> tuple[list[Candidate], dict[str, str]]:
    """``cands`` less the OpenVINO paths forcing static shapes that fail ``_static_ok`` (one check
    per package), and {label: why} of those left out."""
    verdicts: dict[str, tuple[bool, str]] = {}
    kept, left_out = [], {}
    for c in cands:
        if c.backend == "openvino" and dict(c.options).get("static_shapes"):
            if c.package not in verdicts:
                verdicts[c.package] = _static_ok(c.package)
            ok, why = verdicts[c.package]
            if not ok:
                left_out[c.label] = f"OpenVINO static shapes fail on {Path(c.package).name}: {why}"
                continue
        kept.append(c)
    return kept, left_out


def _open(cands: list[Candidate], tokens: int, opened: dict[str, Any], failed: dict[str, str] | None = None,
          say: Callable[[str], None] | None = print) -> dict[str, Any]:
    """A runner per candidate (engines kept in ``opened``); with ``failed``, a path that does not
    open is recorded there ({label: why}) instead of raising."""
    runners = {}
    for c in cands:
        try:
            e = engines.load(c.package, c.backend, **dict(c.options))
        except (engines.EngineError, OSError) as err:
            if failed is None:
                raise
            failed[c.label] = " ".join(str(err).split())[:300]
            continue
        opened[c.label] = e
        x = detector_inputs(e, tokens)
        runners[c.label] = (lambda e=e, x=x: e.detector.run(x))
        chosen = f" ({e.path_choice.label}: {e.path_choice.summary(full=True)})" if e.path_choice else ""
        if say:
            say(f"{c.label:34s} {Path(c.package).name}/{e.detector.path.name} on {e.backend}{chosen}")
    return runners


def _print_rows(rows: list[dict[str, Any]], first: str, args: argparse.Namespace) -> None:
    print(f"\ndetector, batch 1, T={args.tokens}, {args.threads} threads, median of {rows[0]['runs']} runs each:")
    for r in rows:
        same = r.get("speedup_vs_same_backend_fp32")
        same = f"  x{same:.2f} vs FP32 same backend" if same is not None else ""
        print(f"  {r['label']:34s} {r['median_ms']:8.2f} ms (p10 {r['p10_ms']:.2f}, p90 {r['p90_ms']:.2f})"
              f"  x{r[f'speedup_vs_{first}']:.2f} vs {first}{same}")


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The INT8 package's default path against the fastest way to run the FP32 package, one run."""
    med = {r["label"]: r["median_ms"] for r in rows}
    fp32 = min((label for label in med if label.startswith("fp32")), key=med.get)
    ratio = round(med[fp32] / med[INT8_DEFAULT], 3)
    return {"fastest_fp32": fp32, "fastest_fp32_ms": med[fp32], "int8_default_ms": med[INT8_DEFAULT],
            "int8_default_vs_fastest_fp32": ratio, "target": TARGET, "met": ratio >= TARGET}


def _choice(e: engines.PackageEngines) -> dict[str, Any]:
    c = e.path_choice
    return {"package": str(e.package), "path": c.label, "remembered": c.remembered,
            "ms": {label: round(ms, 3) for label, ms in c.ms.items()}}


def run_matrix(fp32: str, int8: str, threads: int, rounds: int, block: int = 5, warmup: int = 5,
               tokens: int = 16, spin: bool = False, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``--matrix`` once, as data: every CPU path of the two packages and each package's runtime
    default, timed side by side; paths that cannot run here are left out with the reason.

    Returns {"rows": summarize's rows plus ``speedup_vs_fastest_fp32``, "verdict": ``verdict`` or
    None, "reason": why no verdict (None with one), "left_out": {label: why}, "defaults": {"fp32",
    "int8": the path the runtime chose ({"package", "path", "remembered", "ms": {path: median ms}})},
    "settings"}. Raises engines.EngineError when a path fails while being timed.
    """
    cands, left_out = checked_static(candidates(fp32, int8, "onnxruntime", True, threads, spin))
    opened: dict[str, engines.PackageEngines] = {}
    try:
        runners = _open(cands, tokens, opened, failed=left_out, say=say)
        timed = [c for c in cands if c.label in runners]
        rows = summarize(timed, time_side_by_side(runners, rounds, block, warmup)) if timed else []
        defaults = {k: _choice(opened[label]) for k, label in (("fp32", FP32_DEFAULT), ("int8", INT8_DEFAULT))
                    if label in opened and opened[label].path_choice}
    finally:
        for e in opened.values():
            e.close()
    have_fp32 = any(r["label"].startswith("fp32") for r in rows)
    reason = None
    if INT8_DEFAULT not in runners:
        reason = f"the INT8 package's default path did not open: {left_out.get(INT8_DEFAULT)}"
    elif not have_fp32:
        reason = "no FP32 path opened: " + "; ".join(f"{k}: {v}" for k, v in left_out.items() if k.startswith("fp32"))
    v = verdict(rows) if reason is None else None
    for r in rows if v else []:
        r["speedup_vs_fastest_fp32"] = round(v["fastest_fp32_ms"] / r["median_ms"], 3)
    return {"rows": rows, "verdict": v, "reason": reason, "left_out": left_out, "defaults": defaults,
            "settings": {"threads": threads, "rounds": rounds, "block": block, "warmup": warmup,
                         "tokens": tokens, "spin": spin}}


def _print_verdict(rows: list[dict[str, Any]]) -> None:
    v = verdict(rows)
    print(f"\nINT8 package's default path vs the fastest FP32 path ({v['fastest_fp32']}): "
          f"{v['int8_default_ms']:.2f} vs {v['fastest_fp32_ms']:.2f} ms = x{v['int8_default_vs_fastest_fp32']:.2f}"
          f" (target x{v['target']}: {'met' if v['met'] else 'not met'})")


def main(args: argparse.Namespace) -> int:
    if args.block < 2 or args.rounds < 1 or args.tokens < 4 or args.threads < 1 or args.repeats < 1:
        print("error: --block must be >= 2, --rounds >= 1, --tokens >= 4, --threads >= 1, --repeats >= 1",
              file=sys.stderr)
        return 2
    if args.matrix and args.backend != "onnxruntime":
        print("error: --matrix times every backend; leave --backend at its default", file=sys.stderr)
        return 2
    cands = candidates(args.package_fp32, args.package_int8, args.backend, args.matrix, args.threads, args.spin)
    if args.matrix:
        cands, left_out = checked_static(cands)
        for label, why in left_out.items():
            print(f"{label:34s} left out: {why}", flush=True)
    first = cands[0].label
    opened: dict[str, engines.PackageEngines] = {}
    repeats = []
    try:
        runners = _open(cands, args.tokens, opened, say=lambda line: print(line, flush=True))
        for k in range(args.repeats):
            rows = summarize(cands, time_side_by_side(runners, args.rounds, args.block, args.warmup))
            repeats.append(rows)
            if args.repeats > 1:
                print(f"\nrepeat {k + 1}/{args.repeats}", end="")
            _print_rows(rows, first, args)
    except (engines.EngineError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for e in opened.values():
            e.close()
    if args.repeats > 1:
        print(f"\nspread over {args.repeats} repeats (min / median / max):")
        for key, what in ((f"speedup_vs_{first}", f"vs {first}"),
                          ("speedup_vs_same_backend_fp32", "vs FP32 same backend")):
            for label, v in spread(repeats, key).items():
                print(f"  {label:34s} {what:28s} {min(v):.2f} / {float(np.median(v)):.2f} / {max(v):.2f}")
    if args.matrix:
        _print_verdict(repeats[-1])
    if not args.matrix:
        values = [rows[1][f"speedup_vs_{first}"] for rows in repeats]
        print(f"INT8/FP32 detector speed-up ({args.backend}): {float(np.median(values)):.2f}x")
    if args.json:
        record = {"args": vars(args), "results": repeats[-1], "repeats": repeats}
        if args.matrix:
            record["verdict"] = verdict(repeats[-1])
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
