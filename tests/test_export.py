"""compress.export (FP32 packages) and the ONNX rewrites (onnx_export, word_table, qdq,
shape_folding) on the tiny config with random weights.

Parity: ONNX Runtime vs PyTorch for two text lengths and batch sizes; the split text/detector pair
vs the unsplit torch forward. The manifest is checked against the files with an independent
sha256 and against the ONNX files' own interfaces. Refusals: existing --out, wrong config, coarse
checkpoint, a failure injected half-way (nothing left behind). The Q/DQ clean-up is checked on a
hand-built graph against numpy.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import engines
from common import package as pkg
from compress import export, onnx_export, onnx_graph, qdq, shape_folding, word_table
from fiber.checkpoint import save_checkpoint
from fiber.config import get_config
from fiber.models import FiberForGrounding

REPO = Path(__file__).resolve().parents[1]
CONFIG = "fiber-tiny-test"
BUCKETS = "16,32"
TOL = 1e-4          # FP32 ONNX vs PyTorch, relative to 1 + max |torch|


def make_checkpoint(path: Path, name: str = CONFIG, task: str = "fine", seed: int = 0) -> Path:
    """A random-init checkpoint with the fusion gates opened (so fusion changes the outputs)."""
    torch.manual_seed(seed)
    cfg = get_config(name)
    model = FiberForGrounding(cfg)
    model.backbone.set_gates(0.5)
    return save_checkpoint(path, model.state_dict(), cfg, {"task": task})


def make_data(path: Path, images: int = 8) -> Path:
    result = run_cli("fiber.data.synth", "--out", str(path), "--images", str(images), "--seed", "0")
    assert result.returncode == 0, result.stderr
    return path


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module *args`` in-process: ``main(get_args_parser().parse_args(args))`` with stdout
    and stderr captured, as a CompletedProcess (an argparse error is its SystemExit code). torch's
    thread count is restored afterwards (``--threads`` sets it)."""
    cli = importlib.import_module(module)
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(cli.get_args_parser().parse_args(list(args)))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            torch.set_num_threads(threads)
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def run_program(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module *args`` in a child process (one smoke test per CLI)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def ort_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / (1 + np.max(np.abs(b))))


def random_prompt_inputs(cfg, batch: int, tokens: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, tokens + 1, size=batch)
    mask = (np.arange(tokens)[None] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1000, 20000, size=(batch, tokens)).astype(np.int64) * mask
    image = rng.standard_normal((batch, 3, cfg.swin.img_size, cfg.swin.img_size)).astype(np.float32)
    return {pkg.INPUT_IDS: ids, pkg.ATTENTION_MASK: mask, pkg.IMAGE: image}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "ckpt")
    data = make_data(root / "data")
    out = root / "fiber-tiny"
    result = run_cli("compress.export", "--checkpoint", str(ckpt), "--out", str(out), "--data", str(data),
                     "--buckets", BUCKETS, "--threads", "1")
    assert result.returncode == 0, result.stderr
    model = FiberForGrounding(get_config(CONFIG))
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    # the package's weights: the checkpoint with text.onnx's word table as per-row int8 (the default)
    shipped, _ = export.int8_word_embeddings(model.eval())
    return {"root": root, "ckpt": ckpt, "data": data, "package": out, "model": shipped.eval(),
            "model_fp32_words": model}


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("batch,tokens", [(1, 7), (2, 23)])
def test_onnx_matches_pytorch(work, batch, tokens):
    model, package = work["model"], work["package"]
    x = random_prompt_inputs(model.cfg, batch, tokens, seed=tokens)
    ids, mask, image = (torch.from_numpy(x[k]) for k in (pkg.INPUT_IDS, pkg.ATTENTION_MASK, pkg.IMAGE))
    with torch.no_grad():
        hidden_t = model.encode_text(ids, mask)
        det_t = model.detect(image, hidden_t, mask)
    hidden = ort_session(package / pkg.TEXT_GRAPH).run(None, {pkg.INPUT_IDS: x[pkg.INPUT_IDS],
                                                              pkg.ATTENTION_MASK: x[pkg.ATTENTION_MASK]})[0]
    assert rel_diff(hidden, hidden_t.numpy()) < TOL
    out = ort_session(package / pkg.DETECTOR_GRAPH).run(
        list(pkg.DETECTOR_OUTPUTS), {pkg.IMAGE: x[pkg.IMAGE], pkg.TEXT_HIDDEN: hidden_t.numpy(),
                                     pkg.ATTENTION_MASK: x[pkg.ATTENTION_MASK]})
    for name, got, want in zip(pkg.DETECTOR_OUTPUTS, out, det_t):
        assert got.shape == tuple(want.shape), name
        assert rel_diff(got, want.numpy()) < TOL, name


def test_split_pair_equals_unsplit_model(work):
    """text.onnx -> detector.onnx == FiberForGrounding.forward (one torch pass, no split)."""
    model, package = work["model"], work["package"]
    x = random_prompt_inputs(model.cfg, 2, 16, seed=3)
    with torch.no_grad():
        full = model(*(torch.from_numpy(x[k]) for k in (pkg.IMAGE, pkg.INPUT_IDS, pkg.ATTENTION_MASK)))
    hidden = ort_session(package / pkg.TEXT_GRAPH).run(None, {k: x[k] for k in pkg.TEXT_INPUTS})[0]
    out = ort_session(package / pkg.DETECTOR_GRAPH).run(
        list(pkg.DETECTOR_OUTPUTS), {pkg.IMAGE: x[pkg.IMAGE], pkg.TEXT_HIDDEN: hidden,
                                     pkg.ATTENTION_MASK: x[pkg.ATTENTION_MASK]})
    for got, want in zip(out, (full.boxes, full.token_logits, full.centerness)):
        assert rel_diff(got, want.numpy()) < TOL
    # the fusion gates are open: the text really changes the detector's output
    other = ort_session(package / pkg.DETECTOR_GRAPH).run(
        [pkg.TOKEN_LOGITS], {pkg.IMAGE: x[pkg.IMAGE], pkg.TEXT_HIDDEN: hidden[::-1].copy(),
                             pkg.ATTENTION_MASK: x[pkg.ATTENTION_MASK]})[0]
    assert rel_diff(other, out[1]) > 1e-3


def test_letterbox_package_on_a_fixed_canvas_matches_pytorch_through_the_runtime(work, tmp_path):
    """``--canvas 64x96`` on a letterbox config: the manifest's input is the [64, 96] canvas, and the
    runtime over the package gives the detections of the runtime over the PyTorch model on it."""
    from fiber.torch_engines import torch_detector
    from runtime.predictor import Detector

    out = tmp_path / "wide"
    result = run_cli("compress.export", "--checkpoint", str(work["ckpt"]), "--out", str(out),
                     "--buckets", BUCKETS, "--canvas", "64x96", "--threads", "1")
    assert result.returncode == 0, result.stderr
    manifest = pkg.read_manifest(out)
    assert manifest["input"]["size"] == [64, 96]
    assert manifest["model"]["config"]["input"]["letterbox_canvas"] == [64, 96]
    model = work["model"]
    model.cfg = model.cfg.with_canvas((64, 96))
    image = np.random.default_rng(5).integers(0, 256, (120, 160, 3), dtype=np.uint8)  # 4:3
    try:
        with Detector(out, backend="onnxruntime", threshold=0.0) as det, \
                torch_detector(model, [16, 32], threshold=0.0) as ref:
            assert det.input_hw == ref.input_hw == (64, 96)
            got, want = det.detect(image, "red star. blue bolt"), ref.detect(image, "red star. blue bolt")
    finally:
        model.cfg = get_config(CONFIG)
    assert len(got.boxes) == len(want.boxes) > 0
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)
    np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-2)
    bad = run_cli("compress.export", "--checkpoint", str(work["ckpt"]), "--out", str(tmp_path / "bad"),
                  "--canvas", "64x90")
    assert bad.returncode == 2 and "--canvas: canvas 64x90 is not divisible by 32" in bad.stderr
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- int8 word table

def test_int8_gather_table_equals_the_dequantised_rows():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 6)).astype(np.float32)
    table[7] = 0.0                                          # an all-zero row (padding) stays zero
    q, scale = word_table.quantize_rows(table)
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and scale[7] == 1.0
    assert np.abs(word_table.dequantize_rows(q, scale) - table).max() <= scale.max() / 2 + 1e-7
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
         helper.make_node("Relu", ["rows"], ["out"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 6])],
        [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    info = word_table.int8_gather_table(model, "table", q, scale)
    onnx.checker.check_model(model, full_check=True)
    assert info == {"bytes_fp32": 50 * 6 * 4, "bytes": 50 * 6 + 50 * 4}
    assert not [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and list(i.dims) == [50, 6]]
    assert not [i for i in model.graph.initializer if i.data_type == TensorProto.INT8]   # TensorRT refuses those
    ids = np.array([[0, 7, 49], [3, 3, 12]], dtype=np.int64)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, np.maximum(word_table.dequantize_rows(q, scale)[ids], 0))
    other = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "table"], ["out"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 50])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 6])],
        [numpy_helper.from_array(table, "table")]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnx_graph.OnnxExportError, match="only as Gather data"):
        word_table.int8_gather_table(other, "table", q, scale)


def test_text_graph_with_int8_words_is_smaller_and_close_to_fp32(work, tmp_path):
    """The shipped text.onnx (int8 word table) vs an fp32-table export of the same checkpoint: a
    smaller file whose hidden states stay close to the FP32 table's; the fp32 export equals the
    checkpoint itself."""
    manifest = json.loads((work["package"] / pkg.MANIFEST).read_text())
    words = manifest["graphs"]["text"]["word_embeddings"]
    assert words["dtype"] == "int8" and words["bytes"] < words["bytes_fp32"] / 3
    model = work["model_fp32_words"]
    x = random_prompt_inputs(model.cfg, 2, 12, seed=5)
    _, info = onnx_export.export_text(model, x, tmp_path / "text-fp32.onnx")
    assert info is None
    assert (work["package"] / pkg.TEXT_GRAPH).stat().st_size < (tmp_path / "text-fp32.onnx").stat().st_size
    feeds = {k: x[k] for k in pkg.TEXT_INPUTS}
    int8_hidden = ort_session(work["package"] / pkg.TEXT_GRAPH).run(None, feeds)[0]
    fp32_hidden = ort_session(tmp_path / "text-fp32.onnx").run(None, feeds)[0]
    with torch.no_grad():
        want = model.encode_text(*(torch.from_numpy(x[k]) for k in pkg.TEXT_INPUTS)).numpy()
    assert rel_diff(fp32_hidden, want) < TOL
    assert 0 < rel_diff(int8_hidden, fp32_hidden) < 0.05
    cos = (int8_hidden * fp32_hidden).sum(-1) / np.linalg.norm(int8_hidden, axis=-1) / np.linalg.norm(fp32_hidden, axis=-1)
    assert cos.min() > 0.999


@pytest.fixture(scope="module")
def fp32_words(work):
    """The work checkpoint exported with --text-words fp32 (read only: repack writes elsewhere)."""
    old = work["root"] / "fp32-words"
    result = run_cli("compress.export", "--checkpoint", str(work["ckpt"]), "--out", str(old), "--buckets", BUCKETS,
                     "--data", str(work["data"]), "--text-words", "fp32", "--threads", "1")
    assert result.returncode == 0, result.stderr
    return old


def test_repack_turns_an_fp32_word_table_into_the_exporters_int8_one(work, fp32_words, tmp_path):
    """A package exported with --text-words fp32, repacked: the same text.onnx outputs as the int8
    export of the same checkpoint, a valid manifest (hashes, table info, re-measured accuracy),
    every other file unchanged; an int8 table or an existing --out is refused."""
    old = fp32_words
    before = json.loads((old / pkg.MANIFEST).read_text())
    assert before["graphs"]["text"]["word_embeddings"] == {"dtype": "float32"}
    new = tmp_path / "repacked"
    result = run_cli("compress.repack", "--package", str(old), "--out", str(new), "--data", str(work["data"]),
                     "--threads", "1")
    assert result.returncode == 0, result.stderr
    manifest = pkg.load_package_manifest(new)                   # hashes match the files
    assert manifest["graphs"]["text"]["word_embeddings"]["dtype"] == "int8"
    assert manifest["accuracy"]["fp32"].keys() == before["accuracy"]["fp32"].keys()
    assert 0 < manifest["repack"]["text_hidden_max_rel_diff_vs_before"] < 0.05
    assert (new / pkg.TEXT_GRAPH).stat().st_size < (old / pkg.TEXT_GRAPH).stat().st_size
    assert (new / pkg.DETECTOR_GRAPH).read_bytes() == (old / pkg.DETECTOR_GRAPH).read_bytes()
    x = random_prompt_inputs(work["model"].cfg, 2, 9, seed=11)
    feeds = {k: x[k] for k in pkg.TEXT_INPUTS}
    got = ort_session(new / pkg.TEXT_GRAPH).run(None, feeds)[0]
    want = ort_session(work["package"] / pkg.TEXT_GRAPH).run(None, feeds)[0]
    assert rel_diff(got, want) < 1e-6
    with np.load(new / pkg.reference_file("text")) as z:
        assert rel_diff(ort_session(new / pkg.TEXT_GRAPH).run(None, {k: z[k] for k in pkg.TEXT_INPUTS})[0],
                        z[pkg.TEXT_HIDDEN]) < 1e-6
    again = run_program("compress.repack", "--package", str(new), "--out", str(tmp_path / "again"))  # smoke
    assert again.returncode == 2 and "int8 already" in again.stderr and not (tmp_path / "again").exists()
    exists = run_cli("compress.repack", "--package", str(old), "--out", str(new))
    assert exists.returncode == 2 and "already exists" in exists.stderr


def test_repack_guard_refuses_a_drop_and_writes_nothing(work, fp32_words, tmp_path, monkeypatch):
    from compress import repack

    old = fp32_words
    r1 = json.loads((old / pkg.MANIFEST).read_text())["accuracy"]["fp32"]["R@1"]
    monkeypatch.setattr(repack, "evaluate_package", lambda *a, **k: {"R@1": r1 - 1.5})
    with pytest.raises(export.AccuracyGuardError, match="fp32 R@1 .* 1.50 points below"):
        repack.repack(old, tmp_path / "new", str(work["data"]), max_drop=1.0)
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- package contents

def test_graphs_pass_full_check(work):
    for name in (pkg.TEXT_GRAPH, pkg.DETECTOR_GRAPH):
        onnx.checker.check_model(str(work["package"] / name), full_check=True)
        graph = onnx.load(str(work["package"] / name))
        assert graph.opset_import[0].version >= 17
        assert not [n for n in graph.graph.node if n.op_type in ("If", "QuantizeLinear")]


def test_manifest_lists_every_file_and_tensor(work):
    package = work["package"]
    manifest = json.loads((package / pkg.MANIFEST).read_text())
    on_disk = sorted(p.relative_to(package).as_posix() for p in package.rglob("*")
                     if p.is_file() and p.name != pkg.MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    assert {pkg.TEXT_GRAPH, pkg.DETECTOR_GRAPH, pkg.TOKENIZER, "reference/text.npz",
            "reference/detector.npz"} <= set(on_disk)
    for name, info in manifest["files"].items():
        data = (package / name).read_bytes()
        assert info == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    cfg = get_config(CONFIG)
    want = {"text": ({pkg.INPUT_IDS: (["batch", "tokens"], "int64"), pkg.ATTENTION_MASK: (["batch", "tokens"], "int64")},
                     {pkg.TEXT_HIDDEN: (["batch", "tokens", 16], "float32")}),
            "detector": ({pkg.IMAGE: (["batch", 3, 64, 64], "float32"),
                          pkg.TEXT_HIDDEN: (["batch", "tokens", 16], "float32"),
                          pkg.ATTENTION_MASK: (["batch", "tokens"], "int64")},
                         {pkg.BOXES: (["batch", 84, 4], "float32"), pkg.TOKEN_LOGITS: (["batch", 84, "tokens"], "float32"),
                          pkg.CENTERNESS: (["batch", 84], "float32")})}
    # 84 anchors = 8x8 + 4x4 + 2x2 cells of the 64 px input at strides 8, 16, 32
    assert 84 == sum((cfg.swin.img_size // s) ** 2 for s in (8, 16, 32))
    for graph, (inputs, outputs) in want.items():
        entry = manifest["graphs"][graph]
        got_in = {s["name"]: (s["shape"], s["dtype"]) for s in entry["inputs"]}
        got_out = {s["name"]: (s["shape"], s["dtype"]) for s in entry["outputs"]}
        assert (got_in, got_out) == (inputs, outputs)
        model = onnx.load(str(package / entry["file"]))
        assert [i.name for i in model.graph.input] == [s["name"] for s in entry["inputs"]]
        assert [o.name for o in model.graph.output] == [s["name"] for s in entry["outputs"]]
    assert manifest["graphs"]["detector"]["cpu_file"] is None
    assert manifest["precision"] == "fp32" and manifest["model"]["name"] == CONFIG
    assert manifest["text"]["buckets"] == [16, 32] and manifest["text"]["max_tokens"] == 32
    assert manifest["input"]["size"] == [64, 64] and manifest["input"]["letterbox"] == "top-left"
    assert pkg.load_package_manifest(package)["name"] == CONFIG   # the contract's own reader accepts it


def test_accuracy_recorded_from_the_runtime(work):
    manifest = json.loads((work["package"] / pkg.MANIFEST).read_text())
    acc = manifest["accuracy"]
    assert acc["split"] == str(work["data"])
    assert set(acc["fp32"]) == {"R@1", "R@5", "R@10", "mAP", "refexp"}
    assert all(v is None or 0.0 <= v <= 100.0 for v in acc["fp32"].values())
    assert acc["fp32"]["R@1"] <= acc["fp32"]["R@5"] <= acc["fp32"]["R@10"]


def test_reference_outputs_match_every_backend(work):
    package = work["package"]
    with np.load(package / pkg.reference_file("detector")) as z:
        ref = {k: z[k] for k in z.files}
    for backend in ("onnxruntime", "openvino"):
        with engines.load(package, backend, cache_dir="") as e:
            out = e.detector.run({k: ref[k] for k in pkg.DETECTOR_INPUTS})
        for name in pkg.DETECTOR_OUTPUTS:
            assert rel_diff(out[name], ref[name]) < TOL, (backend, name)
    assert ref[pkg.ATTENTION_MASK].min() == 0            # the reference prompt has padding


# ----------------------------------------------------------------------------- refusals

def test_re_export_from_the_same_checkpoint_is_byte_identical(work, tmp_path):
    """Exporting the checkpoint again gives the same bytes in every graph, reference and tokenizer
    file, and the same manifest apart from what the data adds (accuracy, calibration, timings) and
    what --openvino-check adds (the FP32 detector checked on OpenVINO with static shapes)."""
    again = tmp_path / "again"
    result = run_cli("compress.export", "--checkpoint", str(work["ckpt"]), "--out", str(again),
                     "--buckets", BUCKETS, "--threads", "1", "--openvino-check")
    assert result.returncode == 0, result.stderr
    files = sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(work["package"])) for p in work["package"].rglob("*") if p.is_file())
    for name in files:
        if name != pkg.MANIFEST:
            assert (again / name).read_bytes() == (work["package"] / name).read_bytes(), name
    a, b = (json.loads((p / pkg.MANIFEST).read_text()) for p in (again, work["package"]))
    assert "openvino" not in b["graphs"]["detector"]                      # FP32: not checked by default
    check = a["graphs"]["detector"].pop("openvino")
    assert check["static_shapes"] is True and max(check["max_rel_diff"].values()) <= check["tolerance"], check
    assert a["graphs"]["detector"]["cpu_backend"] == "onnxruntime"        # the check does not change the default
    for key in ("graphs", "parity", "files", "input", "text", "model", "producer"):
        assert a[key] == b[key], key
    with engines.load(again, "openvino", cache_dir="") as e:
        assert e.detector.opts.static_shapes is True                       # OpenVINO follows the check


def test_existing_out_is_refused(work):
    """As a program (the compress.export smoke test): exit 2, one line, no traceback."""
    before = sorted(p.name for p in work["package"].iterdir())
    result = run_program("compress.export", "--checkpoint", str(work["ckpt"]), "--out", str(work["package"]),
                     "--buckets", BUCKETS)
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in work["package"].iterdir()) == before


def test_wrong_config_and_coarse_checkpoints_are_refused(work, tmp_path):
    result = run_cli("compress.export", "--checkpoint", str(work["ckpt"]), "--out", str(tmp_path / "a"),
                     "--config", "fiber-nano")
    assert result.returncode == 2 and "expected 'fiber-nano'" in result.stderr
    coarse = make_checkpoint(tmp_path / "coarse", task="coarse")
    result = run_cli("compress.export", "--checkpoint", str(coarse), "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "'coarse' checkpoint" in result.stderr
    # weights of another shape under this config's name
    torch.manual_seed(0)
    wrong = FiberForGrounding(get_config("fiber-golden")).state_dict()
    save_checkpoint(tmp_path / "wrong", wrong, get_config(CONFIG), {"task": "fine"})
    result = run_cli("compress.export", "--checkpoint", str(tmp_path / "wrong"), "--out", str(tmp_path / "c"))
    assert result.returncode == 2 and "config 'fiber-tiny-test'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any((tmp_path / n).exists() for n in "abc")


def test_bad_buckets_refused(work, tmp_path):
    result = run_cli("compress.export", "--checkpoint", str(work["ckpt"]), "--out", str(tmp_path / "p"),
                     "--buckets", "16,64")
    assert result.returncode == 2 and "exceeds the 32 tokens" in result.stderr


def test_failed_export_leaves_nothing(work, tmp_path, monkeypatch):
    """A failure after text.onnx was written: no package and no temp folder remain."""
    def broken(*args, **kwargs):
        raise onnx_graph.OnnxExportError("injected failure")

    monkeypatch.setattr(onnx_export, "export_detector", broken)
    out = tmp_path / "pkg"
    with pytest.raises(onnx_graph.OnnxExportError, match="injected"):
        export.export_package(export.ExportConfig(checkpoint=str(work["ckpt"]), out=str(out), buckets=(16,)))
    assert list(tmp_path.iterdir()) == []


def test_unknown_calibration_rule_is_refused_before_any_work(tmp_path):
    """An API caller's bad rule fails at once, not after the graphs are written and measured."""
    out = tmp_path / "pkg"
    with pytest.raises(export.ExportError, match="--calibration-rule 'recall' is not one of"):
        export.export_package(export.ExportConfig(checkpoint=str(tmp_path / "no-such-checkpoint"), out=str(out),
                                                  calibration_rule="recall"))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- Q/DQ clean-up

def _qdq_graph(w: np.ndarray, scale: np.ndarray, s_act: float) -> onnx.ModelProto:
    """x -> Cast(float) -> [Q/DQ twice, same scale] -> MatMul with W -> Q -> DQ -> Transpose."""
    c = lambda name, v: numpy_helper.from_array(np.asarray(v), name)  # noqa: E731
    nodes = [
        helper.make_node("Cast", ["x"], ["xc"], to=TensorProto.FLOAT),
        helper.make_node("QuantizeLinear", ["xc", "sa", "za"], ["q1"]),
        helper.make_node("DequantizeLinear", ["q1", "sa", "za"], ["d1"]),
        helper.make_node("QuantizeLinear", ["xc", "sa", "za"], ["q2"]),
        helper.make_node("DequantizeLinear", ["q2", "sa", "za"], ["d2"]),
        helper.make_node("QuantizeLinear", ["W", "sw", "zw"], ["qw"], axis=0),
        helper.make_node("DequantizeLinear", ["qw", "sw", "zw"], ["dw"], axis=0),
        helper.make_node("Transpose", ["dw"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["d1", "wt"], ["y1"]),
        helper.make_node("MatMul", ["d2", "wt"], ["y2"]),
        helper.make_node("Add", ["y1", "y2"], ["y"]),
    ]
    inits = [c("W", w), c("sw", scale), c("zw", np.zeros(scale.shape, np.int8)),
             c("sa", np.float32(s_act)), c("za", np.int8(0))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[0]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_rewirer_moves_consumers_in_order_and_refuses_graph_outputs():
    """Rewiring a then b -> c sends a's consumers on to c (as one rewrite after another would); an
    input changed behind the index is left alone; a graph output is refused."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Mul", ["a", "a"], ["y"])]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [vi("x")], [vi("s"), vi("y")]))
    rewire = onnx_graph.Rewirer(model)
    rewire("a", "b")
    rewire("b", "x")
    assert [list(n.input) for n in model.graph.node[2:]] == [["x", "x"], ["x", "x"]]
    model.graph.node[3].input[0] = "q"                  # edited outside the rewirer
    rewire("x", "z")
    assert list(model.graph.node[3].input) == ["q", "z"] and list(model.graph.node[0].input) == ["z"]
    with pytest.raises(onnx_graph.OnnxExportError, match="cannot rewire graph output 's'"):
        rewire("s", "x")


def test_clean_qdq_folds_weights_and_merges_pairs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5)).astype(np.float32)                 # [out, in]
    scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
    model = _qdq_graph(w, scale, 0.05)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    # numpy: symmetric int8 fake-quant of x (per tensor) and W (per output channel)
    xq = np.clip(np.rint(x / 0.05), -128, 127) * np.float32(0.05)
    wq = np.clip(np.rint(w / scale[:, None]), -128, 127) * scale[:, None]
    expected = 2 * xq @ wq.T
    stats = qdq.clean_qdq(model)
    assert stats["noop_casts"] == 1 and stats["merged_qdq"] == 1 and stats["folded_weights"] == 1
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "Cast" not in ops and "Transpose" not in ops and ops.count("QuantizeLinear") == 1
    weights = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 2]
    assert len(weights) == 1 and list(weights[0].dims) == [5, 6]       # stored transposed, as int8
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == weights[0].name)
    assert [a.i for a in dq.attribute if a.name == "axis"] == [1]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- shape arithmetic

def _shape_graph() -> onnx.ModelProto:
    """x [B, T, 6] -> Reshape(x, [B, T, 2, 3]) with the target computed from Shape(x) the way the
    legacy exporter writes it (Shape, Gather, Div, Unsqueeze, Concat) -> Transpose -> Reshape back
    to [B, T, 6] with a target from Shape of the transposed tensor. y = that + 1."""
    def c(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["t"], axis=0),
        helper.make_node("Gather", ["s", "i2"], ["c"], axis=0),
        helper.make_node("Div", ["c", "three"], ["c2"]),                      # 6 / 3 = 2: fixed
        helper.make_node("Unsqueeze", ["b", "ax0"], ["ub"]),
        helper.make_node("Unsqueeze", ["t", "ax0"], ["ut"]),
        helper.make_node("Unsqueeze", ["c2", "ax0"], ["uc"]),
        helper.make_node("Concat", ["ub", "ut", "uc", "three1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),                  # [B, T, 2, 3]
        helper.make_node("Transpose", ["r"], ["tr"], perm=[0, 1, 3, 2]),
        helper.make_node("Shape", ["tr"], ["s2"]),
        helper.make_node("Slice", ["s2", "st0", "st2", "ax0"], ["bt"]),       # [B, T]
        helper.make_node("Concat", ["bt", "six"], ["target2"], axis=0),
        helper.make_node("Reshape", ["tr", "target2"], ["r2"]),
        helper.make_node("Add", ["r2", "one"], ["y"]),
    ]
    inits = [c("i0", np.int64(0)), c("i1", np.int64(1)), c("i2", np.int64(2)), c("three", np.int64(3)),
             c("ax0", np.array([0], np.int64)), c("three1", np.array([3], np.int64)),
             c("st0", np.array([0], np.int64)), c("st2", np.array([2], np.int64)),
             c("six", np.array([6], np.int64)), c("one", np.float32(1))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _x(batch: int, tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 100 + tokens)
    return {"x": rng.standard_normal((batch, tokens, 6)).astype(np.float32)}


def _expected(x: np.ndarray) -> np.ndarray:
    b, t, _ = x.shape
    return x.reshape(b, t, 2, 3).transpose(0, 1, 3, 2).reshape(b, t, 6) + 1


def test_fold_shape_arithmetic_keeps_batch_and_tokens_dynamic():
    model = _shape_graph()
    stats = shape_folding.fold_shape_arithmetic(model, [_x(1, 4), _x(2, 7), _x(3, 2)], _x(2, 5))
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Reshape", "Transpose", "Reshape", "Add"] and stats["nodes_after"] == 4
    assert stats["reshapes"] == 2 and stats["nodes_before"] == 16
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    targets = [inits[n.input[1]].tolist() for n in model.graph.node if n.op_type == "Reshape"]
    assert targets == [[0, 0, 2, 3], [0, 0, 6]]                           # 0 = copy batch / tokens
    onnx.checker.check_model(model, full_check=True)
    session = ort_session_from(model)
    for b, t in ((1, 1), (4, 9), (2, 33)):                                # sizes never probed
        x = _x(b, t)
        np.testing.assert_allclose(session.run(None, x)[0], _expected(x["x"]), rtol=0, atol=1e-6)


def test_fold_shape_arithmetic_refuses_what_the_examples_cannot_tell():
    model = _shape_graph()
    before = model.SerializeToString()
    with pytest.raises(onnx_graph.OnnxExportError, match=r"broke the graph for inputs \{'x': \(3, 4, 6\)\}"):
        shape_folding.fold_shape_arithmetic(model, [_x(2, 4), _x(2, 4)], _x(3, 4))   # batch looked fixed
    assert model.SerializeToString() == before                                  # restored


def test_drop_unused_removes_dead_chains_and_keeps_what_an_output_reads():
    """A chain of dead nodes goes in one call, with the initializers only it read; a node one of
    whose outputs is read stays, and so does everything a graph output depends on."""
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    dead_w = numpy_helper.from_array(np.ones((2, 2), np.float32), "dead_w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]),
             helper.make_node("Split", ["a"], ["s0", "s1"], axis=1, num_outputs=2),  # s1 unread
             helper.make_node("Concat", ["s0", "s0"], ["y"], axis=1),
             helper.make_node("MatMul", ["x", "dead_w"], ["d1"]),
             helper.make_node("Relu", ["d1"], ["d2"]),
             helper.make_node("Add", ["d2", "a"], ["d3"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w, dead_w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx_graph.drop_unused(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Split", "Concat"]
    assert [i.name for i in model.graph.initializer] == ["w"]
    onnx.checker.check_model(model, full_check=True)


def test_exported_detector_has_constant_reshape_targets(work):
    det = onnx.load(str(work["package"] / pkg.DETECTOR_GRAPH))
    inits = {i.name for i in det.graph.initializer}
    producers = {o: n for n in det.graph.node for o in n.output}
    computed = [n.name for n in det.graph.node if n.op_type == "Reshape" and n.input[1] not in inits
                and producers[n.input[1]].op_type != "Constant"]
    assert computed == []
    assert onnx_graph.count_ops(det, "Shape").get("Shape", 0) <= 8      # only Resize / Expand sizes remain


def ort_session_from(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("config, want", [
    ("fiber-b-fine", (16, 32, 64, 128, 256)),   # FIBER-B's MAX_QUERY_LEN 256: the long buckets too
    ("fiber-golden-fine", (16,)),
    ("fiber-nano", (16, 32, 64)),
])
def test_default_text_buckets_reach_the_configs_max_text_len(config, want):
    from fiber.package import resolve_buckets

    cfg = get_config(config)
    assert resolve_buckets(cfg, None) == want and want[-1] == min(cfg.max_text_len, 256)
    with pytest.raises(ValueError, match="exceeds the"):
        resolve_buckets(cfg, (16, cfg.max_text_len + 1))


def test_openvino_check_records_its_verdict_in_an_existing_package(work, tmp_path):
    """compress.openvino_check adds graphs.detector.openvino to a package exported without it; the
    FP32 default backend stays ONNX Runtime and the package still verifies."""
    import shutil

    from compress import openvino_check

    package = tmp_path / "pkg"
    shutil.copytree(work["package"], package)
    before = json.loads((package / pkg.MANIFEST).read_text())
    assert "openvino" not in before["graphs"]["detector"]
    result = run_program("compress.openvino_check", "--package", str(package))
    assert result.returncode == 0, result.stderr
    assert "OpenVINO with static shapes passes" in result.stdout and "recorded in the manifest" in result.stdout
    after = pkg.load_package_manifest(package)                       # files still match their sha256
    check = after["graphs"]["detector"].pop("openvino")
    assert check["static_shapes"] is True and check["checked"] == "reference/detector.npz, static shapes"
    assert after == before                                           # nothing else changed
    bad = tmp_path / "no-reference"
    shutil.copytree(work["package"], bad)
    (bad / pkg.reference_file("detector")).unlink()
    for target, message in ((tmp_path / "missing", "does not exist"), (bad, "reference/detector.npz is listed in the manifest but missing")):
        out = run_cli("compress.openvino_check", "--package", str(target))
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
    assert "openvino" not in json.loads((bad / pkg.MANIFEST).read_text())["graphs"]["detector"]
