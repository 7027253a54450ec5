"""Phrase-level distillation: a teacher with another tokenizer, input and head teaches a student.

Token-column KD (compress.distill's default) needs the student and the teacher to share the
tokenizer, the input and the anchors. A converted official FIBER-B (RoBERTa byte-level BPE, the
official 800/1333 input on its canvas, DyHead with +1 anchors on P3-P7) shares none of them with
fiber-nano (WordPiece, a 256 px letterbox, the light head on P3-P5). What both *do* share is the
prompt and its phrases, and the image. So:

- Each side tokenises the same prompt with its own tokenizer and the same phrase character spans
  (``train.data.GroundingItem.spans``); per phrase, a model's score at an anchor is the mean token
  probability over that phrase's own tokens (as serving scores phrases), ``[N, P]`` on each side.
- The teacher sees the source image through its own input rule (official resize on its canvas);
  its decoded boxes go back to source pixels and then into the student's letterbox pixels.
- The teacher's top boxes are the soft targets: per phrase, its ``top_k`` anchors by the official
  score ``sqrt(phrase prob x sigmoid(centerness))`` after a per-phrase NMS, each with that score as
  its weight. The student's anchors are assigned to them by ATSS (the student head's own rule).
- ``kd_phrase``: over every student anchor and phrase, the quality-focal BCE of the student's phrase
  probability against the target (the assigned teacher box's score for its phrase, 0 elsewhere),
  ``|q - t|^beta * BCE(q, t)``, divided by the sum of the targets (at least 1).
- ``kd_box``: ``1 - GIoU(student box, teacher box)`` on the assigned anchors, weighted by the teacher
  score and divided by the sum of the weights.
- ``kd_targets`` (logged): teacher boxes per image.

Phrases without tokens on either side (cut by a length limit) take no part. Nothing here depends on
token columns lining up, so any tokenizer and head pair works.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fiber.box_ops import paired_generalized_box_iou
from fiber.heads.grounding import GroundingOutput
from fiber.losses import atss_assign, phrase_probabilities

EPS = 1e-6


@dataclass(frozen=True)
class TeacherBoxes:
    """One image's soft targets, in the student's network pixels."""
    boxes: torch.Tensor            # [M, 4] float32 xyxy
    phrase: torch.Tensor           # [M] int64, index into the prompt's phrases
    score: torch.Tensor            # [M] float32 in [0, 1], the teacher's official score


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    from runtime.postprocess import nms

    return nms(boxes.astype(np.float32), scores.astype(np.float32), iou)


@torch.no_grad()
def teacher_top_boxes(out: GroundingOutput, phrase_maps: Sequence[torch.Tensor], to_student: torch.Tensor,
                      top_k: int = 3, nms_iou: float = 0.6) -> list[TeacherBoxes]:
    """Per image, each phrase's ``top_k`` teacher boxes after a per-phrase NMS (module docstring).

    out: the teacher's outputs ``[B, N_t, ...]``; phrase_maps: per image ``[P, T_t]``;
    to_student: ``[B, 4]`` factors (x, y, x, y) from teacher canvas pixels to student pixels.
    """
    targets = []
    for i, pm in enumerate(phrase_maps):
        probs = phrase_probabilities(out.token_logits[i], pm)                            # [N, P]
        score = (probs * out.centerness[i].float().sigmoid()[:, None]).clamp(min=0).sqrt()
        boxes_np = out.boxes[i].float().cpu().numpy()
        keep_b, keep_p, keep_s = [], [], []
        for p in range(pm.shape[0]):
            if not bool(pm[p].any()):
                continue
            s = score[:, p]
            cand = s.topk(min(len(s), max(8 * top_k, 32))).indices.cpu().numpy()
            kept = cand[_nms(boxes_np[cand], s[cand].cpu().numpy(), nms_iou)][:top_k]
            keep_b.append(out.boxes[i, torch.as_tensor(kept)].float() * to_student[i])
            keep_p.append(torch.full((len(kept),), p, dtype=torch.long))
            keep_s.append(s[torch.as_tensor(kept)])
        dev = out.boxes.device
        if keep_b:
            targets.append(TeacherBoxes(torch.cat(keep_b), torch.cat(keep_p).to(dev), torch.cat(keep_s)))
        else:
            targets.append(TeacherBoxes(torch.zeros(0, 4, device=dev), torch.zeros(0, dtype=torch.long, device=dev),
                                        torch.zeros(0, device=dev)))
    return targets


def phrase_kd_losses(student: GroundingOutput, phrase_maps: Sequence[torch.Tensor],
                     targets: Sequence[TeacherBoxes], valid: Sequence[torch.Tensor], beta: float = 2.0,
                     topk: int = 9) -> dict[str, torch.Tensor]:
    """``kd_phrase``, ``kd_box`` and ``kd_targets`` (module docstring).

    student: outputs ``[B, N, ...]`` with its anchors; phrase_maps: per image the student's
    ``[P, T]``; targets: per image the teacher's ``TeacherBoxes``; valid: per image ``[P]`` bool,
    phrases with tokens on both sides.
    """
    score_terms, norm = [], student.token_logits.new_zeros(())
    box_terms, box_w = [], student.token_logits.new_zeros(())
    for i, (pm, t, ok) in enumerate(zip(phrase_maps, targets, valid)):
        q = phrase_probabilities(student.token_logits[i], pm)                            # [N, P]
        target = torch.zeros_like(q)
        m = atss_assign(student.anchors, student.level_sizes, t.boxes, topk) if len(t.boxes) else \
            torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device)
        pos = m >= 0
        if bool(pos.any()):
            a, g = pos.nonzero(as_tuple=True)[0], m[pos]
            target[a, t.phrase[g]] = t.score[g].to(target.dtype)
            giou = paired_generalized_box_iou(student.boxes[i, a].float(), t.boxes[g].float())
            box_terms.append(((1 - giou) * t.score[g]).sum())
            box_w = box_w + t.score[g].sum()
        q = q.clamp(EPS, 1 - EPS)
        bce = F.binary_cross_entropy(q, target, reduction="none") * (q - target).abs().pow(beta)
        score_terms.append((bce * ok.to(bce.dtype)[None, :]).sum())
        norm = norm + (target * ok.to(target.dtype)[None, :]).sum()
    zero = 0.0 * student.boxes.sum()
    return {"kd_phrase": torch.stack(score_terms).sum() / norm.clamp(min=1.0),
            "kd_box": (torch.stack(box_terms).sum() / box_w.clamp(min=EPS) if box_terms else zero) + zero,
            "kd_targets": torch.tensor(float(np.mean([len(t.boxes) for t in targets]))),
            }


class TeacherInputs:
    """What the teacher needs for a student batch: its own input and tokens for the same images
    and prompts, and the map from its canvas pixels to the student's letterbox pixels.

    teacher_cfg: the teacher's ModelConfig; tokenizer: its tokenizer.json (a converted release's)
    or None (the default WordPiece asset).
    """

    def __init__(self, teacher_cfg, tokenizer: Path | None, student_tokenizer):
        from fiber.package import resolve_buckets
        from compress.quantize import model_input

        self.pre, self.tok = model_input(teacher_cfg, resolve_buckets(teacher_cfg, None), tokenizer)
        self.student_tok = student_tokenizer
        self._images: dict[Path, tuple[np.ndarray, object]] = {}

    def _image(self, path: Path):
        from fiber.data.evaluation import load_image_rgb

        hit = self._images.get(path)
        if hit is None:
            tensor = np.empty_like(self.pre.buffer)
            info = self.pre.run(load_image_rgb(path), tensor[0])
            hit = self._images[path] = (tensor, info)
        return hit

    def batch(self, paths: Sequence[Path], prompts: Sequence[str], spans: Sequence[tuple],
              student_scales: Sequence[float]) -> dict:
        """-> ``t_image`` [B, 3, H_t, W_t], ``t_input_ids`` / ``t_attention_mask`` [B, T_t],
        ``t_phrase_map`` / ``s_phrase_map`` (per image [P, T_t] / [P, T_s] float32), ``kd_valid``
        (per image [P] bool), ``t_to_student`` [B, 4]."""
        import warnings

        images, ids, t_maps, s_maps, valid, factors = [], [], [], [], [], []
        for path, prompt, sp, s_scale in zip(paths, prompts, spans, student_scales):
            tensor, info = self._image(Path(path))
            images.append(tensor)
            phrases = [list(map(list, p)) for p in sp] or None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")     # a prompt over a tokenizer's limit is cut, as in training
                t_enc = self.tok.encode(prompt, phrases)
                s_enc = self.student_tok.encode(prompt, phrases)
            ids.append((t_enc.input_ids[0], t_enc.attention_mask[0]))
            t_pm, s_pm = t_enc.phrase_map.astype(np.float32), s_enc.phrase_map.astype(np.float32)
            t_maps.append(t_pm)
            s_maps.append(s_pm)
            valid.append(torch.from_numpy(t_pm.any(1) & s_pm.any(1)))
            fx = info.src_w / info.new_w * s_scale
            fy = info.src_h / info.new_h * s_scale
            factors.append([fx, fy, fx, fy])
        width = max(len(i) for i, _ in ids)
        pad = self.tok.pad_id
        t_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        t_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for b, (i, m) in enumerate(ids):
            t_ids[b, :len(i)], t_mask[b, :len(m)] = torch.from_numpy(i), torch.from_numpy(m)
        return {"t_image": torch.from_numpy(np.concatenate(images)), "t_input_ids": t_ids,
                "t_attention_mask": t_mask,
                "t_phrase_map": [torch.from_numpy(np.pad(m, ((0, 0), (0, width - m.shape[1])))) for m in t_maps],
                "s_phrase_map": [torch.from_numpy(m) for m in s_maps], "kd_valid": valid,
                "t_to_student": torch.tensor(factors, dtype=torch.float32)}
