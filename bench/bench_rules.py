"""Rules-only scan throughput on one core, and how matching cost grows with the rule count.

Measures, on a deterministic sample of ../shared/corpora (half B):
  1. the default rule set: messages/s for parse + sanity + pattern rules + meta rules (what
     `filterd rules fit` runs), and the engine's own matching time per message;
  2. cost growth: the default rules plus generated rules up to 150, 500, 1,500 and 3,000 rules,
     matching time per message with the multi-pattern (Hyperscan) path — exact where the
     pattern allows (auto) and with every candidate confirmed (prefilter) — and rule by rule;
  3. the SpamAssassin stock rules (/usr/share/spamassassin/*.cf) imported with
     `filterd rules import-sa`, when that directory exists.
Prints a table and writes bench/out/rules.json. Not part of `make test`.
Usage: bench/bench_rules.py [--messages N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from filterd.config import PROJECT_RULES  # noqa: E402
from filterd.message import parse  # noqa: E402
from filterd.ruleset import fit, load  # noqa: E402

CORPORA = REPO.parent / "shared" / "corpora"
SA_DIR = Path("/usr/share/spamassassin")
TARGETS = tuple(int(t) for t in os.environ.get("BENCH_RULES_TARGETS", "150,500,1500,3000").split(","))


def one_core() -> None:
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass


def sample(n: int) -> list[bytes]:
    samples = [s for s in fit.read_split(CORPORA / "SPLIT.tsv", CORPORA, [CORPORA])
               if s.half == "B"]
    random.Random(5).shuffle(samples)
    return [(CORPORA / s.path).read_bytes() for s in samples[:n]]


def end_to_end(messages: list[bytes], ruleset, settings) -> float:
    started = time.perf_counter()
    for raw in messages:
        fit.rule_hits(raw, ruleset, settings)
    return len(messages) / (time.perf_counter() - started)


def engine_only(messages: list[bytes], ruleset, mode: str) -> float:
    """Mean CPU seconds per message of engine.match, with each view's texts already decoded."""
    views = [parse(raw) for raw in messages]
    for v in views:                       # decode once, as the first check of a scan would
        v.body_text, v.urls, v.raw_headers, v.parts
    engine = ruleset.engine
    started = time.process_time()       # CPU time: the machine is shared
    for v in views:
        engine.match(v, mode=mode)
    return (time.process_time() - started) / len(views)


def vocabulary(messages: list[bytes]) -> list[str]:
    words: dict[str, None] = {}
    for raw in messages[:200]:
        for w in re.findall(rb"\b[a-z]{5,10}\b", raw.lower()):
            words.setdefault(w.decode(), None)
    return sorted(words)


def generated_ruleset(base_dir: Path, extra: int, words: list[str], tmp: Path):
    """The default rules plus `extra` generated rules of realistic shape in a site layer."""
    rng = random.Random(extra)
    lines = []
    kinds = [("body", None), ("body", None), ("rawbody", None), ("header", "Subject"),
             ("header", "From"), ("uri", None)]
    for i in range(extra):
        kind, header = rng.choice(kinds)
        a, b, c = rng.sample(words, 3)
        shape = rng.randrange(4)
        if shape == 0:
            pattern = rf"\b{a}\s+{b}\b"
        elif shape == 1:
            pattern = rf"\b(?:{a}|{b}|{c})\w*\s+\w+\s+{a[:4]}"
        elif shape == 2:
            pattern = rf"{a}[\W_]{{0,3}}{b}"
        else:
            pattern = rf"\b{a}\b.{{0,40}}\b{b}\b"
        if kind == "uri":
            pattern = rf"^https?://[^/]*{a}[^/]*/"
        lines.append(f"[rule.GEN_{i}]\nkind = \"{kind}\"\n" + (f"header = \"{header}\"\n" if header else "")
                     + f"pattern = '{pattern}'\nflags = \"i\"\ndescription = \"generated\"\n")
    site = tmp / f"site{extra}"
    (site / "local.d").mkdir(parents=True, exist_ok=True)
    (site / "local.d" / "gen.toml").write_text("\n".join(lines))
    return load(base_dir, site)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=600)
    args = parser.parse_args()
    if not CORPORA.is_dir():
        print(f"skipped: {CORPORA} not found")
        return 0
    one_core()
    settings = fit.make_settings()
    messages = sample(args.messages)
    out: dict[str, object] = {"messages": len(messages)}

    started = time.perf_counter()
    ruleset = load(PROJECT_RULES, None)
    out["load_seconds"] = round(time.perf_counter() - started, 2)
    n_rules = len(ruleset.engine.rules)
    end_to_end(messages[:50], ruleset, settings)            # warm up
    out["default_rules"] = n_rules
    out["default_msgs_per_s_end_to_end"] = round(end_to_end(messages, ruleset, settings), 1)
    # paired: the exact-where-possible path (auto), every candidate confirmed (prefilter), and
    # rule by rule, on the same decoded views in one process
    engine_only(messages[:50], ruleset, "prefilter")        # compiles its databases
    out["default_engine_ms_per_msg"] = {m: round(engine_only(messages, ruleset, m) * 1000, 3)
                                        for m in ("auto", "prefilter", "re")}
    out["default_exact_rules"] = len(ruleset.engine.exact_rules)
    print(f"default set: {n_rules} rules, load {out['load_seconds']}s; "
          f"{out['default_msgs_per_s_end_to_end']} msgs/s end to end (parse+sanity+rules+meta), "
          f"engine {out['default_engine_ms_per_msg']} ms/msg")

    words = vocabulary(messages)
    growth = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        base = tmp / "shipped"
        shutil.copytree(PROJECT_RULES, base, ignore=shutil.ignore_patterns("*.md"))
        for target in TARGETS:
            extra = max(0, target - n_rules)
            started = time.perf_counter()
            rs = generated_ruleset(base, extra, words, tmp) if extra else ruleset
            load_s = time.perf_counter() - started
            total = len(rs.engine.rules)
            engine_only(messages[:30], rs, "prefilter")     # compiles its databases
            row = {"rules": total, "load_s": round(load_s, 2),
                   "auto_ms": round(engine_only(messages, rs, "auto") * 1000, 3),
                   "prefilter_ms": round(engine_only(messages, rs, "prefilter") * 1000, 3),
                   "re_ms": round(engine_only(messages[:200], rs, "re") * 1000, 3)}
            growth.append(row)
            print(f"  {total:>5} rules: load {row['load_s']:>6}s  multi-pattern "
                  f"{row['auto_ms']:>7} ms/msg (prefilter only {row['prefilter_ms']:>7})   "
                  f"rule by rule {row['re_ms']:>7} ms/msg")
        out["growth"] = growth
        if growth:
            small = next(g for g in growth if g["rules"] >= 150)
            big = next((g for g in growth if g["rules"] >= 1500), growth[-1])
            out["growth_ratio_1500_vs_150"] = round(big["auto_ms"] / small["auto_ms"], 2)
            print(f"  cost growth {small['rules']} -> {big['rules']} rules: "
                  f"x{out['growth_ratio_1500_vs_150']} (multi-pattern), "
                  f"x{round(big['re_ms'] / small['re_ms'], 2)} (rule by rule)")

        if SA_DIR.is_dir() and os.environ.get("BENCH_RULES_SA", "1") != "0":
            from filterd.ruleset import sa_import
            result = sa_import.import_files(sorted(SA_DIR.glob("*.cf")))
            site = tmp / "sa-site"
            (site / "local.d").mkdir(parents=True)
            (site / "local.d" / "sa.toml").write_text(sa_import.to_toml(result))
            shipped = tmp / "sa-shipped"
            shipped.mkdir()
            for name in ("actions.toml", "core.toml", "scores.toml", "rules-engine.toml"):
                shutil.copy(PROJECT_RULES / name, shipped / name)
            started = time.perf_counter()
            sa_rs = load(shipped, site)
            out["sa_rules"] = len(sa_rs.engine.rules)
            out["sa_load_seconds"] = round(time.perf_counter() - started, 2)
            out["sa_fallback_rules"] = len(sa_rs.engine.fallback_rules)
            out["sa_msgs_per_s_end_to_end"] = round(end_to_end(messages, sa_rs, settings), 1)
            out["sa_engine_ms_per_msg"] = round(engine_only(messages, sa_rs, "auto") * 1000, 3)
            print(f"SpamAssassin stock rules imported: {out['sa_rules']} rules "
                  f"({out['sa_fallback_rules']} rule by rule), load {out['sa_load_seconds']}s; "
                  f"{out['sa_msgs_per_s_end_to_end']} msgs/s end to end, engine "
                  f"{out['sa_engine_ms_per_msg']} ms/msg")

    (REPO / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "out" / "rules.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
