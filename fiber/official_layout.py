"""The official FIBER fine-grained release layout (``GeneralizedVLRCNN.state_dict()``), by rule.

``official_fine_shapes(...)`` lists every key and shape that microsoft/FIBER's fine model
(``fine_grained/``, SWINT-FPN-RETINANET + VLDyHead, fusion v2 or v3) puts in its state dict. The
rules are checked against the golden file made by the official code (tests/test_convert_fine.py),
so the FIBER-B table they produce (806 tensors, ~252 M values) stands for the released checkpoints
without shipping one. Used by the tests and by ``benchmarks.fiber_b make-release`` (a random-valued
FIBER-B release for the deployment runs); never a source of real weights.
"""
from __future__ import annotations

import torch

BODY = "fusion_backbone.backbone.body."
FPN = "fusion_backbone.backbone.fpn."
TEXT = "fusion_backbone.language_backbone.body.model."
HEAD = "rpn.head."


def official_fine_shapes(embed: int = 128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), window: int = 12,
                         text_dim: int = 768, text_layers: int = 12, ffn: int = 3072, vocab: int = 50265,
                         positions: int = 514, type_vocab: int = 1, fused: int = 6, fpn: int = 256,
                         dyhead: int = 256, num_convs: int = 6, num_classes: int = 80,
                         version: str = "v2", with_index: bool = True) -> dict[str, tuple[int, ...]]:
    """key -> shape of the official fine model (defaults: FIBER-B, RoBERTa-base, v2 fusion)."""
    s: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int, bias: bool = True) -> None:
        s[name + ".weight"] = (out, inp)
        if bias:
            s[name + ".bias"] = (out,)

    def norm(name: str, dim: int) -> None:
        s[name + ".weight"] = (dim,)
        s[name + ".bias"] = (dim,)

    def conv(name: str, out: int, inp: int, k: int) -> None:
        s[name + ".weight"] = (out, inp, k, k)
        s[name + ".bias"] = (out,)

    widths = [embed * 2 ** i for i in range(4)]
    conv(BODY + "patch_embed.proj", embed, 3, 4)
    norm(BODY + "patch_embed.norm", embed)
    blocks = [(i, b) for i in range(4) for b in range(depths[i])]
    fused_blocks = [(i, b) for i, b in blocks if i >= 2][-fused:]
    for i, b in blocks:
        c, p = widths[i], f"{BODY}layers.{i}.blocks.{b}."
        norm(p + "norm1", c)
        linear(p + "attn.qkv", 3 * c, c)
        linear(p + "attn.proj", c, c)
        s[p + "attn.relative_position_bias_table"] = ((2 * window - 1) ** 2, heads[i])
        if with_index:
            s[p + "attn.relative_position_index"] = (window * window, window * window)
        norm(p + "norm2", c)
        linear(p + "mlp.fc1", 4 * c, c)
        linear(p + "mlp.fc2", c, 4 * c)
        if (i, b) in fused_blocks:
            linear(p + "attn.qkv_i2t", c, c)
            linear(p + "attn.qkv_text_i2t", 2 * c, text_dim)
            linear(p + "attn.proj_i2t", c, c)
            s[p + "attn.alpha_i2t"] = (1,)
            if version == "v3":
                norm(p + "attn.norm_i2t_i", c)
    for i in range(3):
        norm(f"{BODY}layers.{i}.downsample.norm", 4 * widths[i])
        linear(f"{BODY}layers.{i}.downsample.reduction", 2 * widths[i], 4 * widths[i], bias=False)
    for i in (1, 2, 3):
        norm(f"{BODY}norm{i}", widths[i])
    for lvl, i in zip((2, 3, 4), (1, 2, 3)):
        conv(f"{FPN}fpn_inner{lvl}", fpn, widths[i], 1)
        conv(f"{FPN}fpn_layer{lvl}", fpn, fpn, 3)
    conv(FPN + "top_blocks.p6", fpn, fpn, 3)
    conv(FPN + "top_blocks.p7", fpn, fpn, 3)

    e = TEXT + "embeddings."
    s[e + "word_embeddings.weight"] = (vocab, text_dim)
    s[e + "position_embeddings.weight"] = (positions, text_dim)
    s[e + "token_type_embeddings.weight"] = (type_vocab, text_dim)
    norm(e + "LayerNorm", text_dim)
    s[e + "position_ids"] = (1, positions)
    first_fused = text_layers - fused
    for layer in range(text_layers):
        p = f"{TEXT}encoder.layer.{layer}."
        for name in ("query", "key", "value"):
            linear(p + "attention.self." + name, text_dim, text_dim)
        linear(p + "attention.output.dense", text_dim, text_dim)
        norm(p + "attention.output.LayerNorm", text_dim)
        linear(p + "intermediate.dense", ffn, text_dim)
        linear(p + "output.dense", text_dim, ffn)
        norm(p + "output.LayerNorm", text_dim)
        if layer >= first_fused:
            image_width = widths[fused_blocks[layer - first_fused][0]]
            linear(p + "crossattention_t2i.self.query", text_dim, text_dim)
            linear(p + "crossattention_t2i.self.key", text_dim, image_width)
            linear(p + "crossattention_t2i.self.value", text_dim, image_width)
            linear(p + "crossattention_t2i.output.dense", text_dim, text_dim)
            s[p + "alpha_t2i"] = (1,)

    for n in range(num_convs):
        p = f"{HEAD}dyhead_tower.{n}."
        cin = fpn if n == 0 else dyhead
        for branch in range(3):
            conv(f"{p}DyConv.{branch}.conv", dyhead, cin, 3)
            norm(f"{p}DyConv.{branch}.bn", dyhead)
        conv(p + "AttnConv.1", 1, cin, 1)
        conv(p + "offset", 27, cin, 3)
        linear(p + "relu.fc.0", dyhead // 4, dyhead)
        linear(p + "relu.fc.2", 4 * dyhead, dyhead // 4)
    conv(HEAD + "cls_logits", num_classes, dyhead, 1)
    conv(HEAD + "bbox_pred", 4, dyhead, 1)
    conv(HEAD + "centerness", 1, dyhead, 1)
    linear(HEAD + "dot_product_projection_text", dyhead, text_dim)
    s[HEAD + "bias_lang"] = (text_dim,)
    for name in ("bias0", "log_scale"):
        s[HEAD + name] = (1,)
    for lvl in range(5):
        s[f"{HEAD}scales.{lvl}.scale"] = (1,)
        s[f"rpn.anchor_generator.cell_anchors.{lvl}"] = (1, 4)
    return s


GOLDEN_SMALL = dict(embed=8, heads=(1, 2, 4, 8), text_dim=32, ffn=128, vocab=1000, positions=64,
                    fpn=32, dyhead=32, with_index=False)


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 values for every key (integer buffers as the official constructor makes them)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("position_ids"):
            out[key] = torch.arange(shape[1]).unsqueeze(0)
        elif key.endswith("relative_position_index"):
            out[key] = torch.randint(0, 10, shape, generator=gen)
        else:
            out[key] = torch.randn(shape, generator=gen) * 0.02
    return out
