"""Translate SpamAssassin `.cf` rule files into filterd rules (`filterd rules import-sa`).

Trusts: nothing in the files; every line is parsed, and every rule that cannot be translated is
reported by name with its reason, never dropped silently.
Settings: none. Symbols: none (the output is a rule file for <site>/local.d/).

Understood: header (one header, ALL, :raw/:addr/:name, exists:, !~, [if-unset: X]), body,
rawbody, full, uri, mimeheader, meta, score (the first score set: no Bayes, no network),
describe, tflags (kept; `nice` makes the default score negative), and ifplugin/if/else/endif
blocks (see _condition: with the .pre files' loadplugin lines, ifplugin, plugin(), can() and
version follow the loaded plugins and SpamAssassin 4.0's feature flags, as in the spamd that
reads the same files). Lines of other directives (report, required_score, lang, ...) are
counted, not rules.
Pseudo-headers MESSAGEID, ToCc and EnvelopeFrom are computed by the engine
(filterd.ruleset.engine.pseudo_header; case-sensitive as in SpamAssassin). Header rules on
X-Spam-Relays-{Untrusted,Trusted,External,Internal} and ALL-{TRUSTED,UNTRUSTED,INTERNAL,
EXTERNAL} run in filterd.checks.sa_evals, which infers the trust boundary as SpamAssassin does
without trusted_networks.
Local eval: tests with an exact pattern or meta equivalent are translated as such:
check_all_trusted, html_tag_exists, check_for_mime_html(_only), check_for_mime('mime_qp_count'
/'mime_base64_count'), check_freemail_from and check_freemail_header (from the freemail_domains
lines read). Those filterd.checks.sa_evals implements (sa_evals.IMPLEMENTED: HTML inventory,
envelope/relay and address tests, ...) and `__` helpers with `tflags multiple` (their match
count) become one [check.sa_local_evals] binding. VBounce tests without
welcomelist_bounce_relays lines are false, as in SpamAssassin. SPF/DKIM plugin tests named as
filterd's auth symbols (SPF_PASS, DKIM_VALID, ...) are not rewritten: metas read filterd's
symbols (AUTH_EQUIVALENTS).
ReplaceTags: replace_tag/pre/inter/post/start/end and replace_rules are applied; SpamAssassin's
UTF-8 byte sequences in tag values ([\\xc3][\\xa0]) become classes of the characters they
encode (utf8_bytes_as_characters), as filterd matches decoded text. ReplaceTags body rules and
body rules whose pattern has a literal space, `.` or ^/$ (depends_on_sa_body_lines) become
local evals over SpamAssassin's whitespace-squeezed paragraph lines; the other body rules stay
in the engine, whose body text keeps line breaks. A meta name no file
defines is read as 0, as SpamAssassin does.
DNS list tests (check_rbl, check_rbl_sub, check_uridnsbl with urirhssub/urirhsbl) become
[check.NAME] bindings of dnsbl.ip / dnsbl.domain emitting the SpamAssassin rule names, scored
with score set 1 (network): network checks, they fire only with network checks on (see
_DnsTranslator for the approximations).
Not translatable, and reported: other eval: tests (plugin code, check_rbl_txt, uridnsbl), the
pseudo-headers filterd does not model, Perl regex features with no equivalent, metas comparing
an eval's count numerically, and meta rules that refer to a rule that was not translated.

Perl regex to Python `regex`: m{...}/m!...!/.../ delimiters and flags i, s, m, x; \\z -> \\Z,
Perl's \\Z -> (?=\\n?\\Z), \\Q...\\E quoting, \\h/\\H, Perl's \\v (vertical space), \\e, \\g{N}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import regex as rx
except ImportError:  # pragma: no cover
    rx = re  # type: ignore[assignment]

PATTERN_KINDS = ("header", "body", "rawbody", "full", "uri", "mimeheader")
RULE_KINDS = PATTERN_KINDS + ("meta",)
# SpamAssassin pseudo-headers filterd computes (filterd.ruleset.engine.pseudo_header) and
# those it does not.
# The modelled ones are in filterd.ruleset.engine.PSEUDO_HEADERS, case-sensitive as in
# SpamAssassin (`exists:MessageID` tests a real header named MessageID).
PSEUDO_HEADERS = {"x-spam-gtube", "x-spam-rbl", "x-spam-relays-untrusted-list",
                  "x-spam-relays-trusted-list"}


@dataclass(frozen=True, slots=True)
class Skipped:
    name: str
    kind: str
    location: str
    reason: str


@dataclass
class ImportResult:
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    tflags: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)        # kind -> rules read
    other_lines: int = 0
    read_errors: list[str] = field(default_factory=list)
    locations: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)       # rule -> its kind in the .cf
    # meta -> the names it uses that no file defines (read as 0, as SpamAssassin does)
    undefined_refs: dict[str, list[str]] = field(default_factory=dict)
    # DNS list tests (check_rbl*, check_uridnsbl) as [check.NAME] bindings of dnsbl.ip /
    # dnsbl.domain; check_symbols maps each SpamAssassin rule name to its binding
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    check_symbols: dict[str, str] = field(default_factory=dict)
    net_scores: dict[str, float] = field(default_factory=dict)  # score set 1 (network, no Bayes)
    # local eval: tests run by filterd.checks.sa_evals (one [check.sa_local_evals] binding):
    # rule name -> [eval name, arguments...] (not in check_symbols: those are the DNS tests)
    local_evals: dict[str, list[str]] = field(default_factory=dict)
    addr_lists: dict[str, list[str]] = field(default_factory=dict)   # enlist_addrlist (NAME)
    freemail_domains: list[str] = field(default_factory=list)
    origin_notes: dict[str, str] = field(default_factory=dict)       # rule -> why it is so
    # SpamAssassin SPF/DKIM tests whose name is a symbol filterd's auth check emits with the
    # same meaning: no rule is written, metas read filterd's symbol
    provided: dict[str, str] = field(default_factory=dict)


class Untranslatable(ValueError):
    pass


_DELIMS = {"{": "}", "(": ")", "[": "]", "<": ">"}


def split_regex(text: str) -> tuple[str, str, str]:
    """'/re/flags rest' or 'm{re}flags rest' -> (re, flags, rest)."""
    text = text.strip()
    if text.startswith("m") and len(text) > 1 and not text[1].isalnum() and not text[1].isspace():
        opener = text[1]
        body_start = 2
    elif text.startswith("/"):
        opener = "/"
        body_start = 1
    else:
        raise Untranslatable(f"not a /regex/: {text[:40]!r}")
    closer = _DELIMS.get(opener, opener)
    depth = 0
    i = body_start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if opener != closer and c == opener:
            depth += 1
        elif c == closer:
            if depth == 0:
                break
            depth -= 1
        i += 1
    else:
        raise Untranslatable("regex is not closed")
    pattern = text[body_start:i]
    m = re.match(r"[a-zA-Z]*", text[i + 1:])
    flags = m.group(0) if m else ""
    rest = text[i + 1 + len(flags):].strip()
    if opener == closer and opener != "/":
        pattern = pattern.replace("\\" + opener, opener)
    return pattern, flags, rest


def translate_regex(pattern: str, flags: str) -> tuple[str, str]:
    """A Perl regex and its flags as a Python `regex` pattern and filterd flags."""
    unknown = set(flags) - set("imsxgo")
    if unknown:
        raise Untranslatable(f"regex flag(s) {''.join(sorted(unknown))} not supported")
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            if e == "Q":
                end = pattern.find("\\E", i + 2)
                literal = pattern[i + 2:] if end == -1 else pattern[i + 2:end]
                out.append(rx.escape(literal))
                i = n if end == -1 else end + 2
                continue
            if e == "E":
                i += 2
                continue
            if e == "z":
                out.append(r"\Z")
            elif e == "Z":
                out.append(r"(?=\n?\Z)")
            elif e == "h":
                out.append(r"[ \t]")
            elif e == "H":
                out.append(r"[^ \t]")
            elif e == "v":
                out.append(r"[\n\x0b\f\r\x85\u2028\u2029]")
            elif e == "e":
                out.append(r"\x1b")
            elif e == "c":
                raise Untranslatable(r"control escape \c is not supported")
            elif e in "lLuU" and e != "U":
                raise Untranslatable(f"case-changing escape \\{e} is not supported")
            elif e == "g":
                m = re.match(r"\\g\{?(-?\d+)\}?", pattern[i:])
                if not m or m.group(1).startswith("-"):
                    raise Untranslatable(r"relative or named \g back-reference")
                out.append(f"\\{m.group(1)}")
                i += m.end()
                continue
            else:
                out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "(" and pattern.startswith("(?^", i):
            raise Untranslatable("(?^...) flag groups are not supported")
        if c == "(" and pattern.startswith("(?{", i) or pattern.startswith("(??{", i):
            raise Untranslatable("embedded Perl code in the regex")
        if c == "{" and pattern.startswith("{,", i):
            out.append("\\{")          # literal in Perl, a quantifier in Python
            i += 1
            continue
        if c == "$" and i + 1 < n and (pattern[i + 1].isalpha() or pattern[i + 1] == "{"):
            raise Untranslatable("Perl variable interpolation in the regex")
        out.append(c)
        i += 1
    translated = "".join(out)
    our_flags = "".join(f for f in "ismx" if f in flags)
    try:
        rx.compile(translated, (rx.I if "i" in our_flags else 0) | (rx.S if "s" in our_flags else 0)
                   | (rx.M if "m" in our_flags else 0) | (rx.X if "x" in our_flags else 0))
    except Exception as exc:
        raise Untranslatable(f"regex does not compile in Python: {exc}") from None
    return translated, our_flags


def depends_on_sa_body_lines(pattern: str, flags: str = "") -> bool:
    """Whether a `body` pattern can match differently on SpamAssassin's body lines than on the
    engine's body text: a literal space (SpamAssassin squeezes every whitespace run, line
    breaks included, to one space; `no exercise` matches `no\\nexercise` there), a `.` (it
    spans a soft line break inside a paragraph there) or a ^/$ anchor (lines are paragraphs
    there). Escapes other than `\\ ` and character classes do not count: `\\s` and `[^.]`
    already match a line break in the engine's text."""
    i, n = 0, len(pattern)
    extended = "x" in flags
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 < n and pattern[i + 1] == " ":
                return True
            i += 2
            continue
        if c == "[":
            # a class ends at the first unescaped ] after its first member (`[]a]`, `[^]a]`)
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i = j + 1
            continue
        if extended and c == "#":
            # a comment to the end of the line in x mode
            end = pattern.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if c in ".^$" or (c == " " and not extended):
            return True
        i += 1
    return False


def _parse_header_rule(rest: str, tags: ReplaceTags | None = None) -> dict[str, Any]:
    rest = rest.strip()
    if rest.startswith("exists:"):
        header = rest[len("exists:"):].strip()
        if header.lower() in PSEUDO_HEADERS:
            raise Untranslatable(f"pseudo-header {header} is not modelled")
        return {"header": header, "exists": True}
    m = re.match(r"([^\s=!]+)\s*(=~|!~)\s*(.*)$", rest)
    if not m:
        raise Untranslatable("cannot read `HEADER =~ /regex/`")
    header, op, regex_text = m.groups()
    name, _, modifier = header.partition(":")
    if name.lower() in PSEUDO_HEADERS:
        raise Untranslatable(f"pseudo-header {name} is not modelled")
    if modifier and modifier not in ("raw", "addr", "name"):
        raise Untranslatable(f"header modifier :{modifier} is not supported")
    pattern, flags, tail = split_regex(regex_text)
    if tags is not None:
        pattern = tags.expand(pattern)
    entry: dict[str, Any] = {"header": header}
    if op == "!~":
        entry["negate"] = True
    unset = re.match(r"\[\s*if-unset:\s*(.*?)\s*\]", tail)
    if unset:
        entry["if_unset"] = unset.group(1)
    elif tail:
        raise Untranslatable(f"unexpected text after the regex: {tail[:30]!r}")
    entry["pattern"], entry["flags"] = translate_regex(pattern, flags)
    return entry


# Helper rules the translations of eval: tests share; added to the output once, as needed.
_EVAL_HELPERS: dict[str, dict[str, Any]] = {
    "__SAX_RELAYS_TRUSTED": {"kind": "header", "header": "X-Spam-Relays-Trusted",
                             "pattern": r"\S"},
    "__SAX_RELAYS_UNTRUSTED": {"kind": "header", "header": "X-Spam-Relays-Untrusted",
                               "pattern": r"\S"},
    "__SAX_CT_HTML": {"kind": "mimeheader", "header": "Content-Type",
                      "pattern": r"^\s*text/html\b", "flags": "i"},
    "__SAX_CT_PLAIN": {"kind": "mimeheader", "header": "Content-Type",
                       "pattern": r"^\s*text/plain\b", "flags": "i"},
}
_EVAL_ARGS = re.compile(r"^eval:\s*(\w+)\s*\((.*)\)\s*$", re.S)


def _eval_args(text: str) -> list[str]:
    return [a.strip().strip("'\"") for a in text.split(",") if a.strip()]


def _freemail_pattern(domains: list[str]) -> str:
    """An :addr pattern for addresses at one of SpamAssassin's freemail_domains entries."""
    if not domains:
        raise Untranslatable("no freemail_domains were read (load 20_freemail_domains.cf too)")
    alternatives = sorted({rx.escape(d.lower()).replace("\\*", "[^@\\s]*") for d in domains})
    return "@(?:" + "|".join(alternatives) + ")$"


def _translate_eval(kind: str, body: str, result: "ImportResult",
                    freemail: list[str]) -> dict[str, Any]:
    """The filterd equivalent of the local SpamAssassin eval: tests it has one for.

    Only tests whose meaning a pattern or meta rule states exactly (or as SpamAssassin's own
    documentation states it) are translated; every other eval: test stays untranslated.
    """
    m = _EVAL_ARGS.match(body.strip())
    if not m:
        raise Untranslatable("cannot read the eval: call")
    test, args = m.group(1), _eval_args(m.group(2))

    def helper(*names: str) -> None:
        for n in names:
            result.rules.setdefault(n, dict(_EVAL_HELPERS[n]))

    if test == "check_all_trusted" and not args:
        # relay pseudo-headers with SpamAssassin's inferred trust (filterd.checks.sa_evals)
        for helper_name, header in (("__SAX_RELAYS_TRUSTED", "X-Spam-Relays-Trusted"),
                                    ("__SAX_RELAYS_UNTRUSTED", "X-Spam-Relays-Untrusted")):
            result.local_evals[helper_name] = ["relay_header", header, r"\S", "", ""]
        return {"kind": "meta", "expression": "__SAX_RELAYS_TRUSTED && !__SAX_RELAYS_UNTRUSTED"}
    if test == "html_tag_exists" and len(args) == 1 and re.fullmatch(r"[A-Za-z0-9]+", args[0]):
        return {"kind": "rawbody", "pattern": rf"<{args[0]}\b", "flags": "i"}
    if test == "check_for_mime_html_only" and not args:
        helper("__SAX_CT_HTML", "__SAX_CT_PLAIN")
        return {"kind": "meta", "expression": "__SAX_CT_HTML && !__SAX_CT_PLAIN"}
    if test == "check_for_mime_html" and not args:
        helper("__SAX_CT_HTML")
        return {"kind": "meta", "expression": "__SAX_CT_HTML"}
    if test == "check_for_mime" and args in (["mime_qp_count"], ["mime_base64_count"]):
        # the count of MIME parts with that transfer encoding is above zero
        encoding = "quoted-printable" if args[0] == "mime_qp_count" else "base64"
        return {"kind": "mimeheader", "header": "Content-Transfer-Encoding",
                "pattern": rf"^\s*{encoding}\b", "flags": "i"}
    if test in ("check_freemail_from", "check_freemail_header"):
        if test == "check_freemail_from" and not args:
            header = "From:addr"
        elif test == "check_freemail_header" and len(args) == 1 \
                and re.fullmatch(r"[A-Za-z0-9-]+", args[0]):
            header = f"{args[0]}:addr"
        else:      # check_freemail_replyto also compares Reply-To with From: not a pattern
            raise Untranslatable(f"eval test {test} with arguments {args} (plugin code)")
        return {"kind": "header", "header": header, "pattern": _freemail_pattern(freemail),
                "flags": "im"}
    raise Untranslatable(f"eval test {test} (plugin code)")


LOCAL_EVAL_BINDING = "sa_local_evals"
# SpamAssassin's SPF and DKIM plugin tests (no arguments) and the filterd.checks.auth symbol of
# the same meaning (auth runs SPF on the envelope sender, DKIM on every signature). These are
# network tests in both (tflags net in SpamAssassin; DNS lookups in filterd).
AUTH_EQUIVALENTS = {
    "check_for_spf_pass": "SPF_PASS", "check_for_spf_fail": "SPF_FAIL",
    "check_for_spf_softfail": "SPF_SOFTFAIL", "check_for_spf_neutral": "SPF_NEUTRAL",
    "check_for_spf_none": "SPF_NONE", "check_for_spf_permerror": "SPF_PERMERROR",
    "check_for_spf_temperror": "SPF_TEMPERROR", "check_dkim_valid": "DKIM_VALID",
    "check_dkim_valid_author_sig": "DKIM_VALID_AU",
}
_RELAY_PSEUDO = re.compile(r"X-Spam-Relays-(?:Trusted|Untrusted|Internal|External)"
                           r"|ALL-(?:TRUSTED|UNTRUSTED|INTERNAL|EXTERNAL)")


def _relay_header_eval(body: str, tags: "ReplaceTags | None") -> list[str] | None:
    """A header rule on an X-Spam-Relays-* pseudo-header as a sa_evals relay_header test.

    filterd.checks.sa_evals builds those pseudo-headers as SpamAssassin does without
    trusted_networks (its inferred trust boundary), which the engine's view of
    scan.trusted_networks does not.
    """
    m = re.match(r"(\S+?)\s*(=~|!~)", body.strip())
    if not m or not _RELAY_PSEUDO.fullmatch(m.group(1)):
        return None
    entry = _parse_header_rule(body, tags)
    if "if_unset" in entry:
        raise Untranslatable("[if-unset: ...] on a relay pseudo-header is not supported")
    return ["relay_header", entry["header"], entry["pattern"], entry.get("flags", ""),
            "negate" if entry.get("negate") else ""]


def _local_eval(body: str, lists: dict[str, list[str]], freemail: list[str],
                bounce_relays: list[str]) -> list[str] | None:
    """[eval, args...] for an eval: test filterd.checks.sa_evals runs; None if it runs none.

    Raises Untranslatable for a call it knows but cannot run with these arguments, and returns
    ["false"] for tests that are false with the configuration read (SpamAssassin's VBounce
    tests without welcomelist_bounce_relays lines).
    """
    from filterd.checks import sa_evals
    m = _EVAL_ARGS.match(body.strip())
    if not m:
        return None
    test = m.group(1)
    args = [a or b for a, b in _QUOTED.findall(m.group(2))]
    args += re.findall(r"(?:^|,)\s*(-?[\d.]+)\s*(?=,|$)", m.group(2))  # unquoted numbers
    if test in ("check_whitelist_bounce_relays", "check_welcomelist_bounce_relays",
                "have_any_bounce_relays") and not args:
        if bounce_relays:
            raise Untranslatable(f"{test} with welcomelist_bounce_relays set (not implemented)")
        return ["false"]
    if test not in sa_evals.IMPLEMENTED:
        return None
    number = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
    ok = False
    if test in ("check_mailfrom_matches_rcvd", "check_for_matching_env_and_hdr_from",
                "gated_through_received_hdr_remover"):
        ok = not args
    elif test == "check_for_to_in_subject":
        ok = args in (["user"], ["address"])
    elif test == "image_count":
        ok = (len(args) in (2, 3) and args[0] in ("all", "gif", "png", "jpeg")
              and all(a.isdigit() for a in args[1:]))
    elif test == "check_for_shifted_date":
        ok = len(args) == 2 and all(a == "undef" or re.fullmatch(r"-?\d+", a) for a in args)
    elif test == "check_body_length":
        ok = len(args) == 1 and args[0].isdigit()
    elif test == "check_from_in_list":
        ok = len(args) == 1
        if ok and args[0] not in lists:
            raise Untranslatable(f"check_from_in_list: no enlist_addrlist ({args[0]}) line read")
    elif test in ("check_freemail_replyto", "check_freemail_from"):
        ok = args in ([], ["replyto"], ["reply"]) if test == "check_freemail_replyto" \
            else len(args) <= 1
        if ok and not freemail:
            raise Untranslatable("no freemail_domains were read (load 20_freemail_domains.cf too)")
        if ok and args and test == "check_freemail_from":
            return [test, translate_regex(args[0], "")[0]]
    elif test == "html_test":
        ok = len(args) == 1 and args[0] in sa_evals.HTML_FLAGS
    elif test == "html_range":
        ok = (len(args) in (2, 3) and args[0] in sa_evals.HTML_VALUES
              and all(number.fullmatch(a) or a == "inf" for a in args[1:]))
    elif test in ("html_eval", "html_tag_balance"):
        ok = (len(args) == 2 and re.fullmatch(r"\s*(==|!=|<=|>=|<|>)\s*[-+]?\d+\s*", args[1])
              is not None and (args[0] in sa_evals.HTML_VALUES if test == "html_eval"
                               else re.fullmatch(r"[A-Za-z0-9]+", args[0]) is not None))
    elif test in ("html_image_only", "html_image_ratio"):
        ok = len(args) == 2 and all(number.fullmatch(a) for a in args)
    elif test == "html_text_match":
        ok = len(args) == 2 and args[0] in sa_evals.HTML_TEXTS
        if ok:
            pattern, _flags = translate_regex(args[1], "")
            return [test, args[0], pattern]
    if not ok:
        raise Untranslatable(f"eval test {test} with arguments {args}: not the values "
                             f"filterd.checks.sa_evals implements")
    return [test, *args]


def _counting_eval(name: str, kind: str, entry: dict[str, Any],
                   tflags: list[str]) -> list[str] | None:
    """A `__` helper with `tflags multiple` as a sa_evals count test, or None.

    SpamAssassin gives such a rule the number of matches (up to maxhits=N) and metas compare it
    (`__BODY_TEXT_LINE < 3`); the engine says only whether a rule fired. Scored rules stay in
    the engine: they score once either way.
    """
    if not name.startswith("__") or "multiple" not in tflags:
        return None
    if kind not in ("body", "rawbody", "uri", "full", "header") or entry.get("negate") \
            or "exists" in entry or "if_unset" in entry:
        return None
    header = entry.get("header", "")
    if kind == "header" and (":" in header or header in ("ALL", "ToCc", "EnvelopeFrom",
                                                         "MESSAGEID")
                             or _RELAY_PSEUDO.fullmatch(header)):
        return None
    maxhits = next((t.split("=", 1)[1] for t in tflags if t.startswith("maxhits=")), "0")
    test = ["count", kind, entry["pattern"], entry.get("flags", ""), maxhits]
    return test + [header] if kind == "header" else test


_BYTE_CLASS = re.compile(r"\[((?:\\x[0-9a-fA-F]{2}(?:-\\x[0-9a-fA-F]{2})?)+)\]")
_MAX_UTF8_SEQUENCES = 4096


def _class_bytes(body: str) -> list[int]:
    out: list[int] = []
    for m in re.finditer(r"\\x([0-9a-fA-F]{2})(?:-\\x([0-9a-fA-F]{2}))?", body):
        low = int(m.group(1), 16)
        high = int(m.group(2), 16) if m.group(2) else low
        out.extend(range(low, high + 1))
    return out


def _utf8_tail(pattern: str, pos: int) -> tuple[list[bytes], int] | None:
    """Continuation bytes at pos: a [\\x80-\\xbf] class or a (?:..|..) group of such
    sequences; (the byte strings it matches, where it ends) or None."""
    m = _BYTE_CLASS.match(pattern, pos)
    if m:
        values = _class_bytes(m.group(1))
        if values and all(0x80 <= b <= 0xBF for b in values):
            return [bytes([b]) for b in values], m.end()
        return None
    if not pattern.startswith("(?:", pos):
        return None
    pos += 3
    options: list[bytes] = []
    while True:
        sequence: list[bytes] = [b""]
        while True:
            tail = _utf8_tail(pattern, pos)
            if tail is None:
                break
            sequence = [a + b for a in sequence for b in tail[0]]
            if len(sequence) > _MAX_UTF8_SEQUENCES:
                return None
            pos = tail[1]
        if sequence == [b""]:
            return None
        options.extend(sequence)
        if pattern.startswith("|", pos):
            pos += 1
            continue
        if pattern.startswith(")", pos):
            return options, pos + 1
        return None


def utf8_bytes_as_characters(pattern: str) -> str:
    """SpamAssassin matches octets: its ReplaceTags values spell a multi-byte look-alike as
    UTF-8 bytes, `[\\xc3][\\xa0]` or `[\\xf0][\\x9d](?:[\\x90][\\x82]|...)`. filterd
    matches decoded text, so each such run (a class of UTF-8 lead bytes followed by classes or
    groups of continuation bytes) becomes a class of the characters it encodes; byte strings
    that are not one whole UTF-8 character are dropped (they cannot occur in decoded text)."""
    out: list[str] = []
    pos = 0
    while pos < len(pattern):
        if pattern[pos] == "\\":
            out.append(pattern[pos:pos + 2])
            pos += 2
            continue
        m = _BYTE_CLASS.match(pattern, pos)
        if m:
            leads = _class_bytes(m.group(1))
            if leads and all(0xC2 <= b <= 0xF4 for b in leads):
                sequences = [bytes([b]) for b in leads]
                end = m.end()
                while True:
                    tail = _utf8_tail(pattern, end)
                    if tail is None:
                        break
                    sequences = [a + b for a in sequences for b in tail[0]]
                    end = tail[1]
                    if len(sequences) > _MAX_UTF8_SEQUENCES:
                        break
                chars = set()
                for seq in sequences:
                    try:
                        decoded = seq.decode("utf-8")
                    except UnicodeDecodeError:
                        continue
                    if len(decoded) == 1:
                        chars.add(decoded)
                if end > m.end() and chars:
                    out.append("[" + "".join(rx.escape(c) for c in sorted(chars)) + "]")
                    pos = end
                    continue
        out.append(pattern[pos])
        pos += 1
    return "".join(out)


@dataclass
class ReplaceTags:
    """SpamAssassin's ReplaceTags data: tag values and the pre/inter/post pieces, by name."""
    tags: dict[str, str] = field(default_factory=dict)
    pre: dict[str, str] = field(default_factory=dict)
    inter: dict[str, str] = field(default_factory=dict)
    post: dict[str, str] = field(default_factory=dict)
    start: str = "<"
    end: str = ">"
    rules: set[str] = field(default_factory=set)

    def expand(self, pattern: str) -> str:
        """The pattern with its tags replaced, as ReplaceTags does for rules in replace_rules.

        `<pre X>`, `<inter X>` and `<post X>` markers choose which replace_pre/inter/post
        value this rule uses and are removed; every known `<TAG>` becomes pre + value + post,
        and the inter value goes between two tags that follow each other directly. Tag values
        that name other tags are expanded in turn (a few levels deep).
        """
        start, end = re.escape(self.start), re.escape(self.end)
        chosen: dict[str, str] = {}
        for kind, table in (("pre", self.pre), ("inter", self.inter), ("post", self.post)):
            marker = re.compile(start + kind + r"\s+(\w+)" + end)
            m = marker.search(pattern)
            if m:
                if m.group(1) not in table:
                    raise Untranslatable(f"ReplaceTags {kind} {m.group(1)} is not defined")
                chosen[kind] = table[m.group(1)]
                pattern = marker.sub("", pattern)
        tag = re.compile(start + r"(\w+)" + end)
        pre, inter, post = chosen.get("pre", ""), chosen.get("inter", ""), chosen.get("post", "")
        for _depth in range(5):
            pieces: list[str] = []
            last = 0
            previous_end = -1
            for m in tag.finditer(pattern):
                if m.group(1) not in self.tags:
                    continue
                pieces.append(pattern[last:m.start()])
                if inter and previous_end == m.start():
                    pieces.append(inter)
                pieces.append(pre + self.tags[m.group(1)] + post)
                last = previous_end = m.end()
            if not pieces:
                break
            pieces.append(pattern[last:])
            pattern = "".join(pieces)
            pre = inter = post = ""          # only the rule's own tags get its pieces
        return utf8_bytes_as_characters(pattern)


# Methods of Mail::SpamAssassin::Conf that `if can(Mail::SpamAssassin::Conf::NAME)` tests for
# (SpamAssassin 4.0's feature flags): true for the spamd this import models.
SA_CONF_FEATURES = frozenset("""
    feature_originating_ip_headers feature_dns_local_ports_permit_avoid
    feature_bayes_auto_learn_on_error feature_uri_host_listed feature_yesno_takes_args
    feature_bug6558_free feature_edns feature_dns_query_restriction feature_registryboundaries
    feature_geodb feature_dns_block_rule feature_compile_regexp feature_meta_rules_matching
    feature_subjprefix feature_bayes_stopwords feature_get_host feature_blocklist_welcomelist
    feature_welcomelist_blocklist feature_header_address_parser feature_local_tests_only
    feature_header_first_last feature_header_match_many feature_capture_rules
    has_tflags_nosubject has_tflags_nolog perl_min_version_5010000""".split())
SA_VERSION = 4.000001
_COND_TOKEN = re.compile(r"\s*(?:(plugin|can)\(\s*([\w:]+)\s*\)|(version|perl_version)"
                         r"|(\d+(?:\.\d+)?)|(&&|\|\||>=|<=|==|!=|[!()<>])|(\S+))")


def _condition(word: str, rest: str, loaded: set[str]) -> bool:
    """Whether an ifplugin/if block is read.

    With loadplugin lines read (pass the .pre files, e.g. /etc/spamassassin/*.pre, before the
    .cf files), `ifplugin P`, `plugin(P)` and `can(P::has_x)` follow the plugins that are
    loaded, as in the spamd that loads the same files; `can(Mail::SpamAssassin::Conf::x)` is
    true for SpamAssassin 4.0's feature flags and `version` is 4.000001. Without any loadplugin
    line every plugin counts as loaded. An `if` expression this cannot read is false.
    """
    if word == "ifplugin":
        return not loaded or rest.split()[0] in loaded
    tokens: list[str] = []
    pos = 0
    text = rest.strip()
    while pos < len(text):
        m = _COND_TOKEN.match(text, pos)
        if not m or m.end() == pos:
            return False
        pos = m.end()
        if m.group(1) == "plugin":
            tokens.append(str(not loaded or m.group(2) in loaded))
        elif m.group(1) == "can":
            owner, _, method = m.group(2).rpartition("::")
            if owner == "Mail::SpamAssassin::Conf":
                tokens.append(str(method in SA_CONF_FEATURES))
            else:
                tokens.append(str(not loaded or owner in loaded))
        elif m.group(3):
            tokens.append(repr(SA_VERSION) if m.group(3) == "version" else "5.036")
        elif m.group(4):
            tokens.append(m.group(4))
        elif m.group(5):
            tokens.append({"&&": " and ", "||": " or ", "!": " not "}.get(m.group(5),
                                                                          m.group(5)))
        else:
            return False
    expression = " ".join(tokens).strip()
    try:
        # only True/False, numbers, comparisons, and/or/not and parentheses reach here
        return bool(eval(compile(expression, "<if>", "eval"), {"__builtins__": {}}, {}))
    except Exception:
        return False


def _meta_expression(text: str) -> str:
    if re.search(r"[^\w\s()&|!+\-*/<>=.]", text):
        raise Untranslatable("meta expression uses operators filterd does not have")
    from filterd.ruleset.expr import ExpressionError, compile_expression
    try:
        compile_expression(text)
    except ExpressionError as exc:
        raise Untranslatable(f"meta expression: {exc}") from None
    return text.strip()


_DNS_TESTS = ("check_rbl", "check_rbl_sub", "check_rbl_txt", "check_rbl_envfrom",
              "check_rbl_from_host", "check_rbl_from_domain", "check_rbl_ns_from",
              "check_rbl_headers", "check_rbl_rcvd", "check_rbl_accreditor", "check_uridnsbl")
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
_IPV4 = re.compile(r"^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$")
# Answers a regex subtest is tried against: lists answer inside 127.0.0.0/16 and use
# 127.255.255.0/24 for "your resolver is blocked"; SpamAssassin applies the regex to any answer.
_REGEX_SUBTEST_SPACE = tuple([f"127.0.{c}.{d}" for c in range(256) for d in range(256)]
                             + [f"127.255.255.{d}" for d in range(256)])
_MAX_REGEX_CODES = 4096


class _DnsTranslator:
    """SpamAssassin's DNS list tests as [check.NAME] bindings of dnsbl.ip / dnsbl.domain.

    check_rbl(set, zone[, subtest]) and check_rbl_sub(set, subtest) look up the relays' IPs
    (a set named *-lastexternal: the last external relay only, as filterd's relays = "last";
    any other set: every untrusted relay, relays = "untrusted" -- for *-firsttrusted sets
    SpamAssassin also looks up the first trusted relay, which filterd does not); urirhssub /
    urirhsbl lists behind check_uridnsbl look up the registered domains of the message's URLs
    (uridnsbl_skip_domain entries skipped). Subtests: a number is a bit mask, an IPv4 address an
    exact answer, anything else a regex, expanded to the answers it matches in 127.0.0.0/16 and
    127.255.255.0/24. No subtest: any answer in 127.0.0.0/8 fires. Rules of one list share a
    binding (one query per IP or domain) as long as no answer code maps to two of them.
    Not translated: check_rbl_txt (TXT records; dnsbl.* reads A records), uridnsbl (looks up
    the IPs of a domain's name servers), the other check_rbl_* variants (envelope sender,
    From host, accreditor headers).
    """

    def __init__(self, result: ImportResult, pending: dict[str, tuple[str, str, str]],
                 uri_lists: dict[str, tuple[str, str, str, str]], uri_skip: list[str]):
        self.result = result
        self.uri_lists = uri_lists
        self.uri_skip = sorted(set(uri_skip))
        self.sets: dict[str, str] = {}            # rbl set name -> zone (from check_rbl)
        for _name, (_kind, body, _loc) in pending.items():
            m = _EVAL_ARGS.match(body.strip()) if body.startswith("eval:") \
                else None
            if m and m.group(1) == "check_rbl":
                args = self._args(m.group(2))
                if len(args) >= 2:
                    self.sets.setdefault(args[0], args[1].rstrip("."))
        self.groups: dict[tuple[Any, ...], list[str]] = {}

    @staticmethod
    def _args(text: str) -> list[str]:
        return [a or b for a, b in _QUOTED.findall(text)]

    def handles(self, body: str) -> bool:
        m = _EVAL_ARGS.match(body.strip())
        return bool(m) and m.group(1) in _DNS_TESTS

    def translate(self, name: str, body: str) -> None:
        m = _EVAL_ARGS.match(body.strip())
        assert m is not None
        test, args = m.group(1), self._args(m.group(2))
        if test == "check_rbl" and len(args) in (2, 3):
            set_name, zone = args[0], args[1].rstrip(".")
            subtest = args[2] if len(args) == 3 else ""
            self._add_ip(name, set_name, zone, subtest)
        elif test == "check_rbl_sub" and len(args) == 2:
            if args[0] not in self.sets:
                raise Untranslatable(f"check_rbl_sub: no check_rbl defines the set {args[0]!r}")
            self._add_ip(name, args[0], self.sets[args[0]], args[1])
        elif test == "check_uridnsbl" and len(args) == 1:
            listed = self.uri_lists.get(args[0])
            if listed is None:
                raise Untranslatable(f"check_uridnsbl: no urirhssub/urirhsbl line for {args[0]}")
            directive, zone, rrtype, subtest = listed
            if directive == "uridnsbl":
                raise Untranslatable("uridnsbl looks up the IPs of a domain's name servers "
                                     "(dnsbl.domain looks up the domain itself)")
            if rrtype != "A":
                raise Untranslatable(f"{directive} with {rrtype} records (dnsbl.domain reads A)")
            match, codes, fallback = self._subtest(name, subtest)
            args_common = {"zone": zone, "urls": True, "senders": False, "max_domains": 20}
            if self.uri_skip:
                args_common["skip"] = self.uri_skip
            self._place(name, "dnsbl.domain", args_common, match, codes, fallback,
                        f"SpamAssassin URI DNS list tests on {zone} (registered domains of URLs)")
        elif test == "check_rbl_txt":
            raise Untranslatable("check_rbl_txt reads TXT records; filterd's dnsbl.ip reads A")
        else:
            raise Untranslatable(f"DNS test {test} with arguments {args} is not translated "
                                 f"(only check_rbl, check_rbl_sub and check_uridnsbl are)")

    def _add_ip(self, name: str, set_name: str, zone: str, subtest: str) -> None:
        relays = "last" if set_name.endswith("-lastexternal") else "untrusted"
        match, codes, fallback = self._subtest(name, subtest)
        where = "last external relay" if relays == "last" else "untrusted relays"
        self._place(name, "dnsbl.ip", {"zone": zone, "relays": relays}, match, codes, fallback,
                    f"SpamAssassin DNS list tests on {zone} ({where})")

    def _subtest(self, name: str, subtest: str) -> tuple[str, dict[str, str], bool]:
        """(match mode, answer code -> rule name, whether any answer fires the rule)."""
        subtest = subtest.strip()
        if not subtest:
            return "exact", {}, True
        if re.fullmatch(r"\d+", subtest):
            return "bitmask", {subtest: name}, False
        if _IPV4.match(subtest):
            return "exact", {subtest: name}, False
        if "/" in subtest and not subtest.startswith("^"):
            raise Untranslatable(f"subtest {subtest!r} (address/mask) is not translated")
        try:
            compiled = rx.compile(subtest)
        except Exception as exc:
            raise Untranslatable(f"subtest regex does not compile: {exc}") from None
        matched = [code for code in _REGEX_SUBTEST_SPACE if compiled.search(code)]
        if not matched:
            raise Untranslatable(f"subtest {subtest!r} matches no answer in 127.0.0.0/16 or "
                                 f"127.255.255.0/24")
        if len(matched) > _MAX_REGEX_CODES:
            raise Untranslatable(f"subtest {subtest!r} matches {len(matched)} answers (too many "
                                 f"to list)")
        return "exact", {code: name for code in matched}, False

    def _place(self, name: str, function: str, args: dict[str, Any], match: str,
               codes: dict[str, str], fallback: bool, description: str) -> None:
        """Add the rule to a binding of the same list whose codes it does not collide with."""
        key = (function, tuple(sorted((k, str(v)) for k, v in args.items())), match, fallback)
        candidates = [] if fallback else self.groups.get(key, [])
        for binding in candidates:
            existing = self.result.checks[binding]["args"]["codes"]
            if not set(existing) & set(codes):
                existing.update(codes)
                self.result.check_symbols[name] = binding
                return
        slug = re.sub(r"[^a-z0-9]+", "_", str(args["zone"]).lower()).strip("_")
        binding = f"sa_{slug}_{len(self.result.checks) + 1}"
        entry_args: dict[str, Any] = dict(args)
        entry_args["match"] = match
        if fallback:
            entry_args["symbol"] = name
        entry_args["codes"] = dict(codes)
        self.result.checks[binding] = {"function": function, "description": description,
                                       "args": entry_args}
        self.groups.setdefault(key, []).append(binding)
        self.result.check_symbols[name] = binding


def import_files(paths: list[Path], *, prefix: str = "") -> ImportResult:
    result = ImportResult()
    pending: dict[str, tuple[str, str, str]] = {}       # name -> (kind, rest, location)
    freemail: list[str] = []                             # freemail_domains entries
    replace = ReplaceTags()
    loaded_plugins: set[str] = set()                     # loadplugin lines read (.pre files)
    uri_lists: dict[str, tuple[str, str, str, str]] = {}  # urirhssub/urirhsbl/uridnsbl lines
    uri_skip: list[str] = []                             # uridnsbl_skip_domain entries
    addr_lists: dict[str, list[str]] = {}                # enlist_addrlist (NAME) globs
    bounce_relays: list[str] = []                        # welcomelist_bounce_relays entries
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            result.read_errors.append(f"{path}: {exc.strerror or exc}")
            continue
        conditions: list[bool] = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = re.sub(r"(?<!\\)#.*$", "", raw).strip()
            if not line:
                continue
            word, rest = (re.split(r"\s+", line, maxsplit=1) + [""])[:2]
            word = word.lower()
            rest = rest.strip()
            if word == "loadplugin" and rest:
                loaded_plugins.add(rest.split()[0])
                continue
            if word in ("ifplugin", "if"):
                conditions.append(_condition(word, rest, loaded_plugins))
                continue
            if word == "else":
                if conditions:
                    conditions[-1] = not conditions[-1]
                continue
            if word == "endif":
                if conditions:
                    conditions.pop()
                continue
            if not all(conditions):
                continue
            location = f"{path}:{lineno}"
            if word in RULE_KINDS:
                name, body = (re.split(r"\s+", rest, maxsplit=1) + [""])[:2]
                if not name:
                    continue
                pending[prefix + name] = (word, body.strip(), location)
                result.seen[word] = result.seen.get(word, 0) + 1
            elif word == "score":
                parts = rest.split()
                if len(parts) >= 2:
                    try:
                        result.scores[prefix + parts[0]] = float(parts[1])
                        if len(parts) >= 3:
                            result.net_scores[prefix + parts[0]] = float(parts[2])
                    except ValueError:
                        pass
            elif word == "describe":
                name, desc = (re.split(r"\s+", rest, maxsplit=1) + [""])[:2]
                result.descriptions[prefix + name] = desc.strip()
            elif word in ("urirhssub", "urirhsbl") and len(rest.split()) >= 3:
                fields = rest.split()
                uri_lists[prefix + fields[0]] = (word, fields[1].rstrip("."), fields[2].upper(),
                                                 fields[3] if len(fields) > 3 else "")
            elif word == "uridnsbl" and rest:
                uri_lists[prefix + rest.split()[0]] = (word, "", "", "")
            elif word == "uridnsbl_skip_domain":
                uri_skip.extend(d.lower() for d in rest.split())
            elif word == "freemail_domains":
                freemail.extend(rest.split())
            elif word == "enlist_addrlist":
                lm = re.match(r"\(\s*(\w+)\s*\)\s*(.*)$", rest)
                if lm:
                    addr_lists.setdefault(lm.group(1), []).extend(lm.group(2).split())
            elif word in ("welcomelist_bounce_relays", "whitelist_bounce_relays"):
                bounce_relays.extend(rest.split())
            elif word in ("replace_tag", "replace_pre", "replace_inter", "replace_post"):
                tag_name, value = (re.split(r"\s+", rest, maxsplit=1) + [""])[:2]
                table = {"replace_tag": replace.tags, "replace_pre": replace.pre,
                         "replace_inter": replace.inter, "replace_post": replace.post}[word]
                table[tag_name] = value.strip()
            elif word in ("replace_start", "replace_end") and rest:
                setattr(replace, word.split("_")[1], rest.split()[0])
            elif word == "replace_rules":
                replace.rules.update(prefix + n for n in rest.split())
            elif word == "tflags":
                name, flags = (re.split(r"\s+", rest, maxsplit=1) + [""])[:2]
                result.tflags[prefix + name] = flags.split()
            else:
                result.other_lines += 1

    dns = _DnsTranslator(result, pending, uri_lists, uri_skip)
    # rules whose SpamAssassin value is a count (check_for_mime('mime_qp_count') returns the
    # count) but whose translation only says whether it fired (1): metas that compare them
    # numerically would read the wrong number
    counts_only_as_flag: set[str] = set()
    metas: dict[str, tuple[str, str]] = {}
    undefined_refs: dict[str, list[str]] = {}          # meta -> names no file defines
    for name, (kind, body, location) in pending.items():
        result.locations[name] = location
        result.kinds[name] = kind
        try:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise Untranslatable("rule name is not letters, digits and _")
            if kind == "meta":
                expression = _meta_expression(body)
                # SpamAssassin runs a meta whose dependency no file defines, with that name
                # as 0 (it logs "meta test X has undefined dependency Y"): so do we, and the
                # report's undefined list says which names were read as 0.
                from filterd.ruleset.expr import compile_expression
                undefined = [r for r in compile_expression(expression).references
                             if r not in pending]
                if undefined:
                    undefined_refs[name] = sorted(set(undefined))
                    expression = re.sub(r"\b(?:" + "|".join(map(re.escape, undefined)) + r")\b",
                                        "0", expression)
                metas[name] = (expression, location)
                continue
            if body.startswith("eval:") and dns.handles(body):
                dns.translate(name, body)
                continue
            auth = _EVAL_ARGS.match(body.strip()) if body.startswith("eval:") else None
            if auth and auth.group(1) in AUTH_EQUIVALENTS and not auth.group(2).strip():
                symbol = AUTH_EQUIVALENTS[auth.group(1)]
                if name == symbol:
                    result.provided[name] = symbol
                else:
                    result.rules[name] = {"kind": "meta", "expression": symbol}
                    result.origin_notes[name] = f"filterd's auth check symbol {symbol}"
                continue
            local = _local_eval(body, addr_lists, freemail, bounce_relays) \
                if body.startswith("eval:") else None
            if local == ["false"]:
                # false with the configuration read, as in SpamAssassin: a meta that is 0
                result.rules[name] = {"kind": "meta", "expression": "0"}
                result.origin_notes[name] = ("false: no welcomelist_bounce_relays lines were "
                                             "read, as in SpamAssassin")
                continue
            if local is not None:
                result.local_evals[name] = local
                continue
            if kind == "header" and not body.startswith("eval:"):
                relay = _relay_header_eval(body, replace if name in replace.rules else None)
                if relay is not None:
                    result.local_evals[name] = relay
                    continue
            if body.startswith("eval:"):
                entry = _translate_eval(kind, body, result, freemail)
                result.rules[name] = entry
                if re.search(r"check_for_mime\(\s*'mime_\w+_count'", body):
                    counts_only_as_flag.add(name)
                continue
            tags = replace if name in replace.rules else None
            if kind in ("header", "mimeheader"):
                entry = _parse_header_rule(body, tags)
                if kind == "mimeheader" and (entry.get("negate") or "exists" in entry):
                    raise Untranslatable("negated or exists: mimeheader rules are not supported")
            else:
                pattern, flags, tail = split_regex(body)
                if tail:
                    raise Untranslatable(f"unexpected text after the regex: {tail[:30]!r}")
                if tags is not None:
                    pattern = tags.expand(pattern)
                pattern, flags = translate_regex(pattern, flags)
                entry = {"pattern": pattern, "flags": flags}
            entry = {"kind": kind, **entry}
            if not entry.get("flags"):
                entry.pop("flags", None)
            counted = _counting_eval(name, kind, entry, result.tflags.get(name) or [])
            if counted is not None:
                result.local_evals[name] = counted
                continue
            if kind == "uri":
                # SpamAssassin's URI list also holds the text's e-mail addresses as mailto:
                # URIs (__UNSUB_LINK matches "mailto:list-unsubscribe@..."); sa_evals builds it
                result.local_evals[name] = ["uri", entry["pattern"], entry.get("flags", "")]
                continue
            if kind == "body" and (tags is not None or depends_on_sa_body_lines(
                    entry["pattern"], entry.get("flags", ""))):
                # ReplaceTags look-alike patterns (<WS>*, (?!click\shere)) and patterns with a
                # literal space, `.` or ^/$ depend on SpamAssassin's whitespace-squeezed body
                # lines (one per paragraph), which sa_evals builds and the engine's body text
                # (line breaks kept) is not
                result.local_evals[name] = ["body", entry["pattern"], entry.get("flags", "")]
                continue
            result.rules[name] = entry
        except Untranslatable as exc:
            result.skipped.append(Skipped(name, kind, location, str(exc)))

    result.undefined_refs = undefined_refs
    if result.local_evals:
        result.addr_lists = {k: v for k, v in addr_lists.items()
                             if any(t[0] == "check_from_in_list" and t[1] == k
                                    for t in result.local_evals.values())}
        if any(t[0] in ("check_freemail_replyto", "check_freemail_from")
               for t in result.local_evals.values()):
            result.freemail_domains = sorted(set(d.lower() for d in freemail))
    # metas: translate those whose every reference resolves to a translated rule or meta
    from filterd.ruleset.expr import compile_expression
    remaining = dict(metas)
    for name, (expression, location) in list(remaining.items()):
        compared = [r for r in counts_only_as_flag if re.search(
            rf"\b{r}\b\s*[<>=]|[<>=]\s*\b{r}\b", expression)]
        if compared:
            result.skipped.append(Skipped(name, "meta", location,
                                          "compares the count SpamAssassin's eval returns, "
                                          "filterd's translation only says whether it fired: "
                                          + ", ".join(sorted(compared))))
            del remaining[name]
    while True:
        progressed = False
        for name, (expression, location) in list(remaining.items()):
            refs = compile_expression(expression).references
            missing = [r for r in refs if r not in result.rules and r not in remaining
                       and r not in result.check_symbols and r not in result.local_evals
                       and r not in result.provided]
            if missing:
                why = ("refers to a rule that was not translated: " if any(
                    s.name in missing for s in result.skipped) else "refers to an unknown rule: ")
                result.skipped.append(Skipped(name, "meta", location, why + ", ".join(sorted(missing))))
                del remaining[name]
                progressed = True
        if not progressed:
            break
    for name, (expression, _location) in remaining.items():
        result.rules[name] = {"kind": "meta", "expression": expression}

    for name, entry in result.rules.items():
        flags = result.tflags.get(name)
        if flags:
            entry["tflags"] = flags
        entry["description"] = result.descriptions.get(name) or f"SpamAssassin rule {name}"
        entry["origin"] = (f"spamassassin {result.locations[name]}" if name in result.locations
                           else "filterd: helper of translated eval: tests")
        if name in result.origin_notes:
            entry["origin"] += "; " + result.origin_notes[name]
        if name in result.undefined_refs:
            entry["origin"] += ("; names no file defines, read as 0 as in SpamAssassin: "
                                + ", ".join(result.undefined_refs[name]))
        if not name.startswith("__") and name not in result.scores:
            # SpamAssassin's default for a rule without a score line
            result.scores[name] = -1.0 if flags and "nice" in flags else 1.0
    for name in [*result.check_symbols, *result.local_evals]:
        if name.startswith("__"):
            result.scores.pop(name, None)
            continue
        if name in result.local_evals:       # a local test: score set 0, as the pattern rules
            if name not in result.scores:
                flags = result.tflags.get(name) or []
                result.scores[name] = -1.0 if "nice" in flags else 1.0
            continue
        # a DNS test only fires with network checks on: its score is SpamAssassin's score set 1
        # (network, no Bayes), not set 0 (where SpamAssassin scores network tests 0)
        score = result.net_scores.get(name, result.scores.get(name))
        flags = result.tflags.get(name) or []
        result.scores[name] = score if score is not None else (-1.0 if "nice" in flags else 1.0)
    for name in result.provided:          # filterd's own scores for its auth symbols apply
        result.scores.pop(name, None)
    for name in list(result.scores):
        if name not in result.rules and name not in result.check_symbols \
                and name not in result.local_evals:
            del result.scores[name]
    return result


def _toml_string(value: str) -> str:
    if "'" not in value and "\n" not in value and all(ord(c) >= 32 for c in value):
        return f"'{value}'"
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\t", "\\t"))
    escaped = "".join(c if ord(c) >= 32 else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


def to_toml(result: ImportResult) -> str:
    lines = ["# Imported from SpamAssassin .cf files by `filterd rules import-sa`.",
             f"# {len(result.rules)} rules translated, {len(result.skipped)} not (see --report).",
             "", "[meta]", 'family = "spamassassin-import"', ""]
    for name, entry in result.rules.items():
        lines.append(f"[rule.{name}]")
        for key, value in entry.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, list):
                lines.append(f"{key} = [{', '.join(_toml_string(v) for v in value)}]")
            else:
                lines.append(f"{key} = {_toml_string(str(value))}")
        lines.append("")
    for name, entry in result.checks.items():
        lines.append(f"[check.{name}]")
        lines.append(f"function = {_toml_string(entry['function'])}")
        lines.append(f"description = {_toml_string(entry['description'])}")
        lines.append(f"[check.{name}.args]")
        for key, value in entry["args"].items():
            if key == "codes":
                continue
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, int):
                lines.append(f"{key} = {value}")
            elif isinstance(value, list):
                lines.append(f"{key} = [{', '.join(_toml_string(v) for v in value)}]")
            else:
                lines.append(f"{key} = {_toml_string(str(value))}")
        lines.append(f"[check.{name}.args.codes]")
        for code, symbol in entry["args"]["codes"].items():
            lines.append(f"{_toml_string(code)} = {_toml_string(symbol)}")
        lines.append("")
    if result.local_evals:
        lines.append(f"[check.{LOCAL_EVAL_BINDING}]")
        lines.append('function = "sa.evals"')
        lines.append("description = 'SpamAssassin local eval: tests and relay pseudo-header "
                     "rules (filterd.checks.sa_evals)'")
        lines.append(f"[check.{LOCAL_EVAL_BINDING}.args]")
        if result.freemail_domains:
            lines.append(f"freemail = [{', '.join(_toml_string(d) for d in result.freemail_domains)}]")
        lines.append(f"[check.{LOCAL_EVAL_BINDING}.args.tests]")
        for name, test in result.local_evals.items():
            lines.append(f"{name} = [{', '.join(_toml_string(a) for a in test)}]")
        if result.addr_lists:
            lines.append(f"[check.{LOCAL_EVAL_BINDING}.args.lists]")
            for list_name, globs in result.addr_lists.items():
                lines.append(f"{list_name} = [{', '.join(_toml_string(g) for g in globs)}]")
        lines.append("")
    for name in [*result.local_evals, *result.check_symbols]:
        if name in result.local_evals:
            description = (result.descriptions.get(name) or f"SpamAssassin rule {name}") + \
                f" (spamassassin {result.locations.get(name, 'eval helper')})"
        else:
            description = (result.descriptions.get(name) or f"SpamAssassin DNS list test {name}") \
                + " (network test)"
        lines.append(f"[symbol.{name}]")
        lines.append(f"description = {_toml_string(description)}")
        lines.append("")
    lines.append("[scores]")
    for name, score in result.scores.items():
        lines.append(f"{name} = {score:g}")
    return "\n".join(lines) + "\n"


def summary(result: ImportResult) -> str:
    per_kind: dict[str, list[int]] = {}
    for kind, count in result.seen.items():
        per_kind[kind] = [count, 0]
    for name in result.rules:
        kind = result.kinds.get(name)
        if kind is None:          # a helper the translation added, not a rule of the files
            continue
        per_kind.setdefault(kind, [0, 0])[1] += 1
    for name in [*result.check_symbols, *result.local_evals, *result.provided]:
        kind = result.kinds.get(name)
        if kind is not None:
            per_kind.setdefault(kind, [0, 0])[1] += 1
    total_seen = sum(v[0] for v in per_kind.values())
    total_ok = sum(v[1] for v in per_kind.values())
    parts = [f"{kind} {ok}/{seen}" for kind, (seen, ok) in sorted(per_kind.items())]
    pct = 100.0 * total_ok / total_seen if total_seen else 0.0
    # the kinds issue 5 measures (mimeheader rules are SpamAssassin plugin rules)
    core = [v for k, v in per_kind.items() if k in ("header", "body", "rawbody", "full", "uri",
                                                    "meta")]
    core_seen, core_ok = sum(v[0] for v in core), sum(v[1] for v in core)
    core_pct = 100.0 * core_ok / core_seen if core_seen else 0.0
    return (f"translated {total_ok} of {total_seen} rules ({pct:.1f} %): {', '.join(parts)}; "
            f"{len(result.skipped)} not translated; header/body/rawbody/full/uri/meta "
            f"{core_ok}/{core_seen} ({core_pct:.1f} %)")
