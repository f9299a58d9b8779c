"""Sender authentication: SPF, DKIM, DMARC and ARC, plus sender allow/deny lists that trust an
allow-listed sender only when it is authenticated.

What it does (check "auth", one binding in rules/auth.toml):
  SPF    pyspf on the envelope sender (or postmaster@HELO for a null sender) with the client IP
         of the last external relay and its HELO. pyspf's DNS goes through our resolver (a
         thread-local hook on spf.DNSLookup), so it obeys dns.nameservers, the cache, the
         per-message cap and the deadline; nothing reaches the system resolver.
  DKIM   every DKIM-Signature (up to max_signatures) with dkimpy; each public key is fetched
         through our resolver first and handed to dkimpy with dnsfunc=.
  DMARC  the From domain's policy (_dmarc.<domain>, else the organisational domain from the
         Public Suffix List) and alignment (adkim/aspf relaxed or strict) of SPF and DKIM.
  ARC    dkimpy's ARC chain validation (arc_verify), keys fetched the same way.
The per-method results go into ctx.notes["auth"] (an AuthResults) and into the zero-score
helper symbol __AUTH_RESULTS, from which `authentication_results_header()` writes one RFC 8601
Authentication-Results header with our authserv-id. Incoming Authentication-Results carrying our
authserv-id are forged (or stale) and are removed (REMOVAL_RULES).

Check "auth.sender_lists" (phase CLASSIFY, after "auth"): sender allow entries apply only when
the sender is authenticated for that address (From: aligned DKIM pass, or SPF pass with an
aligned envelope domain; envelope sender: SPF pass); deny entries apply always.

Trusts: the resolver's answers; nothing in the message (foreign Authentication-Results are
never read). Originating mail (scan.mynetworks / SMTP AUTH) is not checked unless the policy
scans originating mail for spam.
Settings read: dkim.authserv_id, dkim.verify_min_key_bits, daemon.hostname, dns.* (resolver).
Symbols: SPF_PASS, SPF_FAIL, SPF_SOFTFAIL, SPF_NEUTRAL, SPF_NONE, SPF_TEMPERROR, SPF_PERMERROR,
DKIM_VALID, DKIM_VALID_AU, DKIM_INVALID, DKIM_TEMPERROR, DKIM_NONE, DMARC_PASS, DMARC_REJECT,
DMARC_QUARANTINE, DMARC_NONE, DMARC_NA, DMARC_TEMPERROR, DMARC_PERMERROR, ARC_PASS, ARC_FAIL,
ARC_NONE, AUTH_SENDER_ALLOWLISTED, AUTH_SENDER_ALLOWLIST_UNVERIFIED, AUTH_SENDER_DENYLISTED,
DNS_TIMEOUT, DNS_LOOKUP_LIMIT, __AUTH_RESULTS.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import dkim
import dkim.util
import spf

from filterd.actions.headers import HEADER_BUILDERS, REMOVAL_RULES
from filterd.dns import NODATA, NXDOMAIN, OK, DnsAnswer, registered_domain, report_problems
from filterd.message import MessageView
from filterd.pipeline import Phase, ScanContext, check
from filterd.policy import Symbol, Verdict

log = logging.getLogger("filterd.auth")

# dkimpy logs every failed signature at ERROR through the logger it is given; a forged
# signature is an ordinary event here, reported as a symbol, so keep its chatter out of the log.
_DKIMPY_LOG = logging.getLogger("filterd.auth.dkimpy")
_DKIMPY_LOG.propagate = False
_DKIMPY_LOG.addHandler(logging.NullHandler())

AUTH_SYMBOL = "__AUTH_RESULTS"
SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


@dataclass(frozen=True, slots=True)
class DkimResult:
    result: str          # pass, fail, permerror, temperror (RFC 8601 values)
    domain: str
    selector: str
    b: str               # first characters of b=, to tell signatures apart (RFC 6008)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DmarcResult:
    result: str          # pass, fail, none (no record), temperror, permerror
    domain: str          # the From domain
    policy: str = ""     # the policy that applies: none, quarantine, reject
    record_domain: str = ""
    pct: int = 100


@dataclass(frozen=True, slots=True)
class AuthResults:
    spf: str = "none"
    spf_domain: str = ""            # domain whose policy SPF evaluated
    mailfrom: str = ""              # envelope sender as checked (postmaster@helo for <>)
    helo: str = ""
    dkim: tuple[DkimResult, ...] = ()
    dmarc: DmarcResult | None = None
    arc: str = "none"

    def aligned_dkim(self, domain: str, strict: bool = False) -> bool:
        return any(r.result == "pass" and aligned(r.domain, domain, strict) for r in self.dkim)

    def ar_methods(self) -> tuple[str, ...]:
        """RFC 8601 resinfo strings, one per method result."""
        out = []
        props = f" smtp.mailfrom={self.mailfrom}" if self.mailfrom else ""
        if self.helo:
            props += f" smtp.helo={_ar_value(self.helo)}"
        out.append(f"spf={self.spf}{props}")
        if not self.dkim:
            out.append("dkim=none")
        for r in self.dkim:
            reason = f' reason="{_ar_comment(r.reason)}"' if r.reason and r.result != "pass" else ""
            out.append(f"dkim={r.result}{reason} header.d={r.domain} header.s="
                       f"{_ar_value(r.selector)} header.b={_ar_value(r.b)}")
        if self.dmarc is not None:
            policy = f" (p={self.dmarc.policy})" if self.dmarc.policy else ""
            out.append(f"dmarc={self.dmarc.result}{policy} header.from={self.dmarc.domain}")
        out.append(f"arc={self.arc}")
        return tuple(out)


def _ar_value(text: str) -> str:
    return re.sub(r"[^\x21-\x7e]|[;()\"\\]", "", text)[:200] or "unknown"


def _ar_comment(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]|[\"\\]", "", text)[:100]


def org_domain(domain: str) -> str:
    return registered_domain(domain) or domain.lower().strip(".")


def aligned(a: str, b: str, strict: bool = False) -> bool:
    """DMARC identifier alignment (RFC 7489 3.1): equal, or same organisational domain."""
    a, b = a.lower().strip("."), b.lower().strip(".")
    if not a or not b:
        return False
    return a == b if strict else org_domain(a) == org_domain(b)


# ---- SPF through our resolver ---------------------------------------------------------------

_tls = threading.local()
_original_dnslookup = spf.DNSLookup


def _spf_dnslookup(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list:
    """pyspf's DNS hook: answer from the resolver bound to this thread, never the system's."""
    lookup: Callable[[str, str], DnsAnswer] | None = getattr(_tls, "lookup", None)
    if lookup is None:
        raise spf.TempError("DNS: no filterd resolver bound to this SPF evaluation")
    answer = lookup(name, qtype)
    if answer.status in (NXDOMAIN, NODATA, "invalid"):
        return []
    if answer.status != OK:
        raise spf.TempError(f"DNS {answer.status} for {name} {qtype}")
    return [((name, qtype), r) for r in answer.records]


spf.DNSLookup = _spf_dnslookup


def _bound_lookup(ctx: ScanContext, loop: asyncio.AbstractEventLoop) -> Callable[[str, str], DnsAnswer]:
    def lookup(name: str, qtype: str) -> DnsAnswer:
        future = asyncio.run_coroutine_threadsafe(ctx.dns.query(name, qtype, ctx=ctx), loop)
        # the resolver bounds each query itself; this is only a backstop
        return future.result(timeout=max(ctx.deadline - loop.time(), 0.1) + 1.0)
    return lookup


def _run_spf(ip: str, sender: str, helo: str, lookup: Callable[[str, str], DnsAnswer],
             timeout: float) -> tuple[str, str]:
    _tls.lookup = lookup
    try:
        q = spf.query(i=ip, s=sender, h=helo, timeout=timeout, querytime=timeout)
        result, _code, explanation = q.check()
        return str(result), str(explanation)
    except Exception as exc:  # pyspf raises on some malformed inputs; never crash the scan
        return "permerror", f"{type(exc).__name__}: {exc}"
    finally:
        _tls.lookup = None


async def check_spf(msg: MessageView, ctx: ScanContext) -> tuple[str, str, str, str]:
    """(result, domain evaluated, smtp.mailfrom, helo)."""
    relay = msg.last_external_relay
    helo = (relay.helo or msg.envelope.client_helo or "").strip("[]")
    sender = msg.envelope.mail_from.strip("<>")
    if not relay.ip:
        return "none", "", sender, helo
    mailfrom = sender if "@" in sender else (f"postmaster@{helo}" if helo else "")
    domain = mailfrom.rpartition("@")[2] if mailfrom else ""
    if not mailfrom:
        return "none", "", "", helo
    loop = asyncio.get_running_loop()
    timeout = max(min(ctx.remaining() - 0.3, 20.0), 0.1)
    result, _ = await loop.run_in_executor(None, _run_spf, relay.ip, mailfrom, helo,
                                           _bound_lookup(ctx, loop), timeout)
    if result not in SPF_RESULTS:
        result = "permerror"
    return result, domain, mailfrom, helo


# ---- DKIM and ARC ---------------------------------------------------------------------------

def _tags(value: str) -> dict[bytes, bytes]:
    try:
        raw = re.sub(r"\s+", "", value).encode("ascii", "surrogateescape")
        return dkim.util.parse_tag_value(raw)
    except Exception:
        return {}


async def _fetch_keys(ctx: ScanContext, pairs: set[tuple[str, str]]) -> dict[bytes, DnsAnswer]:
    """Fetch selector._domainkey.domain TXT for each (selector, domain) through our resolver."""
    names = sorted({f"{s}._domainkey.{d}".lower().strip(".") for s, d in pairs if s and d})
    answers = await asyncio.gather(*(ctx.dns.query(n, "TXT", ctx=ctx) for n in names))
    return {(n + ".").encode(): a for n, a in zip(names, answers)}


def _dnsfunc(keys: dict[bytes, DnsAnswer]) -> Callable[..., bytes | None]:
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        key = name.lower() if name.endswith(b".") else name.lower() + b"."
        answer = keys.get(key)
        if answer is None or not answer.ok:
            return None
        texts = [b"".join(r) for r in answer.records]
        dkim_texts = [t for t in texts if t.lstrip().lower().startswith(b"v=dkim1")] or texts
        return dkim_texts[0] if dkim_texts else None
    return dnsfunc


def _verify_dkim(raw: bytes, count: int, keys: dict[bytes, DnsAnswer], sigs: list[dict],
                 minkey: int) -> list[DkimResult]:
    out = []
    dnsfunc = _dnsfunc(keys)
    for idx in range(count):
        tags = sigs[idx]
        domain = tags.get(b"d", b"").decode("ascii", "replace").lower()
        selector = tags.get(b"s", b"").decode("ascii", "replace")
        b = tags.get(b"b", b"").decode("ascii", "replace")[:8]
        key = f"{selector}._domainkey.{domain}.".lower().encode()
        answer = keys.get(key)
        if answer is not None and answer.status not in (OK, NXDOMAIN, NODATA):
            out.append(DkimResult("temperror", domain, selector, b, f"key lookup {answer.status}"))
            continue
        if answer is None or not answer.ok:
            out.append(DkimResult("permerror", domain, selector, b, "no key for selector"))
            continue
        try:
            d = dkim.DKIM(raw, logger=_DKIMPY_LOG, minkey=minkey)
            ok = d.verify(idx=idx, dnsfunc=dnsfunc)
            out.append(DkimResult("pass" if ok else "fail", domain, selector, b,
                                  "" if ok else "signature did not verify"))
        except dkim.KeyFormatError as exc:
            out.append(DkimResult("permerror", domain, selector, b, f"bad key: {exc}"))
        except dkim.DKIMException as exc:
            out.append(DkimResult("fail", domain, selector, b, str(exc)))
        except Exception as exc:  # dkimpy on hostile input: a failed signature, not a crash
            out.append(DkimResult("permerror", domain, selector, b, type(exc).__name__))
    return out


async def check_dkim(msg: MessageView, ctx: ScanContext, max_signatures: int,
                     minkey: int) -> tuple[DkimResult, ...]:
    headers = msg.header_raw("DKIM-Signature")[:max_signatures]
    if not headers:
        return ()
    sigs = [_tags(h) for h in headers]
    pairs = {(t.get(b"s", b"").decode("ascii", "replace"), t.get(b"d", b"").decode("ascii", "replace"))
             for t in sigs}
    keys = await _fetch_keys(ctx, pairs)
    loop = asyncio.get_running_loop()
    return tuple(await loop.run_in_executor(None, _verify_dkim, msg.raw, len(headers), keys,
                                            sigs, minkey))


def _verify_arc(raw: bytes, keys: dict[bytes, DnsAnswer], minkey: int) -> str:
    try:
        cv, _results, _reason = dkim.arc_verify(raw, logger=_DKIMPY_LOG, dnsfunc=_dnsfunc(keys),
                                               minkey=minkey)
    except Exception:
        return "fail"
    return cv.decode() if isinstance(cv, bytes) else str(cv)


async def check_arc(msg: MessageView, ctx: ScanContext, minkey: int) -> str:
    seals = msg.header_raw("ARC-Seal")
    if not seals:
        return "none"
    pairs = set()
    for h in seals + msg.header_raw("ARC-Message-Signature"):
        t = _tags(h)
        pairs.add((t.get(b"s", b"").decode("ascii", "replace"),
                   t.get(b"d", b"").decode("ascii", "replace")))
    keys = await _fetch_keys(ctx, pairs)
    if any(a.status not in (OK, NXDOMAIN, NODATA) for a in keys.values()):
        return "temperror"
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(None, _verify_arc, msg.raw, keys, minkey)
    return result if result in ("pass", "fail", "none") else "fail"


# ---- DMARC ----------------------------------------------------------------------------------

def parse_dmarc(text: str) -> dict[str, str] | None:
    """Tags of one DMARC record, or None when it is not a valid DMARC1 record."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = value.strip()
    if tags.get("v") != "DMARC1" or tags.get("p", "").lower() not in ("none", "quarantine",
                                                                       "reject"):
        return None
    return tags


async def _dmarc_record(ctx: ScanContext, domain: str) -> tuple[str, list[str]]:
    answer = await ctx.dns.query(f"_dmarc.{domain}", "TXT", ctx=ctx)
    if answer.status in (NXDOMAIN, NODATA, "invalid"):
        return "none", []
    if not answer.ok:
        return "temperror", []
    return "ok", [t for t in answer.texts() if t.lstrip().upper().startswith("V=DMARC1")]


async def check_dmarc(msg: MessageView, ctx: ScanContext, spf_result: str, spf_domain: str,
                      dkim_results: Sequence[DkimResult]) -> DmarcResult | None:
    from_domain = msg.from_domain.strip(".")
    if not from_domain or "." not in from_domain:
        return None
    status, records = await _dmarc_record(ctx, from_domain)
    record_domain = from_domain
    org = org_domain(from_domain)
    if status == "none" or (status == "ok" and not records):
        if org != from_domain:
            status, records = await _dmarc_record(ctx, org)
            record_domain = org
    if status == "temperror":
        return DmarcResult("temperror", from_domain, record_domain=record_domain)
    if not records:
        return DmarcResult("none", from_domain)
    if len(records) > 1:
        return DmarcResult("permerror", from_domain, record_domain=record_domain)
    tags = parse_dmarc(records[0])
    if tags is None:
        return DmarcResult("permerror", from_domain, record_domain=record_domain)
    policy = tags["p"].lower()
    if record_domain != from_domain and tags.get("sp", "").lower() in ("none", "quarantine",
                                                                      "reject"):
        policy = tags["sp"].lower()
    try:
        pct = max(0, min(100, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    strict_spf = tags.get("aspf", "r").lower() == "s"
    strict_dkim = tags.get("adkim", "r").lower() == "s"
    spf_ok = spf_result == "pass" and aligned(spf_domain, from_domain, strict_spf)
    dkim_ok = any(r.result == "pass" and aligned(r.domain, from_domain, strict_dkim)
                  for r in dkim_results)
    result = "pass" if (spf_ok or dkim_ok) else "fail"
    return DmarcResult(result, from_domain, policy, record_domain, pct)


# ---- the checks -----------------------------------------------------------------------------

def _skip_originating(ctx: ScanContext) -> bool:
    if not ctx.notes.get("originating"):
        return False
    policy = getattr(ctx.ruleset, "policy", None)
    return not getattr(policy, "spam_checks_for_originating", False)


def results_to_symbols(res: AuthResults, from_domain: str) -> list[Symbol]:
    out = [Symbol(f"SPF_{res.spf.upper()}", (res.mailfrom or res.helo or "-",))]
    passed = [r for r in res.dkim if r.result == "pass"]
    failed = [r for r in res.dkim if r.result in ("fail", "permerror")]
    temp = [r for r in res.dkim if r.result == "temperror"]
    if not res.dkim:
        out.append(Symbol("DKIM_NONE"))
    if passed:
        out.append(Symbol("DKIM_VALID", tuple(dict.fromkeys(r.domain for r in passed))))
        au = [r.domain for r in passed if aligned(r.domain, from_domain)]
        if au:
            out.append(Symbol("DKIM_VALID_AU", tuple(dict.fromkeys(au))))
    if failed:
        out.append(Symbol("DKIM_INVALID", tuple(dict.fromkeys(
            f"{r.domain}:{r.reason}" if r.reason else r.domain for r in failed))))
    if temp:
        out.append(Symbol("DKIM_TEMPERROR", tuple(dict.fromkeys(r.domain for r in temp))))
    d = res.dmarc
    if d is not None:
        if d.result == "pass":
            out.append(Symbol("DMARC_PASS", (d.domain,)))
        elif d.result == "fail":
            out.append(Symbol(f"DMARC_{d.policy.upper()}", (d.domain, f"pct={d.pct}")))
        elif d.result == "none":
            out.append(Symbol("DMARC_NA", (d.domain,)))
        else:
            out.append(Symbol(f"DMARC_{d.result.upper()}", (d.domain,)))
    out.append(Symbol(f"ARC_{res.arc.upper()}"))
    out.append(Symbol(AUTH_SYMBOL, res.ar_methods()))
    return out


@check("auth", phase=Phase.MAIN, network=True,
       symbols=("SPF_PASS", "SPF_FAIL", "SPF_SOFTFAIL", "SPF_NEUTRAL", "SPF_NONE",
                "SPF_TEMPERROR", "SPF_PERMERROR", "DKIM_VALID", "DKIM_VALID_AU", "DKIM_INVALID",
                "DKIM_TEMPERROR", "DKIM_NONE", "DMARC_PASS", "DMARC_REJECT", "DMARC_QUARANTINE",
                "DMARC_NONE", "DMARC_NA", "DMARC_TEMPERROR", "DMARC_PERMERROR", "ARC_PASS",
                "ARC_FAIL", "ARC_NONE", "ARC_TEMPERROR", "DNS_TIMEOUT", "DNS_LOOKUP_LIMIT",
                AUTH_SYMBOL))
async def auth(msg: MessageView, ctx: ScanContext, *, max_signatures: int = 10,
               arc: bool = True) -> list[Symbol]:
    """SPF, DKIM and ARC concurrently, then DMARC from their results."""
    if ctx.dns is None or _skip_originating(ctx):
        return []
    minkey = ctx.settings.dkim.verify_min_key_bits
    spf_task = check_spf(msg, ctx)
    dkim_task = check_dkim(msg, ctx, max_signatures, minkey)
    arc_task = check_arc(msg, ctx, minkey) if arc else _const("none")
    (spf_result, spf_domain, mailfrom, helo), dkim_results, arc_result = await asyncio.gather(
        spf_task, dkim_task, arc_task)
    dmarc_result = await check_dmarc(msg, ctx, spf_result, spf_domain, dkim_results)
    res = AuthResults(spf_result, spf_domain, mailfrom, helo, dkim_results, dmarc_result,
                      arc_result)
    ctx.notes["auth"] = res
    return results_to_symbols(res, msg.from_domain) + report_problems(ctx, "auth")


async def _const(value: str) -> str:
    return value


def _entry_matches(entry: str, address: str) -> bool:
    """user@example.com exactly; example.com / @example.com the domain; .example.com subdomains too."""
    entry, address = entry.strip().lower(), address.lower()
    if not address or "@" not in address:
        return False
    domain = address.rpartition("@")[2]
    if "@" in entry and not entry.startswith("@"):
        return entry == address
    entry = entry.lstrip("@")
    if entry.startswith("."):
        return domain == entry[1:] or domain.endswith(entry)
    return domain == entry


@check("auth.sender_lists", phase=Phase.CLASSIFY, network=False,
       symbols=("AUTH_SENDER_ALLOWLISTED", "AUTH_SENDER_ALLOWLIST_UNVERIFIED",
                "AUTH_SENDER_DENYLISTED"))
def sender_lists(msg: MessageView, ctx: ScanContext, *, allow: Sequence[str] = (),
                 deny: Sequence[str] = ()) -> list[Symbol]:
    """Allow-listed senders count only when authenticated; deny-listed ones always."""
    header_from = msg.from_address
    env_from = msg.envelope.mail_from.strip("<>").lower()
    out: list[Symbol] = []
    denied = [a for a in dict.fromkeys((header_from, env_from))
              if a and any(_entry_matches(e, a) for e in deny)]
    if denied:
        out.append(Symbol("AUTH_SENDER_DENYLISTED", tuple(denied)))
    res: AuthResults | None = ctx.notes.get("auth")
    candidates = []
    if header_from and any(_entry_matches(e, header_from) for e in allow):
        ok = res is not None and (
            res.aligned_dkim(msg.from_domain)
            or (res.spf == "pass" and aligned(res.spf_domain, msg.from_domain)))
        candidates.append((header_from, ok))
    if env_from and env_from != header_from and any(_entry_matches(e, env_from) for e in allow):
        ok = res is not None and res.spf == "pass" and res.mailfrom.lower() == env_from
        candidates.append((env_from, ok))
    verified = [a for a, ok in candidates if ok]
    if verified:
        out.append(Symbol("AUTH_SENDER_ALLOWLISTED", tuple(verified)))
    elif candidates:
        out.append(Symbol("AUTH_SENDER_ALLOWLIST_UNVERIFIED", tuple(a for a, _ in candidates)))
    return out


# ---- Authentication-Results -----------------------------------------------------------------

def authserv_id(settings: Any) -> str:
    return settings.dkim.authserv_id or settings.hostname


def authentication_results_header(view: MessageView, verdict: Verdict,
                                  settings: Any) -> list[tuple[str, str]]:
    """One Authentication-Results header (RFC 8601) when the auth check ran."""
    for sym in verdict.symbols:
        if sym.name == AUTH_SYMBOL:
            methods = "; ".join(sym.options) if sym.options else "none"
            return [("Authentication-Results", f"{authserv_id(settings)}; {methods}")]
    return []


_AR_ID = re.compile(r"^\s*(?:\([^)]*\)\s*)*([^\s;()]+)")


def forged_authentication_results(name: str, value: str, settings: Any) -> bool:
    """An incoming Authentication-Results claiming to be ours (RFC 8601 section 5)."""
    if name.lower() != "authentication-results":
        return False
    m = _AR_ID.match(value.replace("\r", " ").replace("\n", " "))
    return bool(m) and m.group(1).lower() == authserv_id(settings).lower()


if authentication_results_header not in HEADER_BUILDERS:
    HEADER_BUILDERS.append(authentication_results_header)
if forged_authentication_results not in REMOVAL_RULES:
    REMOVAL_RULES.append(forged_authentication_results)

# DKIM signing of outbound mail registers its final-header hook on import.
from filterd.actions import dkim_sign as _dkim_sign  # noqa: E402,F401
