"""`filterd health`: probe every component and print one line each; exit 0 healthy, 1 not.

  filterd health [--only NAME,...] [--skip NAME,...] [--json]

Components (filterd.health.HEALTH_CHECKS): rules, state_dir, quarantine, reinject, daemon,
clamd, resolver, stores, file_modes, and whatever the installed families register. A component
that is not configured or not installed prints `skip` and does not fail the run; `WARN` (e.g.
state readable by other users) does not fail it either, world-writable state does. For a
monitoring system: `filterd health --skip daemon` on a host where the daemon runs elsewhere.
"""

from __future__ import annotations

import argparse
import json
import sys


def _names(value: str) -> set[str]:
    return {n.strip() for n in value.split(",") if n.strip()}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("health", help="check clamd, DNS, stores, rules, reinjection, the daemon",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=_names, metavar="NAME,...", help="probe only these components")
    p.add_argument("--skip", type=_names, metavar="NAME,...", help="do not probe these")
    p.add_argument("--json", action="store_true",
                   help='print [{"component", "status", "ok", "detail"}] as JSON')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from filterd.cli.main import load_settings
    from filterd.health import HEALTH_CHECKS, run_checks
    from filterd.textsafe import visible

    settings = load_settings(args)
    unknown = ((args.only or set()) | (args.skip or set())) - set(HEALTH_CHECKS)
    if unknown:
        from filterd.health import _load_family_probes
        _load_family_probes()
        unknown -= set(HEALTH_CHECKS)
    if unknown:
        print(f"filterd: unknown component(s) {', '.join(sorted(unknown))} (known: "
              f"{', '.join(HEALTH_CHECKS)})", file=sys.stderr)
        return 2
    results = run_checks(settings, only=args.only, skip=args.skip)
    if args.json:
        print(json.dumps([{"component": r.name, "status": r.status, "ok": r.ok,
                           "detail": r.detail} for r in results], indent=1))
    else:
        width = max((len(r.name) for r in results), default=8)
        for r in results:
            # details quote what services answered (an SMTP greeting, an error text)
            print(f"{r.name:<{width}}  {r.status:<4}  {visible(r.detail)}")
    return 1 if any(r.ok is False for r in results) else 0
