"""`filterd rules fit`: fit the scores of the pattern rules on a corpus half, measure on the other.

Trusts: the corpus labels in the path (<corpus>/<label>/<file>: ham, spam, phish = spam; virus is
left out) and SPLIT.tsv for the halves, as ../shared/notes/evaluation.md defines them.
Settings: scan.content_size_limit, scan.trusted_networks (how messages are parsed), the rule set.
Symbols: none; it writes a scores table and a report.

The model is SpamAssassin's rescoring idea in a small form: the score of a message is the sum
of the weights of the rules that hit plus the fixed scores of every other symbol (core sanity
checks, hand-set in scores.toml), compared with tag2_level. The weights come from a
sign-constrained logistic regression (spam signs >= 0, rules marked `nice` <= 0) with a free
intercept, which gives the shape of the decision; the scale that turns that into points is
chosen on the training half alone: k-fold out-of-fold scores, the largest scale whose FP rate at
tag2_level stays within --fp-target, and among --ham-weight candidates the one with the lowest
out-of-fold FN (see `fit_weights`). Scores are capped at --cap points. A rule that never hits in
training keeps a small prior. Only rules and checks that need no network and no learning are
run: these are the numbers of the rules alone.

With --with-bayes it fits the second score set, `[bayes_scores]`, used for a message the Bayes
learner voted on (SpamAssassin keeps separate score sets for the same reason: once a learner
votes, the rules that overlap with what it knows must weigh less, or ham that both find a bit
spammy adds up past tag2_level). The BAYES_* bands become features next to the rules; the band of
every training message comes from a learner trained on the other folds (the same folds as the
fit's own out-of-fold scores), so the fit sees Bayes as it votes on mail it has not learned.
"""

from __future__ import annotations

import csv
import math
import time
import zlib
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


# The bands that join the rules as features of the Bayes score set; BAYES_50 says nothing and
# keeps its fixed score. Bands below it are ham evidence: like `nice` rules, they may only be <= 0.
BAYES_HAM_BANDS = ("BAYES_00", "BAYES_05", "BAYES_20", "BAYES_40")
BAYES_SPAM_BANDS = ("BAYES_60", "BAYES_80", "BAYES_95", "BAYES_99", "BAYES_999")


def fold_of(key: str, folds: int) -> int:
    return zlib.crc32(key.encode()) % folds


def bayes_bands(train: Sequence[Sample], test: Sequence[Sample], root: Path, settings: Any,
                folds: int, progress: bool = True) -> tuple[list[str], list[str]]:
    """The Bayes band of every message: out of fold on the training half, and on the test half
    from a learner trained on the whole training half.

    Each learner lives in a temporary SQLite store with the site's tokenizer and classifier
    settings. A message the learner cannot classify (fewer than bayes.min_spam/min_ham
    learned) gets BAYES_UNTRAINED, as in the daemon.
    """
    import tempfile
    from filterd.bayes import HAM, SPAM, Bayes, message_digest, today
    from filterd.bayes.classifier import band
    from filterd.message import parse
    from filterd.stores import LearnItem, open_token_store

    def open_bayes(path: Path) -> Bayes:
        local = settings.with_overrides({"bayes.backend": "sqlite", "bayes.path": str(path)},
                                        source="rules fit --with-bayes")
        return Bayes.from_settings(local, open_token_store(local))

    def learned_and_classified(bayes: Bayes, learn_on: Sequence[int],
                               classify: Sequence[tuple[str, ...]]) -> list[str]:
        try:
            for start in range(0, len(learn_on), 500):
                bayes.store.learn_batch([LearnItem(digests[i], SPAM if train[i].label else HAM,
                                                   train_tokens[i])
                                         for i in learn_on[start:start + 500]], today())
            ready, nspam, nham = bayes.trained()
            if not ready:
                return ["BAYES_UNTRAINED"] * len(classify)
            return [band(bayes.classify_tokens(tokens, counts=(nspam, nham)).probability)
                    for tokens in classify]
        finally:
            bayes.store.close()

    def parsed(sample: Sample) -> tuple[bytes, Any]:
        raw = (root / sample.path).read_bytes()
        return raw, parse(raw, content_limit=settings.scan.content_size_limit,
                          trusted_networks=settings.scan.trusted_networks)

    started = time.time()
    train_bands: list[str] = [""] * len(train)
    with tempfile.TemporaryDirectory(prefix="filterd-fit-bayes-") as tmpdir:
        tmp = Path(tmpdir)
        whole = open_bayes(tmp / "all.sqlite")
        # each message is parsed and tokenised once; every fold's learner reuses its tokens
        digests: list[str] = []
        train_tokens: list[tuple[str, ...]] = []
        for sample in train:
            raw, view = parsed(sample)
            digests.append(message_digest(raw))
            train_tokens.append(whole.tokens(view))
        test_tokens = [whole.tokens(parsed(sample)[1]) for sample in test]
        keys = [fold_of(s.path, folds) for s in train]
        for fold in range(folds):
            held = [i for i, k in enumerate(keys) if k == fold]
            bands = learned_and_classified(open_bayes(tmp / f"fold{fold}.sqlite"),
                                           [i for i, k in enumerate(keys) if k != fold],
                                           [train_tokens[i] for i in held])
            for i, name in zip(held, bands):
                train_bands[i] = name
            if progress:
                print(f"  bayes fold {fold + 1}/{folds}: {len(held)} messages classified, "
                      f"{time.time() - started:.0f}s", flush=True)
        if test:
            test_bands = learned_and_classified(whole, range(len(train)), test_tokens)
        else:
            whole.store.close()
            test_bands = []
    return train_bands, test_bands


def hit_matrix(hits: Sequence[Iterable[str]], features: Sequence[str],
               fixed: dict[str, float]) -> tuple[Any, Any]:
    """0/1 matrix of rule hits (messages x features) and each message's fixed-score sum."""
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
    return X, offset


def _logistic(X: Any, y: Any, sample_w: Any, lo: Any, hi: Any, *, l2: float,
              iterations: int) -> tuple[Any, float]:
    """Weighted L2 logistic regression with a free intercept and box bounds on the weights.

    Projected Adam; the intercept is not a rule and is never shipped: it only lets the weights
    find the shape of the decision, whose scale `calibrate` sets afterwards.
    """
    import numpy as np
    n, d = X.shape
    # X is 0/1 and sparse (a message hits a handful of rules): work on the hit positions
    rows, cols = np.nonzero(X)
    w = np.zeros(d)
    b = 0.0
    m = np.zeros(d + 1)
    v = np.zeros(d + 1)
    lr, b1, b2 = 0.05, 0.9, 0.999
    for t in range(1, iterations + 1):
        z = np.bincount(rows, weights=w[cols], minlength=n) + b
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))
        g = (p - y) * sample_w
        grad = np.concatenate([np.bincount(cols, weights=g[rows], minlength=d) + l2 * w,
                               [g.sum()]])
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        step = lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + 1e-9)
        w = np.clip(w - step[:-1], lo, hi)
        b -= step[-1]
    return w, b


def _class_weights(y: Any, ham_weight: float) -> Any:
    import numpy as np
    n_spam, n_ham = max(y.sum(), 1.0), max(len(y) - y.sum(), 1.0)
    # each class weighs as much in total; ham errors ham_weight times more on top
    sample_w = np.where(y == 1, 1.0 / n_spam, ham_weight / n_ham)
    return sample_w / sample_w.sum()


def largest_scale(raw_ham: Any, offset_ham: Any, threshold: float, fp_target: float) -> float:
    """The largest k such that at most fp_target of ham has k*raw + offset >= threshold.

    raw scores are in the fit's units; the scale turns them into points on the daemon's
    scale, where the threshold is tag2_level. A larger k catches more spam, so the largest
    one that keeps the false positives within the target is the operating point.
    """
    import numpy as np
    allowed = int(len(raw_ham) * fp_target)
    # each ham message crosses the threshold at k = (threshold - offset) / raw (raw > 0)
    need = threshold - offset_ham
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = np.where(raw_ham > 0, np.where(need > 0, need / raw_ham, 0.0), np.inf)
    cross = np.where(need <= 0, 0.0, cross)
    order = np.sort(cross)
    if allowed >= len(order):
        return float("inf")
    # just below the (allowed+1)-th smallest crossing point
    return float(order[allowed]) * (1.0 - 1e-6)


@dataclass(frozen=True, slots=True)
class Calibration:
    """How a fit chose its operating point (for the report)."""

    ham_weight: float
    scale: float
    oof_fp: float        # out-of-fold FP rate on half A at tag2_level after scaling
    oof_fn: float
    candidates: tuple[tuple[float, float, float], ...]   # (ham weight, oof FP, oof FN)


def fit_weights(hits: Sequence[Iterable[str]], labels: Sequence[int], features: Sequence[str],
                nice: set[str], fixed: dict[str, float], threshold: float, *, cap: float,
                l2: float, ham_weights: Sequence[float], fp_target: float, folds: int = 5,
                fold_keys: Sequence[str] | None = None, iterations: int = 2000
                ) -> tuple[dict[str, float], Calibration]:
    """Fitted scores on the daemon's scale, with the operating point chosen out of fold.

    1. The shape: a sign-constrained logistic regression with a free intercept (spam signs
       >= 0, `nice` rules <= 0), class-balanced, ham errors `ham_weight` times dearer.
    2. The scale: k-fold over the training half; every training message is scored by a model
       that did not see it, and the largest scale whose out-of-fold FP rate at tag2_level
       stays within `fp_target` is applied to the model fitted on the whole half. The held-out
       half is never looked at.
    3. Each ham weight in `ham_weights` is tried and the one with the lowest out-of-fold FN
       at that FP wins. Scores are capped at `cap` points (refit with the bound in force).
    A rule that never hits in training keeps a small prior (+-PRIOR).
    """
    import numpy as np
    X, offset = hit_matrix(hits, features, fixed)
    y = np.asarray(labels, dtype=float)
    is_nice = np.array([f in nice for f in features])
    keys = list(fold_keys) if fold_keys is not None else [str(i) for i in range(len(y))]
    fold_index = np.array([fold_of(k, folds) for k in keys])
    seen = X.sum(axis=0) > 0

    def bounds(limit: float) -> tuple[Any, Any]:
        return np.where(is_nice, -limit, 0.0), np.where(is_nice, 0.0, limit)

    def scaled_fit(ham_weight: float) -> tuple[Any, float, float, float]:
        limit = np.inf
        scale = 1.0
        for _round in range(3):
            lo, hi = bounds(limit)
            oof = np.zeros(len(y))
            for fold in range(folds):
                train = fold_index != fold
                w, _b = _logistic(X[train], y[train], _class_weights(y[train], ham_weight),
                                  lo, hi, l2=l2, iterations=iterations)
                oof[~train] = X[~train] @ w
            w_all, _b = _logistic(X, y, _class_weights(y, ham_weight), lo, hi, l2=l2,
                                  iterations=iterations)
            ham = y == 0
            scale = largest_scale(oof[ham], offset[ham], threshold, fp_target)
            if not np.isfinite(scale):
                scale = 1.0
            if (np.abs(w_all) * scale).max() <= cap + 1e-9:
                break
            limit = cap / scale          # the cap, in the fit's units at this scale
        points = oof * scale + offset
        fp = float((points[y == 0] >= threshold).mean()) if (y == 0).any() else 0.0
        fn = float((points[y == 1] < threshold).mean()) if (y == 1).any() else 0.0
        return np.clip(w_all * scale, -cap, cap), scale, fp, fn

    best: tuple[Any, float, float, float, float] | None = None
    tried = []
    for ham_weight in ham_weights:
        w, scale, fp, fn = scaled_fit(ham_weight)
        tried.append((ham_weight, fp, fn))
        if best is None or (fn, fp) < (best[4], best[3]):
            best = (w, ham_weight, scale, fp, fn)
    assert best is not None
    w, ham_weight, scale, fp, fn = best
    w = np.where(seen, w, np.where(is_nice, -PRIOR, PRIOR))
    weights = {f: round(float(w[i]), 2) for i, f in enumerate(features)}
    return weights, Calibration(ham_weight, scale, fp, fn, tuple(tried))


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
         ham_weights: Sequence[float], fp_target: float, folds: int, limit: int,
         settings: Any, with_bayes: bool = False) -> int:
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
    if with_bayes:
        features += [*BAYES_HAM_BANDS, *BAYES_SPAM_BANDS]
        nice |= set(BAYES_HAM_BANDS)
    fitted_names = set(features)
    fixed = {k: v for k, v in ruleset.scores.items() if k not in fitted_names}
    threshold = ruleset.policy.levels.tag2_level
    print(f"fit: {len(features)} rules, half {half}: {len(train)} messages; "
          f"half {test_half}: {len(test)}", flush=True)
    started = time.time()
    train_hits = collect(train, root, ruleset, settings)
    test_hits = collect(test, root, ruleset, settings)
    if with_bayes:
        train_bands, test_bands = bayes_bands(train, test, root, settings, folds)
        for names, band_name in (*zip(train_hits, train_bands), *zip(test_hits, test_bands)):
            names.append(band_name)
    scan_seconds = time.time() - started
    weights, calibration = fit_weights(
        train_hits, [s.label for s in train], features, nice, fixed, threshold, cap=cap, l2=l2,
        ham_weights=ham_weights, fp_target=fp_target, folds=folds,
        fold_keys=[s.path for s in train])
    scores = {**fixed, **weights}
    train_eval = evaluate(train, train_hits, scores, threshold)
    test_eval = evaluate(test, test_hits, scores, threshold)

    counts: dict[str, list[int]] = {f: [0, 0, 0, 0] for f in features}  # ham A, spam A, ham B, spam B
    for rows, hits_list, base in ((train, train_hits, 0), (test, test_hits, 2)):
        for sample, names in zip(rows, hits_list):
            for name in set(names):
                if name in counts:
                    counts[name][base + sample.label] += 1
    write_scores(output, weights, half=half, cap=cap, l2=l2, calibration=calibration,
                 fp_target=fp_target, folds=folds, n=len(train), with_bayes=with_bayes)
    write_report(report, weights, counts, nice, train_eval, test_eval, with_bayes=with_bayes,
                 half=half,
                 test_half=test_half, cap=cap, l2=l2, calibration=calibration,
                 fp_target=fp_target, folds=folds, threshold=threshold,
                 n_train=len(train), n_test=len(test), scan_seconds=scan_seconds,
                 n_messages=len(train) + len(test))
    print("\n".join(metrics_table(test_eval)))
    print(f"wrote {output} and {report}")
    return 0


def write_scores(path: Path, weights: dict[str, float], *, with_bayes: bool = False,
                 **info: Any) -> None:
    what = ("the score set for messages the Bayes learner voted on (--with-bayes)" if with_bayes
            else "the default pattern rules")
    lines = [f"# Fitted scores of {what}: written by `filterd rules fit`,",
             f"# do not edit by hand (sites override in local.d/). How they were fitted: "
             f"{'FIT-REPORT-BAYES.md' if with_bayes else 'FIT-REPORT.md'}.",
             f"# half {info['half']} ({info['n']} messages), cap {info['cap']:g}, l2 {info['l2']:g}, "
             f"ham weight {info['calibration'].ham_weight:g}, scale {info['calibration'].scale:.3f} "
             f"for out-of-fold FP <= {100 * info['fp_target']:g} % ({info['folds']} folds)", ""]
    if with_bayes:
        bands = ", ".join(f'"{b}"' for b in (*BAYES_HAM_BANDS, "BAYES_50", *BAYES_SPAM_BANDS))
        lines += ["# A message that got one of these symbols is scored with [bayes_scores] over",
                  "# [scores] (a score a site sets in local.d/ or override.d/ wins over both).",
                  "[score_sets]", f"bayes_scores = [{bands}]", "", "[bayes_scores]"]
    else:
        lines.append("[scores]")
    for name in sorted(weights):
        lines.append(f"{name} = {weights[name]:.2f}")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_report(path: Path, weights: dict[str, float], counts: dict[str, list[int]],
                 nice: set[str], train_eval: Any, test_eval: Any, *, with_bayes: bool = False,
                 **info: Any) -> None:
    if with_bayes:
        head = ["# Rule score fit report: the score set with Bayes", "",
                "Written by `filterd rules fit --with-bayes` (filterd/ruleset/fit.py): the "
                "`[bayes_scores]` set,",
                "used for a message the Bayes learner voted on. Features: the pattern and meta "
                "rules, the core",
                "sanity checks and the BAYES_* band of each message; on the fit half the band "
                "comes from a learner",
                "trained on the other folds, on the measured half from one trained on the whole "
                "fit half.",
                "No DNS lists, no network."]
    else:
        head = ["# Rule score fit report", "",
                "Written by `filterd rules fit` (filterd/ruleset/fit.py). Rules alone: the "
                "pattern and",
                "meta rules plus the core sanity checks; no Bayes, no DNS lists, no network."]
    lines = [*head,
             f"Fitted on half {info['half']} ({info['n_train']} messages) and measured on half "
             f"{info['test_half']} ({info['n_test']} messages) of ../shared/corpora (SPLIT.tsv);",
             f"spam verdict = score ≥ tag2_level {info['threshold']:g}.", "",
             "How: a sign-constrained logistic regression (spam signs ≥ 0, `nice` rules ≤ 0) with",
             "a free intercept gives the shape; the scale that turns it into points is the largest",
             f"whose out-of-fold FP rate on half {info['half']} ({info['folds']} folds: every message "
             "scored by a model that",
             f"did not see it) stays ≤ {100 * info['fp_target']:g} % at tag2_level; the ham weight "
             "with the lowest out-of-fold FN",
             f"at that point wins. Score cap {info['cap']:g}, L2 {info['l2']:g}. The held-out half "
             "is only measured, never used to choose.", "",
             "| ham weight | out-of-fold FP | out-of-fold FN |", "|---:|---:|---:|",
             *[f"| {hw:g}{' (chosen)' if hw == info['calibration'].ham_weight else ''} | "
               f"{_pct(fp)} | {_pct(fn)} |" for hw, fp, fn in info['calibration'].candidates],
             "", f"Scale {info['calibration'].scale:.3f} points per fit unit.",
             f"Scanning {info['n_messages']} messages took {info['scan_seconds']:.0f}s.", "",
             f"## Measured on half {info['test_half']} (held out from the fit)", "",
             *metrics_table(test_eval), "",
             f"## On half {info['half']} (the training half, for comparison)", "",
             *metrics_table(train_eval), "",
             "## Per rule", "",
             "Hits on ham and spam of each half; score as fitted (nice rules may only go "
             "negative).", "",
             f"| rule | ham {info['half']} | spam {info['half']} | ham {info['test_half']} | "
             f"spam {info['test_half']} | score |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in sorted(weights, key=lambda n: (-abs(weights[n]), n)):
        c = counts.get(name, [0, 0, 0, 0])
        flag = " (nice)" if name in nice else ""
        lines.append(f"| {name}{flag} | {c[0]} | {c[1]} | {c[2]} | {c[3]} | {weights[name]:.2f} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
