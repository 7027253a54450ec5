"""Losses of both FIBER stages, as pure functions of model outputs and targets.

Stage 1 (coarse, fiber.md §2): ``itc_loss`` (contrastive, batch + feature queue), ``itm_loss`` with
``sample_hard_negatives``, ``mask_tokens_for_mlm`` + ``mlm_loss``.

Stage 2 (fine, fiber.md §3 / GLIP ``ATSSLossComputation``): ``atss_assign``,
``token_sigmoid_focal_loss``, ``centerness_targets`` and ``GroundingLoss`` (token focal + GIoU x
centerness x 2.0 + centerness BCE). Boxes are xyxy in network-input pixels.

Under DDP (``torch.distributed`` initialised) the grounding normalisers (positive anchors, sum of
centerness targets) are averaged over ranks, as GLIP does; nothing else communicates here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fiber.box_ops import box_iou, paired_generalized_box_iou

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- stage 1: ITC / ITM

def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor,
             image_queue: torch.Tensor | None = None, text_queue: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALBEF/FIBER image-text contrastive loss.

    Args:
        image_feat, text_feat: ``[B, D]`` L2-normalised unimodal features of matching pairs.
        temp: scalar temperature (already clamped to [0.001, 1]).
        image_queue, text_queue: ``[D, Q]`` earlier features (detached), or ``None``.
    Returns:
        ``(loss, sim_i2t [B, B + Q], sim_t2i [B, B + Q])``; positives are the diagonal of the
        in-batch block. As in the official code the keys (``*_all``) are detached, so each
        direction's gradient flows through its queries and ``temp``.
    Differs from the official code: the official queue starts as ``randn`` and its unfilled
    columns enter the softmax; here only filled columns are passed in.
    """
    image_all = image_feat.t().detach()
    text_all = text_feat.t().detach()
    if image_queue is not None and text_queue is not None:
        image_all = torch.cat([image_all, image_queue.detach()], dim=1)
        text_all = torch.cat([text_all, text_queue.detach()], dim=1)
    sim_i2t = image_feat @ text_all / temp
    sim_t2i = text_feat @ image_all / temp
    labels = torch.arange(image_feat.shape[0], device=image_feat.device)
    loss = (F.cross_entropy(sim_i2t, labels) + F.cross_entropy(sim_t2i, labels)) / 2
    return loss, sim_i2t, sim_t2i


@torch.no_grad()
def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch hard negatives for ITM, sampled with ``torch.multinomial``.

    Args:
        sim_i2t, sim_t2i: ``[B, >= B]`` ITC similarities; only the in-batch ``[:, :B]`` block is used.
    Returns:
        ``(text_neg_idx [B], image_neg_idx [B])`` int64: for image ``i`` a text ``j != i`` drawn with
        probability ``softmax(sim_i2t[i, :B])`` (diagonal zeroed); for text ``i`` an image likewise.
    Differs from the official ``compute_itm_hardneg``: that one samples over the batch *and* the
    filled queue, which stores raw images and token ids (a 4096x3x384x384 image queue, ~7 GB per
    GPU). We keep only feature queues, so negatives come from the current batch (easier negatives
    when the batch is small). Needs B >= 2.
    """
    bsz = sim_i2t.shape[0]
    if bsz < 2:
        raise ValueError(f"ITM hard negatives need a batch of at least 2 pairs, got {bsz}")
    eye = torch.eye(bsz, dtype=torch.bool, device=sim_i2t.device)
    w_i2t = F.softmax(sim_i2t[:, :bsz].float(), dim=1).masked_fill(eye, 0)
    w_t2i = F.softmax(sim_t2i[:, :bsz].float(), dim=1).masked_fill(eye, 0)
    # +1e-9 as the official code: never an all-zero row (e.g. after underflow).
    w_i2t = (w_i2t + 1e-9).masked_fill(eye, 0)
    w_t2i = (w_t2i + 1e-9).masked_fill(eye, 0)
    text_neg = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    image_neg = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    return text_neg, image_neg


def itm_labels(batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """ITM targets for the official pair order ``[positives, (image, neg text), (neg image, text)]``:
    ``[3B]`` int64, ones then zeros (1/3 positive)."""
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=device)
    labels[:batch_size] = 1
    return labels


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ITM ``logits [N, 2]`` against ``labels [N]`` (1 = matching pair)."""
    return F.cross_entropy(logits, labels)


# ----------------------------------------------------------------------------- stage 1: MLM

def mask_tokens_for_mlm(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, vocab_size: int,
                        mask_token_id: int, special_token_ids: Sequence[int], prob: float = 0.15,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (HF ``DataCollatorForLanguageModeling``, no whole-word masking).

    Each real, non-special token is selected with probability ``prob``; a selected token becomes
    ``mask_token_id`` (80%), a uniformly random id in ``[0, vocab_size)`` (10%) or stays (10%).
    Padding (``attention_mask == 0``) and ``special_token_ids`` are never selected.

    Args: ``input_ids`` / ``attention_mask`` int64 ``[B, T]``.
    Returns: ``(masked_ids [B, T], labels [B, T])`` int64; labels are the original ids at selected
    positions and ``-100`` elsewhere.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"MLM mask probability must be in [0, 1], got {prob}")
    special = torch.isin(input_ids, torch.tensor(list(special_token_ids), device=input_ids.device))
    candidates = (attention_mask > 0) & ~special
    device = input_ids.device

    def draw(p: float) -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=device) < p

    selected = draw(prob) & candidates
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)
    to_mask = draw(0.8) & selected
    to_random = draw(0.5) & selected & ~to_mask
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    masked = input_ids.masked_fill(to_mask, mask_token_id)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, T, V]`` over positions with ``labels [B, T] != -100``.

    A batch without any masked position gives a zero loss (connected to the graph), not NaN.
    """
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return flat / count


# ----------------------------------------------------------------------------- stage 2: grounding

@dataclass(frozen=True)
class GroundingTarget:
    """Ground truth of one image.

    ``boxes``: ``[G, 4]`` float32 xyxy network-input pixels (after letterbox); ``positive_map``:
    ``[G, T]`` (bool or float; > 0 means the token belongs to the box's phrase), T = the padded
    text length of the batch. ``G`` may be 0.
    """
    boxes: torch.Tensor
    positive_map: torch.Tensor


def phrase_probabilities(token_logits: torch.Tensor, phrase_map: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` logits and a 0/1 ``[P, T]`` phrase map -> ``[N, P]``: the mean over each
    phrase's tokens of their probabilities (the runtime's "mean" phrase score before centerness;
    0 for a phrase without tokens)."""
    pm = phrase_map.to(token_logits.dtype).float()
    return token_logits.float().sigmoid() @ pm.t() / pm.sum(-1).clamp(min=1.0)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Element-wise binary focal loss (Lin et al. 2017; fvcore form) -> same shape as ``logits``."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def token_sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, attention_mask: torch.Tensor,
                             alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """GLIP ``token_sigmoid_binary_focal_loss``: summed focal loss over anchors x real tokens.

    ``logits`` / ``targets`` ``[B, N, T]`` (targets in {0, 1}); ``attention_mask`` ``[B, T]``:
    padding tokens contribute nothing. Returns the (unnormalised) sum, a scalar.
    """
    loss = sigmoid_focal_loss(logits.float(), targets.float(), alpha, gamma)
    return (loss * (attention_mask > 0).unsqueeze(1).to(loss.dtype)).sum()


@torch.no_grad()
def atss_assign(anchors: torch.Tensor, level_sizes: Sequence[int], gt_boxes: torch.Tensor,
                topk: int = 9, pixel_offset: float = 0.0) -> torch.Tensor:
    """ATSS (Zhang et al. 2020) as GLIP implements it.

    Per gt box: the ``topk`` anchors per level closest by centre distance are candidates; those with
    IoU >= mean + std (unbiased) of the candidates' IoUs *and* whose centre lies inside the box
    (by more than 0.01 px) are positives; an anchor positive for several boxes goes to the box with
    the highest IoU (the first such box on a tie). ``pixel_offset=1``: the official +1 IoU
    (golden/fine README §6; the light head uses 0).

    Args: ``anchors`` ``[N, 4]`` xyxy; ``level_sizes`` anchors per level (sum N); ``gt_boxes`` ``[G, 4]``.
    Returns: ``[N]`` int64, the matched gt index or -1 (negative).
    """
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    if sum(level_sizes) != num_anchors:
        raise ValueError(f"ATSS: level sizes {tuple(level_sizes)} do not add up to {num_anchors} anchors")
    if num_gt == 0:
        return torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    anchors, gt_boxes = anchors.float(), gt_boxes.float()
    ious = box_iou(anchors, gt_boxes, pixel_offset)[0]                              # [N, G]
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    g_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = torch.cdist(a_ctr, g_ctr)                                                # [N, G]
    cands, start = [], 0
    for size in level_sizes:
        k = min(topk, size)
        cands.append(dist[start:start + size].topk(k, dim=0, largest=False).indices + start)
        start += size
    cand = torch.cat(cands, dim=0)                                                  # [K, G]
    cand_iou = ious.gather(0, cand)
    std = cand_iou.std(0) if cand.shape[0] > 1 else torch.zeros_like(cand_iou[0])
    is_pos = cand_iou >= (cand_iou.mean(0) + std)[None, :]
    c = a_ctr[cand]                                                                 # [K, G, 2]
    ltrb = torch.stack((c[..., 0] - gt_boxes[:, 0], c[..., 1] - gt_boxes[:, 1],
                        gt_boxes[:, 2] - c[..., 0], gt_boxes[:, 3] - c[..., 1]), dim=-1)
    is_pos &= ltrb.min(dim=-1).values > 0.01
    pos_mask = torch.zeros_like(ious, dtype=torch.bool).scatter_(0, cand, is_pos)
    masked = torch.where(pos_mask, ious, torch.full_like(ious, -1.0))
    best_iou, best_gt = masked.max(dim=1)
    return torch.where(best_iou >= 0, best_gt, torch.full_like(best_gt, -1))


def centerness_targets(anchors: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of each anchor centre in its matched box: ``[P, 4]``, ``[P, 4]`` -> ``[P]``.

    ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``; centres must lie inside the boxes.
    """
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    cy = (anchors[:, 1] + anchors[:, 3]) / 2
    lr = torch.stack((cx - gt_boxes[:, 0], gt_boxes[:, 2] - cx), dim=1)
    tb = torch.stack((cy - gt_boxes[:, 1], gt_boxes[:, 3] - cy), dim=1)
    return torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values))


class GroundingLoss(nn.Module):
    """ATSS + token focal + GIoU + centerness losses of the GLIP/FIBER fine stage.

    ``forward(output, targets, attention_mask) -> dict`` with ``loss_token``, ``loss_box``,
    ``loss_centerness`` and their sum ``loss``. Normalisation as GLIP: token and centerness losses
    by the number of positive anchors (mean over ranks, at least 1); the box loss is the
    centerness-weighted GIoU loss divided by the sum of centerness targets, times
    ``reg_loss_weight``. Unmatched anchors get all-zero token targets, or with
    ``no_object_token`` GLIP's one-hot on the last token column (the "no-object" token; a padding
    position whenever the prompt is shorter than the text length, and then masked out, so the two
    agree there). ``pixel_offset=1``: the official +1 IoU in the ATSS assignment.

    ``GroundingLoss.for_head(cfg.head)``: the official settings for the DyHead (``pixel_offset=1``,
    ``no_object_token=True``; reproduces golden/fine ``atss.*`` and ``loss.*``), the defaults
    above for the light head.
    """

    def __init__(self, topk: int = 9, alpha: float = 0.25, gamma: float = 2.0, reg_loss_weight: float = 2.0,
                 pixel_offset: float = 0.0, no_object_token: bool = False):
        super().__init__()
        self.topk, self.alpha, self.gamma, self.reg_loss_weight = topk, alpha, gamma, reg_loss_weight
        self.pixel_offset, self.no_object_token = float(pixel_offset), no_object_token

    @classmethod
    def for_head(cls, head_cfg) -> "GroundingLoss":
        """The loss that goes with a ``fiber.config.HeadConfig`` (official conventions for the DyHead)."""
        official = getattr(head_cfg, "kind", "light") == "dyhead"
        return cls(pixel_offset=1.0 if official else 0.0, no_object_token=official)

    def forward(self, output, targets: Sequence[GroundingTarget], attention_mask: torch.Tensor,
                assignment: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``output``: a ``GroundingOutput``; ``targets``: one ``GroundingTarget`` per image;
        ``attention_mask`` ``[B, T]`` int64; ``assignment``: ``self.assign(output, targets)`` when
        the caller already has it (auxiliary losses on the same positives), else computed here."""
        matched, token_targets = assignment if assignment is not None else self.assign(output, targets)
        pos = matched >= 0
        num_pos = _mean_over_ranks(pos.sum().float()).clamp(min=1.0)
        loss_token = token_sigmoid_focal_loss(output.token_logits, token_targets, attention_mask,
                                              self.alpha, self.gamma) / num_pos
        gt = torch.stack([t.boxes.to(output.boxes.dtype)[m.clamp(min=0)] if len(t.boxes) else
                          torch.zeros_like(output.anchors) for t, m in zip(targets, matched)])
        b_idx, a_idx = pos.nonzero(as_tuple=True)
        ctr_t = centerness_targets(output.anchors[a_idx], gt[b_idx, a_idx])
        ctr_sum = _mean_over_ranks(ctr_t.sum().detach()).clamp(min=1e-6)
        giou = paired_generalized_box_iou(output.boxes[b_idx, a_idx], gt[b_idx, a_idx])
        loss_box = ((1 - giou) * ctr_t).sum() / ctr_sum * self.reg_loss_weight
        loss_ctr = F.binary_cross_entropy_with_logits(output.centerness[b_idx, a_idx], ctr_t,
                                                      reduction="sum") / num_pos
        # Keep every prediction in the graph (DDP needs all outputs used even without positives).
        zero = 0.0 * (output.box_deltas.sum() + output.centerness.sum())
        loss_box, loss_ctr = loss_box + zero, loss_ctr + zero
        return {"loss_token": loss_token, "loss_box": loss_box, "loss_centerness": loss_ctr,
                "loss": loss_token + loss_box + loss_ctr}

    @torch.no_grad()
    def assign(self, output, targets: Sequence[GroundingTarget]) -> tuple[torch.Tensor, torch.Tensor]:
        """ATSS per image -> matched gt index ``[B, N]`` (-1 = negative) and token targets ``[B, N, T]``."""
        bsz, _, num_tokens = output.token_logits.shape
        if len(targets) != bsz:
            raise ValueError(f"grounding loss: {len(targets)} targets for a batch of {bsz}")
        matched, token_targets = [], []
        for i, t in enumerate(targets):
            if t.boxes.ndim != 2 or t.boxes.shape[-1] != 4:
                raise ValueError(f"grounding target {i}: boxes must be [G, 4], got {tuple(t.boxes.shape)}")
            if tuple(t.positive_map.shape) != (t.boxes.shape[0], num_tokens):
                raise ValueError(f"grounding target {i}: positive_map must be [{t.boxes.shape[0]}, {num_tokens}], "
                                 f"got {tuple(t.positive_map.shape)}")
            m = atss_assign(output.anchors, output.level_sizes, t.boxes.to(output.anchors.device), self.topk,
                            self.pixel_offset)
            rows = (t.positive_map.to(output.token_logits.device) > 0).float()
            tok = rows[m.clamp(min=0)] if len(t.boxes) else output.token_logits.new_zeros(len(m), num_tokens)
            tok = tok * (m >= 0).unsqueeze(1)
            if self.no_object_token:
                tok[:, -1] = torch.where(m >= 0, tok[:, -1], torch.ones_like(tok[:, -1]))
            matched.append(m)
            token_targets.append(tok)
        return torch.stack(matched), torch.stack(token_targets)


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """All-reduce mean of a scalar over DDP ranks (identity without torch.distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value
