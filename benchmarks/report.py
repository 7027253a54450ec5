"""One command for the whole benchmark report: report.md, report.json and PNG plots.

    python -m benchmarks.report --package models/fiber-nano-int8 [--compare models/fiber-nano ...]
        [--teacher PKG_OR_CKPT] [--checkpoint CKPT] --data data/synth-val --out docs/report
        [--backend default|onnxruntime,openvino,...] [--threads N] [--runs N] [--limit N] [--quick]

Runs, in one process: the machine description and its measured GEMM ceiling (benchmarks.machine),
FLOPs per stage of every package (benchmarks.flops; a teacher checkpoint by torch's flop counter),
the alternating latency benchmark over every package x backend plus the PyTorch eager reference
(benchmarks.latency), the pre/post-processing paths (benchmarks.prepost), end-to-end vs network-only
FPS on a generated video (benchmarks.e2e_fps), accuracy through the runtime for every package x
backend (benchmarks.accuracy), and the INT8 package's default path against every CPU path of the FP32
package side by side (benchmarks.int8_speed.run_matrix; issue 14's target 1.3x). Writes into ``--out``
(atomically: a temp folder renamed at the end):

    report.json   every number, with the machine, versions, threads, package sha256s
                  (common.package.package_digest), the command line and the date
    report.md     the tables a person reads; every number in them is a number of report.json
    *.png         per-stage latency, latency distributions, accuracy vs latency, FLOPs and peak

"Promised ratios" collects what issues 4 and 6 promise: INT8 vs FP32 detector latency (and R@1),
student vs teacher (FLOPs, latency, R@1), C extension vs numpy / OpenCV pre+post, end-to-end vs
network-only FPS, cached vs uncached prompt. ``--quick``: few runs and a few evaluation images
(for tests and a first look; the numbers are noisy).

Bad input does not stop the report: a package that does not verify, a backend named in
``--backend`` that is not installed, a data folder without annotations each leave their part marked
"not measured: <reason>" (also on stderr). Exit status: 0 everything requested was measured; 1 the
report was written with parts not measured; 2 bad arguments (checked before anything is measured:
a ``--data`` folder or a package path that does not exist), or the report could not be written.
Backends of the default list that are absent here (e.g. TensorRT on a CPU machine) are listed as
"not available" and do not change the exit status.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from benchmarks import flops as flops_mod
from benchmarks import int8_speed, machine, plots
from fiber.flops import checkpoint_flops
from benchmarks.accuracy import AccuracyConfig, run_accuracy
from benchmarks.latency import (DEFAULT_BACKENDS, TORCH, LatencyConfig, one_line, is_engine_dir,
                                measure_video, parse_backends, ratio, run_latency)
from common import package as pkg
from common.atomic import atomic_dir, atomic_write_json, atomic_write_text

REPORT_FORMAT = "fiber-edge-report"


@dataclass(frozen=True)
class Settings:
    runs: int               # latency alternation rounds
    warmup: int             # untimed samples per subject first
    prepost_frames: int     # frames of the C / numpy / OpenCV comparison
    machine_seconds: float  # seconds per measured GEMM
    machine_size: int       # GEMM size n
    video_frames: int       # frames of the generated video (end-to-end vs network-only)
    video_rounds: int
    limit: int | None       # evaluation entries/images (None: all)
    int8_rounds: int        # alternation rounds of the INT8-vs-fastest-FP32 path matrix
    int8_block: int         # runs per path per round there (the first is dropped)


FULL = Settings(runs=50, warmup=5, prepost_frames=300, machine_seconds=2.0, machine_size=1024,
                video_frames=150, video_rounds=3, limit=None, int8_rounds=20, int8_block=5)
QUICK = Settings(runs=5, warmup=1, prepost_frames=20, machine_seconds=0.2, machine_size=256,
                 video_frames=12, video_rounds=1, limit=8, int8_rounds=3, int8_block=3)


@dataclass(frozen=True)
class ReportConfig:
    package: str                           # the package the report is about
    out: str                               # folder to write (replaced atomically)
    data: str                              # evaluation folder (grounding.json / detection.json)
    compare: tuple[str, ...] = ()          # more packages (e.g. the FP32 one)
    teacher: str | None = None             # teacher package or fine checkpoint
    checkpoint: str | None = None          # PyTorch eager FP32 reference (a fine checkpoint)
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    explicit_backends: bool = False        # absent backends are failures, not "not available"
    threads: int = os.cpu_count() or 1     # CPU threads per engine and for the peak
    settings: Settings = FULL
    progress: bool = True


# ----------------------------------------------------------------------------- measuring

def _roles(cfg: ReportConfig) -> dict[str, str]:
    roles = {c: "compare" for c in cfg.compare}
    if cfg.checkpoint:
        roles[cfg.checkpoint] = "reference"
    if cfg.teacher:
        roles[cfg.teacher] = "teacher"
    roles[cfg.package] = "main"
    return roles


def teacher_is_package(path: str | None) -> bool:
    return bool(path) and ((Path(path) / pkg.MANIFEST).is_file() or is_engine_dir(path))


def _engine_kind(path: str) -> str:
    """The backend an engine folder's engine.json names (TensorRT, ONNX Runtime or OpenVINO)."""
    import json

    try:
        return str(json.loads((Path(path) / "engine.json").read_text()).get("backend", "TensorRT"))
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def check_packages(paths: Sequence[str], roles: Mapping[str, str]) -> list[dict[str, Any]]:
    """One record per package: verified (every file's sha256) or failed with the reason."""
    out = []
    for p in dict.fromkeys(paths):
        rec: dict[str, Any] = {"path": p, "role": roles.get(p, "compare")}
        if is_engine_dir(p):
            kind = _engine_kind(p)
            out.append({**rec, "status": "ok", "name": Path(p).name, "precision": "engine", "model": "?",
                        "sha256": None, "note": f"{kind} engine folder (verified on loading)"})
            continue
        try:
            m = pkg.load_package_manifest(p, verify=True)
        except pkg.PackageError as e:
            out.append({**rec, "status": "failed", "reason": f"package does not verify: {one_line(e)}"})
            continue
        out.append({**rec, "status": "ok", "name": m.get("name", Path(p).name), "precision": m.get("precision"),
                    "model": (m.get("model") or {}).get("name"), "sha256": pkg.package_digest(m),
                    "accuracy_at_export": m.get("accuracy")})
    return out


def count_flops(packages: Sequence[Mapping[str, Any]], teacher_ckpt: str | None) -> dict[str, Any]:
    """``{path: {"status", "name", "text", "detector"}}`` for verified packages and a teacher checkpoint."""
    out: dict[str, Any] = {}
    for p in packages:
        if p["status"] != "ok" or p["precision"] == "engine":
            continue
        try:
            counts = flops_mod.package_flops(p["path"], verify=False)
            out[p["path"]] = {"status": "ok", "name": p["name"], **{g: c.to_json() for g, c in counts.items()}}
        except (flops_mod.FlopsError, pkg.PackageError, OSError) as e:
            out[p["path"]] = {"status": "not measured", "name": p["name"], "reason": one_line(e)}
    if teacher_ckpt:
        try:
            name = "/".join(Path(teacher_ckpt).resolve().parts[-2:])
            out[teacher_ckpt] = {"status": "ok", "name": f"{name} (checkpoint)",
                                 **checkpoint_flops(teacher_ckpt)}
        except Exception as e:  # a bad checkpoint must not stop the report
            out[teacher_ckpt] = {"status": "not measured", "name": teacher_ckpt, "reason": one_line(e)}
    return out


def efficiency(latency: Mapping[str, Any], flops: Mapping[str, Any], mach: Mapping[str, Any]) -> list[dict]:
    """Achieved detector GFLOP/s per subject and its share of the peak of its precision (percent)."""
    rows = []
    peak, measured = mach.get("peak", {}), mach.get("measured", {})
    for s in latency.get("subjects", []):
        f = flops.get(s["package"])
        if s.get("status") != "ok" or not f or f.get("status") != "ok":
            continue
        int8 = s["precision"] == "int8"
        theory = peak.get("int8_gops" if int8 else "fp32_gflops")
        ceiling = measured.get("int8_gops" if int8 else "fp32_gflops")
        net_ms = s["stages"]["network"]["median"]
        achieved = round(f["detector"]["flops"] / (net_ms / 1e3) / 1e9, 2) if net_ms else None
        rows.append({"label": s["label"], "package": s["package"], "backend": s["backend"],
                     "precision": s["precision"], "detector_gflop": f["detector"]["gflops"],
                     "network_ms": net_ms, "achieved_gflops": achieved,
                     "peak_kind": "int8" if int8 else "fp32", "peak_theoretical": theory, "peak_measured": ceiling,
                     "pct_of_theoretical": _pct(achieved, theory), "pct_of_measured": _pct(achieved, ceiling)})
    return rows


def _pct(a: float | None, b: float | None) -> float | None:
    return round(100.0 * a / b, 2) if a and b else None


def int8_paths(packages: Sequence[Mapping[str, Any]], threads: int, st: Settings) -> dict[str, Any]:
    """The INT8 package (main, else the first compare) against the FP32 compare package of the same
    model (else the first FP32 one): every CPU path of both and each one's runtime default, side by
    side in one run (benchmarks.int8_speed.run_matrix). "skipped" when there is no such pair."""
    ok = [p for p in packages if p["status"] == "ok" and p["role"] in ("main", "compare")]
    int8 = next((p for p in ok if p["precision"] == "int8"), None)
    fp32s = [p for p in ok if p["precision"] == "fp32"]
    fp32 = next((p for p in fp32s if int8 and p["model"] == int8["model"]), fp32s[0] if fp32s else None)
    if int8 is None or fp32 is None:
        return {"status": "skipped", "reason": "needs a verified INT8 and FP32 package (--package / --compare)"}
    pair = {"int8": int8["path"], "fp32": fp32["path"]}
    try:
        m = int8_speed.run_matrix(fp32["path"], int8["path"], threads, st.int8_rounds, st.int8_block, st.warmup)
    except Exception as e:  # a path that breaks while timed must not stop the report
        return {"status": "not measured", **pair, "reason": one_line(e)}
    if m["verdict"] is None:
        return {"status": "not measured", **pair, **m}
    return {"status": "ok", **pair, **m, "sentence": int8_paths_sentence(m["verdict"])}


def int8_paths_sentence(v: Mapping[str, Any]) -> str:
    """The verdict of issue 14 in one sentence."""
    head = (f"INT8's default path is {v['int8_default_vs_fastest_fp32']:.2f}x the fastest FP32 path "
            f"(target {v['target']}x)")
    if v["met"]:
        return f"{head}: met"
    return f"{head}: not met; runtime.detect runs each package on its fastest path by itself (engines.autotune)"


# ----------------------------------------------------------------------------- ratios

def _row(name: str, value: float | None, unit: str, target: str, detail: str, reason: str | None = None) -> dict:
    if value is None:
        return {"name": name, "value": None, "unit": unit, "target": target, "detail": detail,
                "status": f"not measured: {reason or 'missing data'}"}
    return {"name": name, "value": value, "unit": unit, "target": target, "detail": detail, "status": "ok"}


def _ok(subjects) -> list[dict[str, Any]]:
    return [s for s in subjects if s.get("status") == "ok"]


def _net(s: Mapping[str, Any]) -> float:
    return s["stages"]["network"]["median"]


def int8_ratios(report: Mapping[str, Any]) -> list[dict]:
    rows = []
    for r in report["latency"].get("ratios", {}).get("int8_vs_fp32", []):
        rows.append(_row("INT8 vs FP32 detector latency", r["fp32_over_int8_network"], "x", ">= 2.0",
                         f"median network ms: {r['fp32']} / {r['int8']}"))
    acc = _ok(report["accuracy"].get("subjects", []))
    for q in (s for s in acc if s["precision"] == "int8"):
        for f in (s for s in acc if s["precision"] == "fp32" and s["model"] == q["model"]
                  and s["backend"] == q["backend"]):
            a, b = q["metrics"].get("R@1"), f["metrics"].get("R@1")
            value = round(a - b, 2) if a is not None and b is not None else None
            rows.append(_row("INT8 vs FP32 R@1", value, "points", ">= -1.0",
                             f"R@1 {q['label']} minus {f['label']}", "no R@1 (no grounding data)"))
    if not rows:
        rows.append(_row("INT8 vs FP32 detector latency", None, "x", ">= 2.0", "",
                         "needs an INT8 and an FP32 package of the same model (--package / --compare)"))
    paths = report.get("int8_paths", {})
    v = paths.get("verdict") or {}
    detail = f"median detector ms: {v['fastest_fp32']} / INT8 runtime default" if v else ""
    rows.append(_row("INT8 default path vs fastest FP32 path", v.get("int8_default_vs_fastest_fp32"), "x",
                     f">= {int8_speed.TARGET}", detail, paths.get("reason")))
    return rows


def _student(subjects: Sequence[Mapping[str, Any]], main_model: str | None, backend: str) -> dict | None:
    """The FP32 (else any) subject of the student model on ``backend``."""
    cands = [s for s in subjects if s["model"] == main_model and s["backend"] == backend and s["role"] != "teacher"]
    cands.sort(key=lambda s: s["precision"] != "fp32")
    return cands[0] if cands else None


def teacher_ratios(report: Mapping[str, Any], main_model: str | None, teacher: str | None) -> list[dict]:
    names = ("student vs teacher detector FLOPs", "student vs teacher detector latency", "student vs teacher R@1")
    if not teacher:
        return [_row(n, None, "", "", "", "no --teacher given") for n in names]
    flops, rows = report["flops"], []
    t_f = flops.get(teacher, {})
    s_f = next((f for p, f in flops.items() if f.get("status") == "ok" and p != teacher
                and _model_of(report, p) == main_model), None)
    value = ratio(t_f.get("detector", {}).get("flops"), (s_f or {}).get("detector", {}).get("flops")) \
        if t_f.get("status") == "ok" and s_f else None
    rows.append(_row(names[0], value, "x", ">= 3", "teacher GFLOP / student GFLOP",
                     t_f.get("reason", "teacher or student FLOPs missing")))
    lat = _ok(report["latency"].get("subjects", []))
    t = next((s for s in lat if s["role"] == "teacher"), None)
    s = _student(lat, main_model, t["backend"]) if t else None
    rows.append(_row(names[1], ratio(_net(t), _net(s)) if t and s else None, "x", "",
                     f"median network ms: {t['label']} / {s['label']}" if t and s else "",
                     _no_pair("latency", t, main_model)))
    acc = _ok(report["accuracy"].get("subjects", []))
    t = next((a for a in acc if a["role"] == "teacher"), None)
    s = _student(acc, main_model, t["backend"]) if t else None
    r1 = (t or {}).get("metrics", {}).get("R@1"), (s or {}).get("metrics", {}).get("R@1")
    rows.append(_row(names[2], round(r1[1] - r1[0], 2) if t and s and None not in r1 else None, "points",
                     ">= -3", f"R@1 {s['label']} minus {t['label']}" if t and s else "",
                     _no_pair("R@1", t, main_model) if not (t and s) else "no R@1 (no grounding data)"))
    return rows


def _no_pair(what: str, teacher: Mapping[str, Any] | None, student_model: str | None) -> str:
    if teacher is None:
        return f"the teacher's {what} was not measured"
    return (f"the teacher runs on {teacher['backend']}, where the student ({student_model}) was not measured"
            + (" (a teacher checkpoint pairs with the student's --checkpoint)" if teacher["backend"] == TORCH else ""))


def _model_of(report: Mapping[str, Any], path: str) -> str | None:
    return next((p.get("model") for p in report["packages"] if p["path"] == path), None)


def runtime_ratios(report: Mapping[str, Any], main: str) -> list[dict]:
    rows = []
    pp = report["latency"].get("prepost", {})
    why = pp.get("reason") or pp.get("opencv")
    rows.append(_row("C extension vs numpy pre+post", pp.get("numpy_over_native"), "x", ">= 3",
                     "median ms per frame: numpy / C", why))
    rows.append(_row("C extension vs OpenCV pre+post", pp.get("opencv_over_native"), "x", "> 1",
                     "median ms per frame: OpenCV / C", why))
    v = report.get("video", {})
    rows.append(_row("end-to-end vs network-only FPS (video)", v.get("e2e_over_network"), "x", ">= 0.85",
                     f"{v.get('name')} {v.get('backend')}: decode + pre overlapped, {v.get('frames')} frames",
                     v.get("reason")))
    mains = [s for s in _ok(report["latency"].get("subjects", [])) if s["package"] == main]
    for s in mains:
        rows.append(_row("end-to-end vs network-only FPS (frame by frame)", s["e2e_over_network"], "x", "",
                         f"{s['label']}: no overlap, median ms network / total"))
    for s in mains:
        rows.append(_row("uncached vs cached prompt latency", s["uncached_over_cached"], "x", "",
                         f"{s['label']}: median ms total with text.onnx / with the cache hit"))
    if not mains:
        rows.append(_row("cached vs uncached prompt", None, "x", "", "", "the main package was not measured"))
    return rows


# ----------------------------------------------------------------------------- the report

def missing_parts(report: Mapping[str, Any]) -> list[str]:
    """Everything requested and not measured, one line each."""
    out = [f"package {p['path']}: {p['reason']}" for p in report["packages"] if p["status"] != "ok"]
    out += [f"FLOPs of {k}: {f['reason']}" for k, f in report["flops"].items() if f.get("status") != "ok"]
    lat = report["latency"]
    out += [f"latency of {s['package']} on {s['backend']}: {s['reason']}" for s in lat.get("subjects", [])
            if s.get("status") != "ok"]
    if lat.get("prepost", {}).get("status") not in ("ok", "skipped"):
        out.append(f"pre/post-processing: {lat['prepost'].get('reason')}")
    if report.get("int8_paths", {}).get("status") == "not measured":
        out.append(f"INT8 vs the fastest FP32 path: {report['int8_paths']['reason']}")
    if report.get("video", {}).get("status") != "ok":
        out.append(f"end-to-end video FPS: {report.get('video', {}).get('reason')}")
    acc = report["accuracy"]
    if acc.get("status") == "not measured":
        out.append(f"accuracy: {acc['reason']}")
    out += [f"accuracy of {s['package']} on {s['backend']}: {s['reason']}" for s in acc.get("subjects", [])
            if s.get("status") != "ok"]
    return list(dict.fromkeys(out))


def build_report(cfg: ReportConfig, command: str) -> dict[str, Any]:
    """Measure everything (see the module docstring); the report.json content."""
    st, roles = cfg.settings, _roles(cfg)
    teacher_pkg = cfg.teacher if teacher_is_package(cfg.teacher) else None
    teacher_ckpt = cfg.teacher if cfg.teacher and not teacher_pkg else None
    paths = [cfg.package, *cfg.compare, *([teacher_pkg] if teacher_pkg else [])]
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "format_version": 1, "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {**asdict(cfg), "settings": asdict(st)},
        "machine": machine.describe(cfg.threads, st.machine_seconds, st.machine_size),
    }
    report["packages"] = check_packages(paths, roles)
    good = [p["path"] for p in report["packages"] if p["status"] == "ok"]
    report["flops"] = count_flops(report["packages"], teacher_ckpt)
    checkpoints = tuple(c for c in (cfg.checkpoint, teacher_ckpt) if c)
    report["latency"] = run_latency(LatencyConfig(
        tuple(good), cfg.backends, cfg.explicit_backends, checkpoints, tuple(roles.items()), st.runs,
        warmup=st.warmup, threads=cfg.threads, prepost_frames=st.prepost_frames, progress=cfg.progress))
    main_ok = cfg.package in good and not is_engine_dir(cfg.package)
    report["video"] = (measure_video(cfg.package, "onnxruntime", cfg.threads, st.video_frames, st.video_rounds)
                       if main_ok else {"status": "not measured", "reason": "the main package did not verify"})
    report["accuracy"] = run_accuracy(AccuracyConfig(
        tuple(good), cfg.data, cfg.backends, cfg.explicit_backends, checkpoints, tuple(roles.items()),
        st.limit, cfg.threads, cfg.progress))
    report["int8_paths"] = int8_paths(report["packages"], cfg.threads, st)
    report["efficiency"] = efficiency(report["latency"], report["flops"], report["machine"])
    main_model = _model_of(report, cfg.package)
    report["ratios"] = (int8_ratios(report) + teacher_ratios(report, main_model, cfg.teacher)
                        + runtime_ratios(report, cfg.package))
    report["missing"] = missing_parts(report)
    return report


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """report.json, report.md and the plots into ``out`` (replaced atomically)."""
    out = Path(out)
    with atomic_dir(out, overwrite=True) as tmp:
        report["plots"] = plots.write_all(report, tmp)
        atomic_write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", render(report))
    return out


# ----------------------------------------------------------------------------- markdown

def cell(v: Any) -> str:
    """A table cell: a number exactly as report.json holds it; text that looks like a number is
    put in backticks (so every bare number of report.md is a number of report.json)."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return str(v)
    text = str(v).replace("|", "/").replace("\n", " ")
    try:
        float(text)
        return f"`{text}`"
    except ValueError:
        return text


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return lines + [""]


def _machine_md(m: Mapping[str, Any]) -> list[str]:
    cpu, peak, meas = m["cpu"], m["peak"], m.get("measured", {})
    rows = [("CPU", cpu["model"]), ("logical CPUs", cpu["logical_cpus"]), ("physical cores", cpu["physical_cores"]),
            ("threads per engine", m["threads"]), ("ISA", " ".join(cpu["flags"])),
            ("clock GHz", peak["ghz"]), ("clock source", cpu["mhz_source"]),
            ("fp32 FLOPs per core-cycle", peak["fp32_per_cycle"]), ("int8 ops per core-cycle", peak["int8_per_cycle"]),
            ("theoretical fp32 GFLOP/s", peak["fp32_gflops"]), ("theoretical int8 GOP/s", peak["int8_gops"]),
            ("measured fp32 GEMM GFLOP/s", meas.get("fp32_gflops")), ("measured int8 GEMM GOP/s", meas.get("int8_gops")),
            ("clock GHz the measured fp32 GEMM implies", meas.get("implied_ghz_fp32")),
            ("peak assumptions", peak["assumptions"]),
            ("GPU", (m.get("gpu") or {}).get("name", "none"))]
    rows += [(f"version: {k}", v or "not installed") for k, v in m["versions"].items()]
    return ["## Machine", ""] + table(("what", "value"), rows)


def _packages_md(r: Mapping[str, Any]) -> list[str]:
    rows = [(p["role"], p.get("name", "?"), p.get("precision", "?"), p.get("model", "?"), p["path"],
             f"`{p['sha256'][:16]}`" if p.get("sha256") else "n/a",
             p["status"] if p["status"] == "ok" else f"not measured: {p['reason']}") for p in r["packages"]]
    return ["## Packages", ""] + table(("role", "name", "precision", "model", "path", "sha256 (digest)", "status"), rows)


def _ratios_md(r: Mapping[str, Any]) -> list[str]:
    rows = [(x["name"], x["value"] if x["status"] == "ok" else x["status"], x["unit"], x["target"], x["detail"])
            for x in r["ratios"]]
    return ["## Promised ratios", ""] + table(("ratio", "value", "unit", "target", "measured as"), rows)


def _int8_paths_md(r: Mapping[str, Any]) -> list[str]:
    m = r.get("int8_paths", {"status": "not measured", "reason": "not in this report"})
    out = ["## INT8 vs the fastest FP32 path", ""]
    if m["status"] != "ok":
        return out + [f"not measured: {m['reason']}", ""]
    st = m["settings"]
    out += [f"Every CPU path of {m['fp32']} (FP32) and {m['int8']} (INT8), detector only, batch 1, "
            f"{cell(st['tokens'])} text tokens, threads per engine: {cell(st['threads'])}; side by side in one run "
            "(benchmarks.int8_speed.run_matrix: alternating blocks, the first run of each dropped). "
            "Speed-up: the fastest FP32 path's median over this path's.", ""]
    out += table(("path", "median ms", "p10 ms", "p90 ms", "runs", "speed-up vs fastest FP32"),
                 [(x["label"], x["median_ms"], x["p10_ms"], x["p90_ms"], x["runs"], x["speedup_vs_fastest_fp32"])
                  for x in m["rows"]])
    if m["left_out"]:
        out += ["Left out:", ""] + [f"- {label}: {why}" for label, why in m["left_out"].items()] + [""]
    rows = [(k, d["package"], d["path"], d["remembered"],
             ", ".join(f"{p} {ms} ms" for p, ms in sorted(d["ms"].items(), key=lambda kv: kv[1])) or "one path")
            for k, d in m["defaults"].items()]
    out += ["What runtime.detect runs by default (engines.autotune: each package's fastest CPU path, "
            "timed once per machine and remembered):", ""]
    out += table(("precision", "package", "runtime default path", "remembered", "median ms per path when chosen"),
                 rows)
    v = m["verdict"]
    return out + [f"INT8 runtime default {v['int8_default_ms']} ms vs fastest FP32 ({v['fastest_fp32']}) "
                  f"{v['fastest_fp32_ms']} ms.", "", f"**{m['sentence']}.**", ""]


def _latency_md(r: Mapping[str, Any]) -> list[str]:
    lat = r["latency"]
    rows = []
    for s in _ok(lat["subjects"]):
        st = s["stages"]
        rows.append((s["label"], s["detector_file"], st["pre"]["median"], st["text"]["median"],
                     st["network"]["median"], st["post"]["median"], st["total"]["median"], st["total"]["p90"],
                     st["total"]["p99"], st["text_uncached"]["median"], s["network_fps"], s["e2e_fps"],
                     s["rss_added_mb"]))
    inp = lat["input"]
    out = ["## Latency", "",
           f"Input: {inp['source']}, prompt \"{inp['prompt']}\"; subjects alternate; medians in ms "
           "(text: prompt cached; text uncached: tokenise + text.onnx).", ""]
    out += table(("subject", "detector file", "pre", "text", "network", "post", "total", "total p90", "total p99",
                  "text uncached", "network FPS", "end-to-end FPS", "RSS added MB"), rows)
    rows = [(s["label"], st, v["median"], v["p90"], v["p99"], v["runs"])
            for s in _ok(lat["subjects"]) for st, v in s["stages"].items()]
    out += ["<details><summary>every stage: median, p90, p99 (ms)</summary>", ""]
    out += table(("subject", "stage", "median", "p90", "p99", "runs"), rows) + ["</details>", ""]
    na = [(b, f"not available: {why}") for b, why in lat.get("unavailable", {}).items()]
    if na:
        out += table(("backend", "status"), na)
    out += table(("process", "peak RSS MB"), [("benchmark process", lat["peak_rss_mb"])])
    return out


def _prepost_md(r: Mapping[str, Any]) -> list[str]:
    pp = r["latency"].get("prepost", {})
    out = ["## Pre- and post-processing (640x480 frame)", ""]
    if pp.get("status") != "ok":
        return out + [f"not measured: {pp.get('reason')}", ""]
    rows = [(k, v["median"], v["p90"], v["p99"], pp["detections"][k]) for k, v in pp["paths"].items()]
    return out + table(("path", "median ms", "p90 ms", "p99 ms", "detections"), rows)


def _video_md(r: Mapping[str, Any]) -> list[str]:
    v = r.get("video", {})
    out = ["## End-to-end vs network-only on a video", ""]
    if v.get("status") != "ok":
        return out + [f"not measured: {v.get('reason')}", ""]
    return out + table(("package", "backend", "frames", "network FPS", "end-to-end FPS", "ratio"),
                       [(v["name"], v["backend"], v["frames"], v["network_fps"], v["e2e_fps"], v["e2e_over_network"])])


def _flops_md(r: Mapping[str, Any]) -> list[str]:
    groups = list(flops_mod.GROUPS)
    rows = []
    for path, f in r["flops"].items():
        if f.get("status") != "ok":
            rows.append((f.get("name", path), f"not measured: {f['reason']}", "", "", *[""] * len(groups)))
            continue
        g = f["detector"].get("groups_gflops", {})
        rows.append((f["name"], f["detector"]["dims"].get("tokens"), f["text"]["gflops"], f["detector"]["gflops"],
                     *[g.get(k) for k in groups]))
    return ["## FLOPs per frame (batch 1)", ""] + table(
        ("package", "text tokens", "text GFLOP", "detector GFLOP", *[f"{k} GFLOP" for k in groups]), rows)


def _efficiency_md(r: Mapping[str, Any]) -> list[str]:
    rows = [(e["label"], e["peak_kind"], e["detector_gflop"], e["network_ms"], e["achieved_gflops"],
             e["peak_theoretical"], e["pct_of_theoretical"], e["peak_measured"], e["pct_of_measured"])
            for e in r["efficiency"]]
    return ["## Achieved FLOP/s vs the machine's peak", "",
            "INT8 subjects are compared with the int8 peak, FP32 with the fp32 peak.", ""] + table(
        ("subject", "peak of", "detector GFLOP", "network ms", "achieved GFLOP/s", "theoretical peak",
         "% of theoretical", "measured GEMM ceiling", "% of measured"), rows)


def _accuracy_md(r: Mapping[str, Any]) -> list[str]:
    acc = r["accuracy"]
    out = ["## Accuracy through the runtime (percent)", ""]
    if acc.get("status") == "not measured":
        return out + [f"not measured: {acc['reason']}", ""]
    d = acc["data"]
    keys = ("R@1", "R@5", "R@10", "R@1_relation", "R@1_no_relation", "refexp", "mAP", "AP50")
    rows = [(s["label"], *[s["metrics"].get(k) for k in keys]) for s in _ok(acc["subjects"])]
    out += [f"Data: {d['folder']} (limit: {cell(d['limit'])}); package post-processing settings.", ""]
    return out + table(("subject", *keys), rows)


def render(r: Mapping[str, Any]) -> str:
    """report.md from the report dict."""
    main = next((p for p in r["packages"] if p["role"] == "main"), {"path": "?"})
    lines = [f"# Benchmark report: {main.get('name', main['path'])}", "",
             f"Generated {r['date']} by `{r['command']}`. Every number in the tables is in report.json.", ""]
    lines += _packages_md(r) + _ratios_md(r) + _int8_paths_md(r) + _latency_md(r) + _prepost_md(r) + _video_md(r) + _flops_md(r) + _efficiency_md(r)
    lines += _accuracy_md(r) + _machine_md(r["machine"])
    lines += ["## Not measured", ""] + ([f"- {m}" for m in r["missing"]] or ["- nothing: every part was measured"]) + [""]
    lines += ["## Plots", ""]
    for name, file in r.get("plots", {}).items():
        lines += [f"![{name}]({file})" if not file.startswith("not drawn") else f"- {name}: {file}", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    p.add_argument("--package", required=True, help="the model package the report is about")
    p.add_argument("--compare", action="append", default=[], help="another package to compare (repeatable)")
    p.add_argument("--teacher", default=None, help="teacher package or fine checkpoint (student vs teacher)")
    p.add_argument("--checkpoint", default=None, help="fine checkpoint: the PyTorch eager FP32 reference")
    p.add_argument("--data", required=True, help="evaluation folder (grounding.json and/or detection.json)")
    p.add_argument("--out", required=True, help="report folder to write (replaced)")
    p.add_argument("--backend", default="default",
                   help="comma-separated: onnxruntime,openvino,tensorrt,tensorrt-rtx ('default': where present)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per engine")
    p.add_argument("--runs", type=int, default=None, help="latency rounds (default 50; --quick 5)")
    p.add_argument("--limit", type=int, default=None, help="evaluation entries/images (default all; --quick 8)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False, help="few runs, few images")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on stderr")
    return p


def config_from_args(args: argparse.Namespace) -> ReportConfig:
    """ReportConfig from the CLI; ValueError naming a bad argument."""
    if args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if args.runs is not None and args.runs < 1 or args.limit is not None and args.limit < 1:
        raise ValueError("--runs and --limit must be >= 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if not Path(args.data).is_dir():  # before minutes of benchmarks, not after
        raise ValueError(f"--data {args.data}: " + ("is not a folder" if Path(args.data).exists()
                                                     else "does not exist"))
    for flag, path in [("--package", args.package), *(("--compare", c) for c in args.compare),
                       ("--teacher", args.teacher), ("--checkpoint", args.checkpoint)]:
        if path is not None and not Path(path).exists():
            raise ValueError(f"{flag} {path}: does not exist")
    backends, explicit = parse_backends(args.backend)
    base = QUICK if args.quick else FULL
    settings = Settings(**{**asdict(base), **({"runs": args.runs} if args.runs else {}),
                           **({"limit": args.limit} if args.limit else {})})
    return ReportConfig(args.package, args.out, args.data, tuple(args.compare), args.teacher, args.checkpoint,
                        backends, explicit, args.threads, settings, args.progress)


def main(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"benchmarks.report: {e}", file=sys.stderr)
        return 2
    report = build_report(cfg, shlex.join(["python", "-m", "benchmarks.report", *sys.argv[1:]]))
    try:
        out = write_report(report, cfg.out)
    except OSError as e:
        print(f"benchmarks.report: cannot write {cfg.out}: {e}", file=sys.stderr)
        return 2
    for line in report["missing"]:
        print(f"benchmarks.report: not measured: {line}", file=sys.stderr)
    for r in report["ratios"]:
        value = f"{r['value']}{r['unit'] and ' ' + r['unit']}" if r["status"] == "ok" else r["status"]
        print(f"{r['name']}: {value}  {r['detail']}")
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and the plots")
    return 1 if report["missing"] else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
