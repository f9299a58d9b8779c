"""Turn a parsed message into the bounded set of tokens the Bayes classifier learns and reads.

Trusts: nothing in the message. Reads only the `MessageView` (decoded text, HTML as visible text,
subject, a fixed allow-list of headers, URLs, attachment names/types); no settings of its own:
the caller passes `max_tokens` (bayes.max_tokens) and `bigrams` (bayes.bigrams).
Emits no symbols.

What is learned, and why:
  body words         lower-cased, NFKC-normalised, zero-width characters removed, mixed-script
                     look-alike letters folded to Latin, letter-spaced words ("v.i.a.g.r.a")
                     joined; words over 20 characters become a "skip" shape token, long digit
                     runs a length token (what SpamBayes found: the shape carries the signal).
  OSB bigrams        optional sparse word pairs inside a 3-word window ("B:w1 w3" skips one);
                     measured against unigrams in docs/bayes.md.
  subject            "S:" words (our own "***SPAM***" tag stripped, so a tagged copy of a
                     message tokenises like the original one and unlearning finds its tokens).
  headers            only an allow-list, each with its own prefix: From (address, domain, name
                     words), Reply-To and Return-Path domains, Message-ID domain and shape,
                     X-Mailer/User-Agent, recipient counts, Date time zone, Content-Type and
                     charsets, the last external relay's /16 and HELO shape, and per Received
                     hop ("R:") the sending /24 and the HELO and reverse-DNS domains.
  other headers      every header outside a deny list (_NEVER_LEARNED: the verdicts of other
                     filters, X-Spam-*, X-Virus-*, Authentication-Results, ..., and what the
                     receiving site adds on delivery, ../shared/notes/evaluation.md): its name
                     ("HN:") and, when no prefix above covers it, its first MAX_HEADER_WORDS
                     (4) words under its own name (a boilerplate value's words all carry the
                     same evidence; counting a dozen of them is counting one many times).
  URLs               host, registered domain, scheme and path words ("U:", "UD:", "UP:").
  attachments        file extension and sniffed type ("A:").
  HTML               the set of tag names used ("H:"), a cheap structure fingerprint.

Corpus obfuscation artifacts ("spamassassin.taint.org", the "zzzz"/"yyyy" address stand-ins of
the SpamAssassin corpus) are dropped wherever they occur: they identify the collection, not spam.
The result is a de-duplicated tuple of at most `max_tokens` tokens, in first-seen order.
"""

from __future__ import annotations

import re
import unicodedata
from itertools import islice
from typing import Iterable

from filterd.message import MessageView
from filterd.stores import encodable

__all__ = ["tokenize", "DEFAULT_MAX_TOKENS", "ARTIFACT_FRAGMENTS"]

DEFAULT_MAX_TOKENS = 3000
# How much decoded body text is read: the start of a message carries its signal, and the
# cost of tokenising a huge text part must stay bounded.
MAX_TEXT_CHARS = 200_000
MAX_WORD = 20
MIN_WORD = 3
MAX_RECEIVED = 8
# Tokens containing these are artifacts of how the public corpora were collected and
# anonymised; learning them would measure the corpus, not the mail.
ARTIFACT_FRAGMENTS = ("taint.org", "zzzz", "yyyy")
_ARTIFACT = re.compile("|".join(re.escape(f) for f in ARTIFACT_FRAGMENTS))

_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u200b\u200c\u200d\u200e\u200f\u2060\ufeff\u034f"))
# Cyrillic and Greek letters that look like Latin ones: folded only inside words that also
# hold ASCII letters, the usual trick to dodge word filters ("vіagra" with a Cyrillic і).
_CONFUSABLE = str.maketrans({
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i", "ј": "j",
    "ѕ": "s", "ԁ": "d", "ɡ": "g", "һ": "h", "ӏ": "l", "к": "k", "м": "m", "т": "t", "в": "b",
    "н": "h", "α": "a", "ο": "o", "ρ": "p", "ν": "v", "τ": "t", "ι": "i", "κ": "k", "υ": "u",
})
_HAS_ASCII_LETTER = re.compile(r"[a-z]")
_NON_ASCII_LETTER = re.compile(r"[^\x00-\x7f]")
# Four or more single letters/digits joined by one separator: "v.i.a.g.r.a", "f-r-e-e".
_SPACED_WORD = re.compile(r"(?:\w[.\-*]){3,}\w")
_SPACED_SEP = re.compile(r"[.\-*]")
# A word starts and ends with a letter, digit or currency sign and may hold ' . - $ inside:
# "don't", "$19.99", "e-mail" stay whole; surrounding punctuation falls away.
# Only words of MIN_WORD (3) or more characters match: shorter ones carry no signal, and
# leaving them to the regex engine is cheaper than filtering them in Python.
_WORD = re.compile(r"[^\W_$][\w'.$€£*\-]+[^\W_'.*\-]|[$€£][\d.,]+\d")
_LONG_DIGITS = re.compile(r"\d{5}")
_INVISIBLE_CHARS = re.compile("[" + "".join(map(chr, _INVISIBLE)) + "]")
_CONFUSABLE_CHARS = re.compile("[" + "".join(map(chr, _CONFUSABLE)) + "]")
_DIGITS = re.compile(r"\d+")
_SUBJECT_TAG = re.compile(r"^\s*\*{3}\s*spam\s*\*{3}\s*", re.I)
_HTML_TAG = re.compile(r"<\s*([a-zA-Z][a-zA-Z0-9]{0,10})\b")
_ADDR_DOMAIN = re.compile(r"@([A-Za-z0-9.\-]+)")
_URL_PARTS = re.compile(r"^(?:([a-z]+)://)?([^/:?#]+)(?::\d+)?([^?#]*)?(\?[^#]*)?", re.I)
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_PATH_WORD = re.compile(r"[a-z][a-z0-9\-]{2,19}")


# Single letters or digits spaced out to dodge word filters: "f r e e", "v.i.a.g.r.a",
# "c-i-a-l-i-s" (four or more, one separator kind each); joined before words are cut.
_SPACED_LETTERS = re.compile(r"(?<![\w.\-*])(?:\w ){3,}\w(?![\w.\-*])")
_SPACED_DOTS = re.compile(r"(?<![\w.\-*])(?:\w[.\-*]){3,}\w(?![\w\-*]|\.\w)")
# Cheap pre-checks with a literal or a one-class first character, which the regex engine
# scans for quickly; the exact patterns above run only on the few texts that pass.
_SPACED_LETTERS_HINT = re.compile(r" \w \w \w")
_SPACED_DOTS_HINT = re.compile(r"[.\-*]\w[.\-*]\w[.\-*]")
# Only the text of these is tokenised as words: the parsed URLs and addresses have prefixes.
_URLISH = ("@", "://", "www.")


def _join_spaced(m: re.Match[str]) -> str:
    return _SPACED_SEP.sub("", m.group(0).replace(" ", ""))


def _long_word(w: str) -> str:
    n = len(w)
    if w.isdigit():
        return f"N:{n}"
    return f"skip:{w[0]}{n // 10 * 10}" if n > MAX_WORD else w


def _words(text: str) -> list[str]:
    """The normalised words of a text, each reduced to a token (or a shape token)."""
    if len(text) > MAX_TEXT_CHARS:
        text = text[:MAX_TEXT_CHARS]
    ascii_only = text.isascii()
    if not ascii_only:
        # the quick checks are C scans; NFKC and a dict translate() over a long non-ASCII
        # text cost ten times more, and most texts need neither
        if not unicodedata.is_normalized("NFKC", text):
            text = unicodedata.normalize("NFKC", text)
        if _INVISIBLE_CHARS.search(text):
            text = _INVISIBLE_CHARS.sub("", text)
    text = text.lower()
    if "@" in text or "://" in text or "www." in text:
        # URLs and addresses are tokenised from the parsed URL list, not as words
        text = " ".join([chunk for chunk in text.split()
                         if "@" not in chunk and "://" not in chunk and "www." not in chunk])
    # one regex pass each finds out whether anything is spaced out at all (rare)
    if (_SPACED_LETTERS_HINT.search(text) or _SPACED_LETTERS_HINT.match(" " + text[:8])) \
            and _SPACED_LETTERS.search(text):
        text = _SPACED_LETTERS.sub(_join_spaced, text)
    if _SPACED_DOTS_HINT.search(text) and _SPACED_DOTS.search(text):
        text = _SPACED_DOTS.sub(_join_spaced, text)
    return _cut(text, ascii_only)


def _cut(text: str, ascii_only: bool) -> list[str]:
    """The words of a lower-cased, normalised text: _WORD matches only words of
    MIN_WORD (3) or more characters, so most texts need no per-word Python work at all."""
    words = _WORD.findall(text)
    if not ascii_only and _CONFUSABLE_CHARS.search(text):
        words = [w.translate(_CONFUSABLE) if not w.isascii() and _HAS_ASCII_LETTER.search(w)
                 else w for w in words]
    if words and (_LONG_DIGITS.search(text) or max(map(len, words)) > MAX_WORD):
        return [w if len(w) <= 4 or (len(w) <= MAX_WORD and not w.isdigit()) else _long_word(w)
                for w in words]
    return words


def _header_words(value: str) -> list[str]:
    """The words of a header value: as _words(), without the passes for spaced-out letters
    that a short header rarely needs (all of _words() when it is not plain ASCII)."""
    if not value.isascii():
        return _words(value)
    value = value.lower()
    if "@" in value or "://" in value or "www." in value:
        value = " ".join([chunk for chunk in value.split()
                          if "@" not in chunk and "://" not in chunk and "www." not in chunk])
    return _cut(value, True)


_URL_TAIL = re.compile(r"""[^\s<>"'`{}|\\^\[\]]+""")
_URL_SCHEMES = frozenset(("http", "https", "ftp"))
MAX_URLS = 200


def _scan_urls(text: str, found: dict[str, None]) -> None:
    """The http(s)/ftp and www. URLs of a text (HTML included: absolute href targets are
    found the same way), found by str.find: a case-insensitive regex alternation tried at
    every position costs several times more on long parts."""
    pos = text.find("://")
    while pos != -1 and len(found) < MAX_URLS:
        start = pos
        while start > 0 and pos - start < 6 and text[start - 1].isalpha():
            start -= 1
        m = _URL_TAIL.match(text, pos + 3)
        stop = m.end() if m else pos + 3
        if m and text[start:pos].lower() in _URL_SCHEMES:
            found.setdefault(text[start:stop].rstrip(".,;:!?)]}'\"").replace("&amp;", "&"), None)
        pos = text.find("://", stop)
    for marker in ("www.", "WWW."):
        pos = text.find(marker)
        while pos != -1 and len(found) < MAX_URLS:
            before = text[pos - 1] if pos else " "
            m = _URL_TAIL.match(text, pos)
            stop = m.end() if m else pos + 4
            if before != "/" and not before.isalnum() and before not in ".@-_":
                found.setdefault(text[pos:stop].rstrip(".,;:!?)]}'\"").replace("&amp;", "&"), None)
            pos = text.find(marker, stop)


def message_urls(view: MessageView) -> list[str]:
    found: dict[str, None] = {}
    for part in view.text_parts:
        text = part.text
        if "://" in text or "www." in text or "WWW." in text:
            _scan_urls(text[:MAX_TEXT_CHARS], found)
    return list(found)


def _domain_of(host: str) -> str:
    """The last two labels (three under a two-letter ccTLD with a short second level)."""
    labels = host.strip(".").split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and len(labels[-2]) <= 3:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


_SHAPE_MAP = str.maketrans("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                           "9" * 10 + "a" * 26 + "A" * 26)
# a run's repeats after its first character: removed with a literal "" replacement, which
# re.sub applies without expanding a template per match (three times cheaper than "\1")
_RUNS = re.compile(r"(?<=(.))\1+")


def _shape(value: str) -> str:
    """A value's shape: digits as 9, letters as a/A, runs squeezed: "1a2B3c" -> "9a9A9a"."""
    return _RUNS.sub("", value[:64].translate(_SHAPE_MAP))[:24]


def _bucket(n: int) -> str:
    return str(n) if n < 5 else ("5-9" if n < 10 else ("10-49" if n < 50 else "50+"))


def _address(value: str) -> str:
    """The address of a From value, lower-cased: inside the last <...>, else the first word
    holding an @ (email.utils.parseaddr costs more than all the rest of the header tokens)."""
    if "<" in value:
        inside = value[value.rfind("<") + 1:].partition(">")[0].strip()
        if "@" in inside:
            return inside.lower()
    for word in value.split():
        if "@" in word:
            return word.strip("<>\"'(),;").lower()
    return ""


def _first_raw(view: MessageView, name: str) -> str:
    """A header's first value as received, unfolded: for values whose encoded words do not
    matter (addresses, dates, ids, priorities), so they skip RFC 2047 decoding."""
    values = view.header_raw(name)
    return " ".join(values[0].split()) if values else ""


def _header_tokens(view: MessageView, relay: tuple[str | None, str | None]) -> Iterable[str]:
    subject = _SUBJECT_TAG.sub("", view.subject)
    for w in _words(subject):
        yield "S:" + w
    if not subject.strip():
        yield "S:(empty)"
    from_value = view.first("From")
    addr = _address(from_value)
    if addr:
        yield "F:" + addr
        yield "FD:" + addr.rpartition("@")[2]
        yield "FL:" + _shape(addr.partition("@")[0])
    name = from_value.split("<", 1)[0] if "<" in from_value else ""
    for w in _header_words(name):
        yield "FN:" + w
    for header, prefix in (("Reply-To", "RT:"), ("Return-Path", "RP:"), ("Sender", "SE:")):
        value = _first_raw(view, header)
        if value:
            m = _ADDR_DOMAIN.search(value)
            yield prefix + (m.group(1).lower() if m else "(none)")
    mid = _first_raw(view, "Message-ID")
    if mid:
        left, _, right = mid.strip().strip("<>").partition("@")
        yield "MD:" + (right.lower()[:60] or "(none)")
        yield "MS:" + _shape(left)
    else:
        yield "MID:(missing)"
    for header, prefix in (("X-Mailer", "XM:"), ("User-Agent", "XM:")):
        if view.has_header(header):
            value = view.first(header)
            yield prefix + _DIGITS.sub("9", value.lower())[:60]
            for w in _header_words(value):
                yield prefix + w
    for header, prefix in (("To", "TO:"), ("Cc", "CC:")):
        values = view.header_raw(header)
        if values:
            n = sum(v.count("@") for v in values)
            yield f"{prefix}n={_bucket(n)}"
            if "undisclosed" in values[0].lower():
                yield prefix + "undisclosed"
    date = _first_raw(view, "Date")
    if date:
        tz = date.rsplit(None, 1)[-1] if " " in date else date
        yield "DZ:" + tz[:12]
        yield "DS:" + _shape(date)
    else:
        yield "D:(missing)"
    ip, helo = relay
    if ip and _IPV4.match(ip):
        yield "RI:" + ".".join(ip.split(".")[:2])
    if helo:
        yield "RH:" + ("ip" if _IPV4.match(helo.strip("[]")) else _shape(helo))


# Headers never learned: the verdicts of other filters (../shared/notes/evaluation.md), and
# what the receiving site itself adds on delivery (mailbox bookkeeping, its own SPF and
# milter stamps): these say where a message was collected, not who sent it.
_NEVER_LEARNED = re.compile(
    r"x-spam|x-virus|x-amavis|x-bogosity|x-spamd|x-rspamd|x-barracuda|x-asg|x-ironport|"
    r"x-mailscanner|x-old-spam|x-rc-|x-antivirus|x-quarantine|x-greylist|authentication-results|"
    r"arc-|received-spf|x-original-to|delivered-to|x-delivered-to|x-uid|x-uidl|status$|x-status|"
    r"x-keywords|x-mozilla-|x-evolution|content-length|lines$|x-miltered|x-uuid|x-envelope-to|"
    r"envelope-to|x-envelope-from|delivery-date|x-sieve|x-label|x-gmail-labels|x-original-date|"
    r"x-imapbase|x-imap|x-dspam|x-crm114|x-policyd|x-razor|x-pyzor|x-dcc")
# Headers tokenised elsewhere with their own prefixes, or whose words say nothing.
_OWN_TOKENS = frozenset((
    "subject", "from", "reply-to", "return-path", "sender", "message-id", "x-mailer",
    "user-agent", "to", "cc", "date", "received", "content-type", "in-reply-to", "references",
    "dkim-signature", "domainkey-signature", "thread-index", "x-originalarrivaltime",
    "resent-date", "resent-message-id", "list-unsubscribe", "list-subscribe", "list-help",
    "list-post", "list-archive"))
OTHER_HEADERS = "words"   # "words", "presence" or "" (tuning: bench/tune_bayes.py)
MAX_HEADER_VALUE = 200
MAX_HEADER_WORDS = 4      # words learned per other header (0: all; tuning: bench/tune_bayes.py)


# What to do with a header, by lower-cased name: the regex and set tests run once per name
# seen rather than once per header of every message (bounded: cleared when full).
_SKIP, _NAME_ONLY, _NAME_AND_WORDS = 0, 1, 2
_HEADER_KIND: dict[str, int] = {}
_HEADER_KIND_MAX = 4096


def _header_kind(key: str) -> int:
    kind = _HEADER_KIND.get(key)
    if kind is None:
        if _NEVER_LEARNED.match(key):
            kind = _SKIP
        elif key in _OWN_TOKENS:
            kind = _NAME_ONLY
        else:
            kind = _NAME_AND_WORDS
        if len(_HEADER_KIND) >= _HEADER_KIND_MAX:
            _HEADER_KIND.clear()
        _HEADER_KIND[key] = kind
    return kind


def _other_header_tokens(view: MessageView) -> Iterable[str]:
    """Every other header a sender or a relay on the way wrote: its name ("HN:"), and for
    the headers not tokenised elsewhere the words of its value under its own name."""
    seen: set[str] = set()
    words = OTHER_HEADERS == "words"
    for name, value in view.raw_headers:
        key = name.lower()[:40]
        if key in seen:
            continue
        seen.add(key)
        kind = _header_kind(key)
        if kind == _SKIP:
            continue
        yield "HN:" + key
        if words and kind == _NAME_AND_WORDS:
            prefix = key + ":"
            for w in _header_words(value[:MAX_HEADER_VALUE])[:MAX_HEADER_WORDS or None]:
                yield prefix + w


_RCVD_FROM = re.compile(r"\s*from\s+(\S+)(?:\s+\(([^)]*)\))?", re.I)
_RCVD_BY = re.compile(r"\bby\s+([^\s;()]+)", re.I)
_RCVD_IP = re.compile(r"\[(?:IPv6:)?([0-9a-fA-F:.]+)\]")


def _hop(value: str) -> tuple[str | None, str | None, str | None, str | None]:
    """(ip, helo, reverse-DNS name, by) of one Received header, parsed here rather than by
    MessageView.received, whose IP validation through ipaddress costs more than the tokens
    it yields; an IP is one that looks like IPv4 or IPv6."""
    helo = name = ip = None
    m = _RCVD_FROM.match(value)
    if m:
        helo = m.group(1).strip("[]")
        comment = m.group(2) or ""
        if comment and not comment.lstrip().startswith("["):
            name = comment.split(None, 1)[0]
        ipm = _RCVD_IP.search(comment) or _RCVD_IP.search(m.group(0))
        if ipm:
            ip = ipm.group(1)
        elif _IPV4.match(helo):
            ip = helo
        if ip and not (_IPV4.match(ip) or ip.count(":") >= 2):
            ip = None
    by = _RCVD_BY.search(value)
    return ip, helo, name, by.group(1) if by else None


def _relay(view: MessageView, hops: list[tuple[str | None, str | None, str | None, str | None]]
           ) -> tuple[str | None, str | None]:
    """(ip, helo) of the client that handed the message to the trusted network, as
    MessageView.last_external_relay decides it: the MTA's own data, else the first
    Received hop from an untrusted IP."""
    env = view.envelope
    if env.client_ip and not view.is_trusted(env.client_ip):
        return env.client_ip, env.client_helo
    for ip, helo, _, _ in hops:
        if ip and not view.is_trusted(ip):
            return ip, helo
    return env.client_ip, env.client_helo


def _received_tokens(hops: list[tuple[str | None, str | None, str | None, str | None]]
                     ) -> Iterable[str]:
    """The relays a message passed: HELO and reverse-DNS domains, /24 networks, per hop."""
    for ip, helo, name, by in hops:
        if ip and _IPV4.match(ip):
            if ip.startswith("127."):
                continue
            yield "R:" + ip.rsplit(".", 1)[0]
        for host in (name, helo):
            if host and not _IPV4.match(host.strip("[]")):
                yield "R:" + _domain_of(host.lower())[:60]
        if by and not _IPV4.match(by):
            yield "RB:" + _domain_of(by.lower())[:60]


def _part_tokens(view: MessageView) -> Iterable[str]:
    parts = view.parts
    yield f"PARTS:{_bucket(len(parts))}"
    for part in parts:
        yield "CT:" + part.content_type
        if part.charset:
            yield "CS:" + part.charset.lower().strip('"')[:20]
        if part.transfer_encoding:
            yield "CTE:" + part.transfer_encoding[:20]
        if part.is_attachment:
            name = (part.filename or "").lower()
            ext = name.rsplit(".", 1)[-1] if "." in name else "(none)"
            yield "A:ext:" + ext[:10]
            sniffed = part.sniffed_type
            if sniffed:
                yield "A:type:" + sniffed
    for markup in view.html_parts[:4]:
        for tag in set(_HTML_TAG.findall(markup[:MAX_TEXT_CHARS])):
            yield "H:" + tag.lower()


def _url_tokens(view: MessageView) -> Iterable[str]:
    urls = message_urls(view)
    if urls:
        yield f"UN:{_bucket(len(urls))}"
    for url in urls:
        m = _URL_PARTS.match(url.lower())
        if not m:
            continue
        scheme, host, path, query = m.group(1) or "www", m.group(2), m.group(3) or "", m.group(4)
        host = host.rpartition("@")[2]
        yield "US:" + scheme
        if _IPV4.match(host):
            yield "U:(ip)"
            yield "UD:" + ".".join(host.split(".")[:2])
        else:
            yield "U:" + host[:60]
            yield "UD:" + _domain_of(host)[:60]
        for w in _PATH_WORD.findall(path):
            yield "UP:" + w
        if query:
            yield "UQ:yes"


def _osb(words: list[str]) -> Iterable[str]:
    """Orthogonal sparse bigrams over a 3-word window: adjacent pairs and pairs skipping one."""
    for i in range(len(words) - 1):
        yield f"B:{words[i]} {words[i + 1]}"
        if i + 2 < len(words):
            yield f"B:{words[i]} ? {words[i + 2]}"


def tokenize(view: MessageView, *, max_tokens: int = DEFAULT_MAX_TOKENS,
             bigrams: bool = False) -> tuple[str, ...]:
    """The message's tokens: de-duplicated, first-seen order, at most max_tokens."""
    hops = [_hop(value) for value in view.header_raw("Received")[:MAX_RECEIVED]]
    found = list(_header_tokens(view, _relay(view, hops)))
    found += _received_tokens(hops)
    if OTHER_HEADERS:
        found += _other_header_tokens(view)
    found += _part_tokens(view)
    found += _url_tokens(view)
    body_words: list[str] = []
    budget = MAX_TEXT_CHARS
    for text in view.plain_texts:
        if budget <= 0:
            break
        body_words.extend(_words(text[:budget]))
        budget -= len(text)
    found += body_words
    if bigrams:
        found += islice(_osb(body_words), max_tokens * 2)
    # de-duplicated in first-seen order by dict.fromkeys, in C
    tokens = list(dict.fromkeys(found))
    joined = "\n".join(tokens)
    if "taint.org" in joined or "zzzz" in joined or "yyyy" in joined:   # ARTIFACT_FRAGMENTS
        tokens = [t for t in tokens if not _ARTIFACT.search(t)]
    if not joined.isascii():
        # a header's undecodable 8-bit bytes stay surrogate escapes in the parsed view; such
        # a token cannot be stored (UTF-8), so it is dropped rather than fail the learner
        try:
            joined.encode()
        except UnicodeEncodeError:
            tokens = [t for t in tokens if t.isascii() or encodable(t)]
    return tuple(tokens[:max_tokens])
