"""A one-line progress display on stderr, only when stderr is a terminal (dependency-free).

    bar = progress_line(enabled=True)           # None when stderr is not a TTY or enabled is False
    for x in (bar(items, desc="eval") if bar else items): ...

``progress_line`` returns a callable with tqdm's calling convention (``bar(items, desc=..., total=...,
unit=...)`` -> an iterator over ``items``), so code that takes an optional ``progress`` (e.g.
``fiber.data.evaluation.evaluate``) works with either. The line is rewritten in place with ``\\r``
at most every ``interval`` seconds and ends with a newline; a pipe, a file or a CI log gets nothing.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

Progress = Callable[..., Iterator[Any]]


def is_terminal(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stderr) is attached to a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def progress_line(enabled: bool | None = True, stream: TextIO | None = None,
                  interval: float = 0.5) -> Progress | None:
    """A tqdm-like wrapper drawing ``desc: done/total unit [elapsed<eta]`` on ``stream`` (stderr),
    or None when ``enabled`` is False or the stream is not a terminal."""
    stream = sys.stderr if stream is None else stream
    if enabled is False or not is_terminal(stream):
        return None

    def bar(items: Iterable[Any], desc: str = "", total: int | None = None, unit: str = "it",
            **_: Any) -> Iterator[Any]:
        if total is None:
            try:
                total = len(items)  # type: ignore[arg-type]
            except TypeError:
                total = None
        start = last = time.perf_counter()
        done = 0

        def draw(now: float) -> None:
            elapsed = now - start
            text = f"{desc}: {done}" + (f"/{total}" if total else "") + f" {unit} [{_clock(elapsed)}"
            if total and done:
                text += f"<{_clock(elapsed / done * (total - done))}"
            stream.write(f"\r{text}]\x1b[K")
            stream.flush()

        draw(start)
        try:
            for item in items:
                yield item
                done += 1
                now = time.perf_counter()
                if now - last >= interval:
                    draw(now)
                    last = now
        finally:
            draw(time.perf_counter())
            stream.write("\n")
            stream.flush()

    return bar
