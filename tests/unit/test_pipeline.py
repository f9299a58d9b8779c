"""The pipeline: phases, per-check timeouts, errors as symbols, the whole-message deadline;
and the rule-data loader's layering."""

import asyncio
import time

import pytest

from filterd import config
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


# --- per-message overhead: plan cache, phase runner, sanity and banned fast paths ---------

@check("test.async_mark", phase=Phase.MAIN)
async def _async_mark(msg, ctx):
    ctx.notes.setdefault("order", []).append("async started")
    await asyncio.sleep(0.05)
    ctx.notes["order"].append("async done")
    return [Symbol("TEST_ASYNC")]


@check("test.sync_mark", phase=Phase.MAIN)
def _sync_mark(msg, ctx, *, name: str):
    ctx.notes.setdefault("order", []).append(name)
    return [Symbol(name)]


def test_plan_is_built_once_per_rule_set_and_follows_new_bindings():
    from filterd.pipeline import plan
    rs = ruleset_with(("echo", "test.echo", {"name": "A"}, None))
    first = plan(rs)
    assert plan(rs) is first
    assert [b.name for _, checks in first for b, _ in checks] == ["echo"]
    rs.bindings = [*rs.bindings, Binding("boom", "test.boom", {}, None, True, "(test)")]
    assert [b.name for _, checks in plan(rs) for b, _ in checks] == ["echo", "boom"]
    assert [b.name for _, checks in plan(rs, skip_network=True) for b, _ in checks] == [
        "echo", "boom"]


def test_async_checks_start_first_and_symbols_keep_binding_order():
    rs = ruleset_with(("one", "test.sync_mark", {"name": "TEST_ONE"}, None),
                      ("slow", "test.async_mark", {}, None),
                      ("two", "test.sync_mark", {"name": "TEST_TWO"}, None))
    settings = config.defaults()
    ctx = ScanContext(settings, rs)
    result = asyncio.run(scan(parse(b"Subject: x\n\nbody\n"), ctx))
    # the async check was running (its I/O in flight) before the sync checks of its phase
    assert ctx.notes["order"] == ["async started", "TEST_ONE", "TEST_TWO", "async done"]
    assert [s.name for s in result.symbols] == ["TEST_ONE", "TEST_ASYNC", "TEST_TWO"]
    assert result.failure is None


def test_sanity_header_line_length_and_8bit_limits():
    from filterd.checks.sanity import sanity

    def names(raw):
        return {s.name for s in sanity(parse(raw), None)}

    def message(value: bytes, after: bytes = b"") -> bytes:
        return (b"Date: Mon, 2 Jan 2023 10:00:00 +0000\r\nMessage-ID: <a@b>\r\nFrom: a@b.example"
                b"\r\nSubject: " + value + b"\r\n" + after + b"\r\n" + b"x" * 5000 + b"\r\n")

    prefix = len(b"Subject: ")
    assert "HEADER_LINE_TOO_LONG" not in names(message(b"y" * (998 - prefix)))
    assert "HEADER_LINE_TOO_LONG" in names(message(b"y" * (999 - prefix)))
    # a CRLF line's CR counts, as it did for the regex [^\n]{999,}: 998 + CR inside the block
    assert "HEADER_LINE_TOO_LONG" in names(message(b"y" * (998 - prefix), b"To: c@d.example\r\n"))
    assert "HEADER_LINE_TOO_LONG" not in names(message(b"y" * (997 - prefix),
                                                        b"To: c@d.example\r\n"))
    assert names(message(b"plain")) & {"HEADER_LINE_TOO_LONG", "HEADER_8BIT"} == set()
    assert "HEADER_8BIT" in names(message(b"caf\xc3\xa9"))
    assert "HEADER_8BIT" not in names(message(b"x") + b"caf\xc3\xa9 in the body\r\n")


def test_banned_check_leaves_the_loop_only_when_it_must():
    import io
    import zipfile

    from filterd.checks import banned

    def mail(attachment: bytes | None, name: str = "a.bin") -> bytes:
        import base64
        head = (b"From: a@b.example\r\nSubject: s\r\nContent-Type: multipart/mixed; "
                b"boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n")
        if attachment is not None:
            head += (b"--B\r\nContent-Type: application/octet-stream\r\nContent-Disposition: "
                     b"attachment; filename=\"" + name.encode() + b"\"\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\n"
                     + base64.encodebytes(attachment))
        return head + b"--B--\r\n"

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("invoice.exe", b"MZ" + b"\0" * 100)
    assert not banned.needs_worker(parse(mail(None)))
    assert not banned.needs_worker(parse(mail(b"%PDF-1.4 not an archive", "x.pdf")))
    assert banned.needs_worker(parse(mail(buf.getvalue(), "x.zip")))
    assert banned.needs_worker(parse(mail(None), content_limit=40))  # truncated view
    big = mail(b"\0" * (banned.INLINE_MAX_BYTES + 1))
    assert banned.needs_worker(parse(big))

    import tomllib
    shipped = tomllib.loads((config.defaults().rules_dir / "banned.toml").read_text())
    args = next(c["args"] for c in shipped["check"].values()
                if c.get("function") == "banned_files")

    async def run_check(raw):
        return await banned.banned_files(parse(raw), None, **args)

    inline = asyncio.run(run_check(mail(b"MZ" + b"\0" * 100, "invoice.pdf.exe")))
    assert [s.name for s in inline] == ["BANNED_DOUBLE_EXTENSION"]
    in_worker = asyncio.run(run_check(mail(buf.getvalue(), "x.zip")))
    assert [(s.name, s.options) for s in in_worker] == [
        ("BANNED_IN_ARCHIVE", ("x.zip/invoice.exe (extension)",))]


def test_banned_check_defaults_its_archive_limits():
    # a binding that names only the extensions gets the Limits defaults (slot descriptors
    # were passed to int() before)
    from filterd.checks import banned
    raw = (b"From: a@b.example\r\nSubject: s\r\nContent-Type: application/octet-stream; "
           b"name=\"setup.exe\"\r\nContent-Disposition: attachment; filename=\"setup.exe\"\r\n"
           b"\r\nMZ\r\n")
    found = asyncio.run(banned.banned_files(parse(raw), None, extensions=["exe"]))
    assert [(s.name, s.options) for s in found] == [("BANNED_EXTENSION", ("setup.exe",))]
