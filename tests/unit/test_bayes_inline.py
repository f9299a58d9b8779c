"""The Bayes check's SQLite fast path: reads on the event loop, bounded by a read deadline.

filterd.checks.bayes classifies inline (no worker thread) once a SQLite store is open; the
check's timeout then becomes the store's read deadline, enforced inside SQLite. These tests
use a real SQLite file and a real Scanner; nothing is faked but a thread hop that must not
happen (asyncio.to_thread replaced by a function that fails the test when called).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from filterd.checks import bayes as check_module
from filterd.checks.bayes import BayesService
from filterd.stores import LearnItem, StoreError
from filterd.stores.sqlite import SqliteTokenStore

from unit.test_bayes import _bayes_symbols, _scan, _train, msg, settings_for


def _store_with_tokens(tmp_path, n: int) -> tuple[SqliteTokenStore, tuple[str, ...]]:
    store = SqliteTokenStore(tmp_path / "b.sqlite")
    tokens = tuple(f"tok{i}" for i in range(n))
    store.learn_batch([LearnItem("d1", "spam", tokens), LearnItem("d2", "ham", tokens[:10])], 1)
    return store, tokens


def test_sqlite_read_past_its_deadline_fails_as_store_error_then_reads_again(tmp_path):
    store, tokens = _store_with_tokens(tmp_path, 3000)
    with pytest.raises(StoreError, match="read timed out"):
        store.token_counts(tokens, deadline=time.monotonic() - 1.0)
    # the deadline belonged to that read only
    counts = store.token_counts(tokens, deadline=time.monotonic() + 30.0)
    assert len(counts) == 3000 and counts["tok0"] == (1, 1) and counts["tok2999"] == (1, 0)
    assert store.token_counts(tokens[:5]) == {f"tok{i}": (1, 1) for i in range(5)}
    assert store.message_counts(deadline=time.monotonic() + 30.0) == (1, 1)
    store.close()


def test_sqlite_reads_see_what_the_writer_committed_and_skip_unstorable_tokens(tmp_path):
    store, _ = _store_with_tokens(tmp_path, 3)
    assert store.token_counts(["tok0", "nope"]) == {"tok0": (1, 1)}
    store.learn_batch([LearnItem("d3", "spam", ("tok0", "é", 'qu"ote'))], 2)
    # a lone surrogate cannot be stored, so it is simply unknown (not an error)
    assert store.token_counts(["tok0", "é", 'qu"ote', "\udce9"]) == {
        "tok0": (2, 1), "é": (1, 0), 'qu"ote': (1, 0)}
    assert store.message_counts() == (2, 1)
    store.close()


def _forbid_threads(monkeypatch) -> list[object]:
    calls: list[object] = []

    async def no_thread(fn, *args, **kwargs):
        calls.append(fn)
        raise AssertionError("the SQLite path must not hop to a thread")

    monkeypatch.setattr(check_module.asyncio, "to_thread", no_thread)
    return calls


def test_check_classifies_inline_with_sqlite(tmp_path, monkeypatch):
    from filterd.service import Scanner
    settings = settings_for(tmp_path)
    _train(settings)
    svc = BayesService(settings)
    svc.store()              # opened: from now on the check reads inline
    scanner = Scanner(settings, services={"bayes": svc})
    calls = _forbid_threads(monkeypatch)
    (sym,) = _bayes_symbols(_scan(scanner, msg("Cheap meds", "cheap meds pharmacy online",
                                               mid="<t1@x>")))
    assert calls == [] and sym.name in ("BAYES_99", "BAYES_999")
    svc.close()


def test_check_timeout_is_the_inline_read_deadline(tmp_path, monkeypatch):
    from filterd.service import Scanner
    local = tmp_path / "site" / "local.d"
    local.mkdir(parents=True)
    # a timeout no read can meet: the inline read must give up, not block the loop
    (local / "bayes.toml").write_text("[check.bayes]\ntimeout = 0.000001\n")
    settings = settings_for(tmp_path, **{"rules.site_dir": str(tmp_path / "site")})
    _train(settings)
    svc = BayesService(settings)
    svc.store()
    scanner = Scanner(settings, services={"bayes": svc})
    calls = _forbid_threads(monkeypatch)
    words = " ".join(f"w{i}x" for i in range(2500))   # enough work for the progress handler
    outcome = _scan(scanner, msg("Cheap meds", words, mid="<t2@x>"))
    (sym,) = _bayes_symbols(outcome)
    assert calls == [] and sym.name == "BAYES_STORE_ERROR" and sym.score == 0.0
    assert "timed out" in sym.options[0]
    assert outcome.verdict.action.value != "tempfail"
    svc.close()


def test_check_with_a_network_store_still_runs_on_a_thread(tmp_path, monkeypatch):
    settings = settings_for(tmp_path)
    _train(settings)

    class NetworkStore:
        """The real SQLite store dressed as a network one (inline_reads False)."""
        inline_reads = False
        backend = "sqlite"

        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

    from filterd.stores import open_token_store
    svc = BayesService(settings, store=NetworkStore(open_token_store(settings)))
    used: list[object] = []
    real = asyncio.to_thread

    async def counting(fn, *args, **kwargs):
        used.append(fn)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(check_module.asyncio, "to_thread", counting)
    from filterd.service import Scanner
    scanner = Scanner(settings, services={"bayes": svc})
    (sym,) = _bayes_symbols(_scan(scanner, msg("Cheap meds", "cheap meds pharmacy online",
                                               mid="<t3@x>")))
    assert len(used) == 1 and sym.name in ("BAYES_99", "BAYES_999")
    svc.close()
