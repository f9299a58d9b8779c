import os
from pathlib import Path

import pytest

_CORPORA = Path(os.environ.get("FILTERD_CORPORA",
                               Path(__file__).resolve().parents[2].parent / "shared" / "corpora"))


@pytest.fixture(scope="session")
def corpus_files() -> list[Path]:
    if not _CORPORA.is_dir():
        pytest.skip(f"corpora not found at {_CORPORA} (set FILTERD_CORPORA)")
    return sorted(p for p in _CORPORA.glob("*/*/*") if p.is_file())
