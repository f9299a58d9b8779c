"""Train on half A, measure on half B: the shipped pipeline's FP/FN on a corpus split.

What it does (shared/notes/evaluation.md is the definition of every figure):
  * reads a split file (`path<TAB>label<TAB>half`, default ../shared/corpora/SPLIT-TIME.tsv,
    the time split; ../shared/corpora/SPLIT.tsv is the random one) and takes the labels from
    the path as `filterd replay` does (phish counts as spam; virus is left out of the figures);
  * trains filterd's Bayes learner on half A's ham and spam with `filterd learn`, in process,
    in a temporary state directory (the tokenizer drops other filters' headers and the
    corpus obfuscation, as it does for every learned message; nothing else is stripped here);
  * scans half B with the daemon's whole offline pipeline at the shipped defaults (or
    --config), network checks off, through filterd.replay (the code of `filterd replay`), and
    prints FP/FN per corpus and overall, ROC AUC and FN at FP <= replay.fp_target (0.1 %) with
    the printers of `filterd replay`;
  * --out FILE.jsonl: one line per message of half B (path relative to the corpora, corpus,
    label, action, score, symbols, and forced/error when set);
  * --compare OLD.jsonl: which messages changed verdict (listed), changed action only, and per
    symbol how many ham and spam gained or lost it, between OLD and this run (or --new
    NEW.jsonl: between two saved runs, nothing is scanned);
  * --refit: first fits the rule scores on half A (`filterd rules fit`, both score sets, as
    they were fitted for shipping on SPLIT.tsv's half A) and scans with them: the shipped
    scores have seen about half of the time split's half B, refitted ones none of it (the
    Bayes calibration in code stays the shipped one). A few minutes more;
  * --census: also scans every other corpus message (half A, and what MANIFEST.tsv lists
    outside the split) with the same learner and prints, per symbol, how many ham and how
    many spam/phish carry it, over all of them; --symbols A,B limits the table and lists the
    ham that carry each (the check before forcing an action on a symbol: zero ham hits).
    Half A's BAYES_* symbols come from a learner that saw those very messages.

Trusts nothing in the messages (an unreadable one is an error row and the run goes on).
Nothing is quarantined, delivered or autolearned; the state directory is removed afterwards
unless --state-dir names one (which must then be empty or absent).

  .venv/bin/python bench/eval_split.py [--split FILE] [--config FILE | --refit] [--out FILE.jsonl]
      [--compare OLD.jsonl [--new NEW.jsonl]] [--census [--symbols A,B]] [--jobs N]
      [--limit N] [--state-dir DIR] [--json FILE]

Exit status: 0 done; 1 unreadable messages, a failed training or bad input files; 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from filterd.cli.replay import ReplayProgress, print_confusion, print_scores  # noqa: E402
from filterd.policy import Levels  # noqa: E402
from filterd.replay import (HAM, SPAM, MessageResult, compare, from_record,  # noqa: E402
                            label_of, summarize, symbol_changes, to_record)

CORPORA = Path(os.environ.get("FILTERD_CORPORA", ROOT.parent / "shared" / "corpora"))
CHUNK = 250  # messages per task with --jobs > 1: big enough that scheduling costs nothing


@dataclass(frozen=True, slots=True)
class Row:
    path: str       # relative to the corpora directory
    label: str | None
    half: str


def load_split(split: Path) -> list[Row]:
    """The rows of a split file; labels from the path (the replay rules), not the column."""
    rows = []
    lines = split.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t")[:3] != ["path", "label", "half"]:
        raise ValueError(f"{split}: not a split file (header path<TAB>label<TAB>half)")
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 3 or fields[2] not in ("A", "B"):
            raise ValueError(f"{split}:{number}: expected path<TAB>label<TAB>A|B")
        rows.append(Row(fields[0], label_of(fields[0])[0], fields[2]))
    return rows


def census_rows(corpora: Path, rows: Sequence[Row]) -> list[Row]:
    """Every corpus message: the split's rows, then what MANIFEST.tsv lists besides (half "-")."""
    seen = {r.path for r in rows}
    extra = []
    manifest = corpora / "MANIFEST.tsv"
    if manifest.exists():
        for line in manifest.read_text(encoding="utf-8").splitlines()[1:]:
            path = line.split("\t", 1)[0]
            if path and path not in seen:
                seen.add(path)
                extra.append(Row(path, label_of(path)[0], "-"))
    return [*rows, *extra]


# --- training -------------------------------------------------------------------------------

def train(config_file: Path, state_dir: Path, corpora: Path, rows: Sequence[Row],
          log: TextIO) -> dict[str, Any]:
    """`filterd learn --ham` then `--spam` over half A, in this process."""
    from filterd.cli.main import main as filterd_main
    counts: dict[str, Any] = {}
    started = time.perf_counter()
    for label in (HAM, SPAM):
        paths = [str(corpora / r.path) for r in rows if r.half == "A" and r.label == label]
        counts[label] = len(paths)
        if not paths:
            continue
        with contextlib.redirect_stdout(log):
            code = filterd_main(["--config", str(config_file), "--state-dir", str(state_dir),
                                 "learn", f"--{label}", "--no-progress", *paths])
        # 1 = some messages skipped as unreadable or not mail: reported on stderr, not fatal
        if code not in (0, 1):
            raise RuntimeError(f"filterd learn --{label} exited {code}")
    counts["seconds"] = round(time.perf_counter() - started, 1)
    return counts


# `filterd rules fit` as the shipped scores were made (rules/FIT-REPORT.md: the rules alone at
# the default out-of-fold FP target; rules/FIT-REPORT-BAYES.md: the set with Bayes at 0.1 %)
FIT_RECIPES = (("scores-fitted.toml", ()),
               ("scores-fitted-bayes.toml", ("--with-bayes", "--fp-target", "0.1")))


def refit(config_file: Path, state_dir: Path, site: Path, corpora: Path, split: Path,
          rows: Sequence[Row], log: TextIO) -> dict[str, Any]:
    """Fit the shipped rules' scores on half A of `split` into site/local.d/, so that no
    score was fitted on a message (or a campaign) of half B; each fit's own report of half B
    goes to `log`. The Bayes calibration is not refitted (it is code: DEFAULT_CALIBRATION)."""
    from filterd.cli.main import main as filterd_main
    dirs = sorted({r.path.split("/", 1)[0] for r in rows})
    if split.resolve().parent != corpora.resolve():
        # the fit reads the split's paths relative to the split file's directory
        view = state_dir / "fit-corpora"
        view.mkdir()
        shutil.copyfile(split, view / split.name)
        for d in dirs:
            (view / d).symlink_to((corpora / d).resolve())
        corpora, split = view, view / split.name
    local = site / "local.d"
    local.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for name, options in FIT_RECIPES:
        with contextlib.redirect_stdout(log):
            code = filterd_main(["--config", str(config_file), "--state-dir", str(state_dir),
                                 "rules", "fit", *(str(corpora / d) for d in dirs),
                                 "--split", str(split), "--half", "A", "--test-half", "B",
                                 "--output", str(local / name),
                                 "--report", str(state_dir / f"{name}.report.md"), *options])
        if code != 0:
            raise RuntimeError(f"filterd rules fit for {name} exited {code}")
    return {"site": str(site), "seconds": round(time.perf_counter() - started, 1)}


# --- scanning -------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}  # per process: the Scanner (built before the pool forks), a loop


def _fresh_loop() -> None:
    _WORKER.pop("loop", None)  # a forked worker runs its own event loop


def _scan_chunk(paths: Sequence[str]) -> list[MessageResult]:
    from filterd.message.sources import iter_messages
    from filterd.replay import replay_messages
    loop = _WORKER.get("loop")
    if loop is None:
        loop = _WORKER["loop"] = asyncio.new_event_loop()
    return loop.run_until_complete(
        replay_messages(_WORKER["scanner"], iter_messages(paths), network=False))


def scan(scanner: Any, corpora: Path, rows: Sequence[Row], *, jobs: int = 1,
         title: str = "scan") -> list[MessageResult]:
    """Replay the rows' messages offline; results named by their path relative to `corpora`.

    With jobs > 1 the Scanner is built once here and a forked pool scans chunks in order:
    the workers share the compiled rules and open their own Bayes store on first use (so
    this process must not have scanned before: one mode per run)."""
    paths = [str(corpora / r.path) for r in rows]
    bar = ReplayProgress(len(paths), title) if sys.stderr.isatty() else None
    _WORKER["scanner"] = scanner
    results: list[MessageResult] = []
    try:
        chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
        if jobs > 1:
            with multiprocessing.get_context("fork").Pool(jobs, initializer=_fresh_loop) as pool:
                parts: Iterable[list[MessageResult]] = pool.imap(_scan_chunk, chunks)
                for part in parts:
                    _collect(results, part, bar)
        else:
            for chunk in chunks:
                _collect(results, _scan_chunk(chunk), bar)
    finally:
        if bar is not None:
            bar.close()
    prefix = str(corpora) + os.sep
    return [replace(r, name=r.name[len(prefix):]) if r.name.startswith(prefix) else r
            for r in results]


def close_scanner(scanner: Any) -> None:
    """Close what the scans opened in this process (the Bayes store, its thread, the loop)."""
    for service in scanner.services.values():
        closer = getattr(service, "close", None)
        if callable(closer):
            closer()
    loop = _WORKER.pop("loop", None)
    if loop is not None:
        loop.close()


def _collect(results: list[MessageResult], part: list[MessageResult],
             bar: ReplayProgress | None) -> None:
    for r in part:
        results.append(r)
        if bar is not None:
            bar(len(results), r)


# --- results files --------------------------------------------------------------------------

def write_jsonl(path: Path, results: Sequence[MessageResult]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(to_record(r), sort_keys=True) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[MessageResult]:
    results = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                results.append(from_record(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a result line ({exc})") from None
    return results


# --- printing -------------------------------------------------------------------------------

def figures(results: Sequence[MessageResult], levels: Any, fp_target: float) -> dict[str, Any]:
    return summarize(results, levels, fp_target=fp_target, slowest=0).as_dict()


def print_figures(title: str, data: dict[str, Any], out: TextIO) -> None:
    out.write(f"== {title}\n")
    print_confusion(data, out)
    out.write("\n")
    print_scores(data, out)
    out.write("\n")


def comparison(old: Sequence[MessageResult], new: Sequence[MessageResult]) -> dict[str, Any]:
    """What changed from `old` to `new` (the same messages, by path)."""
    old_names, new_names = {r.name for r in old}, {r.name for r in new}
    changed = compare(old, new)
    verdicts = [c for c in changed if c["verdict_a"] != c["verdict_b"]]
    by_label: dict[str, int] = {}
    for c in verdicts:
        key = c["label"] if c["label"] in (HAM, SPAM) else "other"
        by_label[key] = by_label.get(key, 0) + 1
    return {"messages_old": len(old), "messages_new": len(new),
            "only_old": sorted(old_names - new_names), "only_new": sorted(new_names - old_names),
            "actions_changed": len(changed), "verdicts_changed": verdicts,
            "verdicts_changed_by_label": by_label, "symbols": symbol_changes(old, new)}


def print_comparison(old_name: str, new_name: str, cmp: dict[str, Any], out: TextIO) -> None:
    w = out.write
    w(f"== compared: {old_name} ({cmp['messages_old']} messages) -> {new_name} "
      f"({cmp['messages_new']} messages)\n")
    for key, what in (("only_old", "only in the old run"), ("only_new", "only in the new run")):
        if cmp[key]:
            w(f"{len(cmp[key])} messages {what}, e.g. {', '.join(cmp[key][:5])}\n")
    verdicts = cmp["verdicts_changed"]
    counts = ", ".join(f"{k} {v}" for k, v in sorted(cmp["verdicts_changed_by_label"].items()))
    w(f"actions changed: {cmp['actions_changed']}; verdicts changed: {len(verdicts)}"
      + (f" ({counts})" if counts else "") + "\n")
    for c in verdicts:
        gained = " +" + " +".join(c["symbols_added"]) if c["symbols_added"] else ""
        lost = " -" + " -".join(c["symbols_removed"]) if c["symbols_removed"] else ""
        w(f"  [{c['label'] or '-'}] {c['verdict_a']} -> {c['verdict_b']} ({c['action_a']} "
          f"{c['score_a']:g} -> {c['action_b']} {c['score_b']:g}){gained}{lost}  {c['name']}\n")
    symbols = cmp["symbols"]
    w(f"symbols gained/lost: {len(symbols)}\n")
    if symbols:
        w(f"  {'symbol':<34}{'ham +':>7}{'ham -':>7}{'spam +':>8}{'spam -':>8}{'other +':>9}"
          f"{'other -':>9}\n")
        for name, c in symbols.items():
            w(f"  {name[:33]:<34}{c['ham_gained']:>7}{c['ham_lost']:>7}{c['spam_gained']:>8}"
              f"{c['spam_lost']:>8}{c['other_gained']:>9}{c['other_lost']:>9}\n")
    w("\n")


def census(results: Sequence[MessageResult], only: Sequence[str] = ()) -> dict[str, Any]:
    """Per symbol, the ham, spam (phish included) and other (virus, unlabelled) carrying it;
    with `only`, just those symbols (zero rows included) and the ham paths of each."""
    counts = summarize(results, Levels(0.0, 0.0, 0.0, 0.0), slowest=0).symbols  # no levels used
    totals = {HAM: 0, SPAM: 0, "other": 0}
    for r in results:
        totals[r.label if r.label in (HAM, SPAM) else "other"] += 1
    if only:
        counts = {name: counts.get(name, {HAM: 0, SPAM: 0, "other": 0}) for name in only}
        ham_paths = {name: [r.name for r in results if r.label == HAM and name in r.symbols]
                     for name in only}
    else:
        counts = dict(sorted(counts.items()))
        ham_paths = {}
    return {"messages": len(results), "totals": totals,
            "errors": sum(r.error is not None for r in results),
            "symbols": counts, "ham_paths": ham_paths}


def print_census(data: dict[str, Any], out: TextIO) -> None:
    w = out.write
    t = data["totals"]
    w(f"== symbol census: {data['messages']} messages ({t[HAM]} ham, {t[SPAM]} spam/phish, "
      f"{t['other']} virus/unlabelled; {data['errors']} unreadable)\n")
    w(f"{'symbol':<40}{'ham':>7}{'spam':>7}{'other':>7}\n")
    for name, c in data["symbols"].items():
        w(f"{name[:39]:<40}{c[HAM]:>7}{c[SPAM]:>7}{c['other']:>7}\n")
    for name, paths in data["ham_paths"].items():
        if paths:
            w(f"ham carrying {name}:\n" + "".join(f"  {p}\n" for p in paths))
    w("\n")


# --- main -----------------------------------------------------------------------------------

def settings_for(config: str | None, state_dir: Path) -> tuple[Any, Path]:
    """(settings, the file `filterd learn` is given): --config, or the shipped defaults (a file
    naming only the state directory, so no /etc/filterd or $FILTERD_CONFIG leaks in)."""
    from filterd import config as cfg
    from filterd.ruleset import configure_compile_cache
    if config:
        path = Path(config)
    else:
        path = state_dir / "eval-defaults.toml"
        path.write_text(f"[daemon]\nstate_dir = {json.dumps(str(state_dir))}\n",
                        encoding="utf-8")
    settings = cfg.load(path, state_dir=str(state_dir))
    configure_compile_cache(settings.compile_cache_dir)
    return settings, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default=str(CORPORA / "SPLIT-TIME.tsv"),
                   help="split file (default: %(default)s)")
    p.add_argument("--corpora", help="directory the split's paths are relative to "
                                     "(default: the split file's directory)")
    p.add_argument("--config", help="settings file (default: the shipped defaults)")
    p.add_argument("--out", metavar="FILE.jsonl", help="write one line per half-B message")
    p.add_argument("--compare", metavar="OLD.jsonl", help="compare with an earlier --out")
    p.add_argument("--new", metavar="NEW.jsonl",
                   help="with --compare: compare OLD with this file instead of scanning")
    p.add_argument("--census", action="store_true",
                   help="also scan every other corpus message and print the symbol census")
    p.add_argument("--census-out", metavar="FILE", help="write the census table to FILE too")
    p.add_argument("--symbols", help="comma list: limit the census to these symbols")
    p.add_argument("--refit", action="store_true",
                   help="fit the rule scores on half A first (filterd rules fit, as shipped), "
                        "so no score has seen half B; shipped rules only (not with --config)")
    p.add_argument("--no-learn", action="store_true",
                   help="do not train (BAYES_UNTRAINED everywhere; for a quick census)")
    p.add_argument("--jobs", type=int, default=1,
                   help="scanning processes (default 1; the machine is shared)")
    p.add_argument("--limit", type=int, default=0,
                   help="only the first N messages of each half and label (smoke runs)")
    p.add_argument("--state-dir", help="keep the trained state here (must be empty or absent)")
    p.add_argument("--json", metavar="FILE", help="write the figures (and census) as JSON")
    return p


def _limited(rows: Sequence[Row], limit: int) -> list[Row]:
    if not limit:
        return list(rows)
    kept, seen = [], {}
    for r in rows:
        key = (r.half, r.label)
        if seen.get(key, 0) < limit:
            seen[key] = seen.get(key, 0) + 1
            kept.append(r)
    return kept


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    log = sys.stderr
    if args.new and not args.compare:
        print("eval_split: --new needs --compare OLD.jsonl", file=log)
        return 2
    if args.refit and args.config:
        print("eval_split: --refit fits the shipped rules; it takes no --config", file=log)
        return 2
    if args.symbols and not args.census:
        print("eval_split: --symbols needs --census", file=log)
        return 2
    if args.compare and args.new:  # two saved runs: nothing to scan
        try:
            old, new = read_jsonl(Path(args.compare)), read_jsonl(Path(args.new))
        except (OSError, ValueError) as exc:
            print(f"eval_split: {exc}", file=log)
            return 1
        print_comparison(args.compare, args.new, comparison(old, new), out)
        return 0

    split = Path(args.split)
    corpora = Path(args.corpora) if args.corpora else split.parent
    try:
        rows = _limited(load_split(split), args.limit)
        old = read_jsonl(Path(args.compare)) if args.compare else None
    except (OSError, ValueError) as exc:
        print(f"eval_split: {exc}", file=log)
        return 1
    half_b = [r for r in rows if r.half == "B"]
    rest = [r for r in _limited(census_rows(corpora, rows), args.limit) if r.half != "B"] \
        if args.census else []

    if args.state_dir:
        state_dir = Path(args.state_dir)
        if state_dir.exists() and any(state_dir.iterdir()):
            print(f"eval_split: --state-dir {state_dir} is not empty", file=log)
            return 2
        state_dir.mkdir(parents=True, exist_ok=True)
    else:
        state_dir = Path(tempfile.mkdtemp(prefix="filterd-eval-"))
    started = time.perf_counter()
    report: dict[str, Any] = {"split": str(split), "config": args.config or "shipped defaults"}
    from filterd.ruleset import compile_cache_dir, configure_compile_cache
    cache_before = compile_cache_dir()  # a process-wide setting: put back what we found
    from filterd.config import ConfigError
    from filterd.ruleset import RulesetError
    try:
        settings, config_file = settings_for(args.config, state_dir)
        if args.no_learn:
            report["training"] = None
        else:
            report["training"] = train(config_file, state_dir, corpora, rows, log)
            print(f"eval_split: trained on half A: {report['training']}", file=log)
        if args.refit:
            # the defaults file lives in state_dir, so state_dir is the site layer
            report["refit"] = refit(config_file, state_dir, state_dir, corpora, split, rows, log)
            print(f"eval_split: rule scores refitted on half A: {report['refit']}", file=log)
            report["config"] = "shipped rules, scores refitted on half A"
            settings, _ = settings_for(None, state_dir)
        from filterd.service import Scanner
        scanner = Scanner(settings)
        try:
            results = scan(scanner, corpora, half_b, jobs=args.jobs, title="half B")
            others = scan(scanner, corpora, rest, jobs=args.jobs, title="census") if rest else []
        finally:
            close_scanner(scanner)
        levels, fp_target = scanner.ruleset.policy.levels, settings.replay.fp_target
    except (ConfigError, RulesetError, RuntimeError) as exc:
        print(f"eval_split: {exc}", file=log)
        return 1
    finally:
        configure_compile_cache(cache_before)
        if not args.state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)

    trained = (f"trained on half A ({report['training']['ham']} ham, "
               f"{report['training']['spam']} spam)" if report["training"] else "untrained")
    data = figures(results, levels, fp_target)
    report["figures"] = data
    print_figures(f"{split.name} half B, {report['config']}, {trained}, network checks off",
                  data, out)
    if old is not None:
        cmp = comparison(old, results)
        report["compare"] = cmp
        print_comparison(args.compare, "this run", cmp, out)
    if args.census:
        only = [s.strip() for s in args.symbols.split(",") if s.strip()] if args.symbols else []
        everything = [*results, *others]
        report["census"] = census(everything, only)
        print_census(report["census"], out)
        if args.census_out:
            with open(args.census_out, "w", encoding="utf-8") as f:
                print_census(report["census"], f)
    if args.out:
        write_jsonl(Path(args.out), results)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    errors = sum(r.error is not None for r in (*results, *others))
    print(f"eval_split: {len(results) + len(others)} messages scanned, {errors} unreadable, "
          f"{report['seconds']} s in all", file=log)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
