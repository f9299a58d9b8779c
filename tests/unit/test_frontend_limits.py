"""Memory bounds of the front ends (filterd.frontends.limits), on loopback: the after-queue
front end against a real SMTP sink, the milter with libmilter's side recorded; the Scanner,
the spool and the budget are real. The same bounds against `filterd serve` under hostile load,
with RSS measured: tests/integration/test_frontend_limits.py."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import threading

import Milter
import pytest

from filterd.frontends import limits
from filterd.frontends import milter as milter_frontend
from harness.loopback import CLEAN, FrontendRig, milter_session

MiB = 1024 * 1024


def Rig(tmp_path, core_rules, **overrides) -> FrontendRig:  # noqa: N802 (reads as a class)
    values = {"daemon.state_dir": str(tmp_path / "state"), "daemon.hostname": "mx.test",
              "scan.mynetworks": [], "rules.dir": str(core_rules)}
    values.update(overrides)
    return FrontendRig(values)


def message(body_lines: int, line: bytes = b"y" * 76) -> bytes:
    return CLEAN.replace(b"hello\r\n", (line + b"\r\n") * body_lines)


class Raw:
    """A bare SMTP client socket, to say what smtplib would not (no SIZE=, a line that never
    ends, a transaction held open)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline().decode()
            lines.append(line.rstrip("\r\n"))
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    def cmd(self, line: bytes) -> str:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def open_data(self, mail_from: bytes = b"MAIL FROM:<a@example.org>") -> None:
        assert self.cmd(b"EHLO postfix.test").startswith("250")
        assert self.cmd(mail_from).startswith("250")
        assert self.cmd(b"RCPT TO:<b@example.net>").startswith("250")
        assert self.cmd(b"DATA").startswith("354")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def rig(tmp_path, core_rules):
    r = Rig(tmp_path, core_rules, **{"smtp.max_message_size": 2 * MiB})
    yield r
    r.close()


def budget_of(r: FrontendRig) -> limits.DataBudget:
    return limits.for_scanner(r.scanner).budget


def test_size_is_advertised_and_a_declared_size_over_it_gets_552_534(rig):
    with smtplib.SMTP("127.0.0.1", rig.port, timeout=20) as c:
        c.ehlo("postfix.test")
        assert c.esmtp_features["size"] == str(2 * MiB)
        code, text = c.docmd("MAIL", f"FROM:<a@example.org> SIZE={2 * MiB + 1}")
        assert (code, text[:5]) == (552, b"5.3.4")
        code, _ = c.docmd("MAIL", f"FROM:<a@example.org> SIZE={2 * MiB}")
        assert code == 250


def test_data_over_the_size_limit_gets_552_534_and_the_next_message_passes(rig):
    raw = Raw(rig.port)
    try:
        raw.open_data()  # no SIZE=: only the data itself shows it is too big
        raw.sock.sendall(message(30000) + b".\r\n")  # 2.3 MiB
        assert raw.reply().startswith("552 5.3.4")
        assert rig.sink.messages == []
        assert budget_of(rig).used == 0  # the refused data is no longer charged
        assert raw.cmd(b"MAIL FROM:<a@example.org>").startswith("250")
        assert raw.cmd(b"RCPT TO:<b@example.net>").startswith("250")
        assert raw.cmd(b"DATA").startswith("354")
        raw.sock.sendall(CLEAN + b".\r\n")
        assert raw.reply().startswith("250 ")
    finally:
        raw.close()
    assert len(rig.sink.messages) == 1 and rig.sink.messages[0][2].endswith(b"hello\r\n")


def test_a_data_line_longer_than_the_line_limit_passes_intact(tmp_path, core_rules):
    """The line limit bounds what is buffered, never what is delivered: Postfix with
    smtp_line_length_limit = 0 sends such lines, and a 5xx for them would bounce mail."""
    r = Rig(tmp_path, core_rules, **{"smtp.max_line_length": 4096})
    try:
        long_line = b"z" * 300_000
        data = CLEAN.replace(b"hello\r\n", long_line + b"\r\n.starts with a dot\r\n..\r\n")
        assert r.send(data)[0] == 250  # smtplib dot-stuffs: "..starts", "..."
        delivered = r.sink.messages[0][2]
        assert delivered.endswith(b"\r\n\r\n" + long_line + b"\r\n.starts with a dot\r\n..\r\n")
    finally:
        r.close()


def test_a_command_line_over_the_line_limit_gets_500_and_the_session_goes_on(tmp_path,
                                                                            core_rules):
    r = Rig(tmp_path, core_rules, **{"smtp.max_line_length": 4096})
    raw = Raw(r.port)
    try:
        raw.sock.sendall(b"NOOP " + b"x" * 100_000 + b"\r\n")
        assert raw.reply().startswith("500")
        assert raw.cmd(b"NOOP").startswith("250")
    finally:
        raw.close()
        r.close()


def test_pending_data_budget_tempfails_with_452_431_and_frees_after(tmp_path, core_rules):
    r = Rig(tmp_path, core_rules, **{"daemon.pending_data_limit": 3 * MiB,
                                     "smtp.max_message_size": 4 * MiB})
    holder, other = Raw(r.port), Raw(r.port)
    try:
        holder.open_data()
        holder.sock.sendall(message(30000))  # 2.3 MiB held, DATA not finished
        budget = budget_of(r)
        for _ in range(200):
            if budget.used >= 2 * MiB:
                break
            threading.Event().wait(0.02)
        assert budget.used >= 2 * MiB
        # declared: refused before the data is sent; undeclared: after it, read to its end
        assert other.cmd(b"EHLO postfix.test").startswith("250")
        assert other.cmd(b"MAIL FROM:<a@example.org> SIZE=1500000").startswith("452 4.3.1")
        other.open_data(b"MAIL FROM:<a@example.org>")
        other.sock.sendall(message(20000) + b".\r\n")  # 1.5 MiB: over what is left
        assert other.reply().startswith("452 4.3.1")
        holder.sock.sendall(b".\r\n")  # the holder alone may use up to its size limit
        assert holder.reply().startswith("250 ")
        assert budget.used == 0
        assert other.cmd(b"MAIL FROM:<a@example.org> SIZE=1500000").startswith("250")
    finally:
        holder.close()
        other.close()
        r.close()
    assert len(r.sink.messages) == 1


def test_a_spool_that_cannot_reach_its_disk_tempfails_452_431(rig, monkeypatch, tmp_path):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
    raw = Raw(rig.port)
    try:
        raw.open_data()
        raw.sock.sendall(message(20000) + b".\r\n")  # 1.5 MiB: past the in-memory part
        assert raw.reply().startswith("452 4.3.1")
    finally:
        raw.close()
    assert rig.sink.messages == [] and budget_of(rig).used == 0


def test_connections_over_the_cap_get_421_432(tmp_path, core_rules):
    r = Rig(tmp_path, core_rules, **{"smtp.max_connections": 2})
    first, second = Raw(r.port), Raw(r.port)
    try:
        assert first.greeting.startswith("220") and second.greeting.startswith("220")
        third = Raw(r.port)
        assert third.greeting.startswith("421 4.3.2")
        assert third.file.read() == b""  # and closed
        third.close()
        first.cmd(b"QUIT")
        first.close()
        for _ in range(100):  # the slot is given back when the connection is gone
            if limits.for_scanner(r.scanner).smtp_connections.used < 2:
                break
            threading.Event().wait(0.02)
        assert r.send(CLEAN)[0] == 250
    finally:
        second.close()
        r.close()


def test_lmtp_answers_a_size_refusal_once_per_recipient(rig):
    from filterd.frontends import smtp as smtp_frontend
    from harness.loopback import free_port
    lport = free_port()
    server = asyncio.run_coroutine_threadsafe(
        smtp_frontend.start_server(rig.scanner, f"127.0.0.1:{lport}", lmtp=True),
        rig.loop).result(10)
    try:
        with smtplib.LMTP("127.0.0.1", lport, timeout=30) as client:
            client.ehlo("postfix.test")
            client.mail("a@example.org")
            client.rcpt("b@example.net")
            client.rcpt("c@example.net")
            client.putcmd("data")
            assert client.getreply()[0] == 354
            client.send(message(30000) + b".\r\n")
            replies = [client.getreply() for _ in range(2)]
            assert [(c, t[:5]) for c, t in replies] == [(552, b"5.3.4")] * 2
            assert client.noop()[0] == 250  # and the session is in step
    finally:
        rig.loop.call_soon_threadsafe(server.close)
    assert rig.sink.messages == []


# --- milter ------------------------------------------------------------------------------


def milter_for(tmp_path, core_rules, loop, **overrides):
    from filterd import config
    from filterd.service import Scanner
    values = {"daemon.state_dir": str(tmp_path / "state"), "daemon.hostname": "mx.test",
              "scan.mynetworks": [], "rules.dir": str(core_rules)}
    values.update(overrides)
    scanner = Scanner(config.defaults().with_overrides(values))

    def new() -> milter_frontend.FilterMilter:
        return milter_session(scanner, loop)
    return scanner, new


def test_milter_message_over_the_size_limit_is_refused_552_534(tmp_path, core_rules,
                                                               loop_thread):
    scanner, new = milter_for(tmp_path, core_rules, loop_thread,
                              **{"milter.max_message_size": MiB})
    m = new()
    m.header_bytes(b"From", b"a@example.org")
    for _ in range(20):
        m.body(b"y" * 65535)
    assert m.message.size > MiB and m.message.charged == 0  # nothing kept past the limit
    assert m.eom() == Milter.REJECT
    assert ("setreply", "552", "5.3.4", "Message size exceeds fixed limit") in m._ctx.calls
    m = new()  # the next message on a new transaction passes
    m.header_bytes(b"From", b"a@example.org")
    m.body(b"hello\r\n")
    assert m.eom() == Milter.ACCEPT
    assert limits.for_scanner(scanner).budget.used == 0


def test_milter_too_many_header_fields_are_refused_552_560(tmp_path, core_rules, loop_thread):
    _, new = milter_for(tmp_path, core_rules, loop_thread, **{"milter.max_headers": 100})
    m = new()
    for i in range(101):
        m.header_bytes(b"X-Filler", str(i).encode())
    m.body(b"hello\r\n")
    assert m.eom() == Milter.REJECT
    assert ("setreply", "552", "5.6.0", "Too many header fields") in m._ctx.calls


def test_milter_over_the_budget_tempfails_452_431_and_abort_frees(tmp_path, core_rules,
                                                                  loop_thread):
    scanner, new = milter_for(tmp_path, core_rules, loop_thread,
                              **{"daemon.pending_data_limit": MiB})
    budget = limits.for_scanner(scanner).budget
    holder, other = new(), new()
    holder.header_bytes(b"From", b"a@example.org")
    holder.body(b"y" * 900_000)
    other.header_bytes(b"From", b"a@example.org")
    other.body(b"y" * 200_000)
    assert other.eom() == Milter.TEMPFAIL
    assert ("setreply", "452", "4.3.1", "Insufficient system storage, try again later") \
        in other._ctx.calls
    assert budget.used >= 900_000
    holder.abort()  # the MTA gave up on it: the charge goes at once
    assert budget.used == 0 and holder.message is None


def test_budget_lets_a_holder_alone_grow_and_refuses_a_second():
    budget = limits.DataBudget(100)
    assert budget.take(80) and budget.take(70, held=80)  # alone: bounded by its size limit
    assert not budget.take(1) and not budget.fits(1)
    budget.give(150)
    assert budget.fits(1000)  # nothing pending: any one message fits
