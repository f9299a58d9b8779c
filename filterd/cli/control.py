"""`filterd reload` and `filterd status`: talk to the running daemon over its control socket."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reload", help="make the running daemon reload its rule set",
                       description="Validate the rule set on disk and swap it in; a broken "
                                   "rule set is refused and the old one keeps running (exit 1).")
    p.set_defaults(func=lambda a: _call(a, "reload"))
    p = sub.add_parser("status", help="show the running daemon's status")
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")
    p.set_defaults(func=lambda a: _call(a, "status"))


def _call(args: argparse.Namespace, command: str) -> int:
    from filterd.cli.main import load_settings
    from filterd.control import request
    settings = load_settings(args)
    path = settings.control_socket
    try:
        reply = request(path, command)
    except OSError as exc:
        print(f"filterd: daemon not reachable at {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(reply, indent=1))
    elif not reply.get("ok"):
        print(f"filterd: {command} failed: {reply.get('error')}", file=sys.stderr)
    else:
        for key, value in reply.items():
            if key != "ok":
                print(f"{key}: {value}")
    return 0 if reply.get("ok") else 1
