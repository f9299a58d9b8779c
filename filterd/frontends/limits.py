"""Memory bounds of the front ends: what one message may buffer, what all may hold at once.

Trusts: nothing; every byte counted here came from a client of a front end.
Reads: daemon.pending_data_limit (one budget shared by the SMTP, LMTP and milter front ends
of one Scanner), smtp.max_connections.

A message's data goes into a MessageSpool as it arrives: in memory up to SPOOL_MEMORY, past
that into an unlinked temporary file (TMPDIR; the systemd unit gives filterd a private /tmp), so
a slow or stalled sender of a large message holds disk, not heap. Every byte is charged to the
DataBudget from its arrival until the front end has answered for the message (scanned,
reinjected, quarantined or refused), because the scan reads the whole message into memory.
A message that would overdraw the budget is refused with a tempfail (Postfix retries); one
message alone may always use up to its front end's size limit, so a message the size limits
allow is never refused forever.

Freed message buffers go back to the allocator, which may keep them. glibc raises its mmap
threshold to the size of each large block freed (up to 32 MiB), after which message-sized
buffers come from the heaps, and the heaps of libmilter's threads are not trimmed below twice
that: eight 20 MB messages through the milter left RSS 60-140 MB above its start for good.
start() therefore fixes the threshold at MMAP_THRESHOLD (blocks that large are mapped and
unmapped whole), and trim_soon() runs malloc_trim(0) once large releases have stopped for a
second; with both, RSS is back within a few MB of its start (figures in docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import enum
import tempfile
import threading
import time
import weakref
from typing import Any

SPOOL_MEMORY = 1024 * 1024       # bytes of one message kept in memory before spooling to disk
CHARGE_STEP = 64 * 1024          # the budget is charged in steps, not per line
TRIM_DELAY = 1.0                 # seconds without a large release before malloc_trim
TRIM_AFTER = 256 * 1024          # releasing at least this much asks for a trim
# glibc: blocks this large are always mmap()ed. Not lower: asyncio's recv() allocates 256 KiB
# per read, and mapping each of those cost ~25 % on small messages after queue
MMAP_THRESHOLD = 1024 * 1024


class SpoolState(enum.Enum):
    OK = "ok"
    TOO_BIG = "over the size limit"
    NO_MEMORY = "over the pending data budget"
    TOO_MANY_FIELDS = "over the header field limit"


class DataBudget:
    """Bytes of message data held by the front ends at once (thread-safe: the milter's
    callbacks run in libmilter's threads, the SMTP front end on the event loop)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int, held: int = 0) -> bool:
        """Charge `n` more bytes to a holder that already has `held`; a holder alone may
        always grow (its own size limit bounds it)."""
        with self._lock:
            if self.used - held > 0 and self.used + n > self.limit:
                return False
            self.used += n
            return True

    def fits(self, n: int) -> bool:
        """Whether a new message of `n` bytes could be taken now (SMTP's MAIL FROM SIZE=)."""
        with self._lock:
            return self.used == 0 or self.used + n <= self.limit

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class ConnectionSlots:
    """A cap on concurrent connections (thread-safe)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.used -= 1


class FrontendLimits:
    """The shared bounds of one Scanner's front ends."""

    def __init__(self, settings: Any):
        self.budget = DataBudget(settings.daemon.pending_data_limit)
        self.smtp_connections = ConnectionSlots(settings.smtp.max_connections)


_BY_SCANNER: "weakref.WeakKeyDictionary[Any, FrontendLimits]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_DEFAULT: FrontendLimits | None = None


def for_scanner(scanner: Any) -> FrontendLimits:
    """The one FrontendLimits of `scanner` (all its listeners share it); None: the defaults."""
    global _DEFAULT
    with _LOCK:
        if scanner is None:
            if _DEFAULT is None:
                from filterd import config
                _DEFAULT = FrontendLimits(config.defaults())
            return _DEFAULT
        limits = _BY_SCANNER.get(scanner)
        if limits is None:
            limits = _BY_SCANNER[scanner] = FrontendLimits(scanner.settings)
        return limits


class MessageSpool:
    """One message's data as it arrives, charged to `budget` until close().

    Past `max_size` bytes, or when the budget cannot take more, the data so far is dropped
    and the rest only counted: `state` says why, and the front end answers at the end of the
    message (SMTP must read DATA to its end before it may reply)."""

    def __init__(self, budget: DataBudget, max_size: int):
        self.budget, self.max_size = budget, max_size
        self.size = 0
        self.charged = 0
        self.state = SpoolState.OK
        self._file: Any = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.state is not SpoolState.OK:
            return
        if self.size > self.max_size:
            self.fail(SpoolState.TOO_BIG)
            return
        if self.size > self.charged:
            step = min(max(self.size - self.charged, CHARGE_STEP),
                       self.max_size - self.charged)
            if not self.budget.take(step, self.charged):
                self.fail(SpoolState.NO_MEMORY)
                return
            self.charged += step
        try:
            self._file.write(data)
        except OSError:  # the spool's disk is full: no room is no room
            self.fail(SpoolState.NO_MEMORY)

    def getvalue(self) -> bytes:
        """The whole message in one allocation (the scan needs it in memory); the charge
        stays until close()."""
        if self._file is None:
            raise ValueError("spool already dropped")
        self._file.seek(0)
        data = self._file.read()
        self._file.close()
        self._file = None
        return data

    def fail(self, state: SpoolState) -> None:
        """Refuse the message: drop what it holds, only count what still comes."""
        if self.state is SpoolState.OK:
            self.state = state
        self.close()

    def close(self) -> None:
        """Drop the data and give its charge back (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.charged:
            self.budget.give(self.charged)
            if self.charged >= TRIM_AFTER:
                trim_soon()
            self.charged = 0


# --- giving memory back to the system ---------------------------------------------------
def _glibc(name: str) -> Any:
    """A glibc allocator function, or None elsewhere (musl, macOS: nothing to tune)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")
M_MMAP_THRESHOLD = -3  # <malloc.h>
_trim_loop: asyncio.AbstractEventLoop | None = None
_trim_pending = threading.Event()
_last_release = 0.0
_tuned = False


def start(loop: asyncio.AbstractEventLoop) -> None:
    """Tune the allocator once per process and run the delayed trims on `loop` (the
    daemon's); every front end calls it when it starts."""
    global _trim_loop, _tuned
    _trim_loop = loop
    if not _tuned and _MALLOPT is not None:
        _MALLOPT.argtypes, _MALLOPT.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        _MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    _tuned = True


def release_memory() -> None:
    """Return the allocator's free pages to the system now (glibc: all arenas)."""
    if _TRIM is not None:
        _TRIM.argtypes, _TRIM.restype = [ctypes.c_size_t], ctypes.c_int
        _TRIM(0)


def trim_soon() -> None:
    """Ask, from any thread, for one release_memory() once no large release came for
    TRIM_DELAY seconds. A trim walks every arena (117 ms on a fragmented 364 MB heap, on the
    loop), so under steady load, when freed memory is reused anyway, it never runs; after a
    burst it runs once. It is worth 1-2 MB of RSS after a burst (the fixed mmap threshold
    does the rest)."""
    global _last_release
    _last_release = time.monotonic()
    loop = _trim_loop
    if _TRIM is None or loop is None or loop.is_closed() or _trim_pending.is_set():
        return
    _trim_pending.set()
    try:
        loop.call_soon_threadsafe(loop.call_later, TRIM_DELAY, _trim_when_quiet, loop)
    except RuntimeError:  # loop closed meanwhile
        _trim_pending.clear()


def _trim_when_quiet(loop: asyncio.AbstractEventLoop) -> None:
    wait = _last_release + TRIM_DELAY - time.monotonic()
    if wait > 0:
        loop.call_later(wait, _trim_when_quiet, loop)
        return
    _trim_pending.clear()
    release_memory()
