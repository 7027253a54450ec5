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


# -- the switches themselves (no golden file) ------------------------------------------------
def _pair(window_rule: str):
    """fiber-tiny-test (64 px, grids 16/8/4/2, window 2) under ``window_rule``, same weights."""
    import dataclasses

    from fiber.backbone import build_backbone

    base = get_config("fiber-tiny-test")
    cfg = base.replace(name=f"tiny-{window_rule}", swin=dataclasses.replace(base.swin, window_rule=window_rule))
    torch.manual_seed(0)
    return build_backbone(cfg).eval()


def test_fixed_pad_is_the_coarse_rule_where_grids_fit_the_windows():
    coarse, fixed = _pair("coarse"), _pair("fixed-pad")
    fixed.load_state_dict(coarse.state_dict())
    fixed.set_gates(0.5), coarse.set_gates(0.5)
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, 64, 64, generator=g)
    ids, mask = torch.randint(5, 100, (2, 6), generator=g), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        a, b = coarse(image, ids, mask), fixed(image, ids, mask)
    # stages 1-3: grids 16/8/4 are multiples of window 2 and both rules shift odd blocks by 1
    for s in range(3):
        torch.testing.assert_close(b.image_stages[s], a.image_stages[s], atol=1e-6, rtol=1e-6)
    # stage 4 (2 x 2 = one window): the coarse rule does not shift, the fine rule shifts with a mask
    assert (b.image_stages[3] - a.image_stages[3]).abs().max() > 1e-3
    assert coarse.image.layers[3].blocks[1].shift == 0 and fixed.image.layers[3].blocks[1].shift == 1


def test_fixed_pad_takes_any_size_and_pads_like_the_official_code():
    fixed = _pair("fixed-pad")
    image = torch.randn(1, 3, 50, 38)  # not a multiple of the patch: 13 x 10 tokens, odd merges
    with torch.no_grad():
        maps = fixed.forward_image(image)
        # a zero-padded bottom/right border up to the next multiple of 4 is what PatchEmbed adds
        padded = fixed.forward_image(torch.nn.functional.pad(image, (0, 2, 0, 2)))
    assert [tuple(m.shape[-2:]) for m in maps] == [(13, 10), (7, 5), (4, 3), (2, 2)]
    for m, p in zip(maps, padded):
        torch.testing.assert_close(m, p)
    with pytest.raises(ValueError, match=r"image must be \[B, 3, H, W\]"):
        fixed.forward_image(torch.zeros(1, 1, 32, 32))


def test_configs_saved_before_the_new_fields_still_load():
    from fiber.config import ModelConfig, list_configs

    for name in list_configs():
        d = get_config(name).to_dict()
        if (d["swin"]["window_rule"], d["fusion"]["t2i_norm"], d["head"]["use_p7"]) != ("coarse", True, False):
            continue  # only the configs that existed before the fields
        del d["swin"]["window_rule"], d["fusion"]["t2i_norm"], d["head"]["use_p7"]
        assert ModelConfig.from_dict(d) == get_config(name)
    bad = get_config("fiber-golden-fine").to_dict()
    bad["swin"]["window_rule"] = "fixed"
    with pytest.raises(ValueError, match="window_rule must be one of coarse, fixed-pad"):
        ModelConfig.from_dict(bad)


def test_fiber_b_fine_backbone_and_fpn_have_the_official_release_layout():
    from official_fine_layout import official_fine_shapes

    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in FiberForGrounding(get_config("fiber-b-fine")).state_dict().items()
                if k.startswith(("backbone.", "fpn."))}
    prefixes = {k: v for k, v in LAYOUT_PREFIXES["fine"].items() if v.startswith(("backbone.", "fpn."))}
    official = {}
    for key, shape in official_fine_shapes(version="v2", with_index=False).items():
        for prefix, mapped in prefixes.items():
            if key.startswith(prefix) and not key.endswith("position_ids"):
                official[mapped + key[len(prefix):]] = shape
    assert ours == official


def test_fixed_pad_swin_exports_to_onnx():
    # the shift masks of padded grids (one-window stages included) trace to constants, not to
    # in-place index_put ops the ONNX exporter cannot shape
    import io

    import onnxruntime as ort

    from fiber.swin import _padded_grid_mask

    fixed = _pair("fixed-pad")
    image = torch.randn(1, 3, 50, 38, generator=torch.Generator().manual_seed(2))
    _padded_grid_mask.cache_clear()  # the masks are built inside the trace
    f = io.BytesIO()
    torch.onnx.export(fixed.image, (image,), f, dynamo=False, opset_version=17, input_names=["image"])
    got = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"image": image.numpy()})
    with torch.no_grad():
        want = fixed.forward_image(image)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, atol=1e-5, rtol=1e-5)
