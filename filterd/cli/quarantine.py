"""`filterd quarantine list|show|release|delete|expire|stats|reindex` (after amavisd-release,
postsuper and postcat).

Trusts: the operator (root or the daemon's user) and the spool named by the settings, not its
contents: run as root, the command works as the spool's owner (cli.main.load_settings) and opens
nothing in the spool through a link (filterd.statefs; docs/quarantine.md).
Reads: quarantine.* and daemon.state_dir through the settings; FILTERD_CONFIG/FILTERD_STATE_DIR.
Exit codes: 0 success; 1 failure or partial failure (each failing ID named on stderr with its
cause); 2 usage (including a malformed ID: nothing is done then).
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import json
import os
import sys
from typing import Any, Callable

from filterd.quarantine.store import CATEGORIES, ID_PATTERN, STATES
from filterd.textsafe import json_dumps, visible, visible_bytes

PROG = "filterd quarantine"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quarantine", help="list, inspect, release, delete and expire quarantined "
                                          "mail",
                       description="Work with the quarantine (quarantine.dir). Exit codes: 0 ok, "
                                   "1 failure or partial failure, 2 usage.")
    qsub = p.add_subparsers(dest="quarantine_command", metavar="ACTION")

    ls = qsub.add_parser("list", help="list items, newest first")
    ls.add_argument("--json", action="store_true", help="one JSON array of sidecars")
    ls.add_argument("--since", metavar="WHEN",
                    help="quarantined at or after: 2026-11-22, 2026-11-22T10:15 (UTC) or an age "
                         "such as 3d, 12h")
    ls.add_argument("--until", metavar="WHEN", help="quarantined before (same forms)")
    ls.add_argument("--sender", metavar="ADDR", help="envelope sender; * matches any run")
    ls.add_argument("--recipient", metavar="ADDR", help="an envelope recipient; * matches any run")
    ls.add_argument("--reason", choices=CATEGORIES, help="category")
    ls.add_argument("--state", choices=STATES, help="state (default: any)")
    ls.add_argument("--limit", type=int, default=1000, metavar="N",
                    help="at most N items (default 1000; 0: all)")
    ls.set_defaults(func=run_list)

    show = qsub.add_parser("show", help="metadata, symbols and scores of one item")
    show.add_argument("id", metavar="ID")
    mode = show.add_mutually_exclusive_group()
    mode.add_argument("--raw", action="store_true",
                      help="the stored message, byte for byte into a pipe or file; on a "
                           "terminal control characters are shown escaped (\\x1b)")
    mode.add_argument("--headers", action="store_true",
                      help="the message's header block (escaped on a terminal, as --raw)")
    mode.add_argument("--json", action="store_true", help="the sidecar as JSON")
    show.set_defaults(func=run_show)

    rel = qsub.add_parser("release", help="deliver items through quarantine.release_via")
    rel.add_argument("ids", nargs="+", metavar="ID")
    rel.add_argument("--to", nargs="+", action="extend", default=[], metavar="ADDR",
                     help="deliver to these recipients instead of the original ones")
    rel.add_argument("--force", action="store_true",
                     help="release again an item already released (or interrupted)")
    rel.add_argument("--learn-ham", action="store_true",
                     help="also teach Bayes that the message is ham")
    rel.add_argument("--by", metavar="NAME",
                     help="who releases, recorded in the item (default: $SUDO_USER or the user)")
    rel.set_defaults(func=run_release)

    dele = qsub.add_parser("delete", help="delete items now")
    dele.add_argument("ids", nargs="+", metavar="ID")
    dele.set_defaults(func=run_delete)

    exp = qsub.add_parser("expire", help="delete items older than the retention")
    exp.add_argument("--older-than", type=float, metavar="DAYS",
                     help="age in days (default: quarantine.retention_days)")
    exp.set_defaults(func=run_expire)

    st = qsub.add_parser("stats", help="counts and sizes by state and category")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=run_stats)

    rx = qsub.add_parser("reindex", help="rebuild the index from the sidecars")
    rx.set_defaults(func=run_reindex)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _err(action: str, text: str) -> None:
    print(f"{PROG} {action}: {visible(text)}", file=sys.stderr)


def _store(args: argparse.Namespace) -> tuple[Any, Any]:
    from filterd.cli.main import load_settings
    from filterd.quarantine import open_store
    settings = load_settings(args)
    return settings, open_store(settings)


def _bad_ids(action: str, ids: list[str]) -> bool:
    bad = [i for i in ids if not ID_PATTERN.match(i)]
    for item_id in bad:
        _err(action, f"{item_id!r}: not a quarantine ID (expected e.g. 20261122T101500-3f9a0c41d2)"
                     "; nothing done")
    return bool(bad)


def run_list(args: argparse.Namespace) -> int:
    from filterd.quarantine.service import iso, parse_when
    from filterd.quarantine.store import QuarantineError, Query
    try:
        query = Query(since=parse_when(args.since) if args.since else None,
                      until=parse_when(args.until) if args.until else None,
                      sender=args.sender, recipient=args.recipient, category=args.reason,
                      state=args.state, limit=max(args.limit, 0))
    except ValueError as exc:
        _err("list", str(exc))
        return 2
    settings, store = _store(args)
    try:
        items = store.search(query)
    except (QuarantineError, OSError) as exc:
        _err("list", f"cannot read {settings.quarantine_dir}: {exc}")
        return 1
    if args.json:
        print(json_dumps([dict(i.sidecar) for i in items], indent=1))
        return 0
    for i in items:
        # sender, recipients and subject are the sender's text: escapes shown, never acted on
        rcpts = visible(",".join(i.rcpt_tos))
        print(f"{i.id}  {iso(i.time)}  {i.state:<9} {i.category:<10} {i.score:>8.2f} "
              f"{i.size:>8}  <{visible(i.mail_from)}> -> {rcpts}  {visible(i.subject[:60])}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from filterd.quarantine.service import describe, header_block
    from filterd.quarantine.store import QuarantineError
    if _bad_ids("show", [args.id]):
        return 2
    _, store = _store(args)
    try:
        item = store.get(args.id)
        if args.raw or args.headers:
            raw = store.read_raw(args.id)
            data = header_block(raw) if args.headers else raw
            # byte for byte into a pipe (postcat-like use, `| formail`); a terminal gets the
            # escapes shown instead of obeyed
            sys.stdout.buffer.write(visible_bytes(data) if sys.stdout.isatty() else data)
            sys.stdout.flush()
        elif args.json:
            print(json_dumps(dict(item.sidecar), indent=1))
        else:
            print("\n".join(visible(line) for line in describe(item)))
    except QuarantineError as exc:
        _err("show", str(exc))
        return 1
    return 0


def _bayes_learner() -> Callable[..., Any] | None:
    try:
        module = importlib.import_module("filterd.bayes.api")
    except ModuleNotFoundError as exc:
        if exc.name in ("filterd.bayes", "filterd.bayes.api"):
            return None
        raise
    return getattr(module, "learn", None)


def run_release(args: argparse.Namespace) -> int:
    from filterd.quarantine.service import ReleaseRefused, release
    from filterd.quarantine.store import QuarantineError
    if _bad_ids("release", args.ids):
        return 2
    for addr in args.to:
        if "@" not in addr or ID_PATTERN.match(addr) or addr.startswith("-"):
            _err("release", f"--to {addr!r}: not an address (give IDs before --to, or "
                            "one --to per address); nothing done")
            return 2
    learn = None
    if args.learn_ham:
        learn = _bayes_learner()
        if learn is None:
            _err("release", "--learn-ham: Bayes is not available in this filterd "
                            "(filterd.bayes.api.learn is missing); nothing released")
            return 1
    settings, store = _store(args)
    by = args.by or os.environ.get("SUDO_USER") or getpass.getuser()
    failed = 0
    for item_id in dict.fromkeys(args.ids):  # the same ID twice in one call: release once
        try:
            done = release(store, settings, item_id, by=by, to=args.to, force=args.force)
        except ReleaseRefused as exc:
            _err("release", str(exc))
            failed += 1
            continue
        except QuarantineError as exc:
            _err("release", str(exc))
            failed += 1
            continue
        print(f"{item_id}: released to {visible(', '.join(done.recipients))} via "
              f"{settings.quarantine.release_via}")
        if learn is not None:
            try:
                learn(settings, store.read_raw(item_id), "ham")
                print(f"{item_id}: learned as ham")
            except Exception as exc:  # the release stands; the learning failure is reported
                _err("release", f"{item_id}: released, but learning as ham failed: {exc}")
                failed += 1
    return 1 if failed else 0


def run_delete(args: argparse.Namespace) -> int:
    from filterd.quarantine.store import QuarantineError
    if _bad_ids("delete", args.ids):
        return 2
    _, store = _store(args)
    failed = 0
    for item_id in dict.fromkeys(args.ids):
        try:
            with store.locked(item_id):
                store.delete(item_id)
            print(f"{item_id}: deleted")
        except QuarantineError as exc:
            _err("delete", str(exc))
            failed += 1
    return 1 if failed else 0


def run_expire(args: argparse.Namespace) -> int:
    from filterd.quarantine.service import expire
    from filterd.quarantine.store import QuarantineError
    settings, store = _store(args)
    days = args.older_than if args.older_than is not None else settings.quarantine.retention_days
    if days < 0:
        _err("expire", "--older-than must not be negative")
        return 2
    try:
        gone = expire(store, days)
    except (QuarantineError, OSError) as exc:
        _err("expire", str(exc))
        return 1
    print(f"expired {len(gone)} item(s) older than {days:g} days")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from filterd.quarantine.service import iso
    settings, store = _store(args)
    try:
        stats = store.stats()
    except Exception as exc:
        _err("stats", f"cannot read the index of {settings.quarantine_dir}: {exc}")
        return 1
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    print(f"directory: {settings.quarantine_dir}")
    print(f"items:     {stats['items']} ({stats['bytes']} bytes)")
    print(f"oldest:    {iso(stats['oldest'])}")
    print(f"newest:    {iso(stats['newest'])}")
    for state in STATES:
        print(f"{state + ':':<10} {stats['by_state'].get(state, 0)}")
    for category in CATEGORIES:
        entry = stats["by_category"].get(category, {"items": 0, "bytes": 0})
        print(f"  {category + ':':<12} {entry['items']} ({entry['bytes']} bytes)")
    return 0


def run_reindex(args: argparse.Namespace) -> int:
    settings, store = _store(args)
    try:
        report = store.reindex()
    except Exception as exc:
        _err("reindex", f"{settings.quarantine_dir}: {exc}")
        return 1
    for problem in report.skipped:
        _err("reindex", f"skipped {problem}")
    print(f"indexed {report.items} item(s)" +
          (f", skipped {len(report.skipped)}" if report.skipped else ""))
    return 1 if report.skipped else 0
