"""`filterd`: the daemon and the admin tools behind one command.

Each module in COMMANDS adds its subcommands through `register(subparsers)`; each subcommand
sets `func(args) -> exit code`. Exit codes: 0 success, 1 failure (or partial failure), 2 usage.
Every command runs under umask 0027 whatever the caller's (filterd.modes).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from filterd import __version__

COMMANDS = (
    "filterd.cli.serve",
    "filterd.cli.scan",
    "filterd.cli.config",
    "filterd.cli.control",
    "filterd.cli.quarantine",
    "filterd.cli.rules",
    "filterd.cli.replay",
    "filterd.cli.health",
    "filterd.cli.dkim",
    "filterd.cli.learn",
    "filterd.cli.bayes",
    "filterd.cli.policy",
)

EPILOG = """\
Global options go before the subcommand: filterd --config FILE --state-dir DIR serve
Settings are documented by `filterd config show`; the rule set by `filterd rules --help`.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="filterd",
        description="Mail content filter for Postfix: milter and after-queue content filter "
                    "with antivirus, rules, Bayes, DNS lists, DKIM/SPF/DMARC and quarantine.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"filterd {__version__}")
    parser.add_argument("--config", metavar="FILE",
                        help="settings file (default: $FILTERD_CONFIG or /etc/filterd/filterd.toml; "
                             "built-in defaults when the default file is absent)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where all embedded state lives (default: $FILTERD_STATE_DIR or "
                             "daemon.state_dir, /var/lib/filterd)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def load_settings(args: argparse.Namespace):  # -> Settings; raises SystemExit(1) on error
    from filterd import config
    from filterd.ruleset import configure_compile_cache
    try:
        settings = config.load(args.config, state_dir=args.state_dir)
    except config.ConfigError as exc:
        print(f"filterd: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    configure_compile_cache(settings.compile_cache_dir)
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from filterd.modes import set_process_umask
    # before anything is created: the policy's modes, not the caller's umask (filterd.modes)
    set_process_umask()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
