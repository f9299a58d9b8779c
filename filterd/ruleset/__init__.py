"""Load the policy data in rules/: check bindings, symbol descriptions, scores, levels, actions.

Trusts: the shipped rule directory (never edited) and a site directory layered on top:
  <site>/local.d/*.toml     merged into the shipped tables key by key
  <site>/override.d/*.toml  replace whole entries (a whole [check.X] or [rule.X], one score)
Every value remembers the file it came from, for `filterd rules show NAME`.

Top-level tables a rule file may hold (anything else is an error naming the file):
  [check.NAME]    binds a registered check function with arguments (filterd.pipeline)
  [symbol.NAME]   describes a symbol a check emits (description is required)
  [rule.NAME]     a pattern rule (header/body/uri/meta...: filterd.ruleset.engine,
                  the language is documented in rules/README.md)
  [scores]        SYMBOL = weight; the only place numbers for symbols live
  [bayes_scores]  SYMBOL = weight for a message the Bayes learner voted on (the fitted set of
                  `filterd rules fit --with-bayes`), over [scores]; a score a later layer
                  sets in [scores] (a site's local.d/override.d) still wins
  [score_sets]    bayes_scores = [symbols]: the symbols that select [bayes_scores]
  [levels]        tag_level, tag2_level, kill_level, reject_level
  [actions]       kill_action, subject_tag
  [forced]        SYMBOL = action, whatever the score
  [failures]      failure or failure symbol = action (tempfail, accept, ...)
  [meta]          free-form information about the file (ignored)
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from filterd.policy import Action, Levels, Policy

TABLES = ("check", "symbol", "rule", "scores", "bayes_scores", "score_sets", "levels", "actions",
          "forced", "failures", "meta")
# Tables whose entries are whole definitions (override.d replaces them whole).
ENTRY_TABLES = ("check", "symbol", "rule")
# Tables of plain key = value pairs.
VALUE_TABLES = ("scores", "bayes_scores", "score_sets", "levels", "actions", "forced", "failures")
LAYER_RANK = {"shipped": 0, "local": 1, "override": 2}


_compile_cache: Path | None = None


def configure_compile_cache(directory: Path | str | None) -> None:
    """Keep compiled pattern databases in `directory` (created 0700) across processes, so a
    restart or `filterd scan` with unchanged rules compiles nothing; None: this process only.
    The CLI sets it from rules.compile_cache for every command (filterd.cli.main)."""
    global _compile_cache
    _compile_cache = Path(directory) if directory else None


def compile_cache_dir() -> Path | None:
    return _compile_cache


class RulesetError(Exception):
    def __init__(self, source: str, key: str, problem: str):
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"{source}: {key}: {problem}")


@dataclass(frozen=True, slots=True)
class Binding:
    """One [check.NAME] entry: run `function` with `args`; `phase`/`timeout` may override."""

    name: str
    function: str
    args: Mapping[str, Any]
    timeout: float | None
    enabled: bool
    source: str


@dataclass(frozen=True, slots=True)
class SymbolDef:
    name: str
    description: str
    source: str


@dataclass
class Ruleset:
    bindings: list[Binding]
    symbols: dict[str, SymbolDef]
    rules: dict[str, dict[str, Any]]          # raw [rule.NAME] tables, compiled by the engine
    scores: dict[str, float]
    policy: Policy
    sources: dict[str, str] = field(default_factory=dict)  # "table.key" -> file
    files: list[str] = field(default_factory=list)
    engine: Any = None                         # compiled pattern rules, set by the engine
    # "table.key" and "table.key.field" -> "file:line" of the value that won
    locations: dict[str, str] = field(default_factory=dict)
    # "table.key" -> every (layer, "file:line") that set it, in load order (lint, rules show)
    definitions: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    # the score set for a message the Bayes learner voted on: [scores] with [bayes_scores] over
    # it, except where a later layer set [scores]; empty when no file defines [bayes_scores]
    bayes_scores: dict[str, float] = field(default_factory=dict)
    bayes_score_origin: dict[str, str] = field(default_factory=dict)   # name -> "table.key"
    bayes_set_when: frozenset[str] = frozenset()

    def scores_for(self, symbols: Any) -> Mapping[str, float]:
        """The score set for a scan's symbols: [bayes_scores] once the learner voted."""
        if self.bayes_set_when and any(s.name in self.bayes_set_when for s in symbols):
            return self.bayes_scores
        return self.scores

    def describe(self, name: str) -> str:
        if name in self.symbols:
            return self.symbols[name].description
        rule = self.rules.get(name)
        if rule is not None:
            return str(rule.get("description", ""))
        return ""

    def source_of(self, table: str, key: str) -> str | None:
        return self.sources.get(f"{table}.{key}")

    def location_of(self, where: str) -> str:
        """"file:line" of an entry or field ("rule.X", "rule.X.pattern"), else its file."""
        if where in self.locations:
            return self.locations[where]
        head = where
        while "." in head:
            if head in self.locations:
                return self.locations[head]
            head = head.rpartition(".")[0]
        return self.sources.get(where, "(rules)")


# Symbols the pipeline itself emits; declared here so every symbol has a description.
BUILTIN_SYMBOLS = {
    "CHECK_ERROR": "A check raised an error; the scan went on without it (options: check, error)",
    "CHECK_TIMEOUT": "A check did not finish within its timeout or the content CPU budget "
                     "(options: check, or view.FORM when the view's own decoding crossed it)",
}

_TOML_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_TOML_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_\-]+)\s*=""")
_TOML_PART = re.compile(r"""\"[^"]*\"|'[^']*'|[^.\s]+""")


def line_index(text: str) -> dict[str, int]:
    """Where each table header and key starts: {"rule.X": 12, "rule.X.pattern": 14}.

    tomllib gives no positions, so error messages find them here with a line scanner that
    understands what rule files use (headers, dotted headers, key = value lines).
    """
    index: dict[str, int] = {}
    current: str | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("[["):
            current = None
            continue
        m = _TOML_HEADER.match(line)
        if m:
            current = ".".join(p.strip("\"'") for p in _TOML_PART.findall(m.group(1)))
            index.setdefault(current, lineno)
            continue
        m = _TOML_KEY.match(line)
        if m and current:
            index.setdefault(f"{current}.{m.group(1).strip(chr(34) + chr(39))}", lineno)
    return index


def _read(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RulesetError(str(path), "(syntax)", str(exc)) from None
    except OSError as exc:
        raise RulesetError(str(path), "(file)", exc.strerror or str(exc)) from None
    for table, value in data.items():
        if table not in TABLES:
            raise RulesetError(str(path), table,
                               f"unknown table (known: {', '.join(TABLES)})")
        if not isinstance(value, dict):
            raise RulesetError(str(path), table, "expected a table")
    return data


def _rule_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.toml") if p.is_file()) if directory.is_dir() else []


@dataclass
class RawRules:
    """The merged tables before validation, with where every value came from."""

    merged: dict[str, dict[str, Any]]
    sources: dict[str, str]
    files: list[str]
    locations: dict[str, str]
    definitions: dict[str, list[tuple[str, str]]]


def load_raw(shipped: Path, site: Path | None = None) -> tuple[dict[str, dict[str, Any]],
                                                              dict[str, str], list[str]]:
    """Merge shipped files, then local.d (merge), then override.d (replace)."""
    raw = load_layers(shipped, site)
    return raw.merged, raw.sources, raw.files


def load_layers(shipped: Path, site: Path | None = None) -> RawRules:
    """Merge shipped files, then local.d (merge), then override.d (replace)."""
    merged: dict[str, dict[str, Any]] = {t: {} for t in TABLES}
    sources: dict[str, str] = {}
    files: list[str] = []
    locations: dict[str, str] = {}
    definitions: dict[str, list[tuple[str, str]]] = {}
    layers: list[tuple[str, list[Path]]] = [("shipped", _rule_files(shipped))]
    if site is not None:
        layers.append(("local", _rule_files(site / "local.d")))
        layers.append(("override", _rule_files(site / "override.d")))
    if not layers[0][1]:
        raise RulesetError(str(shipped), "(dir)", "no rule files (*.toml) found")
    for layer, paths in layers:
        for path in paths:
            files.append(str(path))
            data = _read(path)
            try:
                lines = line_index(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                lines = {}

            def at(where: str, path: Path = path, lines: dict[str, int] = lines) -> str:
                line = lines.get(where)
                return f"{path}:{line}" if line else str(path)

            for table, entries in data.items():
                if table == "meta":
                    continue
                target = merged[table]
                for key, value in entries.items():
                    where = f"{table}.{key}"
                    if table in ENTRY_TABLES:
                        if not isinstance(value, dict):
                            raise RulesetError(at(where), where, "expected a table")
                        if layer == "shipped" and key in target:
                            raise RulesetError(at(where), where,
                                               f"defined again (first in {locations[where]})")
                        if layer == "local" and key in target:
                            target[key] = {**target[key], **value}
                        else:
                            target[key] = dict(value)
                            if layer == "override":
                                # a replaced entry keeps no field of the one it replaces
                                for old in [k for k in sources if k.startswith(where + ".")]:
                                    sources.pop(old, None)
                                    locations.pop(old, None)
                        for field_name in value:
                            sources[f"{where}.{field_name}"] = str(path)
                            locations[f"{where}.{field_name}"] = at(f"{where}.{field_name}")
                    else:
                        target[key] = value
                    sources[where] = str(path)
                    locations[where] = at(where)
                    definitions.setdefault(where, []).append((layer, at(where)))
    return RawRules(merged, sources, files, locations, definitions)


def _action(source: str, key: str, value: Any) -> Action:
    try:
        return Action(value)
    except ValueError:
        raise RulesetError(source, key, f"unknown action {value!r} (known: "
                           f"{', '.join(a.value for a in Action)})") from None


def build(merged: dict[str, dict[str, Any]], sources: dict[str, str], files: list[str],
          locations: Mapping[str, str] | None = None,
          definitions: Mapping[str, list[tuple[str, str]]] | None = None) -> Ruleset:
    locations = locations or {}
    definitions = definitions or {}

    def src(where: str) -> str:
        return locations.get(where) or sources.get(where, "(rules)")

    bindings = []
    for name, entry in merged["check"].items():
        where = f"check.{name}"
        function = entry.get("function", name)
        if not isinstance(function, str):
            raise RulesetError(src(where), where, "function must be a string")
        args = entry.get("args", {})
        if not isinstance(args, dict):
            raise RulesetError(src(where), f"{where}.args", "expected a table of arguments")
        timeout = entry.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise RulesetError(src(where), f"{where}.timeout", "expected a positive number")
        unknown = set(entry) - {"function", "args", "timeout", "enabled", "description"}
        if unknown:
            raise RulesetError(src(where), where, f"unknown field(s) {', '.join(sorted(unknown))}")
        bindings.append(Binding(name, function, args, float(timeout) if timeout else None,
                                bool(entry.get("enabled", True)), src(where)))

    symbols = {n: SymbolDef(n, d, "(builtin)") for n, d in BUILTIN_SYMBOLS.items()}
    for name, entry in merged["symbol"].items():
        where = f"symbol.{name}"
        desc = entry.get("description")
        if not isinstance(desc, str) or not desc.strip():
            raise RulesetError(src(where), where, "a symbol needs a description")
        symbols[name] = SymbolDef(name, desc, src(where))

    scores: dict[str, float] = {}
    for name, value in merged["scores"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RulesetError(src(f"scores.{name}"), f"scores.{name}", "expected a number")
        scores[name] = float(value)
    bayes_scores, bayes_origin, bayes_when = _bayes_score_set(merged, scores, src, definitions)

    level_values = {}
    for key, value in merged["levels"].items():
        if key not in Levels.__dataclass_fields__:
            raise RulesetError(src(f"levels.{key}"), f"levels.{key}", "unknown level")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RulesetError(src(f"levels.{key}"), f"levels.{key}", "expected a number")
        level_values[key] = float(value)
    levels = Levels(**level_values)

    actions = merged["actions"]
    unknown = set(actions) - {"kill_action", "subject_tag", "spam_checks_for_originating"}
    if unknown:
        key = sorted(unknown)[0]
        raise RulesetError(src(f"actions.{key}"), f"actions.{key}", "unknown setting")
    kill_action = _action(src("actions.kill_action"), "actions.kill_action",
                          actions.get("kill_action", "quarantine"))
    subject_tag = actions.get("subject_tag", "***SPAM*** ")
    if not isinstance(subject_tag, str):
        raise RulesetError(src("actions.subject_tag"), "actions.subject_tag", "expected a string")
    forced = {k: _action(src(f"forced.{k}"), f"forced.{k}", v) for k, v in merged["forced"].items()}
    failures = {k: _action(src(f"failures.{k}"), f"failures.{k}", v)
                for k, v in merged["failures"].items()}
    policy = Policy(levels=levels, kill_action=kill_action, subject_tag=subject_tag,
                    forced=forced, failures=failures,
                    spam_checks_for_originating=bool(actions.get("spam_checks_for_originating",
                                                                 False)))
    return Ruleset(bindings=bindings, symbols=symbols, rules=dict(merged["rule"]), scores=scores,
                   policy=policy, sources=sources, files=files, locations=dict(locations),
                   definitions=dict(definitions), bayes_scores=bayes_scores,
                   bayes_score_origin=bayes_origin, bayes_set_when=bayes_when)


def _bayes_score_set(merged: dict[str, dict[str, Any]], scores: dict[str, float], src: Any,
                     definitions: Mapping[str, list[tuple[str, str]]]
                     ) -> tuple[dict[str, float], dict[str, str], frozenset[str]]:
    """[scores] with [bayes_scores] over it, and the symbols that select it.

    A site that sets `[scores] X` in local.d/ or override.d/ means X everywhere, so a [scores]
    value from a later layer than X's [bayes_scores] value wins (SpamAssassin's one-number
    `score` line sets all its score sets alike).
    """
    sets = merged["score_sets"]
    unknown = set(sets) - {"bayes_scores"}
    if unknown:
        key = sorted(unknown)[0]
        raise RulesetError(src(f"score_sets.{key}"), f"score_sets.{key}",
                           "unknown score set (known: bayes_scores)")
    when = sets.get("bayes_scores", [])
    if not isinstance(when, list) or not all(isinstance(x, str) for x in when):
        raise RulesetError(src("score_sets.bayes_scores"), "score_sets.bayes_scores",
                           "expected a list of symbol names")
    if not merged["bayes_scores"]:
        return {}, {}, frozenset()
    if not when:
        where = f"bayes_scores.{next(iter(merged['bayes_scores']))}"
        raise RulesetError(src(where), where, "[bayes_scores] without [score_sets] "
                           "bayes_scores = [...] naming the symbols that select it")

    def layer(where: str) -> int:
        defs = definitions.get(where)
        return LAYER_RANK.get(defs[-1][0], 0) if defs else 0

    effective = dict(scores)
    origin = {name: f"scores.{name}" for name in scores}
    for name, value in merged["bayes_scores"].items():
        where = f"bayes_scores.{name}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RulesetError(src(where), where, "expected a number")
        if name in scores and layer(f"scores.{name}") > layer(where):
            continue
        effective[name] = float(value)
        origin[name] = where
    return effective, origin, frozenset(when)


def load(shipped: Path, site: Path | None = None) -> Ruleset:
    """Load, validate and compile the rule set; raises RulesetError naming file:line and key.

    Everything that can be wrong with the data is found here, before the set is used: a reload
    that raises keeps the old set running (filterd.service.Scanner.reload).
    """
    raw = load_layers(shipped, site)
    ruleset = build(raw.merged, raw.sources, raw.files, raw.locations, raw.definitions)
    from filterd.pipeline import validate_bindings  # the registry knows the check functions
    validate_bindings(ruleset)
    from filterd.ruleset.engine import compile_ruleset
    ruleset.engine = compile_ruleset(ruleset)
    return ruleset
