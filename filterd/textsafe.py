"""Untrusted text made safe to show: control characters and escape sequences rendered visibly.

What a sender or an SMTP client chooses (Subject and From after RFC 2047 decoding, envelope
addresses, HELO, Message-ID, attachment and corpus file names, the text a rule matched) can
carry terminal control: ESC sequences (OSC sets the window title or writes the clipboard, CSI
clears the screen or moves the cursor, SGR changes colours), C1 controls (U+009B alone is a CSI
on many terminals), BEL, a CR that makes the rest of a line overwrite its start, an LF that
forges a line of output or of a log, and bidi overrides (U+202E) that make text read in another
order than it is stored. Printed raw on an admin's terminal (often root's) or into a log, they
change what the admin sees.

visible() renders each such character as a Python-style escape (\\x1b, \\x07, \\x9b, \\u202e,
\\U000e0001) so the text reads the same and cannot act. Escaped: every Cc (C0, DEL, C1), every
Cf except ZWNJ/ZWJ (U+200C/U+200D, which Persian and Indic words and emoji need and which move
nothing), the line and paragraph separators U+2028/U+2029, and lone surrogates (an undecodable
byte read with surrogateescape shows as \\xNN). Backslashes are left alone: ordinary text stays
readable, and a sender who writes a literal "\\x1b" gains nothing but a look.

This is the one place for that rule. Every CLI table and `show` (filterd.cli.*), the log
formatter (filterd.logsetup) and the web console when it comes render untrusted text through
these functions, never with an escaping of their own.

Trusts: nothing. Reads: no settings. Emits: no symbols.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

# Characters some script or emoji sequence needs, that reorder or hide nothing.
_KEEP = frozenset("\u200c\u200d")
_LAYOUT = frozenset("\n\t")          # kept in multi-line text (a message shown raw)
_CANDIDATE = re.compile(r"[^\x20-\x7e]")   # fast path: printable ASCII is always safe


def unsafe(ch: str) -> bool:
    """True when one character could act on a terminal or a log instead of being read."""
    if ch in _KEEP:
        return False
    category = unicodedata.category(ch)
    return category in ("Cc", "Cf", "Zl", "Zp", "Cs")


def _escape(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:     # surrogateescape: the undecodable byte itself
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def visible(text: Any, *, multiline: bool = False) -> str:
    """`text` (str() of anything) with every unsafe character escaped.

    One line by default: LF, CR and TAB are escaped too, so a value fits one table cell or log
    line. multiline=True keeps LF, TAB and a CR directly before an LF (a message's own line
    ends) and escapes the rest.
    """
    text = text if isinstance(text, str) else str(text)
    if text.isascii() and text.isprintable():
        return text

    def one(match: re.Match[str]) -> str:
        ch = match.group()
        if multiline and (ch in _LAYOUT or (ch == "\r" and text.startswith("\n", match.end()))):
            return ch
        return _escape(ch) if unsafe(ch) else ch

    return _CANDIDATE.sub(one, text)


def visible_bytes(data: bytes) -> bytes:
    """Raw message bytes for a terminal: UTF-8 where it decodes, \\xNN for bytes that do not,
    line structure kept (multiline visible())."""
    return visible(data.decode("utf-8", "surrogateescape"), multiline=True).encode("utf-8")


def _json_escape(match: re.Match[str]) -> str:
    ch = match.group()
    # raw LF/TAB in json.dumps output are indentation (inside strings JSON escapes them itself)
    if ch in _LAYOUT or not unsafe(ch):
        return ch
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000                  # JSON spells astral characters as a surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_dumps(value: Any, **kwargs: Any) -> str:
    """json.dumps with non-ASCII text kept readable but every unsafe character as a \\uXXXX
    escape: the same JSON value, safe on a terminal (ensure_ascii=False alone lets C1 controls
    and bidi overrides through raw; JSON escapes only U+0000-U+001F itself)."""
    kwargs.setdefault("ensure_ascii", False)
    return _CANDIDATE.sub(_json_escape, json.dumps(value, **kwargs))
