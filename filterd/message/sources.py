"""Read messages from files, directories, mbox files and Maildirs (scan, replay, learn).

A file that starts with an mbox "From " line and holds further "From " separators after a
blank line is an mbox; otherwise it is one message (the corpora keep one message per file,
each starting with its From_ line, which the parser treats as the envelope line).
Yields (name, bytes); unreadable paths yield an error instead of stopping the run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

_FROM_LINE = re.compile(rb"^From \S+.*?\d{4}\r?$", re.M)


@dataclass(frozen=True, slots=True)
class Item:
    name: str
    data: bytes | None
    error: str | None = None


def _is_maildir(path: Path) -> bool:
    return (path / "cur").is_dir() and (path / "new").is_dir()


def split_mbox(data: bytes) -> list[bytes]:
    starts = [m.start() for m in _FROM_LINE.finditer(data)
              if m.start() == 0 or data[max(0, m.start() - 2):m.start()] in (b"\n\n", b"\r\n")
              or data[max(0, m.start() - 4):m.start()] == b"\r\n\r\n"]
    if len(starts) <= 1:
        return [data]
    out = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        chunk = data[start:end]
        out.append(chunk[:-1] if chunk.endswith(b"\n\n") else chunk)
    return out


def iter_messages(paths: Iterable[str | Path]) -> Iterator[Item]:
    for p in paths:
        path = Path(p)
        if path.is_dir():
            if _is_maildir(path):
                files = sorted([*(path / "cur").iterdir(), *(path / "new").iterdir()])
                for f in files:
                    yield from _file(f, split=False)
            else:
                for f in sorted(path.rglob("*")):
                    if f.is_file() and not f.name.startswith("."):
                        yield from _file(f, split=True)
        elif path.exists():
            yield from _file(path, split=True)
        else:
            yield Item(str(path), None, "no such file or directory")


def _file(path: Path, *, split: bool) -> Iterator[Item]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        yield Item(str(path), None, exc.strerror or str(exc))
        return
    if split and data.startswith(b"From "):
        parts = split_mbox(data)
        if len(parts) > 1:
            for i, part in enumerate(parts, 1):
                yield Item(f"{path}:{i}", part)
            return
    yield Item(str(path), data)
