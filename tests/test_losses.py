"""Losses of both stages on small hand-checkable cases."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fiber.box_ops import BoxCoder, make_anchors, paired_generalized_box_iou
from fiber.heads.grounding import GroundingOutput
from fiber.losses import (GroundingLoss, GroundingTarget, atss_assign, centerness_targets, itc_loss,
                          itm_labels, mask_tokens_for_mlm, mlm_loss, sample_hard_negatives,
                          token_sigmoid_focal_loss)

# ----------------------------------------------------------------------------- focal loss


def _focal_direct(x: float, y: float, alpha=0.25, gamma=2.0) -> float:
    p = 1 / (1 + math.exp(-x))
    if y == 1:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p ** gamma * math.log(1 - p)


def test_token_focal_loss_equals_direct_formula_and_ignores_padding():
    logits = torch.tensor([[[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]]])       # [B=1, N=2, T=3]
    targets = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0]])                                     # token 2 is padding
    got = token_sigmoid_focal_loss(logits, targets, mask)
    expected = sum(_focal_direct(logits[0, a, t].item(), targets[0, a, t].item())
                   for a in range(2) for t in range(2))
    assert abs(got.item() - expected) < 1e-6
    # whatever sits at the padded token changes nothing
    logits2, targets2 = logits.clone(), targets.clone()
    logits2[..., 2], targets2[..., 2] = 50.0, 0.0
    assert torch.equal(token_sigmoid_focal_loss(logits2, targets2, mask), got)


# ----------------------------------------------------------------------------- ATSS

def _grid_anchors():
    # 64 px input: levels 8x8 / 4x4 / 2x2 at strides 8 / 16 / 32, anchors 8 x stride
    sizes, strides = [(8, 8), (4, 4), (2, 2)], (8, 16, 32)
    return make_anchors(sizes, strides, 8.0), (64, 16, 4)


def test_atss_assigns_the_obvious_anchor():
    anchors, level_sizes = _grid_anchors()
    # a box equal to level 0's anchor at row 3, col 3: centre (28, 28), side 64
    box = torch.tensor([[28.0 - 32, 28.0 - 32, 28.0 + 32, 28.0 + 32]])
    matched = atss_assign(anchors, level_sizes, box)
    assert matched[3 * 8 + 3] == 0                       # the identical anchor (IoU 1) is positive
    pos = (matched == 0).nonzero().flatten()
    centres = (anchors[pos, :2] + anchors[pos, 2:]) / 2
    assert ((centres > box[0, :2]) & (centres < box[0, 2:])).all()   # all centres inside the box
    assert len(pos) < 9 * 3


def test_atss_empty_image_and_far_anchors():
    anchors, level_sizes = _grid_anchors()
    assert (atss_assign(anchors, level_sizes, torch.zeros(0, 4)) == -1).all()
    # a small box in the corner: anchors whose centre is outside it are never positive
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    matched = atss_assign(anchors, level_sizes, box)
    pos = (matched == 0).nonzero().flatten()
    assert len(pos) >= 1
    centres = (anchors[pos, :2] + anchors[pos, 2:]) / 2
    assert (centres < 10).all()


def test_atss_resolves_overlaps_by_iou():
    anchors, level_sizes = _grid_anchors()
    a = anchors[3 * 8 + 3]
    boxes = torch.stack([a, a + torch.tensor([2.0, 2.0, 2.0, 2.0])])   # the anchor and a shifted copy
    matched = atss_assign(anchors, level_sizes, boxes)
    assert matched[3 * 8 + 3] == 0                       # IoU 1 with box 0 beats box 1


def test_centerness_targets_hand_values():
    anchors = torch.tensor([[0.0, 0.0, 2.0, 2.0], [2.0, 2.0, 4.0, 4.0]])   # centres (1, 1), (3, 3)
    gt = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 8.0]])
    # (3,3) in [0,4]x[0,8]: l=3 r=1 t=3 b=5 -> sqrt(1/3 * 3/5)
    assert torch.allclose(centerness_targets(anchors, gt), torch.tensor([1.0, math.sqrt(1 / 5)]))


# ----------------------------------------------------------------------------- grounding loss

def _fake_output(token_logits=None, deltas=None):
    anchors, level_sizes = _grid_anchors()
    n = anchors.shape[0]
    deltas = torch.zeros(2, n, 4) if deltas is None else deltas
    return GroundingOutput(box_deltas=deltas, boxes=BoxCoder().decode(deltas, anchors),
                           token_logits=torch.full((2, n, 4), -4.6) if token_logits is None else token_logits,
                           centerness=torch.zeros(2, n), anchors=anchors, level_sizes=level_sizes)


def test_grounding_loss_targets_and_normalisation():
    out = _fake_output()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    box = torch.tensor([[0.0, 0.0, 56.0, 56.0]])
    targets = [GroundingTarget(box, torch.tensor([[0.0, 0.5, 0.5, 0.0]])),   # binarised
               GroundingTarget(torch.zeros(0, 4), torch.zeros(0, 4))]        # no object
    loss = GroundingLoss()
    matched, tok = loss.assign(out, targets)
    assert (matched[1] == -1).all() and (tok[1] == 0).all()
    pos = matched[0] >= 0
    assert pos.any()
    assert torch.equal(tok[0][pos], torch.tensor([0.0, 1.0, 1.0, 0.0]).expand(int(pos.sum()), 4))
    assert (tok[0][~pos] == 0).all()
    parts = loss(out, targets, mask)
    num_pos = int(pos.sum())
    expected_token = token_sigmoid_focal_loss(out.token_logits, tok, mask) / num_pos
    assert torch.allclose(parts["loss_token"], expected_token)
    assert torch.allclose(parts["loss"], parts["loss_token"] + parts["loss_box"] + parts["loss_centerness"])
    assert all(torch.isfinite(v) for v in parts.values())
    # the box loss is 2 x the centerness-weighted mean of (1 - GIoU) over positives
    anchors = out.anchors[pos]
    ctr = centerness_targets(anchors, box.expand(num_pos, 4))
    giou = paired_generalized_box_iou(anchors, box.expand(num_pos, 4))
    assert torch.allclose(parts["loss_box"], 2.0 * ((1 - giou) * ctr).sum() / ctr.sum())
    assert torch.allclose(parts["loss_centerness"],
                          F.binary_cross_entropy_with_logits(torch.zeros(num_pos), ctr, reduction="sum") / num_pos)


def test_grounding_loss_without_any_object_is_finite_and_connected():
    deltas = torch.zeros(2, 84, 4, requires_grad=True)
    out = _fake_output(deltas=deltas)
    empty = GroundingTarget(torch.zeros(0, 4), torch.zeros(0, 4))
    parts = GroundingLoss()(out, [empty, empty], torch.ones(2, 4, dtype=torch.long))
    assert parts["loss_box"].item() == 0.0 and parts["loss_centerness"].item() == 0.0
    assert parts["loss_token"] > 0
    parts["loss"].backward()
    assert deltas.grad is not None


def test_grounding_loss_rejects_bad_targets():
    out = _fake_output()
    mask = torch.ones(2, 4, dtype=torch.long)
    good = GroundingTarget(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.ones(1, 4))
    with pytest.raises(ValueError, match="positive_map"):
        GroundingLoss()(out, [good, GroundingTarget(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.ones(1, 5))], mask)
    with pytest.raises(ValueError, match="targets for a batch"):
        GroundingLoss()(out, [good], mask)


# ----------------------------------------------------------------------------- ITC / ITM

def test_itc_loss_hand_computed():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    txt = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=-1)
    queue_t = F.normalize(torch.tensor([[1.0], [1.0]]), dim=0)            # [D, Q=1]
    queue_i = F.normalize(torch.tensor([[-1.0], [0.0]]), dim=0)
    temp = torch.tensor(0.5)
    loss, s_i2t, s_t2i = itc_loss(img, txt, temp, queue_i, queue_t)
    assert s_i2t.shape == (2, 3)

    def ce(row, target):
        return -(row[target] - torch.logsumexp(row, 0))

    keys_t = torch.cat([txt, queue_t.t()])
    keys_i = torch.cat([img, queue_i.t()])
    i2t = sum(ce(img[i] @ keys_t.t() / 0.5, i) for i in range(2)) / 2
    t2i = sum(ce(txt[i] @ keys_i.t() / 0.5, i) for i in range(2)) / 2
    assert torch.allclose(loss, (i2t + t2i) / 2)


def test_hard_negatives_never_pick_the_positive():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(4, 10) * 5
    for _ in range(20):
        tn, im = sample_hard_negatives(sim, sim.t()[:4].contiguous(), g)
        assert (tn != torch.arange(4)).all() and (im != torch.arange(4)).all()
    # a dominant similarity is (almost) always chosen
    sim = torch.zeros(3, 3)
    sim[0, 2] = 30.0
    assert sample_hard_negatives(sim, sim, g)[0][0] == 2
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1))


def test_itm_labels_one_third_positive():
    labels = itm_labels(4)
    assert labels.tolist() == [1] * 4 + [0] * 8


# ----------------------------------------------------------------------------- MLM

SPECIAL = (0, 101, 102)


def test_mlm_masking_statistics_and_exclusions():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (64, 64), generator=g)
    ids[:, 0], ids[:, 40] = 101, 102
    mask = torch.ones_like(ids)
    ids[:, 41:], mask[:, 41:] = 0, 0
    masked, labels = mask_tokens_for_mlm(ids, mask, vocab_size=30522, mask_token_id=103,
                                         special_token_ids=SPECIAL, generator=g)
    sel = labels != -100
    assert not sel[:, 0].any() and not sel[:, 40:].any()                 # specials and padding never
    assert torch.equal(labels[sel], ids[sel]) and torch.equal(masked[~sel], ids[~sel])
    eligible = 64 * 39
    assert abs(sel.sum().item() / eligible - 0.15) < 0.02
    n = sel.sum().item()
    frac_mask = (masked[sel] == 103).sum().item() / n
    frac_same = (masked[sel] == ids[sel]).sum().item() / n
    assert abs(frac_mask - 0.8) < 0.05 and abs(frac_same - 0.1) < 0.04
    # deterministic with a seeded generator
    again = mask_tokens_for_mlm(ids, mask, vocab_size=30522, mask_token_id=103, special_token_ids=SPECIAL,
                                generator=torch.Generator().manual_seed(1))
    again2 = mask_tokens_for_mlm(ids, mask, vocab_size=30522, mask_token_id=103, special_token_ids=SPECIAL,
                                 generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], again2[0]) and torch.equal(again[1], again2[1])


def test_mlm_loss_matches_cross_entropy_and_handles_no_mask():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3] = 4, 7
    expected = (F.cross_entropy(logits[0, 1:2], torch.tensor([4]))
                + F.cross_entropy(logits[1, 3:4], torch.tensor([7]))) / 2
    assert torch.allclose(mlm_loss(logits, labels), expected)
    zero = mlm_loss(logits.requires_grad_(), torch.full((2, 5), -100))
    assert zero.item() == 0.0 and zero.requires_grad


# ----------------------------------------------------------------------------- DDP (2 gloo ranks)

def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from fiber.heads.coarse import CoarseHeads
    from fiber.losses import _mean_over_ranks
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        heads = CoarseHeads(text_dim=2, image_dim=2, vocab_size=4, queue_size=8)
        feats = torch.full((3, 2), float(rank + 1))
        heads.enqueue(feats, -feats)
        mean = _mean_over_ranks(torch.tensor(float(2 + 4 * rank)))
        save_file({"queue": heads.queue_contents()[0].contiguous(), "mean": mean.reshape(1)},
                  f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_queue_gathers_and_normaliser_averages_across_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        # every rank holds both ranks' features, rank 0's first
        assert torch.equal(got["queue"], torch.tensor([[1.0] * 3 + [2.0] * 3] * 2))
        assert got["mean"].item() == 4.0            # mean of 2 and 6
