"""Prompt tokenisation for the runtime: Hugging Face ``tokenizers`` only (no transformers/torch).

A prompt is class names joined by ``". "`` (each name a phrase) or a caption with explicit phrase
character spans. Token ids are padded to the smallest length bucket that fits (the engines'
optimisation profiles); prompts longer than the largest bucket are truncated with a warning.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from common.package import DEFAULT_BUCKETS
from common.prompts import Span, parse_phrases, phrase_token_map

_PAD_TOKENS = ("[PAD]", "<pad>")


def _tokenizer(path: Path, truncate_at: int | None) -> Tokenizer:
    """``path``'s tokenizer without padding, truncating at ``truncate_at`` tokens (None: never).
    Parsing a tokenizer.json takes ~20 ms, and an evaluation or a test builds many tokenizers of
    one file: loaded tokenizers are shared per (file, size, mtime, truncation). They are never
    reconfigured after this, and ``encode`` does not change them."""
    stat = path.stat()
    return _load_tokenizer(str(path.resolve()), stat.st_size, stat.st_mtime_ns, truncate_at)


@functools.lru_cache(maxsize=16)
def _load_tokenizer(path: str, size: int, mtime_ns: int, truncate_at: int | None) -> Tokenizer:
    tok = Tokenizer.from_file(path)
    tok.no_padding()
    if truncate_at is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(truncate_at)
    return tok


@dataclass(frozen=True, eq=False)
class EncodedPrompt:
    """A tokenised prompt, padded to a bucket of Tb tokens (P phrases)."""

    prompt: str
    input_ids: np.ndarray                # int64 [1, Tb]
    attention_mask: np.ndarray           # int64 [1, Tb], 1 = real token, 0 = padding
    offsets: tuple[Span, ...]            # per real token, char span in prompt; specials (0, 0)
    phrase_spans: tuple[tuple[Span, ...], ...]  # per phrase, its char spans in prompt
    phrases: tuple[str, ...]             # per phrase, its text (spans joined by a space)
    phrase_map: np.ndarray               # float32 [P, Tb], 1 where token t is in phrase p
    truncated: bool                      # the prompt did not fit the largest bucket

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens, special tokens included."""
        return len(self.offsets)


def _check_spans(prompt: str, phrase_spans: Sequence[Sequence[Sequence[int]]]) -> tuple:
    """Validated ((start, end), ...) per phrase, each 0 <= start < end <= len(prompt)."""
    if len(phrase_spans) == 0:
        raise ValueError("phrase_spans is empty: give at least one phrase")
    out = []
    for p, spans in enumerate(phrase_spans):
        pairs = []
        for span in spans:
            if len(span) != 2 or not all(isinstance(v, (int, np.integer)) for v in span):
                raise ValueError(f"phrase {p}: span {span!r} is not a [start, end] pair of ints")
            s, e = int(span[0]), int(span[1])
            if not 0 <= s < e <= len(prompt):
                raise ValueError(
                    f"phrase {p}: span [{s}, {e}] is outside the prompt (length {len(prompt)})"
                )
            pairs.append((s, e))
        if not pairs:
            raise ValueError(f"phrase {p} has no character spans")
        out.append(tuple(pairs))
    return tuple(out)


class PromptTokenizer:
    """Tokenises prompts into bucket-padded ids, mask and phrase map.

    tokenizer_json_path: a Hugging Face ``tokenizer.json`` (its own truncation/padding are not
    used). buckets: padded lengths, ascending. lowercase: lowercase the prompt before tokenising
    (character by character, so offsets stay valid) for tokenizers whose normaliser does not.
    pad_id: default the id of ``[PAD]`` or ``<pad>``.
    """

    def __init__(self, tokenizer_json_path: str | Path,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, lowercase: bool = False,
                 pad_id: int | None = None):
        path = Path(tokenizer_json_path)
        self.buckets = tuple(sorted(int(b) for b in buckets))
        if not self.buckets or self.buckets[0] < 3:
            raise ValueError(f"buckets must be non-empty and >= 3 tokens, got {buckets}")
        try:
            self._tok = _tokenizer(path, None)
            self._tok_trunc = _tokenizer(path, self.buckets[-1])
        except Exception as e:  # tokenizers raises plain Exception for bad files
            raise ValueError(f"{path}: not a usable tokenizer.json ({e})") from None
        self.lowercase = lowercase
        if pad_id is None:
            ids = [self._tok.token_to_id(t) for t in _PAD_TOKENS]
            pad_id = next((i for i in ids if i is not None), None)
            if pad_id is None:
                raise ValueError(f"{path}: no [PAD] or <pad> token; pass pad_id")
        self.pad_id = int(pad_id)

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def _prepare(self, prompt: str) -> str:
        if not self.lowercase:
            return prompt
        return "".join(c.lower() if len(c.lower()) == 1 else c for c in prompt)

    def encode(self, prompt: str,
               phrase_spans: Sequence[Sequence[Sequence[int]]] | None = None) -> EncodedPrompt:
        """Tokenise ``prompt``; phrases default to its ``". "``-separated names.

        phrase_spans: per phrase, a list of [start, end) character spans of the prompt.
        ValueError for an empty prompt, one of only separators, or bad spans.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("prompt is empty")
        spans = _check_spans(prompt, phrase_spans) if phrase_spans is not None \
            else tuple(tuple(s) for s in parse_phrases(prompt))
        text = self._prepare(prompt)
        enc = self._tok.encode(text)
        full = len(enc.ids)
        truncated = full > self.max_tokens
        if truncated:
            enc = self._tok_trunc.encode(text)
        n = len(enc.ids)
        width = next(b for b in self.buckets if b >= n)
        ids = np.full((1, width), self.pad_id, np.int64)
        ids[0, :n] = enc.ids
        mask = np.zeros((1, width), np.int64)
        mask[0, :n] = 1
        offsets = tuple((0, 0) if special else (int(s), int(e))
                        for (s, e), special in zip(enc.offsets, enc.special_tokens_mask))
        phrase_map = phrase_token_map(offsets, spans, width)
        if truncated:
            # The official model truncates at its MAX_QUERY_LEN too: truncate (a stream keeps
            # running) and say in one line what was lost and what to change.
            lost = int((~phrase_map.any(axis=1)).sum())
            warnings.warn(
                f"prompt of {len(prompt)} characters is {full} tokens, over the {self.max_tokens}-token "
                f"limit; truncated (phrases past the cut get no tokens: {lost} of {len(spans)}): "
                f"shorten it or split its phrases over several prompts",
                UserWarning,
                stacklevel=2,
            )
        return EncodedPrompt(
            prompt=prompt,
            input_ids=ids,
            attention_mask=mask,
            offsets=offsets,
            phrase_spans=spans,
            phrases=tuple(" ".join(prompt[s:e] for s, e in p) for p in spans),
            phrase_map=phrase_map,
            truncated=truncated,
        )
