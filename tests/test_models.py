"""The composite models on fiber-tiny-test: API, parity of the split paths, ONNX export, tiny overfits."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from fiber.config import get_config
from fiber.losses import GroundingLoss, GroundingTarget, mask_tokens_for_mlm
from fiber.models import FiberForGrounding, FiberForPretraining, build_model, pretraining_losses

CFG = get_config("fiber-tiny-test")
S = CFG.swin.img_size
SPECIAL = (0, 100, 101, 102, 103)


def _batch(b=2, t=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, S, S, generator=g)
    ids = torch.randint(1000, 2000, (b, t), generator=g)
    ids[:, 0] = 101
    mask = torch.ones(b, t, dtype=torch.long)
    mask[-1, t - 3:] = 0
    ids[mask == 0] = 0
    return image, ids, mask


def _targets(t=8):
    pm0 = torch.zeros(1, t)
    pm0[0, 1:3] = 1
    pm1 = torch.zeros(2, t)
    pm1[0, 1], pm1[1, 3:5] = 1, 1
    return [GroundingTarget(torch.tensor([[8.0, 8.0, 40.0, 36.0]]), pm0),
            GroundingTarget(torch.tensor([[30.0, 20.0, 60.0, 62.0], [2.0, 4.0, 22.0, 20.0]]), pm1)]


def test_build_model_and_parameter_names():
    fine, coarse = build_model(CFG, "fine"), build_model(CFG, "coarse")
    assert isinstance(fine, FiberForGrounding) and isinstance(coarse, FiberForPretraining)
    fine_keys = set(fine.state_dict())
    for k in ["fpn.fpn_inner2.weight", "fpn.fpn_layer4.bias", "head.bbox_pred.weight", "head.centerness.bias",
              "head.dot_product_projection_text.weight", "head.log_scale", "head.bias_lang", "head.bias0",
              "head.scales.0.scale", "head.scales.2.scale"]:
        assert k in fine_keys, k
    assert all(k.split(".")[0] in ("backbone", "fpn", "head") for k in fine_keys)
    coarse_top = {k.split(".")[0] for k in coarse.state_dict()}
    assert {"backbone", "cross_modal_text_transform", "itm_score", "mlm_score", "temp", "image_queue"} <= coarse_top
    with pytest.raises(ValueError, match="unknown model task"):
        build_model(CFG, "medium")


def test_encode_text_plus_detect_equals_forward():
    torch.manual_seed(0)
    model = FiberForGrounding(CFG).eval()
    model.backbone.set_gates(0.5)      # exercise the fused path
    image, ids, mask = _batch()
    with torch.no_grad():
        out = model(image, ids, mask)
        boxes, logits, ctr = model.detect(image, model.encode_text(ids, mask), mask)
    assert torch.equal(boxes, out.boxes) and torch.equal(logits, out.token_logits) and torch.equal(ctr, out.centerness)
    n = sum(out.level_sizes)
    assert boxes.shape == (2, n, 4) and logits.shape == (2, n, 8) and ctr.shape == (2, n)


def test_alignment_logits_at_init_are_the_prior():
    torch.manual_seed(0)
    model = FiberForGrounding(CFG).eval()
    image, ids, mask = _batch()
    with torch.no_grad():
        logits = model(image, ids, mask).token_logits
    real = mask.bool().unsqueeze(1).expand_as(logits)
    dev = (logits[real] - math.log(0.01 / 0.99)).abs()
    assert dev.mean() < 0.75 and dev.max() < 3.0
    assert 0.005 < torch.sigmoid(logits[real]).mean() < 0.02


def test_detect_exports_to_onnx_with_dynamic_tokens():
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = FiberForGrounding(CFG).eval()
    model.backbone.set_gates(0.5)
    image, ids, mask = _batch(1, 8)
    names_in, names_out = ["image", "text_hidden", "attention_mask"], ["boxes", "token_logits", "centerness"]
    f = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model.detector_graph(), (image, model.encode_text(ids, mask), mask), f,
                          dynamo=False, opset_version=17, input_names=names_in, output_names=names_out,
                          dynamic_axes={"image": {0: "batch"}, "text_hidden": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"}, "boxes": {0: "batch"},
                                        "token_logits": {0: "batch", 2: "tokens"}, "centerness": {0: "batch"}})
    assert not model.training                 # the export must not switch dropout back on
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    for b, t in ((1, 8), (2, 13)):
        image, ids, mask = _batch(b, t, seed=t)
        with torch.no_grad():
            hidden = model.encode_text(ids, mask)
            ref = model.detect(image, hidden, mask)
        got = sess.run(None, {"image": image.numpy(), "text_hidden": hidden.numpy(), "attention_mask": mask.numpy()})
        for name, r, g in zip(names_out, ref, got):
            assert g.shape == tuple(r.shape), name
            np.testing.assert_allclose(g, r.numpy(), atol=1e-4, rtol=1e-4, err_msg=f"{name} (B={b}, T={t})")


def test_letterbox_canvas_keeps_the_square_computation_and_runs_on_hw(monkeypatch):
    """A letterbox config on a fixed [H, W] canvas (``compress.export --canvas``): the coarse Swin
    pads each grid to its stage's window and keeps the stage's shift. At the square img_size that
    path is the same computation as the fixed-grid one; on 64 x 96 the model runs and its ONNX
    export matches it."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = FiberForGrounding(CFG).eval()
    model.backbone.set_gates(0.5)
    image, ids, mask = _batch(1, 8)
    with torch.no_grad():
        hidden = model.encode_text(ids, mask)
        square = model.detect(image, hidden, mask)
        monkeypatch.setattr(type(model.backbone.image), "square_input", lambda self, image: False)
        padded = model.detect(image, hidden, mask)
        monkeypatch.undo()
    for a, b in zip(square, padded):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)

    cfg = CFG.with_canvas((64, 96))
    assert cfg.input_hw == (64, 96) and CFG.with_canvas((S, S)) == CFG
    assert type(CFG).from_dict(cfg.to_dict()) == cfg and "letterbox_canvas" not in CFG.to_dict()["input"]
    model.cfg = cfg
    wide = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.detect(wide, hidden, mask)
    assert ref[0].shape[1] == sum((64 // st) * (96 // st) for st in (8, 16, 32))
    f = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model.detector_graph(), (wide, hidden, mask), f, dynamo=False, opset_version=17,
                          input_names=["image", "text_hidden", "attention_mask"])
    got = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"]).run(
        None, {"image": wide.numpy(), "text_hidden": hidden.numpy(), "attention_mask": mask.numpy()})
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r.numpy(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="not divisible by 32"):
        CFG.with_canvas((64, 100))


def _head_params(model):
    return {n: p for n, p in model.named_parameters() if n.startswith(("fpn.", "head."))}


def test_grounding_overfit_each_part_falls_and_gradients_reach_the_head():
    torch.manual_seed(0)
    model = FiberForGrounding(CFG).train()
    image, ids, mask = _batch()
    targets, loss_fn = _targets(), GroundingLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    history = []
    for step in range(30):
        parts = loss_fn(model(image, ids, mask), targets, mask)
        assert all(torch.isfinite(v) for v in parts.values()), parts
        opt.zero_grad()
        parts["loss"].backward()
        if step == 0:
            # a level's box scale only gets a gradient if that level has a positive anchor
            idle = {f"head.scales.{lvl}.scale" for lvl in range(1, 3)}
            missing = [n for n, p in _head_params(model).items()
                       if n not in idle and (p.grad is None or not p.grad.abs().sum() > 0)]
            assert not missing, f"no gradient: {missing}"
        opt.step()
        history.append({k: v.item() for k, v in parts.items()})
    first, last = history[0], history[-1]
    for k in ("loss_token", "loss_box", "loss_centerness", "loss"):
        assert last[k] < first[k], (k, first[k], last[k])
    assert last["loss"] < 0.6 * first["loss"]


def _coarse_step(model, batch, mlm_ids, labels, gen):
    out = model(*batch, mlm_input_ids=mlm_ids, generator=gen, update_queue=False)
    return out, pretraining_losses(out, labels)


def test_pretraining_overfit_each_loss_falls_and_gradients_reach_the_heads():
    torch.manual_seed(0)
    model = FiberForPretraining(CFG).eval()   # no dropout: the fall is the optimiser's, not noise
    model.backbone.set_gates(0.5)              # with gates at 0, ITM cannot beat the label prior
    batch = _batch()
    gen = torch.Generator().manual_seed(0)
    mlm_ids, labels = mask_tokens_for_mlm(batch[1], batch[2], vocab_size=CFG.text.vocab_size, mask_token_id=103,
                                          special_token_ids=SPECIAL, prob=0.3, generator=gen)
    assert (labels != -100).any()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    history = []
    for step in range(25):
        out, losses = _coarse_step(model, batch, mlm_ids, labels, gen)
        assert out.itm_logits.shape == (6, 2) and out.mlm_logits.shape == (2, 8, CFG.text.vocab_size)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        losses["loss"].backward()
        if step == 0:
            heads = {n: p for n, p in model.named_parameters() if not n.startswith("backbone.")}
            missing = [n for n, p in heads.items() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, f"no gradient: {missing}"
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    for k in ("loss_itc", "loss_itm", "loss_mlm", "loss"):
        assert history[-1][k] < 0.9 * history[0][k], (k, history[0][k], history[-1][k])
    # below the entropy of the 1/3 label prior (0.637): the fused pairs are really told apart
    assert history[-1]["loss_itm"] < 0.62


def test_pretraining_queue_fills_in_training_only():
    torch.manual_seed(0)
    model = FiberForPretraining(CFG)
    batch = _batch()
    model.eval()
    with torch.no_grad():
        out = model(*batch)
    assert int(model.queue_total) == 0 and out.mlm_logits is None and out.image_queue.shape[1] == 0
    model.train()
    with torch.no_grad():
        model(*batch)
        out = model(*batch)
    assert int(model.queue_total) == 4 and out.image_queue.shape == (CFG.text.hidden_size, 2)
    losses = pretraining_losses(out)
    assert set(losses) == {"loss_itc", "loss_itm", "loss"}
    with pytest.raises(ValueError, match="mlm_labels"):
        pretraining_losses(out.__class__(**{**out.__dict__, "mlm_logits": torch.zeros(2, 8, 3)}))
