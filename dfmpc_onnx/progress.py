"""Where the tool's messages go while it works: a progress bar with a time estimate on a terminal, a
plain line every tenth of the work elsewhere, nothing when quiet."""

from __future__ import annotations

import time
from typing import TextIO

BAR_WIDTH = 24


class Console:
    """Messages and progress for ``stream`` (None: nowhere, as under ``-q`` and by default in Python)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.terminal = stream is not None and hasattr(stream, "isatty") and stream.isatty()

    def say(self, message: str) -> None:
        if self.stream is not None:
            print(message, file=self.stream, flush=True)

    def progress(self, label: str, total: int, unit: str) -> Progress:
        """A task of ``total`` steps of ``unit`` (e.g. "convs"), shown as ``label``."""
        return Progress(self, label, total, unit)


class Progress:
    """One long task: ``advance`` after each step; the last step ends the line."""

    def __init__(self, console: Console, label: str, total: int, unit: str):
        self.console, self.label, self.total, self.unit = console, label, max(total, 1), unit
        self.done = 0
        self.start = time.monotonic()
        self.every = max(1, self.total // 10)

    def advance(self, detail: str = "") -> None:
        """One more step done; ``detail`` (e.g. the current loss) is shown beside the count."""
        self.done += 1
        if self.console.stream is None:
            return
        count = f"{self.label}: {self.done}/{self.total} {self.unit}" + (f", {detail}" if detail else "")
        if self.console.terminal:
            filled = BAR_WIDTH * self.done // self.total
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            end = "\n" if self.done >= self.total else ""
            print(f"\r{count} [{bar}] {self._remaining()}\033[K", end=end, file=self.console.stream, flush=True)
        elif self.done % self.every == 0 or self.done >= self.total:
            self.console.say(count)

    def _remaining(self) -> str:
        elapsed = time.monotonic() - self.start
        if self.done >= self.total:
            return f"{elapsed:.0f} s"
        left = elapsed / self.done * (self.total - self.done)
        return f"{int(left) // 60}:{int(left) % 60:02d} left"
