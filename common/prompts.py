"""The prompt contract: how a prompt splits into phrases and which tokens belong to which phrase.

A detection prompt is class names joined by ``". "`` (each name a phrase); a caption instead comes
with explicit phrase character spans. Spans are half-open ``(start, end)`` character offsets into
the prompt. The runtime's tokenizer, the training data and the evaluation harness all split and
map prompts here, so they agree. Torch-free and tokenizer-free.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Span = tuple[int, int]  # [start, end) character offsets into a prompt
SEPARATOR = ". "


def parse_phrases(prompt: str) -> list[list[Span]]:
    """Character spans of the class names in a ``". "``-separated prompt, one span per phrase.

    ``"person. red mug."`` -> ``[[(0, 6)], [(8, 15)]]``: names are stripped of whitespace and
    trailing periods; empty names are skipped. ValueError when no name is left.
    """
    spans: list[list[Span]] = []
    start = 0
    for part in prompt.split(SEPARATOR):
        name = part.strip().rstrip(".").rstrip()
        if name:
            s = start + part.index(name)
            spans.append([(s, s + len(name))])
        start += len(part) + len(SEPARATOR)
    if not spans:
        raise ValueError(f"prompt {prompt!r} has no phrases (it is empty or only separators)")
    return spans


def phrase_token_map(offsets: Sequence[Span], phrase_spans: Sequence[Sequence[Span]],
                     num_tokens: int) -> np.ndarray:
    """float32 [P, num_tokens]: 1 where token t's character span overlaps one of phrase p's.

    offsets: one (start, end) per real token (special tokens have (0, 0) and never belong);
    tokens past ``len(offsets)`` (padding) belong to no phrase.
    """
    out = np.zeros((len(phrase_spans), num_tokens), np.float32)
    for t, (ts, te) in enumerate(offsets[:num_tokens]):
        if te <= ts:
            continue
        for p, spans in enumerate(phrase_spans):
            if any(ts < e and s < te for s, e in spans):
                out[p, t] = 1.0
    return out
