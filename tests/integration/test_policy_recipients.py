"""Policy per recipient through a real Postfix and the real `filterd serve`, both modes.

One message (GTUBE, scored 12 by a site override: the quarantine band) to a spam lover
(user2) and a normal user (user): the lover gets it delivered and tagged, the user's copy is
quarantined once with only that recipient in its sidecar, and both are in filterd's log.
A bypass recipient (user3) gets no spam headers. An authenticated submission (Postfix XCLIENT
LOGIN= sets the SASL login that the milter sees as {auth_authen}) selects the shipped
"originating" bank: DKIM-signed with the served key, not spam-tagged.
"""

from __future__ import annotations

import json
import shutil
import smtplib
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from harness import MailRig, Unavailable, filterd_available
from harness.common import private_dir, remove_dir, wait_for
from harness.messages import GTUBE

RECIPIENTS = """
["user2@test.example"]
spam_lover = true
["user3@test.example"]
bypass_spam_checks = true
"""

RULE_FILES = ("actions.toml", "core.toml", "scores.toml", "policy.toml", "antivirus.toml")


def message(n: int, from_addr: str = "alice@sender.test", body: str = GTUBE) -> bytes:
    return (f"From: Alice <{from_addr}>\r\nTo: user@test.example\r\nSubject: offer {n}\r\n"
            f"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <{n}@sender.test>\r\n\r\n"
            f"{body}\r\n").encode()


@pytest.fixture(scope="module")
def policy_dirs() -> Iterator[tuple[Path, Path, Path]]:
    from filterd.config import PROJECT_RULES
    shipped = private_dir("policy-rules")
    for name in RULE_FILES:
        shutil.copy(PROJECT_RULES / name, shipped / name)
    shutil.copytree(PROJECT_RULES / "banks", shipped / "banks")
    site = private_dir("policy-site")
    (site / "local.d").mkdir()
    (site / "local.d" / "scores.toml").write_text("[scores]\nGTUBE = 12.0\n")
    (site / "recipients.toml").write_text(RECIPIENTS)
    keys = private_dir("policy-dkim")
    out = subprocess.run([str(Path(__file__).resolve().parents[2] / ".venv/bin/filterd"),
                          "dkim", "genkey", "test.example", "s1", "--keys-dir", str(keys)],
                         check=True, capture_output=True, text=True).stdout
    (keys / "record").write_text(out)
    yield shipped, site, keys
    for d in (shipped, site, keys):
        remove_dir(d)


def _rig(mode: str, wired: dict[str, Any], dirs: tuple[Path, Path, Path]) -> Iterator[MailRig]:
    ok, why = filterd_available()
    if not ok:
        pytest.skip(why)
    shipped, site, keys = dirs
    overrides = {**wired, "rules.dir": str(shipped), "rules.site_dir": str(site),
                 "policy.recipient_map": "recipients.toml",
                 "policy.local_domains": ["test.example"],
                 "dkim.keys_dir": str(keys), "scan.deadline": 10.0}
    rig = MailRig(mode, filterd_overrides=overrides,
                  postfix_main_cf={"smtpd_authorized_xclient_hosts": "127.0.0.0/8"})
    try:
        rig.start()
    except Unavailable as exc:
        rig.close()
        pytest.skip(str(exc))
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture(scope="module")
def milter_rig(wired_overrides, policy_dirs) -> Iterator[MailRig]:
    yield from _rig("milter", wired_overrides, policy_dirs)


@pytest.fixture(scope="module")
def aq_rig(wired_overrides, policy_dirs) -> Iterator[MailRig]:
    yield from _rig("after-queue", wired_overrides, policy_dirs)


@pytest.fixture(params=["milter", "after-queue"])
def rig(request, clamd, dns_server) -> MailRig:
    r = request.getfixturevalue("milter_rig" if request.param == "milter" else "aq_rig")
    r.reset()
    return r


def head(raw: bytes) -> str:
    return raw.split(b"\r\n\r\n" if b"\r\n\r\n" in raw else b"\n\n", 1)[0].decode("latin-1")


def quarantined(rig: MailRig) -> list[dict]:
    res = rig.filterd.cli("quarantine", "list", "--json", "--limit", "0")
    return json.loads(res.stdout)


def test_spam_lover_gets_it_tagged_and_the_other_copy_is_quarantined(rig):
    before = {i["id"] for i in quarantined(rig)}
    reply = rig.send(message(1), rcpts=["user@test.example", "user2@test.example",
                                        "user3@test.example"])
    assert reply.ok, f"{reply}\n{rig.logs()}"
    [lover] = rig.wait_delivered("user2", 1)
    assert "X-Spam-Flag: YES" in head(lover) and "Subject: ***SPAM*** offer 1" in head(lover)
    [bypass] = rig.wait_delivered("user3", 1)
    if rig.mode == "after-queue":   # its own reinjected copy
        assert "X-Spam-" not in head(bypass) and "***SPAM***" not in head(bypass)
    else:                           # one copy for the delivered: the most severe group's headers
        assert head(bypass) .count("X-Spam-Flag: YES") == 1
    assert "X-Virus-Scanned: filterd" in head(bypass)
    assert wait_for(lambda: len(quarantined(rig)) > len(before), 20), rig.logs()
    [item] = [i for i in quarantined(rig) if i["id"] not in before]
    text = json.dumps(item)
    assert "user@test.example" in text and "user2@test.example" not in text
    assert "user3@test.example" not in text
    rig.wait_queue_empty()
    assert rig.mailbox("user") == []
    line = next(l for l in rig.filterd.log().splitlines()
                if "filterd.message" in l and "offer" not in l and "user2@test.example" in l)
    assert "user@test.example" in line and item["id"] in line, line


def test_normal_recipient_alone_is_quarantined_and_lover_alone_tagged(rig):
    assert rig.send(message(2), rcpts=["user2@test.example"]).ok
    [lover] = rig.wait_delivered("user2", 1)
    assert "X-Spam-Flag: YES" in head(lover)
    before = len(quarantined(rig))
    assert rig.send(message(3), rcpts=["user@test.example"]).ok
    assert wait_for(lambda: len(quarantined(rig)) == before + 1, 20), rig.logs()
    rig.wait_queue_empty()
    assert rig.mailbox("user") == []


def test_bypass_recipient_gets_no_spam_headers(rig):
    assert rig.send(message(5), rcpts=["user3@test.example"]).ok
    [bypass] = rig.wait_delivered("user3", 1)
    assert "X-Spam-" not in head(bypass) and "***SPAM***" not in head(bypass)
    assert "X-Virus-Scanned: filterd" in head(bypass)


def send_authenticated(rig: MailRig, raw: bytes, login: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", rig.postfix.smtp_port, timeout=60) as s:
        s.ehlo("laptop.test.example")
        code, text = s.docmd("XCLIENT", f"ADDR=192.0.2.44 NAME=[UNAVAILABLE] LOGIN={login}")
        assert code == 220, text
        s.ehlo("laptop.test.example")
        try:
            s.sendmail("alice@test.example", ["user@test.example"], raw)
        except smtplib.SMTPResponseException as exc:
            return exc.smtp_code, exc.smtp_error.decode()
        return 250, "ok"


def test_authenticated_submission_is_signed_and_not_spam_tagged(milter_rig, clamd, dns_server,
                                                                policy_dirs):
    rig = milter_rig
    rig.reset()
    code, text = send_authenticated(rig, message(4, "alice@test.example"), "alice")
    assert code == 250, f"{code} {text}\n{rig.logs()}"
    [delivered] = rig.wait_delivered("user", 1)
    h = head(delivered)
    assert "DKIM-Signature:" in h and "d=test.example" in h, h
    assert "X-Spam-" not in h and "***SPAM***" not in h
    import dkim
    record = (policy_dirs[2] / "record").read_text()
    txt = "".join(__import__("re").findall(r'"([^"]*)"', record))
    assert dkim.verify(delivered.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"),
                       dnsfunc=lambda name, timeout=5: txt.encode())
    line = next(l for l in rig.filterd.log().splitlines()
                if "filterd.message" in l and "client=192.0.2.44" in l)
    assert "GTUBE" in line, line
