"""Ambiguous MIME (issue 14, items 3 and 5): every reading is examined, each ambiguity is a
symbol, and defects our own content limit causes are not blamed on the sender.

Messages are built here (harness.messages.ambiguous for the CVE-2024-28054 shapes); the scans
go through the real pipeline (filterd.service.Scanner) with the shipped core and banned rules.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import time
from pathlib import Path

import pytest

from harness.messages import PE, ambiguous
from filterd import config
from filterd.checks.sanity import sanity
from filterd.message import Envelope, mime, parse
from filterd.policy import Action
from filterd.service import Scanner

KINDS = ("two-content-type", "two-boundary")
KIND_SYMBOL = {"two-content-type": "MIME_DUPLICATE_CONTENT_TYPE",
               "two-boundary": "MIME_DUPLICATE_BOUNDARY"}
HEAD = (b"From: a@example.org\r\nTo: b@example.org\r\nSubject: s\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <m@example.org>\r\n"
        b"MIME-Version: 1.0\r\n")


def scanner_for(tmp_path: Path, **overrides) -> Scanner:
    from filterd.config import PROJECT_RULES
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    for name in ("actions.toml", "core.toml", "scores.toml", "banned.toml"):
        shutil.copy(PROJECT_RULES / name, rules / name)
    settings = config.defaults().with_overrides({"daemon.state_dir": str(tmp_path / "state"),
                                                 "rules.dir": str(rules), **overrides})
    return Scanner(settings)


def verdict(scanner: Scanner, raw: bytes):
    return asyncio.run(scanner.scan(raw, Envelope(client_ip="192.0.2.1"))).verdict


def names(raw: bytes, **kw) -> dict[str, tuple[str, ...]]:
    return {s.name: s.options for s in sanity(parse(raw, **kw), None)}


@pytest.fixture
def scanner(tmp_path: Path) -> Scanner:
    return scanner_for(tmp_path)


# --- the CVE-2024-28054 shapes ------------------------------------------------------------

@pytest.mark.parametrize("hidden_first", [False, True], ids=["exe-second", "exe-first"])
@pytest.mark.parametrize("kind", KINDS)
def test_hidden_exe_is_banned_in_either_header_order(scanner, kind, hidden_first):
    raw = ambiguous(kind, hidden_first)
    v = verdict(scanner, raw)
    got = {s.name: s.options for s in v.symbols}
    assert got[KIND_SYMBOL[kind]] == ("message",)
    assert got["BANNED_EXTENSION"] == ("payload.exe",)
    assert v.action is Action.REJECT            # the banned outcome, stronger than quarantine
    assert v.reason.startswith("BANNED_EXTENSION")


@pytest.mark.parametrize("kind", KINDS)
def test_the_parser_alone_sees_one_reading_the_view_offers_both(kind):
    view = parse(ambiguous(kind, hidden_first=False))
    assert [p.filename for p in view.parts] == [None]           # what the stdlib reads
    assert [p.filename for p in view.reading_parts()] == [None, "payload.exe"]
    exe = view.reading_parts()[1]
    assert exe.payload == PE and exe.sniffed_type == "application/x-msdownload"


def test_ambiguous_message_without_a_banned_part_is_quarantined_as_bad_header(scanner):
    raw = ambiguous("two-content-type", hidden_first=False, name="report.txt",
                    data=b"just text\n")
    v = verdict(scanner, raw)
    assert not any(s.name.startswith("BANNED_") for s in v.symbols)
    assert v.action is Action.QUARANTINE and v.reason.startswith("MIME_DUPLICATE_CONTENT_TYPE")
    from filterd.quarantine.store import category_of
    assert category_of(v) == "bad-header"


def test_identical_duplicate_headers_are_a_finding_but_one_reading():
    raw = (HEAD + b"Content-Type: multipart/mixed; boundary=X\r\n"
           b"Content-Type: multipart/mixed; boundary=X\r\n\r\n"
           b"--X\r\nContent-Type: text/plain\r\n\r\nhi\r\n--X--\r\n")
    view = parse(raw)
    assert view.mime_structure().ambiguous is False
    assert len(view.reading_parts()) == len(view.parts) == 1
    assert names(raw)["MIME_DUPLICATE_CONTENT_TYPE"] == ("message",)


# --- each symbol, both orders --------------------------------------------------------------

@pytest.mark.parametrize("pe_first", [False, True])
def test_duplicate_transfer_encoding_in_a_part(scanner, pe_first):
    # under 7bit the part is base64 text; under base64 it is a Windows program named .pdf
    encodings = [b"7bit", b"base64"] if not pe_first else [b"base64", b"7bit"]
    raw = (HEAD + b"Content-Type: multipart/mixed; boundary=X\r\n\r\n"
           b"--X\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
           b"--X\r\nContent-Type: application/pdf; name=report.pdf\r\n"
           b"Content-Disposition: attachment; filename=report.pdf\r\n"
           + b"".join(b"Content-Transfer-Encoding: " + e + b"\r\n" for e in encodings)
           + b"\r\n" + base64.encodebytes(PE).replace(b"\n", b"\r\n") + b"--X--\r\n")
    got = {s.name: s.options for s in verdict(scanner, raw).symbols}
    assert got["MIME_DUPLICATE_TRANSFER_ENCODING"] == ("part 2",)
    assert got["BANNED_TYPE_MISMATCH"] == ("report.pdf is application/x-msdownload",)


@pytest.mark.parametrize("exe_first", [False, True])
def test_duplicate_content_type_in_a_part(scanner, exe_first):
    types = [b"text/plain", b'application/octet-stream; name="tool.exe"']
    if exe_first:
        types.reverse()
    raw = (HEAD + b"Content-Type: multipart/mixed; boundary=X\r\n\r\n"
           b"--X\r\nContent-Type: text/plain\r\n\r\nhello\r\n--X\r\n"
           + b"".join(b"Content-Type: " + t + b"\r\n" for t in types)
           + b"Content-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(PE).replace(b"\n", b"\r\n") + b"--X--\r\n")
    got = {s.name: s.options for s in verdict(scanner, raw).symbols}
    assert got["MIME_DUPLICATE_CONTENT_TYPE"] == ("part 2",)
    assert got["BANNED_EXTENSION"] == ("tool.exe",)


def test_ambiguity_nested_inside_a_part_of_the_other_reading(scanner):
    # only the second top-level reading has the part whose own boundaries disagree
    inner = (b'Content-Type: multipart/mixed; boundary="in1"; boundary="in2"\r\n\r\n'
             b"--in1\r\nContent-Type: text/plain\r\n\r\nx\r\n"
             b"--in2\r\nContent-Type: application/octet-stream; name=deep.scr\r\n\r\nMZ\r\n"
             b"--in2--\r\n--in1--")
    raw = (HEAD + b"Content-Type: multipart/mixed; boundary=A\r\n"
           b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
           b"--A\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
           b"--B\r\n" + inner + b"\r\n--B--\r\n--A--\r\n")
    got = {s.name: s.options for s in verdict(scanner, raw).symbols}
    assert got["MIME_DUPLICATE_CONTENT_TYPE"] == ("message",)
    assert got["MIME_DUPLICATE_BOUNDARY"] == ("part 1",)
    assert got["BANNED_EXTENSION"] == ("deep.scr",)


def test_boundary_not_found_replaces_the_parsers_start_boundary_defect():
    raw = (HEAD + b"Content-Type: multipart/mixed; boundary=NEVER\r\n\r\n"
           b"--OTHER\r\nContent-Type: text/plain\r\n\r\nhi\r\n--OTHER--\r\n")
    got = names(raw)
    assert got["MIME_BOUNDARY_NOT_FOUND"] == ("message (boundary 'NEVER')",)
    assert "MIME_MISSING_BOUNDARY" not in got      # the same problem is not counted twice
    ok = (HEAD + b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
          b"--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n--B--\r\n")
    assert set(names(ok)) & set(mime.FINDING_SYMBOLS) == set()


def test_a_delimiter_needs_its_own_line():
    # "--B" inside a line, or followed by more text, is not a delimiter (RFC 2046 5.1.1)
    raw = (HEAD + b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
           b"text --B\r\n--Bextra\r\n")
    assert "MIME_BOUNDARY_NOT_FOUND" in names(raw)


def nested(depth: int) -> bytes:
    body = b"Content-Type: text/plain\r\n\r\ninnermost\r\n"
    for level in range(depth, 0, -1):
        b = b"b%d" % level
        body = (b"Content-Type: multipart/mixed; boundary=" + b + b"\r\n\r\n--" + b + b"\r\n"
                + body + b"\r\n--" + b + b"--\r\n")
    return HEAD + body


def test_nesting_past_max_mime_depth(tmp_path):
    assert mime.DEFAULT_MAX_DEPTH == config.defaults().scan.max_mime_depth
    assert "MIME_NESTING_TOO_DEEP" not in names(nested(mime.DEFAULT_MAX_DEPTH))
    got = names(nested(mime.DEFAULT_MAX_DEPTH + 1))
    assert got["MIME_NESTING_TOO_DEEP"] == (
        f"part {'.'.join(['1'] * (mime.DEFAULT_MAX_DEPTH + 1))} "
        f"(depth {mime.DEFAULT_MAX_DEPTH + 1}, limit {mime.DEFAULT_MAX_DEPTH})",)
    # the limit is the setting's
    deeper = scanner_for(tmp_path, **{"scan.max_mime_depth": 30})
    v = verdict(deeper, nested(25))
    assert "MIME_NESTING_TOO_DEEP" not in {s.name for s in v.symbols}
    v = verdict(scanner_for(tmp_path), nested(25))
    assert v.action is Action.QUARANTINE and v.reason.startswith("MIME_NESTING_TOO_DEEP")


def test_readings_limit_stops_the_walk_in_bounded_time():
    parts = b"".join(b"--X\r\nContent-Type: text/plain\r\n\r\n%d\r\n" % i
                     for i in range(mime.MAX_ENTITIES + 10))
    raw = HEAD + b"Content-Type: multipart/mixed; boundary=X\r\n\r\n" + parts + b"--X--\r\n"
    started = time.monotonic()
    got = names(raw)
    assert time.monotonic() - started < 10       # generous guard; ~0.1 s here
    assert got["MIME_READINGS_LIMIT"] == (str(mime.MAX_ENTITIES),)


def test_readings_of_nested_ambiguity_are_bounded():
    # every level has two boundaries and a copy of the next level under each: the readings
    # double per level (2**12 here) and the walk stops at MAX_ENTITIES
    entity = b"Content-Type: text/plain\r\n\r\nx"
    for level in range(12, 0, -1):
        a, b = b"a%d" % level, b"b%d" % level
        entity = (b"Content-Type: multipart/mixed; boundary=" + a + b"; boundary=" + b
                  + b"\r\n\r\n--" + a + b"\r\n" + entity + b"\r\n--" + b + b"\r\n" + entity
                  + b"\r\n--" + b + b"--\r\n--" + a + b"--")
    started = time.monotonic()
    structure = mime.analyse(HEAD + entity)
    assert time.monotonic() - started < 10       # generous guard
    assert structure.ambiguous and not structure.complete
    assert structure.symbols()["MIME_READINGS_LIMIT"] == [str(mime.MAX_ENTITIES)]
    assert "MIME_DUPLICATE_BOUNDARY" in structure.symbols()


def test_garbage_never_raises():
    for raw in (b"", b"\r\n\r\n", b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n",
                b"Content-Type: multipart/mixed; boundary*0=a; boundary*1=b\r\n\r\n--ab\r\n",
                b"Content-Type: message/rfc822\r\n\r\nContent-Type: multipart/x; boundary=q\r\n",
                b"Content-Type: multipart/mixed; boundary=\"" + b"\xff" * 50 + b"\"\r\n\r\n",
                os.urandom(4096)):
        view = parse(raw)
        view.reading_parts()
        sanity(view, None)


def test_corpus_ham_carries_no_forced_mime_symbol(corpus_files):
    """The forced table's premise (core.toml [forced]), checked on every corpus message."""
    from filterd.ruleset import load
    forced = {k for k in load(config.defaults().rules_dir).policy.forced
              if k.startswith("MIME_")}
    assert forced >= {"MIME_DUPLICATE_CONTENT_TYPE", "MIME_DUPLICATE_BOUNDARY"}
    hits: dict[str, list[str]] = {}
    for path in corpus_files:
        if path.parent.name != "ham":
            continue
        for name in set(mime.analyse(path.read_bytes()).symbols()) & forced:
            hits.setdefault(name, []).append(path.name)
    assert hits == {}


# --- truncation is ours ----------------------------------------------------------------------

def attachment_mail(encoded: bytes, *, early: bytes = b"", cte: bytes = b"base64") -> bytes:
    return (HEAD + b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
            b"--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n" + early +
            b"--B\r\nContent-Type: application/octet-stream; name=big.bin\r\n"
            b"Content-Transfer-Encoding: " + cte + b"\r\n\r\n" + encoded + b"--B--\r\n")


TWO_MB = os.urandom(2 * 1024 * 1024)
BROKEN_EARLY = (b"--B\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\nAAA*\r\n")


def test_valid_base64_cut_by_the_content_limit_is_not_blamed():
    raw = attachment_mail(base64.encodebytes(TWO_MB).replace(b"\n", b"\r\n"))
    view = parse(raw)
    assert view.truncated
    got = names(raw)
    assert "__CONTENT_TRUNCATED" in got
    assert {"MIME_BAD_BASE64", "MIME_MISSING_BOUNDARY", "MIME_BOUNDARY_NOT_FOUND",
            "MIME_DEFECT"} & set(got) == set()
    # every cut point inside the part, not just one that happens to fall on a line end
    for limit in range(len(raw) // 2, len(raw) // 2 + 80, 7):
        assert "MIME_BAD_BASE64" not in names(raw, content_limit=limit), limit


def test_bad_base64_before_the_cut_still_counts():
    raw = attachment_mail(base64.encodebytes(TWO_MB).replace(b"\n", b"\r\n"),
                          early=BROKEN_EARLY)
    assert parse(raw).truncated and "MIME_BAD_BASE64" in names(raw)
    # and inside the part that was cut, before the cut
    broken = b"QUJD*REVG\r\n" + base64.encodebytes(TWO_MB).replace(b"\n", b"\r\n")
    assert "MIME_BAD_BASE64" in names(attachment_mail(broken))
    # an untruncated message is judged as before
    assert "MIME_BAD_BASE64" in names(attachment_mail(b"QUJD*\r\n"))
    assert "MIME_BAD_BASE64" in names(attachment_mail(b"QUJ\r\n"))


def test_cut_quoted_printable_is_not_blamed():
    qp = b"".join(b"line %06d with soft=\r\n breaks =C3=A9=3D\r\n" % i for i in range(40000))
    raw = attachment_mail(qp, cte=b"quoted-printable")
    assert parse(raw).truncated
    got = names(raw)
    assert set(got) & {"MIME_BAD_BASE64", "MIME_DEFECT", "MIME_MISSING_BOUNDARY"} == set()


def test_attachment_past_the_cut_is_still_banned(scanner):
    # the hidden reading's exe sits after content_size_limit: banned reads the whole message
    raw = ambiguous("two-content-type", hidden_first=False)
    raw = raw.replace(b"Please find the file attached.", b"x" * (1024 * 1024 + 10))
    v = verdict(scanner, raw)
    got = {s.name for s in v.symbols}
    assert {"__CONTENT_TRUNCATED", "BANNED_EXTENSION"} <= got and v.action is Action.REJECT


def test_a_bare_cr_that_ends_the_parsers_header_block_hides_nothing(scanner):
    # the stdlib ends a line at a bare CR: for it the headers stop in the Subject and the
    # message is one text part; a client ending lines at LF sees the attachment
    raw = (b"From: a@example.org\r\nSubject: hi\rthere\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=X\r\n\r\n"
           b"--X\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
           b"--X\r\nContent-Type: application/octet-stream; name=\"setup.exe\"\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(PE).replace(b"\n", b"\r\n") + b"--X--\r\n")
    view = parse(raw)
    assert [p.filename for p in view.parts] == [None]
    assert "setup.exe" in [p.filename for p in view.reading_parts()]
    v = verdict(scanner, raw)
    assert {s.name: s.options for s in v.symbols}["BANNED_EXTENSION"] == ("setup.exe",)
    assert v.action is Action.REJECT
