"""DKIM signing of outbound mail (filterd.actions.dkim_sign) and `filterd dkim genkey`: keys
made by the CLI, records served by the loopback DNS server, signatures checked with dkimpy."""

from __future__ import annotations

import asyncio
import re

import dkim
import pytest

from filterd import config
from filterd.actions import dkim_sign
from filterd.actions.headers import apply_to_bytes
from filterd.cli.main import main
from filterd.message import Envelope
from filterd.service import Scanner
from harness.dns import DNSServer

MESSAGE = (b"From: Carol <carol@corp.test>\r\nTo: dave@elsewhere.test\r\nSubject: lunch\r\n"
           b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <2@corp.test>\r\n\r\n"
           b"Shall we meet at noon?\r\n")


@pytest.fixture(scope="module")
def dns_server():
    server = DNSServer().start()
    yield server
    server.stop()


def genkey(capsys, keys_dir, domain, selector, *extra) -> tuple[int, str]:
    code = main(["dkim", "genkey", domain, selector, "--keys-dir", str(keys_dir), *extra])
    return code, capsys.readouterr().out


def serve_record(zone: DNSServer, out: str) -> None:
    m = re.search(r"^(\S+)\. 3600 IN TXT \( (.*) \)$", out, re.M)
    assert m, out
    strings = [s.encode() for s in re.findall(r'"([^"]*)"', m.group(2))]
    assert all(len(s) <= 255 for s in strings)
    zone.add(m.group(1), "TXT", strings)


def verify_with(zone: DNSServer, message: bytes) -> bool:
    resolver = zone.resolver()

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), "TXT")
        except Exception:
            return None
        return b"".join(answer[0].strings)

    return dkim.verify(message, dnsfunc=dnsfunc)


def scanner_for(tmp_path, core_rules, keys_dir, **overrides) -> Scanner:
    from filterd.ruleset import load
    values = {"daemon.state_dir": str(tmp_path / "state"), "daemon.hostname": "mx.test",
              "dkim.keys_dir": str(keys_dir)}
    values.update(overrides)
    settings = config.defaults().with_overrides(values)
    scanner = Scanner(settings, load(core_rules), services={})
    scanner.services["dkim_signer"] = dkim_sign._factory(settings)
    return scanner


def send(scanner: Scanner, raw: bytes, envelope: Envelope) -> bytes | None:
    async def go():
        outcome = await scanner.scan(raw, envelope, skip_network=True)
        return await scanner.dispose(outcome, "smtp")
    disposition = asyncio.run(go())
    assert disposition.action.value == "accept"
    return apply_to_bytes(raw, disposition.edits)


OUTBOUND = Envelope(mail_from="carol@corp.test", rcpt_tos=("dave@elsewhere.test",),
                    client_ip="10.0.0.5", listener="smtp")
INBOUND = Envelope(mail_from="carol@corp.test", client_ip="192.0.2.10", listener="smtp")


@pytest.mark.parametrize("key_type", ["rsa", "ed25519"])
def test_genkey_sign_outbound_verify(tmp_path, capsys, core_rules, dns_server, key_type):
    dns_server.clear()
    keys = tmp_path / "keys"
    code, out = genkey(capsys, keys, "corp.test", "s1", "--type", key_type)
    assert code == 0
    key_file = keys / "corp.test" / "s1.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert f"k={key_type};" in out
    serve_record(dns_server, out)
    scanner = scanner_for(tmp_path, core_rules, keys)
    delivered = send(scanner, MESSAGE, OUTBOUND)
    assert delivered.startswith(b"DKIM-Signature:")
    algo = b"ed25519-sha256" if key_type == "ed25519" else b"rsa-sha256"
    assert b"a=" + algo in delivered and b"d=corp.test" in delivered
    assert verify_with(dns_server, delivered)
    assert not verify_with(dns_server, delivered.replace(b"noon", b"one"))
    # signing is the last step: the signature covers our own edits (X-Virus-Scanned is above,
    # the Subject we would tag is signed); adding a second From afterwards breaks it (oversigned)
    assert not verify_with(dns_server, delivered.replace(b"\r\n\r\n", b"\r\nFrom: x@evil.test\r\n\r\n", 1))


def test_inbound_and_unknown_domains_are_not_signed(tmp_path, capsys, core_rules):
    keys = tmp_path / "keys"
    assert genkey(capsys, keys, "corp.test", "s1", "--type", "ed25519")[0] == 0
    scanner = scanner_for(tmp_path, core_rules, keys)
    assert b"DKIM-Signature" not in send(scanner, MESSAGE, INBOUND)
    other = MESSAGE.replace(b"carol@corp.test", b"carol@unknown.test")
    assert b"DKIM-Signature" not in send(scanner, other, OUTBOUND)
    authed = Envelope(mail_from="carol@corp.test", client_ip="192.0.2.10", auth_user="carol")
    assert send(scanner, MESSAGE, authed).startswith(b"DKIM-Signature:")
    # (the hook signs with the signer of the last Scanner started: one daemon per process)
    off = scanner_for(tmp_path, core_rules, keys, **{"dkim.sign": False})
    assert b"DKIM-Signature" not in send(off, MESSAGE, OUTBOUND)


def test_subdomain_signed_with_parent_key_and_dual_selectors(tmp_path, capsys, core_rules,
                                                             dns_server):
    dns_server.clear()
    keys = tmp_path / "keys"
    for sel, kind in (("ed", "ed25519"), ("rsa", "rsa")):
        code, out = genkey(capsys, keys, "corp.test", sel, "--type", kind)
        assert code == 0
        serve_record(dns_server, out)
    sub = MESSAGE.replace(b"carol@corp.test", b"carol@mail.corp.test")
    # two keys and no selector entry: ambiguous, so not signed (and logged)
    ambiguous = scanner_for(tmp_path, core_rules, keys)
    assert b"DKIM-Signature" not in send(ambiguous, sub, OUTBOUND)
    scanner = scanner_for(tmp_path, core_rules, keys, **{"dkim.selectors": ["corp.test=ed,rsa"]})
    delivered = send(scanner, sub, OUTBOUND)
    assert delivered.count(b"DKIM-Signature:") == 2
    assert b"d=corp.test" in delivered
    d = dkim.DKIM(delivered)
    resolver = dns_server.resolver()

    def dnsfunc(name, timeout=5):
        return b"".join(resolver.resolve(name.decode(), "TXT")[0].strings)

    assert d.verify(idx=0, dnsfunc=dnsfunc) and d.verify(idx=1, dnsfunc=dnsfunc)


def test_broken_key_leaves_mail_unsigned_not_lost(tmp_path, core_rules, caplog):
    keys = tmp_path / "keys"
    (keys / "corp.test").mkdir(parents=True)
    (keys / "corp.test" / "s1.key").write_text("not a key\n")
    scanner = scanner_for(tmp_path, core_rules, keys)
    with caplog.at_level("ERROR", logger="filterd.dkim"):
        delivered = send(scanner, MESSAGE, OUTBOUND)
    assert b"DKIM-Signature" not in delivered and delivered.endswith(b"noon?\r\n")
    assert any("leaves unsigned" in r.getMessage() for r in caplog.records)


def test_genkey_refuses_overwrite_and_bad_names(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert genkey(capsys, keys, "corp.test", "s1", "--type", "ed25519")[0] == 0
    before = (keys / "corp.test" / "s1.key").read_bytes()
    assert genkey(capsys, keys, "corp.test", "s1")[0] == 1
    assert (keys / "corp.test" / "s1.key").read_bytes() == before
    assert genkey(capsys, keys, "corp.test", "s1", "--force", "--type", "ed25519")[0] == 0
    assert (keys / "corp.test" / "s1.key").read_bytes() != before
    assert genkey(capsys, keys, "not a domain", "s1")[0] == 2
    assert genkey(capsys, keys, "corp.test", "bad/selector")[0] == 2
    assert genkey(capsys, keys, "corp.test", "s2", "--bits", "512")[0] == 2
    assert (keys / "corp.test" / "s1.txt").read_text().startswith("s1._domainkey.corp.test.")


def test_key_algorithm_detection():
    assert dkim_sign.key_algorithm(b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n") == b"rsa-sha256"
    assert dkim_sign.key_algorithm(b"A" * 43 + b"=\n") == b"ed25519-sha256"
    assert dkim_sign.key_algorithm(b"-----BEGIN PRIVATE KEY-----\n") is None
