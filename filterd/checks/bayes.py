"""The Bayes check (Phase.CLASSIFY), its shared store, autolearn and periodic expiry.

Trusts: the store for counts; the verdict of the scan for autolearn decisions.
Reads: bayes.enabled, bayes.autolearn, bayes.autolearn_spam, bayes.autolearn_ham,
bayes.expire_interval, bayes.token_max_age_days, bayes.max_db_tokens, bayes.batch_size,
scan.check_timeout (this check's timeout unless its binding sets one) and the
classifier/store settings (filterd.bayes, filterd.stores).
Emits: BAYES_00, BAYES_05, BAYES_20, BAYES_40, BAYES_50, BAYES_60, BAYES_80, BAYES_95,
BAYES_99, BAYES_999 (the band of the spam probability; options: the probability and the
number of tokens combined), BAYES_UNTRAINED (fewer than bayes.min_spam spam or bayes.min_ham
ham learned; options: the counts), BAYES_STORE_ERROR (the store could not be read, or a read
overran the check's timeout; options: the error). A broken store never fails the scan: Bayes
is one voice among many, so its outage adds a zero-score symbol instead of a tempfail storm.

With SQLite the check runs on the event loop (no thread hop), its timeout enforced as a read
deadline inside SQLite; with Redis it runs on a worker thread under the pipeline's timeout.

Autolearn (an after-scan hook) learns a message when its score without the BAYES_* symbols,
with the scores of the set without Bayes ([scores], not [bayes_scores]), reaches
bayes.autolearn_spam or falls to bayes.autolearn_ham, never for a virus, a tempfailed
or originating message, and never over a message learned before (by hand or otherwise):
the store checks the digest in the same transaction. Learning runs on one background thread,
off the scan path.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from filterd.bayes import HAM, SPAM, Bayes, message_digest, today
from filterd.bayes.classifier import BANDS, band
from filterd.bayes.tokenizer import tokenize
from filterd.message import MessageView
from filterd.pipeline import Phase, ScanContext, check
from filterd.policy import Action, Symbol
from filterd.stores import LearnItem, LearnResult, StoreError, TokenStore, open_token_store

log = logging.getLogger("filterd.bayes")

SYMBOLS = tuple(name for _, name in BANDS) + ("BAYES_UNTRAINED", "BAYES_STORE_ERROR")
# after a store error, wait this long before trying to reopen it (a dead Redis)
_REOPEN_AFTER = 10.0


class BayesService:
    """One per daemon: the open store, classification, and the autolearn queue."""

    def __init__(self, settings: Any, store: TokenStore | None = None):
        self.settings = settings
        self._store = store
        self._failed_at = 0.0
        self._open_lock = threading.Lock()
        self._learner = ThreadPoolExecutor(1, thread_name_prefix="bayes-learn")
        self.autolearned = {SPAM: 0, HAM: 0}
        _LIVE.add(self)

    def store(self) -> TokenStore:
        if self._store is not None:
            return self._store
        with self._open_lock:
            if self._store is None:
                if time.monotonic() - self._failed_at < _REOPEN_AFTER and self._failed_at:
                    raise StoreError("store unavailable (retrying shortly)")
                try:
                    self._store = open_token_store(self.settings)
                except StoreError:
                    self._failed_at = time.monotonic()
                    raise
            return self._store

    def _drop_store(self) -> None:
        """Forget a store that failed (Redis restarted): the next use reopens it."""
        if self.settings.bayes.backend == "redis":
            with self._open_lock:
                self._failed_at = time.monotonic()

    def bayes(self) -> Bayes:
        return Bayes.from_settings(self.settings, self.store())

    def reads_inline(self) -> bool:
        """Whether classify() belongs on the event loop (a local SQLite read) rather than
        on a worker thread (a network store, or a store not opened yet)."""
        store = self._store
        return store is not None and getattr(store, "inline_reads", False)

    def classify(self, view: MessageView, *, deadline: float | None = None,
                 tokens: Sequence[str] | None = None) -> list[Symbol]:
        try:
            bayes = self.bayes()
            ready, nspam, nham = bayes.trained(deadline=deadline)
            if not ready:
                return [Symbol("BAYES_UNTRAINED", (f"spam={nspam}", f"ham={nham}"))]
            if tokens is None:
                tokens = bayes.tokens(view)
            result = bayes.classify_tokens(tokens, counts=(nspam, nham),
                                           deadline=deadline)
        except StoreError as exc:
            self._drop_store()
            log.warning("bayes store unavailable: %s", exc)
            return [Symbol("BAYES_STORE_ERROR", (str(exc)[:120],))]
        return [Symbol(band(result.probability),
                       (f"{result.probability:.4f}", f"tokens={result.used}"))]

    # --- autolearn -----------------------------------------------------------------------
    def autolearn_label(self, outcome: Any, disposition: Any) -> str | None:
        b = self.settings.bayes
        verdict = outcome.verdict
        if not (b.enabled and b.autolearn) or outcome.failure or outcome.originating:
            return None
        if verdict.action is Action.TEMPFAIL or verdict.virus_names:
            return None
        if any(s.name == "CONTENT_BUDGET" for s in verdict.symbols):
            # tokenising it again in the learner's thread would hold the GIL, and the
            # loop, for as long as the budget stopped in the scan
            return None
        # SpamAssassin's rule: decide with the scores of the set without Bayes, so that the
        # lower rule weights of the [bayes_scores] set (and Bayes itself) cannot starve or feed
        # the learner; BAYES_* symbols never count
        scores = outcome.ruleset.scores
        score = sum(scores.get(s.name, 0.0) for s in verdict.symbols
                    if not s.name.startswith("BAYES_"))
        if score >= b.autolearn_spam:
            return SPAM
        if score <= b.autolearn_ham:
            return HAM
        return None

    def submit_autolearn(self, raw: bytes, view: MessageView, label: str) -> Any:
        return self._learner.submit(self._autolearn, raw, view, label)

    def _autolearn(self, raw: bytes, view: MessageView, label: str) -> LearnResult | None:
        try:
            bayes = self.bayes()
            item = LearnItem(message_digest(raw), label, bayes.tokens(view), only_new=True)
            (result,) = bayes.store.learn_batch([item], today())
        except StoreError as exc:
            self._drop_store()
            log.warning("bayes autolearn skipped, store unavailable: %s", exc)
            return None
        except Exception:
            log.exception("bayes autolearn failed")
            return None
        if result is LearnResult.LEARNED:
            self.autolearned[label] += 1
        return result

    def close(self) -> None:
        self._learner.shutdown(wait=True)
        if self._store is not None:
            self._store.close()
            self._store = None


_LIVE: "weakref.WeakSet[BayesService]" = weakref.WeakSet()


def service_for(ctx: ScanContext) -> BayesService:
    svc = ctx.services.get("bayes")
    if svc is None:  # a Scanner whose services were not started (tests, tools)
        svc = ctx.services["bayes"] = BayesService(ctx.settings)
    return svc


def message_tokens(msg: MessageView, ctx: ScanContext) -> tuple[str, ...] | None:
    """The Bayes tokens: the check's prepare step, so tokenising (HTML rendering included)
    runs in the content job, off the event loop, under the content budget."""
    b = ctx.settings.bayes
    if not b.enabled:
        return None
    return tokenize(msg, max_tokens=b.max_tokens, bigrams=b.bigrams)


@check("bayes", phase=Phase.CLASSIFY, symbols=SYMBOLS, prepare=message_tokens)
async def bayes_classify(msg: MessageView, ctx: ScanContext,
                         prepared: tuple[str, ...] | None = None) -> list[Symbol]:
    if not ctx.settings.bayes.enabled:
        return []
    svc = service_for(ctx)
    if svc.reads_inline():
        # A SQLite read takes ~0.3 ms of CPU and a hop to a worker thread ~0.065 ms more
        # (docs/bayes.md): with the tokens prepared in the content job, the whole check
        # runs here. The check's timeout, which cannot cancel code that never awaits,
        # becomes the store's read deadline instead (BAYES_STORE_ERROR past it).
        return svc.classify(msg, deadline=time.monotonic() + _timeout(ctx), tokens=prepared)
    return await asyncio.to_thread(svc.classify, msg, tokens=prepared)


def _timeout(ctx: ScanContext) -> float:
    """This check's timeout as the pipeline applies it: its binding's, else
    scan.check_timeout, and never past the scan's deadline."""
    timeout = ctx.settings.scan.check_timeout
    for binding in getattr(ctx.ruleset, "bindings", ()):
        if binding.function == "bayes" and binding.timeout:
            timeout = binding.timeout
            break
    if ctx.deadline:
        timeout = min(timeout, max(ctx.remaining(), 0.0))
    return timeout


def autolearn_hook(outcome: Any, disposition: Any) -> None:
    """After each disposition: queue the message for learning when the thresholds say so."""
    for svc in list(_LIVE):
        label = svc.autolearn_label(outcome, disposition)
        if label is not None:
            svc.submit_autolearn(outcome.view.raw, outcome.view, label)


_last_expiry = 0.0


def periodic_expire(settings: Any) -> None:
    """Expire old tokens every bayes.expire_interval seconds (checked hourly)."""
    global _last_expiry
    b = settings.bayes
    if not b.enabled or b.expire_interval <= 0:
        return
    if time.time() - _last_expiry < b.expire_interval:
        return
    _last_expiry = time.time()
    store = open_token_store(settings)
    try:
        result = store.expire(older_than_day=today() - b.token_max_age_days,
                              max_tokens=b.max_db_tokens)
        log.info("bayes expiry: removed %d tokens, %d remain", result.removed, result.remaining)
    finally:
        store.close()


def _register() -> None:
    from filterd import service
    service.SERVICE_FACTORIES.setdefault("bayes", BayesService)
    if autolearn_hook not in service.AFTER_SCAN_HOOKS:
        service.AFTER_SCAN_HOOKS.append(autolearn_hook)
    if all(task is not periodic_expire for _, task in service.PERIODIC_TASKS):
        service.PERIODIC_TASKS.append((3600.0, periodic_expire))


_register()
