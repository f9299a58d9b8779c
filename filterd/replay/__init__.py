"""Corpus replay: run the daemon's whole pipeline offline over labelled mail and measure it.

What it does: every message from files, directories, mbox files and Maildirs goes through the
same `Scanner.scan()` the daemon uses (network checks off unless asked), and the verdicts are
turned into the project's quality figures (shared/notes/evaluation.md):
  * labels from the path: a component `ham` -> ham; `spam` or `phish` -> spam; `virus` -> left
    out of the figures (the antivirus path's business); anything else is unlabelled;
  * spam verdict = `Action.is_spam_verdict` (spam, quarantine, reject, discard); tempfail is a
    column of its own and is neither a false positive nor a false negative;
  * FP rate = ham with a spam verdict / ham; FN rate = spam without a spam verdict and not
    tempfailed / spam; both per corpus (the path component above the label) and overall;
  * ROC AUC from the score (Mann-Whitney, ties count half), and the FN rate at the most
    sensitive score threshold that keeps FP <= replay.fp_target of ham, overall and per corpus;
  * per-symbol hit counts on ham and spam, the slowest messages, and a threshold table of what
    each tag2_level / kill_level choice would have done;
  * two replays of the same messages compared: changed actions and verdicts, and per symbol
    the ham and spam that gained or lost it; results kept between runs as one JSON record per
    message (to_record / from_record; bench/eval_split.py writes and compares such files).

Trusts: nothing in the messages; a message the pipeline cannot read is counted as an error and
the run goes on. Nothing is quarantined, reinjected, learned or logged per message.
Reads: replay.fp_target, replay.slowest, replay.thresholds, and every setting the Scanner reads.
Emits: no symbols.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Callable, Iterable, Sequence

from filterd.message import Envelope
from filterd.policy import SEVERITY, Action, Policy

HAM, SPAM, VIRUS = "ham", "spam", "virus"
# Path component -> label (evaluation.md: phish counts as spam, virus is left out).
LABEL_DIRS = {"ham": HAM, "spam": SPAM, "phish": SPAM, "virus": VIRUS}
_MBOX_INDEX = re.compile(r":\d+$")  # sources.iter_messages names mbox members "file:N"


@dataclass(frozen=True, slots=True)
class MessageResult:
    """The verdict on one replayed message, with what the figures need."""

    name: str
    corpus: str
    label: str | None           # ham, spam, virus or None (unlabelled)
    action: str                 # Action value
    score: float
    symbols: tuple[str, ...]
    reason: str
    seconds: float
    forced: str | None = None   # the action forced whatever the score (virus, failure), if any
    error: str | None = None    # the message could not be read

    @property
    def spam_verdict(self) -> bool:
        return Action(self.action).is_spam_verdict

    @property
    def tempfail(self) -> bool:
        return self.action == Action.TEMPFAIL.value


def label_of(name: str) -> tuple[str | None, str]:
    """(label, corpus) from a path: the last label directory wins; corpus is the one above it."""
    parts = PurePath(_MBOX_INDEX.sub("", name)).parts
    for i in range(len(parts) - 2, -1, -1):
        label = LABEL_DIRS.get(parts[i].lower())
        if label is not None:
            corpus = parts[i - 1] if i > 0 else "-"
            return label, corpus
    return None, (parts[-2] if len(parts) > 1 else "-")


def forced_action(symbol_names: Iterable[str], failure: str | None, policy: Policy) -> str | None:
    """The action the policy forces whatever the score (the most severe one), or None."""
    forced: Action | None = None
    for name in symbol_names:
        action = policy.forced.get(name) or policy.failures.get(name)
        if action is not None and (forced is None or SEVERITY[action] > SEVERITY[forced]):
            forced = action
    if failure is not None:
        action = policy.failures.get(failure, Action.TEMPFAIL)
        if forced is None or SEVERITY[action] > SEVERITY[forced]:
            forced = action
    return forced.value if forced is not None else None


Progress = Callable[[int, "MessageResult"], None]


async def replay_messages(scanner: Any, items: Iterable[Any], *, label: str = "auto",
                          network: bool = False, progress: Progress | None = None,
                          ) -> list[MessageResult]:
    """Scan every item (filterd.message.sources.Item) and return one result per message."""
    results: list[MessageResult] = []
    envelope = Envelope(listener="replay")
    for item in items:
        auto_label, corpus = label_of(item.name)
        msg_label = auto_label if label == "auto" else label
        if item.data is None:
            result = MessageResult(item.name, corpus, msg_label, Action.TEMPFAIL.value, 0.0, (),
                                   f"unreadable: {item.error}", 0.0, error=item.error)
        else:
            started = time.perf_counter()
            outcome = await scanner.scan(item.data, envelope, skip_network=not network)
            seconds = time.perf_counter() - started
            verdict = outcome.verdict
            names = tuple(s.name for s in verdict.symbols)
            result = MessageResult(
                item.name, corpus, msg_label, verdict.action.value, verdict.score, names,
                verdict.reason, seconds,
                forced=forced_action(names, outcome.failure, outcome.ruleset.policy))
        results.append(result)
        if progress is not None:
            progress(len(results), result)
    return results


def replay(paths: Sequence[str], settings: Any, *, label: str = "auto", network: bool = False,
           progress: Progress | None = None) -> tuple[list[MessageResult], Any]:
    """Build a Scanner from `settings`, replay `paths`; returns (results, levels used)."""
    from filterd.message.sources import iter_messages
    from filterd.service import Scanner

    scanner = Scanner(settings)

    async def run() -> list[MessageResult]:
        if network:
            scanner.start_services()
        return await replay_messages(scanner, iter_messages(paths), label=label,
                                     network=network, progress=progress)

    return asyncio.run(run()), scanner.ruleset.policy.levels


# --- figures ------------------------------------------------------------------------------

@dataclass
class Confusion:
    """Counts for one corpus: rows ham/spam, columns spam verdict / not spam / tempfail."""

    ham: int = 0
    spam: int = 0
    fp: int = 0               # ham with a spam verdict
    tn: int = 0               # ham delivered as ham
    ham_tempfail: int = 0
    tp: int = 0               # spam with a spam verdict
    fn: int = 0               # spam delivered as ham
    spam_tempfail: int = 0
    virus: int = 0            # left out of the figures; counted so nothing goes missing
    unlabelled: int = 0

    def add(self, result: MessageResult) -> None:
        if result.label == HAM:
            self.ham += 1
            if result.tempfail:
                self.ham_tempfail += 1
            elif result.spam_verdict:
                self.fp += 1
            else:
                self.tn += 1
        elif result.label == SPAM:
            self.spam += 1
            if result.tempfail:
                self.spam_tempfail += 1
            elif result.spam_verdict:
                self.tp += 1
            else:
                self.fn += 1
        elif result.label == VIRUS:
            self.virus += 1
        else:
            self.unlabelled += 1

    @property
    def fp_rate(self) -> float | None:
        return self.fp / self.ham if self.ham else None

    @property
    def fn_rate(self) -> float | None:
        return self.fn / self.spam if self.spam else None

    def as_dict(self) -> dict[str, Any]:
        return {"ham": self.ham, "spam": self.spam, "fp": self.fp, "tn": self.tn,
                "ham_tempfail": self.ham_tempfail, "tp": self.tp, "fn": self.fn,
                "spam_tempfail": self.spam_tempfail, "virus": self.virus,
                "unlabelled": self.unlabelled, "fp_rate": self.fp_rate, "fn_rate": self.fn_rate}


def roc_auc(ham_scores: Sequence[float], spam_scores: Sequence[float]) -> float | None:
    """P(a spam scores above a ham), ties counted half; None without both classes."""
    if not ham_scores or not spam_scores:
        return None
    ham_sorted = sorted(ham_scores)
    wins = 0.0
    for s in spam_scores:
        below = bisect.bisect_left(ham_sorted, s)
        ties = bisect.bisect_right(ham_sorted, s) - below
        wins += below + ties / 2
    return wins / (len(ham_scores) * len(spam_scores))


def roc_points(ham_scores: Sequence[float], spam_scores: Sequence[float]
               ) -> list[tuple[float, float, float]]:
    """(threshold, FP rate, TP rate) for every distinct score, highest threshold first."""
    thresholds = sorted(set(ham_scores) | set(spam_scores), reverse=True)
    ham_sorted, spam_sorted = sorted(ham_scores), sorted(spam_scores)
    points = [(math.inf, 0.0, 0.0)]
    for t in thresholds:
        fp = len(ham_sorted) - bisect.bisect_left(ham_sorted, t)
        tp = len(spam_sorted) - bisect.bisect_left(spam_sorted, t)
        points.append((t, fp / len(ham_sorted) if ham_sorted else 0.0,
                       tp / len(spam_sorted) if spam_sorted else 0.0))
    return points


def fn_at_fp(ham_scores: Sequence[float], spam_scores: Sequence[float],
             fp_target: float) -> dict[str, Any] | None:
    """The lowest score threshold with FP <= fp_target of ham, and the FN rate there.

    Spam verdict here means score >= threshold (forced actions play no part: this compares
    scorers). The threshold is the lowest score seen above the highest ham score that must be
    excluded, so every spam with a higher score is caught.
    """
    if not spam_scores:
        return None
    allowed = math.floor(fp_target * len(ham_scores) + 1e-9)
    ham_desc = sorted(ham_scores, reverse=True)
    if allowed >= len(ham_desc):
        threshold = min(min(spam_scores), min(ham_scores, default=math.inf))
    else:
        bar = ham_desc[allowed]  # the highest ham score that must stay below the threshold
        above = [s for s in (*ham_scores, *spam_scores) if s > bar]
        threshold = min(above) if above else math.inf
    fn = sum(1 for s in spam_scores if s < threshold)
    fp = sum(1 for s in ham_scores if s >= threshold)
    return {"fp_target": fp_target, "threshold": threshold if math.isfinite(threshold) else None,
            "fp": fp, "fn": fn, "fp_rate": fp / len(ham_scores) if ham_scores else None,
            "fn_rate": fn / len(spam_scores)}


def _would_be_spam(result: MessageResult, level: float) -> bool:
    if result.tempfail:
        return False
    if result.forced is not None and Action(result.forced).is_spam_verdict:
        return True
    return result.score >= level


def _would_kill(result: MessageResult, level: float) -> bool:
    if result.tempfail:
        return False
    if result.forced in (Action.QUARANTINE.value, Action.REJECT.value, Action.DISCARD.value):
        return True
    return result.score >= level


def threshold_table(results: Sequence[MessageResult], levels: Any,
                    extra: Iterable[float] = (), grid: Iterable[float] = ()) -> list[dict[str, Any]]:
    """What each level would have done: as tag2_level (FP/FN) and as kill_level (held mail)."""
    labelled = [r for r in results if r.label in (HAM, SPAM)]
    ham = [r for r in labelled if r.label == HAM]
    spam = [r for r in labelled if r.label == SPAM]
    candidates = sorted({round(float(v), 3) for v in (*grid, levels.tag2_level, levels.kill_level,
                                                      *extra) if v is not None and math.isfinite(v)})
    rows = []
    for level in candidates:
        fp = sum(_would_be_spam(r, level) for r in ham)
        fn = sum(not _would_be_spam(r, level) and not r.tempfail for r in spam)
        rows.append({
            "level": level,
            "is_tag2_level": math.isclose(level, levels.tag2_level),
            "is_kill_level": math.isclose(level, levels.kill_level),
            "fp": fp, "fn": fn,
            "fp_rate": fp / len(ham) if ham else None,
            "fn_rate": fn / len(spam) if spam else None,
            "ham_killed": sum(_would_kill(r, level) for r in ham),
            "spam_killed": sum(_would_kill(r, level) for r in spam),
        })
    return rows


@dataclass
class Summary:
    overall: Confusion
    corpora: dict[str, Confusion]
    auc: float | None
    at_fp: dict[str, Any] | None
    symbols: dict[str, dict[str, int]]       # name -> {"ham": n, "spam": n, "other": n}
    slowest: list[MessageResult]
    thresholds: list[dict[str, Any]]
    levels: dict[str, float]
    messages: int
    errors: int
    seconds: float
    actions: dict[str, int] = field(default_factory=dict)

    corpus_scores: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages, "errors": self.errors,
            "scan_seconds": round(self.seconds, 6),
            "messages_per_second": (round(self.messages / self.seconds, 3)
                                    if self.seconds > 0 else None),
            "levels": self.levels, "actions": self.actions,
            "overall": self.overall.as_dict(),
            "corpora": {name: {**c.as_dict(), **self.corpus_scores.get(name, {})}
                        for name, c in sorted(self.corpora.items())},
            "auc": self.auc, "fn_at_fp": self.at_fp,
            "symbols": dict(sorted(self.symbols.items(),
                                   key=lambda kv: (-(kv[1]["ham"] + kv[1]["spam"]), kv[0]))),
            "slowest": [{"name": r.name, "seconds": round(r.seconds, 6), "action": r.action,
                         "score": r.score} for r in self.slowest],
            "thresholds": self.thresholds,
        }


def score_figures(results: Sequence[MessageResult], fp_target: float
                  ) -> tuple[float | None, dict[str, Any] | None]:
    """(ROC AUC, FN at FP <= fp_target) from the scores of the labelled results; unreadable
    and tempfailed messages have no meaningful score and are left out."""
    scored = [r for r in results if r.error is None and not r.tempfail]
    ham_scores = [r.score for r in scored if r.label == HAM]
    spam_scores = [r.score for r in scored if r.label == SPAM]
    return roc_auc(ham_scores, spam_scores), fn_at_fp(ham_scores, spam_scores, fp_target)


DEFAULT_GRID = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0)


def summarize(results: Sequence[MessageResult], levels: Any, *, fp_target: float = 0.001,
              slowest: int = 10, grid: Iterable[float] = DEFAULT_GRID) -> Summary:
    overall = Confusion()
    corpora: dict[str, Confusion] = {}
    symbols: dict[str, dict[str, int]] = {}
    actions: dict[str, int] = {}
    for r in results:
        overall.add(r)
        corpora.setdefault(r.corpus, Confusion()).add(r)
        actions[r.action] = actions.get(r.action, 0) + 1
        bucket = r.label if r.label in (HAM, SPAM) else "other"
        for name in dict.fromkeys(r.symbols):
            counts = symbols.setdefault(name, {"ham": 0, "spam": 0, "other": 0})
            counts[bucket] += 1
    auc, at_fp = score_figures(results, fp_target)
    by_corpus: dict[str, list[MessageResult]] = {}
    for r in results:
        by_corpus.setdefault(r.corpus, []).append(r)
    corpus_scores = {}
    for name, rs in by_corpus.items():
        c_auc, c_at = score_figures(rs, fp_target)
        corpus_scores[name] = {"auc": c_auc, "fn_at_fp": c_at}
    extra = [at_fp["threshold"]] if at_fp and at_fp["threshold"] is not None else []
    return Summary(
        overall=overall, corpora=corpora, auc=auc, at_fp=at_fp, corpus_scores=corpus_scores,
        symbols=symbols,
        slowest=sorted((r for r in results if r.error is None),
                       key=lambda r: r.seconds, reverse=True)[:slowest],
        thresholds=threshold_table(results, levels, extra, grid),
        levels={"tag_level": levels.tag_level, "tag2_level": levels.tag2_level,
                "kill_level": levels.kill_level, "reject_level": levels.reject_level},
        messages=len(results), errors=sum(r.error is not None for r in results),
        seconds=sum(r.seconds for r in results), actions=dict(sorted(actions.items())))


def verdict_of(result: MessageResult) -> str:
    """What the figures count the action as: "spam" (a spam verdict), "tempfail" or "pass"."""
    if result.tempfail:
        return "tempfail"
    return "spam" if result.spam_verdict else "pass"


def compare(results_a: Sequence[MessageResult], results_b: Sequence[MessageResult]
            ) -> list[dict[str, Any]]:
    """Every message whose action differs between two replays of the same messages (with
    the verdict each action counts as: spam -> quarantine changes the action, not the
    verdict)."""
    by_name = {r.name: r for r in results_b}
    changed = []
    for a in results_a:
        b = by_name.get(a.name)
        if b is None or a.action == b.action:
            continue
        changed.append({"name": a.name, "label": a.label, "action_a": a.action,
                        "action_b": b.action, "verdict_a": verdict_of(a),
                        "verdict_b": verdict_of(b), "score_a": a.score, "score_b": b.score,
                        "symbols_added": sorted(set(b.symbols) - set(a.symbols)),
                        "symbols_removed": sorted(set(a.symbols) - set(b.symbols))})
    return changed


def symbol_changes(results_a: Sequence[MessageResult], results_b: Sequence[MessageResult]
                   ) -> dict[str, dict[str, int]]:
    """Per symbol, how many messages gained or lost it from replay A to replay B, by label:
    {name: {"ham_gained": n, "ham_lost": n, "spam_gained": ..., "other_lost": ...}}. Only
    messages in both replays count; symbols no message gained or lost are left out."""
    by_name = {r.name: r for r in results_b}
    changes: dict[str, dict[str, int]] = {}
    for a in results_a:
        b = by_name.get(a.name)
        if b is None:
            continue
        bucket = a.label if a.label in (HAM, SPAM) else "other"
        before, after = set(a.symbols), set(b.symbols)
        for way, names in (("gained", after - before), ("lost", before - after)):
            for name in names:
                counts = changes.setdefault(name, {f"{k}_{w}": 0 for k in (HAM, SPAM, "other")
                                                   for w in ("gained", "lost")})
                counts[f"{bucket}_{way}"] += 1
    return dict(sorted(changes.items()))


def to_record(result: MessageResult) -> dict[str, Any]:
    """One result as a JSON-able dict (a line of a per-message results file); timings are
    left out so two runs of the same code give the same lines."""
    record: dict[str, Any] = {"path": result.name, "corpus": result.corpus,
                              "label": result.label, "action": result.action,
                              "score": result.score, "symbols": list(result.symbols)}
    if result.forced is not None:
        record["forced"] = result.forced
    if result.error is not None:
        record["error"] = result.error
    return record


def from_record(record: dict[str, Any]) -> MessageResult:
    """The inverse of to_record (reason and timing are not kept)."""
    return MessageResult(str(record["path"]), str(record["corpus"]), record.get("label"),
                         str(record["action"]), float(record["score"]),
                         tuple(record.get("symbols", ())), "", 0.0,
                         forced=record.get("forced"), error=record.get("error"))


__all__ = ["MessageResult", "Confusion", "Summary", "label_of", "forced_action",
           "replay_messages", "replay", "roc_auc", "roc_points", "fn_at_fp", "threshold_table",
           "score_figures", "summarize", "verdict_of", "compare", "symbol_changes", "to_record",
           "from_record"]
