"""Modulated deformable convolution (DCNv2) in pure torch, exportable as one ONNX ``DeformConv``.

Semantics are those of the CUDA kernel the official FIBER/GLIP code runs
(``modulated_deform_conv_forward``) and of ``torchvision.ops.deform_conv2d`` (golden/fine README D2):

- ``offset`` ``[B, 2K, Ho, Wo]`` holds, for kernel tap ``k = i * kw + j`` (row-major), the row
  offset ``dy`` in channel ``2k`` and the column offset ``dx`` in channel ``2k + 1``; ``mask``
  ``[B, K, Ho, Wo]`` multiplies the sampled value of tap ``k``.
- Tap ``(i, j)`` of output ``(y, x)`` samples the input at
  ``(y * stride - pad + i * dilation + dy, x * stride - pad + j * dilation + dx)`` bilinearly; a
  corner outside the map contributes 0 (so a point at or beyond ``-1`` / ``H`` samples 0).
- The bias is added after the (im2col x weight) product.

``modulated_deform_conv2d`` is differentiable (plain torch ops: gather, matmul). While
``torch.onnx.export`` (legacy exporter, opset >= 19) traces it, it calls the custom op
``fiber::modulated_deform_conv2d`` instead, which the registered symbolic turns into one
``DeformConv`` node; ONNX Runtime runs that node on CPU. Groups and offset groups are 1
(all DyHead needs).

``flat_offsets``: the official kernel reads an offset/mask block of another spatial size as flat
memory with the output's shape (golden/fine README D3); this reproduces that with a
reshape + slice (plain ``Reshape``/``Slice`` in ONNX).
"""
from __future__ import annotations

import math

import torch
from torch import nn

DEFORM_CONV_OPSET = 19  # first ONNX opset with DeformConv


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis (the kernel's formula)."""
    return (size + 2 * padding - (dilation * (kernel - 1) + 1)) // stride + 1


def flat_offsets(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, height, width]``: each image's block read as flat memory.

    ``t[b].reshape(-1)[:C * height * width].view(C, height, width)`` for every b (needs
    ``height * width <= H * W``). The identity when the sizes already match.
    """
    b, c, h, w = t.shape
    if (h, w) == (height, width):
        return t
    if height * width > h * w:
        raise ValueError(f"flat offsets: cannot read {c}x{height}x{width} from a {c}x{h}x{w} block")
    return t.flatten(1)[:, :c * height * width].reshape(-1, c, height, width)


def _bilinear_zero(x: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``x`` ``[B, C, H, W]`` at ``py``/``px`` ``[B, P]`` -> ``[B, C, P]``;
    corners outside the map count as 0 (the CUDA kernel's ``dmcn_im2col_bilinear``)."""
    bsz, chans, height, width = x.shape
    flat = x.reshape(bsz, chans, height * width)
    y0, x0 = torch.floor(py), torch.floor(px)
    ly, lx = py - y0, px - x0
    hy, hx = 1 - ly, 1 - lx
    y0, x0 = y0.long(), x0.long()
    out = None
    for dy, dx, wgt in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        yy, xx = y0 + dy, x0 + dx
        valid = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        idx = (yy.clamp(0, height - 1) * width + xx.clamp(0, width - 1))              # [B, P]
        v = flat.gather(2, idx.unsqueeze(1).expand(bsz, chans, idx.shape[1]))       # [B, C, P]
        term = v * (wgt * valid.to(wgt.dtype)).unsqueeze(1)
        out = term if out is None else out + term
    return out


def _deform_conv_torch(x: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                       bias: torch.Tensor | None, stride: int, padding: int, dilation: int) -> torch.Tensor:
    bsz, chans, height, width = x.shape
    cout, cin, kh, kw = weight.shape
    if cin != chans:
        raise ValueError(f"deform conv: input has {chans} channels, weight expects {cin} (groups must be 1)")
    ho = output_size(height, kh, stride, padding, dilation)
    wo = output_size(width, kw, stride, padding, dilation)
    taps = kh * kw
    if tuple(offset.shape) != (bsz, 2 * taps, ho, wo) or tuple(mask.shape) != (bsz, taps, ho, wo):
        raise ValueError(f"deform conv: offset {tuple(offset.shape)} / mask {tuple(mask.shape)} do not "
                         f"match the output [{bsz}, {2 * taps}|{taps}, {ho}, {wo}] (one offset group)")
    dev, dt = x.device, x.dtype
    ky = (torch.arange(kh, device=dev, dtype=dt) * dilation).repeat_interleave(kw)   # [K]
    kx = (torch.arange(kw, device=dev, dtype=dt) * dilation).repeat(kh)
    base_y = torch.arange(ho, device=dev, dtype=dt) * stride - padding                 # [Ho]
    base_x = torch.arange(wo, device=dev, dtype=dt) * stride - padding
    off = offset.reshape(bsz, taps, 2, ho, wo)
    py = base_y[None, None, :, None] + ky[None, :, None, None] + off[:, :, 0]          # [B, K, Ho, Wo]
    px = base_x[None, None, None, :] + kx[None, :, None, None] + off[:, :, 1]
    cols = _bilinear_zero(x, py.reshape(bsz, -1), px.reshape(bsz, -1))                # [B, C, K*Ho*Wo]
    cols = cols * mask.reshape(bsz, 1, -1)
    out = torch.matmul(weight.reshape(cout, cin * taps), cols.reshape(bsz, cin * taps, ho * wo))
    if bias is not None:
        out = out + bias[None, :, None]
    return out.reshape(bsz, cout, ho, wo)


@torch.library.custom_op("fiber::modulated_deform_conv2d", mutates_args=())
def _deform_conv_op(x: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                    bias: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """The torch computation as one dispatcher op: what the ONNX tracer records (no autograd)."""
    return _deform_conv_torch(x, weight, offset, mask, bias, stride, padding, dilation)


@_deform_conv_op.register_fake
def _(x, weight, offset, mask, bias, stride, padding, dilation):
    k = weight.shape[-1]
    return x.new_empty(x.shape[0], weight.shape[0], output_size(x.shape[2], k, stride, padding, dilation),
                       output_size(x.shape[3], k, stride, padding, dilation))


def _deform_conv_symbolic(g, x, weight, offset, mask, bias, stride, padding, dilation):
    """ONNX ``DeformConv`` (opset >= 19; inputs X, W, offset, B, mask) for the legacy exporter."""
    from torch.onnx import symbolic_helper as sh
    if g.opset < DEFORM_CONV_OPSET:
        raise RuntimeError(f"DeformConv needs ONNX opset >= {DEFORM_CONV_OPSET}, exporting at {g.opset}")
    s, p, d = (sh._get_const(v, "i", n) for v, n in ((stride, "stride"), (padding, "padding"),
                                                      (dilation, "dilation")))
    kernel = weight.type().sizes()[2:]
    return g.op("DeformConv", x, weight, offset, bias, mask, dilations_i=[d] * 2, group_i=1,
                kernel_shape_i=list(kernel), offset_group_i=1, pads_i=[p] * 4, strides_i=[s] * 2)


torch.onnx.register_custom_op_symbolic("fiber::modulated_deform_conv2d", _deform_conv_symbolic, 1)


def modulated_deform_conv2d(x: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                            bias: torch.Tensor | None = None, stride: int = 1, padding: int = 0,
                            dilation: int = 1) -> torch.Tensor:
    """DCNv2: ``x`` ``[B, C, H, W]``, ``weight`` ``[O, C, kh, kw]``, ``offset`` ``[B, 2*kh*kw, Ho, Wo]``
    ((dy, dx) per tap), ``mask`` ``[B, kh*kw, Ho, Wo]``, ``bias`` ``[O]`` -> ``[B, O, Ho, Wo]``."""
    if torch.onnx.is_in_onnx_export():
        if bias is None:
            bias = weight.new_zeros(weight.shape[0])
        return _deform_conv_op(x, weight, offset, mask, bias, int(stride), int(padding), int(dilation))
    return _deform_conv_torch(x, weight, offset, mask, bias, stride, padding, dilation)


class ModulatedDeformConv(nn.Module):
    """maskrcnn_benchmark's ``ModulatedDeformConv`` (parameters ``weight`` ``[O, C, k, k]``, ``bias``
    ``[O]``; init uniform(+-1/sqrt(C*k*k)), bias 0). ``forward(x, offset, mask)``; the offsets and
    mask come from outside (DyHead's shared ``offset`` conv)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, bias: bool = True):
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        stdv = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        nn.init.uniform_(self.weight, -stdv, stdv)

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        k = self.weight.shape[-1]
        return (output_size(height, k, self.stride, self.padding, self.dilation),
                output_size(width, k, self.stride, self.padding, self.dilation))

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return modulated_deform_conv2d(x, self.weight, offset, mask, self.bias, self.stride,
                                       self.padding, self.dilation)

    def extra_repr(self) -> str:
        o, c, k, _ = self.weight.shape
        return f"{c}, {o}, kernel_size={k}, stride={self.stride}, padding={self.padding}"
