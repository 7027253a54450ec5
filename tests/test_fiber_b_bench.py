"""benchmarks.fiber_b at golden scale: the random release converts, the projection arithmetic and
the table (FIBER-B itself runs as a script: docs/results.md "FIBER-B at real scale")."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import fiber_b
from fiber.official_layout import GOLDEN_SMALL

REPO = Path(__file__).resolve().parents[1]


def test_random_release_converts_with_convert_official(tmp_path):
    from fiber import checkpoint

    info = fiber_b.make_release(tmp_path / "r" / "release.pth", seed=3, layout=GOLDEN_SMALL)
    assert info["tensors"] == 782 and Path(info["file"]).is_file() and not list((tmp_path / "r").glob("*.tmp"))
    args = checkpoint.get_args_parser().parse_args([
        "convert-official", info["file"], "--config", "fiber-golden-fine",
        "--tokenizer", str(fiber_b.TOKENIZER), "--out", str(tmp_path / "ck")])
    assert checkpoint.main(args) == 0 and (tmp_path / "ck" / "model.safetensors").is_file()


def _row(label, backend, network):
    return {"label": label, "package": "P", "backend": backend, "status": "ok",
            "stages_ms": {"pre": 10.0, "text_uncached": 50.0, "network": network, "post": 5.0,
                          "total": network + 15.0}, "rss_added_mb": 900.0}


def test_projection_uses_the_best_f32_path_and_says_it_is_one():
    facts = {"package": "P", "name": "fiber-b-fine", "gflops": {"detector": 1000.0}, "bytes": 10 ** 9}
    rows = [_row("a", "onnxruntime", 10_000.0), _row("b", "openvino", 5_000.0), _row("c", "openvino-bf16", 1_000.0)]
    p = fiber_b.project(facts, rows, cpu_peak_gflops=400.0)
    # best f32 path: 1000 GFLOP in 5 s = 200 GFLOP/s = 50% of 400 (bf16 is not an f32 path)
    assert p["fraction_of_peak"] == 0.5 and "b: 200.0 GFLOP/s" in p["basis"]
    nano = p["targets"]["Jetson Orin Nano Super 8GB"]
    assert nano["fp16_ms_at_measured_fraction"] == pytest.approx(1e12 / (16.5e12 * 0.5) * 1e3, abs=0.1)
    assert nano["fp16_ms_at_100pct_floor"] < nano["fp16_ms_at_30pct"]
    assert fiber_b.project(facts, [rows[2]], 400.0) == {}          # no f32 path measured: no projection


def test_markdown_labels_the_projection_and_gives_the_command():
    result = {"command": "python -m benchmarks.fiber_b report --package P", "runs": 2, "warmup": 1,
              "cpu": {"model": "cpu", "threads": 2}, "input": {"image": "x.jpg", "width": 5, "height": 6, "prompt": "person"},
              "groups": [{"canvas": "512x672", "rows": [_row("a", "onnxruntime", 7000.0)],
                          "packages": [{"package": "P", "name": "fiber-b-fine", "precision": "fp32",
                                        "bytes": 9.5e8, "gflops": {"detector": 800.0}}],
                          "projection": {}}],
              "canvas_ratios_network": {}, "process_peak_rss_mb": 3000.0}
    text = fiber_b.markdown(result)
    assert "python -m benchmarks.fiber_b report --package P" in text and "Projection, not a measurement" in text
    assert "| 512x672 | fiber-b-fine (fp32) | onnxruntime | 10.0 | 50 | 7000 | 5.0 | 7015 |" in text
