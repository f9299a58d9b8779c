"""The milter front end driven with a stand-in for the MTA side of libmilter (what we are not
testing); the Scanner, the event loop bridge and the verdict mapping are real."""

import asyncio
import threading

import pytest

from filterd import config
from filterd.frontends import milter as milter_frontend
from filterd.pipeline import Phase, check
from filterd.service import Scanner

import Milter

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class FakeMTA:
    """Records what the milter asks of the MTA (libmilter's smfi_* calls)."""

    def __init__(self, macros=None):
        self.calls: list[tuple] = []
        self.macros = macros or {"i": "QID1"}

    def getsymval(self, name):
        return self.macros.get(name)

    def setreply(self, *args):
        self.calls.append(("setreply", *args))

    def addheader(self, name, value, idx):
        self.calls.append(("addheader", name, value))

    def chgheader(self, name, idx, value):
        self.calls.append(("chgheader", name, idx, value))


@check("test.milter_slow", phase=Phase.MAIN)
async def _slow(msg, ctx):
    await asyncio.sleep(10)
    return []


@pytest.fixture
def loop_thread():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def make_scanner(tmp_path, core_rules, **overrides):
    values = {"daemon.state_dir": str(tmp_path / "state"), "daemon.hostname": "mx.test",
              "scan.mynetworks": [], "rules.dir": str(core_rules)}
    values.update(overrides)
    return Scanner(config.defaults().with_overrides(values))


def deliver(loop, scanner, body: bytes, headers=((b"Subject", b"hi"), (b"X-Spam-Flag", b"NO"),
                                                 (b"From", b"a@example.org")), macros=None):
    milter_frontend._scanner, milter_frontend._loop = scanner, loop
    m = milter_frontend.FilterMilter()
    m._ctx = FakeMTA(macros)
    m._actions = milter_frontend.FLAGS
    m._protocol = 0
    m.connect("client.example", 4, ("192.0.2.9", 1234))
    m.hello("client.example")
    m.envfrom("<a@example.org>")
    m.envrcpt("<b@example.net>")
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
