"""FIBER-B INT8 at an edge canvas: quantise and export a converted FIBER-B checkpoint, record the numbers.

    python -m benchmarks.fiber_b_int8 --checkpoint runs/fiber-b/ck --out runs/fiber-b/pkg-512x672-int8 \\
        [--canvas 512x672] [--data DIR | --synth-images 32] [--calib-images 16] [--agreement-images 6] \\
        [--threads 2] [--json docs/results/fiber_b_int8.json]

Runs, one after the other and each as its own process under ``/usr/bin/time`` (wall time and peak
memory): ``fiber.data.synth`` (when no ``--data``: calibration images), ``compress.quantize --guard
agreement --canvas HxW`` (modelopt PTQ; the DyHead stays FP32 by rule) and ``compress.export --int8
QDIR --canvas HxW`` (the Q/DQ package; its agreement with FP32 on ONNX Runtime is the guard). The
record (times, peak RSS, file sizes, Q/DQ counts, agreement at quantisation and of the package's
graphs on ONNX Runtime) goes to ``--json`` and a markdown table to stdout. The checkpoint is the
random-valued FIBER-B release (``benchmarks.fiber_b make-release`` + ``convert-official``): the
agreement measures quantisation noise on random weights, not accuracy. Never commit the packages.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


OTHERS = r"compress\.(export|quantize) .*fiber-b"   # other FIBER-B-scale jobs on this machine


def wait_for_others(pattern: str = OTHERS, poll_s: float = 15.0) -> float:
    """Wait while another process runs a FIBER-B-scale export/quantisation (two at once can exhaust
    the memory: an export at 800 x 1344 peaks above 15 GB); returns the seconds waited."""
    t0 = time.perf_counter()
    while subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0:
        time.sleep(poll_s)
    return round(time.perf_counter() - t0, 1)


def timed(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` under /usr/bin/time -v (stdout+stderr to ``log``); wall seconds and peak RSS (GB)."""
    waited = wait_for_others()
    t0 = time.perf_counter()
    with log.open("w") as f:
        r = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    text = log.read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if r.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {r.returncode}); see {log}:\n{tail}")
    return {"seconds": round(time.perf_counter() - t0, 1), "waited_s": waited,
            "peak_rss_gb": round(int(rss.group(1)) / 2 ** 20, 2) if rss else None}


def _time_log(log: Path) -> dict[str, Any]:
    """Wall seconds and peak RSS from a /usr/bin/time -v log."""
    text = log.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    seconds = None
    if wall:
        h, m, sec = wall.groups()
        seconds = round(int(h or 0) * 3600 + int(m) * 60 + float(sec), 1)
    return {"seconds": seconds, "peak_rss_gb": round(int(rss.group(1)) / 2 ** 20, 2) if rss else None,
            "reused": str(log)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    work = out.with_name(out.name + "-work")
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    threads = ["--threads", str(args.threads)]
    record: dict[str, Any] = {"checkpoint": args.checkpoint, "canvas": args.canvas, "package": str(out)}
    data = args.data
    if data is None:
        data = str(work / "synth")
        if not (Path(data) / "grounding.json").is_file():
            timed([py, "-m", "fiber.data.synth", "--out", data, "--images", str(args.synth_images), "--seed", "0",
                   "--overwrite", "--no-progress"], work / "synth.log")
    record["data"] = data
    qdir = work / "qdir"
    if args.reuse_qdir and (qdir / "quant.json").is_file():
        record["quantize"] = _time_log(work / "quantize.log")          # the earlier run's numbers
    else:
        record["quantize"] = timed([py, "-m", "compress.quantize", "--checkpoint", args.checkpoint, "--data", data,
                                "--out", str(qdir), "--canvas", args.canvas, "--guard", "agreement",
                                "--calib-images", str(args.calib_images), "--min-calib-images", str(args.calib_images),
                                "--agreement-images", str(args.agreement_images), "--batch-size", "1",
                                "--min-agreement", str(args.min_agreement), "--overwrite", *threads],
                               work / "quantize.log")
    quant = json.loads((qdir / "quant.json").read_text())
    record["quantize"].update(images=quant["calibration"]["images"], quantizers=quant["quantizers"],
                              agreement=quant["agreement"]["final"], fp32_by_rule=list(quant["fp32_by_rule"]))
    if not quant["within_margin"] and not args.reuse_qdir:
        raise RuntimeError(f"INT8 keeps {quant['agreement']['final']['agreement']} of FP32's top boxes, below "
                           f"--min-agreement {args.min_agreement}; the export would refuse it (see {qdir})")
    record["export"] = timed([py, "-m", "compress.export", "--checkpoint", args.checkpoint, "--out", str(out),
                              "--int8", str(qdir), "--canvas", args.canvas, "--no-calibrate", "--overwrite",
                              *threads], work / "export.log")
    manifest = json.loads((out / "manifest.json").read_text())
    record["files_mb"] = {k: round(v["bytes"] / 1e6, 1) for k, v in manifest["files"].items() if k.endswith(".onnx")}
    det = manifest["graphs"]["detector"]
    record["qdq"] = det.get("qdq")
    record["cpu_backend"] = det.get("cpu_backend")
    record["package_agreement"] = manifest["accuracy"].get("agreement")
    return record


def markdown(r: dict[str, Any]) -> str:
    q, e, a = r["quantize"], r["export"], r["package_agreement"] or {}
    rows = ["| step | wall s | peak RSS GB | result |", "|---|---|---|---|",
            f"| compress.quantize ({q['images']} calibration images, batch 1) | {q['seconds']} | {q['peak_rss_gb']} | "
            f"agreement {q['agreement']['agreement']:.3f} (top-1 {q['agreement']['top1_agreement']:.3f}), max |logit diff| "
            f"{q['agreement']['max_abs_logit_diff']:.3g}, fake-quant PyTorch vs FP32, {q['agreement']['images']} images |",
            f"| compress.export --int8 | {e['seconds']} | {e['peak_rss_gb']} | "
            + ", ".join(f"{k} {v} MB" for k, v in r["files_mb"].items()) + f"; Q/DQ {r['qdq']} |"]
    for key, v in a.items():
        if isinstance(v, dict):
            rows.append(f"| agreement {key} ({v['other']}) | | | {v['agreement']:.3f} of FP32's top-{v['top_k']} boxes "
                        f"per phrase (top-1 {v['top1_agreement']:.3f}), max |logit diff| {v['max_abs_logit_diff']:.3g}, "
                        f"mean |box diff| {v['mean_abs_box_diff_px']:.3g} px |")
    return "\n".join(rows)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fiber_b_int8", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/fiber-b/ck", help="converted FIBER-B checkpoint")
    p.add_argument("--out", default="runs/fiber-b/pkg-512x672-int8", help="INT8 package to write")
    p.add_argument("--canvas", default="512x672", help="detector canvas HxW")
    p.add_argument("--data", default=None, help="calibration data folder (default: synthetic images)")
    p.add_argument("--synth-images", type=int, default=32, help="synthetic images when no --data")
    p.add_argument("--calib-images", type=int, default=16, help="calibration images")
    p.add_argument("--agreement-images", type=int, default=6, help="held-out images of the agreement guard")
    p.add_argument("--min-agreement", type=float, default=0.8, help="agreement guard margin")
    p.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime threads")
    p.add_argument("--reuse-qdir", action=argparse.BooleanOptionalAction, default=False,
                   help="export from the QDIR of an earlier run (OUT-work/qdir) instead of quantising again")
    p.add_argument("--json", default=None, help="write the record here")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        record = run(args)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
