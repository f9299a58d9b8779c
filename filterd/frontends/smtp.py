"""After-queue content filter: receive by SMTP from Postfix, scan, reinject by SMTP.

Trusts: XFORWARD only from smtp.xforward_peers (others get 550 5.7.0 for the command).
Reads: smtp.listen, smtp.xforward_peers, smtp.reinject, smtp.reinject_timeout,
smtp.max_message_size, smtp.max_line_length, smtp.max_connections, daemon.pending_data_limit,
smtp.reject_action (via the Scanner).

Memory bounds (filterd.frontends.limits; docs/architecture.md "Memory bounds"): more than
smtp.max_connections connections get 421 4.3.2 at the greeting; a line is buffered up to
smtp.max_line_length (a longer command line gets 500, a longer DATA line is taken in pieces);
DATA is spooled (memory, then an unlinked temporary file) and charged to the pending data
budget. A message over smtp.max_message_size (announced as ESMTP SIZE) gets 552 5.3.4, at
MAIL FROM when its SIZE= says so, else after DATA; a message the budget cannot take now gets
452 4.3.1, so Postfix retries it later.

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
import re
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope as SmtpEnvelope, Session, syntax

from filterd.actions.headers import apply_to_bytes
from filterd.frontends import limits
from filterd.frontends.limits import MessageSpool, SpoolState
from filterd.frontends.reinject import ReinjectError, Target, send_async
from filterd.message import Envelope
from filterd.policy import Action

log = logging.getLogger("filterd.smtp")
XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
TOO_BIG = "552 5.3.4 Error: message size exceeds fixed limit"
NO_MEMORY = "452 4.3.1 Error: insufficient system storage, try again later"
TOO_MANY = "421 4.3.2 Error: too many connections, try again later"
READ_BACK_FAILED = "451 4.3.0 Error: internal error, try again later"
_SIZE_PARAM = re.compile(r"(?i)(?:^|\s)SIZE=(\d{1,20})(?:\s|$)")


def _xf_value(value: str) -> str | None:
    if value.upper() in ("[UNAVAILABLE]", "[TEMPUNAVAIL]", ""):
        return None
    if value.upper().startswith("IPV6:"):
        return value[5:]
    return value


class FilterSMTP(SMTP):
    """aiosmtpd's server with Postfix's XFORWARD extension and filterd's memory bounds."""

    def __init__(self, handler: "FilterHandler", *, line_length: int, **kwargs: Any):
        # aiosmtpd sizes its StreamReader from this: the most one connection buffers while
        # looking for a line's end (asyncio pauses reading at twice the limit)
        self.line_length_limit = line_length
        super().__init__(handler, **kwargs)
        self.filter_handler = handler
        self.limits = handler.limits
        self._has_slot = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # a new connection, not a STARTTLS upgrade
            self._has_slot = self.limits.smtp_connections.take()
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self._has_slot:
            self._has_slot = False
            self.limits.smtp_connections.give()
        # The protocol, its reader and its task form reference cycles that only the cyclic
        # GC frees, which an idle daemon seldom runs: drop what the reader still buffers now.
        buffer = getattr(getattr(self, "_reader", None), "_buffer", None)
        if isinstance(buffer, bytearray) and buffer:
            held = len(buffer)
            buffer.clear()
            if held >= limits.TRIM_AFTER:
                limits.trim_soon()

    async def _handle_client(self) -> None:
        if not self._has_slot:
            log.warning("refusing a connection from %s: smtp.max_connections (%d) reached",
                        self.session.peer if self.session else "?",
                        self.limits.smtp_connections.limit)
            await self.push(TOO_MANY)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    def _data_reply(self, reply: str) -> str:
        if self.filter_handler.lmtp:  # LMTP answers DATA once per recipient
            return "\r\n".join(reply for _ in self.envelope.rcpt_tos)
        return reply

    @syntax("MAIL FROM:<address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str) -> None:
        # Refuse by the declared SIZE before the data is sent (RFC 1870); aiosmtpd's own check
        # answers without an enhanced status code
        match = _SIZE_PARAM.search(arg or "")
        if match and self.session.host_name and self.envelope.mail_from is None:
            size = int(match.group(1))
            if self.data_size_limit and size > self.data_size_limit:
                await self.push(TOO_BIG)
                return
            if not self.limits.budget.fits(size):
                log.warning("tempfailing a message of %d bytes: daemon.pending_data_limit "
                            "(%d) reached", size, self.limits.budget.limit)
                await self.push(NO_MEMORY)
                return
        await super().smtp_MAIL(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd's DATA keeps every line as an object of its own and refuses a line over
        # line_length_limit with a permanent 500; this one spools the data (so a long line
        # costs no more than a short one) and refuses only what the limits refuse.
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        spool = MessageSpool(self.limits.budget, self.data_size_limit or 1 << 62)
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            await self._receive(spool)
            content = None
            if spool.state is SpoolState.OK:
                try:
                    content = spool.getvalue()
                except OSError as exc:  # aiosmtpd would answer an exception with a 500
                    log.error("cannot read back a spooled message: %s", exc)
                    status = self._data_reply(READ_BACK_FAILED)
            if content is not None:
                self.envelope.content = self.envelope.original_content = content
                del content
                status = await self._call_handler_hook("DATA")
            elif spool.state is not SpoolState.OK:
                log.warning("refused a message of %d bytes from %s: %s", spool.size,
                            self.session.peer, spool.state.value)
                status = self._data_reply(TOO_BIG if spool.state is SpoolState.TOO_BIG
                                          else NO_MEMORY)
            self._set_post_data_state()
        finally:
            spool.close()
        await self.push(status)

    async def _receive(self, spool: MessageSpool) -> None:
        """Read DATA to its end (RFC 5321 4.1.1.4), undoing dot-stuffing (4.5.2)."""
        reader = self._reader
        line_start = True
        while True:
            try:
                piece = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:  # a long line: take the part read
                piece = await reader.read(exc.consumed)
            except asyncio.IncompleteReadError:
                raise ConnectionResetError("connection closed during DATA") from None
            if not piece:
                raise ConnectionResetError("connection closed during DATA")
            if line_start:
                if piece == b".\r\n":
                    return
                if piece[:1] == b".":
                    piece = piece[1:]
            line_start = piece[-2:] == b"\r\n"
            spool.write(piece)

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
        self.limits = limits.for_scanner(scanner)

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
    limits.start(loop)

    def factory() -> FilterSMTP:
        return server_class(handler, line_length=settings.smtp.max_line_length,
                            decode_data=False, enable_SMTPUTF8=True,
                            data_size_limit=settings.smtp.max_message_size,
                            hostname=settings.hostname, ident="filterd", timeout=300)

    server = await loop.create_server(factory, host=host.strip("[]"), port=int(port))
    log.info("after-queue filter listening on %s (%s), reinjecting to %s", listen,
             "LMTP" if lmtp else "SMTP", settings.smtp.reinject)
    return server
