"""Header edits in amavisd-new's formats, expressed once and applied by either front end.

Trusts: nothing in the incoming headers. Headers named in headers.remove_incoming (and any
header a registered removal rule claims, e.g. a forged Authentication-Results with our
authserv-id) are removed before ours are added, so a sender cannot forge a verdict. No other
header is ever touched.
Reads: headers.virus_scanned, headers.remove_incoming, headers.always_add_spam_headers,
daemon.hostname; the policy's subject_tag. X-Spam-* headers and the subject tag are only for
recipients the policy gives them (local recipients not bypassing spam checks: build_edits'
`spam_headers`, decided per recipient group by filterd.policy.recipients).

Added (at the top, as amavis does):
  X-Virus-Scanned   added by the antivirus family only when a virus scan ran (see
                    filterd/checks/antivirus.py), so the header never claims a scan that did
                    not happen
  X-Spam-Flag       YES at tag2_level, NO below          (only at or above tag_level)
  X-Spam-Score      the score                           (")
  X-Spam-Level      one '*' per whole point, at most 64  (")
  X-Spam-Status     Yes|No, score=S required=R tests=[SYM=score, ...]
and whatever the registered header builders add (X-Virus-Status, Authentication-Results, ...).
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass
from typing import Any, Callable

from filterd.message import MessageView
from filterd.policy import Action, Verdict

MAX_LEVEL_STARS = 64


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """What to change: remove (name, nth occurrence of that name, 1-based), then add, subject."""

    remove: tuple[tuple[str, int], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    subject: str | None = None          # the new Subject value, or None to leave it
    had_subject: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"remove": [list(r) for r in self.remove], "add": [list(a) for a in self.add],
                "subject": self.subject}


# Builders: (view, verdict, settings) -> extra headers to add. Families register their own.
HeaderBuilder = Callable[[MessageView, Verdict, Any], list[tuple[str, str]]]
HEADER_BUILDERS: list[HeaderBuilder] = []
# Removal rules: (name, decoded value, settings) -> True to remove that incoming header.
RemovalRule = Callable[[str, str, Any], bool]
REMOVAL_RULES: list[RemovalRule] = []


def fmt_score(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def spam_status(verdict: Verdict) -> str:
    tests = ", ".join(f"{s.name}={fmt_score(s.score)}" for s in verdict.symbols
                      if not s.name.startswith("__"))
    flag = "Yes" if verdict.is_spam else "No"
    return f"{flag}, score={fmt_score(verdict.score)} required={fmt_score(verdict.required)} tests=[{tests}]"


@functools.lru_cache(maxsize=64)
def _pattern(patterns: tuple[str, ...]) -> "re.Pattern[str]":
    return re.compile("|".join(fnmatch.translate(p.lower()) for p in patterns) or "(?!)")


def removals(view: MessageView, settings: Any) -> tuple[tuple[str, int], ...]:
    # the pattern is looked up once per message, not once per header
    matches = _pattern(tuple(settings.headers.remove_incoming)).match
    rules = REMOVAL_RULES
    counts: dict[str, int] = {}
    out = []
    for name, value in view.raw_headers:
        key = name.lower()
        counts[key] = counts.get(key, 0) + 1
        if matches(key) is not None or any(rule(name, value, settings) for rule in rules):
            out.append((name, counts[key]))
    return tuple(out)


def build_edits(view: MessageView, verdict: Verdict, settings: Any, *, subject_tag: str,
                originating: bool = False, spam_headers: bool | None = None) -> HeaderEdits:
    """The header edits for a message that will be delivered.

    `spam_headers` False (a recipient outside policy.local_domains, one that bypasses spam
    checks, a bank without spam headers) leaves out the X-Spam-* headers and the subject tag,
    as amavis does for non-local recipients; None decides by `originating` alone.
    """
    if spam_headers is None:
        spam_headers = not originating
    add: list[tuple[str, str]] = []
    if (verdict.tagged or settings.headers.always_add_spam_headers) and spam_headers:
        add.append(("X-Spam-Flag", "YES" if verdict.is_spam else "NO"))
        add.append(("X-Spam-Score", fmt_score(verdict.score)))
        stars = min(max(int(verdict.score), 0), MAX_LEVEL_STARS)
        if stars:
            add.append(("X-Spam-Level", "*" * stars))
        add.append(("X-Spam-Status", spam_status(verdict)))
    for builder in HEADER_BUILDERS:
        for name, value in builder(view, verdict, settings):
            if name.lower() == "x-virus-scanned":
                # a builder that knows the scan was partial ("unchecked", "skipped (size)")
                # replaces the default value in place, keeping amavis' header order
                add = [(n, value if n.lower() == "x-virus-scanned" else v) for n, v in add]
                if any(n.lower() == "x-virus-scanned" for n, _ in add):
                    continue
            add.append((name, value))
    subject = None
    had_subject = view.has_header("Subject")
    taggable = verdict.action in (Action.SPAM, Action.TAG, Action.ACCEPT, Action.QUARANTINE)
    if spam_headers and verdict.is_spam and subject_tag and taggable:
        current = view.subject
        if not current.startswith(subject_tag.strip()):
            subject = subject_tag + current
    return HeaderEdits(remove=removals(view, settings), add=tuple(add), subject=subject,
                       had_subject=had_subject)


# ---- applying edits to raw bytes (after-queue front end, quarantine release) ---------------

_FOLD_AT = 78


def fold(name: str, value: str, eol: bytes = b"\r\n") -> bytes:
    """One header line, folded at spaces to stay near 78 columns; never splits a word."""
    line = f"{name}: "
    out: list[str] = []
    width = len(line)
    for word in value.split(" "):
        if width + len(word) > _FOLD_AT and width > len(name) + 2:
            out.append(line.rstrip(" "))
            line, width = "\t", 1
        line += word + " "
        width += len(word) + 1
    out.append(line.rstrip(" "))
    sep = eol + b""
    return sep.join(s.encode("utf-8") for s in out) + eol


def _encode_subject(value: str) -> str:
    try:
        value.encode("ascii")
        return value
    except UnicodeEncodeError:
        from email.header import Header
        return Header(value, "utf-8").encode()


_HEADER_START = re.compile(rb"^([!-9;-~]+)[ \t]*:")


def apply_to_bytes(raw: bytes, edits: HeaderEdits) -> bytes:
    """Apply edits to a raw message, keeping every other byte as it was."""
    eol = b"\r\n" if b"\r\n" in raw[:4096] else b"\n"
    end = raw.find(eol + eol)
    if end == -1:
        head, body = raw, b""
        sep = eol
    else:
        head, body = raw[:end + len(eol)], raw[end + len(eol):]
        sep = b""
    lines = head.split(eol)
    if lines and lines[-1] == b"":
        lines.pop()
    # group physical lines into headers (continuations belong to the header above)
    headers: list[list[bytes]] = []
    prefix: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1].append(line)
        elif not headers and line.startswith(b"From "):
            prefix.append(line)
        else:
            headers.append([line])
    remove = {(n.lower(), i) for n, i in edits.remove}
    counts: dict[str, int] = {}
    kept: list[list[bytes]] = []
    subject_done = False
    for group in headers:
        m = _HEADER_START.match(group[0])
        name = m.group(1).decode("ascii").lower() if m else ""
        if m:
            counts[name] = counts.get(name, 0) + 1
            if (name, counts[name]) in remove:
                continue
            if name == "subject" and edits.subject is not None and not subject_done:
                subject_done = True
                kept.append([fold("Subject", _encode_subject(edits.subject), eol).rstrip(b"\r\n")])
                continue
        kept.append(group)
    new_top = b"".join(fold(n, v, eol) for n, v in edits.add)
    out = [*(p + eol for p in prefix)]
    out.append(new_top)
    if edits.subject is not None and not subject_done:
        out.append(fold("Subject", _encode_subject(edits.subject), eol))
    for group in kept:
        out.append(eol.join(group) + eol)
    return b"".join(out) + sep + body
