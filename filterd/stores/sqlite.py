"""The embedded Bayes token store: one SQLite file in WAL mode (default <state_dir>/bayes.sqlite).

Trusts: the configured path, not the directory's contents: the database is opened only by the
owner of its directory and never through a planted link (filterd.statefs.sqlite_file; the CLI
run as root switches to that owner first). Reads no settings itself (the path comes
from filterd.stores.open_token_store). Emits no symbols.

Every learn batch is one `BEGIN IMMEDIATE` transaction: the digest look-ups that decide
learn/move/no-op, the token counts, the message counters and the digests all commit together
or not at all, so a learner killed with SIGKILL leaves the database as it was after its last
committed batch (WAL replays or discards the rest). Readers (the daemon classifying) are never
blocked by a writer in WAL mode; writers wait up to `busy_timeout` for each other.
The connection is shared by threads under a lock (the daemon calls it from worker threads).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from filterd.statefs import sqlite_file
from filterd.stores import (HAM, SPAM, ExpiryResult, LearnItem, LearnResult, StoreError,
                            StoreStats, encodable)

SCHEMA_VERSION = "1"
_T = TypeVar("_T")
_CHUNK = 900   # bound on "?" parameters per statement (SQLite builds before 3.32 allow 999)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    tok   TEXT PRIMARY KEY,
    spam  INTEGER NOT NULL DEFAULT 0,
    ham   INTEGER NOT NULL DEFAULT 0,
    atime INTEGER NOT NULL              -- day (since the epoch) the token was last learned
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS learned (
    digest TEXT PRIMARY KEY,
    label  TEXT NOT NULL CHECK (label IN ('spam', 'ham'))
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('nspam', 0), ('nham', 0);
"""

_UPSERT = """
INSERT INTO tokens (tok, spam, ham, atime) VALUES (?1, max(0, ?2), max(0, ?3), ?4)
ON CONFLICT (tok) DO UPDATE SET
    spam = max(0, spam + ?2),
    ham = max(0, ham + ?3),
    atime = CASE WHEN ?5 THEN max(atime, ?4) ELSE atime END
"""


# The counts of a JSON array of tokens: CROSS JOIN keeps json_each as the outer loop, so each
# token is one primary-key probe.
_READ_JSON = ("SELECT t.tok, t.spam, t.ham FROM json_each(?) AS j CROSS JOIN tokens AS t "
              "ON t.tok = j.value")


def _drop_atime_index(conn: sqlite3.Connection) -> None:
    """Databases made before schema 2 carry an index on tokens(atime). Every learned token
    rewrote its entry (atime is in the upsert's SET list), which cost a third of the write
    time and doubled the file; expiry, the only reader, runs daily off the scan path and
    scans the table instead. Best effort: a read-only file keeps its index."""
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' "
                        "AND name = 'tokens_atime'").fetchone():
            conn.execute("DROP INDEX IF EXISTS tokens_atime")
    except sqlite3.Error:
        pass


def _has_json(conn: sqlite3.Connection) -> bool:
    """SQLite's JSON functions are built in from 3.38 and usually compiled in before."""
    try:
        conn.execute("SELECT count(*) FROM json_each('[]')").fetchone()
        return True
    except sqlite3.Error:
        return False


def _token_counts_in(conn: sqlite3.Connection, tokens: Sequence[str]
                     ) -> dict[str, tuple[int, int]]:
    """The plain form of the read, for SQLite builds without JSON functions."""
    out: dict[str, tuple[int, int]] = {}
    for i in range(0, len(tokens), _CHUNK):
        chunk = list(tokens[i:i + _CHUNK])
        sql = "SELECT tok, spam, ham FROM tokens WHERE tok IN (" + ",".join("?" * len(chunk)) + ")"
        for tok, spam, ham in conn.execute(sql, chunk):
            out[tok] = (spam, ham)
    return out


class SqliteTokenStore:
    backend = "sqlite"

    def __init__(self, path: Path | str, *, create: bool = True, busy_timeout: float = 30.0):
        self.path = Path(path)
        try:
            # SQLite opens -wal/-shm/-journal by path: checked (and created) by descriptor
            # first, and only in a directory owned by this process's user
            sqlite_file(self.path, create=create)
        except FileNotFoundError:
            raise StoreError(f"{self.path}: no Bayes database (learn something first)") from None
        except OSError as exc:
            raise StoreError(str(exc) if exc.strerror is None else f"{self.path}: {exc}") from exc
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=busy_timeout,
                                         isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a process crash (kill -9); only a power
            # loss may roll back the last transactions, never corrupt the file.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            _drop_atime_index(self._conn)
            self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            self._json = _has_json(self._conn)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        self._lock = threading.Lock()
        self._busy_timeout = busy_timeout
        self._read_lock = threading.Lock()
        self._read_conn: sqlite3.Connection | None = None
        self._read_deadline = 0.0

    @property
    def location(self) -> str:
        return str(self.path)

    # --- reads ---------------------------------------------------------------------------
    # Classification reads on a connection of their own: in WAL mode a reader never waits
    # for a writer, and a separate Python lock means the daemon's event loop (which reads
    # inline, see filterd.checks.bayes) never waits for the autolearn thread's transaction.
    # A read given a deadline (time.monotonic()) is interrupted by SQLite's progress
    # handler once it passes, and fails as StoreError: the per-check timeout, kept inline.
    inline_reads = True

    def _reader(self) -> sqlite3.Connection:
        if self._read_conn is None:
            conn = sqlite3.connect(str(self.path), timeout=self._busy_timeout,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only=1")
            conn.set_progress_handler(self._past_deadline, 2000)
            self._read_conn = conn
        return self._read_conn

    def _past_deadline(self) -> int:
        return 1 if self._read_deadline and time.monotonic() > self._read_deadline else 0

    def _read(self, deadline: float | None, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._read_lock:
            try:
                self._read_deadline = deadline or 0.0
                return fn(self._reader())
            except sqlite3.Error as exc:
                if deadline and time.monotonic() > deadline:
                    raise StoreError(f"{self.path}: read timed out") from exc
                raise StoreError(f"{self.path}: {exc}") from exc
            finally:
                self._read_deadline = 0.0

    def message_counts(self, *, deadline: float | None = None) -> tuple[int, int]:
        rows = dict(self._read(deadline, lambda conn: conn.execute(
            "SELECT name, value FROM counters").fetchall()))
        return int(rows.get("nspam", 0)), int(rows.get("nham", 0))

    def token_counts(self, tokens: Sequence[str], *, deadline: float | None = None
                     ) -> dict[str, tuple[int, int]]:
        if not tokens:
            return {}
        return self._read(deadline, lambda conn: self._token_counts(conn, tokens))

    def _token_counts(self, conn: sqlite3.Connection, tokens: Sequence[str]
                      ) -> dict[str, tuple[int, int]]:
        if self._json:
            try:
                # one parameter, one cached statement: a JSON array joined against the
                # primary key costs about half of "IN (?, ?, ...)", which needs a new
                # statement for every token count (docs/bayes.md)
                rows = conn.execute(_READ_JSON, (json.dumps(tokens, ensure_ascii=False),)
                                    ).fetchall()
                return {tok: (spam, ham) for tok, spam, ham in rows}
            except UnicodeEncodeError:
                # a token that is no valid UTF-8 (a lone surrogate) cannot be known
                tokens = [t for t in tokens if encodable(t)]
        return _token_counts_in(conn, tokens)

    def learned_label(self, digest: str) -> str | None:
        with self._lock:
            try:
                row = self._conn.execute("SELECT label FROM learned WHERE digest = ?",
                                         (digest,)).fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc
        return row[0] if row else None

    # --- learning ------------------------------------------------------------------------
    def learn_batch(self, items: Sequence[LearnItem], day: int) -> list[LearnResult]:
        if not items:
            return []
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    results = self._learn_in_txn(conn, items, day)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc
        return results

    def _learn_in_txn(self, conn: sqlite3.Connection, items: Sequence[LearnItem],
                      day: int) -> list[LearnResult]:
        digests = list({item.digest for item in items})
        state: dict[str, str | None] = {}
        for i in range(0, len(digests), _CHUNK):
            chunk = digests[i:i + _CHUNK]
            sql = "SELECT digest, label FROM learned WHERE digest IN (" + ",".join("?" * len(chunk)) + ")"
            state.update(conn.execute(sql, chunk).fetchall())
        before = dict(state)
        # Per-class deltas as Counters: Counter.update() counts a token tuple in C, which
        # is most of the cost of a batch in Python. Only undo (move, forget) subtracts.
        adds = {SPAM: Counter(), HAM: Counter()}
        subs = {SPAM: Counter(), HAM: Counter()}
        counts = {SPAM: 0, HAM: 0}

        results: list[LearnResult] = []
        for item in items:
            old = state.get(item.digest)
            new = item.label
            if item.only_new and old is not None:
                results.append(LearnResult.NOOP)
            elif new is None:
                if old is None:
                    results.append(LearnResult.NOOP)
                    continue
                subs[old].update(item.tokens)
                counts[old] -= 1
                state[item.digest] = None
                results.append(LearnResult.FORGOTTEN)
            elif old == new:
                results.append(LearnResult.NOOP)
            else:
                if old is not None:
                    subs[old].update(item.tokens)
                    counts[old] -= 1
                adds[new].update(item.tokens)
                counts[new] += 1
                state[item.digest] = new
                results.append(LearnResult.MOVED if old is not None else LearnResult.LEARNED)
        add_spam, add_ham, sub_spam, sub_ham = adds[SPAM], adds[HAM], subs[SPAM], subs[HAM]
        if sub_spam or sub_ham:
            touched = sorted(add_spam.keys() | add_ham.keys() | sub_spam.keys() | sub_ham.keys())
            rows = [(tok, add_spam[tok] - sub_spam[tok], add_ham[tok] - sub_ham[tok], day,
                     1 if (tok in add_spam or tok in add_ham) else 0) for tok in touched]
        else:
            # sorted: the B-tree pages are then visited in order
            touched = sorted(add_spam.keys() | add_ham.keys())
            get_spam, get_ham = add_spam.get, add_ham.get
            rows = [(tok, get_spam(tok, 0), get_ham(tok, 0), day, 1) for tok in touched]
        if rows:
            conn.executemany(_UPSERT, rows)
            # only a token with no positive delta can have reached zero in both classes
            emptied = [row[0] for row in rows if row[1] <= 0 and row[2] <= 0]
            for i in range(0, len(emptied), _CHUNK):
                chunk = emptied[i:i + _CHUNK]
                conn.execute("DELETE FROM tokens WHERE spam <= 0 AND ham <= 0 AND tok IN (" +
                             ",".join("?" * len(chunk)) + ")", chunk)
        for label, delta in counts.items():
            if delta:
                name = "nspam" if label == SPAM else "nham"
                conn.execute("UPDATE counters SET value = max(0, value + ?) WHERE name = ?",
                             (delta, name))
        changed = [(d, label) for d, label in state.items() if before.get(d) != label]
        conn.executemany("DELETE FROM learned WHERE digest = ?",
                         [(d,) for d, label in changed if label is None])
        conn.executemany("INSERT OR REPLACE INTO learned (digest, label) VALUES (?, ?)",
                         [(d, label) for d, label in changed if label is not None])
        return results

    # --- maintenance ---------------------------------------------------------------------
    def expire(self, *, older_than_day: int, max_tokens: int) -> ExpiryResult:
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    removed = conn.execute("DELETE FROM tokens WHERE atime < ?",
                                           (older_than_day,)).rowcount
                    total = conn.execute("SELECT count(*) FROM tokens").fetchone()[0]
                    if max_tokens >= 0 and total > max_tokens:
                        excess = total - max_tokens
                        removed += conn.execute(
                            "DELETE FROM tokens WHERE tok IN (SELECT tok FROM tokens "
                            "ORDER BY atime ASC, spam + ham ASC LIMIT ?)", (excess,)).rowcount
                        total -= excess
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc
        return ExpiryResult(removed, total)

    def stats(self) -> StoreStats:
        nspam, nham = self.message_counts()
        with self._lock:
            try:
                ntokens, oldest, newest = self._conn.execute(
                    "SELECT count(*), min(atime), max(atime) FROM tokens").fetchone()
                learned = dict(self._conn.execute(
                    "SELECT label, count(*) FROM learned GROUP BY label").fetchall())
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc
        size = sum(os.path.getsize(p) for p in (self.path, Path(f"{self.path}-wal"))
                   if os.path.exists(p))
        return StoreStats("sqlite", str(self.path), nspam, nham, ntokens,
                          learned.get(SPAM, 0), learned.get(HAM, 0), oldest, newest, size)

    def integrity_problems(self) -> list[str]:
        """SQLite's own quick check: [] when the file is sound."""
        with self._lock:
            rows = self._conn.execute("PRAGMA quick_check").fetchall()
        return [r[0] for r in rows if r[0] != "ok"]

    def iter_tokens(self) -> Iterator[tuple[str, int, int, int]]:
        with self._lock:
            rows = self._conn.execute("SELECT tok, spam, ham, atime FROM tokens ORDER BY tok").fetchall()
        yield from rows

    def iter_learned(self) -> Iterator[tuple[str, str]]:
        with self._lock:
            rows = self._conn.execute("SELECT digest, label FROM learned ORDER BY digest").fetchall()
        yield from rows

    def replace_all(self, nspam: int, nham: int, tokens: Iterable[tuple[str, int, int, int]],
                    learned: Iterable[tuple[str, str]]) -> None:
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.execute("DELETE FROM tokens")
                    conn.execute("DELETE FROM learned")
                    conn.executemany("INSERT INTO tokens (tok, spam, ham, atime) VALUES (?, ?, ?, ?)",
                                     tokens)
                    conn.executemany("INSERT INTO learned (digest, label) VALUES (?, ?)", learned)
                    conn.execute("UPDATE counters SET value = ? WHERE name = 'nspam'", (nspam,))
                    conn.execute("UPDATE counters SET value = ? WHERE name = 'nham'", (nham,))
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    def close(self) -> None:
        with self._read_lock:
            if self._read_conn is not None:
                try:
                    self._read_conn.close()
                except sqlite3.Error:
                    pass
                self._read_conn = None
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
