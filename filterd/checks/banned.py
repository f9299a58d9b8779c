"""Banned attachments: file names, double extensions, disguised executables, archive contents.

Trusts: nothing the sender wrote. A file name is only a claim: the content's magic bytes
(sniffed with the `filetype` library) decide whether a part is an executable, and archives are
opened (filterd.checks.archives, with hard limits) to see what they carry.

Reads: scan.max_mime_depth. The lists and the archive limits are the check's arguments in
rules/banned.toml (data: a site changes them in local.d/banned.toml). Works on the whole
message even when the content checks see only scan.content_size_limit bytes of it: an
attachment past that point is still inspected. Works on every reading of an ambiguous MIME
structure (two Content-Type headers, two boundaries: filterd.message.mime), so a part that
only the reading of some mail client shows is inspected too.

Emits (options name the offending part; members as "outer.zip/inner.exe"):
  BANNED_EXTENSION         an attachment's name ends in a banned extension (invoice.exe)
  BANNED_DOUBLE_EXTENSION  a harmless-looking extension hides a banned one (invoice.pdf.exe,
                           "invoice.pdf      .exe")
  BANNED_TYPE_MISMATCH     executable content under a name or declared type that is not one
                           (a Windows program named report.pdf)
  BANNED_IN_ARCHIVE        any of the three above, inside an archive
  ARCHIVE_ENCRYPTED        a password-protected archive: its contents cannot be checked
  ARCHIVE_TOO_DEEP         archives nested deeper than max_depth
  ARCHIVE_TOO_MANY_FILES   more than max_members members
  ARCHIVE_TOO_LARGE        expands to more than max_expanded_bytes (an archive bomb)
  ARCHIVE_TIMEOUT          inspection took longer than time_budget
  ARCHIVE_UNREADABLE       an archive (or a member) could not be read: corrupt, an unsupported
                           method, or no reader installed (rar without unrar, 7z without py7zr)
The inspection is the check's prepare step (inspect_attachments): in the daemon it runs in the
content job's worker process (filterd.pipeline.content), never on the event loop. Called
without it (tools, tests), an archive, a truncated view (the whole message is parsed again)
or a large message is inspected in a worker thread; the common small message without an
archive is checked inline (names and magic bytes only), saving a thread hop.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
import unicodedata
from typing import Iterable, Sequence

from filterd.checks.archives import HEAD_BYTES, Inspection, Limits, archive_kind, inspect
from filterd.message import MessageView, Part, mime, parse
from filterd.pipeline import Phase, ScanContext, check
from filterd.policy import Symbol

SYMBOLS = ("BANNED_EXTENSION", "BANNED_DOUBLE_EXTENSION", "BANNED_TYPE_MISMATCH",
           "BANNED_IN_ARCHIVE", "ARCHIVE_ENCRYPTED", "ARCHIVE_TOO_DEEP", "ARCHIVE_TOO_MANY_FILES",
           "ARCHIVE_TOO_LARGE", "ARCHIVE_TIMEOUT", "ARCHIVE_UNREADABLE")
PROBLEM_SYMBOLS = {
    "encrypted": "ARCHIVE_ENCRYPTED",
    "too_deep": "ARCHIVE_TOO_DEEP",
    "too_many_members": "ARCHIVE_TOO_MANY_FILES",
    "too_large": "ARCHIVE_TOO_LARGE",
    "timeout": "ARCHIVE_TIMEOUT",
    "unreadable": "ARCHIVE_UNREADABLE",
}
MAX_OPTIONS = 10          # per symbol: the first few offending parts are enough to explain it
MAX_NAME_CHARS = 120
_EXTENSION = re.compile(r"^[a-z0-9_-]{1,12}$")
_WIDE_GAP = re.compile(r"\s{3,}\.[^.]+$")     # "invoice.pdf          .exe"


def clean_name(name: str) -> str:
    """A file name made safe to show in a symbol option (log lines, headers)."""
    shown = "".join(ch if unicodedata.category(ch)[0] != "C" else "?" for ch in name)
    return shown if len(shown) <= MAX_NAME_CHARS else shown[:MAX_NAME_CHARS - 3] + "..."


def extensions_of(name: str) -> list[str]:
    """The dot-separated extensions of a file name, lower-cased, outermost last.

    Windows ignores trailing dots and spaces ("x.exe. " runs as x.exe), so they are stripped.
    Only short alphanumeric pieces count as extensions ("v1.2 final.pdf" has just "pdf").
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip().rstrip(". ").lower()
    pieces = base.split(".")[1:]
    out: list[str] = []
    for piece in reversed(pieces):
        piece = piece.strip()
        if not _EXTENSION.match(piece):
            break
        out.append(piece)
    return list(reversed(out))


class NamePolicy:
    """The banned-name rules of one binding (read-only once built; shared between scans)."""

    def __init__(self, extensions: Iterable[str], decoy_extensions: Iterable[str],
                 executable_types: Iterable[str]):
        self.extensions = {e.lower().lstrip(".") for e in extensions}
        self.decoys = {e.lower().lstrip(".") for e in decoy_extensions}
        self.executable_types = {t.lower() for t in executable_types}

    def name_findings(self, name: str) -> list[str]:
        """'double extension' / 'extension' findings for one file name (most specific first)."""
        exts = extensions_of(name)
        if not exts or exts[-1] not in self.extensions:
            return []
        stripped = name.strip().rstrip(". ")
        if (len(exts) >= 2 and exts[-2] in self.decoys) or _WIDE_GAP.search(stripped):
            return ["double extension"]
        return ["extension"]

    def is_executable(self, sniffed: str | None) -> bool:
        return bool(sniffed) and sniffed.lower() in self.executable_types

    def names_executable(self, name: str | None) -> bool:
        exts = extensions_of(name or "")
        return bool(exts) and exts[-1] in self.extensions


def _sniff(head: bytes) -> str | None:
    if not head:
        return None
    try:
        import filetype
        kind = filetype.guess(head[:HEAD_BYTES])
    except Exception:
        return None
    return kind.mime if kind else None


def _add(found: dict[str, list[str]], symbol: str, option: str) -> None:
    options = found.setdefault(symbol, [])
    if option not in options and len(options) < MAX_OPTIONS:
        options.append(option)


def examine_parts(parts: Sequence[Part], policy: NamePolicy, limits: Limits) -> list[Symbol]:
    """The symbols for a message's parts (blocking: archive inspection may take a while)."""
    found: dict[str, list[str]] = {}
    deadline = time.monotonic() + limits.time_budget
    for index, part in enumerate(parts):
        name = part.filename or ""
        shown = clean_name(name) if name else f"part {index + 1} ({part.content_type})"
        for finding in policy.name_findings(name) if name else []:
            symbol = "BANNED_DOUBLE_EXTENSION" if finding == "double extension" else "BANNED_EXTENSION"
            _add(found, symbol, shown)
        if part.is_text and not name:
            continue  # a body text part: nothing to sniff, nothing to open
        payload = part.payload
        head = payload[:HEAD_BYTES]
        sniffed = part.sniffed_type
        if policy.is_executable(sniffed) and not policy.names_executable(name) and \
                part.content_type.lower() not in policy.executable_types:
            _add(found, "BANNED_TYPE_MISMATCH", f"{shown} is {sniffed}")
        if archive_kind(head) is None:
            continue
        report = inspect(name or f"part{index + 1}", payload, limits, deadline=deadline)
        _archive_symbols(found, report, policy)
    return [Symbol(sym, tuple(opts)) for sym, opts in found.items()]


def _archive_symbols(found: dict[str, list[str]], report: Inspection, policy: NamePolicy) -> None:
    for member in report.members:
        shown = clean_name(member.path)
        for finding in policy.name_findings(member.name):
            _add(found, "BANNED_IN_ARCHIVE", f"{shown} ({finding})")
        sniffed = _sniff(member.head)
        if policy.is_executable(sniffed) and not policy.names_executable(member.name):
            _add(found, "BANNED_IN_ARCHIVE", f"{shown} (executable content: {sniffed})")
    for problem in report.problems:
        detail = f" ({problem.detail})" if problem.detail else ""
        _add(found, PROBLEM_SYMBOLS[problem.kind], f"{clean_name(problem.path)}{detail}")


# At most this many raw bytes are checked on the event loop (decoding their attachments is
# then cheap); a larger message goes to a worker thread like an archive.
INLINE_MAX_BYTES = 256 * 1024


def needs_worker(msg: MessageView, max_mime_depth: int = mime.DEFAULT_MAX_DEPTH) -> bool:
    """Whether the check must leave the event loop: archives to open, a truncated view to
    parse again, other MIME readings to decode, or so many bytes that decoding them would
    stall other scans."""
    if msg.truncated or len(msg.raw) > INLINE_MAX_BYTES:
        return True
    if mime.disagrees(msg.mime_structure(max_mime_depth), msg.parts):
        return True  # other readings' parts to decode and compare
    for part in msg.parts:
        if part.is_text and not part.filename:
            continue
        if archive_kind(part.payload[:HEAD_BYTES]) is not None:
            return True
    return False


def _whole_parts(msg: MessageView, max_mime_depth: int) -> list[Part]:
    """The message's parts under every reading, parsed from all of it when the view holds
    only a prefix."""
    if not msg.truncated:
        return msg.reading_parts(max_mime_depth)
    whole = parse(msg.raw, msg.envelope, content_limit=len(msg.raw) + 1).parts
    return msg.reading_parts(max_mime_depth, primary=whole)


def _inspect_message(msg: MessageView, policy: NamePolicy, limits: Limits,
                     max_mime_depth: int) -> list[Symbol]:
    return examine_parts(_whole_parts(msg, max_mime_depth), policy, limits)


# Limits is a slots dataclass: its class attributes are slot descriptors, not the defaults,
# so the defaults of the check's arguments come from an instance.
_DEFAULT_LIMITS = Limits()


def _policy_and_limits(extensions: Sequence[str], decoy_extensions: Sequence[str],
                       executable_types: Sequence[str], max_depth: int, max_members: int,
                       max_expanded_bytes: int, max_member_read: int,
                       time_budget: float) -> tuple[NamePolicy, Limits]:
    policy = _name_policy(tuple(extensions), tuple(decoy_extensions), tuple(executable_types))
    limits = Limits(max_depth=int(max_depth), max_members=int(max_members),
                    max_expanded_bytes=int(max_expanded_bytes),
                    max_member_read=int(max_member_read), time_budget=float(time_budget))
    return policy, limits


def inspect_attachments(msg: MessageView, ctx: ScanContext, *, extensions: Sequence[str],
                        decoy_extensions: Sequence[str] = (),
                        executable_types: Sequence[str] = (),
                        max_depth: int = _DEFAULT_LIMITS.max_depth,
                        max_members: int = _DEFAULT_LIMITS.max_members,
                        max_expanded_bytes: int = _DEFAULT_LIMITS.max_expanded_bytes,
                        max_member_read: int = _DEFAULT_LIMITS.max_member_read,
                        time_budget: float = _DEFAULT_LIMITS.time_budget) -> list[Symbol]:
    """The whole check, synchronously: its prepare step, run in the content job (a worker
    process in the daemon: archives are opened there, under the content budget too)."""
    policy, limits = _policy_and_limits(extensions, decoy_extensions, executable_types,
                                        max_depth, max_members, max_expanded_bytes,
                                        max_member_read, time_budget)
    depth = mime.configured_depth(ctx)
    if not needs_worker(msg, depth):
        return examine_parts(msg.parts, policy, limits)
    return _inspect_message(msg, policy, limits, depth)


@check("banned_files", phase=Phase.MAIN, symbols=SYMBOLS, prepare=inspect_attachments)
async def banned_files(msg: MessageView, ctx: ScanContext, *, extensions: Sequence[str],
                       decoy_extensions: Sequence[str] = (),
                       executable_types: Sequence[str] = (),
                       max_depth: int = _DEFAULT_LIMITS.max_depth,
                       max_members: int = _DEFAULT_LIMITS.max_members,
                       max_expanded_bytes: int = _DEFAULT_LIMITS.max_expanded_bytes,
                       max_member_read: int = _DEFAULT_LIMITS.max_member_read,
                       time_budget: float = _DEFAULT_LIMITS.time_budget,
                       prepared: list[Symbol] | None = None) -> list[Symbol]:
    if prepared is not None:  # inspected in the content job
        return list(prepared)
    policy, limits = _policy_and_limits(extensions, decoy_extensions, executable_types,
                                        max_depth, max_members, max_expanded_bytes,
                                        max_member_read, time_budget)
    depth = mime.configured_depth(ctx)
    if not needs_worker(msg, depth):
        return examine_parts(msg.parts, policy, limits)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, _inspect_message, msg, policy, limits, depth)


@functools.lru_cache(maxsize=16)
def _name_policy(extensions: tuple[str, ...], decoys: tuple[str, ...],
                 executable_types: tuple[str, ...]) -> NamePolicy:
    # the binding's lists are the same for every message: compile them once
    return NamePolicy(extensions, decoys, executable_types)


__all__ = ["banned_files", "examine_parts", "needs_worker", "extensions_of", "NamePolicy", "clean_name",
           "SYMBOLS", "PROBLEM_SYMBOLS"]
