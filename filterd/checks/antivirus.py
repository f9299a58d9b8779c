"""ClamAV: send the whole raw message to clamd over INSTREAM and report what it found.

Trusts: clamd's answer, and nothing else. The message goes to clamd as received (clamd decodes
MIME, base64, uuencode and archives itself, with `ScanMail yes`), never the parser's truncated
copy. A dead, slow or confused clamd is never read as "clean": every way the scan can fail ends
in CLAM_UNAVAILABLE, and what that does (tempfail by default) is data in rules/antivirus.toml
[failures], not code.

A message whose MIME structure can be read in more than one way (two Content-Type headers, two
boundaries, a bare CR that ends the parser's header block: filterd.message.mime) may be read by
clamd one way and by the recipient's client another. For such a message every part of every reading is also sent to clamd on its own
(decoded; at most MAX_READING_SCANS parts), so no reading hides a virus from it.

Reads: clamav.socket, clamav.tcp (TCP wins when set), clamav.connect_timeout, clamav.timeout,
clamav.stream_max_length, clamav.max_connections, scan.max_mime_depth.

Emits:
  CLAM_VIRUS        clamd found something (options: the signature names)
  CLAM_UNAVAILABLE  clamd down, refused, timed out or answered with an error (options: reason)
  CLAM_OVERSIZE     the message is larger than clamd's StreamMaxLength (clamav.stream_max_length),
                    or clamd said so; it was not scanned (options: size, limit)
  __CLAM_CLEAN      clamd scanned the whole message and found nothing (helper, unscored: it tells
                    the header builder that "X-Virus-Status: Clean" is true)

pyclamd does the protocol; it runs in a small thread pool of its own (one thread per connection
in the budget), so the event loop never blocks on a socket. The budget (an asyncio semaphore of
clamav.max_connections) keeps a burst of messages from opening hundreds of connections to clamd;
a message waiting for a slot waits inside its own deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import pyclamd

from filterd.actions.headers import HEADER_BUILDERS
from filterd.message import MessageView, mime, parse
from filterd.pipeline import Phase, ScanContext, check
from filterd.policy import Symbol, Verdict

log = logging.getLogger("filterd.antivirus")

SYMBOLS = ("CLAM_VIRUS", "CLAM_UNAVAILABLE", "CLAM_OVERSIZE", "__CLAM_CLEAN")
# clamd's own words for a stream over its StreamMaxLength.
_CLAMD_SIZE_LIMIT = "INSTREAM size limit exceeded"
# INSTREAM chunk size: large enough that a 25 MB message is a few hundred writes.
_CHUNK = 64 * 1024
# Our own scan timeout must fire before the pipeline's per-check timeout does: that one would
# only add a zero-score CHECK_TIMEOUT and let an unscanned message through.
_TIMEOUT_MARGIN = 0.25
# Parts of an ambiguous message scanned one by one: the first ones of every reading. A message
# with more readings than this is held anyway (MIME_READINGS_LIMIT / the forced table).
MAX_READING_SCANS = 32


@dataclass(frozen=True, slots=True)
class ScanReport:
    """What one INSTREAM scan gave: exactly one of the three outcomes is set."""

    viruses: tuple[str, ...] = ()      # signature names; () and no error = clean
    error: str | None = None           # why clamd could not scan it (unavailable)
    oversize: bool = False             # clamd refused the stream as too long
    seconds: float = 0.0


class _SendAllSocket:
    """A socket whose send() is sendall().

    pyclamd writes each INSTREAM chunk with socket.send(), which may write only part of it on
    a socket with a timeout (a non-blocking socket underneath); the rest would be lost and
    clamd would read garbage lengths. sendall() finishes the write or raises.
    """

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def send(self, data: bytes) -> int:
        self._sock.sendall(data)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Timeouts:
    """Connect with the short timeout, then read and write with the scan's own budget."""

    connect_timeout: float = 5.0
    io_timeout: float = 30.0
    timeout: float | None

    def _init_socket(self) -> None:
        self.timeout = self.connect_timeout
        super()._init_socket()  # type: ignore[misc]
        self.clamd_socket.settimeout(self.io_timeout)
        self.clamd_socket = _SendAllSocket(self.clamd_socket)


class _UnixClamd(_Timeouts, pyclamd.ClamdUnixSocket):
    pass


class _TcpClamd(_Timeouts, pyclamd.ClamdNetworkSocket):
    pass


class ClamdClient:
    """A clamd reached over a unix socket or TCP, used from the event loop.

    `scan(data)` never raises for clamd's sake: it returns a ScanReport. The pyclamd object is
    made on first use and again after a failure (its constructor connects once to test the
    socket, so a clamd that is down when filterd starts is simply retried per message).
    """

    def __init__(self, *, socket_path: str = "", tcp: str = "", connect_timeout: float = 5.0,
                 timeout: float = 30.0, stream_max_length: int = 25 * 1024 * 1024,
                 max_connections: int = 4):
        if not socket_path and not tcp:
            raise ValueError("clamd needs clamav.socket or clamav.tcp")
        self.socket_path = socket_path
        self.tcp = tcp
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.stream_max_length = stream_max_length
        self.max_connections = max_connections
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_connections, thread_name_prefix="clamd")
        self._slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._pyclamd: Any = None

    @classmethod
    def from_settings(cls, settings: Any) -> "ClamdClient":
        clamav = settings.clamav
        return cls(socket_path=clamav.socket, tcp=clamav.tcp,
                   connect_timeout=clamav.connect_timeout, timeout=clamav.timeout,
                   stream_max_length=clamav.stream_max_length,
                   max_connections=clamav.max_connections)

    @property
    def address(self) -> str:
        return f"tcp:{self.tcp}" if self.tcp else f"unix:{self.socket_path}"

    # --- blocking side (worker threads) ----------------------------------------------------
    def _connect(self) -> Any:
        with self._lock:
            if self._pyclamd is None:
                if self.tcp:
                    host, _, port = self.tcp.rpartition(":")
                    conn = _TcpClamd.__new__(_TcpClamd)
                    conn.connect_timeout = conn.io_timeout = self.connect_timeout
                    conn.__init__(host.strip("[]"), int(port), timeout=self.connect_timeout)
                else:
                    conn = _UnixClamd.__new__(_UnixClamd)
                    conn.connect_timeout = conn.io_timeout = self.connect_timeout
                    conn.__init__(self.socket_path, timeout=self.connect_timeout)
                self._pyclamd = conn
            return self._pyclamd

    def _new_connection(self, io_timeout: float) -> Any:
        """A pyclamd object of our own for one scan (its socket is an attribute of it)."""
        conn = copy.copy(self._connect())
        conn.connect_timeout = min(self.connect_timeout, io_timeout)
        conn.io_timeout = io_timeout
        return conn

    def scan_blocking(self, data: bytes, timeout: float) -> ScanReport:
        """One INSTREAM scan, in the calling thread; bounded by connect_timeout and timeout."""
        started = time.monotonic()
        try:
            conn = self._new_connection(timeout)
            try:
                result = conn.scan_stream(data, chunk_size=_CHUNK)
            except (BrokenPipeError, ConnectionResetError):
                # clamd hangs up mid-stream when it passes StreamMaxLength, after saying so
                if _CLAMD_SIZE_LIMIT in _leftover_reply(conn):
                    return ScanReport(oversize=True, seconds=time.monotonic() - started)
                raise
            finally:
                sock = getattr(conn, "clamd_socket", None)
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass
        except pyclamd.BufferTooLongError:
            return ScanReport(oversize=True, seconds=time.monotonic() - started)
        except (socket.timeout, TimeoutError):
            self._forget()
            return ScanReport(error=f"timeout after {time.monotonic() - started:.1f}s",
                              seconds=time.monotonic() - started)
        except pyclamd.ConnectionError as exc:
            self._forget()
            return ScanReport(error=_short(exc), seconds=time.monotonic() - started)
        except OSError as exc:
            self._forget()
            return ScanReport(error=f"{type(exc).__name__}: {exc.strerror or exc}",
                              seconds=time.monotonic() - started)
        except Exception as exc:  # a garbled answer pyclamd cannot parse, and the like
            self._forget()
            return ScanReport(error=f"{type(exc).__name__}: {exc}",
                              seconds=time.monotonic() - started)
        return _report(result, time.monotonic() - started)

    def _forget(self) -> None:
        with self._lock:
            self._pyclamd = None

    def ping_blocking(self) -> bool:
        try:
            return bool(self._new_connection(self.connect_timeout).ping())
        except Exception:
            self._forget()
            return False

    # --- event-loop side ---------------------------------------------------------------------
    def _budget(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots_loop is not loop:
            self._slots = asyncio.Semaphore(self.max_connections)
            self._slots_loop = loop
        return self._slots

    async def scan(self, data: bytes, *, timeout: float | None = None) -> ScanReport:
        """Scan bytes without blocking the loop; waits for a slot in the connection budget."""
        budget = self.timeout if timeout is None else min(timeout, self.timeout)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(budget):
                async with self._budget():
                    remaining = budget - (loop.time() - started)
                    # the thread is bounded by its socket timeouts; the asyncio timeout above
                    # is the backstop for the loop's side
                    return await loop.run_in_executor(self._executor, self.scan_blocking,
                                                      data, remaining)
        except TimeoutError:
            return ScanReport(error=f"timeout after {budget:.1f}s (waiting for clamd or a "
                                    f"free connection)", seconds=loop.time() - started)

    async def ping(self) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.ping_blocking)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _leftover_reply(conn: Any) -> str:
    """Whatever clamd wrote before it closed the connection ('' if nothing can be read)."""
    sock = getattr(conn, "clamd_socket", None)
    if sock is None:
        return ""
    try:
        sock.settimeout(1.0)
        return sock.recv(4096).decode("utf-8", "replace")
    except OSError:
        return ""


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


def _report(result: Any, seconds: float) -> ScanReport:
    """pyclamd's scan_stream answer: None (clean) or {name: ('FOUND'|'ERROR', reason)}."""
    if not result:
        return ScanReport(seconds=seconds)
    viruses: list[str] = []
    errors: list[str] = []
    for status, reason in result.values():
        if status == "FOUND":
            viruses.append(str(reason))
        elif _CLAMD_SIZE_LIMIT in str(reason):
            return ScanReport(oversize=True, seconds=seconds)
        else:
            errors.append(f"clamd error: {reason}")
    if viruses:
        return ScanReport(viruses=tuple(dict.fromkeys(viruses)), seconds=seconds)
    return ScanReport(error="; ".join(errors)[:200] or "clamd error", seconds=seconds)


def make_client(settings: Any) -> ClamdClient:
    """Service factory: the daemon's one clamd client (SERVICE_FACTORIES["clamd"])."""
    return ClamdClient.from_settings(settings)


def _register_service() -> None:
    from filterd.service import SERVICE_FACTORIES
    SERVICE_FACTORIES.setdefault("clamd", make_client)


def _own_check_timeout(ctx: ScanContext) -> float:
    """The pipeline's timeout for our binding (its own, else scan.check_timeout)."""
    default = float(ctx.settings.scan.check_timeout)
    for binding in getattr(ctx.ruleset, "bindings", ()):
        if binding.function == "clamav" and binding.enabled:
            return float(binding.timeout or default)
    return default


@check("clamav", phase=Phase.MAIN, network=True, symbols=SYMBOLS)
async def clamav(msg: MessageView, ctx: ScanContext) -> list[Symbol]:
    client = ctx.clamd or ctx.services.get("clamd")
    if client is None:
        return [Symbol("CLAM_UNAVAILABLE", ("no clamd client configured",))]
    size = len(msg.raw)
    limit = client.stream_max_length
    if size > limit:
        return [Symbol("CLAM_OVERSIZE", (f"size={size}", f"limit={limit}"))]
    budget = min(_own_check_timeout(ctx), ctx.remaining()) - _TIMEOUT_MARGIN
    if budget <= 0:
        return [Symbol("CLAM_UNAVAILABLE", ("no time left in the message deadline",))]
    loop = asyncio.get_running_loop()
    started = loop.time()
    report = await client.scan(msg.raw, timeout=budget)
    if not report.viruses and report.error is None and not report.oversize:
        depth = mime.configured_depth(ctx)
        other_readings = ctx.notes.get(mime.OTHER_READINGS_NOTE)
        if other_readings is None:  # no sanity check bound: walk the message here
            other_readings = mime.has_other_readings(msg, depth)
        if other_readings:
            report = await _scan_readings(client, msg, depth, budget - (loop.time() - started))
    ctx.notes["clamav_seconds"] = loop.time() - started
    if report.viruses:
        return [Symbol("CLAM_VIRUS", report.viruses)]
    if report.oversize:
        return [Symbol("CLAM_OVERSIZE", (f"size={size}", "limit=clamd StreamMaxLength"))]
    if report.error is not None:
        log.warning("clamd at %s unavailable: %s", client.address, report.error)
        return [Symbol("CLAM_UNAVAILABLE", (report.error,))]
    return [Symbol("__CLAM_CLEAN")]


def _reading_payloads(msg: MessageView, depth: int) -> list[bytes]:
    """The decoded parts of every MIME reading of the whole message (blocking: decodes)."""
    primary = None
    if msg.truncated:
        primary = parse(msg.raw, msg.envelope, content_limit=len(msg.raw) + 1).parts
    payloads = [p.payload for p in msg.reading_parts(depth, primary=primary)]
    return [p for p in payloads if p][:MAX_READING_SCANS]


async def _scan_readings(client: ClamdClient, msg: MessageView, depth: int,
                         budget: float) -> ScanReport:
    """Each part of every reading of an ambiguous message, scanned on its own; the first
    virus, error or oversize answer ends it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    payloads = await loop.run_in_executor(None, _reading_payloads, msg, depth)
    for payload in payloads:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return ScanReport(error="no time left to scan every MIME reading")
        report = await client.scan(payload, timeout=remaining)
        if report.viruses or report.error is not None or report.oversize:
            return report
    return ScanReport()


# --- headers ---------------------------------------------------------------------------------

def virus_headers(view: MessageView, verdict: Verdict, settings: Any) -> list[tuple[str, str]]:
    """X-Virus-Scanned (amavis' format; "unchecked" or "skipped (size)" for a partial scan) and
    X-Virus-Status as clamav-milter writes it.

    Only when the antivirus check ran: a rule set without it adds neither header. A delivered
    message with CLAM_VIRUS exists only when a site chose to deliver viruses (forced action
    changed): it is then marked Infected.
    """
    names = {s.name for s in verdict.symbols}
    out: list[tuple[str, str]] = []
    if "CLAM_UNAVAILABLE" in names:
        # the site configured CLAM_UNAVAILABLE to accept (or quarantine for release): say so
        out.append(("X-Virus-Scanned", "unchecked"))
    elif "CLAM_OVERSIZE" in names:
        out.append(("X-Virus-Scanned", "skipped (size)"))
    elif ("CLAM_VIRUS" in names or "__CLAM_CLEAN" in names) and settings.headers.virus_scanned:
        out.append(("X-Virus-Scanned",
                     settings.headers.virus_scanned.format(hostname=settings.hostname)))
    if "CLAM_VIRUS" in names:
        out.append(("X-Virus-Status", f"Infected ({', '.join(verdict.virus_names)})"))
    elif "__CLAM_CLEAN" in names:
        out.append(("X-Virus-Status", "Clean"))
    return out


_register_service()
if virus_headers not in HEADER_BUILDERS:
    HEADER_BUILDERS.append(virus_headers)
