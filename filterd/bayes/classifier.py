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
where C^-1 is the chi-square survival function with 2k degrees of freedom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["Classification", "ClassifierParams", "classify", "band", "BANDS"]


@dataclass(frozen=True, slots=True)
class ClassifierParams:
    robinson_s: float = 0.45     # strength of the prior X (in pseudo-messages)
    robinson_x: float = 0.5      # f(w) of a token never seen
    min_dev: float = 0.375       # ignore tokens whose f(w) is this close to 0.5
    max_significant: int = 150   # combine at most this many of the strongest tokens


@dataclass(frozen=True, slots=True)
class Classification:
    probability: float           # 0 = surely ham, 1 = surely spam
    used: int                    # tokens that entered the combination
    known: int                   # tokens of the message the store had counts for
    top: tuple[tuple[str, float], ...] = ()   # strongest tokens with f(w), for explanations


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
        return Classification(0.5, 0, known)
    if len(scored) > params.max_significant:
        scored.sort(reverse=True)
        scored = scored[:params.max_significant]
    sum_ln_f = 0.0
    sum_ln_1f = 0.0
    for _, f, _ in scored:
        # clamp: a token seen only in one class gives f close to 0 or 1, never exactly
        f = min(max(f, 1e-9), 1.0 - 1e-9)
        sum_ln_f += math.log(f)
        sum_ln_1f += math.log(1.0 - f)
    k2 = 2 * len(scored)
    hamminess = 1.0 - _chi2q(-2.0 * sum_ln_f, k2)
    spamminess = 1.0 - _chi2q(-2.0 * sum_ln_1f, k2)
    probability = (1.0 + spamminess - hamminess) / 2.0
    top: tuple[tuple[str, float], ...] = ()
    if explain:
        strongest = sorted(scored, reverse=True)[:explain]
        top = tuple((token, round(f, 4)) for _, f, token in strongest)
    return Classification(min(max(probability, 0.0), 1.0), len(scored), known, top)
