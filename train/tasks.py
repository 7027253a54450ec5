"""The two FIBER training stages as ``train.loop.Task`` objects, and what their CLIs share.

- ``CoarseTask`` (stage 1, fiber.md §2): ``FiberForPretraining``; ITC on the unfused features
  with the feature queue, ITM on the fused features with in-batch hard negatives, MLM (15%,
  80/10/10, masked in ``collate`` under the loop's per-chunk seed) on the fused text; the three
  losses with equal weights. AdamW groups: x5 lr for names containing ``cross_modal``, ``i2t``,
  ``t2i`` (fusion and projections) and for the heads ``itm_score`` / ``mlm_score``, as the
  official ``set_schedule``; no decay on biases and norms.
- ``FineTask`` (stage 2, fiber.md §3): ``FiberForGrounding`` + ``GroundingLoss``; one base lr for
  the vision body, i2t fusion, FPN and head, ``text_lr_mult`` x that for everything under
  ``backbone.text.`` (official: 1e-5 / 1e-4 = 0.1; default 1 here, the text tower is small and
  not pretrained). GLIP's x2 bias lr is not reproduced.
- ``load_init``: a coarse run / checkpoint -> the fine model's starting weights (backbone
  required, coarse-only heads dropped and reported, FPN and head fresh).
- ``model_config(name, late_fusion)``: ``NAME-late`` / ``--late-fusion`` is ``NAME`` with no fused
  layer (K = 0), everything else identical: the late-fusion ablation.
- ``text_init="minilm"``: the text tower starts from MiniLM-L6 (``fiber.text_init``); only configs
  whose text shape is MiniLM's (``fiber-t``, ``fiber-nano``) fit, others raise naming the mismatch.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from fiber.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint_dir
from fiber.config import ModelConfig, get_config, list_configs
from fiber.data.formats import DataFormatError
from fiber.losses import GroundingLoss, GroundingTarget, mask_tokens_for_mlm, phrase_probabilities
from fiber.models import FiberForGrounding, FiberForPretraining, pretraining_losses
from train.data import SIDES, GroundingTrainDataset, PairDataset, special_token_ids
from train.loop import BaseTask, TrainConfig, TrainingError, add_train_args
from train.schedule import make_param_groups

LATE_SUFFIX = "-late"
TEXT_INITS = ("none", "minilm")
COARSE_LR_MULTS = (("cross_modal", 5.0), ("i2t", 5.0), ("t2i", 5.0), ("itm_score", 5.0),
                   ("mlm_score", 5.0))

# ----------------------------------------------------------------------------- configs


def model_config(name: str, late_fusion: bool = False) -> ModelConfig:
    """The registered config ``name``; ``late_fusion`` (or a name ending in ``-late`` whose base is
    registered) gives the same model with K = 0 fused layers, named ``BASE-late``."""
    if name.endswith(LATE_SUFFIX) and name not in list_configs():
        name, late_fusion = name[:-len(LATE_SUFFIX)], True
    cfg = get_config(name)
    if not late_fusion:
        return cfg
    return cfg.replace(name=cfg.name + LATE_SUFFIX,
                       fusion=dataclasses.replace(cfg.fusion, num_fused_layers=0))


def init_text_tower(model: nn.Module, text_init: str) -> None:
    """Apply ``text_init`` ("none" | "minilm") to ``model.backbone.text``."""
    if text_init == "none":
        return
    if text_init != "minilm":
        raise ValueError(f"text init: unknown {text_init!r}; known: {', '.join(TEXT_INITS)}")
    from fiber.text_init import load_minilm_text
    try:
        load_minilm_text(model.backbone.text)
    except ValueError as e:
        raise ValueError(f"--text-init minilm does not fit config '{model.cfg.name}': {e}") from None


# ----------------------------------------------------------------------------- stage 1


@dataclass(frozen=True)
class CoarseOptions:
    mlm_prob: float = 0.15          # MLM selection probability (80/10/10 of the selected)
    text_init: str = "none"         # "none" | "minilm"


class CoarseTask(BaseTask):
    """Stage 1: ITC + ITM + MLM on image-caption pairs (module docstring)."""

    def __init__(self, cfg: ModelConfig, data: PairDataset, options: CoarseOptions = CoarseOptions()):
        self.cfg, self.data, self.options = cfg, data, options
        ids = special_token_ids()
        self.mask_id, self.special = ids["mask"], tuple(ids.values())

    def build_model(self) -> nn.Module:
        model = FiberForPretraining(self.cfg)
        init_text_tower(model, self.options.text_init)
        return model

    def dataset(self, split: str) -> PairDataset:
        return self.data

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """The pair batch + ``mlm_input_ids`` / ``mlm_labels`` int64 [B, T] (seeded by the loop)."""
        batch = self.data.collate(samples)
        batch["mlm_input_ids"], batch["mlm_labels"] = mask_tokens_for_mlm(
            batch["input_ids"], batch["attention_mask"], vocab_size=self.cfg.text.vocab_size,
            mask_token_id=self.mask_id, special_token_ids=self.special, prob=self.options.mlm_prob)
        return batch

    def loss(self, model: FiberForPretraining, batch: dict, step: int) -> dict[str, torch.Tensor]:
        out = model(batch["image"], batch["input_ids"], batch["attention_mask"],
                    mlm_input_ids=batch["mlm_input_ids"])
        return pretraining_losses(out, batch["mlm_labels"])

    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict]:
        return make_param_groups(model, cfg.weight_decay, COARSE_LR_MULTS)

    def checkpoint_config(self) -> dict:
        return {"model": self.cfg.to_dict(), "task": "coarse",
                "stage": {"mlm_prob": self.options.mlm_prob, "text_init": self.options.text_init}}


# ----------------------------------------------------------------------------- stage 2

# fiber.md §3: AdamW, decay 0.01, warm-up from 1e-3, x0.1 at 67% and 89%, clip 1.0. The lr is 3x
# the official 1e-4: nothing here starts pretrained (a 60-step fiber-nano pilot at batch 16: 4e-4
# below 1e-4 in every loss part from step 20 on). train.fine and compress.distill start from these.
FINE_DEFAULTS = TrainConfig(max_steps=2000, batch_size=16, lr=3e-4, weight_decay=0.01, warmup_frac=0.05,
                            warmup_start=1e-3, schedule="multistep", milestones=(0.67, 0.89),
                            clip_grad=1.0, ckpt_every=200, log_every=10)


@dataclass(frozen=True)
class FineOptions:
    text_lr_mult: float = 1.0       # lr multiplier of backbone.text.* (official 0.1)
    text_init: str = "none"         # "none" | "minilm" (only without an init checkpoint)
    init: str = "none"              # where the weights came from (recorded in config.json)
    colour_aux: float = 0.0         # weight of the auxiliary colour loss on the region features
    kind_aux: float = 0.0           # the same for the object's kind
    kind_separation: float = 0.0    # weight of kind_separation_loss on the projected kind names
    # lr multiplier of every fusion parameter (names with "i2t" / "t2i", both towers); None = the
    # official fine rule: each follows its tower (t2i at text_lr_mult). FIBER coarse uses 5.
    fusion_lr_mult: float | None = None
    position_lr_mult: float = 1.0   # lr multiplier of the head's position_text (position features)
    position_from_relations: bool = False  # only samples that name a side train position_text
    position_aux: float = 0.0       # weight of the position-query loss (position_loss)
    token_contrast: float = 0.0     # weight of the soft-token loss (token_contrast_loss)
    no_match_logit: float | None = None  # its no-object slot's logit (None: no slot)
    no_match_unnamed_only: bool = False  # the slot only at anchors of objects no phrase names
    prompt_invariance: float = 0.0  # weight of prompt_invariance_loss (batches with PromptTwins)
    invariance_rule: str = "symmetric"  # its rule (INVARIANCE_RULES)


class FineTask(BaseTask):
    """Stage 2: grounding + detection with the GLIP-style head (module docstring).

    init_state: starting weights from ``load_init`` (keys a subset of the model's), or None.
    """

    def __init__(self, cfg: ModelConfig, data: GroundingTrainDataset,
                 init_state: dict[str, torch.Tensor] | None = None,
                 options: FineOptions = FineOptions()):
        if init_state is not None and options.text_init != "none":
            raise ValueError("--text-init applies only to a run without an --init checkpoint")
        asked = [flag for flag, on in (("--position-aux", options.position_aux > 0),
                                       ("--position-from-relations", options.position_from_relations),
                                       ("--position-lr-mult", options.position_lr_mult != 1.0)) if on]
        if asked and not cfg.head.position_features:
            raise ValueError(f"{', '.join(asked)} train the head's position features, which config "
                             f"'{cfg.name}' does not have (head.position_features)")
        self.cfg, self.data, self.init_state, self.options = cfg, data, init_state, options
        self.loss_fn = GroundingLoss.for_head(cfg.head)
        self._regions: list[torch.Tensor] = []

    def build_model(self) -> nn.Module:
        model = FiberForGrounding(self.cfg)
        init_text_tower(model, self.options.text_init)
        if self.init_state is not None:
            missing, unexpected = model.load_state_dict(self.init_state, strict=False)
            if unexpected or any(k.startswith("backbone.") for k in missing):
                raise CheckpointError(f"init weights do not fit '{self.cfg.name}': "
                                      f"unexpected {unexpected[:3]}, missing {missing[:3]}")
        for name in self._aux_weights():
            # training only: a linear colour (kind) classifier on the region features the
            # dot product reads, at the positive anchors; RUN/final drops it
            classes = self._world_names(f"{name}s", f"--{name}-aux")
            if not hasattr(model.head, "dot_product_projection_image"):
                raise ValueError(f"--{name}-aux reads the light head's region features; "
                                 f"'{self.cfg.name}' has another head")
            setattr(model, f"{name}_aux", nn.Linear(self.cfg.head.proj_dim, len(classes)))
        if self.options.kind_separation > 0:
            enc = self.data.tok.encode(". ".join(self._world_names("kinds", "--kind-separation")))
            n = enc.num_tokens
            self._kind_prompt = (torch.as_tensor(enc.input_ids[:, :n]).long(),
                                 torch.as_tensor(enc.attention_mask[:, :n]).long(),
                                 torch.as_tensor(enc.phrase_map[:, :n], dtype=torch.float32))
        if self._aux_weights():
            model.head.dot_product_projection_image.register_forward_hook(
                lambda mod, args, out: self._regions.append(out))
        return model

    def dataset(self, split: str) -> GroundingTrainDataset:
        return self.data

    def collate(self, samples: list) -> dict:
        return self.data.collate(samples)

    def loss(self, model: FiberForGrounding, batch: dict, step: int) -> dict[str, torch.Tensor]:
        self._regions.clear()
        head = model.module.head if hasattr(model, "module") else model.head
        out = self._forward(model, head, batch["image"], batch["input_ids"], batch["attention_mask"],
                            batch.get("has_relation"))
        targets = [GroundingTarget(b, m) for b, m in zip(batch["boxes"], batch["positive_map"])]
        assignment = self.loss_fn.assign(out, targets)    # ATSS once: the auxiliary losses share it
        losses = self.loss_fn(out, targets, batch["attention_mask"], assignment)
        if self.options.position_aux > 0:
            aux = position_loss(head.last_position_query, batch["positive_map"], batch["side"])
            losses["loss_position"] = aux
            losses["loss"] = losses["loss"] + self.options.position_aux * aux
        if self.options.token_contrast > 0:
            matched, token_targets = assignment
            aux = token_contrast_loss(out.token_logits, token_targets, matched, batch["attention_mask"],
                                      self.options.no_match_logit, self.options.no_match_unnamed_only)
            losses["loss_token_contrast"] = aux
            losses["loss"] = losses["loss"] + self.options.token_contrast * aux
        if self.options.kind_separation > 0:
            aux = self.kind_separation(head, model)
            losses["loss_kind_separation"] = aux
            losses["loss"] = losses["loss"] + self.options.kind_separation * aux
        if self._regions:
            regions = torch.cat([r.flatten(2).transpose(1, 2) for r in self._regions], dim=1)
            self._regions.clear()
            for name, weight in self._aux_weights().items():
                aux = self.class_loss(getattr(model, f"{name}_aux"), regions, assignment[0],
                                      batch[f"{name}_ids"])
                losses[f"loss_{name}"] = aux
                losses["loss"] = losses["loss"] + weight * aux
        if self.options.prompt_invariance > 0:
            aux = self.prompt_invariance(model, batch, out)
            losses["loss_invariance"] = aux
            losses["loss"] = losses["loss"] + self.options.prompt_invariance * aux
        return losses

    def _forward(self, model: nn.Module, head: nn.Module, image: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, has_relation: torch.Tensor | None):
        """``model(image, input_ids, attention_mask)``; with --position-from-relations the head's
        position features get gradient only from the samples whose text names a side."""
        if self.options.position_from_relations and getattr(head, "position_text", None) is not None:
            head.position_grad_mask = has_relation
        try:
            return model(image, input_ids, attention_mask)
        finally:
            head.position_grad_mask = None

    def prompt_invariance(self, model: nn.Module, batch: dict, out) -> torch.Tensor:
        """``prompt_invariance_loss`` of the batch's ``PromptTwin``s: a second pass of their images
        with the twin prompts, compared phrase by phrase with the first pass ``out``."""
        twin = batch.get("twin")
        if twin is None:
            return out.token_logits.sum() * 0.0
        if hasattr(model, "module"):
            raise ValueError("--prompt-invariance runs a second forward pass outside the DDP one: "
                             "single-process training only")
        index = twin["index"]
        try:
            second = self._forward(model, model.head, batch["image"][index], twin["input_ids"],
                                   twin["attention_mask"], batch["has_relation"][index])
        finally:
            self._regions.clear()     # the region hook saw the twins' pass too
        first = out.token_logits[index]
        return prompt_invariance_loss(list(first), twin["phrases"], list(second.token_logits),
                                      twin["twin_phrases"], rule=self.options.invariance_rule,
                                      absent=twin["absent"])

    def _world_names(self, part: str, flag: str) -> tuple[str, ...]:
        """The attribute data's ``colours`` or ``kinds``; ValueError naming ``flag`` without it."""
        active = getattr(getattr(self.data, "attributes", None), "active", False)
        names = getattr(self.data, part, None) if active else None
        if not names:
            raise ValueError(f"{flag} needs the attribute data (--attribute-prompts, "
                             "--hard-negatives or --caption-swap)")
        return names

    def kind_separation(self, head: nn.Module, model: nn.Module) -> torch.Tensor:
        """``kind_separation_loss`` of the world's kind names, prompted together ("circle. hexagon.
        ..."), through the text tower and the head's token projection."""
        if hasattr(model, "module"):
            raise ValueError("--kind-separation runs the text tower outside the DDP forward: "
                             "single-process training only")
        device = head.bias0.device
        ids, mask, words = (t.to(device) for t in self._kind_prompt)
        tokens, _ = head.project_text(model.encode_text(ids, mask), mask)
        return kind_separation_loss(tokens[0], words)

    def _aux_weights(self) -> dict[str, float]:
        """The training-only classifiers on the region features that this run uses, by name
        ("colour": --colour-aux, "kind": --kind-aux), with their loss weights."""
        weights = {"colour": self.options.colour_aux, "kind": self.options.kind_aux}
        return {name: w for name, w in weights.items() if w > 0}

    @staticmethod
    def class_loss(classifier: nn.Module, regions: torch.Tensor, matched: torch.Tensor, class_ids) -> torch.Tensor:
        """Cross-entropy of ``classifier`` (``colour_aux`` / ``kind_aux``) on the region features
        ``regions`` [B, N, D] of the ATSS-positive anchors (``matched`` [B, N]: gt index or -1)
        whose box has a known class (``class_ids``: per sample int64 [G], -1 unknown; mean, 0
        when there is none)."""
        feats, labels = [], []
        for b, ids in enumerate(class_ids):
            pos = matched[b] >= 0
            if not pos.any() or not len(ids):
                continue
            lab = ids.to(matched.device)[matched[b][pos]]
            keep = lab >= 0
            feats.append(regions[b][pos][keep])
            labels.append(lab[keep])
        if not feats or sum(len(x) for x in labels) == 0:
            return regions.sum() * 0.0
        logits = classifier(torch.cat(feats).float())
        return nn.functional.cross_entropy(logits, torch.cat(labels))

    def final_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if not k.startswith(("colour_aux.", "kind_aux."))}

    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict]:
        rules = (("backbone.text.", self.options.text_lr_mult),
                 ("head.position_text", self.options.position_lr_mult))
        if self.options.fusion_lr_mult is not None:  # first matching rule wins: fusion before tower
            rules = (("i2t", self.options.fusion_lr_mult), ("t2i", self.options.fusion_lr_mult)) + rules
        return make_param_groups(model, cfg.weight_decay, rules)

    def checkpoint_config(self) -> dict:
        return {"model": self.cfg.to_dict(), "task": "fine",
                "stage": {"init": self.options.init, "text_init": self.options.text_init,
                          "text_lr_mult": self.options.text_lr_mult,
                          "colour_aux": self.options.colour_aux, "kind_aux": self.options.kind_aux,
                          "fusion_lr_mult": self.options.fusion_lr_mult,
                          "position_lr_mult": self.options.position_lr_mult,
                          "position_from_relations": self.options.position_from_relations,
                          "position_aux": self.options.position_aux,
                          "token_contrast": self.options.token_contrast,
                          "no_match_logit": self.options.no_match_logit,
                          **({"no_match_unnamed_only": True} if self.options.no_match_unnamed_only else {}),
                          **({"kind_separation": self.options.kind_separation}
                             if self.options.kind_separation else {}),
                          **({"prompt_invariance": self.options.prompt_invariance,
                              "invariance_rule": self.options.invariance_rule}
                             if self.options.prompt_invariance else {})}}


KIND_SEPARATION_MARGIN = 0.8


def kind_separation_loss(tokens: torch.Tensor, words: torch.Tensor,
                         margin: float = KIND_SEPARATION_MARGIN) -> torch.Tensor:
    """Keeps the head's projected kind names apart: mean over pairs of kinds of
    ``relu(cos(v_i, v_j) - margin) ** 2``, ``v_k`` the mean of kind ``k``'s projected tokens
    (``tokens`` [T, P], ``words`` [K, T] 0/1 token map).

    The phrase logit is the bilinear ``<region, token>``: where the projection has folded two
    kinds onto one direction (the shipped model's circle / hexagon tokens at cosine 0.98, cross /
    arrow 0.95, while the text states feeding it are at 0.5), no region feature can score one above
    the other, and the gradient that would part them is proportional to the part already there
    (docs/results.md section 23; section 8 met the same saddle for colours from the image side).
    Pairs already under ``margin`` cost nothing, so a common direction shared by all kinds stays."""
    w = words.to(tokens.dtype)
    v = nn.functional.normalize((w @ tokens) / w.sum(1, keepdim=True).clamp_min(1.0), dim=-1)
    cos = v @ v.T
    off = ~torch.eye(len(v), dtype=torch.bool, device=v.device)
    return torch.relu(cos[off] - margin).pow(2).mean()


def token_contrast_loss(token_logits: torch.Tensor, token_targets: torch.Tensor, matched: torch.Tensor,
                        attention_mask: torch.Tensor, no_match_logit: float | None = None,
                        unnamed_only: bool = False) -> torch.Tensor:
    """MDETR's soft-token prediction on the positive anchors: cross-entropy between the anchor's
    softmax over the prompt's real tokens (``attention_mask``) and the uniform distribution over
    its phrase's tokens (``token_targets`` ``[B, N, T]`` from ``GroundingLoss.assign``, positive
    where ``matched`` ``[B, N]`` >= 0). Mean over positive anchors; 0 when there is none.

    The per-token focal loss scales a negative token of probability p by p**2, so a wrong phrase
    that shares a word with the right one keeps p ~ 0.2 almost for free; here every positive
    anchor spends its whole probability mass on its own phrase.

    ``no_match_logit`` C: MDETR's no-object slot, a constant logit C appended to every anchor's
    tokens. An anchor on an object that no phrase of the prompt names (an all-zero target row,
    ``AttributeOptions.keep_omitted``) puts its mass there, so look-alike phrases alone ("red star"
    on a red arrow) are pushed below C, and every named anchor's own phrase is pushed above it: a
    level for the scores, where the plain loss only ranks the prompt's phrases against each other.
    Without it, anchors whose row is all zero are left out. ``unnamed_only``: the slot only at
    those anchors; a named anchor's softmax is over the prompt's tokens alone, as without the slot.
    """
    pos = matched >= 0
    if no_match_logit is None:
        pos = pos & (token_targets > 0).any(-1)
    if not pos.any():
        return token_logits.sum() * 0.0
    real = (attention_mask > 0).unsqueeze(1).expand_as(token_logits)[pos]         # [P, T]
    logits = token_logits.float()[pos].masked_fill(~real, float("-inf"))
    target = token_targets.float()[pos] * real
    if no_match_logit is not None:
        slot = logits.new_full((len(logits), 1), float(no_match_logit))
        unnamed = target.sum(-1, keepdim=True) == 0
        has_slot = unnamed if unnamed_only else torch.ones_like(unnamed)
        logits = torch.cat([logits, slot.masked_fill(~has_slot, float("-inf"))], dim=-1)
        target = torch.cat([target, unnamed.float()], dim=-1)
        real = torch.cat([real, has_slot], dim=-1)
    target = target / target.sum(-1, keepdim=True).clamp(min=1.0)
    logp = torch.log_softmax(logits, dim=-1).masked_fill(~real, 0.0)
    return -(target * logp).sum(-1).mean()


INVARIANCE_RULES = ("symmetric", "absent-max")


def prompt_invariance_loss(logits_a: Sequence[torch.Tensor], phrases_a: Sequence[torch.Tensor],
                           logits_b: Sequence[torch.Tensor], phrases_b: Sequence[torch.Tensor],
                           top_k: int = 16, rule: str = "symmetric",
                           absent: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """A phrase should score alike at an anchor whatever else its prompt names. Per image, the
    token logits [N, T] / [N, T2] of one image under two prompts and the tokens [K, T] / [K, T2]
    of the K phrases both name (``train.data.PromptTwin``): the mean squared difference of the two
    phrase probabilities (``phrase_probabilities``) at each phrase's ``top_k`` anchors by the
    larger of the two (where a detection could be made; elsewhere both are ~0). Mean over images;
    0 for none.

    ``rule`` "symmetric": every phrase, and both prompts get the gradient. "absent-max": only the
    phrases that name nothing in the image (``absent``: bool [K] per image), and only the higher
    of the two scores is pulled to the lower: for such a phrase any score is a false positive, so
    the prompt whose other names lift it learns from the one that does not, and a context that
    pushes a look-alike down is left as it is."""
    if rule not in INVARIANCE_RULES:
        raise ValueError(f"prompt-invariance rule {rule!r} is not one of {', '.join(INVARIANCE_RULES)}")
    if rule != "symmetric" and absent is None:
        raise ValueError(f"prompt-invariance rule {rule!r} needs each phrase's absent flag")
    terms = []
    for j, (la, pa, lb, pb) in enumerate(zip(logits_a, phrases_a, logits_b, phrases_b)):
        if rule == "absent-max":
            keep = absent[j].to(pa.device).bool()
            if not keep.any():
                continue
            pa, pb = pa[keep], pb[keep]
        sa, sb = phrase_probabilities(la, pa), phrase_probabilities(lb, pb)      # [N, K]
        idx = torch.maximum(sa, sb).detach().topk(min(top_k, len(sa)), dim=0).indices
        ga, gb = sa.gather(0, idx), sb.gather(0, idx)
        if rule == "absent-max":
            terms.append((torch.maximum(ga, gb) - torch.minimum(ga, gb).detach()).pow(2).mean())
        else:
            terms.append((ga - gb).pow(2).mean())
    if not terms:
        return sum(t.sum() for t in logits_a) * 0.0 if len(logits_a) else torch.zeros(())
    return torch.stack(terms).mean()


# a phrase that names a side asks for this position query (the head's logit gains
# POSITION_SCALE * <p, q>: at 32 and a twin 0.3 of the width away, 2.4 logits); others for zero
POSITION_TARGET = 0.25
_SIDE_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}
_SIDE_VECTORS = torch.tensor([_SIDE_DIRECTIONS[side] for side in SIDES])  # row k: train.data.SIDES[k]


def position_loss(query: torch.Tensor, positive_maps: list[torch.Tensor], side: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the phrase tokens' position queries ``q`` ``[B, T, 2]`` (the head's
    ``last_position_query``) to their side's vector (``POSITION_TARGET`` towards the side a relation
    or superlative names; 0 for every other phrase), in units of ``POSITION_TARGET``. The phrase
    tokens of a sample are those of any of its boxes' positive-map rows."""
    losses = []
    for b, pm in enumerate(positive_maps):
        tokens = (pm > 0).any(0).to(query.device)
        if not tokens.any():
            continue
        q = query[b, :tokens.shape[0]][tokens].float()
        want = (_SIDE_VECTORS[int(side[b])] * POSITION_TARGET if int(side[b]) >= 0
                else torch.zeros(2)).to(q.device)
        losses.append(((q - want) ** 2).sum(-1).mean() / POSITION_TARGET ** 2)
    return torch.stack(losses).mean() if losses else query.sum() * 0.0


# ----------------------------------------------------------------------------- init weights


@dataclass(frozen=True)
class InitReport:
    source: Path                    # the checkpoint folder read
    config: str                     # its config name
    task: str                       # "coarse" | "fine" | ...
    loaded: int                     # tensors copied into the model
    dropped: tuple[str, ...]        # checkpoint keys the model does not have (coarse-only heads)
    fresh: tuple[str, ...]          # model keys the checkpoint does not have (FPN, head)

    def summary(self) -> str:
        """One line for the CLI."""
        line = f"init from {self.source} ({self.task} '{self.config}'): {self.loaded} tensors loaded"
        if self.dropped:
            line += f", dropped {len(self.dropped)} not in the fine model ({_prefixes(self.dropped)})"
        if self.fresh:
            line += f", {len(self.fresh)} freshly initialised ({_prefixes(self.fresh)})"
        return line


def _prefixes(keys: tuple[str, ...]) -> str:
    heads = dict.fromkeys(k.split(".")[0] for k in keys)
    shown = list(heads)[:6]
    return ", ".join(shown) + (", ..." if len(heads) > len(shown) else "")


def _grows_into(old: ModelConfig, new: ModelConfig) -> bool:
    """True when ``new`` is ``old`` plus the light head's position features, whose parameter starts
    at zero, so ``old``'s weights give the same outputs under ``new``; the phrase-score rule
    (``head.phrase_score``: post-processing, no weight) may differ too."""
    old = old.replace(head=dataclasses.replace(old.head, phrase_score=new.head.phrase_score))
    if old == new:
        return True
    head = dataclasses.replace(old.head, position_features=True)
    return new.head.position_features and not old.head.position_features and old.replace(head=head) == new


def load_init(path: str | Path, cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], InitReport]:
    """Starting weights for a ``FiberForGrounding(cfg)`` from a coarse or fine checkpoint / run.

    Refuses (CheckpointError) a checkpoint of another config (one without the head's position
    features of ``cfg`` is accepted: that parameter starts at zero), one missing backbone tensors, or
    one whose shapes differ. Keys the fine model does not have are dropped; FPN/head keys the
    checkpoint lacks stay freshly initialised. Returns ``(state_dict subset, report)``.
    """
    folder = resolve_checkpoint_dir(path)
    state, ckpt_cfg, meta = load_checkpoint(folder)
    if ckpt_cfg.name != cfg.name:
        raise CheckpointError(f"--init {folder} holds config '{ckpt_cfg.name}', but this run is "
                              f"'{cfg.name}'; use a checkpoint of '{cfg.name}' or --config "
                              f"{ckpt_cfg.name}")
    if ckpt_cfg != cfg and not _grows_into(ckpt_cfg, cfg):
        raise CheckpointError(f"--init {folder}: config '{cfg.name}' differs from the registered "
                              f"one (an older definition?); retrain the init run")
    own = {k: tuple(v.shape) for k, v in FiberForGrounding(cfg).state_dict().items()}
    missing = sorted(k for k in own if k.startswith("backbone.") and k not in state)
    if missing:
        raise CheckpointError(f"--init {folder}: missing {len(missing)} backbone tensor(s), e.g. "
                              f"{missing[:3]}")
    wrong = [k for k in own if k in state and tuple(state[k].shape) != own[k]]
    if wrong:
        raise CheckpointError(f"--init {folder}: '{wrong[0]}' has shape {list(state[wrong[0]].shape)}, "
                              f"the model expects {list(own[wrong[0]])}")
    keep = {k: v for k, v in state.items() if k in own}
    report = InitReport(folder, ckpt_cfg.name, str(meta.get("task", "?")), len(keep),
                        tuple(sorted(set(state) - set(own))), tuple(sorted(set(own) - set(state))))
    return keep, report



# ----------------------------------------------------------------------------- CLI plumbing


def add_stage_args(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The options train.coarse and train.fine share (+ every TrainConfig flag)."""
    parser.add_argument("--config", required=True, help="registered model config, e.g. fiber-nano "
                        "(NAME-late = NAME without fused layers)")
    parser.add_argument("--data", required=True, type=Path, help="data folder (fiber.data.synth layout)")
    parser.add_argument("--out", required=True, type=Path, help="run folder to write")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                        help="continue from the last checkpoint in --out")
    parser.add_argument("--late-fusion", action=argparse.BooleanOptionalAction, default=False,
                        help="ablation: no fused backbone layers (K = 0), everything else the same")
    parser.add_argument("--text-init", choices=TEXT_INITS, default="none",
                        help="start the text tower from MiniLM-L6 (configs with its shape: fiber-t, fiber-nano)")
    add_train_args(parser, defaults)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


USER_ERRORS = (DataFormatError, CheckpointError, TrainingError, ValueError, OSError)


def run_cli(prog: str, body: Callable[[], str]) -> int:
    """Run a CLI body: its summary line on stdout and 0, or one error line on stderr and 2."""
    try:
        summary = body()
    except USER_ERRORS as e:
        rank = f"[rank {os.environ['RANK']}] " if world_size() > 1 else ""
        print(f"{prog}: error: {rank}{e}", file=sys.stderr)
        return 2
    if is_main_process():
        print(summary)
    return 0


def progress_bar(enabled: bool):
    """A stderr progress line for rank 0 when ``enabled`` and stderr is a terminal, else None."""
    from common.progress import progress_line

    return progress_line(enabled) if is_main_process() else None
