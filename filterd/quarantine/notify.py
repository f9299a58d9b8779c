"""Quarantine notifications: an admin notice per virus/banned item, a digest per recipient.

Trusts: the notification listener (quarantine.notify_via, default quarantine.release_via: a
Postfix smtpd with no filters, so notices are not scanned and quarantined themselves).
Reads: quarantine.notify_admin, quarantine.notify_categories, quarantine.notify_from,
quarantine.notify_via, quarantine.digest_hours, quarantine.templates,
quarantine.retention_days, quarantine.release_via, daemon.hostname.
Emits: no symbols.

Runs from the daemon's periodic quarantine job, never on the message path, so a slow or dead
mail listener delays a notice, never a message. Notices are at-least-once: the sidecar records
`notified` only after the listener accepted the notice. Templates are data:
filterd/quarantine/templates.toml, overridable key by key with quarantine.templates.
"""

from __future__ import annotations

import json
import logging
import time
import tomllib
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Mapping

from filterd.frontends.reinject import ReinjectError, Target, send
from filterd.quarantine.service import iso
from filterd.quarantine.spool import SpoolStore
from filterd.quarantine.store import Item, NoSuchItem, QuarantineError, Query

log = logging.getLogger("filterd.quarantine.notify")

BUILTIN_TEMPLATES = Path(__file__).with_name("templates.toml")
NOTICE_WINDOW = 86400.0  # notices cover items of the last day: enabling them sends no backlog


@dataclass(frozen=True, slots=True)
class Sent:
    notices: int = 0
    digests: int = 0


class _Fields(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"  # an unknown field stays visible instead of crashing the task


def load_templates(settings: Any) -> dict[str, dict[str, str]]:
    templates = tomllib.loads(BUILTIN_TEMPLATES.read_text(encoding="utf-8"))
    site = settings.quarantine.templates
    if site:
        overrides = tomllib.loads(Path(site).read_text(encoding="utf-8"))
        for table, entries in overrides.items():
            templates.setdefault(table, {}).update(entries)
    return templates


def item_fields(item: Item, settings: Any) -> _Fields:
    meta = item.sidecar
    return _Fields(
        id=item.id, category=item.category, subject=item.subject or "(no subject)",
        mail_from=item.mail_from, rcpt_tos=", ".join(item.rcpt_tos), score=f"{item.score:g}",
        reason=item.reason, virus_names=", ".join(meta.get("virus_names") or []) or "-",
        time=iso(item.time), size=item.size, hostname=settings.hostname,
        retention_days=settings.quarantine.retention_days,
        release_command=f"filterd quarantine release {item.id}")


def _sender(settings: Any) -> str:
    return settings.quarantine.notify_from or f"postmaster@{settings.hostname}"


def _send(settings: Any, to: str, subject: str, body: str) -> None:
    msg = EmailMessage()
    msg["From"] = _sender(settings)
    msg["To"] = to
    msg["Subject"] = " ".join(subject.split())
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid(domain=settings.hostname)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to this
    msg.set_content(body)
    via = settings.quarantine.notify_via or settings.quarantine.release_via
    # envelope sender <> so a failing notice never bounces back into a loop
    send(Target.parse(via), "", [to], msg.as_bytes(policy=SMTP_POLICY), timeout=settings.quarantine.release_timeout,
         helo=settings.hostname)


def admin_notices(settings: Any, store: SpoolStore, templates: Mapping[str, Any],
                  now: float) -> int:
    q = settings.quarantine
    if not q.notify_admin:
        return 0
    sent = 0
    for category in q.notify_categories:
        for item in store.search(Query(since=now - NOTICE_WINDOW, category=category,
                                       oldest_first=True)):
            if item.sidecar.get("notified"):
                continue
            fields = item_fields(item, settings)
            tpl = templates["admin_notice"]
            try:
                _send(settings, q.notify_admin, tpl["subject"].format_map(fields),
                      tpl["body"].format_map(fields))
            except ReinjectError as exc:
                log.warning("admin notice for %s not sent (retried later): %s", item.id, exc)
                return sent
            try:
                with store.locked(item.id):
                    store.update(item.id, lambda meta: meta.__setitem__("notified", now))
            except NoSuchItem:
                pass
            sent += 1
    return sent


def digests(settings: Any, store: SpoolStore, templates: Mapping[str, Any], now: float) -> int:
    hours = settings.quarantine.digest_hours
    if hours <= 0:
        return 0
    try:
        last = float(json.loads(store.read_state("digest-state.json"))["last"])
    except (OSError, ValueError, KeyError, TypeError):
        last = now - hours * 3600
    if now - last < hours * 3600:
        return 0
    by_rcpt: dict[str, list[Item]] = {}
    for item in store.search(Query(since=last, until=now, state="held", oldest_first=True)):
        for rcpt in item.rcpt_tos:
            by_rcpt.setdefault(rcpt, []).append(item)
    tpl = templates["digest"]
    sent = 0
    for rcpt, items in sorted(by_rcpt.items()):
        head = _Fields(recipient=rcpt, count=len(items), hostname=settings.hostname,
                       retention_days=settings.quarantine.retention_days)
        body = tpl["header"].format_map(head)
        body += "".join(tpl["item"].format_map(item_fields(i, settings)) for i in items)
        body += tpl["footer"].format_map(head)
        try:
            _send(settings, rcpt, tpl["subject"].format_map(head), body)
            sent += 1
        except ReinjectError as exc:
            log.warning("quarantine digest for %s not sent: %s", rcpt, exc)
    store.write_state("digest-state.json", json.dumps({"last": now}).encode())
    return sent


def run(settings: Any, store: SpoolStore, now: float | None = None) -> Sent:
    q = settings.quarantine
    if not q.notify_admin and q.digest_hours <= 0:
        return Sent()
    now = time.time() if now is None else now
    try:
        templates = load_templates(settings)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        log.error("quarantine notification templates unusable (%s): %s", q.templates, exc)
        return Sent()
    try:
        return Sent(admin_notices(settings, store, templates, now),
                    digests(settings, store, templates, now))
    except QuarantineError as exc:
        log.error("quarantine notifications failed: %s", exc)
        return Sent()
