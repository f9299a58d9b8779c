"""Store interfaces and the factory that opens the configured backend.

Trusts: the settings. Reads: bayes.backend, bayes.path, bayes.redis_url, bayes.redis_prefix,
daemon.state_dir. Emits no symbols.

A `TokenStore` keeps what the Bayes learner knows: per token the spam and ham counts and the
day it was last learned, the number of spam and ham messages learned, and the digest and class
of every learned message. It has one embedded backend (SQLite, the default) and one shared
backend (Redis, for several filterd nodes); tests/unit/test_store_contract.py runs the same
contract against both.

Learning goes through `learn_batch()`, which decides and applies each message atomically in
the store itself (a SQLite transaction, a Redis script), so two learners writing at once
never lose or double an update:
  new digest                      add the tokens to the class, count the message    LEARNED
  digest known as the same class  nothing                                            NOOP
  digest known as the other class move: subtract from the old class, add to the new  MOVED
  label None (forget), known      subtract from its class, forget the digest          FORGOTTEN
  label None, unknown             nothing                                            NOOP
  only_new and the digest known   nothing (autolearn never overrides a decision)    NOOP
Counts never go below zero; a token whose both counts reach zero is deleted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

__all__ = ["LearnItem", "LearnResult", "StoreStats", "ExpiryResult", "TokenStore",
           "StoreError", "open_token_store", "SPAM", "HAM"]

SPAM = "spam"
HAM = "ham"


class StoreError(Exception):
    """The store could not be read or written (file, permissions, server down)."""


class LearnResult(str, enum.Enum):
    LEARNED = "learned"
    MOVED = "moved"          # was learned as the other class: undone, then learned
    FORGOTTEN = "forgotten"
    NOOP = "noop"            # already learned as this class, or forgetting an unknown message


@dataclass(frozen=True, slots=True)
class LearnItem:
    digest: str
    label: str | None            # SPAM, HAM, or None to forget
    tokens: tuple[str, ...]
    only_new: bool = False       # autolearn: a digest known in either class is left alone


@dataclass(frozen=True, slots=True)
class StoreStats:
    backend: str
    location: str
    nspam: int
    nham: int
    ntokens: int
    learned_spam: int            # digests remembered as spam (== nspam when consistent)
    learned_ham: int
    oldest_day: int | None       # days since the epoch of the least recently learned token
    newest_day: int | None
    size_bytes: int | None = None

    @property
    def consistent(self) -> bool:
        return self.nspam == self.learned_spam and self.nham == self.learned_ham


@dataclass(frozen=True, slots=True)
class ExpiryResult:
    removed: int
    remaining: int


class TokenStore(Protocol):
    backend: str
    # True when reads are local and short enough to run on the daemon's event loop (a
    # thread hop costs more CPU than a SQLite read); False for a network store.
    inline_reads: bool

    def message_counts(self, *, deadline: float | None = None) -> tuple[int, int]:
        """(nspam, nham): messages learned per class. `deadline` (time.monotonic()): a
        read still running then fails with StoreError (where the backend can stop it)."""

    def token_counts(self, tokens: Sequence[str], *, deadline: float | None = None
                     ) -> dict[str, tuple[int, int]]:
        """(spam, ham) for each of the tokens the store knows; one round trip."""

    def learned_label(self, digest: str) -> str | None:
        """The class a message digest was learned as, or None."""

    def learn_batch(self, items: Sequence[LearnItem], day: int) -> list[LearnResult]:
        """Apply each item atomically (see the module doc); `day` stamps the tokens."""

    def expire(self, *, older_than_day: int, max_tokens: int) -> ExpiryResult:
        """Delete tokens last learned before `older_than_day`, then the least recently
        learned ones (ties: the rarest first) until at most max_tokens remain."""

    def stats(self) -> StoreStats: ...

    def iter_tokens(self) -> Iterator[tuple[str, int, int, int]]:
        """(token, spam, ham, day) for every token."""

    def iter_learned(self) -> Iterator[tuple[str, str]]:
        """(digest, class) for every learned message."""

    def replace_all(self, nspam: int, nham: int, tokens: Iterable[tuple[str, int, int, int]],
                    learned: Iterable[tuple[str, str]]) -> None:
        """Replace the whole content (restore from a backup)."""

    def close(self) -> None: ...


def sqlite_path(settings: Any) -> Path:
    return Path(settings.bayes.path) if settings.bayes.path else settings.state_dir / "bayes.sqlite"


def encodable(token: str) -> bool:
    """Whether a token can be stored: valid UTF-8 (a lone surrogate escape, left by an
    undecodable 8-bit header byte, is not)."""
    try:
        token.encode()
        return True
    except UnicodeEncodeError:
        return False


def open_token_store(settings: Any, *, create: bool = True) -> TokenStore:
    """Open the configured Bayes store; raises StoreError when it cannot be reached."""
    backend = settings.bayes.backend
    if backend == "redis":
        from filterd.stores.redis import RedisTokenStore
        return RedisTokenStore(settings.bayes.redis_url, prefix=settings.bayes.redis_prefix)
    from filterd.stores.sqlite import SqliteTokenStore
    return SqliteTokenStore(sqlite_path(settings), create=create)


def summarise(results: Iterable[LearnResult]) -> Mapping[str, int]:
    out = {r.value: 0 for r in LearnResult}
    for r in results:
        out[r.value] += 1
    return out
