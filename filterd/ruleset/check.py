"""The pattern and meta rules as pipeline checks: [check.rules] (MAIN) and [check.meta] (COMPOSITE).

Trusts: the compiled engine of the rule set the scan started with (ctx.ruleset.engine).
Settings: rules.engine ("auto" uses Hyperscan when installed, trusting its exact matches;
"prefilter" confirms every Hyperscan candidate with `regex`; "re" matches rule by rule),
rules.rule_timeout (seconds one rule may take on one text; a rule may set its own `timeout`).
Symbols: every non-helper pattern or meta rule that fires (its own name); RULE_ERROR (options:
rule, reason) for each rule that raised or overran its budget: score 0, the scan goes on.
Notes left for `filterd scan --explain` and the meta check:
  ctx.notes["rule_matches"][NAME] = matched excerpt (helpers included; a RuleHits mapping that
                                    searches an exact Hyperscan hit's excerpt only when read)
  ctx.notes["rule_helpers"]       = set of `__helper` rules that fired (never emitted)
"""

from __future__ import annotations

from collections import Counter

from filterd.message import MessageView
from filterd.pipeline import Phase, ScanContext, check
from filterd.policy import Symbol
from filterd.ruleset.engine import RuleHits

DEFAULT_RULE_TIMEOUT = 0.25


def _setting(ctx: ScanContext, key: str, default: object) -> object:
    try:
        return ctx.settings.get(key)
    except (KeyError, AttributeError):
        return default


def _matches(ctx: ScanContext) -> RuleHits:
    matches = ctx.notes.get("rule_matches")
    if not isinstance(matches, RuleHits):
        matches = ctx.notes["rule_matches"] = RuleHits(matches)
    return matches


@check("rules", phase=Phase.MAIN, symbols=("RULE_ERROR",))
def rules(msg: MessageView, ctx: ScanContext) -> list[Symbol]:
    engine = getattr(ctx.ruleset, "engine", None)
    if engine is None:
        return []
    result = engine.match(msg, mode=str(_setting(ctx, "rules.engine", "auto")),
                          rule_timeout=float(_setting(ctx, "rules.rule_timeout",  # type: ignore[arg-type]
                                                      DEFAULT_RULE_TIMEOUT)))
    matches = _matches(ctx)
    matches.update(result.hits)          # excerpts of exact Hyperscan hits stay unread
    helpers = ctx.notes.setdefault("rule_helpers", set())
    out: list[Symbol] = []
    for name in result.hits:
        if name.startswith("__"):
            helpers.add(name)
        else:
            out.append(Symbol(name))
    out.extend(Symbol("RULE_ERROR", (name, reason)) for name, reason in result.errors)
    return out


@check("meta", phase=Phase.COMPOSITE, symbols=("RULE_ERROR",))
def meta(msg: MessageView, ctx: ScanContext) -> list[Symbol]:
    engine = getattr(ctx.ruleset, "engine", None)
    if engine is None or not engine.meta_order:
        return []
    values: Counter[str] = Counter(s.name for s in ctx.symbols)
    for name in ctx.notes.get("rule_helpers", ()):
        values[name] += 1
    fired, errors = engine.evaluate_metas(values)
    matches = _matches(ctx)
    helpers = ctx.notes.setdefault("rule_helpers", set())
    out: list[Symbol] = []
    for name in fired:
        rule = engine.rules[name]
        matches[name] = f"meta: {rule.expression.source if rule.expression else ''}"
        if name.startswith("__"):
            helpers.add(name)
        else:
            out.append(Symbol(name))
    out.extend(Symbol("RULE_ERROR", (name, reason)) for name, reason in errors)
    return out
