"""The pipeline: phases, per-check timeouts, errors as symbols, the whole-message deadline;
and the rule-data loader's layering."""

import asyncio
import time

import pytest

from filterd import config, ruleset as ruleset_mod
from filterd.message import parse
from filterd.pipeline import Phase, REGISTRY, ScanContext, check, scan
from filterd.policy import Symbol
from filterd.ruleset import Binding, RulesetError, load


@check("test.slow", phase=Phase.MAIN, network=True)
async def _slow(msg, ctx, *, seconds: float = 1.0):
    await asyncio.sleep(seconds)
    return [Symbol("TEST_SLOW_DONE")]


@check("test.boom", phase=Phase.MAIN)
def _boom(msg, ctx):
    raise ValueError("broken check")


@check("test.echo", phase=Phase.PRE)
def _echo(msg, ctx, *, name: str):
    return [Symbol(name)]


@check("test.sees_earlier", phase=Phase.COMPOSITE)
def _sees(msg, ctx):
    return [Symbol("TEST_SAW_PRE")] if ctx.has_symbol("TEST_PRE") else []


@pytest.fixture(autouse=True)
def _core(core_rules):
    global CORE
    CORE = core_rules


def ruleset_with(*bindings):
    rs = load(CORE)
    rs.bindings = [Binding(name, fn, args, timeout, True, "(test)")
                   for name, fn, args, timeout in bindings]
    return rs


def run(rs, settings=None, **kw):
    settings = settings or config.defaults()
    ctx = ScanContext(settings, rs)
    return asyncio.run(scan(parse(b"Subject: x\n\nbody\n"), ctx, **kw))


def test_phases_run_in_order_and_see_earlier_symbols():
    rs = ruleset_with(("late", "test.sees_earlier", {}, None), ("early", "test.echo",
                                                                  {"name": "TEST_PRE"}, None))
    result = run(rs)
    assert [s.name for s in result.symbols] == ["TEST_PRE", "TEST_SAW_PRE"]
    assert set(result.timings) == {"pre", "composite"}
    assert result.failure is None


def test_a_failing_check_adds_check_error_and_the_scan_goes_on():
    rs = ruleset_with(("boom", "test.boom", {}, None), ("echo", "test.echo", {"name": "OK"}, None))
    result = run(rs)
    names = {s.name: s for s in result.symbols}
    assert names["CHECK_ERROR"].options == ("boom", "ValueError")
    assert "OK" in names


def test_a_slow_check_times_out_alone():
    rs = ruleset_with(("slow", "test.slow", {"seconds": 5}, 0.2), ("echo", "test.echo",
                                                                   {"name": "OK"}, None))
    started = time.monotonic()
    result = run(rs)
    assert time.monotonic() - started < 2
    assert [s.options for s in result.symbols if s.name == "CHECK_TIMEOUT"] == [("slow",)]
    assert result.failure is None


def test_missing_the_message_deadline_is_a_failure():
    settings = config.defaults().with_overrides({"scan.deadline": 0.3, "scan.check_timeout": 10})
    rs = ruleset_with(("a", "test.slow", {"seconds": 5}, None), ("b", "test.slow",
                                                                 {"seconds": 5}, None))
    started = time.monotonic()
    result = run(rs, settings)
    assert result.failure == "deadline"
    assert time.monotonic() - started < 2


def test_network_checks_can_be_skipped():
    rs = ruleset_with(("slow", "test.slow", {"seconds": 0}, None))
    assert run(rs, skip_network=True).symbols == ()
    assert [s.name for s in run(rs).symbols] == ["TEST_SLOW_DONE"]


# --- the rule-data loader --------------------------------------------------------------

def shipped(tmp_path):
    d = tmp_path / "shipped"
    d.mkdir()
    (d / "a.toml").write_text(
        '[check.gt]\nfunction = "gtube"\n[symbol.GTUBE]\ndescription = "g"\n'
        '[scores]\nGTUBE = 1000\nX = 1\n[levels]\ntag2_level = 6\n[forced]\nX = "reject"\n')
    return d


def test_layering_local_merges_override_replaces(tmp_path):
    site = tmp_path / "site"
    (site / "local.d").mkdir(parents=True)
    (site / "override.d").mkdir()
    (site / "local.d" / "levels.toml").write_text("[levels]\ntag2_level = 4.5\n[scores]\nX = 2\n")
    (site / "override.d" / "gt.toml").write_text('[check.gt]\nfunction = "gtube"\nenabled = false\n')
    rs = load(shipped(tmp_path), site)
    assert rs.policy.levels.tag2_level == 4.5
    assert rs.scores == {"GTUBE": 1000.0, "X": 2.0}
    assert rs.source_of("scores", "X").endswith("local.d/levels.toml")
    assert rs.source_of("scores", "GTUBE").endswith("shipped/a.toml")
    (gt,) = rs.bindings
    assert gt.enabled is False


@pytest.mark.parametrize("text, key, problem", [
    ("[bogus]\na = 1\n", "bogus", "unknown table"),
    ('[check.x]\nfunction = "nope"\n', "check.x.function", "no registered check"),
    ('[check.x]\nfunction = "gtube"\nargs = { zone = "a" }\n', "check.x.args.zone",
     "takes no argument"),
    ('[check.x]\nfunction = "test.echo"\n', "check.x.args", "needs argument 'name'"),
    ('[symbol.Y]\ndescription = ""\n', "symbol.Y", "needs a description"),
    ('[scores]\nY = "high"\n', "scores.Y", "expected a number"),
    ('[forced]\nY = "explode"\n', "forced.Y", "unknown action"),
    ('[levels]\nspam_level = 3\n', "levels.spam_level", "unknown level"),
    ('[check.gt]\nfunction = "gtube"\n', "check.gt", "defined again"),
])
def test_rule_data_errors_name_file_and_key(tmp_path, text, key, problem):
    d = shipped(tmp_path)
    (d / "b.toml").write_text(text)
    with pytest.raises(RulesetError) as err:
        load(d)
    assert err.value.key == key
    assert problem in err.value.problem
    assert ".toml" in err.value.source  # file, or file:line


def test_shipped_rules_describe_and_score_every_core_symbol():
    rs = load(config.defaults().rules_dir)
    for name in ("sanity", "gtube"):
        for symbol in REGISTRY[name].symbols:
            assert rs.describe(symbol), f"{symbol} has no description"
            if not symbol.startswith("__"):
                assert symbol in rs.scores, f"{symbol} has no score"
