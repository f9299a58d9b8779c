"""DNS block lists: client IPs against IP lists (DNSBL), message domains against domain lists
(URIBL, Spamhaus DBL).

What it does:
  dnsbl.ip      looks up the connecting client (milter connect data or XFORWARD, else the first
                untrusted Received hop) and, with relays = "untrusted", every other untrusted
                relay of the Received chain, as reversed-octet (IPv4) or nibble (IPv6) names
                under the list's zone.
  dnsbl.domain  looks up the registered domain (Public Suffix List) of every URL in the text
                parts and, with senders = true, of the From, envelope sender and Reply-To
                domains; de-duplicated, at most max_domains per message (the first ones:
                senders, then URLs in order); a message with more adds URIBL_DOMAIN_LIMIT
                (options: zone, max_domains) so the cap is visible, not silent.
Each list is one [check.NAME] binding in rules/dnsbl.toml: its zone and a return-code -> symbol
map (exact codes, or bit values with match = "bitmask" as URIBL uses), so a site adds a list
without code.

Trusts: nothing in the message (Received hops count only when not from scan.trusted_networks);
the list's answers only inside 127.0.0.0/8.
Resolver hygiene: codes a list uses to say "your resolver is blocked / over quota" (Spamhaus
127.255.255.252/254/255, URIBL 127.0.0.1; the list's blocked_codes) and answers outside
127.0.0.0/8 (a resolver that rewrites NXDOMAIN) never score: they add DNS_BLOCKED_RESOLVER
(score 0), log a WARNING and raise the health flag of filterd.dns.health().
Settings read: dns.* through the resolver; scan.trusted_networks through the message view.
Symbols: the list symbols named in rules/dnsbl.toml (RCVD_IN_*, URIBL_*, DBL_*; options: the
IP or domain looked up and the code), DNS_BLOCKED_RESOLVER, DNS_TIMEOUT, DNS_LOOKUP_LIMIT,
URIBL_DOMAIN_LIMIT.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

from filterd.dns import (OK, in_networks, note_blocked_resolver, registered_domain,
                         report_problems, reverse_ip)
from filterd.message import MessageView, parse_address
from filterd.pipeline import Phase, ScanContext, check
from filterd.policy import Symbol

_LOOPBACK_NET = ipaddress.ip_network("127.0.0.0/8")


def client_ips(msg: MessageView, relays: str) -> list[str]:
    """The IPs to look up: the last external relay, plus every other untrusted hop if asked."""
    out: list[str] = []
    first = msg.last_external_relay.ip
    if first and not msg.is_trusted(first):
        out.append(first)
    if relays == "untrusted":
        for hop in msg.received:
            if hop.from_ip and not msg.is_trusted(hop.from_ip) and hop.from_ip not in out:
                out.append(hop.from_ip)
    return [ip for ip in out if _public(ip)]


# Addresses no public list can know (RFC 1918, loopback, link-local, CGNAT, ULA...): their
# owners would only learn our internal topology. Documentation ranges stay (tests use them).
_NEVER_LISTED = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/3", "::/127", "fc00::/7", "fe80::/10",
    "ff00::/8"))


def _public(ip: str) -> bool:
    return in_networks(ip, _NEVER_LISTED) is False


def interpret(answers: Sequence[str], *, zone: str, queried: str, codes: Mapping[str, str],
              match: str, blocked_codes: Sequence[str], symbol: str | None) -> list[Symbol]:
    """Turn a list's A records into symbols, applying the resolver-hygiene rules."""
    out: list[Symbol] = []
    blocked = set(blocked_codes)
    for code in answers:
        try:
            addr = ipaddress.ip_address(code)
        except ValueError:
            continue
        if code in blocked or addr not in _LOOPBACK_NET:
            note_blocked_resolver(zone, code, queried)
            out.append(Symbol("DNS_BLOCKED_RESOLVER", (zone, code)))
            continue
        if match == "bitmask":
            last = int(code.rsplit(".", 1)[1])
            hits = [name for bit, name in codes.items() if last & int(bit)]
        else:
            hits = [codes[code]] if code in codes else ([symbol] if symbol else [])
        for name in hits:
            out.append(Symbol(name, (queried, code)))
    return out


def _dedupe(symbols: list[Symbol]) -> list[Symbol]:
    """One symbol per name (the score counts once), options merged in order."""
    merged: dict[str, list[str]] = {}
    for sym in symbols:
        opts = merged.setdefault(sym.name, [])
        opts.extend(o for o in sym.options if o not in opts)
    return [Symbol(name, tuple(opts)) for name, opts in merged.items()]


@check("dnsbl.ip", phase=Phase.MAIN, network=True,
       symbols=("DNS_BLOCKED_RESOLVER", "DNS_TIMEOUT", "DNS_LOOKUP_LIMIT"))
async def dnsbl_ip(msg: MessageView, ctx: ScanContext, *, zone: str, codes: Mapping[str, str],
                   symbol: str | None = None, match: str = "exact",
                   blocked_codes: Sequence[str] = (), relays: str = "last",
                   ipv6: bool = True) -> list[Symbol]:
    """Look up the client (and optionally every untrusted relay) in one IP list."""
    if ctx.dns is None:
        return []
    ips = [ip for ip in client_ips(msg, relays)
           if ipv6 or ipaddress.ip_address(ip).version == 4]
    names = [(ip, f"{reverse_ip(ip)}.{zone}") for ip in ips if reverse_ip(ip)]
    answers = await asyncio.gather(*(ctx.dns.query(name, "A", ctx=ctx) for _, name in names))
    out: list[Symbol] = []
    for (ip, _), answer in zip(names, answers):
        if answer.status == OK:
            out.extend(interpret(answer.records, zone=zone, queried=ip, codes=codes, match=match,
                                 blocked_codes=blocked_codes, symbol=symbol))
    return _dedupe(out) + report_problems(ctx, "dnsbl")


_HOST_IN_WWW = re.compile(r"^www\.", re.I)


def url_host(url: str) -> str | None:
    if _HOST_IN_WWW.match(url) and "://" not in url:
        url = "http://" + url
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host.rstrip(".").lower() if host else None


def message_domains(msg: MessageView, *, urls: bool, senders: bool, max_domains: int) -> list[str]:
    """Registered domains to look up, senders first, de-duplicated, capped."""
    return _message_domains(msg, urls=urls, senders=senders, max_domains=max_domains)[0]


def _message_domains(msg: MessageView, *, urls: bool, senders: bool, max_domains: int
                     ) -> tuple[list[str], bool]:
    """(the first max_domains registered domains, whether the message has more). Hosts are
    read lazily: a message with 100,000 URLs costs the URLs up to one domain past the cap."""
    seen: dict[str, None] = {}

    def hosts() -> Iterator[str]:
        if senders:
            env_from = msg.envelope.mail_from
            reply_to = parse_address(msg.first("Reply-To"))[1]
            for addr in (msg.from_address, env_from, reply_to):
                if addr and "@" in addr:
                    yield addr.rpartition("@")[2].strip(" >").lower()
        if urls:
            for url in msg.urls:
                host = url_host(url)
                if host:
                    yield host

    for host in hosts():
        domain = registered_domain(host)
        if domain and domain not in seen:
            if len(seen) >= max_domains:
                return list(seen), True
            seen[domain] = None
    return list(seen), False


def lookup_domains(msg: MessageView, ctx: ScanContext, *, urls: bool = True,
                   senders: bool = True, max_domains: int = 20, skip: Sequence[str] = (),
                   **_: Any) -> tuple[list[str], bool]:
    """(the domains dnsbl.domain looks up, whether the message has more than max_domains): its
    prepare step, which reads the URLs (the costly part) in the content job, off the loop."""
    skipped = {d.lower() for d in skip}
    found, more = _message_domains(msg, urls=urls, senders=senders, max_domains=max_domains)
    return [d for d in found if d not in skipped], more


@check("dnsbl.domain", phase=Phase.MAIN, network=True,
       symbols=("DNS_BLOCKED_RESOLVER", "DNS_TIMEOUT", "DNS_LOOKUP_LIMIT", "URIBL_DOMAIN_LIMIT"),
       prepare=lookup_domains)
async def dnsbl_domain(msg: MessageView, ctx: ScanContext, *, zone: str,
                       codes: Mapping[str, str], symbol: str | None = None,
                       match: str = "exact", blocked_codes: Sequence[str] = (),
                       urls: bool = True, senders: bool = True,
                       max_domains: int = 20, skip: Sequence[str] = (),
                       prepared: tuple[list[str], bool] | None = None) -> list[Symbol]:
    """Look up the registered domains of URLs and senders in one domain list."""
    if ctx.dns is None:
        return []
    domains, more = prepared if prepared is not None else lookup_domains(
        msg, ctx, urls=urls, senders=senders, max_domains=max_domains, skip=skip)
    answers = await asyncio.gather(*(ctx.dns.query(f"{d}.{zone}", "A", ctx=ctx)
                                     for d in domains))
    out: list[Symbol] = []
    for domain, answer in zip(domains, answers):
        if answer.status == OK:
            out.extend(interpret(answer.records, zone=zone, queried=domain, codes=codes,
                                 match=match, blocked_codes=blocked_codes, symbol=symbol))
    if more:  # the domains past the cap were not looked up: say so rather than hide it
        out.append(Symbol("URIBL_DOMAIN_LIMIT", (zone, str(max_domains))))
    return _dedupe(out) + report_problems(ctx, "uribl")
