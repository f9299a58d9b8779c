"""`filterd policy`: the effective policy of an address, and the recipient database.

  filterd policy show ADDRESS [--listener smtp] [--client IP] [--auth USER] [--from SENDER]
                              [--port N] [--macro NAME=VALUE] [--json]
      the policy a message to ADDRESS would get: every value with the layer it came from
      (rules, bank NAME (file), the recipient map or database entry)
  filterd policy set ADDRESS KEY=VALUE... --db FILE
      write one entry of the SQLite recipient database (values in TOML syntax)

Reads: the settings (rules.*, policy.*, scan.mynetworks, dkim.sign), the rule set, the banks.
Exit codes: 0, 1 on a policy or lookup error (printed with its file and key), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from filterd.textsafe import visible


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("policy", help="show the effective policy of an address; "
                              "edit the recipient database")
    sub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    q = sub.add_parser("show", help="the effective policy of ADDRESS and where each value "
                       "came from")
    q.add_argument("address")
    q.add_argument("--listener", default="smtp", choices=("milter", "smtp", "lmtp", "scan"))
    q.add_argument("--client", metavar="IP", help="client address (mynetworks, networks)")
    q.add_argument("--auth", metavar="USER", help="SASL login of the sender")
    q.add_argument("--from", dest="sender", default="", metavar="SENDER",
                   help="envelope sender")
    q.add_argument("--port", type=int, help="listener port ({daemon_port})")
    q.add_argument("--macro", action="append", default=[], metavar="NAME=VALUE",
                   help="a milter macro, e.g. {daemon_name}=ORIGINATING")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_show)
    q = sub.add_parser("set", help="write one entry of the SQLite recipient database")
    q.add_argument("address", help="user@domain, @domain, @.domain or @.")
    q.add_argument("values", nargs="+", metavar="KEY=VALUE")
    q.add_argument("--db", required=True, help="the database (policy.recipient_db)")
    q.set_defaults(func=run_set)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def run_set(args: argparse.Namespace) -> int:
    from filterd.policy.recipients import write_entry
    from filterd.ruleset import RulesetError
    values = {}
    for item in args.values:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"filterd: policy set: expected KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        values[key.strip()] = _value(value.strip())
    try:
        write_entry(Path(args.db), args.address, values)
    except RulesetError as exc:
        print(f"filterd: {exc}", file=sys.stderr)
        return 1
    print(f"{args.address.lower()}: {json.dumps(values, sort_keys=True)}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from filterd.cli.main import load_settings
    from filterd.message import Envelope
    from filterd.policy.recipients import LookupUnavailable
    from filterd.ruleset import RulesetError
    from filterd.service import Scanner
    settings = load_settings(args)
    macros = []
    for item in args.macro:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"filterd: policy show: expected NAME=VALUE, got {item!r}", file=sys.stderr)
            return 2
        name = name.strip()
        macros.append((name if name.startswith("{") or len(name) == 1 else f"{{{name}}}", value))
    if args.port:
        macros.append(("{daemon_port}", str(args.port)))
    envelope = Envelope(mail_from=args.sender, rcpt_tos=(args.address,), client_ip=args.client,
                        auth_user=args.auth, listener=args.listener, macros=tuple(macros))
    try:
        scanner = Scanner(settings, quarantine=object())
        message_eff, selected = scanner.message_policy(envelope, scanner.ruleset)
        eff = scanner.recipient_policy(args.address, envelope, scanner.ruleset, message_eff,
                                       selected)
    except (RulesetError, LookupUnavailable) as exc:
        print(f"filterd: {exc}", file=sys.stderr)
        return 1
    levels = eff.policy.levels
    rows: list[tuple[str, Any]] = [
        ("tag_level", levels.tag_level), ("tag2_level", levels.tag2_level),
        ("kill_level", levels.kill_level), ("reject_level", levels.reject_level),
        ("originating_reject_level", levels.originating_reject_level),
        ("kill_action", eff.policy.kill_action.value), ("subject_tag", eff.policy.subject_tag),
        ("originating", eff.originating), ("local", eff.local),
        ("bypass_spam_checks", eff.bypass_spam_checks), ("spam_lover", eff.spam_lover),
        ("virus_lover", eff.virus_lover), ("banned_lover", eff.banned_lover),
        ("spam_headers", eff.spam_headers), ("quarantine", eff.quarantine),
        ("dkim_sign", eff.dkim_sign), ("allow_senders", list(eff.allow_senders)),
        ("deny_senders", list(eff.deny_senders)), ("disable_checks", list(eff.disable_checks)),
        ("forced", {k: v.value for k, v in sorted(eff.policy.forced.items())}),
    ]

    def shown(value: Any) -> Any:
        return "off" if isinstance(value, float) and value == float("inf") else value

    if args.json:
        print(json.dumps({"address": args.address, "banks": list(eff.banks),
                          "policy": {k: {"value": shown(v), "from": eff.source_of(k)}
                                     for k, v in rows}}, indent=2))
        return 0
    print(f"address: {visible(args.address)}")
    print(f"banks:   {', '.join(eff.banks) or '(none)'}")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {json.dumps(shown(value)):<24}  {eff.source_of(key)}")
    return 0
