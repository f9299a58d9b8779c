"""CPU of `filterd scan` on hostile content: one row per class of tests/harness/hostile.py.

Each class (unclosed "<!--", "<script>", "<style>", "<a" and "< " runs, "<" and 500 KB of
blanks, 1 MiB of "=", a 500 KB attribute, 100,000 URLs, 43,000 href targets, ~10,000 levels of
MIME nesting, 400 levels over 1 MiB of short lines, 29,000 MIME parts, 50,000 headers, 6,000
Received headers, a Subject of 1 MiB of RFC 2047 words, and of "=?" openers that never close,
a From header of 1 MiB of "@" and one of 50,000 addresses)
is built at --size bytes (default 1 MiB) and scanned once by the Scanner, offline and with the
shipped rules (what `filterd scan --offline` runs), in a child process pinned to one CPU with
an RLIMIT_CPU of --cpu-limit seconds, so a super-linear class shows as "> limit" instead of
hanging the benchmark. Prints process CPU seconds per class, the slowest stages (--stages), and
whether the marker placed after half the padding still reached the rules (URI_IP_HOST and
STRICTLY_CONFIDENTIAL fire, the URL is in the view's URL list). Writes bench/out/hostile.json.
The test with a generous bound is tests/unit/test_hostile_content.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def child(kind: str, size: int) -> dict[str, object]:
    import asyncio

    from filterd import config, pipeline
    from filterd.message import Envelope
    from filterd.service import Scanner
    from harness.hostile import MARKER_URL, hostile_message
    from harness.messages import message

    settings = config.defaults().with_overrides({"daemon.state_dir": "/tmp/filterd-bench"})
    scanner = Scanner(settings)
    envelope = Envelope(listener="scan")
    data = hostile_message(kind, size)
    stages: dict[str, float] = {}

    async def run() -> dict[str, object]:
        await scanner.scan(message(body="warm up http://example.org/\n"), envelope,
                           skip_network=True)
        started = time.process_time()
        outcome = await scanner.scan(data, envelope, skip_network=True)
        cpu = time.process_time() - started
        names = {s.name for s in outcome.verdict.symbols}
        view = scanner.parse(data, envelope)
        for form in ("raw_headers", "parts", "defects", "plain_texts", "body_text", "urls",
                     "received"):
            t = time.process_time()
            getattr(view, form)
            stages[f"view.{form}"] = time.process_time() - t
        # each check on its own, the view's forms already computed
        ctx = pipeline.ScanContext(settings=settings, ruleset=scanner.ruleset,
                                   deadline=asyncio.get_running_loop().time() + 600,
                                   services=scanner.services,
                                   stores=scanner.services.get("stores"))
        for _, checks in pipeline.plan(scanner.ruleset, skip_network=True):
            for binding, spec in checks:
                t = time.process_time()
                found = spec.func(view, ctx, **binding.args)
                if spec.is_async:
                    found = await found
                stages[f"check {binding.name}"] = time.process_time() - t
                ctx.symbols.extend(found or ())
        return {"class": kind, "bytes": len(data), "cpu_seconds": round(cpu, 3),
                "action": outcome.verdict.action.value,
                "uri_rule": "URI_IP_HOST" in names,
                "body_rule": "STRICTLY_CONFIDENTIAL" in names,
                "url_listed": MARKER_URL in view.urls,
                "timings": {k: round(v, 4) for k, v in outcome.timings.items()}
                if isinstance(getattr(outcome, "timings", None), dict) else {},
                "stages": {k: round(v, 4) for k, v in stages.items()}}

    return asyncio.run(run())


def main() -> int:
    from harness.hostile import HOSTILE_CLASSES, SIZE
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("classes", nargs="*", help=f"classes to run (default all: "
                                               f"{', '.join(HOSTILE_CLASSES)})")
    ap.add_argument("--size", type=int, default=SIZE, help="bytes per message (default 1 MiB)")
    ap.add_argument("--cpu-limit", type=int, default=120,
                    help="CPU seconds a class may take before it is reported as over (120)")
    ap.add_argument("--stages", action="store_true", help="print the view's forms' CPU too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        print(json.dumps(child(args.child, args.size)))
        return 0
    rows = []
    print(f"filterd scan --offline, shipped rules, {args.size} bytes per class, one core, "
          f"process CPU seconds (limit {args.cpu_limit} s)")
    print(f"  {'class':<22} {'CPU s':>8}  marker: uri-rule body-rule url-listed")
    for kind in args.classes or HOSTILE_CLASSES:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_CPU, (args.cpu_limit, args.cpu_limit + 5))
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--size",
                               str(args.size)], capture_output=True, text=True,
                              preexec_fn=limit)
        if proc.returncode != 0:
            over = proc.returncode in (-24, -9)  # SIGXCPU, SIGKILL at the hard limit
            row = {"class": kind, "cpu_seconds": None,
                   "error": f"over {args.cpu_limit} s CPU" if over else proc.stderr[-500:]}
            print(f"  {kind:<22} {'> ' + str(args.cpu_limit) if over else 'error':>8}"
                  + ("" if over else f"  {proc.stderr.strip().splitlines()[-1:]}"))
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {kind:<22} {row['cpu_seconds']:>8.3f}  "
                  f"{'yes' if row['uri_rule'] else 'NO':>14} {'yes' if row['body_rule'] else 'NO':>9}"
                  f" {'yes' if row['url_listed'] else 'NO':>10}")
            if args.stages:
                slow = sorted(row["stages"].items(), key=lambda kv: -kv[1])[:4]
                print("        " + ", ".join(f"{k} {v:.3f}" for k, v in slow))
        rows.append(row)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "hostile.json").write_text(json.dumps({"size": args.size, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
