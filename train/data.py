"""Torch datasets of both training stages over the ``fiber.data`` readers.

- ``LetterboxCache``: every image decoded and letterboxed ONCE (``runtime.preprocess.letterbox``,
  the serving code) and kept as uint8 ``[S, S, 3]`` (padding 0) + its ``LetterboxInfo``; samples
  of the same image share one entry. ``batch(indices)`` normalises to float32 ``[B, 3, S, S]``
  with the padding set to 0 *after* normalisation, as architecture.md says. The only difference
  to serving is the rounding of the bilinear values to uint8 (< 0.5 grey levels, about 0.01 in
  normalised units); 5,000 images at 256 px take ~1 GB.
- ``PairDataset`` (stage 1): ``pairs.jsonl`` captions; batch = image, ``input_ids``,
  ``attention_mask`` padded to the longest caption of the batch.
- ``GroundingTrainDataset`` (stage 2): ``grounding.json`` entries (captions and referring
  expressions) followed by ``detection.json`` images. Each sample has boxes xyxy in the
  letterboxed network frame and a positive map ``[G, T]`` from the token offsets and the phrase
  character spans (``common.prompts.phrase_token_map``, via the tokenizer). Detection prompts are drawn by
  ``fiber.data.prompts.sample_detection_prompt`` (positives + random negative names joined by
  ". ") from an RNG seeded by the global numpy RNG, which the training loop seeds per micro-batch
  chunk (``train.distributed.chunk_seed``): the same step gives the same prompts after a resume.

Attribute prompts (``AttributeOptions``; off by default): a detection image may instead
be prompted with "colour kind" phrases (every pair present, with its boxes, plus absent hard
negatives of a present kind in another colour or a present colour as another kind, from each
annotation's ``attributes.colour``), and a caption may get absent hard-negative phrases appended,
so that the colour token, not the shared noun, has to decide.

No augmentation: a horizontal flip breaks left/right language and colours are what the text
names. Captions are tokenised with ``fiber/assets/tokenizer.json`` through the runtime's
``PromptTokenizer`` ([CLS] ... [SEP], lower-cased, truncated to ``cfg.max_text_len``).
Missing or malformed files raise ``fiber.data.formats.DataFormatError`` naming the file.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from fiber.config import ModelConfig
from fiber.data.evaluation import load_image_rgb
from fiber.data.formats import (DataFormatError, DetectionDataset, GroundingDataset, Pair,
                                load_detection, load_grounding, load_pairs)
from fiber.data.synth import RELATIONS, SUPERLATIVES
from fiber.data.prompts import SEPARATOR, build_detection_prompt, sample_detection_prompt, within_budget
from runtime.preprocess import letterbox
from runtime.tokenize import EncodedPrompt, PromptTokenizer
from runtime.types import LetterboxInfo

TOKENIZER_PATH = Path(__file__).resolve().parents[1] / "fiber" / "assets" / "tokenizer.json"
PAIRS_FILE, GROUNDING_FILE, DETECTION_FILE = "pairs.jsonl", "grounding.json", "detection.json"
_UINT8_STD = (1.0 / 255.0,) * 3  # letterbox with mean 0 / this std returns the resized pixel values

Progress = Callable[..., object]  # e.g. tqdm: progress(iterable, desc=..., total=...)


# ----------------------------------------------------------------------------- text


@functools.lru_cache(maxsize=4)
def raw_tokenizer(path: str | Path = TOKENIZER_PATH) -> Tokenizer:
    """The plain ``tokenizers.Tokenizer`` (vocabulary queries, token counts of class names)."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for bad files
        raise ValueError(f"{path}: not a usable tokenizer.json ({e})") from None


def build_tokenizer(cfg: ModelConfig, buckets: Sequence[int] | None = None,
                    path: str | Path = TOKENIZER_PATH) -> PromptTokenizer:
    """The runtime tokenizer for ``cfg``: lower-cased, truncated to ``cfg.max_text_len``.

    buckets: padded lengths (default ``(cfg.max_text_len,)``; collate trims to the batch's
    longest). ValueError when the tokenizer's vocabulary is not the text encoder's.
    """
    vocab = raw_tokenizer(path).get_vocab_size()
    if vocab != cfg.text.vocab_size:
        raise ValueError(f"{path}: vocabulary of {vocab} tokens, but config '{cfg.name}' has a "
                         f"{cfg.text.vocab_size}-token text encoder")
    return PromptTokenizer(path, buckets=buckets or (cfg.max_text_len,), lowercase=True,
                           pad_id=cfg.text.pad_token_id)


def special_token_ids(path: str | Path = TOKENIZER_PATH) -> dict[str, int]:
    """``{"pad", "unk", "cls", "sep", "mask"}`` ids of a BERT WordPiece tokenizer."""
    tok = raw_tokenizer(path)
    ids = {k: tok.token_to_id(t) for k, t in (("pad", "[PAD]"), ("unk", "[UNK]"), ("cls", "[CLS]"),
                                              ("sep", "[SEP]"), ("mask", "[MASK]"))}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"{path}: no {missing} token(s); MLM needs a BERT WordPiece vocabulary")
    return ids


def token_count(text: str, path: str | Path = TOKENIZER_PATH) -> int:
    """Tokens of ``text`` without the special tokens (lower-cased as the training prompts)."""
    return len(raw_tokenizer(path).encode(text.lower(), add_special_tokens=False).ids)


def pad_ids(rows: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows of different lengths -> ``(input_ids, attention_mask)`` int64 ``[B, T]``,
    T = the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.from_numpy(np.asarray(r, np.int64))
        mask[i, :len(r)] = 1
    return ids, mask


# ----------------------------------------------------------------------------- images


class LetterboxCache:
    """Images decoded and letterboxed once, kept as uint8 (see the module docstring).

    ``add(path) -> index`` registers an image (deduplicated by path); ``load(progress)`` decodes
    everything registered; ``batch(indices)`` -> float32 ``[B, 3, S, S]`` normalised.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        self.size = int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.paths: list[Path] = []
        self._index: dict[Path, int] = {}
        self.pixels: np.ndarray | None = None        # uint8 [N, S, S, 3]
        self.infos: list[LetterboxInfo] = []

    def __len__(self) -> int:
        return len(self.paths)

    def add(self, path: str | Path) -> int:
        if self.pixels is not None:
            raise RuntimeError("LetterboxCache: add() after load()")
        path = Path(path)
        if path not in self._index:
            self._index[path] = len(self.paths)
            self.paths.append(path)
        return self._index[path]

    def load(self, progress: Progress | None = None) -> None:
        """Decode + letterbox every registered image (DataFormatError names a bad file)."""
        pixels = np.zeros((len(self.paths), self.size, self.size, 3), np.uint8)
        scratch = np.zeros((3, self.size, self.size), np.float32)
        items = enumerate(self.paths)
        if progress is not None:
            items = progress(items, desc="images", total=len(self.paths))
        infos = []
        for i, path in items:
            info = letterbox(load_image_rgb(path), scratch, (0.0, 0.0, 0.0), _UINT8_STD)
            pixels[i] = np.clip(np.rint(scratch), 0, 255).astype(np.uint8).transpose(1, 2, 0)
            infos.append(info)
        self.pixels, self.infos = pixels, infos

    def info(self, index: int) -> LetterboxInfo:
        return self.infos[index]

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """float32 ``[B, 3, S, S]``: ``(pixel / 255 - mean) / std`` inside the image, 0 outside."""
        if self.pixels is None:
            raise RuntimeError("LetterboxCache: batch() before load()")
        idx = np.asarray(indices, np.int64)
        x = torch.from_numpy(self.pixels[idx]).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        for b, i in enumerate(idx.tolist()):
            info = self.infos[i]
            x[b, :, info.new_h:, :] = 0.0
            x[b, :, :, info.new_w:] = 0.0
        return x.contiguous()


def build_cache(cfg: ModelConfig) -> LetterboxCache:
    return LetterboxCache(cfg.swin.img_size, cfg.image_mean, cfg.image_std)


# ----------------------------------------------------------------------------- stage 1


class PairDataset:
    """Image-caption pairs -> ``{"image": cache index, "input_ids": int64 [n]}`` samples."""

    def __init__(self, pairs: Sequence[Pair], cache: LetterboxCache, tokenizer: PromptTokenizer):
        self.cache, self.pad_id = cache, tokenizer.pad_id
        self.images = [cache.add(p.image) for p in pairs]
        self.ids = [_real_ids(tokenizer.encode(p.caption, [[(0, len(p.caption))]])) for p in pairs]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "input_ids": self.ids[i]}

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """-> ``image`` float32 [B, 3, S, S], ``input_ids`` / ``attention_mask`` int64 [B, T]."""
        ids, mask = pad_ids([s["input_ids"] for s in samples], self.pad_id)
        return {"image": self.cache.batch([s["image"] for s in samples]),
                "input_ids": ids, "attention_mask": mask}


def _real_ids(enc: EncodedPrompt) -> np.ndarray:
    """The unpadded ids int64 [n] of an encoded prompt."""
    return enc.input_ids[0, :enc.num_tokens]


# ----------------------------------------------------------------------------- stage 2


@dataclass(frozen=True, eq=False)
class GroundingItem:
    """One stage-2 sample before batching (n = its real token count)."""
    image: int                  # LetterboxCache index
    input_ids: np.ndarray       # int64 [n]
    boxes: np.ndarray           # float32 [G, 4] xyxy network-input pixels
    positive_map: np.ndarray    # float32 [G, n], 1 where the token names the box
    prompt: str                 # the text (for debugging and tests)
    spans: tuple = ()           # per phrase, its ((start, end), ...) character spans in ``prompt``
                                # (another tokenizer, e.g. a distillation teacher's, re-tokenises with them)
    has_relation: bool = False  # the text names a side (spatial relation or superlative)
    side: int = -1              # which: SIDES index ("left", "right", "above", "below"), -1 none
    twin: "PromptTwin | None" = None  # a second prompt of the same image (AttributeOptions.twin_prompts)


@dataclass(frozen=True, eq=False)
class PromptTwin:
    """A second prompt for an item's image: some of its phrases, in another order
    (``AttributeOptions.twin_prompts``). A phrase should score alike at each anchor in both prompts
    (``train.tasks.prompt_invariance_loss``); K = the phrases the twin keeps, m = its token count."""
    input_ids: np.ndarray       # int64 [m]
    phrases: np.ndarray         # float32 [K, n] the kept phrases' tokens in the item's prompt
    twin_phrases: np.ndarray    # float32 [K, m] the same phrases' tokens in the twin's prompt
    absent: np.ndarray | None = None  # bool [K]: the phrase names nothing in the image


SIDES = ("left", "right", "above", "below")


def side_named(text: str) -> int:
    """The ``SIDES`` index that a fiber.data.synth relation or superlative names ("the leftmost red
    star", "the red star to the left of the blue ring"), -1 when it names none."""
    words = text.lower()
    for side in SIDES:  # superlatives first: "leftmost" also holds "left"
        if SUPERLATIVES[side] in words:
            return SIDES.index(side)
    for side in SIDES:
        if any(f" {w} " in f" {words} " for w in RELATIONS[side]):
            return SIDES.index(side)
    return -1


def _span_tuple(phrases) -> tuple:
    """Per phrase a list of [start, end) spans -> the same as nested tuples of ints."""
    return tuple(tuple((int(a), int(b)) for a, b in spans) for spans in phrases)


def _pad_columns(rows: np.ndarray, width: int) -> torch.Tensor:
    """float32 [R, n] token rows -> [R, width], zeros after the first n columns (a batch's padding)."""
    out = np.zeros((len(rows), width), np.float32)
    out[:, :rows.shape[1]] = rows
    return torch.from_numpy(out)


def _network_boxes(boxes: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Source-pixel xyxy -> letterboxed network pixels (top-left placement: just the scale)."""
    out = np.asarray(boxes, np.float32).reshape(-1, 4) * np.float32(info.scale)
    hi = np.array([info.new_w, info.new_h, info.new_w, info.new_h], np.float32)
    return np.clip(out, 0, hi)


def _word_spans(names: Sequence[str], start: int) -> list[tuple[str, tuple[int, int]]]:
    """The words of ". "-joined "colour kind" names that begin at character ``start``, each with
    its [start, end) span: colour then kind of each name."""
    words, pos = [], start
    for name in names:
        colour, kind = name.split(" ")
        words += [(colour, (pos, pos + len(colour))), (kind, (pos + len(colour) + 1, pos + len(name)))]
        pos += len(name) + len(SEPARATOR)
    return words


def _targets(boxes: list[np.ndarray], rows: list[np.ndarray], num_tokens: int,
             unnamed: Sequence[np.ndarray] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Merge identical boxes (OR of their token rows) and drop degenerate boxes or boxes whose
    phrase lost all its tokens to truncation -> ``(boxes [G, 4], positive_map [G, n])``;
    ``unnamed`` boxes (objects no phrase names) follow with all-zero rows."""
    merged: dict[tuple, np.ndarray] = {}
    for box, row in [*zip(boxes, rows), *((b, None) for b in unnamed)]:
        if row is None:                      # an unnamed object: kept unless a phrase names its box
            row = np.zeros(num_tokens, np.float32)
        elif not row.any():
            continue
        if box[2] - box[0] < 1e-3 or box[3] - box[1] < 1e-3:
            continue
        key = tuple(np.round(box, 3).tolist())
        merged[key] = np.maximum(merged[key], row) if key in merged else row.copy()
    if not merged:
        return np.zeros((0, 4), np.float32), np.zeros((0, num_tokens), np.float32)
    return (np.asarray(list(merged), np.float32),
            np.stack(list(merged.values())).astype(np.float32))


@dataclass(frozen=True)
class AttributeOptions:
    """Prompts that make the colour token carry the decision.

    attribute_prompts: probability that a detection image is prompted with "colour kind" phrases
    (present pairs with their boxes + absent hard negatives) instead of kind names.
    hard_negatives: probability that a caption / referring expression gets 1..max_hard_negatives
    absent "colour kind" phrases appended (". blue star. red moon"), all of whose tokens are
    negatives at every box.
    colour_prompts: probability that such an attribute item is prompted with the colour names
    alone ("pink. red. blue. ...", every colour; each object positive for its colour): the colour
    token is the class, with no noun shared between a positive and a negative phrase.
    kind_prompts: probability that an attribute item (not drawn for colour names) is prompted with
    every kind name of the world ("circle. hexagon. star. ...", shuffled; each object positive for
    its kind): every look-alike outline is a negative at every object, not only the few a detection
    prompt's random negatives draw (the shipped model names the right kind for 77% of objects when
    all twelve are offered, hexagons 2%: docs/results.md section 23).
    caption_swap: probability that a caption / referring expression sample is replaced by an
    attribute item of its own image (more attribute samples without changing the dataset length).
    omit_present: probability that a present pair of an attribute item is left out of its prompt
    (its boxes then negatives for every token), so that an absent phrase sharing its colour or
    kind ("blue star" on a blue triangle) meets it with no right phrase to compete, as a user's
    prompt of only absent things does.
    confusable: probability that a same-colour hard negative names a kind the present one is
    mistaken for (``CONFUSABLE_KINDS``) rather than any other kind.
    keep_omitted: the boxes of objects that no phrase of an attribute item's prompt names (pairs
    omitted, or cut by the text budget) stay in the targets with an all-zero positive-map row,
    so that a loss can ask their anchors for
    "no match" (``train.tasks.token_contrast_loss``'s no-match slot); the focal loss reads such a
    row as it reads background.
    absent_only: probability that an attribute item names no present pair at all: its prompt is
    the absent look-alikes alone, every object background (as ``keep_omitted`` says, an unnamed
    box), as a user's prompt of only absent things is (`make demo`'s ``arrow-moon.png``).
    free_negatives: probability that an attribute item gets one or two more absent pairs drawn from
    all (colour, kind) pairs not in the image, whatever they share with it. Hard negatives all share
    a kind or a colour with a present pair, so the kinds a training prompt names hint at what is in
    the image, and a model learns that prior ("bolt" in the prompt lifts "star" on a triangle:
    docs/results.md section 24); negatives drawn without regard to the scene weaken the hint (at
    1.0 for 800 steps from phase 8 the lift shrank but F1 fell: not in the shipped recipe).
    decoy_kinds: probability that an attribute item also names a kind that is not in the image, one a
    present object is mistaken for (``CONFUSABLE_KINDS``), in two or three colours (that object's
    among them), and half the time a kind mistaken for that one in the object's colour: "blue star.
    red star. brown star. blue bolt" beside a blue triangle. A hard negative names a present kind in
    other colours, so without decoys a kind named in several colours is always in the image, and a
    model learns to find it on its nearest look-alike (`make demo`'s ``arrow-moon.png``). Measured
    from phase 8 (docs/results.md section 25): at 1.0 for 800 steps the demo came out right, but so
    did a control without decoys on the same seed, and 800 more steps with decoys brought the label
    back; F1 and the absent-only rate did not improve. Not in the shipped recipe.
    twin_prompts: probability that an attribute item (phrases or all colour / kind names) carries a
    ``PromptTwin``: each phrase kept with probability 1/2 (at least one), shuffled. The same
    phrase in two prompts of one image should score alike; a fused text tower reads the whole
    prompt, and what the other names say lifts an absent phrase on a look-alike ("blue star" on a
    blue triangle scores 0.27 alone and 0.60 beside "red star. brown star. blue bolt":
    docs/results.md sections 24-25). The twin is drawn after everything else, so the item's own
    prompt replays unchanged. Measured from phase 8 (section 26): the loss removes most of that
    lift and a fifth of the absent-only false positives but costs F1 where the right phrases are
    named. Not in the shipped recipe.
    word_targets: an attribute item's tokens are positive for what their own word names, not for
    their phrase's referent: at a red arrow the "red" of "red star" is positive and its "star"
    negative (with phrase targets both are negative, so the noun has to carry the colour: the
    "star" of "red star" learns to fire on red things). A phrase then holds at an object when all
    of its words do: score it by the minimum over its tokens, not the mean.
    """
    attribute_prompts: float = 0.0
    hard_negatives: float = 0.0
    max_hard_negatives: int = 4
    colour_prompts: float = 0.0
    caption_swap: float = 0.0
    omit_present: float = 0.0
    confusable: float = 0.0
    keep_omitted: bool = False
    word_targets: bool = False
    absent_only: float = 0.0
    kind_prompts: float = 0.0
    free_negatives: float = 0.0
    decoy_kinds: float = 0.0
    twin_prompts: float = 0.0

    @property
    def active(self) -> bool:
        return self.attribute_prompts > 0 or self.hard_negatives > 0 or self.caption_swap > 0

    @property
    def leaves_objects_unnamed(self) -> bool:
        """Whether some attribute items name none of an object's phrases (omitted pairs, or prompts
        of absent look-alikes alone): the objects ``keep_omitted`` keeps and a no-match slot needs."""
        return self.omit_present > 0 or self.absent_only > 0

    def check(self) -> None:
        for name in ("attribute_prompts", "hard_negatives", "colour_prompts", "caption_swap", "omit_present",
                     "confusable", "absent_only", "kind_prompts", "free_negatives", "decoy_kinds",
                     "twin_prompts"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name.replace('_', '-')} must be a probability in [0, 1], got {v}")
        if self.max_hard_negatives < 1:
            raise ValueError(f"max-hard-negatives must be >= 1, got {self.max_hard_negatives}")
        if self.keep_omitted and not self.leaves_objects_unnamed:
            raise ValueError("keeping omitted boxes needs omit-present > 0 or absent-only > 0 "
                             "(no pair is omitted otherwise)")


# For each kind, the kinds it is mistaken for at the same colour, most often first: the phase-6
# model (models/fiber-nano of c9c8148), 400 fresh scenes of benchmarks.attributes (seed 1234), boxes
# at IoU >= 0.5 with an object of the same colour and another kind, scoring >= 0.26 (docs/results.md
# section 13). circle <-> hexagon (19 + 19) and cross <-> arrow (17 + 11) lead. Ring and moon were
# confused fewer than 3 times each: their entries are the nearest outlines.
CONFUSABLE_KINDS: dict[str, tuple[str, ...]] = {
    "circle": ("hexagon", "diamond", "ring"),
    "hexagon": ("circle", "heart", "square", "diamond"),
    "cross": ("arrow", "diamond", "star"),
    "arrow": ("cross", "diamond", "star"),
    "star": ("arrow", "cross", "bolt"),
    "bolt": ("arrow", "star"),
    "diamond": ("cross", "arrow", "circle", "heart"),
    "triangle": ("star", "arrow"),
    "square": ("moon", "hexagon"),
    "moon": ("square", "ring"),
    "heart": ("diamond", "hexagon"),
    "ring": ("circle", "moon"),
}


def hard_negative_pairs(rng: np.random.Generator, present: Sequence[tuple[str, str]],
                        colours: Sequence[str], kinds: Sequence[str],
                        count: int, confusable: float = 0.0) -> list[tuple[str, str]]:
    """Up to ``count`` distinct (colour, kind) pairs absent from ``present``, each sharing the kind
    (other colour) or the colour (other kind) of a present pair, the two kinds alternating.

    confusable: probability that a same-colour negative takes a kind the present one is mistaken
    for (``CONFUSABLE_KINDS``: "red star" beside a red arrow) instead of any other kind; 0 draws
    nothing more from ``rng`` (runs made before the option replay unchanged)."""
    have = set(present)
    same_kind = sorted({(c, k) for _, k in have for c in colours} - have)
    same_colour = sorted({(c, k) for c, _ in have for k in kinds} - have)
    near = (sorted({(c, n) for c, k in have for n in CONFUSABLE_KINDS.get(k, ()) if n in kinds} - have)
            if confusable > 0 else [])
    pools = [same_kind, same_colour]
    if rng.random() < 0.5:
        pools.reverse()
    out: list[tuple[str, str]] = []
    for j in range(count):
        first = pools[j % 2]
        if confusable > 0 and first is same_colour and rng.random() < confusable:
            first = [p for p in near if p not in out] or first
        pool = [p for p in first if p not in out] or [p for p in pools[1 - j % 2] if p not in out]
        if not pool:
            break
        out.append(pool[int(rng.integers(len(pool)))])
    return out


def free_negative_pairs(rng: np.random.Generator, present: Sequence[tuple[str, str]],
                        colours: Sequence[str], kinds: Sequence[str], count: int,
                        taken: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Up to ``count`` distinct (colour, kind) pairs drawn uniformly from every pair that is neither
    in ``present`` nor in ``taken``: negatives that say nothing about what the scene holds."""
    skip = set(present) | set(taken)
    pool = [(c, k) for c in colours for k in kinds if (c, k) not in skip]
    if not pool or count < 1:
        return []
    pick = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return [pool[int(j)] for j in pick]


def decoy_kind_pairs(rng: np.random.Generator, present: Sequence[tuple[str, str]],
                     colours: Sequence[str], kinds: Sequence[str]) -> list[tuple[str, str]]:
    """A kind absent from the image named in two or three colours: a kind that a randomly chosen
    present object is mistaken for (any absent kind when none of those is free), in that object's
    colour and one or two others; half the time also a kind mistaken for the decoy, in the object's
    colour. All are absent pairs (no object of either kind is present). [] when nothing is present."""
    if not present:
        return []
    have = {k for _, k in present}
    colour, kind = present[int(rng.integers(len(present)))]
    pool = [n for n in CONFUSABLE_KINDS.get(kind, ()) if n in kinds and n not in have]
    pool = pool or [k for k in kinds if k not in have]
    if not pool:
        return []
    decoy = pool[int(rng.integers(len(pool)))]
    others = [c for c in colours if c != colour]
    pick = rng.choice(len(others), size=min(int(rng.integers(1, 3)), len(others)), replace=False)
    out = [(colour, decoy)] + [(others[int(j)], decoy) for j in pick]
    second = [n for n in CONFUSABLE_KINDS.get(decoy, ()) if n in kinds and n not in have]
    if rng.random() < 0.5 and second:
        out.append((colour, second[int(rng.integers(len(second)))]))
    return out


def load_object_colours(path: str | Path) -> dict[int, str]:
    """annotation id -> ``attributes.colour`` of a fiber.data.synth ``detection.json``."""
    import json
    try:
        anns = json.loads(Path(path).read_text())["annotations"]
        return {int(a["id"]): str(a["attributes"]["colour"]) for a in anns}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataFormatError(f"{path}: no per-annotation attributes.colour ({e!r})") from None


class GroundingTrainDataset:
    """Grounding entries then detection images as ``GroundingItem`` samples (module docstring).

    grounding / detection: loaded datasets (either may be None, not both).
    max_negatives: cap on the random negative class names of a detection prompt.
    relation_repeat: each grounding entry with a spatial relation or superlative appears this many
    times (the extra copies follow the data; detection images are not repeated).
    """

    def __init__(self, grounding: GroundingDataset | None, detection: DetectionDataset | None,
                 cache: LetterboxCache, tokenizer: PromptTokenizer, max_text_len: int,
                 max_negatives: int = 85, attributes: AttributeOptions | None = None,
                 object_colours: dict[int, str] | None = None, relation_repeat: int = 1):
        if grounding is None and detection is None:
            raise ValueError("stage-2 data needs grounding entries or detection images")
        if relation_repeat < 1:
            raise ValueError(f"relation-repeat must be >= 1, got {relation_repeat}")
        self.attributes = attributes or AttributeOptions()
        self.attributes.check()
        if self.attributes.active and (detection is None or object_colours is None):
            raise ValueError("attribute prompts / hard negatives need detection.json with each "
                             "annotation's attributes.colour (fiber.data.synth writes them)")
        self.cache, self.tok, self.pad_id = cache, tokenizer, tokenizer.pad_id
        self.max_text_len, self.max_negatives = max_text_len, max_negatives
        self.grounding = list(grounding.samples) if grounding is not None else []
        # entries with a spatial relation / superlative appended again (relation_repeat - 1) times
        self.grounding += [s for s in self.grounding if s.has_relation] * (relation_repeat - 1)
        self.detection = list(detection.images) if detection is not None else []
        self.names = dict(detection.categories) if detection is not None else {}
        self.g_images = [cache.add(s.image) for s in self.grounding]
        self.d_images = [cache.add(im.image) for im in self.detection]
        self._name_tokens: dict[str, int] = {}
        # (colour, kind) of every object per image file, for colour-kind prompts and hard negatives
        self.scene_pairs: dict[Path, list[tuple[str, str]]] = {}
        if self.attributes.active:
            for im in self.detection:
                self.scene_pairs[im.image] = [
                    (object_colours[int(a)], self.names[int(c)])
                    for a, c in zip(im.annotation_ids.tolist(), im.category_ids.tolist())]
            self.colours = tuple(sorted(set(object_colours.values())))
            self.det_index = {im.image: j for j, im in enumerate(self.detection)}
            self.kinds = tuple(self.names.values())

    def __len__(self) -> int:
        return len(self.grounding) + len(self.detection)

    def __getitem__(self, i: int) -> GroundingItem:
        if i < len(self.grounding):
            return self._grounding_item(i)
        return self._detection_item(i - len(self.grounding))

    def _grounding_item(self, i: int) -> GroundingItem:
        s, image = self.grounding[i], self.g_images[i]
        caption = s.caption
        opt = self.attributes
        words: list = []
        if (opt.hard_negatives > 0 or opt.caption_swap > 0) and s.image in self.scene_pairs:
            rng = np.random.default_rng([int(np.random.randint(2**31)), i])
            if rng.random() < opt.caption_swap:
                return self._attribute_item(self.det_index[s.image], rng)
            if rng.random() < opt.hard_negatives:
                negs = hard_negative_pairs(rng, self.scene_pairs[s.image], self.colours,
                                           self.kinds, int(rng.integers(1, opt.max_hard_negatives + 1)),
                                           opt.confusable)
                # absent phrases after the caption: every one of their tokens is a negative
                # (word targets: except the words that hold for the box)
                budget = self.max_text_len - 2 - self._token_len(caption)
                kept = within_budget([f"{c} {k}" for c, k in negs], budget - 1, self._token_len)
                if kept:
                    if opt.word_targets:
                        words = _word_spans(kept, len(caption) + len(SEPARATOR))
                    caption = caption + SEPARATOR + SEPARATOR.join(kept)
        enc = self.tok.encode(caption, [list(p.spans) for p in s.phrases] + [[sp] for _, sp in words])
        n = enc.num_tokens
        pmap = enc.phrase_map[:, :n]
        info = self.cache.info(image)
        boxes, rows = [], []
        for p, phrase in enumerate(s.phrases):
            for box in _network_boxes(phrase.boxes, info):
                boxes.append(box)
                rows.append(pmap[p])
        if words:   # each box: also the appended words of its own colour or kind
            pairs = self._box_pairs(image, boxes)
            for g, pair in enumerate(pairs):
                hit = [len(s.phrases) + w for w, (word, _) in enumerate(words) if pair and word in pair]
                if hit:
                    rows[g] = np.maximum(rows[g], pmap[hit].max(0))
        b, pm = _targets(boxes, rows, n)
        return GroundingItem(image, _real_ids(enc), b, pm, caption, _span_tuple([p.spans for p in s.phrases]),
                             s.has_relation, side_named(s.caption) if s.has_relation else -1)

    def _token_len(self, text: str) -> int:
        if text not in self._name_tokens:
            self._name_tokens[text] = token_count(text)
        return self._name_tokens[text]

    def _detection_item(self, i: int) -> GroundingItem:
        im, image = self.detection[i], self.d_images[i]
        # the loop seeds numpy's global RNG per micro-batch chunk; + i keeps samples apart
        rng = np.random.default_rng([int(np.random.randint(2**31)), i])
        if self.attributes.attribute_prompts > 0 and rng.random() < self.attributes.attribute_prompts:
            return self._attribute_item(i, rng)
        present = [self.names[c] for c in im.category_ids.tolist()]
        sampled = sample_detection_prompt(rng, present, list(self.names.values()),
                                          max_negatives=self.max_negatives,
                                          max_length=self.max_text_len - 2, length_fn=self._token_len)
        names, prompt, spans = sampled.names, sampled.prompt, sampled.spans
        if not names:  # an image without objects and a "no negative" draw: name every class
            names = tuple(self.names.values())
            prompt, spans = build_detection_prompt(names)
        enc = self.tok.encode(prompt, [[s] for s in spans])
        n = enc.num_tokens
        pmap = enc.phrase_map[:, :n]
        where = {name: p for p, name in enumerate(names)}
        boxes, rows = [], []
        for box, name in zip(_network_boxes(im.boxes, self.cache.info(image)), present):
            if name in where:  # positives cut for length lose their boxes
                boxes.append(box)
                rows.append(pmap[where[name]])
        b, pm = _targets(boxes, rows, n)
        return GroundingItem(image, _real_ids(enc), b, pm, prompt, _span_tuple([[sp] for sp in spans]))

    def _attribute_item(self, i: int, rng: np.random.Generator) -> GroundingItem:
        """A detection image prompted with "colour kind" phrases: every (colour, kind) present
        (its boxes) + absent hard negatives sharing the kind or the colour of a present one, so
        that only the colour (or only the kind) token tells a positive from a negative."""
        im, image = self.detection[i], self.d_images[i]
        pairs = self.scene_pairs[im.image]
        if self.attributes.colour_prompts > 0 and rng.random() < self.attributes.colour_prompts:
            return self._name_item(i, rng, 0)
        if self.attributes.kind_prompts > 0 and rng.random() < self.attributes.kind_prompts:
            return self._name_item(i, rng, 1)   # (0: nothing drawn, earlier runs replay unchanged)
        present = list(dict.fromkeys(pairs))
        present = [present[j] for j in rng.permutation(len(present))]
        count = int(rng.integers(1, self.attributes.max_hard_negatives + 1)) + len(present) // 2
        negs = hard_negative_pairs(rng, present, self.colours, self.kinds, count, self.attributes.confusable)
        if self.attributes.free_negatives > 0 and rng.random() < self.attributes.free_negatives:
            negs += free_negative_pairs(rng, present, self.colours, self.kinds, int(rng.integers(1, 3)), negs)
        if self.attributes.decoy_kinds > 0 and rng.random() < self.attributes.decoy_kinds:
            decoys = decoy_kind_pairs(rng, present, self.colours, self.kinds)   # first: the budget keeps them
            negs = decoys + [p for p in negs if p not in decoys]
        if self.attributes.omit_present > 0:  # after the negatives: they share the omitted pairs' words
            present = [p for p in present if rng.random() >= self.attributes.omit_present]
        if self.attributes.absent_only > 0 and rng.random() < self.attributes.absent_only:
            present = []   # the look-alikes alone (0: nothing drawn, earlier runs replay unchanged)
        budget = self.max_text_len - 2
        pos = within_budget([f"{c} {k}" for c, k in present], budget, self._token_len)
        budget -= sum(self._token_len(n + SEPARATOR) for n in pos)
        neg = within_budget([f"{c} {k}" for c, k in negs], budget - 1, self._token_len)
        names = pos + neg
        if not names:  # an image without objects: a few random pairs, all negative
            names = [f"{self.colours[rng.integers(len(self.colours))]} {k}" for k in self.kinds[:3]]
        names = [names[j] for j in rng.permutation(len(names))]
        prompt, spans = build_detection_prompt(names)
        if self.attributes.word_targets:
            return self._word_item(i, names, prompt)
        enc = self.tok.encode(prompt, [[sp] for sp in spans])
        n = enc.num_tokens
        pmap = enc.phrase_map[:, :n]
        where = {name: p for p, name in enumerate(names)}
        boxes, rows, unnamed = [], [], []
        for box, (c, k) in zip(_network_boxes(im.boxes, self.cache.info(image)), pairs):
            if f"{c} {k}" in where:
                boxes.append(box)
                rows.append(pmap[where[f"{c} {k}"]])
            elif self.attributes.keep_omitted:
                unnamed.append(box)
        b, pm = _targets(boxes, rows, n, unnamed)
        return GroundingItem(image, _real_ids(enc), b, pm, prompt, _span_tuple([[sp] for sp in spans]),
                             twin=self._twin(rng, names, pmap, {f"{c} {k}" for c, k in pairs}))

    def _twin(self, rng: np.random.Generator, names: Sequence[str], pmap: np.ndarray,
              present: set[str]) -> PromptTwin | None:
        """With probability ``twin_prompts`` a ``PromptTwin`` of the prompt of ``names`` (whose
        phrases' tokens are ``pmap`` [P, n]; ``present``: the names that hold in the image): each
        name kept with probability 1/2, at least one, shuffled. Draws nothing from ``rng`` when
        the option is off."""
        if self.attributes.twin_prompts <= 0 or rng.random() >= self.attributes.twin_prompts:
            return None
        keep = np.flatnonzero(rng.random(len(names)) < 0.5)
        if not len(keep):
            keep = np.array([int(rng.integers(len(names)))])
        keep = keep[rng.permutation(len(keep))]
        prompt, spans = build_detection_prompt([names[j] for j in keep])
        enc = self.tok.encode(prompt, [[sp] for sp in spans])
        m = enc.num_tokens
        return PromptTwin(_real_ids(enc), np.asarray(pmap[keep], np.float32),
                          np.asarray(enc.phrase_map[:, :m], np.float32),
                          np.array([names[j] not in present for j in keep], bool))

    def _word_item(self, i: int, names: list[str], prompt: str) -> GroundingItem:
        """``_attribute_item``'s prompt with word targets (``AttributeOptions.word_targets``): each
        box is positive for the colour word of every phrase of its colour and the kind word of
        every phrase of its kind; a box that no word names is background (or an unnamed object,
        ``keep_omitted``)."""
        im, image = self.detection[i], self.d_images[i]
        words = _word_spans(names, 0)
        enc = self.tok.encode(prompt, [[sp] for _, sp in words])
        n = enc.num_tokens
        wmap = enc.phrase_map[:, :n]
        boxes, rows, unnamed = [], [], []
        for box, (c, k) in zip(_network_boxes(im.boxes, self.cache.info(image)), self.scene_pairs[im.image]):
            hit = [w for w, (word, _) in enumerate(words) if word in (c, k)]
            if hit:
                boxes.append(box)
                rows.append(wmap[hit].max(0))
            elif self.attributes.keep_omitted:
                unnamed.append(box)
        b, pm = _targets(boxes, rows, n, unnamed)
        return GroundingItem(image, _real_ids(enc), b, pm, prompt, _span_tuple([[sp] for _, sp in words]))

    def _name_item(self, i: int, rng: np.random.Generator, part: int) -> GroundingItem:
        """A detection image prompted with every colour name (``part`` 0) or every kind name (1),
        shuffled; each box names its own."""
        im, image = self.detection[i], self.d_images[i]
        vocabulary = (self.colours, self.kinds)[part]
        names = [vocabulary[j] for j in rng.permutation(len(vocabulary))]
        prompt, spans = build_detection_prompt(names)
        enc = self.tok.encode(prompt, [[sp] for sp in spans])
        n = enc.num_tokens
        pmap = enc.phrase_map[:, :n]
        where = {name: p for p, name in enumerate(names)}
        rows = [pmap[where[pair[part]]] for pair in self.scene_pairs[im.image]]
        b, pm = _targets(list(_network_boxes(im.boxes, self.cache.info(image))), rows, n)
        return GroundingItem(image, _real_ids(enc), b, pm, prompt, _span_tuple([[sp] for sp in spans]),
                             twin=self._twin(rng, names, pmap, {pair[part] for pair in self.scene_pairs[im.image]}))

    def collate(self, samples: list[GroundingItem]) -> dict:
        """-> ``image`` [B, 3, S, S], ``input_ids`` / ``attention_mask`` [B, T], and per image
        ``boxes`` [G_i, 4] float32 network pixels and ``positive_map`` [G_i, T] float32;
        ``has_relation`` bool [B] and ``side`` int64 [B] (``SIDES`` index, -1 none); ``twin``
        (``_collate_twins``) when some sample has a ``PromptTwin``."""
        ids, mask = pad_ids([s.input_ids for s in samples], self.pad_id)
        width = ids.shape[1]
        maps = [_pad_columns(s.positive_map, width) for s in samples]
        batch = {"image": self.cache.batch([s.image for s in samples]), "input_ids": ids,
                 "attention_mask": mask, "boxes": [torch.from_numpy(s.boxes) for s in samples],
                 "positive_map": maps, "has_relation": torch.tensor([s.has_relation for s in samples]),
                 "side": torch.tensor([s.side for s in samples])}
        twins = [(j, s.twin) for j, s in enumerate(samples) if s.twin is not None]
        if twins:
            batch["twin"] = self._collate_twins(twins, width)
        if self.attributes.active:
            pairs = [self._box_pairs(s.image, s.boxes) for s in samples]
            batch["colour_ids"] = [torch.from_numpy(self._labels(p, 0, self.colours)) for p in pairs]
            batch["kind_ids"] = [torch.from_numpy(self._labels(p, 1, self.kinds)) for p in pairs]
        return batch

    def _collate_twins(self, twins: list[tuple[int, PromptTwin]], width: int) -> dict:
        """``PromptTwin``s of a batch whose padded text length is ``width`` -> ``index`` int64 [B2]
        (their samples), ``input_ids`` / ``attention_mask`` [B2, T2], and per twin ``phrases``
        [K, width] and ``twin_phrases`` [K, T2] float32 and ``absent`` bool [K]."""
        ids, mask = pad_ids([t.input_ids for _, t in twins], self.pad_id)
        return {"index": torch.tensor([j for j, _ in twins], dtype=torch.long), "input_ids": ids,
                "attention_mask": mask, "phrases": [_pad_columns(t.phrases, width) for _, t in twins],
                "twin_phrases": [_pad_columns(t.twin_phrases, ids.shape[1]) for _, t in twins],
                "absent": [torch.from_numpy(t.absent) for _, t in twins]}

    def _box_pairs(self, image: int, boxes: Sequence[np.ndarray]) -> list[tuple[str, str] | None]:
        """The (colour, kind) of each network-pixel box of cached image ``image`` (its detection
        annotation: the same box), None where none matches."""
        j = self.det_index.get(self.cache.paths[image])
        if j is None:
            return [None] * len(boxes)
        im = self.detection[j]
        det = _network_boxes(im.boxes, self.cache.info(image))
        pairs = self.scene_pairs[im.image]
        out = []
        for box in boxes:
            diff = np.abs(det - box).max(1) if len(det) else np.zeros(0)
            out.append(pairs[int(np.argmin(diff))] if len(diff) and diff.min() < 1e-2 else None)
        return out

    def box_colours(self, item: GroundingItem) -> np.ndarray:
        """int64 [G]: index into ``self.colours`` of each of ``item``'s boxes (the detection
        annotation of its image with the same box), -1 where none matches (attributes off)."""
        pairs = self._box_pairs(item.image, item.boxes) if self.attributes.active else [None] * len(item.boxes)
        return self._labels(pairs, 0, self.colours)

    def box_kinds(self, item: GroundingItem) -> np.ndarray:
        """int64 [G]: index into ``self.kinds`` of each of ``item``'s boxes, as ``box_colours``."""
        pairs = self._box_pairs(item.image, item.boxes) if self.attributes.active else [None] * len(item.boxes)
        return self._labels(pairs, 1, self.kinds)

    @staticmethod
    def _labels(pairs: Sequence[tuple[str, str] | None], part: int, names: Sequence[str]) -> np.ndarray:
        """int64 [G]: index into ``names`` of part ``part`` (0 colour, 1 kind) of each pair, -1 for None."""
        return np.array([-1 if pair is None else names.index(pair[part]) for pair in pairs], np.int64)


# ----------------------------------------------------------------------------- loading


def _data_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataFormatError(f"{path}: no such data folder")
    return path


@dataclass(frozen=True)
class Stage2Options:
    grounding: bool = True       # use DATA/grounding.json (captions + referring expressions)
    detection: bool = True       # use DATA/detection.json (class-name prompts with negatives)
    max_negatives: int = 85      # RANDOM_SAMPLE_NEG of the official O365 config
    relation_repeat: int = 1     # each grounding entry with has_relation this many times per epoch
    attributes: AttributeOptions = AttributeOptions()  # colour-kind prompts, hard negatives


def load_stage1(data_dir: str | Path, cfg: ModelConfig,
                progress: Progress | None = None) -> PairDataset:
    """``DATA/pairs.jsonl`` -> a ``PairDataset`` with its images decoded."""
    root = _data_dir(data_dir)
    pairs = load_pairs(root / PAIRS_FILE)
    cache = build_cache(cfg)
    data = PairDataset(pairs, cache, build_tokenizer(cfg))
    cache.load(progress)
    return data


def load_stage2(data_dir: str | Path, cfg: ModelConfig, options: Stage2Options = Stage2Options(),
                progress: Progress | None = None) -> GroundingTrainDataset:
    """``DATA/grounding.json`` + ``DATA/detection.json`` -> a ``GroundingTrainDataset``."""
    root = _data_dir(data_dir)
    if not (options.grounding or options.detection):
        raise ValueError("stage-2 data: both grounding and detection are switched off")
    grounding = load_grounding(root / GROUNDING_FILE) if options.grounding else None
    detection = load_detection(root / DETECTION_FILE) if options.detection else None
    cache = build_cache(cfg)
    colours = None
    if options.attributes.active:
        if detection is None:
            raise ValueError("attribute prompts / hard negatives need the detection data "
                             "(each image's objects and colours): drop --no-detection")
        colours = load_object_colours(root / DETECTION_FILE)
    data = GroundingTrainDataset(grounding, detection, cache, build_tokenizer(cfg),
                                 cfg.max_text_len, options.max_negatives, options.attributes,
                                 colours, options.relation_repeat)
    cache.load(progress)
    return data
