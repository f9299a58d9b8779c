"""Peers faked at the wire on loopback, for unit tests of the front ends: an SMTP sink that plays
Postfix's reinjection listener (records what it gets, or refuses with a given reply)."""

from __future__ import annotations

import socket

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
CLEAN = (b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\nX-Spam-Flag: NO\r\n"
         b"Date: Sun, 22 Nov 2026 05:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\nhello\r\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sink:
    """aiosmtpd handler: records (mail_from, rcpt_tos, bytes), or refuses with `reply`."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.reply: str | None = None

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        if self.reply:
            return self.reply
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content))
        return "250 OK"


class LongLineSMTP(SMTP):
    line_length_limit = 64 * 1024 * 1024  # like Postfix's smtpd, which has no such limit


class SinkController(Controller):
    """A Sink on loopback that, like Postfix's smtpd, takes lines of any length."""

    def factory(self):
        return LongLineSMTP(self.handler, data_size_limit=None)
