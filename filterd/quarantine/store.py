"""The quarantine's storage interface, its values and its errors (no I/O here).

Trusts: nothing. Every item ID that reaches a store has passed `check_id()`, so no caller can
name a path outside the quarantine (no traversal, no absolute paths, no surprises).
Reads: no settings. Emits: no symbols.

A store keeps each item as the pristine message plus a metadata sidecar (the contract is
quarantine/README.md and quarantine/schema/). `SpoolStore` (filterd.quarantine.spool) is the
embedded default; a networked backend (PostgreSQL for the index, shared storage for the bytes)
implements the same `QuarantineStore` protocol and passes the same contract tests.
"""

from __future__ import annotations

import re
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

from filterd.message import Envelope
from filterd.policy import Verdict

SCHEMA_VERSION = 1
CATEGORIES = ("spam", "virus", "banned", "bad-header", "policy")
# held: waiting for a decision; releasing: a release was started and has not finished (a
# crash there leaves this state, so a retry needs --force: the message may have gone out);
# released: delivered to the release listener. Deleted and expired items are gone.
STATES = ("held", "releasing", "released")
ID_PATTERN = re.compile(r"\A[0-9]{8}T[0-9]{6}-[0-9a-f]{10}\Z")


class QuarantineError(Exception):
    """The quarantine could not store or read an item (a message being stored is tempfailed)."""


class InvalidId(QuarantineError):
    def __init__(self, item_id: str):
        super().__init__(f"{item_id!r}: not a quarantine ID (expected e.g. "
                         "20261122T101500-3f9a0c41d2)")
        self.item_id = item_id


class NoSuchItem(QuarantineError):
    def __init__(self, item_id: str):
        super().__init__(f"{item_id}: no such item")
        self.item_id = item_id


def check_id(item_id: str) -> str:
    """Return the ID when it has the shape of ours, else raise InvalidId (never a path)."""
    if not isinstance(item_id, str) or not ID_PATTERN.match(item_id):
        raise InvalidId(str(item_id))
    return item_id


def category_of(verdict: Verdict) -> str:
    """Which quarantine category a verdict belongs to (for `list --reason`)."""
    names = verdict.symbol_names
    if verdict.virus_names or any(n == "CLAM_VIRUS" or n.startswith("CLAM_VIRUS_")
                                  for n in names):
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


@dataclass(frozen=True, slots=True)
class Item:
    """One quarantined message's metadata, as the sidecar holds it."""

    id: str
    state: str
    category: str
    time: float
    size: int
    sha256: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    queue_id: str | None
    subject: str
    score: float
    action: str
    reason: str
    sidecar: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_sidecar(cls, meta: Mapping[str, Any]) -> "Item":
        return cls(id=meta["id"], state=meta["state"], category=meta["category"],
                   time=float(meta["time"]), size=int(meta["size"]), sha256=meta["sha256"],
                   mail_from=meta.get("mail_from") or "",
                   rcpt_tos=tuple(meta.get("rcpt_tos") or ()), queue_id=meta.get("queue_id"),
                   subject=meta.get("subject") or "", score=float(meta.get("score") or 0.0),
                   action=meta.get("action") or "", reason=meta.get("reason") or "",
                   sidecar=meta)

    @property
    def releases(self) -> list[dict[str, Any]]:
        return list(self.sidecar.get("releases") or [])

    @property
    def last_release(self) -> dict[str, Any] | None:
        releases = self.releases
        return releases[-1] if releases else None


@dataclass(frozen=True, slots=True)
class Query:
    """What `list` asks for; None means "any"."""

    since: float | None = None
    until: float | None = None
    sender: str | None = None      # exact address (case-insensitive) or a glob with *
    recipient: str | None = None   # likewise
    category: str | None = None
    state: str | None = None
    limit: int = 0                 # 0: no limit
    oldest_first: bool = False


@dataclass(frozen=True, slots=True)
class ReindexReport:
    items: int
    skipped: tuple[str, ...]  # sidecars that could not be read, with the reason


class QuarantineStore(Protocol):
    """What the service, the CLI and the daemon need from a quarantine backend."""

    def put(self, raw: bytes, envelope: Envelope, verdict: Verdict,
            category: str | None = None) -> StoredItem: ...

    def get(self, item_id: str) -> Item: ...

    def read_raw(self, item_id: str) -> bytes: ...

    def search(self, query: Query) -> list[Item]: ...

    def locked(self, item_id: str) -> AbstractContextManager[None]: ...

    def update(self, item_id: str, change: Callable[[dict[str, Any]], None]) -> Item: ...

    def delete(self, item_id: str) -> None: ...

    def expire(self, before: float) -> list[str]: ...

    def reindex(self) -> ReindexReport: ...

    def index_rows(self) -> list[tuple[Any, ...]]: ...

    def stats(self) -> dict[str, Any]: ...


def sidecar(item_id: str, raw: bytes, digest: str, envelope: Envelope, verdict: Verdict,
            category: str, *, subject: str = "", message_id: str = "",
            now: float | None = None) -> dict[str, Any]:
    """The metadata document of a new item (quarantine/schema/metadata-v1.schema.json)."""
    return {
        "schema": SCHEMA_VERSION,
        "id": item_id,
        "state": "held",
        "category": category,
        "time": now if now is not None else time.time(),
        "size": len(raw),
        "sha256": digest,
        "mail_from": envelope.mail_from,
        "rcpt_tos": list(envelope.rcpt_tos),
        "client_ip": envelope.client_ip,
        "client_helo": envelope.client_helo,
        "client_name": envelope.client_name,
        "auth_user": envelope.auth_user,
        "queue_id": envelope.queue_id,
        "listener": envelope.listener,
        "subject": subject,
        "message_id": message_id,
        "action": verdict.action.value,
        "score": verdict.score,
        "required": verdict.required,
        "reason": verdict.reason,
        "symbols": [{"name": s.name, "score": s.score, "options": list(s.options)}
                    for s in verdict.symbols],
        "virus_names": list(verdict.virus_names),
        "releases": [],
        "notified": None,
    }


def glob_match(pattern: str, values: Iterable[str]) -> bool:
    """Case-insensitive address match: exact, or a glob where * is any run of characters."""
    regex = re.compile("\\A" + ".*".join(re.escape(p) for p in pattern.lower().split("*"))
                       + "\\Z")
    return any(regex.match((v or "").lower()) for v in values)
