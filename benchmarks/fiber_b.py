"""FIBER-B at real scale: a random-valued official release, and the numbers table in one command.

    python -m benchmarks.fiber_b make-release --out runs/fiber-b/release.pth [--seed 0]
    python -m benchmarks.fiber_b report --package runs/fiber-b/pkg-512x672 --package ... \
        [--backends onnxruntime,openvino,openvino-bf16] [--runs 3] [--image examples/quokka.jpg] \
        [--json docs/results/fiber_b.json] [--markdown OUT.md]

``make-release`` writes ``{"model": {"module." + key: tensor}}`` with every tensor of the official
FIBER-B fine release (fiber.official_layout: 806 tensors, 252.5 M values, random values from a
fixed seed) as a ``.pth``: what ``python -m fiber.checkpoint convert-official FILE --config fiber-b
--tokenizer DIR`` reads. It stands in for the released weights (not downloadable here); nothing it
makes is committed. Detections of a model made from it are meaningless, the pipeline is what runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

# Edge targets (docs/../edge-anchors.md section 7): GPU-only dense peaks. FP16 tensor-core dense =
# half the dense INT8 figure. Used only for the labelled projection, never as a measurement.
JETSON = {
    "Jetson Orin Nano Super 8GB": {"int8_dense_tops": 33.0, "fp16_dense_tflops": 16.5, "mem_gb_s": 102.0},
    "Jetson AGX Orin 64GB (MAXN)": {"int8_dense_tops": 85.0, "fp16_dense_tflops": 42.5, "mem_gb_s": 204.8},
}
# name -> (engines.load backend, options); "openvino" forces f32 (parity), "openvino-bf16" asks for bf16
BACKENDS = {
    "onnxruntime": ("onnxruntime", {}),
    "openvino": ("openvino", {"precision_hint": "f32"}),
    "openvino-bf16": ("openvino", {"precision_hint": "bf16"}),
}
DEFAULT_BACKENDS = ("onnxruntime", "openvino", "openvino-bf16")


def make_release(out: Path, seed: int = 0, layout: dict | None = None) -> dict:
    """Write the random FIBER-B fine release to ``out`` (atomically); returns a small summary.
    ``layout``: official_fine_shapes keywords of another size (tests: GOLDEN_SMALL)."""
    import torch

    from fiber.official_layout import official_fine_shapes, random_state_dict

    shapes = official_fine_shapes(**(layout or {}))
    state = random_state_dict(shapes, seed)
    release = {"model": {"module." + k: v for k, v in state.items()}, "iteration": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(release, tmp)
    tmp.replace(out)                          # atomic: a reader never sees half a release
    values = sum(v.numel() for v in state.values())
    return {"file": str(out), "tensors": len(state), "values": values, "bytes": out.stat().st_size, "seed": seed}




TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden" / "fine_tokenizer"


def make_packages(folder: Path, canvases: Sequence[str], tokenizer: Path = TOKENIZER, seed: int = 0,
                  threads: int | None = None) -> list[Path]:
    """release.pth -> ck/ -> pkg-HxW/ for each canvas under ``folder``; each step skipped when its
    output exists (so a GPU check re-uses them). Returns the package folders. The tokenizer is the
    golden synthetic byte-level BPE (1000 ids; roberta-base's files cannot be downloaded here),
    which FIBER-B's 50265-row embedding table holds. Raises SystemExit(2) with one line on failure."""
    from compress import export
    from fiber import checkpoint

    release, ck = folder / "release.pth", folder / "ck"
    if not release.is_file():
        info = make_release(release, seed)
        print(f"made {info['file']} ({info['values'] / 1e6:.1f} M random values)", file=sys.stderr)
    if not (ck / "config.json").is_file():
        args = checkpoint.get_args_parser().parse_args(
            ["convert-official", str(release), "--config", "fiber-b", "--tokenizer", str(tokenizer), "--out", str(ck)])
        if checkpoint.main(args) != 0:
            raise SystemExit(2)
    out = []
    for canvas in canvases:
        package = folder / f"pkg-{canvas}"
        if not (package / "manifest.json").is_file():
            argv = ["--checkpoint", str(ck), "--out", str(package), "--canvas", canvas]
            argv += ["--threads", str(threads)] if threads else []
            t0 = time.perf_counter()
            if export.main(export.get_args_parser().parse_args(argv)) != 0:
                raise SystemExit(2)
            print(f"exported {package} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        out.append(package)
    return out


# ----------------------------------------------------------------------------- the numbers

def _canvas(manifest: dict) -> str:
    h, w = (int(v) for v in manifest["input"]["size"])
    return f"{h}x{w}"


def package_facts(package: Path, tokens: int) -> dict[str, Any]:
    """Files (bytes), precision, canvas and the detector's / text graph's GFLOPs at ``tokens``."""
    from benchmarks.flops import package_flops
    from common import package as pkg

    manifest = pkg.read_manifest(package)
    files = {name: int((package / name).stat().st_size) for name in sorted(manifest["files"])}
    t0 = time.perf_counter()
    counts = package_flops(package, tokens, verify=False)
    return {"package": str(package), "name": manifest["name"], "precision": manifest.get("precision", "fp32"),
            "canvas": _canvas(manifest), "buckets": manifest["text"]["buckets"],
            "files": files, "bytes": sum(files.values()),
            "gflops": {g: round(c.flops / 1e9, 2) for g, c in counts.items()},
            "detector_groups_gflops": {k: round(v / 1e9, 2) for k, v in counts["detector"].groups().items()},
            "tokens": tokens, "flops_seconds": round(time.perf_counter() - t0, 1)}


def _open(package: str, backend: str, threads: int):
    import engines
    from runtime.predictor import Detector

    name, opts = BACKENDS[backend]
    opts = dict(opts, threads=threads, cache_dir="") if name == "openvino" else {"intra_op_threads": threads}
    return Detector(engines.load(package, name, **opts), prompt_cache_size=1)


def measure_group(packages: Sequence[str], backends: Sequence[str], frame, prompt: str, threads: int,
                  runs: int, warmup: int) -> list[dict[str, Any]]:
    """Every package x backend of one canvas, alternated side by side (benchmarks.latency)."""
    from benchmarks.latency import SampleRunner, alternate, one_line, peak_rss_mb, rss_mb, summarize

    other = prompt + " ."
    opened, rows = {}, []
    try:
        for p in packages:
            for b in backends:
                label = f"{Path(p).name} {b}"
                before, t0 = rss_mb(), time.perf_counter()
                try:
                    det = _open(p, b, threads)
                except Exception as e:  # a backend that cannot take the package: a row saying why
                    rows.append({"label": label, "package": p, "backend": b, "status": "failed", "reason": one_line(e)})
                    continue
                runner = SampleRunner(det, frame, prompt, other)
                for _ in range(max(1, warmup)):
                    runner()
                opened[label] = (p, b, det, runner, rss_mb() - before, time.perf_counter() - t0)
                print(f"  opened {label}: {rss_mb() - before:.0f} MB, {time.perf_counter() - t0:.0f} s "
                      f"(open + {max(1, warmup)} warm-up)", file=sys.stderr, flush=True)
        times = alternate({k: v[3] for k, v in opened.items()}, runs, 1, 0) if opened else {}
        for label, (p, b, det, _, added, open_s) in opened.items():
            stages = {k: summarize(times[label][k]) for k in ("pre", "text_uncached", "network", "post", "total")}
            rows.append({"label": label, "package": p, "backend": b, "status": "ok",
                         "detector_file": Path(getattr(det.engines.detector, "path", "?")).name,
                         "stages_ms": {k: v["median"] for k, v in stages.items()}, "stats": stages,
                         "rss_added_mb": round(added, 1), "open_and_warmup_s": round(open_s, 1),
                         "tokens": int(det.last_prompt.input_ids.shape[1])})
    finally:
        for _, _, det, _, _, _ in opened.values():
            det.close()
    for r in rows:
        r["process_peak_rss_mb"] = round(peak_rss_mb(), 1)
    return rows


def project(facts: dict[str, Any], rows: list[dict[str, Any]], cpu_peak_gflops: float | None) -> dict[str, Any]:
    """The labelled projection: detector FLOPs / (target's dense FP16 peak x the fraction of peak
    the best f32 path reached on this CPU)."""
    if facts.get("precision", "fp32") != "fp32":
        return {}              # the fraction is of the fp32 peak: an INT8 package's paths are not f32 ones
    flops = facts["gflops"]["detector"] * 1e9
    f32 = [r for r in rows if r["status"] == "ok" and r["package"] == facts["package"]
           and r["backend"] in ("onnxruntime", "openvino")]
    if not f32 or not cpu_peak_gflops:
        return {}
    best = min(f32, key=lambda r: r["stages_ms"]["network"])
    achieved = flops / (best["stages_ms"]["network"] / 1e3) / 1e9
    fraction = achieved / cpu_peak_gflops
    out = {"basis": f"{best['label']}: {achieved:.1f} GFLOP/s = {100 * fraction:.1f}% of this CPU's fp32 peak "
                    f"({cpu_peak_gflops:.0f} GFLOP/s)", "fraction_of_peak": round(fraction, 4), "targets": {}}
    for name, t in JETSON.items():
        peak = t["fp16_dense_tflops"] * 1e12
        out["targets"][name] = {
            "fp16_ms_at_measured_fraction": round(flops / (peak * fraction) * 1e3, 1),
            "fp16_ms_at_30pct": round(flops / (peak * 0.3) * 1e3, 1),
            "fp16_ms_at_100pct_floor": round(flops / peak * 1e3, 2),
            "weights_fp16_read_ms": round(facts["bytes"] / 2 / (t["mem_gb_s"] * 1e9) * 1e3, 2)}
    return out


def run_report(packages: Sequence[str], backends: Sequence[str], image: str, prompt: str, threads: int,
               runs: int, warmup: int) -> dict[str, Any]:
    from benchmarks import machine
    from benchmarks.latency import load_frame, peak_rss_mb
    from common import package as pkg

    frame = load_frame(image)
    by_canvas: dict[str, list[str]] = {}
    for p in packages:
        by_canvas.setdefault(_canvas(pkg.read_manifest(p)), []).append(p)
    cpu = machine.read_cpu()
    peak = machine.peak(cpu, threads)
    out: dict[str, Any] = {"command": " ".join(["python -m benchmarks.fiber_b", *sys.argv[1:]]),
                           "cpu": {"model": cpu.model, "threads": threads, "fp32_peak_gflops": peak.fp32_gflops,
                                   "peak_note": peak.assumptions},
                           "input": {"image": image, "width": int(frame.shape[1]), "height": int(frame.shape[0]),
                                     "prompt": prompt},
                           "runs": runs, "warmup": warmup, "groups": []}
    for canvas, group in sorted(by_canvas.items(), key=lambda kv: -int(kv[0].split("x")[0])):
        print(f"canvas {canvas}: {', '.join(Path(p).name for p in group)}", file=sys.stderr, flush=True)
        rows = measure_group(group, backends, frame, prompt, threads, runs, warmup)
        tokens = next((r["tokens"] for r in rows if r["status"] == "ok"), 16)
        facts = [package_facts(Path(p), tokens) for p in group]
        ort = {r["package"]: r for r in rows if r["status"] == "ok" and r["backend"] == "onnxruntime"}
        base = next(iter(ort.values()), None)
        for r in rows:
            if r["status"] == "ok" and base is not None:
                r["network_vs_first_onnxruntime"] = round(base["stages_ms"]["network"] / r["stages_ms"]["network"], 2)
        out["groups"].append({"canvas": canvas, "packages": facts, "rows": rows,
                              "projection": {f["name"]: project(f, rows, peak.fp32_gflops) for f in facts}})
    ratios = {}
    if len(out["groups"]) > 1:
        first, *rest = out["groups"]
        for g in rest:
            for r in g["rows"]:
                twin = next((q for q in first["rows"] if q["status"] == r["status"] == "ok"
                             and q["backend"] == r["backend"]
                             and pkg.read_manifest(q["package"]).get("precision") == pkg.read_manifest(r["package"]).get("precision")), None)
                if twin:
                    ratios[f"{r['backend']} {first['canvas']} / {g['canvas']}"] = round(
                        twin["stages_ms"]["network"] / r["stages_ms"]["network"], 2)
    out["canvas_ratios_network"] = ratios
    out["process_peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def markdown(result: dict[str, Any]) -> str:
    """The docs/results.md table of a report."""
    lines = [f"Command: `{result['command']}`", "",
             f"CPU: {result['cpu']['model']}, {result['cpu']['threads']} threads; image {result['input']['image']} "
             f"({result['input']['width']}x{result['input']['height']}), prompt \"{result['input']['prompt']}\"; "
             f"median of {result['runs']} alternated runs after {result['warmup']} warm-up.", "",
             "| canvas | package | backend | pre ms | text ms (uncached) | network ms | post ms | total ms "
             "| network speed-up vs the canvas's first ORT row | RSS added MB | files MB | detector GFLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in result["groups"]:
        facts = {f["package"]: f for f in g["packages"]}
        for r in g["rows"]:
            f = facts[r["package"]]
            if r["status"] != "ok":
                lines.append(f"| {g['canvas']} | {f['name']} ({f['precision']}) | {r['backend']} | failed: "
                             f"{r['reason'][:120]} | | | | | | | {f['bytes'] / 1e6:.0f} | {f['gflops']['detector']} |")
                continue
            s = r["stages_ms"]
            lines.append(f"| {g['canvas']} | {f['name']} ({f['precision']}) | {r['backend']} | {s['pre']:.1f} | "
                         f"{s['text_uncached']:.0f} | {s['network']:.0f} | {s['post']:.1f} | {s['total']:.0f} | "
                         f"{r.get('network_vs_first_onnxruntime', '')} | {r['rss_added_mb']:.0f} | "
                         f"{f['bytes'] / 1e6:.0f} | {f['gflops']['detector']} |")
    lines += ["", f"Process peak RSS: {result['process_peak_rss_mb']:.0f} MB. Network-time ratios between "
              f"canvases (same backend): {json.dumps(result['canvas_ratios_network'])}.", "",
              "**Projection, not a measurement** (detector FLOPs / (dense FP16 tensor peak x the fraction of "
              "peak the best f32 path reached on this CPU); TensorRT on these boards has not been run):", "",
              "| canvas | package | target | ms at the measured fraction | ms at 30% of peak | ms at 100% (floor) |",
              "|---|---|---|---|---|---|"]
    for g in result["groups"]:
        for name, proj in g["projection"].items():
            for target, t in (proj.get("targets") or {}).items():
                lines.append(f"| {g['canvas']} | {name} | {target} | {t['fp16_ms_at_measured_fraction']} | "
                             f"{t['fp16_ms_at_30pct']} | {t['fp16_ms_at_100pct_floor']} |")
            if proj:
                lines.append(f"| | | basis: {proj['basis']} | | | |")
    return "\n".join(lines) + "\n"

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fiber_b", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("make-release", help="write a random-valued FIBER-B fine release (.pth)")
    r.add_argument("--out", type=Path, default=Path("runs/fiber-b/release.pth"))
    r.add_argument("--seed", type=int, default=0)
    k = sub.add_parser("packages", help="release -> checkpoint -> a package per canvas (existing steps kept)")
    k.add_argument("--folder", type=Path, default=Path("runs/fiber-b"))
    k.add_argument("--canvas", default="512x672,800x1344", help="comma-separated HxW canvases")
    k.add_argument("--threads", type=int, default=None)
    q = sub.add_parser("report", help="per-stage latency, memory, sizes, GFLOPs and a Jetson projection")
    q.add_argument("--package", action="append", required=True, help="model package (repeat; any canvas/precision)")
    q.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                   help=f"comma-separated, of {list(BACKENDS)} (an INT8 package on openvino = OpenVINO INT8)")
    q.add_argument("--image", default="examples/photos/grace_hopper.jpg")
    q.add_argument("--prompt", default="person. dog")
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--runs", type=int, default=3, help="timed samples per subject (alternated)")
    q.add_argument("--warmup", type=int, default=1)
    q.add_argument("--json", type=Path, default=None)
    q.add_argument("--markdown", type=Path, default=None)
    return p


def main(args: argparse.Namespace) -> int:
    if args.command == "make-release":
        info = make_release(args.out, args.seed)
        print(f"{info['file']}: {info['tensors']} tensors, {info['values'] / 1e6:.2f} M values, "
              f"{info['bytes'] / 2**20:.0f} MiB (random, seed {info['seed']})")
        return 0
    if args.command == "packages":
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):   # stdout: only the package folders (read by gpu_check.sh)
            try:
                packages = make_packages(args.folder, [c.strip() for c in args.canvas.split(",") if c.strip()],
                                         threads=args.threads)
            except SystemExit as e:
                return int(e.code or 2)
        for package in packages:
            print(package)
        return 0
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if bad or args.runs < 1 or args.threads < 1:
        print(f"error: --backends must be of {list(BACKENDS)} (got {bad}), --runs and --threads >= 1", file=sys.stderr)
        return 2
    from common import package as pkg
    from common.atomic import atomic_write_json, atomic_write_text

    try:
        result = run_report(args.package, backends, args.image, args.prompt, args.threads, args.runs, args.warmup)
    except (pkg.PackageError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown(result)
    print(table)
    if args.json:
        atomic_write_json(args.json, result)
    if args.markdown:
        atomic_write_text(args.markdown, table)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
