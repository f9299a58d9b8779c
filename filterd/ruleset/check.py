"""The pattern and meta rules as pipeline checks: [check.rules] (MAIN) and [check.meta] (COMPOSITE).

Trusts: the compiled engine of the rule set the scan started with (ctx.ruleset.engine).
Settings: rules.engine ("auto" uses Hyperscan when installed, "re" matches rule by rule),
rules.rule_timeout (seconds one rule may take on one text; a rule may set its own `timeout`).
Symbols: every non-helper pattern or meta rule that fires (its own name); RULE_ERROR (options:
rule, reason) for each rule that raised or overran its budget: score 0, the scan goes on.
Notes left for `filterd scan --explain` and the meta check:
  ctx.notes["rule_matches"][NAME] = matched excerpt (helpers included)
  ctx.notes["rule_helpers"]       = set of `__helper` rules that fired (never emitted)
"""

from __future__ import annotations

from collections import Counter

from filterd.message import MessageView
from filterd.pipeline import Phase, ScanContext, check
from filterd.policy import Symbol

DEFAULT_RULE_TIMEOUT = 0.25


def _setting(ctx: ScanContext, key: str, default: object) -> object:
    try:
        return ctx.settings.get(key)
    except (KeyError, AttributeError):
        return default


@check("rules", phase=Phase.MAIN, symbols=("RULE_ERROR",))
def rules(msg: MessageView, ctx: ScanContext) -> list[Symbol]:
    engine = getattr(ctx.ruleset, "engine", None)
    if engine is None:
        return []
    result = engine.match(msg, mode=str(_setting(ctx, "rules.engine", "auto")),
                          rule_timeout=float(_setting(ctx, "rules.rule_timeout",  # type: ignore[arg-type]
                                                      DEFAULT_RULE_TIMEOUT)))
    matches = ctx.notes.setdefault("rule_matches", {})
    helpers = ctx.notes.setdefault("rule_helpers", set())
    out: list[Symbol] = []
    for name, excerpt in result.hits.items():
        matches[name] = excerpt
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
    matches = ctx.notes.setdefault("rule_matches", {})
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
