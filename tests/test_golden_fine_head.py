"""Parity of the official fine head with FIBER's fine-grained code: tests/data/golden/fine (README
§4 D2-E4, §5, §6; tolerances §7).

Starting from the recorded FPN levels ``fpn.p3..p7`` and ``text.embedded`` (so these tests do not
depend on the backbone), the DyHead loaded from the official ``rpn.head.*`` tensors must reproduce
DyHead block 0 and the tower, the token projection, the per-level logits / box regression /
centerness, the anchors, the official post-processing (pre-NMS candidates, final detections, their
boxes in original pixels), the ATSS assignment and the three losses. One test runs the whole model
from ``input.images``; one trains the golden-fine DyHead model for a few steps.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from compress.onnx_export import OPSET, detector_opset
from fiber.box_ops import BoxCoder
from fiber.checkpoint import convert_official
from fiber.config import HeadConfig, ModelConfig, get_config
from fiber.deform import DEFORM_CONV_OPSET
from fiber.heads.atss import PostprocessLimits, candidates, postprocess, resize_boxes
from fiber.heads.dyhead import DyHead, build_dyhead
from fiber.heads.grounding import GroundingHead
from fiber.losses import GroundingLoss, GroundingTarget
from fiber.models import FiberForGrounding
from train.loop import TrainConfig
from train.tasks import FineTask

GOLDEN = Path(__file__).parent / "data" / "golden" / "fine"
WEIGHTS = GOLDEN / "fiber_fine_small_official.safetensors"
TOL = dict(atol=1e-4, rtol=1e-4)
LEVELS = ("p3", "p4", "p5", "p6", "p7")
CFG = get_config("fiber-golden-fine")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "fiber_fine_small_io.safetensors"))


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    return load_file(str(WEIGHTS))


@pytest.fixture(scope="module")
def head(official) -> DyHead:
    net = build_dyhead(CFG).eval()
    state = {k[len("rpn.head."):]: v for k, v in official.items() if k.startswith("rpn.head.")}
    net.load_state_dict(state, strict=True)  # every official head key, by prefix, and nothing else
    return net


@pytest.fixture(scope="module")
def levels(io) -> list[torch.Tensor]:
    return [io[f"fpn.{lv}"] for lv in LEVELS]


@pytest.fixture(scope="module")
def out(head, levels, io):
    with torch.no_grad():
        return head(levels, io["text.embedded"], io["text.attention_mask"])


def _maps(io) -> list[torch.Tensor]:
    return [io["input.phrase_token_map.caption0"], io["input.phrase_token_map.caption1"]]


def _sizes(io) -> list[tuple[int, int]]:
    return [tuple(s) for s in io["input.image_sizes_hw"].tolist()]


def _by_score(boxes, scores, labels):
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), int(labels[i])))
    idx = torch.tensor(order, dtype=torch.long)
    return boxes[idx], scores[idx], labels[idx]


def _assert_same_set(dets, io, prefix: str, boxes_key: str = "boxes_resized"):
    """Detections equal the golden ones as sets: same count and labels, boxes 1e-3 px, scores 1e-5."""
    gb, gs, gl = _by_score(io[prefix + boxes_key], io[prefix + "scores"], io[prefix + "labels"])
    db, ds, dl = _by_score(dets.boxes, dets.scores, dets.labels)
    assert len(ds) == len(gs)
    assert torch.equal(dl, gl)
    torch.testing.assert_close(db, gb, atol=1e-3, rtol=0)
    torch.testing.assert_close(ds, gs, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- names, config

def test_head_parameter_names_are_the_official_ones(head, official):
    ours = set(head.state_dict())
    theirs = {k[len("rpn.head."):] for k in official if k.startswith("rpn.head.")}
    assert ours == theirs and len(ours) == 136
    assert not head.cls_logits.weight.requires_grad            # frozen, as official
    assert head.cls_logits.out_channels == CFG.head.num_classes == 80


def test_golden_fine_config_carries_the_official_head_and_limits():
    h = CFG.head
    assert (h.kind, h.num_convs, h.fpn_channels, h.gn_groups, h.num_classes) == ("dyhead", 6, 32, 16, 80)
    assert (h.inference_th, h.pre_nms_top_n, h.nms_th, h.detections_per_img) == (0.05, 40, 0.6, 25)
    assert PostprocessLimits.from_head(h) == PostprocessLimits(0.05, 40, 0.6, 25, 80)


def test_light_head_stays_the_default():
    assert HeadConfig().kind == "light"
    assert isinstance(FiberForGrounding(get_config("fiber-tiny-test")).head, GroundingHead)
    # a config.json written before the head fields existed reads as the light head
    d = get_config("fiber-tiny-test").to_dict()
    for key in ("kind", "num_classes", "log_scale", "logit_clamp", "inference_th", "pre_nms_top_n",
                "nms_th", "detections_per_img"):
        del d["head"][key]
    assert ModelConfig.from_dict(d) == get_config("fiber-tiny-test")


@pytest.mark.parametrize("bad, match", [(dict(kind="dyhed"), "kind"),
                                        (dict(kind="dyhead", fpn_channels=32, proj_dim=64), "proj_dim"),
                                        (dict(nms_th=0.0), "post-processing")])
def test_bad_head_config_is_refused(bad, match):
    base = get_config("fiber-tiny-test")
    with pytest.raises(ValueError, match=match):
        base.replace(head=HeadConfig(**{**dict(fpn_channels=16, proj_dim=16), **bad}))


# ----------------------------------------------------------------------------- dense tensors

def test_dyhead_block0_and_tower(head, levels, io):
    with torch.no_grad():
        block0 = head.dyhead_tower[0](levels)
        tower = head.tower(levels)
    for lv, b, t in zip(LEVELS, block0, tower):
        torch.testing.assert_close(b, io[f"dyhead.block0.{lv}"], **TOL)
        torch.testing.assert_close(t, io[f"dyhead.tower.{lv}"], **TOL)


def test_token_projection(head, levels, io):
    seen = {}
    hook = head.dot_product_projection_text.register_forward_hook(
        lambda m, args, result: seen.update(inp=args[0], out=result))
    try:
        with torch.no_grad():
            head(levels, io["text.embedded"], io["text.attention_mask"])
    finally:
        hook.remove()
    torch.testing.assert_close(seen["inp"], io["head.proj_tokens_in"], **TOL)
    torch.testing.assert_close(seen["out"], io["head.proj_tokens"], **TOL)
    # pad rows of ``embedded`` are zero and stay zero after the normalisation
    assert torch.equal(seen["inp"][io["text.attention_mask"] == 0], torch.zeros_like(seen["inp"][io["text.attention_mask"] == 0]))


def test_logits_box_regression_centerness_and_anchors(out, io):
    assert out.level_sizes == (1008, 252, 63, 20, 6)
    start = 0
    for lv, n in zip(LEVELS, out.level_sizes):
        sl = slice(start, start + n)
        start += n
        b, _, h, w = io[f"head.box_regression.{lv}"].shape
        torch.testing.assert_close(out.token_logits[:, sl], io[f"head.dot_product_logits.{lv}"], **TOL)
        torch.testing.assert_close(out.box_deltas[:, sl].transpose(1, 2).reshape(b, 4, h, w),
                                   io[f"head.box_regression.{lv}"], **TOL)
        torch.testing.assert_close(out.centerness[:, sl].reshape(b, 1, h, w), io[f"head.centerness.{lv}"], **TOL)
        assert torch.equal(out.anchors[sl], io[f"anchors.{lv}"])   # exact: integer-valued


def test_cell_anchors_match_the_official_buffers(out, official):
    start = 0
    for i, n in enumerate(out.level_sizes):
        assert torch.equal(out.anchors[start], official[f"rpn.anchor_generator.cell_anchors.{i}"][0])
        start += n


# ----------------------------------------------------------------------------- post-processing

def test_pre_nms_candidates(out, io):
    limits = PostprocessLimits.from_head(CFG.head)
    for i, (pmap, hw) in enumerate(zip(_maps(io), _sizes(io))):
        cand = candidates(out.boxes[i], out.token_logits[i], out.centerness[i], out.level_sizes, pmap, hw, limits)
        assert len(cand) == (113, 102)[i]
        _assert_same_set(cand, io, f"det.img{i}.prenms_")


def test_final_detections_and_original_pixels(out, io):
    dets = postprocess(out.boxes, out.token_logits, out.centerness, out.level_sizes, _maps(io), _sizes(io),
                       PostprocessLimits.from_head(CFG.head))
    for i, d in enumerate(dets):
        assert len(d) == 25
        assert torch.all(d.scores[:-1] >= d.scores[1:])          # returned by score, descending
        _assert_same_set(d, io, f"det.img{i}.")
        orig = tuple(io["input.orig_sizes_hw"][i].tolist())
        ours = type(d)(resize_boxes(d.boxes, _sizes(io)[i], orig), d.scores, d.labels)
        _assert_same_set(ours, io, f"det.img{i}.", "boxes_orig")


def test_limits_decide_the_counts(out, io):
    """Without the per-level cap more candidates reach the NMS; the final cut is the kthvalue rule."""
    loose = PostprocessLimits(pre_nms_top_n=1000, detections_per_img=25)
    cand = candidates(out.boxes[0], out.token_logits[0], out.centerness[0], out.level_sizes, _maps(io)[0],
                      _sizes(io)[0], loose)
    assert len(cand) == 6 + 271 + 60 + 21 + 6
    few = postprocess(out.boxes, out.token_logits, out.centerness, out.level_sizes, _maps(io), _sizes(io),
                      PostprocessLimits(pre_nms_top_n=40, detections_per_img=5))
    assert [len(d) for d in few] == [5, 5]
    full = postprocess(out.boxes, out.token_logits, out.centerness, out.level_sizes, _maps(io), _sizes(io),
                       PostprocessLimits(pre_nms_top_n=40, detections_per_img=100))
    assert [len(d) for d in full] == [26, 26]                     # what survives the NMS
    torch.testing.assert_close(few[0].scores, full[0].scores[:5])


# ----------------------------------------------------------------------------- ATSS loss

@pytest.fixture(scope="module")
def targets(io) -> list[GroundingTarget]:
    pm = io["loss_input.positive_map"]
    return [GroundingTarget(io[f"loss_input.gt_boxes_resized.img{i}"], pm[3 * i:3 * i + 3]) for i in range(2)]


def test_atss_assignment_and_targets(out, targets, io):
    loss = GroundingLoss.for_head(CFG.head)
    matched, tokens = loss.assign(out, targets)
    labels = torch.stack([torch.where(m >= 0, io[f"loss_input.gt_labels.img{i}"][m.clamp(min=0)], 0)
                          for i, m in enumerate(matched)])
    assert torch.equal(labels, io["atss.labels"])
    pos = io["atss.pos_index"]
    assert torch.equal(torch.nonzero(matched >= 0), pos)
    assert torch.equal(tokens[pos[:, 0], pos[:, 1]], io["atss.token_labels_pos"])
    neg = tokens[matched < 0]                                       # the no-object column
    assert torch.equal(neg, F.one_hot(torch.full((len(neg),), 15), 16).float())
    gt = torch.stack([t.boxes[m.clamp(min=0)] for t, m in zip(targets, matched)])
    reg = BoxCoder(pixel_offset=1).encode(gt[pos[:, 0], pos[:, 1]], out.anchors[pos[:, 1]])
    torch.testing.assert_close(reg, io["atss.reg_targets_pos"], **TOL)


def test_losses(out, targets, io):
    parts = GroundingLoss.for_head(CFG.head)(out, targets, io["text.attention_mask"])
    for ours, theirs in (("loss_token", "loss_dot_product_token"), ("loss_box", "loss_reg"),
                         ("loss_centerness", "loss_centerness")):
        torch.testing.assert_close(parts[ours].reshape(1), io[f"loss.{theirs}"], rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- opset, end to end

def test_detector_opset_is_19_only_for_the_dyhead():
    assert detector_opset(CFG) == DEFORM_CONV_OPSET == 19
    assert detector_opset(get_config("fiber-nano")) == OPSET == 17   # light graphs as before


def test_end_to_end_from_the_images(io):
    state, _, cfg = convert_official(WEIGHTS, "fiber-golden-fine")
    model = FiberForGrounding(cfg).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        text = model.encode_text(io["text.input_ids"], io["text.attention_mask"])
        boxes, logits, ctr = model.detect(io["input.images"], text, io["text.attention_mask"])
    sizes = model.level_sizes(224, 288)
    assert sizes == (1008, 252, 63, 20, 6) and boxes.shape == (2, sum(sizes), 4)
    dets = postprocess(boxes, logits, ctr, sizes, _maps(io), _sizes(io), PostprocessLimits.from_head(cfg.head))
    for i, d in enumerate(dets):
        _assert_same_set(d, io, f"det.img{i}.")


def test_level_sizes_follow_the_input_size():
    model = FiberForGrounding(CFG).eval()
    for h, w in ((64, 96), (100, 70)):
        with torch.no_grad():
            out = model.forward_from_text(torch.zeros(1, 3, h, w), torch.zeros(1, 4, 32),
                                          torch.ones(1, 4, dtype=torch.long))
        assert out.level_sizes == model.level_sizes(h, w)


# ----------------------------------------------------------------------------- training

def test_fine_task_trains_the_dyhead_model(io):
    """train.fine's task (model + GroundingLoss.for_head) on the golden targets: loss falls."""
    torch.manual_seed(0)
    task = FineTask(CFG, data=None)
    assert task.loss_fn.no_object_token and task.loss_fn.pixel_offset == 1.0
    model = task.build_model().eval()                       # no dropout: the fall is the optimiser's
    model.backbone.set_gates(0.5)
    pm = io["loss_input.positive_map"]
    batch = dict(image=io["input.images"][:, :, :128, :160].contiguous(), input_ids=io["text.input_ids"],
                 attention_mask=io["text.attention_mask"],
                 boxes=[io[f"loss_input.gt_boxes_resized.img{i}"] * 0.55 for i in range(2)],
                 positive_map=[pm[3 * i:3 * i + 3] for i in range(2)])
    params = [p for g in task.param_groups(model, TrainConfig()) for p in g["params"]]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    history = []
    for step in range(6):
        parts = task.loss(model, batch, step)
        opt.zero_grad()
        parts["loss"].backward()
        if step == 0:   # the deformable convs and their offsets learn
            tower = model.head.dyhead_tower[0]
            assert tower.offset.weight.grad.abs().sum() > 0 and tower.DyConv[0].conv.weight.grad.abs().sum() > 0
        opt.step()
        history.append({k: v.item() for k, v in parts.items()})
    for k in history[0]:
        assert history[-1][k] < history[0][k], (k, history[0][k], history[-1][k])
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]


def test_no_candidates_gives_empty_detections(out, io):
    dets = postprocess(out.boxes, torch.full_like(out.token_logits, -20.0), out.centerness, out.level_sizes,
                       _maps(io), _sizes(io), PostprocessLimits.from_head(CFG.head))
    assert [len(d) for d in dets] == [0, 0]
    assert dets[0].boxes.shape == (0, 4) and dets[0].labels.dtype == torch.long
    with pytest.raises(ValueError, match="no tokens"):
        postprocess(out.boxes, out.token_logits, out.centerness, out.level_sizes,
                    [torch.zeros(1, 16), torch.zeros(1, 16)], _sizes(io))
