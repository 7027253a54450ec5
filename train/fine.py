"""Stage 2, fine-grained pre-training: grounding captions, referring expressions and detection
prompts with the GLIP-style head.

    python -m train.fine --config fiber-nano --data data/synth-train --init runs/nano/coarse \\
        --out runs/nano/fine [--max-steps N] [--resume] [--text-lr-mult 0.1] [--late-fusion] ...

``--init``: a coarse (or fine) run folder (its ``final/``), a checkpoint folder
(``model.safetensors`` + ``config.json``, e.g. ``RUN/checkpoints/step-0000100``), or ``none``
(fine only: from scratch, or ``--text-init minilm``). A checkpoint of another config is refused,
one without every backbone tensor too; coarse-only heads are dropped with a one-line note.
Reads ``DATA/grounding.json`` + ``DATA/detection.json``; writes the ``train.loop.fit`` run
folder, ``RUN/final`` being what ``train.evaluate`` and ``compress`` read. Runs unchanged under
``torchrun --nproc_per_node N -m train.fine ...``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from common.package import PHRASE_SCORE_MIN
from train.data import AttributeOptions, Stage2Options, load_stage2
from train.loop import fit, train_config_from_args
from train.tasks import (FINE_DEFAULTS, INVARIANCE_RULES, FineOptions, FineTask, add_stage_args,
                         is_main_process, load_init,
                         model_config, progress_bar, run_cli)



def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("train.fine", description=__doc__.split("\n\n")[0])
    add_stage_args(p, FINE_DEFAULTS)
    p.add_argument("--init", required=True,
                   help="coarse/fine run folder, checkpoint folder, or 'none' (fine only)")
    p.add_argument("--text-lr-mult", type=float, default=1.0,
                   help="lr multiplier of the text tower (official FIBER: 0.1)")
    p.add_argument("--detection", action=argparse.BooleanOptionalAction, default=True,
                   help="also train on DATA/detection.json (class-name prompts)")
    p.add_argument("--grounding", action=argparse.BooleanOptionalAction, default=True,
                   help="train on DATA/grounding.json (captions, referring expressions)")
    p.add_argument("--max-negatives", type=int, default=85,
                   help="most random negative class names in a detection prompt")
    p.add_argument("--attribute-prompts", type=float, default=0.0, metavar="P",
                   help="probability that a detection image is prompted with 'colour kind' phrases "
                        "(present pairs + absent hard negatives) instead of kind names")
    p.add_argument("--hard-negatives", type=float, default=0.0, metavar="P",
                   help="probability that a caption gets absent 'colour kind' phrases appended "
                        "(same kind other colour, same colour other kind; all tokens negative)")
    p.add_argument("--max-hard-negatives", type=int, default=4,
                   help="most hard-negative phrases added to one caption")
    p.add_argument("--colour-prompts", type=float, default=0.0, metavar="P",
                   help="probability that an attribute sample is prompted with the colour names "
                        "alone (each object positive for its colour)")
    p.add_argument("--kind-prompts", type=float, default=0.0, metavar="P",
                   help="probability that an attribute sample (not drawn for colour names) is prompted "
                        "with every kind name (each object positive for its kind): every look-alike "
                        "outline a negative at every object")
    p.add_argument("--omit-present", type=float, default=0.0, metavar="P",
                   help="probability that an attribute item leaves a present \"colour kind\" pair "
                        "out of its prompt (its objects then negatives), so absent phrases that "
                        "share its colour or kind are met without the right phrase beside them")
    p.add_argument("--absent-only", type=float, default=0.0, metavar="P",
                   help="probability that an attribute item's prompt is its absent look-alikes alone "
                        "(no present pair named, every object background), as a user's prompt of only "
                        "absent things is (off by default)")
    p.add_argument("--confusable-negatives", type=float, default=0.0, metavar="P",
                   help="probability that a same-colour hard negative names a kind the present one "
                        "is mistaken for (train.data.CONFUSABLE_KINDS: 'red star' beside a red "
                        "arrow) instead of any other kind")
    p.add_argument("--free-negatives", type=float, default=0.0, metavar="P",
                   help="probability that an attribute item also gets one or two absent pairs drawn "
                        "from all pairs not in the image, so that the kinds a prompt names do not "
                        "hint at what is present (off by default)")
    p.add_argument("--decoy-kinds", type=float, default=0.0, metavar="P",
                   help="probability that an attribute item also names an absent kind that a present "
                        "object is mistaken for, in two or three colours ('blue star. red star' "
                        "beside a blue triangle), so that a kind named in several colours is not "
                        "always in the image (off by default)")
    p.add_argument("--caption-swap", type=float, default=0.0, metavar="P",
                   help="probability that a caption sample is replaced by an attribute sample of "
                        "its own image")
    p.add_argument("--fusion-lr-mult", type=float, default=None, metavar="M",
                   help="lr multiplier of every fusion parameter (i2t in the image tower, t2i in "
                        "the text tower); default: each follows its tower, as in official FIBER "
                        "fine (t2i at --text-lr-mult); FIBER coarse uses 5")
    p.add_argument("--position-lr-mult", type=float, default=1.0, metavar="M",
                   help="lr multiplier of the head's position features (configs with "
                        "head.position_features): their signal comes only from the few phrases "
                        "that name a side, so at 1x they drift like noise")
    p.add_argument("--position-from-relations", action=argparse.BooleanOptionalAction, default=False,
                   help="only samples whose text names a side (relations, superlatives) train the "
                        "head's position features; the others see them but send no gradient")
    p.add_argument("--position-aux", type=float, default=0.0, metavar="W",
                   help="weight of a loss that asks the position query of a phrase naming a side "
                        "(relations, superlatives of the synthetic data) to point that way, and of "
                        "every other phrase to be zero (configs with head.position_features)")
    p.add_argument("--relation-repeat", type=int, default=1, metavar="N",
                   help="show each grounding entry with a spatial relation or superlative N times "
                        "per epoch (1: as in the data)")
    p.add_argument("--token-contrast", type=float, default=0.0, metavar="W",
                   help="weight of a soft-token loss (MDETR's): at each positive anchor, a softmax "
                        "over the prompt's tokens must put its mass on the anchor's phrase, so a "
                        "phrase that shares a word with the right one (\"blue star\" on a blue "
                        "triangle) is pushed below it at full strength, not focal-damped")
    p.add_argument("--no-match-logit", type=float, default=None, metavar="C",
                   help="give the soft-token loss (--token-contrast) MDETR's no-object slot at logit "
                        "C, and keep the objects of pairs --omit-present left out as boxes that no "
                        "phrase names: their anchors put their mass on the slot, so a look-alike "
                        "phrase alone (\"red star\" on a red arrow) is pushed below C and each "
                        "object's own phrase above it (off by default)")
    p.add_argument("--no-match-unnamed-only", action="store_true",
                   help="with --no-match-logit: the slot only at the anchors of objects that no "
                        "phrase names, so named objects (small ones with weak scores) are ranked "
                        "among the prompt's phrases as without the slot and not pushed above C")
    p.add_argument("--word-targets", action="store_true",
                   help="attribute samples train each token on its own word (the \"red\" of \"red "
                        "star\" is positive at a red arrow, its \"star\" negative) instead of its "
                        "phrase's referent, so the noun need not carry the colour; the run's config "
                        "then scores a phrase by the minimum over its tokens (head.phrase_score)")
    p.add_argument("--colour-aux", type=float, default=0.0, metavar="W",
                   help="weight of an auxiliary colour classifier on the head's region features "
                        "(training only; needs the attribute data)")
    p.add_argument("--kind-aux", type=float, default=0.0, metavar="W",
                   help="the same for the object's kind (shape), so that look-alike outlines "
                        "(circle / hexagon, cross / arrow) get apart in the features the phrase "
                        "scores read (training only; needs the attribute data)")
    p.add_argument("--kind-separation", type=float, default=0.0, metavar="W",
                   help="weight of a loss that keeps the head's projected kind names apart (cosine "
                        "over 0.8 costs), so the phrase logit can score one kind above a look-alike "
                        "(training only; needs the attribute data; single process)")
    p.add_argument("--prompt-invariance", type=float, default=0.0, metavar="W",
                   help="weight of a loss that asks a phrase to score alike in two prompts of one "
                        "image: attribute items get a twin prompt of some of their phrases, "
                        "shuffled, and a second pass (train.tasks.prompt_invariance_loss; single "
                        "process; off by default)")
    p.add_argument("--invariance-rule", choices=INVARIANCE_RULES, default="symmetric",
                   help="with --prompt-invariance: 'symmetric' (every shared phrase, both prompts "
                        "pulled together) or 'absent-max' (only phrases that name nothing in the "
                        "image, the higher score pulled down to the lower)")
    p.add_argument("--twin-prompts", type=float, default=1.0, metavar="P",
                   help="with --prompt-invariance: probability that an attribute item gets a twin prompt")
    return p


def _run(args: argparse.Namespace) -> str:
    attributes = AttributeOptions(args.attribute_prompts, args.hard_negatives, args.max_hard_negatives,
                                  args.colour_prompts, args.caption_swap, args.omit_present,
                                  args.confusable_negatives, keep_omitted=args.no_match_logit is not None,
                                  word_targets=args.word_targets, absent_only=args.absent_only,
                                  kind_prompts=args.kind_prompts, free_negatives=args.free_negatives,
                                  decoy_kinds=args.decoy_kinds,
                                  twin_prompts=args.twin_prompts if args.prompt_invariance > 0 else 0.0)
    unnamed = attributes.leaves_objects_unnamed   # objects that no phrase of their prompt names
    if args.no_match_logit is not None and (args.token_contrast <= 0 or not unnamed):
        raise ValueError("--no-match-logit is a slot of the soft-token loss over the objects "
                         "--omit-present or --absent-only leaves out: it needs --token-contrast > 0 and "
                         "--omit-present > 0 or --absent-only > 0")
    if args.no_match_unnamed_only and args.no_match_logit is None:
        raise ValueError("--no-match-unnamed-only places the slot of --no-match-logit: give --no-match-logit C")
    if args.prompt_invariance < 0:
        raise ValueError(f"--prompt-invariance is a loss weight >= 0, got {args.prompt_invariance}")
    if args.prompt_invariance > 0 and not (attributes.attribute_prompts > 0 or attributes.caption_swap > 0):
        raise ValueError("--prompt-invariance compares phrases of attribute items: it needs "
                         "--attribute-prompts or --caption-swap")
    cfg = model_config(args.config, args.late_fusion)
    if args.word_targets:  # a phrase holds where all its words do: its package scores by the minimum
        cfg = cfg.replace(head=dataclasses.replace(cfg.head, phrase_score=PHRASE_SCORE_MIN))
    train_cfg = train_config_from_args(args)
    init_state = None
    if args.init.lower() != "none":
        init_state, report = load_init(args.init, cfg)
        if is_main_process():
            print(report.summary(), flush=True)
    options = Stage2Options(grounding=args.grounding, detection=args.detection,
                            max_negatives=args.max_negatives, relation_repeat=args.relation_repeat,
                            attributes=attributes)
    data = load_stage2(args.data, cfg, options, progress_bar(train_cfg.progress))
    task = FineTask(cfg, data, init_state,
                    FineOptions(text_lr_mult=args.text_lr_mult, text_init=args.text_init,
                                init=str(args.init), colour_aux=args.colour_aux, kind_aux=args.kind_aux,
                                kind_separation=args.kind_separation,
                                fusion_lr_mult=args.fusion_lr_mult,
                                position_lr_mult=args.position_lr_mult,
                                position_from_relations=args.position_from_relations,
                                position_aux=args.position_aux,
                                token_contrast=args.token_contrast,
                                no_match_logit=args.no_match_logit,
                                no_match_unnamed_only=args.no_match_unnamed_only,
                                prompt_invariance=args.prompt_invariance,
                                invariance_rule=args.invariance_rule))
    result = fit(task, train_cfg, args.out, resume=args.resume)
    loss = result.metrics.get("loss", float("nan"))
    return (f"fine '{cfg.name}': {result.step} steps on {len(data)} samples, last logged loss "
            f"{loss:.4f}; weights in {result.final_dir}")


def main(args: argparse.Namespace) -> int:
    return run_cli("train.fine", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
