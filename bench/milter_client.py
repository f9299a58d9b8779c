"""A small milter-protocol client (libmilter protocol version 6 over TCP), playing the MTA.

The benchmark drives `filterd serve` through its milter port with it, the way Postfix's
smtpd would: option negotiation, connect, HELO, MAIL, RCPT, DATA, headers, end of headers,
body chunks, end of message, then QUIT; one connection per message, as Postfix opens one
per SMTP session. It offers every protocol option Postfix offers and honours what the milter
asks for: steps it does not want (SMFIP_NO*) are not sent, steps it will not answer
(SMFIP_NR_*) are not waited for, header values keep their leading space when it asks for
SMFIP_HDR_LEADSPC.

Result: the final action letter (a accept, c continue, r reject, t tempfail, d discard,
y reply code) with the reply text, plus the header modifications the milter asked for.
No dependency beyond the standard library; used only by bench/, never by filterd itself.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

SMFI_VERSION = 6
# actions the "MTA" allows: add/change headers, body, recipients, quarantine, from, macros
ALL_ACTIONS = 0x1FF
# protocol steps/options the "MTA" offers (Postfix 3.x offers the same set)
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT = 0x1, 0x2, 0x4, 0x8
P_NOBODY, P_NOHDRS, P_NOEOH, P_NR_HDR = 0x10, 0x20, 0x40, 0x80
P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
P_NR_DATA, P_NR_UNKN, P_NR_EOH, P_NR_BODY = 0x10000, 0x20000, 0x40000, 0x80000
P_HDR_LEADSPC = 0x100000
ALL_PROTOCOL = 0x1FFFFF

FINAL = {b"a": "accept", b"c": "continue", b"r": "reject", b"t": "tempfail", b"d": "discard",
         b"y": "replycode"}
MODIFICATIONS = {b"h": "addheader", b"m": "chgheader", b"i": "insheader", b"+": "addrcpt",
                 b"-": "delrcpt", b"b": "replbody", b"q": "quarantine", b"e": "chgfrom",
                 b"2": "addrcpt_par"}


class MilterError(Exception):
    pass


@dataclass
class MilterResult:
    action: str                                   # accept, reject, tempfail, discard, ...
    reply: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)   # added/changed headers
    modifications: list[str] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None


def _split_message(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Headers (unfolded name/value, value without the leading space) and the body."""
    raw = raw.replace(b"\r\n", b"\n")
    if raw.startswith(b"From "):  # mbox separator line: not part of the message
        raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    head, sep, body = raw.partition(b"\n\n")
    if not sep:
        head, body = raw, b""
    headers: list[tuple[str, str]] = []
    for line in head.split(b"\n"):
        text = line.decode("utf-8", "surrogateescape")
        if text[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + text)
        elif ":" in text:
            name, _, value = text.partition(":")
            headers.append((name, value[1:] if value.startswith(" ") else value))
    return headers, body.replace(b"\n", b"\r\n")


class MilterClient:
    def __init__(self, host: str, port: int, timeout: float = 120.0):
        self.host, self.port, self.timeout = host, port, timeout

    # --- framing ----------------------------------------------------------------------------
    def _send(self, sock: socket.socket, cmd: bytes, data: bytes = b"") -> None:
        sock.sendall(struct.pack("!I", len(data) + 1) + cmd + data)

    def _recv_exact(self, sock: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise MilterError("milter closed the connection")
            buf += chunk
        return bytes(buf)

    def _recv(self, sock: socket.socket) -> tuple[bytes, bytes]:
        (length,) = struct.unpack("!I", self._recv_exact(sock, 4))
        if not 1 <= length <= 1 << 24:
            raise MilterError(f"bad packet length {length}")
        packet = self._recv_exact(sock, length)
        return packet[:1], packet[1:]

    def _reply(self, sock: socket.socket) -> tuple[bytes, bytes]:
        while True:
            cmd, data = self._recv(sock)
            if cmd == b"p":  # progress: keep waiting
                continue
            return cmd, data

    # --- one message ------------------------------------------------------------------------
    def send_message(self, raw: bytes, *, mail_from: str = "sender@example.org",
                     rcpts: tuple[str, ...] = ("user@example.net",), client_ip: str = "192.0.2.10",
                     client_name: str = "client.example.org", helo: str = "client.example.org",
                     queue_id: str = "BENCH") -> MilterResult:
        with socket.create_connection((self.host, self.port), timeout=self.timeout) as sock:
            # many small packets without replies: without NODELAY, Nagle + delayed ACK add
            # ~40 ms stalls that would be measured as filterd's latency
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._send(sock, b"O", struct.pack("!III", SMFI_VERSION, ALL_ACTIONS, ALL_PROTOCOL))
            cmd, data = self._recv(sock)
            if cmd != b"O" or len(data) < 12:
                raise MilterError(f"bad option negotiation reply {cmd!r}")
            _version, _actions, proto = struct.unpack("!III", data[:12])

            def step(cmd: bytes, payload: bytes, skip_flag: int, noreply_flag: int
                     ) -> MilterResult | None:
                if proto & skip_flag:
                    return None
                self._send(sock, cmd, payload)
                if proto & noreply_flag:
                    return None
                reply, rdata = self._reply(sock)
                if reply == b"c" or (reply == b"s" and cmd == b"B"):
                    return None
                return MilterResult(FINAL.get(reply, reply.decode("latin-1")),
                                    rdata.rstrip(b"\0").decode("utf-8", "replace"))

            headers, body = _split_message(raw)
            conn = (client_name.encode() + b"\0" + b"4" + struct.pack("!H", 25)
                    + client_ip.encode() + b"\0")
            early = (step(b"C", conn, P_NOCONNECT, P_NR_CONN)
                     or step(b"H", helo.encode() + b"\0", P_NOHELO, P_NR_HELO))
            if early is None:
                self._send(sock, b"D", b"M" + b"i\0" + queue_id.encode() + b"\0")
                early = step(b"M", f"<{mail_from}>".encode() + b"\0", P_NOMAIL, P_NR_MAIL)
            if early is None:
                for rcpt in rcpts:
                    early = step(b"R", f"<{rcpt}>".encode() + b"\0", P_NORCPT, P_NR_RCPT)
                    if early is not None:
                        break
            if early is None:
                early = step(b"T", b"", P_NODATA, P_NR_DATA)
            if early is None:
                lead = " " if proto & P_HDR_LEADSPC else ""
                for name, value in headers:
                    early = step(b"L", name.encode("utf-8", "surrogateescape") + b"\0"
                                 + (lead + value).encode("utf-8", "surrogateescape") + b"\0",
                                 P_NOHDRS, P_NR_HDR)
                    if early is not None:
                        break
            if early is None:
                early = step(b"N", b"", P_NOEOH, P_NR_EOH)
            if early is None and not proto & P_NOBODY:
                for i in range(0, len(body), 65535):
                    early = step(b"B", body[i:i + 65535], 0, P_NR_BODY)
                    if early is not None:
                        break
            if early is not None:
                self._send(sock, b"Q")
                return early
            self._send(sock, b"E")
            result = MilterResult("continue")
            while True:
                cmd, data = self._reply(sock)
                if cmd in MODIFICATIONS:
                    result.modifications.append(MODIFICATIONS[cmd])
                    parts = data.split(b"\0")
                    if cmd in (b"h",) and len(parts) >= 2:
                        result.headers.append((parts[0].decode(), parts[1].decode("utf-8", "replace")))
                    elif cmd in (b"m", b"i") and len(data) >= 4:
                        fields = data[4:].split(b"\0")
                        if len(fields) >= 2:
                            result.headers.append((fields[0].decode(),
                                                   fields[1].decode("utf-8", "replace")))
                    continue
                result.action = FINAL.get(cmd, cmd.decode("latin-1"))
                result.reply = data.rstrip(b"\0").decode("utf-8", "replace")
                break
            self._send(sock, b"Q")
            return result
