"""SpamAssassin's local eval: tests, for rule sets imported with `filterd rules import-sa`.

What it does: one check, `sa.evals`, runs the eval: tests an imported rule set names (its
`tests` argument maps each SpamAssassin rule name to [eval name, arguments...]) over one
message and emits the names of those that are true. It is bound only by the output of
filterd.ruleset.sa_import, so the default rule set pays nothing for it.

The evals follow SpamAssassin 4.0's Perl (Plugin::HTMLEval, HeaderEval, BodyEval, WLBLEval,
FreeMail, VBounce, Message::Metadata::Received), rewritten from their documented behaviour:
  check_mailfrom_matches_rcvd      the envelope sender's registered domain is that of the
                                   first untrusted relay's rDNS (all trusted relays if none)
  check_for_matching_env_and_hdr_from   EnvelopeFrom:addr == From:addr (case-insensitive)
  check_for_to_in_subject(user|address) the To local part (address) in the Subject
  check_for_shifted_date(MIN, MAX) the Date header is MIN..MAX hours ahead of the Received times
  image_count(TYPE, MIN[, MAX])    base64 image/gif|png|jpeg parts of that type (or all) counted
  check_body_length(N)             the raw body (after the header block) is at most N octets
  check_from_in_list(LIST)         a *From address matches an enlist_addrlist (LIST) glob
  check_freemail_from([regex])     a *From address (From, Envelope-Sender, Resent-Sender,
                                   X-Envelope-From, EnvelopeFrom; Resent-From alone when
                                   present) at a freemail domain (and matching regex)
  check_freemail_replyto(replyto|reply) From and Reply-To at different freemail addresses, or
                                   a freemail Reply-To (From) and another freemail address in
                                   the body
  gated_through_received_hdr_remover   no Received header (or ezmlm / groups.msn.com gating)
  html_test / html_range / html_eval / html_image_only / html_text_match /
  html_tag_balance / html_image_ratio   over every text/html part's inventory (HtmlInventory)
  relay_header(NAME, pattern, flags[, negate])  a header rule on SpamAssassin's relay
                                   pseudo-headers (X-Spam-Relays-*, with the trust boundary
                                   inferred as SpamAssassin does when trusted_networks is unset)
                                   and on ALL-TRUSTED/-INTERNAL/-UNTRUSTED/-EXTERNAL (the header
                                   block above / from the first untrusted relay's Received)
  uri(pattern, flags)              a uri rule over SpamAssassin's URI list (sa_uris: the URLs and
                                   the text's e-mail addresses as mailto: URIs)
  body(pattern, flags)             a body rule over SpamAssassin's body lines (ReplaceTags rules,
                                   whose look-alike patterns depend on its whitespace squeezing,
                                   and rules with a literal space, `.` or ^/$: see
                                   sa_import.depends_on_sa_body_lines)
  count(KIND, pattern, flags, maxhits[, header])  a `tflags multiple` rule: how many times it
                                   matches the text SpamAssassin gives that kind of rule (body:
                                   Subject line + one line per rendered paragraph; rawbody:
                                   decoded parts in ~2 KB chunks), so metas can compare counts
Trust boundary (sa_relays): a relay is trusted while every relay after it was trusted and its
sending IP is private/loopback or it authenticated (SpamAssassin's inference without
trusted_networks; the relays are read from the Received headers, newest first).

Trusts: nothing in the message; every header is parsed defensively and an eval that cannot
read what it needs is false. Settings: none (the rule set passes everything as arguments).
Symbols: the SpamAssassin rule names given in `tests` (declared by the imported rule file);
RULE_ERROR (options: rule, reason) for a test whose eval name or arguments are unusable (the
other tests still run).
"""

from __future__ import annotations

import email.utils
import fnmatch
import html
import html.parser
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from filterd.dns import in_networks, registered_domain
from filterd.message import MessageView
from filterd.pipeline import Phase, ScanContext, check
from filterd.policy import Symbol

try:
    import regex as rx
except ImportError:  # pragma: no cover
    rx = re  # type: ignore[assignment]


# --- relays, as SpamAssassin's Received parser and trust inference see them ------------------
@dataclass(frozen=True, slots=True)
class SaRelay:
    ip: str
    rdns: str
    helo: str
    by: str
    ident: str
    envfrom: str
    id: str
    auth: str
    trusted: bool
    index: int = 0          # position of its Received header (0 = topmost)

    def as_string(self) -> str:
        # intl mirrors trust: with neither trusted_networks nor internal_networks set,
        # SpamAssassin treats what it infers as trusted as internal too
        return (f"[ ip={self.ip} rdns={self.rdns} helo={self.helo} by={self.by} "
                f"ident={self.ident} envfrom={self.envfrom} intl={int(self.trusted)} "
                f"id={self.id} auth={self.auth} msa=0 ]")


_IP = r"(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9a-fA-F]*:[0-9a-fA-F:.]+)"
# "from HELO (RDNS [IP])", "from HELO (RDNS [IP] (may be forged))", "from HELO ([IP])",
# "from HELO (HELO [IP]) (authenticated ...)" -- Postfix, sendmail, most others
_FROM_PAREN = re.compile(r"^from\s+(\S+)\s+\((?:([^\s()\[\]]+)\s+)?\[(?:IPv6:)?(" + _IP
                         + r")\](?::\d+)?[^)]*\)", re.I)
# Exim: "from RDNS ([IP] helo=HELO)" or "from [IP] (helo=HELO)" or "from HELO ([IP])"
_FROM_EXIM = re.compile(r"^from\s+(\S+)\s+\(\s*(?:(\S+)\s+)?\[(?:IPv6:)?(" + _IP
                        + r")\](?::\d+)?(?:\s+helo=(\S+?))?\s*\)", re.I)
_FROM_BRACKET_IP = re.compile(r"^from\s+\[(?:IPv6:)?(" + _IP + r")\](?::\d+)?"
                              r"(?:\s+\(helo=([^)\s]+)\))?", re.I)
_MAIL_FETCHER = re.compile(r"with (?:POP3|IMAP)")
# qmail: "from RDNS (HELO helo) (IP)", "from RDNS (HELO helo) (ident@[IP])", "from IP (HELO helo)"
_FROM_QMAIL = re.compile(r"^from\s+(\S+)\s+\((?:HELO|EHLO)\s+(\S*)\)\s+\((?:\S+@)?\[?(" + _IP
                         + r")\]?\)", re.I)
_FROM_QMAIL_IP = re.compile(r"^from\s+(" + _IP + r")\s+\((?:HELO|EHLO)\s+(\S*)\)", re.I)
# fetchmail and others: "from HELO [IP] by ..."
_FROM_HOST_BRACKET_IP = re.compile(r"^from\s+([^\s\[]\S*)\s+\[(?:IPv6:)?(" + _IP + r")\]", re.I)
# Microsoft: "from HELO (IP) by ..." (bare IP in parentheses)
_FROM_MS = re.compile(r"^from\s+(\S+)\s+\((" + _IP + r")\)", re.I)
_BY = re.compile(r"\bby\s+([^\s;()]+)", re.I)
_WITH = re.compile(r"\bwith\s+([A-Za-z0-9]+)", re.I)
_ID = re.compile(r"\bid\s+<?([^\s;<>]+)", re.I)
_ENVFROM = re.compile(r"\(envelope-from\s+<?([^\s<>)]*)>?", re.I)
_IDENT = re.compile(r"\(\s*([^\s@()]+)@[^\s()\[]*\s*\[", re.I)
_AUTH_WITH = re.compile(r"(?i)e?smtps?a|lmtpa|asmtp")
_AUTH_COMMENT = re.compile(r"\((?:authenticated|Authenticated sender:)[^)]*\)", re.I)
# SpamAssassin's private ranges (IP_PRIVATE): RFC 1918, loopback, link-local, CGNAT and
# the IPv6 local ranges
_PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16",
    "100.64.0.0/10", "0.0.0.0/8", "::1/128", "fc00::/7", "fe80::/10", "::/128"))


def _private(ip: str) -> bool:
    return bool(in_networks(ip, _PRIVATE))


def _parse_received(raw: str) -> tuple[str, str, str] | None:
    """(ip, rdns, helo) of one Received header, or None when it names no sending IP."""
    text = " ".join(raw.split())
    m = _FROM_QMAIL.match(text)
    if m:
        rdns, helo, ip = m.groups()
        return ip, "" if rdns.lower() == "unknown" else rdns, helo
    m = _FROM_QMAIL_IP.match(text)
    if m:
        return m.group(1), "", m.group(2)
    m = _FROM_EXIM.match(text)
    if m and m.group(4):
        rdns_or_helo, rdns, ip, helo = m.groups()
        return ip, rdns_or_helo if not rdns_or_helo.startswith("[") else "", helo
    m = _FROM_PAREN.match(text)
    if m:
        helo, rdns, ip = m.groups()
        rdns = (rdns or "").rpartition("@")[2]       # "ident@rdns": the ident is not the name
        if rdns.lower() in ("unknown", "may", "helo") or "=" in rdns:
            rdns = ""
        return ip, rdns, helo.strip("[]") if not helo.startswith("[") else helo.strip("[]")
    m = _FROM_BRACKET_IP.match(text)
    if m:
        return m.group(1), "", m.group(2) or ""
    m = _FROM_HOST_BRACKET_IP.match(text)
    if m:
        return m.group(2), "", m.group(1)
    m = _FROM_MS.match(text)
    if m:
        return m.group(2), "", m.group(1)
    return None


def sa_relays(view: MessageView) -> list[SaRelay]:
    """The relays of the Received headers, newest first, with SpamAssassin's inferred trust."""
    out: list[SaRelay] = []
    in_trusted = True
    for index, raw in enumerate(view.header("Received")):
        if _MAIL_FETCHER.search(" ".join(raw.split())):
            # a POP/IMAP fetch (fetchmail, getmail) is no relay; seen in the trusted part, the
            # relays before it are the fetching host's own: start over, as SpamAssassin does
            if in_trusted:
                out.clear()
            continue
        parsed = _parse_received(raw)
        if parsed is None:
            continue
        ip, rdns, helo = parsed
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            continue
        text = " ".join(raw.split())
        proto = _WITH.search(text)
        auth = proto.group(1) if proto and _AUTH_WITH.fullmatch(proto.group(1)) else ""
        if not auth and _AUTH_COMMENT.search(text):
            auth = "Sendmail"
        if in_trusted and not (_private(ip) or auth):
            in_trusted = False
        by = _BY.search(text)
        rid = _ID.search(text)
        envfrom = _ENVFROM.search(text)
        ident = _IDENT.search(text)
        out.append(SaRelay(ip=ip, rdns=rdns, helo=helo, by=by.group(1) if by else "",
                           ident=ident.group(1) if ident else "",
                           envfrom=envfrom.group(1) if envfrom else "",
                           id=rid.group(1) if rid else "", auth=auth, trusted=in_trusted,
                           index=index))
    return out


def headers_below_trust(view: MessageView, relays: Sequence[SaRelay], which: str) -> str | None:
    """SpamAssassin's ALL-TRUSTED/ALL-INTERNAL (the header block above the first untrusted
    relay's Received header) or ALL-UNTRUSTED/ALL-EXTERNAL (from that header down); None when
    empty. Lines are `Name: value` with folded values unfolded."""
    first_untrusted = next((r.index for r in relays if not r.trusted), None)
    boundary = first_untrusted if first_untrusted is not None else len(view.header("Received"))
    upper = which in ("ALL-TRUSTED", "ALL-INTERNAL")
    received_seen = -1
    lines: list[str] = []
    for name, value in view.raw_headers:
        if name.lower() == "received":
            received_seen += 1
        below = received_seen >= boundary
        if upper and below and not (name.lower() == "received" and received_seen == boundary):
            break
        if upper or below:
            lines.append(f"{name}: {' '.join(value.split())}\n")
    return "".join(lines) or None


def relay_pseudo_header(relays: Sequence[SaRelay], name: str) -> str | None:
    """X-Spam-Relays-{Trusted,Untrusted,Internal,External}; None when there is no relay."""
    want_trusted = name.endswith(("-Trusted", "-Internal"))
    chosen = [r.as_string() for r in relays if r.trusted == want_trusted]
    return " ".join(chosen) if chosen else None


# --- addresses ---------------------------------------------------------------------------------
def first_addr(view: MessageView, header: str) -> str:
    """SpamAssassin's `Header:addr`: the first address of the first such header, or ''."""
    values = view.header_raw(header)
    if not values:
        return ""
    return _addr_of(values[0])


def _addr_of(value: str) -> str:
    value = " ".join(value.split())
    try:
        pairs = email.utils.getaddresses([value])
    except Exception:
        pairs = []
    for _name, addr in pairs:
        if addr:
            return addr.strip()
    m = re.search(r"[^\s<>\"(),;:]+@[^\s<>\"(),;:]+", value)
    return m.group(0) if m else value.strip().strip("<>")


def _received_before(view: MessageView, header: str) -> bool:
    """Whether a Received header comes before (above) the first `header` header."""
    for name, _value in view.raw_headers:
        low = name.lower()
        if low == header:
            return False
        if low == "received":
            return any(n.lower() == header for n, _ in view.raw_headers)
    return False


def envelope_from(view: MessageView, relays: Sequence[SaRelay]) -> str:
    """SpamAssassin's EnvelopeFrom:addr without envelope_sender_header (PerMsgStatus)."""
    if view.envelope.mail_from:
        return view.envelope.mail_from
    untrusted = [r for r in relays if not r.trusted]
    trusted = [r for r in relays if r.trusted]
    hop = untrusted[0] if untrusted else (trusted[-1] if trusted else None)
    if hop is not None and hop.envfrom and "@" in hop.envfrom[1:]:
        return hop.envfrom
    x_sender = first_addr(view, "X-Sender")
    if "@" in x_sender and any("(fetchmail" in r for r in view.header("Received")):
        return ""
    for header in ("x-envelope-from", "envelope-sender", "return-path"):
        addr = first_addr(view, header)
        if addr:
            if _received_before(view, header):
                if header == "x-envelope-from":
                    return ""
                continue
            return addr
    return ""


# --- HTML inventory (HTML.pm's results) -------------------------------------------------------
# Elements of the HTML 4.01 and XHTML 1.0 DTDs (strict and loose), as HTML.pm counts them
HTML_ELEMENTS = frozenset((
    "a abbr acronym address area b base bdo big blockquote body br button caption cite code "
    "col colgroup dd del dfn div dl dt em fieldset form h1 h2 h3 h4 h5 h6 head hr html i img "
    "input ins kbd label legend li link map meta noscript object ol optgroup option p param pre "
    "q samp script select small span strong style sub sup table tbody td textarea tfoot th "
    "thead title tr tt ul var applet basefont center dir font frame frameset iframe isindex "
    "menu noframes s strike u").split())
# rendered but not counted as valid elements
HTML_TRICKS = frozenset(("bgsound", "embed", "listing", "plaintext", "xmp"))
# elements whose start and end insert whitespace into the rendered text, and how much
_WHITESPACE_OF = {**{t: "\n" for t in ("br", "div")},
                  **{t: " " for t in ("li", "th", "td", "dt", "dd", "embed", "h1", "h2", "h3",
                                      "h4", "h5", "h6")},
                  **{t: "\n\n" for t in ("p", "hr", "blockquote", "pre", "listing",
                                         "plaintext", "xmp", "title")}}
_PUNCT_OR_SPACE = r"\s\x21-\x2f\x3a-\x40\x5b-\x60\x7b-\x7e"
_WORD_START = re.compile(rf"^[^{_PUNCT_OR_SPACE}]", re.S)
_WORD_END = re.compile(rf"[^{_PUNCT_OR_SPACE}]\Z", re.S)
_NAMESPACED = re.compile(r"^(?:o|st\d):[\w-]+/?$")
_SELF_CLOSING = re.compile(r"<(\w+)\s*/>")
_COMMENTS = re.compile(r"<!--.*?-->|<!(?!--|\[|doctype)[^>]*>", re.S | re.I)
_DECLARATIONS_NOT_COMMENTS = re.compile(r"<!(?!--|\[|doctype)[^>]*>", re.S | re.I)


@dataclass
class HtmlInventory:
    """What HTML.pm records for one text/html part (the keys html_* evals read)."""
    length: int = 0                    # characters of HTML source
    tags: int = 0
    elements: int = 0
    tags_seen: int = 0
    elements_seen: int = 0
    closed_extra: int = 0
    inside: dict[str, int] = field(default_factory=dict)
    comment: list[str] = field(default_factory=list)
    anchor: list[str] = field(default_factory=list)
    title: list[str] = field(default_factory=list)
    image_area: int = 0
    non_space_len: int = 0
    obfuscation: int = 0
    rendered: str = ""
    flags: set[str] = field(default_factory=lambda: {"html"})

    def value(self, key: str) -> Any:
        """An HTML.pm result by name; None where HTML.pm would not set it."""
        if key == "length":
            return self.length
        if key == "image_area":
            return self.image_area
        if key == "non_space_len":
            return self.non_space_len
        if key == "closed_extra_ratio":
            return self.closed_extra / self.tags if self.tags else None
        if key == "bad_tag_ratio":
            return (self.tags - self.elements) / self.tags if self.tags else None
        if key == "obfuscation_ratio":
            return self.obfuscation / self.tags if self.tags and self.obfuscation else None
        if key == "non_element_ratio":
            return ((self.tags_seen - self.elements_seen) / self.tags_seen
                    if self.tags_seen else None)
        if key in ("comment", "anchor", "title"):
            return getattr(self, key)
        return 1 if key in self.flags else None


class _InventoryParser(html.parser.HTMLParser):
    def __init__(self, inv: HtmlInventory):
        super().__init__(convert_charrefs=True)
        self.inv = inv
        self.text: list[str] = []            # rendered pieces, as HTML.pm's display_text
        self.whitespace: list[bool] = []     # which pieces are inserted whitespace

    def _display(self, text: str, whitespace: bool) -> None:
        if whitespace:
            if self.text and not self.whitespace[-1] and self.text[-1].endswith(" "):
                self.text[-1] = self.text[-1][:-1]
        else:
            text = re.sub(r"[ \t\n\r\f\x0b]+|\xa0", " ", text)
            if self.text and self.whitespace[-1] and text.startswith(" "):
                text = text[1:]
        self.text.append(text)
        self.whitespace.append(whitespace)

    def _tag(self, tag: str, attrs: list[tuple[str, str | None]], num: int) -> None:
        inv = self.inv
        namespaced = bool(_NAMESPACED.match(tag))
        if tag in HTML_ELEMENTS or namespaced:
            inv.elements += 1
            if tag not in inv.inside:
                inv.elements_seen += 1
        inv.tags += 1
        if tag not in inv.inside:
            inv.tags_seen += 1
        inv.inside[tag] = inv.inside.get(tag, 0) + num
        if inv.inside[tag] < 0:
            inv.inside[tag] = 0
            inv.closed_extra += 1
        if tag in _WHITESPACE_OF and (tag in HTML_ELEMENTS or tag in HTML_TRICKS):
            self._display(_WHITESPACE_OF[tag], True)
        if namespaced or num < 0:
            return
        attr = {k.lower(): (v or "") for k, v in attrs}
        if tag == "img" and inv.inside.get("a", 0) > 0 and inv.anchor:
            inv.anchor[-1] += "<img>\n"
        if tag == "img" and "width" in attr and "height" in attr:
            width = _img_dimension(attr["width"], 8)
            height = _img_dimension(attr["height"], 6)
            inv.image_area += (width if width > 0 else 200) * (height if height > 0 else 200)
        if tag == "form" and "mailto:" in attr.get("action", "").lower():
            inv.flags.add("form_action_mailto")
        if tag in ("object", "embed"):
            inv.flags.add("embeds")
        if tag == "a":
            inv.anchor.append("")
        if tag == "title":
            inv.title.append("")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, attrs, +1)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, attrs, +1)       # HTML::Parser reads <x a=b /> as a start tag

    def handle_endtag(self, tag: str) -> None:
        self._tag(tag, [], -1)

    def handle_decl(self, decl: str) -> None:
        if decl.lower().startswith("doctype"):
            self.inv.elements += 1
            self.inv.tags += 1
            self.inv.inside["!doctype"] = 0

    def handle_data(self, data: str) -> None:
        inside = self.inv.inside
        if inside.get("script", 0) > 0 or inside.get("style", 0) > 0:
            return
        if inside.get("a", 0) > 0 and self.inv.anchor:
            self.inv.anchor[-1] += data
        if inside.get("title", 0) > 0 and self.inv.title:
            self.inv.title[-1] += data
        if self.text and _WORD_START.search(data) and _WORD_END.search(self.text[-1]):
            self.inv.obfuscation += 1        # a word split by a tag: "V<b></b>iagra"
        self._display(data, False)


def _img_dimension(value: str, percent_factor: int) -> int:
    m = re.fullmatch(r"(\d+)(%)?", value)
    if not m:
        return 0
    return int(m.group(1)) * (percent_factor if m.group(2) else 1)


_COMMENT_CLOSE = re.compile(r"--\s*>")     # where html.parser ends a comment


def _comments(source: str) -> list[str]:
    """_COMMENTS.findall(source), linear: "<!--" past the last "-->" and "<!" past the last
    ">" can match nothing, and the regex would try each of them to the end of the text."""
    cut = source.rfind("-->")
    cut = cut + 3 if cut >= 0 else 0
    tail = source[cut:source.rfind(">") + 1] if source.rfind(">") >= cut else ""
    return _COMMENTS.findall(source[:cut]) + _DECLARATIONS_NOT_COMMENTS.findall(tail)


def _closed_markup(text: str) -> str:
    """The markup with every "<" that can never be closed written as "&lt;": a "<" after the
    last ">", and a "<!--" after the last comment end. html.parser (before Python 3.13.4 /
    3.12.11) rescans to the end of the text for each of them when it is closed, which made
    1 MiB of "<a" or "<!--" cost minutes; as "&lt;" it is the text it renders anyway."""
    last = text.rfind(">")
    if "<" in text[last + 1:]:
        text = text[:last + 1] + text[last + 1:].replace("<", "&lt;")
    last_close = None
    for last_close in _COMMENT_CLOSE.finditer(text):
        pass
    start = last_close.start() - 3 if last_close is not None else 0
    if "<!--" in text[max(start, 0):]:
        # an opener whose "--" begins at or before the last close still reaches it
        keep = max(start, 0)
        text = text[:keep] + text[keep:].replace("<!--", "&lt;!--")
    return text


def html_inventory(source: str) -> HtmlInventory:
    """HTML.pm's results for one text/html part (tag counts, comments, anchors, titles...)."""
    inv = HtmlInventory(length=len(source))
    inv.comment = _comments(source)
    text = _closed_markup(_SELF_CLOSING.sub(r"<\1>", source.replace("&nbsp;", " ")))
    parser = _InventoryParser(inv)
    try:
        parser.feed(text)
        parser.close()
    except Exception:        # html.parser is lenient; a failure leaves what was read so far
        pass
    rendered = inv.rendered = "".join(parser.text)
    inv.non_space_len = len(rendered) - sum(1 for c in rendered if c.isspace())
    return inv


# --- texts as SpamAssassin presents them to rules that count their matches ----------------------
MAX_BODY_LINE_LENGTH = 2048


def sa_body_lines(view: MessageView) -> list[str]:
    """The lines `body` rules run on: the Subject line, then one line per paragraph of the
    rendered text parts, whitespace runs squeezed to one space (Message::get_body_text_array)."""
    rendered = []
    for part in view.text_parts:
        if part.content_type == "text/html":
            rendered.append(html_inventory(part.text).rendered if part.text else "")
        elif part.content_type == "text/plain":
            rendered.append(part.text)
    text = "\n".join(rendered)
    text = re.sub(r"\n+\s*\n+", "\x00", text)
    text = re.sub(r"\s+", " ", text).replace("\x00", "\n")
    subject = view.first("Subject")
    lines: list[str] = []
    for line in ((subject + "\n" if subject else "\n") + text).splitlines(keepends=True):
        while len(line) > MAX_BODY_LINE_LENGTH:
            cut = line.rfind(" ", 0, MAX_BODY_LINE_LENGTH) + 1 or MAX_BODY_LINE_LENGTH
            lines.append(line[:cut])
            line = line[cut:]
        lines.append(line)
    return lines


def sa_rawbody_chunks(view: MessageView) -> list[str]:
    """What `rawbody` rules run on: each decoded text part, in chunks of about 2 KB cut after
    a newline (Message::split_into_array_of_short_paragraphs, simplified)."""
    chunks: list[str] = []
    for part in view.text_parts:
        text = part.text
        while len(text) > 2 * MAX_BODY_LINE_LENGTH:
            cut = text.find("\n", MAX_BODY_LINE_LENGTH)
            if cut < 0 or cut + 1 > 2 * MAX_BODY_LINE_LENGTH:
                cut = 2 * MAX_BODY_LINE_LENGTH - 1
            chunks.append(text[:cut + 1])
            text = text[cut + 1:]
        chunks.append(text)
    return chunks


_MAILTO_HREF = re.compile(r"""href\s*=\s*["']?\s*mailto:([^"'>\s]+)""", re.I)


_PERCENT_ESCAPE = re.compile(r"(%[0-9a-fA-F]{2})")
# an escape SpamAssassin's url_encode keeps: its unanchored test finds 20, 7f or a pair whose
# first digit is 0, 1, 8, 9 or a-f anywhere in "%XX" (so %2E, %2F, %3A are decoded, %0A, %A5 not)
_KEPT_ESCAPE = re.compile(r"20|7f|[0189a-f][0-9a-f]", re.I)
_NEEDS_ESCAPE = re.compile(r'[\x00-\x20\x7f"%<>]')


def _sa_percent_decoded(uri: str) -> str:
    """The URI with its printable %-escapes decoded and its control, space, `"`, `%`, `<`, `>`
    and non-ASCII characters escaped, as SpamAssassin's Util::url_encode (misnamed) does."""
    out = []
    for piece in _PERCENT_ESCAPE.split(uri):
        if _PERCENT_ESCAPE.fullmatch(piece):
            out.append(piece if _KEPT_ESCAPE.search(piece) else chr(int(piece[1:], 16)))
        elif piece.isascii() and not _NEEDS_ESCAPE.search(piece):
            out.append(piece)
        else:
            # SpamAssassin sees octets: a non-ASCII character is escaped byte by byte
            out.append("".join(f"%{byte:02x}" if byte > 0x7e or byte <= 0x20 or byte in b'"%<>'
                               else chr(byte) for byte in piece.encode("utf-8", "replace")))
    return "".join(out)


def sa_canonical_uri(uri: str) -> str:
    """The copy SpamAssassin's uri_list_canonicalize adds to its URI list for `uri` (the first
    steps: backslashes as slashes, `http:host` as `http://host`, %-escapes decoded, a missing
    scheme as http://, `host?q` as `host/?q`, printable &#N; entities decoded); the hostname
    variants it adds after that are not modelled."""
    canonical = uri.replace("\\", "/")
    canonical = re.sub(r"^(https?:)/{0,2}", r"\1//", canonical, flags=re.I)
    if _PERCENT_ESCAPE.search(canonical):
        canonical = _sa_percent_decoded(canonical)
    if not re.match(r"[-_a-z0-9]+:", canonical, re.I):
        canonical = ("ftp://" if canonical.startswith("ftp.") else "http://") + canonical
    canonical = re.sub(r"^(https?://[^/?#]+)([?#])", r"\1/\2", canonical, flags=re.I)
    canonical = re.sub(r"&#0*(3[3-9]|[4-9]\d|1[01]\d|12[0-6]);",
                       lambda m: chr(int(m.group(1))), canonical)
    canonical = re.sub(r"&#x0*(2[1-9]|[3-6][a-fA-F0-9]|7[0-9a-eA-E]);",
                       lambda m: chr(int(m.group(1), 16)), canonical)
    return re.sub(r"&#(?:x2e|12290|x3002|65294|xff0e|65377|xff61);", ".", canonical, flags=re.I)


_DECLARATION = re.compile(r"<![^>]*>")
_DECLARATION_NOT_COMMENT = re.compile(r"<!(?!--)[^>]*>")
# characters _declaration_only_urls may compare (URLs x text): each URL is searched for in the
# whole text, so 100,000 URLs in 1 MB would be 10^11; about 0.1 s of str.find at this size
DECLARATION_SEARCH_LIMIT = 100_000_000


def _declarations(text: str) -> tuple[list[str], str]:
    """The declarations of some HTML and the HTML without them, in one pass: only up to the
    last ">" (the regex would try each "<!" after it to the end), and past the last "-->" an
    unclosed "<!--" is no declaration (it would take everything up to the next ">", URLs
    included, out of the URI list)."""
    end = text.rfind(">") + 1
    cut = text.rfind("-->", 0, end)
    cut = cut + 3 if cut >= 0 else 0
    head, tail, rest = text[:cut], text[cut:end], text[end:]
    found = _DECLARATION.findall(head) + _DECLARATION_NOT_COMMENT.findall(tail)
    return found, (_DECLARATION.sub(" ", head) + _DECLARATION_NOT_COMMENT.sub(" ", tail) + rest)


def _declaration_only_urls(view: MessageView) -> set[str]:
    """URLs of view.urls that appear only inside HTML declarations (`<!DOCTYPE ... "http://
    www.w3.org/TR/...">`): SpamAssassin's HTML parser takes URIs from tag attributes and the
    rendered text, neither of which holds a declaration's."""
    declarations, rest = [], []
    for part in view.text_parts:
        if part.content_type == "text/html" and "<!" in part.text:
            found, others = _declarations(part.text)
            declarations.extend(found)
            rest.append(others)
        else:
            rest.append(part.text)
    if not declarations:
        return set()
    declared_text, other_text = "\n".join(declarations), "\n".join(rest)
    urls = view.urls
    if len(urls) * (len(declared_text) + len(other_text)) > DECLARATION_SEARCH_LIMIT:
        return set()     # past the cap every URL stays in the list: none is hidden
    return {url for url in urls if url in declared_text and url not in other_text}


def sa_uris(view: MessageView) -> list[str]:
    """The URIs `uri` rules see: the message's URLs (but those only an HTML declaration holds),
    each followed by SpamAssassin's canonical copy when that differs (sa_canonical_uri:
    %-decoded hosts such as `http://%64%38...` -> `http://d8...`), plus, as SpamAssassin's URI
    list has them, every e-mail address of the text parts and every mailto: link as
    `mailto:ADDRESS`."""
    out: dict[str, None] = {}
    declared = _declaration_only_urls(view)
    for url in view.urls:
        if url in declared:
            continue
        out.setdefault(url, None)
        if not url.lower().startswith("mailto:") and "@" not in url.split(":", 1)[0]:
            out.setdefault(sa_canonical_uri(url.strip()), None)
    for part in view.text_parts:
        text = part.text
        if part.content_type == "text/html":
            for found in _MAILTO_HREF.finditer(text):
                out.setdefault("mailto:" + html.unescape(found.group(1)), None)
        if "@" in text:  # the address regex costs ~60 steps at every character
            for found in _EMAIL.finditer(text):
                out.setdefault("mailto:" + found.group(1), None)
    return list(out)


def _regex_flags(flags: str) -> int:
    return ((rx.I if "i" in flags else 0) | (rx.S if "s" in flags else 0)
            | (rx.M if "m" in flags else 0) | (rx.X if "x" in flags else 0))


_COMPILED: dict[tuple[str, str], Any] = {}


def _compiled(pattern: str, flags: str = "") -> Any:
    """The rule's regex, compiled once per process (the ReplaceTags alternations are large;
    the regex module's own cache is smaller than an imported rule set)."""
    key = (pattern, flags)
    found = _COMPILED.get(key)
    if found is None:
        found = _COMPILED[key] = rx.compile(pattern, _regex_flags(flags))
    return found


def count_matches(m: "_Message", kind: str, pattern: str, flags: str, maxhits: int,
                  header: str = "") -> int:
    """How many times a `tflags multiple` rule matches, up to maxhits (0: no limit); metas
    compare that count (`__BODY_TEXT_LINE < 3`)."""
    view = m.view
    if kind == "body":
        texts = m.body_lines
    elif kind == "rawbody":
        texts = sa_rawbody_chunks(view)
    elif kind == "uri":
        texts = m.uris
    elif kind == "full":
        texts = [view.raw.decode("utf-8", "replace")]
    elif kind == "header":
        values = view.header(header)
        texts = ["\n".join(values) + "\n"] if values else []
    else:
        raise ValueError(f"count of {kind} rules is not supported")
    compiled = _compiled(pattern, flags)
    hits = 0
    for text in texts:
        for _match in compiled.finditer(text):
            hits += 1
            if maxhits and hits >= maxhits:
                return hits
    return hits


# --- the evals ---------------------------------------------------------------------------------
@dataclass
class _Message:
    """Per-message values several evals share, computed on first use."""
    view: MessageView
    _relays: list[SaRelay] | None = None
    _html: list[HtmlInventory] | None = None
    _envfrom: str | None = None
    _body_lines: list[str] | None = None
    _uris: list[str] | None = None

    @property
    def uris(self) -> list[str]:
        if self._uris is None:
            self._uris = sa_uris(self.view)
        return self._uris

    @property
    def body_lines(self) -> list[str]:
        if self._body_lines is None:
            self._body_lines = sa_body_lines(self.view)
        return self._body_lines

    @property
    def relays(self) -> list[SaRelay]:
        if self._relays is None:
            self._relays = sa_relays(self.view)
        return self._relays

    @property
    def html(self) -> list[HtmlInventory]:
        if self._html is None:
            self._html = [html_inventory(p.text) for p in self.view.parts
                          if p.content_type == "text/html" and p.text]
        return self._html

    @property
    def envelope_from(self) -> str:
        if self._envfrom is None:
            self._envfrom = _addr_of(envelope_from(self.view, self.relays))
        return self._envfrom


# zone names SpamAssassin's date parser knows (Util::parse_rfc822_date), offsets in minutes
_TZ_MINUTES = {
    "UT": 0, "UTC": 0, "GMT": 0, "WET": 0, "NDT": -150, "AST": -240, "ADT": -180, "NST": -210,
    "EST": -300, "EDT": -240, "CST": -360, "CDT": -300, "MST": -420, "MDT": -360, "PST": -480,
    "PDT": -420, "HST": -600, "AKST": -540, "AKDT": -480, "HADT": -540, "HAST": -600,
    "BST": 60, "IST": 60, "WEST": 60, "CET": 60, "CEST": 120, "EET": 120, "EEST": 180,
    "MSK": 180, "MSD": 240, "MET": 60, "MEZ": 60, "MEST": 120, "MESZ": 120, "BRST": -120,
    "BRT": -180, "AEST": 600, "AEDT": 660, "ACST": 570, "ACDT": 630, "AWST": 480, "NZST": 720,
    "NZDT": 780, "JST": 540, "KST": 540, "HKT": 480, "SGT": 480, "PHT": 480, "IDT": 180}
_MONTHS = {m: i for i, m in enumerate(
    "jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)}
_MON = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"


def _rfc822_time(text: str) -> float | None:
    """A date as SpamAssassin's lenient parser reads it: day, month, year; an optional time;
    a zone only as +hhmm/-hhmm or a known name (anything else counts as UTC); out-of-range
    fields clamped. None when no day, month and year are found."""
    import calendar
    work = " " + re.sub(r"\s+", " ", re.sub(r", *", " ", text)) + " "
    m = re.search(rf" (\d+) {_MON} (\d{{4}}) ", work, re.I)
    if m:
        day, month, year = m.group(1), m.group(2), m.group(3)
    else:
        m = re.search(rf" {_MON} +(\d+) \d+:\d+:\d+ (\d{{4}}) ", work, re.I)
        if m:
            month, day, year = m.group(1), m.group(2), m.group(3)
        else:
            m = re.search(rf" (\d+) {_MON} (\d{{2,3}}) ", work, re.I)
            if not m:
                return None
            day, month, year = m.group(1), m.group(2), m.group(3)
    work = work[:m.start()] + " " + work[m.end():]
    yyyy = int(year)
    if len(year) == 2 and yyyy < 50:
        yyyy += 2000
    elif len(year) != 4:
        yyyy += 1900
    hh = mm = ss = 0
    t = re.search(r" (\d?\d):(\d\d)(?::(\d\d))? ", work)
    if t:
        hh, mm, ss = int(t.group(1)), int(t.group(2)), int(t.group(3) or 0)
        work = work[:t.start()] + " " + work[t.end():]
    offset = 0
    z = re.search(r" ([-+])(\d\d)(\d\d) ", work)
    if z:
        offset = (int(z.group(2)) * 60 + int(z.group(3))) * (-1 if z.group(1) == "-" else 1)
    else:
        name = re.search(r"\b([A-Z]{2,4}(?:-DST)?)\b", work)
        if name and name.group(1) in _TZ_MINUTES:
            offset = _TZ_MINUTES[name.group(1)]
    mon = _MONTHS[month.lower()]
    ss, mm, hh = min(ss, 59), min(mm, 59), min(hh, 23)
    dd = int(day)
    if dd > calendar.monthrange(max(1970, min(yyyy, 2037)), mon)[1]:
        dd, mon = 1, mon + 1
        if mon > 12:
            mon, yyyy = 1, yyyy + 1
    yyyy = max(1970, min(yyyy, 2037))
    try:
        stamp = calendar.timegm((yyyy, mon, max(dd, 1), hh, mm, ss, 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    return float(max(0, stamp - offset * 60))


_RCVD_DATE = re.compile(r"(\s.?\d+ \S\S\S \d+ \d+:\d+:\d+ \S+)")


def date_diff(view: MessageView) -> float:
    """Seconds the Date header is ahead of the Received header times, SpamAssassin's way
    (HeaderEval::_check_date_diff): the smallest difference by absolute value, ignoring the
    oldest hop's when it is exactly 0 and the local delivery + fetchmail hops; 0 when either
    side is missing."""
    date_time = None
    for header in ("Resent-Date", "Date"):
        for value in view.header(header):
            if value.strip():
                date_time = _rfc822_time(value.strip())
            if date_time is not None:
                break
        if date_time is not None:
            break
    if date_time is None:
        return 0.0
    received = [" ".join(r.split()) for r in view.header("Received") if r.strip()]
    if received and (re.search(r"\bfrom (?:localhost\s|(?:\S+ ){1,2}\S*\b127\.0\.0\.1\b)",
                               received[0])
                     or re.search(r"qmail \d+ invoked by uid \d+", received[0])):
        if len(received) > 1 and re.search(r"\bby localhost with \w+ \(fetchmail-[\d.]+",
                                           received[1]):
            received = received[2:]
    times = []
    for value in received:
        found = _RCVD_DATE.search(value)
        if found:
            stamp = _rfc822_time(found.group(1))
            if stamp is not None:
                times.append(stamp)
    if not times:
        return 0.0
    diffs = [date_time - t for t in times]
    if len(diffs) > 1 and diffs[-1] == 0:
        diffs.pop()
    return sorted(diffs, key=abs)[0]


def _split_domain(domain: str) -> str:
    return registered_domain(domain) or domain


def mailfrom_matches_rcvd(m: _Message) -> bool:
    sender = m.envelope_from
    dm = re.search(r"@([^@]+\.[^@]+)$", sender)
    if not dm:
        return False
    untrusted = [r for r in m.relays if not r.trusted]
    relays = untrusted[:1] if untrusted else [r for r in m.relays if r.trusted]
    sender_domain = _split_domain(dm.group(1).lower())
    return any(r.rdns and _split_domain(r.rdns.lower()) == sender_domain for r in relays)


def _body_length(view: MessageView) -> int:
    raw = view.raw
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            return len(raw) - i - len(sep)
    return 0


def to_in_subject(view: MessageView, how: str) -> bool:
    full_to = first_addr(view, "To")
    if not full_to:
        return False
    subject = view.first("Subject")
    if how == "address":
        return bool(re.search(r"\b" + re.escape(full_to) + r"\b", subject, re.I))
    to = re.escape(full_to.split("@", 1)[0])
    return bool(re.match(r"(?:(?:re|fw):\s*(?:\w+\s+)?" + to + r"$"
                         r"|(?-i:" + to + r")\s*[,:;!?-](?:$|\s)"
                         r"|" + to + r"$"
                         r"|,\s*" + to + r"[,:;!?-]$)", subject, re.I))


def _all_from_addrs(m: _Message) -> list[str]:
    resent = first_addr(m.view, "Resent-From")
    if resent:
        return [resent]
    addrs = [first_addr(m.view, h) for h in ("From", "Envelope-Sender", "Resent-Sender",
                                             "X-Envelope-From")] + [m.envelope_from]
    return list(dict.fromkeys(re.sub(r"\.+", ".", a) for a in addrs if a))


def _glob_match(patterns: Sequence[str], addr: str) -> bool:
    addr = addr.lower()
    return any(fnmatch.fnmatchcase(addr, p.lower()) for p in patterns)


_EMAIL = re.compile(r"([a-z0-9](?:[a-z0-9!#$%&'*+/=?^_`{|}~.-]{0,62}[a-z0-9!#$%&'*+/=?^_`{|}~-])?"
                    r"@[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}"
                    r"[a-z0-9])?)*\.[a-z]{2,})", re.I)
_SKIP_REPLYTO_ENVFROM = re.compile(
    r"^(?:post|host|domain)master|^double-bounce|^(?:sentto|owner|return|(?:gr)?bounced?)"
    r"[-+]|^(?:bounce|request)s?@|^[^@]+-bounces?@|^(?:mailer|mail-daemon)@", re.I)


# role and bounce addresses FreeMail never counts as freemail senders
_FREEMAIL_NOT_A_PERSON = re.compile(
    r"^(?:abuse|support|sales|info|helpdesk|contact|kontakt|(?:post|host|domain)master"
    r"|undisclosed.*|request-[a-f0-9]{16}|bounced?-|[a-f0-9]{8}(?:\.[a-f0-9]{8}"
    r"|-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12})|.+=.+=.+)@", re.I)


class _Freemail:
    def __init__(self, domains: Sequence[str]):
        self.exact = {d.lower() for d in domains if "*" not in d and "?" not in d}
        self.globs = [d.lower() for d in domains if "*" in d or "?" in d]

    def __call__(self, addr: str) -> bool:
        if "@" not in addr or _FREEMAIL_NOT_A_PERSON.search(addr):
            return False
        domain = addr.rsplit("@", 1)[1].lower()
        return domain in self.exact or any(fnmatch.fnmatchcase(domain, g) for g in self.globs)


def freemail_replyto(m: _Message, what: str, is_freemail: _Freemail) -> bool:
    envfrom = m.envelope_from
    if envfrom and _SKIP_REPLYTO_ENVFROM.search(envfrom):
        return False
    from_addrs = [a.lower() for a in (first_addr(m.view, "From"),) if a]
    replyto_addrs = [a.lower() for a in (first_addr(m.view, "Reply-To"),) if a]
    from_fm = any(is_freemail(a) for a in from_addrs)
    replyto_fm = any(is_freemail(a) for a in replyto_addrs)
    from_not_in_replyto = not any(a in replyto_addrs for a in from_addrs)
    if from_fm and replyto_fm and from_not_in_replyto:
        return True
    if what == "replyto" and not replyto_fm:
        return False
    if what == "reply" and (replyto_addrs and not replyto_fm or not from_fm):
        return False
    body_emails: list[str] = []
    for url in m.view.urls:
        if url.lower().startswith("mailto:"):
            found = _EMAIL.match(url[7:])
            if found and found.group(1).lower() not in body_emails:
                body_emails.append(found.group(1).lower())
    for text in m.view.plain_texts:
        text = re.sub(r"<?https?://\S{0,255}(?:@|%40)\S{0,255}", " ", text, flags=re.I)
        for found in _EMAIL.finditer(text):
            email_addr = found.group(1).lower()
            if email_addr not in body_emails:
                body_emails.append(email_addr)
    body_fm = [e for e in body_emails[:5] if is_freemail(e)][:3]
    reply = replyto_addrs if what == "replyto" or replyto_fm else from_addrs
    return any(b != r for b in body_fm for r in reply)


def _html_any(m: _Message, predicate: Any) -> bool:
    return any(predicate(inv) for inv in m.html)


def _compare(value: float, expr: str) -> bool:
    """HTMLEval's `$val $expr` for expressions like '< 384', '!= 0', '>= 2'."""
    em = re.fullmatch(r"\s*(==|!=|<=|>=|<|>)\s*([-+]?\d+)\s*", expr)
    if not em:
        raise ValueError(f"unsupported comparison {expr!r}")
    op, number = em.group(1), float(em.group(2))
    return {"==": value == number, "!=": value != number, "<=": value <= number,
            ">=": value >= number, "<": value < number, ">": value > number}[op]


def _in_range(value: Any, low: str, high: str) -> bool:
    if high in ("", "inf"):
        return float(value) > float(low)
    return float(low) < float(value) <= float(high)


def run_test(m: _Message, test: Sequence[str], data: Mapping[str, Any]) -> int:
    """One eval: test, [name, args...], over the message: 0 when false, else its value (1, or
    the match count of a `count` test)."""
    name, args = test[0], list(test[1:])
    if name == "count":
        return count_matches(m, args[0], args[1], args[2], int(args[3] or 0),
                             args[4] if len(args) > 4 else "")
    if name == "body":
        compiled = _compiled(args[0], args[1] if len(args) > 1 else "")
        return int(any(compiled.search(line) for line in m.body_lines))
    if name == "uri":
        compiled = _compiled(args[0], args[1] if len(args) > 1 else "")
        return int(any(compiled.search(uri) for uri in m.uris))
    return int(bool(_run_bool(m, name, args, data)))


def _run_bool(m: _Message, name: str, args: list[str], data: Mapping[str, Any]) -> bool:
    view = m.view
    if name == "check_mailfrom_matches_rcvd":
        return mailfrom_matches_rcvd(m)
    if name == "check_for_matching_env_and_hdr_from":
        return m.envelope_from.lower() == first_addr(view, "From").lower()
    if name == "check_for_to_in_subject":
        return to_in_subject(view, args[0])
    if name == "check_for_shifted_date":
        diff = date_diff(view)
        return ((args[0] == "undef" or diff >= 3600 * float(args[0]))
                and (args[1] == "undef" or diff < 3600 * float(args[1])))
    if name == "image_count":
        kind = args[0]
        count = 0
        for part in view.parts:
            found = re.fullmatch(r"image/(gif|png|jpe?g)", part.content_type or "")
            if not found or (part.transfer_encoding or "").strip().lower() != "base64":
                continue
            image = "jpeg" if found.group(1) in ("jpg", "jpeg") else found.group(1)
            count += kind in ("all", image)
        return count >= int(args[1]) and (len(args) < 3 or count <= int(args[2]))
    if name == "check_body_length":
        return _body_length(view) <= int(args[0])
    if name == "check_from_in_list":
        patterns = data.get("lists", {}).get(args[0], [])
        return any(_glob_match(patterns, a) for a in _all_from_addrs(m))
    if name == "check_freemail_from":
        pattern = rx.compile(args[0]) if args else None
        return any(data["freemail_matcher"](a) and (pattern is None or pattern.search(a))
                   for a in (x.lower() for x in _all_from_addrs(m)))
    if name == "check_freemail_replyto":
        return freemail_replyto(m, args[0] if args else "replyto",
                                data["freemail_matcher"])
    if name == "gated_through_received_hdr_remover":
        received = view.header("Received")
        mailing_list = "\n".join(view.header("Mailing-List"))
        if re.search(r"^contact \S+@\S+; run by ezmlm$", mailing_list, re.M):
            if re.search(r"^mailing list \S+@\S+", "\n".join(view.header("Delivered-To")),
                         re.M) and re.search(r"qmail \d+ invoked (?:from network|by .{3,20})\);"
                                             r" \d+ ... \d+", "\n".join(received)):
                return True
        if not received:
            return True
        return any(re.search(r"from groups\.msn\.com \(\S+\.msn\.com ", r) for r in received)
    if name == "html_test":
        return _html_any(m, lambda inv: inv.value(args[0]))
    if name == "html_range":
        key, low, high = args[0], args[1], (args[2] if len(args) > 2 else "inf")
        return _html_any(m, lambda inv: inv.value(key) is not None
                         and _in_range(inv.value(key), low, high))
    if name == "html_eval":
        return _html_any(m, lambda inv: inv.value(args[0]) is not None
                         and _compare(float(inv.value(args[0])), args[1]))
    if name == "html_image_only":
        low, high = float(args[0]), float(args[1])
        return _html_any(m, lambda inv: "img" in inv.inside and low < inv.length <= high)
    if name == "html_image_ratio":
        low, high = float(args[0]), float(args[1])
        return _html_any(m, lambda inv: inv.image_area > 0
                         and low < inv.non_space_len / inv.image_area <= high)
    if name == "html_tag_balance":
        return _html_any(m, lambda inv: args[0] in inv.inside
                         and _compare(inv.inside[args[0]], args[1]))
    if name == "html_text_match":
        pattern = _compiled(args[1])
        return _html_any(m, lambda inv: any(pattern.search(s) for s in inv.value(args[0]) or ()))
    if name == "relay_header":
        header, pattern, flags = args[0], args[1], args[2] if len(args) > 2 else ""
        negate = len(args) > 3 and args[3] == "negate"
        # an absent pseudo-header reads as '' (SpamAssassin matches the empty string)
        if header.startswith("ALL-"):
            value = headers_below_trust(view, m.relays, header) or ""
        else:
            value = relay_pseudo_header(m.relays, header) or ""
        return bool(_compiled(pattern, flags).search(value)) != negate
    raise ValueError(f"unknown SpamAssassin eval {name!r}")


# Evals this module implements, with the arguments each accepts (sa_import checks a rule's call
# against this before binding it)
IMPLEMENTED = {
    "check_mailfrom_matches_rcvd", "check_for_matching_env_and_hdr_from",
    "check_for_to_in_subject", "check_body_length", "check_from_in_list",
    "check_for_shifted_date", "image_count",
    "check_freemail_replyto", "check_freemail_from", "gated_through_received_hdr_remover", "html_test", "html_range",
    "html_eval", "html_image_only", "html_image_ratio", "html_tag_balance", "html_text_match",
}
COUNTED_KINDS = ("body", "rawbody", "uri", "full", "header")
HTML_VALUES = {"length", "closed_extra_ratio", "bad_tag_ratio", "non_element_ratio",
               "image_area", "non_space_len", "obfuscation_ratio"}
HTML_FLAGS = {"html", "embeds", "form_action_mailto"}
HTML_TEXTS = {"comment", "anchor", "title"}


def evaluate(view: MessageView, tests: Mapping[str, Sequence[str]],
             lists: Mapping[str, Sequence[str]] | None = None,
             freemail: Sequence[str] = ()) -> list[str]:
    """The names of `tests` ({rule: [eval, args...]}) that are true for the message."""
    return list(evaluate_with_errors(view, tests, lists, freemail)[0])


def evaluate_with_errors(view: MessageView, tests: Mapping[str, Sequence[str]],
                         lists: Mapping[str, Sequence[str]] | None = None,
                         freemail: Sequence[str] = ()
                         ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """({true test: its value}, [(test name, error)]): one broken test never hides the others."""
    m = _Message(view)
    data: dict[str, Any] = {"lists": lists or {}, "freemail_matcher": _Freemail(freemail)}
    hits: dict[str, int] = {}
    errors: list[tuple[str, str]] = []
    for name, test in tests.items():
        try:
            value = run_test(m, test, data)
        except Exception as exc:     # a bad argument or regex in the rule file, not the mail
            errors.append((name, f"{type(exc).__name__}: {exc}"))
            continue
        if value:
            hits[name] = value
    return hits, errors


@check("sa.evals", phase=Phase.MAIN, symbols=("RULE_ERROR",))
def sa_evals(msg: MessageView, ctx: ScanContext, *, tests: Mapping[str, Sequence[str]],
             lists: Mapping[str, Sequence[str]] | None = None,
             freemail: Sequence[str] = ()) -> list[Symbol]:
    hits, errors = evaluate_with_errors(msg, tests, lists, freemail)
    out: list[Symbol] = []
    for name, value in hits.items():
        # the meta check counts symbols by name: a `__` counting helper is emitted once per
        # match so metas read its count; a scored rule once (it scores once, as in SpamAssassin)
        out.extend([Symbol(name)] * (value if name.startswith("__") else 1))
    out.extend(Symbol("RULE_ERROR", (name, reason)) for name, reason in errors)
    return out
