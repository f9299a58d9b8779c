"""The clamd client and the clamav check against a fake clamd at the wire (unix socket / TCP).

The fake speaks clamd's INSTREAM protocol (as pyclamd sends it: "nINSTREAM\\n", 4-byte
big-endian chunk lengths, a zero-length end) and answers as told: clean, FOUND, an error,
the size-limit refusal, nothing at all (hang), or not at all (no socket). The rest of the
path (rules/antivirus.toml, decide(), header builders, dispositions) is the real one.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from filterd import config
from filterd.checks.antivirus import ClamdClient, virus_headers
from filterd.message import Envelope
from filterd.policy import Action
from filterd.service import Scanner
from harness.messages import EICAR

CLEAN = (b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hello\r\n"
         b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\nhi\r\n")


class FakeClamd:
    """A loopback clamd: `reply` is what it says after the stream ('stream: OK', ...)."""

    def __init__(self, path: str | None = None, *, reply: str = "stream: OK",
                 delay: float = 0.0, limit: int | None = None):
        self.reply = reply
        self.delay = delay
        self.limit = limit
        self.received: list[bytes] = []
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        if path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(path)
            self.address = path
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.sock.listen(64)
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _read_exact(self, conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            got = conn.recv(n - len(buf))
            if not got:
                raise ConnectionError("closed")
            buf += got
        return buf

    def _handle(self, conn: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            with conn:
                command = b""
                while not command.endswith((b"\n", b"\0")):
                    got = conn.recv(1)
                    if not got:
                        return
                    command += got
                if b"PING" in command:
                    conn.sendall(b"PONG\n")
                    return
                data = bytearray()
                while True:
                    (size,) = struct.unpack("!L", self._read_exact(conn, 4))
                    if size == 0:
                        break
                    data += self._read_exact(conn, size)
                    if self.limit is not None and len(data) > self.limit:
                        conn.sendall(b"INSTREAM size limit exceeded. ERROR\n")
                        return
                self.received.append(bytes(data))
                if self.delay:
                    time.sleep(self.delay)
                if self.reply:
                    conn.sendall(self.reply.encode() + b"\n")
        except OSError:
            pass
        finally:
            with self._lock:
                self.active -= 1

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    # AF_UNIX paths are limited to ~108 bytes: pytest's tmp_path can be longer
    import tempfile
    d = tempfile.mkdtemp(prefix="fclamd-", dir="/tmp")
    yield f"{d}/clamd.sock"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake(sock_path: str):
    servers: list[FakeClamd] = []

    def make(**kw) -> FakeClamd:
        f = FakeClamd(sock_path if not kw.pop("tcp", False) else None, **kw)
        servers.append(f)
        return f

    yield make
    for f in servers:
        f.close()


def client_for(f: FakeClamd, **kw) -> ClamdClient:
    if f.address.startswith("/"):
        return ClamdClient(socket_path=f.address, **kw)
    return ClamdClient(tcp=f.address, **kw)


# --- the client -------------------------------------------------------------------------

def test_clean_virus_and_error_answers(fake):
    f = fake()
    client = client_for(f)
    assert asyncio.run(client.scan(CLEAN)).viruses == ()
    assert f.received == [CLEAN]          # the whole message, byte for byte
    f.reply = "stream: Eicar-Test-Signature FOUND"
    report = asyncio.run(client.scan(CLEAN))
    assert report.viruses == ("Eicar-Test-Signature",) and report.error is None
    f.reply = "stream: Can't allocate memory ERROR"
    report = asyncio.run(client.scan(CLEAN))
    assert report.viruses == () and "allocate" in (report.error or "")


def test_large_message_arrives_whole_over_tcp(fake):
    f = fake(tcp=True)
    data = CLEAN + b"x" * (3 * 1024 * 1024 + 17)
    report = asyncio.run(client_for(f).scan(data))
    assert report.error is None and f.received == [data]


def test_clamd_size_limit_is_oversize_not_unavailable(fake):
    f = fake(limit=100_000)
    report = asyncio.run(client_for(f).scan(b"y" * 1_000_000))
    assert report.oversize and report.error is None


def test_dead_socket_is_an_error_not_clean(sock_path):
    client = ClamdClient(socket_path=sock_path)
    report = asyncio.run(client.scan(CLEAN))
    assert report.error and report.viruses == () and not report.oversize


def test_silent_clamd_times_out(fake):
    f = fake(delay=5.0)
    client = client_for(f, timeout=0.5)
    started = time.monotonic()
    report = asyncio.run(client.scan(CLEAN))
    assert report.error and "timeout" in report.error
    assert time.monotonic() - started < 2.0


def test_connection_budget_and_loop_not_blocked(fake):
    f = fake(delay=0.3)
    client = client_for(f, max_connections=2)

    async def run() -> tuple[list, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        reports = await asyncio.gather(*(client.scan(CLEAN) for _ in range(6)))
        t.cancel()
        return reports, ticks

    started = time.monotonic()
    reports, ticks = asyncio.run(run())
    elapsed = time.monotonic() - started
    assert all(r.error is None for r in reports)
    assert f.max_active <= 2                  # never more than the budget at clamd
    assert elapsed >= 0.8                     # 6 scans of 0.3 s, two at a time
    assert ticks > 40                         # the loop kept running meanwhile


def test_clamd_coming_back_is_used_again(sock_path):
    client = ClamdClient(socket_path=sock_path)
    assert asyncio.run(client.scan(CLEAN)).error
    f = FakeClamd(sock_path, reply="stream: X FOUND")
    try:
        assert asyncio.run(client.scan(CLEAN)).viruses == ("X",)
    finally:
        f.close()


# --- the check through the real rule set, decide() and the dispositions --------------------

def rules_dir(tmp_path: Path, *extra: tuple[str, str]) -> Path:
    from filterd.config import PROJECT_RULES
    d = tmp_path / "rules"
    d.mkdir()
    for name in ("actions.toml", "core.toml", "scores.toml", "antivirus.toml"):
        shutil.copy(PROJECT_RULES / name, d / name)
    return d


def make_scanner(tmp_path: Path, client: ClamdClient | None, site: Path | None = None,
                 **overrides) -> Scanner:
    values = {"daemon.state_dir": str(tmp_path / "state"), "rules.dir": str(rules_dir(tmp_path)),
              "daemon.hostname": "mx.test", **overrides}
    if site is not None:
        values["rules.site_dir"] = str(site)
    settings = config.defaults().with_overrides(values)
    return Scanner(settings, services={"clamd": client} if client else {})


def scan(scanner: Scanner, raw: bytes = CLEAN, frontend: str = "milter"):
    async def go():
        outcome = await scanner.scan(raw, Envelope(mail_from="a@example.org",
                                                   rcpt_tos=("b@example.org",),
                                                   client_ip="192.0.2.1"))
        return outcome, await scanner.dispose(outcome, frontend)
    return asyncio.run(go())


def test_virus_is_rejected_550_in_milter_and_quarantined_after_queue(tmp_path, fake):
    f = fake(reply="stream: Filterd.Test.EICAR.UNOFFICIAL FOUND")
    scanner = make_scanner(tmp_path, client_for(f))
    outcome, disp = scan(scanner)
    assert [s.options for s in outcome.verdict.symbols if s.name == "CLAM_VIRUS"] == \
        [("Filterd.Test.EICAR.UNOFFICIAL",)]
    assert outcome.verdict.action is Action.REJECT
    assert disp.reply == "550 5.7.1 virus Filterd.Test.EICAR.UNOFFICIAL detected"
    outcome, disp = scan(scanner, frontend="smtp")
    assert disp.action is Action.DISCARD and disp.quarantine_id   # stored, not bounced


def test_clean_message_gets_clean_status_and_scanned_header(tmp_path, fake):
    scanner = make_scanner(tmp_path, client_for(fake()))
    outcome, disp = scan(scanner)
    assert disp.action is Action.ACCEPT
    headers = dict(disp.edits.add)
    assert headers["X-Virus-Status"] == "Clean"
    assert headers["X-Virus-Scanned"] == "filterd at mx.test"


def test_unavailable_clamd_tempfails_by_default(tmp_path, sock_path):
    scanner = make_scanner(tmp_path, ClamdClient(socket_path=sock_path))
    outcome, disp = scan(scanner)
    assert "CLAM_UNAVAILABLE" in outcome.verdict.symbol_names
    assert disp.action is Action.TEMPFAIL and disp.code == 451


def test_no_clamd_client_at_all_tempfails(tmp_path):
    scanner = make_scanner(tmp_path, None)
    outcome, disp = scan(scanner)
    assert disp.action is Action.TEMPFAIL


def test_slow_clamd_tempfails_before_the_pipeline_timeout(tmp_path, fake):
    f = fake(delay=3.0)
    scanner = make_scanner(tmp_path, client_for(f, timeout=0.5))
    outcome, disp = scan(scanner)
    assert "CLAM_UNAVAILABLE" in outcome.verdict.symbol_names
    assert "CHECK_TIMEOUT" not in outcome.verdict.symbol_names
    assert disp.action is Action.TEMPFAIL


def test_unavailable_can_be_accept_and_tag_by_data(tmp_path, sock_path):
    site = tmp_path / "site"
    (site / "local.d").mkdir(parents=True)
    (site / "local.d" / "antivirus.toml").write_text('[failures]\nCLAM_UNAVAILABLE = "accept"\n')
    scanner = make_scanner(tmp_path, ClamdClient(socket_path=sock_path), site=site)
    outcome, disp = scan(scanner)
    assert disp.action is Action.ACCEPT
    headers = dict(disp.edits.add)
    assert headers["X-Virus-Scanned"] == "unchecked"
    assert "X-Virus-Status" not in headers
    assert [n for n, _ in disp.edits.add].count("X-Virus-Scanned") == 1


def test_oversize_is_delivered_skipped_and_never_sent(tmp_path, fake):
    f = fake()
    scanner = make_scanner(tmp_path, client_for(f, stream_max_length=1024))
    outcome, disp = scan(scanner, CLEAN + b"z" * 4096)
    assert "CLAM_OVERSIZE" in outcome.verdict.symbol_names
    assert f.connections == 0
    assert disp.action is Action.ACCEPT
    assert dict(disp.edits.add)["X-Virus-Scanned"] == "skipped (size)"


def test_oversize_refused_by_clamd_itself(tmp_path, fake):
    f = fake(limit=1000)
    scanner = make_scanner(tmp_path, client_for(f))
    outcome, disp = scan(scanner, CLEAN + b"z" * 50_000)
    assert "CLAM_OVERSIZE" in outcome.verdict.symbol_names
    assert "CLAM_UNAVAILABLE" not in outcome.verdict.symbol_names
    assert disp.action is Action.ACCEPT


def test_oversize_can_be_quarantined_by_data(tmp_path, fake):
    site = tmp_path / "site"
    (site / "local.d").mkdir(parents=True)
    (site / "local.d" / "antivirus.toml").write_text('[forced]\nCLAM_OVERSIZE = "quarantine"\n')
    scanner = make_scanner(tmp_path, client_for(fake(), stream_max_length=1024), site=site)
    outcome, disp = scan(scanner, CLEAN + b"z" * 4096)
    assert outcome.verdict.action is Action.QUARANTINE and disp.quarantine_id


def test_virus_headers_builder_only_speaks_when_the_check_ran():
    from filterd.policy import Symbol, Verdict
    plain = Verdict(Action.ACCEPT, 0.0, (), "clean", 6.0)
    assert virus_headers(None, plain, None) == []
    infected = Verdict(Action.ACCEPT, 0.0, (Symbol("CLAM_VIRUS", ("A", "B")),), "x", 6.0,
                       virus_names=("A", "B"))
    settings = config.defaults().with_overrides({"daemon.hostname": "mx.test"})
    assert virus_headers(None, infected, settings) == [
        ("X-Virus-Scanned", "filterd at mx.test"), ("X-Virus-Status", "Infected (A, B)")]


# --- ambiguous MIME: every reading goes to clamd ------------------------------------------

class ContentClamd(FakeClamd):
    """Finds EICAR only where its bytes are in the stream, as clamd does in what it decoded:
    this fake decodes no MIME, so a base64 EICAR in a whole message goes unseen."""

    reply = property(lambda self: "stream: Eicar-Test-Signature FOUND"
                     if self.received and EICAR in self.received[-1] else "stream: OK",
                     lambda self, value: None)


@pytest.mark.parametrize("hidden_first", [False, True])
@pytest.mark.parametrize("kind", ["two-content-type", "two-boundary"])
def test_every_reading_of_an_ambiguous_message_is_scanned(tmp_path, sock_path, kind,
                                                          hidden_first):
    from harness.messages import ambiguous
    f = ContentClamd(sock_path)
    try:
        scanner = make_scanner(tmp_path, client_for(f))
        outcome, disp = scan(scanner, ambiguous(kind, hidden_first, name="notes.txt",
                                                data=EICAR))
        got = {s.name: s.options for s in outcome.verdict.symbols}
        assert got["CLAM_VIRUS"] == ("Eicar-Test-Signature",)
        assert disp.reply == "550 5.7.1 virus Eicar-Test-Signature detected"
        assert EICAR not in f.received[0] and EICAR in f.received[-1]  # whole, then parts
        # an unambiguous message goes to clamd once, whole, as before
        f.received.clear()
        from harness.messages import message
        outcome, _ = scan(scanner, message(attachments=[("notes.txt", EICAR)]))
        assert len(f.received) == 1 and "CLAM_VIRUS" not in outcome.verdict.symbol_names
    finally:
        f.close()
