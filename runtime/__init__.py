"""The torch-free runtime: pre/post-processing, tokenisation, predictor, sources, CLI."""
