"""FP32 vs INT8 detector latency on this CPU, side by side in one run.

    python -m benchmarks.int8_speed --package-fp32 P1 --package-int8 P2 [--backend onnxruntime]
        [--threads 2] [--tokens 16] [--rounds 30] [--block 5] [--matrix] [--json OUT]

Both packages are opened with ``engines.load`` (exactly what the runtime runs: on the ONNX Runtime
CPU provider an INT8 package's ``detector.cpu.onnx`` when its manifest names one). The detector of
each is timed on the same inputs (batch 1, ``--tokens`` text tokens, 3 of them padding), after
warm-up, in alternating blocks (A x block, B x block, A ...; the first run of every block is
dropped, so one engine's idle-spinning threads never overlap the other's timed runs). Prints the
median and p10/p90 milliseconds of each and the FP32/INT8 ratio of the medians.

``--matrix`` times every CPU path of the two packages instead (FP32 and INT8 Q/DQ on ONNX Runtime
and OpenVINO, the INT8 CPU file, OpenVINO with the bf16 hint) and prints each one's ratio to FP32
on ONNX Runtime and to FP32 on the same backend. A benchmark, not a test: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import engines
from common import package as pkg


@dataclass(frozen=True)
class Candidate:
    label: str
    package: str
    backend: str                      # "onnxruntime" | "openvino"
    options: tuple[tuple[str, Any], ...] = ()
    baseline: str | None = None       # label of the FP32 candidate on the same backend


def candidates(fp32: str, int8: str, backend: str, matrix: bool, threads: int) -> list[Candidate]:
    """What to time: the two packages on ``backend``, or (``matrix``) every CPU path."""
    ort = (("intra_op_threads", threads), ("inter_op_threads", 1), ("cache_dir", ""))
    ov = (("threads", threads), ("cache_dir", ""))
    if not matrix:
        opts = ov if backend == "openvino" else ort
        return [Candidate(f"fp32 {backend}", fp32, backend, opts),
                Candidate(f"int8 {backend}", int8, backend, opts, baseline=f"fp32 {backend}")]
    return [
        Candidate("fp32 onnxruntime", fp32, "onnxruntime", ort),
        Candidate("fp32 openvino f32", fp32, "openvino", ov + (("precision_hint", "f32"),)),
        Candidate("fp32 openvino bf16-hint", fp32, "openvino", ov + (("precision_hint", "bf16"),)),
        Candidate("int8 onnxruntime Q/DQ", int8, "onnxruntime", ort + (("use_cpu_file", False),),
                  baseline="fp32 onnxruntime"),
        Candidate("int8 onnxruntime cpu_file", int8, "onnxruntime", ort + (("use_cpu_file", True),),
                  baseline="fp32 onnxruntime"),
        Candidate("int8 openvino Q/DQ f32", int8, "openvino", ov + (("precision_hint", "f32"),),
                  baseline="fp32 openvino f32"),
        Candidate("int8 openvino Q/DQ bf16-hint", int8, "openvino", ov + (("precision_hint", "bf16"),),
                  baseline="fp32 openvino bf16-hint"),
    ]


def detector_inputs(e: engines.PackageEngines, tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    """image [1,3,S,S] (seeded noise), text_hidden from the package's own text graph, mask [1,T]."""
    rng = np.random.default_rng(seed)
    s = int(e.manifest["input"]["size"][0])
    mask = np.ones((1, tokens), np.int64)
    mask[:, tokens - 3:] = 0
    ids = rng.integers(1000, 20000, size=(1, tokens)).astype(np.int64) * mask
    hidden = e.encode_text(ids, mask)
    image = rng.standard_normal((1, 3, s, s)).astype(np.float32)
    return {pkg.IMAGE: image, pkg.TEXT_HIDDEN: hidden, pkg.ATTENTION_MASK: mask}


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
        if c.baseline:
            row["speedup_vs_same_backend_fp32"] = round(med[c.baseline] / med[c.label], 3)
        rows.append(row)
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_speed", description=__doc__.split("\n")[0])
    p.add_argument("--package-fp32", required=True, help="FP32 model package")
    p.add_argument("--package-int8", required=True, help="INT8 model package")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "openvino"))
    p.add_argument("--matrix", action=argparse.BooleanOptionalAction, default=False,
                   help="time every CPU path of the two packages")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per engine")
    p.add_argument("--tokens", type=int, default=16, help="text tokens T (3 of them padding)")
    p.add_argument("--rounds", type=int, default=30, help="alternation rounds")
    p.add_argument("--block", type=int, default=5, help="runs per engine per round (the first is dropped)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def main(args: argparse.Namespace) -> int:
    if args.block < 2 or args.rounds < 1 or args.tokens < 4 or args.threads < 1:
        print("error: --block must be >= 2, --rounds >= 1, --tokens >= 4, --threads >= 1", file=sys.stderr)
        return 2
    cands = candidates(args.package_fp32, args.package_int8, args.backend, args.matrix, args.threads)
    opened: list[engines.PackageEngines] = []
    try:
        runners = {}
        for c in cands:
            e = engines.load(c.package, c.backend, **dict(c.options))
            opened.append(e)
            x = detector_inputs(e, args.tokens)
            runners[c.label] = (lambda e=e, x=x: e.detector.run(x))
            print(f"{c.label:32s} {Path(c.package).name}/{e.detector.path.name}", flush=True)
        times = time_side_by_side(runners, args.rounds, args.block, args.warmup)
    except (engines.EngineError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for e in opened:
            e.close()
    rows = summarize(cands, times)
    print(f"\ndetector, batch 1, T={args.tokens}, {args.threads} threads, median of {rows[0]['runs']} runs each:")
    for r in rows:
        same = f"  x{r['speedup_vs_same_backend_fp32']:.2f} vs FP32 same backend" if "speedup_vs_same_backend_fp32" in r else ""
        print(f"  {r['label']:32s} {r['median_ms']:8.2f} ms (p10 {r['p10_ms']:.2f}, p90 {r['p90_ms']:.2f})"
              f"  x{r[f'speedup_vs_{cands[0].label}']:.2f} vs {cands[0].label}{same}")
    if not args.matrix:
        print(f"INT8/FP32 detector speed-up: {rows[1]['speedup_vs_same_backend_fp32']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
