"""fiber.deform (modulated deformable conv) against ONNX Runtime's DeformConv, and its ONNX export."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from fiber.deform import ModulatedDeformConv, flat_offsets, modulated_deform_conv2d, output_size
from fiber.heads.dyhead import DyConv

OPSET = 19


def _ort_deform_conv(x, w, offset, mask, bias, stride, pad, dilation=1):
    """One DeformConv node built with onnx.helper, run by ONNX Runtime on CPU."""
    names = ["x", "w", "offset", "b", "mask"]
    arrays = [a.numpy() for a in (x, w, offset, bias, mask)]
    node = helper.make_node("DeformConv", names, ["y"], kernel_shape=list(w.shape[2:]), strides=[stride] * 2,
                            pads=[pad] * 4, dilations=[dilation] * 2, group=1, offset_group=1)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape)) for n, a in zip(names, arrays)]
    graph = helper.make_graph([node], "dcn", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(zip(names, arrays)))[0]


def _case(gen, b, c, o, h, w, stride, pad=1, k=3, dilation=1, scale=3.0, integer=False):
    x = torch.randn(b, c, h, w, generator=gen)
    weight = torch.randn(o, c, k, k, generator=gen)
    bias = torch.randn(o, generator=gen)
    ho, wo = output_size(h, k, stride, pad, dilation), output_size(w, k, stride, pad, dilation)
    if integer:  # lands exactly on pixel centres and on the -1 / H borders
        offset = torch.randint(-5, 6, (b, 2 * k * k, ho, wo), generator=gen).float()
    else:
        offset = torch.randn(b, 2 * k * k, ho, wo, generator=gen) * scale
    mask = torch.rand(b, k * k, ho, wo, generator=gen)
    return x, weight, offset, mask, bias


@pytest.mark.parametrize("shape", [(2, 4, 5, 7, 9, 1, False), (1, 3, 2, 8, 6, 2, False),
                                   (2, 4, 4, 5, 5, 1, True), (1, 2, 3, 7, 4, 2, True),
                                   (2, 3, 3, 1, 5, 1, False)])
def test_matches_onnxruntime_deformconv(shape):
    b, c, o, h, w, stride, integer = shape
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    x, weight, offset, mask, bias = _case(gen, b, c, o, h, w, stride, integer=integer)
    ours = modulated_deform_conv2d(x, weight, offset, mask, bias, stride, 1)
    ref = _ort_deform_conv(x, weight, offset, mask, bias, stride, 1)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4, rtol=1e-4)
    # the offsets matter: the same conv with zero offsets differs
    plain = modulated_deform_conv2d(x, weight, torch.zeros_like(offset), mask, bias, stride, 1)
    assert (plain - ours).abs().max() > 0.1


def test_zero_offsets_unit_mask_is_conv2d():
    gen = torch.Generator().manual_seed(3)
    for stride in (1, 2):
        x, weight, offset, mask, bias = _case(gen, 2, 5, 6, 9, 8, stride)
        out = modulated_deform_conv2d(x, weight, torch.zeros_like(offset), torch.ones_like(mask), bias, stride, 1)
        torch.testing.assert_close(out, F.conv2d(x, weight, bias, stride=stride, padding=1), atol=1e-5, rtol=1e-5)


def test_half_pixel_offset_interpolates_and_outside_reads_zero():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    weight = torch.zeros(1, 1, 1, 1) + 1.0
    offset = torch.zeros(1, 2, 3, 4)
    offset[0, 1] = 0.5                           # dx = +0.5 everywhere
    out = modulated_deform_conv2d(x, weight, offset, torch.ones(1, 1, 3, 4), None, 1, 0)
    # inside: mean of the two neighbours; last column: half of the value (the outside corner is 0)
    assert torch.allclose(out[0, 0, :, :3], (x[0, 0, :, :3] + x[0, 0, :, 1:]) / 2)
    assert torch.allclose(out[0, 0, :, 3], x[0, 0, :, 3] / 2)
    offset[0, 1] = -1.0                          # one pixel left: column 0 reads outside -> 0
    out = modulated_deform_conv2d(x, weight, offset, torch.ones(1, 1, 3, 4), None, 1, 0)
    assert torch.equal(out[0, 0, :, 0], torch.zeros(3))


def test_flat_offsets_reads_each_image_as_flat_memory():
    t = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    out = flat_offsets(t, 2, 3)
    assert out.shape == (2, 3, 2, 3)
    for b in range(2):
        assert torch.equal(out[b], t[b].reshape(-1)[:18].view(3, 2, 3))
    assert flat_offsets(t, 4, 5) is t
    with pytest.raises(ValueError, match="cannot read"):
        flat_offsets(t, 5, 5)


def test_shape_mismatch_raises():
    x = torch.zeros(1, 2, 5, 5)
    with pytest.raises(ValueError, match="offset"):
        modulated_deform_conv2d(x, torch.zeros(3, 2, 3, 3), torch.zeros(1, 18, 4, 4), torch.zeros(1, 9, 4, 4), None, 1, 1)


def test_gradients_flow_to_input_weight_offset_and_mask():
    gen = torch.Generator().manual_seed(5)
    tensors = [t.requires_grad_() for t in _case(gen, 1, 2, 3, 6, 6, 1)]
    modulated_deform_conv2d(*tensors[:4], tensors[4], 1, 1).square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tensors)


class _Levels(nn.Module):
    """A DyConv block on five fixed-size levels (the export test's graph)."""

    def __init__(self, block: DyConv):
        super().__init__()
        self.block = block

    def forward(self, p3, p4, p5, p6, p7):
        return tuple(self.block([p3, p4, p5, p6, p7]))


def _export(module, args, path, opset=OPSET):
    names = [f"p{i}" for i in range(3, 8)]
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                          output_names=[f"y{i}" for i in range(3, 8)],
                          dynamic_axes={n: {0: "batch"} for n in names}, do_constant_folding=True)


def test_dyhead_block_exports_one_deformconv_per_conv(tmp_path):
    torch.manual_seed(0)
    block = DyConv(16, 8).eval()
    with torch.no_grad():  # non-trivial offsets, as the golden weights
        block.offset.weight.mul_(40.0)
    sizes = [(12, 14), (6, 7), (3, 4), (2, 2), (1, 1)]
    feats = tuple(torch.randn(2, 16, h, w) for h, w in sizes)
    path = tmp_path / "block.onnx"
    _export(_Levels(block), feats, path)
    graph = onnx.load(str(path))
    ops = [n.op_type for n in graph.graph.node]
    # 5 levels x DyConv.1, 4 x DyConv.2, 4 x DyConv.0
    assert ops.count("DeformConv") == 13
    # the 4 coarser-level branches read level l's offsets/mask flat (quirk D3): Reshape(Slice(...))
    producer = {out: n for n in graph.graph.node for out in n.output}
    feeds = sorted((producer[n.input[2]].op_type, producer[n.input[4]].op_type)
                   for n in graph.graph.node if n.op_type == "DeformConv")
    assert feeds == [("Reshape", "Reshape")] * 4 + [("Slice", "Sigmoid")] * 9
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (2, 1):
        inputs = {f"p{i + 3}": f[:batch].numpy() for i, f in enumerate(feats)}
        got = sess.run(None, inputs)
        with torch.no_grad():
            want = block([f[:batch] for f in feats])
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-4)


def test_export_below_opset_19_is_refused(tmp_path):
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = ModulatedDeformConv(2, 2)

        def forward(self, x, off, m):
            return self.conv(x, off, m)

    args = (torch.zeros(1, 2, 4, 4), torch.zeros(1, 18, 4, 4), torch.ones(1, 9, 4, 4))
    with pytest.raises(Exception, match="opset >= 19"):
        torch.onnx.export(One(), args, str(tmp_path / "x.onnx"), dynamo=False, opset_version=17)
