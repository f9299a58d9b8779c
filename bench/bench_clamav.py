"""clamd's scanning overhead per message on the shared corpora (`make bench`).

Starts a private clamd with the project's test database (tests/harness/clamd.py), sends a
sample of each corpus through filterd's ClamdClient (INSTREAM over the unix socket, the
daemon's code path), and reports per corpus: messages, mean and p50/p95/p99 milliseconds per
scan, and throughput with 1 and with clamav.max_connections (4) scans in flight.
Writes bench/out/clamav.json. Skips (exit 0, with a message) without clamd or the corpora.

Note: with the small test database clamd's per-message cost is mostly MIME/archive decoding
and protocol overhead; with the full freshclam database expect more per message.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SAMPLE = int(os.environ.get("BENCH_CLAMAV_SAMPLE", "300"))   # messages per corpus


def corpora() -> Path | None:
    env = os.environ.get("FILTERD_CORPORA")
    path = Path(env) if env else (REPO.parent / "shared" / "corpora").resolve()
    return path if path.is_dir() else None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_corpus(client, messages: list[bytes]) -> dict:
    times: list[float] = []
    errors = 0
    started = time.perf_counter()
    for raw in messages:
        report = await client.scan(raw)
        times.append(report.seconds * 1000)
        errors += report.error is not None
    serial = time.perf_counter() - started
    started = time.perf_counter()
    reports = await asyncio.gather(*(client.scan(raw) for raw in messages))
    parallel = time.perf_counter() - started
    errors += sum(r.error is not None for r in reports)
    return {"messages": len(messages), "errors": errors,
            "mean_ms": round(statistics.fmean(times), 2), "p50_ms": round(pct(times, 0.5), 2),
            "p95_ms": round(pct(times, 0.95), 2), "p99_ms": round(pct(times, 0.99), 2),
            "msgs_per_s_serial": round(len(messages) / serial, 1),
            "msgs_per_s_parallel": round(len(messages) / parallel, 1),
            "mean_kb": round(statistics.fmean(len(m) for m in messages) / 1024, 1)}


def main() -> int:
    base = corpora()
    if base is None:
        print("bench_clamav: corpora not found (set FILTERD_CORPORA); skipped")
        return 0
    try:
        from harness import Clamd
        from filterd.checks.antivirus import ClamdClient
        clamd = Clamd().start()
    except Exception as exc:
        print(f"bench_clamav: cannot start clamd: {exc}; skipped")
        return 0
    results: dict[str, dict] = {}
    try:
        client = ClamdClient(socket_path=clamd.socket, max_connections=4, timeout=60)
        for corpus in sorted(p for p in base.iterdir() if p.is_dir()):
            files = sorted(p for p in corpus.glob("*/*") if p.is_file())[:SAMPLE]
            if not files:
                continue
            messages = [p.read_bytes() for p in files]
            results[corpus.name] = asyncio.run(run_corpus(client, messages))
        client.close()
    finally:
        clamd.close()
    print(f"{'corpus':24} {'msgs':>5} {'KB':>7} {'mean ms':>8} {'p50':>6} {'p95':>6} {'p99':>6} "
          f"{'msg/s 1':>8} {'msg/s 4':>8} {'err':>4}")
    for name, r in results.items():
        print(f"{name:24} {r['messages']:5d} {r['mean_kb']:7.1f} {r['mean_ms']:8.2f} "
              f"{r['p50_ms']:6.2f} {r['p95_ms']:6.2f} {r['p99_ms']:6.2f} "
              f"{r['msgs_per_s_serial']:8.1f} {r['msgs_per_s_parallel']:8.1f} {r['errors']:4d}")
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "clamav.json").write_text(json.dumps({"sample_per_corpus": SAMPLE,
                                                 "database": "project test DB",
                                                 "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
