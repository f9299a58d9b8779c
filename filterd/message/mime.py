"""Ambiguous MIME: what makes a message readable in more than one way, and every such reading.

A message with two Content-Type headers, or two boundary parameters in one, is read one way by
the stdlib parser (the first header, the first parameter) and another way by a mail client that
takes the last one: an attachment may exist in only one of the readings (CVE-2024-28054, which
amavisd-new fixed by classing such mail as unchecked). This module walks the raw bytes itself,
with byte offsets, so that it can split one entity under each boundary a reader might use, at
any depth, and hands back:
  - findings: one per kind of ambiguity or structural problem, with where it is;
  - leaves:   the leaf entities of every reading (each with the Content-Type and
              Content-Transfer-Encoding chosen), which `alternative_parts` turns into Parts that
              the attachment checks (banned names and types, archives, antivirus) examine on top
              of the parser's own reading, deduplicated.

Trusts: nothing in the message. The walk is bounded: it never descends past `max_depth`
(scan.max_mime_depth) and examines at most MAX_ENTITIES entity readings per message (a message
that nests ambiguity to multiply its readings stops there with MIME_READINGS_LIMIT).
It works on the whole raw message, not the scan.content_size_limit prefix: a boundary that
appears only after the prefix is not "missing", and a part past the prefix is still a part.

Finding kinds are the symbol names the sanity check emits (descriptions and scores in rules/):
  MIME_DUPLICATE_CONTENT_TYPE       an entity has more than one Content-Type header
  MIME_DUPLICATE_TRANSFER_ENCODING  an entity has more than one Content-Transfer-Encoding header
  MIME_DUPLICATE_BOUNDARY           one Content-Type header carries more than one boundary
  MIME_BOUNDARY_NOT_FOUND           a multipart boundary (of any reading) never appears as a
                                    delimiter line in its body
  MIME_NESTING_TOO_DEEP             entities nest deeper than max_depth
  MIME_READINGS_LIMIT               more entity readings than MAX_ENTITIES (or, overlapping,
                                    more than MAX_BYTES_FACTOR times the message's bytes):
                                    the rest unexamined
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from email.message import Message
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    from filterd.message import Part

__all__ = ["Finding", "Leaf", "Structure", "analyse", "alternative_parts", "every_reading",
           "cut_base64_defects", "configured_depth", "disagrees", "has_other_readings",
           "OTHER_READINGS_NOTE", "FINDING_SYMBOLS",
           "BASE64_DEFECTS", "MAX_ENTITIES", "DEFAULT_MAX_DEPTH"]

FINDING_SYMBOLS = ("MIME_DUPLICATE_CONTENT_TYPE", "MIME_DUPLICATE_TRANSFER_ENCODING",
                   "MIME_DUPLICATE_BOUNDARY", "MIME_BOUNDARY_NOT_FOUND", "MIME_NESTING_TOO_DEEP",
                   "MIME_READINGS_LIMIT")
DEFAULT_MAX_DEPTH = 20
# Entity readings examined per message, and bytes walked in all of them as a multiple of the
# message size (readings of nested ambiguity may overlap). Ordinary mail has a handful of
# entities and one reading each, walked once; only nested ambiguity multiplies readings, and
# that is worth no more effort than this.
MAX_ENTITIES = 2000
MAX_BYTES_FACTOR = 8
# Content-Type values longer than this are not parsed for parameters (the stdlib's parameter
# parser is quadratic on some inputs); the media type is still read.
_MAX_PARAM_CHARS = 8192


def configured_depth(ctx: object) -> int:
    """scan.max_mime_depth of a check's context (DEFAULT_MAX_DEPTH without one)."""
    settings = getattr(ctx, "settings", None)
    return int(settings.scan.max_mime_depth) if settings is not None else DEFAULT_MAX_DEPTH


@dataclass(frozen=True, slots=True)
class Finding:
    symbol: str
    where: str          # "message", "part 2", "part 2.1"; with the boundary for boundary ones


@dataclass(frozen=True, slots=True)
class Leaf:
    """A leaf entity of one reading: raw[start:end] is the entity (headers and body)."""

    start: int
    body_start: int
    end: int
    content_type: str | None       # the Content-Type value this reading uses (None: default)
    transfer_encoding: str | None  # the Content-Transfer-Encoding value this reading uses
    default_type: str              # text/plain, or message/rfc822 inside multipart/digest
    where: str


@dataclass(slots=True)
class Structure:
    findings: list[Finding] = field(default_factory=list)
    leaves: list[Leaf] = field(default_factory=list)
    ambiguous: bool = False        # some entity has more than one reading
    depth: int = 0                 # deepest nesting seen (a top-level leaf message is 0)
    complete: bool = True          # False when MAX_ENTITIES stopped the walk

    def symbols(self) -> dict[str, list[str]]:
        """Finding symbol -> the places it was found, in order, each once."""
        out: dict[str, list[str]] = {}
        for f in self.findings:
            places = out.setdefault(f.symbol, [])
            if f.where not in places:
                places.append(f.where)
        return out


# Header lines as the stdlib feed parser takes them: "name:" lines and their continuations; the
# block ends at the first line that is neither (an empty line, or the body's first line).
_HEADER_BLOCK = re.compile(rb"(?:[!-9;-~]+[ \t]*:[^\n]*(?:\n|\Z)(?:[ \t][^\n]*(?:\n|\Z))*)*")
_MIME_FIELD = re.compile(rb"^(content-type|content-transfer-encoding)[ \t]*:"
                         rb"([^\n]*(?:\n[ \t][^\n]*)*)", re.I | re.M)
_FOLD = re.compile(rb"\r?\n[ \t]+")


def _split_head(raw: bytes, start: int, end: int) -> tuple[list[str], list[str], int]:
    """The Content-Type and Content-Transfer-Encoding values of the entity at raw[start:end],
    in order, and where its body starts (one regex pass over the header block, in C)."""
    block_end = _HEADER_BLOCK.match(raw, start, end).end()  # type: ignore[union-attr]
    if raw.startswith(b"\r\n", block_end) and block_end + 2 <= end:
        body_start = block_end + 2
    elif raw.startswith(b"\n", block_end) and block_end < end:
        body_start = block_end + 1
    else:  # a line that is no header: the stdlib starts the body there
        body_start = block_end
    ctypes: list[str] = []
    encodings: list[str] = []
    for m in _MIME_FIELD.finditer(raw, start, block_end):
        value = _FOLD.sub(b" ", m.group(2)).strip().decode("ascii", "surrogateescape")
        (ctypes if len(m.group(1)) == 12 else encodings).append(value)
    return ctypes, encodings, body_start


def _headers(raw: bytes, start: int, body_start: int) -> list[tuple[str, str]]:
    """Every header field of an entity whose body starts at body_start, unfolded."""
    out: list[tuple[str, str]] = []
    for line in _FOLD.sub(b" ", raw[start:body_start]).splitlines():
        name, colon, value = line.partition(b":")
        if colon and name.strip():
            out.append((name.strip().decode("ascii", "surrogateescape"),
                        value.strip().decode("ascii", "surrogateescape")))
    return out


def _media_type(value: str | None, default: str) -> str:
    if value is None:
        return default
    ctype = value.split(";", 1)[0].strip().lower()
    # the stdlib reads a value without a type/subtype as text/plain
    return ctype if ctype.count("/") == 1 else "text/plain"


def _boundaries(value: str) -> list[str]:
    """Every boundary parameter of one Content-Type value, as the stdlib would read each."""
    if "boundary" not in value.lower():
        return []
    if len(value) > _MAX_PARAM_CHARS:
        value = value[:_MAX_PARAM_CHARS]
    import email.utils
    stand_in = Message()
    stand_in["Content-Type"] = value
    try:
        params = stand_in.get_params() or []
    except Exception:
        return []
    out = []
    for name, param in params:
        if name.strip().lower() != "boundary":
            continue
        try:
            text = email.utils.collapse_rfc2231_value(param).rstrip()
        except Exception:
            continue
        if text:
            out.append(text)
    return out


_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?=[\r\n]|\Z)")
# Candidates ("--boundary" at a line start) that are no delimiter before the search switches to
# one compiled regex: compiling costs about a millisecond, more than the ordinary message's
# whole search, but a body full of near-delimiters must not cost a Python loop per line.
_NEAR_MISSES = 256


def _delimiters(raw: bytes, boundary: bytes, start: int, end: int) -> list[tuple[int, int, bool]]:
    """(line start, line end, is close) of each delimiter line of `boundary` in raw[start:end].

    A delimiter line is "--" boundary, optionally "--", optional blanks, then the line end
    (RFC 2046 5.1.1, as the stdlib parser matches it). Stops after the close delimiter.
    """
    delim = b"--" + boundary
    out: list[tuple[int, int, bool]] = []

    def line_end(k: int) -> int:
        if raw.startswith(b"\r\n", k):
            return min(k + 2, end)
        return k + 1 if k < end else end

    def at(i: int) -> bool:
        """Whether the candidate at line start i is a delimiter; records it if so."""
        tail = _DELIMITER_TAIL.match(raw, i + len(delim), end)
        if tail is None:
            return False
        out.append((i, line_end(tail.end()), tail.group(1) is not None))
        return True

    if raw.startswith(delim, start) and start + len(delim) <= end and at(start) and out[-1][2]:
        return out
    pos, misses = start, 0
    while True:
        i = raw.find(b"\n" + delim, pos, end)
        if i == -1:
            return out
        if at(i + 1):
            if out[-1][2] or len(out) > MAX_ENTITIES:  # past the budget the walk stops anyway
                return out
        else:
            misses += 1
            if misses > _NEAR_MISSES:
                break
        pos = i + 1
    pattern = re.compile(b"\n" + re.escape(delim) + rb"(--)?[ \t]*(?=[\r\n]|\Z)")
    for m in pattern.finditer(raw, pos, end):
        out.append((m.start() + 1, line_end(m.end()), m.group(1) is not None))
        if m.group(1) is not None or len(out) > MAX_ENTITIES:
            break
    return out


def _body_end(raw: bytes, line_start: int, floor: int) -> int:
    """Where a part ends before the delimiter line at line_start: the line break before a
    delimiter belongs to the delimiter (RFC 2046)."""
    end = line_start
    if end > floor and raw[end - 1:end] == b"\n":
        end -= 1
        if end > floor and raw[end - 1:end] == b"\r":
            end -= 1
    return end


class _Walk:
    def __init__(self, raw: bytes, max_depth: int):
        self.raw = raw
        self.max_depth = max_depth
        self.out = Structure()
        self.visits = 0
        self.bytes_left = MAX_BYTES_FACTOR * len(raw) + 65536
        self._seen_leaves: set[tuple[int, int, str | None, str | None]] = set()
        self._seen_entities: set[tuple[int, int, bytes]] = set()

    def add(self, symbol: str, where: str) -> None:
        finding = Finding(symbol, where)
        if finding not in self.out.findings:
            self.out.findings.append(finding)

    def entity(self, start: int, end: int, depth: int, where: str, default: str) -> None:
        if not self.out.complete:
            return
        self.visits += 1
        self.bytes_left -= end - start
        if self.visits > MAX_ENTITIES or self.bytes_left < 0:
            self.out.complete = False
            self.add("MIME_READINGS_LIMIT", str(MAX_ENTITIES))
            return
        if depth > self.out.depth:
            self.out.depth = depth
        if depth > self.max_depth:
            self.add("MIME_NESTING_TOO_DEEP", f"{where} (depth {depth}, limit {self.max_depth})")
            return
        raw = self.raw
        ctypes, encodings, body_start = _split_head(raw, start, end)
        if len(ctypes) > 1:
            self.add("MIME_DUPLICATE_CONTENT_TYPE", where)
        if len(encodings) > 1:
            self.add("MIME_DUPLICATE_TRANSFER_ENCODING", where)

        # readings of this entity: (Content-Type value, media type, boundary or None)
        readings: list[tuple[str | None, str, str | None]] = []
        for value in ctypes or [None]:
            media = _media_type(value, default)
            if media.startswith("multipart/") and value is not None:
                found = _boundaries(value)
                if len(found) > 1:
                    self.add("MIME_DUPLICATE_BOUNDARY", where)
                for b in dict.fromkeys(found) or [None]:
                    readings.append((value, media, b))
            else:
                readings.append((value, media, None))
        distinct = {(media, b) if media.startswith("multipart/") else (value, b)
                    for value, media, b in readings}
        if len(distinct) > 1 or len(set(e.strip().lower() for e in encodings)) > 1:
            self.out.ambiguous = True

        done: set[tuple[str, str | None]] = set()
        for value, media, boundary in readings:
            key = (media, boundary) if media.startswith("multipart/") else (value or "", None)
            if key in done:
                continue
            done.add(key)
            if media.startswith("multipart/") and boundary is not None:
                if self.multipart(body_start, end, boundary, media, depth, where):
                    continue
                # boundary never found: readers show the body as one leaf
            elif media == "message/rfc822" and body_start < end:
                self.entity(body_start, end, depth + 1, f"{where} (message)", "text/plain")
                continue
            for cte in dict.fromkeys(encodings) or [None]:
                self.leaf(start, body_start, end, value, cte, default, where)

    def multipart(self, body_start: int, end: int, boundary: str, media: str, depth: int,
                  where: str) -> bool:
        raw = self.raw
        try:
            token = boundary.encode("ascii", "surrogateescape")
        except UnicodeEncodeError:
            token = boundary.encode("utf-8", "surrogateescape")
        shown = boundary if len(boundary) <= 40 else boundary[:37] + "..."
        key = (body_start, end, token)
        if key in self._seen_entities:
            return True
        self._seen_entities.add(key)
        delims = _delimiters(raw, token, body_start, end)
        if not delims:
            self.add("MIME_BOUNDARY_NOT_FOUND", f"{where} (boundary {shown!r})")
            return False
        child_default = "message/rfc822" if media == "multipart/digest" else "text/plain"
        prefix = "part " if where == "message" else where + "."
        for n, ((_, line_end, close), nxt) in enumerate(zip(delims, delims[1:] + [None]), 1):
            if close:
                break
            part_end = _body_end(raw, nxt[0], line_end) if nxt is not None else end
            self.entity(line_end, part_end, depth + 1, f"{prefix}{n}", child_default)
            if not self.out.complete:
                break
        return True

    def leaf(self, start: int, body_start: int, end: int, ctype: str | None, cte: str | None,
             default: str, where: str) -> None:
        key = (start, end, ctype, cte)
        if key in self._seen_leaves:
            return
        self._seen_leaves.add(key)
        self.out.leaves.append(Leaf(start, body_start, end, ctype, cte, default, where))


def analyse(raw: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Structure:
    """The MIME structure of a whole raw message under every reading; never raises on content."""
    start = 0
    if raw.startswith(b"From "):  # an mbox separator line is not a header
        nl = raw.find(b"\n")
        start = len(raw) if nl == -1 else nl + 1
    walk = _Walk(raw, max_depth)
    try:
        walk.entity(start, len(raw), 0, "message", "text/plain")
    except RecursionError:  # max_depth is bounded by its setting; this is a backstop
        walk.add("MIME_NESTING_TOO_DEEP", "message (too deep to walk)")
    return walk.out


def leaf_part(raw: bytes, leaf: Leaf) -> "Part":
    """A Part for one leaf of one reading: its own headers with only the chosen Content-Type and
    Content-Transfer-Encoding, so the stdlib's getters read what this reading reads."""
    from filterd.message import _make_part
    msg = Message()
    for name, value in _headers(raw, leaf.start, leaf.body_start):
        lower = name.lower()
        if lower in ("content-type", "content-transfer-encoding"):
            continue
        msg[name] = value
    if leaf.content_type is not None:
        msg["Content-Type"] = leaf.content_type
    if leaf.transfer_encoding is not None:
        msg["Content-Transfer-Encoding"] = leaf.transfer_encoding
    msg.set_default_type(leaf.default_type)
    msg.set_payload(raw[leaf.body_start:leaf.end].decode("ascii", "surrogateescape"))
    return _make_part(msg)


def _key(part: "Part") -> tuple[str, str | None, str, int, bytes]:
    payload = part.payload
    return (part.content_type, part.filename, part.disposition or "", len(payload),
            hashlib.blake2b(payload, digest_size=16).digest())


def alternative_parts(raw: bytes, structure: Structure, primary: Sequence["Part"]) -> list["Part"]:
    """The leaf parts of every reading that the parser's own reading (`primary`) lacks.

    Empty for a message with one reading that the walk and the parser agree on. They can
    disagree without any duplicate header: the stdlib ends a line at a bare CR, so one in the
    Subject ends its header block before Content-Type, and it sees one text part where a client
    that ends lines at LF only sees attachments (trec07p spam inmail.8543 has this shape).
    Parts are compared by type, name, disposition and decoded content, so a part that both
    readings share is examined once.
    """
    if not disagrees(structure, primary):
        return []
    seen = {_key(p) for p in primary}
    out: list[Part] = []
    for leaf in structure.leaves:
        try:
            part = leaf_part(raw, leaf)
            key = _key(part)
        except Exception:  # a leaf the stdlib cannot describe: the parser's reading stands
            continue
        if key not in seen:
            seen.add(key)
            out.append(part)
    return out


def disagrees(structure: Structure, primary: Sequence["Part"]) -> bool:
    """Whether some reading may show a part the parser's `primary` parts lack."""
    return structure.ambiguous or len(structure.leaves) != len(primary)


# ctx.notes key: whether a message has parts that only another reading shows. The sanity check
# sets it in the content job (a worker process in the daemon), so the antivirus check on the
# event loop need not walk the message again.
OTHER_READINGS_NOTE = "mime.other_readings"


def has_other_readings(view: Any, depth: int) -> bool:
    """Whether some reading of `view` (a MessageView) may hide a part from the parser's one."""
    structure = view.mime_structure(depth)
    # a truncated view's parts are a prefix: only a duplicate header tells there
    return structure.ambiguous or (not view.truncated and disagrees(structure, view.parts))


BASE64_DEFECTS = frozenset(("InvalidBase64PaddingDefect", "InvalidBase64CharactersDefect",
                            "InvalidBase64LengthDefect"))


def cut_base64_defects(sub: Message) -> list[str]:
    """The base64 defects of a part that our content limit cut short, blaming only the sender.

    The parser's decoding of a cut part always looks broken (a quantum or line cut in half).
    Its encoded text is checked again up to the last whole 4-character quantum: what is wrong
    in that much was sent that way (characters outside the alphabet, padding in the middle).
    """
    try:
        from email._encoded_words import decode_b  # what compat32's get_payload decodes with
        text = sub.get_payload()
        if not isinstance(text, str):
            return []
        data = b"".join(text.encode("ascii", "surrogateescape").splitlines())
        _, found = decode_b(data[:len(data) - len(data) % 4])
    except Exception:
        return []
    return [type(d).__name__ for d in found]


def every_reading(raw: bytes, structure: Structure, primary: Iterable["Part"]) -> list["Part"]:
    """The parser's parts followed by those only other readings have."""
    primary = list(primary)
    return primary + alternative_parts(raw, structure, primary)
