"""The readable account of a scenario run: each step with how long it took.

Steps print as they finish, so a long scenario shows where it is, and a failed
step says which one failed and after how long. Figures (named numbers such as
a catch-up time) are kept for callers that want them, e.g. the benchmark.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO


def duration(seconds: float) -> str:
    """84 ms, 1.25 s, 2 min 5 s."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


@dataclass
class Step:
    """A step in progress; its `text` may be refined once the outcome is known."""

    text: str
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0


class Report:
    def __init__(self, title: str, stream: TextIO | None = None) -> None:
        self.title = title
        self.stream = stream if stream is not None else sys.stdout
        self.lines: list[str] = []
        self.figures: dict[str, float] = {}
        self.started = time.monotonic()
        self._emit(title)

    def _emit(self, line: str) -> None:
        self.lines.append(line)
        print(line, file=self.stream, flush=True)

    @contextmanager
    def step(self, text: str) -> Iterator[Step]:
        """Time the block; print `<time>  <text>` when it ends (FAILED if it raised)."""
        s = Step(text)
        try:
            yield s
        except BaseException:
            s.seconds = time.monotonic() - s.started
            self._emit(f"  {'FAILED':>9}  {s.text} (after {duration(s.seconds)})")
            raise
        s.seconds = time.monotonic() - s.started
        self._emit(f"  {duration(s.seconds):>9}  {s.text}")

    def timed(self, text: str, seconds: float) -> None:
        """A step timed elsewhere."""
        self._emit(f"  {duration(seconds):>9}  {text}")

    def note(self, text: str) -> None:
        self._emit(f"  {'':>9}  {text}")

    def figure(self, name: str, value: float) -> None:
        self.figures[name] = value

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def text(self) -> str:
        return "\n".join(self.lines)
