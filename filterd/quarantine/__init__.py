"""The quarantine: durable storage of messages that are not delivered.

This module holds the storage interface and the embedded spool. A message is durable when
put() returns: the raw bytes and the JSON sidecar are each written to a tmp file, fsynced and
renamed into place (sidecar last), and the directory is fsynced. Callers (both front ends)
tempfail the message when put() raises, so nothing is ever dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from filterd.message import Envelope
from filterd.policy import Verdict

CATEGORIES = ("spam", "virus", "banned", "bad-header", "policy")


class QuarantineError(Exception):
    """The quarantine could not store or read an item (the message must be tempfailed)."""


def category_of(verdict: Verdict) -> str:
    """Which quarantine category a verdict belongs to (for `list --reason`)."""
    names = verdict.symbol_names
    if any(n == "CLAM_VIRUS" for n in names):
        return "virus"
    if any(n.startswith("BANNED_") for n in names):
        return "banned"
    if verdict.is_spam or verdict.score >= verdict.required:
        return "spam"
    if any(n.startswith(("HEADER_", "MIME_")) for n in names) and verdict.reason.startswith(
            ("HEADER_", "MIME_")):
        return "bad-header"
    return "policy"


@dataclass(frozen=True, slots=True)
class StoredItem:
    id: str
    path: Path
    created: bool  # False when an identical item (same queue ID and digest) already existed


class QuarantineStore(Protocol):
    def put(self, raw: bytes, envelope: Envelope, verdict: Verdict,
            category: str | None = None) -> StoredItem: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, mode: int = 0o640) -> None:
    """tmp -> write -> fsync -> rename; the caller fsyncs the directory."""
    tmp = path.with_name(f".tmp.{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def new_id(now: float | None = None) -> str:
    """Sortable, unguessable item ID: UTC time + 10 random hex digits, e.g. 20261122T101500-3f9a..."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now or time.time()))
    return f"{stamp}-{secrets.token_hex(5)}"


class SpoolStore:
    """Embedded quarantine: <dir>/<yyyymmdd>/<id>.eml + <id>.json."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def _ensure(self, path: Path) -> None:
        path.mkdir(mode=0o750, parents=True, exist_ok=True)

    def put(self, raw: bytes, envelope: Envelope, verdict: Verdict,
            category: str | None = None) -> StoredItem:
        digest = hashlib.sha256(raw).hexdigest()
        key = f"{envelope.queue_id or '-'}:{digest}"
        try:
            self._ensure(self.dir)
            index_dir = self.dir / "by-key"
            self._ensure(index_dir)
            marker = index_dir / hashlib.sha1(key.encode()).hexdigest()
            if envelope.queue_id and marker.exists():
                item_id = marker.read_text().strip()
                return StoredItem(item_id, self.dir / item_id[:8] / f"{item_id}.eml", False)
            item_id = new_id()
            day = self.dir / item_id[:8]
            self._ensure(day)
            eml = day / f"{item_id}.eml"
            write_durably(eml, raw)
            meta = sidecar(item_id, raw, digest, envelope, verdict, category or category_of(verdict))
            write_durably(day / f"{item_id}.json", json.dumps(meta, indent=1).encode())
            _fsync_dir(day)
            if envelope.queue_id:
                write_durably(marker, item_id.encode())
                _fsync_dir(index_dir)
            return StoredItem(item_id, eml, True)
        except OSError as exc:
            raise QuarantineError(f"cannot store in {self.dir}: {exc.strerror or exc}") from exc


def sidecar(item_id: str, raw: bytes, digest: str, envelope: Envelope, verdict: Verdict,
            category: str) -> dict[str, Any]:
    return {
        "schema": 1,
        "id": item_id,
        "state": "held",
        "category": category,
        "time": time.time(),
        "size": len(raw),
        "sha256": digest,
        "mail_from": envelope.mail_from,
        "rcpt_tos": list(envelope.rcpt_tos),
        "client_ip": envelope.client_ip,
        "client_helo": envelope.client_helo,
        "queue_id": envelope.queue_id,
        "listener": envelope.listener,
        "action": verdict.action.value,
        "score": verdict.score,
        "reason": verdict.reason,
        "symbols": [{"name": s.name, "score": s.score, "options": list(s.options)}
                    for s in verdict.symbols],
        "virus_names": list(verdict.virus_names),
    }


def open_store(settings: Any) -> QuarantineStore:
    return SpoolStore(settings.quarantine_dir)
