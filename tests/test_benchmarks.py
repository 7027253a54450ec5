"""benchmarks/: FLOPs, machine peak, latency statistics and alternation, the report end to end.

FLOPs: a hand-built ONNX graph whose MACs are counted by hand in the test; a graph whose shapes
only onnxruntime can resolve; the fiber-tiny-test detector and text graphs against
torch.utils.flop_counter on the same torch model. Peak: hand-computed figures for made-up CPUs.
Latency: the alternation order with fake runners, percentiles on fixed lists. Report: toy packages
(tests/toy_package.py) with --quick settings, including the INT8 package's default path against
every CPU path of the FP32 one (issue 14's verdict); bad inputs (a tampered package, a backend that is not
installed, data without annotations) each leave their part marked and exit status 1.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks import flops, int8_speed, latency, machine, report
from fiber.flops import checkpoint_flops, torch_flops
from common import package as pkg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_package import make_toy_packages  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- FLOPs

def _hand_graph() -> onnx.ModelProto:
    """One node of every counted kind; the MACs of each are worked out in test_flops_hand_count."""
    f, u8, i32 = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT32
    rng = np.random.default_rng(0)
    inits = {
        "w_mm": rng.standard_normal((8, 16)).astype(np.float32),
        "a_gemm": rng.standard_normal((4, 8)).astype(np.float32),
        "b_gemm": rng.standard_normal((6, 8)).astype(np.float32),
        "x_conv": rng.standard_normal((1, 4, 10, 10)).astype(np.float32),
        "w_conv": rng.standard_normal((6, 2, 3, 3)).astype(np.float32),
        "x_ci": np.ones((1, 2, 6, 6), np.uint8), "w_ci": np.ones((3, 2, 1, 1), np.int8),
        "a_mi": np.ones((3, 4), np.uint8), "b_mi": np.ones((4, 5), np.int8),
        "a_q": np.ones((2, 3), np.uint8), "b_q": np.ones((3, 7), np.uint8),
        "s": np.array(0.1, np.float32), "z": np.array(0, np.uint8),
        "e1": np.ones((2, 3, 4), np.float32), "e2": np.ones((2, 4, 5), np.float32),
        "x_ct": np.ones((1, 2, 3, 3), np.float32), "w_ct": np.ones((2, 4, 2, 2), np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w_mm"], ["y_mm"], name="mm"),
        helper.make_node("Gemm", ["a_gemm", "b_gemm"], ["y_gemm"], transB=1, name="gemm"),
        helper.make_node("Conv", ["x_conv", "w_conv"], ["y_conv"], group=2, strides=[2, 2],
                         pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("ConvInteger", ["x_ci", "w_ci"], ["y_ci"], name="convint"),
        helper.make_node("MatMulInteger", ["a_mi", "b_mi"], ["y_mi"], name="mmint"),
        helper.make_node("QLinearMatMul", ["a_q", "s", "z", "b_q", "s", "z", "s", "z"], ["y_q"], name="qmm"),
        helper.make_node("Einsum", ["e1", "e2"], ["y_e"], equation="bij,bjk->bik", name="einsum"),
        helper.make_node("ConvTranspose", ["x_ct", "w_ct"], ["y_ct"], strides=[2, 2], name="convT"),
        helper.make_node("Relu", ["y_mm"], ["y_relu"], name="relu"),     # not counted
    ]
    outs = {"y_relu": f, "y_gemm": f, "y_conv": f, "y_ci": i32, "y_mi": i32, "y_q": u8, "y_e": f, "y_ct": f}
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("x", f, ["batch", "tokens", 8])],
                              [helper.make_tensor_value_info(o, t, None) for o, t in outs.items()],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_flops_hand_count():
    c = flops.count_graph(_hand_graph(), {"batch": 1, "tokens": 5})
    hand = {                       # MACs, by hand
        "mm": 1 * 5 * 16 * 8,      # [1,5,8] @ [8,16]
        "gemm": 4 * 6 * 8,         # [4,8] @ [6,8]^T
        "conv": 6 * 5 * 5 * 2 * 9,  # out [1,6,5,5] (10 -> 5 at stride 2, pad 1), C_in/group = 2, 3x3
        "convint": 3 * 6 * 6 * 2,  # out [1,3,6,6], 1x1 kernel over 2 channels
        "mmint": 3 * 5 * 4,
        "qmm": 2 * 7 * 3,
        "einsum": 2 * 3 * 4 * 5,
        "convT": 2 * 3 * 3 * 4 * 4,  # every input pixel (18) x C_out 4 x 2x2 kernel
    }
    assert {n.name: n.macs for n in c.nodes} == hand
    assert c.flops == 2 * sum(hand.values()) == 8516
    assert c.shapes_from == "onnx shape inference"
    assert flops.count_graph(_hand_graph(), {"batch": 3, "tokens": 5}).nodes[0].macs == 3 * hand["mm"]
    with pytest.raises(flops.FlopsError, match="tokens"):
        flops.count_graph(_hand_graph(), {"batch": 1})


def test_flops_falls_back_to_onnxruntime_for_computed_shapes():
    """x [B, 12] reshaped to [-1, 4, 12 / 4] by a Shape/Gather/Div chain, then @ [3, 5]."""
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
             helper.make_node("Div", ["n", "four"], ["q"]),
             helper.make_node("Concat", ["minus1", "four", "q"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["xr"]), helper.make_node("MatMul", ["xr", "w"], ["y"])]
    inits = {"one": i64([1]), "four": i64([4]), "minus1": i64([-1]), "w": np.ones((3, 5), np.float32)}
    graph = helper.make_graph(nodes, "reshape", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    c = flops.count_graph(model, {"batch": 2})
    assert c.macs == 2 * 4 * 5 * 3        # [2, 4, 3] @ [3, 5]
    assert "onnxruntime" in c.shapes_from


def test_flops_count_a_deformable_conv_as_its_conv():
    """The DyHead's DeformConv (opset 19): MACs of the weights, as a Conv of the same shapes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 10])
    off = helper.make_tensor_value_info("off", TensorProto.FLOAT, ["batch", 18, 8, 10])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 9, 8, 10])
    w = numpy_helper.from_array(np.ones((6, 4, 3, 3), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(6, np.float32), "b")
    node = helper.make_node("DeformConv", ["x", "w", "off", "b", "mask"], ["y"], pads=[1, 1, 1, 1],
                            kernel_shape=[3, 3], name="head/deform")
    graph = helper.make_graph([node], "deform", [x, off, mask], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    c = flops.count_graph(model, {"batch": 1})
    assert c.macs == 6 * 8 * 10 * 4 * 9 and c.nodes[0].op_type == "DeformConv"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-init fiber-tiny-test checkpoint (fusion gates open) and its FP32 package."""
    import torch

    from compress import export
    from fiber.checkpoint import save_checkpoint
    from fiber.config import get_config
    from fiber.models import FiberForGrounding

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = get_config("fiber-tiny-test")
    model = FiberForGrounding(cfg)
    model.backbone.set_gates(0.5)
    ckpt = save_checkpoint(root / "ckpt", model.state_dict(), cfg, {"task": "fine"})
    export.export_package(export.ExportConfig(checkpoint=str(ckpt), out=str(root / "pkg"), buckets=(16, 32)))
    return {"checkpoint": Path(ckpt), "package": root / "pkg", "model": model.eval()}


@pytest.mark.parametrize("tokens", [16, 32])
def test_flops_match_torch_flop_counter(tiny, tokens):
    import torch

    counts = flops.package_flops(tiny["package"], tokens)
    model = tiny["model"]
    s = model.cfg.swin.img_size
    ids, mask = torch.ones(1, tokens, dtype=torch.int64), torch.ones(1, tokens, dtype=torch.int64)
    with torch.inference_mode():
        hidden = model.encode_text(ids, mask)
    want_text = torch_flops(model.encode_text, ids, mask)
    want_det = torch_flops(model.detect, torch.zeros(1, 3, s, s), hidden, mask)
    assert counts["text"].flops == pytest.approx(want_text, rel=0.02)
    assert counts["detector"].flops == pytest.approx(want_det, rel=0.02)
    groups = counts["detector"].groups()
    assert sum(groups.values()) == counts["detector"].flops
    assert "other" not in groups            # every counted node of the exporter's graph is placed
    for g in ("image backbone", "fused image blocks", "fused text layers", "cross-attention", "head"):
        assert groups[g] > 0, g
    ck = checkpoint_flops(tiny["checkpoint"], tokens)
    assert ck["detector"]["flops"] == want_det


# ----------------------------------------------------------------------------- machine

CPUINFO = "processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel name\t: {name}\n" \
          "cpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n\nprocessor\t: 1\n"


@pytest.mark.parametrize("vendor,family,flags,threads,cores,fp32,int8", [
    # Intel AVX-512 + VNNI at 2.0 GHz, 4 cores: 2 FMA x 16 lanes x 2 = 64 FLOP/cycle; VNNI 2 x 64 x 2 = 256
    ("GenuineIntel", 6, "fma avx2 avx512f avx512_vnni", 4, 8, 64 * 2.0 * 4, 256 * 2.0 * 4),
    # AMD Zen 4 (family 25) at 2.0 GHz: 256-bit datapath, 32 FLOP/cycle, VNNI 128; threads capped at 2 cores
    ("AuthenticAMD", 25, "fma avx2 avx512f avx512_vnni", 8, 2, 32 * 2.0 * 2, 128 * 2.0 * 2),
    # Sapphire Rapids with AMX: int8 2048 ops/cycle/core, 1 thread
    ("GenuineIntel", 6, "fma avx2 avx512f avx512_vnni amx_int8 amx_tile", 1, 4, 64 * 2.0, 2048 * 2.0),
    # AVX2 + FMA without VNNI: 32 FLOP/cycle; int8 via 16-bit madd: 2 x 16 x 2 = 64
    ("GenuineIntel", 6, "fma avx2", 1, 4, 32 * 2.0, 64 * 2.0),
])
def test_machine_peak_formula(vendor, family, flags, threads, cores, fp32, int8):
    text = CPUINFO.format(vendor=vendor, family=family, name="test cpu", mhz="2000.000", flags=flags)
    cpu = machine.parse_cpu(text, {"core(s) per socket": str(cores), "socket(s)": "1"}, 16, "x86_64")
    p = machine.peak(cpu, threads)
    assert (p.fp32_gflops, p.int8_gops) == (pytest.approx(fp32), pytest.approx(int8))
    assert cpu.mhz_source.startswith("/proc/cpuinfo")


def test_machine_prefers_max_clock():
    text = CPUINFO.format(vendor="GenuineIntel", family=6, name="x", mhz="800.0", flags="fma avx2")
    cpu = machine.parse_cpu(text, {"cpu max mhz": "3500.0000", "core(s) per socket": "2"}, 2, "x86_64")
    assert cpu.mhz == 3500.0 and machine.peak(cpu, 2).fp32_gflops == pytest.approx(32 * 3.5 * 2)


# ----------------------------------------------------------------------------- latency

def test_percentiles_on_fixed_lists():
    values = list(range(1, 102))              # 1..101: the q-th percentile is 1 + q exactly
    random.Random(0).shuffle(values)
    s = latency.summarize(values)
    assert (s["median"], s["p90"], s["p99"], s["min"], s["runs"]) == (51, 91, 100, 1, 101)
    s = latency.summarize([4.0, 1.0, 3.0, 2.0])  # linear interpolation: p90 at rank 2.7 -> 3 + 0.7
    assert (s["median"], s["p90"], s["p99"], s["mean"]) == (2.5, 3.7, 3.97, 2.5)
    with pytest.raises(ValueError):
        latency.summarize([])


def test_alternation_order_with_fake_runners():
    calls: list[str] = []

    def runner(name):
        def run():
            calls.append(name)
            return {"network": float(len(calls))}  # the global call number: shows which calls were kept
        return run

    out = latency.alternate({k: runner(k) for k in "ABC"}, rounds=2, block=2, settle=1, warmup=1)
    assert "".join(calls) == "ABC" + "AAABBBCCC" * 2
    # warm-up 3 calls, then per round A: untimed #4, timed #5 #6; B: #7 untimed, #8 #9 timed ...
    assert out["A"]["network"] == [5, 6, 14, 15]
    assert out["B"]["network"] == [8, 9, 17, 18]
    assert out["C"]["network"] == [11, 12, 20, 21]
    assert latency.schedule(["A", "B"], 1, 1, 0) == [("A", True), ("B", True)]


def test_parse_backends():
    assert latency.parse_backends("default") == (latency.DEFAULT_BACKENDS, False)
    assert latency.parse_backends("ort,openvino,ort") == (("onnxruntime", "openvino"), True)
    with pytest.raises(ValueError, match="cuda"):
        latency.parse_backends("onnxruntime,cuda")


# ----------------------------------------------------------------------------- report

@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    root = tmp_path_factory.mktemp("toys")
    packages = make_toy_packages(root)
    subprocess.run([sys.executable, "-m", "fiber.data.synth", "--out", str(root / "data"), "--images", "3",
                    "--seed", "0"], cwd=REPO, check=True, capture_output=True)
    return {**packages, "data": root / "data", "root": root}


def run_report(out: Path, package: Path, *args: str) -> tuple[int, dict, str]:
    argv = ["--package", str(package), "--out", str(out), "--quick", "--runs", "2", "--limit", "2",
            "--threads", "1", "--no-progress", *args]
    code = report.main(report.get_args_parser().parse_args(argv))
    return code, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def json_numbers(obj) -> set[str]:
    if isinstance(obj, bool):
        return set()
    if isinstance(obj, (int, float)):
        return {str(obj)}
    if isinstance(obj, dict):
        return set().union(*(json_numbers(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(json_numbers(v) for v in obj)) if obj else set()
    return set()


def table_numbers(md: str) -> list[str]:
    """Every table cell of report.md that is a bare number."""
    cells = [c.strip() for line in md.splitlines() if line.startswith("|") for c in line.strip("|").split("|")]
    return [c for c in cells if re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", c)]


@pytest.fixture(scope="module")
def toy_report(toys, tmp_path_factory):
    """The report of toy-int8 against toy, once for the tests that read it; the autotune cache of
    its runtime-default paths goes to a temporary XDG_CACHE_HOME."""
    tmp = tmp_path_factory.mktemp("toy-report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
        code, data, md = run_report(tmp / "rep", toys["toy-int8"], "--compare", str(toys["toy"]),
                                    "--data", str(toys["data"]), "--backend", "onnxruntime")
    return {"code": code, "data": data, "md": md, "out": tmp / "rep", "cache": tmp / "cache"}


def test_report_on_toy_packages(toys, toy_report):
    code, data, md = toy_report["code"], toy_report["data"], toy_report["md"]
    assert code == 0, data["missing"]
    for name in ("report.md", "report.json", *report.plots.PLOTS.values()):
        assert (toy_report["out"] / name).is_file(), name
    for png in report.plots.PLOTS.values():
        assert (toy_report["out"] / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = table_numbers(md)
    assert len(numbers) > 100
    known = json_numbers(data)
    assert [n for n in numbers if n not in known] == []
    # what the report must carry
    assert data["machine"]["peak"]["fp32_gflops"] and data["machine"]["measured"]["int8_gops"]
    assert {p["sha256"] for p in data["packages"]} == {
        pkg.package_digest(pkg.read_manifest(toys[k])) for k in ("toy", "toy-int8")}
    assert data["command"].startswith("python -m benchmarks.report") and data["date"]
    assert data["machine"]["versions"]["onnxruntime"]
    labels = {s["label"] for s in data["latency"]["subjects"]}
    assert labels == {"toy onnxruntime", "toy-int8 onnxruntime"}
    names = {r["name"] for r in data["ratios"] if r["status"] == "ok"}
    assert {"INT8 vs FP32 detector latency", "INT8 vs FP32 R@1", "C extension vs numpy pre+post",
            "end-to-end vs network-only FPS (frame by frame)", "uncached vs cached prompt latency"} <= names
    r = next(r for r in data["ratios"] if r["name"] == "INT8 vs FP32 detector latency")
    fp, q = (next(s for s in data["latency"]["subjects"] if s["label"] == lab) for lab in
             ("toy onnxruntime", "toy-int8 onnxruntime"))
    assert r["value"] == round(fp["stages"]["network"]["median"] / q["stages"]["network"]["median"], 2)
    assert "## Promised ratios" in md and "student vs teacher" in md and "no --teacher given" in md


def test_report_int8_vs_fastest_fp32_path(toys, toy_report):
    """Issue 14: every CPU path of both packages and their runtime defaults, timed side by side in the
    report, the verdict (INT8 default vs fastest FP32, target 1.3x) in report.json and report.md."""
    data, md = toy_report["data"], toy_report["md"]
    m = data["int8_paths"]
    assert m["status"] == "ok", m.get("reason")
    assert (m["fp32"], m["int8"]) == (str(toys["toy"]), str(toys["toy-int8"]))
    assert m["settings"]["threads"] == 1 and m["settings"]["rounds"] == report.QUICK.int8_rounds
    # every path is timed or left out with its reason
    every = {c.label for c in int8_speed.candidates(m["fp32"], m["int8"], "onnxruntime", True, 1)}
    rows = {r["label"]: r for r in m["rows"]}
    assert set(rows) | set(m["left_out"]) == every and not set(rows) & set(m["left_out"])
    assert all(why for why in m["left_out"].values())
    assert {int8_speed.FP32_DEFAULT, int8_speed.INT8_DEFAULT, "fp32 onnxruntime",
            "int8 onnxruntime cpu_file"} <= set(rows)
    runs = report.QUICK.int8_rounds * (report.QUICK.int8_block - 1)
    assert all(r["runs"] == runs and r["median_ms"] > 0 for r in rows.values())
    # the verdict: the INT8 default against the fastest FP32 row
    v = m["verdict"]
    fastest = min((r for r in rows.values() if r["label"].startswith("fp32")), key=lambda r: r["median_ms"])
    assert (v["fastest_fp32"], v["fastest_fp32_ms"]) == (fastest["label"], fastest["median_ms"])
    assert v["int8_default_ms"] == rows[int8_speed.INT8_DEFAULT]["median_ms"]
    assert v["int8_default_vs_fastest_fp32"] == round(v["fastest_fp32_ms"] / v["int8_default_ms"], 3)
    assert v["target"] == 1.3 and v["met"] == (v["int8_default_vs_fastest_fp32"] >= 1.3)
    for r in rows.values():
        assert r["speedup_vs_fastest_fp32"] == round(v["fastest_fp32_ms"] / r["median_ms"], 3)
    ratio = next(r for r in data["ratios"] if r["name"] == "INT8 default path vs fastest FP32 path")
    assert ratio["status"] == "ok" and ratio["value"] == v["int8_default_vs_fastest_fp32"]
    # what the runtime picks by itself, measured now (the cache was empty) and remembered in the tmp cache
    for k, pkg_path in (("fp32", toys["toy"]), ("int8", toys["toy-int8"])):
        d = m["defaults"][k]
        assert d["package"] == str(pkg_path) and d["path"] in d["ms"] and d["remembered"] is False
        assert d["ms"][d["path"]] == min(d["ms"].values())
    assert "onnxruntime cpu_file" in m["defaults"]["int8"]["ms"]
    cache = json.loads((toy_report["cache"] / "fiber-edge" / "cpu-paths.json").read_text())
    assert sorted(e["package"] for e in cache.values()) == sorted(map(str, (toys["toy"], toys["toy-int8"])))
    # report.md: the section, its table with the numbers of report.json, the one-sentence verdict
    section = md.split("## INT8 vs the fastest FP32 path\n", 1)[1].split("\n## ", 1)[0]
    for r in rows.values():
        assert f"| {r['label']} | {r['median_ms']} | {r['p10_ms']} | {r['p90_ms']} | {r['runs']} | " \
               f"{r['speedup_vs_fastest_fp32']} |" in section
    for k in ("fp32", "int8"):
        assert f"| {k} | {m['defaults'][k]['package']} | {m['defaults'][k]['path']} | no |" in section
    assert re.fullmatch(r"INT8's default path is \d+\.\d\dx the fastest FP32 path \(target 1\.3x\): "
                        r"(met|not met; runtime\.detect runs each package on its fastest path by itself "
                        r"\(engines\.autotune\))", m["sentence"])
    assert f"{v['int8_default_vs_fastest_fp32']:.2f}x" in m["sentence"]
    assert ("not met" in m["sentence"]) == (not v["met"])
    assert f"**{m['sentence']}.**" in section


def test_int8_paths_sentence():
    met = {"int8_default_vs_fastest_fp32": 1.456, "target": 1.3, "met": True}
    assert report.int8_paths_sentence(met) == "INT8's default path is 1.46x the fastest FP32 path (target 1.3x): met"
    missed = {"int8_default_vs_fastest_fp32": 1.199, "target": 1.3, "met": False}
    assert report.int8_paths_sentence(missed) == (
        "INT8's default path is 1.20x the fastest FP32 path (target 1.3x): not met; "
        "runtime.detect runs each package on its fastest path by itself (engines.autotune)")


def test_report_bad_inputs_are_marked_and_the_rest_is_produced(toys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tampered = shutil.copytree(toys["toy"], tmp_path / "tampered")
    with open(tampered / pkg.DETECTOR_GRAPH, "ab") as f:
        f.write(b"\0")
    empty = tmp_path / "no-annotations"
    empty.mkdir()
    code, data, md = run_report(tmp_path / "rep", toys["toy-int8"], "--compare", str(tampered),
                                "--data", str(empty), "--backend", "onnxruntime,tensorrt")
    assert code == 1
    missing = "\n".join(data["missing"])
    assert re.search(r"package .*tampered: package does not verify: .*sha256", missing)
    assert re.search(r"latency of .*toy-int8 on tensorrt: .*TensorRT", missing)
    assert re.search(r"accuracy: data folder .*no-annotations: no annotations", missing)
    assert "not measured: package does not verify" in md and "## Not measured" in md
    # no verified FP32 package: the path matrix is not run, says why, and is not a failure of the report
    assert data["int8_paths"]["status"] == "skipped"
    assert "## INT8 vs the fastest FP32 path\n\nnot measured: needs a verified INT8 and FP32 package" in md
    assert not any("fastest FP32" in line for line in data["missing"])
    ok = [s for s in data["latency"]["subjects"] if s["status"] == "ok"]
    assert [s["label"] for s in ok] == ["toy-int8 onnxruntime"]          # the rest was measured
    assert (tmp_path / "rep" / "latency_stages.png").is_file()
    assert data["plots"]["accuracy_vs_latency"].startswith("not drawn")
    known = json_numbers(data)
    assert [n for n in table_numbers(md) if n not in known] == []


def test_report_cli_bad_arguments(tmp_path, toys):
    argv = [sys.executable, "-m", "benchmarks.report", "--package", str(toys["toy"]), "--data", str(toys["data"]),
            "--out", str(tmp_path / "r"), "--backend", "cuda"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["benchmarks.report: --backend 'cuda' is not one of "
                                                "['onnxruntime', 'openvino', 'tensorrt', 'tensorrt-rtx']"]
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ benchmarks.kinds


class _SceneDetector:
    """A stand-in detector for ``benchmarks.kinds.measure``: it regenerates the scene it is given
    (scenes come in order) and returns each object's box labelled by ``name(obj)``, plus a
    higher-scoring wrong box that covers nothing."""

    def __init__(self, images, seed, name):
        from fiber.data.synth import SynthConfig, make_scene
        self.scenes = [make_scene(SynthConfig(images=images, seed=seed), i)[1] for i in range(images)]
        self.name, self.calls = name, 0

    def detect(self, image, prompt):
        from types import SimpleNamespace
        kinds = prompt.split(". ")
        objs = self.scenes[self.calls].objects
        self.calls += 1
        boxes = [o.box for o in objs] + [[0, 0, 1, 1]]
        labels = [self.name(o) for o in objs] + [kinds[0]]
        keep = [j for j, lab in enumerate(labels) if lab in kinds]
        return SimpleNamespace(boxes=np.array([boxes[j] for j in keep], np.float32).reshape(-1, 4),
                               scores=np.array([0.5] * (len(keep) - 1) + [0.9], np.float32)[:len(keep)],
                               phrase_index=np.array([kinds.index(labels[j]) for j in keep], np.int32))


def test_kinds_counts_an_object_named_by_its_best_covering_box():
    from benchmarks import kinds

    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], np.float32)
    objects = np.array([[0, 0, 10, 10], [50, 50, 61, 61], [100, 100, 110, 110]], np.float32)
    named = kinds.name_objects(objects, boxes, np.array([0.3, 0.6, 0.2]), ["circle", "hexagon", "star"])
    assert named == ["hexagon", "star", kinds.NONE]     # the better of two covering boxes; no cover
    assert kinds.name_objects(objects, np.zeros((0, 4)), np.zeros(0), []) == [kinds.NONE] * 3

    right = kinds.measure(_SceneDetector(6, 4242, lambda o: o.kind), 6, 4242)
    assert right["right"] == 1.0 and right["objects"] > 6 and not right["confusions"]
    circles = kinds.measure(_SceneDetector(6, 4242, lambda o: "circle"), 6, 4242)
    share = circles["by_kind"].get("circle", {"objects": 0})["objects"] / circles["objects"]
    assert circles["right"] == pytest.approx(share, abs=1e-4)
    assert all(v["right"] == 0.0 for k, v in circles["by_kind"].items() if k != "circle")
    assert all(key.endswith("-> circle") for key in circles["confusions"])


def test_kinds_cli_refuses_a_missing_package_in_one_line(tmp_path, capsys):
    from benchmarks import kinds

    args = kinds.get_args_parser().parse_args(["--package", str(tmp_path / "nope")])
    assert kinds.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--package" in err[0] and "does not exist" in err[0]
    assert kinds.main(kinds.get_args_parser().parse_args(["--package", str(tmp_path), "--images", "0"])) == 2


def test_feature_probe_separates_a_readable_pair_and_not_noise(capsys):
    """ridge_probe: near 1 where one feature carries the label, near 0.5 where none does; too few
    objects or one kind only is refused; a bad --pairs value is an argparse error."""
    from benchmarks import feature_probe

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    noise = rng.normal(size=(400, 16))
    readable = noise.copy()
    readable[:, 5] += 3.0 * (2 * y - 1)
    assert feature_probe.ridge_probe(readable, y) > 0.95
    assert abs(feature_probe.ridge_probe(noise, y) - 0.5) < 0.1
    with pytest.raises(ValueError, match="both kinds"):
        feature_probe.ridge_probe(noise[:10], np.zeros(10, int))
    with pytest.raises(SystemExit):
        feature_probe.get_args_parser().parse_args(["--checkpoint", "x", "--pairs", "hexagon/hexagon"])
    assert "want two different kinds" in capsys.readouterr().err
    args = feature_probe.get_args_parser().parse_args(["--checkpoint", "/nonexistent/run"])
    assert feature_probe.main(args) == 2


def test_feature_probe_reads_one_centre_cell_per_object_at_every_depth(tiny):
    from benchmarks import feature_probe

    pair = ("hexagon", "circle")
    feats, labels = feature_probe.collect(str(tiny["checkpoint"]), (pair,), 6, 4242)
    assert len(labels[pair]) > 0 and set(labels[pair]) <= {0, 1}
    dims = {d: {len(f) for f in feats[(pair, d)]} for d in feature_probe.DEPTHS}
    assert all(len(feats[(pair, d)]) == len(labels[pair]) for d in feature_probe.DEPTHS)
    assert all(len(v) == 1 for v in dims.values())                  # one feature size per depth
    cfg = tiny["model"].cfg
    assert dims["patch_embed"] == {cfg.swin.embed_dim} and dims["stage4"] == {cfg.swin.embed_dim * 8}
    assert dims["tower_p3"] == {cfg.head.fpn_channels}


# ------------------------------------------------------------------ benchmarks.prompt_probe


class _FixedDetector:
    """A stand-in detector: every prompt gets the same three boxes, one per phrase index 0, 1, 0."""

    def detect(self, image, prompt):
        from types import SimpleNamespace
        return SimpleNamespace(boxes=np.array([[0, 0, 9.6, 9.4], [5, 5, 20, 20], [1, 1, 3, 3]], np.float32),
                               scores=np.array([0.15, 0.6, 0.05], np.float32),
                               phrase_index=np.array([0, 1, 0], np.int32), phrases=tuple(prompt.split(". ")))


def test_prompt_probe_lists_boxes_above_the_floor_best_first_and_marks_the_threshold():
    from benchmarks import prompt_probe

    image = np.zeros((4, 4, 3), np.uint8)
    records = prompt_probe.probe(_FixedDetector(), [("a.png", image)], ["blue star. blue bolt", "red ring. x"], 0.1)
    assert [(r["image"], r["prompt"]) for r in records] == [("a.png", "blue star. blue bolt"), ("a.png", "red ring. x")]
    assert records[0]["detections"] == [{"phrase": "blue bolt", "score": 0.6, "box": [5, 5, 20, 20]},
                                        {"phrase": "blue star", "score": 0.15, "box": [0, 0, 10, 9]}]
    assert records[1]["detections"][0]["phrase"] == "x"
    line = prompt_probe.format_record(records[0], 0.27)
    assert line == "a.png | blue star. blue bolt: *blue bolt 0.60 [5, 5, 20, 20], blue star 0.15 [0, 0, 10, 9]"
    assert "*" not in prompt_probe.format_record(records[0], None)
    assert prompt_probe.format_record({"image": "b", "prompt": "p", "detections": []}, 0.3) == "b | p: -"


def test_prompt_probe_cli_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    from benchmarks import prompt_probe

    def run(*argv):
        code = prompt_probe.main(prompt_probe.get_args_parser().parse_args(list(argv)))
        return code, capsys.readouterr().err.strip().splitlines()

    code, err = run("--checkpoint", str(tmp_path / "nope"))
    assert code == 2 and len(err) == 1 and "--checkpoint" in err[0] and "does not exist" in err[0]
    code, err = run("--checkpoint", str(tmp_path), "--image", str(tmp_path / "x.png"))
    assert code == 2 and err == [f"benchmarks.prompt_probe: --image {tmp_path / 'x.png'}: does not exist"]
    code, err = run("--checkpoint", str(tmp_path), "--image", str(tmp_path))
    assert code == 2 and "no .png or .jpg files" in err[0]
    code, err = run("--checkpoint", str(tmp_path), "--floor", "2")
    assert code == 2 and "--floor" in err[0]
    code, err = run("--checkpoint", str(tmp_path), "--prompt", " ")
    assert code == 2 and "empty prompt" in err[0]
