"""`filterd serve`: run the daemon in the foreground."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the milter and the after-queue filter (foreground)",
                       description="Run filterd in the foreground: the milter on milter.listen "
                                   "and the after-queue SMTP filter on smtp.listen. SIGHUP or "
                                   "`filterd reload` reloads the rule set; SIGTERM stops.")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="override log.level")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from filterd import logsetup
    from filterd.cli.main import load_settings
    from filterd.daemon import serve
    from filterd.ruleset import RulesetError

    settings = load_settings(args, as_state_owner=False)
    logsetup.setup(settings, level=args.log_level)
    try:
        return serve(settings)
    except RulesetError as exc:
        print(f"filterd: rule set error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"filterd: cannot start: {exc}", file=sys.stderr)
        return 1
