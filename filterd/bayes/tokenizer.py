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
                     charsets, list/reply markers, X-Priority, the last external relay's /16
                     and HELO shape, and per Received hop ("R:") the sending /24 and the HELO
                     and reverse-DNS domains. Never the verdict headers of other filters (X-Spam-*,
                     X-Virus-*, X-Barracuda-*, Authentication-Results, ...): an allow-list
                     cannot learn them by accident (../shared/notes/evaluation.md).
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
from typing import Iterable

from filterd.message import MessageView

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
_WORD = re.compile(r"[^\W_$][\w'.$€£*\-]*[^\W_'.*\-]|[$€£][\d.,]+\d|[^\W_]")
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
        text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
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
    words = _WORD.findall(text)
    if not ascii_only:
        words = [w.translate(_CONFUSABLE) if not w.isascii() and _HAS_ASCII_LETTER.search(w)
                 else w for w in words]
    # a list comprehension rather than a loop: this runs for every word of every message
    return [w if len(w) <= 4 or (len(w) <= MAX_WORD and not w.isdigit()) else _long_word(w)
            for w in words if len(w) >= MIN_WORD]


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
_RUNS = re.compile(r"(.)\1+")


def _shape(value: str) -> str:
    """A value's shape: digits as 9, letters as a/A, runs squeezed: "1a2B3c" -> "9a9A9a"."""
    return _RUNS.sub(r"\1", value[:64].translate(_SHAPE_MAP))[:24]


def _bucket(n: int) -> str:
    return str(n) if n < 5 else ("5-9" if n < 10 else ("10-49" if n < 50 else "50+"))


def _header_tokens(view: MessageView) -> Iterable[str]:
    subject = _SUBJECT_TAG.sub("", view.subject)
    for w in _words(subject):
        yield "S:" + w
    if not subject.strip():
        yield "S:(empty)"
    from_value = view.first("From")
    addr = view.from_address
    if addr:
        yield "F:" + addr
        yield "FD:" + view.from_domain
        yield "FL:" + _shape(addr.partition("@")[0])
    name = from_value.split("<", 1)[0] if "<" in from_value else ""
    for w in _words(name):
        yield "FN:" + w
    for header, prefix in (("Reply-To", "RT:"), ("Return-Path", "RP:"), ("Sender", "SE:")):
        value = view.first(header)
        if value:
            m = _ADDR_DOMAIN.search(value)
            yield prefix + (m.group(1).lower() if m else "(none)")
    mid = view.message_id
    if mid:
        left, _, right = mid.strip().strip("<>").partition("@")
        yield "MD:" + (right.lower()[:60] or "(none)")
        yield "MS:" + _shape(left)
    else:
        yield "MID:(missing)"
    for header, prefix in (("X-Mailer", "XM:"), ("User-Agent", "XM:")):
        value = view.first(header)
        if value:
            yield prefix + _DIGITS.sub("9", value.lower())[:60]
            for w in _words(value):
                yield prefix + w
    for header, prefix in (("To", "TO:"), ("Cc", "CC:")):
        values = view.header(header)
        if values:
            n = sum(v.count("@") for v in values)
            yield f"{prefix}n={_bucket(n)}"
            if "undisclosed" in values[0].lower():
                yield prefix + "undisclosed"
    date = view.first("Date")
    if date:
        tz = date.rsplit(None, 1)[-1] if " " in date else date
        yield "DZ:" + tz[:12]
        yield "DS:" + _shape(date)
    else:
        yield "D:(missing)"
    for header in ("In-Reply-To", "References", "List-Id", "List-Unsubscribe", "Organization"):
        if view.has_header(header):
            yield "HP:" + header.lower()
    for header in ("Precedence", "X-Priority", "X-MSMail-Priority", "Importance"):
        value = view.first(header)
        if value:
            yield f"HV:{header.lower()}:{value.lower()[:20]}"
    relay = view.last_external_relay
    if relay.ip and _IPV4.match(relay.ip):
        yield "RI:" + ".".join(relay.ip.split(".")[:2])
    if relay.helo:
        yield "RH:" + ("ip" if _IPV4.match(relay.helo.strip("[]")) else _shape(relay.helo))


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


def _other_header_tokens(view: MessageView) -> Iterable[str]:
    """Every other header a sender or a relay on the way wrote: its name ("HN:"), and for
    the headers not tokenised elsewhere the words of its value under its own name."""
    seen: set[str] = set()
    for name, value in view.raw_headers:
        key = name.lower()[:40]
        if key in seen or _NEVER_LEARNED.match(key):
            continue
        seen.add(key)
        yield "HN:" + key
        if OTHER_HEADERS == "words" and key not in _OWN_TOKENS:
            prefix = key + ":"
            for w in _words(value[:MAX_HEADER_VALUE]):
                yield prefix + w


def _received_tokens(view: MessageView) -> Iterable[str]:
    """The relays a message passed: HELO and reverse-DNS domains, /24 networks, per hop."""
    for hop in view.received[:MAX_RECEIVED]:
        if hop.from_ip and _IPV4.match(hop.from_ip):
            if hop.from_ip.startswith("127."):
                continue
            yield "R:" + hop.from_ip.rsplit(".", 1)[0]
        for name in (hop.from_name, hop.from_helo):
            if name and not _IPV4.match(name.strip("[]")):
                yield "R:" + _domain_of(name.lower())[:60]
        if hop.by and not _IPV4.match(hop.by):
            yield "RB:" + _domain_of(hop.by.lower())[:60]


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
    seen: dict[str, None] = {}
    add = seen.setdefault
    for token in _header_tokens(view):
        add(token, None)
    for token in _received_tokens(view):
        add(token, None)
    if OTHER_HEADERS:
        for token in _other_header_tokens(view):
            add(token, None)
    for token in _part_tokens(view):
        add(token, None)
    for token in _url_tokens(view):
        add(token, None)
    body_words: list[str] = []
    budget = MAX_TEXT_CHARS
    for text in view.plain_texts:
        if budget <= 0:
            break
        body_words.extend(_words(text[:budget]))
        budget -= len(text)
    for w in body_words:
        add(w, None)
    if bigrams:
        for token in _osb(body_words):
            add(token, None)
            if len(seen) >= max_tokens * 2:
                break
    tokens = list(seen)
    if _ARTIFACT.search("\n".join(tokens)):  # rare: one pass over the joined tokens first
        tokens = [t for t in tokens if not _ARTIFACT.search(t)]
    return tuple(tokens[:max_tokens])
