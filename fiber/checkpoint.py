"""Checkpoint io (``model.safetensors`` + ``config.json``) and the official FIBER converter.

A checkpoint is a folder written atomically::

    model.safetensors   the full model state_dict (keys as in the composite models, e.g. backbone.*)
    config.json         {"format": "fiber-edge-checkpoint", "format_version": 1,
                         "model": ModelConfig.to_dict(), "task": ..., <extra meta>}
    tokenizer.json      (optional) the tokenizer the model was trained with; export and the runtime
                        use it instead of the default WordPiece asset

``convert_official`` maps an official checkpoint onto our keys; the layout decides the task:

- coarse (``vit_model.*``, ``text_transformer.*``, optionally under Lightning's ``state_dict``):
  the backbone (``backbone.image.*`` / ``backbone.text.*``); task heads are dropped and reported.
- fine (``fusion_backbone.*`` + ``rpn.*`` under ``model`` or ``model_ema``, optional ``module.``):
  the whole detector: backbone, FPN (``fpn.*``) and DyHead / token head (``head.*``). Fusion v2 or
  v3 is read from the keys (v3 has ``norm_i2t_i``). A fine release needs its tokenizer
  (``--tokenizer DIR``: roberta-base's ``vocab.json`` + ``merges.txt``, or a ``tokenizer.json``).

CLI::

    python -m fiber.checkpoint convert-official CKPT --config fiber-b --out DIR [--tokenizer DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.atomic import atomic_dir
from fiber.config import ModelConfig, config_for_task, get_config

FORMAT = "fiber-edge-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
BACKBONE_PREFIX = "backbone."


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not fit the model / config."""


# -- our format ---------------------------------------------------------------------------
def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """One safetensors file of CPU copies (cloned: safetensors refuses tied, storage-sharing tensors)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def write_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                     overwrite: bool = False, extra_files: Callable[[Path], None] | None = None) -> Path:
    """The one checkpoint writer: ``path/model.safetensors`` + ``path/config.json`` (``{"format",
    "format_version", **meta}``) and whatever ``extra_files(folder)`` adds, atomically (all or nothing).

    Used by ``save_checkpoint`` (a model config) and by train.loop (step checkpoints with trainer
    state, ``RUN/final``). CheckpointError when ``meta`` sets ``format`` / ``format_version`` or is
    not JSON-serialisable (NaN included).
    """
    meta = dict(meta)
    clash = sorted({"format", "format_version"} & set(meta))
    if clash:
        raise CheckpointError(f"checkpoint meta may not set reserved key '{clash[0]}'")
    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_tensors(tmp / WEIGHTS_FILE, tensors)
        try:
            text = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **meta}, indent=2,
                              allow_nan=False)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path}: meta is not JSON-serialisable ({e})") from None
        (tmp / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")
        if extra_files is not None:
            extra_files(tmp)
    return path


def save_checkpoint(path: str | Path, model_state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig,
                    extra_meta: Mapping[str, Any] | None = None, overwrite: bool = False,
                    tokenizer: Any = None) -> Path:
    """A model checkpoint (``write_checkpoint`` with ``"model": cfg.to_dict()``).

    extra_meta: JSON-able top-level entries for config.json (e.g. ``{"task": "fine"}``); it may not
    override ``format``, ``format_version`` or ``model``. tokenizer: a ``tokenizers.Tokenizer``
    stored as ``tokenizer.json`` (the model's own; absent = the default WordPiece asset).
    """
    extra = dict(extra_meta or {})
    clash = sorted({"format", "format_version", "model"} & set(extra))
    if clash:
        raise CheckpointError(f"extra_meta may not set reserved key '{clash[0]}'")
    save_tokenizer = None if tokenizer is None else (lambda folder: tokenizer.save(str(folder / TOKENIZER_FILE)))
    return write_checkpoint(path, model_state_dict, {"model": cfg.to_dict(), **extra}, overwrite, save_tokenizer)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A run folder -> ``RUN/final``; a checkpoint folder (``model.safetensors`` +
    ``config.json``, e.g. ``RUN/checkpoints/step-*``) -> itself; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file():
        return path
    if (path / "final" / WEIGHTS_FILE).is_file():
        return path / "final"
    hint = " (the run has checkpoints but no final/: pass RUN/checkpoints/step-N)" \
        if (path / "checkpoints").is_dir() else ""
    raise CheckpointError(f"checkpoint {path}: neither a checkpoint folder ({WEIGHTS_FILE} + "
                          f"{CONFIG_FILE}) nor a finished run (final/){hint}")


def load_checkpoint(path: str | Path, expect_name: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    """Read a checkpoint folder (or a finished run folder -> its ``final/``) -> (state_dict, cfg, meta).

    meta is config.json without its ``model`` entry. ``expect_name``: refuse a checkpoint whose
    config has another name. Raises CheckpointError naming the folder/file and the problem.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if not (path / WEIGHTS_FILE).is_file() and (path / "final" / WEIGHTS_FILE).is_file():
        path = path / "final"
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path}: missing {name}")
    meta = _read_config_json(path / CONFIG_FILE)
    try:
        cfg = ModelConfig.from_dict(meta.pop("model"))
    except ValueError as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from None
    if expect_name is not None and cfg.name != expect_name:
        raise CheckpointError(f"checkpoint {path} holds config '{cfg.name}', expected '{expect_name}'")
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: not a readable safetensors file ({e})") from None
    return state, cfg, meta


def _read_config_json(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a fiber-edge checkpoint (format must be '{FORMAT}')")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {version!r} is not supported "
                              f"(this code reads up to {FORMAT_VERSION})")
    if "model" not in meta:
        raise CheckpointError(f"{file}: no 'model' config entry")
    return meta


TRAINING_ONLY_PREFIXES = ("kd_proj.", "colour_aux.", "kind_aux.")


def load_model_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state_dict") -> None:
    """Strict ``load_state_dict`` with one clear message for unknown keys, missing keys or shapes.

    Training-only tensors (``TRAINING_ONLY_PREFIXES``: the feature projections a distillation run
    and the colour and kind classifiers of ``train.fine --colour-aux / --kind-aux`` checkpoint for
    resume) are skipped
    when ``model`` has no such module, so a mid-run checkpoint evaluates and exports as the plain
    detector it holds."""
    own = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items()
                  if k in own or not k.startswith(TRAINING_ONLY_PREFIXES)}
    unknown = sorted(set(state_dict) - set(own))
    missing = sorted(set(own) - set(state_dict))
    wrong = [(k, tuple(own[k].shape), tuple(state_dict[k].shape)) for k in sorted(set(own) & set(state_dict))
             if tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if unknown:
        raise CheckpointError(f"{source}: unknown key{_s(unknown)} {_few(unknown)}")
    if missing:
        raise CheckpointError(f"{source}: missing key{_s(missing)} {_few(missing)}")
    if wrong:
        k, want, got = wrong[0]
        raise CheckpointError(f"{source}: '{k}' has shape {list(got)}, expected {list(want)}"
                              + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    model.load_state_dict(state_dict)


def load_fine_model(path: str | Path, purpose: str, device: torch.device | str = "cpu",
                    expect_name: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A fine (grounding) checkpoint folder or run folder (-> ``RUN/final``) -> (``FiberForGrounding``
    in eval mode on ``device``, meta with ``"path"``: the folder read).

    The one rule for what may be evaluated, quantised, exported or distilled from: config.json says
    ``"task": "fine"`` (train.fine, compress.distill, QAT and recovered checkpoints do). ``purpose``
    names the caller in the error. CheckpointError for a missing or malformed checkpoint, another
    task or config name, or weights that do not fit the config.
    """
    from fiber.models import FiberForGrounding

    folder = resolve_checkpoint_dir(path)
    state, cfg, meta = load_checkpoint(folder, expect_name=expect_name)
    task = meta.get("task")
    if task != "fine":
        raise CheckpointError(f"checkpoint {folder} is a {task!r} checkpoint; {purpose} needs a fine-tuned "
                              "grounding checkpoint (task 'fine', written by train.fine or compress.distill)")
    model = FiberForGrounding(cfg)
    load_model_state(model, state, source=f"checkpoint {folder} (config '{cfg.name}')")
    return model.to(device).eval(), {**meta, "path": str(folder)}


def _s(items: list) -> str:
    return "s" if len(items) > 1 else ""


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


# -- official checkpoints -----------------------------------------------------------------
LAYOUT_PREFIXES = {
    "coarse": {"vit_model.": "backbone.image.", "text_transformer.": "backbone.text."},
    "fine": {"fusion_backbone.backbone.body.": "backbone.image.",
             "fusion_backbone.language_backbone.body.model.": "backbone.text.",
             "fusion_backbone.backbone.fpn.": "fpn.",
             "rpn.head.": "head."},
}
BUFFER_SUFFIXES = ("attn_mask", "relative_position_index", "position_ids")
BUFFER_PREFIXES = ("rpn.anchor_generator.",)  # cell anchors: rebuilt from the config
QUEUE_KEYS = {"image_queue", "text_queue", "image_input_queue", "text_input_queue",
              "text_input_mask_queue", "queue_ptr", "queue_total"}
# Task heads and projections of the official models (fiber.md §1.4, §6): dropped, reported.
HEAD_PREFIXES = ("cross_modal_", "itm_score.", "rank_output.", "mlm_score.", "vqa_classifier.",
                 "nlvr2_classifier.", "snli_classifier.", "text_transformer.pooler.",
                 "vit_model.head.",  # Swin's ImageNet classifier, if the file kept it
                 "roi_heads.")
HEAD_KEYS = {"temp", "logit_scale"}
# The fine head's class logits: frozen, multiplied by 0 in the loss, never scored. A model without
# them drops them (reported); one with them (key compatibility) loads them.
FROZEN_FINE_KEYS = ("head.cls_logits.",)
# Swin stage norms that the coarse layout does not have (it has only the final norm).
COARSE_FRESH = ("backbone.image.norm1.", "backbone.image.norm2.")
_UNUSED_ALPHA = re.compile(r"^backbone\.text\.encoder\.layer\.\d+\.alpha_t2i$")
_V3_KEY = ".attn.norm_i2t_i."


@dataclass
class ConversionReport:
    """What ``convert_official`` did; ``summary()`` is the CLI's printout."""
    source: str
    layout: str
    config: str
    fusion: str = ""                                              # fine: "v2" | "v3"
    weights: str = ""                                             # fine: "model" | "model_ema"
    mapped: int = 0
    missing_initialised: list[str] = field(default_factory=list)  # absent from the layout, fresh init
    resized: list[str] = field(default_factory=list)              # relative-position tables, bicubic
    dropped_buffers: list[str] = field(default_factory=list)
    dropped_heads: list[str] = field(default_factory=list)
    dropped_unused: list[str] = field(default_factory=list)       # e.g. alpha_t2i of plain layers
    unexpected: list[str] = field(default_factory=list)           # unknown keys outside the backbone

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        what = "detector (backbone + FPN + head)" if self.layout == "fine" else "backbone/fusion"
        extra = f", fusion {self.fusion}, weights '{self.weights}'" if self.layout == "fine" else ""
        lines = [f"{self.source}: official {self.layout} layout{extra} -> config '{self.config}'",
                 f"  mapped {what} tensors: {self.mapped}"]
        for title, keys in (("initialised (not in this layout)", self.missing_initialised),
                            ("resized (bicubic, new window)", self.resized),
                            ("dropped buffers", self.dropped_buffers),
                            ("dropped task heads", self.dropped_heads),
                            ("dropped unused", self.dropped_unused),
                            ("unexpected (dropped)", self.unexpected)):
            if keys:
                lines.append(f"  {title}: {len(keys)}: {_few(keys, 8)}")
        return "\n".join(lines)


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """Load an official file: .safetensors directly, anything else with torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / zip / safetensors errors all mean "not a checkpoint"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: cannot read as a checkpoint ({type(e).__name__}: {first})") from None


def unwrap_official(obj: Any, source: str = "checkpoint", ema: bool = False
                    ) -> tuple[dict[str, torch.Tensor], str]:
    """The tensor dict inside a Lightning (``state_dict``) or maskrcnn (``model`` / ``model_ema``)
    file, with any ``module.`` prefix stripped, and which entry it came from ("" for a bare dict).

    ema: take ``model_ema`` (an error when the file has none); a file holding only ``model_ema``
    gives it without asking."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    wrappers = [w for w in ("state_dict", "model", "model_ema") if isinstance(obj.get(w), Mapping)]
    if ema and "model_ema" not in wrappers:
        raise CheckpointError(f"{source}: --ema given but the file has no 'model_ema' entry")
    entry = "model_ema" if ema or wrappers == ["model_ema"] else (wrappers[0] if wrappers else "")
    if entry:
        obj = obj[entry]
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry '{key}' is a {type(value).__name__}, not a tensor")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out, entry


def detect_layout(keys: list[str], source: str = "checkpoint") -> str:
    """'coarse' or 'fine' from the key prefixes."""
    for layout, prefixes in LAYOUT_PREFIXES.items():
        if any(k.startswith(tuple(prefixes)) for k in keys):
            return layout
    raise CheckpointError(f"{source}: no official FIBER backbone keys (expected vit_model.* / "
                          f"text_transformer.* or fusion_backbone.*); found {_few(sorted(keys), 3)}")


def detect_fusion_version(keys: list[str]) -> str:
    """Fine fusion "v3" (an LN on the i2t query, ``norm_i2t_i``) or "v2" (none; the released
    pre-training, COCO and LVIS models)."""
    return "v3" if any(_V3_KEY in k for k in keys) else "v2"


def fine_config(cfg: ModelConfig, version: str, source: str = "checkpoint") -> ModelConfig:
    """The config a fine release of ``version`` converts into.

    A model family (e.g. ``fiber-b``) names its fine variant (``config_for_task``) and takes the
    file's fusion version; a config that is already the fine detector must have that version."""
    variant = config_for_task(cfg, "fine")
    prenorm = version == "v3"
    if variant is cfg:
        if cfg.fusion.i2t_prenorm != prenorm:
            have = "v3" if cfg.fusion.i2t_prenorm else "v2"
            raise CheckpointError(f"{source}: fusion {version} checkpoint, but config '{cfg.name}' is "
                                  f"fusion {have} (i2t_prenorm={cfg.fusion.i2t_prenorm}); pick the "
                                  f"config of the checkpoint's fusion version")
        return cfg
    return variant.replace(fusion=dataclasses.replace(variant.fusion, i2t_prenorm=prenorm))


def target_shapes(cfg: ModelConfig, task: str = "coarse") -> dict[str, tuple[int, ...]]:
    """Our key -> shape for ``cfg``: the backbone (coarse) or the whole detector (fine), built on
    the meta device (no memory)."""
    if task == "fine":
        from fiber.models import build_model

        with torch.device("meta"):
            model = build_model(cfg, "fine")
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    from fiber.backbone import build_backbone

    with torch.device("meta"):
        model = build_backbone(cfg)
    return {BACKBONE_PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}


def resize_relative_position_table(table: torch.Tensor, rows: int) -> torch.Tensor:
    """[(2w-1)^2, heads] -> [rows, heads] by bicubic interpolation over the (2w-1)^2 grid (the
    official ``swin_adapt_position_encoding``)."""
    before, after = round(table.shape[0] ** 0.5), round(rows ** 0.5)
    if before * before != table.shape[0] or after * after != rows:
        raise CheckpointError(f"relative_position_bias_table with {table.shape[0]} rows cannot be "
                              f"resized to {rows} rows (not square grids)")
    grid = table.float().t().reshape(1, -1, before, before)          # [1, heads, L, L]
    grid = F.interpolate(grid, size=(after, after), mode="bicubic", align_corners=False)
    return grid[0].permute(1, 2, 0).reshape(rows, -1)


def convert_official(state_dict_or_path: Any, cfg: ModelConfig | str, ema: bool = False
                     ) -> tuple[dict[str, torch.Tensor], ConversionReport, ModelConfig]:
    """Map an official FIBER state dict (or file) onto our keys -> (state, report, config).

    Coarse files give ``backbone.*`` of ``cfg``; every backbone and fusion tensor must be provided
    (except the Swin stage norms ``norm1``/``norm2``, absent from the coarse layout: LayerNorm init,
    reported). Fine files give the whole detector of ``fine_config(cfg, version)`` (the returned
    config): every backbone, FPN and head tensor must be provided and none may be left over (the
    frozen ``cls_logits`` are dropped and reported when the model has none). Relative-position
    tables of another window are resized bicubically; buffers, task heads and unused gates are
    dropped and reported. Raises CheckpointError naming key and shapes. Floating tensors come back
    as float32 (on the source's device).
    """
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    source = "state_dict"
    if isinstance(state_dict_or_path, (str, Path)):
        source = str(state_dict_or_path)
        state_dict_or_path = read_official(state_dict_or_path)
    official, entry = unwrap_official(state_dict_or_path, source, ema)
    layout = detect_layout(list(official), source)
    report = ConversionReport(source=source, layout=layout, config=cfg.name)
    if layout == "fine":
        report.fusion = detect_fusion_version(list(official))
        report.weights = entry or "model"
        cfg = fine_config(cfg, report.fusion, source)
        report.config = cfg.name
    want = target_shapes(cfg, layout)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(official):
        ours = _map_key(key, layout, report)
        if ours is None:
            continue
        if ours not in want:
            if _UNUSED_ALPHA.match(ours):
                report.dropped_unused.append(key)
                continue
            if ours.startswith(FROZEN_FINE_KEYS):
                report.dropped_heads.append(key)
                continue
            what = "backbone" if ours.startswith(BACKBONE_PREFIX) else "head/FPN"
            raise CheckpointError(f"{source}: {what} tensor '{key}' has no place in config "
                                  f"'{cfg.name}' (maps to '{ours}'){_hint(ours, cfg)}")
        out[ours] = _fit_shape(official[key], want[ours], key, ours, source, report)
    _fill_missing(out, want, layout, cfg, source, report)
    report.mapped = len(out) - len(report.missing_initialised)
    return out, report, cfg


def _map_key(key: str, layout: str, report: ConversionReport) -> str | None:
    """Our key for an official key, or None when the key is dropped (recorded in the report)."""
    if key.rsplit(".", 1)[-1] in BUFFER_SUFFIXES or key in QUEUE_KEYS or key.startswith(BUFFER_PREFIXES):
        report.dropped_buffers.append(key)
        return None
    if key.startswith(HEAD_PREFIXES) or key in HEAD_KEYS:
        report.dropped_heads.append(key)
        return None
    if layout == "coarse" and key.startswith("vit_model.norm."):
        return "backbone.image.norm3." + key[len("vit_model.norm."):]
    for prefix, ours in LAYOUT_PREFIXES[layout].items():
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    report.unexpected.append(key)
    return None


def _fit_shape(value: torch.Tensor, shape: tuple[int, ...], key: str, ours: str, source: str,
               report: ConversionReport) -> torch.Tensor:
    value = value.float() if value.is_floating_point() else value
    if tuple(value.shape) == shape:
        return value
    if ours.endswith("relative_position_bias_table") and value.ndim == 2 and value.shape[1] == shape[1]:
        report.resized.append(f"{key} {list(value.shape)}->{list(shape)}")
        return resize_relative_position_table(value, shape[0])
    raise CheckpointError(f"{source}: '{key}' has shape {list(value.shape)}, expected {list(shape)} "
                          f"for '{ours}'")


def _fill_missing(out: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], layout: str,
                  cfg: ModelConfig, source: str, report: ConversionReport) -> None:
    missing = sorted(set(want) - set(out))
    fresh = [k for k in missing if layout == "coarse" and k.startswith(COARSE_FRESH)]
    hard = sorted(set(missing) - set(fresh))
    if hard:
        what = "backbone/fusion" if all(k.startswith(BACKBONE_PREFIX) for k in hard) else "detector"
        raise CheckpointError(f"{source}: missing {what} tensor{_s(hard)} for config "
                              f"'{cfg.name}': {_few(hard)}{_hint(hard[0], cfg)}")
    for k in fresh:  # LayerNorm defaults
        out[k] = torch.ones(want[k]) if k.endswith(".weight") else torch.zeros(want[k])
    report.missing_initialised.extend(fresh)


def _hint(key: str, cfg: ModelConfig) -> str:
    if "norm_i2t_i" in key:
        return (f"; config has i2t_prenorm={cfg.fusion.i2t_prenorm} (coarse and fine v3 checkpoints "
                "have norm_i2t_i, fine v2 checkpoints do not)")
    return ""


# -- tokenizer ----------------------------------------------------------------------------
def tokenizer_file(checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint's own ``tokenizer.json``, or None (the model uses the default asset)."""
    path = resolve_checkpoint_dir(checkpoint_dir) / TOKENIZER_FILE
    return path if path.is_file() else None


def checkpoint_tokenizer(folder: str | Path | None, cfg: ModelConfig, layout: str, source: str):
    """The tokenizer to store with a converted checkpoint (a ``tokenizers.Tokenizer``) or None.

    A fine release of a RoBERTa-style config needs one (official FIBER tokenises with roberta-base,
    which cannot be downloaded here); its vocabulary must fit the checkpoint's embedding table."""
    from fiber.tokenizer_files import TokenizerFileError, roberta_tokenizer, tokenizer_vocab_size

    if folder is None:
        if layout == "fine" and cfg.text.position_style == "roberta":
            raise CheckpointError(f"{source}: a fine FIBER release tokenises with roberta-base's "
                                  f"byte-level BPE: pass --tokenizer DIR holding its vocab.json + "
                                  f"merges.txt (or a tokenizer.json); it cannot be downloaded here")
        return None
    try:
        tok = roberta_tokenizer(folder)
    except TokenizerFileError as e:
        raise CheckpointError(str(e)) from None
    rows = tokenizer_vocab_size(tok)
    if rows > cfg.text.vocab_size:
        raise CheckpointError(f"tokenizer {folder}: its vocabulary has {rows} ids but the checkpoint's "
                              f"word-embedding table has {cfg.text.vocab_size} rows (wrong tokenizer?)")
    return tok


# -- CLI ----------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fiber.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert-official", help="convert an official FIBER .ckpt/.pt/.pth/.safetensors",
                          description="Convert an official FIBER checkpoint (coarse or fine; the file's "
                                      "layout decides) into a fiber-edge checkpoint folder.")
    conv.add_argument("ckpt", type=Path, help="official checkpoint file")
    conv.add_argument("--config", required=True,
                      help="registered config name, e.g. fiber-b (coarse and fine releases alike)")
    conv.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    conv.add_argument("--tokenizer", type=Path, default=None,
                      help="folder with the model's tokenizer: vocab.json + merges.txt (roberta-base) "
                           "or a tokenizer.json; stored with the checkpoint (needed for fine releases)")
    conv.add_argument("--ema", action=argparse.BooleanOptionalAction, default=False,
                      help="convert the file's 'model_ema' weights instead of 'model'")
    conv.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                      help="replace an existing output folder")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        cfg = get_config(args.config)
        if args.out.exists() and not args.overwrite:
            raise FileExistsError(f"{args.out} already exists (pass --overwrite to replace it)")
        state, report, cfg = convert_official(args.ckpt, cfg, ema=args.ema)
        tok = checkpoint_tokenizer(args.tokenizer, cfg, report.layout, str(args.ckpt))
        meta = {"task": report.layout, "source": str(args.ckpt), "conversion": report.to_dict()}
        save_checkpoint(args.out, state, cfg, meta, overwrite=args.overwrite, tokenizer=tok)
    except (CheckpointError, ValueError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
