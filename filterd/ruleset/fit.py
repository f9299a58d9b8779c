"""`filterd rules fit`: fit the scores of the pattern rules on a corpus half, measure on the other.

Trusts: the corpus labels in the path (<corpus>/<label>/<file>: ham, spam, phish = spam; virus is
left out) and SPLIT.tsv for the halves, as ../shared/notes/evaluation.md defines them.
Settings: scan.content_size_limit, scan.trusted_networks (how messages are parsed), the rule set.
Symbols: none; it writes a scores table and a report.

The model is SpamAssassin's rescoring idea in a small form: the score of a message is the sum
of the weights of the rules that hit plus the fixed scores of every other symbol (core sanity
checks, hand-set in scores.toml); the probability of spam is sigmoid(score - tag2_level), so
the decision threshold of the fit is the one the daemon uses. Weights minimise the
class-weighted log loss (a ham error costs --ham-weight times more: false positives are worse)
plus an L2 penalty pulling each weight toward a small prior, by projected gradient descent
(Adam) within [0, cap] for spam signs and [-cap, 0] for rules marked `nice`. A rule that never
hits in training keeps its prior. Only rules and checks that need no network and no learning are
run: these are the numbers of the rules alone.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

LABELS = {"ham": 0, "spam": 1, "phish": 1}
PRIOR = 0.2          # where an unproven spam-sign rule sits (nice rules: -PRIOR)


class FitError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Sample:
    path: str            # relative to the corpus root, as in SPLIT.tsv
    corpus: str
    label: int           # 1 spam/phish, 0 ham
    half: str


def corpus_root(paths: Sequence[Path], split: Path | None) -> tuple[Path, Path]:
    """The directory SPLIT.tsv paths are relative to, and SPLIT.tsv itself."""
    if split is not None:
        return split.parent, split
    for path in paths:
        for candidate in (path, *path.resolve().parents):
            if (candidate / "SPLIT.tsv").is_file():
                return candidate, candidate / "SPLIT.tsv"
    raise FitError("no SPLIT.tsv found in or above the corpus directories (use --split)")


def read_split(tsv: Path, root: Path, selected: Sequence[Path]) -> list[Sample]:
    wanted = [p.resolve() for p in selected]
    out = []
    with tsv.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            label = LABELS.get(row["label"])
            if label is None:
                continue
            full = (root / row["path"]).resolve()
            if not any(full == w or w in full.parents for w in wanted):
                continue
            out.append(Sample(row["path"], row["path"].split("/")[0], label, row["half"]))
    return out


def make_settings(settings: Any = None) -> Any:
    if settings is None:
        from filterd import config
        settings = config.load(Path("/nonexistent/filterd.toml"), explicit=False)
    return settings


def rule_hits(raw: bytes, ruleset: Any, settings: Any) -> list[str]:
    """Symbols of one message from the checks that need no network and no learning."""
    from filterd.checks.gtube import gtube
    from filterd.checks.sanity import sanity
    from filterd.message import parse
    from filterd.pipeline import ScanContext
    from filterd.ruleset.check import meta, rules
    view = parse(raw, content_limit=settings.scan.content_size_limit,
                 trusted_networks=settings.scan.trusted_networks)
    ctx = ScanContext(settings=settings, ruleset=ruleset)
    for fn in (sanity, gtube, rules, meta):
        ctx.symbols.extend(fn(view, ctx))
    return [s.name for s in ctx.symbols]


def collect(samples: Sequence[Sample], root: Path, ruleset: Any, settings: Any,
            progress: bool = True) -> list[list[str]]:
    out = []
    started = time.time()
    for i, sample in enumerate(samples):
        out.append(rule_hits((root / sample.path).read_bytes(), ruleset, settings))
        if progress and i and i % 2000 == 0:
            print(f"  {i}/{len(samples)} messages, {time.time() - started:.0f}s", flush=True)
    return out


def fit_weights(hits: Sequence[Iterable[str]], labels: Sequence[int], features: Sequence[str],
                nice: set[str], fixed: dict[str, float], threshold: float, *, cap: float,
                l2: float, ham_weight: float, iterations: int = 3000) -> dict[str, float]:
    import numpy as np
    index = {name: i for i, name in enumerate(features)}
    X = np.zeros((len(hits), len(features)))
    offset = np.zeros(len(hits))
    for row, names in enumerate(hits):
        for name in names:
            if name in index:
                X[row, index[name]] = 1.0
            else:
                offset[row] += fixed.get(name, 0.0)
    y = np.asarray(labels, dtype=float)
    n_spam, n_ham = max(y.sum(), 1.0), max(len(y) - y.sum(), 1.0)
    # each class weighs as much in total; ham errors ham_weight times more on top
    sample_w = np.where(y == 1, 1.0 / n_spam, ham_weight / n_ham)
    sample_w = sample_w / sample_w.sum()
    lo = np.array([-cap if f in nice else 0.0 for f in features])
    hi = np.array([0.0 if f in nice else cap for f in features])
    prior = np.array([-PRIOR if f in nice else PRIOR for f in features])
    w = prior.copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    lr, b1, b2 = 0.05, 0.9, 0.999
    for t in range(1, iterations + 1):
        z = X @ w + offset - threshold
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))
        grad = X.T @ ((p - y) * sample_w) + l2 * (w - prior)
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        w -= lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + 1e-9)
        w = np.clip(w, lo, hi)
    return {f: round(float(w[i]), 2) for i, f in enumerate(features)}


def score_of(names: Iterable[str], scores: dict[str, float]) -> float:
    return math.fsum(scores.get(n, 0.0) for n in names)


def roc_auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    pairs = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + j + 1) / 2.0
        rank_sum += avg_rank * sum(1 for k in range(i, j) if pairs[k][1] == 1)
        i = j
    n_pos, n_neg = len(pos), len(neg)
    if not n_pos or not n_neg:
        return float("nan")
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def evaluate(samples: Sequence[Sample], hits: Sequence[list[str]], scores: dict[str, float],
             threshold: float) -> dict[str, dict[str, float]]:
    """FP/FN per corpus and overall at the threshold; AUC and FN at FP <= 0.1 %."""
    groups: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(sample.corpus, []).append(i)
    groups["all"] = list(range(len(samples)))
    out: dict[str, dict[str, float]] = {}
    for corpus, idx in groups.items():
        ham = [score_of(hits[i], scores) for i in idx if samples[i].label == 0]
        spam = [score_of(hits[i], scores) for i in idx if samples[i].label == 1]
        fp = sum(1 for s in ham if s >= threshold)
        fn = sum(1 for s in spam if s < threshold)
        row: dict[str, float] = {"ham": len(ham), "spam": len(spam), "fp": fp, "fn": fn,
                                 "fp_rate": fp / len(ham) if ham else float("nan"),
                                 "fn_rate": fn / len(spam) if spam else float("nan"),
                                 "auc": roc_auc(spam, ham)}
        if ham and spam:
            allowed = int(len(ham) * 0.001)
            cut = sorted(ham, reverse=True)[allowed] if allowed < len(ham) else -math.inf
            # the most sensitive threshold strictly above the (allowed+1)-th highest ham score
            row["fn_at_fp_0.1"] = sum(1 for s in spam if s <= cut) / len(spam)
        out[corpus] = row
    return out


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.2f} %"


def metrics_table(results: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| corpus | ham | spam | FP | FP rate | FN | FN rate | ROC AUC | FN at FP ≤ 0.1 % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for corpus, r in sorted(results.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        auc = "-" if r["auc"] != r["auc"] else f"{r['auc']:.4f}"
        lines.append(f"| {corpus} | {int(r['ham'])} | {int(r['spam'])} | {int(r['fp'])} | "
                     f"{_pct(r['fp_rate'])} | {int(r['fn'])} | {_pct(r['fn_rate'])} | {auc} | "
                     f"{_pct(r.get('fn_at_fp_0.1', float('nan')))} |")
    return lines


def main(*, shipped: Path, site: Path | None, corpora: list[Path], split: Path | None,
         half: str, test_half: str, output: Path, report: Path, cap: float, l2: float,
         ham_weight: float, limit: int, settings: Any) -> int:
    from filterd.ruleset import load
    settings = make_settings(settings)
    ruleset = load(shipped, site)
    engine = ruleset.engine
    root, tsv = corpus_root(corpora, split)
    samples = read_split(tsv, root, corpora)
    train = [s for s in samples if s.half == half]
    test = [s for s in samples if s.half == test_half]
    if limit:
        train, test = train[:limit], test[:limit]
    if not train:
        raise FitError(f"no messages of half {half} under {', '.join(map(str, corpora))}")
    features = sorted(n for n, r in engine.rules.items() if not r.helper)
    nice = {n for n in features if engine.rules[n].nice}
    fitted_names = set(features)
    fixed = {k: v for k, v in ruleset.scores.items() if k not in fitted_names}
    threshold = ruleset.policy.levels.tag2_level
    print(f"fit: {len(features)} rules, half {half}: {len(train)} messages; "
          f"half {test_half}: {len(test)}", flush=True)
    started = time.time()
    train_hits = collect(train, root, ruleset, settings)
    test_hits = collect(test, root, ruleset, settings)
    scan_seconds = time.time() - started
    weights = fit_weights(train_hits, [s.label for s in train], features, nice, fixed, threshold,
                          cap=cap, l2=l2, ham_weight=ham_weight)
    scores = {**fixed, **weights}
    train_eval = evaluate(train, train_hits, scores, threshold)
    test_eval = evaluate(test, test_hits, scores, threshold)

    counts: dict[str, list[int]] = {f: [0, 0, 0, 0] for f in features}  # ham A, spam A, ham B, spam B
    for rows, hits_list, base in ((train, train_hits, 0), (test, test_hits, 2)):
        for sample, names in zip(rows, hits_list):
            for name in set(names):
                if name in counts:
                    counts[name][base + sample.label] += 1
    write_scores(output, weights, half=half, cap=cap, l2=l2, ham_weight=ham_weight,
                 n=len(train))
    write_report(report, weights, counts, nice, train_eval, test_eval, half=half,
                 test_half=test_half, cap=cap, l2=l2, ham_weight=ham_weight, threshold=threshold,
                 n_train=len(train), n_test=len(test), scan_seconds=scan_seconds,
                 n_messages=len(train) + len(test))
    print("\n".join(metrics_table(test_eval)))
    print(f"wrote {output} and {report}")
    return 0


def write_scores(path: Path, weights: dict[str, float], **info: Any) -> None:
    lines = ["# Fitted scores of the default pattern rules: written by `filterd rules fit`, do not",
             "# edit by hand (sites override in local.d/). How they were fitted: FIT-REPORT.md.",
             f"# half {info['half']} ({info['n']} messages), cap {info['cap']:g}, l2 {info['l2']:g}, "
             f"ham weight {info['ham_weight']:g}", "", "[scores]"]
    for name in sorted(weights):
        lines.append(f"{name} = {weights[name]:.2f}")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_report(path: Path, weights: dict[str, float], counts: dict[str, list[int]],
                 nice: set[str], train_eval: Any, test_eval: Any, **info: Any) -> None:
    lines = ["# Rule score fit report", "",
             "Written by `filterd rules fit` (filterd/ruleset/fit.py). Rules alone: the pattern and",
             "meta rules plus the core sanity checks; no Bayes, no DNS lists, no network.",
             f"Fitted on half {info['half']} ({info['n_train']} messages) and measured on half "
             f"{info['test_half']} ({info['n_test']} messages) of ../shared/corpora (SPLIT.tsv);",
             f"spam verdict = score ≥ tag2_level {info['threshold']:g}. Parameters: score cap "
             f"{info['cap']:g}, L2 {info['l2']:g} toward a prior of ±{PRIOR:g}, ham errors weigh "
             f"{info['ham_weight']:g}×.",
             f"Scanning {info['n_messages']} messages took {info['scan_seconds']:.0f}s.", "",
             f"## Measured on half {info['test_half']} (held out from the fit)", "",
             *metrics_table(test_eval), "",
             f"## On half {info['half']} (the training half, for comparison)", "",
             *metrics_table(train_eval), "",
             "## Per rule", "",
             f"Hits on ham and spam of each half; score as fitted (nice rules may only go "
             f"negative).", "",
             f"| rule | ham {info['half']} | spam {info['half']} | ham {info['test_half']} | "
             f"spam {info['test_half']} | score |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in sorted(weights, key=lambda n: (-abs(weights[n]), n)):
        c = counts.get(name, [0, 0, 0, 0])
        flag = " (nice)" if name in nice else ""
        lines.append(f"| {name}{flag} | {c[0]} | {c[1]} | {c[2]} | {c[3]} | {weights[name]:.2f} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
