"""`filterd replay`: run the whole pipeline over a labelled corpus and print how it did.

  filterd replay PATH... [--label ham|spam|auto] [--config FILE] [--network] [--json]
                 [--report DIR] [--compare CONFIG_B]

Labels come from the path with --label auto (…/ham/…; …/spam/… and …/phish/… are spam;
…/virus/… is left out of the figures). Prints a progress bar on stderr (when it is a
terminal), then the confusion matrix at the configured levels per corpus and overall, FP/FN
rates, ROC AUC and the FN rate at the lowest threshold keeping FP <= replay.fp_target of ham
(overall and per corpus), per-symbol hits on ham and spam, the slowest messages and the
threshold table. Network checks (DNS lists, SPF/DKIM/DMARC) are off unless --network. --compare replays a second time with
another settings file (and so its rules site directory) and lists every message whose action
changed. Nothing is quarantined, delivered or learned.

Exit codes: 0 done; 1 unreadable input, configuration or rule set error; 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from filterd.cli.progress import ProgressBar, count_files
from filterd.textsafe import visible


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="replay a labelled corpus: confusion matrix, ROC, report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="message file, directory (recursive), mbox file or Maildir")
    p.add_argument("--label", choices=("auto", "ham", "spam"), default="auto",
                   help="label every message (default: auto, from the path)")
    p.add_argument("--config", dest="replay_config", metavar="FILE",
                   help="settings file for this replay (overrides the global --config)")
    p.add_argument("--compare", metavar="CONFIG_B",
                   help="replay again with this settings file and list changed actions")
    p.add_argument("--network", action="store_true",
                   help="run network checks too (DNS lists, SPF/DKIM/DMARC)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON document")
    p.add_argument("--report", metavar="DIR",
                   help="write an HTML report with ROC curve and score histograms to DIR")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="always draw the progress bar on stderr")
    progress.add_argument("--no-progress", dest="progress", action="store_false",
                          help="never draw it (default: only when stderr is a terminal)")
    p.set_defaults(func=run)


class ReplayProgress:
    """replay's running count of spam verdicts on the shared progress bar."""

    def __init__(self, total: int, label: str, stream: Any = None):
        self.bar = ProgressBar(total, label, stream=stream)
        self.spam = 0

    def __call__(self, done: int, result: Any) -> None:
        self.spam += bool(result.spam_verdict)
        self.bar.update(done, f"{self.spam} spam verdicts")

    def close(self) -> None:
        self.bar.close()


def _load(config_path: str | None, args: argparse.Namespace) -> Any:
    from filterd import config
    from filterd.cli.main import become_state_owner
    try:
        settings = config.load(config_path, state_dir=args.state_dir)
    except config.ConfigError as exc:
        print(f"filterd: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    become_state_owner(settings, args)  # the Scanner opens the Bayes database
    return settings


def _pct(value: float | None) -> str:
    return "      -" if value is None else f"{value * 100:6.3f}%"


def print_text(data: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    w = out.write
    print_confusion(data, out)
    w("\n")
    print_scores(data, out)
    print_details(data, out)


def print_confusion(data: dict[str, Any], out: Any) -> None:
    """Counts, levels, actions and the confusion matrix per corpus and overall."""
    w = out.write
    levels = data["levels"]
    rate = data.get("messages_per_second")
    w(f"{data['messages']} messages ({data['errors']} unreadable), "
      f"{data['scan_seconds']:.2f} s scanning" + (f", {rate:g} msg/s" if rate else "") + "\n")
    w("levels: " + ", ".join(f"{k}={v:g}" for k, v in levels.items()) + "\n")
    w("actions: " + ", ".join(f"{k}={v}" for k, v in data["actions"].items()) + "\n\n")
    w("confusion matrix (spam verdict = spam/quarantine/reject/discard; tempfail apart)\n")
    w(f"{'corpus':<24}{'ham':>7}{'FP':>6}{'TN':>7}{'tmpf':>5}{'spam':>7}{'TP':>7}{'FN':>6}"
      f"{'tmpf':>5}{'FP rate':>9}{'FN rate':>9}\n")
    rows = list(data["corpora"].items()) + [("overall", data["overall"])]
    for name, c in rows:
        w(f"{visible(name[:23]):<24}{c['ham']:>7}{c['fp']:>6}{c['tn']:>7}{c['ham_tempfail']:>5}"
          f"{c['spam']:>7}{c['tp']:>7}{c['fn']:>6}{c['spam_tempfail']:>5}"
          f"{_pct(c['fp_rate']):>9}{_pct(c['fn_rate']):>9}\n")


def print_scores(data: dict[str, Any], out: Any) -> None:
    """ROC AUC and the FN rate at FP <= replay.fp_target, overall and per corpus."""
    w = out.write
    auc = data["auc"]
    w(f"ROC AUC: {'-' if auc is None else f'{auc:.6f}'}\n")
    at = data["fn_at_fp"]
    if at:
        thr = "-" if at["threshold"] is None else f"{at['threshold']:g}"
        w(f"FN rate at FP <= {at['fp_target'] * 100:g}% of ham: {_pct(at['fn_rate']).strip()} "
          f"(threshold {thr}: FP {at['fp']}, FN {at['fn']})\n")
    rows = [(name, c["auc"], c["fn_at_fp"]) for name, c in data["corpora"].items()
            if c.get("auc") is not None and c.get("fn_at_fp")]
    if rows:  # a corpus with ham and spam both
        w(f"{'  per corpus':<24}{'AUC':>10}{'FN@FP':>9}{'thresh.':>9}{'FP':>5}{'FN':>6}\n")
        for name, c_auc, c_at in rows:
            thr = "-" if c_at["threshold"] is None else f"{c_at['threshold']:g}"
            w(f"  {name[:21]:<22}{c_auc:>10.6f}{_pct(c_at['fn_rate']):>9}{thr:>9}"
              f"{c_at['fp']:>5}{c_at['fn']:>6}\n")


def print_details(data: dict[str, Any], out: Any) -> None:
    """The threshold table, symbol hits, slowest messages and changed actions."""
    w = out.write
    w("\nthreshold table (as tag2_level: FP/FN; as kill_level: mail held)\n")
    w(f"{'level':>8}{'FP':>7}{'FN':>7}{'FP rate':>9}{'FN rate':>9}{'ham held':>10}"
      f"{'spam held':>11}\n")
    for row in data["thresholds"]:
        mark = " <- " + ", ".join(n for n, f in (("tag2_level", row["is_tag2_level"]),
                                                ("kill_level", row["is_kill_level"])) if f) \
            if row["is_tag2_level"] or row["is_kill_level"] else ""
        w(f"{row['level']:>8g}{row['fp']:>7}{row['fn']:>7}{_pct(row['fp_rate']):>9}"
          f"{_pct(row['fn_rate']):>9}{row['ham_killed']:>10}{row['spam_killed']:>11}{mark}\n")
    w(f"\nsymbol hits{'':<29}{'ham':>7}{'spam':>7}{'other':>7}\n")
    for name, counts in list(data["symbols"].items())[:40]:
        w(f"  {name[:38]:<38}{counts['ham']:>7}{counts['spam']:>7}{counts['other']:>7}\n")
    if len(data["symbols"]) > 40:
        w(f"  ... {len(data['symbols']) - 40} more (see --json)\n")
    w("\nslowest messages\n")
    for row in data["slowest"]:
        w(f"  {row['seconds'] * 1000:9.1f} ms  {row['action']:<10} {row['score']:>8g}  "
          f"{visible(row['name'])}\n")
    changed = data.get("changed")
    if changed is not None:
        w(f"\nactions changed with {data['compare']['config']}: {len(changed)}\n")
        for row in changed:
            w(f"  {row['action_a']:>10} -> {row['action_b']:<10} {row['score_a']:>8g} -> "
              f"{row['score_b']:<8g} [{visible(row['label'] or '-')}] {visible(row['name'])}\n")


def run(args: argparse.Namespace) -> int:
    from filterd.replay import compare, replay, summarize
    from filterd.ruleset import RulesetError

    settings = _load(args.replay_config or args.config, args)
    draw = args.progress if args.progress is not None else sys.stderr.isatty()
    total = count_files(args.paths) if draw else 0

    def one_run(run_settings: Any, name: str) -> tuple[list[Any], Any]:
        bar = ReplayProgress(total, name) if draw else None
        try:
            return replay(args.paths, run_settings, label=args.label, network=args.network,
                          progress=bar)
        finally:
            if bar is not None:
                bar.close()

    try:
        results, levels = one_run(settings, "replay")
        summary = summarize(results, levels, fp_target=settings.replay.fp_target,
                            slowest=settings.replay.slowest)
        data = summary.as_dict()
        data["config"] = str(settings.path) if settings.path else None
        if args.compare:
            settings_b = _load(args.compare, args)
            results_b, levels_b = one_run(settings_b, "replay B")
            summary_b = summarize(results_b, levels_b, fp_target=settings.replay.fp_target,
                                  slowest=settings.replay.slowest)
            data["compare"] = {"config": args.compare, "summary": summary_b.as_dict()}
            data["changed"] = compare(results, results_b)
    except RulesetError as exc:
        print(f"filterd: rule set error: {exc}", file=sys.stderr)
        return 1

    if args.report:
        try:
            from filterd.replay.report import write_report
        except ImportError as exc:  # matplotlib is the `report` extra
            print(f"filterd: --report needs matplotlib (pip install 'filterd[report]'): {exc}",
                  file=sys.stderr)
            return 1
        page = write_report(Path(args.report), results, summary, data)
        print(f"filterd: report written to {page}", file=sys.stderr)
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print_text(data)
    for r in results:
        if r.error is not None:
            print(f"filterd: {visible(r.name)}: {visible(r.error)}", file=sys.stderr)
    return 1 if summary.errors else 0
