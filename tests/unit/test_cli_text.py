"""CLI output of message text, as bytes from real `filterd` subprocesses: `scan --explain`
shows the text a rule matched and the headers it would add with escapes visible
(filterd.textsafe); the quarantine CLI is covered end to end in
tests/integration/test_modes_and_text.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
RULE = """
[rule.TEST_SUBJECT_PAY]
kind = "header"
header = "Subject"
pattern = 'pay.{0,40}now'
description = "matches across the escapes in the test Subject"

[scores]
TEST_SUBJECT_PAY = 1.0
"""
HOSTILE = ("From: a@example.org\r\nTo: b@example.net\r\n"
           "Subject: =?utf-8?q?pay=1B]0;owned=07=1B[2J=C2=9B=E2=80=AEnow=0D=0Aforged?=\r\n"
           "Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nMessage-ID: <m@example.org>\r\n\r\n"
           "hello\r\n").encode()


def raw_controls(data: bytes) -> list[str]:
    text = data.decode("utf-8", "replace")
    return [f"U+{ord(c):04X}" for c in text if c != "\n" and (
        ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 or c in "\u202e\u2066\u2067\u2068\u2069")]


def test_scan_explain_shows_matched_message_text_escaped(tmp_path, engine_rules):
    rules = engine_rules
    (rules / "test.toml").write_text(RULE)
    (tmp_path / "filterd.toml").write_text(f'[rules]\ndir = "{rules}"\ncompile_cache = "off"\n')
    name = "hostile\x1b[2J.eml"
    (tmp_path / name).write_bytes(HOSTILE)
    res = subprocess.run([sys.executable, "-m", "filterd", "--config",
                          str(tmp_path / "filterd.toml"), "--state-dir", str(tmp_path / "state"),
                          "scan", "--offline", "--explain", str(tmp_path / name)],
                         capture_output=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert b"TEST_SUBJECT_PAY" in out
    assert b"matched: pay\\x1b]0;owned\\x07\\x1b[2J\\x9b\\u202enow" in out
    assert b"hostile\\x1b[2J.eml" in out         # the file name too
    assert raw_controls(out) == [], out
