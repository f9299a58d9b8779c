"""Message sanity: header and MIME structure problems that mail clients tolerate and spam shows.

Trusts: nothing; reads the raw header block, the parser's defect list and the MIME structure
under every reading (filterd.message.mime: the whole message, not just the content prefix).
Settings: scan.max_mime_depth. Symbols (scores in rules/scores.toml, forced actions in
rules/actions.toml; bad-header ones feed the quarantine's "bad-header" category):
  MISSING_DATE, MISSING_MID, MISSING_FROM, MISSING_SUBJECT, FROM_MALFORMED, DATE_MALFORMED,
  HEADER_8BIT (raw 8-bit bytes in the header block), HEADER_DUPLICATE (options: header names),
  HEADER_LINE_TOO_LONG (over RFC 5322's 998), MESSAGE_NO_BODY (no header/body separator),
  MESSAGE_NUL_BYTES, MIME_DEFECT (options: defect names), MIME_BAD_BASE64,
  MIME_MISSING_BOUNDARY (a multipart without a boundary parameter, or never closed),
  MIME_NESTING_TOO_DEEP (past scan.max_mime_depth, or too deep for the parser),
  MIME_DUPLICATE_CONTENT_TYPE, MIME_DUPLICATE_TRANSFER_ENCODING, MIME_DUPLICATE_BOUNDARY,
  MIME_BOUNDARY_NOT_FOUND, MIME_READINGS_LIMIT (options: where, e.g. "message", "part 2.1"),
  __CONTENT_TRUNCATED (only the first scan.content_size_limit bytes were read by content checks).
Defects our own truncation causes (a cut base64 part, missing closing boundaries) are not
reported: see MessageView.defects.
"""

from __future__ import annotations

import email.utils
import re

from filterd.message import MessageView, mime
from filterd.pipeline import Phase, ScanContext, check
from filterd.policy import Symbol

_LONG_LINE = 999  # bytes without a newline (CR counts): over RFC 5322's 998
_ADDR = re.compile(r"[^@\s<>]+@[^@\s<>]+")
# RFC 5322 3.6: these may appear at most once.
_SINGLE = ("from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
           "in-reply-to", "references")
_BASE64_DEFECTS = {"InvalidBase64PaddingDefect", "InvalidBase64CharactersDefect",
                   "InvalidBase64LengthDefect"}
_BOUNDARY_DEFECTS = {"NoBoundaryInMultipartDefect", "CloseBoundaryNotFoundDefect"}
# The structure walk reports a boundary that never appears (MIME_BOUNDARY_NOT_FOUND) for every
# reading, and without truncation artefacts: the parser's view of it would count it twice.
# The invariant violation ("multipart" that is not) only follows from a missing boundary.
_STRUCTURE_DEFECTS = {"StartBoundaryNotFoundDefect", "MultipartInvariantViolationDefect"}
_HARMLESS_DEFECTS = {"MissingHeaderBodySeparatorDefect"}  # reported as MESSAGE_NO_BODY
_MAX_PLACES = 10  # options per structure symbol: the first few places explain it


def _has_long_line(head: bytes) -> bool:
    # splitting is linear; a regex for a run of 999 non-newlines retries at every byte
    return len(head) >= _LONG_LINE and max(map(len, head.split(b"\n"))) >= _LONG_LINE


def header_block(raw: bytes) -> tuple[bytes, bool]:
    """The raw header block and whether a header/body separator was found."""
    end = raw.find(b"\n\n")
    crlf = raw.find(b"\r\n\r\n")
    if crlf != -1 and (end == -1 or crlf < end):
        return raw[:crlf], True
    if end != -1:
        return raw[:end], True
    return raw, False


@check("sanity", phase=Phase.PRE, symbols=(
    "MISSING_DATE", "MISSING_MID", "MISSING_FROM", "MISSING_SUBJECT", "FROM_MALFORMED",
    "DATE_MALFORMED", "HEADER_8BIT", "HEADER_DUPLICATE", "HEADER_LINE_TOO_LONG",
    "MESSAGE_NO_BODY", "MESSAGE_NUL_BYTES", "MIME_DEFECT", "MIME_BAD_BASE64",
    "MIME_MISSING_BOUNDARY", "MIME_NESTING_TOO_DEEP", *mime.FINDING_SYMBOLS,
    "__CONTENT_TRUNCATED"))
def sanity(msg: MessageView, ctx: ScanContext) -> list[Symbol]:
    out: list[Symbol] = []
    head, has_body = header_block(msg.raw)
    # mbox-style files start with a "From " line that is not a header
    if head.startswith(b"From "):
        head = head[head.find(b"\n") + 1:]

    if not msg.has_header("Date"):
        out.append(Symbol("MISSING_DATE"))
    else:
        try:
            if email.utils.parsedate_tz(msg.first("Date")) is None:
                out.append(Symbol("DATE_MALFORMED"))
        except Exception:
            out.append(Symbol("DATE_MALFORMED"))
    if not msg.has_header("Message-ID"):
        out.append(Symbol("MISSING_MID"))
    if not msg.has_header("Subject"):
        out.append(Symbol("MISSING_SUBJECT"))
    if not msg.has_header("From"):
        out.append(Symbol("MISSING_FROM"))
    elif not _ADDR.search(msg.first("From")):
        out.append(Symbol("FROM_MALFORMED"))

    if not head.isascii():  # a byte in \x80-\xff, found in C without a regex
        out.append(Symbol("HEADER_8BIT"))
    dups = tuple(n for n in _SINGLE if len(msg.header_raw(n)) > 1)
    if dups:
        out.append(Symbol("HEADER_DUPLICATE", dups))
    if _has_long_line(head):
        out.append(Symbol("HEADER_LINE_TOO_LONG"))
    if not has_body:
        out.append(Symbol("MESSAGE_NO_BODY"))
    if b"\x00" in msg.raw:
        out.append(Symbol("MESSAGE_NUL_BYTES"))

    defects = set(msg.defects) - _STRUCTURE_DEFECTS
    if "NestingTooDeep" in defects or any(d.startswith("ParseError") for d in defects):
        out.append(Symbol("MIME_NESTING_TOO_DEEP" if "NestingTooDeep" in defects
                          else "MIME_DEFECT", tuple(sorted(defects))))
    else:
        if defects & _BASE64_DEFECTS:
            out.append(Symbol("MIME_BAD_BASE64"))
        if defects & _BOUNDARY_DEFECTS:
            out.append(Symbol("MIME_MISSING_BOUNDARY"))
        other = defects - _BASE64_DEFECTS - _BOUNDARY_DEFECTS - _HARMLESS_DEFECTS
        if other:
            out.append(Symbol("MIME_DEFECT", tuple(sorted(other))))
    depth = mime.configured_depth(ctx)
    emitted = {s.name for s in out}
    for name, places in msg.mime_structure(depth).symbols().items():
        if name not in emitted:
            out.append(Symbol(name, tuple(places[:_MAX_PLACES])))
    notes = getattr(ctx, "notes", None)
    if notes is not None:
        notes[mime.OTHER_READINGS_NOTE] = mime.has_other_readings(msg, depth)
    if msg.truncated:
        out.append(Symbol("__CONTENT_TRUNCATED", (str(msg.content_limit),)))
    return out
