"""SPF, DKIM, DMARC, ARC, Authentication-Results and authenticated allow lists
(filterd.checks.auth) against the harness's authoritative DNS server on loopback; and a whole
Scanner run with a dead or slow DNS server."""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
import time

import dkim
import pytest
import spf

from filterd import config
from filterd.actions.headers import build_edits
from filterd.checks.auth import (AuthResults, DkimResult, aligned, auth,
                                 authentication_results_header, forged_authentication_results,
                                 parse_dmarc, sender_lists)
from filterd.dns import Resolver, reset_health
from filterd.message import Envelope, parse
from filterd.pipeline import ScanContext
from filterd.policy import Policy, decide
from harness.dns import DNSServer

CLIENT = "192.0.2.10"
OTHER = "192.0.2.99"


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


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, str]:
    key = subprocess.run(["openssl", "genrsa", "-traditional", "2048"], check=True,
                         capture_output=True).stdout
    der = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=key,
                         check=True, capture_output=True).stdout
    return key, base64.b64encode(der).decode()


def settings(**overrides):
    values = {"daemon.hostname": "mx.test", "dkim.authserv_id": "mx.test"}
    values.update(overrides)
    return config.defaults().with_overrides(values)


MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: bob@rcpt.test\r\nSubject: quarterly report\r\n"
           b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <1@sender.test>\r\n\r\n"
           b"Hello Bob,\r\nthe numbers are attached.\r\n")


def signed(message: bytes, key: bytes, domain: bytes = b"sender.test",
           selector: bytes = b"sel1") -> bytes:
    sig = dkim.sign(message, selector, domain, key, include_headers=[b"From", b"To", b"Subject",
                                                                       b"Date"])
    return sig + message


async def run_auth(zone: DNSServer, raw: bytes, *, ip: str = CLIENT,
                   mail_from: str = "alice@sender.test", deadline: float = 5.0):
    r = Resolver([zone.host], port=zone.port, timeout=1.0)
    ctx = ScanContext(settings=settings(), ruleset=None, dns=r)
    ctx.deadline = asyncio.get_running_loop().time() + deadline
    view = parse(raw, Envelope(mail_from=mail_from, client_ip=ip, client_helo="mx.sender.test"))
    syms = await auth(view, ctx)
    return view, ctx, syms


def names(symbols) -> set[str]:
    return {s.name for s in symbols}


def ar_header(symbols) -> str:
    verdict = decide(symbols, {}, Policy())
    [(name, value)] = authentication_results_header(None, verdict, settings())
    assert name == "Authentication-Results"
    return value


# ---- SPF ---------------------------------------------------------------------------------

def test_spf_pass_fail_softfail_through_our_resolver(zone):
    zone.add("sender.test", "TXT", f"v=spf1 ip4:{CLIENT} include:_spf.sender.test -all")
    zone.add("_spf.sender.test", "TXT", "v=spf1 ip4:198.51.100.0/24 ~all")
    zone.add("soft.test", "TXT", "v=spf1 ~all")
    _, _, syms = asyncio.run(run_auth(zone, MESSAGE))
    assert "SPF_PASS" in names(syms)
    assert zone.queried("sender.test", "TXT")              # pyspf asked *our* server
    _, _, syms = asyncio.run(run_auth(zone, MESSAGE, ip=OTHER))
    assert "SPF_FAIL" in names(syms)
    assert zone.queried("_spf.sender.test", "TXT")
    _, _, syms = asyncio.run(run_auth(zone, MESSAGE, mail_from="x@soft.test"))
    assert "SPF_SOFTFAIL" in names(syms)
    _, _, syms = asyncio.run(run_auth(zone, MESSAGE, mail_from="x@nospf.test"))
    assert "SPF_NONE" in names(syms)
    ar = ar_header(syms)
    assert ar.startswith("mx.test; spf=none smtp.mailfrom=x@nospf.test")


def test_spf_null_sender_uses_helo(zone):
    zone.add("mx.sender.test", "TXT", f"v=spf1 ip4:{CLIENT} -all")
    _, _, syms = asyncio.run(run_auth(zone, MESSAGE, mail_from=""))
    spf_sym = next(s for s in syms if s.name.startswith("SPF_"))
    assert spf_sym.name == "SPF_PASS" and spf_sym.options == ("postmaster@mx.sender.test",)


def test_spf_without_bound_resolver_never_uses_the_system_resolver():
    assert spf.DNSLookup.__module__ == "filterd.checks.auth"
    with pytest.raises(spf.TempError):
        spf.DNSLookup("example.com", "TXT")


def test_spf_temperror_when_dns_is_dead(zone):
    with zone.dead():
        _, ctx, syms = asyncio.run(run_auth(zone, MESSAGE, deadline=3.0))
    assert {"SPF_TEMPERROR", "DNS_TIMEOUT"} <= names(syms)


# ---- DKIM --------------------------------------------------------------------------------

def test_dkim_valid_aligned_and_authentication_results(zone, rsa_key):
    key, public = rsa_key
    zone.add("sel1._domainkey.sender.test", "TXT", f"v=DKIM1; k=rsa; p={public}")
    raw = signed(MESSAGE, key)
    _, ctx, syms = asyncio.run(run_auth(zone, raw))
    assert {"DKIM_VALID", "DKIM_VALID_AU"} <= names(syms) and "DKIM_INVALID" not in names(syms)
    res: AuthResults = ctx.notes["auth"]
    assert res.dkim[0].result == "pass" and res.dkim[0].domain == "sender.test"
    ar = ar_header(syms)
    assert "dkim=pass header.d=sender.test header.s=sel1 header.b=" in ar


def test_dkim_tampered_body_fails(zone, rsa_key):
    key, public = rsa_key
    zone.add("sel1._domainkey.sender.test", "TXT", f"v=DKIM1; k=rsa; p={public}")
    raw = signed(MESSAGE, key).replace(b"numbers are", b"numbers were")
    _, _, syms = asyncio.run(run_auth(zone, raw))
    assert "DKIM_INVALID" in names(syms) and "DKIM_VALID" not in names(syms)
    assert "dkim=fail" in ar_header(syms)


def test_dkim_missing_key_and_third_party_signature(zone, rsa_key):
    key, public = rsa_key
    zone.add("s2._domainkey.esp.test", "TXT", f"v=DKIM1; k=rsa; p={public}")
    raw = signed(signed(MESSAGE, key, b"esp.test", b"s2"), key, b"sender.test", b"gone")
    _, ctx, syms = asyncio.run(run_auth(zone, raw))
    results = {r.domain: r.result for r in ctx.notes["auth"].dkim}
    assert results == {"sender.test": "permerror", "esp.test": "pass"}
    assert {"DKIM_VALID", "DKIM_INVALID"} <= names(syms)
    assert "DKIM_VALID_AU" not in names(syms)                    # esp.test is not From's domain


def test_dkim_none_and_key_timeout(zone, rsa_key):
    _, _, syms = asyncio.run(run_auth(zone, MESSAGE))
    assert "DKIM_NONE" in names(syms) and "dkim=none" in ar_header(syms)
    key, _ = rsa_key
    with zone.dead("_domainkey.sender.test"):
        _, _, syms = asyncio.run(run_auth(zone, signed(MESSAGE, key), deadline=3.0))
    assert {"DKIM_TEMPERROR", "DNS_TIMEOUT"} <= names(syms)


# ---- DMARC -------------------------------------------------------------------------------

def test_parse_dmarc_and_alignment():
    assert parse_dmarc("v=DMARC1; p=reject; adkim=s")["adkim"] == "s"
    assert parse_dmarc("v=DMARC1; p=bogus") is None
    assert parse_dmarc("v=spf1 -all") is None
    assert aligned("mail.sender.test", "sender.test")
    assert not aligned("mail.sender.test", "sender.test", strict=True)
    assert aligned("a.example.co.uk", "b.example.co.uk")
    assert not aligned("example.co.uk", "other.co.uk")


def test_dmarc_pass_by_spf_and_reject_on_forgery(zone):
    zone.add("sender.test", "TXT", f"v=spf1 ip4:{CLIENT} -all")
    zone.add("_dmarc.sender.test", "TXT", "v=DMARC1; p=reject; rua=mailto:d@sender.test")
    _, _, syms = asyncio.run(run_auth(zone, MESSAGE))
    assert "DMARC_PASS" in names(syms)
    assert "dmarc=pass (p=reject) header.from=sender.test" in ar_header(syms)
    # a forger: envelope of its own domain (SPF passes there), From: sender.test
    zone.add("forger.test", "TXT", f"v=spf1 ip4:{OTHER} -all")
    _, _, syms = asyncio.run(run_auth(zone, MESSAGE, ip=OTHER, mail_from="x@forger.test"))
    assert {"SPF_PASS", "DMARC_REJECT"} <= names(syms)
    scores = {"DMARC_REJECT": 4.0}
    assert decide(syms, scores, Policy()).score == 4.0


def test_dmarc_org_domain_fallback_subdomain_policy(zone):
    zone.add("_dmarc.sender.test", "TXT", "v=DMARC1; p=reject; sp=quarantine")
    raw = MESSAGE.replace(b"alice@sender.test", b"alice@news.sender.test")
    _, ctx, syms = asyncio.run(run_auth(zone, raw, mail_from="x@elsewhere.test"))
    assert "DMARC_QUARANTINE" in names(syms)
    assert ctx.notes["auth"].dmarc.record_domain == "sender.test"
    zone.clear()
    _, _, syms = asyncio.run(run_auth(zone, raw))
    assert "DMARC_NA" in names(syms)


def test_dmarc_dkim_alignment_strict(zone, rsa_key):
    key, public = rsa_key
    zone.add("sel1._domainkey.mail.sender.test", "TXT", f"v=DKIM1; k=rsa; p={public}")
    zone.add("_dmarc.sender.test", "TXT", "v=DMARC1; p=reject; adkim=s")
    raw = signed(MESSAGE, key, b"mail.sender.test")
    _, _, syms = asyncio.run(run_auth(zone, raw, mail_from="x@other.test"))
    assert {"DKIM_VALID", "DKIM_VALID_AU", "DMARC_REJECT"} <= names(syms)
    zone.set("_dmarc.sender.test", "TXT", ["v=DMARC1; p=reject"])    # relaxed
    _, _, syms = asyncio.run(run_auth(zone, raw, mail_from="x@other.test"))
    assert "DMARC_PASS" in names(syms)


# ---- ARC ---------------------------------------------------------------------------------

def test_arc_chain_pass_and_fail(zone, rsa_key):
    key, public = rsa_key
    zone.add("arc._domainkey.relay.test", "TXT", f"v=DKIM1; k=rsa; p={public}")
    base = b"Authentication-Results: relay.test; spf=pass smtp.mailfrom=alice@sender.test\r\n" + MESSAGE
    arc_headers = dkim.arc_sign(base, b"arc", b"relay.test", key, b"relay.test")
    sealed = b"".join(arc_headers) + base
    _, _, syms = asyncio.run(run_auth(zone, sealed))
    assert "ARC_PASS" in names(syms) and "arc=pass" in ar_header(syms)
    _, _, syms = asyncio.run(run_auth(zone, sealed.replace(b"Hello Bob", b"Hello Eve")))
    assert "ARC_FAIL" in names(syms)
    _, _, syms = asyncio.run(run_auth(zone, MESSAGE))
    assert "ARC_NONE" in names(syms)


# ---- header removal and building ---------------------------------------------------------

def test_forged_authentication_results_with_our_id_removed():
    s = settings()
    assert forged_authentication_results("Authentication-Results", "mx.test; dkim=pass", s)
    assert forged_authentication_results("authentication-results",
                                         " (forged) MX.TEST 1;\r\n\tspf=pass", s)
    assert not forged_authentication_results("Authentication-Results", "relay.test; spf=pass", s)
    assert not forged_authentication_results("X-Other", "mx.test; dkim=pass", s)
    raw = (b"Authentication-Results: relay.test; spf=pass\r\n"
           b"Authentication-Results: mx.test; dkim=pass header.d=bank.test\r\n" + MESSAGE)
    view = parse(raw)
    verdict = decide([], {}, Policy())
    edits = build_edits(view, verdict, s, subject_tag="")
    assert edits.remove == (("Authentication-Results", 2),)


def test_no_header_when_auth_did_not_run():
    verdict = decide([], {}, Policy())
    assert authentication_results_header(None, verdict, settings()) == []


# ---- allow / deny lists --------------------------------------------------------------------

def _lists_ctx(res: AuthResults | None) -> ScanContext:
    ctx = ScanContext(settings=settings(), ruleset=None)
    if res is not None:
        ctx.notes["auth"] = res
    return ctx


def test_allow_list_needs_authentication():
    view = parse(MESSAGE, Envelope(mail_from="alice@sender.test", client_ip=CLIENT))
    allow = ["sender.test"]
    dkim_ok = AuthResults(spf="fail", dkim=(DkimResult("pass", "sender.test", "s", "b"),))
    assert names(sender_lists(view, _lists_ctx(dkim_ok), allow=allow)) == {"AUTH_SENDER_ALLOWLISTED"}
    spf_ok = AuthResults(spf="pass", spf_domain="sender.test", mailfrom="alice@sender.test")
    assert names(sender_lists(view, _lists_ctx(spf_ok), allow=allow)) == {"AUTH_SENDER_ALLOWLISTED"}
    forged = AuthResults(spf="fail", dkim=(DkimResult("pass", "evil.test", "s", "b"),))
    assert names(sender_lists(view, _lists_ctx(forged), allow=allow)) == {
        "AUTH_SENDER_ALLOWLIST_UNVERIFIED"}
    assert names(sender_lists(view, _lists_ctx(None), allow=["alice@sender.test"])) == {
        "AUTH_SENDER_ALLOWLIST_UNVERIFIED"}
    assert sender_lists(view, _lists_ctx(spf_ok), allow=["bob@sender.test", "other.test"]) == []


def test_deny_list_and_subdomain_entries():
    view = parse(MESSAGE.replace(b"alice@sender.test", b"x@promo.spammer.test"),
                 Envelope(mail_from="y@spammer.test"))
    syms = sender_lists(view, _lists_ctx(None), deny=[".spammer.test"])
    assert [(s.name, s.options) for s in syms] == [
        ("AUTH_SENDER_DENYLISTED", ("x@promo.spammer.test", "y@spammer.test"))]
    assert sender_lists(view, _lists_ctx(None), deny=["spammer.test"])[0].options == (
        "y@spammer.test",)


# ---- the whole scan with a dead or slow resolver -----------------------------------------

RULE_FILES = ("actions.toml", "core.toml", "scores.toml", "auth.toml")


@pytest.fixture
def scan_rules(tmp_path):
    d = tmp_path / "rules"
    d.mkdir()
    for name in RULE_FILES:
        shutil.copy(config.PROJECT_RULES / name, d / name)
    (d / "dnsbl-test.toml").write_text(
        '[check.dnsbl_test]\nfunction = "dnsbl.ip"\ntimeout = 8.0\n'
        '[check.dnsbl_test.args]\nzone = "zen.test"\n'
        'blocked_codes = ["127.255.255.254", "127.255.255.255"]\n'
        '[check.dnsbl_test.args.codes]\n"127.0.0.2" = "RCVD_IN_TEST"\n'
        '[check.uribl_test]\nfunction = "dnsbl.domain"\n'
        '[check.uribl_test.args]\nzone = "dbl.test"\n'
        '[check.uribl_test.args.codes]\n"127.0.1.2" = "DBL_TEST"\n'
        '[symbol.RCVD_IN_TEST]\ndescription = "test list"\n'
        '[symbol.DBL_TEST]\ndescription = "test domain list"\n'
        '[scores]\nRCVD_IN_TEST = 12.0\nDBL_TEST = 3.0\n'
        '[forced]\nRCVD_IN_TEST = "reject"\n')
    return d


def make_scanner(tmp_path, zone, rules, **overrides):
    from filterd.ruleset import load
    from filterd.service import Scanner
    values = {"daemon.state_dir": str(tmp_path / "state"), "dns.nameservers": [zone.host],
              "dns.port": zone.port, "dns.timeout": 1.0, "scan.deadline": 3.0}
    values.update(overrides)
    s = settings(**values)
    scanner = Scanner(s, load(rules))
    scanner.services = {"dns": Resolver.from_settings(s)}
    return scanner


@pytest.mark.parametrize("fault", ["dead", "slow"])
def test_dead_or_slow_dns_still_gives_a_verdict_in_time(tmp_path, zone, scan_rules, rsa_key,
                                                        fault, caplog):
    key, public = rsa_key
    zone.listed("zen.test", CLIENT)
    zone.add("sel1._domainkey.sender.test", "TXT", f"v=DKIM1; k=rsa; p={public}")
    scanner = make_scanner(tmp_path, zone, scan_rules)
    raw = signed(MESSAGE, key).replace(b"Hello Bob,", b"Hello Bob, http://www.shop.test/x")
    env = Envelope(mail_from="alice@sender.test", client_ip=CLIENT, client_helo="mx.sender.test")
    switch = zone.dead() if fault == "dead" else zone.slow(10)
    with switch:
        started = time.monotonic()
        outcome = asyncio.run(scanner.scan(raw, env))
        took = time.monotonic() - started
    assert took < 3.0 + 1.0
    v = outcome.verdict
    assert outcome.failure is None and v.action.value == "accept", v.reason
    assert "DNS_TIMEOUT" in v.symbol_names and v.score <= 0
    assert next(s for s in v.symbols if s.name == "DNS_TIMEOUT").score == 0


def test_listed_client_gets_symbol_and_forced_action(tmp_path, zone, scan_rules, rsa_key):
    key, public = rsa_key
    zone.listed("zen.test", CLIENT)
    zone.add("sel1._domainkey.sender.test", "TXT", f"v=DKIM1; k=rsa; p={public}")
    zone.add("sender.test", "TXT", f"v=spf1 ip4:{CLIENT} -all")
    scanner = make_scanner(tmp_path, zone, scan_rules)
    raw = (b"Authentication-Results: mx.test; dkim=pass header.d=bank.test\r\n"
           + signed(MESSAGE, key))
    env = Envelope(mail_from="alice@sender.test", client_ip=CLIENT, client_helo="mx.sender.test")
    outcome = asyncio.run(scanner.scan(raw, env))
    v = outcome.verdict
    assert {"RCVD_IN_TEST", "DKIM_VALID_AU", "SPF_PASS"} <= set(v.symbol_names)
    assert v.action.value == "reject" and v.reason.startswith("RCVD_IN_TEST")
    ar = [val for n, val in outcome.edits.add if n == "Authentication-Results"]
    assert len(ar) == 1 and "spf=pass" in ar[0] and "dkim=pass header.d=sender.test" in ar[0]
    assert outcome.edits.remove == (("Authentication-Results", 1),)
    # all of it went to the loopback server: SPF, DKIM key, DMARC, the list
    for name, rtype in (("sender.test", "TXT"), ("sel1._domainkey.sender.test", "TXT"),
                        ("_dmarc.sender.test", "TXT"), ("10.2.0.192.zen.test", "A")):
        assert zone.queried(name, rtype), name
