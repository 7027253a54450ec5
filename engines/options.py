"""What the engine backends share: option dataclass checks and the cache folder."""
from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

from engines.errors import EngineError


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fiber-edge"


def choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise EngineError(f"option {name}={value!r} is not one of {sorted(allowed)}")


def option_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def make_options(cls, opts: Mapping[str, Any], backend: str):
    """``cls(**opts)`` with one clear EngineError for an unknown option name."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise EngineError(f"unknown option(s) {unknown} for backend {backend!r}; known: {known}")
    return cls(**opts)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
