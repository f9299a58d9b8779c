"""Tune the Bayes tokenizer and classifier on a validation split of half A only.

Half A (SPLIT.tsv) is split into 5 folds by a hash of the path; every message of half A is
classified by a model learned on the other 4 folds (cross-validation), so half B never tunes
anything (../shared/notes/evaluation.md) and FN at FP <= 0.1 % rests on all of half A's ham
rather than on a few hundred. Counts are kept in memory (the store does not change what is
learned), so one variant takes seconds. Prints ROC AUC and FN at FP <= 0.1 % and <= 1 %, per
corpus and overall; --fit-calibration fits the raw-score -> probability map; --top-hams N
shows the hams that set the FP <= 0.1 % threshold and the tokens that push them.

  .venv/bin/python bench/tune_bayes.py [--params k=v,k=v ...] [--set NAME=VALUE ...]
      [--fit-calibration] [--top-hams N]
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_bayes import CORPORA, auc, fn_at_fp, load_split  # noqa: E402
from filterd.bayes import tokenizer  # noqa: E402
from filterd.bayes.classifier import ClassifierParams, classify  # noqa: E402
from filterd.message import parse  # noqa: E402
from filterd.stores import SPAM  # noqa: E402


FOLDS = 5


def fold_of(path: str) -> int:
    return int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) % FOLDS


def evaluate(tokens: list, params: ClassifierParams, *, keep: list | None = None):
    """tokens: (fold, corpus, label, tokens). Returns (corpus, label, raw score) per message;
    with `keep` (a list), also appends (raw, index, Classification with the strongest 40
    tokens, the fold's counts) for every ham, for --top-hams."""
    total: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    for fold, _, lab, toks in tokens:
        col = 2 * fold + (0 if lab == SPAM else 1)
        for t in toks:
            total[t][col] += 1
    out = []
    for fold in range(FOLDS):
        nspam = sum(1 for f, _, lab, _ in tokens if f != fold and lab == SPAM)
        nham = sum(1 for f, _, lab, _ in tokens if f != fold and lab != SPAM)
        counts = {}
        for t, c in total.items():
            s = sum(c[0::2]) - c[2 * fold]
            h = sum(c[1::2]) - c[2 * fold + 1]
            if s or h:
                counts[t] = (s, h)
        for i, (f, corpus, lab, toks) in enumerate(tokens):
            if f == fold:
                if keep is not None and lab != SPAM:
                    c = classify(toks, counts, nspam, nham, params, explain=40)
                    keep.append((c.raw, i, c, counts))
                else:
                    c = classify(toks, counts, nspam, nham, params)
                out.append((corpus, lab, c.raw))
    return out


def show_top_hams(rows: list, keep: list, results: list, n: int) -> None:
    """The hams that set the FP <= 0.1 % threshold and the tokens that push them up: what
    to look at before changing the tokenizer (half A only, never half B)."""
    spam_scores = sorted(raw for _, lab, raw in results if lab == SPAM)
    for raw, i, c, counts in sorted(keep, key=lambda k: -k[0])[:n]:
        below = bisect.bisect_right(spam_scores, raw)
        print(f"\n{raw:9.2f}  {rows[i][0]}  (spam scoring at or below it: {below})")
        for side, pick in (("spammy", lambda f: f > 0.5), ("hammy", lambda f: f < 0.5)):
            top = [(t, f) for t, f in c.top if pick(f)][:15]
            print(f"  {side}: " + ", ".join(f"{t}={f:.3f}({counts[t][0]}/{counts[t][1]})"
                                            for t, f in top))


def report(name: str, results) -> dict:
    line = {}
    for corpus in (None, "trec07p", "spamassassin"):
        rows = [r for r in results if corpus is None or r[0] == corpus]
        s = [x for _, lab, x in rows if lab == SPAM]
        h = [x for _, lab, x in rows if lab != SPAM]
        line[corpus or "overall"] = (auc(s, h), fn_at_fp(s, h), fn_at_fp(s, h, 0.01))
    print(f"{name:40} " + "  ".join(f"{k[:5]} AUC {a:.5f} FN@.1% {f * 100:5.2f} FN@1% {g * 100:5.2f}"
                                    for k, (a, f, g) in line.items()), flush=True)
    return line


def isotonic(pairs: list[tuple[float, int]]) -> list[tuple[float, float, float]]:
    """Pool-adjacent-violators over (score, is_spam) sorted by score: blocks of
    (lowest score, highest score, spam fraction), the fractions non-decreasing."""
    blocks: list[list[float]] = []   # [lo, hi, spam, n]
    for score, y in sorted(pairs):
        blocks.append([score, score, float(y), 1.0])
        while len(blocks) > 1 and blocks[-2][2] / blocks[-2][3] >= blocks[-1][2] / blocks[-1][3]:
            hi = blocks.pop()
            blocks[-1][1] = hi[1]
            blocks[-1][2] += hi[2]
            blocks[-1][3] += hi[3]
    return [(lo, hi, spam / n) for lo, hi, spam, n in blocks]


def fit_calibration(results, bounds=(0.01, 0.05, 0.20, 0.40, 0.60, 0.80, 0.95, 0.99, 0.999)
                    ) -> tuple[tuple[float, float], ...]:
    """(raw, p) points: for each band bound b, the lowest raw score from which the
    isotonic spam fraction of half A's cross-validated scores reaches b."""
    blocks = isotonic([(raw, 1 if lab == SPAM else 0) for _, lab, raw in results])
    points = []
    for b in bounds:
        for lo, _hi, frac in blocks:
            if frac >= b:
                points.append((round(lo, 3), b))
                break
    # end points: below the first bound p falls to 0.001, above the last to 0.9999
    out = [(points[0][0] - 20.0, 0.001)] if points else []
    out += points
    if points:
        out.append((points[-1][0] + 50.0, 0.9999))
    # strictly increasing raw scores (several bounds may share one block)
    clean: list[tuple[float, float]] = []
    for raw, p in out:
        if clean and raw <= clean[-1][0]:
            raw = clean[-1][0] + 0.001
        clean.append((round(raw, 3), p))
    return tuple(clean)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", action="append", default=[],
                    help="k=v,k=v ClassifierParams variants to try")
    ap.add_argument("--max-tokens", type=int, default=tokenizer.DEFAULT_MAX_TOKENS)
    ap.add_argument("--set", action="append", default=[],
                    help="NAME=VALUE: set a tokenizer module constant (a string) for this run")
    ap.add_argument("--fit-calibration", action="store_true")
    ap.add_argument("--top-hams", type=int, default=0, metavar="N",
                    help="show the N highest-scoring hams of the default variant and their tokens")
    args = ap.parse_args()
    for spec in args.set:
        name, _, value = spec.partition("=")
        setattr(tokenizer, name, type(getattr(tokenizer, name))(value))
    rows = [r for r in load_split() if r[3] == "A"]
    t0 = time.process_time()
    tokens = [(fold_of(p), c, lab, tokenizer.tokenize(parse((CORPORA / p).read_bytes()),
                                                      max_tokens=args.max_tokens))
              for p, c, lab, _ in rows]
    print(f"half A {len(rows)} in {FOLDS} folds; parse+tokenize {time.process_time() - t0:.1f}s "
          f"cpu; mean tokens {sum(len(t[3]) for t in tokens) / len(tokens):.0f}")
    variants = [("default", ClassifierParams())]
    for spec in args.params:
        kv = {k: type(getattr(ClassifierParams(), k))(v) for k, v in
              (x.split("=") for x in spec.split(","))}
        variants.append((spec, ClassifierParams(**kv)))
    ap_fit = args.fit_calibration
    for name, params in variants:
        keep: list | None = [] if args.top_hams and name == "default" else None
        results = evaluate(tokens, params, keep=keep)
        report(name, results)
        if keep:
            show_top_hams(rows, keep, results, args.top_hams)
        if ap_fit:
            points = fit_calibration(results)
            print(f"  calibration {points}")
            calibrated = ClassifierParams(**{**{f: getattr(params, f) for f in
                                                ClassifierParams.__slots__}, "calibration": points})
            by_band: dict[str, list[int]] = {}
            for _, lab, raw in results:
                from filterd.bayes.classifier import band, calibrate
                name_ = band(calibrate(raw, calibrated.calibration))
                by_band.setdefault(name_, [0, 0])[0 if lab == SPAM else 1] += 1
            for name_ in sorted(by_band):
                sp, hm = by_band[name_]
                print(f"    {name_:10} spam {sp:5} ham {hm:5}  spam fraction {sp / (sp + hm):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
