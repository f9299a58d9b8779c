"""The pattern rule engine: every rule kind, helpers, metas, errors, budgets, the three match
paths, exact Hyperscan translations and lazy excerpts."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from filterd.config import PROJECT_RULES
from filterd.message import parse
from filterd.pipeline import ScanContext
from filterd.ruleset import RulesetError, load
from filterd.ruleset import exact
from filterd.ruleset.check import meta, rules
from filterd.ruleset.engine import HAVE_HYPERSCAN, _python_flags
from filterd.ruleset.fit import make_settings

SETTINGS = make_settings()

MESSAGE = textwrap.dedent("""\
    Received: from mail.example.net (mail.example.net [192.0.2.7]) by mx.example.org
    Received: from [10.1.1.1] (unknown [198.51.100.9]) by mail.example.net
    From: "Billing Team" <billing123@example.net>
    Reply-To: Someone <someone@freemail.test>
    To: you@example.org
    Subject: =?utf-8?q?FREE_money_=E2=82=AC?=
    Date: Mon, 1 Jan 2007 10:00:00 +0000
    Message-ID: <abc@example.net>
    MIME-Version: 1.0
    Content-Type: multipart/alternative; boundary="b1"

    --b1
    Content-Type: text/plain; charset=utf-8

    Hello, please verify your account today.
    --b1
    Content-Type: text/html; charset=utf-8
    Content-Transfer-Encoding: quoted-printable

    <p>Click <a href=3D"http://192.0.2.55/login.php">www.bank.example</a> now</p>
    <font color=3D"#ffffff">hidden words</font>
    --b1--
    """).encode()


def make_rules(tmp_path: Path, body: str, *, site: dict[str, str] | None = None) -> Path:
    shipped = tmp_path / "shipped"
    shipped.mkdir(exist_ok=True)
    (shipped / "rules-engine.toml").write_text(
        (PROJECT_RULES / "rules-engine.toml").read_text())
    (shipped / "test.toml").write_text(textwrap.dedent(body))
    site_dir = tmp_path / "site"
    for name, text in (site or {}).items():
        path = site_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return shipped


def run(ruleset, raw: bytes = MESSAGE, preset: tuple[str, ...] = (), **settings_overrides):
    from filterd.policy import Symbol
    settings = SETTINGS.with_overrides(settings_overrides) if settings_overrides else SETTINGS
    view = parse(raw)
    ctx = ScanContext(settings=settings, ruleset=ruleset)
    ctx.symbols.extend(Symbol(n) for n in preset)
    ctx.symbols.extend(rules(view, ctx))
    ctx.symbols.extend(meta(view, ctx))
    return [s.name for s in ctx.symbols], ctx


def fired(tmp_path: Path, body: str, raw: bytes = MESSAGE, **overrides) -> list[str]:
    names, _ = run(load(make_rules(tmp_path, body)), raw, **overrides)
    return names


@pytest.mark.parametrize("mode", ["auto", "re"])
def test_each_kind_hits_and_misses(tmp_path: Path, mode: str) -> None:
    body = """
    [rule.H_SUBJ]
    kind = "header"
    header = "Subject"
    pattern = 'free money €'
    flags = "i"
    description = "decoded subject"
    [rule.H_SUBJ_RAW]
    kind = "header"
    header = "Subject:raw"
    pattern = '=\\?utf-8\\?q\\?'
    description = "raw subject"
    [rule.H_FROM_ADDR]
    kind = "header"
    header = "From:addr"
    pattern = '^billing\\d+@example\\.net$'
    description = "from address"
    [rule.H_FROM_NAME]
    kind = "header"
    header = "From:name"
    pattern = '^Billing Team$'
    description = "from name"
    [rule.H_ALL]
    kind = "header"
    header = "ALL"
    pattern = '(?m)^Reply-To: Someone'
    description = "all headers"
    [rule.H_RCVD_SECOND]
    kind = "header"
    header = "Received"
    pattern = '\\n from \\[10|\\nfrom \\[10'
    description = "second Received header is joined by a newline"
    [rule.H_EXISTS]
    kind = "header"
    header = "Reply-To"
    exists = true
    description = "exists"
    [rule.H_ABSENT]
    kind = "header"
    header = "X-Mailer"
    exists = false
    description = "absent"
    [rule.H_NEGATED]
    kind = "header"
    header = "To"
    pattern = 'nobody@'
    negate = true
    description = "negated"
    [rule.H_UNSET]
    kind = "header"
    header = "X-Missing"
    pattern = '^fallback$'
    if_unset = "fallback"
    description = "if_unset"
    [rule.H_MISS]
    kind = "header"
    header = "Subject"
    pattern = 'viagra'
    description = "no hit"
    [rule.MH_HTML]
    kind = "mimeheader"
    header = "Content-Type"
    pattern = '^text/html'
    description = "mime part header"
    [rule.B_SUBJECT_IN_BODY]
    kind = "body"
    pattern = 'FREE money'
    description = "subject is part of body"
    [rule.B_HTML_AS_TEXT]
    kind = "body"
    pattern = 'Click www\\.bank\\.example now'
    description = "html rendered as text"
    [rule.B_NO_TAGS]
    kind = "body"
    pattern = '<font'
    description = "body has no markup"
    [rule.RB_TAGS]
    kind = "rawbody"
    pattern = '<font color="#ffffff">'
    description = "rawbody keeps markup, decoded from QP"
    [rule.F_QP]
    kind = "full"
    pattern = 'href=3D"http'
    description = "full is the raw message"
    [rule.U_IP]
    kind = "uri"
    pattern = '^http://\\d+\\.\\d+\\.\\d+\\.\\d+/'
    description = "uri"
    [rule.U_MISS]
    kind = "uri"
    pattern = '^https://'
    description = "no https uri"
    """
    names = fired(tmp_path, body, **{"rules.engine": mode})
    expected = {"H_SUBJ", "H_SUBJ_RAW", "H_FROM_ADDR", "H_FROM_NAME", "H_ALL", "H_RCVD_SECOND",
                "H_EXISTS", "H_ABSENT", "H_NEGATED", "H_UNSET", "MH_HTML", "B_SUBJECT_IN_BODY",
                "B_HTML_AS_TEXT", "RB_TAGS", "F_QP", "U_IP"}
    assert set(names) == expected


def test_all_headers_leave_out_other_filters(tmp_path: Path) -> None:
    raw = b"X-Spam-Status: Yes, BAYES_99\nSubject: hi\n\nbody\n"
    body = """
    [rule.ALL_BAYES]
    kind = "header"
    header = "ALL"
    pattern = 'BAYES_99'
    description = "must not see X-Spam-Status"
    [rule.ALL_SUBJ]
    kind = "header"
    header = "ALL"
    pattern = 'Subject: hi'
    description = "sees the rest"
    """
    assert fired(tmp_path, body, raw) == ["ALL_SUBJ"]


def test_helpers_feed_metas_but_are_never_emitted(tmp_path: Path) -> None:
    body = """
    [rule.__H1]
    kind = "body"
    pattern = 'verify your account'
    [rule.__H2]
    kind = "uri"
    pattern = '\\.php$'
    [rule.__H3]
    kind = "body"
    pattern = 'not in this message'
    [rule.M_AND]
    kind = "meta"
    expression = "__H1 && __H2"
    description = "and"
    [rule.M_OR_NOT]
    kind = "meta"
    expression = "__H3 || !__H3"
    description = "always"
    [rule.M_SUM]
    kind = "meta"
    expression = "__H1 + __H2 + __H3 >= 2"
    description = "count"
    [rule.M_SUM_MISS]
    kind = "meta"
    expression = "__H1 + __H2 + __H3 >= 3"
    description = "count miss"
    [rule.M_OF_META]
    kind = "meta"
    expression = "M_AND and not M_SUM_MISS"
    description = "meta over metas, word operators"
    [rule.M_OTHER_CHECK]
    kind = "meta"
    expression = "M_AND && BAYES_99"
    description = "symbols of other checks count too"
    """
    ruleset = load(make_rules(tmp_path, body))
    names, ctx = run(ruleset)
    assert sorted(names) == ["M_AND", "M_OF_META", "M_OR_NOT", "M_SUM"]
    assert ctx.notes["rule_helpers"] == {"__H1", "__H2"}
    assert "verify your account" in ctx.notes["rule_matches"]["__H1"]
    names, _ = run(ruleset, preset=("BAYES_99",))
    assert "M_OTHER_CHECK" in names


@pytest.mark.parametrize("mode", ["auto", "prefilter", "re"])
def test_runaway_rule_yields_rule_error_and_scan_goes_on(tmp_path: Path, mode: str) -> None:
    # the lookahead in the middle keeps the rule out of Hyperscan's exact mode: its candidates
    # are confirmed with `regex`, which backtracks until the budget stops it
    body = """
    [rule.SLOW]
    kind = "body"
    pattern = '(?:a|aa)+(?=a)(?:a|aa)+(?=b)'
    timeout = 0.05
    description = "catastrophic backtracking"
    [rule.FINE]
    kind = "body"
    pattern = 'aaaa'
    description = "still runs"
    """
    raw = b"Subject: x\n\n" + b"a" * 4000 + b"c\n"
    names, _ = run(load(make_rules(tmp_path, body)), raw, **{"rules.engine": mode})
    assert "FINE" in names and "SLOW" not in names
    assert "RULE_ERROR" in names


def test_rule_error_symbol_carries_rule_and_reason(tmp_path: Path) -> None:
    body = """
    [rule.SLOW]
    kind = "body"
    pattern = '(?:a|aa)+(?=a)(?:a|aa)+(?=b)'
    timeout = 0.02
    description = "catastrophic"
    """
    ruleset = load(make_rules(tmp_path, body))
    view = parse(b"Subject: x\n\n" + b"a" * 4000 + b"c\n")
    ctx = ScanContext(settings=SETTINGS, ruleset=ruleset)
    out = rules(view, ctx)
    assert [(s.name, s.options[0]) for s in out] == [("RULE_ERROR", "SLOW")]
    assert "budget" in out[0].options[1]


@pytest.mark.parametrize("rule, field, problem", [
    ('kind = "body"\npattern = "(unclosed"\ndescription = "x"', "rule.BAD.pattern", "does not compile"),
    ('kind = "bodyy"\npattern = "x"\ndescription = "x"', "rule.BAD.kind", "expected one of"),
    ('kind = "body"\npattern = "x"\ncolour = "red"\ndescription = "x"', "rule.BAD.colour", "unknown field"),
    ('kind = "meta"\nexpression = "A &&"\ndescription = "x"', "rule.BAD.expression", "ends too early"),
    ('kind = "meta"\nexpression = "__import__(1)"\ndescription = "x"', "rule.BAD.expression", "unexpected"),
    ('kind = "header"\npattern = "x"\ndescription = "x"', "rule.BAD.header", "needs the header"),
    ('kind = "header"\nheader = "From:bogus"\npattern = "x"\ndescription = "x"', "rule.BAD.header", "unknown modifier"),
    ('kind = "uri"\npattern = "x"\nnegate = true\ndescription = "x"', "rule.BAD.negate", "cannot be negated"),
    ('kind = "body"\npattern = "x"\nflags = "iq"\ndescription = "x"', "rule.BAD.flags", "flags"),
    ('kind = "body"\npattern = "x"\ntimeout = -1\ndescription = "x"', "rule.BAD.timeout", "positive"),
])
def test_compile_errors_name_file_line_and_field(tmp_path: Path, rule: str, field: str,
                                                  problem: str) -> None:
    body = "# a comment\n\n[rule.GOOD]\nkind = \"body\"\npattern = \"ok\"\n\n[rule.BAD]\n" + rule + "\n"
    shipped = make_rules(tmp_path, body)
    with pytest.raises(RulesetError) as err:
        load(shipped)
    assert err.value.key == field
    assert problem in err.value.problem
    path, _, line = err.value.source.rpartition(":")
    assert path.endswith("test.toml") and int(line) >= 7


def test_meta_cycle_is_refused(tmp_path: Path) -> None:
    body = """
    [rule.A]
    kind = "meta"
    expression = "B || C"
    description = "a"
    [rule.B]
    kind = "meta"
    expression = "A"
    description = "b"
    """
    with pytest.raises(RulesetError) as err:
        load(make_rules(tmp_path, body))
    assert "cycle" in err.value.problem and ":" in err.value.source


def test_local_d_merges_and_override_d_replaces(tmp_path: Path) -> None:
    body = """
    [rule.R1]
    kind = "body"
    pattern = 'verify'
    description = "shipped"
    [rule.R2]
    kind = "body"
    pattern = 'verify'
    flags = "i"
    description = "shipped"
    [scores]
    R1 = 1.0
    R2 = 1.0
    """
    site = {
        "local.d/mine.toml": """
            [rule.R1]
            pattern = 'no such text'
            [scores]
            R2 = 3.5
            """,
        "override.d/mine.toml": """
            [rule.R2]
            kind = "body"
            pattern = 'Hello'
            description = "replaced"
            """,
    }
    shipped = make_rules(tmp_path, body, site=site)
    ruleset = load(shipped, tmp_path / "site")
    assert ruleset.rules["R1"]["description"] == "shipped"           # merged: kept
    assert ruleset.rules["R1"]["pattern"] == "no such text"           # merged: replaced field
    assert "flags" not in ruleset.rules["R2"]                         # replaced whole
    assert ruleset.scores["R2"] == 3.5
    assert ruleset.location_of("rule.R1.pattern").endswith("local.d/mine.toml:3")
    assert ruleset.location_of("rule.R1.description").endswith("shipped/test.toml:5")
    assert ruleset.location_of("rule.R2.pattern").endswith("override.d/mine.toml:4")
    names, _ = run(ruleset)
    assert names == ["R2"]


def test_default_rules_load_and_lint_clean() -> None:
    from filterd.ruleset.lint import lint
    ruleset = load(PROJECT_RULES, None)
    pattern_rules = [n for n, r in ruleset.engine.rules.items() if not r.helper]
    assert len(pattern_rules) >= 150
    errors = [str(p) for p in lint(ruleset) if p.severity == "error"]
    assert errors == []
    assert not ruleset.engine.fallback_rules   # every default rule is in the multi-pattern pass


def test_lint_finds_missing_scores_descriptions_references_duplicates(tmp_path: Path) -> None:
    from filterd.ruleset.lint import lint
    body = """
    [rule.NO_SCORE]
    kind = "body"
    pattern = 'x'
    description = "has no score"
    [rule.NO_DESC]
    kind = "body"
    pattern = 'x'
    [rule.BAD_REF]
    kind = "meta"
    expression = "NO_SCORE && TYPO_SYMBOL"
    description = "refers to a typo"
    [rule.FOREIGN]
    kind = "header"
    header = "X-Spam-Status"
    pattern = 'Yes'
    description = "keys on another filter"
    [scores]
    NO_DESC = 1.0
    BAD_REF = 1.0
    FOREIGN = 1.0
    __HELPER = 1.0
    """
    site = {"local.d/a.toml": "[scores]\nNO_DESC = 2.0\n", "local.d/b.toml": "[scores]\nNO_DESC = 3.0\n"}
    ruleset = load(make_rules(tmp_path, body, site=site), tmp_path / "site")
    problems = {(p.key, p.problem.split(" ")[0]) for p in lint(ruleset) if p.severity == "error"}
    assert ("scores.NO_SCORE", "no") in problems
    assert ("rule.NO_DESC.description", "a") in problems
    assert ("rule.BAD_REF.expression", "refers") in problems
    assert ("rule.FOREIGN.header", "x-spam-status") in problems
    assert ("scores.__HELPER", "helper") in problems
    assert ("scores.NO_DESC", "also") in problems


def test_excerpt_is_short_and_single_line(tmp_path: Path) -> None:
    body = """
    [rule.LONG]
    kind = "rawbody"
    pattern = '(?s)<p>.*</font>'
    description = "long match"
    """
    _, ctx = run(load(make_rules(tmp_path, body)))
    excerpt = ctx.notes["rule_matches"]["LONG"]
    assert "\n" not in excerpt and len(excerpt) <= 82 and excerpt.startswith("<p>Click")


# --- exact Hyperscan translations (filterd.ruleset.exact) -------------------------------------
hyperscan_only = pytest.mark.skipif(not HAVE_HYPERSCAN, reason="hyperscan not installed")


def test_fold_extras_are_every_non_ascii_character_matching_an_ascii_letter() -> None:
    # the table exact.py relies on, checked over all of Unicode with the `regex` module itself
    import regex
    everything = exact._non_ascii_text()
    found: dict[str, str] = {}
    for point in range(128):
        for char in regex.findall(f"(?i)\\x{point:02x}", everything):
            found[chr(point)] = found.get(chr(point), "") + char
    assert found == exact.ASCII_FOLD_EXTRAS
    # and no other non-ASCII character matches any ASCII-only class
    assert set(regex.findall(r"(?i)[\x00-\x7f]", everything)) == \
        set(exact.ASCII_FOLD_EXTRAS.values())


@pytest.mark.parametrize("pattern, flags, ascii_exact, unicode_exact", [
    (r"viagra", "i", True, True),
    (r"^Subject: \d{1,3}\s+off$", "m", True, True),
    (r"\bfree\b", "", True, False),                 # Unicode \b: ASCII texts only
    (r"\w+@\w+", "", True, False),
    (r"caf[ée]", "i", True, False),                 # non-ASCII letter under i
    (r"caf[ée]", "", True, True),
    (r"(?<![:\d])\d{1,2}:\d{2}", "", True, True),   # one-character lookbehind at the start
    (r"x(?!y)", "", True, True),                    # one-character lookahead at the end
    (r"x(?=a)y", "", False, False),                 # a lookahead elsewhere
    (r"(a)\1", "", False, False),                   # backreference
    (r"a++b", "", False, False),                    # possessive
    (r"(?>a+)b", "", False, False),                 # atomic group
    (r"x\By", "", False, False),
    (r"(?m)^$", "", False, False),                  # ^ may be checked at the very end
    (r"(?m)^a", "", True, True),
    (r"(?:\$\d[^$]{0,400}){6}", "", False, False),  # nested repeats weigh 2,400
    (r"[[:alpha:]]", "", False, False),             # POSIX class: re reads it otherwise
    (r"[^a-z[:punct:]]x", "", False, False),        # ... even where re does not warn
])
def test_translate_decides_per_pattern(pattern: str, flags: str, ascii_exact: bool,
                                       unicode_exact: bool) -> None:
    tr = exact.translate(pattern, flags)
    assert (tr.ascii is not None) == ascii_exact, tr
    assert (tr.unicode is not None) == unicode_exact, tr


def _hs_search(expression: str, text: str, *, utf8: bool = True) -> bool | None:
    """Whether Hyperscan finds the exact expression in text; None if it refuses to compile."""
    import hyperscan

    from filterd.ruleset.engine import _hs_compile, _hs_flags
    try:
        db = _hs_compile([expression.encode("utf-8")], [_hs_flags("", exact=True, utf8=utf8)])
    except hyperscan.error:
        return None
    found: list[int] = []
    db.scan(text.encode("utf-8"), match_event_handler=lambda i, *_: found.append(i),
            scratch=hyperscan.Scratch(db))
    return bool(found)


ATOMS = ["a", "k", "s", "i", "K", "S", "I", "x", "é", "É", "\u212a", "\u017f", " ", r"\n", r"\.",
         "[a-z]", "[^a]", r"[^\n]", r"\d", r"\D", r"\s", r"\S", r"\w", r"\W", ".", "[ks]",
         "[0-9]", "[é-ü]", "[^é]", "^", "$", r"\A", r"\Z", r"\b"]
TEXT_ALPHABET = list("aksixKSIX\u212a\u017f\u0130\u0131éÉ \n.09\u0663\u00a0_-\U0001f600")


def _patterns() -> st.SearchStrategy[str]:
    def grow(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.lists(inner, min_size=2, max_size=4).map("".join),
            st.tuples(inner, inner).map(lambda p: f"(?:{p[0]}|{p[1]})"),
            st.tuples(inner, st.sampled_from(["*", "+", "?", "{1,3}", "{2}", "*?", "{0,2}?"]))
            .map(lambda p: f"(?:{p[0]}){p[1]}"),
            st.tuples(st.sampled_from(["(?<![a-z])", "(?<=\\d)", "(?<!\\s)", ""]), inner,
                      st.sampled_from(["(?=\\d)", "(?![k.])", "(?!\\w)", ""]))
            .map("".join))
    return st.recursive(st.sampled_from(ATOMS), grow, max_leaves=8)


@hyperscan_only
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=_patterns(), flags=st.sampled_from(["", "i", "s", "m", "im", "is", "ims"]),
       texts=st.lists(st.text(alphabet=TEXT_ALPHABET, max_size=10), min_size=1, max_size=12))
def test_exact_translation_matches_like_regex(pattern: str, flags: str, texts: list[str]) -> None:
    import regex
    try:
        compiled = regex.compile(pattern, _python_flags(flags))
    except regex.error:
        return
    tr = exact.translate(pattern, flags)
    for text in texts:
        expected = compiled.search(text) is not None
        if tr.unicode is not None:
            got = _hs_search(tr.unicode, text)
            assert got in (None, expected), (pattern, flags, text, tr.unicode)
        ascii_text = text.encode("ascii", "ignore").decode()
        expected_ascii = compiled.search(ascii_text) is not None
        if tr.ascii is not None:
            got = _hs_search(tr.ascii, ascii_text, utf8=False)
            assert got in (None, expected_ascii), (pattern, flags, ascii_text, tr.ascii)
        elif tr.ascii_never:
            assert not expected_ascii, (pattern, flags, ascii_text)


# --- lazy excerpts and the three match paths -----------------------------------------------------
def test_exact_hits_search_their_excerpt_only_when_read(tmp_path: Path) -> None:
    body = """
    [rule.B_VERIFY]
    kind = "body"
    pattern = 'verify your account'
    description = "exact in Hyperscan"
    """
    ruleset = load(make_rules(tmp_path, body))
    view = parse(MESSAGE)
    result = ruleset.engine.match(view, mode="auto")
    assert "B_VERIFY" in result.hits
    if HAVE_HYPERSCAN:
        assert ruleset.engine.exact_rules["B_VERIFY"] == "all texts"
        assert not isinstance(result.hits._entries["B_VERIFY"], str)   # nothing searched yet
    assert result.hits["B_VERIFY"] == ruleset.engine.match(view, mode="re").hits["B_VERIFY"]
    assert isinstance(result.hits._entries["B_VERIFY"], str)             # searched once, kept


@hyperscan_only
def test_all_three_paths_give_the_same_hits_and_excerpts(corpora_dir: Path) -> None:
    ruleset = load(PROJECT_RULES, None)
    files = sorted(p for p in corpora_dir.glob("*/*/*") if p.is_file())[::401]
    assert len(files) > 25
    for path in files:
        raw = path.read_bytes()
        results = {mode: ruleset.engine.match(parse(raw), mode=mode, rule_timeout=5.0)
                   for mode in ("auto", "prefilter", "re")}
        plain = dict(results["re"].hits.items())
        for mode in ("auto", "prefilter"):
            assert list(results[mode].hits) == list(plain), (path, mode)
            assert dict(results[mode].hits.items()) == plain, (path, mode)
            assert not results[mode].errors, (path, mode)


def _imported_spamassassin_rules(tmp_path: Path):
    """The stock SpamAssassin rules through `filterd rules import-sa`, on top of the shipped set."""
    from filterd.ruleset import sa_import
    sa_dir = Path("/usr/share/spamassassin")
    if not sa_dir.is_dir():
        pytest.skip(f"{sa_dir} not found")
    result = sa_import.import_files(sorted(Path("/etc/spamassassin").glob("*.pre"))
                                    + sorted(sa_dir.glob("*.cf")))
    site = tmp_path / "site"
    (site / "local.d").mkdir(parents=True)
    (site / "local.d" / "sa.toml").write_text(sa_import.to_toml(result))
    return load(PROJECT_RULES, site)


@pytest.mark.slow
@hyperscan_only
def test_imported_spamassassin_rules_same_hits_on_every_corpus_message(corpora_dir: Path,
                                                                      tmp_path: Path) -> None:
    import os
    engine = _imported_spamassassin_rules(tmp_path).engine
    assert len(engine.exact_rules) > 500
    every = int(os.environ.get("FILTERD_TEST_EVERY", "1"))     # a quicker look: every Nth
    for path in sorted(p for p in corpora_dir.glob("*/*/*") if p.is_file())[::every]:
        raw = path.read_bytes()
        auto = engine.match(parse(raw), mode="auto", rule_timeout=5.0)
        plain = engine.match(parse(raw), mode="re", rule_timeout=5.0)
        assert list(auto.hits) == list(plain.hits), path
        assert not auto.errors and not plain.errors, path


@pytest.mark.parametrize("mode", ["auto", "prefilter", "re"])
def test_posix_class_matches_unicode_punctuation_in_every_mode(tmp_path: Path, mode: str) -> None:
    # the regex module's [:punct:] is Unicode (full-width parentheses), Hyperscan's ASCII: the
    # prefilter must still let the candidate through (a SpamAssassin __FROM_FULL_NAME miss)
    raw = ("From: =?utf-8?b?" + __import__("base64").b64encode("陈建国（经理）".encode()).decode()
           + "?= <a@example.com>\nTo: b@example.org\nSubject: s\n\nbody\n").encode()
    body = """\
        [rule.NAME_PUNCT]
        kind = "header"
        header = "From:name"
        pattern = '^[^a-z[:punct:][:cntrl:]\\d\\s][^[:punct:][:cntrl:]\\d\\s]*[[:punct:]\\s]+[^a-z[:punct:][:cntrl:]\\d\\s]'
        description = "full name then punctuation"
        """
    (tmp_path / "m").mkdir()
    assert "NAME_PUNCT" in fired(tmp_path / "m", body, raw, **{"rules.engine": mode})
