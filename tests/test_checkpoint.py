"""Checkpoint io and the official-checkpoint converter.

The fake official state dicts are written from the official naming and shape rules of
/work/shared/reference/fiber.md §6 (not from our model), so the converter is checked against the
official layout itself. fiber-b-sized dicts live on the meta device (no memory).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fiber.backbone import build_backbone
from fiber.checkpoint import (CheckpointError, convert_official, get_args_parser, load_checkpoint,
                              load_model_state, main, resize_relative_position_table, save_checkpoint)
from fiber.config import FusionConfig, ModelConfig, get_config

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden" / "fiber_small_official.safetensors"


# -- fake official checkpoints ------------------------------------------------------------
def official_backbone(cfg: ModelConfig, layout: str = "coarse", v3: bool = True) -> dict[str, tuple]:
    """Official key -> (shape, dtype) for ``cfg``'s sizes, following fiber.md §6 naming."""
    sw, tx, k = cfg.swin, cfg.text, cfg.fusion.num_fused_layers
    img = "vit_model." if layout == "coarse" else "fusion_backbone.backbone.body."
    txt = "text_transformer." if layout == "coarse" else "fusion_backbone.language_backbone.body.model."
    out: dict[str, tuple] = {}
    f32, i64 = torch.float32, torch.int64

    def linear(name, d_out, d_in, bias=True):
        out[name + ".weight"] = ((d_out, d_in), f32)
        if bias:
            out[name + ".bias"] = ((d_out,), f32)

    def norm(name, d):
        out[name + ".weight"], out[name + ".bias"] = ((d,), f32), ((d,), f32)

    out[img + "patch_embed.proj.weight"] = ((sw.embed_dim, 3, sw.patch_size, sw.patch_size), f32)
    out[img + "patch_embed.proj.bias"] = ((sw.embed_dim,), f32)
    norm(img + "patch_embed.norm", sw.embed_dim)
    all_blocks = [(s, b) for s in (2, 3) for b in range(sw.depths[s])]
    fused = set(all_blocks[len(all_blocks) - k:])
    for s, depth in enumerate(sw.depths):
        dim, res = sw.embed_dim * 2**s, sw.img_size // sw.patch_size // 2**s
        win = min(res, sw.window)
        for b in range(depth):
            p = f"{img}layers.{s}.blocks.{b}."
            norm(p + "norm1", dim), norm(p + "norm2", dim)
            linear(p + "attn.qkv", 3 * dim, dim), linear(p + "attn.proj", dim, dim)
            out[p + "attn.relative_position_bias_table"] = (((2 * win - 1) ** 2, sw.num_heads[s]), f32)
            out[p + "attn.relative_position_index"] = ((win * win, win * win), i64)
            if layout == "coarse" and b % 2 and res > win:
                out[p + "attn_mask"] = (((res // win) ** 2, win * win, win * win), f32)
            linear(p + "mlp.fc1", 4 * dim, dim), linear(p + "mlp.fc2", dim, 4 * dim)
            if (s, b) in fused:
                linear(p + "attn.qkv_i2t", dim, dim), linear(p + "attn.qkv_text_i2t", 2 * dim, tx.hidden_size)
                linear(p + "attn.proj_i2t", dim, dim)
                out[p + "attn.alpha_i2t"] = ((1,), f32)
                if v3:
                    norm(p + "attn.norm_i2t_i", dim)
        if s < 3:
            norm(f"{img}layers.{s}.downsample.norm", 4 * dim)
            linear(f"{img}layers.{s}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
    dims = [sw.embed_dim * 2**s for s in range(4)]
    if layout == "coarse":
        norm(img + "norm", dims[3])
    else:
        for i in (1, 2, 3):
            norm(f"{img}norm{i}", dims[i])
    d = tx.hidden_size
    out[txt + "embeddings.word_embeddings.weight"] = ((tx.vocab_size, d), f32)
    out[txt + "embeddings.position_embeddings.weight"] = ((tx.max_position_embeddings, d), f32)
    out[txt + "embeddings.token_type_embeddings.weight"] = ((tx.type_vocab_size, d), f32)
    out[txt + "embeddings.position_ids"] = ((1, tx.max_position_embeddings), i64)
    norm(txt + "embeddings.LayerNorm", d)
    pair_dims = [dims[s] for s, _ in sorted(fused)]
    for i in range(tx.num_layers):
        p = f"{txt}encoder.layer.{i}."
        for n in ("query", "key", "value"):
            linear(p + f"attention.self.{n}", d, d)
        linear(p + "attention.output.dense", d, d), norm(p + "attention.output.LayerNorm", d)
        linear(p + "intermediate.dense", tx.intermediate_size, d)
        linear(p + "output.dense", d, tx.intermediate_size), norm(p + "output.LayerNorm", d)
        j = i - (tx.num_layers - k)
        if j >= 0:
            linear(p + "crossattention_t2i.self.query", d, d)
            linear(p + "crossattention_t2i.self.key", d, pair_dims[j])
            linear(p + "crossattention_t2i.self.value", d, pair_dims[j])
            linear(p + "crossattention_t2i.output.dense", d, d)
            norm(p + "crossattention_t2i.output.LayerNorm", d)
        if layout == "coarse" or j >= 0:  # coarse creates alpha_t2i in every layer
            out[p + "alpha_t2i"] = ((1,), f32)
    if layout == "coarse":
        linear(txt + "pooler.dense", d, d)
    return out


def materialise(spec: dict[str, tuple], device: str = "meta", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if device == "meta":
        return {k: torch.empty(shape, dtype=dt, device="meta") for k, (shape, dt) in spec.items()}
    return {k: (torch.randn(shape, generator=g) if dt == torch.float32 else torch.zeros(shape, dtype=dt))
            for k, (shape, dt) in spec.items()}


COARSE_HEADS = {"cross_modal_text_transform.weight": (768, 768), "cross_modal_image_transform.weight": (768, 1024),
                "itm_score.fc.weight": (2, 1536), "mlm_score.decoder.weight": (50265, 768), "temp": ()}

def with_extras(backbone: dict[str, torch.Tensor], extras: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {**backbone, **{k: torch.empty(s, device="meta") for k, s in extras.items()}}


# -- converter on fiber-b ------------------------------------------------------------------
def test_coarse_fiber_b_every_backbone_tensor_is_carried():
    cfg = get_config("fiber-b")
    spec = official_backbone(cfg, "coarse")
    official = with_extras(materialise(spec), {**COARSE_HEADS, "image_queue": (768, 4096), "queue_ptr": (1,)})
    out, report, _ = convert_official({"state_dict": official, "epoch": 3}, cfg)
    with torch.device("meta"):
        target = {"backbone." + k: v.shape for k, v in build_backbone(cfg).state_dict().items()}
    assert out.keys() == target.keys()
    assert all(out[k].shape == target[k] for k in target)
    buffers = [k for k in spec if k.endswith(("relative_position_index", "attn_mask", "position_ids"))]
    plain_alphas = [f"text_transformer.encoder.layer.{i}.alpha_t2i" for i in range(6)]
    assert sorted(report.dropped_buffers) == sorted(buffers + ["image_queue", "queue_ptr"])
    assert sorted(report.dropped_unused) == sorted(plain_alphas)
    assert sorted(report.dropped_heads) == sorted(list(COARSE_HEADS) + ["text_transformer.pooler.dense.weight",
                                                                        "text_transformer.pooler.dense.bias"])
    assert report.mapped == len(spec) - len(buffers) - len(plain_alphas) - 2  # minus the pooler
    assert report.missing_initialised == ["backbone.image.norm1.bias", "backbone.image.norm1.weight",
                                          "backbone.image.norm2.bias", "backbone.image.norm2.weight"]
    assert not report.unexpected and not report.resized
    assert out["backbone.image.norm3.weight"] is official["vit_model.norm.weight"]
    assert out["backbone.image.norm1.weight"].eq(1).all()


# -- converter values and errors on the tiny config -----------------------------------------
def test_values_are_carried_into_the_model():
    cfg = get_config("fiber-tiny-test")
    official = materialise(official_backbone(cfg, "coarse"), device="cpu", seed=1)
    out, _, _ = convert_official(official, cfg)
    model = build_backbone(cfg)
    load_model_state(model, {k[len("backbone."):]: v for k, v in out.items()})
    state = model.state_dict()
    assert torch.equal(state["image.norm3.weight"], official["vit_model.norm.weight"])
    assert torch.equal(state["image.layers.2.blocks.1.attn.qkv_text_i2t.weight"],
                       official["vit_model.layers.2.blocks.1.attn.qkv_text_i2t.weight"])
    assert torch.equal(state["text.encoder.layer.3.crossattention_t2i.self.key.weight"],
                       official["text_transformer.encoder.layer.3.crossattention_t2i.self.key.weight"])
    assert torch.equal(state["text.encoder.layer.1.alpha_t2i"], official["text_transformer.encoder.layer.1.alpha_t2i"])


def test_relative_position_tables_are_resized():
    cfg = get_config("fiber-tiny-test")  # window 2 -> 9-row tables
    official = materialise(official_backbone(cfg, "coarse"), device="cpu")
    official["vit_model.layers.0.blocks.0.attn.relative_position_bias_table"] = torch.full((25, 1), 0.7)
    out, report, _ = convert_official(official, cfg)
    assert report.resized == ["vit_model.layers.0.blocks.0.attn.relative_position_bias_table [25, 1]->[9, 1]"]
    table = out["backbone.image.layers.0.blocks.0.attn.relative_position_bias_table"]
    torch.testing.assert_close(table, torch.full((9, 1), 0.7))  # a constant field stays constant
    same = torch.randn(49, 3)
    torch.testing.assert_close(resize_relative_position_table(same, 49), same)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("vit_model.layers.1.blocks.0.mlp.fc1.weight"),
     r"missing backbone/fusion tensor for config 'fiber-tiny-test': 'backbone.image.layers.1.blocks.0.mlp.fc1.weight'"),
    (lambda d: d.__setitem__("vit_model.layers.2.blocks.1.attn.qkv_text_i2t.weight", torch.zeros(64, 12)),
     r"'vit_model.layers.2.blocks.1.attn.qkv_text_i2t.weight' has shape \[64, 12\], expected \[64, 16\]"),
    (lambda d: d.__setitem__("vit_model.layers.2.blocks.2.norm1.weight", torch.zeros(32)),
     r"backbone tensor 'vit_model.layers.2.blocks.2.norm1.weight' has no place in config 'fiber-tiny-test'"),
    (lambda d: d.__setitem__("text_transformer.encoder.layer.0.attention.self.query.weight", [1.0]),
     r"entry 'text_transformer.encoder.layer.0.attention.self.query.weight' is a list, not a tensor"),
])
def test_converter_errors_name_the_key(edit, message):
    official = materialise(official_backbone(get_config("fiber-tiny-test"), "coarse"))
    edit(official)
    with pytest.raises(CheckpointError, match=message):
        convert_official(official, "fiber-tiny-test")


def test_converter_refuses_other_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        convert_official(tmp_path / "nope.pth", "fiber-tiny-test")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk.pth: cannot read as a checkpoint"):
        convert_official(junk, "fiber-tiny-test")
    with pytest.raises(CheckpointError, match="no official FIBER backbone keys"):
        convert_official({"encoder.weight": torch.zeros(1)}, "fiber-tiny-test")
    with pytest.raises(ValueError, match="unknown config 'fiber-x'"):
        convert_official({}, "fiber-x")


def test_unknown_non_backbone_keys_are_reported():
    official = materialise(official_backbone(get_config("fiber-tiny-test"), "coarse"))
    official["my_extra_head.weight"] = torch.empty(3, device="meta")
    _, report, _ = convert_official(official, "fiber-tiny-test")
    assert report.unexpected == ["my_extra_head.weight"]
    assert "unexpected (dropped): 1: 'my_extra_head.weight'" in report.summary()


# -- our checkpoint format -------------------------------------------------------------------
def tiny_state() -> tuple[dict[str, torch.Tensor], ModelConfig]:
    cfg = get_config("fiber-tiny-test")
    torch.manual_seed(3)
    return {"backbone." + k: v for k, v in build_backbone(cfg).state_dict().items()}, cfg


def test_save_load_round_trip_is_exact(tmp_path):
    state, cfg = tiny_state()
    save_checkpoint(tmp_path / "ck", state, cfg, {"task": "coarse", "step": 7})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    loaded, cfg2, meta = load_checkpoint(tmp_path / "ck", expect_name="fiber-tiny-test")
    assert cfg2 == cfg and meta == {"format": "fiber-edge-checkpoint", "format_version": 1,
                                    "task": "coarse", "step": 7}
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) and loaded[k].dtype == state[k].dtype for k in state)


def test_save_is_atomic(tmp_path):
    state, cfg = tiny_state()
    with pytest.raises(CheckpointError, match="meta is not JSON-serialisable"):
        save_checkpoint(tmp_path / "ck", state, cfg, {"task": object()})  # fails after the weights
    assert list(tmp_path.iterdir()) == []  # no partial folder, no temp left behind
    save_checkpoint(tmp_path / "ck", state, cfg, {"task": "fine"})
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path / "ck", {}, cfg)
    with pytest.raises(CheckpointError, match="reserved key 'model'"):
        save_checkpoint(tmp_path / "ck2", state, cfg, {"model": 1})
    assert load_checkpoint(tmp_path / "ck")[2]["task"] == "fine"


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(tmp_path / "missing")
    state, cfg = tiny_state()
    ck = save_checkpoint(tmp_path / "ck", state, cfg, {"task": "fine"})
    with pytest.raises(CheckpointError, match="holds config 'fiber-tiny-test', expected 'fiber-nano'"):
        load_checkpoint(ck, expect_name="fiber-nano")
    meta = json.loads((ck / "config.json").read_text())
    meta["model"]["text"]["hiden_size"] = 3
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config.json: unknown key 'model\.text\.hiden_size'"):
        load_checkpoint(ck)
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_checkpoint(ck)


def test_load_model_state_names_unknown_and_wrong_keys():
    state, cfg = tiny_state()
    model = build_backbone(cfg)
    inner = {k[len("backbone."):]: v for k, v in state.items()}
    with pytest.raises(CheckpointError, match=r"unknown key 'image.extra'"):
        load_model_state(model, {**inner, "image.extra": torch.zeros(1)})
    bad = dict(inner, **{"image.norm3.weight": torch.zeros(5)})
    with pytest.raises(CheckpointError, match=r"'image.norm3.weight' has shape \[5\], expected \[64\]"):
        load_model_state(model, bad)


def test_load_model_state_skips_distillation_projections_only():
    """A mid-run KD checkpoint carries kd_proj.* (for resume): the plain model loads without them,
    any other extra key is still an error."""
    state, cfg = tiny_state()
    model = build_backbone(cfg)
    inner = {k[len("backbone."):]: v for k, v in state.items()}
    load_model_state(model, {**inner, "kd_proj.text.weight": torch.zeros(3, 3)})
    assert torch.equal(model.state_dict()["image.norm3.weight"], inner["image.norm3.weight"])
    # the training-only colour classifier of train.fine --colour-aux, in its mid-run checkpoints
    load_model_state(model, {**inner, "colour_aux.weight": torch.zeros(8, 3), "colour_aux.bias": torch.zeros(8)})
    with pytest.raises(CheckpointError, match=r"unknown key 'colour_auxiliary.x'"):
        load_model_state(model, {**inner, "colour_auxiliary.x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unknown key 'kd_projection.x'"):
        load_model_state(model, {**inner, "kd_projection.x": torch.zeros(1)})


# -- CLI --------------------------------------------------------------------------------------
def test_cli_converts_the_golden_file(tmp_path, capsys):
    args = get_args_parser().parse_args(["convert-official", str(GOLDEN), "--config", "fiber-golden",
                                         "--out", str(tmp_path / "out")])
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "official coarse layout -> config 'fiber-golden'" in printed and "dropped task heads: 2" in printed
    state, cfg, meta = load_checkpoint(tmp_path / "out", expect_name="fiber-golden")
    assert meta["task"] == "coarse" and meta["conversion"]["layout"] == "coarse"
    assert "backbone.text.encoder.layer.11.alpha_t2i" in state


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fiber.checkpoint", "convert-official",
                           str(tmp_path / "nope.ckpt"), "--config", "fiber-b", "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.ckpt: no such file" in proc.stderr
    args = get_args_parser().parse_args(["convert-official", str(GOLDEN), "--config", "fiber-x",
                                         "--out", str(tmp_path / "o")])
    assert main(args) == 2
    assert not (tmp_path / "o").exists()
