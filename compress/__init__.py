"""Compression: distillation, INT8 quantisation, export to model packages."""
