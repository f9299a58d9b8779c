"""Per-message latency the DNS checks add, against an authoritative DNS server on loopback.

What runs per message, concurrently as in the pipeline's MAIN phase: the IP list (dnsbl.ip on
the client), the domain list (dnsbl.domain on URL and sender domains) and the authentication
check (SPF with an include, DKIM verification of one RSA-2048 signature, DMARC, ARC absent).
Messages differ (client IP, sender domain, URL domains), so a cold run asks the server every
name; the warm run repeats the same messages on the same resolver, answered from its cache.
The server is the test harness's dnslib server (tests/harness/dns.py) in this process, with an
optional artificial answer delay (--server-delay) to model a real recursive resolver.

  .venv/bin/python bench/bench_dns.py [--messages 200] [--server-delay 0]
      [--json bench/out/dns.json]

Prints p50/p90/p99/max in milliseconds for cold and warm caches, and queries per message.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import dkim  # noqa: E402

from filterd import config  # noqa: E402
from filterd.checks.auth import auth  # noqa: E402
from filterd.checks.dnsbl import dnsbl_domain, dnsbl_ip  # noqa: E402
from filterd.dns import Resolver  # noqa: E402
from filterd.message import Envelope, parse  # noqa: E402
from filterd.pipeline import ScanContext  # noqa: E402
from harness.dns import DNSServer  # noqa: E402

ZONE_ARGS = dict(zone="zen.bench", codes={"127.0.0.2": "RCVD_IN_BENCH"},
                 blocked_codes=["127.255.255.254", "127.255.255.255"])
URI_ARGS = dict(zone="dbl.bench", codes={"127.0.1.2": "DBL_BENCH"}, max_domains=20)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def make_key() -> tuple[bytes, str]:
    key = subprocess.run(["openssl", "genrsa", "-traditional", "2048"], check=True,
                         capture_output=True).stdout
    der = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=key,
                         check=True, capture_output=True).stdout
    return key, base64.b64encode(der).decode()


def build(server: DNSServer, n: int, key: bytes, public: str) -> list[tuple[bytes, Envelope]]:
    out = []
    for i in range(n):
        domain = f"sender{i}.bench"
        ip = f"198.51.{100 + i // 250}.{1 + i % 250}"
        server.add(f"sel._domainkey.{domain}", "TXT", f"v=DKIM1; k=rsa; p={public}")
        server.add(domain, "TXT", f"v=spf1 include:_spf.{domain} -all")
        server.add(f"_spf.{domain}", "TXT", f"v=spf1 ip4:{ip} -all")
        server.add(f"_dmarc.{domain}", "TXT", "v=DMARC1; p=quarantine")
        if i % 10 == 0:
            server.listed("zen.bench", ip)
            server.add(f"shop{i}.bench.dbl.bench", "A", "127.0.1.2")
        body = (f"Hello,\r\nsee http://www.shop{i}.bench/offer and https://cdn{i % 7}.example.com/x"
                f" and http://news.example.org/{i}\r\n").encode()
        raw = (f"From: Sender {i} <a@{domain}>\r\nTo: user@rcpt.bench\r\nSubject: msg {i}\r\n"
               f"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <{i}@{domain}>\r\n\r\n"
               ).encode() + body
        raw = dkim.sign(raw, b"sel", domain.encode(), key,
                        include_headers=[b"From", b"To", b"Subject", b"Date"]) + raw
        out.append((raw, Envelope(mail_from=f"a@{domain}", client_ip=ip,
                                  client_helo=f"mx.{domain}")))
    return out


async def one(resolver: Resolver, settings, raw: bytes, env: Envelope) -> tuple[float, int]:
    ctx = ScanContext(settings=settings, ruleset=None, dns=resolver)
    ctx.deadline = asyncio.get_running_loop().time() + settings.scan.deadline
    view = parse(raw, env)
    started = time.perf_counter()
    await asyncio.gather(dnsbl_ip(view, ctx, **ZONE_ARGS), dnsbl_domain(view, ctx, **URI_ARGS),
                         auth(view, ctx))
    return time.perf_counter() - started, ctx.notes.get("dns_lookups", 0)


async def run(messages, server: DNSServer, settings) -> dict:
    resolver = Resolver([server.host], port=server.port, timeout=2.0)
    result = {}
    for label in ("cold", "warm"):
        times, lookups = [], []
        for raw, env in messages:
            t, q = await one(resolver, settings, raw, env)
            times.append(t * 1000)
            lookups.append(q)
        result[label] = {"p50_ms": round(percentile(times, 50), 2),
                         "p90_ms": round(percentile(times, 90), 2),
                         "p99_ms": round(percentile(times, 99), 2),
                         "max_ms": round(max(times), 2),
                         "mean_ms": round(statistics.fmean(times), 2),
                         "queries_per_message": round(statistics.fmean(lookups), 1)}
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=200)
    p.add_argument("--server-delay", type=float, default=0.0,
                   help="seconds the server waits before each answer (models a real resolver)")
    p.add_argument("--json", default=str(ROOT / "bench" / "out" / "dns.json"))
    args = p.parse_args()
    settings = config.defaults().with_overrides({"daemon.hostname": "mx.bench"})
    key, public = make_key()
    server = DNSServer().start()
    try:
        messages = build(server, args.messages, key, public)
        if args.server_delay:
            with server.slow(args.server_delay):
                result = asyncio.run(run(messages, server, settings))
        else:
            result = asyncio.run(run(messages, server, settings))
    finally:
        server.stop()
    result["messages"] = args.messages
    result["server_delay_s"] = args.server_delay
    print(f"DNS checks (dnsbl.ip + dnsbl.domain + auth), {args.messages} messages, loopback "
          f"server delay {args.server_delay * 1000:g} ms")
    print(f"{'cache':<6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'queries':>8}")
    for label in ("cold", "warm"):
        r = result[label]
        print(f"{label:<6} {r['p50_ms']:>8} {r['p90_ms']:>8} {r['p99_ms']:>8} {r['max_ms']:>8} "
              f"{r['queries_per_message']:>8}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
