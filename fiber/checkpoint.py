"""Checkpoint io (``model.safetensors`` + ``config.json``) and the official FIBER converter.

A checkpoint is a folder written atomically::

    model.safetensors   the full model state_dict (keys as in the composite models, e.g. backbone.*)
    config.json         {"format": "fiber-edge-checkpoint", "format_version": 1,
                         "model": ModelConfig.to_dict(), "task": ..., <extra meta>}

``convert_official`` maps an official coarse (``vit_model.*``, ``text_transformer.*``, optionally
under Lightning's ``state_dict``) or fine-grained (``fusion_backbone.backbone.body.*``,
``fusion_backbone.language_backbone.body.model.*``, under ``model``, optional ``module.``) state
dict onto ``backbone.image.*`` / ``backbone.text.*``.

CLI::

    python -m fiber.checkpoint convert-official CKPT --config fiber-b --out DIR
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.atomic import atomic_dir
from fiber.config import ModelConfig, get_config

FORMAT = "fiber-edge-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
BACKBONE_PREFIX = "backbone."


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not fit the model / config."""


# -- our format ---------------------------------------------------------------------------
def save_checkpoint(path: str | Path, model_state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig,
                    extra_meta: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``path/model.safetensors`` + ``path/config.json`` atomically (all or nothing).

    extra_meta: JSON-able top-level entries for config.json (e.g. ``{"task": "fine"}``); it may not
    override ``format``, ``format_version`` or ``model``.
    """
    from safetensors.torch import save_file

    extra = dict(extra_meta or {})
    clash = sorted({"format", "format_version", "model"} & set(extra))
    if clash:
        raise CheckpointError(f"extra_meta may not set reserved key '{clash[0]}'")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state_dict.items()}
    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg.to_dict(), **extra}
        try:
            text = json.dumps(meta, indent=2)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path}: extra_meta is not JSON-serialisable ({e})") from None
        (tmp / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")
    return path


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


TRAINING_ONLY_PREFIXES = ("kd_proj.",)


def load_model_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state_dict") -> None:
    """Strict ``load_state_dict`` with one clear message for unknown keys, missing keys or shapes.

    Training-only tensors (``TRAINING_ONLY_PREFIXES``: the feature projections a distillation run
    checkpoints for resume) are skipped when ``model`` has no such module, so a mid-run KD
    checkpoint evaluates and exports as the plain student it holds."""
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


def _s(items: list) -> str:
    return "s" if len(items) > 1 else ""


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


# -- official checkpoints -----------------------------------------------------------------
LAYOUT_PREFIXES = {
    "coarse": {"vit_model.": "backbone.image.", "text_transformer.": "backbone.text."},
    "fine": {"fusion_backbone.backbone.body.": "backbone.image.",
             "fusion_backbone.language_backbone.body.model.": "backbone.text."},
}
BUFFER_SUFFIXES = ("attn_mask", "relative_position_index", "position_ids")
QUEUE_KEYS = {"image_queue", "text_queue", "image_input_queue", "text_input_queue",
              "text_input_mask_queue", "queue_ptr", "queue_total"}
# Task heads and projections of the official models (fiber.md §1.4, §6): dropped, reported.
HEAD_PREFIXES = ("cross_modal_", "itm_score.", "rank_output.", "mlm_score.", "vqa_classifier.",
                 "nlvr2_classifier.", "snli_classifier.", "text_transformer.pooler.",
                 "vit_model.head.",  # Swin's ImageNet classifier, if the file kept it
                 "fusion_backbone.backbone.fpn.", "rpn.", "roi_heads.")
HEAD_KEYS = {"temp", "logit_scale"}
# Swin stage norms that the coarse layout does not have (it has only the final norm).
COARSE_FRESH = ("backbone.image.norm1.", "backbone.image.norm2.")
_UNUSED_ALPHA = re.compile(r"^backbone\.text\.encoder\.layer\.\d+\.alpha_t2i$")


@dataclass
class ConversionReport:
    """What ``convert_official`` did; ``summary()`` is the CLI's printout."""
    source: str
    layout: str
    config: str
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
        lines = [f"{self.source}: official {self.layout} layout -> config '{self.config}'",
                 f"  mapped backbone/fusion tensors: {self.mapped}"]
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


def unwrap_official(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside a Lightning (``state_dict``) or maskrcnn (``model``) file, with any
    ``module.`` prefix stripped."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry '{key}' is a {type(value).__name__}, not a tensor")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def detect_layout(keys: list[str], source: str = "checkpoint") -> str:
    """'coarse' or 'fine' from the key prefixes."""
    for layout, prefixes in LAYOUT_PREFIXES.items():
        if any(k.startswith(tuple(prefixes)) for k in keys):
            return layout
    raise CheckpointError(f"{source}: no official FIBER backbone keys (expected vit_model.* / "
                          f"text_transformer.* or fusion_backbone.*); found {_few(sorted(keys), 3)}")


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``backbone.*`` key -> shape of the model for ``cfg`` (built on the meta device: no memory)."""
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


def convert_official(state_dict_or_path: Any, cfg: ModelConfig | str
                     ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map an official FIBER state dict (or file) onto ``backbone.*`` keys of ``cfg``'s model.

    Every backbone and fusion tensor of the model must be provided (except the Swin stage norms
    ``norm1``/``norm2``, absent from the coarse layout: LayerNorm init, reported) with the right
    shape; relative-position tables of another window are resized bicubically. Buffers, task heads
    and unused gates are dropped and reported. Raises CheckpointError naming key and shapes.
    Floating tensors come back as float32 (on the source's device).
    """
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    source = "state_dict"
    if isinstance(state_dict_or_path, (str, Path)):
        source = str(state_dict_or_path)
        state_dict_or_path = read_official(state_dict_or_path)
    official = unwrap_official(state_dict_or_path, source)
    layout = detect_layout(list(official), source)
    report = ConversionReport(source=source, layout=layout, config=cfg.name)
    want = target_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(official):
        ours = _map_key(key, layout, report)
        if ours is None:
            continue
        if ours not in want:
            if _UNUSED_ALPHA.match(ours):
                report.dropped_unused.append(key)
                continue
            raise CheckpointError(f"{source}: backbone tensor '{key}' has no place in config "
                                  f"'{cfg.name}' (maps to '{ours}'){_hint(ours, cfg)}")
        out[ours] = _fit_shape(official[key], want[ours], key, ours, source, report)
    _fill_missing(out, want, layout, cfg, source, report)
    report.mapped = len(out) - len(report.missing_initialised)
    return out, report


def _map_key(key: str, layout: str, report: ConversionReport) -> str | None:
    """Our key for an official key, or None when the key is dropped (recorded in the report)."""
    if key.rsplit(".", 1)[-1] in BUFFER_SUFFIXES or key in QUEUE_KEYS:
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
        raise CheckpointError(f"{source}: missing backbone/fusion tensor{_s(hard)} for config "
                              f"'{cfg.name}': {_few(hard)}{_hint(hard[0], cfg)}")
    for k in fresh:  # LayerNorm defaults
        out[k] = torch.ones(want[k]) if k.endswith(".weight") else torch.zeros(want[k])
    report.missing_initialised.extend(fresh)


def _hint(key: str, cfg: ModelConfig) -> str:
    if "norm_i2t_i" in key:
        return (f"; config has i2t_prenorm={cfg.fusion.i2t_prenorm} (coarse and fine v3 checkpoints "
                "have norm_i2t_i, fine v2 checkpoints do not)")
    return ""


# -- CLI ----------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fiber.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert-official", help="convert an official FIBER .ckpt/.pt/.pth/.safetensors")
    conv.add_argument("ckpt", type=Path, help="official checkpoint file")
    conv.add_argument("--config", required=True, help="registered config name, e.g. fiber-b")
    conv.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    conv.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                      help="replace an existing output folder")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        cfg = get_config(args.config)
        state, report = convert_official(args.ckpt, cfg)
        meta = {"task": report.layout, "source": str(args.ckpt), "conversion": report.to_dict()}
        save_checkpoint(args.out, state, cfg, meta, overwrite=args.overwrite)
    except (CheckpointError, ValueError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
