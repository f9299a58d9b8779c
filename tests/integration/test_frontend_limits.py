"""Memory bounds of the real `filterd serve` under hostile load (issue 13 item 4), with a real
Postfix in front (milter on its smtpd, content_filter after queue).

Straight to filterd's own ports on loopback, at once: eight SMTP connections that send a
60 MB line without CRLF (four as a command, four inside DATA, then end the message) and eight
milter connections that stream a 60 MB body without a line end. filterd must stay bounded
while they send, refuse the messages with the code for their size (552 5.3.4: over the
configured limits), give the memory back (RSS within 20 MB of its start at most 10 s after the
connections closed), and pass the next normal message through both front ends to the mailbox.
"""

from __future__ import annotations

import email
import shutil
import socket
import struct
import threading
import time

import pytest

from bench.milter_client import ALL_ACTIONS, ALL_PROTOCOL, SMFI_VERSION, MilterClient
from harness.messages import message

MiB = 1024 * 1024
HOG = 60 * 1000 * 1000            # bytes each hostile connection sends
LIMIT = 32 * MiB                  # filterd's size limits here (Postfix's own: 10 MB)
CHUNK = b"x" * MiB                # one buffer for every send: the test itself stays small
RSS_SLACK_MB = 20
SETTLE = 10.0                     # seconds RSS may take to come back


@pytest.fixture(scope="module")
def filterd_overrides(tmp_path_factory):
    from filterd.config import PROJECT_RULES
    rules = tmp_path_factory.mktemp("limits-rules")
    rules.chmod(0o755)
    for name in ("actions.toml", "core.toml", "scores.toml"):
        shutil.copy(PROJECT_RULES / name, rules / name)
    # a budget above 16 x LIMIT, so each hostile message meets its size limit, not the budget
    # (the budget's 452 4.3.1 is tested in tests/unit/test_frontend_limits.py)
    return {"rules.dir": str(rules), "smtp.max_message_size": LIMIT,
            "milter.max_message_size": LIMIT, "daemon.pending_data_limit": 1024 * MiB}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _reply(f) -> str:
    lines = []
    while True:
        line = f.readline().decode(errors="replace")
        lines.append(line.rstrip("\r\n"))
        if len(line) < 4 or line[3] != "-":
            return "\n".join(lines)


def _send_hog(sock: socket.socket) -> int:
    """Send up to HOG bytes without a line end; returns how many were taken."""
    sent = 0
    try:
        while sent < HOG:
            sock.sendall(CHUNK[:min(len(CHUNK), HOG - sent)])
            sent += min(len(CHUNK), HOG - sent)
    except OSError:  # refused by closing, or it stopped reading until the timeout
        pass
    return sent


def smtp_hog(port: int, in_data: bool, out: dict, key: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        f = sock.makefile("rb")
        out[key + ":greeting"] = _reply(f)
        if in_data:
            for cmd in (b"EHLO hostile.test", b"MAIL FROM:<a@client.test>",
                        b"RCPT TO:<user@test.example>", b"DATA"):
                sock.sendall(cmd + b"\r\n")
                _reply(f)
        out[key + ":sent"] = _send_hog(sock)
        try:
            sock.sendall(b"\r\n.\r\n" if in_data else b"\r\n")
            out[key] = _reply(f)
        except OSError as exc:
            out[key] = f"closed: {exc}"


def milter_hog(port: int, out: dict, key: str) -> None:
    """The MTA's side of the milter protocol, streaming the body (MilterClient's framing)."""
    c = MilterClient("127.0.0.1", port, timeout=30)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        c._send(sock, b"O", struct.pack("!III", SMFI_VERSION, ALL_ACTIONS, ALL_PROTOCOL))
        _, data = c._recv(sock)
        proto = struct.unpack("!III", data[:12])[2]
        steps = [(b"C", b"client.test\x004" + struct.pack("!H", 25) + b"192.0.2.7\x00",
                  0x1000), (b"H", b"client.test\x00", 0x2000),
                 (b"M", b"<a@client.test>\x00", 0x4000), (b"R", b"<user@test.example>\x00",
                                                          0x8000),
                 (b"L", b"Subject\x00hostile\x00", 0x80)]
        for cmd, payload, noreply in steps:
            c._send(sock, cmd, payload)
            if not proto & noreply:
                c._reply(sock)
        sent = 0
        while sent < HOG:
            piece = CHUNK[:65535]
            c._send(sock, b"B", piece)
            sent += len(piece)
            if not proto & 0x80000:
                c._reply(sock)
        c._send(sock, b"E")
        cmd, data = c._reply(sock)
        out[key] = cmd.decode() + " " + data.rstrip(b"\0").decode(errors="replace")
        c._send(sock, b"Q")


def test_hostile_lines_are_bounded_refused_and_memory_comes_back(mta_both):
    rig = mta_both
    f = rig.filterd
    assert rig.send(message(subject="warm-up")).ok, rig.logs()
    rig.wait_delivered("user", 1)
    pid = f.proc.pid
    start = rss_mb(pid)

    out: dict = {}
    threads = [threading.Thread(target=smtp_hog, args=(f.smtp_port, i >= 4, out, f"smtp{i}"))
               for i in range(8)]
    threads += [threading.Thread(target=milter_hog, args=(f.milter_port, out, f"milter{i}"))
                for i in range(8)]
    peak = start
    began = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mb(pid))
        time.sleep(0.05)
    sending = time.monotonic() - began
    closed = time.monotonic()
    now = rss_mb(pid)
    while now > start + RSS_SLACK_MB and time.monotonic() - closed < SETTLE:
        time.sleep(0.25)
        now = rss_mb(pid)
    settled = time.monotonic() - closed
    print(f"RSS start {start:.0f} MB, peak {peak:.0f} MB while 16 connections sent 60 MB "
          f"each ({sending:.1f}s), {now:.0f} MB {settled:.1f}s after they closed")

    for i in range(8):  # every byte was taken: bounded by reading, not by refusing to read
        assert out[f"smtp{i}:sent"] == HOG, out
    for i in range(4):  # a 60 MB command line: read in bounded pieces and refused
        assert out[f"smtp{i}:greeting"].startswith("220"), out
        assert out[f"smtp{i}"].startswith("500"), out
    for i in range(4, 8):  # a 60 MB line in DATA: over the size limit, said so after DATA
        assert out[f"smtp{i}"].startswith("552 5.3.4"), out
    for i in range(8):
        assert out[f"milter{i}"] == "y 552 5.3.4 Message size exceeds fixed limit", out
    # 16 x 60 MB went in; without bounds this took 500 MB+ (issue 13)
    assert peak < start + 100, f"peak RSS {peak:.0f} MB from {start:.0f} MB"
    assert now <= start + RSS_SLACK_MB, (f"RSS {now:.0f} MB {SETTLE:g}s after the connections "
                                         f"closed, started at {start:.0f} MB")

    # a declared size over the limit is refused before any data is sent
    with socket.create_connection(("127.0.0.1", f.smtp_port), timeout=20) as sock:
        r = sock.makefile("rb")
        _reply(r)
        sock.sendall(b"EHLO postfix.test\r\n")
        assert f"SIZE {LIMIT}" in _reply(r)
        sock.sendall(f"MAIL FROM:<a@client.test> SIZE={LIMIT + 1}\r\n".encode())
        assert _reply(r).startswith("552 5.3.4")

    # the next normal message passes the milter and the after-queue filter, and arrives
    normal = message(subject="after the storm")
    msgid = email.message_from_bytes(normal)["Message-ID"]
    reply = rig.send(normal)
    assert reply.ok, f"{reply}\n{rig.logs()}"
    (_, delivered) = rig.wait_delivered("user", 2)
    assert b"Subject: after the storm" in delivered
    passed = [line for line in f.log().splitlines() if f"message_id={msgid}" in line]
    assert any("frontend=milter" in line and "action=accept" in line for line in passed), passed
    assert any("frontend=smtp" in line and "passed on" in line for line in passed), passed
