"""Hand filtered mail back to Postfix over SMTP (after-queue reinjection, quarantine release).

smtplib runs in a worker thread, so the event loop never blocks on the MTA. The reply of the
listener decides everything: a message counts as passed on only when every recipient was
accepted, otherwise the caller answers 4xx and Postfix retries (a duplicate is better than a
loss).
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
from dataclasses import dataclass
from typing import Mapping


class ReinjectError(Exception):
    """The listener refused or could not be reached. `code` is its SMTP code when it spoke."""

    def __init__(self, message: str, code: int | None = None, permanent: bool = False):
        super().__init__(message)
        self.code = code
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int

    @classmethod
    def parse(cls, hostport: str) -> "Target":
        host, _, port = hostport.rpartition(":")
        return cls(host.strip("[]"), int(port))


def _xforward_args(xforward: Mapping[str, str | None]) -> str:
    parts = []
    for key, value in xforward.items():
        if value:
            clean = "".join(ch for ch in value if 32 < ord(ch) < 127 and ch not in "=")
            parts.append(f"{key}={clean or '[UNAVAILABLE]'}")
    return " ".join(parts)


def send(target: Target, mail_from: str, rcpt_tos: list[str] | tuple[str, ...], data: bytes, *,
         timeout: float, helo: str | None = None,
         xforward: Mapping[str, str | None] | None = None) -> str:
    """Deliver one message synchronously; returns the server's final reply text."""
    try:
        with smtplib.SMTP(target.host, target.port, local_hostname=helo or "localhost",
                          timeout=timeout) as smtp:
            smtp.ehlo()
            if xforward and smtp.has_extn("xforward"):
                args = _xforward_args(xforward)
                if args:
                    code, text = smtp.docmd("XFORWARD", args)
                    if code != 250:
                        raise ReinjectError(f"XFORWARD refused: {code} {text.decode(errors='replace')}",
                                            code)
            options = []
            if smtp.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            if smtp.has_extn("smtputf8") and not all(
                    a.isascii() for a in (mail_from, *rcpt_tos)):
                options.append("SMTPUTF8")
            refused = smtp.sendmail(mail_from, list(rcpt_tos), data, mail_options=options)
            if refused:
                first = next(iter(refused.items()))
                raise ReinjectError(f"recipient {first[0]} refused: {first[1][0]} "
                                    f"{first[1][1].decode(errors='replace')}", first[1][0],
                                    permanent=first[1][0] >= 500)
            return "ok"
    except smtplib.SMTPRecipientsRefused as exc:
        first = next(iter(exc.recipients.items()))
        raise ReinjectError(f"recipient {first[0]} refused: {first[1][0]} "
                            f"{first[1][1].decode(errors='replace')}", first[1][0],
                            permanent=first[1][0] >= 500) from None
    except smtplib.SMTPResponseException as exc:
        raise ReinjectError(f"{exc.smtp_code} {exc.smtp_error.decode(errors='replace')}",
                            exc.smtp_code, permanent=exc.smtp_code >= 500) from None
    except (smtplib.SMTPException, OSError, socket.timeout) as exc:
        raise ReinjectError(f"cannot reach {target.host}:{target.port}: {exc}") from None


async def send_async(target: Target, mail_from: str, rcpt_tos: list[str] | tuple[str, ...],
                     data: bytes, *, timeout: float, helo: str | None = None,
                     xforward: Mapping[str, str | None] | None = None) -> str:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        None, lambda: send(target, mail_from, rcpt_tos, data, timeout=timeout, helo=helo,
                           xforward=xforward))
