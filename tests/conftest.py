"""Fixtures for every test directory.

corpora_dir: the shared mail corpora (spamassassin, trec07p, nazario-phishing, ...), found at
<repo>/../shared/corpora or at $FILTERD_CORPORA; tests using it skip with a message when it
is absent (a fresh clone, CI without the corpora).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def corpora_path() -> Path:
    env = os.environ.get("FILTERD_CORPORA")
    return Path(env) if env else (REPO.parent / "shared" / "corpora").resolve()


@pytest.fixture(scope="session")
def corpora_dir() -> Path:
    path = corpora_path()
    if not path.is_dir():
        how = "FILTERD_CORPORA" if os.environ.get("FILTERD_CORPORA") else \
            "<repo>/../shared/corpora (set FILTERD_CORPORA to use another place)"
        pytest.skip(f"mail corpora not found at {path}: from {how}")
    return path


# Under CI a skip is a failure: a regression that makes a service or a command unavailable must
# not turn the integration tests into silent skips with a green run. Only the tests listed in
# tests/skips-allowed.txt (node ID prefix, then the reason) may skip there.
ALLOWED_SKIPS_FILE = REPO / "tests" / "skips-allowed.txt"


def strict_skips() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes") or \
        os.environ.get("FILTERD_STRICT_SKIPS", "") == "1"


def allowed_skips(path: Path = ALLOWED_SKIPS_FILE) -> dict[str, str]:
    """Node-ID prefix -> reason, from lines 'PREFIX  reason' (# comments, blank lines ignored)."""
    allowed: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            prefix, _, reason = line.partition(" ")
            if not reason.strip():
                raise ValueError(f"{path}: {prefix}: an allowed skip needs a reason")
            allowed[prefix] = reason.strip()
    return allowed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and strict_skips()) or hasattr(report, "wasxfail"):
        return
    if any(item.nodeid.startswith(prefix) for prefix in allowed_skips()):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true, which counts as a failure ({reason}); "
                       f"list it in tests/skips-allowed.txt with a reason if it must skip there")


@pytest.fixture(autouse=True)
def _keep_umask():
    """filterd.cli.main sets the process umask (filterd.modes); a test calling it in-process
    must not leave its umask to the tests after it (nor to the services they start)."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield
    os.umask(saved)
