"""Model configuration: frozen dataclasses and a small registry of named variants.

A ``ModelConfig`` fully describes a FIBER backbone (Swin image encoder + BERT/RoBERTa text encoder
with fusion in the top ``K`` layers of both sides) plus the head placeholder. Configs round-trip
through ``to_dict`` / ``from_dict`` (the form stored in checkpoints' ``config.json``); unknown keys
are errors, never silently ignored.

Fused-layer rule (generalised from the official code, see tests/data/golden/PROVENANCE.md):
image fused blocks are the last ``K`` blocks of stages 3+4 counted backwards from the end of stage 4;
text fused layers are the last ``K`` text layers; pair ``k`` (0-based) couples the ``k``-th fused
image block with text layer ``L - K + k``.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from common import package as pkg
from common.package import IMAGENET_MEAN, IMAGENET_STD

WINDOW_RULES = ("coarse", "fixed-pad")


@dataclass(frozen=True)
class SwinConfig:
    img_size: int = 224                       # square input side S in pixels
    patch_size: int = 4                       # patch-embedding stride / kernel
    in_chans: int = 3                         # RGB
    embed_dim: int = 96                       # stage-1 width C; stage s has C * 2**s
    depths: tuple[int, ...] = (2, 2, 6, 2)    # blocks per stage (exactly 4 stages)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int | None = None            # None = official coarse rule int(img_size / 32)
    window_rule: str = "coarse"               # "coarse": square img_size input, a stage whose grid fits
                                              # one window uses the grid as window, no shift (official
                                              # coarse code); "fixed-pad": any H x W, fixed window, every
                                              # block pads its grid to a multiple of it, odd blocks
                                              # always shift (official fine code)
    mlp_ratio: float = 4.0                    # MLP hidden = mlp_ratio * C
    qkv_bias: bool = True
    drop_path_rate: float = 0.1               # stochastic depth, linear over all blocks
    patch_norm: bool = True                   # LayerNorm after the patch-embedding conv

    @property
    def window(self) -> int:
        """The named window, or the official coarse rule ``int(img_size / 32)``."""
        return self.window_size if self.window_size is not None else int(self.img_size / 32)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**s for s in range(len(self.depths)))

    @property
    def pads_to_window(self) -> bool:
        """True for the official fine rule: any H x W input, grids padded to the window."""
        return self.window_rule == "fixed-pad"

    @property
    def stage_resolutions(self) -> tuple[int, ...]:
        """Token-grid side per stage for the square ``img_size`` input."""
        base = self.img_size // self.patch_size
        return tuple(base // 2**s for s in range(len(self.depths)))

    def stage_window(self, stage: int) -> tuple[int, int]:
        """(window, shift) of a stage's shifted blocks. "coarse": the standard rule ``if min(res) <=
        window: window = min(res), shift = 0``; otherwise shift = window // 2. "fixed-pad": always
        (window, window // 2), whatever the grid."""
        if self.pads_to_window:
            return self.window, self.window // 2
        res = self.stage_resolutions[stage]
        if res <= self.window:
            return res, 0
        return self.window, self.window // 2

    def validate(self) -> None:
        _check(len(self.depths) == 4 and len(self.num_heads) == 4,
               f"swin: depths and num_heads need 4 stages, got {self.depths} / {self.num_heads}")
        _check(self.img_size % (self.patch_size * 8) == 0,
               f"swin: img_size {self.img_size} must be a multiple of patch_size*8 = {self.patch_size * 8}")
        _check(self.window >= 1, f"swin: window size must be >= 1, got {self.window}")
        _check(self.window_rule in WINDOW_RULES,
               f"swin: window_rule must be one of {', '.join(WINDOW_RULES)}, got {self.window_rule!r}")
        for s, (dim, heads) in enumerate(zip(self.stage_dims, self.num_heads)):
            _check(dim % heads == 0, f"swin: stage {s + 1} dim {dim} not divisible by {heads} heads")
            if self.pads_to_window:
                continue
            win, _ = self.stage_window(s)
            res = self.stage_resolutions[s]
            _check(res % win == 0,
                   f"swin: stage {s + 1} grid {res}x{res} is not a multiple of window {win}")


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 30522
    hidden_size: int = 256                    # D
    num_layers: int = 4                       # L
    num_heads: int = 4
    intermediate_size: int = 1024
    max_position_embeddings: int = 128
    type_vocab_size: int = 2                  # only row 0 is used (single segment)
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-12
    position_style: str = "bert"              # "bert": 0..T-1; "roberta": pad + cumsum(non-pad)
    dropout: float = 0.1                      # hidden and attention-probability dropout

    @property
    def max_length(self) -> int:
        """Longest sequence whose position ids fit the table (RoBERTa ids start at pad + 1)."""
        offset = self.pad_token_id + 1 if self.position_style == "roberta" else 0
        return self.max_position_embeddings - offset

    def validate(self) -> None:
        _check(self.position_style in ("bert", "roberta"),
               f"text: position_style must be 'bert' or 'roberta', got {self.position_style!r}")
        _check(self.hidden_size % self.num_heads == 0,
               f"text: hidden_size {self.hidden_size} not divisible by {self.num_heads} heads")
        _check(0 <= self.pad_token_id < self.vocab_size,
               f"text: pad_token_id {self.pad_token_id} outside vocab of {self.vocab_size}")
        _check(self.type_vocab_size >= 1, "text: type_vocab_size must be >= 1")


@dataclass(frozen=True)
class FusionConfig:
    num_fused_layers: int = 4                 # K fused layers per side (official FIBER-B: 6)
    i2t_prenorm: bool = True                  # norm_i2t_i on the i2t query (coarse / fine v3: True, v2: False)
    t2i_norm: bool = True                     # crossattention_t2i.output.LayerNorm exists (coarse layout;
                                              # never applied); the fine layouts have no such tensor


HEAD_KINDS = ("light", "dyhead")


@dataclass(frozen=True)
class HeadConfig:
    """FPN + grounding head. ``kind``: "light" (plain conv tower, fiber.heads.grounding) or "dyhead"
    (the official FIBER/GLIP DyHead, fiber.heads.dyhead, with the +1 box conventions and the
    official ATSS post-processing limits below)."""
    kind: str = "light"                       # "light" | "dyhead"
    fpn_channels: int = 256                   # FPN / head width (official 256)
    num_convs: int = 6                        # head tower depth: conv blocks (light) / DyConv blocks (DyHead: 6)
    anchor_scale: float = 8.0                 # anchor side = anchor_scale * stride
    prior_prob: float = 0.01                  # initial foreground probability of the logits
    proj_dim: int = 256                       # token / region projection width
    use_p6: bool = False                      # extra stride-64 FPN level (official: P6 + P7)
    use_p7: bool = False                      # stride-128 level from ReLU(P6) (official LastLevelP6P7); needs use_p6
    gn_groups: int = 16                       # GroupNorm groups in the head tower (official 16)
    # light head only: add a learned linear map of each location's normalised (x, y) to its region
    # feature, so a token can prefer a side of the image ("left of", "the topmost"); not in FIBER
    position_features: bool = False
    queue_size: int = 1024                    # ITC feature queue length (official 4096)
    # DyHead only (the light head keeps log_scale 0 and the 5e4 clamp):
    num_classes: int = 80                     # cls_logits outputs = official score columns (NUM_CLASSES - 1)
    log_scale: float = 0.0                    # initial log_scale of the alignment logits (DYHEAD.LOG_SCALE)
    logit_clamp: float = 50000.0              # alignment logits clamped to +- this (CLAMP_DOT_PRODUCT)
    # Official ATSS post-processing (fiber.heads.atss; the runtime's "official" style):
    inference_th: float = 0.05                # phrase score threshold, tested before centerness
    pre_nms_top_n: int = 1000                 # most candidates per level before NMS
    nms_th: float = 0.6                       # IoU of the multi-label NMS (same label only)
    detections_per_img: int = 100             # detections kept per image
    # how the package scores a phrase from its tokens (common.package.PHRASE_SCORES): FIBER's mean,
    # or the minimum for a light head trained with word targets (train.fine --word-targets)
    phrase_score: str = pkg.PHRASE_SCORE_MEAN

    def validate(self) -> None:
        _check(self.kind in HEAD_KINDS, f"head: kind must be one of {', '.join(HEAD_KINDS)}, got {self.kind!r}")
        _check(self.fpn_channels % self.gn_groups == 0,
               f"head: {self.fpn_channels} channels not divisible by {self.gn_groups} GroupNorm groups")
        _check(not (self.position_features and self.kind == "dyhead"),
               "head: position_features is a light-head option (the DyHead is the official one)")
        if self.kind == "dyhead":
            _check(self.proj_dim == self.fpn_channels,
                   f"head: the DyHead projects tokens to the tower width, proj_dim {self.proj_dim} "
                   f"must equal fpn_channels {self.fpn_channels}")
            _check(self.fpn_channels % 4 == 0, f"head: DyReLU needs fpn_channels divisible by 4, "
                   f"got {self.fpn_channels}")
        _check(self.phrase_score in pkg.PHRASE_SCORES,
               f"head: phrase_score must be one of {', '.join(pkg.PHRASE_SCORES)}, got {self.phrase_score!r}")
        _check(self.kind != "dyhead" or self.phrase_score == pkg.PHRASE_SCORE_MEAN,
               "head: the DyHead's official post-processing scores phrases by the mean")
        _check(0.0 <= self.inference_th < 1.0 and self.pre_nms_top_n >= 1 and self.detections_per_img >= 1
               and 0.0 < self.nms_th <= 1.0, "head: post-processing limits out of range")


INPUT_STYLES = ("letterbox", "official")


@dataclass(frozen=True)
class InputConfig:
    """How a camera image becomes the detector's input (the package's ``input`` section).

    "letterbox" (the small edge configs): a square ``swin.img_size`` canvas, scale = S / max(h, w),
    RGB, ``(pixel / 255 - image_mean) / image_std``; or, with ``letterbox_canvas`` [H, W] set
    (``compress.export --canvas``: e.g. 224 x 288 for a 4:3 camera), that canvas with scale
    min(H / h, W / w), the Swin keeping the windows and shifts of its square input. "official" (the official fine models): the
    official test resize (shorter side ``min_size``, longer side at most ``max_size``), BGR 0-255
    with the official pixel mean/std, placed top-left on a fixed ``canvas`` [H, W] (a multiple of
    32; an image that does not fit is scaled down to fit), zero padding after normalisation.
    """
    style: str = "letterbox"                  # "letterbox" | "official"
    min_size: int = 800                       # official: INPUT.MIN_SIZE_TEST
    max_size: int = 1333                      # official: INPUT.MAX_SIZE_TEST
    canvas: tuple[int, int] = (800, 1344)     # official: [H, W] the exported detector graph runs at
    letterbox_canvas: tuple[int, int] | None = None  # letterbox: a fixed [H, W] canvas (None: square)

    def validate(self) -> None:
        _check(self.style in INPUT_STYLES, f"input: style must be one of {', '.join(INPUT_STYLES)}, "
               f"got {self.style!r}")
        if self.style == "official":
            _check(1 <= self.min_size <= self.max_size,
                   f"input: need 1 <= min_size <= max_size, got {self.min_size} / {self.max_size}")
            check_canvas(self.canvas)
        if self.letterbox_canvas is not None:
            _check(self.style == "letterbox", "input: letterbox_canvas is for the letterbox style; "
                   "an official-input config takes canvas")
            check_canvas(tuple(self.letterbox_canvas))


def parse_canvas(text: str) -> tuple[int, int]:
    """A ``--canvas HxW`` argument -> (H, W); argparse error naming the text (``check_canvas``
    judges the values)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"canvas must be HxW in pixels, e.g. 512x672, got {text!r}")
    return int(parts[0]), int(parts[1])


def check_canvas(canvas: tuple[int, ...], stride: int = 32, smallest: int = 64) -> tuple[int, int]:
    """An official-style canvas [H, W]: two multiples of ``stride`` (the coarsest Swin stage), each
    at least ``smallest`` (P7 needs a 2 x 2 P5 grid). ValueError naming what to change."""
    if len(canvas) != 2 or not all(isinstance(v, int) for v in canvas):
        raise ValueError(f"canvas must be two integers H x W, got {canvas!r}")
    h, w = canvas
    if h % stride or w % stride:
        raise ValueError(f"canvas {h}x{w} is not divisible by {stride} (the coarsest stride); "
                         f"use e.g. {max(stride, round(h / stride) * stride)}x{max(stride, round(w / stride) * stride)}")
    if h < smallest or w < smallest:
        raise ValueError(f"canvas {h}x{w} is too small for the model's strides: each side needs at least {smallest}")
    return h, w


@dataclass(frozen=True)
class ModelConfig:
    name: str
    swin: SwinConfig = field(default_factory=SwinConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    max_text_len: int = 64                    # largest text bucket (tokens incl. specials)
    image_mean: tuple[float, ...] = IMAGENET_MEAN  # RGB, applied to pixel / 255 outside the model
    image_std: tuple[float, ...] = IMAGENET_STD
    input: InputConfig = field(default_factory=InputConfig)  # how images become the network input

    def __post_init__(self) -> None:
        self.input.validate()
        self.swin.validate()
        self.text.validate()
        self.head.validate()
        k = self.fusion.num_fused_layers
        d34 = self.swin.depths[2] + self.swin.depths[3]
        _check(0 <= k <= d34, f"{self.name}: num_fused_layers {k} exceeds stage-3+4 depth {d34}")
        _check(k <= self.text.num_layers,
               f"{self.name}: num_fused_layers {k} exceeds {self.text.num_layers} text layers")
        _check(self.max_text_len <= self.text.max_length,
               f"{self.name}: max_text_len {self.max_text_len} exceeds the {self.text.max_length} "
               f"positions of the text encoder")

    @property
    def input_hw(self) -> tuple[int, int]:
        """[H, W] of the detector's image input: the official canvas, the letterbox canvas, or the
        square letterbox."""
        if self.input.style == "official":
            return tuple(self.input.canvas)
        if self.input.letterbox_canvas is not None:
            return tuple(self.input.letterbox_canvas)
        return self.swin.img_size, self.swin.img_size

    def with_canvas(self, canvas: tuple[int, int]) -> "ModelConfig":
        """This config on another canvas (``compress.export --canvas``): the official canvas, or
        the letterbox's fixed [H, W] canvas (the square ``img_size`` one when the canvas is
        square at that size). ValueError for a canvas that is not a multiple of 32 or too small,
        or a letterbox config whose Swin pads to the window (it has no square input to keep)."""
        hw = check_canvas(tuple(canvas))
        if self.input.style == "official":
            return self.replace(input=dataclasses.replace(self.input, canvas=hw))
        if self.swin.pads_to_window:
            raise ValueError(f"config '{self.name}': a letterbox canvas needs the coarse window rule")
        square = hw == (self.swin.img_size, self.swin.img_size)
        return self.replace(input=dataclasses.replace(self.input, letterbox_canvas=None if square else hw))

    # -- fused-layer layout -------------------------------------------------------------
    @property
    def first_fused_text_layer(self) -> int:
        """Index of the first fused text layer; layers below it form the text prefix."""
        return self.text.num_layers - self.fusion.num_fused_layers

    def fused_image_blocks(self) -> list[tuple[int, int]]:
        """(stage, block) of the K fused image blocks in pair order (stage is 2 or 3, 0-based)."""
        d3, d4 = self.swin.depths[2], self.swin.depths[3]
        blocks = [(2, b) for b in range(d3)] + [(3, b) for b in range(d4)]
        k = self.fusion.num_fused_layers
        return blocks[len(blocks) - k:] if k else []

    def pairs(self) -> list[tuple[int, int, int]]:
        """(stage, block, text_layer) for each fused pair k = 0..K-1."""
        first = self.first_fused_text_layer
        return [(s, b, first + k) for k, (s, b) in enumerate(self.fused_image_blocks())]

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists). ``head.phrase_score`` is left out when it is
        the default "mean" and ``input.letterbox_canvas`` when it is None, so configs (checkpoints,
        QDIRs, manifests) written before they existed compare equal to today's."""
        d = _to_plain(dataclasses.asdict(self))
        if d["head"]["phrase_score"] == pkg.PHRASE_SCORE_MEAN:
            del d["head"]["phrase_score"]
        if d["input"]["letterbox_canvas"] is None:
            del d["input"]["letterbox_canvas"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of ``to_dict``; raises ValueError naming any unknown or malformed key."""
        return _from_dict(cls, d, "model")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


_NESTED = {"swin": SwinConfig, "text": TextConfig, "fusion": FusionConfig, "head": HeadConfig,
           "input": InputConfig}


def _from_dict(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"config '{where}' must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown key '{where}.{unknown[0]}' in config "
                         f"(known: {', '.join(fields)})")
    kwargs = {}
    for key, value in d.items():
        if cls is ModelConfig and key in _NESTED:
            kwargs[key] = _from_dict(_NESTED[key], value, f"{where}.{key}")
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise ValueError(f"config '{where}': {e}") from None


# -- registry ---------------------------------------------------------------------------
_REGISTRY: dict[str, ModelConfig] = {}


def register_config(cfg: ModelConfig, overwrite: bool = False) -> ModelConfig:
    """Add a named config to the registry; re-registering a name needs ``overwrite``."""
    if cfg.name in _REGISTRY and not overwrite and _REGISTRY[cfg.name] != cfg:
        raise ValueError(f"config '{cfg.name}' is already registered")
    _REGISTRY[cfg.name] = cfg
    return cfg


def get_config(name: str) -> ModelConfig:
    """The registered config called ``name``; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown config '{name}'; known: {', '.join(sorted(_REGISTRY))}") from None


def list_configs() -> list[str]:
    return sorted(_REGISTRY)


# A config whose official coarse and fine releases differ in architecture names its fine variant
# here: the task of a checkpoint (its layout) decides which one describes it.
_FINE_VARIANTS: dict[str, str] = {}


def config_for_task(cfg: ModelConfig | str, task: str) -> ModelConfig:
    """The config that describes ``cfg``'s model for ``task`` ("coarse" or "fine").

    ``fiber-b`` is the official coarse model (Swin window rule of the coarse code, ``norm_i2t_i``,
    ``crossattention_t2i.output.LayerNorm``); for the fine task it becomes ``fiber-b-fine`` (fixed
    12 x 12 windows with padding, fusion v2, FPN P3-P7). Every other config serves both tasks.
    """
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    if task not in ("coarse", "fine"):
        raise ValueError(f"unknown task '{task}'; known: coarse, fine")
    if task == "fine" and cfg.name in _FINE_VARIANTS:
        return get_config(_FINE_VARIANTS[cfg.name])
    return cfg


_ROBERTA_BASE = TextConfig(vocab_size=50265, hidden_size=768, num_layers=12, num_heads=12,
                           intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                           pad_token_id=1, layer_norm_eps=1e-5, position_style="roberta")
# The BERT WordPiece tokenizer of fiber/assets/tokenizer.json (MiniLM-L6's): vocab 30522, pad 0.
_BERT_VOCAB = dict(vocab_size=30522, pad_token_id=0, type_vocab_size=2, layer_norm_eps=1e-12,
                   position_style="bert")

# Official FIBER-B: Swin-B at 384 px (window int(384/32) = 12) + RoBERTa-base, 6 fused layers.
register_config(ModelConfig(
    name="fiber-b",
    swin=SwinConfig(img_size=384, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                    window_size=None, drop_path_rate=0.1),
    text=_ROBERTA_BASE,
    fusion=FusionConfig(num_fused_layers=6, i2t_prenorm=True),
    head=HeadConfig(fpn_channels=256, num_convs=6, proj_dim=256, use_p6=True, queue_size=4096),
    max_text_len=256,  # official fine-grained MAX_QUERY_LEN
))

# Official FIBER-B fine-grained (detection / grounding, microsoft/FIBER fine_grained/): the same
# towers, Swin with fixed 12 x 12 windows over any H x W (padded), fusion v2 (no norm_i2t_i, no
# crossattention_t2i LayerNorm), FPN P3-P7, DyHead. Refexp releases use v3: i2t_prenorm=True.
register_config(ModelConfig(
    name="fiber-b-fine",
    swin=SwinConfig(img_size=800, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                    window_size=12, window_rule="fixed-pad", drop_path_rate=0.4),
    text=_ROBERTA_BASE,
    fusion=FusionConfig(num_fused_layers=6, i2t_prenorm=False, t2i_norm=False),
    head=HeadConfig(kind="dyhead", fpn_channels=256, num_convs=6, proj_dim=256, use_p6=True, use_p7=True,
                    queue_size=4096),
    max_text_len=256,  # official MAX_QUERY_LEN
    input=InputConfig(style="official", min_size=800, max_size=1333, canvas=(800, 1344)),
))
_FINE_VARIANTS["fiber-b"] = "fiber-b-fine"

# The fine golden-parity config (tests/data/golden/fine/README.md §1): FIBER-B's fine model with
# widths shrunk (Swin 8/16/32/64, text 32-d, FPN and DyHead 32), same depths, windows and fusion v2.
register_config(ModelConfig(
    name="fiber-golden-fine",
    swin=SwinConfig(img_size=224, embed_dim=8, depths=(2, 2, 18, 2), num_heads=(1, 2, 4, 8),
                    window_size=12, window_rule="fixed-pad", drop_path_rate=0.0),
    text=TextConfig(vocab_size=1000, hidden_size=32, num_layers=12, num_heads=4,
                    intermediate_size=128, max_position_embeddings=64, type_vocab_size=1,
                    pad_token_id=1, layer_norm_eps=1e-5, position_style="roberta", dropout=0.0),
    fusion=FusionConfig(num_fused_layers=6, i2t_prenorm=False, t2i_norm=False),
    head=HeadConfig(kind="dyhead", fpn_channels=32, num_convs=6, proj_dim=32, use_p6=True, use_p7=True,
                    gn_groups=16, num_classes=80, pre_nms_top_n=40, detections_per_img=25),
    max_text_len=16,  # MAX_QUERY_LEN of the golden run
    # The golden test transform (min 192 / max 288) and its batch's padded shape as the canvas.
    input=InputConfig(style="official", min_size=192, max_size=288, canvas=(224, 288)),
))

# The golden-parity config (tests/data/golden/PROVENANCE.md §1): FIBER-B's fusion topology shrunk.
register_config(ModelConfig(
    name="fiber-golden",
    swin=SwinConfig(img_size=128, embed_dim=12, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16),
                    window_size=None, drop_path_rate=0.1),
    text=TextConfig(vocab_size=1000, hidden_size=32, num_layers=12, num_heads=4,
                    intermediate_size=128, max_position_embeddings=64, type_vocab_size=1,
                    pad_token_id=1, layer_norm_eps=1e-5, position_style="roberta"),
    fusion=FusionConfig(num_fused_layers=6, i2t_prenorm=True),
    head=HeadConfig(fpn_channels=32, num_convs=1, proj_dim=32),
    max_text_len=32,
))

# The deployable student: 256 px, ~7 M parameters besides word embeddings. Of its 4 text layers the
# top K = 3 are fused; the text prefix (text.onnx) is the embeddings and text layer 0.
register_config(ModelConfig(
    name="fiber-nano",
    swin=SwinConfig(img_size=256, embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8),
                    window_size=8, drop_path_rate=0.1),
    # Text tower shaped like the first 4 layers of MiniLM-L6 (384-d, 12 heads), so it can start
    # from the pretrained MiniLM or from the fiber-t teacher; the top 3 layers are fused and the
    # plain layer 0 forms text.onnx (run once per prompt).
    text=TextConfig(hidden_size=384, num_layers=4, num_heads=12, intermediate_size=1536,
                    max_position_embeddings=512, **_BERT_VOCAB),
    fusion=FusionConfig(num_fused_layers=3, i2t_prenorm=True),
    # position_features: relations and superlatives pick one of identical twins (fiber.heads.grounding)
    head=HeadConfig(fpn_channels=64, num_convs=2, proj_dim=64, position_features=True),
    max_text_len=64,
))

# The teacher: same input and tokenizer; text tower shaped like MiniLM-L6 (fiber.text_init).
register_config(ModelConfig(
    name="fiber-t",
    swin=SwinConfig(img_size=256, embed_dim=64, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16),
                    window_size=8, drop_path_rate=0.1),
    text=TextConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                    max_position_embeddings=512, **_BERT_VOCAB),
    fusion=FusionConfig(num_fused_layers=4, i2t_prenorm=True),
    head=HeadConfig(fpn_channels=128, num_convs=4, proj_dim=128),
    max_text_len=64,
))

# Unit tests: 64 px, grids 16/8/4/2, window 2 (stage 3 shifted with masks, stage 4 one window).
# K = 3 puts one fused block in stage 3 and leaves one plain text layer as the prefix.
register_config(ModelConfig(
    name="fiber-tiny-test",
    swin=SwinConfig(img_size=64, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                    window_size=2, drop_path_rate=0.1),
    text=TextConfig(hidden_size=16, num_layers=4, num_heads=2, intermediate_size=32,
                    max_position_embeddings=32, **_BERT_VOCAB),
    fusion=FusionConfig(num_fused_layers=3, i2t_prenorm=True),
    head=HeadConfig(fpn_channels=16, num_convs=1, proj_dim=16),
    max_text_len=32,
))
