"""The after-queue front end on loopback, against a real SMTP sink that can be told to fail."""

import asyncio
import json
import smtplib

import pytest

from filterd import config
from harness.loopback import CLEAN, GTUBE, FrontendRig
from filterd.pipeline import Phase, check
from filterd.service import Scanner



@check("test.smtp_slow", phase=Phase.MAIN)
async def _slow(msg, ctx):
    await asyncio.sleep(10)
    return []


def Rig(tmp_path, core_rules, **overrides) -> FrontendRig:  # noqa: N802 (reads as a class)
    values = {"daemon.state_dir": str(tmp_path / "state"), "daemon.hostname": "mx.test",
              "scan.mynetworks": [], "rules.dir": str(core_rules)}
    values.update(overrides)
    return FrontendRig(values)


@pytest.fixture
def rig(tmp_path, core_rules):
    r = Rig(tmp_path, core_rules)
    yield r
    r.close()


def test_clean_message_is_reinjected_once_with_headers(rig):
    assert rig.send(CLEAN)[0] == 250
    ((mail_from, rcpts, data),) = rig.sink.messages
    assert (mail_from, rcpts) == ("a@example.org", ["b@example.net"])
    assert data.startswith(b"From: a@example.org\r\n")  # no antivirus in these rules: no claim
    assert b"X-Virus-Scanned" not in data
    assert b"X-Spam-Flag" not in data  # the forged one is gone, and no tag below tag_level
    assert data.endswith(b"\r\n\r\nhello\r\n")


def test_reinjection_refused_is_a_tempfail(rig):
    rig.sink.reply = "554 5.7.1 no thanks"
    code, text = rig.send(CLEAN)
    assert code == 451 and "Reinjection failed" in text


def test_reinjection_listener_down_is_a_tempfail(rig):
    rig.controller.stop()
    code, text = rig.send(CLEAN)
    assert code == 451


def test_gtube_is_quarantined_not_bounced_and_xforward_is_recorded(rig):
    code, _ = rig.send(CLEAN.replace(b"hello", GTUBE.encode()),
                       xforward="ADDR=192.0.2.5 HELO=client.example NAME=[UNAVAILABLE] IDENT=Q1")
    assert code == 250
    assert rig.sink.messages == []
    (sidecar,) = rig.settings.quarantine_dir.rglob("*.json")
    meta = json.loads(sidecar.read_text())
    assert meta["client_ip"] == "192.0.2.5" and meta["queue_id"] == "Q1"
    assert meta["client_helo"] == "client.example"
    assert meta["category"] == "spam"


def test_unwritable_quarantine_is_a_tempfail(tmp_path, core_rules):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    r = Rig(tmp_path, core_rules, **{"quarantine.dir": str(blocker / "q")})
    try:
        code, text = r.send(CLEAN.replace(b"hello", GTUBE.encode()))
        assert code == 451 and "quarantine unavailable" in text
        assert r.sink.messages == []
    finally:
        r.close()


def test_xforward_only_from_configured_peers(tmp_path, core_rules):
    r = Rig(tmp_path, core_rules, **{"smtp.xforward_peers": ["10.0.0.0/8"]})
    try:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as client:
            code, text = client.ehlo("x")
            assert b"XFORWARD" not in text
            assert client.docmd("XFORWARD", "ADDR=192.0.2.1")[0] == 550
    finally:
        r.close()


def test_missed_deadline_is_a_tempfail(tmp_path, core_rules):
    site = tmp_path / "site" / "local.d"
    site.mkdir(parents=True)
    (site / "slow.toml").write_text('[check.slow]\nfunction = "test.smtp_slow"\n')
    r = Rig(tmp_path, core_rules, **{"scan.deadline": 0.3, "rules.site_dir": str(site.parent)})
    try:
        code, text = r.send(CLEAN)
        assert code == 451
        assert r.sink.messages == []
    finally:
        r.close()


def _nested(depth: int) -> bytes:
    head = b"From: a@b.c\r\nSubject: nest\r\n"
    for i in range(depth):
        head += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
    tail = b"Content-Type: text/plain\r\n\r\nhello\r\n"
    for i in reversed(range(depth)):
        tail += b"--b%d--\r\n" % i
    return head + tail


BROKEN = {
    "no header/body separator": b"From: a@b\r\nSubject: x\r\nthis is not a header line",
    "10 MB single line": b"From: a@b\r\n\r\n" + b"A" * 10_000_000,
    "NUL bytes": b"From: a@b\r\nSub\x00ject: x\x00\r\n\r\nbo\x00dy\r\n",
    "8-bit junk in headers": b"From: \xff\xfe <a@b>\r\nSubject: \xe9\xe8\r\n\r\nbody\r\n",
    "1000 nested multiparts": _nested(1000),
}


def test_broken_messages_get_a_verdict_and_the_daemon_keeps_serving(rig):
    for name, raw in BROKEN.items():
        code, text = rig.send(raw)
        assert code == 250, f"{name}: {code} {text}"
    # nesting past scan.max_mime_depth is held (MIME_NESTING_TOO_DEEP, forced in core.toml:
    # the parser gives up on it, so its parts could hide anything); the rest are passed on
    assert len(rig.sink.messages) == len(BROKEN) - 1
    (sidecar,) = rig.settings.quarantine_dir.rglob("*.json")
    meta = json.loads(sidecar.read_text())
    assert meta["subject"] == "nest" and meta["reason"].startswith("MIME_NESTING_TOO_DEEP")
    assert meta["category"] == "bad-header"
    # the bytes after our headers are passed on exactly as received
    big = next(m for m in rig.sink.messages if len(m[2]) > 9_000_000)[2]
    assert big.endswith(b"\r\n\r\n" + b"A" * 10_000_000 + b"\r\n")
    assert rig.send(CLEAN)[0] == 250


@pytest.mark.corpus
def test_every_corpus_message_gets_a_verdict(corpus_files, core_rules, tmp_path):
    from filterd.message import Envelope
    settings = config.defaults().with_overrides({"daemon.state_dir": str(tmp_path),
                                                 "rules.dir": str(core_rules)})
    scanner = Scanner(settings)

    async def run():
        actions = {}
        for path in corpus_files:
            outcome = await scanner.scan(path.read_bytes(), Envelope())
            actions[outcome.verdict.action.value] = actions.get(outcome.verdict.action.value, 0) + 1
        return actions

    actions = asyncio.run(run())
    assert sum(actions.values()) == len(corpus_files)
    assert "tempfail" not in actions  # no internal error on any real message
