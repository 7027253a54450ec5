"""The torch predictor: a trained ``FiberForGrounding`` behind the evaluation harness's ``predict``.

    predictor = TorchPredictor.from_checkpoint("runs/nano/fine")
    dets = predictor(image_rgb_uint8, "the red star left of the blue ring", [[[4, 12]]])

Same steps as the runtime ``Detector`` on a model package, in torch: tokenise with the runtime
``PromptTokenizer`` (bucket-padded), ``encode_text`` once per prompt (cached), letterbox with
``runtime.preprocess.Preprocessor``, ``detect``, then ``runtime.postprocess.postprocess``.
Post-processing defaults: the evaluation protocol's (``fiber.data.evaluation.EVAL_POSTPROCESS``),
the same the package accuracy numbers use. The harness calls one image at a time, so nothing is
batched across images.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from common.package import text_buckets
from fiber.checkpoint import load_fine_model
from fiber.config import ModelConfig
from fiber.data.evaluation import EVAL_POSTPROCESS
from runtime.postprocess import postprocess
from runtime.preprocess import Preprocessor
from runtime.tokenize import EncodedPrompt, PromptTokenizer
from runtime.types import Detections
from train.data import build_tokenizer
from train.distributed import resolve_device



class TorchPredictor:
    """``predict(image_rgb_uint8 [H, W, 3], prompt, phrase_spans) -> Detections`` (source pixels).

    model: anything with ``cfg`` (a ``ModelConfig``), ``encode_text(ids, mask)`` and
    ``detect(image, text_hidden, mask)`` as ``FiberForGrounding``.
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu",
                 post: Mapping[str, Any] = EVAL_POSTPROCESS, tokenizer: PromptTokenizer | None = None,
                 cache_size: int = 64):
        cfg: ModelConfig = model.cfg
        self.model, self.cfg, self.post = model, cfg, dict(post)  # postprocess keyword arguments
        self.device = torch.device(device)
        self.tokenizer = tokenizer or build_tokenizer(cfg, text_buckets(cfg.max_text_len))
        self.pre = Preprocessor(cfg.swin.img_size, cfg.image_mean, cfg.image_std)
        self._cache: OrderedDict[tuple, tuple[EncodedPrompt, torch.Tensor]] = OrderedDict()
        self.cache_size = cache_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto",
                        post: Mapping[str, Any] = EVAL_POSTPROCESS) -> "TorchPredictor":
        dev = resolve_device(device)
        model, _ = load_fine_model(path, "evaluation", dev)
        return cls(model, dev, post)

    @torch.no_grad()
    def encode(self, prompt: str, phrase_spans: Sequence | None) -> tuple[EncodedPrompt, torch.Tensor]:
        """Tokenised prompt and its ``text_hidden`` [1, T, D] (LRU-cached by prompt and spans)."""
        key = (prompt, None if phrase_spans is None else
               tuple(tuple(tuple(int(v) for v in s) for s in p) for p in phrase_spans))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        enc = self.tokenizer.encode(prompt, phrase_spans)
        hidden = self.model.encode_text(torch.from_numpy(enc.input_ids).to(self.device),
                                        torch.from_numpy(enc.attention_mask).to(self.device))
        self._cache[key] = (enc, hidden)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return enc, hidden

    @torch.no_grad()
    def __call__(self, image: np.ndarray, prompt: str, phrase_spans: Sequence | None = None) -> Detections:
        enc, hidden = self.encode(prompt, phrase_spans)
        x, info = self.pre(image)
        mask = torch.from_numpy(enc.attention_mask).to(self.device)
        boxes, logits, ctr = self.model.detect(torch.from_numpy(x).to(self.device), hidden, mask)
        return postprocess(boxes[0].float().cpu().numpy(), logits[0].float().cpu().numpy(),
                           ctr[0].float().cpu().numpy(), enc.phrase_map, info, phrases=enc.phrases,
                           **self.post)
