"""Task heads on top of the fused backbone.

- ``fiber.heads.coarse``: stage-1 heads (ITC transforms/poolers + temperature + feature queue, ITM,
  MLM) with the official coarse parameter names.
- ``fiber.heads.grounding``: stage-2 FPN and the GLIP-style dense grounding head.
- ``fiber.heads.dyhead``: the official FIBER/GLIP DyHead.

Every head hyper-parameter is a field of ``fiber.config.HeadConfig`` (``ModelConfig.head``); the
``build_*`` functions read it from there.
"""
