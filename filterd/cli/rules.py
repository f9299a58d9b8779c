"""`filterd rules lint|list|show|fit|import-sa`: inspect, check, score and import rule sets.

  lint              load the rule set (shipped + site local.d/override.d) and report every
                    problem with file:line; exit 1 on any error
  list              every pattern/meta rule: name, kind, score, target, source location
  show NAME         one rule, symbol or check: each value and the file:line it came from
  fit CORPUS...     fit rule scores by logistic regression over rule hits on a corpus half
                    and write scores-fitted.toml and a report (see filterd.ruleset.fit);
                    --with-bayes fits the set used when Bayes voted (scores-fitted-bayes.toml)
  import-sa FILE... translate SpamAssassin .cf rules into a filterd rule file; every rule
                    that cannot be translated is reported with its reason (--report)

The rule set read is the daemon's: rules.dir and rules.site_dir from the settings, unless
--rules-dir / --site-dir say otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from filterd.textsafe import visible


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rules", help="lint, list, show, fit and import rules",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules-dir", metavar="DIR", help="shipped rule directory (default: rules.dir)")
    p.add_argument("--site-dir", metavar="DIR",
                   help="site directory with local.d/ and override.d/ (default: rules.site_dir)")
    rsub = p.add_subparsers(dest="rules_command", metavar="ACTION")

    q = rsub.add_parser("lint", help="check the rule set; exit 1 with file:line on error")
    q.add_argument("--warnings", action="store_true", help="also print warnings")
    q.set_defaults(func=run_lint)

    q = rsub.add_parser("list", help="list pattern and meta rules")
    q.add_argument("--kind", help="only rules of this kind (header, body, uri, meta, ...)")
    q.add_argument("--json", action="store_true", help="one JSON object per rule")
    q.set_defaults(func=run_list)

    q = rsub.add_parser("show", help="show one rule, symbol or check and where each value came from")
    q.add_argument("name")
    q.set_defaults(func=run_show)

    q = rsub.add_parser("fit", help="fit rule scores on a corpus (half A of SPLIT.tsv by default)")
    q.add_argument("corpora", nargs="+", metavar="CORPUS",
                   help="corpus directories laid out <corpus>/<label>/<file>")
    q.add_argument("--split", metavar="TSV", help="SPLIT.tsv (default: <parent of corpus>/SPLIT.tsv)")
    q.add_argument("--half", default="A", help="half to fit on (default A)")
    q.add_argument("--test-half", default="B", help="half to measure on (default B)")
    q.add_argument("--output", metavar="TOML", help="fitted scores file (default: <rules dir>/scores-fitted.toml)")
    q.add_argument("--report", metavar="MD", help="fit report (default: <rules dir>/FIT-REPORT.md)")
    q.add_argument("--cap", type=float, default=5.0, help="largest absolute score of one rule")
    q.add_argument("--l2", type=float, default=1e-4, help="L2 regularisation strength")
    q.add_argument("--ham-weight", type=_float_list, default=(1.0, 2.0, 4.0), metavar="W[,W...]",
                   help="ham error weights to try (each class weighs as much in total, ham errors "
                        "W times more on top); the one with the lowest out-of-fold FN wins "
                        "(default 1,2,4)")
    q.add_argument("--fp-target", type=float, default=0.3, metavar="PERCENT",
                   help="out-of-fold FP rate on the fit half that sets the score scale "
                        "(default 0.3)")
    q.add_argument("--folds", type=int, default=5, help="folds for the out-of-fold scores")
    q.add_argument("--limit", type=int, default=0, help="use at most N messages per half (0: all)")
    q.add_argument("--with-bayes", action="store_true",
                   help="fit the score set used when the Bayes learner voted ([bayes_scores], "
                        "default output scores-fitted-bayes.toml and FIT-REPORT-BAYES.md): the "
                        "BAYES_* bands join the rules as features, each fit-half message "
                        "classified by a learner trained on the other folds")
    q.set_defaults(func=run_fit)

    q = rsub.add_parser("import-sa", help="translate SpamAssassin .cf rules to a filterd rule file")
    q.add_argument("files", nargs="+", metavar="FILE")
    q.add_argument("--output", "-o", metavar="TOML", help="write the translated rules here "
                   "(put it in <site>/local.d/); default: print a summary only")
    q.add_argument("--report", action="store_true",
                   help="list every rule not translated, with its reason")
    q.add_argument("--prefix", default="", help="prefix for imported rule names (e.g. SA_)")
    q.set_defaults(func=run_import_sa)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("weights must be positive")
    return values


def _load(args: argparse.Namespace) -> Any:
    from filterd.cli.main import load_settings
    from filterd.ruleset import load
    settings = load_settings(args)
    shipped = Path(args.rules_dir) if args.rules_dir else settings.rules_dir
    site = Path(args.site_dir) if args.site_dir else settings.site_rules_dir
    return load(shipped, site)


def _load_or_report(args: argparse.Namespace) -> Any:
    from filterd.ruleset import RulesetError
    try:
        return _load(args)
    except RulesetError as exc:
        print(f"{exc.source}: {exc.key}: {exc.problem}", file=sys.stderr)
        return None


def run_lint(args: argparse.Namespace) -> int:
    from filterd.ruleset.lint import lint
    ruleset = _load_or_report(args)
    if ruleset is None:
        print("filterd: rules lint: 1 error", file=sys.stderr)
        return 1
    problems = lint(ruleset)
    errors = [p for p in problems if p.severity == "error"]
    for problem in problems:
        if problem.severity == "error" or args.warnings:
            print(visible(problem) + ("" if problem.severity == "error" else " (warning)"),
                  file=sys.stderr)
    engine = ruleset.engine
    print(f"{len(ruleset.files)} files, {len(ruleset.rules)} rules "
          f"({engine.hyperscan_rules} in the multi-pattern pass, "
          f"{len(engine.fallback_rules)} matched one by one), {len(ruleset.bindings)} checks: "
          f"{len(errors)} errors, {len(problems) - len(errors)} warnings")
    return 1 if errors else 0


def run_list(args: argparse.Namespace) -> int:
    ruleset = _load_or_report(args)
    if ruleset is None:
        return 1
    engine = ruleset.engine
    for name in sorted(engine.rules):
        rule = engine.rules[name]
        if args.kind and rule.kind != args.kind:
            continue
        score = ruleset.scores.get(name)
        what = (rule.expression.source if rule.expression else
                f"{rule.header} {'exists' if rule.exists else 'absent'}" if rule.exists is not None
                else f"{rule.target} {'!~' if rule.negate else '=~'} /{rule.pattern}/{rule.flags}")
        if args.json:
            print(json.dumps({"name": name, "kind": rule.kind, "score": score, "match": what,
                              "description": rule.description, "location": rule.location}))
        else:
            shown = "-" if score is None else f"{score:g}"
            print(f"{name:<32} {rule.kind:<10} {shown:>6}  {rule.location}\n"
                  f"{'':<32} {visible(what[:100])}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    ruleset = _load_or_report(args)
    if ruleset is None:
        return 1
    name = args.name
    found = False
    loc = ruleset.location_of
    if name in ruleset.rules:
        found = True
        print(f"rule {name}  ({loc(f'rule.{name}')})")
        for field_name, value in ruleset.rules[name].items():
            print(f"  {field_name} = {json.dumps(value)}    # {loc(f'rule.{name}.{field_name}')}")
    if name in ruleset.symbols:
        found = True
        sym = ruleset.symbols[name]
        print(f"symbol {name}  ({sym.source})\n  description = {json.dumps(sym.description)}")
    for binding in ruleset.bindings:
        if binding.name == name:
            found = True
            print(f"check {name}  ({binding.source})\n  function = {binding.function}\n"
                  f"  args = {json.dumps(dict(binding.args))}\n  enabled = {binding.enabled}")
    if name in ruleset.scores:
        found = True
        print(f"score {name} = {ruleset.scores[name]:g}    # {loc(f'scores.{name}')}")
    elif found and not name.startswith("__"):
        print(f"score {name}: none (scores 0)")
    if name in ruleset.bayes_scores:
        found = True
        print(f"score {name} = {ruleset.bayes_scores[name]:g} when Bayes voted    "
              f"# {loc(ruleset.bayes_score_origin.get(name, f'bayes_scores.{name}'))}")
    for table in ("rule", "symbol", "check", "scores", "bayes_scores", "forced"):
        defs = ruleset.definitions.get(f"{table}.{name}", [])
        if len(defs) > 1:
            print(f"{table}.{name} layered: " + " then ".join(f"{layer} {where}"
                                                           for layer, where in defs))
    if name in ruleset.policy.forced:
        found = True
        print(f"forced {name} = {ruleset.policy.forced[name].value}    # {loc(f'forced.{name}')}")
    if not found:
        print(f"filterd: no rule, symbol or check named {name}", file=sys.stderr)
        return 1
    return 0


def run_fit(args: argparse.Namespace) -> int:
    from filterd.ruleset import fit
    from filterd.ruleset import RulesetError
    from filterd.cli.main import load_settings
    settings = load_settings(args)
    shipped = Path(args.rules_dir) if args.rules_dir else settings.rules_dir
    site = Path(args.site_dir) if args.site_dir else None
    try:
        return fit.main(shipped=shipped, site=site, corpora=[Path(c) for c in args.corpora],
                        split=Path(args.split) if args.split else None, half=args.half,
                        test_half=args.test_half,
                        output=Path(args.output) if args.output else shipped / (
                            "scores-fitted-bayes.toml" if args.with_bayes else "scores-fitted.toml"),
                        report=Path(args.report) if args.report else shipped / (
                            "FIT-REPORT-BAYES.md" if args.with_bayes else "FIT-REPORT.md"),
                        cap=args.cap, l2=args.l2, ham_weights=args.ham_weight,
                        fp_target=args.fp_target / 100.0, folds=args.folds, limit=args.limit,
                        settings=settings, with_bayes=args.with_bayes)
    except (RulesetError, fit.FitError) as exc:
        print(f"filterd: rules fit: {exc}", file=sys.stderr)
        return 1


def run_import_sa(args: argparse.Namespace) -> int:
    from filterd.ruleset import sa_import
    result = sa_import.import_files([Path(f) for f in args.files], prefix=args.prefix)
    if result.read_errors:
        for err in result.read_errors:
            print(f"filterd: {visible(err)}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(sa_import.to_toml(result), encoding="utf-8")
    print(sa_import.summary(result))
    if args.report:
        for item in result.skipped:
            # third-party .cf text: shown, never obeyed
            print(visible(f"  {item.location}: {item.name} ({item.kind}): {item.reason}"))
        if result.undefined_refs:
            print(f"metas translated with names no file defines, read as 0 as SpamAssassin "
                  f"does: {len(result.undefined_refs)}")
            for name, refs in sorted(result.undefined_refs.items()):
                where = result.locations.get(name, "?")
                print(visible(f"  {where}: {name} (meta): reads as 0: {', '.join(refs)}"))
        if result.checks:
            print(f"DNS list tests as [check.*] bindings (network checks; they fire only with "
                  f"network checks on): {len(result.check_symbols)} rules in "
                  f"{len(result.checks)} bindings")
    return 1 if result.read_errors else 0
