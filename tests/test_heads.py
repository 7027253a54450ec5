"""Box ops, anchors, FPN, the grounding head and the coarse heads (random tensors, tiny shapes)."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from fiber.box_ops import (BoxCoder, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                           generalized_box_iou, level_anchors, make_anchors, paired_generalized_box_iou)
from fiber.heads.coarse import CoarseHeads
from fiber.heads.grounding import FPN, GroundingHead

PRIOR_LOGIT = math.log(0.01 / 0.99)


# ----------------------------------------------------------------------------- box ops

def test_cxcywh_round_trip():
    boxes = torch.tensor([[1.0, 2.0, 5.0, 10.0], [0.0, 0.0, 3.0, 3.0]])
    assert torch.equal(box_xyxy_to_cxcywh(boxes), torch.tensor([[3.0, 6.0, 4.0, 8.0], [1.5, 1.5, 3.0, 3.0]]))
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes)


def test_iou_and_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0],    # overlap 1, union 7, hull 9
                      [4.0, 0.0, 6.0, 2.0],    # disjoint, hull 6x2 = 12, union 8
                      [0.0, 0.0, 2.0, 2.0]])   # identical
    iou, union = box_iou(a, b)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 0.0, 1.0]]))
    assert torch.allclose(union, torch.tensor([[7.0, 8.0, 4.0]]))
    giou = generalized_box_iou(a, b)
    assert torch.allclose(giou, torch.tensor([[1 / 7 - 2 / 9, 0.0 - 4 / 12, 1.0]]))
    paired = paired_generalized_box_iou(a.expand(3, 4), b)
    assert torch.allclose(paired, giou[0], atol=1e-6)


def test_paired_giou_collapses_inverted_prediction():
    pred = torch.tensor([[2.0, 2.0, 0.0, 0.0]])  # x2 < x1: collapsed to a point at (2, 2)
    gt = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    # iou 0, hull = gt (area 4), union = 4 -> giou 0
    assert torch.allclose(paired_generalized_box_iou(pred, gt), torch.tensor([0.0]), atol=1e-6)


def test_box_coder_round_trip_and_weights():
    torch.manual_seed(0)
    coder = BoxCoder()
    anchors = box_cxcywh_to_xyxy(torch.cat([torch.rand(50, 2) * 200, torch.rand(50, 2) * 60 + 4], 1))
    boxes = box_cxcywh_to_xyxy(torch.cat([torch.rand(50, 2) * 200, torch.rand(50, 2) * 60 + 4], 1))
    assert torch.allclose(coder.decode(coder.encode(boxes, anchors), anchors), boxes, atol=1e-3)
    # weights: a box shifted by half an anchor width has dx = 10 * 0.5; doubled width has dw = 5 log 2
    anchor = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    box = torch.tensor([[5.0, 0.0, 15.0, 10.0], [-5.0, 0.0, 15.0, 10.0]])
    d = coder.encode(box, anchor)
    assert torch.allclose(d[0], torch.tensor([5.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(d[1], torch.tensor([0.0, 0.0, 5 * math.log(2), 0.0]))


def test_box_coder_clamps_size_and_broadcasts():
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 8.0, 24.0, 24.0]])
    huge = torch.tensor([[[0.0, 0.0, 1e4, 1e4], [0.0, 0.0, 0.0, 0.0]]]).expand(3, 2, 4)   # [B, N, 4]
    out = coder.decode(huge, anchors)
    assert out.shape == (3, 2, 4) and torch.isfinite(out).all()
    assert torch.allclose(out[0, 0, 2] - out[0, 0, 0], torch.tensor(8.0 * 1000 / 16))
    assert torch.allclose(out[0, 1], anchors[1])


def test_anchors_count_sizes_and_centres():
    a = level_anchors(3, 4, stride=8, size=64)
    assert a.shape == (12, 4)
    centres = (a[:, :2] + a[:, 2:]) / 2
    assert torch.allclose(centres[0], torch.tensor([4.0, 4.0]))        # row 0, col 0
    assert torch.allclose(centres[1], torch.tensor([12.0, 4.0]))       # row 0, col 1 (row-major)
    assert torch.allclose(centres[4], torch.tensor([4.0, 12.0]))       # row 1, col 0
    assert torch.allclose(a[:, 2] - a[:, 0], torch.full((12,), 64.0))
    allv = make_anchors([(8, 8), (4, 4), (2, 2)], (8, 16, 32), anchor_scale=8.0)
    assert allv.shape == (64 + 16 + 4, 4)
    assert torch.allclose(allv[64, 2] - allv[64, 0], torch.tensor(128.0))
    assert torch.allclose((allv[-1, :2] + allv[-1, 2:]) / 2, torch.tensor([48.0, 48.0]))
    with pytest.raises(ValueError, match="strides"):
        make_anchors([(2, 2)], (8, 16), 8.0)


# ----------------------------------------------------------------------------- options, FPN

@pytest.mark.parametrize("use_p6", [False, True])
def test_fpn_shapes(use_p6):
    fpn = FPN((16, 32, 64), 24, use_p6=use_p6)
    feats = [torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4), torch.randn(2, 64, 2, 2)]
    outs = fpn(feats)
    expected = [(8, 8), (4, 4), (2, 2)] + ([(1, 1)] if use_p6 else [])
    assert [tuple(o.shape[-2:]) for o in outs] == expected
    assert all(o.shape[:2] == (2, 24) for o in outs)
    assert fpn.num_levels == len(expected)
    assert ("top_blocks.p6.weight" in fpn.state_dict()) == use_p6


# ----------------------------------------------------------------------------- grounding head

def _head(proj_dim=16, text_dim=12, position_features=False):
    torch.manual_seed(0)
    return GroundingHead(16, text_dim, strides=(8, 16, 32), num_convs=2, proj_dim=proj_dim,
                         position_features=position_features)


def _features(b=2):
    return [torch.randn(b, 16, 8, 8), torch.randn(b, 16, 4, 4), torch.randn(b, 16, 2, 2)]


def test_head_output_shapes_and_decode():
    head = _head()
    text, mask = torch.randn(2, 5, 12), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    out = head(_features(), text, mask)
    assert out.box_deltas.shape == (2, 84, 4) and out.boxes.shape == (2, 84, 4)
    assert out.token_logits.shape == (2, 84, 5) and out.centerness.shape == (2, 84)
    assert out.anchors.shape == (84, 4) and out.level_sizes == (64, 16, 4)
    assert torch.allclose(out.boxes, head.box_coder.decode(out.box_deltas, out.anchors))


@pytest.mark.parametrize("proj_dim", [16, 8])
def test_alignment_logits_start_at_prior(proj_dim):
    head = _head(proj_dim=proj_dim)
    out = head(_features(), torch.randn(2, 6, 12), torch.ones(2, 6, dtype=torch.long))
    assert torch.allclose(head.bias0, torch.tensor([PRIOR_LOGIT]))
    dev = (out.token_logits - PRIOR_LOGIT).abs()
    assert dev.mean() < 0.75 and dev.max() < 3.0  # |<f, t>| is O(0.1-1) at init, as in GLIP
    assert 0.005 < torch.sigmoid(out.token_logits).mean() < 0.02


def test_alignment_formula_matches_glip():
    """logit = <f, proj(e/2)> / exp(log_scale) + e.bias_lang + bias0, e = normalise(h * mask)."""
    head = _head()
    with torch.no_grad():
        head.log_scale.fill_(0.3)
        head.bias_lang.normal_()
    feats, text = _features(1), torch.randn(1, 4, 12)
    mask = torch.tensor([[1, 1, 1, 0]])
    out = head(feats, text, mask)
    f = torch.cat([head.tower(x).flatten(2).transpose(1, 2) for x in feats], 1)[0]   # [N, C]
    e = text[0] * mask[0, :, None]
    e = e / e.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    t = (e / 2) @ head.dot_product_projection_text.weight.T + head.dot_product_projection_text.bias
    expected = f @ t.T / math.exp(0.3) + (e @ head.bias_lang + head.bias0)[None, :]
    assert torch.allclose(out.token_logits[0], expected, atol=1e-5)


def test_padding_tokens_do_not_leak():
    """Values at padded text positions change no logit (GLIP zeroes them before the head)."""
    head = _head()
    feats, text = _features(), torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    a = head(feats, text, mask).token_logits
    text2 = text.clone()
    text2[mask == 0] = torch.randn(int((mask == 0).sum()), 12) * 100
    b = head(feats, text2, mask).token_logits
    assert torch.equal(a, b)


def test_position_features_start_as_the_plain_head_and_can_prefer_a_side():
    """Zero-initialised position map: the same logits as the head without it. A map that gives
    a token the direction -x adds POSITION_SCALE * (0.5 - x / W) to its logits: of twins (the
    same feature at two places) the left one scores higher; padding tokens get nothing."""
    from fiber.heads.grounding import POSITION_SCALE
    plain, pos = _head(), _head(position_features=True)
    pos.load_state_dict({**plain.state_dict(), "position_text": torch.zeros(12, 2)})
    text, mask = torch.randn(2, 5, 12), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    feats = _features()
    base = plain(feats, text, mask).token_logits
    assert torch.equal(base, pos(feats, text, mask).token_logits)
    e0 = text[0, 0] / text[0, 0].norm()
    with torch.no_grad():
        pos.position_text[:, 0] = -2 * e0  # token 0 of sample 0: (e0 / 2) . (-2 e0) = -1 along x
    added = pos(feats, text, mask).token_logits - base
    level0 = added[0, :64, 0].reshape(8, 8)  # stride 8, rows y, columns x
    step = POSITION_SCALE * 8 / 64  # one column of the 64 px input
    np.testing.assert_allclose((level0[:, :-1] - level0[:, 1:]).detach().numpy(), step, rtol=1e-4)
    assert torch.allclose(level0[1:], level0[:-1], atol=1e-5)  # no preference along y
    np.testing.assert_allclose(level0[0, 0].item(), POSITION_SCALE * (0.5 - 4 / 64), rtol=1e-4)
    assert torch.equal(added[1, :, 3:], torch.zeros_like(added[1, :, 3:]))  # padding


def test_position_features_are_a_light_head_option():
    from fiber.config import HeadConfig
    HeadConfig(kind="light", position_features=True).validate()
    with pytest.raises(ValueError, match="position_features"):
        HeadConfig(kind="dyhead", position_features=True).validate()


@pytest.mark.parametrize("position_features", [False, True])
def test_head_exports_to_onnx_with_dynamic_tokens(position_features):
    ort = pytest.importorskip("onnxruntime")
    head = _head(position_features=position_features).eval()
    if position_features:
        with torch.no_grad():
            head.position_text.normal_()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, p3, p4, p5, text, mask):
            o = self.head([p3, p4, p5], text, mask)
            return o.boxes, o.token_logits, o.centerness

    def inputs(b, t):
        mask = torch.ones(b, t, dtype=torch.long)
        mask[-1, t - 2:] = 0
        return (*_features(b), torch.randn(b, t, 12), mask)

    names = ["p3", "p4", "p5", "text", "mask"]
    f = io.BytesIO()
    torch.onnx.export(Wrap(), inputs(1, 5), f, dynamo=False, opset_version=17, input_names=names,
                      dynamic_axes={"p3": {0: "b"}, "p4": {0: "b"}, "p5": {0: "b"},
                                    "text": {0: "b", 1: "t"}, "mask": {0: "b", 1: "t"}})
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    for b, t in ((1, 5), (2, 9)):
        x = inputs(b, t)
        with torch.no_grad():
            ref = Wrap()(*x)
        got = sess.run(None, {n: v.numpy() for n, v in zip(names, x)})
        for r, g in zip(ref, got):
            assert g.shape == tuple(r.shape)
            np.testing.assert_allclose(g, r.numpy(), atol=1e-4, rtol=1e-4)


def test_head_rejects_bad_group_count():
    with pytest.raises(ValueError, match="GroupNorm"):
        GroundingHead(20, 8, strides=(8,), gn_groups=16)


# ----------------------------------------------------------------------------- coarse heads

def test_coarse_heads_official_names_and_init():
    heads = CoarseHeads(text_dim=16, image_dim=32, vocab_size=50, queue_size=8)
    keys = set(heads.state_dict())
    for k in ["cross_modal_text_transform.weight", "cross_modal_image_transform.weight",
              "cross_modal_text_transform_itc.bias", "cross_modal_image_transform_itc.bias",
              "cross_modal_text_pooler.dense.weight", "cross_modal_image_pooler_itc.dense.weight",
              "itm_score.fc.weight", "mlm_score.transform.dense.weight", "mlm_score.transform.LayerNorm.weight",
              "mlm_score.decoder.weight", "mlm_score.bias", "temp", "image_queue", "text_queue",
              "queue_ptr", "queue_total"]:
        assert k in keys, k
    assert "mlm_score.decoder.bias" not in keys
    assert heads.itm_score.fc.weight.shape == (2, 32)
    assert heads.cross_modal_image_transform.weight.shape == (16, 32)
    assert abs(heads.temp.item() - 0.07) < 1e-7
    assert abs(heads.cross_modal_text_transform.weight.std().item() - 0.02) < 0.01


def test_coarse_heads_shapes_and_normalisation():
    torch.manual_seed(0)
    heads = CoarseHeads(text_dim=16, image_dim=32, vocab_size=50)
    text, image = torch.randn(3, 7, 16), torch.randn(3, 10, 32)
    assert torch.allclose(heads.itc_text_feat(text).norm(dim=-1), torch.ones(3))
    assert torch.allclose(heads.itc_image_feat(image).norm(dim=-1), torch.ones(3))
    assert heads.itm_logits(text, image).shape == (3, 2)
    assert heads.mlm_logits(text).shape == (3, 7, 50)
    # the text pooler reads token 0 only
    text2 = text.clone()
    text2[:, 1:] += 1.0
    assert torch.equal(heads.fused_cls_feats(text, image)[:, :16], heads.fused_cls_feats(text2, image)[:, :16])


def test_temperature_clamp():
    heads = CoarseHeads(text_dim=8, image_dim=8, vocab_size=10)
    with torch.no_grad():
        heads.temp.fill_(5.0)
    assert heads.clamped_temp().item() == 1.0 and heads.temp.item() == 1.0
    with torch.no_grad():
        heads.temp.fill_(1e-5)
    assert abs(heads.clamped_temp().item() - 0.001) < 1e-9


def test_queue_ring_buffer():
    heads = CoarseHeads(text_dim=2, image_dim=4, vocab_size=10, queue_size=5)
    assert heads.queue_contents()[0].shape == (2, 0)
    feats = torch.arange(16, dtype=torch.float32).reshape(8, 2)
    heads.enqueue(feats[:3], -feats[:3])
    img, txt = heads.queue_contents()
    assert torch.equal(img, feats[:3].t()) and torch.equal(txt, -feats[:3].t())
    heads.enqueue(feats[3:7], -feats[3:7])          # wraps: slots 3, 4, 0, 1
    img, _ = heads.queue_contents()
    assert img.shape == (2, 5) and int(heads.queue_ptr) == 2 and int(heads.queue_total) == 5
    assert torch.equal(img, torch.stack([feats[5], feats[6], feats[2], feats[3], feats[4]]).t())
    heads.enqueue(feats[:7], -feats[:7])            # more than Q at once: only the newest 5 stay
    img, _ = heads.queue_contents()
    assert int(heads.queue_ptr) == 4                 # (2 + 7) % 5: the oldest survivor is next
    assert torch.equal(img, torch.stack([feats[3], feats[4], feats[5], feats[6], feats[2]]).t())
