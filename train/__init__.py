"""Training: stage 1 (coarse: ITC, ITM, MLM) and stage 2 (fine: grounding/detection)."""
