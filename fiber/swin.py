"""Swin Transformer image tower with FIBER's image->text (i2t) fusion in the top blocks.

Parameter names follow the official coarse checkpoint (``vit_model.*``, fiber.md §6) under the
prefix ``backbone.image.``; the per-stage output norms use the fine-grained names ``norm1..norm3``
(stages 2-4; ``norm3`` is the final norm, the coarse ``vit_model.norm``). Buffers
(``relative_position_index``, ``attn_mask``) are non-persistent.

Tokens are ``[B, H*W, C]``, row-major over the grid. Windows are row-major, tokens within a window
row-major, as in the official code.

Two window rules (``SwinConfig.window_rule``):

- "coarse" (official coarse code): a square ``img_size`` input; a stage whose grid fits one window
  uses the grid as its window and does not shift; the shift masks are buffers built once. Any
  other H x W input (a letterbox package on a fixed [H, W] canvas, ``compress.export --canvas``)
  runs each block as "fixed-pad" below does, but with its stage's window and shift at
  ``img_size``: at ``img_size`` the two paths are the same computation (tested), elsewhere the
  model sees the windows and shifts it was trained with.
- "fixed-pad" (official fine code): any H x W input; every block pads its LayerNorm'd grid with
  zeros at the bottom/right to a multiple of the fixed window, odd blocks shift by window // 2
  whatever the grid, and the shift mask (0 / -100) is built on the padded grid. Padded tokens are not
  masked: they are keys/values like any other token. Grids travel as ``hw = (H, W)`` token counts;
  PatchEmbed pads the image to a multiple of the patch size and PatchMerging pads odd grids.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from fiber.config import SwinConfig
from fiber.layers import DropPath, Mlp, attend, init_linear_and_norm, merge_heads, split_heads

SHIFT_MASK_VALUE = -100.0  # the official shifted-window mask value (not -inf)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, window*window, C] (windows row-major)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """[B * nW, window*window, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    """int64 [N, N], N = window**2: row of ``relative_position_bias_table`` for each token pair."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)                                   # [2, N]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [N, N, 2]
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(resolution: int | tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """float32 [nW, N, N]: 0 within a region, -100 across regions of the cyclically shifted grid.

    ``resolution``: the grid side, or (H, W) of a grid that is a multiple of ``window``. Regions
    along each axis are the official slices ``[0, n - window)``, ``[n - window, n - shift)``,
    ``[n - shift, n)``, labelled by arithmetic (no in-place indexing: it also traces to ONNX)."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution

    def region(n: int) -> torch.Tensor:
        i = torch.arange(n)
        return (i >= n - window).long() + (i >= n - shift).long()

    img = (region(h)[:, None] * 3 + region(w)[None, :]).float()[None, :, :, None]  # [1, H, W, 1]
    ids = window_partition(img, window).squeeze(-1)              # [nW, N]
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.where(diff != 0, SHIFT_MASK_VALUE, 0.0)


@functools.lru_cache(maxsize=32)
def _padded_grid_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """``shifted_window_mask`` of a padded (H, W) grid, built once per size (a constant when traced)."""
    return shifted_window_mask((h, w), window, shift)


def padded_grid(hw: tuple[int, int], window: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of ``window``."""
    return hw[0] + (-hw[0] % window), hw[1] + (-hw[1] % window)


class PatchEmbed(nn.Module):
    """Conv patchify + optional LayerNorm: [B, 3, H, W] -> [B, (H/p)*(W/p), C].

    ``pad``: first zero-pad the image at the bottom/right to a multiple of the patch size (official
    fine code); otherwise the input must already be one."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, norm: bool, pad: bool = False):
        super().__init__()
        self.patch_size, self.pad = patch_size, pad
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def grid(self, image: torch.Tensor) -> tuple[int, int]:
        """(H, W) of the token grid for ``image``."""
        p = self.patch_size
        return -(-int(image.shape[-2]) // p), -(-int(image.shape[-1]) // p)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pad:
            ph, pw = -int(image.shape[-2]) % self.patch_size, -int(image.shape[-1]) % self.patch_size
            if ph or pw:
                image = F.pad(image, (0, pw, 0, ph))
        return self.norm(self.proj(image).flatten(2).transpose(1, 2))


class PatchMerging(nn.Module):
    """2x2 merge: [B, H*W, C] -> [B, ceil(H/2)*ceil(W/2), 2C]; official sub-grid order, no-bias
    reduction. Without ``hw`` the grid is the square ``resolution``; with ``hw`` an odd side is
    first zero-padded at the bottom/right (official fine code)."""

    def __init__(self, resolution: int, dim: int):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    @staticmethod
    def merged_grid(hw: tuple[int, int]) -> tuple[int, int]:
        return (hw[0] + 1) // 2, (hw[1] + 1) // 2

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        if hw is not None:
            return self._merge_padded(x, hw)
        r, c = self.resolution, x.shape[-1]
        x = x.reshape(-1, r, r, c)
        # (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.reshape(-1, (r // 2) ** 2, 4 * c)))

    def _merge_padded(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        (h, w), c = hw, x.shape[-1]
        x = x.reshape(-1, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        mh, mw = self.merged_grid(hw)
        return self.reduction(self.norm(x.reshape(-1, mh * mw, 4 * c)))


class WindowAttention(nn.Module):
    """Window self-attention with relative position bias, plus the optional i2t cross-attention.

    The i2t modules (``qkv_i2t``, ``qkv_text_i2t``, ``proj_i2t``, ``norm_i2t_i``, ``alpha_i2t``) keep
    the official names. i2t is per token (every image token attends to all text tokens of its
    example), so ``cross_attend`` runs on un-windowed tokens: identical to the official
    per-window version, without repeating the text keys over the windows.
    """

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool,
                 text_dim: int | None = None, i2t_prenorm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.fused = text_dim is not None
        if self.fused:
            self.qkv_i2t = nn.Linear(dim, dim, bias=qkv_bias)
            self.qkv_text_i2t = nn.Linear(text_dim, 2 * dim, bias=qkv_bias)
            self.proj_i2t = nn.Linear(dim, dim)
            self.norm_i2t_i = nn.LayerNorm(dim) if i2t_prenorm else None
            self.alpha_i2t = nn.Parameter(torch.zeros(1))

    def position_bias(self) -> torch.Tensor:
        """[heads, N, N] relative position bias."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, fold_mask: bool = True) -> torch.Tensor:
        """x: [B*nW, N, C] windows; mask: [nW, N, N] (0 / -100) or None. Returns [B*nW, N, C].

        ``fold_mask=False`` adds the position bias and the mask to the scores one after the other:
        an exported graph then holds [heads, N, N] + [nW, 1, N, N] constants instead of one
        folded [nW, heads, N, N] (hundreds of MB for FIBER-B's fine canvas)."""
        n, c = x.shape[1], x.shape[2]
        bias = self.position_bias()                                # [heads, N, N]
        nw = 1
        if mask is not None:                                       # shifted block
            nw = mask.shape[0]
            bias = bias + mask[:, None] if fold_mask else (bias, mask[:, None])  # [nW, heads, N, N]
        # [B, nW, N, 3, heads, d] -> [3, B, nW, heads, N, d]; the bias broadcasts over B
        qkv = self.qkv(x).reshape(-1, nw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)
        out = attend(q, k, v, bias).permute(0, 1, 3, 2, 4)           # [B, nW, N, heads, d]
        return self.proj(out.reshape(-1, n, c))

    def cross_attend(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """i2t: image tokens x [B, L, C] attend to text [B, T, D_text] with additive key mask
        [B, 1, 1, T]. Returns ``alpha_i2t * proj_i2t(attention)``, [B, L, C]."""
        c = x.shape[-1]
        q = self.norm_i2t_i(x) if self.norm_i2t_i is not None else x
        q = split_heads(self.qkv_i2t(q), self.num_heads)                # [B, h, L, d]
        kv = self.qkv_text_i2t(text).unflatten(-1, (2, c))              # first C = K, last C = V
        k = split_heads(kv[:, :, 0], self.num_heads)                    # [B, h, T, d]
        v = split_heads(kv[:, :, 1], self.num_heads)
        return self.alpha_i2t * self.proj_i2t(merge_heads(attend(q, k, v, text_mask)))


class SwinBlock(nn.Module):
    """(Shifted-)window attention block; fused blocks also take text (i2t before the residual)."""

    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, shift: int,
                 mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 text_dim: int | None = None, i2t_prenorm: bool = True, pad_to_window: bool = False):
        super().__init__()
        self.resolution, self.window, self.shift = resolution, window, shift
        self.pad_to_window = pad_to_window  # "fixed-pad" rule: any grid, padded per call
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias, text_dim, i2t_prenorm)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(resolution, window, shift) if shift and not pad_to_window else None
        self.register_buffer("attn_mask", mask, persistent=False)

    @property
    def fused(self) -> bool:
        return self.attn.fused

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """x: [B, H*W, C]; text: [B, T, D_text] and text_mask [B, 1, 1, T] (additive) for i2t, or
        None for the unimodal path; hw: the (H, W) grid ("fixed-pad" blocks; the square
        ``resolution`` otherwise). Returns [B, H*W, C]."""
        if self.pad_to_window or hw is not None:
            h = self._attend_padded(self.norm1(x), hw)
        else:
            r, c = self.resolution, x.shape[-1]
            h = self.norm1(x).reshape(-1, r, r, c)
            if self.shift:
                h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
            h = self.attn(window_partition(h, self.window), self.attn_mask)
            h = window_reverse(h, self.window, r, r)
            if self.shift:
                h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
            h = h.reshape(-1, r * r, c)
        if text is not None and self.fused:
            h = h + self.attn.cross_attend(h, text, text_mask)
        x = x + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _attend_padded(self, h: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        """Window attention of the official fine code: LN'd tokens [B, H*W, C] are zero-padded to
        a multiple of the window, shifted (odd blocks, mask on the padded grid), attended and
        cropped back. Returns [B, H*W, C] (before i2t and the residual)."""
        if hw is None:
            raise ValueError("a fixed-pad Swin block needs the grid size hw=(H, W)")
        (gh, gw), c, win = hw, h.shape[-1], self.window
        hp, wp = padded_grid(hw, win)
        h = F.pad(h.reshape(-1, gh, gw, c), (0, 0, 0, wp - gw, 0, hp - gh))
        mask = None
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = _padded_grid_mask(hp, wp, win, self.shift).to(h.device, h.dtype)
        h = window_reverse(self.attn(window_partition(h, win), mask, fold_mask=False), win, hp, wp)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        return h[:, :gh, :gw].reshape(-1, gh * gw, c)


class SwinStage(nn.Module):
    """One stage (official ``BasicLayer``): ``blocks`` then optional ``downsample``."""

    def __init__(self, blocks: list[SwinBlock], downsample: PatchMerging | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class SwinTransformer(nn.Module):
    """Four-stage Swin with per-stage output norms ``norm1..norm3`` (stages 2-4).

    ``fused_blocks``: (stage, block) pairs (0-based) that get i2t modules of width ``text_dim``.
    """

    def __init__(self, cfg: SwinConfig, text_dim: int | None = None,
                 fused_blocks: tuple[tuple[int, int], ...] = (), i2t_prenorm: bool = True):
        super().__init__()
        self.cfg = cfg
        pad = cfg.pads_to_window
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.patch_norm, pad)
        n = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear 0 .. rate
        self.layers = nn.ModuleList()
        for s, depth in enumerate(cfg.depths):
            dim, res = cfg.stage_dims[s], cfg.stage_resolutions[s]
            window, shift = cfg.stage_window(s)
            blocks = [SwinBlock(dim, res, cfg.num_heads[s], window, shift if b % 2 else 0,
                                cfg.mlp_ratio, cfg.qkv_bias, rates[sum(cfg.depths[:s]) + b],
                                text_dim if (s, b) in fused_blocks else None, i2t_prenorm, pad)
                      for b in range(depth)]
            down = PatchMerging(res, dim) if s < len(cfg.depths) - 1 else None
            self.layers.append(SwinStage(blocks, down))
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d) for d in cfg.stage_dims[1:])
        self.init_weights()

    def init_weights(self) -> None:
        init_linear_and_norm(self)
        for m in self.modules():
            if isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02, a=-0.04, b=0.04)
                if m.fused:
                    nn.init.zeros_(m.alpha_i2t)

    def stage_norm(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """The output norm of a stage (identity for stage 1)."""
        return (self.norm1, self.norm2, self.norm3)[stage - 1](x) if stage else x

    def to_map(self, x: torch.Tensor, stage: int, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens [B, H*W, C] of ``stage`` -> map [B, C, H, W] (``hw`` = (H, W) for padded grids,
        the square stage resolution otherwise)."""
        if hw is not None:
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], hw[0], hw[1])
        r = self.cfg.stage_resolutions[stage]
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], r, r)

    def check_image(self, image: torch.Tensor) -> None:
        c, p = self.cfg.in_chans, self.cfg.patch_size
        if torch.jit.is_tracing():  # shapes are fixed by the example input; keep the trace clean
            return
        if image.ndim != 4 or image.shape[1] != c or min(image.shape[2:]) < 1:
            raise ValueError(f"image must be [B, {c}, H, W], got {list(image.shape)}")
        if not self.cfg.pads_to_window and (image.shape[2] % p or image.shape[3] % p):
            raise ValueError(f"image sides must be multiples of the patch size {p} "
                             f"(the square input is {self.cfg.img_size}), got {list(image.shape)}")

    def square_input(self, image: torch.Tensor) -> bool:
        """True when ``image`` is the "coarse" rule's square ``img_size`` input (fixed grids)."""
        s = self.cfg.img_size
        return not self.cfg.pads_to_window and tuple(int(v) for v in image.shape[-2:]) == (s, s)

    def embed(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """Patch embedding -> (tokens [B, H*W, C], hw). ``hw`` is the (H, W) token grid that
        padded blocks, merges and ``to_map`` take, and None for the coarse rule's square
        ``img_size`` input (grids fixed by the config)."""
        x = self.patch_embed(image)
        return x, (None if self.square_input(image) else self.patch_embed.grid(image))

    def merge(self, stage: int, x: torch.Tensor, hw: tuple[int, int] | None
                   ) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """The PatchMerging after ``stage`` -> (tokens, grid); a stage without one passes through."""
        down = self.layers[stage].downsample
        if down is None:
            return x, hw
        if hw is None:
            return down(x), None
        return down(x, hw), down.merged_grid(hw)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Unimodal path: image [B, 3, H, W] float32 -> 4 maps [B, C_s, H/(4*2^s), W/(4*2^s)]
        (sides rounded up under "fixed-pad") with the stage-2..4 norms applied (no text, i2t
        skipped)."""
        self.check_image(image)
        x, hw = self.embed(image)
        maps = []
        for s, stage in enumerate(self.layers):
            for block in stage.blocks:
                x = block(x, hw=hw)
            maps.append(self.to_map(self.stage_norm(s, x), s, hw))
            x, hw = self.merge(s, x, hw)
        return maps
