"""The TokenStore contract, run against every backend: SQLite (a temporary file) and Redis
(a real redis-server on loopback from tests/harness; skipped with the reason when absent)."""

from __future__ import annotations

from typing import Iterator

import pytest

from filterd.stores import HAM, SPAM, LearnItem, LearnResult, StoreError
from filterd.stores.sqlite import SqliteTokenStore

DAY = 20000


@pytest.fixture(scope="module")
def redis_server() -> Iterator[object]:
    pytest.importorskip("redis")
    from harness import RedisServer, Unavailable
    server = RedisServer()
    try:
        server.start()
    except Unavailable as exc:
        server.close()
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[object]:
    if request.param == "sqlite":
        s = SqliteTokenStore(tmp_path / "bayes.sqlite")
    else:
        server = request.getfixturevalue("redis_server")
        server.flushall()
        from filterd.stores.redis import RedisTokenStore
        s = RedisTokenStore(server.url, prefix="test:")
    try:
        yield s
    finally:
        s.close()


def item(digest: str, label: str | None, *tokens: str, only_new: bool = False) -> LearnItem:
    return LearnItem(digest, label, tuple(tokens), only_new)


def test_empty_store(store):
    assert store.message_counts() == (0, 0)
    assert store.token_counts(["a", "b"]) == {}
    assert store.learned_label("x") is None
    st = store.stats()
    assert (st.nspam, st.nham, st.ntokens) == (0, 0, 0) and st.consistent


def test_learn_counts_tokens_and_message(store):
    assert store.learn_batch([item("m1", SPAM, "cheap", "pills")], DAY) == [LearnResult.LEARNED]
    assert store.learn_batch([item("m2", SPAM, "cheap")], DAY) == [LearnResult.LEARNED]
    assert store.learn_batch([item("m3", HAM, "meeting", "cheap")], DAY) == [LearnResult.LEARNED]
    assert store.message_counts() == (2, 1)
    assert store.token_counts(["cheap", "pills", "meeting", "unknown"]) == {
        "cheap": (2, 1), "pills": (1, 0), "meeting": (0, 1)}
    assert store.learned_label("m1") == SPAM and store.learned_label("m3") == HAM


def test_learning_twice_is_a_noop(store):
    store.learn_batch([item("m1", SPAM, "a", "b")], DAY)
    assert store.learn_batch([item("m1", SPAM, "a", "b")], DAY) == [LearnResult.NOOP]
    assert store.message_counts() == (1, 0)
    assert store.token_counts(["a", "b"]) == {"a": (1, 0), "b": (1, 0)}


def test_relearning_as_other_class_moves_it(store):
    store.learn_batch([item("m1", SPAM, "a", "b"), item("m2", SPAM, "a")], DAY)
    assert store.learn_batch([item("m1", HAM, "a", "b")], DAY) == [LearnResult.MOVED]
    assert store.message_counts() == (1, 1)
    assert store.token_counts(["a", "b"]) == {"a": (1, 1), "b": (0, 1)}
    assert store.learned_label("m1") == HAM
    assert store.stats().consistent


def test_forget_undoes_and_deletes_empty_tokens(store):
    store.learn_batch([item("m1", HAM, "a", "b"), item("m2", HAM, "a")], DAY)
    assert store.learn_batch([item("m1", None, "a", "b")], DAY) == [LearnResult.FORGOTTEN]
    assert store.learn_batch([item("m1", None, "a", "b")], DAY) == [LearnResult.NOOP]
    assert store.message_counts() == (0, 1)
    assert store.token_counts(["a", "b"]) == {"a": (0, 1)}
    assert store.stats().ntokens == 1
    assert store.learned_label("m1") is None


def test_batch_applies_items_in_order(store):
    results = store.learn_batch([
        item("m1", SPAM, "x"), item("m1", SPAM, "x"), item("m1", HAM, "x"),
        item("m2", HAM, "y"), item("m2", None, "y"), item("m3", None, "z")], DAY)
    assert results == [LearnResult.LEARNED, LearnResult.NOOP, LearnResult.MOVED,
                       LearnResult.LEARNED, LearnResult.FORGOTTEN, LearnResult.NOOP]
    assert store.message_counts() == (0, 1)
    assert store.token_counts(["x", "y", "z"]) == {"x": (0, 1)}
    st = store.stats()
    assert st.consistent and (st.learned_spam, st.learned_ham) == (0, 1)


def test_only_new_never_overrides_a_known_message(store):
    store.learn_batch([item("m1", HAM, "a")], DAY)
    assert store.learn_batch([item("m1", SPAM, "a", only_new=True)], DAY) == [LearnResult.NOOP]
    assert store.learn_batch([item("m2", SPAM, "a", only_new=True)], DAY) == [LearnResult.LEARNED]
    assert store.message_counts() == (1, 1)
    assert store.learned_label("m1") == HAM


def test_counts_never_go_negative(store):
    store.learn_batch([item("m1", SPAM, "a")], DAY)
    # the copy being forgotten carries a token the learned copy did not have
    store.learn_batch([item("m1", None, "a", "never-learned")], DAY)
    assert store.token_counts(["a", "never-learned"]) == {}
    assert store.message_counts() == (0, 0)
    assert all(s >= 0 and h >= 0 for _, s, h, _ in store.iter_tokens())


def test_many_tokens_in_one_read(store):
    tokens = [f"t{i}" for i in range(2500)]
    store.learn_batch([LearnItem("big", SPAM, tuple(tokens))], DAY)
    counts = store.token_counts(tokens + ["missing"])
    assert len(counts) == 2500 and counts["t2499"] == (1, 0)


def test_expire_by_age_then_by_size(store):
    store.learn_batch([item("old", SPAM, "o1", "o2")], DAY - 200)
    store.learn_batch([item("mid", HAM, "m1", "m2", "m3")], DAY - 50)
    store.learn_batch([item("new", SPAM, "n1", "n2")], DAY)
    result = store.expire(older_than_day=DAY - 100, max_tokens=1_000_000)
    assert (result.removed, result.remaining) == (2, 5)
    assert store.token_counts(["o1", "o2"]) == {}
    result = store.expire(older_than_day=0, max_tokens=3)
    assert result.remaining == 3
    assert set(store.token_counts(["m1", "m2", "m3", "n1", "n2"])) == {"m3", "n1", "n2"} or \
        set(store.token_counts(["n1", "n2"])) == {"n1", "n2"}
    assert store.stats().ntokens == 3
    # expiry removes tokens, never messages: the counts still match the digests
    assert store.message_counts() == (2, 1) and store.stats().consistent


def test_dump_and_replace_all_round_trip(store):
    store.learn_batch([item("m1", SPAM, "a", "b"), item("m2", HAM, "b", "ü tf-8")], DAY)
    tokens = list(store.iter_tokens())
    learned = list(store.iter_learned())
    counts = store.message_counts()
    assert ("ü tf-8", 0, 1, DAY) in tokens and ("m1", SPAM) in learned
    store.replace_all(5, 7, [("z", 5, 0, DAY - 1)], [("d1", SPAM)])
    assert store.message_counts() == (5, 7)
    assert list(store.iter_tokens()) == [("z", 5, 0, DAY - 1)]
    store.replace_all(*counts, tokens, learned)
    assert sorted(store.iter_tokens()) == sorted(tokens)
    assert sorted(store.iter_learned()) == sorted(learned)
    assert store.stats().consistent


def test_redis_down_raises_store_error():
    pytest.importorskip("redis")
    from filterd.stores.redis import RedisTokenStore
    from harness.ports import free_port
    store = RedisTokenStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    with pytest.raises(StoreError):
        store.message_counts()
    with pytest.raises(StoreError):
        store.learn_batch([item("m", SPAM, "a")], DAY)


def test_sqlite_missing_file_without_create(tmp_path):
    with pytest.raises(StoreError):
        SqliteTokenStore(tmp_path / "absent.sqlite", create=False)


def test_sqlite_unwritable_location(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError):
        SqliteTokenStore(blocker / "bayes.sqlite")
