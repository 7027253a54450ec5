"""Detection prompts: class names joined by ". " (GLIP / FIBER), and user prompt parsing.

Spans are half-open character spans ``(start, end)`` into the prompt; phrase i of a detection
prompt is class name i. Torch-free and tokenizer-free: a token budget is enforced through a
caller-supplied ``length_fn``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from common.prompts import SEPARATOR, Span, parse_phrases

# fiber.md section 3: (one negative, one positive, full, drop positive). The released FIBER config
# says 0.2 for the last value, but the code asserts it is 0 (as in GLIP's configs).
CONTROL_PROB = (0.05, 0.05, 0.5, 0.0)
MAX_NEGATIVES = 85  # RANDOM_SAMPLE_NEG of the O365 pre-training config


@dataclass(frozen=True)
class SampledPrompt:
    prompt: str
    spans: tuple[Span, ...]      # one per name, into ``prompt``
    names: tuple[str, ...]       # the class names in prompt order; positives dropped for length
                                 # are absent, so their boxes must be dropped too


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"class name {name!r} is empty or not a string")
    if "." in name:
        raise ValueError(f"class name {name!r} contains '.', the prompt separator")
    return name.strip()


def build_detection_prompt(class_names: Sequence[str]) -> tuple[str, list[Span]]:
    """Join names with ". " -> (prompt, char span of each name). ``["cat", "red mug"]`` gives
    ``("cat. red mug", [(0, 3), (5, 12)])``. Names are stripped; an empty name, or one with a
    '.', is a ValueError (it would not survive ``parse_prompt``)."""
    names = [_check_name(n) for n in class_names]
    if not names:
        raise ValueError("no class names to build a prompt from")
    spans, pos = [], 0
    for n in names:
        spans.append((pos, pos + len(n)))
        pos += len(n) + len(SEPARATOR)
    return SEPARATOR.join(names), spans


def parse_prompt(prompt: str) -> list[Span]:
    """Spans of the names in a ``". "``-separated prompt: ``"person. red mug.. dog."`` -> spans
    of "person", "red mug", "dog". ``common.prompts.parse_phrases`` is the one
    definition, so training, evaluation and serving split prompts identically."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt {prompt!r} is not a string")
    return [tuple(spans[0]) for spans in parse_phrases(prompt)]


def _num_negatives(rng: np.random.Generator, control_prob: Sequence[float], full: int) -> int:
    """GLIP's generate_control_options_given_probabilities, negatives only (positives are kept)."""
    one_neg, one_pos, p_full, _ = control_prob
    r = rng.random()
    if r < one_neg:
        return 1
    if r < one_neg + one_pos:
        return 0
    if r < one_neg + one_pos + p_full:
        return full
    return int(rng.integers(max(1, full))) + 1


def within_budget(names: list[str], budget: int, length_fn: Callable[[str], int]) -> list[str]:
    """The leading names whose "name. " lengths fit strictly inside ``budget``."""
    kept = []
    for n in names:
        budget -= length_fn(n + SEPARATOR)
        if budget < 0:
            break
        kept.append(n)
    return kept


def sample_detection_prompt(rng: np.random.Generator, positives: Sequence[str],
                            all_names: Sequence[str], max_negatives: int = MAX_NEGATIVES,
                            control_prob: Sequence[float] = CONTROL_PROB,
                            max_length: int | None = None,
                            length_fn: Callable[[str], int] = len) -> SampledPrompt:
    """The GLIP / FIBER training prompt for a detection image (od_to_grounding).

    All positive classes are kept; the number of negatives follows ``control_prob`` = (p one
    negative, p no negative, p all ``min(max_negatives, len(all_names))`` negatives, p drop
    positive = 0), otherwise uniform in 1..full. As in GLIP, negatives are drawn from
    ``all_names`` without replacement and the drawn positives are discarded, so a prompt can have
    fewer. Positives and negatives are shuffled together.
    ``max_length`` (in ``length_fn`` units, e.g. tokens of "name. "): positives that overflow it are
    dropped (check_for_positive_overflow), then negatives fill what is left.
    """
    if len(control_prob) != 4 or control_prob[3] != 0:
        raise ValueError(f"control_prob must be 4 values with drop-positive 0, "
                         f"got {control_prob}")
    if min(control_prob) < 0 or sum(control_prob[:3]) > 1:
        raise ValueError(f"control_prob {control_prob}: probabilities must be >= 0, sum <= 1")
    pos = list(dict.fromkeys(_check_name(n) for n in positives))
    pool = [_check_name(n) for n in all_names]
    full = min(max_negatives, len(pool))
    count = min(_num_negatives(rng, control_prob, full), len(pool))
    drawn = [pool[i] for i in rng.choice(len(pool), size=count, replace=False)] if count else []
    neg = [n for n in dict.fromkeys(drawn) if n not in pos]
    pos = [pos[i] for i in rng.permutation(len(pos))]
    neg = [neg[i] for i in rng.permutation(len(neg))]
    if max_length is not None:
        pos = within_budget(pos, max_length, length_fn)
        neg = within_budget(neg, max_length - sum(length_fn(n + SEPARATOR) for n in pos) - 1, length_fn)
    names = neg + pos
    names = [names[i] for i in rng.permutation(len(names))]
    if not names:
        return SampledPrompt("", (), ())
    prompt, spans = build_detection_prompt(names)
    return SampledPrompt(prompt, tuple(spans), tuple(names))
