"""Translate a rule's Python-dialect pattern into a Hyperscan pattern with the same matches.

Used by filterd.ruleset.engine at compile time to decide, per pattern, whether Hyperscan's
answer can be trusted as it is (exact mode) or only as a superset to confirm with the `regex`
module (prefilter mode). The decision is conservative: a pattern is translated only when every
construct in it has a known Hyperscan equivalent; anything else gives no translation.

Trusts: the pattern has already compiled with the `regex` module (compile_rule did that). The
parse tree comes from the standard library's own regular-expression parser (`re._parser`);
a pattern `re` parses differently from `regex` (it warns, e.g. POSIX classes, or fails, e.g.
`\\p{..}`) is not translated. Reads no settings, emits no symbols.

Two translations per pattern, because Python's Unicode semantics of `\\w`, `\\b` and
case-insensitive letters have no cheap Hyperscan equivalent but collapse to ASCII ones on ASCII
text:
  ascii    exact on texts that are pure ASCII (the engine scans such texts with it; it uses
           only one-byte classes and is compiled without Hyperscan's UTF-8 mode);
  unicode  exact on every text, or None when some construct would need Unicode tables
           (`\\w`, `\\W`, `\\b`, a non-ASCII letter under `i`).
Every single-character item (literal, class, `.`) is turned into an explicit class whose
members are computed by asking the `regex` module itself about each ASCII character, so case
folding, `\\s`, `\\d` and negation mean exactly what they mean to the per-rule path. Four
non-ASCII characters match ASCII letters under `i` (U+0130 i, U+0131 I, U+017F s/S, U+212A
k/K; a unit test checks the list over all of Unicode) and are added where they belong.

A one-character lookbehind opening the pattern or lookahead closing it becomes a consumed
character: `(?<![:\\d])x` is `(?:\\A|[^:\\d])x`, which matches exactly when the original does.
Not translated (the engine confirms these with `regex`): backreferences, other lookarounds,
conditionals, atomic groups, possessive quantifiers, `\\B`, a multi-line `^` that could be the
last thing a match checks (Hyperscan's `^` does not match after a final newline, Python's
does), bounded repeats above MAX_EXACT_REPEAT (slow to compile in Hyperscan), and
`\\w`-like classes in the unicode translation.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

try:  # the per-rule path's dialect; stdlib re where `regex` is missing (as in engine.py)
    import regex as rx
except ImportError:  # pragma: no cover
    rx = re  # type: ignore[assignment]

try:  # the stdlib parser; a private module, so its absence only disables exact mode
    from re import _constants as C, _parser as P
    HAVE_PARSER = True
except ImportError:  # pragma: no cover - Python versions without re._parser
    C = P = None  # type: ignore[assignment]
    HAVE_PARSER = False

# Above this count (the product of nested counts) a repeat ({m,n}) stays in prefilter mode:
# Hyperscan unrolls counted repeats; many of them above ~100 in one database made the imported
# SpamAssassin body rules take minutes to compile (100: 10 s, 256: 121 s for 506 rules).
MAX_EXACT_REPEAT = 100

# Non-ASCII characters the `regex` module matches against an ASCII character under IGNORECASE
# (simple case folding; not symmetric: i matches U+0130, I matches U+0131). Verified over every
# code point by tests/unit/test_rules_engine.py.
ASCII_FOLD_EXTRAS = {"i": "\u0130", "I": "\u0131", "k": "\u212a", "K": "\u212a",
                     "s": "\u017f", "S": "\u017f"}

_ASCII = "".join(map(chr, range(128)))
_POSIX_CLASS = re.compile(r"\[(?::\^?[A-Za-z]+:|=[^]]*=|\.[^]]*\.)\]")
_MAX_CODE = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)


@dataclass(frozen=True, slots=True)
class Translation:
    """Hyperscan patterns with the rule's exact matches; None where there is none.

    ascii_never: on ASCII text the pattern can never match (e.g. it needs a non-ASCII letter).
    reason: why the pattern has no (unicode) translation, for `rules show` and tests.
    """

    ascii: str | None
    unicode: str | None
    ascii_never: bool = False
    reason: str = ""


class _NotExact(Exception):
    """Some construct has no exact translation."""


class _Unicode(Exception):
    """Some construct has only an ASCII translation."""


def translate(pattern: str, flags: str) -> Translation:
    """Both translations of one rule pattern (flags: the rule's i/s/m/x letters)."""
    if not HAVE_PARSER:
        return Translation(None, None, reason="no re._parser in this Python")
    value = 0
    for letter, bit in (("i", re.IGNORECASE), ("s", re.DOTALL), ("m", re.MULTILINE),
                        ("x", re.VERBOSE)):
        if letter in flags:
            value |= bit
    if _POSIX_CLASS.search(pattern):
        # `regex` reads [:punct:] inside a class as a POSIX class, `re` as five characters
        return Translation(None, None, reason="POSIX class ([:name:]): re reads it otherwise")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tree = P.parse(pattern, value)
    except Exception as exc:  # re parses it differently from regex, or not at all
        return Translation(None, None, reason=f"not in the re dialect: {exc}")
    global_flags = tree.state.flags
    try:
        ascii_text = _Emitter(ascii_only=True).pattern(list(tree), global_flags)
    except _NotExact as exc:
        return Translation(None, None, reason=str(exc))
    except Exception as exc:  # a parse tree this module does not know: no translation
        return Translation(None, None, reason=f"not translated: {type(exc).__name__}: {exc}")
    try:
        unicode_text = _Emitter(ascii_only=False).pattern(list(tree), global_flags)
        reason = ""
    except _Unicode as exc:
        unicode_text, reason = None, str(exc)
    except Exception as exc:  # pragma: no cover - the ascii pass refuses the same constructs
        return Translation(None, None, reason=f"not translated: {type(exc).__name__}: {exc}")
    if ascii_text is None:
        return Translation(None, unicode_text, ascii_never=True, reason=reason)
    return Translation(ascii_text, unicode_text, reason=reason)


class _Emitter:
    """One walk over the parse tree, producing Hyperscan syntax or None (cannot match)."""

    def __init__(self, *, ascii_only: bool):
        self.ascii_only = ascii_only
        self.repeat_weight = 1           # product of the counts of the enclosing repeats

    def pattern(self, items: list[Any], flags: int) -> str | None:
        """The whole pattern: a one-character lookbehind at its start or lookahead at its end
        becomes a character (or the edge of the text) the match consumes, which changes where
        a match starts or ends but never whether there is one."""
        head = tail = ""
        if items and items[0][0] in (C.ASSERT, C.ASSERT_NOT) and items[0][1][0] == -1:
            head, items = self.edge(items[0], flags, r"\A"), items[1:]
        if items and items[-1][0] in (C.ASSERT, C.ASSERT_NOT) and items[-1][1][0] == 1:
            tail, items = self.edge(items[-1], flags, r"\z"), items[:-1]
        body = self.sequence(items, flags)
        if head is None or body is None or tail is None:
            return None
        return head + body + tail

    def edge(self, item: Any, flags: int, text_edge: str) -> str | None:
        op, (_direction, sub) = item
        sub = list(sub)
        if len(sub) != 1 or sub[0][0] not in (C.LITERAL, C.NOT_LITERAL, C.IN):
            raise _NotExact("a lookaround other than one character at the pattern's edge")
        char_op, char_av = sub[0]
        if op is C.ASSERT:                   # (?<=c)x is cx; x(?=c) is xc
            return self.char_class(char_op, char_av, flags)
        if char_op is C.LITERAL:             # (?<!c)x is (\A|[^c])x; x(?!c) is x([^c]|\z)
            other: tuple[Any, Any] = (C.NOT_LITERAL, char_av)
        elif char_op is C.NOT_LITERAL:
            other = (C.LITERAL, char_av)
        elif char_av and char_av[0][0] is C.NEGATE:
            other = (C.IN, list(char_av[1:]))
        else:
            other = (C.IN, [(C.NEGATE, None)] + list(char_av))
        allowed = self.char_class(other[0], other[1], flags)
        return text_edge if allowed is None else f"(?:{text_edge}|{allowed})"

    def sequence(self, items: list[Any], flags: int) -> str | None:
        out: list[str] = []
        for index, (op, av) in enumerate(items):
            piece = self.item(op, av, flags, items[index + 1:])
            if piece is None:
                return None          # one part can never match: nor can the sequence
            out.append(piece)
        return "".join(out)

    def item(self, op: Any, av: Any, flags: int, rest: list[Any]) -> str | None:
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            return self.char_class(op, av, flags)
        if op is C.BRANCH:
            alternatives = [self.sequence(list(alt), flags) for alt in av[1]]
            live = [a for a in alternatives if a is not None]
            return f"(?:{'|'.join(live)})" if live else None
        if op is C.SUBPATTERN:
            group, add, remove, sub = av
            inner = self.sequence(list(sub), (flags | add) & ~remove)
            return None if inner is None else f"(?:{inner})"
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            # lazy or greedy decides which match is found, never whether one exists
            low, high, sub = av
            bounded = high is not C.MAXREPEAT
            # Hyperscan unrolls counted repeats: nested ones multiply
            weight = self.repeat_weight * max(low, high if bounded else low, 1)
            if weight > MAX_EXACT_REPEAT:
                raise _NotExact(f"repeat {{{low},{high if bounded else ''}}} weighs {weight}, "
                                f"above {MAX_EXACT_REPEAT}")
            outer, self.repeat_weight = self.repeat_weight, weight
            try:
                inner = self.sequence(list(sub), flags)
            finally:
                self.repeat_weight = outer
            if inner is None:
                return "" if low == 0 else None
            if not bounded:
                quant = "*" if low == 0 else "+" if low == 1 else f"{{{low},}}"
            elif low == high:
                quant = f"{{{low}}}"
            else:
                quant = f"{{{low},{high}}}"
            return f"(?:{inner}){quant}"
        if op is C.AT:
            return self.anchor(av, flags, rest)
        raise _NotExact(f"{str(op).lower()} has no exact Hyperscan form")

    def anchor(self, code: Any, flags: int, rest: list[Any]) -> str:
        multiline = bool(flags & re.MULTILINE)
        if code is C.AT_BEGINNING:
            if not multiline:
                return "^"
            # Python's multi-line ^ also matches after a final newline, Hyperscan's does not:
            # exact only when what follows must consume a character
            try:
                consumes = bool(rest) and P.SubPattern(P.State(), list(rest)).getwidth()[0] >= 1
            except Exception:    # e.g. a backreference, whose width the parser cannot tell
                consumes = False
            if not consumes:
                raise _NotExact("multi-line ^ may be checked at the end of the text")
            return "(?m:^)"
        if code is C.AT_BEGINNING_STRING:
            return r"\A"
        if code is C.AT_END:
            return "(?m:$)" if multiline else "$"
        if code is C.AT_END_STRING:
            return r"\z"
        if code is C.AT_BOUNDARY:
            if not self.ascii_only:
                raise _Unicode(r"\b depends on Unicode \w")
            return r"\b"
        raise _NotExact(f"{str(code).lower()} has no exact Hyperscan form")

    def char_class(self, op: Any, av: Any, flags: int) -> str | None:
        text = _class_text(op, _freeze(av), bool(flags & re.IGNORECASE),
                           bool(flags & re.DOTALL), not self.ascii_only)
        if text is _NEEDS_UNICODE:
            raise _Unicode("a class needs Unicode tables (\\w, or a non-ASCII letter under i)")
        return text


_NEEDS_UNICODE = "(needs unicode tables)"


@lru_cache(maxsize=None)
def _class_text(op: Any, av: Any, ignore_case: bool, dotall: bool, unicode: bool) -> str | None:
    """Hyperscan class for one single-character item; None if it matches nothing."""
    members, non_ascii = _members(op, av, ignore_case, dotall, unicode=unicode)
    if non_ascii is None and unicode:
        return _NEEDS_UNICODE
    ranges = _ranges(sorted(members))
    if unicode and non_ascii:
        ranges = ranges + list(non_ascii)
    if not ranges:
        return None
    if unicode:
        # The same set written as what it leaves out, when that is shorter: `[^<]` rather than
        # hundreds of Unicode ranges (Hyperscan compiles the short form much faster). The ASCII
        # translation keeps one-byte classes: it is compiled without UTF-8 mode, for ASCII
        # text only, where those are cheapest.
        left_out = _without_surrogates(_subtract([(0, _MAX_CODE)], ranges))
        if not left_out:
            return "(?s:.)"
        if len(left_out) < len(ranges):
            return "[^" + _spell(left_out) + "]"
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return _code(ranges[0][0])
    return "[" + _spell(ranges) + "]"


def _spell(ranges: list[tuple[int, int]]) -> str:
    return "".join(_code(lo) if lo == hi else f"{_code(lo)}-{_code(hi)}" for lo, hi in ranges)


def _subtract(universe: list[tuple[int, int]], ranges: list[tuple[int, int]]
              ) -> list[tuple[int, int]]:
    """The parts of `universe` (one range) outside `ranges` (sorted, disjoint)."""
    lo_all, hi_all = universe[0]
    out: list[tuple[int, int]] = []
    start = lo_all
    for lo, hi in _merge(list(ranges)):
        if lo > start:
            out.append((start, min(lo - 1, hi_all)))
        start = max(start, hi + 1)
    if start <= hi_all:
        out.append((start, hi_all))
    return out


def _freeze(av: Any) -> Any:
    if isinstance(av, list):
        return tuple(_freeze(x) for x in av)
    if isinstance(av, tuple):
        return tuple(_freeze(x) for x in av)
    return av


def _code(point: int) -> str:
    return f"\\x{point:02x}" if point < 128 else f"\\x{{{point:x}}}"


def _ranges(points: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in points:
        if out and out[-1][1] == p - 1:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


def _python_source(op: Any, av: Any) -> tuple[str, bool]:
    """A regex-module source for one single-character item, and whether it is negated."""
    def one(point: int) -> str:
        return f"\\U{point:08x}"

    if op is C.LITERAL:
        return f"[{one(av)}]", False
    if op is C.NOT_LITERAL:
        return f"[{one(av)}]", True
    if op is C.ANY:
        return ".", False
    negated = False
    parts: list[str] = []
    for item_op, item_av in av:
        if item_op is C.NEGATE:
            negated = True
        elif item_op is C.LITERAL:
            parts.append(one(item_av))
        elif item_op is C.RANGE:
            parts.append(f"{one(item_av[0])}-{one(item_av[1])}")
        elif item_op is C.CATEGORY:
            parts.append(_CATEGORY_SOURCE[item_av])
        else:
            raise _NotExact(f"class item {str(item_op).lower()} has no exact Hyperscan form")
    return "[" + "".join(parts) + "]", negated


_CATEGORY_SOURCE = {}
if HAVE_PARSER:
    _CATEGORY_SOURCE = {C.CATEGORY_DIGIT: r"\d", C.CATEGORY_NOT_DIGIT: r"\D",
                        C.CATEGORY_SPACE: r"\s", C.CATEGORY_NOT_SPACE: r"\S",
                        C.CATEGORY_WORD: r"\w", C.CATEGORY_NOT_WORD: r"\W"}
# Categories whose non-ASCII members the unicode translation spells out (small tables);
# \w has thousands of ranges and stays ASCII-only.
_TABLE_CATEGORIES = (r"\d", r"\D", r"\s", r"\S")


@lru_cache(maxsize=None)
def _members(op: Any, av: Any, ignore_case: bool, dotall: bool, *, unicode: bool
             ) -> tuple[frozenset[int], tuple[tuple[int, int], ...] | None]:
    """(ASCII code points the item matches, non-ASCII ranges it matches or None if unknown).

    The ASCII members come from the `regex` module itself; the non-ASCII ones are computed only
    for the unicode translation, and only where they follow from small known tables.
    """
    source, negated = _python_source(op, av)
    rflags = (rx.IGNORECASE if ignore_case else 0) | (rx.DOTALL if dotall else 0)
    positive = rx.compile(source, rflags)
    ascii_points = {ord(c) for c in positive.findall(_ASCII)}
    if negated:
        ascii_points = set(range(128)) - ascii_points
    if not unicode:
        return frozenset(ascii_points), None
    if op is C.ANY:
        return frozenset(ascii_points), _complement([])
    explicit: list[tuple[int, int]] = []
    items = [(C.LITERAL, av)] if op in (C.LITERAL, C.NOT_LITERAL) else list(av)
    for item_op, item_av in items:
        if item_op is C.LITERAL and item_av >= 128:
            if ignore_case:
                return frozenset(ascii_points), None
            explicit.append((item_av, item_av))
        elif item_op is C.RANGE and item_av[1] >= 128:
            if ignore_case:
                return frozenset(ascii_points), None
            explicit.append((max(item_av[0], 128), item_av[1]))
        elif item_op is C.CATEGORY:
            name = _CATEGORY_SOURCE[item_av]
            if name not in _TABLE_CATEGORIES:
                return frozenset(ascii_points), None
            explicit.extend(_category_ranges(name))
    if ignore_case:
        for extra in sorted(set(ASCII_FOLD_EXTRAS.values())):
            if positive.fullmatch(extra):
                explicit.append((ord(extra), ord(extra)))
    merged = _merge(explicit)
    return frozenset(ascii_points), (_complement(merged) if negated else tuple(merged))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _complement(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Non-ASCII, non-surrogate code points outside `ranges` (sorted, merged)."""
    out: list[tuple[int, int]] = []
    start = 128
    for lo, hi in ranges + [(_MAX_CODE + 1, _MAX_CODE + 1)]:
        if lo > start:
            out.append((start, lo - 1))
        start = max(start, hi + 1)
    return tuple(_without_surrogates(out))


def _without_surrogates(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    s_lo, s_hi = _SURROGATES
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if hi < s_lo or lo > s_hi:
            out.append((lo, hi))
            continue
        if lo < s_lo:
            out.append((lo, s_lo - 1))
        if hi > s_hi:
            out.append((s_hi + 1, hi))
    return out


@lru_cache(maxsize=None)
def _category_ranges(name: str) -> tuple[tuple[int, int], ...]:
    """Non-ASCII ranges of one of _TABLE_CATEGORIES, as the `regex` module defines it."""
    if name in (r"\D", r"\S"):           # the complement of a small table
        return _complement(list(_category_ranges(name.lower())))
    points = [ord(c) for c in rx.findall(name, _non_ascii_text())]
    return tuple(_ranges(points))


@lru_cache(maxsize=1)
def _non_ascii_text() -> str:
    return "".join(map(chr, range(128, _SURROGATES[0]))) \
        + "".join(map(chr, range(_SURROGATES[1] + 1, _MAX_CODE + 1)))
