"""Torch-free dataset formats, the synthetic grounding generator, metrics and evaluation."""
