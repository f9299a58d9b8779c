"""Symbols, scan results, verdicts, and the pure decision from one to the other.

Trusts: nothing; this module does no I/O and is table-tested (tests/unit/test_policy.py).
Reads: a `Policy` (levels, forced actions, failure defaults) built from rules/actions.toml.
Emits: no symbols; it turns the symbols of a scan into a `Verdict`.

A check reports *what it saw* as named symbols; the scores table says *how much* each symbol
weighs; `decide()` adds them up and compares the sum with the levels. Forced actions (a virus,
a failure default such as a dead clamd) override the score.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence


class Action(str, enum.Enum):
    """What happens to a message. Values are the names used in JSON output and config."""

    ACCEPT = "accept"          # deliver unchanged apart from X-Virus-Scanned
    TAG = "tag"                # deliver with X-Spam-* headers (score >= tag_level)
    SPAM = "spam"              # deliver marked as spam (score >= tag2_level)
    QUARANTINE = "quarantine"  # store durably, do not deliver (score >= kill_level)
    REJECT = "reject"          # refuse with 5xx (milter); after-queue maps it (see frontends)
    DISCARD = "discard"        # accept and drop (only by explicit policy)
    TEMPFAIL = "tempfail"      # 4xx: the MTA keeps the message and retries

    @property
    def is_spam_verdict(self) -> bool:
        """Counted as a spam verdict in evaluation (shared/notes/evaluation.md)."""
        return self in (Action.SPAM, Action.QUARANTINE, Action.REJECT, Action.DISCARD)


# When several actions apply (score-based and forced), the most severe wins. A deliberate
# reject needs no retry, so it outranks tempfail; tempfail outranks everything that would
# let a possibly unscanned message be delivered or stored for release.
SEVERITY: dict[Action, int] = {
    Action.ACCEPT: 0,
    Action.TAG: 1,
    Action.SPAM: 2,
    Action.QUARANTINE: 3,
    Action.DISCARD: 4,
    Action.TEMPFAIL: 5,
    Action.REJECT: 6,
}


@dataclass(frozen=True, slots=True)
class Symbol:
    """One named finding of a check. `score` is filled in from the scores table by decide()."""

    name: str
    options: tuple[str, ...] = ()
    score: float = 0.0

    def with_score(self, score: float) -> "Symbol":
        return Symbol(self.name, self.options, score)


@dataclass(frozen=True, slots=True)
class Levels:
    tag_level: float = 2.0
    tag2_level: float = 6.0
    kill_level: float = 10.0
    reject_level: float = 15.0
    # originating mail is not spam-scored, but a score this high is refused all the same
    # (a compromised account); infinite = off. Policy banks set it (rules/banks/).
    originating_reject_level: float = math.inf


@dataclass(frozen=True, slots=True)
class Policy:
    """The decision table: levels, what kill_level does, forced actions per symbol."""

    levels: Levels = field(default_factory=Levels)
    kill_action: Action = Action.QUARANTINE
    subject_tag: str = "***SPAM*** "
    # symbol name -> action forced whatever the score (e.g. CLAM_VIRUS -> reject)
    forced: Mapping[str, Action] = field(default_factory=dict)
    # failure name -> action (see rules/actions.toml [failures])
    failures: Mapping[str, Action] = field(default_factory=dict)
    # originating mail (mynetworks / authenticated) is never spam-tagged
    spam_checks_for_originating: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    score: float
    symbols: tuple[Symbol, ...]
    reason: str
    required: float
    # the levels reached, for header formatting
    tagged: bool = False       # score >= tag_level (X-Spam headers)
    is_spam: bool = False      # score >= tag2_level (X-Spam-Flag: YES, subject tag)
    virus_names: tuple[str, ...] = ()

    @property
    def symbol_names(self) -> list[str]:
        return [s.name for s in self.symbols]


def score_symbols(symbols: Sequence[Symbol], scores: Mapping[str, float]) -> tuple[Symbol, ...]:
    """Attach each symbol's score from the table; unknown and `__helper` symbols score 0."""
    return tuple(s.with_score(float(scores.get(s.name, 0.0))) for s in symbols)


def decide(symbols: Sequence[Symbol], scores: Mapping[str, float], policy: Policy, *,
           originating: bool = False, failure: str | None = None,
           spam_checks: bool | None = None) -> Verdict:
    """Turn the symbols of one scan into a verdict.

    `failure` names a whole-scan failure (e.g. "deadline", "internal_error") looked up in
    policy.failures; without an entry it tempfails, because an unexplained failure must
    never turn into an accept.
    `spam_checks` False makes the score lead to no spam tag or action (a recipient that
    bypasses spam checks, originating mail); None derives it from `originating` as before.
    Originating mail that is not spam-scored is still refused at
    levels.originating_reject_level.
    """
    scored = score_symbols(symbols, scores)
    total = round(math.fsum(s.score for s in scored), 3)
    levels = policy.levels
    if spam_checks is None:
        spam_checks = not originating or policy.spam_checks_for_originating
    spam_scored = spam_checks

    action, reason = Action.ACCEPT, "clean"
    tagged = spam_scored and total >= levels.tag_level
    is_spam = spam_scored and total >= levels.tag2_level
    if spam_scored:
        if total >= levels.reject_level:
            action, reason = Action.REJECT, f"spam score {total:g} >= reject_level {levels.reject_level:g}"
        elif total >= levels.kill_level:
            action, reason = policy.kill_action, f"spam score {total:g} >= kill_level {levels.kill_level:g}"
        elif is_spam:
            action, reason = Action.SPAM, f"spam score {total:g} >= tag2_level {levels.tag2_level:g}"
        elif tagged:
            action, reason = Action.TAG, f"score {total:g} >= tag_level {levels.tag_level:g}"
    elif originating and total >= levels.originating_reject_level:
        action, reason = Action.REJECT, (f"outbound spam score {total:g} >= "
                                         f"originating_reject_level "
                                         f"{levels.originating_reject_level:g}")

    for sym in scored:
        forced = policy.forced.get(sym.name) or policy.failures.get(sym.name)
        if forced is not None and SEVERITY[forced] > SEVERITY[action]:
            detail = f" ({', '.join(sym.options)})" if sym.options else ""
            action, reason = forced, f"{sym.name}{detail}"

    if failure is not None:
        forced = policy.failures.get(failure, Action.TEMPFAIL)
        if SEVERITY[forced] > SEVERITY[action]:
            action, reason = forced, f"failure: {failure}"

    virus_names = tuple(o for s in scored if s.name == "CLAM_VIRUS" for o in s.options)
    return Verdict(action=action, score=total, symbols=scored, reason=reason,
                   required=levels.tag2_level, tagged=tagged, is_spam=is_spam,
                   virus_names=virus_names)
