"""Header edits in amavis formats, and applying them to raw bytes."""

from filterd import config
from filterd.actions.headers import apply_to_bytes, build_edits, fold, spam_status
from filterd.message import parse
from filterd.policy import Levels, Policy, Symbol, decide

SETTINGS = config.defaults().with_overrides({"daemon.hostname": "mx.test"})
POLICY = Policy(levels=Levels(2.0, 6.0, 10.0, 15.0))
RAW = (b"Received: from x by y\r\nX-Spam-Flag: NO\r\nSubject: hello\r\n"
       b"X-Spam-Status: No, forged\r\nx-virus-scanned: forged too\r\nFrom: a@b.c\r\n"
       b"X-Other: kept\r\n\r\nbody\r\nline 2\r\n")


def verdict_for(score: float):
    return decide([Symbol("S")], {"S": score}, POLICY)


def test_clean_message_gets_no_spam_headers_and_loses_forged_headers():
    view = parse(RAW)
    edits = build_edits(view, verdict_for(0.5), SETTINGS, subject_tag="***SPAM*** ")
    # X-Virus-Scanned comes from the antivirus family only when a scan ran (test_antivirus)
    assert edits.add == ()
    assert sorted(n.lower() for n, _ in edits.remove) == [
        "x-spam-flag", "x-spam-status", "x-virus-scanned"]
    out = apply_to_bytes(RAW, edits)
    assert out.startswith(b"Received: from x by y\r\n")
    assert b"forged" not in out
    assert b"X-Other: kept\r\n" in out
    assert out.endswith(b"\r\n\r\nbody\r\nline 2\r\n")


def test_spam_gets_amavis_headers_and_subject_tag():
    view = parse(RAW)
    verdict = verdict_for(7.25)
    edits = build_edits(view, verdict, SETTINGS, subject_tag="***SPAM*** ")
    headers = dict(edits.add)
    assert headers["X-Spam-Flag"] == "YES"
    assert headers["X-Spam-Score"] == "7.25"
    assert headers["X-Spam-Level"] == "*******"
    assert headers["X-Spam-Status"] == "Yes, score=7.25 required=6 tests=[S=7.25]"
    assert edits.subject == "***SPAM*** hello"
    out = apply_to_bytes(RAW, edits)
    assert b"\r\nSubject: ***SPAM*** hello\r\n" in out
    assert out.count(b"Subject:") == 1


def test_tagged_but_not_spam():
    edits = build_edits(parse(RAW), verdict_for(3), SETTINGS, subject_tag="***SPAM*** ")
    headers = dict(edits.add)
    assert headers["X-Spam-Flag"] == "NO" and edits.subject is None
    assert spam_status(verdict_for(3)).startswith("No, score=3 required=6")


def test_originating_mail_is_not_spam_tagged():
    edits = build_edits(parse(RAW), verdict_for(50), SETTINGS, subject_tag="***SPAM*** ",
                        originating=True)
    assert edits.add == ()


def test_subject_is_added_when_missing_and_not_tagged_twice():
    raw = b"From: a@b.c\n\nbody\n"
    edits = build_edits(parse(raw), verdict_for(8), SETTINGS, subject_tag="[SPAM] ")
    out = apply_to_bytes(raw, edits)
    assert b"\nSubject: [SPAM]\n" in out and out.endswith(b"\n\nbody\n")
    raw = b"Subject: [SPAM] again\n\nbody\n"
    assert build_edits(parse(raw), verdict_for(8), SETTINGS, subject_tag="[SPAM] ").subject is None


def test_non_ascii_subject_is_encoded():
    raw = "Subject: grüße\n\nbody\n".encode()
    edits = build_edits(parse(raw), verdict_for(8), SETTINGS, subject_tag="***SPAM*** ")
    out = apply_to_bytes(raw, edits)
    assert b"Subject: =?utf-8?" in out


def test_mbox_from_line_and_continuations_are_kept():
    raw = (b"From a@b Sat Jan  3 01:05:34 1996\nX-Spam-Status: forged\n\tcontinued\n"
           b"To: x@y\n\tcontinued to\n\nbody\n")
    edits = build_edits(parse(raw), verdict_for(0), SETTINGS, subject_tag="")
    out = apply_to_bytes(raw, edits)
    assert out.startswith(b"From a@b Sat Jan  3 01:05:34 1996\nTo: x@y\n")
    assert b"forged" not in out and b"continued\n" not in out.split(b"To:")[0]
    assert b"To: x@y\n\tcontinued to\n" in out


def test_fold_keeps_lines_short_and_words_whole():
    value = ", ".join(f"SYMBOL_NUMBER_{i}=1.5" for i in range(20))
    folded = fold("X-Spam-Status", value)
    lines = folded.split(b"\r\n")
    assert all(len(line) <= 100 for line in lines)
    assert b"".join(line.lstrip(b"\t") + b" " for line in lines).count(b"SYMBOL_NUMBER_") == 20


def test_final_header_hooks_build_the_edited_copy_only_when_one_applies(tmp_path, core_rules):
    """A hook with `applies` saying no is skipped, and without any hook left the edited copy
    of the message (apply_to_bytes) is never built; one that applies sees the edited bytes."""
    import asyncio

    from filterd.message import Envelope
    from filterd.service import FINAL_HEADER_HOOKS, Scanner

    seen: list[bytes] = []

    def hook(edited, outcome, services):
        seen.append(edited)
        return [("X-Test-Final", "1")]

    scanner = Scanner(SETTINGS.with_overrides({"daemon.state_dir": str(tmp_path),
                                               "rules.dir": str(core_rules)}))
    outcome = asyncio.run(scanner.scan(RAW, Envelope()))
    assert outcome.verdict.action.value == "accept" and outcome.edits.remove
    saved = list(FINAL_HEADER_HOOKS)
    try:
        FINAL_HEADER_HOOKS[:] = [hook]
        hook.applies = lambda outcome, services: False  # type: ignore[attr-defined]
        edits = asyncio.run(scanner.dispose(outcome, "milter")).edits
        assert seen == [] and edits == outcome.edits
        hook.applies = lambda outcome, services: True  # type: ignore[attr-defined]
        edits = asyncio.run(scanner.dispose(outcome, "milter")).edits
        assert seen == [apply_to_bytes(RAW, outcome.edits)]
        assert edits.add[0] == ("X-Test-Final", "1")
    finally:
        FINAL_HEADER_HOOKS[:] = saved


def test_dkim_hook_applies_only_to_originating_mail_it_may_sign():
    from types import SimpleNamespace

    from filterd.actions.dkim_sign import sign_outgoing, wants_signature

    signer = SimpleNamespace(settings=SETTINGS)
    inbound = SimpleNamespace(originating=False, dkim_sign=True)
    outbound = SimpleNamespace(originating=True, dkim_sign=True)
    bank_off = SimpleNamespace(originating=True, dkim_sign=False)
    assert sign_outgoing.applies is wants_signature
    assert not wants_signature(inbound, {"dkim_signer": signer})
    assert not wants_signature(outbound, {})
    assert not wants_signature(bank_off, {"dkim_signer": signer})
    assert wants_signature(outbound, {"dkim_signer": signer}) is SETTINGS.dkim.sign
