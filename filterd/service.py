"""The scanning service both front ends and the CLI share: parse once, scan, decide, dispose.

Trusts: the front end for the envelope (it has already applied XFORWARD/peer checks).
Reads: scan.*, daemon.max_concurrent_scans, smtp.reject_action, milter.quarantine_reply,
quarantine.quarantine_on_reject,
scan.mynetworks (originating mail), the rule set.

`Scanner.scan()` gives an Outcome (view, verdict, header edits); `Scanner.dispose()` turns it
into what the front end must do (a Disposition), quarantining durably first where the verdict
says so. The front ends only translate a Disposition into protocol terms. The rule set is
captured at the start of each scan, so a reload never changes a message in flight.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from filterd import pipeline
from filterd.actions.headers import HeaderEdits, apply_to_bytes, build_edits
from filterd.message import Envelope, MessageView, parse
from filterd.policy import Action, Symbol, Verdict, decide
from filterd.quarantine import MAINTENANCE_INTERVAL as quarantine_maintenance_interval
from filterd.quarantine import QuarantineError, category_of, open_store
from filterd.quarantine import maintenance as quarantine_maintenance
from filterd.ruleset import Ruleset, load as load_ruleset

log = logging.getLogger("filterd.service")
msglog = logging.getLogger("filterd.message")

# Shared clients built once per daemon from the settings: name -> factory(settings) -> client.
# Families register theirs (e.g. "clamd", "dns", "bayes"); checks find them in ctx.services.
SERVICE_FACTORIES: dict[str, Callable[[Any], Any]] = {}
# Called after each disposition (autolearn, metrics): fn(outcome, disposition) -> None.
AFTER_SCAN_HOOKS: list[Callable[["Outcome", "Disposition"], Any]] = []
# Last step before delivery, after every header edit (DKIM signing): given the message as it
# will be delivered, the outcome and the Scanner's services, return headers to add on top:
# fn(edited_bytes, outcome, services) -> [(name, value)].
FINAL_HEADER_HOOKS: list[Callable[[bytes, "Outcome", dict[str, Any]],
                                  list[tuple[str, str]]]] = []
# Background jobs the daemon runs: (interval in seconds, fn(settings) -> None) (quarantine
# expiry, Bayes expiry...). They run in a worker thread; errors are logged, never fatal.
PERIODIC_TASKS: list[tuple[float, Callable[[Any], Any]]] = [
    (quarantine_maintenance_interval, quarantine_maintenance),  # index reconcile, expiry, notices
]


@dataclass
class Outcome:
    view: MessageView
    verdict: Verdict
    edits: HeaderEdits
    timings: dict[str, float]
    originating: bool
    ruleset: Ruleset
    failure: str | None = None
    # per-message notes the checks left (e.g. "rule_matches" for `filterd scan --explain`)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Disposition:
    """What the front end does: an action plus, where it replies, the SMTP reply."""

    action: Action                   # ACCEPT (deliver with edits), REJECT, TEMPFAIL, DISCARD
    code: int = 250
    status: str = "2.0.0"
    text: str = "Ok"
    quarantine_id: str | None = None
    edits: HeaderEdits | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"


class Scanner:
    def __init__(self, settings: Any, ruleset: Ruleset | None = None, *,
                 quarantine: Any = None, services: dict[str, Any] | None = None):
        self.settings = settings
        self.ruleset = ruleset if ruleset is not None else self.load_rules()
        self.quarantine = quarantine if quarantine is not None else open_store(settings)
        self.services = services if services is not None else {}
        self._mynetworks = [ipaddress.ip_network(n, strict=False)
                            for n in settings.scan.mynetworks]
        self._trusted = [ipaddress.ip_network(n, strict=False)
                         for n in settings.scan.trusted_networks]
        self._slots: asyncio.Semaphore | None = None
        self.started = time.time()
        self.in_flight = 0  # messages being scanned now (a clean stop waits for them)
        self.counters: dict[str, int] = {}

    # --- rule set ------------------------------------------------------------------------
    def load_rules(self) -> Ruleset:
        return load_ruleset(self.settings.rules_dir, self.settings.site_rules_dir)

    def reload(self) -> Ruleset:
        """Validate the rule set on disk and swap it in; on error the old one stays."""
        new = self.load_rules()
        self.ruleset = new
        log.info("rules reloaded: %d files, %d checks, %d pattern rules",
                 len(new.files), len(new.bindings), len(new.rules))
        return new

    def start_services(self) -> None:
        for name, factory in SERVICE_FACTORIES.items():
            if name not in self.services:
                self.services[name] = factory(self.settings)

    # --- scanning ------------------------------------------------------------------------
    def is_originating(self, envelope: Envelope) -> bool:
        if envelope.auth_user:
            return True
        if not envelope.client_ip:
            return False
        try:
            addr = ipaddress.ip_address(envelope.client_ip)
        except ValueError:
            return False
        return any(addr in net for net in self._mynetworks)

    def parse(self, raw: bytes, envelope: Envelope) -> MessageView:
        return parse(raw, envelope, content_limit=self.settings.scan.content_size_limit,
                     trusted_networks=self._trusted)

    async def scan(self, raw: bytes, envelope: Envelope, *, skip_network: bool = False) -> Outcome:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.daemon.max_concurrent_scans)
        self.in_flight += 1
        try:
            async with self._slots:
                return await self._scan(raw, envelope, skip_network=skip_network)
        finally:
            self.in_flight -= 1

    async def _scan(self, raw: bytes, envelope: Envelope, *, skip_network: bool) -> Outcome:
        ruleset = self.ruleset
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        view = self.parse(raw, envelope)
        originating = self.is_originating(envelope)
        ctx = pipeline.ScanContext(
            settings=self.settings, ruleset=ruleset,
            deadline=loop.time() + self.settings.scan.deadline,
            dns=self.services.get("dns"), clamd=self.services.get("clamd"),
            stores=self.services.get("stores"), services=self.services)
        ctx.notes["originating"] = originating
        failure = None
        try:
            result = await pipeline.scan(view, ctx, skip_network=skip_network)
            symbols, timings, failure = result.symbols, dict(result.timings), result.failure
        except Exception:
            log.exception("internal error while scanning %s", envelope.queue_id or "message")
            symbols, timings, failure = tuple(ctx.symbols), {}, "internal_error"
        timings["parse"] = 0.0
        verdict = decide(symbols, ruleset.scores, ruleset.policy, originating=originating,
                         failure=failure)
        edits = build_edits(view, verdict, self.settings, subject_tag=ruleset.policy.subject_tag,
                            originating=originating)
        timings["total"] = time.perf_counter() - started
        return Outcome(view, verdict, edits, timings, originating, ruleset, failure,
                       notes=ctx.notes)

    # --- disposition ---------------------------------------------------------------------
    async def dispose(self, outcome: Outcome, frontend: str) -> Disposition:
        """Decide the front end's answer, storing in quarantine first where needed."""
        action = outcome.verdict.action
        verdict = outcome.verdict
        quarantine_also = False
        if frontend == "smtp" and action is Action.REJECT:
            # A 5xx after queue makes Postfix bounce to a probably forged sender.
            action = Action(self.settings.smtp.reject_action)
        category = category_of(verdict)
        if action is Action.REJECT and category in self.settings.quarantine.quarantine_on_reject:
            quarantine_also = True  # a rejected virus/banned file keeps a copy for the admin
        if action is Action.QUARANTINE or quarantine_also:
            try:
                item = await asyncio.get_running_loop().run_in_executor(
                    None, self.quarantine.put, outcome.view.raw, outcome.view.envelope, verdict,
                    category)
            except (QuarantineError, OSError) as exc:
                log.error("quarantine failed, tempfailing: %s", exc)
                fail_action = outcome.ruleset.policy.failures.get("store_unavailable",
                                                                  Action.TEMPFAIL)
                if fail_action is Action.TEMPFAIL:
                    return Disposition(Action.TEMPFAIL, 451, "4.3.0",
                                       "Temporary failure: quarantine unavailable, try again later")
                action = fail_action
            else:
                if action is Action.QUARANTINE:
                    if frontend == "milter" and self.settings.milter.quarantine_reply == "reject":
                        return Disposition(Action.REJECT, 550, "5.7.1", _reject_text(verdict),
                                           quarantine_id=item.id)
                    return Disposition(Action.DISCARD, 250, "2.0.0",
                                       f"Ok: quarantined as {item.id}", quarantine_id=item.id)
                outcome_qid = item.id
                return Disposition(Action.REJECT, 550, "5.7.1", _reject_text(verdict),
                                   quarantine_id=outcome_qid)
        if action is Action.REJECT:
            return Disposition(Action.REJECT, 550, "5.7.1", _reject_text(verdict))
        if action is Action.TEMPFAIL:
            return Disposition(Action.TEMPFAIL, 451, "4.7.1",
                               f"Temporary failure ({verdict.reason}), try again later")
        if action is Action.DISCARD:
            return Disposition(Action.DISCARD, 250, "2.0.0", "Ok: discarded by policy")
        edits = outcome.edits
        if FINAL_HEADER_HOOKS:
            edited = apply_to_bytes(outcome.view.raw, edits)
            extra: list[tuple[str, str]] = []
            for hook in FINAL_HEADER_HOOKS:
                extra.extend(hook(edited, outcome, self.services))
            if extra:
                edits = replace(edits, add=tuple(extra) + edits.add)
        return Disposition(Action.ACCEPT, 250, "2.0.0", "Ok", edits=edits)

    def log_message(self, outcome: Outcome, disposition: Disposition, frontend: str) -> None:
        """One structured line per message (log.format kv or json), then AFTER_SCAN_HOOKS."""
        self.counters[disposition.action.value] = self.counters.get(disposition.action.value, 0) + 1
        record = message_record(outcome, disposition, frontend)
        try:
            if self.settings.log.format == "json":
                line = json.dumps(record)
            else:
                line = " ".join(f"{k}={_kv(_flat(k, v))}" for k, v in record.items())
            # `filterd` carries the fields for structured targets (journald: FILTERD_*)
            msglog.info(line, extra={"filterd": {k: _flat(k, v) for k, v in record.items()}})
        except Exception:  # a log line must never cost a message its hooks (metrics, learn)
            log.exception("cannot log message %s", record.get("queue_id"))
        for hook in AFTER_SCAN_HOOKS:
            try:
                hook(outcome, disposition)
            except Exception:
                log.exception("after-scan hook %r failed", hook)


def message_record(outcome: Outcome, disposition: Disposition, frontend: str) -> dict[str, Any]:
    """The fields of the per-message log line, in a fixed order (JSON keeps the types)."""
    env = outcome.view.envelope
    verdict = outcome.verdict
    timings = outcome.timings
    symbols: dict[str, float] = {}
    for sym in verdict.symbols:  # a symbol reported twice shows once, with both scores added
        symbols[sym.name] = round(symbols.get(sym.name, 0.0) + sym.score, 3)
    return {
        "queue_id": env.queue_id or "-", "frontend": frontend,
        "client": env.client_ip or "-", "helo": env.client_helo or "-",
        "from": env.mail_from or "<>", "rcpt": list(env.rcpt_tos),
        "message_id": outcome.view.message_id or "-",
        "size": outcome.view.size, "verdict": verdict.action.value,
        "action": disposition.action.value, "reply": disposition.reply,
        "score": verdict.score, "required": verdict.required,
        "symbols": symbols,
        "reason": verdict.reason, "quarantine": disposition.quarantine_id or "-",
        "failure": outcome.failure or "-",
        "ms": round(timings.get("total", 0.0) * 1000, 1),
        "phases": {k: round(v * 1000, 1) for k, v in timings.items()
                   if k not in ("total", "parse")},
    }


def _flat(key: str, value: Any) -> Any:
    """A field as one key=value token: rcpt a,b; symbols NAME(score),...; phases phase:ms,..."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        form = "{k}({v:g})" if key == "symbols" else "{k}:{v:g}"
        return ",".join(form.format(k=k, v=v) for k, v in value.items()) or "-"
    return value


def _kv(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (" " in text or '"' in text or not text) else text


def _reject_text(verdict: Verdict) -> str:
    if verdict.virus_names:
        return f"virus {verdict.virus_names[0]} detected"
    if verdict.reason.startswith("spam score") or verdict.is_spam:
        return f"Message rejected as spam (score {verdict.score:g})"
    return f"Message rejected: {verdict.reason}"


def symbol_table(verdict: Verdict) -> list[dict[str, Any]]:
    return [{"name": s.name, "score": s.score, "options": list(s.options)}
            for s in verdict.symbols]


__all__ = ["Scanner", "Outcome", "Disposition", "SERVICE_FACTORIES", "AFTER_SCAN_HOOKS",
           "FINAL_HEADER_HOOKS", "PERIODIC_TASKS", "symbol_table", "Symbol"]
