"""PNG plots of a benchmark report (matplotlib, Agg backend: no display needed).

Each function takes the report dict of ``benchmarks.report`` (the same numbers as report.json),
draws one figure into ``path`` and returns None, or returns the reason it drew nothing (no data).

    stage_bars            median pre / text / network / post per subject, stacked
    latency_distributions box plots of the end-to-end and network samples per subject
    accuracy_vs_latency   R@1 (or mAP) against median end-to-end latency, one point per subject
    flops_and_peak        detector GFLOP per package by part; achieved GFLOP/s per subject against
                          the machine's theoretical peak and measured ceiling
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGE_COLOURS = {"pre": "#4c72b0", "text": "#dd8452", "network": "#55a868", "post": "#c44e52"}
PRECISION_COLOURS = {"fp32": "#4c72b0", "int8": "#55a868", "fp16": "#8172b3"}
PLOTS = {"stages": "latency_stages.png", "distributions": "latency_distributions.png",
         "accuracy_vs_latency": "accuracy_vs_latency.png", "flops": "flops_peak.png"}


def _ok(subjects) -> list[dict[str, Any]]:
    return [s for s in subjects if s.get("status") == "ok"]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_bars(report: Mapping[str, Any], path: Path) -> str | None:
    subjects = _ok(report.get("latency", {}).get("subjects", []))
    if not subjects:
        return "no latency measured"
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(subjects) + 1.5))
    labels = [s["label"] for s in subjects]
    left = [0.0] * len(subjects)
    for stage, colour in STAGE_COLOURS.items():
        widths = [s["stages"][stage]["median"] for s in subjects]
        ax.barh(labels, widths, left=left, color=colour, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("median ms per frame (prompt cached)")
    ax.set_title("Per-stage latency")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)
    return None


def latency_distributions(report: Mapping[str, Any], path: Path) -> str | None:
    subjects = _ok(report.get("latency", {}).get("subjects", []))
    if not subjects:
        return "no latency measured"
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(subjects) + 1.8), sharey=True)
    labels = [s["label"] for s in subjects]
    for ax, key, title in ((axes[0], "total", "end-to-end (pre+text+network+post)"), (axes[1], "network", "network")):
        ax.boxplot([s["samples"][key] for s in subjects], orientation="horizontal", tick_labels=labels, showfliers=True,
                   flierprops={"markersize": 2})
        ax.set_xscale("log")
        ax.set_xlabel("ms per frame (log)")
        ax.set_title(title)
    axes[0].invert_yaxis()
    _save(fig, path)
    return None


def _accuracy_by_subject(report: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    acc = report.get("accuracy", {})
    return {(s["package"], s["backend"]): s["metrics"] for s in _ok(acc.get("subjects", []))}


def accuracy_vs_latency(report: Mapping[str, Any], path: Path) -> str | None:
    metrics = _accuracy_by_subject(report)
    points = []
    for s in _ok(report.get("latency", {}).get("subjects", [])):
        m = metrics.get((s["package"], s["backend"]))
        if m is not None:
            points.append((s, m))
    key = "R@1" if any(m.get("R@1") is not None for _, m in points) else "mAP"
    points = [(s, m) for s, m in points if m.get(key) is not None]
    if not points:
        return "no subject has both latency and accuracy"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, m in points:
        ax.scatter(s["stages"]["total"]["median"], m[key], color=PRECISION_COLOURS.get(s["precision"], "grey"), s=40)
        ax.annotate(s["label"], (s["stages"]["total"]["median"], m[key]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    for precision, colour in PRECISION_COLOURS.items():
        if any(s["precision"] == precision for s, _ in points):
            ax.scatter([], [], color=colour, label=precision)
    ax.set_xlabel("median end-to-end ms per frame")
    ax.set_ylabel(f"{key} (%)")
    ax.set_title(f"{key} against latency, per backend and precision")
    ax.legend(fontsize=8)
    _save(fig, path)
    return None


def flops_and_peak(report: Mapping[str, Any], path: Path) -> str | None:
    flops = {p: f for p, f in report.get("flops", {}).items() if f.get("status") == "ok"}
    eff = report.get("efficiency", [])
    if not flops and not eff:
        return "no FLOPs counted"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [f["name"] for f in flops.values()]
    groups = sorted({g for f in flops.values() for g in f["detector"].get("groups_gflops", {"detector": 0})})
    bottom = [0.0] * len(names)
    for g in groups:
        values = [f["detector"].get("groups_gflops", {"detector": f["detector"]["gflops"]}).get(g, 0.0)
                  for f in flops.values()]
        ax1.bar(names, values, bottom=bottom, label=g)
        bottom = [a + b for a, b in zip(bottom, values)]
    ax1.set_ylabel("detector GFLOP per frame")
    ax1.set_title("Detector FLOPs by part")
    ax1.legend(fontsize=7)
    ax1.tick_params(axis="x", labelrotation=20, labelsize=8)
    if eff:
        labels = [e["label"] for e in eff]
        ax2.barh(labels, [e["achieved_gflops"] for e in eff],
                 color=[PRECISION_COLOURS.get(e["precision"], "grey") for e in eff])
        peak = report.get("machine", {}).get("peak", {})
        measured = report.get("machine", {}).get("measured", {})
        for value, style, what in ((peak.get("fp32_gflops"), "--", "fp32 peak (theory)"),
                                   (measured.get("fp32_gflops"), ":", "fp32 GEMM ceiling (measured)"),
                                   (peak.get("int8_gops"), "-.", "int8 peak (theory)"),
                                   (measured.get("int8_gops"), (0, (1, 3)), "int8 GEMM ceiling (measured)")):
            if value:
                ax2.axvline(value, linestyle=style, color="black", linewidth=1, label=f"{what} {value}")
        ax2.set_xscale("log")
        ax2.invert_yaxis()
        ax2.set_xlabel("GFLOP/s (log)")
        ax2.set_title("Achieved detector FLOP/s vs the machine's peak")
        ax2.legend(fontsize=7, loc="lower right")
    else:
        ax2.set_axis_off()
    _save(fig, path)
    return None


def write_all(report: Mapping[str, Any], out: Path) -> dict[str, str]:
    """Draw every plot into ``out``; ``{name: file name or "not drawn: <reason>"}``."""
    drawers = {"stages": stage_bars, "distributions": latency_distributions,
               "accuracy_vs_latency": accuracy_vs_latency, "flops": flops_and_peak}
    result = {}
    for name, draw in drawers.items():
        why = draw(report, out / PLOTS[name])
        result[name] = PLOTS[name] if why is None else f"not drawn: {why}"
    return result
