"""The quarantine's SQLite index: fast list/search over the sidecars, rebuildable from them.

Trusts: the sidecars (the index is derived data; `filterd quarantine reindex` rebuilds it and
the daemon reconciles recent days at start and in its periodic task).
Reads: no settings (the spool passes its path). Emits: no symbols.

WAL mode lets the daemon insert while the CLI lists; every connection waits up to
BUSY_TIMEOUT for a writer. The schema text is the contract in quarantine/schema/index.sql
(a unit test keeps the two identical).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

from filterd.quarantine.store import Item, Query
from filterd.statefs import sqlite_file

BUSY_TIMEOUT = 30.0

SCHEMA_SQL = """\
-- filterd quarantine index, schema version 1 (contract: quarantine/README.md).
-- Derived data: every row comes from one sidecar <id>.json and is rebuilt by
-- `filterd quarantine reindex`. Times are seconds since the epoch (UTC).
CREATE TABLE IF NOT EXISTS items (
    id          TEXT PRIMARY KEY,           -- 20261122T101500-3f9a0c41d2
    state       TEXT NOT NULL CHECK (state IN ('held', 'releasing', 'released')),
    category    TEXT NOT NULL CHECK (category IN ('spam', 'virus', 'banned', 'bad-header', 'policy')),
    time        REAL NOT NULL,              -- when it was quarantined
    size        INTEGER NOT NULL,           -- bytes of the stored message
    sha256      TEXT NOT NULL,              -- digest of the stored message
    queue_id    TEXT,                       -- Postfix queue ID, when the MTA gave one
    mail_from   TEXT NOT NULL,              -- envelope sender ('' for <>)
    subject     TEXT NOT NULL,
    score       REAL NOT NULL,
    action      TEXT NOT NULL,              -- the verdict's action
    reason      TEXT NOT NULL,
    released_at REAL,                       -- last release, if any
    released_by TEXT
);
CREATE TABLE IF NOT EXISTS recipients (
    id      TEXT NOT NULL REFERENCES items (id) ON DELETE CASCADE,
    address TEXT NOT NULL,                  -- envelope recipient, lower-cased
    PRIMARY KEY (id, address)
);
CREATE INDEX IF NOT EXISTS items_time ON items (time);
CREATE INDEX IF NOT EXISTS items_category_time ON items (category, time);
CREATE INDEX IF NOT EXISTS items_sender ON items (mail_from);
CREATE INDEX IF NOT EXISTS recipients_address ON recipients (address);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', '1');
"""

_COLUMNS = ("id", "state", "category", "time", "size", "sha256", "queue_id", "mail_from",
            "subject", "score", "action", "reason", "released_at", "released_by")


def row_of(meta: Mapping[str, Any]) -> tuple[Any, ...]:
    release = (meta.get("releases") or [None])[-1]
    return (meta["id"], meta["state"], meta["category"], float(meta["time"]), int(meta["size"]),
            meta["sha256"], meta.get("queue_id"), meta.get("mail_from") or "",
            meta.get("subject") or "", float(meta.get("score") or 0.0), meta.get("action") or "",
            meta.get("reason") or "", release["at"] if release else None,
            release["by"] if release else None)


def _like(pattern: str) -> str:
    escaped = pattern.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


class Index:
    """One SQLite database; safe to share between the threads of one process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            # SQLite opens the -wal/-shm/-journal files by path: only the spool's owner may
            # open it, and never through a planted link (filterd.statefs)
            sqlite_file(self.path)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SCHEMA_SQL)
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def upsert(self, meta: Mapping[str, Any]) -> None:
        row = row_of(meta)
        rcpts = sorted({(r or "").lower() for r in meta.get("rcpt_tos") or ()})
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(f"INSERT OR REPLACE INTO items ({', '.join(_COLUMNS)}) "
                           f"VALUES ({', '.join('?' * len(_COLUMNS))})", row)
                db.execute("DELETE FROM recipients WHERE id = ?", (row[0],))
                db.executemany("INSERT INTO recipients (id, address) VALUES (?, ?)",
                               [(row[0], r) for r in rcpts])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def remove(self, item_id: str) -> None:
        with self._lock:
            db = self._conn()
            db.execute("DELETE FROM recipients WHERE id = ?", (item_id,))
            db.execute("DELETE FROM items WHERE id = ?", (item_id,))

    def ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._conn().execute("SELECT id FROM items")}

    def rebuild(self, metas: Iterable[Mapping[str, Any]]) -> int:
        """Replace every row with the given sidecars in one transaction."""
        count = 0
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM recipients")
                db.execute("DELETE FROM items")
                for meta in metas:
                    row = row_of(meta)
                    db.execute(f"INSERT OR REPLACE INTO items ({', '.join(_COLUMNS)}) "
                               f"VALUES ({', '.join('?' * len(_COLUMNS))})", row)
                    db.executemany("INSERT OR IGNORE INTO recipients (id, address) VALUES (?, ?)",
                                   [(row[0], (r or "").lower())
                                    for r in meta.get("rcpt_tos") or ()])
                    count += 1
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return count

    def search_ids(self, query: Query) -> list[str]:
        where, params = [], []
        if query.since is not None:
            where.append("time >= ?")
            params.append(query.since)
        if query.until is not None:
            where.append("time < ?")
            params.append(query.until)
        if query.category:
            where.append("category = ?")
            params.append(query.category)
        if query.state:
            where.append("state = ?")
            params.append(query.state)
        if query.sender is not None:
            where.append("lower(mail_from) LIKE ? ESCAPE '\\'")
            params.append(_like(query.sender))
        if query.recipient is not None:
            where.append("id IN (SELECT id FROM recipients WHERE address LIKE ? ESCAPE '\\')")
            params.append(_like(query.recipient))
        sql = "SELECT id FROM items"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY time " + ("ASC" if query.oldest_first else "DESC") + ", id"
        if query.limit:
            sql += f" LIMIT {int(query.limit)}"
        with self._lock:
            return [r[0] for r in self._conn().execute(sql, params)]

    def rows(self) -> list[tuple[Any, ...]]:
        """Every row of both tables, in a stable order (to compare an index with a rebuild)."""
        with self._lock:
            db = self._conn()
            items = [("items",) + tuple(r) for r in
                     db.execute(f"SELECT {', '.join(_COLUMNS)} FROM items ORDER BY id")]
            rcpts = [("recipients",) + tuple(r) for r in
                     db.execute("SELECT id, address FROM recipients ORDER BY id, address")]
        return items + rcpts

    def stats(self) -> dict[str, Any]:
        with self._lock:
            db = self._conn()
            total = db.execute("SELECT count(*), coalesce(sum(size), 0), min(time), max(time) "
                               "FROM items").fetchone()
            by_state = dict(db.execute("SELECT state, count(*) FROM items GROUP BY state"))
            by_category = {c: (n, b) for c, n, b in db.execute(
                "SELECT category, count(*), coalesce(sum(size), 0) FROM items GROUP BY category")}
        return {"items": total[0], "bytes": total[1], "oldest": total[2], "newest": total[3],
                "by_state": by_state,
                "by_category": {c: {"items": n, "bytes": b} for c, (n, b) in by_category.items()}}


__all__ = ["Index", "SCHEMA_SQL", "row_of", "Item"]
