"""After-queue content filter: receive by SMTP from Postfix, scan, reinject by SMTP.

Trusts: XFORWARD only from smtp.xforward_peers (others get 550 5.7.0 for the command).
Reads: smtp.listen, smtp.xforward_peers, smtp.reinject, smtp.reinject_timeout,
smtp.max_message_size, smtp.reject_action (via the Scanner).

Replies: 250 only after the message was reinjected and every recipient accepted, or was
durably quarantined, or discarded by policy; 451 when scanning, quarantining or reinjection
failed (Postfix keeps the message queued); 550 only for a deliberate reject when
smtp.reject_action = "reject".

Mixed recipients (docs/policy.md): one DATA reply cannot say "delivered to A, held for B", so
each recipient group is reinjected separately with its own headers, and the reply is 250 only
when every group was reinjected, quarantined or discarded, else 451 for the whole message: on
the retry the groups already reinjected get a second copy (a duplicate, never a loss). The
LMTP listener (lmtp.listen, FilterLMTP below) has no such trade-off: it answers each
recipient with its own group's reply after DATA, so Postfix retries only the recipients that
failed. Extra SMTP listeners (policy.smtp_extra_listen) work the same; their port selects
policy banks (the {daemon_port} of the envelope).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope as SmtpEnvelope, Session, syntax

from filterd.actions.headers import apply_to_bytes
from filterd.frontends.reinject import ReinjectError, Target, send_async
from filterd.message import Envelope
from filterd.policy import Action

log = logging.getLogger("filterd.smtp")
XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")


def _xf_value(value: str) -> str | None:
    if value.upper() in ("[UNAVAILABLE]", "[TEMPUNAVAIL]", ""):
        return None
    if value.upper().startswith("IPV6:"):
        return value[5:]
    return value


class FilterSMTP(SMTP):
    """aiosmtpd's server with Postfix's XFORWARD extension."""

    # aiosmtpd answers a line over 1,000 bytes with a permanent 500, which would make Postfix
    # bounce the message. Postfix folds long lines itself (smtp_line_length_limit), but a
    # parser limit must never become a 5xx: accept long lines, bounded by the message size.
    line_length_limit = 64 * 1024 * 1024

    def __init__(self, handler: "FilterHandler", **kwargs: Any):
        super().__init__(handler, **kwargs)
        self.filter_handler = handler

    @syntax("XFORWARD attribute=value ...")
    async def smtp_XFORWARD(self, arg: str) -> None:
        if not self.session.host_name:
            await self.push("503 5.5.1 Error: send HELO/EHLO first")
            return
        if not self.filter_handler.xforward_allowed(self.session.peer):
            await self.push("550 5.7.0 Error: insufficient authorization")
            return
        if not arg:
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value...")
            return
        attrs = getattr(self.session, "xforward", None) or {}
        for item in arg.split():
            key, sep, value = item.partition("=")
            if not sep or key.upper() not in XFORWARD_ATTRS:
                await self.push(f"501 5.5.4 Bad XFORWARD attribute: {key}")
                return
            attrs[key.upper()] = _xf_value(value)
        self.session.xforward = attrs  # type: ignore[attr-defined]
        await self.push("250 2.0.0 Ok")


class FilterLMTP(FilterSMTP, LMTP):
    """aiosmtpd's LMTP server (LHLO, one reply per recipient after DATA) with XFORWARD."""


class FilterHandler:
    def __init__(self, scanner: Any, *, lmtp: bool = False):
        self.lmtp = lmtp
        self.scanner = scanner
        settings = scanner.settings
        self.peers = [ipaddress.ip_network(n, strict=False) for n in settings.smtp.xforward_peers]
        self.target = Target.parse(settings.smtp.reinject)
        self.timeout = settings.smtp.reinject_timeout
        self.hostname = settings.hostname

    def xforward_allowed(self, peer: Any) -> bool:
        try:
            addr = ipaddress.ip_address(peer[0])
        except (ValueError, TypeError, IndexError):
            return False
        return any(addr in net for net in self.peers)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.xforward_allowed(session.peer):
            last = responses.pop()
            responses.append("250-XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE")
            responses.append(last)
        return responses

    async def handle_RSET(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        session.xforward = {}  # type: ignore[attr-defined]
        return "250 OK"

    def _envelope(self, session: Session, envelope: SmtpEnvelope,
                  xf: dict[str, str | None]) -> Envelope:
        peer_ip = session.peer[0] if isinstance(session.peer, tuple) else None
        macros: tuple[tuple[str, str], ...] = ()
        port = getattr(session, "local_port", None)
        if port:
            macros = (("{daemon_port}", str(port)),)
        return Envelope(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            client_ip=xf.get("ADDR") or peer_ip,
            client_helo=xf.get("HELO") if "HELO" in xf else session.host_name,
            client_name=xf.get("NAME"),
            queue_id=xf.get("IDENT"),
            listener="lmtp" if self.lmtp else "smtp",
            macros=macros,
        )

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        xf = dict(getattr(session, "xforward", None) or {})
        session.xforward = {}  # type: ignore[attr-defined]  # XFORWARD lasts one transaction
        try:
            raw = envelope.original_content or envelope.content or b""
            if isinstance(raw, str):
                raw = raw.encode("utf-8", "surrogateescape")
            if not getattr(session, "local_port", None):
                sock = server.transport.get_extra_info("sockname") if server.transport else None
                session.local_port = sock[1] if isinstance(sock, tuple) else None  # type: ignore[attr-defined]
            env = self._envelope(session, envelope, xf)
            outcome = await self.scanner.scan(raw, env)
            frontend = "lmtp" if self.lmtp else "smtp"
            disposition = await self.scanner.dispose(outcome, frontend)
            replies = await self._deliver(raw, env, disposition)
            self.scanner.log_message(outcome, disposition, frontend)
            if self.lmtp:
                return "\r\n".join(replies[r] for r in env.rcpt_tos)
            return disposition.reply
        except Exception:
            log.exception("internal error in the %s front end", "LMTP" if self.lmtp else "SMTP")
            reply = "451 4.3.0 Internal error, try again later"
            if self.lmtp:
                return "\r\n".join(reply for _ in envelope.rcpt_tos)
            return reply

    async def _reinject(self, env: Envelope, rcpts: tuple[str, ...], data: bytes) -> str | None:
        """Reinject to `rcpts`; None when every recipient was accepted, else the error."""
        try:
            await send_async(self.target, env.mail_from, rcpts, data,
                             timeout=self.timeout, helo=self.hostname,
                             xforward={"ADDR": env.client_ip, "HELO": env.client_helo,
                                       "NAME": env.client_name, "IDENT": env.queue_id})
        except ReinjectError as exc:
            log.error("reinjection of %s to %s failed: %s", env.queue_id or "message",
                      ",".join(rcpts), exc)
            return str(exc)
        return None

    async def _deliver(self, raw: bytes, env: Envelope, disposition: Any) -> dict[str, str]:
        """Reinject what is to be delivered; set the message reply; return each recipient's
        reply (what LMTP answers)."""
        if not disposition.groups:
            if disposition.action is Action.ACCEPT:
                data = apply_to_bytes(raw, disposition.edits) if disposition.edits else raw
                error = await self._reinject(env, tuple(env.rcpt_tos), data)
                if error:
                    disposition.action, disposition.code = Action.TEMPFAIL, 451
                    disposition.status, disposition.text = "4.3.0", f"Reinjection failed: {error}"
                else:
                    disposition.text = "Ok: filtered and passed on"
            return {r: disposition.reply for r in env.rcpt_tos}
        replies: dict[str, str] = {}
        failed = []
        for part in disposition.groups:
            reply = part.reply
            if part.action is Action.ACCEPT:
                data = apply_to_bytes(raw, part.edits) if part.edits else raw
                error = await self._reinject(env, part.recipients, data)
                if error:
                    failed.append(error)
                    reply = f"451 4.3.0 Reinjection failed: {error}"
                else:
                    reply = "250 2.0.0 Ok: filtered and passed on"
            for r in part.recipients:
                replies[r] = reply
        if failed:
            # one reply for all: Postfix retries the whole message (duplicates over loss)
            disposition.action, disposition.code = Action.TEMPFAIL, 451
            disposition.status = "4.3.0"
            disposition.text = f"Reinjection failed for some recipients: {failed[0]}"
        elif disposition.action is Action.ACCEPT:
            disposition.text = (f"Ok: filtered and passed on in {len(disposition.groups)} "
                                f"recipient groups")
        return replies


async def start_server(scanner: Any, listen: str | None = None, *,
                       lmtp: bool = False) -> asyncio.AbstractServer:
    """Serve the after-queue filter on `listen` (default smtp.listen); `lmtp` for LMTP."""
    settings = scanner.settings
    listen = listen or settings.smtp.listen
    host, _, port = listen.rpartition(":")
    handler = FilterHandler(scanner, lmtp=lmtp)
    loop = asyncio.get_running_loop()
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter
    server_class = FilterLMTP if lmtp else FilterSMTP

    def factory() -> FilterSMTP:
        return server_class(handler, decode_data=False, enable_SMTPUTF8=True,
                            data_size_limit=settings.smtp.max_message_size,
                            hostname=settings.hostname, ident="filterd", timeout=300)

    server = await loop.create_server(factory, host=host.strip("[]"), port=int(port))
    log.info("after-queue filter listening on %s (%s), reinjecting to %s", listen,
             "LMTP" if lmtp else "SMTP", settings.smtp.reinject)
    return server
