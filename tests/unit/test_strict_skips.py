"""Under CI=true a skipped test fails the run, unless tests/skips-allowed.txt lists it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[2]

INNER = """
import pytest

def test_skips():
    pytest.skip("clamd not installed")

@pytest.fixture
def service():
    pytest.skip("no Postfix")

def test_fixture_skips(service):
    pass

def test_allowed():
    pytest.skip("allowed here")

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False
"""


def _inner_project(pytester: pytest.Pytester, allowed: str) -> None:
    (pytester.path / "tests").mkdir()
    shutil.copy(REPO / "tests" / "conftest.py", pytester.path / "tests" / "conftest.py")
    (pytester.path / "tests" / "skips-allowed.txt").write_text(allowed)
    (pytester.path / "tests" / "test_inner.py").write_text(INNER)


def test_skips_fail_under_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    _inner_project(pytester, "# reasoned exceptions\n"
                             "tests/test_inner.py::test_allowed  needs a GPU nobody has\n")
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "tests")
    result.assert_outcomes(failed=1, errors=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(["*skipped under CI=true, which counts as a failure*"])


def test_skips_stay_skips_outside_ci(pytester: pytest.Pytester,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _inner_project(pytester, "")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("FILTERD_STRICT_SKIPS", raising=False)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "tests")
    result.assert_outcomes(skipped=3, xfailed=1)


def test_allowed_skip_needs_a_reason(pytester: pytest.Pytester,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _inner_project(pytester, "tests/test_inner.py::test_allowed\n")
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "tests")
    assert result.ret != 0
    assert "an allowed skip needs a reason" in result.stdout.str() + result.stderr.str()
