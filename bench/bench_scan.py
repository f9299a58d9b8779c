"""Throughput of `filterd scan`'s pipeline on one core over the whole ../shared/corpora.

Runs the Scanner in-process (exactly what `filterd scan` and the daemon run per message, minus
the protocol), pinned to one CPU, over every message of the development corpora, and prints
messages/s, latency p50/p99 and the peak RSS. With --builtin-only only the core checks
(sanity, GTUBE) run — the issue-2 target of >= 1,000 msgs/s on one core is for that set;
without it, every check of the shipped rule set that needs no network runs.
Writes bench/out/scan.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from filterd import config  # noqa: E402
from filterd.message import Envelope  # noqa: E402
from filterd.ruleset import load  # noqa: E402
from filterd.service import Scanner  # noqa: E402

CORPORA = Path(os.environ.get("FILTERD_CORPORA", ROOT.parent / "shared" / "corpora"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--builtin-only", action="store_true", help="only sanity and GTUBE")
    ap.add_argument("--limit", type=int, default=0, help="at most N messages")
    args = ap.parse_args()
    if not CORPORA.is_dir():
        print(f"corpora not found at {CORPORA}; set FILTERD_CORPORA", file=sys.stderr)
        return 1
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    files = sorted(p for p in CORPORA.glob("*/*/*") if p.is_file())
    if args.limit:
        files = files[:args.limit]
    datas = [p.read_bytes() for p in files]
    settings = config.defaults().with_overrides({"daemon.state_dir": "/tmp/filterd-bench"})
    if args.builtin_only:
        core = Path(tempfile.mkdtemp(prefix="filterd-bench-rules-"))
        for name in ("actions.toml", "core.toml", "scores.toml"):
            shutil.copy(settings.rules_dir / name, core / name)
        ruleset = load(core)
    else:
        ruleset = load(settings.rules_dir)
    scanner = Scanner(settings, ruleset)
    checks = sorted(b.name for b in ruleset.bindings if b.enabled)
    envelope = Envelope(listener="scan")
    latencies: list[float] = []

    cpu: list[float] = []

    async def run() -> float:
        for data in datas[:200]:  # warm caches and lazy imports
            await scanner.scan(data, envelope, skip_network=True)
        started, cpu_started = time.perf_counter(), time.process_time()
        for data in datas:
            t = time.perf_counter()
            await scanner.scan(data, envelope, skip_network=True)
            latencies.append(time.perf_counter() - t)
        cpu.append(time.process_time() - cpu_started)
        return time.perf_counter() - started

    elapsed = asyncio.run(run())
    latencies.sort()
    result = {
        "messages": len(datas),
        "bytes": sum(map(len, datas)),
        "checks": checks,
        "seconds": round(elapsed, 3),
        "messages_per_second": round(len(datas) / elapsed, 1),
        "messages_per_cpu_second": round(len(datas) / cpu[0], 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "latency_ms_p50": round(statistics.median(latencies) * 1000, 3),
        "latency_ms_p99": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu": "1 core (sched_setaffinity)",
    }
    print(f"filterd scan pipeline, {'built-in checks only' if args.builtin_only else 'all local checks'}"
          f" ({', '.join(checks)})")
    print(f"  {result['messages']} messages, {result['bytes'] / 1e6:.1f} MB in {elapsed:.1f} s "
          f"on one core")
    print(f"  {result['messages_per_second']:.0f} msgs/s wall, "
          f"{result['messages_per_cpu_second']:.0f} msgs per CPU-second "
          f"(load average {result['load_average_1min']}), p50 {result['latency_ms_p50']} ms, "
          f"p99 {result['latency_ms_p99']} ms, peak RSS {result['peak_rss_mb']} MB")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    name = "scan-builtin.json" if args.builtin_only else "scan.json"
    (out / name).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
