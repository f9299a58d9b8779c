"""Peers faked at the wire on loopback, for unit tests of the front ends: an SMTP sink that plays
Postfix's reinjection listener (records what it gets, or refuses with a given reply), filterd's
after-queue front end running against it (`FrontendRig`), and libmilter's side of the milter
(`RecordingMTA`, the smfi_* calls a milter makes)."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import threading
from typing import Any

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


class FrontendRig:
    """filterd's after-queue SMTP front end on loopback in a thread, reinjecting into a Sink.

    `values` are settings overrides; the listen and reinjection addresses are added here."""

    def __init__(self, values: dict[str, Any]) -> None:
        from filterd import config
        from filterd.frontends import smtp as smtp_frontend
        from filterd.service import Scanner

        self.sink = Sink()
        self.sink_port = free_port()
        self.controller = SinkController(self.sink, hostname="127.0.0.1", port=self.sink_port)
        self.controller.start()
        self.port = free_port()
        values = {**values, "smtp.listen": f"127.0.0.1:{self.port}",
                  "smtp.reinject": f"127.0.0.1:{self.sink_port}", "smtp.reinject_timeout": 5}
        self.settings = config.defaults().with_overrides(values)
        self.scanner = Scanner(self.settings)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(smtp_frontend.start_server(self.scanner))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)

    def send(self, data: bytes, xforward: str | None = None,
             rcpts: tuple[str, ...] = ("b@example.net",)) -> tuple[int, str]:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.ehlo("postfix.test")
            if xforward:
                code, text = client.docmd("XFORWARD", xforward)
                if code != 250:
                    return code, text.decode()
            try:
                client.sendmail("a@example.org", list(rcpts), data)
            except smtplib.SMTPDataError as exc:
                return exc.smtp_code, exc.smtp_error.decode()
            return 250, ""

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        try:
            self.controller.stop()
        except AssertionError:  # already stopped by the test
            pass


class RecordingMTA:
    """libmilter's side as the milter sees it: macros to read, smfi_* calls recorded."""

    def __init__(self, macros: dict[str, str] | None = None) -> None:
        self.calls: list[tuple] = []
        self.macros = macros or {"i": "QID1"}

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def setreply(self, *args: Any) -> None:
        self.calls.append(("setreply", *args))

    def addheader(self, name: str, value: str, idx: int) -> None:
        self.calls.append(("addheader", name, value))

    def chgheader(self, name: str, idx: int, value: str) -> None:
        self.calls.append(("chgheader", name, idx, value))

    def delrcpt(self, rcpt: str) -> None:
        self.calls.append(("delrcpt", rcpt))


def milter_session(scanner: Any, loop: Any, *, macros: dict[str, str] | None = None,
                   rcpts: tuple[str, ...] = ("b@example.net",)) -> Any:
    """A FilterMilter bound to `scanner` and the daemon-side `loop`, with a RecordingMTA,
    through connect, HELO, MAIL and RCPT as libmilter would drive it (headers and body are
    the test's)."""
    from filterd.frontends import milter as milter_frontend
    milter_frontend._scanner, milter_frontend._loop = scanner, loop
    m = milter_frontend.FilterMilter()
    m._ctx = RecordingMTA(macros)
    m._actions, m._protocol = milter_frontend.FLAGS, 0
    m.connect("client.example", 4, ("192.0.2.9", 1234))
    m.hello("client.example")
    m.envfrom("<a@example.org>")
    for rcpt in rcpts:
        m.envrcpt(f"<{rcpt}>")
    return m
