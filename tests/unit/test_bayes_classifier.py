"""The classifier's second opinion over prefixed tokens, and its chi-square tails."""

from __future__ import annotations

import math

import pytest

from filterd.bayes.classifier import (ClassifierParams, _fisher_logit, _log_chi2_tails,
                                      classify)


def _direct_tails(x2: float, dof: int) -> tuple[float, float]:
    """Both tails by summing the series term by term (small arguments only)."""
    m, k = x2 / 2.0, dof // 2
    upper = sum(math.exp(-m) * m ** i / math.factorial(i) for i in range(k))
    return math.log(1.0 - upper) if upper < 1.0 else -math.inf, math.log(upper)


@pytest.mark.parametrize("x2,dof", [(0.5, 2), (3.0, 4), (10.0, 4), (20.0, 10), (60.0, 40),
                                    (150.0, 100), (40.0, 100)])
def test_chi2_tails_match_the_series(x2, dof):
    lower, upper = _log_chi2_tails(x2, dof)
    want_lower, want_upper = _direct_tails(x2, dof)
    assert upper == pytest.approx(want_upper, rel=1e-9, abs=1e-12)
    assert lower == pytest.approx(want_lower, rel=1e-9, abs=1e-12)


def test_chi2_tails_stay_finite_far_out():
    # e^-m underflows double precision here; the logs do not
    lower, upper = _log_chi2_tails(4000.0, 200)
    assert lower == pytest.approx(0.0, abs=1e-12) and -1900.0 < upper < -1500.0
    lower, upper = _log_chi2_tails(1e-3, 200)
    assert upper == pytest.approx(0.0, abs=1e-12) and lower < -1000.0


def _counts():
    # body words learned only from spam (one campaign), list headers only from ham
    counts = {f"mot{i}": (40, 0) for i in range(30)}
    counts.update({f"list-id:l{i}": (0, 60) for i in range(4)})
    counts.update({"HN:list-id": (0, 60), "RP:lists.example.org": (0, 60)})
    return counts


def test_prefixed_tokens_give_a_weighted_second_opinion():
    tokens = tuple(_counts())
    off = classify(tokens, _counts(), 100, 100, ClassifierParams(prefixed_weight=0.0))
    on = classify(tokens, _counts(), 100, 100, ClassifierParams(prefixed_weight=0.25))
    # the list headers alone say ham, so the second opinion pulls the score down
    assert on.raw < off.raw
    prefixed_fs = []
    for token, (s, h) in _counts().items():
        if ":" in token:
            pw = (s / 100) / (s / 100 + h / 100)
            prefixed_fs.append((0.2 * 0.5 + (s + h) * pw) / (0.2 + s + h))
    assert on.raw == pytest.approx(off.raw + 0.25 * _fisher_logit(prefixed_fs), rel=1e-12)
    # uncalibrated, the probability is the logistic of the raw score
    assert on.probability == pytest.approx(1.0 / (1.0 + math.exp(-on.raw)))


def test_no_prefixed_tokens_leaves_plain_fisher():
    counts = {f"w{i}": (30, 1) for i in range(10)}
    tokens = tuple(counts)
    a = classify(tokens, counts, 50, 50, ClassifierParams(prefixed_weight=0.0))
    b = classify(tokens, counts, 50, 50, ClassifierParams(prefixed_weight=0.25))
    assert a.raw == b.raw and a.probability > 0.99
