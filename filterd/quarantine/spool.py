"""The embedded quarantine backend: a spool directory of pristine messages plus JSON sidecars.

Trusts: the spool directory (created 0750, files 0640, owned by the daemon's user; when the CLI
runs as root it hands what it creates to the spool's owner so the daemon can still read it).
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
import time
from contextlib import contextmanager
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any, Callable, Iterator

from filterd import modes
from filterd.message import Envelope
from filterd.policy import Verdict
from filterd.quarantine.index import Index
from filterd.quarantine.store import (
    ID_PATTERN, Item, NoSuchItem, QuarantineError, Query, ReindexReport, StoredItem, category_of,
    check_id, glob_match, sidecar)

log = logging.getLogger("filterd.quarantine")

DIR_MODE = modes.DIR_MODE     # the file-mode policy (filterd.modes), named here for the spool
FILE_MODE = modes.FILE_MODE
ORPHAN_AGE = 86400.0   # a .eml without sidecar this old is a crash leftover (put takes ms)
TMP_AGE = 3600.0


def new_id(now: float | None = None) -> str:
    """Sortable, unguessable item ID: UTC time + 10 random hex digits, 20261122T101500-3f9a0c41d2."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"{stamp}-{secrets.token_hex(5)}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, mode: int = FILE_MODE,
                  owner: tuple[int, int] | None = None) -> None:
    """tmp -> write -> fsync -> rename over `path`; the caller fsyncs the directory."""
    tmp = path.with_name(f".tmp.{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not decide who may read quarantined mail
        if owner is not None:
            os.fchown(fd, *owner)
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
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    """Embedded quarantine: files in one directory tree plus a SQLite index."""

    def __init__(self, directory: Path | str):
        self.dir = Path(directory)
        self.index = Index(self.dir / "index.sqlite")
        self._owner: tuple[int, int] | None = None
        self._ready = False

    # --- directories and ownership -----------------------------------------------------
    def _prepare(self) -> None:
        if self._ready:
            return
        self._mkdir(self.dir)
        st = self.dir.stat()
        # root (the CLI) writing into a spool the daemon owns: give new files to the owner
        if os.geteuid() == 0 and st.st_uid != 0:
            self._owner = (st.st_uid, st.st_gid)
        for sub in ("keys", "locks"):
            self._mkdir(self.dir / sub)
        index_path = self.dir / "index.sqlite"
        if not index_path.exists():
            fd = os.open(index_path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
            try:
                os.fchmod(fd, FILE_MODE)
                if self._owner is not None:
                    os.fchown(fd, *self._owner)
            finally:
                os.close(fd)
        self._ready = True

    def _mkdir(self, path: Path) -> None:
        try:
            path.mkdir(mode=DIR_MODE, parents=True)
        except FileExistsError:
            return
        os.chmod(path, DIR_MODE)
        if self._owner is not None:
            os.chown(path, *self._owner)

    def _paths(self, item_id: str) -> tuple[Path, Path, Path]:
        check_id(item_id)
        day = self.dir / item_id[:8]
        return day, day / f"{item_id}.eml", day / f"{item_id}.json"

    # --- storing ---------------------------------------------------------------------------
    def put(self, raw: bytes, envelope: Envelope, verdict: Verdict,
            category: str | None = None) -> StoredItem:
        """Store durably; idempotent by (Postfix queue ID, sha256). Raises QuarantineError."""
        digest = hashlib.sha256(raw).hexdigest()
        try:
            self._prepare()
            item_id, existing = self._claim(envelope.queue_id, digest)
            day, eml, meta_path = self._paths(item_id)
            if existing and meta_path.exists():
                self._index_quietly(self._read_meta(meta_path))
                return StoredItem(item_id, eml, False)
            self._mkdir(day)
            write_durably(eml, raw, owner=self._owner)
            subject, message_id = header_fields(raw)
            meta = sidecar(item_id, raw, digest, envelope, verdict,
                           category or category_of(verdict), subject=subject,
                           message_id=message_id)
            write_durably(meta_path, _dump(meta), owner=self._owner)
            fsync_dir(day)
        except OSError as exc:
            raise QuarantineError(f"cannot store in {self.dir}: {exc.strerror or exc}") from exc
        self._index_quietly(meta)
        return StoredItem(item_id, eml, True)

    def _claim(self, queue_id: str | None, digest: str) -> tuple[str, bool]:
        """The ID for this message: a fresh one, or the one a marker of an earlier try names."""
        if not queue_id:
            return new_id(), False
        key = hashlib.sha256(f"{queue_id}\0{digest}".encode()).hexdigest()
        marker = self.dir / "keys" / key
        candidate = new_id()
        tmp = marker.with_name(f".tmp.{key}.{os.getpid()}.{secrets.token_hex(4)}")
        write_durably(tmp, candidate.encode(), owner=self._owner)
        try:
            os.link(tmp, marker)  # atomic "create if absent"
            fsync_dir(marker.parent)
            return candidate, False
        except FileExistsError:
            try:
                named = marker.read_text().strip()
            except OSError:
                named = ""
            if ID_PATTERN.match(named):
                return named, True
            os.replace(tmp, marker)  # a damaged marker: take it over
            fsync_dir(marker.parent)
            return candidate, False
        finally:
            tmp.unlink(missing_ok=True)

    def _index_quietly(self, meta: dict[str, Any]) -> None:
        # The sidecar is the truth and is already durable; a failing index only delays
        # listing until the periodic reconcile or `reindex`. It must not tempfail the mail.
        try:
            self._prepare()
            self.index.upsert(meta)
        except Exception as exc:
            log.error("quarantine index update for %s failed (run `filterd quarantine "
                      "reindex`): %s", meta.get("id"), exc)

    # --- reading ---------------------------------------------------------------------------
    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        with open(path, "rb") as fh:
            meta = json.loads(fh.read())
        if not isinstance(meta, dict) or not ID_PATTERN.match(str(meta.get("id", ""))):
            raise ValueError("not a filterd quarantine sidecar")
        return meta

    def get(self, item_id: str) -> Item:
        _, _, meta_path = self._paths(item_id)
        try:
            return Item.from_sidecar(self._read_meta(meta_path))
        except FileNotFoundError:
            raise NoSuchItem(item_id) from None
        except (OSError, ValueError, KeyError) as exc:
            raise QuarantineError(f"{item_id}: unreadable sidecar: {exc}") from None

    def read_raw(self, item_id: str) -> bytes:
        _, eml, meta_path = self._paths(item_id)
        if not meta_path.exists():
            raise NoSuchItem(item_id)
        try:
            return eml.read_bytes()
        except FileNotFoundError:
            raise QuarantineError(f"{item_id}: the message file is missing") from None

    def search(self, query: Query) -> list[Item]:
        self._prepare()
        items = []
        for item_id in self.index.search_ids(query):
            try:
                items.append(self.get(item_id))
            except NoSuchItem:
                self.index.remove(item_id)  # deleted behind the index's back
        if query.recipient is not None:  # the index lower-cases; keep globs exact
            items = [i for i in items if glob_match(query.recipient, i.rcpt_tos)]
        return items

    # --- changing --------------------------------------------------------------------------
    @contextmanager
    def locked(self, item_id: str) -> Iterator[None]:
        """Serialise state changes of one item across threads and processes."""
        check_id(item_id)
        self._prepare()
        fd = os.open(self.dir / "locks" / f"{item_id}.lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            if self._owner is not None:
                os.fchown(fd, *self._owner)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def update(self, item_id: str, change: Callable[[dict[str, Any]], None]) -> Item:
        """Rewrite the sidecar with `change` applied (call inside locked(item_id))."""
        day, _, meta_path = self._paths(item_id)
        try:
            meta = self._read_meta(meta_path)
        except FileNotFoundError:
            raise NoSuchItem(item_id) from None
        change(meta)
        try:
            write_durably(meta_path, _dump(meta), owner=self._owner)
            fsync_dir(day)
        except OSError as exc:
            raise QuarantineError(f"{item_id}: cannot update: {exc.strerror or exc}") from exc
        self._index_quietly(meta)
        return Item.from_sidecar(meta)

    def delete(self, item_id: str) -> None:
        day, eml, meta_path = self._paths(item_id)
        if not meta_path.exists():
            raise NoSuchItem(item_id)
        try:
            meta_path.unlink()  # sidecar first: from here on it is not an item
            eml.unlink(missing_ok=True)
            fsync_dir(day)
        except FileNotFoundError:
            raise NoSuchItem(item_id) from None
        except OSError as exc:
            raise QuarantineError(f"{item_id}: cannot delete: {exc.strerror or exc}") from exc
        self.index.remove(item_id)
        (self.dir / "locks" / f"{item_id}.lock").unlink(missing_ok=True)

    # --- housekeeping ----------------------------------------------------------------------
    def _days(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir()
                      if p.is_dir() and len(p.name) == 8 and p.name.isdigit())

    def expire(self, before: float) -> list[str]:
        """Delete items quarantined before `before` and sweep crash leftovers."""
        self._prepare()
        expired: list[str] = []
        now = time.time()
        last_day = time.strftime("%Y%m%d", time.gmtime(before))
        for day in self._days():
            if day.name > last_day:
                break
            for path in sorted(day.iterdir()):
                name = path.name
                try:
                    age = now - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if name.endswith(".json") and ID_PATTERN.match(name[:-5]):
                    item_id = name[:-5]
                    try:
                        meta = self._read_meta(path)
                        old = float(meta["time"]) < before
                    except (OSError, ValueError, KeyError):
                        old = age > ORPHAN_AGE and path.stat().st_mtime < before
                    if old:
                        with self.locked(item_id):
                            try:
                                self.delete(item_id)
                                expired.append(item_id)
                            except NoSuchItem:
                                pass
                elif name.endswith(".eml") and ID_PATTERN.match(name[:-4]):
                    if age > ORPHAN_AGE and not path.with_suffix(".json").exists():
                        path.unlink(missing_ok=True)
                        log.info("removed %s: message file without sidecar (crash leftover)", path)
                elif name.startswith(".tmp.") and age > TMP_AGE:
                    path.unlink(missing_ok=True)
            try:
                day.rmdir()  # only when empty
            except OSError:
                pass
        for marker in (self.dir / "keys").iterdir():
            try:
                if marker.stat().st_mtime < before or (marker.name.startswith(".tmp.")
                                                       and now - marker.stat().st_mtime > TMP_AGE):
                    marker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        return expired

    def sidecars(self) -> Iterator[tuple[Path, dict[str, Any] | None, str]]:
        """Every sidecar of the spool: (path, metadata or None, problem)."""
        for day in self._days():
            for path in sorted(day.glob("*.json")):
                if not ID_PATTERN.match(path.name[:-5]):
                    continue
                try:
                    meta = self._read_meta(path)
                    Item.from_sidecar(meta)
                    if meta["id"] != path.name[:-5]:
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
        for day in self._days()[-days:]:
            for path in day.glob("*.json"):
                if path.name[:-5] in known or not ID_PATTERN.match(path.name[:-5]):
                    continue
                try:
                    self.index.upsert(self._read_meta(path))
                    added += 1
                except (OSError, ValueError, KeyError) as exc:
                    log.error("cannot index %s: %s", path, exc)
        return added

    def index_rows(self) -> list[tuple[Any, ...]]:
        self._prepare()
        return self.index.rows()

    def stats(self) -> dict[str, Any]:
        self._prepare()
        return self.index.stats()

    def writable(self) -> bool:
        """Whether a new item could be created now (for health checks)."""
        try:
            self._prepare()
            probe = self.dir / "keys" / f".tmp.probe.{os.getpid()}"
            write_durably(probe, b"")
            probe.unlink()
            return True
        except OSError:
            return False


def _dump(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, indent=1, ensure_ascii=False, sort_keys=False) + "\n").encode()
