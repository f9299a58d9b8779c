"""The scanning service both front ends and the CLI share: parse once, scan, decide, dispose.

Trusts: the front end for the envelope (it has already applied XFORWARD/peer checks).
Reads: scan.*, daemon.max_concurrent_scans, smtp.reject_action, milter.quarantine_reply,
quarantine.quarantine_on_reject, scan.mynetworks (originating mail), dkim.sign, policy.*
(through filterd.policy.recipients), the rule set and the policy banks (rules/banks/).

`Scanner.scan()` gives an Outcome (view, verdict, header edits); `Scanner.dispose()` turns it
into what the front end must do (a Disposition), quarantining durably first where the verdict
says so. The front ends only translate a Disposition into protocol terms. The rule set and the
banks are captured at the start of each scan, so a reload never changes a message in flight.

Policy per recipient (docs/policy.md): the message is scanned once, under the policy banks its
envelope selects (which may disable checks); then each recipient gets its own verdict (bank +
recipient settings), and recipients with the same verdict and header edits form a group
(Outcome.groups). One group is the common case and takes the same path as before. With several
groups, dispose() stores every held recipient in one quarantine item (those recipients in its
sidecar) and returns a Disposition with one GroupDisposition per group: the milter removes the
held recipients (delrcpt) and delivers the others with the headers of the most severe delivered
group; the SMTP front end reinjects each delivered group separately; LMTP answers each
recipient with its group's reply.
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
from filterd.pipeline.content import ContentPool
from filterd.policy import SEVERITY, Action, Symbol, Verdict
from filterd.policy.banks import (EffectivePolicy, MessageFacts, bank_layers, load_banks, merge,
                                  select_banks)
from filterd.policy.recipients import (LookupUnavailable, RecipientGroup, RecipientLookup,
                                       decide_for, group, normalise, spam_headers_for)
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
# fn(edited_bytes, outcome, services) -> [(name, value)]. A hook may carry an attribute
# `applies(outcome, services) -> bool`: when no hook applies to a message, the edited bytes
# (a copy of the whole message) are never built (most mail is not signed).
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
    # recipients grouped by verdict and header edits, with each group's edits (same order);
    # `verdict`/`edits` above are those of the most severe group (all of them when one)
    groups: list[RecipientGroup] = field(default_factory=list)
    group_edits: list[HeaderEdits] = field(default_factory=list)
    # the message-level policy (banks selected, no recipient settings)
    policy: EffectivePolicy | None = None

    @property
    def dkim_sign(self) -> bool:
        return self.policy.dkim_sign if self.policy is not None else True


@dataclass
class GroupDisposition:
    """What happens to one recipient group's copy (see Disposition.groups)."""

    recipients: tuple[str, ...]
    action: Action                   # ACCEPT (deliver with edits), QUARANTINE, DISCARD, REJECT
    code: int = 250
    status: str = "2.0.0"
    text: str = "Ok"
    quarantine_id: str | None = None
    edits: HeaderEdits | None = None

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"


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
    # several recipient groups: one entry each (empty: every recipient shares this disposition)
    groups: tuple[GroupDisposition, ...] = ()
    # milter: recipients to remove before delivering to the others (held or discarded)
    remove_rcpts: tuple[str, ...] = ()

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
        self.banks = load_banks(settings.rules_dir, settings.site_rules_dir)
        self.recipients = RecipientLookup.from_settings(settings)
        self._scan_rulesets: dict[tuple[int, tuple[str, ...]], Ruleset] = {}
        # message-level policies by (rule set, originating, banks) identity: message_policy
        self._message_policies: dict[tuple[Any, ...], tuple[tuple[Any, ...], EffectivePolicy]] = {}
        # the content checks' worker processes (start_content_workers); None: on the loop
        self.content_pool: ContentPool | None = None

    # --- rule set ------------------------------------------------------------------------
    def load_rules(self) -> Ruleset:
        return load_ruleset(self.settings.rules_dir, self.settings.site_rules_dir)

    def reload(self) -> Ruleset:
        """Validate the rule set, banks and recipient map on disk and swap them in; on error
        the old ones stay."""
        new = self.load_rules()
        banks = load_banks(self.settings.rules_dir, self.settings.site_rules_dir)
        recipients = RecipientLookup.from_settings(self.settings)
        self.ruleset, self.banks, self.recipients = new, banks, recipients
        self._scan_rulesets = {}
        self._message_policies = {}
        if self.content_pool is not None:  # workers hold the rule set they were forked with
            old, self.content_pool = self.content_pool, None
            self.start_content_workers()
            old.retire()
        log.info("rules reloaded: %d files, %d checks, %d pattern rules",
                 len(new.files), len(new.bindings), len(new.rules))
        return new

    def start_services(self) -> None:
        for name, factory in SERVICE_FACTORIES.items():
            if name not in self.services:
                self.services[name] = factory(self.settings)

    def start_content_workers(self) -> None:
        """Fork scan.content_workers processes for the content checks (the daemon does, early,
        before its threads start); without them the checks run on the event loop."""
        if self.settings.scan.content_workers > 0 and self.content_pool is None:
            self.content_pool = ContentPool(self.settings, self.ruleset,
                                            self.settings.scan.content_workers).start()

    def stop_content_workers(self) -> None:
        if self.content_pool is not None:
            self.content_pool.close()
            self.content_pool = None

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

    def message_facts(self, envelope: Envelope) -> MessageFacts:
        """What policy banks select on, from the envelope."""
        macros = dict(envelope.macros)
        port_text = macros.get("{daemon_port}") or ""
        mail_from = normalise(envelope.mail_from)
        in_mynetworks = False
        if envelope.client_ip:
            try:
                addr = ipaddress.ip_address(envelope.client_ip)
                in_mynetworks = any(addr in net for net in self._mynetworks)
            except ValueError:
                pass
        return MessageFacts(listener=envelope.listener,
                            port=int(port_text) if port_text.isdigit() else None,
                            client_ip=envelope.client_ip, mynetworks=in_mynetworks,
                            auth_user=envelope.auth_user, macros=macros,
                            sender_domain=mail_from.rpartition("@")[2] if "@" in mail_from
                            else "")

    def message_policy(self, envelope: Envelope, ruleset: Ruleset,
                       banks: list[Any] | None = None) -> tuple[EffectivePolicy, list[Any]]:
        """The policy of the whole message: the rule set's, then the banks it selects."""
        selected = select_banks(self.banks if banks is None else banks,
                                self.message_facts(envelope))
        originating = self.is_originating(envelope)
        # merge() is pure and its inputs take a handful of values per daemon: build each
        # policy once. Keyed by identity; the entry holds the rule set and banks themselves,
        # so their ids cannot be reused while cached (a reload brings new objects, new keys).
        key = (id(ruleset), originating, *map(id, selected))
        cached = self._message_policies.get(key)
        if cached is not None:
            return cached[1], selected
        eff = merge(ruleset.policy, bank_layers(selected), originating=originating,
                    dkim_sign=self.settings.dkim.sign, banks=[b.name for b in selected])
        if len(self._message_policies) >= 64:
            self._message_policies.clear()
        self._message_policies[key] = ((ruleset, *selected), eff)
        return eff, selected

    def _ruleset_for(self, ruleset: Ruleset, disabled: tuple[str, ...]) -> Ruleset:
        """The rule set without the checks a bank disables (by binding name, glob allowed)."""
        if not disabled:
            return ruleset
        key = (id(ruleset), disabled)
        cached = self._scan_rulesets.get(key)
        if cached is None:
            import copy
            import fnmatch
            cached = copy.copy(ruleset)
            cached.bindings = [b for b in ruleset.bindings
                               if not any(fnmatch.fnmatchcase(b.name.lower(), d)
                                          for d in disabled)]
            if len(self._scan_rulesets) > 64:
                self._scan_rulesets.clear()
            self._scan_rulesets[key] = cached
        return cached

    def recipient_policy(self, address: str, envelope: Envelope, ruleset: Ruleset,
                         message_eff: EffectivePolicy, selected: list[Any]) -> EffectivePolicy:
        """One recipient's policy: the message's, then its domain and address settings.
        Raises LookupUnavailable when the recipient database cannot be read."""
        layers = self.recipients.layers(address) if address else []
        local = self.recipients.is_local(address)
        if not layers and local == message_eff.local:
            return message_eff
        return merge(ruleset.policy, bank_layers(selected) + layers,
                     originating=self.is_originating(envelope), local=local,
                     dkim_sign=self.settings.dkim.sign, banks=message_eff.banks)

    async def _scan(self, raw: bytes, envelope: Envelope, *, skip_network: bool) -> Outcome:
        ruleset, banks, pool = self.ruleset, self.banks, self.content_pool
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        view = self.parse(raw, envelope)
        message_eff, selected = self.message_policy(envelope, ruleset, banks)
        originating = message_eff.originating
        ctx = pipeline.ScanContext(
            settings=self.settings, ruleset=self._ruleset_for(ruleset, message_eff.disable_checks),
            deadline=loop.time() + self.settings.scan.deadline,
            dns=self.services.get("dns"), clamd=self.services.get("clamd"),
            stores=self.services.get("stores"), services=self.services,
            content_runner=pool.submit if pool is not None else None)
        ctx.notes["originating"] = originating
        if message_eff.banks:
            ctx.notes["policy_banks"] = message_eff.banks
        failure = None
        try:
            result = await pipeline.scan(view, ctx, skip_network=skip_network)
            symbols, timings, failure = result.symbols, dict(result.timings), result.failure
        except Exception:
            log.exception("internal error while scanning %s", envelope.queue_id or "message")
            symbols, timings, failure = tuple(ctx.symbols), {}, "internal_error"
        timings["parse"] = 0.0
        groups = self._decide_per_recipient(view, envelope, symbols, ruleset, message_eff,
                                            selected, failure)
        group_edits = [build_edits(view, g.verdict, self.settings,
                                   subject_tag=g.policy.policy.subject_tag,
                                   originating=message_eff.originating,
                                   spam_headers=g.spam_headers) for g in groups]
        worst = max(range(len(groups)), key=lambda i: SEVERITY[groups[i].verdict.action])
        timings["total"] = time.perf_counter() - started
        return Outcome(view, groups[worst].verdict, group_edits[worst], timings, originating,
                       ruleset, failure, notes=ctx.notes, groups=groups,
                       group_edits=group_edits, policy=message_eff)

    def _decide_per_recipient(self, view: MessageView, envelope: Envelope,
                              symbols: tuple[Symbol, ...], ruleset: Ruleset,
                              message_eff: EffectivePolicy, selected: list[Any],
                              failure: str | None) -> list[RecipientGroup]:
        rcpts = tuple(envelope.rcpt_tos) or ("",)
        senders = (envelope.mail_from, view.from_address)
        if self.recipients.empty and not self.recipients.local_domains:
            # the common case: every recipient has the message's policy, one verdict
            verdict = decide_for(symbols, ruleset.scores_for(symbols), message_eff, failure=failure,
                                 senders=senders)
            return [RecipientGroup(rcpts, verdict, message_eff, spam_headers_for(message_eff))]
        decisions = []
        scores = ruleset.scores_for(symbols)
        for rcpt in rcpts:
            try:
                eff = self.recipient_policy(rcpt, envelope, ruleset, message_eff, selected)
                rcpt_failure = failure
            except LookupUnavailable as exc:
                log.error("recipient policy lookup failed for %s: %s", rcpt, exc)
                eff, rcpt_failure = message_eff, failure or "policy_lookup"
            decisions.append((rcpt, eff, decide_for(symbols, scores, eff,
                                                    failure=rcpt_failure, senders=senders)))
        return group(decisions)

    # --- disposition ---------------------------------------------------------------------
    async def dispose(self, outcome: Outcome, frontend: str) -> Disposition:
        """Decide the front end's answer, storing in quarantine first where needed.

        frontend: "milter", "smtp" or "lmtp". One recipient group (the usual case): one
        answer for the message. Several: see _dispose_split.
        """
        if len(outcome.groups) > 1:
            return await self._dispose_split(outcome, frontend)
        return await self._dispose_one(outcome, frontend)

    async def _dispose_one(self, outcome: Outcome, frontend: str) -> Disposition:
        action = outcome.verdict.action
        verdict = outcome.verdict
        quarantine_also = False
        if frontend in ("smtp", "lmtp") and action is Action.REJECT:
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
        return Disposition(Action.ACCEPT, 250, "2.0.0", "Ok",
                           edits=self._final_edits(outcome, outcome.edits))

    def _final_edits(self, outcome: Outcome, edits: HeaderEdits) -> HeaderEdits:
        """The edits plus what the final-header hooks (DKIM signing) add on top of them."""
        hooks = [hook for hook in FINAL_HEADER_HOOKS
                 if getattr(hook, "applies", None) is None
                 or hook.applies(outcome, self.services)]  # type: ignore[attr-defined]
        if not hooks:
            return edits
        edited = apply_to_bytes(outcome.view.raw, edits)
        extra: list[tuple[str, str]] = []
        for hook in hooks:
            extra.extend(hook(edited, outcome, self.services))
        return replace(edits, add=tuple(extra) + edits.add) if extra else edits

    async def _dispose_split(self, outcome: Outcome, frontend: str) -> Disposition:
        """Several recipient groups, one copy of the message.

        - any group tempfails: the whole message tempfails (nothing stored or delivered yet);
        - every group rejects (milter, smtp): the whole message is rejected as one would be;
        - otherwise held groups (quarantine; reject, which cannot be refused for some
          recipients only at end of data, except over LMTP) are stored in ONE quarantine item
          with those recipients; discarded groups are dropped; the rest is delivered, each
          group with its own edits (the milter can apply only one set: the most severe
          delivered group's).
        """
        groups, edits_of = outcome.groups, outcome.group_edits
        mapped = []
        for g in groups:
            action = g.verdict.action
            if frontend in ("smtp", "lmtp") and action is Action.REJECT:
                action = Action(self.settings.smtp.reject_action)
            mapped.append(action)
        for g, action in zip(groups, mapped):
            if action is Action.TEMPFAIL:
                return Disposition(Action.TEMPFAIL, 451, "4.7.1",
                                   f"Temporary failure ({g.verdict.reason}), try again later")
        if frontend != "lmtp" and all(a is Action.REJECT for a in mapped):
            worst = max(groups, key=lambda g: g.verdict.score)
            return await self._dispose_one(replace(outcome, verdict=worst.verdict), frontend)
        held = [i for i, a in enumerate(mapped) if a in (Action.QUARANTINE, Action.REJECT)]
        stored_id: str | None = None
        if held:
            # LMTP refuses rejected recipients itself; it keeps a copy only per category
            store = [i for i in held if mapped[i] is Action.QUARANTINE or frontend != "lmtp"
                     or category_of(groups[i].verdict)
                     in self.settings.quarantine.quarantine_on_reject]
            if store:
                verdict = max((groups[i].verdict for i in store),
                              key=lambda v: (SEVERITY[v.action], v.score))
                rcpts = tuple(r for i in store for r in groups[i].recipients)
                env = replace(outcome.view.envelope, rcpt_tos=rcpts)
                try:
                    item = await asyncio.get_running_loop().run_in_executor(
                        None, self.quarantine.put, outcome.view.raw, env, verdict,
                        category_of(verdict))
                except (QuarantineError, OSError) as exc:
                    log.error("quarantine failed, tempfailing: %s", exc)
                    return Disposition(Action.TEMPFAIL, 451, "4.3.0",
                                       "Temporary failure: quarantine unavailable, try again "
                                       "later")
                stored_id = item.id
        parts: list[GroupDisposition] = []
        for i, (g, action) in enumerate(zip(groups, mapped)):
            if action is Action.REJECT and frontend == "lmtp":
                parts.append(GroupDisposition(g.recipients, Action.REJECT, 550, "5.7.1",
                                              _reject_text(g.verdict), quarantine_id=stored_id
                                              if i in held else None))
            elif i in held:
                parts.append(GroupDisposition(g.recipients, Action.QUARANTINE, 250, "2.0.0",
                                              f"Ok: quarantined as {stored_id}",
                                              quarantine_id=stored_id))
            elif action is Action.DISCARD:
                parts.append(GroupDisposition(g.recipients, Action.DISCARD, 250, "2.0.0",
                                              "Ok: discarded by policy"))
            else:
                parts.append(GroupDisposition(g.recipients, Action.ACCEPT, 250, "2.0.0", "Ok",
                                              edits=self._final_edits(outcome, edits_of[i])))
        delivered = [p for p in parts if p.action is Action.ACCEPT]
        removed = tuple(r for p in parts if p.action is not Action.ACCEPT for r in p.recipients)
        if delivered:
            # the milter can give the delivered recipients one header set: the most severe
            # group's (a spam-marked copy rather than an unmarked one), preferring one with
            # X-Spam headers among equals
            best = max((i for i, p in enumerate(parts) if p.action is Action.ACCEPT),
                       key=lambda i: (SEVERITY[groups[i].verdict.action],
                                      groups[i].spam_headers, groups[i].verdict.score))
            return Disposition(Action.ACCEPT, 250, "2.0.0", "Ok", quarantine_id=stored_id,
                               edits=parts[best].edits, groups=tuple(parts),
                               remove_rcpts=removed)
        if stored_id and frontend == "milter" and self.settings.milter.quarantine_reply == "reject":
            worst = max(groups, key=lambda g: (SEVERITY[g.verdict.action], g.verdict.score))
            return Disposition(Action.REJECT, 550, "5.7.1", _reject_text(worst.verdict),
                               quarantine_id=stored_id, groups=tuple(parts))
        text = f"Ok: quarantined as {stored_id}" if stored_id else "Ok: discarded by policy"
        return Disposition(Action.DISCARD, 250, "2.0.0", text, quarantine_id=stored_id,
                           groups=tuple(parts), remove_rcpts=removed)


    def log_message(self, outcome: Outcome, disposition: Disposition, frontend: str) -> None:
        """One structured line per message (log.format kv or json), then AFTER_SCAN_HOOKS."""
        self.counters[disposition.action.value] = self.counters.get(disposition.action.value, 0) + 1
        if msglog.isEnabledFor(logging.INFO):  # below the log level, the line is never built
            self._write_message_line(outcome, disposition, frontend)
        for hook in AFTER_SCAN_HOOKS:
            try:
                hook(outcome, disposition)
            except Exception:
                log.exception("after-scan hook %r failed", hook)

    def _write_message_line(self, outcome: Outcome, disposition: Disposition,
                            frontend: str) -> None:
        record = message_record(outcome, disposition, frontend)
        try:
            flat = {k: _flat(k, v) for k, v in record.items()}  # once, for both uses
            if self.settings.log.format == "json":
                line = json.dumps(record)
            else:
                line = " ".join([f"{k}={_kv(v)}" for k, v in flat.items()])
            # `filterd` carries the fields for structured targets (journald: FILTERD_*)
            msglog.info(line, extra={"filterd": flat})
        except Exception:  # a log line must never cost a message its hooks (metrics, learn)
            log.exception("cannot log message %s", record.get("queue_id"))


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
        return ",".join([str(v) for v in value]) or "-"
    if isinstance(value, dict):
        if key == "symbols":
            return ",".join([f"{k}({v:g})" for k, v in value.items()]) or "-"
        return ",".join([f"{k}:{v:g}" for k, v in value.items()]) or "-"
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


__all__ = ["Scanner", "Outcome", "Disposition", "GroupDisposition", "SERVICE_FACTORIES", "AFTER_SCAN_HOOKS",
           "FINAL_HEADER_HOOKS", "PERIODIC_TASKS", "symbol_table", "Symbol"]
