"""Milter front end (Postfix smtpd_milters / non_smtpd_milters), the only importer of pymilter.

Trusts: the MTA (connect data, macros). libmilter runs each SMTP connection in its own
thread; each callback here is cheap except end-of-message, which hands the buffered message to
the Scanner on the daemon's event loop and waits for the result with a deadline (_Handoff).
Negotiation asks the MTA to skip the steps filterd does nothing at (DATA, unknown commands,
end of headers) and not to wait for a reply to connect/HELO/MAIL/RCPT/header/body steps.
Reads: milter.listen, milter.socket_group, milter.timeout, milter.quarantine_reply,
milter.max_message_size, milter.max_headers, daemon.pending_data_limit, scan.deadline.
A unix milter socket is created 0660 in milter.socket_group (filterd.modes).

Memory bounds (filterd.frontends.limits): header lines and body chunks go into a spool (memory,
then an unlinked temporary file) charged to the pending data budget shared with the SMTP front
end. Callbacks before end of message do not reply (NR_* negotiated), so a limit is answered
at end of message: over milter.max_message_size 552 5.3.4, over milter.max_headers 552 5.6.0
(both REJECT), over the budget 452 4.3.1 (TEMPFAIL: the client retries). Past a limit nothing
more is buffered.

Outcomes: headers and subject are edited at end of message; REJECT answers
550 5.7.1 <reason>; TEMPFAIL answers 451 4.7.1; quarantine stores durably, then DISCARDs.
Any internal error or a missed deadline is a TEMPFAIL: never an accept of unscanned mail.

Mixed recipients (docs/policy.md): when recipients' policies differ, recipients whose copy is
held (quarantined in one item) or discarded are removed with smfi_delrcpt and the others are
delivered with the header edits of the most severe delivered group; when every recipient
rejects, the message is rejected. Policy banks may select on the macros {daemon_name},
{daemon_port}, {auth_authen}.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import threading
import time
from typing import Any

import Milter

from filterd.actions.headers import HeaderEdits, fold
from filterd.frontends import limits
from filterd.frontends.limits import MessageSpool, SpoolState
from filterd.message import Envelope
from filterd.policy import Action

log = logging.getLogger("filterd.milter")

# Actions we may take; negotiated with the MTA (ask only for what we use).
FLAGS = Milter.ADDHDRS | Milter.CHGHDRS | Milter.ADDRCPT | Milter.DELRCPT
# Macros read once per message at end of message (policy banks select on them; "i" is the
# queue ID), each asked of libmilter once.
ENVELOPE_MACROS = ("{daemon_name}", "{daemon_port}", "{auth_type}", "{auth_authen}", "j", "i",
                   "{client_addr}")

_scanner: Any = None
_loop: asyncio.AbstractEventLoop | None = None
_GRACE = 5.0  # seconds beyond the scan deadline before eom gives up and tempfails


def _settings() -> Any:
    """The running scanner's settings (the defaults before run(), as in unit tests)."""
    return _scanner.settings if _scanner is not None else _default_settings()


@functools.cache
def _default_settings() -> Any:
    from filterd import config
    return config.defaults()


def _escape_reply(text: str) -> str:
    # libmilter drops a reply containing a single '%'; keep replies printable ASCII
    clean = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return clean.replace("%", "%%")[:400]


def _milter_value(name: str, value: str) -> str:
    """A header value folded for the milter protocol (continuations as \\n\\t)."""
    try:
        value.encode("ascii")
    except UnicodeEncodeError:
        from email.header import Header
        value = Header(value, "utf-8").encode()
    folded = fold(name, value, b"\n").decode("ascii", "replace").rstrip("\n")
    return folded[len(name) + 2:]


class FilterMilter(Milter.Base):
    def __init__(self) -> None:
        self.id = Milter.uniqueID()
        self.client_ip: str | None = None
        self.client_name: str | None = None
        self.helo: str | None = None
        self._reset()

    def _reset(self) -> None:
        self.mail_from = ""
        self.rcpts: list[str] = []
        self.rcpts_as_sent: dict[str, str] = {}  # address -> as the MTA gave it (delrcpt)
        spool = getattr(self, "message", None)
        if spool is not None:
            spool.close()
        # the message as it arrives: header lines, then (from the first body chunk) the
        # separator and the body; created at the first header
        self.message: MessageSpool | None = None
        self.header_count = 0
        self.in_body = False
        self.auth: str | None = None

    def _spool(self) -> MessageSpool:
        if self.message is None:
            self.message = MessageSpool(limits.for_scanner(_scanner).budget,
                                        _settings().milter.max_message_size)
        return self.message

    @Milter.noreply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.client_name = hostname if hostname and not hostname.startswith("[") else None
        self.client_ip = hostaddr[0] if isinstance(hostaddr, tuple) and hostaddr else None
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, hostname: str) -> int:
        self.helo = hostname
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, mailfrom: str, *params: str) -> int:
        self._reset()
        self.mail_from = mailfrom.strip().strip("<>")
        self.auth = self.getsymval("{auth_authen}") or None
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, to: str, *params: str) -> int:
        address = to.strip().strip("<>")
        self.rcpts.append(address)
        self.rcpts_as_sent.setdefault(address, to.strip())
        return Milter.CONTINUE

    def header_bytes(self, name: bytes | str, value: bytes) -> int:
        # raw bytes: 8-bit junk in headers stays exactly as sent
        if isinstance(name, str):
            name = name.encode("ascii", "surrogateescape")
        if b"\n" in value:  # folded: continuation lines end in CRLF like the rest
            value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self.header_count += 1
        spool = self._spool()
        if self.header_count > _settings().milter.max_headers:
            spool.fail(SpoolState.TOO_MANY_FIELDS)
        else:
            spool.write(name + b": " + value + b"\r\n")
        # No reply per header (P_NR_HDR, negotiated through `header` below): the MTA streams
        # the headers instead of waiting for an answer to each one.
        return Milter.NOREPLY if self._protocol & Milter.P_NR_HDR else Milter.CONTINUE

    @Milter.noreply
    def header(self, name: str, value: str) -> int:
        # pymilter asks the MTA to skip the header stage (P_NOHDRS) unless `header` itself is
        # overridden, and to wait for a reply per header unless it is @noreply; the bytes
        # entry point above is the one runmilter calls.
        self.header_bytes(name, value.encode("utf-8", "surrogateescape"))
        return Milter.CONTINUE

    # No `eoh` override: Milter.Base's is @nocallback, so the MTA is asked not to send the
    # end-of-headers step at all (P_NOEOH); nothing happens there that `body`/`eom` need.

    @Milter.noreply
    def body(self, chunk: bytes) -> int:
        spool = self._spool()
        if not self.in_body:
            self.in_body = True
            spool.write(b"\r\n")
        spool.write(chunk)
        return Milter.CONTINUE

    def abort(self) -> int:
        # the MTA gave up on this message (RSET, client gone): its data goes now, not at the
        # next MAIL FROM of a connection that may idle for milter.timeout
        self._reset()
        return Milter.CONTINUE

    def close(self) -> int:
        self._reset()
        return Milter.CONTINUE

    def _envelope(self) -> Envelope:
        macros = []
        queue_id = None
        for name in ENVELOPE_MACROS:
            try:
                value = self.getsymval(name)
            except Exception:
                value = None
            if value:
                macros.append((name, value))
                if name == "i":
                    queue_id = value
        return Envelope(mail_from=self.mail_from, rcpt_tos=tuple(self.rcpts),
                        client_ip=self.client_ip, client_helo=self.helo,
                        client_name=self.client_name, queue_id=queue_id,
                        auth_user=self.auth, listener="milter", macros=tuple(macros))

    def eom(self) -> int:
        try:
            return self._eom()
        except Exception:
            log.exception("internal error at end of message; tempfailing")
            self.setreply("451", "4.7.1", "Internal error, try again later")
            return Milter.TEMPFAIL
        finally:
            self._reset()

    def _eom(self) -> int:
        spool = self._spool()
        if not self.in_body:
            spool.write(b"\r\n")
        if spool.state is not SpoolState.OK:
            log.warning("refused a message of %d bytes, %d header fields from %s: %s",
                        spool.size, self.header_count, self.client_ip, spool.state.value)
            if spool.state is SpoolState.NO_MEMORY:
                self.setreply("452", "4.3.1", "Insufficient system storage, try again later")
                return Milter.TEMPFAIL
            if spool.state is SpoolState.TOO_MANY_FIELDS:
                self.setreply("552", "5.6.0", "Too many header fields")
            else:
                self.setreply("552", "5.3.4", "Message size exceeds fixed limit")
            return Milter.REJECT
        # one copy of the message, read from the spool in one piece; the spool's charge to
        # the pending data budget stays until _reset, after the reply
        raw = spool.getvalue()
        envelope = self._envelope()
        scanner, loop = _scanner, _loop
        if scanner is None or loop is None:
            raise RuntimeError("milter started without a scanner")
        handoff = _Handoff(loop, _scan_and_dispose(scanner, raw, envelope))
        try:
            outcome, disposition = handoff.result(scanner.settings.scan.deadline + _GRACE)
        except Exception as exc:
            log.error("scan of %s did not finish: %s", envelope.queue_id or "message",
                      type(exc).__name__)
            self.setreply("451", "4.7.1", "Scan did not finish, try again later")
            return Milter.TEMPFAIL
        action = disposition.action
        if action is Action.REJECT:
            self.setreply("550", disposition.status, _escape_reply(disposition.text))
            return Milter.REJECT
        if action is Action.TEMPFAIL:
            self.setreply("451", "4.7.1", _escape_reply(disposition.text))
            return Milter.TEMPFAIL
        if action is Action.DISCARD:
            return Milter.DISCARD
        for address in disposition.remove_rcpts:  # held or dropped for these recipients
            self.delrcpt(self.rcpts_as_sent.get(address, f"<{address}>"))
        if disposition.edits is not None:
            self._apply(disposition.edits)
        return Milter.ACCEPT

    def _apply(self, edits: HeaderEdits) -> None:
        # remove from the highest index down, so earlier indices stay valid
        for name, index in sorted(edits.remove, key=lambda r: (r[0].lower(), -r[1])):
            self.chgheader(name, index, "")
        for name, value in edits.add:
            self.addheader(name, _milter_value(name, value))
        if edits.subject is not None:
            value = _milter_value("Subject", edits.subject)
            if edits.had_subject:
                self.chgheader("Subject", 1, value)
            else:
                self.addheader("Subject", value)


class _Handoff:
    """Run a coroutine on the daemon's loop from a libmilter thread and wait for its result.

    The same as asyncio.run_coroutine_threadsafe(...).result(timeout), with less machinery per
    message: one wake-up of the loop (call_soon_threadsafe) to start the task, and a plain lock
    the task's done-callback releases, instead of a concurrent Future chained to an asyncio
    Future through further thread-safe callbacks. On timeout the task is cancelled on the loop.
    """

    __slots__ = ("_loop", "_coro", "_task", "_done", "_result", "_error")

    def __init__(self, loop: asyncio.AbstractEventLoop, coro: Any) -> None:
        self._loop, self._coro = loop, coro
        self._task: asyncio.Task[Any] | None = None
        self._done = threading.Lock()
        self._done.acquire()  # released once, by _finish, on the loop
        self._result: Any = None
        self._error: BaseException | None = None
        try:
            loop.call_soon_threadsafe(self._start)
        except RuntimeError:  # loop closed: the coroutine will never run
            coro.close()
            raise

    def _start(self) -> None:
        try:
            self._task = self._loop.create_task(self._coro)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self._coro.close()
            self._error = exc
            self._done.release()
            return
        self._task.add_done_callback(self._finish)

    def _finish(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self._error = asyncio.CancelledError()
        elif task.exception() is not None:
            self._error = task.exception()
        else:
            self._result = task.result()
        self._done.release()

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
        # (_start ran first: both were queued on the loop in order; a failed _start closed
        # the coroutine itself)

    def result(self, timeout: float) -> Any:
        if not self._done.acquire(timeout=timeout):
            try:
                self._loop.call_soon_threadsafe(self._cancel)
            except RuntimeError:  # loop closed
                pass
            raise TimeoutError(f"no result within {timeout:.1f}s")
        if self._error is not None:
            raise self._error
        return self._result


async def _scan_and_dispose(scanner: Any, raw: bytes, envelope: Envelope) -> tuple[Any, Any]:
    outcome = await scanner.scan(raw, envelope)
    disposition = await scanner.dispose(outcome, "milter")
    scanner.log_message(outcome, disposition, "milter")
    return outcome, disposition


def run(scanner: Any, loop: asyncio.AbstractEventLoop) -> threading.Thread:
    """Start libmilter in a thread of its own; the caller's thread keeps the event loop."""
    global _scanner, _loop
    _scanner, _loop = scanner, loop
    limits.start(loop)
    settings = scanner.settings
    Milter.factory = FilterMilter
    Milter.set_flags(FLAGS)
    open_socket(settings)

    def serve() -> None:
        try:
            # the socket is open already: libmilter keeps it (rmsock=False removes nothing)
            Milter.runmilter("filterd", settings.milter.listen, timeout=settings.milter.timeout,
                             rmsock=False)
        except Exception:
            log.exception("milter stopped with an error")
        finally:
            log.info("milter stopped")

    thread = threading.Thread(target=serve, name="milter", daemon=True)
    thread.start()
    port = _inet_port(settings.milter.listen)
    if port is not None:
        _disable_nagle(port)
    log.info("milter listening on %s", settings.milter.listen)
    return thread


def open_socket(settings: Any) -> None:
    """Open libmilter's listening socket in the caller's thread, before the MTA can connect,
    and give a unix socket its mode (0660) and milter.socket_group (filterd.modes).

    Raises OSError with the reason when the socket cannot be opened or given its group.
    """
    import milter

    from filterd.modes import MTA_SOCKET_MODE, group_id, set_socket_mode
    spec = settings.milter.listen
    path = unix_socket_path(spec)
    group = None
    if path is not None and settings.milter.socket_group:
        try:
            group = group_id(settings.milter.socket_group)
        except OSError as exc:
            raise OSError(f"milter.socket_group: {exc}") from None
    try:
        milter.setconn(spec)
        milter.register("filterd")   # smfi_opensocket needs a registered filter; runmilter
        milter.opensocket(True)      # registers again with the callbacks; True: stale socket
    except milter.error as exc:
        raise OSError(f"milter.listen {spec}: cannot open the socket ({exc})") from None
    if path is not None:
        set_socket_mode(path, MTA_SOCKET_MODE, group)


def unix_socket_path(spec: str) -> str | None:
    """The file of a libmilter unix socket spec (unix:/p, local:/p or /p); None for inet."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("unix", "local"):
        return rest
    return spec if spec.startswith("/") else None


def _inet_port(spec: str) -> int | None:
    kind, _, rest = spec.partition(":")
    if kind not in ("inet", "inet6"):
        return None
    port = rest.partition("@")[0]
    return int(port) if port.isdigit() else None


def _disable_nagle(port: int, wait: float = 5.0) -> bool:
    """Set TCP_NODELAY on libmilter's listening socket; accepted connections inherit it.

    At end of message the milter writes each header change as a small packet of its own. With
    Nagle's algorithm the second one waits for the MTA's delayed ACK, which adds ~40 ms to every
    message. libmilter offers no option for it, so find its socket among our descriptors.
    """
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        for fd in _socket_fds():
            try:
                sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            with sock:
                try:
                    if (sock.type == socket.SOCK_STREAM
                            and sock.family in (socket.AF_INET, socket.AF_INET6)
                            and sock.getsockname()[1] == port
                            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        return True
                except OSError:
                    continue
        time.sleep(0.02)
    log.warning("could not set TCP_NODELAY on the milter socket: replies may wait ~40 ms")
    return False


def _socket_fds() -> list[int]:
    fds = []
    for entry in os.scandir("/proc/self/fd"):
        try:
            if os.readlink(entry.path).startswith("socket:"):
                fds.append(int(entry.name))
        except OSError:
            continue
    return fds


def stop() -> None:
    """Ask libmilter to stop accepting connections, without waiting for it.

    smfi_stop() blocks until the listener's 5 s select timeout runs out; the daemon drains the
    messages in flight itself, so it need not wait here.
    """
    import milter

    def _stop() -> None:
        try:
            milter.stop()
        except Exception:
            pass

    threading.Thread(target=_stop, name="milter-stop", daemon=True).start()
