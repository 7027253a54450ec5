"""Parity with the official FIBER code: tests/data/golden (see PROVENANCE.md there).

The official coarse-layout weights go through ``convert_official`` into ``fiber-golden``; every
recorded output (fused path, each layer pair, the unimodal paths) must match within 1e-4.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fiber.backbone import FusedBackbone, build_backbone
from fiber.checkpoint import convert_official, load_model_state
from fiber.config import get_config

GOLDEN = Path(__file__).parent / "data" / "golden"
TOL = dict(atol=1e-4, rtol=1e-4)


def tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] map -> [B, H*W, C] tokens (row-major, as the golden file stores them)."""
    return x.flatten(2).transpose(1, 2)


@pytest.fixture(scope="module")
def golden_io() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "fiber_small_io.safetensors"))


@pytest.fixture(scope="module")
def model() -> FusedBackbone:
    cfg = get_config("fiber-golden")
    state, report, _ = convert_official(GOLDEN / "fiber_small_official.safetensors", cfg)
    assert report.layout == "coarse" and not report.unexpected
    # the coarse layout has only the final norm: norm1/norm2 (stages 2-3) are fresh LayerNorms
    assert sorted(report.missing_initialised) == sorted(
        f"backbone.image.norm{i}.{p}" for i in (1, 2) for p in ("weight", "bias"))
    net = build_backbone(cfg)
    load_model_state(net, {k[len("backbone."):]: v for k, v in state.items()}, "golden")
    return net.eval()


def record_intermediates(net: FusedBackbone) -> tuple[dict[str, torch.Tensor], list]:
    """Forward hooks that store, under the golden file's names, what each module outputs."""
    seen: dict[str, torch.Tensor] = {}
    cfg = net.cfg

    def keep(name):
        return lambda module, args, out: seen.__setitem__(name, out)

    points = {"fused.image_patch_embed": net.image.patch_embed,
              "fused.image_after_stage2": net.image.layers[1].downsample,
              "fused.image_after_stage3_downsample": net.image.layers[2].downsample,
              "fused.text_embeddings": net.text.embeddings}
    for i in range(cfg.first_fused_text_layer):
        points[f"fused.text_after_layer{i}"] = net.text.layers[i]
    fused = {(s, b) for s, b, _ in cfg.pairs()}
    for b, block in enumerate(net.image.layers[2].blocks):
        if (2, b) not in fused:
            points[f"fused.image_after_s3b{b}"] = block
    for k, (s, b, t) in enumerate(cfg.pairs()):
        points[f"fused.pair{k}.image"] = net.image.layers[s].blocks[b]
        points[f"fused.pair{k}.text"] = net.text.layers[t]
    handles = [m.register_forward_hook(keep(name)) for name, m in points.items()]
    return seen, handles


def test_golden_config_matches_provenance(golden_io):
    cfg = get_config("fiber-golden")
    assert cfg.swin.window == 4 and cfg.swin.stage_resolutions == (32, 16, 8, 4)
    # pairing table of PROVENANCE.md §1: s3b2..s3b5 with layers 6-9, s4b0/b1 with 10/11
    assert cfg.pairs() == [(2, 2, 6), (2, 3, 7), (2, 4, 8), (2, 5, 9), (3, 0, 10), (3, 1, 11)]


def test_fused_path_reproduces_every_recorded_output(model, golden_io):
    seen, handles = record_intermediates(model)
    try:
        with torch.no_grad():
            out = model(golden_io["input.image"], golden_io["input.text_ids"],
                        golden_io["input.text_mask"], final_norms=False)
    finally:
        for h in handles:
            h.remove()
    expected_names = {k for k in golden_io if k.startswith("fused.")} - {
        "fused.image_final", "fused.text_final", "fused.image_final_with_vit_norm",
        "fused.text_final_with_last_ln"}
    assert set(seen) == expected_names  # every recorded intermediate is checked
    for name, value in seen.items():
        torch.testing.assert_close(value, golden_io[name], **TOL, msg=name)
    torch.testing.assert_close(tokens(out.image_stages[3]), golden_io["fused.image_final"], **TOL)
    torch.testing.assert_close(out.text, golden_io["fused.text_final"], **TOL)
    with torch.no_grad():  # the convenience outputs: the skipped norms applied afterwards
        torch.testing.assert_close(model.image.norm3(tokens(out.image_stages[3])),
                                   golden_io["fused.image_final_with_vit_norm"], **TOL)
        torch.testing.assert_close(model.text.layers[-1].output.LayerNorm(out.text),
                                   golden_io["fused.text_final_with_last_ln"], **TOL)


def test_fused_path_with_final_norms(model, golden_io):
    with torch.no_grad():
        out = model(golden_io["input.image"], golden_io["input.text_ids"], golden_io["input.text_mask"])
    torch.testing.assert_close(tokens(out.image_stages[3]), golden_io["fused.image_final_with_vit_norm"], **TOL)
    torch.testing.assert_close(out.text, golden_io["fused.text_final_with_last_ln"], **TOL)


def test_unimodal_paths(model, golden_io):
    seen, handles = {}, [model.image.layers[3].blocks[1].register_forward_hook(
        lambda m, a, out: seen.__setitem__("prenorm", out))]
    with torch.no_grad():
        maps = model.forward_image(golden_io["input.image"])
        text = model.forward_text(golden_io["input.text_ids"], golden_io["input.text_mask"])
    handles[0].remove()
    torch.testing.assert_close(seen["prenorm"], golden_io["image_only.final_prenorm"], **TOL)
    torch.testing.assert_close(tokens(maps[3]), golden_io["image_only.final"], **TOL)
    torch.testing.assert_close(text, golden_io["text_only.final"], **TOL)


def test_roberta_positions_and_buffers(model, golden_io):
    ids = golden_io["input.text_ids"]
    assert torch.equal(model.text.embeddings.position_ids(ids), golden_io["input.text_position_ids"])
    official = load_file(str(GOLDEN / "fiber_small_official.safetensors"))
    checked = 0
    for key, value in official.items():  # our recomputed buffers equal the official ones
        if key.endswith((".attn_mask", ".attn.relative_position_index")):
            owner, buffer = key[len("vit_model."):].rsplit(".", 1)
            assert torch.equal(getattr(model.image.get_submodule(owner), buffer), value), key
            checked += 1
    assert checked == 12 + 5  # 12 blocks with an index; masks on s1b1, s2b1, s3b1, s3b3, s3b5
