"""The multi-pattern (Hyperscan prefilter + confirmation) path and the rule-by-rule path give
the same hits: on a sample of ../shared/corpora in the unit run, on every message with -m slow,
and on generated text full of near-misses."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from filterd.config import PROJECT_RULES
from filterd.message import parse
from filterd.ruleset import load
from filterd.ruleset.engine import HAVE_HYPERSCAN, prefilter_pattern

pytestmark = pytest.mark.skipif(not HAVE_HYPERSCAN, reason="hyperscan not installed")

RULESET = load(PROJECT_RULES, None)


def corpus_files(corpora_dir: Path, every: int) -> list[Path]:
    files = sorted(p for p in corpora_dir.glob("*/*/*") if p.is_file())
    return files[::every]


def assert_same_hits(raw: bytes, where: str) -> None:
    auto = RULESET.engine.match(parse(raw), mode="auto", rule_timeout=5.0)
    plain = RULESET.engine.match(parse(raw), mode="re", rule_timeout=5.0)
    assert set(auto.hits) == set(plain.hits), where
    assert not auto.errors and not plain.errors, where


def test_same_hits_on_a_corpus_sample(corpora_dir: Path) -> None:
    files = corpus_files(corpora_dir, 37)
    assert len(files) > 300
    for path in files:
        assert_same_hits(path.read_bytes(), str(path))


@pytest.mark.slow
def test_same_hits_on_every_corpus_message(corpora_dir: Path) -> None:
    for path in corpus_files(corpora_dir, 1):
        assert_same_hits(path.read_bytes(), str(path))


PIECES = ["viagra", "v1agra", "V i a g r a", "click here", "click\u00a0here", "verify your account",
          "paypal", "http://192.0.2.1/login.php", "https://bit.ly/x", "www.example.biz",
          "$1,000,000", "US$ 25,500,000", "million dollars", "\u00e9t\u00e9", "caf\u00e9",
          "<font color=\"#ffffff\">", "&#104;&#101;&#108;&#108;&#111;&#33;", "FREE!!!", "\u200b",
          "\u4e2d\u6587\u5b57\u7b26\u6d4b\u8bd5", "\u0440\u0443\u0441\u0441\u043a\u0438\u0439",
          "K", "\u212a", "\u017f", "ſtock", "ΣΊΣΥΦΟΣ", "-----BEGIN PGP SIGNED MESSAGE-----",
          "> quoted\n> lines", "wrote:\n", "lottery winner", "within 24 hours", " ", "\n", "_",
          "\t", "0", "\ufeff", "\U0001f600"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subject=st.lists(st.sampled_from(PIECES), max_size=6).map(" ".join),
       body=st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=8)), max_size=30)
       .map(" ".join), html=st.booleans())
def test_same_hits_on_generated_messages(subject: str, body: str, html: bool) -> None:
    ctype = "text/html" if html else "text/plain"
    raw = (f"From: x <a1234@example.biz>\nSubject: {subject}\nMIME-Version: 1.0\n"
           f"Content-Type: {ctype}; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
           f"{body}\n").encode("utf-8", "surrogatepass")
    assert_same_hits(raw, repr(raw[:200]))


@pytest.mark.parametrize("pattern, expected", [
    (r"a{2,50}", "a+"), (r"a{0,80}", "a*"), (r"a{,3}", "a{0,3}"), (r"a{2,3}", "a{2,3}"),
    (r"x\By", "xy"), (r"\x{e9}", r"\x{e9}"), (r"[^\w]", r"[^a-zA-Z0-9_]"),
    (r"\u00e9", r"\x{00e9}"), (r"\{", r"\{"),
])
def test_prefilter_rewrites_only_widen(pattern: str, expected: str) -> None:
    assert prefilter_pattern(pattern) == expected
