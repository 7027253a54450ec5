"""What a model config decides of its package (docs/architecture.md): manifest sections, text buckets.

- ``package_sections(cfg, buckets)``: the ``input`` / ``text`` / ``postprocess`` manifest sections.
- ``input_spec(cfg)``: the ``input`` section as a typed ``InputSpec`` (what the runtime's
  Preprocessor.from_spec prepares), for the code that pre-processes like the package without one.
- ``resolve_buckets(cfg, buckets)``: the text buckets of a package (given, or the defaults that fit).
- ``TOKENIZER_SRC``: the default WordPiece tokenizer asset a package of a small config ships.

Torch-free; here, next to the model configs, so that the exporter (compress.export) and the torch
model behind the runtime (fiber.torch_engines, which train.evaluate uses) write the same sections.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from common import package as pkg
from fiber.config import ModelConfig

TOKENIZER_SRC = Path(__file__).resolve().parent / "assets" / pkg.TOKENIZER


def package_sections(cfg: ModelConfig, buckets: Sequence[int], level_sizes: Sequence[int] = (),
                     lowercase: bool = True) -> dict[str, Any]:
    """The manifest's ``input``, ``text`` and ``postprocess`` sections for ``cfg`` (docs/architecture.md).

    An official-input config (``cfg.input.style == "official"``) gets the official input on its
    canvas and the official per-level post-processing with the head's limits; ``level_sizes``
    (anchors per level at the canvas) is required then. ``lowercase``: the default WordPiece
    tokenizer lowercases; a checkpoint's own (RoBERTa byte-level BPE) tokenizer does not."""
    text = pkg.TextSpec(tuple(int(b) for b in buckets), cfg.text.hidden_size, cfg.text.pad_token_id,
                        lowercase).to_json()
    if cfg.input.style == "official":
        if not level_sizes:
            raise ValueError(f"config '{cfg.name}': official post-processing needs the anchors per level")
        head = cfg.head
        post = pkg.PostprocessSpec(style=pkg.POST_OFFICIAL, threshold=head.inference_th, nms_iou=head.nms_th,
                                   pre_nms_top_k=head.pre_nms_top_n, max_detections=head.detections_per_img,
                                   level_sizes=tuple(int(n) for n in level_sizes))
        return {"input": input_spec(cfg).to_json(), "text": text, "postprocess": post.to_json()}
    post = pkg.PostprocessSpec(phrase_score=cfg.head.phrase_score)
    return {"input": input_spec(cfg).to_json(), "text": text, "postprocess": post.to_json()}


def input_spec(cfg: ModelConfig) -> pkg.InputSpec:
    """The package input of ``cfg``: the official input on its canvas (``cfg.input.style ==
    "official"``), else the letterbox on ``cfg.input_hw`` with the config's mean and std."""
    if cfg.input.style == "official":
        return pkg.InputSpec.official(cfg.input.canvas, cfg.input.min_size, cfg.input.max_size)
    return pkg.InputSpec(cfg.input_hw, mean=tuple(cfg.image_mean), std=tuple(cfg.image_std))


def resolve_buckets(cfg: ModelConfig, buckets: Sequence[int] | None) -> tuple[int, ...]:
    """The text buckets of a package for ``cfg``: ``common.package.text_buckets`` (the one rule)."""
    return pkg.text_buckets(cfg.max_text_len, buckets, cfg.name)
