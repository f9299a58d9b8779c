"""`filterd config check|show`."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="check or show the configuration",
                       description="Validate or print the settings file (and the rule set it "
                                   "points to).")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    check = csub.add_parser("check", help="validate settings and rules; exit 1 naming file, "
                                          "key and problem")
    check.set_defaults(func=run_check)
    show = csub.add_parser("show", help="print every setting with its value and doc")
    show.add_argument("--non-default", action="store_true",
                      help="only settings that differ from the built-in default")
    show.add_argument("--no-docs", action="store_true", help="leave out the one-line docs")
    show.set_defaults(func=run_show)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_check(args: argparse.Namespace) -> int:
    from filterd.cli.main import load_settings
    from filterd.ruleset import RulesetError, load
    settings = load_settings(args)
    try:
        ruleset = load(settings.rules_dir, settings.site_rules_dir)
    except RulesetError as exc:
        print(f"filterd: rule set error: {exc}", file=sys.stderr)
        return 1
    where = settings.path or "built-in defaults"
    print(f"ok: settings from {where}; rules: {len(ruleset.files)} files, "
          f"{len(ruleset.bindings)} checks, {len(ruleset.rules)} pattern rules, "
          f"{len(ruleset.scores)} scores")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from filterd.cli.main import load_settings
    from filterd.config import render_toml
    settings = load_settings(args)
    sys.stdout.write(render_toml(settings, non_default=args.non_default, docs=not args.no_docs))
    return 0
