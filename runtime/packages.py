"""Where the shipped model packages are: ``models/<name>`` in the working folder or the repository."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PACKAGES = ("fiber-nano-int8", "fiber-nano")  # first found under ./models or <repo>/models


def default_package() -> Path | None:
    """models/fiber-nano-int8 (then models/fiber-nano) in the working folder or the repository."""
    for root in (Path.cwd() / "models", REPO / "models"):
        for name in DEFAULT_PACKAGES:
            if (root / name / "manifest.json").is_file():
                return root / name
    return None
