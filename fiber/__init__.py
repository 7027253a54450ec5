"""fiber: the FIBER model library (Swin + text encoder with fusion in the backbone).

This module imports nothing heavy so that ``fiber.data`` stays usable without torch.
"""
__version__ = "0.1.0"
