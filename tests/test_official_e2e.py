"""The user's path for an official FIBER fine release, end to end, against golden/fine:

    python -m fiber.checkpoint convert-official WEIGHTS --config fiber-golden-fine --tokenizer DIR --out CK
    python -m compress.export --checkpoint CK --out PKG
    python -m runtime.detect --package PKG --requests R.jsonl --json OUT.jsonl

on the two raw golden images with their two prompts returns the official final detections (boxes in
original pixels within 0.05 px, scores within 1e-3, the same phrases, the same count).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file

from common import package as pkg


REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden" / "fine"
TOKENIZER = REPO / "tests" / "data" / "golden" / "fine_tokenizer"


@pytest.fixture(scope="module")
def golden_checkpoint(tmp_path_factory) -> Path:
    """The official golden release converted by the CLI, once for the module (read-only)."""
    from fiber import checkpoint

    out = tmp_path_factory.mktemp("official") / "ck"
    args = checkpoint.get_args_parser().parse_args([
        "convert-official", str(GOLDEN / "fiber_fine_small_official.safetensors"), "--config", "fiber-golden-fine",
        "--tokenizer", str(TOKENIZER), "--out", str(out)])
    assert checkpoint.main(args) == 0
    return out


@pytest.fixture(scope="module")
def golden_package(golden_checkpoint) -> Path:
    from compress import export

    out = golden_checkpoint.parent / "pkg"
    args = export.get_args_parser().parse_args(["--checkpoint", str(golden_checkpoint), "--out", str(out)])
    assert export.main(args) == 0
    return out


@pytest.mark.slow  # the fixture converts and exports the golden detector (78 DeformConv nodes): ~2 min
def test_the_package_records_the_official_input_and_post_processing(golden_package):
    manifest = pkg.read_manifest(golden_package)
    assert manifest["input"]["size"] == [224, 288] and manifest["input"]["channel_order"] == "BGR"
    assert manifest["input"]["resize"]["min_size"] == 192 and manifest["input"]["resize"]["max_size"] == 288
    post = manifest["postprocess"]
    assert post["style"] == "official" and post["level_sizes"] == [1008, 252, 63, 20, 6]
    assert (post["threshold"], post["pre_nms_top_k"], post["max_detections"], post["nms_iou"]) == (0.05, 40, 25, 0.6)
    assert manifest["text"]["lowercase"] is False and manifest["text"]["pad_id"] == 1
    assert manifest["text"]["buckets"] == [16]


@pytest.mark.slow
def test_the_detector_graph_carries_the_official_head_and_matches_pytorch(golden_package):
    """The DyHead's 78 deformable convolutions (6 blocks x 13) as the canonical opset-19 op, and
    ONNX Runtime computes what PyTorch does (the export's parity record; test_golden_fine_head
    holds PyTorch to the official outputs)."""
    graph = onnx.load(str(golden_package / pkg.DETECTOR_GRAPH), load_external_data=False)
    assert [n.op_type for n in graph.graph.node].count("DeformConv") == 6 * 13
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 19
    parity = pkg.read_manifest(golden_package)["parity"]
    assert parity["detector_vs"] == "PyTorch"
    assert set(parity["max_rel_diff_vs_torch"]) == {"text_hidden", *pkg.DETECTOR_OUTPUTS}
    assert max(parity["max_rel_diff_vs_torch"].values()) < 1e-4


@pytest.mark.slow
def test_official_release_to_runtime_detections(golden_package, tmp_path):
    from runtime import detect

    io = load_file(str(GOLDEN / "fiber_fine_small_io.safetensors"))
    with safe_open(str(GOLDEN / "fiber_fine_small_io.safetensors"), "np") as f:
        meta = f.metadata()
    captions, labels = json.loads(meta["queries"]), json.loads(meta["label_lists"])
    requests = tmp_path / "requests.jsonl"
    with requests.open("w") as f:
        for i, caption in enumerate(captions):
            Image.fromarray(io[f"input.image{i}_rgb_uint8"]).save(tmp_path / f"golden{i}.png")
            f.write(json.dumps({"image": f"golden{i}.png", "prompt": caption}) + "\n")
    out = tmp_path / "out.jsonl"
    args = detect.get_args_parser().parse_args(["--package", str(golden_package), "--requests", str(requests),
                                                "--json", str(out), "--headless", "--backend", "onnxruntime"])
    assert detect.main(args) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        got = sorted(line["detections"], key=lambda d: -d["score"])
        order = np.argsort(-io[f"det.img{i}.scores"], kind="stable")
        want_boxes = io[f"det.img{i}.boxes_orig"][order]
        want_scores = io[f"det.img{i}.scores"][order]
        want_phrases = [labels[i][int(k) - 1] for k in io[f"det.img{i}.labels"][order]]
        assert len(got) == len(want_scores) == 25
        assert [d["phrase"] for d in got] == want_phrases
        np.testing.assert_allclose([d["score"] for d in got], want_scores, atol=1e-3)
        np.testing.assert_allclose([d["box"] for d in got], want_boxes, atol=0.05)


@pytest.mark.parametrize("canvas, message", [
    ("500x672", "canvas 500x672 is not divisible by 32 (the coarsest stride); use e.g. 512x672"),
    ("32x64", "canvas 32x64 is too small for the model's strides: each side needs at least 64"),
    ("512by672", "canvas must be HxW in pixels"),
])
def test_export_refuses_a_bad_canvas_with_one_line(golden_checkpoint, tmp_path, capsys, canvas, message):
    from compress import export

    capsys.readouterr()
    argv = ["--checkpoint", str(golden_checkpoint), "--out", str(tmp_path / "pkg"), "--canvas", canvas]
    try:
        code = export.main(export.get_args_parser().parse_args(argv))
    except SystemExit as e:  # argparse rejects a malformed HxW itself
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1]  # the last (argparse: after its usage) line says what to change
    assert not (tmp_path / "pkg").exists()


@pytest.mark.slow
def test_a_prompt_over_the_largest_bucket_is_truncated_with_one_line(golden_package, tmp_path, capsys):
    """The golden package's largest bucket is 16 tokens (FIBER-B's is 256: the same rule). A longer
    prompt runs truncated, as the official model truncates at MAX_QUERY_LEN; stderr gets one line
    saying how many phrases were cut off and what to change, the JSON record a warning."""
    from runtime import detect

    Image.fromarray(np.full((120, 160, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    prompt = ". ".join(f"thing number {i}" for i in range(12))
    out = tmp_path / "out.jsonl"
    args = detect.get_args_parser().parse_args(["--package", str(golden_package), "--image", str(tmp_path / "grey.png"),
                                                "--prompt", prompt, "--json", str(out), "--headless",
                                                "--no-fastest-path"])  # not timing every CPU path: 6 s
    assert detect.main(args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert "over the 16-token limit" in warnings[0] and "shorten it or split its phrases" in warnings[0]
    lost = int(warnings[0].split("no tokens: ")[1].split(" of ")[0])
    assert 0 < lost < 12
    record = json.loads(out.read_text().splitlines()[0])
    assert record["warnings"] == ["prompt truncated to 16 tokens"] and len(record["phrases"]) == 12


def test_export_refuses_to_start_without_the_memory_it_needs(golden_checkpoint, tmp_path, capsys, monkeypatch):
    """Too little memory for an export: one line (needed, available, what to change), exit 2,
    nothing written; --no-memory-check goes ahead regardless (here only as far as the estimate)."""
    from compress import export

    capsys.readouterr()
    monkeypatch.setattr(export, "available_memory", lambda: 300 * 2 ** 20)   # 0.3 GiB free
    argv = ["--checkpoint", str(golden_checkpoint), "--out", str(tmp_path / "pkg")]
    assert export.main(export.get_args_parser().parse_args(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not enough memory for this export" in err[0] and "0.3 GiB available" in err[0]
    assert "at canvas 224x288" in err[0] and "--canvas" in err[0] and "--no-memory-check" in err[0]
    assert "--no-fold-shapes (about" in err[0]
    assert not (tmp_path / "pkg").exists() and not list(tmp_path.glob(".pkg*"))
    # the estimate grows with the weights and the canvas: FIBER-B at 800x1344 needs more than at 512x672
    b = 252_550_000
    assert export.export_memory_estimate(b, (800, 1344)) > export.export_memory_estimate(b, (512, 672)) > 8 * 2 ** 30
    assert export.export_memory_estimate(b, (800, 1344), fold_shapes=False) < export.export_memory_estimate(b, (800, 1344))
