"""Policy banks and per-recipient settings merged into one effective policy per recipient.

What it does: loads named *policy banks* (rules/banks/*.toml, then the site's
local.d/banks/*.toml merged key by key, then override.d/banks/*.toml replacing whole banks),
picks the banks whose `select` matches a message (listener, listener port, client network,
mynetworks, SMTP AUTH, milter macros such as {daemon_name}, sender domain) and merges, in
this order, later layers winning key by key:

    1. rules       levels, kill_action, subject_tag, forced, failures of rules/actions.toml
    2. banks       every selected bank, by (`order`, name)
    3. recipient   domain entries of the recipient lookup, least specific first
                   ("@.", "@.example.com", "@sub.example.com"), then the address itself
                   (user@domain, then user+ext@domain): filterd.policy.recipients

Scalars are replaced by a later layer; `allow_senders`/`deny_senders`/`disable_checks`
accumulate; `forced` merges symbol by symbol. Every value remembers the layer that set it
(`EffectivePolicy.sources`), which `filterd policy show ADDRESS` prints.

Trusts: the rule directory and the site directory (admin data). Reads no settings itself:
the Scanner passes mynetworks and the site directory. Emits no symbols (the per-recipient
sender lists are turned into POLICY_* symbols by filterd.policy.recipients).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from filterd.policy import Action, Levels, Policy
from filterd.ruleset import RulesetError

LEVEL_KEYS = ("tag_level", "tag2_level", "kill_level", "reject_level",
              "originating_reject_level")
BOOL_KEYS = ("spam_lover", "virus_lover", "banned_lover", "bypass_spam_checks",
             "spam_headers", "quarantine", "local")
LIST_KEYS = ("allow_senders", "deny_senders")
# Keys a recipient or domain entry may set (file map, SQLite); banks may set these too.
RECIPIENT_KEYS = frozenset(LEVEL_KEYS + BOOL_KEYS + LIST_KEYS + ("kill_action", "subject_tag"))
# Keys only a bank may set: they concern the whole message, not one recipient.
BANK_ONLY_KEYS = frozenset(("originating", "dkim_sign", "disable_checks", "forced",
                            "description", "select", "order"))
BANK_KEYS = RECIPIENT_KEYS | BANK_ONLY_KEYS
SELECT_KEYS = frozenset(("listener", "port", "client_networks", "mynetworks", "authenticated",
                         "auth_users", "macros", "sender_domains", "originating"))
LISTENERS = ("milter", "smtp", "lmtp", "scan")


class PolicyError(RulesetError):
    """A problem in policy data, naming the file (or database row), the key and the problem.

    A RulesetError, so start-up, `filterd reload` and the CLI treat it like a rule error (a
    reload that raises keeps the running policy).
    """


# ---- values ------------------------------------------------------------------------------

def _level(source: str, key: str, value: Any) -> float:
    if value == "off":
        return math.inf  # never reached
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise PolicyError(source, key, f"expected a number or \"off\", got {value!r}")
    return float(value)


def _strings(source: str, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(source, key, f"expected a list of strings, got {value!r}")
    return tuple(v.strip().lower() for v in value if v.strip())


def _action(source: str, key: str, value: Any) -> Action:
    try:
        return Action(value)
    except ValueError:
        raise PolicyError(source, key, f"unknown action {value!r} (known: "
                          f"{', '.join(a.value for a in Action)})") from None


def validate_overrides(source: str, entry: str, values: Mapping[str, Any], *,
                       allowed: frozenset[str] = RECIPIENT_KEYS) -> dict[str, Any]:
    """Check and normalise one table of overrides (a bank or a recipient entry)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        where = f"{entry}.{key}"
        if key not in allowed:
            hint = " (a bank-only key)" if key in BANK_ONLY_KEYS else ""
            raise PolicyError(source, where, f"unknown key{hint}; known: "
                              f"{', '.join(sorted(allowed - {'select', 'order'}))}")
        if key in LEVEL_KEYS:
            out[key] = _level(source, where, value)
        elif key in BOOL_KEYS or key in ("originating", "dkim_sign"):
            if not isinstance(value, bool):
                raise PolicyError(source, where, f"expected true or false, got {value!r}")
            out[key] = value
        elif key in LIST_KEYS or key == "disable_checks":
            out[key] = _strings(source, where, value)
            if key == "disable_checks":
                out[key] = tuple(v for v in out[key])
        elif key == "kill_action":
            out[key] = _action(source, where, value)
        elif key in ("subject_tag", "description"):
            if not isinstance(value, str):
                raise PolicyError(source, where, f"expected a string, got {value!r}")
            out[key] = value
        elif key == "forced":
            if not isinstance(value, dict):
                raise PolicyError(source, where, "expected a table SYMBOL = action")
            out[key] = {sym: _action(source, f"{where}.{sym}", act) for sym, act in value.items()}
        elif key == "order":
            if isinstance(value, bool) or not isinstance(value, int):
                raise PolicyError(source, where, f"expected an integer, got {value!r}")
            out[key] = value
        elif key == "select":
            out[key] = _selectors(source, where, value)
    return out


# ---- selection ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MessageFacts:
    """What a bank may be selected by; the Scanner builds it from the envelope."""

    listener: str = "scan"
    port: int | None = None               # filterd's listener port, or milter {daemon_port}
    client_ip: str | None = None
    mynetworks: bool = False              # client in scan.mynetworks
    auth_user: str | None = None          # SASL login ({auth_authen})
    macros: Mapping[str, str] = field(default_factory=dict)
    sender_domain: str = ""


@dataclass(frozen=True, slots=True)
class Selector:
    """One `select` table: every condition given must hold (an empty table always holds)."""

    listener: tuple[str, ...] = ()
    port: tuple[int, ...] = ()
    client_networks: tuple[Any, ...] = ()
    mynetworks: bool | None = None
    authenticated: bool | None = None
    auth_users: tuple[str, ...] = ()
    macros: tuple[tuple[str, tuple[str, ...]], ...] = ()
    sender_domains: tuple[str, ...] = ()
    originating: bool | None = None       # mynetworks or authenticated

    def matches(self, facts: MessageFacts) -> bool:
        if self.listener and facts.listener not in self.listener:
            return False
        if self.port and facts.port not in self.port:
            return False
        if self.client_networks:
            try:
                addr = ipaddress.ip_address(facts.client_ip or "")
            except ValueError:
                return False
            if not any(addr in net for net in self.client_networks):
                return False
        authenticated = bool(facts.auth_user)
        if self.mynetworks is not None and facts.mynetworks is not self.mynetworks:
            return False
        if self.authenticated is not None and authenticated is not self.authenticated:
            return False
        if self.originating is not None and \
                (facts.mynetworks or authenticated) is not self.originating:
            return False
        if self.auth_users:
            user = (facts.auth_user or "").lower()
            if not user or not any(fnmatch.fnmatchcase(user, p) for p in self.auth_users):
                return False
        for name, values in self.macros:
            value = facts.macros.get(name)
            if value is None or value.lower() not in values:
                return False
        if self.sender_domains and not domain_matches(facts.sender_domain, self.sender_domains):
            return False
        return True


def domain_matches(domain: str, patterns: Iterable[str]) -> bool:
    """`example.com` matches itself; `.example.com` matches it and every subdomain."""
    domain = domain.lower().rstrip(".")
    if not domain:
        return False
    for p in patterns:
        if p.startswith("."):
            if domain == p[1:] or domain.endswith(p):
                return True
        elif domain == p:
            return True
    return False


def _macro_name(name: str) -> str:
    name = name.strip()
    return name if len(name) == 1 or name.startswith("{") else "{" + name + "}"


def _selector(source: str, where: str, table: Any) -> Selector:
    if not isinstance(table, dict):
        raise PolicyError(source, where, "expected a table of conditions")
    unknown = set(table) - SELECT_KEYS
    if unknown:
        raise PolicyError(source, f"{where}.{sorted(unknown)[0]}",
                          f"unknown condition; known: {', '.join(sorted(SELECT_KEYS))}")
    kw: dict[str, Any] = {}
    for key, value in table.items():
        at = f"{where}.{key}"
        if key == "listener":
            kw[key] = _strings(source, at, value)
            bad = [v for v in kw[key] if v not in LISTENERS]
            if bad:
                raise PolicyError(source, at, f"unknown listener {bad[0]!r} "
                                  f"(known: {', '.join(LISTENERS)})")
        elif key == "port":
            ports = value if isinstance(value, list) else [value]
            if not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536
                       for p in ports):
                raise PolicyError(source, at, f"expected a port number or a list, got {value!r}")
            kw[key] = tuple(ports)
        elif key == "client_networks":
            nets = []
            for n in _strings(source, at, value):
                try:
                    nets.append(ipaddress.ip_network(n, strict=False))
                except ValueError:
                    raise PolicyError(source, at, f"not a network: {n!r}") from None
            kw[key] = tuple(nets)
        elif key in ("mynetworks", "authenticated", "originating"):
            if not isinstance(value, bool):
                raise PolicyError(source, at, f"expected true or false, got {value!r}")
            kw[key] = value
        elif key in ("auth_users", "sender_domains"):
            kw[key] = _strings(source, at, value)
        elif key == "macros":
            if not isinstance(value, dict):
                raise PolicyError(source, at, "expected a table {\"{daemon_name}\" = \"...\"}")
            kw[key] = tuple((_macro_name(n), _strings(source, f"{at}.{n}", v))
                            for n, v in value.items())
    return Selector(**kw)


def _selectors(source: str, where: str, value: Any) -> tuple[Selector, ...]:
    """`select` is one table (all conditions hold) or a list of them (any one holds)."""
    if isinstance(value, list):
        if not value:
            raise PolicyError(source, where, "an empty list never selects; remove the bank")
        return tuple(_selector(source, f"{where}[{i}]", t) for i, t in enumerate(value))
    return (_selector(source, where, value),)


# ---- banks -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Bank:
    name: str
    select: tuple[Selector, ...]
    order: int
    overrides: Mapping[str, Any]          # validated keys of BANK_KEYS, without select/order
    source: str                           # the file(s) it came from
    description: str = ""

    def matches(self, facts: MessageFacts) -> bool:
        return any(s.matches(facts) for s in self.select)


DEFAULT_ORDER = 100


def _bank_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.toml") if p.is_file()) if directory.is_dir() else []


def _read(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(str(path), "(syntax)", str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(str(path), "(file)", getattr(exc, "strerror", None) or str(exc)) from None
    unknown = set(data) - {"bank", "meta"}
    if unknown:
        raise PolicyError(str(path), sorted(unknown)[0], "unknown table (known: bank, meta)")
    banks = data.get("bank", {})
    if not isinstance(banks, dict) or not all(isinstance(v, dict) for v in banks.values()):
        raise PolicyError(str(path), "bank", "expected [bank.NAME] tables")
    return banks


def load_banks(shipped: Path, site: Path | None = None) -> list[Bank]:
    """Banks from <shipped>/banks/, <site>/local.d/banks/ (merge), <site>/override.d/banks/
    (replace); raises PolicyError naming the file and key."""
    raw: dict[str, dict[str, Any]] = {}
    sources: dict[str, list[str]] = {}
    layers = [("shipped", _bank_files(shipped / "banks"))]
    if site is not None:
        layers += [("local", _bank_files(site / "local.d" / "banks")),
                   ("override", _bank_files(site / "override.d" / "banks"))]
    for layer, paths in layers:
        for path in paths:
            for name, table in _read(path).items():
                validate_overrides(str(path), f"bank.{name}", table, allowed=BANK_KEYS)
                if layer == "shipped" and name in raw:
                    raise PolicyError(str(path), f"bank.{name}",
                                      f"defined again (first in {sources[name][0]})")
                if layer == "local" and name in raw:
                    merged = {**raw[name], **table}
                    if "forced" in raw[name] and "forced" in table:
                        merged["forced"] = {**raw[name]["forced"], **table["forced"]}
                    raw[name] = merged
                    sources[name].append(str(path))
                else:
                    raw[name] = dict(table)
                    sources[name] = [str(path)]
    banks = []
    for name, table in raw.items():
        where = f"bank.{name}"
        src = ", ".join(sources[name])
        values = validate_overrides(src, where, table, allowed=BANK_KEYS)
        if "select" not in values:
            raise PolicyError(src, where, "a bank needs `select` (use {} to select every "
                              "message)")
        select = values.pop("select")
        order = values.pop("order", DEFAULT_ORDER)
        description = values.pop("description", "")
        banks.append(Bank(name, select, order, values, src, description))
    banks.sort(key=lambda b: (b.order, b.name))
    return banks


def select_banks(banks: Sequence[Bank], facts: MessageFacts) -> list[Bank]:
    """The banks that apply to a message, in merge order (already sorted by load_banks)."""
    return [b for b in banks if b.matches(facts)]


# ---- merging -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Layer:
    """One set of overrides and where it came from ("bank originating (file)")."""

    name: str
    values: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """The policy for one recipient of one message, after every layer."""

    policy: Policy
    originating: bool = False
    bypass_spam_checks: bool = False
    spam_lover: bool = False
    virus_lover: bool = False
    banned_lover: bool = False
    spam_headers: bool = True
    quarantine: bool = True
    local: bool = True
    dkim_sign: bool = True
    allow_senders: tuple[str, ...] = ()
    deny_senders: tuple[str, ...] = ()
    disable_checks: tuple[str, ...] = ()
    banks: tuple[str, ...] = ()
    # key -> the layer that set it last ("rules" for values from rules/actions.toml)
    sources: tuple[tuple[str, str], ...] = ()

    def source_of(self, key: str) -> str:
        return dict(self.sources).get(key, "default")


def merge(base: Policy, layers: Sequence[Layer], *, originating: bool = False,
          local: bool = True, dkim_sign: bool = True, banks: Sequence[str] = ()) -> EffectivePolicy:
    """Apply the layers in order over the rule set's policy (pure; table-tested).

    `originating`, `local`, `dkim_sign` are the starting values computed from the envelope
    and settings (mynetworks/SASL, policy.local_domains, dkim.sign); a layer may change them.
    """
    levels = {k: getattr(base.levels, k) for k in Levels.__dataclass_fields__}
    scalars: dict[str, Any] = {"kill_action": base.kill_action, "subject_tag": base.subject_tag,
                               "originating": originating, "local": local,
                               "dkim_sign": dkim_sign, "bypass_spam_checks": None,
                               "spam_lover": False, "virus_lover": False,
                               "banned_lover": False, "spam_headers": True,
                               "quarantine": True}
    lists: dict[str, tuple[str, ...]] = {"allow_senders": (), "deny_senders": (),
                                         "disable_checks": ()}
    forced = dict(base.forced)
    sources: dict[str, str] = {"levels": "rules", "kill_action": "rules",
                               "subject_tag": "rules", "forced": "rules"}
    for k in levels:
        sources[k] = "rules"
    for layer in layers:
        for key, value in layer.values.items():
            if key in ("description", "select", "order"):
                continue
            if key in levels:
                levels[key] = value
            elif key in lists:
                lists[key] = tuple(dict.fromkeys(lists[key] + tuple(value)))
            elif key == "forced":
                forced.update(value)
            elif key in scalars:
                scalars[key] = value
            else:
                continue
            sources[key] = layer.name
    bypass = scalars["bypass_spam_checks"]
    if bypass is None:
        # today's rule without banks: originating mail is never spam-tagged
        bypass = scalars["originating"] and not base.spam_checks_for_originating
    policy = replace(base, levels=Levels(**levels), kill_action=scalars["kill_action"],
                     subject_tag=scalars["subject_tag"], forced=forced)
    return EffectivePolicy(
        policy=policy, originating=scalars["originating"], bypass_spam_checks=bypass,
        spam_lover=scalars["spam_lover"], virus_lover=scalars["virus_lover"],
        banned_lover=scalars["banned_lover"], spam_headers=scalars["spam_headers"],
        quarantine=scalars["quarantine"], local=scalars["local"], dkim_sign=scalars["dkim_sign"],
        allow_senders=lists["allow_senders"], deny_senders=lists["deny_senders"],
        disable_checks=lists["disable_checks"], banks=tuple(banks),
        sources=tuple(sorted(sources.items())))


def bank_layers(banks: Sequence[Bank]) -> list[Layer]:
    return [Layer(f"bank {b.name} ({b.source})", b.overrides) for b in banks]


__all__ = ["Bank", "EffectivePolicy", "Layer", "MessageFacts", "PolicyError", "Selector",
           "BANK_KEYS", "RECIPIENT_KEYS", "domain_matches", "load_banks", "merge",
           "select_banks", "validate_overrides", "bank_layers"]
