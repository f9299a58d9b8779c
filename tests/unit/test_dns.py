"""The resolver (filterd.dns) and the DNS list checks (filterd.checks.dnsbl) against the
harness's authoritative DNS server on loopback (a real server at the wire, in-process)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from filterd import config
from filterd.checks.dnsbl import client_ips, dnsbl_domain, dnsbl_ip, message_domains
from filterd.dns import (CAPPED, NODATA, NXDOMAIN, OK, TIMEOUT, Resolver, health,
                         registered_domain, reset_health, reverse_ip)
from filterd.message import Envelope, parse
from filterd.pipeline import ScanContext
from harness.dns import DNSServer


@pytest.fixture(scope="module")
def dns_server():
    server = DNSServer().start()
    yield server
    server.stop()


@pytest.fixture
def zone(dns_server):
    dns_server.clear()
    reset_health()
    yield dns_server
    dns_server.clear()
    reset_health()


def make_resolver(server: DNSServer, **kw) -> Resolver:
    kw.setdefault("timeout", 1.0)
    return Resolver([server.host], port=server.port, **kw)


def make_ctx(resolver: Resolver, deadline_s: float = 5.0, **overrides) -> ScanContext:
    settings = config.defaults().with_overrides(overrides)
    ctx = ScanContext(settings=settings, ruleset=None, dns=resolver)
    ctx.deadline = asyncio.get_running_loop().time() + deadline_s
    return ctx


ZEN_CODES = {"127.0.0.2": "RCVD_IN_TEST_SBL", "127.0.0.4": "RCVD_IN_TEST_XBL"}
ZEN_BLOCKED = ["127.255.255.254", "127.255.255.255"]


def msg_from(ip: str | None, body: str = "hello\n", headers: str = "", mail_from: str = "") -> object:
    raw = (f"From: Alice <alice@sender.test>\r\nTo: bob@rcpt.test\r\nSubject: hi\r\n{headers}"
           f"\r\n{body}").encode()
    return parse(raw, Envelope(mail_from=mail_from, client_ip=ip, client_helo="mx.sender.test"))


# ---- names -------------------------------------------------------------------------------

def test_reverse_ip_forms():
    assert reverse_ip("192.0.2.1") == "1.2.0.192"
    assert reverse_ip("2001:db8::1") == ".".join(reversed("20010db8" + "0" * 23 + "1"))
    assert reverse_ip("::ffff:192.0.2.1") == "1.2.0.192"
    assert reverse_ip("not-an-ip") is None


def test_registered_domain_uses_bundled_psl():
    assert registered_domain("www.Example.co.uk") == "example.co.uk"
    assert registered_domain("a.b.example.com.") == "example.com"
    assert registered_domain("co.uk") is None
    assert registered_domain("192.0.2.1") is None
    assert registered_domain("") is None


# ---- resolver ----------------------------------------------------------------------------

def test_resolver_never_takes_names_or_system_config():
    with pytest.raises(ValueError):
        Resolver(["dns.google"])
    r = Resolver(["127.0.0.1"], port=5353)
    assert r._resolver.nameservers == ["127.0.0.1"] and r._resolver.port == 5353


def test_answers_cache_and_negative_cache(zone):
    zone.add("host.test", "A", "192.0.2.7", ttl=300)
    zone.add("host.test", "TXT", ["v=spf1 ", "-all"])

    async def go():
        r = make_resolver(zone)
        a = await r.query("host.test", "A")
        assert (a.status, a.records, a.cached) == (OK, ("192.0.2.7",), False)
        again = await r.query("HOST.test.", "A")
        assert again.cached and again.records == ("192.0.2.7",)
        txt = await r.query("host.test", "TXT")
        assert txt.texts() == ["v=spf1 -all"]
        nx = await r.query("missing.test", "A")
        assert nx.status == NXDOMAIN
        nodata = await r.query("host.test", "MX")
        assert nodata.status == NODATA
        before = len(zone.queries)
        assert (await r.query("missing.test", "A")).cached          # negative caching
        assert (await r.query("host.test", "MX")).cached
        assert len(zone.queries) == before
        return r

    r = asyncio.run(go())
    assert len(r.cache) == 4


def test_cache_is_bounded_and_expires(zone):
    for i in range(5):
        zone.add(f"h{i}.test", "A", f"192.0.2.{i + 1}", ttl=1)

    async def go():
        r = make_resolver(zone, cache_size=3)
        for i in range(5):
            await r.query(f"h{i}.test", "A")
        assert len(r.cache) == 3
        assert (await r.query("h4.test", "A")).cached
        r.cache._data[("h4.test.", "A")].expires = 0     # as if its TTL ran out
        assert not (await r.query("h4.test", "A")).cached

    asyncio.run(go())


def test_concurrent_identical_queries_share_one_round_trip(zone):
    zone.add("shared.test", "A", "192.0.2.9")

    async def go():
        r = make_resolver(zone)
        with zone.slow(0.3):
            answers = await asyncio.gather(*(r.query("shared.test", "A") for _ in range(5)))
        assert all(a.records == ("192.0.2.9",) for a in answers)

    asyncio.run(go())
    assert zone.queries.count(("shared.test", "A")) == 1


def test_lookup_cap_per_message(zone):
    async def go():
        r = make_resolver(zone, max_lookups_per_message=3)
        ctx = make_ctx(r)
        statuses = [(await r.query(f"n{i}.test", "A", ctx=ctx)).status for i in range(5)]
        assert statuses == [NXDOMAIN] * 3 + [CAPPED] * 2
        assert ctx.notes["dns_lookups"] == 3 and ctx.notes["dns_capped"] == 2

    asyncio.run(go())
    assert len(zone.queries) == 3


def test_dead_server_times_out_within_budget(zone):
    async def go():
        r = make_resolver(zone, timeout=0.5)
        ctx = make_ctx(r)
        started = time.monotonic()
        with zone.dead():
            a = await r.query("x.test", "A", ctx=ctx)
        assert a.status == TIMEOUT
        assert time.monotonic() - started < 1.0
        assert ctx.notes["dns_timeouts"] == 1
        assert (await r.query("x.test", "A", ctx=ctx)).status != TIMEOUT  # timeouts not cached

    asyncio.run(go())


def test_query_respects_message_deadline(zone):
    async def go():
        r = make_resolver(zone, timeout=5.0)
        ctx = make_ctx(r, deadline_s=0.6)
        started = time.monotonic()
        with zone.slow(3):
            a = await r.query("slow.test", "A", ctx=ctx)
        assert a.status == TIMEOUT and time.monotonic() - started < 0.6

    asyncio.run(go())


# ---- DNSBL on IPs ------------------------------------------------------------------------

def test_client_ip_and_untrusted_relays():
    hops = ("Received: from a.test (a.test [198.51.100.7]) by mx.test; Mon, 1 Jan 2024\r\n"
            "Received: from b.test (b.test [10.1.1.1]) by a.test; Mon, 1 Jan 2024\r\n"
            "Received: from c.test (c.test [203.0.113.9]) by b.test; Mon, 1 Jan 2024\r\n")
    view = msg_from("192.0.2.10", headers=hops)
    assert client_ips(view, "last") == ["192.0.2.10"]
    assert client_ips(view, "untrusted") == ["192.0.2.10", "198.51.100.7", "203.0.113.9"]
    assert client_ips(msg_from("10.0.0.5"), "last") == []       # private: never sent to a list


def test_listed_ip_gets_symbol_ipv4_and_ipv6(zone):
    zone.listed("zen.test", "192.0.2.10", "127.0.0.4")
    v6 = "2001:db8::25"
    zone.add(f"{reverse_ip(v6)}.zen.test", "A", "127.0.0.2")

    async def go(ip):
        r = make_resolver(zone)
        return await dnsbl_ip(msg_from(ip), make_ctx(r), zone="zen.test", codes=ZEN_CODES,
                              blocked_codes=ZEN_BLOCKED)

    syms = asyncio.run(go("192.0.2.10"))
    assert [(s.name, s.options) for s in syms] == [("RCVD_IN_TEST_XBL", ("192.0.2.10", "127.0.0.4"))]
    syms6 = asyncio.run(go(v6))
    assert [s.name for s in syms6] == ["RCVD_IN_TEST_SBL"]
    assert asyncio.run(go("192.0.2.99")) == []                  # not listed


def test_blocked_resolver_codes_never_score_and_warn(zone, caplog):
    zone.listed("zen.test", "192.0.2.11", "127.255.255.254")
    zone.listed("zen.test", "192.0.2.12", "198.51.100.1")          # a resolver rewriting answers
    caplog.set_level(logging.WARNING, logger="filterd.dns")

    async def go(ip):
        r = make_resolver(zone)
        return await dnsbl_ip(msg_from(ip), make_ctx(r), zone="zen.test", codes=ZEN_CODES,
                              symbol="RCVD_IN_TEST_ANY", blocked_codes=ZEN_BLOCKED)

    assert health()["ok"]
    syms = asyncio.run(go("192.0.2.11"))
    assert [(s.name, s.options) for s in syms] == [("DNS_BLOCKED_RESOLVER",
                                                    ("zen.test", "127.255.255.254"))]
    assert [s.name for s in asyncio.run(go("192.0.2.12"))] == ["DNS_BLOCKED_RESOLVER"]
    h = health()
    assert h["ok"] is False and h["blocked_resolver"]["zen.test"]["count"] == 2
    assert "zen.test" in h["warnings"][0]
    assert any("blocked or rate limited" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)


def test_blocked_resolver_scores_zero_through_the_shipped_tables(zone, caplog):
    """With the shipped scores, a blocked-resolver answer leaves a message at score 0."""
    from filterd.policy import decide
    from filterd.ruleset import load
    rules = load(config.PROJECT_RULES)
    zone.listed("zen.spamhaus.org", "192.0.2.13", "127.255.255.255")
    binding = next(b for b in rules.bindings if b.name == "dnsbl_zen")
    caplog.set_level(logging.WARNING, logger="filterd.dns")

    async def go():
        return await dnsbl_ip(msg_from("192.0.2.13"), make_ctx(make_resolver(zone)),
                              **binding.args)

    syms = asyncio.run(go())
    verdict = decide(syms, rules.scores, rules.policy)
    assert [s.name for s in verdict.symbols] == ["DNS_BLOCKED_RESOLVER"]
    assert verdict.score == 0 and verdict.action.value == "accept"


def test_dnsbl_timeout_gives_zero_score_symbol(zone):
    async def go():
        r = make_resolver(zone, timeout=0.3)
        with zone.dead():
            return await dnsbl_ip(msg_from("192.0.2.10"), make_ctx(r), zone="zen.test",
                                  codes=ZEN_CODES)

    assert [(s.name, s.options) for s in asyncio.run(go())] == [("DNS_TIMEOUT", ("dnsbl",))]


# ---- URIBL / DBL -------------------------------------------------------------------------

def test_message_domains_registered_deduplicated_capped():
    body = ("see http://a.spam.example.co.uk/x and https://b.spam.example.co.uk/y\n"
            "www.other.test/z http://192.0.2.1/ip ftp://files.third.test/\n")
    view = msg_from("192.0.2.10", body=body, mail_from="bounce@mail.sender.test",
                    headers="Reply-To: <r@reply.test>\r\n")
    assert message_domains(view, urls=True, senders=True, max_domains=20) == [
        "sender.test", "reply.test", "example.co.uk", "other.test", "third.test"]
    assert message_domains(view, urls=True, senders=False, max_domains=2) == [
        "example.co.uk", "other.test"]


def test_uribl_bitmask_and_blocked_code(zone, caplog):
    zone.add("example.co.uk.multi.test", "A", "127.0.0.6")         # black + grey
    zone.add("other.test.multi.test", "A", "127.0.0.1")            # URIBL: query refused
    caplog.set_level(logging.WARNING, logger="filterd.dns")
    view = msg_from("192.0.2.10", body="http://www.example.co.uk/ http://x.other.test/\n")

    async def go():
        return await dnsbl_domain(view, make_ctx(make_resolver(zone)), zone="multi.test",
                                  match="bitmask", codes={"2": "URIBL_BLACK", "4": "URIBL_GREY"},
                                  blocked_codes=["127.0.0.1"], senders=False)

    names = {s.name: s.options for s in asyncio.run(go())}
    assert names == {"URIBL_BLACK": ("example.co.uk", "127.0.0.6"),
                     "URIBL_GREY": ("example.co.uk", "127.0.0.6"),
                     "DNS_BLOCKED_RESOLVER": ("multi.test", "127.0.0.1")}
    assert zone.queried("example.co.uk.multi.test", "A")
    assert not zone.queried("www.example.co.uk.multi.test")


def test_domain_cap_is_reported_not_silent(zone):
    """Past max_domains the remaining domains are not looked up, and URIBL_DOMAIN_LIMIT says so
    (an attacker's decoy domains first must not quietly hide the listed one)."""
    zone.add("listed.test.multi.test", "A", "127.0.0.2")
    decoys = " ".join(f"http://d{n}.test/" for n in range(3))
    view = msg_from("192.0.2.10", body=f"{decoys} http://www.listed.test/\n")

    async def go(cap):
        return await dnsbl_domain(view, make_ctx(make_resolver(zone)), zone="multi.test",
                                  match="bitmask", codes={"2": "URIBL_BLACK"}, senders=False,
                                  max_domains=cap)

    capped = {s.name: s.options for s in asyncio.run(go(3))}
    assert capped == {"URIBL_DOMAIN_LIMIT": ("multi.test", "3")}
    assert not zone.queried("listed.test.multi.test", "A")
    whole = {s.name: s.options for s in asyncio.run(go(4))}
    assert whole == {"URIBL_BLACK": ("listed.test", "127.0.0.2")}


def test_dbl_exact_codes_on_sender_domain(zone):
    zone.add("sender.test.dbl.test", "A", "127.0.1.2")

    async def go():
        return await dnsbl_domain(msg_from("192.0.2.10"), make_ctx(make_resolver(zone)),
                                  zone="dbl.test", codes={"127.0.1.2": "DBL_SPAM"}, urls=False)

    assert [(s.name, s.options) for s in asyncio.run(go())] == [
        ("DBL_SPAM", ("sender.test", "127.0.1.2"))]
