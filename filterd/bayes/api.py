"""Learning one message from other parts of filterd (quarantine release --learn-ham, tools).

Trusts: the caller for the label. Reads the bayes.* store and tokenizer settings.
Emits no symbols.
"""

from __future__ import annotations

from typing import Any

from filterd.bayes import HAM, SPAM, Bayes, Learner
from filterd.stores import LearnResult, open_token_store

__all__ = ["learn", "forget"]


def learn(settings: Any, raw: bytes, label: str) -> bool:
    """Learn `raw` as "ham" or "spam"; False when it was already learned as that class.

    A message learned before as the other class is moved (its old counts are undone).
    Raises ValueError for another label and filterd.stores.StoreError when the store
    cannot be written.
    """
    if label not in (HAM, SPAM):
        raise ValueError(f"label must be 'ham' or 'spam', not {label!r}")
    return _apply(settings, raw, label) in (LearnResult.LEARNED, LearnResult.MOVED)


def forget(settings: Any, raw: bytes) -> bool:
    """Unlearn `raw`; False when it was not learned."""
    return _apply(settings, raw, None) is LearnResult.FORGOTTEN


def _apply(settings: Any, raw: bytes, label: str | None) -> LearnResult:
    store = open_token_store(settings)
    try:
        learner = Learner(Bayes.from_settings(settings, store), batch_size=2)
        learner.add("message", raw, label)
        ((_, result),) = learner.flush()
        return result
    finally:
        store.close()
