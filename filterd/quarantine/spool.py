"""The embedded quarantine backend: a spool directory of pristine messages plus JSON sidecars.

Trusts: the configured spool directory (created 0750, files 0640), which must be owned by the
user this process runs as (the daemon's; the CLI run as root switches to it first), and not
what is inside it: names are opened by descriptor, never through links (filterd.statefs).
Reads: no settings directly (open_store() passes quarantine.dir). Emits: no symbols.

Layout and states are the contract in quarantine/README.md. In short:
    <dir>/<YYYYMMDD>/<id>.eml    the message exactly as received
    <dir>/<YYYYMMDD>/<id>.json   the sidecar; its presence makes the item whole
    <dir>/keys/<sha256>          idempotence marker: sha256(queue ID NUL message digest) -> id
    <dir>/locks/<id>.lock        flock() for state transitions (release, delete)
    <dir>/index.sqlite           derived index (filterd.quarantine.index), rebuildable
Every file is written tmp -> fsync -> rename, the sidecar after the message, then the directory
is fsynced: a crash leaves either a whole item or pieces that are not an item (a .eml without a
sidecar, a .tmp.* file), which expiry sweeps. The marker is written *first* and names the ID, so
a retry after a crash anywhere in put() completes or finds the same item instead of a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import stat
import threading
import time
from contextlib import contextmanager
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any, Callable, Iterator

from filterd.message import Envelope
from filterd.policy import Verdict
from filterd.quarantine.index import Index
from filterd.quarantine.store import (
    ID_PATTERN, Item, NoSuchItem, QuarantineError, Query, ReindexReport, StoredItem, category_of,
    check_id, glob_match, sidecar)
from filterd.statefs import Dir, UnsafeFile

log = logging.getLogger("filterd.quarantine")

ORPHAN_AGE = 86400.0   # a .eml without sidecar this old is a crash leftover (put takes ms)
TMP_AGE = 3600.0


def new_id(now: float | None = None) -> str:
    """Sortable, unguessable item ID: UTC time + 10 random hex digits, 20261122T101500-3f9a0c41d2."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"{stamp}-{secrets.token_hex(5)}"


def header_fields(raw: bytes) -> tuple[str, str]:
    """(Subject, Message-ID) decoded from the header block; '' when absent or unparsable."""
    end = raw.find(b"\n\n")
    crlf_end = raw.find(b"\r\n\r\n")
    cut = min([e for e in (end, crlf_end) if e >= 0], default=len(raw))
    try:
        headers = BytesHeaderParser(policy=default_policy).parsebytes(raw[:min(cut, 65536)])
        subject = str(headers.get("subject", "") or "")
        message_id = str(headers.get("message-id", "") or "")
    except Exception:  # a hostile header must not stop the message from being stored
        return "", ""
    clean = lambda s: " ".join(s.split())[:998]  # noqa: E731
    return clean(subject), clean(message_id)


class SpoolStore:
    """Embedded quarantine: files in one directory tree plus a SQLite index.

    Every name below the spool directory is opened relative to a directory descriptor and never
    through a link (filterd.statefs); a planted link, FIFO or file of another user makes the
    operation fail with QuarantineError saying so, and nothing outside the spool is touched."""

    def __init__(self, directory: Path | str):
        self.dir = Path(directory)
        self.index = Index(self.dir / "index.sqlite")
        self._made = False
        self._made_lock = threading.Lock()

    # --- directories -----------------------------------------------------------------------
    def _prepare(self) -> None:
        """Make the spool with keys/ and locks/ (once per store)."""
        if self._made:
            return
        with self._made_lock:
            if not self._made:
                with Dir.open(self.dir, create=True) as root:
                    for sub in ("keys", "locks"):
                        root.sub(sub, create=True).close()
                self._made = True

    def _root(self) -> Dir:
        """The spool's descriptor, opened afresh for each operation: a descriptor kept open
        would go on writing to a directory that has since been remounted read-only or
        replaced, instead of failing (and tempfailing the message) as the path does."""
        self._prepare()
        return Dir.open(self.dir)

    def _sub(self, name: str, *, create: bool = False) -> Dir:
        with self._root() as root:
            return root.sub(name, create=create)

    def _day(self, item_id: str, *, create: bool = False) -> Dir:
        check_id(item_id)
        return self._sub(item_id[:8], create=create)

    def _path(self, item_id: str, suffix: str) -> Path:
        return self.dir / item_id[:8] / f"{item_id}{suffix}"

    # --- storing ---------------------------------------------------------------------------
    def put(self, raw: bytes, envelope: Envelope, verdict: Verdict,
            category: str | None = None) -> StoredItem:
        """Store durably; idempotent by (Postfix queue ID, sha256). Raises QuarantineError."""
        digest = hashlib.sha256(raw).hexdigest()
        try:
            self._prepare()
            item_id, existing = self._claim(envelope.queue_id, digest)
            eml_path = self._path(item_id, ".eml")
            with self._day(item_id, create=True) as day:
                if existing and day.exists(f"{item_id}.json"):
                    self._index_quietly(_read_meta(day, f"{item_id}.json"))
                    return StoredItem(item_id, eml_path, False)
                day.write_durably(f"{item_id}.eml", raw)
                subject, message_id = header_fields(raw)
                meta = sidecar(item_id, raw, digest, envelope, verdict,
                               category or category_of(verdict), subject=subject,
                               message_id=message_id)
                day.write_durably(f"{item_id}.json", _dump(meta))
                day.fsync()
        except (OSError, ValueError) as exc:
            raise QuarantineError(f"cannot store in {self.dir}: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from exc
        self._index_quietly(meta)
        return StoredItem(item_id, eml_path, True)

    def _claim(self, queue_id: str | None, digest: str) -> tuple[str, bool]:
        """The ID for this message: a fresh one, or the one a marker of an earlier try names."""
        if not queue_id:
            return new_id(), False
        key = hashlib.sha256(f"{queue_id}\0{digest}".encode()).hexdigest()
        candidate = new_id()
        tmp = f".tmp.{key}.{os.getpid()}.{secrets.token_hex(4)}"
        with self._sub("keys") as keys:
            keys.write_durably(tmp, candidate.encode())
            try:
                keys.link(tmp, key)  # atomic "create if absent"
                keys.fsync()
                return candidate, False
            except FileExistsError:
                try:
                    named = keys.read(key, limit=64).decode("ascii").strip()
                except (OSError, UnicodeDecodeError):  # a link or a damaged marker
                    named = ""
                if ID_PATTERN.match(named):
                    return named, True
                keys.replace(tmp, key)  # a damaged marker: take it over (a link is replaced)
                keys.fsync()
                return candidate, False
            finally:
                keys.unlink(tmp, missing_ok=True)

    def _index_quietly(self, meta: dict[str, Any]) -> None:
        # The sidecar is the truth and is already durable; a failing index only delays
        # listing until the periodic reconcile or `reindex`. It must not tempfail the mail.
        try:
            self._prepare()
            self.index.upsert(meta)
        except Exception as exc:
            log.error("quarantine index update for %s failed (run `filterd quarantine "
                      "reindex`): %s", meta.get("id"), exc)

    def _unindex_quietly(self, item_id: str) -> None:
        try:
            self.index.remove(item_id)
        except Exception as exc:
            log.error("quarantine index update for %s failed (run `filterd quarantine "
                      "reindex`): %s", item_id, exc)

    # --- reading ---------------------------------------------------------------------------
    def get(self, item_id: str) -> Item:
        try:
            with self._day(item_id) as day:
                return Item.from_sidecar(_read_meta(day, f"{item_id}.json"))
        except FileNotFoundError:
            raise NoSuchItem(item_id) from None
        except UnsafeFile as exc:
            raise QuarantineError(f"{item_id}: {exc}; nothing done") from None
        except (OSError, ValueError, KeyError) as exc:
            raise QuarantineError(f"{item_id}: unreadable sidecar: {exc}") from None

    def read_raw(self, item_id: str) -> bytes:
        try:
            with self._day(item_id) as day:
                if not day.exists(f"{item_id}.json"):
                    raise NoSuchItem(item_id)
                try:
                    return day.read(f"{item_id}.eml")
                except FileNotFoundError:
                    raise QuarantineError(f"{item_id}: the message file is missing") from None
        except FileNotFoundError:
            raise NoSuchItem(item_id) from None
        except UnsafeFile as exc:
            raise QuarantineError(f"{item_id}: {exc}; nothing done") from None
        except OSError as exc:
            raise QuarantineError(f"{item_id}: cannot read: {exc.strerror or exc}") from None

    def search(self, query: Query) -> list[Item]:
        self._prepare()
        items = []
        for item_id in self.index.search_ids(query):
            try:
                items.append(self.get(item_id))
            except NoSuchItem:
                self._unindex_quietly(item_id)  # deleted behind the index's back
        if query.recipient is not None:  # the index lower-cases; keep globs exact
            items = [i for i in items if glob_match(query.recipient, i.rcpt_tos)]
        return items

    # --- changing --------------------------------------------------------------------------
    @contextmanager
    def locked(self, item_id: str) -> Iterator[None]:
        """Serialise state changes of one item across threads and processes."""
        check_id(item_id)
        try:
            with self._sub("locks") as locks:
                fd = locks.open_file(f"{item_id}.lock", os.O_RDWR | os.O_CREAT)
        except UnsafeFile as exc:
            raise QuarantineError(f"{item_id}: {exc}; nothing done") from None
        except OSError as exc:
            raise QuarantineError(f"{item_id}: cannot lock: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def update(self, item_id: str, change: Callable[[dict[str, Any]], None]) -> Item:
        """Rewrite the sidecar with `change` applied (call inside locked(item_id))."""
        try:
            with self._day(item_id) as day:
                try:
                    meta = _read_meta(day, f"{item_id}.json")
                except FileNotFoundError:
                    raise NoSuchItem(item_id) from None
                change(meta)
                day.write_durably(f"{item_id}.json", _dump(meta))
                day.fsync()
        except FileNotFoundError:
            raise NoSuchItem(item_id) from None
        except UnsafeFile as exc:
            raise QuarantineError(f"{item_id}: {exc}; nothing done") from None
        except (OSError, ValueError) as exc:
            raise QuarantineError(f"{item_id}: cannot update: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from exc
        self._index_quietly(meta)
        return Item.from_sidecar(meta)

    def delete(self, item_id: str) -> None:
        try:
            with self._day(item_id) as day:
                if not day.exists(f"{item_id}.json"):
                    raise NoSuchItem(item_id)
                day.unlink(f"{item_id}.json")  # sidecar first: from here on it is not an item
                day.unlink(f"{item_id}.eml", missing_ok=True)
                day.fsync()
            with self._sub("locks") as locks:
                locks.unlink(f"{item_id}.lock", missing_ok=True)
        except FileNotFoundError:
            raise NoSuchItem(item_id) from None
        except UnsafeFile as exc:
            raise QuarantineError(f"{item_id}: {exc}; nothing done") from None
        except OSError as exc:
            raise QuarantineError(f"{item_id}: cannot delete: {exc.strerror or exc}") from exc
        self._unindex_quietly(item_id)

    # --- housekeeping ----------------------------------------------------------------------
    def _days(self) -> list[str]:
        """Names of the day directories; a link or other file in their place is skipped."""
        days = []
        with self._root() as root:
            for name in root.names():
                if len(name) != 8 or not name.isdigit():
                    continue
                kind = stat.S_IFMT(root.lstat(name).st_mode)
                if kind == stat.S_IFDIR:
                    days.append(name)
                else:
                    log.warning("quarantine: ignoring %s: not a directory (links in the spool "
                                "are never followed)", self.dir / name)
        return days

    def expire(self, before: float) -> list[str]:
        """Delete items quarantined before `before` and sweep crash leftovers."""
        expired: list[str] = []
        now = time.time()
        last_day = time.strftime("%Y%m%d", time.gmtime(before))
        for day_name in self._days():
            if day_name > last_day:
                break
            with self._sub(day_name) as day:
                names = day.names()
                for name in names:
                    try:
                        mtime = day.lstat(name).st_mtime
                    except FileNotFoundError:
                        continue
                    age = now - mtime
                    if name.endswith(".json") and ID_PATTERN.match(name[:-5]):
                        item_id = name[:-5]
                        try:
                            old = float(_read_meta(day, name)["time"]) < before
                        except (OSError, ValueError, KeyError):
                            old = age > ORPHAN_AGE and mtime < before
                        if old:
                            with self.locked(item_id):
                                try:
                                    self.delete(item_id)
                                    expired.append(item_id)
                                except NoSuchItem:
                                    pass
                    elif name.endswith(".eml") and ID_PATTERN.match(name[:-4]):
                        if age > ORPHAN_AGE and not day.exists(name[:-4] + ".json"):
                            day.unlink(name, missing_ok=True)
                            log.info("removed %s: message file without sidecar (crash "
                                     "leftover)", day.path / name)
                    elif name.startswith(".tmp.") and age > TMP_AGE:
                        day.unlink(name, missing_ok=True)
            try:
                with self._root() as root:
                    root.rmdir(day_name)  # only when empty
            except OSError:
                pass
        with self._sub("keys") as keys:
            for name in keys.names():
                try:
                    mtime = keys.lstat(name).st_mtime
                    if mtime < before or (name.startswith(".tmp.") and now - mtime > TMP_AGE):
                        keys.unlink(name, missing_ok=True)
                except FileNotFoundError:
                    pass
        return expired

    def sidecars(self, days: int | None = None
                 ) -> Iterator[tuple[Path, dict[str, Any] | None, str]]:
        """Every sidecar of the spool (of the newest `days` day directories): (path, metadata
        or None, problem)."""
        names = self._days()
        for day_name in names[-days:] if days else names:
            with self._sub(day_name) as day:
                for name in day.names():
                    if not name.endswith(".json") or not ID_PATTERN.match(name[:-5]):
                        continue
                    path = day.path / name
                    try:
                        meta = _read_meta(day, name)
                        Item.from_sidecar(meta)
                        if meta["id"] != name[:-5]:
                            raise ValueError(f"id {meta['id']!r} does not match the file name")
                        yield path, meta, ""
                    except (OSError, ValueError, KeyError, TypeError) as exc:
                        yield path, None, str(exc) or type(exc).__name__

    def reindex(self) -> ReindexReport:
        """Rebuild the index from the sidecars alone."""
        self._prepare()
        good: list[dict[str, Any]] = []
        skipped: list[str] = []
        for path, meta, problem in self.sidecars():
            if meta is None:
                skipped.append(f"{path}: {problem}")
            else:
                good.append(meta)
        count = self.index.rebuild(good)
        return ReindexReport(count, tuple(skipped))

    def reconcile(self, days: int = 2) -> int:
        """Index sidecars of the newest `days` day directories that the index lacks."""
        self._prepare()
        known = self.index.ids()
        added = 0
        for path, meta, problem in self.sidecars(days):
            if path.name[:-5] in known:
                continue
            if meta is None:
                log.error("cannot index %s: %s", path, problem)
                continue
            self.index.upsert(meta)
            added += 1
        return added

    def index_rows(self) -> list[tuple[Any, ...]]:
        self._prepare()
        return self.index.rows()

    def stats(self) -> dict[str, Any]:
        self._prepare()
        return self.index.stats()

    def read_state(self, name: str) -> bytes:
        """A small file of the spool's own (e.g. the digest schedule); FileNotFoundError."""
        with self._root() as root:
            return root.read(name, limit=1 << 20)

    def write_state(self, name: str, data: bytes) -> None:
        with self._root() as root:
            root.write_durably(name, data)
            root.fsync()

    def writable(self) -> bool:
        """Whether a new item could be created now (for health checks)."""
        try:
            with self._sub("keys") as keys:
                probe = f".tmp.probe.{os.getpid()}"
                keys.write_durably(probe, b"")
                keys.unlink(probe)
            return True
        except OSError:
            return False


def _read_meta(day: Dir, name: str) -> dict[str, Any]:
    meta = json.loads(day.read(name))
    if not isinstance(meta, dict) or not ID_PATTERN.match(str(meta.get("id", ""))):
        raise ValueError("not a filterd quarantine sidecar")
    return meta


def _dump(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, indent=1, ensure_ascii=False, sort_keys=False) + "\n").encode()
