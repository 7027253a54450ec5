"""Torch-free pieces shared by every stage: atomic writes and the model-package contract."""
