"""The one DNS resolver every check uses: async, cached, bounded per message, never the system's.

What it does: answers A/AAAA/TXT/MX/PTR/CNAME queries through dnspython's asyncio resolver,
sent only to the nameservers named in the settings (`configure=False`: /etc/resolv.conf is never
read), each query bounded by dns.timeout and by what is left of the message's deadline. Answers
are kept in a bounded in-process TTL cache; NXDOMAIN and empty answers are cached too (negative
caching, RFC 2308), timeouts and server failures are not. Identical queries in flight share one
network round trip. At most dns.max_lookups_per_message network queries are made per message
(counted in ctx.notes); past the cap a query answers status "capped" without touching the wire.

Trusts: the configured resolver for the content of answers (checks decide what they mean).
Settings read: dns.nameservers, dns.port, dns.timeout, dns.cache_size, dns.min_ttl,
dns.max_ttl, dns.negative_ttl, dns.max_lookups_per_message.
Symbols: none itself. Checks turn statuses into DNS_TIMEOUT / DNS_LOOKUP_LIMIT (score 0,
rules/dnsbl.toml) with `report_problems()`, and blocked-resolver answers into
DNS_BLOCKED_RESOLVER with `note_blocked_resolver()`, which also raises the health flag that
`health()` (and `filterd health`) reports.

Also here: `reverse_ip()` (DNSBL name forms, IPv4 and IPv6 nibbles) and `registered_domain()`
(the Public Suffix List bundled with the publicsuffixlist package, never fetched).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

log = logging.getLogger("filterd.dns")

# Statuses of an answer. "ok" has records; the others have none.
OK, NXDOMAIN, NODATA, TIMEOUT, SERVFAIL, CAPPED, INVALID = (
    "ok", "nxdomain", "nodata", "timeout", "servfail", "capped", "invalid")
# Statuses that mean "we could not ask or the resolver could not answer" (never a listing).
PROBLEMS = (TIMEOUT, SERVFAIL, CAPPED)
_NEGATIVE = (NXDOMAIN, NODATA)
_MIN_BUDGET = 0.05           # below this many seconds of deadline left, do not even ask


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """One answer: status plus records as text (A/AAAA/PTR/CNAME), (pref, host) for MX, and for
    TXT one tuple of byte strings per record (the character-strings, not yet joined)."""

    name: str
    rdtype: str
    status: str
    records: tuple[Any, ...] = ()
    ttl: int = 0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == OK

    def texts(self) -> list[str]:
        """TXT records joined and decoded (latin-1: never raises), others as text."""
        if self.rdtype == "TXT":
            return [b"".join(r).decode("latin-1") for r in self.records]
        return [str(r) for r in self.records]


@dataclass(slots=True)
class _Entry:
    answer: DnsAnswer
    expires: float


class TTLCache:
    """A bounded LRU of answers that expire with their TTL (clamped to [min_ttl, max_ttl])."""

    def __init__(self, size: int, *, min_ttl: int, max_ttl: int, negative_ttl: int):
        self.size = size
        self.min_ttl, self.max_ttl, self.negative_ttl = min_ttl, max_ttl, negative_ttl
        self._data: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def get(self, key: tuple[str, str], now: float) -> DnsAnswer | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return entry.answer

    def put(self, key: tuple[str, str], answer: DnsAnswer, now: float) -> None:
        if self.size <= 0 or answer.status not in (OK, *_NEGATIVE):
            return
        if answer.status == OK:
            ttl = min(max(answer.ttl, self.min_ttl), self.max_ttl)
        else:
            ttl = min(answer.ttl or self.negative_ttl, self.negative_ttl)
        if ttl <= 0:
            return
        self._data[key] = _Entry(answer, now + ttl)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()


# ---- health: resolver problems the admin must hear about ------------------------------------

_health_lock = threading.Lock()
_WARN_EVERY = 300.0          # seconds between repeated blocked-resolver warnings per list
_HEALTH: dict[str, Any] = {"queries": 0, "cache_hits": 0, "timeouts": 0, "servfails": 0,
                           "capped": 0, "blocked": {}}


def _count(key: str, n: int = 1) -> None:
    with _health_lock:
        _HEALTH[key] += n


def health() -> dict[str, Any]:
    """Resolver health for `filterd health` and metrics.

    `ok` is False while a list has answered with a "your resolver is blocked / over quota"
    code: the lists are then silently useless, which users of public resolvers keep missing.
    """
    with _health_lock:
        blocked = {zone: {k: v for k, v in info.items() if k != "warned"}
                   for zone, info in _HEALTH["blocked"].items()}
        counters = {k: v for k, v in _HEALTH.items() if k != "blocked"}
    warnings = [f"DNS list {zone} answered {info['code']} ({info['count']} times, last "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['last']))}): the "
                f"resolver is blocked or over quota there; point dns.nameservers at a local "
                f"recursive resolver (e.g. unbound) that is not a public or forwarding one"
                for zone, info in sorted(blocked.items())]
    return {"ok": not blocked, "blocked_resolver": blocked, "warnings": warnings, **counters}


def reset_health() -> None:
    with _health_lock:
        for key in ("queries", "cache_hits", "timeouts", "servfails", "capped"):
            _HEALTH[key] = 0
        _HEALTH["blocked"] = {}


def note_blocked_resolver(zone: str, code: str, queried: str) -> None:
    """A list said our resolver is blocked/rate limited: warn and raise the health flag."""
    now = time.time()
    with _health_lock:
        info = _HEALTH["blocked"].setdefault(zone, {"code": code, "count": 0, "last": 0.0,
                                                    "warned": 0.0})
        info["code"], info["count"], info["last"] = code, info["count"] + 1, now
        # one WARNING per list every few minutes, not one per message: the flag stays raised
        loud = now - info["warned"] >= _WARN_EVERY
        if loud:
            info["warned"] = now
    if not loud:
        log.debug("DNS list %s answered %s for %s (resolver blocked)", zone, code, queried)
        return
    log.warning("DNS list %s answered %s for %s: the resolver is blocked or rate limited by "
                "this list, so it scores nothing; use a local recursive resolver "
                "(dns.nameservers)", zone, code, queried)


# ---- the resolver --------------------------------------------------------------------------

class Resolver:
    """Async, cached resolver bound to explicit nameservers. Safe to share across messages."""

    def __init__(self, nameservers: Iterable[str], *, port: int = 53, timeout: float = 2.0,
                 cache_size: int = 10000, min_ttl: int = 0, max_ttl: int = 86400,
                 negative_ttl: int = 300, max_lookups_per_message: int = 64):
        self.nameservers = list(nameservers)
        for ns in self.nameservers:
            ipaddress.ip_address(ns)  # a name here would need the system resolver: refuse
        self.port = port
        self.timeout = timeout
        self.max_lookups = max_lookups_per_message
        self.cache = TTLCache(cache_size, min_ttl=min_ttl, max_ttl=max_ttl,
                              negative_ttl=negative_ttl)
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.nameservers = self.nameservers
        self._resolver.port = port
        self._resolver.retry_servfail = False
        self._inflight: dict[tuple[str, str], asyncio.Future[DnsAnswer]] = {}

    @classmethod
    def from_settings(cls, settings: Any) -> "Resolver":
        s = settings.dns
        return cls(s.nameservers, port=s.port, timeout=s.timeout, cache_size=s.cache_size,
                   min_ttl=s.min_ttl, max_ttl=s.max_ttl, negative_ttl=s.negative_ttl,
                   max_lookups_per_message=s.max_lookups_per_message)

    def _budget(self, ctx: Any) -> float:
        budget = self.timeout
        if ctx is not None and getattr(ctx, "deadline", 0.0):
            # leave a little of the message deadline for deciding and replying
            budget = min(budget, ctx.remaining() - 0.2)
        return budget

    async def query(self, name: str, rdtype: str = "A", *, ctx: Any = None) -> DnsAnswer:
        """Resolve one name; never raises for DNS trouble (see the statuses)."""
        rdtype = rdtype.upper()
        try:
            qname = dns.name.from_text(name.rstrip(".") + ".").to_text().lower()
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return DnsAnswer(name, rdtype, INVALID)
        key = (qname, rdtype)
        loop = asyncio.get_running_loop()
        cached = self.cache.get(key, loop.time())
        if cached is not None:
            _count("cache_hits")
            return DnsAnswer(cached.name, rdtype, cached.status, cached.records, cached.ttl, True)
        notes = ctx.notes if ctx is not None else None
        if notes is not None:
            used = notes.get("dns_lookups", 0)
            if used >= self.max_lookups:
                notes["dns_capped"] = notes.get("dns_capped", 0) + 1
                _count("capped")
                return DnsAnswer(qname, rdtype, CAPPED)
            notes["dns_lookups"] = used + 1
        budget = self._budget(ctx)
        if budget < _MIN_BUDGET:
            if notes is not None:
                notes["dns_timeouts"] = notes.get("dns_timeouts", 0) + 1
            return DnsAnswer(qname, rdtype, TIMEOUT)
        shared = self._inflight.get(key)
        if shared is not None:
            answer = await asyncio.shield(shared)
        else:
            future: asyncio.Future[DnsAnswer] = loop.create_future()
            self._inflight[key] = future
            try:
                answer = await self._ask(qname, rdtype, budget)
                future.set_result(answer)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" noise
                raise
            finally:
                self._inflight.pop(key, None)
            self.cache.put(key, answer, loop.time())
        if notes is not None and answer.status in (TIMEOUT, SERVFAIL):
            notes["dns_timeouts"] = notes.get("dns_timeouts", 0) + 1
        return answer

    async def _ask(self, qname: str, rdtype: str, budget: float) -> DnsAnswer:
        _count("queries")
        try:
            result = await self._resolver.resolve(qname, rdtype, lifetime=budget,
                                                  raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.responses().values()) if hasattr(exc, "responses") else []
            return DnsAnswer(qname, rdtype, NXDOMAIN,
                             ttl=_negative_ttl(responses[0] if responses else None))
        except (dns.exception.Timeout, dns.resolver.LifetimeTimeout):
            _count("timeouts")
            return DnsAnswer(qname, rdtype, TIMEOUT)
        except (dns.resolver.NoNameservers, dns.resolver.YXDOMAIN, OSError,
                dns.exception.DNSException) as exc:
            log.debug("DNS %s %s failed: %s", qname, rdtype, exc)
            _count("servfails")
            return DnsAnswer(qname, rdtype, SERVFAIL)
        rrset = result.rrset
        if rrset is None:
            return DnsAnswer(qname, rdtype, NODATA, ttl=_negative_ttl(result.response))
        records: list[Any] = []
        for rdata in rrset:
            if rdtype in ("A", "AAAA"):
                records.append(rdata.address)
            elif rdtype == "TXT":
                records.append(tuple(rdata.strings))
            elif rdtype == "MX":
                records.append((rdata.preference, rdata.exchange.to_text(omit_final_dot=True)))
            elif rdtype in ("PTR", "CNAME"):
                records.append(rdata.target.to_text(omit_final_dot=True))
            else:
                records.append(rdata.to_text())
        return DnsAnswer(qname, rdtype, OK, tuple(records), int(rrset.ttl))

    async def lookup_a(self, name: str, *, ctx: Any = None) -> list[str]:
        answer = await self.query(name, "A", ctx=ctx)
        return list(answer.records)

    async def lookup_txt(self, name: str, *, ctx: Any = None) -> list[str]:
        return (await self.query(name, "TXT", ctx=ctx)).texts()


def _negative_ttl(response: Any) -> int:
    """RFC 2308: the negative TTL is min(SOA TTL, SOA minimum) from the authority section."""
    try:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                return int(min(rrset.ttl, rrset[0].minimum))
    except (AttributeError, IndexError, TypeError):
        pass
    return 0


def report_problems(ctx: Any, check: str) -> list[Any]:
    """DNS_TIMEOUT / DNS_LOOKUP_LIMIT once per message (score 0: a resolver problem must never
    become a spam score nor a tempfail storm)."""
    from filterd.policy import Symbol
    out = []
    notes = ctx.notes
    if notes.get("dns_timeouts") and not notes.get("dns_timeout_reported"):
        notes["dns_timeout_reported"] = True
        out.append(Symbol("DNS_TIMEOUT", (check,)))
    if notes.get("dns_capped") and not notes.get("dns_cap_reported"):
        notes["dns_cap_reported"] = True
        out.append(Symbol("DNS_LOOKUP_LIMIT", (check,)))
    return out


# ---- names ---------------------------------------------------------------------------------

def ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `text` spells (an IPv4-mapped IPv6 address as its IPv4 form), else None."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def in_networks(ip: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
                ) -> bool | None:
    """Whether `ip` lies in one of `networks`; None when `ip` is no address."""
    addr = ip_address(ip)
    if addr is None:
        return None
    return any(addr in net for net in networks if net.version == addr.version)


def reverse_ip(ip: str) -> str | None:
    """The DNSBL label form of an address: 4.3.2.1 for IPv4, 32 nibbles for IPv6."""
    addr = ip_address(ip)
    if addr is None:
        return None
    if addr.version == 4:
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


_psl: Any = None
_psl_lock = threading.Lock()


def public_suffix_list() -> Any:
    """The PSL bundled with the publicsuffixlist package (ICANN section; loaded once, no fetch)."""
    global _psl
    if _psl is None:
        with _psl_lock:
            if _psl is None:
                from publicsuffixlist import PublicSuffixList
                _psl = PublicSuffixList(only_icann=True)
    return _psl


def registered_domain(host: str) -> str | None:
    """example.co.uk for www.example.co.uk; None for IPs, bare suffixes and junk."""
    host = host.strip().strip(".").lower()
    if not host or "." not in host or len(host) > 253:
        return None
    try:
        ipaddress.ip_address(host.strip("[]"))
        return None
    except ValueError:
        pass
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return None
    try:
        return public_suffix_list().privatesuffix(host)
    except Exception:
        return None


# ---- the shared service --------------------------------------------------------------------

def _factory(settings: Any) -> Resolver:
    return Resolver.from_settings(settings)


def _register() -> None:
    from filterd.service import SERVICE_FACTORIES
    SERVICE_FACTORIES.setdefault("dns", _factory)


_register()

__all__ = ["Resolver", "DnsAnswer", "TTLCache", "health", "reset_health", "note_blocked_resolver",
           "report_problems", "reverse_ip", "registered_domain", "public_suffix_list",
           "OK", "NXDOMAIN", "NODATA", "TIMEOUT", "SERVFAIL", "CAPPED", "INVALID", "PROBLEMS"]
