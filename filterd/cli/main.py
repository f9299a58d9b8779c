"""`filterd`: the daemon and the admin tools behind one command.

Each module in COMMANDS adds its subcommands through `register(subparsers)`; each subcommand
sets `func(args) -> exit code`. Exit codes: 0 success, 1 failure (or partial failure), 2 usage.
Every command runs under umask 0027 whatever the caller's (filterd.modes).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

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

# What a command imports after load_settings() switched from root to the state directory's
# owner, who may not be able to read the installation (a Python under /root): imported first.
# "filterd.*" is every module of filterd (the commands that load the rule set reach most).
_LAZY_STDLIB = ("unicodedata", "stringprep", "encodings.idna", "email.utils", "email.parser",
                "email.policy", "email.headerregistry", "email._header_value_parser", "getpass",
                "smtplib", "gzip", "tempfile", "datetime")
_QUARANTINE = ("filterd.quarantine", "filterd.quarantine.service", "filterd.quarantine.notify",
               "filterd.frontends.reinject", "filterd.bayes.api")
_BAYES = ("filterd.stores", "filterd.stores.sqlite", "filterd.stores.redis", "filterd.bayes",
          "filterd.message", "filterd.message.sources")
_EVERYTHING = ("filterd.*",)
STATE_MODULES = {
    "quarantine": _LAZY_STDLIB + _QUARANTINE + _BAYES,
    "bayes": _LAZY_STDLIB + _BAYES,
    "learn": _LAZY_STDLIB + _BAYES,
    "reload": ("filterd.control",),
    "status": ("filterd.control",),
}


EPILOG = """\
Global options go before the subcommand: filterd --config FILE --state-dir DIR serve
Settings are documented by `filterd config show`; the rule set by `filterd rules --help`.
Run as root, every command but serve works as the owner of the state directory and follows no
link inside it (docs/quarantine.md, "Running the CLI as root").
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


def load_settings(args: argparse.Namespace, *, as_state_owner: bool = True):
    """The settings (raises SystemExit(1) on error). Run as root against a state directory
    another user owns, the command continues as that user (filterd.statefs): every state file
    it opens, SQLite's -wal/-shm/-journal included, is then opened with the owner's rights only.
    `serve` passes as_state_owner=False: the daemon switches to daemon.user itself."""
    from filterd import config
    from filterd.ruleset import configure_compile_cache
    try:
        settings = config.load(args.config, state_dir=args.state_dir)
    except config.ConfigError as exc:
        print(f"filterd: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if as_state_owner:
        become_state_owner(settings, args)
    configure_compile_cache(settings.compile_cache_dir)
    return settings


def become_state_owner(settings: Any, args: argparse.Namespace) -> None:
    """Run as root, continue as the owner of the state directory (filterd.statefs); raises
    SystemExit(1) when the switch fails."""
    from filterd import statefs
    try:
        statefs.become_state_owner(settings.state_dir,
                                   STATE_MODULES.get(getattr(args, "command", ""),
                                                     _LAZY_STDLIB + _EVERYTHING))
    except statefs.SwitchError as exc:
        print(f"filterd: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


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
    except ImportError as exc:
        from filterd import statefs
        hint = statefs.import_failure_hint(exc)
        if hint is None:
            raise
        print(f"filterd: {hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
