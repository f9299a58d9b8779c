"""What admins do with the quarantine: list, show, release, delete, expire, stats.

Trusts: the store for the items; the release listener (quarantine.release_via, a Postfix smtpd
on loopback with no filters) for delivery: an item counts as released only when that listener
accepted every recipient.
Reads: quarantine.release_via, quarantine.release_timeout, quarantine.release_header,
quarantine.retention_days, daemon.hostname.
Emits: no symbols.

Release is a state transition under the item's lock: held -> releasing (durable) -> SMTP ->
released, or back to held when the listener refuses. Two releases of one ID at the same time
therefore deliver once; a second release says so and does nothing unless forced; a crash
between the SMTP reply and the final write leaves "releasing", which again needs --force,
because the message may already have been delivered.
"""

from __future__ import annotations

import calendar
import email.utils
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from filterd.frontends.reinject import ReinjectError, Target, send
from filterd.quarantine.store import Item, QuarantineError, QuarantineStore

_RELATIVE = re.compile(r"\A(\d+(?:\.\d+)?)\s*([smhdw])\Z")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class AlreadyReleased(QuarantineError):
    """The item was released before (or a release of it was interrupted): needs --force."""


class ReleaseRefused(QuarantineError):
    """The release listener refused or was unreachable; the item stays held."""

    def __init__(self, message: str, code: int | None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Released:
    item: Item
    recipients: tuple[str, ...]
    reply: str


def parse_when(text: str, now: float | None = None) -> float:
    """A point in time: 2026-11-22, 2026-11-22T10:15[:00][Z], or an age such as 3d, 12h, 30m."""
    now = time.time() if now is None else now
    value = text.strip()
    match = _RELATIVE.match(value.lower())
    if match:
        return now - float(match.group(1)) * _UNIT[match.group(2)]
    value = value.replace(" ", "T").removesuffix("Z").removesuffix("z")
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(value, fmt)))
        except ValueError:
            continue
    raise ValueError(f"{text!r} is not a date (2026-11-22, 2026-11-22T10:15) or an age (3d, 12h)")


def iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def add_release_header(raw: bytes, name: str, value: str) -> bytes:
    """The stored bytes with one header line in front; nothing else changes."""
    if not name:
        return raw
    eol = b"\r\n" if b"\r\n" in raw[:4096] else b"\n"
    clean = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in value)
    return f"{name}: {clean}".encode("ascii") + eol + raw


def wire_form(data: bytes) -> bytes:
    """CRLF line ends for SMTP (a spool written from a bare-LF source keeps its bytes on disk;
    Postfix stores lines, so the delivered message is the same either way)."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


def release(store: QuarantineStore, settings: Any, item_id: str, *, by: str,
            to: Sequence[str] = (), force: bool = False,
            sender: Callable[..., str] = send) -> Released:
    """Deliver one item to quarantine.release_via and mark it released.

    Raises NoSuchItem, AlreadyReleased, ReleaseRefused (item left as it was) or QuarantineError.
    """
    q = settings.quarantine
    with store.locked(item_id):
        item = store.get(item_id)
        if item.state != "held" and not force:
            last = item.last_release
            if item.state == "released" and last:
                raise AlreadyReleased(
                    f"{item_id}: already released at {iso(last.get('at'))} by {last.get('by')} "
                    f"to {', '.join(last.get('to') or [])}; nothing done (--force releases again)")
            pending = item.sidecar.get("releasing") or {}
            raise AlreadyReleased(
                f"{item_id}: a release by {pending.get('by', '?')} at {iso(pending.get('at'))} "
                "did not finish and may have been delivered; check the mail log, then use "
                "--force to release again")
        recipients = tuple(to) or item.rcpt_tos
        if not recipients:
            raise QuarantineError(f"{item_id}: no recipients (give --to ADDRESS)")
        raw = store.read_raw(item_id)
        now = time.time()
        header_value = (f"{item_id} by {by} at "
                        f"{email.utils.formatdate(now, localtime=False, usegmt=True)}")
        data = wire_form(add_release_header(raw, q.release_header, header_value))
        previous = item.state

        def begin(meta: dict[str, Any]) -> None:
            meta["state"] = "releasing"
            meta["releasing"] = {"at": now, "by": by, "to": list(recipients)}

        store.update(item_id, begin)
        try:
            reply = sender(Target.parse(q.release_via), item.mail_from, list(recipients), data,
                           timeout=q.release_timeout, helo=settings.hostname)
        except ReinjectError as exc:
            def back(meta: dict[str, Any]) -> None:
                meta["state"] = previous
                meta.pop("releasing", None)
            store.update(item_id, back)
            raise ReleaseRefused(f"{item_id}: release target {q.release_via} refused: {exc}; "
                                 f"the item stays {previous}", exc.code) from None

        def done(meta: dict[str, Any]) -> None:
            meta["state"] = "released"
            meta.pop("releasing", None)
            meta.setdefault("releases", []).append(
                {"at": now, "by": by, "to": list(recipients), "via": q.release_via,
                 "forced": bool(force and previous != "held")})

        try:
            updated = store.update(item_id, done)
        except QuarantineError as exc:
            raise QuarantineError(f"{item_id}: delivered, but could not be marked released "
                                  f"({exc}); it stays 'releasing'") from None
        return Released(updated, recipients, reply)


def expire(store: QuarantineStore, days: float, now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    return store.expire(now - days * 86400)


def describe(item: Item) -> list[str]:
    """Human-readable metadata of one item (for `show`)."""
    meta = item.sidecar
    lines = [f"id:          {item.id}",
             f"state:       {item.state}",
             f"category:    {item.category}",
             f"quarantined: {iso(item.time)}",
             f"queue id:    {item.queue_id or '-'}",
             f"from:        <{item.mail_from}>",
             f"to:          {', '.join(f'<{r}>' for r in item.rcpt_tos)}",
             f"client:      {meta.get('client_ip') or '-'} (helo {meta.get('client_helo') or '-'})",
             f"subject:     {item.subject}",
             f"message-id:  {meta.get('message_id') or '-'}",
             f"size:        {item.size} bytes, sha256 {item.sha256}",
             f"verdict:     {item.action}, score {item.score:g} "
             f"(required {float(meta.get('required') or 0):g})",
             f"reason:      {item.reason}"]
    if meta.get("virus_names"):
        lines.append(f"viruses:     {', '.join(meta['virus_names'])}")
    for rel in item.releases:
        lines.append(f"released:    {iso(rel.get('at'))} by {rel.get('by')} to "
                     f"{', '.join(rel.get('to') or [])}")
    if meta.get("releasing"):
        pending = meta["releasing"]
        lines.append(f"releasing:   started {iso(pending.get('at'))} by {pending.get('by')} "
                     "(did not finish)")
    symbols = meta.get("symbols") or []
    if symbols:
        lines.append("symbols:")
        for sym in sorted(symbols, key=lambda s: (-abs(float(s.get("score") or 0)), s["name"])):
            opts = f" [{', '.join(sym.get('options') or [])}]" if sym.get("options") else ""
            lines.append(f"  {float(sym.get('score') or 0):8.3f}  {sym['name']}{opts}")
    return lines


def header_block(raw: bytes) -> bytes:
    ends = [(pos, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (pos := raw.find(sep)) >= 0]
    if not ends:
        return raw
    pos, length = min(ends)
    return raw[:pos + length // 2]
