"""convert-official on fine FIBER releases: the official layout (tests/official_fine_layout.py, whose
rules are checked here against the golden file the official code wrote) converts whole, with its
tokenizer, or is refused with one clear line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fiber.checkpoint import CheckpointError, convert_official, get_args_parser, load_checkpoint, main
from fiber.config import get_config
from official_fine_layout import GOLDEN_SMALL, official_fine_shapes, random_state_dict

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden" / "fine" / "fiber_fine_small_official.safetensors"
TOKENIZER = REPO / "tests" / "data" / "golden" / "fine_tokenizer"
DROPPED_PER_RELEASE = 24 + 1 + 5  # relative_position_index buffers, position_ids, cell anchors


def golden_shapes() -> dict[str, tuple[int, ...]]:
    with safe_open(str(GOLDEN), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_the_layout_rules_reproduce_the_official_golden_file():
    assert official_fine_shapes(**GOLDEN_SMALL) == golden_shapes()


def test_a_fiber_b_fine_release_converts_whole():
    """The released layout: {"model": {"module." + key: tensor}}, 806 tensors, 252 M values."""
    shapes = official_fine_shapes()
    assert len(shapes) == 806
    assert math.isclose(sum(math.prod(s) for s in shapes.values()) / 1e6, 252.55, abs_tol=0.01)
    official = {k: torch.empty(s, dtype=torch.int64 if k.endswith(("_index", "position_ids")) else torch.float32)
                for k, s in shapes.items()}
    release = {"model": {"module." + k: v for k, v in official.items()}, "iteration": 90000}
    out, report, cfg = convert_official(release, "fiber-b")
    assert cfg.name == "fiber-b-fine" and not cfg.fusion.i2t_prenorm
    assert (report.layout, report.fusion, report.weights) == ("fine", "v2", "model")
    from fiber.models import build_model
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in build_model(cfg, "fine").state_dict().items()}
    assert {k: tuple(v.shape) for k, v in out.items()} == want  # every detector tensor, nothing else
    frozen = [k for k in official if k.startswith("rpn.head.cls_logits.")]
    assert sorted(report.dropped_heads) == sorted(frozen if not any("cls_logits" in k for k in want) else [])
    assert len(report.dropped_buffers) == DROPPED_PER_RELEASE
    assert report.mapped == len(out) == 806 - DROPPED_PER_RELEASE - len(report.dropped_heads)
    assert not report.unexpected and not report.resized and not report.missing_initialised
    key = "fusion_backbone.backbone.body.layers.3.blocks.1.attn.qkv_text_i2t.weight"
    assert out["backbone.image.layers.3.blocks.1.attn.qkv_text_i2t.weight"] is official[key]
    assert out["head.dyhead_tower.5.offset.weight"] is official["rpn.head.dyhead_tower.5.offset.weight"]
    assert out["fpn.top_blocks.p7.weight"] is official["fusion_backbone.backbone.fpn.top_blocks.p7.weight"]


def small_release(version: str = "v2", seed: int = 0) -> dict[str, torch.Tensor]:
    return random_state_dict(official_fine_shapes(**GOLDEN_SMALL, version=version), seed)


def test_fusion_v3_is_read_from_the_keys_and_the_ema_weights_can_be_chosen():
    v3 = small_release("v3")
    assert any("norm_i2t_i" in k for k in v3)
    other = {k: v + 1 if v.is_floating_point() else v for k, v in v3.items()}
    base = get_config("fiber-golden-fine")
    family = base.replace(name="fiber-golden-any")  # not itself a fine variant: takes the file's version
    with pytest.raises(CheckpointError, match=r"fusion v3 checkpoint, but config 'fiber-golden-fine' is fusion v2"):
        convert_official({"model": v3}, base)
    from fiber import config as config_module
    config_module._FINE_VARIANTS[family.name] = base.name
    try:
        out, report, cfg = convert_official({"model": v3, "model_ema": other}, family, ema=True)
    finally:
        del config_module._FINE_VARIANTS[family.name]
    assert report.fusion == "v3" and report.weights == "model_ema" and cfg.fusion.i2t_prenorm
    key = "fusion_backbone.backbone.body.layers.3.blocks.0.attn.norm_i2t_i.weight"
    assert torch.equal(out["backbone.image.layers.3.blocks.0.attn.norm_i2t_i.weight"], other[key])
    with pytest.raises(CheckpointError, match="no 'model_ema' entry"):
        convert_official({"model": v3}, base, ema=True)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("rpn.head.dyhead_tower.3.DyConv.2.conv.weight"),
     r"missing detector tensor for config 'fiber-golden-fine': 'head.dyhead_tower.3.DyConv.2.conv.weight'"),
    (lambda d: d.__setitem__("rpn.head.dyhead_tower.6.offset.weight", torch.zeros(27, 32, 3, 3)),
     r"head/FPN tensor 'rpn.head.dyhead_tower.6.offset.weight' has no place in config 'fiber-golden-fine'"),
    (lambda d: d.__setitem__("fusion_backbone.backbone.fpn.fpn_layer2.weight", torch.zeros(32, 16, 3, 3)),
     r"'fusion_backbone.backbone.fpn.fpn_layer2.weight' has shape \[32, 16, 3, 3\], expected \[32, 32, 3, 3\]"),
])
def test_missing_extra_or_misshapen_head_tensors_are_named(edit, message):
    release = small_release()
    edit(release)
    with pytest.raises(CheckpointError, match=message):
        convert_official({"model": release}, "fiber-golden-fine")


def convert_cli(tmp_path, *extra: str) -> int:
    args = get_args_parser().parse_args(["convert-official", str(GOLDEN), "--config", "fiber-golden-fine",
                                         "--out", str(tmp_path / "ck"), *extra])
    return main(args)


def test_cli_converts_the_golden_release_with_its_tokenizer(tmp_path, capsys):
    assert convert_cli(tmp_path, "--tokenizer", str(TOKENIZER)) == 0
    printed = capsys.readouterr().out
    assert "official fine layout, fusion v2, weights 'model' -> config 'fiber-golden-fine'" in printed
    state, cfg, meta = load_checkpoint(tmp_path / "ck", expect_name="fiber-golden-fine")
    assert meta["task"] == "fine" and meta["conversion"]["fusion"] == "v2"
    with safe_open(str(GOLDEN), "pt") as f:
        assert torch.equal(state["head.bias0"], f.get_tensor("rpn.head.bias0"))
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tmp_path / "ck" / "tokenizer.json"))
    assert tok.encode("cat. red car. person").ids == [0, 288, 17, 262, 265, 17, 271, 2]  # golden ids


def test_cli_refuses_a_fine_release_without_its_tokenizer(tmp_path, capsys):
    assert convert_cli(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pass --tokenizer DIR" in err and "roberta-base" in err
    assert not (tmp_path / "ck").exists()


def test_cli_refuses_a_tokenizer_larger_than_the_embedding_table(tmp_path, capsys):
    vocab = json.loads((TOKENIZER / "vocab.json").read_text())
    vocab["Ġextra"] = 1000  # one id past the golden model's 1000-row table
    big = tmp_path / "tok"
    big.mkdir()
    (big / "vocab.json").write_text(json.dumps(vocab))
    (big / "merges.txt").write_text((TOKENIZER / "merges.txt").read_text())
    assert convert_cli(tmp_path, "--tokenizer", str(big)) == 2
    err = capsys.readouterr().err
    assert "has 1001 ids but the checkpoint's word-embedding table has 1000 rows" in err
    assert not (tmp_path / "ck").exists()
    assert convert_cli(tmp_path, "--tokenizer", str(tmp_path / "nowhere")) == 2
    assert "does not exist" in capsys.readouterr().err
