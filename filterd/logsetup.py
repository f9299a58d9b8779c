"""Logging to stderr (journald picks it up under systemd), syslog, or journald's native socket.

Trusts: nothing; a log target that cannot be reached falls back to stderr with a warning, so
a missing /dev/log never stops the daemon.
Reads: log.level, log.target, log.syslog_address, log.syslog_facility.

The per-message line (filterd.service.Scanner.log_message) carries its fields as the record's
`filterd` attribute. With log.target = journald each field is also sent as a journal field
(FILTERD_QUEUE_ID, FILTERD_ACTION, FILTERD_SCORE, ...), so `journalctl FILTERD_ACTION=reject`
works without parsing the line.

Every handler formats through SafeFormatter: a record's line is one line whatever its fields
hold (a Subject, HELO or Message-ID with CR/LF cannot forge a second log line, an ESC sequence
cannot act on the terminal of whoever reads the log); control characters show as \x1b, \x0a
(filterd.textsafe). A traceback keeps its own lines, each indented, so none of them can pass
for a record either.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import socket
import sys
from typing import Any

from filterd.textsafe import visible

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# logging level -> syslog priority (journal PRIORITY field)
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}
_FIELD_NAME = re.compile(r"[^A-Z0-9_]")


def _journal_field(name: str, value: Any) -> bytes:
    """One field in the journal's native format (binary-safe form when it holds a newline)."""
    key = _FIELD_NAME.sub("_", name.upper()).lstrip("_")[:64].encode("ascii")
    data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
    if b"\n" in data:
        return key + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
    return key + b"=" + data + b"\n"


class SafeFormatter(logging.Formatter):
    """A formatter whose record line is one line with control characters escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return visible(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join(line if line.startswith((" ", "\t")) else "  " + line
                     for line in visible(text, multiline=True).splitlines())


class JournalHandler(logging.Handler):
    """Sends records to systemd-journald over its native datagram socket (no dependency)."""

    def __init__(self, path: str | None = None, identifier: str = "filterd"):
        super().__init__()
        self.path, self.identifier = path or JOURNAL_SOCKET, identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.connect(self.path)  # raises OSError when journald is not there: caller falls back

    def payload(self, record: logging.LogRecord) -> bytes:
        fields = [
            _journal_field("MESSAGE", self.format(record)),
            _journal_field("PRIORITY", _PRIORITY.get(record.levelno, 6)),
            _journal_field("SYSLOG_IDENTIFIER", self.identifier),
            _journal_field("SYSLOG_PID", os.getpid()),
            _journal_field("LOGGER", record.name),
            _journal_field("CODE_FILE", record.pathname),
            _journal_field("CODE_LINE", record.lineno),
            _journal_field("CODE_FUNC", record.funcName),
        ]
        extra = getattr(record, "filterd", None)
        if isinstance(extra, dict):
            # values the sender chose (from, helo, message_id) are escaped like the line
            fields.extend(_journal_field(f"FILTERD_{k}", visible(v)) for k, v in extra.items()
                          if not isinstance(v, (dict, list)))
        return b"".join(fields)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.send(self.payload(record))
        except OSError:
            # a datagram too large for the socket buffer, or journald restarting: never let
            # logging hurt mail flow
            self.handleError(record)

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            super().close()


def _syslog_handler(settings: Any) -> logging.Handler:
    address_text = settings.log.syslog_address if settings else "/dev/log"
    facility = getattr(logging.handlers.SysLogHandler,
                       f"LOG_{(settings.log.syslog_facility if settings else 'mail').upper()}")
    address: Any = address_text
    if not address_text.startswith("/"):
        host, _, port = address_text.rpartition(":")
        address = (host.strip("[]"), int(port))
    handler = logging.handlers.SysLogHandler(address=address, facility=facility)
    handler.setFormatter(SafeFormatter("filterd[%(process)d]: %(name)s: %(message)s"))
    return handler


def setup(settings: Any | None = None, *, level: str | None = None) -> None:
    lvl = (level or (settings.log.level if settings else "info")).upper()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    target = settings.log.target if settings else "stderr"
    problem = None
    handler: logging.Handler | None = None
    if target == "syslog":
        try:
            handler = _syslog_handler(settings)
        except (OSError, ValueError) as exc:
            problem = f"syslog at {settings.log.syslog_address} unreachable ({exc})"
    elif target == "journald":
        try:
            handler = JournalHandler()
            handler.setFormatter(SafeFormatter("%(name)s: %(message)s"))
        except OSError as exc:
            problem = f"journald socket {JOURNAL_SOCKET} unreachable ({exc.strerror or exc})"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(lvl)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    if problem:
        logging.getLogger("filterd.logsetup").warning("%s; logging to stderr instead", problem)
