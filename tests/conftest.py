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


@pytest.fixture(autouse=True)
def _keep_umask():
    """filterd.cli.main sets the process umask (filterd.modes); a test calling it in-process
    must not leave its umask to the tests after it (nor to the services they start)."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield
    os.umask(saved)
