import asyncio
import os
import threading
from pathlib import Path

import pytest

_CORPORA = Path(os.environ.get("FILTERD_CORPORA",
                               Path(__file__).resolve().parents[2].parent / "shared" / "corpora"))


@pytest.fixture(scope="session")
def corpus_files() -> list[Path]:
    if not _CORPORA.is_dir():
        pytest.skip(f"corpora not found at {_CORPORA} (set FILTERD_CORPORA)")
    return sorted(p for p in _CORPORA.glob("*/*/*") if p.is_file())


CORE_RULE_FILES = ("actions.toml", "core.toml", "scores.toml")


@pytest.fixture
def core_rules(tmp_path) -> Path:
    """A rule directory with only the core files (sanity, GTUBE), for tests of the core that
    must not depend on other families' checks or services."""
    import shutil
    from filterd.config import PROJECT_RULES
    d = tmp_path / "core-rules"
    d.mkdir()
    for name in CORE_RULE_FILES:
        shutil.copy(PROJECT_RULES / name, d / name)
    return d


@pytest.fixture
def engine_rules(core_rules: Path) -> Path:
    """The core rule files plus the rules engine's bindings (rules-engine.toml): a test adds
    its own pattern rules without compiling the shipped ones."""
    import shutil
    from filterd.config import PROJECT_RULES
    shutil.copy(PROJECT_RULES / "rules-engine.toml", core_rules / "rules-engine.toml")
    return core_rules


@pytest.fixture
def base_rules(engine_rules: Path) -> Path:
    """engine_rules plus auth.toml and dnsbl.toml (the symbols imported SpamAssassin rules
    refer to): loading the whole shipped set would compile every family's patterns for each
    test."""
    import shutil
    from filterd.config import PROJECT_RULES
    for name in ("auth.toml", "dnsbl.toml"):
        shutil.copy(PROJECT_RULES / name, engine_rules / name)
    return engine_rules


@pytest.fixture
def loop_thread():
    """An event loop running in its own thread, as the daemon's loop runs beside libmilter's."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
