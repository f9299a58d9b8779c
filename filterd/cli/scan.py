"""`filterd scan`: run the daemon's pipeline offline over files, directories, mbox and Maildir.

Prints per message the action, score, every symbol with its score, and the headers that would
be added; with --json one object per line:
  {"path", "action", "score", "symbols": [{"name", "score", "options"}], "headers", "reason"}
--explain adds, for every symbol, the text a rule matched and where the rule is defined
(file:line); in JSON as "match" and "location" of each symbol.
Nothing is quarantined, reinjected or learned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from filterd.textsafe import visible


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scan", help="scan messages offline and print each verdict",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="message file, directory (recursive), mbox file or Maildir")
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.add_argument("--offline", action="store_true",
                   help="skip checks that need the network (DNS lists, SPF/DKIM/DMARC)")
    p.add_argument("--client-ip", metavar="IP", help="pretend the message came from this client")
    p.add_argument("--from", dest="mail_from", metavar="ADDR", default="",
                   help="envelope sender")
    p.add_argument("--rcpt", action="append", default=[], metavar="ADDR",
                   help="envelope recipient (repeatable)")
    p.add_argument("--explain", action="store_true",
                   help="for every symbol: the matched text, its score and the rule's source")
    p.set_defaults(func=run)


def result_record(name: str, outcome: Any) -> dict[str, Any]:
    from filterd.service import symbol_table
    verdict = outcome.verdict
    headers = [[n, v] for n, v in outcome.edits.add]
    if outcome.edits.subject is not None:
        headers.append(["Subject", outcome.edits.subject])
    return {"path": name, "action": verdict.action.value, "score": verdict.score,
            "symbols": symbol_table(verdict), "headers": headers, "reason": verdict.reason}


def explain_record(record: dict[str, Any], outcome: Any) -> None:
    """Add to each symbol the excerpt its rule matched and where it is defined."""
    matches = outcome.notes.get("rule_matches", {})
    ruleset = outcome.ruleset
    engine = getattr(ruleset, "engine", None)
    for sym in record["symbols"]:
        name = sym["name"]
        rule = engine.rules.get(name) if engine is not None else None
        if rule is not None:
            sym["location"] = rule.location
        elif name in ruleset.symbols:
            sym["location"] = ruleset.symbols[name].source
        else:
            sym["location"] = "(undeclared)"
        if name in matches:
            sym["match"] = matches[name]
        elif name == "RULE_ERROR" and sym["options"] and engine is not None \
                and sym["options"][0] in engine.rules:
            sym["location"] = engine.rules[sym["options"][0]].location


def _print_text(record: dict[str, Any], describe: Any) -> None:
    # file names, symbol options, matched text and header values come from the message
    print(f"{visible(record['path'])}: {record['action']} score={record['score']:g} "
          f"({visible(record['reason'])})")
    for sym in record["symbols"]:
        opts = f" [{visible(', '.join(sym['options']))}]" if sym["options"] else ""
        print(f"  {sym['score']:>8.3f}  {sym['name']}{opts}  -- {describe(sym['name'])}")
        if "location" in sym:
            print(f"            at {sym['location']}")
        if "match" in sym:
            print(f"            matched: {visible(sym['match'])}")
    for name, value in record["headers"]:
        print(f"  + {name}: {visible(value)}")


def run(args: argparse.Namespace) -> int:
    from filterd.cli.main import load_settings
    from filterd.message import Envelope
    from filterd.message.sources import iter_messages
    from filterd.ruleset import RulesetError
    from filterd.service import Scanner

    from filterd.statefs import unreadable_inputs

    settings = load_settings(args)
    unreadable = unreadable_inputs(args.paths)
    for problem in unreadable.values():
        print(f"filterd: {problem}", file=sys.stderr)
    try:
        scanner = Scanner(settings)
    except RulesetError as exc:
        print(f"filterd: rule set error: {exc}", file=sys.stderr)
        return 1
    envelope = Envelope(mail_from=args.mail_from, rcpt_tos=tuple(args.rcpt),
                        client_ip=args.client_ip, listener="scan")
    errors = len(unreadable)

    async def go() -> None:
        nonlocal errors
        scanner.start_services()
        for item in iter_messages([p for p in args.paths if p not in unreadable]):
            if item.data is None:
                errors += 1
                print(f"filterd: {visible(item.name)}: {visible(item.error)}", file=sys.stderr)
                continue
            outcome = await scanner.scan(item.data, envelope, skip_network=args.offline)
            record = result_record(item.name, outcome)
            if args.explain:
                explain_record(record, outcome)
            if args.json:
                print(json.dumps(record))
            else:
                _print_text(record, scanner.ruleset.describe)

    asyncio.run(go())
    return 1 if errors else 0
