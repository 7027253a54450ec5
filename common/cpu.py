"""What this CPU can do, from /proc/cpuinfo (Linux): its model name and instruction-set flags.

Several decisions depend on them: whether int8 GEMMs saturate (no VNNI: engines.options), whether
bf16 autocast is native (train.loop), and the key under which the runtime remembers the fastest
CPU path (engines.autotune).
"""
from __future__ import annotations

import functools
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@functools.lru_cache(maxsize=1)
def read_cpuinfo() -> str | None:
    """/proc/cpuinfo's text, or None where there is none (not Linux); read once per process (every
    package load asks, the answer does not change)."""
    try:
        return CPUINFO.read_text()
    except OSError:
        return None


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first processor in ``cpuinfo`` text (every word, when no "flags" line)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set(cpuinfo.split())


def cpu_model(cpuinfo: str) -> str:
    """The first "model name" of ``cpuinfo`` text ('' when there is none)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return ""
