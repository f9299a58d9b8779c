"""Per-recipient and per-domain settings, and the verdict of one message for each recipient.

What it does: looks up a recipient's settings in a file map (TOML, policy.recipient_map) and/or
an SQLite database (policy.recipient_db, for large sites), from least to most specific:

    "@."                     every recipient (site default)
    "@.example.com"          example.com and every subdomain (parents first: "@.com" ...)
    "@sub.example.com"       that domain only
    "user@sub.example.com"   the address (the extension after policy.recipient_delimiter
    "user+ext@..."           stripped), then the full address with its extension

Each entry holds the keys of filterd.policy.banks.RECIPIENT_KEYS (levels, kill_action,
subject_tag, spam_lover, virus_lover, banned_lover, bypass_spam_checks, spam_headers,
quarantine, local, allow_senders, deny_senders). `decide_for()` applies one recipient's
effective policy to the symbols of the single scan; `group()` gathers recipients whose
verdict and header edits are the same, so each group is handled (and reinjected) once.

Trusts: the map file and the database (admin data). A bad file is an error at start or reload
(the old map stays on reload); a bad database row is logged once and skipped; a database that
cannot be read raises LookupUnavailable, which the Scanner turns into the `policy_lookup`
failure (tempfail by default: an unknown per-user policy must not deliver spam to a user who
asked for it to be held, nor hold mail a user asked to receive).
Reads: policy.recipient_map, policy.recipient_db, policy.recipient_delimiter,
policy.local_domains (through the Scanner).
Emits: POLICY_SENDER_ALLOWED, POLICY_SENDER_DENIED (per recipient, in that recipient's
verdict only; options: the pattern that matched).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import sqlite3
import threading
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from filterd.policy import Action, Policy, Symbol, Verdict, decide
from filterd.policy.banks import (EffectivePolicy, Layer, PolicyError, domain_matches,
                                  validate_overrides)

log = logging.getLogger("filterd.policy")

SENDER_ALLOWED = "POLICY_SENDER_ALLOWED"
SENDER_DENIED = "POLICY_SENDER_DENIED"


class LookupUnavailable(Exception):
    """The recipient database could not be read."""


# ---- addresses ---------------------------------------------------------------------------

def normalise(address: str) -> str:
    """Lower-case, without angle brackets; '' stays '' (the null sender)."""
    return address.strip().strip("<>").strip().lower()


def lookup_keys(address: str, delimiter: str = "+") -> list[str]:
    """Map keys for an address, least specific first (see the module docstring)."""
    addr = normalise(address)
    local, at, domain = addr.rpartition("@")
    if not at:
        local, domain = addr, ""
    keys = ["@."]
    labels = domain.split(".") if domain else []
    for i in range(len(labels) - 1, -1, -1):
        keys.append("@." + ".".join(labels[i:]))
    if domain:
        keys.append("@" + domain)
    base = local
    if delimiter:
        cut = min((i for i in (local.find(d) for d in delimiter) if i > 0), default=-1)
        if cut > 0:
            base = local[:cut]
    if base != local:
        keys.append(f"{base}@{domain}" if domain else base)
    keys.append(addr)
    return keys


def sender_matches(address: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that matches: user@dom, @dom, @.dom (and subdomains) or a glob."""
    addr = normalise(address)
    if not addr:
        return None
    domain = addr.rpartition("@")[2]
    for p in patterns:
        if any(ch in p for ch in "*?["):
            if fnmatch.fnmatchcase(addr, p):
                return p
        elif p.startswith("@."):
            if domain_matches(domain, [p[1:]]):
                return p
        elif p.startswith("@"):
            if domain == p[1:]:
                return p
        elif addr == p:
            return p
    return None


# ---- lookups -----------------------------------------------------------------------------

class FileMap:
    """A TOML file: one table per key, e.g. ["@example.com"] tag2_level = 5.0."""

    def __init__(self, path: Path):
        self.path = path
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(str(path), "(syntax)", str(exc)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(str(path), "(file)",
                              getattr(exc, "strerror", None) or str(exc)) from None
        self.entries: dict[str, dict[str, Any]] = {}
        for key, table in data.items():
            if not isinstance(table, dict):
                raise PolicyError(str(path), key, "expected a table [\"ADDRESS\"] or "
                                  "[\"@DOMAIN\"] of settings")
            norm = key.strip().lower()
            if "@" not in norm:
                raise PolicyError(str(path), key, "keys are user@domain, @domain, @.domain "
                                  "or @. (every recipient)")
            self.entries[norm] = validate_overrides(str(path), key, table)

    def get(self, keys: Sequence[str]) -> dict[str, Layer]:
        return {k: Layer(f"{self.path} [{k}]", self.entries[k]) for k in keys
                if k in self.entries}


SCHEMA = """CREATE TABLE IF NOT EXISTS recipient_policy (
    address  TEXT PRIMARY KEY,   -- user@domain, @domain, @.domain or @. (lower case)
    settings TEXT NOT NULL       -- a JSON object with the keys of a recipient map entry
)"""


class SqliteMap:
    """The same entries in SQLite: recipient_policy(address, settings JSON)."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()
        self._warned: set[tuple[str, str]] = set()
        if not path.exists():
            raise PolicyError(str(path), "(file)", "no such database (create it with "
                              "`filterd policy set --db`)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=2.0,
                                   check_same_thread=False)
            self._local.conn = conn
        return conn

    def get(self, keys: Sequence[str]) -> dict[str, Layer]:
        try:
            rows = dict(self._conn().execute(
                f"SELECT address, settings FROM recipient_policy WHERE address IN "
                f"({','.join('?' * len(keys))})", list(keys)).fetchall())
        except sqlite3.Error as exc:
            self._local.conn = None
            raise LookupUnavailable(f"{self.path}: {exc}") from None
        layers: dict[str, Layer] = {}
        for key in keys:
            if key not in rows:
                continue
            try:
                values = json.loads(rows[key])
                if not isinstance(values, dict):
                    raise PolicyError(str(self.path), key, "settings must be a JSON object")
                layers[key] = Layer(f"sqlite {self.path} [{key}]",
                                    validate_overrides(str(self.path), key, values))
            except (ValueError, PolicyError) as exc:
                if (key, str(exc)) not in self._warned:
                    self._warned.add((key, str(exc)))
                    log.error("recipient policy row %r ignored: %s", key, exc)
        return layers


def write_entry(db: Path, address: str, values: Mapping[str, Any]) -> None:
    """Insert or replace one row (validated first); creates the database."""
    key = address.strip().lower()
    validate_overrides(str(db), key, values)
    with sqlite3.connect(db) as conn:
        conn.execute(SCHEMA)
        conn.execute("INSERT OR REPLACE INTO recipient_policy VALUES (?, ?)",
                     (key, json.dumps(dict(values), sort_keys=True)))


class RecipientLookup:
    """File map then database (database entries win at the same key), plus local domains."""

    def __init__(self, *, file_map: FileMap | None = None, db: SqliteMap | None = None,
                 local_domains: Sequence[str] = (), delimiter: str = "+"):
        self.file_map, self.db = file_map, db
        self.local_domains = tuple(d.lower() for d in local_domains)
        self.delimiter = delimiter

    @classmethod
    def from_settings(cls, settings: Any) -> "RecipientLookup":
        p = settings.policy
        site = settings.site_rules_dir

        def path(value: str) -> Path:
            candidate = Path(value)
            return candidate if candidate.is_absolute() or site is None else site / candidate

        return cls(file_map=FileMap(path(p.recipient_map)) if p.recipient_map else None,
                   db=SqliteMap(path(p.recipient_db)) if p.recipient_db else None,
                   local_domains=p.local_domains, delimiter=p.recipient_delimiter)

    @property
    def empty(self) -> bool:
        return self.file_map is None and self.db is None

    def is_local(self, address: str) -> bool:
        if not self.local_domains:
            return True  # no list: every recipient is ours (single-domain sites, milter)
        return domain_matches(normalise(address).rpartition("@")[2], self.local_domains)

    def layers(self, address: str) -> list[Layer]:
        if self.empty:
            return []
        keys = lookup_keys(address, self.delimiter)
        out: list[Layer] = []
        file_layers = self.file_map.get(keys) if self.file_map else {}
        db_layers = self.db.get(keys) if self.db else {}
        for key in keys:
            if key in file_layers:
                out.append(file_layers[key])
            if key in db_layers:
                out.append(db_layers[key])
        return out


# ---- per-recipient verdicts ------------------------------------------------------------

def _loved(policy: Policy, eff: EffectivePolicy) -> Policy:
    """The policy a lover sees: no spam action beyond marking, no virus/banned forcing."""
    changes: dict[str, Any] = {}
    if eff.spam_lover:
        changes["levels"] = replace(policy.levels, kill_level=math.inf, reject_level=math.inf)
    if eff.virus_lover or eff.banned_lover:
        def loved(name: str) -> bool:
            return (eff.virus_lover and (name == "CLAM_VIRUS" or name.startswith("CLAM_VIRUS_"))
                    ) or (eff.banned_lover and name.startswith("BANNED_"))
        changes["forced"] = {k: v for k, v in policy.forced.items() if not loved(k)}
    return replace(policy, **changes) if changes else policy


def sender_symbols(eff: EffectivePolicy, senders: Sequence[str]) -> list[Symbol]:
    out = []
    for name, patterns in ((SENDER_ALLOWED, eff.allow_senders), (SENDER_DENIED, eff.deny_senders)):
        if patterns:
            for s in senders:
                hit = sender_matches(s, patterns)
                if hit:
                    out.append(Symbol(name, (hit,)))
                    break
    return out


def decide_for(symbols: Sequence[Symbol], scores: Mapping[str, float], eff: EffectivePolicy, *,
               failure: str | None = None, senders: Sequence[str] = ()) -> Verdict:
    """The verdict of the scanned message for one recipient's effective policy."""
    extra = sender_symbols(eff, senders)
    verdict = decide([*symbols, *extra] if extra else symbols, scores, _loved(eff.policy, eff),
                     originating=eff.originating, failure=failure,
                     spam_checks=not eff.bypass_spam_checks)
    if not eff.quarantine and verdict.action is Action.QUARANTINE:
        # no quarantine for this recipient (amavis: *_quarantine_to undef): the kill action
        # drops the message instead of storing it
        verdict = replace(verdict, action=Action.DISCARD,
                          reason=f"{verdict.reason}; quarantine off")
    return verdict


@dataclass(frozen=True, slots=True)
class RecipientGroup:
    """Recipients that get the same verdict and the same header edits."""

    recipients: tuple[str, ...]
    verdict: Verdict
    policy: EffectivePolicy       # of the first recipient (the group's values are the same)
    spam_headers: bool            # X-Spam-* headers and subject tag for this group


def spam_headers_for(eff: EffectivePolicy) -> bool:
    return eff.spam_headers and eff.local and not eff.bypass_spam_checks


def group(decisions: Sequence[tuple[str, EffectivePolicy, Verdict]]) -> list[RecipientGroup]:
    """Group (recipient, policy, verdict) by what is done to the copy, in recipient order."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for rcpt, eff, verdict in decisions:
        headers = spam_headers_for(eff)
        key = (verdict, headers, eff.policy.subject_tag if headers else "")
        if key in groups:
            groups[key][0].append(rcpt)
        else:
            groups[key] = [[rcpt], eff, verdict, headers]
    return [RecipientGroup(tuple(r), v, e, h) for r, e, v, h in groups.values()]


__all__ = ["FileMap", "SqliteMap", "RecipientLookup", "RecipientGroup", "LookupUnavailable",
           "decide_for", "group", "lookup_keys", "normalise", "sender_matches", "write_entry",
           "spam_headers_for", "SENDER_ALLOWED", "SENDER_DENIED", "SCHEMA"]
