"""Test-side name of fiber.official_layout (the official fine release layout, by rule)."""
from fiber.official_layout import GOLDEN_SMALL, official_fine_shapes, random_state_dict  # noqa: F401
