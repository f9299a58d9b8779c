"""The Bayes learner: tokenise, classify, learn and unlearn, expire.

Trusts: nothing in the message; the store (filterd.stores) for counts.
Reads: bayes.max_tokens, bayes.bigrams, bayes.min_spam, bayes.min_ham, bayes.batch_size,
bayes.robinson_s, bayes.robinson_x, bayes.min_dev, bayes.max_significant,
bayes.prefixed_weight, bayes.calibrate
(and the store
settings through filterd.stores.open_token_store).
Emits no symbols itself: filterd.checks.bayes turns a `Classification` into BAYES_*.

Each learned message is remembered by `message_digest()`: the Message-ID and the body with
line endings normalised, so a copy that gained Received/X-Spam-* headers or a subject tag on
its way to a user's Junk folder is still the same message. `Learner` buffers messages and
applies them `batch_size` at a time in one store transaction: the per-message decisions
(learn, move to the other class, no-op, forget) happen inside that transaction, so batching
changes the speed, never the counts.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from filterd.bayes.classifier import (DEFAULT_CALIBRATION, Classification, ClassifierParams,
                                      band, classify)
from filterd.bayes.tokenizer import tokenize
from filterd.message import MessageView, parse
from filterd.stores import HAM, SPAM, LearnItem, LearnResult, TokenStore

__all__ = ["message_digest", "Learner", "Bayes", "today", "params_from", "SPAM", "HAM",
           "LearnResult", "Classification", "band"]

_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.I | re.M)
_SUBJECT = re.compile(rb"^subject[ \t]*:[ \t]*(.*)", re.I | re.M)
_FROM = re.compile(rb"^from[ \t]*:[ \t]*(.*)", re.I | re.M)
_DATE = re.compile(rb"^date[ \t]*:[ \t]*(.*)", re.I | re.M)
_BODY_SPLIT = re.compile(rb"\r?\n\r?\n")


def today() -> int:
    """Days since the epoch: the granularity of a token's last-learned stamp."""
    return int(time.time() // 86400)


def _split_head(raw: bytes) -> tuple[bytes, bytes]:
    """(header block, body) at the first blank line, as _BODY_SPLIT would cut them: two
    bytes.find() calls instead of a regex whose optional first character defeats the
    literal scan (the digest must stay byte-for-byte what it was: stores remember it)."""
    lf = raw.find(b"\n\n")
    crlf = raw.find(b"\n\r\n")
    if lf < 0 and crlf < 0:
        return raw, b""
    if crlf < 0 or 0 <= lf < crlf:
        nl, end = lf, lf + 2
    else:
        nl, end = crlf, crlf + 3
    start = nl - 1 if nl > 0 and raw[nl - 1:nl] == b"\r" else nl
    return raw[:start], raw[end:]


def message_digest(raw: bytes) -> str:
    """A stable identity of a message across the copies of it a site sees."""
    head, body = _split_head(raw)
    mid = _MESSAGE_ID.search(head)
    if mid and mid.group(1).strip():
        ident = b"mid:" + re.sub(rb"\s+", b"", mid.group(1))
    else:
        # no Message-ID: what the sender wrote (our subject tag stripped)
        subj = _SUBJECT.search(head)
        subject = re.sub(rb"^\s*\*{3}\s*SPAM\s*\*{3}\s*", b"", subj.group(1).strip(), flags=re.I) if subj else b""
        ident = b"|".join([b"hdr", *(x.group(1).strip() if x else b"" for x in
                                     (_FROM.search(head), _DATE.search(head))), subject])
    body = body.replace(b"\r\n", b"\n").rstrip()
    return hashlib.sha256(ident + b"\0" + body).hexdigest()[:32]


def params_from(settings: Any) -> ClassifierParams:
    b = settings.bayes
    return ClassifierParams(robinson_s=b.robinson_s, robinson_x=b.robinson_x,
                            min_dev=b.min_dev, max_significant=b.max_significant,
                            prefixed_weight=b.prefixed_weight,
                            calibration=DEFAULT_CALIBRATION if b.calibrate else ())


@dataclass
class Bayes:
    """Classification over one store with the site's settings."""

    store: TokenStore
    max_tokens: int = 3000
    bigrams: bool = False
    min_spam: int = 200
    min_ham: int = 200
    params: ClassifierParams = field(default_factory=ClassifierParams)

    @classmethod
    def from_settings(cls, settings: Any, store: TokenStore) -> "Bayes":
        b = settings.bayes
        return cls(store, max_tokens=b.max_tokens, bigrams=b.bigrams, min_spam=b.min_spam,
                   min_ham=b.min_ham, params=params_from(settings))

    def tokens(self, view: MessageView) -> tuple[str, ...]:
        return tokenize(view, max_tokens=self.max_tokens, bigrams=self.bigrams)

    def trained(self, *, deadline: float | None = None) -> tuple[bool, int, int]:
        nspam, nham = self.store.message_counts(deadline=deadline)
        return nspam >= self.min_spam and nham >= self.min_ham, nspam, nham

    def classify_tokens(self, tokens: Sequence[str], *, explain: int = 0,
                        counts: tuple[int, int] | None = None,
                        deadline: float | None = None) -> Classification:
        nspam, nham = counts if counts is not None else self.store.message_counts(deadline=deadline)
        return classify(tokens, self.store.token_counts(tokens, deadline=deadline), nspam,
                        nham, self.params, explain=explain)


class Learner:
    """Buffers messages and learns them `batch_size` at a time; see the module doc."""

    def __init__(self, bayes: Bayes, *, batch_size: int = 500,
                 on_result: Callable[[str, LearnResult], None] | None = None):
        self.bayes = bayes
        self.batch_size = max(1, batch_size)
        self.on_result = on_result
        self._pending: list[tuple[str, LearnItem]] = []
        self.totals = {r: 0 for r in LearnResult}

    def add(self, name: str, raw: bytes, label: str | None,
            view: MessageView | None = None) -> None:
        """Queue one message: label SPAM or HAM to learn, None to forget."""
        if label not in (SPAM, HAM, None):
            raise ValueError(f"label must be {SPAM!r}, {HAM!r} or None, not {label!r}")
        view = view if view is not None else parse(raw)
        item = LearnItem(message_digest(raw), label, self.bayes.tokens(view))
        self._pending.append((name, item))
        if len(self._pending) >= self.batch_size:
            self.flush()

    def flush(self) -> list[tuple[str, LearnResult]]:
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        results = self.bayes.store.learn_batch([item for _, item in pending], today())
        out = list(zip((name for name, _ in pending), results))
        for name, result in out:
            self.totals[result] += 1
            if self.on_result is not None:
                self.on_result(name, result)
        return out
