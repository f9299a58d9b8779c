"""SQLite-only behaviour of the token store: upgrading a file made before schema 2."""

from __future__ import annotations

import sqlite3

from filterd.stores import LearnItem
from filterd.stores.sqlite import SqliteTokenStore


def _indexes(path) -> set[str]:
    conn = sqlite3.connect(str(path))
    try:
        return {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'tokens'")}
    finally:
        conn.close()


def test_old_atime_index_is_dropped_and_expiry_still_works(tmp_path):
    path = tmp_path / "bayes.sqlite"
    store = SqliteTokenStore(path)
    store.learn_batch([LearnItem("old", "spam", ("ancient", "shared"))], 100)
    store.learn_batch([LearnItem("mid", "ham", ("middle", "shared"))], 150)
    store.learn_batch([LearnItem("new", "ham", ("fresh", "shared"))], 200)
    store.close()
    conn = sqlite3.connect(str(path))
    conn.execute("CREATE INDEX tokens_atime ON tokens(atime)")   # as schema 1 made it
    conn.commit()
    conn.close()
    assert "tokens_atime" in _indexes(path)

    store = SqliteTokenStore(path)
    assert "tokens_atime" not in _indexes(path)
    assert store.token_counts(["ancient", "shared", "fresh"]) == {
        "ancient": (1, 0), "shared": (1, 2), "fresh": (0, 1)}
    # by age: "ancient" (day 100) goes; then by size: the least recently learned next
    result = store.expire(older_than_day=120, max_tokens=2)
    assert (result.removed, result.remaining) == (2, 2)
    assert set(store.token_counts(["ancient", "middle", "fresh", "shared"])) == {"fresh", "shared"}
    stats = store.stats()
    assert stats.consistent and (stats.oldest_day, stats.newest_day) == (200, 200)
    store.close()


def test_a_read_only_file_keeps_working_with_its_index(tmp_path):
    path = tmp_path / "bayes.sqlite"
    store = SqliteTokenStore(path)
    store.learn_batch([LearnItem("d", "spam", ("a",))], 5)
    store.close()
    conn = sqlite3.connect(str(path))
    conn.execute("CREATE INDEX tokens_atime ON tokens(atime)")
    conn.commit()
    conn.close()
    # the drop is best effort: a connection that may not write keeps the index and reads
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    from filterd.stores.sqlite import _drop_atime_index
    _drop_atime_index(ro)
    ro.close()
    assert "tokens_atime" in _indexes(path)
    store = SqliteTokenStore(path)
    assert store.token_counts(["a"]) == {"a": (1, 0)}
    store.close()
