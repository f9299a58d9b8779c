"""Compiled pattern databases kept across loads (filterd.ruleset.configure_compile_cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

from filterd import config
from filterd.config import PROJECT_RULES
from filterd.message import parse
from filterd.ruleset import configure_compile_cache, load
from filterd.ruleset import engine as engine_mod

pytest.importorskip("hyperscan")

MESSAGE = (b"From: Billing <billing@example.net>\nTo: you@example.org\n"
           b"Subject: FREE money, act now\nContent-Type: text/html\n\n"
           b"<p>Click <a href=\"http://192.0.2.55/login.php\">www.bank.example</a> now, "
           b"limited time offer, 100% free, cheap viagra</p>\n")


@pytest.fixture
def cache_dir(tmp_path: Path):
    directory = tmp_path / "rules-cache"
    configure_compile_cache(directory)
    engine_mod._DB_MEMO.clear()
    yield directory
    configure_compile_cache(None)
    engine_mod._DB_MEMO.clear()


def hits(ruleset) -> dict[str, str]:
    return dict(ruleset.engine.match(parse(MESSAGE)).hits)


def test_second_load_reads_the_cache_and_matches_the_same(cache_dir: Path, monkeypatch) -> None:
    first = load(PROJECT_RULES)
    files = sorted(cache_dir.glob("*.hsdb"))
    assert files, "nothing was kept"
    engine_mod._DB_MEMO.clear()          # as a new process would start

    made = []
    real_database = engine_mod.hyperscan.Database

    def counting_database(*args, **kwargs):
        made.append(1)
        return real_database(*args, **kwargs)
    monkeypatch.setattr(engine_mod.hyperscan, "Database", counting_database)
    second = load(PROJECT_RULES)
    assert made == [], "compiled although every database was cached"
    assert not any(g.hs_failures for g in second.engine.groups.values())
    assert hits(first) and hits(second) == hits(first)


def test_a_damaged_cache_file_is_ignored_and_rewritten(cache_dir: Path) -> None:
    reference = hits(load(PROJECT_RULES))
    victim = max(cache_dir.glob("*.hsdb"), key=lambda f: f.stat().st_size)
    victim.write_bytes(b"\0" * 64)
    engine_mod._DB_MEMO.clear()
    assert hits(load(PROJECT_RULES)) == reference
    assert victim.stat().st_size > 64      # compiled afresh and kept again


def test_an_unwritable_cache_costs_a_compile_not_the_load(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would be")
    configure_compile_cache(blocker / "rules-cache")
    engine_mod._DB_MEMO.clear()
    try:
        assert hits(load(PROJECT_RULES))
    finally:
        configure_compile_cache(None)
        engine_mod._DB_MEMO.clear()


def test_setting_names_the_directory_or_turns_it_off(tmp_path: Path) -> None:
    base = config.defaults().with_overrides({"daemon.state_dir": str(tmp_path)})
    assert base.compile_cache_dir == tmp_path / "rules-cache"
    assert base.with_overrides({"rules.compile_cache": "off"}).compile_cache_dir is None
    assert base.with_overrides({"rules.compile_cache": "/x/y"}).compile_cache_dir == Path("/x/y")
