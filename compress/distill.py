"""Knowledge distillation: a trained FIBER grounding teacher -> a smaller student.

    python -m compress.distill --teacher runs/teacher/fine --student-config fiber-nano \\
        --data data/synth-train --out runs/nano-kd [--resume] [--no-init-from-teacher] \\
        [--kd-weights logits=1,box=1,ctr=1,feat=1] [--kd-temperature 1] [all TrainConfig flags]

A ``DistillTask`` extends ``train.tasks.FineTask`` (same data, same GT grounding loss, same lr
groups) and runs through ``train.loop.fit``: torchrun-ready, resumable, ``RUN/metrics.jsonl``.
The teacher is frozen, in eval mode, kept on the task (not optimised, not checkpointed).

Loss = the GT grounding loss (``loss_gt``: token focal + GIoU + centerness) + the weighted KD terms
(``loss_kd``), every part logged. With ``p = sigmoid(teacher_logit / tau)``,
``q = sigmoid(student_logit / tau)``, "real tokens" = ``attention_mask == 1`` and the teacher's
confidence per anchor ``c_a = max over real tokens of sigmoid(teacher_logit)`` (no temperature):

- ``kd_logits``: region-token alignment logits, over all anchors x real tokens: the quality-focal
  form of a soft-target BCE (GFL's QFL), ``tau^2 * |p - q|^beta * BCE(q, p)``, summed and divided
  by the teacher's soft count of positive anchors ``sum_a c_a`` (at least 1), as the GT token loss
  is divided by the positive anchors; a soft count, so that a teacher with no anchor above a
  threshold does not blow the term up. ``|p - q|^beta`` keeps the ~10^5 easy negative
  anchor-token pairs from swamping the few positive ones; the term is 0 exactly when ``q == p``.
- ``kd_box``: ``1 - GIoU(student box, teacher box)`` (decoded xyxy pixels) on the confident
  anchors, weighted by ``c_a`` and divided by the sum of the weights.
- ``kd_ctr``: centerness, the Bernoulli KL ``BCE(student, sigmoid(teacher)) - H(sigmoid(teacher))``
  (>= 0, 0 when equal) on the same anchors with the same weights.
- ``kd_feat``: fused-layer features: the student's fused text states ``[B, T, D_s]`` and each
  image stage map that holds a fused block of the student ``[B, C_s, H, W]`` go through learned
  1x1 projections to the teacher's widths (``kd_proj.*``, identity-initialised where the widths
  are equal); the projected student and the teacher features are both LayerNorm'd over channels
  (no affine) and compared by MSE, averaged over real tokens / positions and over the maps.
- ``kd_anchors`` (logged, not a loss): teacher-confident anchors per image.

Normalisers are per process (under DDP each rank divides by its own counts).

A teacher with another tokenizer, input or head (a converted official FIBER-B: RoBERTa BPE, the
official input on its canvas, DyHead) teaching e.g. fiber-nano (WordPiece, letterbox, light head)
cannot be distilled token column by anchor: ``--kd-mode phrase`` (what "auto" picks when
``check_compatible`` fails) distils on phrase-level scores and the teacher's top boxes instead
(``compress.phrase_kd``: each side tokenises the prompt with its own tokenizer, per-phrase mean
token probabilities, the teacher's top boxes per phrase as soft targets assigned to the student's
anchors by ATSS): ``kd_phrase`` (weight ``logits``) and ``kd_box`` (weight ``box``); ``ctr`` and
``feat`` do not apply. The student then starts from its own init (``--init-from-teacher`` is off by
default: the towers and vocabularies differ). ``--teacher-canvas HxW`` runs an official-input
teacher on a smaller canvas (cheaper; the official resize scaled down to fit).

    python -m compress.distill --teacher runs/fiber-b/ck --teacher-canvas 512x672 \
        --student-config fiber-nano --data data/synth-train --out runs/nano-from-fiber-b

The student starts from the teacher where shapes allow (``init_from_teacher``): every student
tensor whose key and shape match a teacher tensor is copied (fiber-t -> fiber-nano: the text
embeddings, text layers 0-3 apart from the cross-attention parts whose image width differs,
matching gates and head scalars). ``kd_proj.*`` are trained and checkpointed for resume but left
out of ``RUN/final``, which loads as a plain ``FiberForGrounding`` of the student config
(``task: fine``, the distillation settings under ``distill``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fiber.backbone import FusedOutput
from fiber.box_ops import paired_generalized_box_iou
from fiber.checkpoint import load_fine_model
from fiber.config import ModelConfig, parse_canvas
from fiber.heads.grounding import GroundingOutput
from fiber.losses import GroundingTarget
from fiber.models import FiberForGrounding
from train.data import GroundingTrainDataset, Stage2Options, load_stage2
from train.loop import add_train_args, fit, train_config_from_args
from train.tasks import (FINE_DEFAULTS, TEXT_INITS, FineOptions, FineTask, init_text_tower, model_config,
                         progress_bar, run_cli)

KD_PROJ_PREFIX = "kd_proj."
KD_TERMS = ("logits", "box", "ctr", "feat")
KD_MODES = ("auto", "token", "phrase")


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class KDWeights:
    logits: float = 1.0             # region-token alignment logits
    box: float = 1.0                # GIoU to the teacher's boxes on confident anchors
    ctr: float = 1.0                # centerness on confident anchors
    feat: float = 1.0               # fused-layer features through the kd_proj projections

    def __post_init__(self):
        bad = [t for t in KD_TERMS if not getattr(self, t) >= 0]
        if bad:
            raise ValueError(f"KD weight '{bad[0]}' must be >= 0, got {getattr(self, bad[0])}")


@dataclass(frozen=True)
class DistillOptions:
    weights: KDWeights = KDWeights()
    temperature: float = 1.0        # tau of the logit term (teacher and student logits / tau)
    beta: float = 2.0               # focal exponent |p - q|^beta of the logit term (QFL: 2)
    conf_threshold: float = 0.3     # teacher max token prob above which an anchor gets box/ctr KD
    init_from_teacher: bool = True  # copy every teacher tensor whose key and shape fit

    def __post_init__(self):
        if not self.temperature > 0 or not self.beta >= 0:
            raise ValueError(f"KD temperature must be > 0 and beta >= 0, got {self.temperature}, {self.beta}")
        if not 0 <= self.conf_threshold < 1:
            raise ValueError(f"KD confidence threshold must be in [0, 1), got {self.conf_threshold}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_kd_weights(text: str) -> KDWeights:
    """``"logits=1,box=1,ctr=1,feat=0.5"`` (any subset; the rest keep 1) -> ``KDWeights``."""
    values: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in KD_TERMS:
            raise ValueError(f"'{item}' is not TERM=WEIGHT with TERM one of {', '.join(KD_TERMS)}")
        try:
            values[name] = float(value)
        except ValueError:
            raise ValueError(f"'{item}': weight {value.strip()!r} is not a number") from None
    return KDWeights(**values)


# ----------------------------------------------------------------------------- teacher


def check_compatible(student: ModelConfig, teacher: ModelConfig) -> None:
    """ValueError naming every difference that breaks anchor-by-anchor / token-by-token KD:
    input size, strides, FPN levels and anchors, normalisation, tokenizer conventions."""
    s, t = student, teacher
    checks = (
        (s.swin.img_size == t.swin.img_size, f"input size {s.swin.img_size} px vs {t.swin.img_size} px"),
        (s.swin.patch_size == t.swin.patch_size,
         f"strides differ (patch size {s.swin.patch_size} vs {t.swin.patch_size})"),
        (s.head.use_p6 == t.head.use_p6 and s.head.anchor_scale == t.head.anchor_scale,
         "FPN levels or anchor scale differ, so the anchors differ"),
        ((s.image_mean, s.image_std) == (t.image_mean, t.image_std), "image normalisation differs"),
        ((s.text.vocab_size, s.text.pad_token_id, s.text.position_style)
         == (t.text.vocab_size, t.text.pad_token_id, t.text.position_style),
         "tokenizer conventions differ (vocabulary, pad id or positions)"),
        (s.max_text_len <= t.text.max_length,
         f"student prompts of {s.max_text_len} tokens exceed the teacher's {t.text.max_length} positions"),
    )
    problems = [msg for ok, msg in checks if not ok]
    if problems:
        raise ValueError(f"student config '{s.name}' cannot be distilled from teacher '{t.name}': "
                         + "; ".join(problems))


def load_teacher(path: str | Path) -> tuple[FiberForGrounding, Path]:
    """A fine checkpoint folder or run folder (-> ``RUN/final``) -> (frozen eval-mode teacher, folder).

    CheckpointError for a missing or malformed checkpoint, a coarse one, or weights that do not
    fit its own config. ``kd_proj.*`` tensors (a distillation checkpoint) are ignored.
    """
    teacher, meta = load_fine_model(path, "the teacher (--teacher)")
    return teacher.requires_grad_(False), Path(meta["path"])


@dataclass(frozen=True)
class TeacherInit:
    """What ``init_from_teacher`` copied (keys of the student's state_dict)."""
    copied: tuple[str, ...]         # key and shape match: copied
    mismatched: tuple[str, ...]     # key in both, shapes differ: left at its init
    fresh: tuple[str, ...]          # not in the teacher: left at its init
    copied_params: int              # parameter elements copied
    student_params: int             # parameter elements of the student (without kd_proj)
    params_by_module: tuple[tuple[str, int], ...] = ()  # copied elements per module, e.g. backbone.text

    def summary(self) -> str:
        share = 100.0 * self.copied_params / max(self.student_params, 1)
        parts = ", ".join(f"{m} {n:,}" for m, n in self.params_by_module)
        return (f"student init from the teacher: {len(self.copied)} tensors copied "
                f"({self.copied_params:,} of {self.student_params:,} parameters, {share:.1f}%: "
                f"{parts}), {len(self.mismatched)} shape mismatches and {len(self.fresh)} "
                f"student-only tensors left at init")

    def to_dict(self) -> dict:
        return {"tensors_copied": len(self.copied), "params_copied": self.copied_params,
                "student_params": self.student_params, "params_by_module": dict(self.params_by_module),
                "shape_mismatches": len(self.mismatched), "student_only": len(self.fresh)}


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher_state: Mapping[str, torch.Tensor]) -> TeacherInit:
    """Copy into ``student`` every tensor (parameter or buffer) whose key and shape match a
    ``teacher_state`` entry; ``kd_proj.*`` are never touched. Returns the report."""
    own = {k: v for k, v in student.state_dict().items() if not k.startswith(KD_PROJ_PREFIX)}
    params = {n: p.numel() for n, p in student.named_parameters() if not n.startswith(KD_PROJ_PREFIX)}
    copied, mismatched, fresh = [], [], []
    for key, tensor in own.items():
        if key not in teacher_state:
            fresh.append(key)
        elif tuple(teacher_state[key].shape) != tuple(tensor.shape):
            mismatched.append(key)
        else:
            tensor.copy_(teacher_state[key])
            copied.append(key)
    by_module: dict[str, int] = {}
    for key in copied:
        if key in params:
            module = _module_of(key)
            by_module[module] = by_module.get(module, 0) + params[key]
    return TeacherInit(tuple(copied), tuple(mismatched), tuple(fresh),
                       sum(by_module.values()), sum(params.values()), tuple(by_module.items()))


def _module_of(key: str) -> str:
    """``backbone.text.embeddings.word_embeddings.weight`` -> ``backbone.text.embeddings``;
    ``head.bias0`` -> ``head``."""
    parts = key.split(".")
    depth = 3 if parts[0] == "backbone" and parts[1] == "text" and parts[2] == "embeddings" else (
        2 if parts[0] == "backbone" else 1)
    return ".".join(parts[:depth])


# ----------------------------------------------------------------------------- student


class FeatureProjections(nn.Module):
    """1x1 projections of the student's fused outputs to the teacher's widths (feature KD).

    ``text``: Linear(D_s, D_t) on the fused text ``[B, T, D_s]``; ``image.stage{s}``:
    Conv2d(C_s, C_t, 1) on each image stage map (1-based ``s``) that holds a fused block of the
    student. Identity-initialised where input and output widths are equal.
    """

    def __init__(self, student: ModelConfig, teacher: ModelConfig):
        super().__init__()
        self.stages = sorted({s for s, _ in student.fused_image_blocks()})   # 0-based
        self.text = _identity_init(nn.Linear(student.text.hidden_size, teacher.text.hidden_size))
        self.image = nn.ModuleDict({
            f"stage{s + 1}": _identity_init(nn.Conv2d(student.swin.stage_dims[s],
                                                      teacher.swin.stage_dims[s], 1))
            for s in self.stages})

    def forward(self, fused: FusedOutput) -> dict[str, torch.Tensor]:
        """Student features -> ``{"text": [B, T, D_t], "stage{s}": [B, C_t, H, W], ...}``."""
        return {"text": self.text(fused.text),
                **{f"stage{s + 1}": self.image[f"stage{s + 1}"](fused.image_stages[s]) for s in self.stages}}

    def targets(self, fused: FusedOutput) -> dict[str, torch.Tensor]:
        """The teacher's features under the same names (unprojected)."""
        return {"text": fused.text, **{f"stage{s + 1}": fused.image_stages[s] for s in self.stages}}


def _identity_init(layer: nn.Linear | nn.Conv2d) -> nn.Module:
    weight = layer.weight.view(layer.weight.shape[0], -1)
    if weight.shape[0] == weight.shape[1]:
        with torch.no_grad():
            weight.copy_(torch.eye(weight.shape[0]))
            layer.bias.zero_()
    return layer


class DistillStudent(FiberForGrounding):
    """The student ``FiberForGrounding`` plus ``kd_proj`` (``FeatureProjections``), which are
    trained with it and dropped from ``RUN/final`` (``DistillTask.final_state_dict``)."""

    def __init__(self, cfg: ModelConfig, teacher_cfg: ModelConfig):
        super().__init__(cfg)
        self.kd_proj = FeatureProjections(cfg, teacher_cfg)


# ----------------------------------------------------------------------------- KD losses


def teacher_confidence(teacher_logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, N, T]`` logits, ``[B, T]`` mask -> ``[B, N]`` max over real tokens of the sigmoid."""
    probs = teacher_logits.float().sigmoid() * attention_mask[:, None, :].to(torch.float32)
    return probs.amax(dim=-1)


def logit_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor,
             normaliser: torch.Tensor, temperature: float = 1.0, beta: float = 2.0) -> torch.Tensor:
    """``tau^2 * sum_{b, a, t real} |p - q|^beta * BCE(q, p) / normaliser`` (module docstring).

    student_logits, teacher_logits: ``[B, N, T]``; attention_mask ``[B, T]`` int64; normaliser: a
    positive scalar tensor. 0 exactly when the student's probabilities equal the teacher's.
    """
    s = student_logits.float() / temperature
    p = (teacher_logits.float() / temperature).sigmoid()
    focal = (s.sigmoid() - p).abs().pow(beta)
    bce = F.binary_cross_entropy_with_logits(s, p, reduction="none")
    mask = attention_mask[:, None, :].to(bce.dtype)
    return temperature ** 2 * (focal * bce * mask).sum() / normaliser


def bernoulli_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Element-wise ``KL(Bern(sigmoid(teacher)) || Bern(sigmoid(student)))`` >= 0 (same shape)."""
    p = teacher_logits.float().sigmoid()
    return (F.binary_cross_entropy_with_logits(student_logits.float(), p, reduction="none")
            - F.binary_cross_entropy_with_logits(teacher_logits.float(), p, reduction="none"))


def box_kd(student_boxes: torch.Tensor, teacher_boxes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_a w_a (1 - GIoU) / sum_a w_a`` over anchors with ``w_a > 0``; boxes ``[B, N, 4]`` xyxy
    pixels, weight ``[B, N]``. 0 (still in the graph) when no anchor has weight."""
    b, a = (weight > 0).nonzero(as_tuple=True)
    giou = paired_generalized_box_iou(student_boxes[b, a].float(), teacher_boxes[b, a].float())
    return ((1 - giou) * weight[b, a]).sum() / weight.sum().clamp(min=1e-6) + 0.0 * student_boxes.sum()


def centerness_kd(student_ctr: torch.Tensor, teacher_ctr: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted Bernoulli KL of the centerness logits ``[B, N]`` over anchors with ``w_a > 0``."""
    kl = bernoulli_kl(student_ctr, teacher_ctr) * weight
    return kl.sum() / weight.sum().clamp(min=1e-6)


def feature_kd(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
               attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the named features of ``MSE(LN(student), LN(teacher))`` (LayerNorm over channels,
    no affine). ``text``: ``[B, T, D]`` averaged over real tokens; maps ``[B, C, H, W]`` over
    positions. The two dicts hold the same names and shapes (student already projected)."""
    terms = []
    for name, s in student.items():
        t = teacher[name]
        if s.shape != t.shape:
            raise ValueError(f"feature KD '{name}': student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        if s.ndim == 4:                                   # [B, C, H, W] -> [B, HW, C]
            s, t = s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)
            mask = s.new_ones(s.shape[:2])
        else:
            mask = attention_mask.to(torch.float32)
        err = (_channel_norm(s) - _channel_norm(t)).pow(2).mean(dim=-1)   # [B, L]
        terms.append((err * mask).sum() / mask.sum().clamp(min=1.0))
    return torch.stack(terms).mean()


def _channel_norm(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return F.layer_norm(x, x.shape[-1:])


def distillation_losses(student: GroundingOutput, teacher: GroundingOutput,
                        student_feats: Mapping[str, torch.Tensor], teacher_feats: Mapping[str, torch.Tensor],
                        attention_mask: torch.Tensor, options: DistillOptions = DistillOptions(),
                        ) -> dict[str, torch.Tensor]:
    """The four unweighted KD terms ``kd_logits``, ``kd_box``, ``kd_ctr``, ``kd_feat`` and
    ``kd_anchors`` (confident anchors per image, detached); see the module docstring.

    student / teacher: outputs on the same images and prompts (same anchors, ``[B, N, ...]``);
    *_feats: ``FeatureProjections`` outputs / targets; attention_mask ``[B, T]`` int64.
    """
    if student.token_logits.shape != teacher.token_logits.shape:
        raise ValueError(f"KD: student logits {tuple(student.token_logits.shape)} vs teacher "
                         f"{tuple(teacher.token_logits.shape)} (different anchors or prompts)")
    conf = teacher_confidence(teacher.token_logits, attention_mask)          # [B, N]
    confident = conf > options.conf_threshold
    weight = conf * confident
    normaliser = conf.sum().clamp(min=1.0)              # soft count of teacher-positive anchors
    return {
        "kd_logits": logit_kd(student.token_logits, teacher.token_logits, attention_mask, normaliser,
                              options.temperature, options.beta),
        "kd_box": box_kd(student.boxes, teacher.boxes, weight),
        "kd_ctr": centerness_kd(student.centerness, teacher.centerness, weight),
        "kd_feat": feature_kd(student_feats, teacher_feats, attention_mask),
        "kd_anchors": (confident.sum().float() / confident.shape[0]).detach(),
    }


# ----------------------------------------------------------------------------- task


class TeacherTask(FineTask):
    """``FineTask`` with a frozen teacher, the part both distillation modes share.

    teacher: a ``FiberForGrounding`` (e.g. from ``load_teacher``); kept in eval mode, moved to
    the device in ``setup``. teacher_source: where it came from (recorded in config.json).
    ``init_report``: the ``TeacherInit`` of the last ``build_model`` (None without the init).
    Subclasses say which student they train (``new_student``) and its loss.
    """

    def __init__(self, cfg: ModelConfig, teacher: FiberForGrounding, data: GroundingTrainDataset,
                 options: DistillOptions, fine_options: FineOptions, teacher_source: str):
        super().__init__(cfg, data, None, fine_options)
        self.teacher = teacher.eval().requires_grad_(False)
        self.kd_options, self.teacher_source = options, teacher_source
        self.init_report: TeacherInit | None = None

    def new_student(self) -> FiberForGrounding:
        raise NotImplementedError

    def build_model(self) -> FiberForGrounding:
        model = self.new_student()
        init_text_tower(model, self.options.text_init)
        if self.kd_options.init_from_teacher:
            self.init_report = init_from_teacher(model, self.teacher.state_dict())
        return model

    def setup(self, device: torch.device) -> None:
        self.teacher.to(device)


class DistillTask(TeacherTask):
    """``TeacherTask`` for a ``DistillStudent`` (same tokenizer and head kind as the teacher): GT
    loss + weighted KD terms on token logits, boxes and fused features."""

    def __init__(self, cfg: ModelConfig, teacher: FiberForGrounding, data: GroundingTrainDataset,
                 options: DistillOptions = DistillOptions(), fine_options: FineOptions = FineOptions(),
                 teacher_source: str = ""):
        super().__init__(cfg, teacher, data, options, fine_options, teacher_source)
        check_compatible(cfg, teacher.cfg)

    def new_student(self) -> DistillStudent:
        return DistillStudent(self.cfg, self.teacher.cfg)

    def loss(self, model: DistillStudent, batch: dict, step: int) -> dict[str, torch.Tensor]:
        image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        out, feats = model.forward_with_features(image, model.encode_text(ids, mask), mask)
        targets = [GroundingTarget(b, m) for b, m in zip(batch["boxes"], batch["positive_map"])]
        gt = self.loss_fn(out, targets, mask)
        parts = {k: v for k, v in gt.items() if k != "loss"}
        w = self.kd_options.weights
        if not any(getattr(w, t) for t in KD_TERMS):
            # every KD weight 0: the init-only ablation (the teacher's init, GT loss only); no teacher pass
            return {"loss": gt["loss"], "loss_gt": gt["loss"], "loss_kd": gt["loss"].new_zeros(()), **parts}
        with torch.no_grad():
            t_out, t_feats = self.teacher.forward_with_features(
                image, self.teacher.encode_text(ids, mask), mask)
        kd = distillation_losses(out, t_out, model.kd_proj(feats), model.kd_proj.targets(t_feats),
                                 mask, self.kd_options)
        loss_kd = sum(getattr(w, t) * kd[f"kd_{t}"] for t in KD_TERMS)
        return {"loss": gt["loss"] + loss_kd, "loss_gt": gt["loss"], "loss_kd": loss_kd, **parts, **kd}

    def final_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The plain student: everything but ``kd_proj.*``."""
        return {k: v for k, v in state.items() if not k.startswith(KD_PROJ_PREFIX)}

    def checkpoint_config(self) -> dict:
        distill = {"teacher": self.teacher_source, "teacher_config": self.teacher.cfg.name,
                   **self.kd_options.to_dict(),
                   "init": self.init_report.to_dict() if self.init_report else None}
        return {**super().checkpoint_config(), "distill": distill}


class PhraseDistillTask(TeacherTask):
    """``FineTask`` with a frozen teacher of another tokenizer, input or head: the GT loss +
    phrase-level KD (module docstring, ``compress.phrase_kd``). The student is a plain
    ``FiberForGrounding``; each batch also carries the teacher's input and tokens for the same
    images and prompts (built in ``collate``).

    teacher_tokenizer: the teacher's own tokenizer.json (a converted release) or None (WordPiece).
    top_k: teacher boxes per phrase used as soft targets.
    """

    def __init__(self, cfg: ModelConfig, teacher: FiberForGrounding, data: GroundingTrainDataset,
                 options: DistillOptions = DistillOptions(), fine_options: FineOptions = FineOptions(),
                 teacher_source: str = "", teacher_tokenizer: Path | None = None, top_k: int = 3):
        from compress.phrase_kd import TeacherInputs

        super().__init__(cfg, teacher, data, options, fine_options, teacher_source)
        if top_k < 1:
            raise ValueError(f"phrase KD: --kd-top-k must be >= 1, got {top_k}")
        self.top_k = top_k
        self.inputs = TeacherInputs(teacher.cfg, teacher_tokenizer, data.tok)

    def new_student(self) -> FiberForGrounding:
        return FiberForGrounding(self.cfg)

    def collate(self, samples: list) -> dict:
        batch = self.data.collate(samples)
        cache = self.data.cache
        extra = self.inputs.batch([cache.paths[s.image] for s in samples], [s.prompt for s in samples],
                                  [s.spans for s in samples], [cache.info(s.image).scale for s in samples])
        width = batch["input_ids"].shape[1]       # the student's phrase maps to its batch width
        extra["s_phrase_map"] = [F.pad(m[:, :width], (0, max(0, width - m.shape[1]))) for m in extra["s_phrase_map"]]
        return {**batch, **extra}

    def loss(self, model: FiberForGrounding, batch: dict, step: int) -> dict[str, torch.Tensor]:
        from compress.phrase_kd import phrase_kd_losses, teacher_top_boxes

        image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        out = model.forward_from_text(image, model.encode_text(ids, mask), mask)
        targets = [GroundingTarget(b, m) for b, m in zip(batch["boxes"], batch["positive_map"])]
        gt = self.loss_fn(out, targets, mask)
        parts = {k: v for k, v in gt.items() if k != "loss"}
        w = self.kd_options.weights
        if not (w.logits or w.box):
            return {"loss": gt["loss"], "loss_gt": gt["loss"], "loss_kd": gt["loss"].new_zeros(()), **parts}
        t_ids, t_mask = batch["t_input_ids"], batch["t_attention_mask"]
        with torch.no_grad():
            t_out = self.teacher.forward_from_text(batch["t_image"], self.teacher.encode_text(t_ids, t_mask), t_mask)
            boxes = teacher_top_boxes(t_out, batch["t_phrase_map"], batch["t_to_student"], self.top_k)
        kd = phrase_kd_losses(out, batch["s_phrase_map"], boxes, batch["kd_valid"], self.kd_options.beta)
        loss_kd = w.logits * kd["kd_phrase"] + w.box * kd["kd_box"]
        return {"loss": gt["loss"] + loss_kd, "loss_gt": gt["loss"], "loss_kd": loss_kd, **parts, **kd}

    def checkpoint_config(self) -> dict:
        distill = {"teacher": self.teacher_source, "teacher_config": self.teacher.cfg.name, "mode": "phrase",
                   "top_k": self.top_k, **self.kd_options.to_dict(),
                   "init": self.init_report.to_dict() if self.init_report else None}
        return {**super().checkpoint_config(), "distill": distill}


def kd_mode(requested: str, student: ModelConfig, teacher: ModelConfig) -> str:
    """The KD mode: "auto" is "phrase" when the teacher has another kind of head, input rule or
    tokenizer (e.g. a converted FIBER-B teaching fiber-nano), else "token". "token" (asked or
    chosen) checks ``check_compatible`` (ValueError naming every difference)."""
    if requested not in KD_MODES:
        raise ValueError(f"--kd-mode {requested!r} is not one of {', '.join(KD_MODES)}")
    s, t = student, teacher
    other_kind = (s.head.kind != t.head.kind or s.input.style != t.input.style
                  or (s.text.vocab_size, s.text.pad_token_id, s.text.position_style)
                  != (t.text.vocab_size, t.text.pad_token_id, t.text.position_style))
    mode = ("phrase" if other_kind else "token") if requested == "auto" else requested
    if mode == "token":
        check_compatible(student, teacher)
    return mode


# ----------------------------------------------------------------------------- CLI


def _weights_arg(text: str) -> KDWeights:
    try:
        return parse_kd_weights(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("compress.distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True,
                   help="the teacher: a fine run folder (its final/) or checkpoint folder")
    p.add_argument("--student-config", required=True, help="registered student config, e.g. fiber-nano")
    p.add_argument("--data", required=True, type=Path, help="data folder (fiber.data.synth layout)")
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from the last checkpoint in --out")
    p.add_argument("--init-from-teacher", action=argparse.BooleanOptionalAction, default=None,
                   help="copy every teacher tensor whose key and shape fit the student (default: on for "
                        "token KD, off for phrase KD)")
    p.add_argument("--kd-mode", choices=KD_MODES, default="auto",
                   help="token: KD on token columns and anchors (same tokenizer, input and anchors); phrase: on "
                        "phrase scores and the teacher's top boxes (any tokenizer / head); auto: token when possible")
    p.add_argument("--kd-top-k", type=int, default=3, help="phrase KD: teacher boxes per phrase used as soft targets")
    p.add_argument("--teacher-canvas", type=parse_canvas, default=None, metavar="HxW",
                   help="run an official-input teacher on this canvas (multiples of 32; default its config's)")
    p.add_argument("--kd-weights", type=_weights_arg, default=KDWeights(),
                   help="KD term weights, e.g. logits=1,box=1,ctr=1,feat=1 (unnamed terms keep 1)")
    p.add_argument("--kd-temperature", type=float, default=DistillOptions.temperature,
                   help="temperature of the logit term")
    p.add_argument("--kd-beta", type=float, default=DistillOptions.beta,
                   help="focal exponent |p - q|^beta of the logit term (0 = plain soft BCE)")
    p.add_argument("--kd-conf-threshold", type=float, default=DistillOptions.conf_threshold,
                   help="teacher max token probability above which an anchor gets box/ctr KD")
    p.add_argument("--text-init", choices=TEXT_INITS, default="none",
                   help="start the student's text tower from MiniLM-L6 (before the teacher copy)")
    p.add_argument("--text-lr-mult", type=float, default=1.0, help="lr multiplier of the text tower")
    p.add_argument("--max-negatives", type=int, default=Stage2Options.max_negatives,
                   help="most random negative class names in a detection prompt")
    add_train_args(p, FINE_DEFAULTS)
    return p


def _run(args: argparse.Namespace) -> str:
    from fiber.checkpoint import tokenizer_file

    teacher, folder = load_teacher(args.teacher)
    if args.teacher_canvas is not None:
        teacher.cfg = teacher.cfg.with_canvas(args.teacher_canvas)
    cfg = model_config(args.student_config)
    mode = kd_mode(args.kd_mode, cfg, teacher.cfg)
    init_from = args.init_from_teacher if args.init_from_teacher is not None else mode == "token"
    options = DistillOptions(weights=args.kd_weights, temperature=args.kd_temperature,
                             beta=args.kd_beta, conf_threshold=args.kd_conf_threshold,
                             init_from_teacher=init_from)
    train_cfg = train_config_from_args(args)
    data = load_stage2(args.data, cfg, Stage2Options(max_negatives=args.max_negatives),
                       progress_bar(train_cfg.progress))
    init = f"teacher:{folder}" if init_from else "none"
    fine = FineOptions(text_lr_mult=args.text_lr_mult, text_init=args.text_init, init=init)
    if mode == "phrase":
        task = PhraseDistillTask(cfg, teacher, data, options, fine, teacher_source=str(folder),
                                 teacher_tokenizer=tokenizer_file(folder), top_k=args.kd_top_k)
    else:
        task = DistillTask(cfg, teacher, data, options, fine, teacher_source=str(folder))
    result = fit(task, train_cfg, args.out, resume=args.resume)
    m = result.metrics
    init_note = task.init_report.summary() if task.init_report else "student not initialised from the teacher"
    return (f"distill '{teacher.cfg.name}' -> '{cfg.name}' ({mode} KD): {result.step} steps on {len(data)} samples; "
            f"{init_note}; last logged loss {m.get('loss', float('nan')):.4f} (gt "
            f"{m.get('loss_gt', float('nan')):.4f}, kd {m.get('loss_kd', float('nan')):.4f}); "
            f"student weights in {result.final_dir}")


def main(args: argparse.Namespace) -> int:
    return run_cli("compress.distill", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
