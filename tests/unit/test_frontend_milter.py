"""The milter front end driven with a stand-in for the MTA side of libmilter (what we are not
testing); the Scanner, the event loop bridge and the verdict mapping are real."""

import asyncio
import threading

import pytest

from filterd import config
from filterd.frontends import milter as milter_frontend
from filterd.pipeline import Phase, check
from filterd.service import Scanner
from harness.loopback import RecordingMTA, milter_session

import Milter

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@check("test.milter_slow", phase=Phase.MAIN)
async def _slow(msg, ctx):
    await asyncio.sleep(10)
    return []


def make_scanner(tmp_path, core_rules, **overrides):
    values = {"daemon.state_dir": str(tmp_path / "state"), "daemon.hostname": "mx.test",
              "scan.mynetworks": [], "rules.dir": str(core_rules)}
    values.update(overrides)
    return Scanner(config.defaults().with_overrides(values))


def deliver(loop, scanner, body: bytes, headers=((b"Subject", b"hi"), (b"X-Spam-Flag", b"NO"),
                                                 (b"From", b"a@example.org")), macros=None):
    m = milter_session(scanner, loop, macros=macros)
    for name, value in headers:
        m.header_bytes(name, value)
    m.eoh()
    m.body(body)
    return m.eom(), m._ctx.calls


def test_clean_message_is_accepted_with_headers(tmp_path, core_rules, loop_thread):
    rc, calls = deliver(loop_thread, make_scanner(tmp_path, core_rules), b"hello\r\n")
    assert rc == Milter.ACCEPT
    assert ("chgheader", "X-Spam-Flag", 1, "") in calls
    assert not [c for c in calls if c[0] == "addheader"]  # below tag_level, no antivirus here


def test_gtube_is_rejected_with_550_571(tmp_path, core_rules, loop_thread):
    rc, calls = deliver(loop_thread, make_scanner(tmp_path, core_rules), GTUBE + b"\r\n")
    assert rc == Milter.REJECT
    (reply,) = [c for c in calls if c[0] == "setreply"]
    assert reply[1:3] == ("550", "5.7.1") and "spam" in reply[3]


def test_quarantine_band_stores_then_discards(tmp_path, core_rules, loop_thread):
    site = tmp_path / "site" / "local.d"
    site.mkdir(parents=True)
    (site / "levels.toml").write_text("[levels]\nreject_level = 5000\n")
    scanner = make_scanner(tmp_path, core_rules, **{"rules.site_dir": str(site.parent)})
    rc, calls = deliver(loop_thread, scanner, GTUBE + b"\r\n")
    assert rc == Milter.DISCARD
    (item,) = scanner.settings.quarantine_dir.rglob("*.eml")
    assert GTUBE in item.read_bytes() and b"X-Spam-Flag: NO" in item.read_bytes()


def test_missed_deadline_tempfails(tmp_path, core_rules, loop_thread):
    site = tmp_path / "site" / "local.d"
    site.mkdir(parents=True)
    (site / "slow.toml").write_text('[check.slow]\nfunction = "test.milter_slow"\n')
    scanner = make_scanner(tmp_path, core_rules, **{"scan.deadline": 0.3,
                                                    "rules.site_dir": str(site.parent)})
    rc, calls = deliver(loop_thread, scanner, b"hello\r\n")
    assert rc == Milter.TEMPFAIL
    assert [c[1:3] for c in calls if c[0] == "setreply"] == [("451", "4.7.1")]


def test_loop_that_never_answers_tempfails(tmp_path, core_rules, monkeypatch):
    dead_loop = asyncio.new_event_loop()  # never run: the scan cannot finish
    monkeypatch.setattr(milter_frontend, "_GRACE", 0.2)
    scanner = make_scanner(tmp_path, core_rules, **{"scan.deadline": 0.1})
    rc, calls = deliver(dead_loop, scanner, b"hello\r\n")
    assert rc == Milter.TEMPFAIL
    dead_loop.close()


def test_authenticated_sender_is_originating_and_not_tagged(tmp_path, core_rules, loop_thread):
    site = tmp_path / "site" / "local.d"
    site.mkdir(parents=True)
    (site / "levels.toml").write_text("[scores]\nGTUBE = 8\n")
    scanner = make_scanner(tmp_path, core_rules, **{"rules.site_dir": str(site.parent)})
    rc, calls = deliver(loop_thread, scanner, GTUBE + b"\r\n",
                        macros={"i": "Q2", "{auth_authen}": "alice"})
    assert rc == Milter.ACCEPT
    added = [c[1] for c in calls if c[0] == "addheader"]
    assert added == []  # GTUBE scores 8 here, but originating mail is never spam-tagged


def test_nagle_is_disabled_on_the_listening_socket():
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        assert milter_frontend._inet_port(f"inet:{port}@127.0.0.1") == port
        assert milter_frontend._inet_port("unix:/run/filterd/milter.sock") is None
        assert milter_frontend._disable_nagle(port, wait=1.0)
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        listener.close()


# Every protocol step and option Postfix 3.x offers a milter (SMFIP_* bits 0x1..0x100000).
POSTFIX_OFFERS = 0x1FFFFF


def test_negotiation_skips_unused_steps_and_replies():
    m = milter_frontend.FilterMilter()
    m._ctx = RecordingMTA()
    opts = [milter_frontend.FLAGS, POSTFIX_OFFERS, 0, 0]
    assert m.negotiate(opts) == Milter.CONTINUE
    asked = opts[1]
    # steps filterd does nothing at: not sent at all
    for skipped in (Milter.P_NODATA, Milter.P_NOUNKNOWN, Milter.P_NOEOH):
        assert asked & skipped, hex(skipped)
    # steps it needs: sent, but never waited for (no reply per connect/HELO/MAIL/RCPT/header/
    # body chunk: the MTA streams them)
    for needed in (Milter.P_NOCONNECT, Milter.P_NOHELO, Milter.P_NOMAIL, Milter.P_NORCPT,
                   Milter.P_NOHDRS, Milter.P_NOBODY):
        assert not asked & needed, hex(needed)
    for no_reply in (Milter.P_NR_CONN, Milter.P_NR_HELO, Milter.P_NR_MAIL, Milter.P_NR_RCPT,
                     Milter.P_NR_HDR, Milter.P_NR_BODY):
        assert asked & no_reply, hex(no_reply)
    # header values arrive without the leading space (as before), rejected RCPTs are not shown
    assert not asked & (Milter.P_HDR_LEADSPC | Milter.P_RCPT_REJ)
    assert m._protocol == asked


def test_callbacks_answer_noreply_once_negotiated():
    m = milter_frontend.FilterMilter()
    m._ctx = RecordingMTA()
    opts = [milter_frontend.FLAGS, POSTFIX_OFFERS, 0, 0]
    m.negotiate(opts)
    assert m.connect("c.example", 4, ("192.0.2.9", 1)) == Milter.NOREPLY
    assert m.envfrom("<a@example.org>") == Milter.NOREPLY
    assert m.envrcpt("<b@example.net>") == Milter.NOREPLY
    assert m.header_bytes(b"Subject", b"folded\n\tline") == Milter.NOREPLY
    assert m.body(b"x\r\n") == Milter.NOREPLY
    assert m.message.getvalue() == b"Subject: folded\r\n\tline\r\n\r\nx\r\n"


def test_envelope_macros_are_read_once_each(tmp_path):
    class CountingMTA(RecordingMTA):
        def __init__(self):
            super().__init__({"i": "QID9", "{daemon_port}": "10026", "j": "mx.test"})
            self.asked: list[str] = []

        def getsymval(self, name):
            self.asked.append(name)
            return super().getsymval(name)

    m = milter_frontend.FilterMilter()
    m._ctx = mta = CountingMTA()
    m._protocol = 0
    m.envfrom("<a@example.org>")
    mta.asked.clear()
    envelope = m._envelope()
    assert sorted(mta.asked) == sorted(milter_frontend.ENVELOPE_MACROS)
    assert envelope.queue_id == "QID9"
    assert dict(envelope.macros) == {"i": "QID9", "{daemon_port}": "10026", "j": "mx.test"}


def test_handoff_returns_result_and_raises_errors(loop_thread):
    async def answer():
        await asyncio.sleep(0)
        return 42

    async def broken():
        raise ValueError("boom")

    assert milter_frontend._Handoff(loop_thread, answer()).result(5) == 42
    with pytest.raises(ValueError):
        milter_frontend._Handoff(loop_thread, broken()).result(5)


def test_handoff_timeout_cancels_the_scan_on_the_loop(loop_thread):
    cancelled = threading.Event()

    async def stuck():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        milter_frontend._Handoff(loop_thread, stuck()).result(0.2)
    assert cancelled.wait(5)


def test_message_is_assembled_once_exactly_as_sent(tmp_path, core_rules, loop_thread):
    """Header lines, the separator and every body chunk, joined in one copy: the quarantined
    bytes are exactly what the MTA streamed (folded header continuations in CRLF form)."""
    site = tmp_path / "site" / "local.d"
    site.mkdir(parents=True)
    (site / "levels.toml").write_text("[levels]\nreject_level = 5000\n")
    scanner = make_scanner(tmp_path, core_rules, **{"rules.site_dir": str(site.parent)})
    m = milter_session(scanner, loop_thread)
    m.header_bytes(b"Subject", b"two\n\tlines")
    m.header_bytes(b"From", b"a@example.org")
    for chunk in (b"first chunk\r\n", GTUBE, b"\r\nlast\r\n"):
        m.body(chunk)
    assert m.eom() == Milter.DISCARD
    assert m.message is None  # reset for the next message on the connection
    (item,) = scanner.settings.quarantine_dir.rglob("*.eml")
    assert item.read_bytes() == (b"Subject: two\r\n\tlines\r\nFrom: a@example.org\r\n\r\n"
                                 b"first chunk\r\n" + GTUBE + b"\r\nlast\r\n")
