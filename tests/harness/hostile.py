"""Hostile messages: 1 MiB of one construct that used to cost super-linear CPU to analyse.

    hostile_message("comment") -> bytes      # a text/html part of unclosed "<!--"
    HOSTILE_CLASSES                          # every class name, in benchmark order

Each message carries a marker after HALFWAY bytes of padding: the URL MARKER_URL (an IP-host
URL, so the shipped rule URI_IP_HOST fires on it) and the phrase MARKER_PHRASE (the shipped
body rule STRICTLY_CONFIDENTIAL). A scan that drops content past some cap shows up as a
missing symbol. Used by tests/unit/test_hostile_content.py and bench/bench_hostile.py; the
integration tests may use it as "the message that must not hold the others".
"""

from __future__ import annotations

import base64

SIZE = 1024 * 1024
HALFWAY = 500 * 1024
MARKER_URL = "http://192.0.2.55/account/verify"
MARKER_PHRASE = "strictly confidential"
MARKER_HTML = f'<a href="{MARKER_URL}">{MARKER_PHRASE}</a>'
MARKER_TEXT = f"{MARKER_PHRASE} {MARKER_URL}"

_HEAD = ("From: Sender <sender@client.test>\r\nTo: user@test.example\r\n"
         "Date: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <hostile@client.test>\r\n")


def _fill(unit: str, size: int) -> str:
    return unit * (size // len(unit) + 1)


def _single(size: int, ctype: str, body: str, *, subject: str = "hostile", extra: str = "") -> bytes:
    head = (_HEAD + f"Subject: {subject}\r\n" + extra + "MIME-Version: 1.0\r\n"
            f"Content-Type: {ctype}; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
    return (head + body).encode("utf-8")[:size]


def _padded(size: int, ctype: str, unit: str, marker: str) -> bytes:
    """Half the size in `unit`, the marker, then `unit` again up to the size."""
    half = _half(size)
    body = _fill(unit, half)[:half] + " " + marker + " " + _fill(unit, size)
    return _single(size, ctype, body)


def _half(size: int) -> int:
    return size * HALFWAY // SIZE


def _comment(size: int) -> bytes:
    return _padded(size, "text/html", "<!--", MARKER_HTML)


def _script(size: int) -> bytes:
    return _padded(size, "text/html", "<script>", MARKER_HTML)


def _style(size: int) -> bytes:
    return _padded(size, "text/html", "<style>", MARKER_HTML)


def _lt(size: int) -> bytes:
    return _padded(size, "text/html", "<a", MARKER_HTML)


def _bare_lt(size: int) -> bytes:
    return _padded(size, "text/html", "< ", MARKER_HTML)


def _equals(size: int) -> bytes:
    # every "=" was a place where an href/src/action value might start
    return _padded(size, "text/html", "=", MARKER_HTML)


def _tag_blanks(size: int) -> bytes:
    # "<" and half a mebibyte of blanks: a tag regex with two \s* tried every split of the run
    return _single(size, "text/html", "<" + " " * _half(size) + MARKER_HTML + " " * size)


def _long_attribute(size: int) -> bytes:
    # one opened quote that never closes, then a marker, then another 500 KB attribute
    body = ('<html><body><img alt="' + "x" * _half(size) + '" title="' + " " + MARKER_HTML
            + '<p title="' + "y" * size)
    return _single(size, "text/html", body)


def _urls(size: int) -> bytes:
    lines = [f"www.{n:x}" for n in range(100_000 * size // SIZE)]
    lines.insert(len(lines) * 11 // 20, MARKER_TEXT)  # after 500 KB of the ~930 KB
    return _single(size, "text/plain", " ".join(lines))


def _hrefs(size: int) -> bytes:
    unit_count = size // 24
    refs = [f"<a href=http://{n:x}/>" for n in range(unit_count)]
    refs.insert(len(refs) * 11 // 20, MARKER_HTML)
    return _single(size, "text/html", "".join(refs))


def _nesting(size: int) -> bytes:
    """multipart/mixed inside multipart/mixed... about 10,000 levels, the marker in the
    innermost text part, after ~500 KB of nesting headers."""
    opening = []
    written = 0
    depth = 0
    while written < _half(size):
        line = (f"--b{depth}\r\nContent-Type: multipart/mixed; boundary=\"b{depth + 1}\"\r\n\r\n")
        opening.append(line)
        written += len(line)
        depth += 1
    inner = f"--b{depth}\r\nContent-Type: text/plain\r\n\r\n{MARKER_TEXT}\r\n"
    closing = "".join(f"--b{d}--\r\n" for d in range(depth, -1, -1))
    body = "".join(opening) + inner + closing
    head = (_HEAD + "Subject: nested\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"b0\"\r\n\r\n")
    data = (head + body).encode()
    return data + b"\r\n" + b"z" * max(0, size - len(data) - 2) if len(data) < size else data


def _parts(size: int) -> bytes:
    """One multipart/mixed of tiny text parts (about 25,000 in 1 MiB), the marker in one
    half-way."""
    unit = "--b\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    count = size // len(unit)
    chunks = [unit] * count
    chunks[count // 2] = f"--b\r\nContent-Type: text/plain\r\n\r\n{MARKER_TEXT}\r\n"
    head = (_HEAD + "Subject: parts\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n")
    return (head + "".join(chunks) + "--b--\r\n").encode()[:size]


def _nesting_lines(size: int) -> bytes:
    """400 nested multiparts (below the stdlib parser's recursion limit), then the innermost
    text part: short lines to the end, the marker half-way (every line was once compared with
    every enclosing boundary)."""
    depth = 400
    opening = "".join(f"--b{d}\r\nContent-Type: multipart/mixed; boundary=\"b{d + 1}\"\r\n\r\n"
                      for d in range(depth))
    head = (_HEAD + "Subject: nested lines\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"b0\"\r\n\r\n" + opening
            + f"--b{depth}\r\nContent-Type: text/plain\r\n\r\n")
    lines = max(0, (size - len(head)) // 4)
    body = "--\r\n" * (lines // 2) + MARKER_TEXT + "\r\n" + "--\r\n" * (lines // 2)
    return (head + body).encode()[:size]


def _headers(size: int) -> bytes:
    lines = "".join(f"X-H{n}: v\r\n" for n in range(50_000 * size // SIZE))
    body = MARKER_TEXT + "\r\n"
    msg = (_HEAD + "Subject: many headers\r\n" + lines + "\r\n" + body).encode()
    return msg + b"plain text\r\n" * max(0, (size - len(msg)) // 12)


def _received(size: int) -> bytes:
    hop = ("Received: from h{n}.example (h{n}.example [192.0.2.{m}]) by mx.example "
           "(Postfix) with ESMTP id {n:X}; Fri, 04 Dec 2026 10:00:00 +0000\r\n")
    lines = []
    written = 0
    n = 0
    while written < size - 4096:
        line = hop.format(n=n, m=n % 250 + 1)
        lines.append(line)
        written += len(line)
        n += 1
    return (_HEAD + "Subject: many hops\r\n" + "".join(lines) + "\r\n" + MARKER_TEXT
            + "\r\n").encode()


def _encoded_words(size: int) -> bytes:
    # one long Subject of RFC 2047 words, folded, then a body with the marker
    word = "=?utf-8?b?" + base64.b64encode("wörd ".encode()).decode() + "?="
    words = []
    written = 0
    while written < size - 4096:
        words.append(word)
        written += len(word) + 3
    subject = "\r\n ".join(words)
    return (_HEAD + "Subject: " + subject + "\r\n\r\n" + MARKER_TEXT + "\r\n").encode()


def _broken_encoded_words(size: int) -> bytes:
    # one valid word, then openers that never close: "=?x?q?" without "?="
    subject = "=?utf-8?q?hi?= " + "=?x?q?a" * ((size - 4096) // 7)
    return (_HEAD + "Subject: " + subject + "\r\n\r\n" + MARKER_TEXT + "\r\n").encode()


def _address_header(size: int, unit: str) -> bytes:
    # one From header of `unit` (1 MiB of "@" cost the stdlib address parser seconds), folded
    head = ("To: user@test.example\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
            "Message-ID: <hostile@client.test>\r\nSubject: hostile From\r\n")
    line = unit * (900 // len(unit))
    lines = "\r\n ".join([line] * max(1, (size - 4096) // (len(line) + 3)))
    return ("From: " + lines + "\r\n" + head + "\r\n" + MARKER_TEXT + "\r\n").encode()


def _from_at(size: int) -> bytes:
    return _address_header(size, "@")


def _from_list(size: int) -> bytes:
    return _address_header(size, "Bob <a@b.example>, ")


_BUILDERS = {
    "comment": _comment,
    "script": _script,
    "style": _style,
    "lt": _lt,
    "bare_lt": _bare_lt,
    "tag_blanks": _tag_blanks,
    "equals": _equals,
    "long_attribute": _long_attribute,
    "urls": _urls,
    "hrefs": _hrefs,
    "nesting": _nesting,
    "nesting_lines": _nesting_lines,
    "parts": _parts,
    "headers": _headers,
    "received": _received,
    "encoded_words": _encoded_words,
    "broken_encoded_words": _broken_encoded_words,
    "from_at": _from_at,
    "from_list": _from_list,
}
HOSTILE_CLASSES = tuple(_BUILDERS)


def hostile_message(kind: str, size: int = SIZE) -> bytes:
    """About `size` bytes (default 1 MiB) of the hostile class `kind` (one of
    HOSTILE_CLASSES), the marker half-way (at 500 KB of 1 MiB)."""
    return _BUILDERS[kind](size)
