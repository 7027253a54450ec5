"""Parity of the fine backbone (Swin "fixed-pad" + RoBERTa + fusion v2 + FPN P3-P7) with the
official FIBER fine-grained code: tests/data/golden/fine (README §3, §4 B/C/D1, tolerances §7).

The official weights file loads by key prefix into ``FiberForGrounding(fiber-golden-fine)``; the
model is fed the recorded batch and tokens and must reproduce every recorded text layer, the Swin
block / stage outputs around the fused pairs, and the FPN levels within atol = rtol = 1e-4.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fiber.checkpoint import LAYOUT_PREFIXES
from fiber.config import config_for_task, get_config
from fiber.models import FiberForGrounding

GOLDEN = Path(__file__).parent / "data" / "golden" / "fine"
TOL = dict(atol=1e-4, rtol=1e-4)
LEVELS = ("p3", "p4", "p5", "p6", "p7")


def map_official(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone + FPN keys of the official file -> our keys (the converter's prefix table)."""
    prefixes = {k: v for k, v in LAYOUT_PREFIXES["fine"].items() if v.startswith(("backbone.", "fpn."))}
    out = {}
    for key, value in official.items():
        for prefix, ours in prefixes.items():
            if key.startswith(prefix) and not key.endswith("position_ids"):
                out[ours + key[len(prefix):]] = value
    return out


@pytest.fixture(scope="module")
def golden_io() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "fiber_fine_small_io.safetensors"))


@pytest.fixture(scope="module")
def model() -> FiberForGrounding:
    torch.manual_seed(0)
    net = FiberForGrounding(get_config("fiber-golden-fine")).eval()
    state = map_official(load_file(str(GOLDEN / "fiber_fine_small_official.safetensors")))
    own = net.state_dict()
    # every official backbone/FPN tensor has a place of the same shape ...
    assert sorted(set(state) - set(own)) == []
    assert [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)] == []
    # ... and only head tensors are left to the head (relative_position_index is not persistent)
    missing = net.load_state_dict(state, strict=False).missing_keys
    assert missing and all(k.startswith("head.") for k in missing), missing
    return net


@pytest.fixture(scope="module")
def run(model, golden_io) -> dict[str, torch.Tensor]:
    """One forward of the golden batch; block outputs recorded under the golden file's names."""
    seen: dict[str, torch.Tensor] = {}
    image = model.backbone.image
    points = {"swin.s3b13_out": image.layers[2].blocks[13], "swin.s3b14_out": image.layers[2].blocks[14],
              "swin.s3_merge_out": image.layers[2].downsample, "swin.s4b0_out": image.layers[3].blocks[0],
              "swin.s4b1_out": image.layers[3].blocks[1], "text.embeddings": model.backbone.text.embeddings}
    points.update({f"text.layer{i}": layer for i, layer in enumerate(model.backbone.text.layers)})
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out))
               for name, m in points.items()]
    ids, mask = golden_io["text.input_ids"], golden_io["text.attention_mask"]
    try:
        with torch.no_grad():
            feats = model.forward_features(golden_io["input.images"], model.encode_text(ids, mask), mask)
    finally:
        for h in handles:
            h.remove()
    seen.update({f"swin.stage{s + 2}": m for s, m in enumerate(feats.fused.image_stages) if s})
    seen.update({f"fpn.{name}": level for name, level in zip(LEVELS, feats.levels)})
    seen["text.hidden"], seen["text.embedded"] = feats.fused.text, feats.embedded
    return seen


def test_golden_fine_config_is_the_official_small_model():
    cfg = get_config("fiber-golden-fine")
    assert cfg.swin.window_rule == "fixed-pad" and [cfg.swin.stage_window(s) for s in range(4)] == [(12, 6)] * 4
    assert cfg.pairs() == [(2, 14, 6), (2, 15, 7), (2, 16, 8), (2, 17, 9), (3, 0, 10), (3, 1, 11)]
    assert (cfg.fusion.i2t_prenorm, cfg.fusion.t2i_norm, cfg.head.use_p6, cfg.head.use_p7) == (False, False, True, True)
    # fiber-b is the coarse release's model; the fine task takes its fine variant
    assert config_for_task("fiber-b", "coarse") is get_config("fiber-b")
    fine = config_for_task("fiber-b", "fine")
    assert fine.name == "fiber-b-fine" and fine.swin.window_rule == "fixed-pad" and fine.head.use_p7
    assert fine.swin.stage_dims == get_config("fiber-b").swin.stage_dims and fine.pairs() == get_config("fiber-b").pairs()


@pytest.mark.parametrize("group", ["text", "swin", "fpn"])
def test_reproduces_the_official_fine_backbone(run, golden_io, group):
    names = sorted(k for k in golden_io if k.startswith(group + ".") and k != "text.masks"
                   and k not in ("text.input_ids", "text.attention_mask"))
    assert set(names) <= set(run), sorted(set(names) - set(run))
    expected = {"text": 15, "swin": 8, "fpn": 5}[group]  # text: embeddings, 12 layers, hidden, embedded
    assert len(names) == expected, names
    for name in names:
        torch.testing.assert_close(run[name], golden_io[name], **TOL, msg=name)


def test_fpn_shapes_and_padded_grids(run):
    # 224 x 288 batch: Swin grids 56x72 / 28x36 / 14x18 / 7x9 (padded to 12-multiples inside the
    # blocks); FPN levels 28x36 .. 2x3 (1349 anchors per image)
    assert [tuple(run[f"fpn.{n}"].shape[-2:]) for n in LEVELS] == [(28, 36), (14, 18), (7, 9), (4, 5), (2, 3)]
    assert sum(h * w for h, w in (run[f"fpn.{n}"].shape[-2:] for n in LEVELS)) == 1349
