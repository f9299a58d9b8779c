"""The pattern rule engine: compile every [rule.NAME] once, match all rules of one target at once.

Trusts: nothing in the message; rule files only as far as `compile_ruleset` has validated them
(every error is a RulesetError naming file:line, rule and field, raised at load so a reload can
refuse it). Settings (read per scan by filterd.ruleset.check): rules.engine, rules.rule_timeout.
Symbols: each non-helper rule that fires emits its own name; RULE_ERROR (options: rule, reason)
when one rule raised or overran its time budget (only regex work has one: confirmations and
rule-by-rule searches; exact Hyperscan matching is linear). `__NAME` rules are helpers for meta rules and
are never emitted.

How matching works. Rules are grouped by *target*, the text they read: "body", "rawbody",
"full", "uri", "header:<name>[:raw|:addr|:name]", "mimeheader:<name>". For each target the
patterns are compiled into Hyperscan databases, one pass over a text whatever the number of
rules: one database for pure-ASCII texts, one for the rest. A pattern filterd.ruleset.exact can
translate exactly is trusted as Hyperscan reports it (its excerpt for `filterd scan --explain`
is searched with `regex` only when read: RuleHits); every other pattern is there in prefilter
mode (a superset) and each candidate is confirmed with the `regex` module (stdlib `re` when
it is missing), which makes the result exactly that of the per-rule path. Patterns Hyperscan
cannot take, texts it cannot be given (lone surrogates) and a missing `hyperscan` module fall
back to one regex search per rule. `Engine.match(view, mode="prefilter")` confirms every
candidate, `mode="re"` forces the per-rule path; tests compare all three on the corpus.

Pattern syntax is Python's (`regex` module dialect: possessive quantifiers, atomic groups and
POSIX classes work too); flags are a string of i (ignore case), s (dot matches newline),
m (^/$ at every line), x (verbose).
"""

from __future__ import annotations

import hashlib
import logging
import re
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from filterd.message import MessageView, decode_header_value, parse_addresses
from filterd.ruleset.exact import translate
from filterd.ruleset.expr import Expression, ExpressionError, compile_expression

try:  # the `regex` module can stop a runaway pattern (timeout=); stdlib re cannot
    import regex as rx
    HAVE_REGEX = True
except ImportError:  # pragma: no cover - exercised only where regex is not installed
    rx = re  # type: ignore[assignment]
    HAVE_REGEX = False

try:
    import hyperscan
    HAVE_HYPERSCAN = True
except ImportError:  # pragma: no cover
    hyperscan = None
    HAVE_HYPERSCAN = False

log = logging.getLogger("filterd.rules")

KINDS = ("header", "mimeheader", "body", "rawbody", "full", "uri", "meta")
PATTERN_KINDS = ("header", "mimeheader", "body", "rawbody", "full", "uri")
HEADER_MODIFIERS = ("raw", "addr", "name")
RULE_FIELDS = {"kind", "description", "header", "pattern", "flags", "negate", "exists",
               "if_unset", "expression", "nice", "enabled", "timeout", "tflags", "origin"}
FLAG_CHARS = "isxm"
EXCERPT_CHARS = 80

# Headers other filters add: the ALL target leaves them out, and lint refuses native rules that
# name them, because keying on another filter's verdict measures that filter, not the mail
# (../shared/notes/evaluation.md).
FOREIGN_HEADER_PREFIXES = ("x-spam-", "x-virus-", "x-amavis-", "x-bogosity", "x-spamd-",
                           "x-rspamd-", "x-dspam-", "x-quarantine-", "authentication-results",
                           "x-spam", "x-barracuda-", "x-proofpoint-", "x-ironport-")


class CompileError(ValueError):
    """One rule does not compile; `field` names the offending field."""

    def __init__(self, rule: str, field_name: str, problem: str):
        self.rule, self.field, self.problem = rule, field_name, problem
        super().__init__(f"rule.{rule}.{field_name}: {problem}")


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule."""

    name: str
    kind: str
    target: str                      # "" for meta and exists rules
    pattern: str
    flags: str
    regex: Any                       # compiled pattern (regex or re), None for meta/exists
    negate: bool
    exists: bool | None              # header exists (True) / does not exist (False)
    header: str
    if_unset: str
    expression: Expression | None
    timeout: float | None
    nice: bool
    description: str
    location: str
    matches_empty: bool = False          # the pattern matches "" (decided once, at compile)

    @property
    def helper(self) -> bool:
        return self.name.startswith("__")


@dataclass(frozen=True, slots=True)
class MatchResult:
    hits: "RuleHits"                             # rule name -> matched excerpt (read lazily)
    errors: tuple[tuple[str, str], ...]          # (rule name, reason)
    elapsed: float


@dataclass
class _Group:
    """All pattern rules over one target, with their Hyperscan databases.

    Two databases hold the same rules under the same ids (index into hs_rules): `ascii_db`
    scans texts that are pure ASCII, `unicode_db` every other text. In each, a rule is either
    exact (its translation, filterd.ruleset.exact; the hit is trusted as it is) or a
    prefilter (a superset, every candidate confirmed with the `regex` module). When both
    databases would hold the same expressions they are one object.
    """

    target: str
    multi: bool                                  # a list of texts (URIs, MIME parts), one by one
    rules: list[Rule] = field(default_factory=list)
    hs_rules: list[Rule] = field(default_factory=list)   # ids index into this list
    re_rules: list[Rule] = field(default_factory=list)   # in neither database
    ascii_db: Any = None
    unicode_db: Any = None
    ascii_exact: tuple[bool, ...] = ()           # by id: trusted without confirmation
    unicode_exact: tuple[bool, ...] = ()
    negated_ids: tuple[int, ...] = ()            # ids of `negate = true` rules
    order: dict[str, int] = field(default_factory=dict)   # rule name -> position in `rules`
    hs_failures: dict[str, str] = field(default_factory=dict)
    prefilter_db: Any = None                     # every rule as a prefilter: mode "prefilter"
    prefilter_lock: threading.Lock = field(default_factory=threading.Lock)


def _python_flags(flags: str, *, multiline: bool = False) -> int:
    value = 0
    if "i" in flags:
        value |= rx.IGNORECASE
    if "s" in flags:
        value |= rx.DOTALL
    if "m" in flags or multiline:
        value |= rx.MULTILINE
    if "x" in flags:
        value |= rx.VERBOSE
    return value


# Supersets of Python's Unicode classes that Hyperscan compiles cheaply (its UCP mode makes
# \w, \W and \b-heavy patterns take seconds to compile). In a positive context an escape is
# widened, inside a negated class it is narrowed: either way the prefilter only finds more.
_WIDE = {
    "w": r"a-zA-Z0-9_\x{80}-\x{10ffff}",
    "W": r"\x00-\x2f\x3a-\x40\x5b-\x5e\x60\x7b-\x{10ffff}",
    "d": r"0-9\x{80}-\x{10ffff}",
    "D": r"\x00-\x2f\x3a-\x{10ffff}",
    "s": r"\t\n\x0b\x0c\r \x1c-\x1f\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}"
         r"\x{202f}\x{205f}\x{3000}",
    "S": r"\x00-\x08\x0e-\x1b\x21-\x{10ffff}",
}
_NARROW = {
    "w": r"a-zA-Z0-9_",
    "W": r"\x00-\x2f\x3a-\x40\x5b-\x5e\x60\x7b-\x7f",
    "d": r"0-9",
    "D": r"\x00-\x2f\x3a-\x7f",
    "s": r"\t\n\x0b\x0c\r ",
    "S": r"\x21-\x7e",
}
_BIG_REPEAT = 4        # {m,n} with n above this becomes * or + in the prefilter
_QUANT = re.compile(r"\{(\d*)(?:(,)(\d*))?\}")


def prefilter_pattern(pattern: str) -> str:
    """A Python-dialect pattern rewritten as a PCRE pattern that matches at least as much.

    Hyperscan runs it in prefilter mode; every candidate is confirmed with the real pattern,
    so widening is always safe and only costs confirmations.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    negated = False
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            if e in _WIDE:
                table = _NARROW if (in_class and negated) else _WIDE
                out.append(table[e] if in_class else f"[{table[e]}]")
                i += 2
                continue
            if e == "B" and not in_class:
                i += 2          # dropping an assertion only widens
                continue
            if e == "u" and i + 5 < n + 1 and re.fullmatch(r"[0-9a-fA-F]{4}", pattern[i + 2:i + 6]):
                out.append(f"\\x{{{pattern[i + 2:i + 6]}}}")
                i += 6
                continue
            if e == "U" and re.fullmatch(r"[0-9a-fA-F]{8}", pattern[i + 2:i + 10] or "-"):
                out.append(f"\\x{{{pattern[i + 2:i + 10].lstrip('0') or '0'}}}")
                i += 10
                continue
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            posix = re.match(r"\[:\^?[a-z]+:\]", pattern[i:])
            if posix:                # [:punct:] inside a class: its ] does not close the class
                out.append(posix.group(0))
                if not negated:
                    # Hyperscan's POSIX classes are ASCII, the regex module's Unicode (a
                    # full-width "（" is [:punct:]): every non-ASCII character keeps it a superset
                    out.append("\\x{80}-\\x{10ffff}")
                i += posix.end()
                continue
            if c == "]" and not (out and out[-1] in ("[", "[^")):
                in_class = False
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            negated = pattern.startswith("[^", i)
            out.append("[^" if negated else "[")
            i += 2 if negated else 1
            if i < n and pattern[i] == "]":      # a leading ] is a literal
                out.append("\\]")
                i += 1
            continue
        if c == "{":
            m = _QUANT.match(pattern, i)
            if m and (m.group(1) or m.group(3)):
                low = int(m.group(1) or 0)
                high = int(m.group(3)) if m.group(3) else (None if m.group(2) else low)
                if high is None or high > _BIG_REPEAT:
                    out.append("*" if low == 0 else "+")
                elif not m.group(1):
                    out.append(f"{{0,{high}}}")     # Python's {,n}: literal text in PCRE
                else:
                    out.append(m.group(0))
                i = m.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _hyperscan_pattern(pattern: str) -> bytes:
    return prefilter_pattern(pattern).encode("utf-8")


def _hs_flags(flags: str, *, multiline: bool = False, exact: bool = False,
              utf8: bool = True) -> int:
    """Hyperscan flags of one expression.

    An exact translation spells out case, dot-all and line anchors itself (filterd.ruleset.exact),
    so it takes none of the rule's flags; a prefilter expression takes them all. The ASCII
    translation (only ever given ASCII text) is compiled without UTF-8 mode.
    """
    assert hyperscan is not None
    value = hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_ALLOWEMPTY
    if utf8:
        value |= hyperscan.HS_FLAG_UTF8
    if exact:
        return value
    value |= hyperscan.HS_FLAG_PREFILTER
    if "i" in flags:
        value |= hyperscan.HS_FLAG_CASELESS
    if "s" in flags:
        value |= hyperscan.HS_FLAG_DOTALL
    if "m" in flags or multiline:
        value |= hyperscan.HS_FLAG_MULTILINE
    return value


# Compiled databases, by a digest of what was compiled. Hyperscan's compiler is where loading a
# rule set spends its time (seconds for the default set, a minute for imported SpamAssassin
# rules), and the same expressions come back at every reload, restart and test: so each
# database is kept in this process (`_DB_MEMO`, the most recent few) and, once
# filterd.ruleset.configure_compile_cache named a directory, on disk in Hyperscan's own
# serialised form.
# A cache file that cannot be read or loaded is ignored and rewritten, never trusted; the
# directory is opened by descriptor and no link in it is followed (filterd.statefs).
_DB_MEMO: "OrderedDict[str, Any]" = OrderedDict()
_DB_MEMO_SIZE = 128
_CACHE_FILES = 256       # on disk: a few rule-set versions' worth (two databases per target)
_db_lock = threading.Lock()


def _db_key(patterns: list[bytes], flags: list[int]) -> str:
    digest = hashlib.sha256()
    digest.update(f"hyperscan {getattr(hyperscan, '__version__', '?')} block\0".encode())
    for pattern, flag in zip(patterns, flags):
        digest.update(len(pattern).to_bytes(4, "big") + pattern + flag.to_bytes(8, "big"))
    return digest.hexdigest()


def _hs_compile(patterns: list[bytes], flags: list[int]) -> Any:
    key = _db_key(patterns, flags)
    with _db_lock:
        db = _DB_MEMO.get(key)
        if db is not None:
            _DB_MEMO.move_to_end(key)
            return db
    db = _load_cached_db(key)
    if db is None:
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=patterns, ids=list(range(len(patterns))),
                   elements=len(patterns), flags=flags)
        _store_cached_db(key, db)
    with _db_lock:
        _DB_MEMO[key] = db
        while len(_DB_MEMO) > _DB_MEMO_SIZE:
            _DB_MEMO.popitem(last=False)
    return db


def _cache_dir(create: bool) -> Any:
    """The cache directory, opened by descriptor (filterd.statefs), or None when off."""
    from filterd.ruleset import compile_cache_dir
    from filterd.statefs import Dir
    path = compile_cache_dir()
    return None if path is None else Dir.open(path, create=create, mode=0o700)


def _load_cached_db(key: str) -> Any:
    from filterd.statefs import UnsafeFile
    try:
        cache = _cache_dir(create=False)
        if cache is None:
            return None
        with cache:
            db = hyperscan.loadb(cache.read(f"{key}.hsdb"), mode=hyperscan.HS_MODE_BLOCK)
            cache.touch(f"{key}.hsdb")   # in use: the pruning below keeps the recently used
        return db
    except FileNotFoundError:
        return None
    except UnsafeFile as exc:   # planted in the daemon's directory: compile, touch nothing
        log.warning("compiled rule cache not used: %s", exc)
        return None
    except Exception as exc:   # truncated, another Hyperscan or CPU: compile afresh
        log.info("ignoring compiled rule cache %s: %s", key, exc)
        return None


def _store_cached_db(key: str, db: Any) -> None:
    from filterd.ruleset import compile_cache_dir
    from filterd.statefs import UnsafeFile
    try:
        cache = _cache_dir(create=True)
        if cache is None:
            return
        with cache:
            cache.write_durably(f"{key}.hsdb", hyperscan.dumpb(db), mode=0o600)
            kept = sorted(((st.st_mtime, name) for name, st in cache.entries(stat.S_IFREG)
                           if name.endswith(".hsdb")), reverse=True)
            for _, stale in kept[_CACHE_FILES:]:   # databases of rule sets long replaced
                cache.unlink(stale, missing_ok=True)
    except UnsafeFile as exc:
        log.warning("compiled rule cache not written: %s", exc)
    except Exception as exc:   # a read-only state dir costs the next start a compile, no more
        log.info("cannot keep compiled rules in %s: %s", compile_cache_dir(), exc)


# One expression of a database: (pattern bytes, Hyperscan flags, exact).
_Expr = tuple[bytes, int, bool]


def _prefilter_expr(rule: Rule) -> _Expr:
    pattern = rule.pattern if "x" not in rule.flags else "(?x)" + rule.pattern
    return _hyperscan_pattern(pattern), _hs_flags(rule.flags), False


def _exprs_of(rule: Rule, exact_mode: bool) -> tuple[_Expr, _Expr]:
    """(expression for ASCII texts, expression for other texts) of one rule."""
    prefilter = _prefilter_expr(rule)
    if not exact_mode:
        return prefilter, prefilter
    tr = translate(rule.pattern, rule.flags)
    ascii_expr = (tr.ascii.encode("ascii"), _hs_flags("", exact=True, utf8=False), True) \
        if tr.ascii is not None else prefilter
    if tr.ascii_never:
        # nothing in ASCII text can match (the pattern needs a non-ASCII character): the byte
        # 0xff, which ASCII text never holds, stands in as an exact expression that never fires
        ascii_expr = (b"\\xff", _hs_flags("", exact=True, utf8=False), True)
    unicode_expr = (tr.unicode.encode("utf-8"), _hs_flags("", exact=True), True) \
        if tr.unicode is not None else prefilter
    return ascii_expr, unicode_expr


def _compile_exprs(group: _Group, rules: list[Rule], exprs: list[_Expr],
                   fallback: list[_Expr] | None) -> tuple[Any, list[_Expr], set[int]]:
    """Compile one database; an expression Hyperscan refuses falls back to `fallback[i]`
    (its prefilter form) or, failing that, leaves its rule out (returned in the set)."""
    exprs = list(exprs)
    try:
        return _hs_compile([e[0] for e in exprs], [e[1] for e in exprs]), exprs, set()
    except Exception:
        pass
    # Hyperscan names no expression in its error: find the ones it refuses one by one
    refused: set[int] = set()
    for i, expr in enumerate(exprs):
        try:
            _hs_compile([expr[0]], [expr[1]])
            continue
        except Exception as exc:
            reason = str(exc.args[0] if exc.args else exc)
        if fallback is not None and fallback[i] != expr:
            try:
                _hs_compile([fallback[i][0]], [fallback[i][1]])
                exprs[i] = fallback[i]
                continue
            except Exception as exc:
                reason = str(exc.args[0] if exc.args else exc)
        group.hs_failures[rules[i].name] = reason
        refused.add(i)
    return None, exprs, refused


def _build_group_db(group: _Group, *, exact_mode: bool = True) -> None:
    """Compile a group's rules into its two databases, leaving out those Hyperscan refuses."""
    group.order = {r.name: i for i, r in enumerate(group.rules)}
    if not HAVE_HYPERSCAN or not group.rules:
        group.re_rules = list(group.rules)
        return
    rules: list[Rule] = []
    pairs: list[tuple[_Expr, _Expr]] = []
    for rule in group.rules:
        try:
            pairs.append(_exprs_of(rule, exact_mode))
            rules.append(rule)
        except UnicodeEncodeError:
            group.hs_failures[rule.name] = "pattern is not valid UTF-8"
    prefilters = [_prefilter_expr(r) for r in rules]
    ascii_db, ascii_exprs, refused = _compile_exprs(group, rules, [p[0] for p in pairs],
                                                    prefilters)
    unicode_exprs = [p[1] for p in pairs]
    if unicode_exprs == ascii_exprs and not refused:
        unicode_db = ascii_db
    else:
        unicode_db, unicode_exprs, refused_u = _compile_exprs(group, rules, unicode_exprs,
                                                              prefilters)
        refused |= refused_u
    if refused:   # recompile both without the rules Hyperscan refused in either form
        keep = [i for i in range(len(rules)) if i not in refused]
        rules = [rules[i] for i in keep]
        ascii_exprs = [ascii_exprs[i] for i in keep]
        unicode_exprs = [unicode_exprs[i] for i in keep]
    if rules and (ascii_db is None or unicode_db is None or refused):
        ascii_db = _hs_compile([e[0] for e in ascii_exprs], [e[1] for e in ascii_exprs])
        unicode_db = ascii_db if unicode_exprs == ascii_exprs else \
            _hs_compile([e[0] for e in unicode_exprs], [e[1] for e in unicode_exprs])
    if not rules:
        group.re_rules = list(group.rules)
        return
    group.ascii_db, group.unicode_db = ascii_db, unicode_db
    group.hs_rules = rules
    group.ascii_exact = tuple(e[2] for e in ascii_exprs)
    group.unicode_exact = tuple(e[2] for e in unicode_exprs)
    group.negated_ids = tuple(i for i, r in enumerate(rules) if r.negate)
    in_db = {r.name for r in rules}
    group.re_rules = [r for r in group.rules if r.name not in in_db]


def _prefilter_db(group: _Group) -> Any:
    """Every database rule as a prefilter (rules.engine = "prefilter"), compiled on first use."""
    with group.prefilter_lock:
        if group.prefilter_db is None and group.hs_rules:
            exprs = [_prefilter_expr(r) for r in group.hs_rules]
            group.prefilter_db = _hs_compile([e[0] for e in exprs], [e[1] for e in exprs])
        return group.prefilter_db


class _DeferredExcerpt:
    """The excerpt of a hit Hyperscan found exactly: searched with `regex` only when read."""

    __slots__ = ("rule", "text", "budget")

    def __init__(self, rule: Rule, text: str, budget: float):
        self.rule, self.text, self.budget = rule, text, budget

    def resolve(self) -> str:
        try:
            m = _search(self.rule, self.text, self.budget)
        except TimeoutError:
            return f"(matched; the excerpt search overran its {self.rule.timeout or self.budget:g}s budget)"
        except Exception as exc:  # the hit stands; only its excerpt is missing
            return f"(matched; no excerpt: {type(exc).__name__})"
        return _excerpt(self.text, m.start(), m.end()) if m is not None else "(matched)"


class RuleHits(Mapping[str, str]):
    """Rule name -> matched excerpt, in the order rules fired.

    Hits Hyperscan found exactly carry no excerpt until one is read (`filterd scan --explain`,
    JSON output): the scan itself never runs the `regex` search for them.
    """

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, str] | None = None):
        self._entries: dict[str, str | _DeferredExcerpt] = dict(entries or {})

    def __getitem__(self, name: str) -> str:
        value = self._entries[name]
        if isinstance(value, _DeferredExcerpt):
            value = self._entries[name] = value.resolve()
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __setitem__(self, name: str, value: str | _DeferredExcerpt) -> None:
        self._entries[name] = value

    def update(self, other: Mapping[str, str]) -> None:
        """Take every entry of `other`, leaving deferred excerpts deferred."""
        if isinstance(other, RuleHits):
            self._entries.update(other._entries)
        else:
            self._entries.update(other)

    def __repr__(self) -> str:
        return f"RuleHits({list(self._entries)})"


class Engine:
    """Compiled pattern and meta rules of one rule set; shared read-only by every scan."""

    def __init__(self, rules: dict[str, Rule], groups: dict[str, _Group],
                 exists_rules: list[Rule], meta_order: list[Rule]):
        self.rules = rules
        self.groups = groups
        self.exists_rules = exists_rules
        self.meta_order = meta_order
        self._local = threading.local()      # Hyperscan scratch space is per thread

    # --- introspection ---------------------------------------------------------------------
    @property
    def hyperscan_rules(self) -> int:
        return sum(len(g.hs_rules) for g in self.groups.values())

    @property
    def exact_rules(self) -> dict[str, str]:
        """Rules Hyperscan matches without confirmation: "all texts" or "ASCII texts"."""
        out: dict[str, str] = {}
        for group in self.groups.values():
            for index, rule in enumerate(group.hs_rules):
                if group.unicode_exact[index] and group.ascii_exact[index]:
                    out[rule.name] = "all texts"
                elif group.ascii_exact[index]:
                    out[rule.name] = "ASCII texts"
        return out

    @property
    def fallback_rules(self) -> dict[str, str]:
        """Pattern rules matched one by one, and why (Hyperscan refused or is missing)."""
        out: dict[str, str] = {}
        for group in self.groups.values():
            for rule in group.re_rules:
                out[rule.name] = group.hs_failures.get(
                    rule.name, "hyperscan not installed" if not HAVE_HYPERSCAN else "not compiled")
        return out

    # --- matching ----------------------------------------------------------------------------
    def match(self, view: MessageView, *, mode: str = "auto", rule_timeout: float = 0.25
              ) -> MatchResult:
        """Every pattern and exists rule that fires on the message, with an excerpt each.

        mode: "auto" trusts Hyperscan where the pattern has an exact translation and confirms
        the rest; "prefilter" confirms every Hyperscan candidate with `regex` (the engine
        before exact translations, kept for comparison); "re" matches rule by rule.
        """
        started = time.perf_counter()
        hits = RuleHits()
        errors: list[tuple[str, str]] = []
        use_hs = mode != "re" and HAVE_HYPERSCAN
        exact = mode == "auto"
        texts = _Texts(view)
        for rule in self.exists_rules:
            if rule.header in PSEUDO_HEADERS:
                value = pseudo_header(view, rule.header)
                present = value is not None
            else:
                present = view.has_header(rule.header)
                value = view.first(rule.header) if present else None
            if present == rule.exists:
                hits[rule.name] = (f"{rule.header}: {_excerpt_of(value or '')}"
                                   if present else f"(no {rule.header} header)")
        for group in self.groups.values():
            try:
                value = texts.get(group.target)
            except Exception as exc:  # a decoding oddity must not cost the other targets
                for rule in group.rules:
                    errors.append((rule.name, f"target {group.target}: {type(exc).__name__}"))
                continue
            if group.multi:
                self._match_multi(group, value, use_hs, exact, rule_timeout, hits, errors)
            else:
                self._match_single(group, value, use_hs, exact, rule_timeout, hits, errors)
        return MatchResult(hits, tuple(errors), time.perf_counter() - started)

    def _scan(self, db: Any, data: bytes) -> set[int]:
        """Ids of the database's expressions that match `data` (one pass, each id once)."""
        cache = getattr(self._local, "scratch", None)
        if cache is None:
            cache = self._local.scratch = {}
        scratch = cache.get(id(db))
        if scratch is None:
            scratch = cache[id(db)] = hyperscan.Scratch(db)
        found: set[int] = set()
        db.scan(data, match_event_handler=lambda rule_id, *_: found.add(rule_id),
                scratch=scratch)
        return found

    @staticmethod
    def _database(group: _Group, exact: bool, value: str, data: bytes
                  ) -> tuple[Any, tuple[bool, ...] | None]:
        """The database for one text and which of its expressions are trusted as they are."""
        if not exact:
            return _prefilter_db(group), None
        if len(data) == len(value):          # UTF-8 as long as the text: pure ASCII
            return group.ascii_db, group.ascii_exact
        return group.unicode_db, group.unicode_exact

    def _match_single(self, group: _Group, value: str | None, use_hs: bool, exact: bool,
                      budget: float, hits: RuleHits, errors: list[tuple[str, str]]) -> None:
        data: bytes | None = None
        if use_hs and group.hs_rules and value:
            try:
                data = value.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: Hyperscan needs valid UTF-8
                data = None
        if data is None or value is None:
            for rule in group.rules:
                self._confirm(rule, value, budget, hits, errors)
            return
        if group.re_rules:
            # hits of the rules outside the databases go into rule order with the others
            found_hits = RuleHits()
            self._match_single_hs(group, value, data, exact, budget, found_hits, errors)
            for rule in group.re_rules:
                self._confirm(rule, value, budget, found_hits, errors)
            for name in sorted(found_hits, key=group.order.__getitem__):
                hits[name] = found_hits._entries[name]
        else:
            self._match_single_hs(group, value, data, exact, budget, hits, errors)

    def _match_single_hs(self, group: _Group, value: str, data: bytes, exact: bool,
                         budget: float, hits: RuleHits, errors: list[tuple[str, str]]) -> None:
        db, trusted = self._database(group, exact, value, data)
        found = self._scan(db, data)
        ids = found.union(group.negated_ids) if group.negated_ids else found
        for index in sorted(ids):        # rule order, as the per-rule path reports hits
            rule = group.hs_rules[index]
            if index not in found:
                # a prefilter is a superset, an exact expression the match itself: no id
                # means no match, so !~ fires
                hits[rule.name] = "(no match)"
            elif trusted is not None and trusted[index]:
                if not rule.negate:
                    hits[rule.name] = _DeferredExcerpt(rule, value, budget)
            else:
                self._confirm(rule, value, budget, hits, errors)

    def _confirm(self, rule: Rule, value: str | None, budget: float, hits: RuleHits,
                 errors: list[tuple[str, str]]) -> None:
        text = value if value is not None else rule.if_unset
        if not text:
            fires = rule.matches_empty != rule.negate
            if fires:
                hits[rule.name] = "(empty)" if value is not None else f"(no {rule.header} header)"
            return
        try:
            m = _search(rule, text, budget)
        except TimeoutError:
            errors.append((rule.name, f"over its {rule.timeout or budget:g}s budget"))
            return
        except Exception as exc:
            errors.append((rule.name, f"{type(exc).__name__}: {exc}"))
            return
        if rule.negate:
            if m is None:
                hits[rule.name] = "(no match)"
        elif m is not None:
            hits[rule.name] = _excerpt(text, m.start(), m.end())

    def _match_multi(self, group: _Group, values: list[str | None], use_hs: bool, exact: bool,
                     budget: float, hits: RuleHits, errors: list[tuple[str, str]]) -> None:
        """Targets with one text per item (URIs, one MIME part's header): any item may hit.

        Each item is scanned on its own (anchors and excerpts are per item). None stands for a
        part without the header; a rule's if_unset value stands in for it.
        """
        if not values:
            return
        present = [v for v in values if v]
        missing = len(present) < len(values)
        results: dict[int, str | _DeferredExcerpt] = {}    # position in group.rules -> excerpt
        failed: set[int] = set()

        def attempt(rule: Rule, item: str) -> None:
            position = group.order[rule.name]
            try:
                m = _search(rule, item, budget)
            except TimeoutError:
                errors.append((rule.name, f"over its {rule.timeout or budget:g}s budget"))
                failed.add(position)
                return
            except Exception as exc:
                errors.append((rule.name, f"{type(exc).__name__}: {exc}"))
                failed.add(position)
                return
            if m is not None:
                results[position] = _excerpt(item, m.start(), m.end())

        by_rule = group.rules
        if use_hs and group.hs_rules:
            by_rule = group.re_rules
            for item in present:
                try:
                    data: bytes | None = item.encode("utf-8")
                except UnicodeEncodeError:
                    data = None
                if data is None:
                    for rule in group.hs_rules:
                        if group.order[rule.name] not in results and \
                                group.order[rule.name] not in failed:
                            attempt(rule, item)
                    continue
                db, trusted = self._database(group, exact, item, data)
                for index in sorted(self._scan(db, data)):
                    rule = group.hs_rules[index]
                    position = group.order[rule.name]
                    if position in results or position in failed:
                        continue
                    if trusted is not None and trusted[index]:
                        results[position] = _DeferredExcerpt(rule, item, budget)
                    else:
                        attempt(rule, item)
        for rule in by_rule:
            for item in present:
                position = group.order[rule.name]
                if position in results or position in failed:
                    break
                attempt(rule, item)
        if missing:
            for position, rule in enumerate(group.rules):
                if rule.if_unset and position not in results and position not in failed:
                    attempt(rule, rule.if_unset)
        for position in sorted(results):
            hits[group.rules[position].name] = results[position]

    # --- meta rules ---------------------------------------------------------------------------
    def evaluate_metas(self, values: Mapping[str, float]) -> tuple[list[str], list[tuple[str, str]]]:
        """Meta rules that fire given symbol counts; metas see earlier metas' results."""
        current = dict(values)
        fired: list[str] = []
        errors: list[tuple[str, str]] = []
        for rule in self.meta_order:
            assert rule.expression is not None
            try:
                result = rule.expression(current)
            except Exception as exc:  # e.g. an overflow: the rule errs, the scan goes on
                errors.append((rule.name, f"{type(exc).__name__}: {exc}"))
                continue
            if result:
                current[rule.name] = current.get(rule.name, 0.0) + 1.0
                fired.append(rule.name)
        return fired, errors


def _search(rule: Rule, text: str, budget: float) -> Any:
    if HAVE_REGEX:
        try:
            return rule.regex.search(text, timeout=rule.timeout or budget)
        except TimeoutError:
            raise
    started = time.perf_counter()  # stdlib re cannot be stopped: report an overrun afterwards
    m = rule.regex.search(text)
    if time.perf_counter() - started > (rule.timeout or budget):
        raise TimeoutError
    return m


def _excerpt(text: str, start: int, end: int) -> str:
    if end - start >= EXCERPT_CHARS:
        piece = text[start:start + EXCERPT_CHARS] + "…"
    else:
        pad = (EXCERPT_CHARS - (end - start)) // 2
        lo, hi = max(0, start - pad), min(len(text), end + pad)
        piece = ("…" if lo else "") + text[lo:hi] + ("…" if hi < len(text) else "")
    return " ".join(piece.split())


def _excerpt_of(text: str) -> str:
    return _excerpt(text, 0, min(len(text), EXCERPT_CHARS))


class _Texts:
    """The text of each target for one message, computed once per scan."""

    def __init__(self, view: MessageView):
        self.view = view
        self.cache: dict[str, Any] = {}

    def get(self, target: str) -> Any:
        if target not in self.cache:
            self.cache[target] = self._compute(target)
        return self.cache[target]

    def _compute(self, target: str) -> Any:
        view = self.view
        if target == "body":
            return view.body_text
        if target == "rawbody":
            return "\n".join(p.text for p in view.text_parts)
        if target == "full":
            return view.raw[:view.content_limit].decode("utf-8", "replace")
        if target == "uri":
            return list(view.urls)
        kind, _, rest = target.partition(":")
        name, _, modifier = rest.partition(":")
        if kind == "mimeheader":
            values: list[str | None] = []
            for part in view.parts:
                msg = getattr(part, "_msg", None)
                found = msg.get_all(name, []) if msg is not None else []
                if not found:
                    values.append(None)
                for value in found or ():
                    values.append(str(value) if modifier == "raw"
                                  else decode_header_value(str(value)))
            return values
        if name == "ALL":
            lines = []
            for hname, hvalue in view.raw_headers:
                if hname.lower().startswith(FOREIGN_HEADER_PREFIXES):
                    continue
                shown = hvalue if modifier == "raw" else decode_header_value(hvalue)
                lines.append(f"{hname}: {shown}")
            return "\n".join(lines) + "\n" if lines else None
        if name in PSEUDO_HEADERS:
            value = pseudo_header(view, name)
            if value is None:
                return None
            if modifier in ("addr", "name"):
                return _address_part(value.split("\n"), modifier)
            return value
        if not view.has_header(name):
            return None
        if modifier == "raw":
            return "\n".join(view.header_raw(name))
        values = view.header(name)
        if modifier in ("addr", "name"):
            return _address_part(values, modifier)
        return "\n".join(values)


def _address_part(values: list[str], modifier: str) -> str:
    pairs = parse_addresses(values)
    index = 1 if modifier == "addr" else 0
    return "\n".join(p[index] for p in pairs)


# --- pseudo-headers ---------------------------------------------------------------------------
# Values a header rule can read that are not headers of the message but computed from it, as
# SpamAssassin offers them (imported rules use them; they are never read from the message, so a
# forged "X-Spam-Relays-External:" header in the mail changes nothing).
# Spelled exactly as SpamAssassin spells them (its names are case-sensitive: `MessageID` is a
# real header, `MESSAGEID` the pseudo-header), and kept in that case by compile_rule.
PSEUDO_HEADERS = ("X-Spam-Relays-Untrusted", "X-Spam-Relays-Trusted", "X-Spam-Relays-External",
                  "X-Spam-Relays-Internal", "MESSAGEID", "ToCc", "EnvelopeFrom")
_RCVD_ID = re.compile(r"\bid\s+<?([^\s;<>]+)", re.I)
_RCVD_WITH = re.compile(r"\bwith\s+([A-Za-z0-9]+)", re.I)
_RCVD_IDENT = re.compile(r"\(\s*([^\s@()]+)@[^\s()\[]*\s*\[", re.I)
_RCVD_ENVFROM = re.compile(r"\(envelope-from\s+<?([^\s<>)]+)>?", re.I)
_MSGID_HEADERS = ("message-id", "resent-message-id", "x-message-id", "x-messageid")
_ENVFROM_HEADERS = ("return-path", "x-envelope-from", "envelope-sender", "x-envelope-sender")


def relays(view: MessageView) -> tuple[list[str], list[str]]:
    """(trusted, untrusted) relays in SpamAssassin's `[ ip=... rdns=... helo=... ]` form.

    Newest first. A hop is trusted while its sending IP is in scan.trusted_networks (the
    view's); the first hop from outside and every hop before it are untrusted, as
    SpamAssassin's trust path goes. Received headers without a sending IP are skipped (SA
    counts them as unparseable). Internal = trusted and external = untrusted: filterd has one
    network list (internal_networks defaults to trusted_networks in SpamAssassin as well).
    """
    trusted: list[str] = []
    untrusted: list[str] = []
    for hop in view.received:
        if not hop.from_ip:
            continue
        raw = " ".join(hop.raw.split())
        ident = _RCVD_IDENT.search(raw)
        rid = _RCVD_ID.search(raw)
        envfrom = _RCVD_ENVFROM.search(raw)
        proto = _RCVD_WITH.search(raw)
        auth = proto.group(1) if proto and re.fullmatch(r"(?i)e?smtps?a|lmtpa|asmtp",
                                                        proto.group(1)) else ""
        rdns = hop.from_name or ""
        if rdns.startswith("[") or "@" in rdns:
            rdns = rdns.rpartition("@")[2] if "@" in rdns else ""
        into = untrusted if untrusted or not view.is_trusted(hop.from_ip) else trusted
        into.append(f"[ ip={hop.from_ip} rdns={rdns} helo={hop.from_helo or ''} "
                    f"by={hop.by or ''} ident={ident.group(1) if ident else ''} "
                    f"envfrom={envfrom.group(1) if envfrom else ''} "
                    f"intl={0 if into is untrusted else 1} id={rid.group(1) if rid else ''} "
                    f"auth={auth} msa=0 ]")
    return trusted, untrusted


def pseudo_header(view: MessageView, name: str) -> str | None:
    """The value of a pseudo-header (PSEUDO_HEADERS), None where SpamAssassin has none."""
    if name.startswith("X-Spam-Relays-"):
        trusted, untrusted = relays(view)
        chosen = trusted if name.endswith(("-Trusted", "-Internal")) else untrusted
        return " ".join(chosen) if chosen else None
    if name == "MESSAGEID":
        values = [v for h in _MSGID_HEADERS for v in view.header(h)]
        return "\n".join(values) if values else None
    if name == "ToCc":
        to = ", ".join(view.header("to")).strip()
        cc = ", ".join(view.header("cc")).strip()
        joined = ", ".join(v for v in (to, cc) if v)
        return joined or None
    if name == "EnvelopeFrom":
        if view.envelope.mail_from:
            return view.envelope.mail_from
        for h in _ENVFROM_HEADERS:
            for v in view.header(h):
                if v.strip():
                    return v.strip()
        return None
    return None


# --- compiling ----------------------------------------------------------------------------------
def _target_of(kind: str, header: str) -> str:
    if kind in ("body", "rawbody", "full", "uri"):
        return kind
    return f"{kind}:{header}"


def compile_rule(name: str, entry: Mapping[str, Any], location: str = "") -> Rule:
    """Validate and compile one [rule.NAME] table; raises CompileError naming the field."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise CompileError(name, "(name)", "rule names are letters, digits and _")
    unknown = set(entry) - RULE_FIELDS
    if unknown:
        raise CompileError(name, sorted(unknown)[0],
                           f"unknown field (known: {', '.join(sorted(RULE_FIELDS))})")
    kind = entry.get("kind")
    if kind not in KINDS:
        raise CompileError(name, "kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise CompileError(name, "description", "expected a string")
    timeout = entry.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or timeout <= 0):
        raise CompileError(name, "timeout", "expected a positive number of seconds")
    for flag_field in ("negate", "nice", "enabled"):
        if flag_field in entry and not isinstance(entry[flag_field], bool):
            raise CompileError(name, flag_field, "expected true or false")
    nice = bool(entry.get("nice", False))
    if "tflags" in entry:
        tflags = entry["tflags"]
        if not isinstance(tflags, list) or not all(isinstance(t, str) for t in tflags):
            raise CompileError(name, "tflags", "expected a list of strings")
        nice = nice or "nice" in tflags
    common = dict(name=name, kind=kind, description=description, location=location,
                  timeout=float(timeout) if timeout else None, nice=nice)

    if kind == "meta":
        for bad in ("pattern", "header", "negate", "exists", "flags"):
            if bad in entry:
                raise CompileError(name, bad, "a meta rule takes only an expression")
        text = entry.get("expression")
        if not isinstance(text, str):
            raise CompileError(name, "expression", "a meta rule needs an expression string")
        try:
            expression = compile_expression(text)
        except ExpressionError as exc:
            raise CompileError(name, "expression", str(exc)) from None
        if name in expression.references:
            raise CompileError(name, "expression", "refers to itself")
        return Rule(target="", pattern="", flags="", regex=None, negate=False, exists=None,
                    header="", if_unset="", expression=expression, **common)

    if "expression" in entry:
        raise CompileError(name, "expression", f"only meta rules take an expression, not {kind}")
    header = entry.get("header", "")
    if kind in ("header", "mimeheader"):
        if not isinstance(header, str) or not header.strip():
            raise CompileError(name, "header", f"a {kind} rule needs the header name")
        hname, _, modifier = header.strip().partition(":")
        if not re.fullmatch(r"[!-9;-~]+", hname):
            raise CompileError(name, "header", f"{hname!r} is not a header name")
        if modifier and modifier not in HEADER_MODIFIERS:
            raise CompileError(name, "header", f"unknown modifier :{modifier} (known: "
                                               f"{', '.join(HEADER_MODIFIERS)})")
        if kind == "mimeheader" and hname == "ALL":
            raise CompileError(name, "header", "mimeheader rules name one header")
        header = hname if hname == "ALL" or hname in PSEUDO_HEADERS else hname.lower()
        header = f"{header}:{modifier}" if modifier else header
    elif "header" in entry:
        raise CompileError(name, "header", f"{kind} rules read no header")

    if "exists" in entry:
        exists = entry["exists"]
        if kind != "header" or not isinstance(exists, bool):
            raise CompileError(name, "exists", "exists = true/false belongs to header rules")
        if "pattern" in entry:
            raise CompileError(name, "pattern", "an exists rule takes no pattern")
        if ":" in header or header == "ALL":
            raise CompileError(name, "header", "an exists rule names one plain header")
        return Rule(target="", pattern="", flags="", regex=None, negate=False, exists=exists,
                    header=header, if_unset="", expression=None, **common)

    pattern = entry.get("pattern")
    if not isinstance(pattern, str) or pattern == "":
        raise CompileError(name, "pattern", "a pattern rule needs a non-empty pattern string")
    flags = entry.get("flags", "")
    if not isinstance(flags, str) or any(c not in FLAG_CHARS for c in flags):
        raise CompileError(name, "flags", f"flags are letters from {FLAG_CHARS!r}")
    negate = bool(entry.get("negate", False))
    if negate and kind in ("uri", "mimeheader"):
        raise CompileError(name, "negate", f"{kind} rules cannot be negated (match each item; "
                                           f"use a meta rule with !)")
    if_unset = entry.get("if_unset", "")
    if not isinstance(if_unset, str):
        raise CompileError(name, "if_unset", "expected a string")
    if if_unset and kind not in ("header", "mimeheader"):
        raise CompileError(name, "if_unset", "only header rules have an unset value")
    try:
        compiled = rx.compile(pattern, _python_flags(flags))
    except Exception as exc:  # re.error / regex.error
        raise CompileError(name, "pattern", f"does not compile: {exc}") from None
    return Rule(target=_target_of(kind, header), pattern=pattern, flags=flags, regex=compiled,
                negate=negate, exists=None, header=header, if_unset=if_unset, expression=None,
                matches_empty=compiled.search("") is not None, **common)


def _meta_order(metas: dict[str, Rule], location_of: Any) -> list[Rule]:
    """Metas in an order where each comes after the metas it refers to; refuses cycles."""
    from filterd.ruleset import RulesetError
    order: list[Rule] = []
    state: dict[str, int] = {}     # 1 visiting, 2 done

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join(chain[chain.index(name):] + [name])
            raise RulesetError(location_of(f"rule.{name}.expression"),
                               f"rule.{name}.expression", f"meta rules refer in a cycle: {cycle}")
        state[name] = 1
        rule = metas[name]
        assert rule.expression is not None
        for ref in sorted(rule.expression.references):
            if ref in metas:
                visit(ref, chain + [name])
        state[name] = 2
        order.append(rule)

    for name in metas:
        visit(name, [])
    return order


def compile_ruleset(ruleset: Any) -> Engine:
    """Compile every enabled [rule.NAME] of a loaded Ruleset; RulesetError on the first error."""
    from filterd.ruleset import RulesetError
    compiled: list[Rule] = []
    for name, entry in ruleset.rules.items():
        if entry.get("enabled", True) is False:
            continue
        try:
            compiled.append(compile_rule(name, entry, ruleset.location_of(f"rule.{name}")))
        except CompileError as exc:
            where = f"rule.{exc.rule}.{exc.field}" if not exc.field.startswith("(") \
                else f"rule.{exc.rule}"
            raise RulesetError(ruleset.location_of(where), where, exc.problem) from None
    by_name: dict[str, Rule] = {r.name: r for r in compiled}
    groups: dict[str, _Group] = {}
    exists_rules: list[Rule] = []
    metas: dict[str, Rule] = {}
    for rule in compiled:
        if rule.kind == "meta":
            metas[rule.name] = rule
        elif rule.exists is not None:
            exists_rules.append(rule)
        else:
            groups.setdefault(rule.target, _Group(rule.target,
                                                  multi=rule.kind in ("uri", "mimeheader"))
                              ).rules.append(rule)
    meta_order = _meta_order(metas, ruleset.location_of)
    for group in groups.values():
        _build_group_db(group)
    return Engine(by_name, groups, exists_rules, meta_order)
