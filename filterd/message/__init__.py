"""Parse a message once and give every check the same read-only, lazily decoded view.

Trusts: nothing in the message. Every derived form is computed on first use and cached, and
every decoding step falls back rather than raises: malformed MIME, 8-bit junk in headers,
unknown charsets, broken base64 and nesting deep enough to exhaust the stdlib parser all give a
view with `defects` recorded, never an exception (tests/unit/test_message.py replays all of
../shared/corpora through parse()).

Reads: `content_limit` (scan.content_size_limit): how many bytes of a large message the content
checks see; the raw bytes stay whole for antivirus and quarantine.

Uses the stdlib parser with the compat32 policy: it is about eight times faster than
policy.default on these corpora, and the decoding done lazily here is all we need of the rest.
"""

from __future__ import annotations

import codecs
import email.base64mime
import email.quoprimime
import email.feedparser
import email.policy
import email.utils
import functools
import html
import ipaddress
import re
from dataclasses import dataclass, field
from email.message import Message
from functools import cached_property
from typing import Any, Iterable, Iterator, Sequence

from filterd.message import mime

__all__ = ["Envelope", "Relay", "Part", "Received", "MessageView", "parse", "decode_header_value", "parse_address",
           "parse_addresses",
           "html_to_text"]


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the MTA told us about the message, apart from its bytes."""

    mail_from: str = ""
    rcpt_tos: tuple[str, ...] = ()
    client_ip: str | None = None        # connecting client (milter connect / XFORWARD ADDR)
    client_helo: str | None = None
    client_name: str | None = None      # reverse DNS name as the MTA saw it
    queue_id: str | None = None
    auth_user: str | None = None        # SASL login when the client authenticated
    listener: str = "scan"              # "milter", "smtp" or "scan"
    macros: tuple[tuple[str, str], ...] = ()  # milter macros (e.g. {daemon_name})

    def macro(self, name: str) -> str | None:
        for key, value in self.macros:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Relay:
    ip: str | None
    helo: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Received:
    """One Received header, reduced to what checks use."""

    raw: str
    from_helo: str | None
    from_name: str | None
    from_ip: str | None
    by: str | None


_CHARSET_ALIASES = {"unknown-8bit": "latin-1", "x-unknown": "latin-1", "us-ascii": "ascii",
                    "ks_c_5601-1987": "cp949", "gb2312": "gbk", "x-user-defined": "latin-1",
                    "iso-8859-8-i": "iso-8859-8", "windows-874": "cp874"}


def _codec(charset: str | None) -> str:
    if not charset:
        return "utf-8"
    name = charset.strip().strip('"').lower()
    name = _CHARSET_ALIASES.get(name, name)
    try:
        return codecs.lookup(name).name
    except (LookupError, ValueError):
        return "utf-8"


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Bytes to text with the declared charset, falling back without ever raising."""
    codec = _codec(charset)
    try:
        return data.decode(codec)
    except UnicodeDecodeError:
        # mislabelled text is usually UTF-8 or Windows-1252; Latin-1 always decodes
        for fallback in ("utf-8", "cp1252"):
            if fallback != codec:
                try:
                    return data.decode(fallback)
                except UnicodeDecodeError:
                    pass
        return data.decode("latin-1")
    except Exception:  # codecs can raise oddities (e.g. on truncated ISO-2022 state)
        return data.decode("latin-1")


def _unsurrogate(value: str) -> str:
    """compat32 keeps 8-bit header bytes as surrogate escapes: decode them as UTF-8 or Latin-1."""
    try:
        value.encode("ascii")
        return value
    except UnicodeEncodeError:
        pass
    try:
        raw = value.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:  # already real text
        return value
    return decode_bytes(raw, "utf-8")


_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_FOLD = re.compile(r"\r?\n[ \t]+")


# email.utils.parseaddr costs about 2 us a character and more on hostile shapes (1 MiB of "@" in
# a From header: 2 s), and the sender address is read on the event loop (authentication, the
# log line). An address header longer than this - no real one comes near it - is read by a
# linear pattern instead: the first addr-spec, in angle brackets if there is one. The header
# itself is not cut: header rules still read all of it.
ADDRESS_PARSE_LIMIT = 8192
_ADDR_CHARS = r"[^\s<>,;:\"()@\[\]\\]"
# The lookbehind lets a match start only at the beginning of a run of address characters, so a
# long run without "@" is passed over once, not once for each of its positions.
_ANGLE_ADDR = re.compile(rf"<({_ADDR_CHARS}+@{_ADDR_CHARS}+)>")
_BARE_ADDR = re.compile(rf"(?<!{_ADDR_CHARS})({_ADDR_CHARS}+@{_ADDR_CHARS}+)")


def parse_addresses(values: list[str]) -> list[tuple[str, str]]:
    """(display name, address) pairs of address header values, as email.utils.getaddresses
    gives them while they fit ADDRESS_PARSE_LIMIT; a longer value gives ("", address) for every
    addr-spec in it, in linear time."""
    try:
        if sum(len(v) for v in values) <= ADDRESS_PARSE_LIMIT:
            return email.utils.getaddresses(values)
        pairs: list[tuple[str, str]] = []
        for value in values:
            if len(value) <= ADDRESS_PARSE_LIMIT:
                pairs.extend(email.utils.getaddresses([value]))
            else:
                pairs.extend(("", addr) for addr in _BARE_ADDR.findall(value))
        return pairs
    except Exception:  # RecursionError on deep comments, among others
        return []


def parse_address(value: str) -> tuple[str, str]:
    """(display name, address) of an address header value, as email.utils.parseaddr gives them
    for one that fits ADDRESS_PARSE_LIMIT; past it ("", the first address found) in linear time."""
    if len(value) <= ADDRESS_PARSE_LIMIT:
        try:
            return email.utils.parseaddr(value)
        except Exception:  # RecursionError on deep comments, among others
            return "", ""
    found = _ANGLE_ADDR.search(value) or _BARE_ADDR.search(value)
    return ("", found.group(1)) if found else ("", "")


def decode_header_value(value: str) -> str:
    """RFC 2047-decode one header value into text, unfolded; never raises. Linear in the value
    (see _encoded_chunks)."""
    value = _FOLD.sub(" ", _unsurrogate(value)).replace("\r", "").replace("\n", "")
    if "=?" not in value or not _ENCODED_WORD.search(value):
        return value.strip()
    try:
        chunks = _encoded_chunks(value)
    except Exception:  # e.g. a base64 word that does not decode
        return value.strip()
    return "".join(decode_bytes(chunk, charset or "ascii") for chunk, charset in chunks).strip()


def _encoded_words(line: str) -> Iterator[tuple[int, int, str, str, str]]:
    """(start, end, charset, encoding, encoded) of each encoded word of one line, as
    email.header's `=\\?([^?]*?)\\?([qQbB])\\?(.*?)\\?=` finds them, but in one pass: the
    stdlib regex, tried at every "=?", looked for "?=" to the end of the line each time."""
    start = line.find("=?")
    while start >= 0:
        mark = line.find("?", start + 2)         # the charset runs to the first "?"
        if mark < 0:
            return
        if line[mark + 1:mark + 2] in ("q", "Q", "b", "B") and line[mark + 2:mark + 3] == "?":
            end = line.find("?=", mark + 3)
            if end < 0:  # no "?=" after this word's text, nor after any later word's
                return
            yield start, end + 2, line[start + 2:mark], line[mark + 1], line[mark + 3:end]
            start = line.find("=?", end + 2)
        else:
            start = line.find("=?", start + 1)


def _encoded_chunks(value: str) -> list[tuple[bytes, str | None]]:
    """What email.header.decode_header returns for a value with encoded words — the same
    (bytes, charset) runs, its quirks included — in time linear in the value (the stdlib's
    list.pop(0), del and bytes += are quadratic in the number of words)."""
    words: list[tuple[str, str | None, str | None]] = []   # (text, encoding, charset)
    for line in value.splitlines():
        pos = 0
        for start, end, charset, encoding, encoded in _encoded_words(line):
            unencoded = line[pos:start]
            if pos == 0:
                unencoded = unencoded.lstrip()
            if unencoded:
                words.append((unencoded, None, None))
            words.append((encoded, encoding.lower(), charset.lower()))
            pos = end
        unencoded = line[pos:].lstrip() if pos == 0 else line[pos:]
        if unencoded:
            words.append((unencoded, None, None))
    # blanks between two encoded words go (the stdlib tests only that the text is blank)
    dropped = {n - 1 for n in range(2, len(words))
               if words[n][1] and words[n - 2][1] and words[n - 1][0].isspace()}
    runs: list[tuple[list[bytes], str | None]] = []
    for n, (text, encoding, charset) in enumerate(words):
        if n in dropped:
            continue
        if encoding == "q":
            word = bytes(email.quoprimime.header_decode(text), "raw-unicode-escape")
        elif encoding == "b":
            missing = len(text) % 4   # Postel's law: add missing padding, as the stdlib does
            word = email.base64mime.decode(text + "==="[:4 - missing] if missing else text)
        else:
            word = bytes(text, "raw-unicode-escape")
        if runs and runs[-1][1] == charset:
            runs[-1][0].append(word)
        else:
            runs.append(([word], charset))
    return [((b" " if charset is None else b"").join(parts), charset) for parts, charset in runs]


# html_to_text strips markup in the order below, as four regexes did (<!--.*?-->, then
# <(script|style|head)\b.*?</\1\s*>, block tags to newlines, then <[^>]*>), with the same
# output; but those regexes, retried at every unclosed opener, rescanned to the end of the text
# each time (200 KB of "<!--" took a minute). Each step here is one left-to-right pass: an
# opener whose closer is missing is known to stay unclosed for every later opener of its kind.
_ELEMENT_OPEN = re.compile(r"<(script|style|head)\b", re.I)
_ELEMENT_CLOSE = {name: re.compile(rf"</{name}\s*+>", re.I) for name in ("script", "style", "head")}
# \s*+ (possessive): "<" and a long run of blanks would otherwise be retried as every split of
# the run between the two \s* (quadratic in the run)
_BLOCK_TAG = re.compile(r"<\s*+/?\s*+(?:br|p|div|tr|li|h[1-6]|table|td|th|blockquote)\b[^>]*>",
                        re.I)
_TAG = re.compile(r"<[^>]*>")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")


def _drop_comments(markup: str) -> str:
    """Each <!-- ... --> to one blank; an unclosed <!-- is left as text (as are all after it)."""
    start = markup.find("<!--")
    if start < 0:
        return markup
    out: list[str] = []
    pos = 0
    while start >= 0:
        end = markup.find("-->", start + 4)
        if end < 0:  # no "-->" after this opener, so none after any later one either
            break
        out.append(markup[pos:start])
        out.append(" ")
        pos = end + 3
        start = markup.find("<!--", pos)
    out.append(markup[pos:])
    return "".join(out)


def _drop_elements(markup: str) -> str:
    """Each script, style and head element (opener to the first matching closer) to a blank."""
    opener = _ELEMENT_OPEN.search(markup)
    if opener is None:
        return markup
    out: list[str] = []
    pos = 0
    closers: dict[str, re.Match[str] | None] = {}  # name -> first closer at/after last search
    while opener is not None:
        name = opener.group(1).lower()
        closer = closers.get(name, False)
        if closer is False or (closer is not None and closer.start() < opener.end()):
            closer = closers[name] = _ELEMENT_CLOSE[name].search(markup, opener.end())
        if closer is None:  # unclosed, and so is every later opener of this name
            opener = _ELEMENT_OPEN.search(markup, opener.end())
            continue
        out.append(markup[pos:opener.start()])
        out.append(" ")
        pos = closer.end()
        opener = _ELEMENT_OPEN.search(markup, pos)
    out.append(markup[pos:])
    return "".join(out)


def _sub_tags(pattern: re.Pattern[str], replacement: str, text: str) -> str:
    """pattern.sub over the text up to its last ">": no tag can end past it, and a "<" with
    no ">" after it would otherwise be retried to the end of the text at every "<"."""
    last = text.rfind(">")
    if last < 0:
        return text
    return pattern.sub(replacement, text[:last + 1]) + text[last + 1:]


def html_to_text(markup: str) -> str:
    """The visible text of an HTML part, roughly as a mail client renders it. Linear in the
    markup: unclosed comments, elements and tags are kept as text, so nothing they hide is
    lost to the body rules."""
    text = _drop_comments(markup)
    text = _drop_elements(text)
    text = _sub_tags(_BLOCK_TAG, "\n", text)
    text = _sub_tags(_TAG, "", text)
    text = html.unescape(text)
    text = _SPACES.sub(" ", text)
    return _BLANK_LINES.sub("\n", text).strip()


_URL = re.compile(r"""(?:(?:https?|ftp)://|www\.)[^\s<>"'`{}|\\^\[\]]+""", re.I)
# The same URLs as _URL finds, about three times faster: look for the literal "://" or "www."
# first, then check the scheme before it and take the tail (test_message checks both agree).
_URL_CANDIDATE = re.compile(r"://|[wW][wW][wW]\.")
_URL_TAIL = re.compile(r"""[^\s<>"'`{}|\\^\[\]]+""")
_URL_SCHEMES = ("https", "http", "ftp")
_URL_START = re.compile(r"(?:https?|ftp)://|www\.", re.I)  # an href target that is a URL


def find_urls(text: str) -> list[str]:
    """URLs with a scheme (http, https, ftp) or starting with www., in order of appearance."""
    out: list[str] = []
    consumed = 0
    for m in _URL_CANDIDATE.finditer(text):
        start = m.start()
        if m.group(0) == "://":
            # the scheme right before it, longest first (https before http); one slice and
            # one lower() instead of one per scheme
            before = text[start - 5 if start >= 5 else 0:start].lower()
            if before == "https":
                start -= 5
            elif before[-4:] == "http":
                start -= 4
            elif before[-3:] == "ftp":
                start -= 3
            else:
                continue
        if start < consumed:
            continue
        tail = _URL_TAIL.match(text, start)
        if tail is None or tail.end() <= m.end():
            continue
        out.append(tail.group(0))
        consumed = tail.end()
    return out
_HREF = re.compile(r"""(?:href|src|action)\s*=\s*["']?([^"'\s>]+)""", re.I)


_HREF_VALUE = re.compile(r"""\s*["']?([^"'\s>]+)""")
# an "=" after the last letter of href, src or action (and blanks): no other character
# lower()s to f, c or n, and a regex with the whole names has no fast prefix (3x slower)
_HREF_CANDIDATE = re.compile(r"[fFcCnN]\s*=")
# Characters IGNORECASE matching treats as a letter of href/src/action that str.lower() does
# not turn into it (dotless i, dotted capital I, long s): a text with one takes the regex.
_HREF_FOLD_SPECIALS = ("\u0130", "\u0131", "\u017f")


def href_targets(text: str) -> list[str]:
    """The href/src/action attribute values of some HTML, exactly as _HREF.finditer finds
    them, about twice as fast: look for each "=" with str.find and check the name before it,
    instead of trying a case-insensitive alternation at every character
    (test_message checks both agree)."""
    if not text.isascii() and any(ch in text for ch in _HREF_FOLD_SPECIALS):
        return [m.group(1) for m in _HREF.finditer(text)]
    out: list[str] = []
    consumed = 0
    # only such an "=" can start a value: 1 MiB of "=" cost 0.4 s when every "=" was
    # checked in Python
    for candidate in _HREF_CANDIDATE.finditer(text):
        eq = candidate.end() - 1
        if eq < consumed:
            continue
        end = eq  # the attribute name ends before the blanks that precede "="
        while end > consumed and text[end - 1].isspace():
            end -= 1
        last = text[end - 1:end].lower()
        size = 4 if last == "f" else 3 if last == "c" else 6 if last == "n" else 0
        if size and end - size >= consumed and text[end - size:end].lower() in (
                "href", "src", "action"):
            value = _HREF_VALUE.match(text, eq + 1)
            if value is not None:
                out.append(value.group(1))
                consumed = value.end()
    return out


def _clean_url(url: str) -> str:
    return url.rstrip(".,;:!?)]}'\"").replace("&amp;", "&")


@dataclass(slots=True)
class Part:
    """One leaf MIME part."""

    content_type: str
    charset: str | None
    filename: str | None
    disposition: str | None
    transfer_encoding: str | None
    _msg: Message = field(repr=False)
    _payload: bytes | None = field(default=None, repr=False)
    _text: str | None = field(default=None, repr=False)
    _sniffed: str | None = field(default=None, repr=False)
    _sniffed_done: bool = field(default=False, repr=False)

    @property
    def is_text(self) -> bool:
        return self.content_type.startswith("text/") and not self.is_attachment

    @property
    def is_attachment(self) -> bool:
        return self.disposition == "attachment" or bool(self.filename)

    @property
    def payload(self) -> bytes:
        """The part's bytes with the transfer encoding undone (lenient on broken base64)."""
        if self._payload is None:
            try:
                data = self._msg.get_payload(decode=True)
            except Exception:
                data = None
            if data is None:
                raw = self._msg.get_payload()
                data = raw.encode("ascii", "surrogateescape") if isinstance(raw, str) else b""
            self._payload = data
        return self._payload

    @property
    def text(self) -> str:
        """The payload as text in its declared charset (for text/* parts)."""
        if self._text is None:
            self._text = decode_bytes(self.payload, self.charset)
        return self._text

    @property
    def size(self) -> int:
        return len(self.payload)

    @property
    def sniffed_type(self) -> str | None:
        """MIME type guessed from the content's magic bytes, or None when unknown."""
        if not self._sniffed_done:
            self._sniffed_done = True
            try:
                import filetype
                kind = filetype.guess(self.payload[:8192])
                self._sniffed = kind.mime if kind else None
            except Exception:
                self._sniffed = None
        return self._sniffed


_RCVD_FROM = re.compile(r"^\s*from\s+(\S+)(?:\s+\(([^)]*)\))?", re.I)
_RCVD_BY = re.compile(r"\bby\s+([^\s;()]+)", re.I)
_IP_IN_BRACKETS = re.compile(r"\[(?:IPv6:)?([0-9a-fA-F:.]+)\]")


def _parse_received(value: str) -> Received:
    helo = name = ip = None
    m = _RCVD_FROM.match(value)
    if m:
        helo = m.group(1).strip("[]")
        comment = m.group(2) or ""
        parts = comment.split()
        if parts and not parts[0].startswith("["):
            name = parts[0]
        ipm = _IP_IN_BRACKETS.search(comment) or _IP_IN_BRACKETS.search(m.group(0))
        if ipm:
            ip = ipm.group(1)
        elif helo and _is_ip(helo):
            ip = helo
    by = _RCVD_BY.search(value)
    if ip is not None and not _is_ip(ip):
        ip = None
    return Received(raw=value, from_helo=helo, from_name=name, from_ip=ip,
                    by=by.group(1) if by else None)


# A dotted quad exactly as ipaddress accepts it (ASCII digits, 0-255, no leading zeros): most
# HELO names and bracketed addresses are settled by this regex without an exception.
_IPV4 = re.compile(r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
                   r"(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}")


def _is_ip(text: str) -> bool:
    if _IPV4.fullmatch(text):
        return True
    if ":" not in text:  # not IPv6, and not a valid dotted quad either
        return False
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


_TRUSTED_DEFAULT = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class MessageView:
    """A parsed message. Construct it with `parse()`; checks only read it."""

    def __init__(self, raw: bytes, envelope: Envelope, msg: Message | None, *,
                 content_limit: int, truncated: bool, parse_error: str | None,
                 trusted_networks: Sequence[ipaddress._BaseNetwork] = _TRUSTED_DEFAULT):
        self.raw = raw
        self.envelope = envelope
        self._msg = msg
        self.content_limit = content_limit
        self.truncated = truncated
        self.parse_error = parse_error
        self.trusted_networks = tuple(trusted_networks)
        self._decoded: dict[str, list[str]] = {}

    # --- headers -------------------------------------------------------------------------
    @cached_property
    def raw_headers(self) -> list[tuple[str, str]]:
        """(name, value) in message order, values as received (folded, undecoded)."""
        if self._msg is not None:
            return [(str(k), v if isinstance(v, str) else str(v)) for k, v in self._msg.raw_items()]
        return _split_headers(self.raw)

    @cached_property
    def _header_index(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = {}
        for name, value in self.raw_headers:
            index.setdefault(name.lower(), []).append(value)
        return index

    def has_header(self, name: str) -> bool:
        return name.lower() in self._header_index

    def header_raw(self, name: str) -> list[str]:
        return self._header_index.get(name.lower(), [])

    def header(self, name: str) -> list[str]:
        """Every value of one header, RFC 2047-decoded and unfolded."""
        key = name.lower()
        cached = self._decoded.get(key)
        if cached is None:
            cached = [decode_header_value(v) for v in self._header_index.get(key, [])]
            self._decoded[key] = cached
        return cached

    def first(self, name: str, default: str = "") -> str:
        values = self.header(name)
        return values[0] if values else default

    @property
    def subject(self) -> str:
        return self.first("Subject")

    @cached_property
    def from_address(self) -> str:
        """The address of the first From header, lower-cased, '' when absent or unparsable."""
        return parse_address(self.first("From"))[1].lower()

    @cached_property
    def from_domain(self) -> str:
        return self.from_address.rpartition("@")[2] if "@" in self.from_address else ""

    @cached_property
    def message_id(self) -> str:
        # Read as a plain string: the stdlib's structured Message-ID parser raises IndexError
        # on values such as "<@>" (see ../shared/corpora/SANITY.md).
        return self.first("Message-ID")

    # --- body ----------------------------------------------------------------------------
    @cached_property
    def parts(self) -> list[Part]:
        if self._msg is None:
            return [self._fallback_part()]
        out: list[Part] = []
        try:
            for sub in self._msg.walk():
                if sub.is_multipart():
                    continue
                out.append(_make_part(sub))
        except Exception:  # deep nesting can exhaust the generator stack in walk()
            if not out:
                out.append(self._fallback_part())
        return out

    def _fallback_part(self) -> Part:
        head, sep, body = self.raw[: self.content_limit].partition(b"\n\n")
        if not sep:
            head, sep, body = self.raw[: self.content_limit].partition(b"\r\n\r\n")
        m = Message()
        m.set_payload(body.decode("ascii", "surrogateescape"))
        return Part("text/plain", None, None, None, None, m)

    @property
    def text_parts(self) -> list[Part]:
        return [p for p in self.parts if p.is_text]

    @cached_property
    def plain_texts(self) -> list[str]:
        """Decoded text of every text part, HTML converted to its visible text."""
        out = []
        for p in self.text_parts:
            if p.content_type == "text/html":
                out.append(html_to_text(p.text))
            else:
                out.append(p.text)
        return out

    @cached_property
    def html_parts(self) -> list[str]:
        return [p.text for p in self.text_parts if p.content_type == "text/html"]

    @cached_property
    def body_text(self) -> str:
        """Subject plus every decoded text part, as SpamAssassin's body rules see it."""
        return "\n".join([self.subject, *self.plain_texts])

    @cached_property
    def urls(self) -> list[str]:
        """Every URL in text and HTML parts (href/src targets included), de-duplicated in order."""
        seen: dict[str, None] = {}
        for p in self.text_parts:
            text = p.text
            if p.content_type == "text/html":
                for found in href_targets(text):
                    target = html.unescape(found)
                    if _URL_START.match(target):
                        seen.setdefault(_clean_url(target), None)
            for url in find_urls(text):
                seen.setdefault(_clean_url(url), None)
        return list(seen)

    @property
    def attachments(self) -> list[Part]:
        return [p for p in self.parts if p.is_attachment]

    @cached_property
    def defects(self) -> list[str]:
        """Names of the MIME defects the parser found (e.g. 'StartBoundaryNotFoundDefect')."""
        out: list[str] = []
        if self.parse_error:
            out.append(self.parse_error)
        if self._msg is None:
            return out
        for part in self.parts:
            # compat32 records base64 defects only when the payload is decoded
            if part.transfer_encoding == "base64":
                part.payload
        # the last part of a truncated copy is the one our content limit cut: its decoding
        # errors are ours, what is wrong before the cut is the sender's
        cut = self.parts[-1]._msg if self.truncated and self.parts else None
        try:
            for sub in self._msg.walk():
                found = [type(d).__name__ for d in getattr(sub, "defects", ())]
                if sub is cut and mime.BASE64_DEFECTS.intersection(found):
                    found = [d for d in found if d not in mime.BASE64_DEFECTS]
                    found += mime.cut_base64_defects(sub)
                out.extend(found)
        except Exception:
            out.append("NestingTooDeep")
        if self.truncated:
            # a truncated copy always lacks its closing boundaries; that is our doing
            out = [d for d in out if d not in ("CloseBoundaryNotFoundDefect",
                                               "StartBoundaryNotFoundDefect")]
        return out

    # --- MIME readings (filterd.message.mime) ---------------------------------------------
    @cached_property
    def _mime_structures(self) -> dict[int, mime.Structure]:
        return {}

    def mime_structure(self, max_depth: int = mime.DEFAULT_MAX_DEPTH) -> mime.Structure:
        """The structure of the whole raw message under every reading a mail client might take
        (duplicate Content-Type headers, duplicate boundaries): findings and leaves."""
        found = self._mime_structures.get(max_depth)
        if found is None:
            found = self._mime_structures[max_depth] = mime.analyse(self.raw, max_depth=max_depth)
        return found

    def reading_parts(self, max_depth: int = mime.DEFAULT_MAX_DEPTH,
                      primary: Sequence[Part] | None = None) -> list[Part]:
        """`parts` (or `primary`), then the parts only another reading of the MIME structure
        has, deduplicated: what the attachment checks examine so that no reading hides one."""
        base = self.parts if primary is None else primary
        return mime.every_reading(self.raw, self.mime_structure(max_depth), base)

    # --- transport -----------------------------------------------------------------------
    @cached_property
    def received(self) -> list[Received]:
        """Received headers, newest (topmost) first."""
        return [_parse_received(v) for v in self.header("Received")]

    def is_trusted(self, ip: str | None) -> bool:
        if not ip:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted_networks)

    @cached_property
    def last_external_relay(self) -> Relay:
        """The client that handed the message to our trusted network.

        The MTA's own knowledge (milter connect data, XFORWARD) wins; a replayed file falls back
        to the first Received header whose sending IP is not trusted.
        """
        env = self.envelope
        if env.client_ip and not self.is_trusted(env.client_ip):
            return Relay(env.client_ip, env.client_helo, env.client_name)
        for hop in self.received:
            if hop.from_ip and not self.is_trusted(hop.from_ip):
                return Relay(hop.from_ip, hop.from_helo, hop.from_name)
        return Relay(env.client_ip, env.client_helo, env.client_name)

    @property
    def size(self) -> int:
        return len(self.raw)

    def __repr__(self) -> str:
        return f"<MessageView {self.size} bytes, {len(self.raw_headers)} headers>"


_PART_HEADERS = frozenset(("content-type", "content-disposition", "content-transfer-encoding"))


def _part_headers(sub: Message) -> Message:
    """A stand-in carrying only the headers that describe a part, for the stdlib's getters:
    each of them scans every header of the part (and a leaf part may be the whole message,
    with dozens of Received lines), so asking a handful of questions of the stand-in saves
    scans without re-implementing the stdlib's parameter parsing."""
    stand_in = Message(policy=sub.policy)
    stand_in._headers = [h for h in sub._headers  # type: ignore[attr-defined]
                         if h[0].lower() in _PART_HEADERS]
    stand_in.set_default_type(sub.get_default_type())
    return stand_in


def _make_part(sub: Message) -> Part:
    part_msg = sub
    try:
        sub = _part_headers(part_msg)
    except Exception:  # an odd header list: ask the part itself, slower but the same
        sub = part_msg
    try:
        ctype = sub.get_content_type()
    except Exception:
        ctype = "text/plain"
    try:
        charset = sub.get_param("charset")
        if isinstance(charset, tuple):  # RFC 2231 form
            charset = charset[2]
        charset = str(charset) if charset else None
    except Exception:
        charset = None
    try:
        filename = sub.get_filename()
        if filename is not None:
            filename = decode_header_value(str(filename))
    except Exception:
        filename = None
    try:
        disposition = sub.get_content_disposition()
    except Exception:
        disposition = None
    cte = sub.get("Content-Transfer-Encoding")
    cte = str(cte).strip().lower() if cte is not None else None
    return Part(ctype, charset, filename, disposition, cte, part_msg)


_HEADER_LINE = re.compile(rb"^([!-9;-~]+)[ \t]*:(.*)$")


def _split_headers(raw: bytes) -> list[tuple[str, str]]:
    """A minimal header splitter for when the parser itself failed."""
    out: list[tuple[str, str]] = []
    for line in raw.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            break
        if line[:1] in (b" ", b"\t") and out:
            name, value = out[-1]
            out[-1] = (name, value + "\n" + line.decode("ascii", "surrogateescape"))
            continue
        m = _HEADER_LINE.match(line)
        if m:
            out.append((m.group(1).decode("ascii"), m.group(2).decode("ascii", "surrogateescape").lstrip()))
    return out


DEFAULT_CONTENT_LIMIT = 1024 * 1024

# How the stdlib's feed parser writes each multipart boundary it waits for (email.feedparser):
# a compiled "(?P<sep>" + re.escape("--" + boundary) + _BOUNDARY_TAIL.
_BOUNDARY_HEAD = "(?P<sep>"
_BOUNDARY_TAIL = r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"
_UNESCAPE = re.compile(r"\\(.)", re.S)


class _BoundaryLines(email.feedparser.BufferedSubFile):
    """The feed parser's line buffer, answering "is this line a boundary of an enclosing
    part?" with a dictionary lookup instead of trying every enclosing boundary's regex on
    every line: that was O(depth) per line, so a few hundred nested multiparts over 1 MiB of
    short lines cost ~10 s. A matcher not in the stdlib's boundary form is tried as before."""

    def __init__(self) -> None:
        super().__init__()
        self._kinds: list[str | None] = []         # per pushed matcher: its separator or None
        self._separators: dict[str, int] = {}      # "--boundary" -> how many are pushed
        self._others: dict[object, int] = {}       # any other matcher -> how many are pushed

    def push_eof_matcher(self, pred: object) -> None:
        super().push_eof_matcher(pred)
        pattern = getattr(getattr(pred, "__self__", None), "pattern", None)
        separator = _separator_of(pattern) if getattr(pred, "__name__", "") == "match" \
            and isinstance(pattern, str) else None
        self._kinds.append(separator)
        if separator is None:
            self._others[pred] = self._others.get(pred, 0) + 1
        else:
            self._separators[separator] = self._separators.get(separator, 0) + 1

    def pop_eof_matcher(self) -> object:
        pred = super().pop_eof_matcher()
        separator = self._kinds.pop()
        table: dict[Any, int] = self._others if separator is None else self._separators
        key = pred if separator is None else separator
        table[key] -= 1
        if not table[key]:
            del table[key]
        return pred

    def readline(self) -> Any:
        if not self._lines:  # type: ignore[attr-defined]
            return "" if self._closed else email.feedparser.NeedMoreData  # type: ignore[attr-defined]
        line = self._lines.popleft()  # type: ignore[attr-defined]
        if self._separators and line.startswith("--"):
            # a line split by the parser ends in at most one of \r\n, \r, \n
            rest = line.rstrip("\r\n").rstrip(" \t")
            if rest in self._separators or (rest.endswith("--")
                                            and rest[:-2] in self._separators):
                self._lines.appendleft(line)  # type: ignore[attr-defined]
                return ""
        for pred in self._others:
            if pred(line):  # type: ignore[operator]
                self._lines.appendleft(line)  # type: ignore[attr-defined]
                return ""
        return line


@functools.lru_cache(maxsize=256)  # a multipart pushes its boundary again for every part
def _separator_of(pattern: str) -> str | None:
    """The "--boundary" a feed parser boundary regex matches, None for any other regex."""
    if not (pattern.startswith(_BOUNDARY_HEAD) and pattern.endswith(_BOUNDARY_TAIL)):
        return None
    escaped = pattern[len(_BOUNDARY_HEAD):-len(_BOUNDARY_TAIL)]
    candidate = _UNESCAPE.sub(r"\1", escaped)
    # a boundary ending in blanks could not be looked up by its stripped line (the stdlib
    # strips them from every boundary, so this is only for safety)
    if re.escape(candidate) != escaped or candidate != candidate.rstrip(" \t"):
        return None
    return candidate


def _parse_bytes(data: bytes) -> Message:
    """What email.parser.BytesParser(policy=compat32).parsebytes(data) returns."""
    feed = email.feedparser.FeedParser(policy=email.policy.compat32)
    feed._input = _BoundaryLines()  # type: ignore[attr-defined]
    feed.feed(data.decode("ascii", "surrogateescape"))
    return feed.close()


def parse(raw: bytes, envelope: Envelope | None = None, *,
          content_limit: int = DEFAULT_CONTENT_LIMIT,
          trusted_networks: Iterable[str | ipaddress._BaseNetwork] | None = None) -> MessageView:
    """Parse raw message bytes once. Never raises on message content."""
    envelope = envelope or Envelope()
    nets = _TRUSTED_DEFAULT if trusted_networks is None else tuple(
        n if isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network))
        else ipaddress.ip_network(n, strict=False) for n in trusted_networks)
    truncated = len(raw) > content_limit
    data = raw[:content_limit] if truncated else raw
    msg: Message | None
    error = None
    try:
        msg = _parse_bytes(data)
    except RecursionError:
        msg, error = None, "NestingTooDeep"
    except Exception as exc:  # the stdlib parser is lenient, but not on everything
        msg, error = None, f"ParseError:{type(exc).__name__}"
    return MessageView(raw, envelope, msg, content_limit=content_limit, truncated=truncated,
                       parse_error=error, trusted_networks=nets)


def iter_parts(view: MessageView) -> Iterator[Part]:
    yield from view.parts
