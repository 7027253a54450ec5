"""What the engine backends share: option dataclass checks and the cache folder."""
from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

from common.cpu import cpu_flags, read_cpuinfo
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


def int8_pairs_saturate(cpuinfo: str | None = None) -> bool:
    """True on an x86 CPU without VNNI (AVX2 only): there ONNX Runtime's (and OpenVINO's) uint8 x int8
    GEMMs add pairs of products in int16 with saturation (vpmaddubsw), and 2 * 255 * 127 > 32767.
    With VNNI (vpdpbusd), AMX, or off x86 the products add into int32. ``cpuinfo``: /proc/cpuinfo text."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return False
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    if cpuinfo is None:
        return False            # not Linux: no flags to read, assume the int32 path
    flags = cpu_flags(cpuinfo)
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}
