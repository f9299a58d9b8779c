"""SpamAssassin .cf import: rule kinds, Perl regex, pseudo-headers, local eval: tests, reporting."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from filterd.checks import sa_evals
from filterd.message import parse
from filterd.ruleset import load
from filterd.ruleset import sa_import
from filterd.ruleset.engine import pseudo_header, relays

CF = textwrap.dedent(r"""
    header   LOC_SUBJ_FREE   Subject =~ /\bfree\b/i
    describe LOC_SUBJ_FREE   Subject says free
    score    LOC_SUBJ_FREE   1.5 2.0
    body     LOC_BODY_WIN    m{you\s+won\z}i
    header   LOC_EXT_DYN     X-Spam-Relays-External =~ /^\[ ip=\S+ rdns=\S*dyn/
    header   LOC_NO_RDNS     X-Spam-Relays-Untrusted =~ /^\[ ip=\S+ rdns= /
    header   LOC_TOCC        ToCc =~ /carol\@example\.org/
    header   LOC_ENVFROM     EnvelopeFrom =~ /bounce\@lists\.example/
    header   LOC_MSGID       MESSAGEID =~ /\$/
    header   LOC_REAL_MSGID  exists:MessageID
    header   LOC_ALL_TRUSTED eval:check_all_trusted()
    freemail_domains freemail.example *.webmail.example
    header   LOC_FREEMAIL    eval:check_freemail_from()
    body     LOC_CENTER      eval:html_tag_exists('center')
    body     LOC_HTML_ONLY   eval:check_for_mime_html_only()
    header   LOC_RBL         eval:check_rbl_txt('zen', 'zen.example.')
    meta     LOC_META        LOC_SUBJ_FREE && LOC_BODY_WIN
    meta     LOC_META_LOST   LOC_RBL || LOC_SUBJ_FREE
    ifplugin Mail::SpamAssassin::Plugin::Nothing
    body     LOC_IN_PLUGIN   /plugin block/
    endif
""")

MESSAGE = (b"Received: from mx.local (mx.local [127.0.0.1]) by inbox.local with ESMTP id AA1\n"
           b"Received: from helo.example (host-1-2-3-4.dyn.example [1.2.3.4])"
           b" by mx.local with ESMTP id BB2; Mon, 1 Jan 2024 00:00:00 +0000\n"
           b"Received: from origin.example ([5.6.7.8]) by host-1-2-3-4.dyn.example"
           b" with SMTP id CC3\n"
           b"Return-Path: <bounce@lists.example>\n"
           b"From: Alice <alice@mail.webmail.example>\n"
           b"To: bob@example.net\nCc: carol@example.org\n"
           b"Subject: free stuff\nMessage-ID: <0a1$2b@host>\n"
           b"Content-Type: text/html\n\n<html><center>and you won</center></html>\n")


@pytest.fixture
def imported(tmp_path: Path):
    cf = tmp_path / "local.cf"
    cf.write_text(CF)
    return sa_import.import_files([cf])


def test_kinds_scores_descriptions_and_perl_regex(imported):
    rules = imported.rules
    assert rules["LOC_SUBJ_FREE"]["pattern"] == r"\bfree\b" and rules["LOC_SUBJ_FREE"]["flags"] == "i"
    assert imported.scores["LOC_SUBJ_FREE"] == 1.5          # the first score set
    assert rules["LOC_SUBJ_FREE"]["description"] == "Subject says free"
    assert rules["LOC_BODY_WIN"]["pattern"] == r"you\s+won\Z"
    # a body pattern with a space runs on SpamAssassin's body lines (sa_evals)
    assert imported.local_evals["LOC_IN_PLUGIN"] == ["body", "plugin block", ""]
    assert rules["LOC_META"]["expression"] == "LOC_SUBJ_FREE && LOC_BODY_WIN"


def test_untranslated_rules_are_reported_by_name_and_reason(imported):
    skipped = {s.name: s.reason for s in imported.skipped}
    assert "check_rbl" in skipped["LOC_RBL"]
    assert "LOC_RBL" in skipped["LOC_META_LOST"]
    assert "LOC_RBL" not in imported.rules and "LOC_META_LOST" not in imported.rules
    assert "translated 14 of 16 rules" in sa_import.summary(imported)


def test_relay_pseudo_headers_follow_the_trust_path():
    view = parse(MESSAGE)
    trusted, untrusted = relays(view)
    assert len(trusted) == 1 and trusted[0].startswith("[ ip=127.0.0.1 rdns=mx.local ")
    assert "intl=1 id=AA1" in trusted[0]
    assert untrusted[0].startswith("[ ip=1.2.3.4 rdns=host-1-2-3-4.dyn.example helo=helo.example"
                                   " by=mx.local ")
    assert untrusted[1].startswith("[ ip=5.6.7.8 rdns= helo=origin.example")
    assert pseudo_header(view, "X-Spam-Relays-External") == " ".join(untrusted)
    assert pseudo_header(view, "X-Spam-Relays-Internal") == " ".join(trusted)
    assert pseudo_header(view, "ToCc") == "bob@example.net, carol@example.org"
    assert pseudo_header(view, "EnvelopeFrom") == "<bounce@lists.example>"
    assert pseudo_header(view, "MESSAGEID") == "<0a1$2b@host>"


def test_a_forged_pseudo_header_in_the_message_is_not_read():
    view = parse(b"X-Spam-Relays-External: [ ip=9.9.9.9 rdns=dyn ]\nSubject: x\n\nbody\n")
    assert pseudo_header(view, "X-Spam-Relays-External") is None


def test_imported_rules_fire_in_the_engine(imported, tmp_path: Path, base_rules: Path):
    site = tmp_path / "site"
    (site / "local.d").mkdir(parents=True)
    (site / "local.d" / "sa.toml").write_text(sa_import.to_toml(imported))
    ruleset = load(base_rules, site)
    engine = ruleset.engine
    result = engine.match(parse(MESSAGE))
    # rules on the relay pseudo-headers run in filterd.checks.sa_evals (SpamAssassin's inferred
    # trust boundary), not in the engine
    evals = sa_evals.evaluate(parse(MESSAGE), imported.local_evals, imported.addr_lists,
                              imported.freemail_domains)
    fired = set(result.hits) | set(evals)
    for name in ("LOC_SUBJ_FREE", "LOC_BODY_WIN", "LOC_EXT_DYN", "LOC_TOCC", "LOC_ENVFROM",
                 "LOC_MSGID", "LOC_FREEMAIL", "LOC_CENTER"):
        assert name in fired, name
    assert "LOC_EXT_DYN" not in result.hits
    assert "LOC_NO_RDNS" not in fired            # the first untrusted relay has a name
    assert "LOC_REAL_MSGID" not in fired         # a real header "MessageID", not MESSAGEID
    metas, _errors = engine.evaluate_metas({n: 1.0 for n in fired})
    assert "LOC_META" in metas and "LOC_HTML_ONLY" in metas
    assert "LOC_ALL_TRUSTED" not in metas         # there are untrusted relays
    # private and loopback hops are trusted when SpamAssassin infers the boundary
    only_local = parse(b"Received: from a (a [10.1.2.3]) by b with SMTP id X\n"
                       b"Subject: hi\n\nhello\n")
    hits = set(engine.match(only_local).hits) | set(
        sa_evals.evaluate(only_local, imported.local_evals))
    metas, _ = engine.evaluate_metas({n: 1.0 for n in hits})
    assert "LOC_ALL_TRUSTED" in metas and "LOC_NO_RDNS" not in hits


REPLACE_CF = textwrap.dedent(r"""
    replace_tag    M    (?:[mM]|\|\\\/\|)
    replace_tag    O    [oO0]
    replace_tag    N    [nN]
    replace_tag    Y    [yY]
    replace_tag    MONEY  <M><O><N>
    replace_inter  W1   \W?
    replace_post   P2   {1,2}
    body   LOC_FUZZY_MONEY   /<inter W1><post P2>\b<M><O><N><E><Y>\b/i
    body   LOC_LITERAL_TAGS  /<M><O>/
    body   LOC_NESTED        /\b<MONEY>ey\b/
    body   LOC_BAD_INTER     /<inter NOPE><M><O>/
    replace_tag    E    [eE3]
    replace_rules  LOC_FUZZY_MONEY LOC_NESTED LOC_BAD_INTER
    meta   LOC_UNDEFINED_DEP LOC_NESTED && !__NO_FILE_DEFINES_THIS
    meta   LOC_UNTRANSLATED_DEP LOC_NESTED && !LOC_BAD_INTER
""")


def test_replace_tags_expand_only_listed_rules_with_their_pieces(tmp_path: Path):
    cf = tmp_path / "replace.cf"
    cf.write_text(REPLACE_CF)
    result = sa_import.import_files([cf])
    import regex
    # ReplaceTags body rules run over SpamAssassin's body lines (filterd.checks.sa_evals)
    assert result.local_evals["LOC_FUZZY_MONEY"][0] == "body"
    fuzzy = regex.compile(result.local_evals["LOC_FUZZY_MONEY"][1], regex.I)
    assert fuzzy.search("get M.0.N.E.Y now") and fuzzy.search("mmoneyy")
    assert fuzzy.search("send m0n3y") and not fuzzy.search("honey")
    # not in replace_rules: tags stay literal, as in SpamAssassin
    assert result.rules["LOC_LITERAL_TAGS"]["pattern"] == "<M><O>"
    nested = regex.compile(result.local_evals["LOC_NESTED"][1])
    assert nested.search("M0ney") and not nested.search("Mmoney")
    bad = {s.name: s.reason for s in result.skipped}
    assert "inter NOPE is not defined" in bad["LOC_BAD_INTER"]
    # a meta name no file defines is read as 0 (SpamAssassin's "undefined dependency"), and
    # the translation says so; a rule that exists but was not translated still blocks the meta
    assert result.rules["LOC_UNDEFINED_DEP"]["expression"] == "LOC_NESTED && !0"
    assert "__NO_FILE_DEFINES_THIS" in result.rules["LOC_UNDEFINED_DEP"]["origin"]
    assert "LOC_BAD_INTER" in bad["LOC_UNTRANSLATED_DEP"]


def test_replace_tags_rule_fires_over_spamassassin_body_lines(tmp_path: Path, base_rules: Path):
    cf = tmp_path / "replace.cf"
    cf.write_text(REPLACE_CF)
    result = sa_import.import_files([cf])
    site = tmp_path / "site"
    (site / "local.d").mkdir(parents=True)
    (site / "local.d" / "sa.toml").write_text(sa_import.to_toml(result))
    engine = load(base_rules, site).engine
    view = parse(b"Subject: hi\n\nsend M0N3Y today, M0ney\n")
    hits = set(engine.match(view).hits) | set(sa_evals.evaluate(view, result.local_evals))
    assert "LOC_FUZZY_MONEY" in hits and "LOC_NESTED" in hits
    metas, errors = engine.evaluate_metas({n: 1.0 for n in hits})
    assert "LOC_UNDEFINED_DEP" in metas and not errors


PLUGIN_CF = textwrap.dedent(r"""
    loadplugin Mail::SpamAssassin::Plugin::Loaded
    ifplugin Mail::SpamAssassin::Plugin::Loaded
    body LOC_IN_LOADED /loaded/
    endif
    ifplugin Mail::SpamAssassin::Plugin::NotLoaded
    body LOC_IN_NOT_LOADED /not loaded/
    endif
    if can(Mail::SpamAssassin::Plugin::NotLoaded::has_feature)
    body LOC_CAN /can/
    endif
    if !can(Mail::SpamAssassin::Plugin::NotLoaded::has_feature)
    body LOC_CANNOT /cannot/
    endif
    if (version >= 4.000000)
    body LOC_VERSION /version/
    endif
    rawbody LOC_QP eval:check_for_mime('mime_qp_count')
    rawbody LOC_B64 eval:check_for_mime('mime_base64_count')
    rawbody LOC_QP_LONG eval:check_for_mime('mime_qp_long_line')
""")


def test_loadplugin_lines_decide_plugin_blocks_and_mime_encoding_evals(tmp_path: Path,
                                                                      base_rules: Path):
    cf = tmp_path / "plugins.cf"
    cf.write_text(PLUGIN_CF)
    result = sa_import.import_files([cf])
    assert {"LOC_IN_LOADED", "LOC_CANNOT", "LOC_VERSION"} <= set(result.rules)
    assert not {"LOC_IN_NOT_LOADED", "LOC_CAN"} & (set(result.rules) | set(result.local_evals))
    # without loadplugin lines every ifplugin block is read and `if` is true unless negated
    cf.write_text(PLUGIN_CF.replace("loadplugin", "# loadplugin"))
    result = sa_import.import_files([cf])
    assert {"LOC_IN_LOADED", "LOC_CAN"} <= set(result.rules)
    assert result.local_evals["LOC_IN_NOT_LOADED"][0] == "body"    # /not loaded/: a space
    assert "LOC_CANNOT" not in result.rules
    reasons = {s.name: s.reason for s in result.skipped}
    assert "check_for_mime" in reasons["LOC_QP_LONG"]
    site = tmp_path / "site"
    (site / "local.d").mkdir(parents=True)
    (site / "local.d" / "sa.toml").write_text(sa_import.to_toml(result))
    engine = load(base_rules, site).engine
    qp = (b"Subject: x\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
          b"Content-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n\nhi=3D\n--b--\n")
    hits = engine.match(parse(qp)).hits
    assert "LOC_QP" in hits and "LOC_B64" not in hits
    assert "LOC_QP" not in engine.match(parse(b"Subject: x\n\nplain\n")).hits


DNS_CF = textwrap.dedent(r"""
    header __LOC_IN_ZEN   eval:check_rbl('zen', 'zen.example.')
    header LOC_SBL        eval:check_rbl_sub('zen', '127.0.0.2')
    header LOC_XBL        eval:check_rbl('zen-lastexternal', 'zen.example.', '^127\.0\.0\.[45]$')
    header LOC_PBL        eval:check_rbl_sub('zen-lastexternal', '^127\.0\.0\.1[01]$')
    header LOC_MAPS       eval:check_rbl_sub('zen', '8')
    header LOC_NO_SET     eval:check_rbl_sub('nowhere', '127.0.0.2')
    header LOC_TXT        eval:check_rbl_txt('sc', 'bl.example.', '(?i:x)')
    urirhssub  LOC_URI_BLACK   multi.uri.example.   A   2
    urirhssub  LOC_URI_DBL     dbl.example.         A   127.0.1.2
    uridnsbl   LOC_URI_NS      sbl.example.         A
    uridnsbl_skip_domain  example.com example.net
    body   LOC_URI_BLACK   eval:check_uridnsbl('LOC_URI_BLACK')
    body   LOC_URI_DBL     eval:check_uridnsbl('LOC_URI_DBL')
    body   LOC_URI_NS      eval:check_uridnsbl('LOC_URI_NS')
    score  LOC_SBL   0 2.5 0 2.0
    score  LOC_URI_BLACK   0 1.7
    meta   LOC_NET_META    LOC_SBL || LOC_URI_BLACK
    meta   LOC_NET_LOST    LOC_TXT && __LOC_IN_ZEN
""")


def test_dns_list_tests_become_dnsbl_bindings(tmp_path: Path, base_rules: Path):
    from filterd.checks.dnsbl import interpret
    cf = tmp_path / "dns.cf"
    cf.write_text(DNS_CF)
    result = sa_import.import_files([cf])
    skipped = {s.name: s.reason for s in result.skipped}
    assert "TXT" in skipped["LOC_TXT"] and "nowhere" in skipped["LOC_NO_SET"]
    assert "name servers" in skipped["LOC_URI_NS"] and "LOC_TXT" in skipped["LOC_NET_LOST"]
    assert "LOC_NET_META" in result.rules            # its names are emitted by checks
    # the network score set, not set 0 (where SpamAssassin scores network tests 0)
    assert result.scores["LOC_SBL"] == 2.5 and result.scores["LOC_URI_BLACK"] == 1.7
    assert "__LOC_IN_ZEN" not in result.scores
    assert "translated 8 of 12 rules" in sa_import.summary(result)

    def fired(name: str, answer: str) -> set[str]:
        args = result.checks[result.check_symbols[name]]["args"]
        return {s.name for s in interpret([answer], zone=args["zone"], queried="x",
                                          codes=args["codes"], match=args["match"],
                                          blocked_codes=(), symbol=args.get("symbol"))}

    assert fired("__LOC_IN_ZEN", "127.0.0.11") == {"__LOC_IN_ZEN"}   # any answer
    assert fired("LOC_SBL", "127.0.0.2") == {"LOC_SBL"} and not fired("LOC_SBL", "127.0.0.20")
    assert fired("LOC_XBL", "127.0.0.5") == {"LOC_XBL"} and not fired("LOC_XBL", "127.0.0.6")
    assert fired("LOC_PBL", "127.0.0.10") == {"LOC_PBL"}
    assert fired("LOC_MAPS", "127.0.0.9") == {"LOC_MAPS"}             # bit 8 of the answer
    assert fired("LOC_URI_BLACK", "127.0.0.6") == {"LOC_URI_BLACK"}
    # XBL and PBL codes do not collide: one binding, one query per relay
    assert result.check_symbols["LOC_XBL"] == result.check_symbols["LOC_PBL"]
    xbl = result.checks[result.check_symbols["LOC_XBL"]]
    assert xbl["function"] == "dnsbl.ip" and xbl["args"]["relays"] == "last"
    assert result.checks[result.check_symbols["LOC_SBL"]]["args"]["relays"] == "untrusted"
    uri = result.checks[result.check_symbols["LOC_URI_DBL"]]
    assert uri["function"] == "dnsbl.domain" and uri["args"]["senders"] is False
    assert uri["args"]["skip"] == ["example.com", "example.net"]

    site = tmp_path / "site"
    (site / "local.d").mkdir(parents=True)
    (site / "local.d" / "sa.toml").write_text(sa_import.to_toml(result))
    ruleset = load(base_rules, site)               # validates the bindings' arguments
    from filterd.ruleset.lint import lint
    errors = [p for p in lint(ruleset) if p.severity == "error"]
    assert not errors, errors
    binding = {b.name: b for b in ruleset.bindings}[result.check_symbols["LOC_SBL"]]
    assert binding.function == "dnsbl.ip" and binding.args["zone"] == "zen.example"
    assert ruleset.scores["LOC_SBL"] == 2.5 and "LOC_SBL" in ruleset.symbols
    metas, _ = ruleset.engine.evaluate_metas({"LOC_URI_BLACK": 1.0})
    assert "LOC_NET_META" in metas


def test_metas_comparing_an_eval_count_are_reported_not_read_as_a_flag(tmp_path: Path):
    cf = tmp_path / "count.cf"
    cf.write_text(textwrap.dedent("""
        rawbody __LOC_QPC        eval:check_for_mime('mime_qp_count')
        meta    __LOC_QP_SHORT   (__LOC_QPC > 0) && (__LOC_QPC < 64)
        meta    LOC_QP_ANY       __LOC_QPC && !__LOC_QP_SHORT
        meta    LOC_QP_PLAIN     __LOC_QPC
    """))
    result = sa_import.import_files([cf])
    skipped = {s.name: s.reason for s in result.skipped}
    # SpamAssassin's value is the count; filterd's rule only says it fired (1)
    assert "compares the count" in skipped["__LOC_QP_SHORT"]
    assert "__LOC_QP_SHORT" in skipped["LOC_QP_ANY"]
    assert "LOC_QP_PLAIN" in result.rules and "__LOC_QPC" in result.rules


def test_if_conditions_follow_plugins_features_and_version():
    loaded = {"Mail::SpamAssassin::Plugin::DKIM"}
    cond = sa_import._condition
    assert cond("if", "!(!plugin(Mail::SpamAssassin::Plugin::DKIM))", loaded)
    assert not cond("if", "!plugin(Mail::SpamAssassin::Plugin::DKIM)", loaded)
    assert not cond("if", "plugin(Mail::SpamAssassin::Plugin::SPF)", loaded)
    assert cond("if", "can(Mail::SpamAssassin::Conf::feature_bug6558_free)", loaded)
    assert cond("if", "!can(Mail::SpamAssassin::Conf::compat_welcomelist_blocklist)", loaded)
    assert cond("if", "can(Mail::SpamAssassin::Plugin::DKIM::has_arc)", loaded)
    assert not cond("if", "can(Mail::SpamAssassin::Plugin::ASN::has_check_asn)", loaded)
    assert cond("if", "(version >= 3.004002)", loaded)
    assert not cond("if", "!((version >= 3.004000))", loaded)
    assert not cond("if", "(version < 4.000000) && plugin(x)", loaded)
    assert not cond("if", "some_unknown_thing; system('x')", loaded)     # unreadable: false
    assert cond("if", "plugin(Mail::SpamAssassin::Plugin::SPF)", set())   # no .pre: all loaded


def test_utf8_byte_sequences_become_the_characters_they_encode(tmp_path: Path):
    convert = sa_import.utf8_bytes_as_characters
    assert convert(r"(?:[cC]|[\xc3][\x87\xa7]|[\xe1](?:[\xb8][\x88\x89]))") == \
        "(?:[cC]|[\u00c7\u00e7]|[\u1e08\u1e09])"
    assert convert(r"[\xc7\xe7]x") == r"[\xc7\xe7]x"         # Latin-1 classes stay
    assert convert(r"\[\xc3][\xa0]") == r"\[\xc3][\xa0]"     # escaped: not a class
    cf = tmp_path / "tags.cf"
    cf.write_text(textwrap.dedent(r"""
        replace_tag   A   (?:[aA]|[\xc3][\xa0-\xa5])
        body   LOC_FUZZY_CAT   /c<A>t/
        replace_rules LOC_FUZZY_CAT
    """))
    result = sa_import.import_files([cf])
    site = tmp_path / "site"
    (site / "local.d").mkdir(parents=True)
    (site / "local.d" / "sa.toml").write_text(sa_import.to_toml(result))
    assert result.local_evals["LOC_FUZZY_CAT"][0] == "body"
    view = parse("Subject: s\n\nthe c\u00e2t\n".encode())
    assert sa_evals.evaluate(view, result.local_evals) == ["LOC_FUZZY_CAT"]
    assert sa_evals.evaluate(parse(b"Subject: s\n\nthe cot\n"), result.local_evals) == []


def test_spf_and_dkim_tests_read_filterds_auth_symbols(tmp_path: Path, base_rules: Path):
    cf = tmp_path / "auth.cf"
    cf.write_text(textwrap.dedent(r"""
        header SPF_PASS        eval:check_for_spf_pass()
        score  SPF_PASS        -0.001
        full   DKIM_VERIFIED   eval:check_dkim_valid()
        header LOC_SUBJ        Subject =~ /deal/
        meta   LOC_NOT_SPOOF   LOC_SUBJ && !SPF_PASS && !DKIM_VERIFIED
    """))
    result = sa_import.import_files([cf])
    assert result.provided == {"SPF_PASS": "SPF_PASS"}
    assert "SPF_PASS" not in result.rules and "SPF_PASS" not in result.scores
    assert result.rules["DKIM_VERIFIED"]["expression"] == "DKIM_VALID"
    assert "LOC_NOT_SPOOF" in result.rules
    site = tmp_path / "site"
    (site / "local.d").mkdir(parents=True)
    (site / "local.d" / "sa.toml").write_text(sa_import.to_toml(result))
    engine = load(base_rules, site).engine
    hits = engine.match(parse(b"Subject: deal\n\nx\n")).hits
    assert "LOC_NOT_SPOOF" in engine.evaluate_metas({n: 1.0 for n in hits})[0]
    # with filterd's auth check saying SPF passed, the meta does not fire
    assert "LOC_NOT_SPOOF" not in engine.evaluate_metas(
        {**{n: 1.0 for n in hits}, "SPF_PASS": 1.0})[0]


def test_only_body_patterns_that_depend_on_spamassassins_lines_are_routed_to_sa_evals():
    depends = sa_import.depends_on_sa_body_lines
    # a literal (or escaped) space, a `.` or a ^/$ anchor: SpamAssassin squeezes whitespace
    # and joins a paragraph's lines, so these match differently on its lines
    assert depends(r"\blow.{0,4} (?-i:P)rice", "i")
    assert depends(r"no\ exercise") and depends(r"via.gra") and depends(r"^Dear friend")
    # escapes and classes already match a line break in the engine's body text
    assert not depends(r"\bviagra\b") and not depends(r"a\.b\s+c") and not depends(r"[^.]{0,5}x")
    assert not depends(r"[]. ^$]x") and not depends(r"[^]. ]x")
    # in x mode a space and a # comment are not part of the pattern
    assert not depends("cheap pills # a comment with . and ^", "x")


def test_body_rule_with_a_space_matches_across_a_line_break_as_in_spamassassin(
        tmp_path: Path, base_rules: Path):
    cf = tmp_path / "space.cf"
    cf.write_text(textwrap.dedent(r"""
        body LOC_LOW_PRICE  /\blow.{0,4} (?-i:P)rice/i
        body LOC_NO_EXERCISE /\bno exercis(?:e|ing)\b/i
        body LOC_WORD       /\bviagra\b/i
        score LOC_LOW_PRICE 1
        score LOC_NO_EXERCISE 1
        score LOC_WORD 1
    """))
    result = sa_import.import_files([cf])
    assert result.local_evals["LOC_LOW_PRICE"][0] == "body"
    assert result.local_evals["LOC_NO_EXERCISE"][0] == "body"
    assert "LOC_WORD" in result.rules and "LOC_WORD" not in result.local_evals
    site = tmp_path / "site"
    (site / "local.d").mkdir(parents=True)
    (site / "local.d" / "sa.toml").write_text(sa_import.to_toml(result))
    engine = load(base_rules, site).engine
    # the message breaks the line where the pattern has its space
    view = parse(b"Subject: hi\n\nlowest\nPrice on viagra, no\n   exercise needed\n")
    hits = set(engine.match(view).hits) | set(sa_evals.evaluate(view, result.local_evals))
    assert {"LOC_LOW_PRICE", "LOC_NO_EXERCISE", "LOC_WORD"} <= hits
    # a blank line ends SpamAssassin's paragraph: no match across it
    apart = parse(b"Subject: hi\n\nno\n\nexercise\n")
    assert "LOC_NO_EXERCISE" not in sa_evals.evaluate(apart, result.local_evals)
