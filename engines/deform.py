"""Deformable convolution (ONNX ``DeformConv``, opset 19) on backends that lack it (torch-free).

A DyHead package carries the canonical op (``DeformConv``: inputs X, W, offset, optional B,
optional mask); each backend lowers it to what runs best there:

- ONNX Runtime (>= 1.25): its native CPU kernel ("native").
- OpenVINO: ``openvino_extensions()`` maps it to ``DeformableConvolution``-8 with
  ``bilinear_interpolation_pad=True`` when the ONNX file is read ("native": OpenVINO's own op).
- TensorRT: the ``ModulatedDeformConv2d`` plugin of libnvinfer_plugin when it is there ("plugin",
  FP32/FP16), else ``lower_deform_conv`` ("gridsample"); TensorRT-RTX: always ``lower_deform_conv``.

``lower_deform_conv(model)`` replaces every DeformConv by plain ops that every runtime has:

    Xp    = Pad(X, 1 zero ring)                                   [B, C, H+2, W+2]  (no 1-pixel edge case)
    grid  = ((base + (dx, dy)) * 2 / (size+1) - 1), tap-major within each output row
                                                                  [B, Ho*K, Wo, 2]  (x, y)
    S     = GridSample(Xp, grid, bilinear, zeros, align_corners=1) * mask    [B, C, Ho*K, Wo]
    Y     = Conv(S, W as [O, C, K, 1], stride (K, 1)) + B          [B, O, Ho, Wo]

where tap k = (i, j) of output (y, x) samples X at (y*sy - pad_top + i*dy_dil + dy,
x*sx - pad_left + j*dx_dil + dx) bilinearly with zeros outside (the DeformConv definition). Rows
of S are ``y * K + k``, so the (K, 1) kernel with stride (K, 1) sums the taps of one output row
and no large tensor is reshaped. The sampling coordinates and GridSample are named under
``FP32_SCOPE``: FP16 engine builds keep them in FP32 (FP16 cannot hold a pixel coordinate of a
P3 map to better than 0.25 px). Needs group = offset_group = 1 (all the DyHead uses).
"""
from __future__ import annotations

from typing import Any

import numpy as np

DEFORM_OP = "DeformConv"
FP32_SCOPE = "deform_fp32/"       # node-name marker: engines.build.to_fp16 keeps these nodes in FP32
PLUGIN = "ModulatedDeformConv2d"  # the TensorRT plugin the ONNX parser uses for DeformConv


class DeformConvError(ValueError):
    """A DeformConv node this module cannot lower (groups, offset groups, unknown kernel)."""


def count_deform_convs(model) -> int:
    """How many DeformConv nodes the main graph of ``model`` (onnx.ModelProto) has."""
    return sum(1 for n in model.graph.node if n.op_type == DEFORM_OP and n.domain in ("", "ai.onnx"))


def package_has_deform_conv(manifest) -> bool:
    """Does a package's detector carry DeformConv nodes? compress.export writes them for the DyHead
    (``model.config.head.kind == "dyhead"``); read from the manifest, not the (large) ONNX file."""
    head = (((manifest.get("model") or {}).get("config") or {}).get("head") or {})
    return head.get("kind") == "dyhead"


def deform_convs_in(path) -> int:
    """DeformConv nodes in the ONNX file ``path``; 0 without the onnx package or when onnx cannot
    read the file (the backend's own loader then reports what is wrong)."""
    try:
        import onnx

        return count_deform_convs(onnx.load(str(path), load_external_data=False))
    except Exception:  # ImportError, DecodeError: nothing to rewrite or report here
        return 0


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _opset(model) -> int:
    return max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] or [0])


class _Builder:
    """Emits the nodes and initializers of one lowered DeformConv with unique names."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.inits = prefix, [], []

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        full = f"{self.prefix}{name}"
        self.inits.append(numpy_helper.from_array(np.asarray(array), full))
        return full

    def op(self, op_type: str, inputs: list[str], name: str, fp32: bool = False, output: str | None = None,
           **attrs) -> str:
        from onnx import helper

        out = output or f"{self.prefix}{name}"
        node_name = (FP32_SCOPE if fp32 else "") + f"{self.prefix}{name}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=node_name, **attrs))
        return out


def _lower_one(node, index: int, opset: int) -> tuple[list, list]:
    """(nodes, initializers) computing ``node``'s output with Pad / GridSample / Mul / Conv."""
    from onnx import TensorProto

    a = _attrs(node)
    if a.get("group", 1) != 1 or a.get("offset_group", 1) != 1:
        raise DeformConvError(f"DeformConv {node.name!r}: group={a.get('group', 1)}, offset_group="
                              f"{a.get('offset_group', 1)}; only 1 and 1 can be lowered (DyHead's)")
    kernel = a.get("kernel_shape")
    if not kernel or len(kernel) != 2:
        raise DeformConvError(f"DeformConv {node.name!r}: needs a 2-D kernel_shape attribute, got {kernel!r}")
    kh, kw = (int(k) for k in kernel)
    taps = kh * kw
    sy, sx = (int(s) for s in a.get("strides", [1, 1]))
    dy, dx = (int(d) for d in a.get("dilations", [1, 1]))
    pads = [int(p) for p in a.get("pads", [0, 0, 0, 0])]
    pad_t, pad_l = pads[0], pads[1]
    x, w, offset = node.input[0], node.input[1], node.input[2]
    bias = node.input[3] if len(node.input) > 3 and node.input[3] else ""
    mask = node.input[4] if len(node.input) > 4 and node.input[4] else ""

    b = _Builder(f"{node.name or 'deform'}_{index}/")
    i64 = lambda name, v: b.const(name, np.asarray(v, dtype=np.int64))  # noqa: E731
    f32 = lambda name, v: b.const(name, np.asarray(v, dtype=np.float32))  # noqa: E731
    # --- sizes: Ho, Wo from the offsets; the padded input's H+1, W+1 (align_corners=1 span)
    off_shape = b.op("Shape", [offset], "offset_shape")
    ho = b.op("Slice", [off_shape, i64("i2", [2]), i64("i3", [3])], "ho")               # [1] int64
    wo = b.op("Slice", [off_shape, i64("i3b", [3]), i64("i4", [4])], "wo")
    x_shape = b.op("Shape", [x], "x_shape")
    hw = b.op("Slice", [x_shape, i64("i2b", [2]), i64("i4b", [4])], "hw")               # [H, W]
    span = b.op("Cast", [b.op("Add", [hw, i64("one2", [1, 1])], "hw1")], "span", fp32=True,
                to=TensorProto.FLOAT)                                                     # [H+1, W+1]
    scale_yx = b.op("Div", [f32("two", [2.0]), span], "scale_yx", fp32=True)              # 2 / (H+1), 2 / (W+1)
    scale_xy = b.op("Gather", [scale_yx, i64("flip", [1, 0])], "scale_xy", fp32=True, axis=0)
    # --- base sampling points in the padded map, [Ho, K, Wo] each; padded = original + 1
    ii, jj = np.divmod(np.arange(taps), kw)
    tap_y = f32("tap_y", (ii * dy - pad_t + 1).reshape(1, taps, 1))
    tap_x = f32("tap_x", (jj * dx - pad_l + 1).reshape(1, taps, 1))
    zero, step = i64("zero", 0), i64("step", 1)
    rows = b.op("Range", [zero, b.op("Squeeze", [ho], "ho_s"), step], "rows")
    cols = b.op("Range", [zero, b.op("Squeeze", [wo], "wo_s"), step], "cols")
    ys = b.op("Mul", [b.op("Cast", [rows], "rows_f", fp32=True, to=TensorProto.FLOAT), f32("sy", sy)], "ys",
              fp32=True)
    xs = b.op("Mul", [b.op("Cast", [cols], "cols_f", fp32=True, to=TensorProto.FLOAT), f32("sx", sx)], "xs",
              fp32=True)
    grid_shape = b.op("Concat", [ho, i64("k", [taps]), wo], "grid_shape", axis=0)         # [Ho, K, Wo]
    by = b.op("Add", [b.op("Reshape", [ys, i64("col3", [-1, 1, 1])], "ys3"), tap_y], "by", fp32=True)
    bx = b.op("Add", [b.op("Reshape", [xs, i64("row3", [1, 1, -1])], "xs3"), tap_x], "bx", fp32=True)
    by = b.op("Expand", [by, grid_shape], "by_full", fp32=True)
    bx = b.op("Expand", [bx, grid_shape], "bx_full", fp32=True)
    base = b.op("Concat", [b.op("Unsqueeze", [bx, i64("last", [-1])], "bx_u", fp32=True),
                           b.op("Unsqueeze", [by, i64("last_b", [-1])], "by_u", fp32=True)],
                "base", fp32=True, axis=-1)                                              # [Ho, K, Wo, 2] (x, y)
    # --- offsets [B, 2K, Ho, Wo] ((dy, dx) per tap) -> [B, Ho, K, Wo, 2] (dx, dy)
    shape5 = b.op("Concat", [i64("b0", [0, taps, 2]), ho, wo], "shape5", axis=0)
    off5 = b.op("Reshape", [offset, shape5], "off5", fp32=True)                          # [B, K, 2, Ho, Wo]
    off5 = b.op("Gather", [off5, i64("flip_b", [1, 0])], "off_xy", fp32=True, axis=2)
    off5 = b.op("Transpose", [off5], "off_t", fp32=True, perm=[0, 3, 1, 4, 2])            # [B, Ho, K, Wo, 2]
    points = b.op("Add", [off5, base], "points", fp32=True)
    grid5 = b.op("Sub", [b.op("Mul", [points, scale_xy], "scaled", fp32=True), f32("one", 1.0)], "grid5",
                 fp32=True)
    rows_k = b.op("Mul", [ho, i64("k1", [taps])], "rows_k")
    grid_rows = b.op("Concat", [i64("b0b", [0]), rows_k, wo, i64("two_i", [2])], "grid4_shape", axis=0)
    grid = b.op("Reshape", [grid5, grid_rows], "grid", fp32=True)                        # [B, Ho*K, Wo, 2]
    # --- sample, modulate, and the (K, 1) convolution over each output row's taps
    padded = b.op("Pad", [x, i64("pads", [0, 0, 1, 1, 0, 0, 1, 1])], "x_pad", mode="constant")
    mode = "linear" if opset >= 20 else "bilinear"
    sampled = b.op("GridSample", [padded, grid], "sampled", fp32=True, mode=mode, padding_mode="zeros",
                   align_corners=1)                                                       # [B, C, Ho*K, Wo]
    if mask:
        mask_rows = b.op("Concat", [i64("b0c", [0, 1]), rows_k, wo], "mask_shape", axis=0)
        m = b.op("Transpose", [mask], "mask_t", perm=[0, 2, 1, 3])                         # [B, Ho, K, Wo]
        sampled = b.op("Mul", [sampled, b.op("Reshape", [m, mask_rows], "mask_rows")], "modulated")
    w_shape = i64("w_shape", [0, 0, taps, 1])
    weight = b.op("Reshape", [w, w_shape], "weight")                                     # [O, C, K, 1]
    b.op("Conv", [sampled, weight] + ([bias] if bias else []), "conv", output=node.output[0],
         kernel_shape=[taps, 1], strides=[taps, 1])                                      # [B, O, Ho, Wo]
    return b.nodes, b.inits


def lower_deform_conv(model):
    """``model`` (onnx.ModelProto) with every DeformConv replaced by the GridSample rewrite.

    Returns a new ModelProto (the input is not changed); a model without DeformConv comes back as
    an unchanged copy. The opset stays (DeformConv needs 19, GridSample 16; from opset 20 its mode
    is spelt "linear"). Raises DeformConvError for nodes it cannot lower.
    """
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    if count_deform_convs(model) == 0:
        return out
    opset = _opset(model)
    nodes, inits = [], []
    for i, node in enumerate(model.graph.node):
        if node.op_type == DEFORM_OP and node.domain in ("", "ai.onnx"):
            new_nodes, new_inits = _lower_one(node, i, opset)
            nodes.extend(new_nodes)
            inits.extend(new_inits)
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    return out


# ----------------------------------------------------------------------------- OpenVINO

def openvino_extensions() -> list:
    """OpenVINO ONNX-frontend extensions mapping ``DeformConv`` to ``DeformableConvolution``-8 with
    ``bilinear_interpolation_pad=True`` (the ONNX definition, which ONNX Runtime matches to 1e-7;
    OpenVINO's own ``org.openvinotoolkit::DeformableConv2D`` is wrong near borders). Pass each to
    ``Core.add_extension`` before ``read_model``."""
    from openvino.frontend.onnx import ConversionExtension

    return [ConversionExtension(DEFORM_OP, _openvino_deform_conv)]


def _openvino_deform_conv(ctx) -> list:
    import openvino.opset8 as ops

    def attr(name, default):
        return ctx.get_attribute(name) if ctx.has_attribute(name) else default

    group, offset_group = int(attr("group", 1)), int(attr("offset_group", 1))
    strides = [int(s) for s in attr("strides", [1, 1])]
    dilations = [int(d) for d in attr("dilations", [1, 1])]
    pads = [int(p) for p in attr("pads", [0, 0, 0, 0])]
    inputs = [ctx.get_input(i) for i in range(ctx.get_input_size())]
    x, w, offset = inputs[:3]
    bias = inputs[3] if len(inputs) > 3 and not _is_empty(inputs[3]) else None
    mask = inputs[4] if len(inputs) > 4 and not _is_empty(inputs[4]) else None
    y = ops.deformable_convolution(x, offset, w, strides=strides, pads_begin=pads[:2], pads_end=pads[2:],
                                   dilations=dilations, mask=mask, group=group, deformable_group=offset_group,
                                   bilinear_interpolation_pad=True)
    if bias is not None:
        shape = ops.constant(np.array([1, -1, 1, 1], dtype=np.int64))
        y = ops.add(y, ops.reshape(bias, shape, special_zero=False))
    return [y.output(0)]


def _is_empty(output) -> bool:
    """An omitted optional ONNX input arrives as an output with no names / an empty shape."""
    try:
        return output.get_node().get_type_name() == "NullNode" or not output.get_names() and \
            output.get_partial_shape().rank.get_length() == 0
    except Exception:
        return False
