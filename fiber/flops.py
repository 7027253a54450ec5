"""FLOPs of a grounding model in torch (``torch.utils.flop_counter``), at batch 1 and T text tokens.

A FLOP is one multiply or one add of a multiply-accumulate (FLOPs = 2 x MACs), on the ops that do
the work, as ``benchmarks.flops`` counts an exported package's ONNX graphs. Torch is imported when
a count is made, so ``giga`` is usable without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from common import package as pkg


def giga(flops: int, digits: int = 4) -> float:
    """FLOPs in units of 1e9, to ``digits`` significant digits (0.0001234, 1.912, 8.301)."""
    return float(f"{flops / 1e9:.{digits}g}")


def torch_flops(fn: Callable[..., Any], *args: Any) -> int:
    """FLOPs of ``fn(*args)`` by ``torch.utils.flop_counter``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def model_flops(model: Any, tokens: int = pkg.DEFAULT_BUCKETS[0]) -> dict[str, int]:
    """``{"text": FLOPs, "detector": FLOPs}`` of a grounding model (``encode_text`` / ``detect``) at
    batch 1, the config's input canvas (``input_hw``) and ``tokens`` text tokens; the weights do not
    matter, only the config."""
    import torch

    h, w = model.cfg.input_hw
    ids = torch.ones(1, tokens, dtype=torch.int64)
    mask = torch.ones(1, tokens, dtype=torch.int64)
    with torch.inference_mode():
        hidden = model.encode_text(ids, mask)
    return {"text": torch_flops(model.encode_text, ids, mask),
            "detector": torch_flops(model.detect, torch.zeros(1, 3, h, w), hidden, mask)}


def checkpoint_flops(checkpoint: str | Path, tokens: int = pkg.DEFAULT_BUCKETS[0]) -> dict[str, Any]:
    """``{"text": {...}, "detector": {...}}`` (as ``benchmarks.flops.GraphFlops.to_json``, without
    groups) of a fine checkpoint, by ``model_flops``."""
    from fiber.checkpoint import load_fine_model

    model, _ = load_fine_model(checkpoint, "FLOP counting")
    dims = {"batch": 1, "tokens": tokens}
    return {g: {"file": f"{checkpoint} ({g})", "dims": dims, "flops": v, "gflops": giga(v),
                "shapes_from": "torch.utils.flop_counter"} for g, v in model_flops(model, tokens).items()}
