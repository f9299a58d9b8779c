"""filterd.textsafe: untrusted text rendered visibly (terminal escapes, C1, bidi, CR/LF)."""

from __future__ import annotations

import json
import unicodedata

import pytest

from filterd.textsafe import json_dumps, unsafe, visible, visible_bytes

OSC_TITLE = "\x1b]0;owned\x07"
CSI_CLEAR = "\x1b[2J\x1b[H"
SGR_RED = "\x1b[31m"


def raw_controls(text: str) -> list[str]:
    return [ch for ch in text if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs")
            and ch not in "\u200c\u200d"]


@pytest.mark.parametrize("text, shown", [
    (OSC_TITLE + "hi", "\\x1b]0;owned\\x07hi"),
    (CSI_CLEAR, "\\x1b[2J\\x1b[H"),
    (SGR_RED + "red" + "\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("a\r\nb", "a\\x0d\\x0ab"),
    ("tab\there", "tab\\x09here"),
    ("\x9b2J C1 CSI", "\\x9b2J C1 CSI"),
    ("\x85next line", "\\x85next line"),
    ("\x7fdel", "\\x7fdel"),
    ("abc\u202edcba", "abc\\u202edcba"),
    ("\u2066isolate\u2069", "\\u2066isolate\\u2069"),
    ("line\u2028sep", "line\\u2028sep"),
    ("\ufeffbom", "\\ufeffbom"),
    ("tag\U000e0041", "tag\\U000e0041"),
    ("bad\udcffbyte", "bad\\xffbyte"),
])
def test_controls_are_escaped(text, shown):
    assert visible(text) == shown
    assert raw_controls(visible(text)) == []


@pytest.mark.parametrize("text", [
    "Plain subject", "Grüße aus Köln", "日本語の件名", "Привет",
    "עברית ועוד",
    "می\u200cخواهم", "👨\u200d👩\u200d👧", "back\\slash and \\x1b typed literally", "",
])
def test_ordinary_text_is_unchanged(text):
    assert visible(text) == text


def test_every_c0_c1_and_format_character_is_escaped():
    for code in list(range(0x00, 0x20)) + list(range(0x7f, 0xa0)) + [0x200e, 0x200f, 0x202a,
                                                                      0x202b, 0x202c, 0x202d,
                                                                      0x2067, 0x2068, 0x061c]:
        ch = chr(code)
        assert unsafe(ch), hex(code)
        assert raw_controls(visible(f"x{ch}y")) == [], hex(code)
        assert visible(f"x{ch}y").startswith("x\\"), hex(code)


def test_non_strings_are_rendered_through_str():
    assert visible(3.5) == "3.5"
    assert visible(None) == "None"


def test_multiline_keeps_line_structure_and_escapes_the_rest():
    text = "Subject: x\x1b[2J\r\nX: a\tb\r\n\r\nbody\roverwrite\n"
    shown = visible(text, multiline=True)
    assert shown == "Subject: x\\x1b[2J\r\nX: a\tb\r\n\r\nbody\\x0doverwrite\n"
    assert visible(text).count("\n") == 0


def test_visible_bytes_decodes_utf8_and_shows_undecodable_bytes():
    data = "Subject: Grüße\x1b]0;t\x07\r\n\r\n".encode() + b"\xff\xfe raw\n"
    shown = visible_bytes(data)
    assert shown == "Subject: Grüße\\x1b]0;t\\x07\r\n\r\n\\xff\\xfe raw\n".encode()
    assert b"\x1b" not in shown and b"\x07" not in shown
    # a C1 control spelled in UTF-8 (U+009B is a CSI) is a control too
    assert visible_bytes("\u009b2J".encode()) == b"\\x9b2J"


def test_json_dumps_is_the_same_value_without_raw_controls():
    value = {"subject": OSC_TITLE + "Grüße \x9b\u202e" + "\U000e0041", "n": 1,
             "bad": "x\udcff"}
    text = json_dumps(value)
    assert raw_controls(text) == []
    assert "Grüße" in text          # non-ASCII text stays readable
    assert json.loads(text) == value
    indented = json_dumps([value, "a\nb"], indent=1)
    assert json.loads(indented) == [value, "a\nb"] and "\n " in indented
    assert raw_controls(indented.replace("\n", "")) == []


def test_fast_path_leaves_long_ascii_text_alone():
    text = "x" * 1_000_000
    assert visible(text) is text
