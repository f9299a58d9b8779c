"""The progress bar of the long-running commands (learn, replay) and its total."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence


def count_files(paths: Sequence[str]) -> int:
    """Files under the paths, the bar's total (an mbox counts once, so the bar may run short)."""
    total = 0
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for _root, _dirs, files in os.walk(path):
                total += sum(1 for f in files if not f.startswith("."))
        elif path.exists():
            total += 1
    return total


class ProgressBar:
    """One line on stderr, redrawn at most `per_second` times a second."""

    WIDTH = 30

    def __init__(self, total: int | None, label: str = "", *, enabled: bool = True,
                 stream: Any = None, per_second: float = 10.0):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.interval = 1.0 / per_second
        self.started = time.monotonic()
        self.last = 0.0

    def update(self, done: int, detail: str = "", *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < self.interval and done != self.total:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        if self.total:
            filled = min(self.WIDTH, self.WIDTH * done // self.total)
            head = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total}"
        else:
            head = f"{done}"
        label = f"{self.label} " if self.label else ""
        self.stream.write(f"\r{label}{head} {rate:,.1f} msg/s {detail}"[:200])
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
