"""The content job (filterd.pipeline.content): its CPU per message, its overhead, its isolation.

  --survey     the content job's CPU time on every message of ../shared/corpora (the shipped
               rule set, network checks' prepare steps included, no budget): percentiles,
               the slowest messages, and how many ham / spam would cross a budget
               (--budget, default scan.content_cpu_budget). Writes bench/out/content-cpu.json.
  --overhead   Scanner.scan over the corpora (--limit) with the content job on the loop
               (scan.content_workers = 0) and in 1 worker process, twice each, on one core:
               msgs/s and msgs per CPU-second (the daemon's CPU plus its worker's, from
               /proc), p50/p99 latency. --all-cores lets them run on different cores (one
               core makes every pipe round trip a context switch that evicts the caches).
  --isolation  one hostile message (--hostile KIND, 1 MiB) scanned while a ticker on the loop
               measures how late it wakes (every 10 ms) and a ham is scanned every 100 ms:
               the largest loop lag and ham latency, on the loop and with workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from filterd import config, pipeline  # noqa: E402
from filterd.message import Envelope, parse  # noqa: E402
from filterd.pipeline.content import run_content, stages_for  # noqa: E402
from filterd.ruleset import load  # noqa: E402
from filterd.service import Scanner  # noqa: E402

CORPORA = Path(os.environ.get("FILTERD_CORPORA", ROOT.parent / "shared" / "corpora"))

HOSTILE = {
    "comment": "<!--",
    "script": "<script>",
    "tag": "<a",
}


def hostile_message(kind: str, size: int = 1024 * 1024) -> bytes:
    unit = HOSTILE[kind].encode()
    body = unit * (size // len(unit))
    return (b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hostile\r\n"
            b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <h@example.test>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/html\r\n\r\n" + body + b"\r\n")


def corpus_files(limit: int = 0) -> list[Path]:
    files = sorted(p for p in CORPORA.glob("*/*/*") if p.is_file())
    return files[:limit] if limit else files


def label_of(path: Path) -> str:
    return path.parent.name


def settings_for(**overrides: object) -> config.Settings:
    state = tempfile.mkdtemp(prefix="filterd-bench-content-")
    return config.defaults().with_overrides({"daemon.state_dir": state, **overrides})


def survey(args: argparse.Namespace) -> int:
    settings = settings_for()
    ruleset = load(settings.rules_dir)
    budget = args.budget if args.budget is not None else settings.scan.content_cpu_budget
    phases = pipeline.plan(ruleset)
    steps = [step for stage in stages_for(phases) for step in stage]
    rows: list[tuple[float, str, str]] = []
    for path in corpus_files(args.limit):
        data = path.read_bytes()
        view = parse(data, Envelope(), content_limit=settings.scan.content_size_limit)
        ctx = pipeline.ScanContext(settings=settings, ruleset=ruleset)
        result = run_content(view, ctx, steps, None)
        rows.append((result.cpu, label_of(path), str(path.relative_to(CORPORA))))
    times = sorted(r[0] for r in rows)

    def pct(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    over = [r for r in rows if r[0] > budget]
    result = {
        "messages": len(rows),
        "steps": [f"{k}:{n}" for k, n in steps],
        "cpu_ms": {"p50": pct(0.5) * 1e3, "p99": pct(0.99) * 1e3, "p99.9": pct(0.999) * 1e3,
                   "p99.99": pct(0.9999) * 1e3, "max": times[-1] * 1e3},
        "slowest": [{"ms": round(t * 1e3, 1), "label": lab, "path": p}
                    for t, lab, p in sorted(rows, reverse=True)[:8]],
        "budget_s": budget,
        "over_budget": {lab: sum(1 for r in over if r[1] == lab)
                        for lab in sorted({r[1] for r in rows})},
    }
    print(f"content job CPU over {len(rows)} corpus messages ({len(steps)} steps)")
    print("  " + ", ".join(f"{k} {v:.2f} ms" for k, v in result["cpu_ms"].items()))
    for row in result["slowest"]:
        print(f"  {row['ms']:8.1f} ms  {row['label']:6}  {row['path']}")
    print(f"  over a budget of {budget:g} s: " + ", ".join(
        f"{lab} {n}" for lab, n in result["over_budget"].items()))
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "content-cpu.json").write_text(json.dumps(result, indent=1))
    return 0


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def overhead(args: argparse.Namespace) -> int:
    datas = [p.read_bytes() for p in corpus_files(args.limit)]
    envelope = Envelope(listener="scan")
    # one core for the daemon and its worker (the fork inherits it), as bench_scan.py: the
    # CPU-seconds are then the whole cost, and other processes' load disturbs them least
    if not args.all_cores:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    for workers in (0, 1, 0, 1):
        settings = settings_for(**{"scan.content_workers": workers, "bayes.enabled": False})
        scanner = Scanner(settings)
        scanner.start_content_workers()
        pids = [os.getpid()] + (scanner.content_pool.pids if scanner.content_pool else [])
        latencies: list[float] = []

        async def run() -> tuple[float, float]:
            for data in datas[:200]:  # warm caches and lazy imports, in every process
                await scanner.scan(data, envelope, skip_network=True)
            cpu0 = sum(_proc_cpu(p) for p in pids)
            started = time.perf_counter()
            for data in datas:
                t = time.perf_counter()
                await scanner.scan(data, envelope, skip_network=True)
                latencies.append(time.perf_counter() - t)
            return time.perf_counter() - started, sum(_proc_cpu(p) for p in pids) - cpu0

        elapsed, cpu = asyncio.run(run())
        scanner.stop_content_workers()
        latencies.sort()
        print(f"content_workers={workers}: {len(datas)} msgs, {len(datas) / elapsed:.0f} msgs/s "
              f"wall, {len(datas) / cpu:.0f} msgs per CPU-second (all processes), "
              f"p50 {statistics.median(latencies) * 1e3:.2f} ms, "
              f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.2f} ms "
              f"(load average {os.getloadavg()[0]:.2f})")
    return 0


def isolation(args: argparse.Namespace) -> int:
    hostile = hostile_message(args.hostile)
    ham = (CORPORA / "spamassassin" / "ham").iterdir().__next__().read_bytes()
    envelope = Envelope(listener="scan")
    for workers in (0, 2):
        settings = settings_for(**{"scan.content_workers": workers, "bayes.enabled": False})
        scanner = Scanner(settings)
        scanner.start_content_workers()

        async def run() -> tuple[float, float, float, object]:
            loop = asyncio.get_running_loop()
            await scanner.scan(ham, envelope, skip_network=True)
            lag = 0.0
            ham_worst = 0.0
            job = asyncio.ensure_future(scanner.scan(hostile, envelope, skip_network=True))
            started = time.perf_counter()
            ticks = 0
            while not job.done():
                t = loop.time()
                await asyncio.sleep(0.01)
                lag = max(lag, loop.time() - t - 0.01)
                ticks += 1
                if ticks % 10 == 0 and not job.done():  # a ham every ~100 ms
                    h = time.perf_counter()
                    await scanner.scan(ham, envelope, skip_network=True)
                    ham_worst = max(ham_worst, time.perf_counter() - h)
            outcome = job.result()
            return lag, ham_worst, time.perf_counter() - started, outcome

        lag, ham_worst, total, outcome = asyncio.run(run())
        scanner.stop_content_workers()
        syms = [f"{s.name}{list(s.options)}" for s in outcome.verdict.symbols  # type: ignore[attr-defined]
                if s.name in ("CONTENT_BUDGET", "CHECK_TIMEOUT")]
        print(f"content_workers={workers}: 1 MiB of {HOSTILE[args.hostile]!r} took {total:.2f} s "
              f"-> {outcome.verdict.action.value} {' '.join(syms)}; "  # type: ignore[attr-defined]
              f"loop lag max {lag * 1e3:.0f} ms, a ham scanned meanwhile took at most "
              f"{ham_worst * 1e3:.0f} ms")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--survey", action="store_true")
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--isolation", action="store_true")
    ap.add_argument("--budget", type=float, help="budget to count messages over (seconds)")
    ap.add_argument("--limit", type=int, default=0, help="at most N corpus messages")
    ap.add_argument("--hostile", choices=sorted(HOSTILE), default="comment")
    ap.add_argument("--all-cores", action="store_true",
                    help="--overhead: let the daemon and its worker run on different cores")
    args = ap.parse_args()
    if not CORPORA.is_dir():
        print(f"corpora not found at {CORPORA}; set FILTERD_CORPORA", file=sys.stderr)
        return 1
    if args.survey:
        return survey(args)
    if args.overhead:
        return overhead(args)
    if args.isolation:
        return isolation(args)
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
