"""Robinson's f(w) per token and Fisher's chi-square combining, then the BAYES_* band.

Trusts: the counts the store hands in. No I/O, no settings: the caller passes the constants
(defaults below; measured in docs/bayes.md). Emits no symbols itself: `band()` names the
BAYES_* symbol for a probability, and filterd.checks.bayes emits it.

For each token with counts s (spam) and h (ham) out of nspam and nham learned messages:
  p(w) = (s/nspam) / (s/nspam + h/nham)
  f(w) = (S*X + n*p(w)) / (S + n),  n = s + h        (Robinson: a prior X of strength S)
Tokens with |f(w) - 0.5| < min_dev carry no evidence and are left out; of the rest, the
`max_significant` strongest are combined (Fisher):
  H = C^-1(-2 sum ln f(w), 2k),  S = C^-1(-2 sum ln(1 - f(w)), 2k)
  probability = (1 + H - S) / 2
where C^-1 is the chi-square survival function with 2k degrees of freedom. The raw score is
the logit of that probability plus `prefixed_weight` (0.25) times the logit of the same
combination over the prefixed tokens alone (headers, relays, URLs, MIME/HTML structure: a
second opinion that a long body of correlated words cannot swamp); `calibration` maps it
to the probability that names the band.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["Classification", "ClassifierParams", "classify", "calibrate", "band", "BANDS",
           "DEFAULT_CALIBRATION"]


@dataclass(frozen=True, slots=True)
class ClassifierParams:
    robinson_s: float = 0.2      # strength of the prior X (in pseudo-messages)
    robinson_x: float = 0.5      # f(w) of a token never seen
    min_dev: float = 0.375       # ignore tokens whose f(w) is this close to 0.5
    max_significant: int = 100   # combine at most this many of the strongest tokens
    method: str = "fisher"       # "fisher" (chi-square combining) or "logodds" (see classify)
    # Fisher only: the raw score adds this times the Fisher logit of the prefixed tokens
    # alone (every token but plain body words); 0 turns the second opinion off.
    prefixed_weight: float = 0.25
    # Piecewise-linear map from the raw score to a calibrated probability: sorted (raw, p)
    # points, () for none. Fitted on a validation split of half A by bench/tune_bayes.py.
    calibration: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Classification:
    probability: float           # 0 = surely ham, 1 = surely spam (calibrated when configured)
    used: int                    # tokens that entered the combination
    known: int                   # tokens of the message the store had counts for
    top: tuple[tuple[str, float], ...] = ()   # strongest tokens with f(w), for explanations
    raw: float = 0.5             # the combined score before calibration


# The shipped calibration (bayes.calibrate): raw score (the logit of Fisher's p plus
# prefixed_weight times that of the prefixed tokens, for the default params) -> spam
# probability, fitted by `bench/tune_bayes.py --fit-calibration` on 5-fold cross-validated
# scores of half A (isotonic regression; each point is the lowest raw score from which the
# spam fraction reaches a band bound). Half A is 61 % spam: a site whose mail is mostly ham
# sees fewer spam per band than these probabilities say (docs/bayes.md).
DEFAULT_CALIBRATION: tuple[tuple[float, float], ...] = (
    (-49.505, 0.001), (-29.505, 0.01), (-11.274, 0.05), (-5.089, 0.2), (-3.543, 0.4),
    (-2.975, 0.6), (-1.063, 0.8), (-0.784, 0.95), (0.105, 0.99), (1.655, 0.999),
    (51.655, 0.9999),
)

# (lower bound, symbol): the band of a probability is the last whose bound it reaches.
BANDS: tuple[tuple[float, str], ...] = (
    (0.0, "BAYES_00"), (0.01, "BAYES_05"), (0.05, "BAYES_20"), (0.20, "BAYES_40"),
    (0.40, "BAYES_50"), (0.60, "BAYES_60"), (0.80, "BAYES_80"), (0.95, "BAYES_95"),
    (0.99, "BAYES_99"), (0.999, "BAYES_999"),
)


def band(probability: float) -> str:
    name = BANDS[0][1]
    for bound, symbol in BANDS:
        if probability >= bound:
            name = symbol
        else:
            break
    return name


def _chi2q(x2: float, dof: int) -> float:
    """P(chi-square with even `dof` degrees of freedom >= x2)."""
    m = x2 / 2.0
    term = math.exp(-m)
    total = term
    for i in range(1, dof // 2):
        term *= m / i
        total += term
        if term == 0.0 and total == 0.0:
            break
    return min(total, 1.0)


def _logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    return a + math.log1p(math.exp(b - a)) if b > -math.inf else a


def _log_series(m: float, log_m: float, lo: int, hi: int | None) -> float:
    """ln sum_{i=lo}^{hi} m^i / i! (hi None: to infinity), for m > 0.

    Summed outward from the largest term with plain ratios (term(i+1)/term(i) = m/(i+1)), so
    only the largest term needs a logarithm; the sum stops where the terms no longer count."""
    peak = int(m)
    if peak < lo:
        peak = lo
    elif hi is not None and peak > hi:
        peak = hi
    total = term = 1.0
    i = peak
    while i > lo:
        term *= i / m
        i -= 1
        total += term
        if term < 1e-17 * total:
            break
    term = 1.0
    i = peak
    while hi is None or i < hi:
        i += 1
        term *= m / i
        total += term
        if term < 1e-17 * total:
            break
    return peak * log_m - math.lgamma(peak + 1) + math.log(total)


def _log_chi2_tails(x2: float, dof: int) -> tuple[float, float]:
    """(ln P(X <= x2), ln P(X > x2)) for X chi-square with even `dof`, without underflow.

    P(X > x2) = e^-m sum_{i<k} m^i/i! and P(X <= x2) = e^-m sum_{i>=k} m^i/i!, with m = x2/2
    and k = dof/2: each series is summed from its largest term (_log_series)."""
    k = dof // 2
    m = x2 / 2.0
    if m <= 0.0:
        return -math.inf, 0.0
    log_m = math.log(m)
    log_upper = min(0.0, -m + _log_series(m, log_m, 0, k - 1))
    if log_upper < -1e-3:
        return math.log(-math.expm1(log_upper)), log_upper
    # the upper tail is close to 1: sum the lower tail's series directly, terms i >= k
    return min(0.0, -m + _log_series(m, log_m, k, None)), log_upper


def _fisher_logit(fs: Sequence[float]) -> float:
    """The logit of Fisher's combined probability p = (1 + S - H) / 2 of the f(w) values,
    H = P(chi2 <= -2 sum ln f), S = P(chi2 <= -2 sum ln(1 - f)), with 2k degrees of freedom.

    Both tails of each are kept in the log domain, so the score is the exact logit of p even
    where p itself rounds to 0 or 1: thousands of spam share p = 1.0, and a threshold between
    them (the FP <= 0.1 % operating point) needs their order."""
    sum_ln_f = 0.0
    sum_ln_1f = 0.0
    log = math.log
    for f in fs:
        # clamp: a token seen only in one class gives f close to 0 or 1, never exactly
        f = min(max(f, 1e-9), 1.0 - 1e-9)
        sum_ln_f += log(f)
        sum_ln_1f += log(1.0 - f)
    k2 = 2 * len(fs)
    log_h, log_not_h = _log_chi2_tails(-2.0 * sum_ln_f, k2)
    log_s, log_not_s = _log_chi2_tails(-2.0 * sum_ln_1f, k2)
    # p = (S + (1 - H)) / 2 and 1 - p = (H + (1 - S)) / 2
    return _logaddexp(log_s, log_not_h) - _logaddexp(log_h, log_not_s)


def classify(tokens: Sequence[str], counts: Mapping[str, tuple[int, int]], nspam: int,
             nham: int, params: ClassifierParams = ClassifierParams(), *,
             explain: int = 0) -> Classification:
    """The spam probability of a message from its tokens and the learned counts."""
    if nspam <= 0 or nham <= 0:
        return Classification(0.5, 0, 0)
    s_const, x_const, min_dev = params.robinson_s, params.robinson_x, params.min_dev
    inv_spam, inv_ham = 1.0 / nspam, 1.0 / nham
    scored: list[tuple[float, float, str]] = []
    known = 0
    for token in tokens:
        pair = counts.get(token)
        if pair is None:
            continue
        s, h = pair
        n = s + h
        if n <= 0:
            continue
        known += 1
        ps = s * inv_spam
        pw = ps / (ps + h * inv_ham)
        f = (s_const * x_const + n * pw) / (s_const + n)
        dev = abs(f - 0.5)
        if dev >= min_dev:
            scored.append((dev, f, token))
    if not scored:
        return Classification(calibrate(0.0, params.calibration, params.method)
                               if params.calibration else 0.5, 0, known, (), 0.0)
    strongest = scored
    if len(scored) > params.max_significant:
        strongest = sorted(scored, reverse=True)[:params.max_significant]
    if params.method == "logodds":
        raw = 0.0
        for _, f, _ in strongest:
            f = min(max(f, 1e-6), 1.0 - 1e-6)
            raw += math.log(f / (1.0 - f))
        # the sum grows with the evidence; divide by sqrt(k) so that long messages with many
        # weak tokens do not outvote short ones with a few strong ones
        raw /= math.sqrt(len(strongest))
    else:
        raw = _fisher_logit([f for _, f, _ in strongest])
        if params.prefixed_weight:
            # the second opinion: the same combination over the prefixed tokens alone
            # (headers, relays, URLs, MIME and HTML structure), which a body of many
            # correlated words (a language, a template) cannot swamp (docs/bayes.md)
            prefixed = [item for item in scored if ":" in item[2]]
            if len(prefixed) > params.max_significant:
                prefixed.sort(reverse=True)
                prefixed = prefixed[:params.max_significant]
            if prefixed:
                raw += params.prefixed_weight * _fisher_logit([f for _, f, _ in prefixed])
        if not params.calibration:
            probability = 1.0 / (1.0 + math.exp(-max(min(raw, 700.0), -700.0)))
            return _result(probability, strongest, known, explain, raw)
    return _result(calibrate(raw, params.calibration, params.method), strongest, known,
                   explain, raw)


def _result(probability: float, scored: list[tuple[float, float, str]], known: int,
            explain: int, raw: float) -> Classification:
    top: tuple[tuple[str, float], ...] = ()
    if explain:
        strongest = sorted(scored, reverse=True)[:explain]
        top = tuple((token, round(f, 4)) for _, f, token in strongest)
    return Classification(probability, len(scored), known, top, raw)


def calibrate(raw: float, points: tuple[tuple[float, float], ...], method: str = "fisher"
              ) -> float:
    """The calibrated probability of a raw score: linear between the fitted points, flat
    beyond them. Without points the Fisher score is its own probability and the log-odds
    score goes through the logistic function."""
    if not points:
        if method == "logodds":
            return 1.0 / (1.0 + math.exp(-max(min(raw, 700.0), -700.0)))
        return 0.5   # Fisher's uncalibrated probability is computed in classify()
    i = bisect.bisect_right(points, (raw, 2.0))
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1]
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 if x1 == x0 else y0 + (y1 - y0) * (raw - x0) / (x1 - x0)
