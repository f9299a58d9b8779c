"""SpamAssassin local eval: tests (filterd.checks.sa_evals) and their import as one binding."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from filterd.checks import sa_evals
from filterd.config import PROJECT_RULES
from filterd.message import parse
from filterd.pipeline import ScanContext, scan, validate_bindings
from filterd.ruleset import fit, load, sa_import


RELAYED = (b"Received: from mx.example.net (mx.example.net [10.0.0.5]) by inbox.example.net"
           b" with ESMTP id AA1\n"
           b"Received: from smtp.shop.example (out-7.mail.shop.example [203.0.113.7])"
           b" by mx.example.net (Postfix) with ESMTP id BB2 (envelope-from <news@shop.example>)\n"
           b"Received: from pc ([198.51.100.9]) by out-7.mail.shop.example with SMTP id CC3\n"
           b"Return-Path: <other@elsewhere.example>\n"
           b"From: Shop <NEWS@shop.example>\nTo: Bob <bob@example.net>\n"
           b"Subject: bob, your order\n\nhello\n")


def test_relays_infer_trust_from_private_ips_and_authentication():
    relays = sa_evals.sa_relays(parse(RELAYED))
    assert [(r.ip, r.trusted) for r in relays] == [
        ("10.0.0.5", True), ("203.0.113.7", False), ("198.51.100.9", False)]
    assert relays[1].rdns == "out-7.mail.shop.example" and relays[1].helo == "smtp.shop.example"
    assert relays[1].envfrom == "news@shop.example" and relays[2].rdns == ""
    untrusted = sa_evals.relay_pseudo_header(relays, "X-Spam-Relays-Untrusted")
    assert untrusted.startswith("[ ip=203.0.113.7 rdns=out-7.mail.shop.example "
                                "helo=smtp.shop.example by=mx.example.net ")
    assert "intl=0" in untrusted and "[ ip=198.51.100.9 rdns= helo=pc " in untrusted
    assert sa_evals.relay_pseudo_header(relays, "X-Spam-Relays-Internal").startswith(
        "[ ip=10.0.0.5 rdns=mx.example.net ")
    # a public hop that authenticated extends the trust boundary (SpamAssassin's inference)
    authed = parse(b"Received: from laptop (dsl.isp.example [192.0.2.1]) by mx.example.net"
                   b" with ESMTPSA id ZZ\nSubject: x\n\nx\n")
    assert sa_evals.sa_relays(authed)[0].trusted and sa_evals.sa_relays(authed)[0].auth
    assert sa_evals.sa_relays(parse(b"Received: garbage\nSubject: x\n\nx\n")) == []


def test_envelope_from_and_header_evals():
    view = parse(RELAYED)
    tests = {"RP_MATCH": ["check_mailfrom_matches_rcvd"],
             "ENV_EQ_FROM": ["check_for_matching_env_and_hdr_from"],
             "USER_IN_SUBJ": ["check_for_to_in_subject", "user"],
             "SHORT_BODY": ["check_body_length", "6"],
             "SHORTER_BODY": ["check_body_length", "5"],
             "NO_RCVD": ["gated_through_received_hdr_remover"]}
    # the last untrusted relay's envelope-from wins over a Return-Path
    assert sa_evals.envelope_from(view, sa_evals.sa_relays(view)) == "news@shop.example"
    assert set(sa_evals.evaluate(view, tests)) == {"RP_MATCH", "ENV_EQ_FROM", "USER_IN_SUBJ",
                                                   "SHORT_BODY"}
    other = parse(b"Return-Path: <a@b.example>\nFrom: c@d.example\nTo: x@y.example\n"
                  b"Subject: hello x\n\nhi\n")
    assert sa_evals.evaluate(other, tests) == ["SHORT_BODY", "SHORTER_BODY", "NO_RCVD"]
    # a Return-Path below a Received header is not the envelope sender
    late = parse(b"Received: from a (a [192.0.2.3]) by b with SMTP id Q\n"
                 b"Return-Path: <a@b.example>\nFrom: a@b.example\nSubject: s\n\nhi\n")
    assert sa_evals.evaluate(late, {"E": ["check_for_matching_env_and_hdr_from"]}) == []


def test_from_in_list_and_freemail_replyto():
    lists = {"BANKS": ["*@*.bank.example", "*@bank.example"]}
    freemail = ["freemail.example", "*.webmail.example"]
    tests = {"FROM_BANK": ["check_from_in_list", "BANKS"],
             "FM_REPLYTO": ["check_freemail_replyto", "replyto"]}
    bank = parse(b"From: Bank <alerts@secure.bank.example>\nReply-To: a@freemail.example\n"
                 b"Subject: s\n\nwrite to b@x.webmail.example\n")
    assert sa_evals.evaluate(bank, tests, lists, freemail) == ["FROM_BANK", "FM_REPLYTO"]
    both = parse(b"From: a@freemail.example\nReply-To: b@freemail.example\nSubject: s\n\nhi\n")
    assert sa_evals.evaluate(both, tests, lists, freemail) == ["FM_REPLYTO"]
    same = parse(b"From: a@freemail.example\nReply-To: A@freemail.example\nSubject: s\n\nhi\n")
    assert sa_evals.evaluate(same, tests, lists, freemail) == []


HTML_MAIL = (b"From: a@b.example\nSubject: s\nContent-Type: text/html\n\n"
             b"<html><head><title>Hello there</title></head><body><!-- saved --><!x>"
             b"<a href='http://x.example/'><img src='a.gif' width=100 height=50></a>"
             b"<blink>hi</blink></body></html></html>\n")


def test_html_inventory_evals():
    inv = sa_evals.html_inventory(HTML_MAIL.split(b"\n\n", 1)[1].decode())
    assert inv.inside["img"] == 1 and inv.inside["html"] == 0 and inv.closed_extra == 1
    assert inv.comment == ["<!-- saved -->", "<!x>"] and inv.title == ["Hello there"]
    assert inv.anchor == ["<img>\n"] and inv.image_area == 5000
    assert inv.value("bad_tag_ratio") == pytest.approx(2 / inv.tags)     # <blink> twice
    view = parse(HTML_MAIL)
    tests = {"HTML_MESSAGE": ["html_test", "html"],
             "IMG_ONLY": ["html_image_only", "0", "400"],
             "IMG_ONLY_BIG": ["html_image_only", "400", "800"],
             "LEN_LT_384": ["html_eval", "length", "< 384"],
             "LINK_IMAGE": ["html_text_match", "anchor", "<img>"],
             "SHORT_COMMENT": ["html_text_match", "comment", "<!(?!-).{0,6}>"],
             "EXTRA_CLOSE": ["html_range", "closed_extra_ratio", "0.05", "inf"],
             "BODY_BALANCED": ["html_tag_balance", "body", "== 0"],
             "EMBEDS": ["html_test", "embeds"]}
    assert set(sa_evals.evaluate(view, tests)) == set(tests) - {"IMG_ONLY_BIG", "EMBEDS"}
    plain = parse(b"Subject: s\n\n<img src=x>\n")
    assert sa_evals.evaluate(plain, tests) == []


def test_relay_header_rules_and_a_broken_test_is_a_rule_error():
    view = parse(RELAYED)
    tests = {"NO_RDNS": ["relay_header", "X-Spam-Relays-Untrusted", r"^\[ ip=\S+ rdns= ", "", ""],
             "LAST_EXT_NAMED": ["relay_header", "X-Spam-Relays-External",
                                r"^\[ ip=\S+ rdns=out-7", "", ""],
             "NOT_TRUSTED_X": ["relay_header", "X-Spam-Relays-Trusted", "nothing", "", "negate"],
             "BROKEN": ["no_such_eval"]}
    hits, errors = sa_evals.evaluate_with_errors(view, tests)
    assert hits == {"LAST_EXT_NAMED": 1, "NOT_TRUSTED_X": 1}
    assert errors and errors[0][0] == "BROKEN"


CF = textwrap.dedent(r"""
    freemail_domains freemail.example
    enlist_addrlist (BANKS) *@bank.example
    header __RP_MATCHES_RCVD   eval:check_mailfrom_matches_rcvd()
    header LOC_IN_LIST         eval:check_from_in_list('BANKS')
    header LOC_MISSING_LIST    eval:check_from_in_list('NOPE')
    header LOC_FM_REPLY        eval:check_freemail_replyto('replyto')
    body   LOC_COMMENT_SHORT   eval:html_text_match('comment', '<!(?!-).{0,6}>')
    body   LOC_FONT_BIG        eval:html_range('max_size', '6', 'inf')
    body   LOC_BOUNCE          eval:have_any_bounce_relays()
    header LOC_NO_RDNS         X-Spam-Relays-Untrusted =~ /^\[ ip=\S+ rdns= /
    meta   LOC_META            __RP_MATCHES_RCVD && !LOC_BOUNCE
    score  LOC_IN_LIST 2.5
""")


def test_import_binds_local_evals_and_the_pipeline_runs_them(tmp_path: Path, base_rules: Path):
    cf = tmp_path / "local.cf"
    cf.write_text(CF)
    result = sa_import.import_files([cf])
    assert result.local_evals["LOC_IN_LIST"] == ["check_from_in_list", "BANKS"]
    assert result.local_evals["LOC_COMMENT_SHORT"][0] == "html_text_match"
    assert result.local_evals["LOC_NO_RDNS"][:2] == ["relay_header", "X-Spam-Relays-Untrusted"]
    assert result.rules["LOC_BOUNCE"] == {"kind": "meta", "expression": "0",
                                          "description": "SpamAssassin rule LOC_BOUNCE",
                                          "origin": f"spamassassin {cf}:10; false: no "
                                          "welcomelist_bounce_relays lines were read, as in "
                                          "SpamAssassin"}
    skipped = {s.name: s.reason for s in result.skipped}
    assert "no enlist_addrlist (NOPE)" in skipped["LOC_MISSING_LIST"]
    assert "max_size" in skipped["LOC_FONT_BIG"]
    assert "LOC_META" in result.rules and result.scores["LOC_IN_LIST"] == 2.5
    assert "__RP_MATCHES_RCVD" not in result.scores
    assert "translated 7 of 9 rules" in sa_import.summary(result)

    site = tmp_path / "site"
    (site / "local.d").mkdir(parents=True)
    (site / "local.d" / "sa.toml").write_text(sa_import.to_toml(result))
    ruleset = load(base_rules, site)
    validate_bindings(ruleset)
    binding = next(b for b in ruleset.bindings if b.name == sa_import.LOCAL_EVAL_BINDING)
    assert binding.function == "sa.evals" and binding.args["lists"] == {"BANKS": ["*@bank.example"]}

    message = (b"Received: from smtp.bank.example (mail.bank.example [203.0.113.7]) by mx.local"
               b" with ESMTP id A1 (envelope-from <x@bank.example>)\n"
               b"From: x@bank.example\nSubject: s\n\nhello\n")
    settings = fit.make_settings(None)
    ctx = ScanContext(settings=settings, ruleset=ruleset)
    outcome = asyncio.run(scan(parse(message), ctx, skip_network=True))
    names = {s.name for s in outcome.symbols}
    assert {"LOC_IN_LIST", "__RP_MATCHES_RCVD", "LOC_META"} <= names
    assert "LOC_NO_RDNS" not in names and "RULE_ERROR" not in names


def test_the_default_rule_set_binds_no_sa_evals():
    import tomllib
    functions = [binding.get("function") for path in PROJECT_RULES.glob("*.toml")
                 for binding in tomllib.loads(path.read_text()).get("check", {}).values()]
    assert functions and "sa.evals" not in functions


def test_counts_of_multiple_rules_and_spamassassin_body_lines():
    view = parse(b"Subject: Hi\nContent-Type: text/html\n\n<p>one</p><p>two</p><br>three"
                 b"<script>no</script>\n")
    lines = sa_evals.sa_body_lines(view)
    assert lines[0] == "Hi\n" and [line.strip() for line in lines[1:] if line.strip()] == [
        "one", "two", "three"]
    tests = {"__LINES": ["count", "body", r"^\s*\S", "", "3"],
             "__LINES_NOLIMIT": ["count", "body", r"^\s*\S", "", "0"],
             "__TAGS": ["count", "rawbody", "<p>", "i", "0"],
             "__SUBJ": ["count", "header", "H", "", "0", "Subject"]}
    hits, errors = sa_evals.evaluate_with_errors(view, tests)
    assert hits == {"__LINES": 3, "__LINES_NOLIMIT": 4, "__TAGS": 2, "__SUBJ": 1} and not errors
    # a word split by tags counts as obfuscation, as in HTML.pm
    inv = sa_evals.html_inventory("<b>V</b>iagra and <i>more</i>")
    assert inv.obfuscation == 1 and inv.value("obfuscation_ratio") == pytest.approx(1 / 4)


def test_all_external_is_the_header_block_from_the_first_untrusted_relay():
    view = parse(RELAYED)
    relays = sa_evals.sa_relays(view)
    external = sa_evals.headers_below_trust(view, relays, "ALL-EXTERNAL")
    internal = sa_evals.headers_below_trust(view, relays, "ALL-INTERNAL")
    assert external.startswith("Received: from smtp.shop.example") and "Subject:" in external
    assert external.count("Received:") == 2
    assert internal.startswith("Received: from mx.example.net") and "Subject:" not in internal
    assert internal.rstrip().endswith("(envelope-from <news@shop.example>)")


def test_uri_rules_see_addresses_as_mailto_uris():
    view = parse(b"Subject: s\nContent-Type: text/html\n\n<a href='http://x.example/a'>a</a>"
                 b" <a href=\"mailto:sales@shop.example\">mail us</a> or write to"
                 b" list-unsubscribe@lists.example\n")
    uris = sa_evals.sa_uris(view)
    assert "http://x.example/a" in uris and "mailto:sales@shop.example" in uris
    assert "mailto:list-unsubscribe@lists.example" in uris
    tests = {"UNSUB_LINK": ["uri", r"\bunsubscri", "i"], "HTTPS": ["uri", "^https:", ""]}
    assert sa_evals.evaluate(view, tests) == ["UNSUB_LINK"]


def test_shifted_date_and_image_count():
    view = parse(b"Received: from a (a [192.0.2.4]) by b with SMTP id X;"
                 b" Mon, 2 Sep 2002 12:00:00 +0000\n"
                 b"Date: Mon, 2 Sep 2002 17:00:00 +0100\nSubject: x\n"
                 b"Content-Type: multipart/mixed; boundary=B\n\n--B\nContent-Type: text/plain\n\n"
                 b"hi\n--B\nContent-Type: image/gif\nContent-Transfer-Encoding: base64\n\n"
                 b"R0lGODlhAQABAAAAACw=\n--B\nContent-Type: image/png\n\nnot base64\n--B--\n")
    assert sa_evals.date_diff(view) == 4 * 3600
    tests = {"FUTURE_3_6": ["check_for_shifted_date", "3", "6"],
             "PAST_6_3": ["check_for_shifted_date", "-6", "-3"],
             "FUTURE_ANY": ["check_for_shifted_date", "2", "undef"],
             "ONE_GIF": ["image_count", "gif", "1", "1"],
             "TWO_IMAGES": ["image_count", "all", "2"]}
    # the png is not base64: SpamAssassin's ImageInfo does not count it
    assert sa_evals.evaluate(view, tests) == ["FUTURE_3_6", "FUTURE_ANY", "ONE_GIF"]
    undated = parse(b"Subject: x\n\nx\n")
    assert sa_evals.date_diff(undated) == 0 and sa_evals.evaluate(undated, tests) == []


def test_dates_are_read_as_spamassassins_lenient_parser_reads_them():
    time_of = sa_evals._rfc822_time
    assert time_of("Mon, 2 Sep 2002 17:00:00 +0100") == time_of("2 Sep 2002 16:00:00 +0000")
    assert time_of("2 Sep 2002 12:00:00 EDT") == time_of("2 Sep 2002 16:00:00 +0000")
    # a zone it cannot read counts as UTC (Python's parser reads "--800" as -08:00)
    assert time_of("Sun, 22 Apr 2007 22:01:53 --800") == time_of("22 Apr 2007 22:01:53 +0000")
    # the ctime form's time is consumed with its date, as in SpamAssassin: midnight
    assert time_of("Sep 2 12:00:00 2002") == time_of("2 Sep 2002 00:00:00 +0000")
    assert time_of("31 Feb 99 25:61:00") == time_of("1 Mar 1999 23:59:00 +0000")   # clamped
    assert time_of("yesterday") is None


def test_body_tests_run_on_paragraphs_with_whitespace_squeezed():
    view = parse(b"Subject: Low\n  prices\n\nno\n \texercise,  lowest\nPrice\n\nend\n\nno\n\n"
                 b"exercise\n")
    lines = sa_evals.sa_body_lines(view)
    # the folded Subject is its first line; each paragraph is one line, runs of spaces,
    # tabs and line breaks inside it one space
    assert [line.rstrip() for line in lines[1:]] == ["no exercise, lowest Price", "end", "no",
                                                     "exercise"]
    tests = {"SPACE": ["body", r"\bno exercis", "i"],
             "DOT": ["body", r"\blow.{0,4} (?-i:P)rice", "i"],
             "ANCHORED": ["body", r"^exercise\b", ""],
             "ACROSS_PARAGRAPHS": ["body", r"\bend no\b", ""]}
    hits, errors = sa_evals.evaluate_with_errors(view, tests)
    assert set(hits) == {"SPACE", "DOT", "ANCHORED"} and not errors


def test_uri_list_adds_spamassassins_canonical_copy_of_each_url():
    canonical = sa_evals.sa_canonical_uri
    # printable %-escapes are decoded (a hex-encoded host becomes readable), control and
    # high-bit escapes are kept, and what needs escaping is escaped octet by octet
    assert canonical("http://%64%38%31%31%30%33%39%2E%65%78%61%6D%70%6C%65%2E%63%6F%6D/%70/") \
        == "http://d811039.example.com/p/"
    assert canonical('http://a.example/x%0Ay%A5 "\u00e9') == "http://a.example/x%0Ay%A5%20%22%c3%a9"
    # scheme repaired or added, a query right after the host gets its slash, entities decoded
    assert canonical("http:www.example.com?id=3") == "http://www.example.com/?id=3"
    assert canonical("www.example.com") == "http://www.example.com"
    assert canonical("ftp.example.com/f") == "ftp://ftp.example.com/f"
    assert canonical("http://example.com/&#97;&#x62;") == "http://example.com/ab"
    view = parse(b"Subject: s\nContent-Type: text/html\n\n"
                 b'<a href="http://%64%38%31%31%30%33%39%2E%65%78%61%6D%70%6C%65%2E%63%6F%6D/">x</a>'
                 b' <a href="http://plain.example/">y</a>\n')
    uris = sa_evals.sa_uris(view)
    assert "http://d811039.example.com/" in uris and uris.count("http://plain.example/") == 1
    # URI_HEX from 20_uri_tests.cf fires on the decoded copy, as in spamd
    uri_hex = ["uri", r"^https?://[^/?&\#]*\b(?![0-9a-f]{0,12}[a-f]{3})[0-9a-f]{6,}\b", "i"]
    assert sa_evals.evaluate(view, {"URI_HEX": uri_hex}) == ["URI_HEX"]
    plain = parse(b"Subject: s\nContent-Type: text/html\n\n<a href=\"http://plain.example/\">y</a>\n")
    assert sa_evals.evaluate(plain, {"URI_HEX": uri_hex}) == []


def test_a_url_only_in_an_html_declaration_is_not_in_the_uri_list():
    doctype = (b'<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" '
               b'"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">')
    only_declared = parse(b"Subject: s\nContent-Type: text/html\n\n" + doctype
                          + b"<html><body>no links</body></html>\n")
    assert any("w3.org" in url for url in only_declared.urls)     # the message's URL list has it
    assert sa_evals.sa_uris(only_declared) == []                   # SpamAssassin's has not
    has_any_uri = {"__HAS_ANY_URI": ["uri", ".", ""]}
    assert sa_evals.evaluate(only_declared, has_any_uri) == []
    # the same URL also linked in the body stays
    linked = parse(b"Subject: s\nContent-Type: text/html\n\n" + doctype
                   + b'<a href="http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">dtd</a>\n')
    assert sa_evals.sa_uris(linked) == ["http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd"]
