"""A small DyHead model package (random init) for the deformable-conv backend tests.

``fiber-tiny-dyhead-test``: fiber-tiny-test's towers (64 px Swin, 16-d text) with the official
DyHead (one DyConv block: 13 ``DeformConv`` nodes, 4 of them reading flat offsets through
Reshape/Slice), P3-P7 and the official input on a 64 x 96 canvas. `make_dyhead_checkpoint(root)`
writes a random checkpoint, `make_dyhead_package(root)` also exports it with compress.export (about 10 s here).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

CONFIG = "fiber-tiny-dyhead-test"
CANVAS = (64, 96)
OFFSET_GAIN = 8.0  # scales the random offset conv so offsets reach several pixels (and the borders)


def dyhead_config():
    from fiber.config import HeadConfig, InputConfig, get_config

    base = get_config("fiber-tiny-test")
    return base.replace(
        name=CONFIG,
        swin=dataclasses.replace(base.swin, window_rule="fixed-pad", drop_path_rate=0.0),
        head=HeadConfig(kind="dyhead", fpn_channels=16, num_convs=1, proj_dim=16, use_p6=True, use_p7=True,
                        gn_groups=4, pre_nms_top_n=40, detections_per_img=25),
        input=InputConfig(style="official", min_size=64, max_size=96, canvas=CANVAS))


def make_dyhead_checkpoint(root: Path, seed: int = 0) -> Path:
    """A random checkpoint of the config (gates opened, offsets of several pixels) -> ``root/ckpt``."""
    import torch

    from fiber.checkpoint import save_checkpoint
    from fiber.models import FiberForGrounding

    torch.manual_seed(seed)
    cfg = dyhead_config()
    model = FiberForGrounding(cfg)
    model.backbone.set_gates(0.5)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(".offset"):
                module.weight.mul_(OFFSET_GAIN)
    return save_checkpoint(root / "ckpt", model.state_dict(), cfg, {"task": "fine"})


def make_dyhead_package(root: Path, seed: int = 0) -> Path:
    """``make_dyhead_checkpoint`` -> compress.export -> ``root/pkg``."""
    from compress.export import ExportConfig, export_package

    ckpt = make_dyhead_checkpoint(root, seed)
    return export_package(ExportConfig(checkpoint=str(ckpt), out=str(root / "pkg"), buckets=(16,))).path
