"""`filterd rules lint`: everything about a rule set that loading alone does not refuse.

Trusts: a Ruleset that `filterd.ruleset.load` accepted (so every rule compiles and every check
binding resolves); anything load refuses is reported by the caller as one error.
Settings: none. Symbols: none.

Problems found (each with the file:line of the value at fault):
  - a rule or symbol without a description (helpers `__X` excepted)
  - a non-helper rule or a symbol a check may emit without a score, a score for a `__` helper
  - a meta rule referring to a name no rule, symbol or check declares
  - a native rule keying on a header another filter adds (X-Spam-*, X-Virus-*, ...)
  - a silent duplicate: one entry or value set by two files of the same layer
  - a score for a name nothing emits
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from filterd.ruleset.engine import FOREIGN_HEADER_PREFIXES, PSEUDO_HEADERS


@dataclass(frozen=True, slots=True)
class Problem:
    location: str        # file:line
    key: str             # rule.X.field / scores.X
    problem: str
    severity: str = "error"   # "error" fails lint; "warning" is printed only

    def __str__(self) -> str:
        return f"{self.location}: {self.key}: {self.problem}"


def known_symbols(ruleset: Any) -> set[str]:
    """Every name a scan can produce under this rule set."""
    from filterd.pipeline import load_checks
    names = set(ruleset.symbols) | set(ruleset.rules)
    registry = load_checks()
    for binding in ruleset.bindings:
        spec = registry.get(binding.function)
        if spec is not None:
            names.update(spec.symbols)
    return names


def lint(ruleset: Any) -> list[Problem]:
    problems: list[Problem] = []
    loc = ruleset.location_of
    names = known_symbols(ruleset)
    from filterd.pipeline import load_checks
    registry = load_checks()
    emitted: set[str] = set(ruleset.symbols)
    for binding in ruleset.bindings:
        spec = registry.get(binding.function)
        if spec is not None:
            emitted.update(spec.symbols)

    for name, entry in sorted(ruleset.rules.items()):
        helper = name.startswith("__")
        if entry.get("enabled", True) is False:
            continue
        if not helper and not str(entry.get("description", "")).strip():
            problems.append(Problem(loc(f"rule.{name}"), f"rule.{name}.description",
                                    "a rule needs a description"))
        if not helper and name not in ruleset.scores:
            problems.append(Problem(loc(f"rule.{name}"), f"scores.{name}",
                                    "no score (add one to a scores table)"))
        spelled = str(entry.get("header", "")).partition(":")[0].strip()
        header = spelled.lower()
        if header and header.startswith(FOREIGN_HEADER_PREFIXES) and not entry.get("origin") \
                and spelled not in PSEUDO_HEADERS:     # computed by filterd, not read
            problems.append(Problem(loc(f"rule.{name}.header"), f"rule.{name}.header",
                                    f"{header} is added by another filter: rules must not "
                                    f"key on it"))
    engine = ruleset.engine
    if engine is not None:
        for rule in engine.meta_order:
            assert rule.expression is not None
            for ref in sorted(rule.expression.references - names):
                problems.append(Problem(loc(f"rule.{rule.name}.expression"),
                                        f"rule.{rule.name}.expression",
                                        f"refers to {ref}, which no rule, symbol or check "
                                        f"declares"))

    for name, sym in sorted(ruleset.symbols.items()):
        if name.startswith("__") or sym.source == "(builtin)" and name in ruleset.scores:
            continue
        if name not in ruleset.scores:
            problems.append(Problem(sym.source, f"scores.{name}", "symbol has no score"))
    for binding in ruleset.bindings:
        spec = registry.get(binding.function)
        for name in (spec.symbols if spec else ()):
            if name not in ruleset.symbols and name not in ruleset.rules:
                problems.append(Problem(binding.source, f"symbol.{name}",
                                        f"check {binding.function!r} emits {name} but no "
                                        f"[symbol.{name}] describes it"))
    for name in sorted(ruleset.scores):
        if name.startswith("__"):
            problems.append(Problem(loc(f"scores.{name}"), f"scores.{name}",
                                    "helper rules and symbols (__NAME) are never scored"))
            continue
        if name not in names and name not in emitted:
            problems.append(Problem(loc(f"scores.{name}"), f"scores.{name}",
                                    "score for a name no rule, symbol or check emits",
                                    severity="warning"))
    bayes_names = {w.partition(".")[2] for w in ruleset.definitions
                   if w.startswith("bayes_scores.")}
    for name in sorted(bayes_names | set(ruleset.bayes_set_when)):
        table = "bayes_scores" if name in bayes_names else "score_sets"
        if name.startswith("__"):
            problems.append(Problem(loc(f"{table}.{name}"), f"{table}.{name}",
                                    "helper rules and symbols (__NAME) are never scored"))
        elif name not in names and name not in emitted:
            where = f"bayes_scores.{name}" if table == "bayes_scores" else "score_sets.bayes_scores"
            problems.append(Problem(loc(where), where,
                                    f"{name}: no rule, symbol or check emits it",
                                    severity="warning"))

    for where, defs in sorted(ruleset.definitions.items()):
        by_layer: dict[str, list[str]] = {}
        for layer, location in defs:
            by_layer.setdefault(layer, []).append(location)
        for layer, locations in by_layer.items():
            files = {loc_.rpartition(":")[0] or loc_ for loc_ in locations}
            if len(files) > 1:
                problems.append(Problem(locations[-1], where,
                                        f"also set in {', '.join(locations[:-1])} of the same "
                                        f"{layer} layer: the later file silently wins"))
    return problems
