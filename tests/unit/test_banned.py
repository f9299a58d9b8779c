"""Banned attachments and archive inspection: names, disguised executables, archive bombs.

Archives are built in the test (zipfile, tarfile, gzip, py7zr); the bombs are generated in a
streaming way and must end within the limits with a symbol, in bounded time and memory.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import shutil
import struct
import tarfile
import time
import tracemalloc
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest

from filterd import config
from filterd.checks.archives import Limits, archive_kind, inspect
from filterd.checks.banned import extensions_of
from filterd.message import Envelope, parse
from filterd.policy import Action
from filterd.service import Scanner

# A minimal PE header: what filetype sniffs as application/x-msdownload.
PE = b"MZ" + b"\x90" * 58 + struct.pack("<L", 64) + b"PE\x00\x00" + b"\x00" * 200
TESTFILES = Path("/usr/share/clamav-testfiles")


def zip_bytes(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def mail(*attachments: tuple[str, bytes, str]) -> bytes:
    m = EmailMessage()
    m["From"] = "a@example.org"
    m["To"] = "b@example.org"
    m["Subject"] = "files"
    m["Date"] = "Mon, 1 Jan 2024 00:00:00 +0000"
    m["Message-ID"] = "<x@example.org>"
    m.set_content("see attached\n")
    for name, data, ctype in attachments:
        maintype, _, subtype = ctype.partition("/")
        m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return m.as_bytes()


@pytest.fixture
def scanner(tmp_path: Path) -> Scanner:
    from filterd.config import PROJECT_RULES
    rules = tmp_path / "rules"
    rules.mkdir()
    for name in ("actions.toml", "core.toml", "scores.toml", "banned.toml"):
        shutil.copy(PROJECT_RULES / name, rules / name)
    settings = config.defaults().with_overrides({"daemon.state_dir": str(tmp_path / "state"),
                                                 "rules.dir": str(rules)})
    return Scanner(settings)


def symbols(scanner: Scanner, raw: bytes) -> dict[str, tuple[str, ...]]:
    outcome = asyncio.run(scanner.scan(raw, Envelope(client_ip="192.0.2.1")))
    return {s.name: s.options for s in outcome.verdict.symbols}


def verdict(scanner: Scanner, raw: bytes):
    return asyncio.run(scanner.scan(raw, Envelope(client_ip="192.0.2.1"))).verdict


# --- names ----------------------------------------------------------------------------------

def test_extensions_of():
    assert extensions_of("Invoice.PDF.exe") == ["pdf", "exe"]
    assert extensions_of("x.exe. ") == ["exe"]                 # Windows drops trailing dots
    assert extensions_of("v1.2 final report.pdf") == ["pdf"]
    assert extensions_of("noext") == []
    assert extensions_of("C:\\dir\\a.scr") == ["scr"]


def test_plain_document_is_not_banned(scanner):
    found = symbols(scanner, mail(("report.pdf", b"%PDF-1.4\n...", "application/pdf")))
    assert not [n for n in found if n.startswith(("BANNED_", "ARCHIVE_"))]


def test_banned_extension(scanner):
    found = symbols(scanner, mail(("setup.exe", PE, "application/octet-stream")))
    assert found["BANNED_EXTENSION"] == ("setup.exe",)
    assert verdict(scanner, mail(("setup.exe", PE, "application/octet-stream"))).action \
        is Action.REJECT


@pytest.mark.parametrize("name", ["invoice.pdf.exe", "scan.jpg.scr", "invoice.pdf         .exe",
                                  "Order.DOCX.js"])
def test_double_extension(scanner, name):
    found = symbols(scanner, mail((name, b"whatever", "application/octet-stream")))
    assert found["BANNED_DOUBLE_EXTENSION"] == (name,)
    assert "BANNED_EXTENSION" not in found


def test_executable_content_named_pdf(scanner):
    found = symbols(scanner, mail(("report.pdf", PE, "application/pdf")))
    assert found["BANNED_TYPE_MISMATCH"] == ("report.pdf is application/x-msdownload",)


def test_clamav_test_executable_named_pdf(scanner):
    exe = TESTFILES / "clam.exe"
    if not exe.exists():
        pytest.skip("clamav-testfiles not installed")
    found = symbols(scanner, mail(("paper.pdf", exe.read_bytes(), "application/pdf")))
    assert "BANNED_TYPE_MISMATCH" in found


def test_control_characters_in_names_are_neutralised(scanner):
    found = symbols(scanner, mail(("bad\x07name.exe", b"x", "application/octet-stream")))
    (option,) = found["BANNED_EXTENSION"]
    assert "\x07" not in option and option.endswith(".exe")


# --- archives -------------------------------------------------------------------------------

def test_names_inside_zip_tar_gz(scanner):
    z = zip_bytes([("docs/readme.txt", b"hello"), ("docs/invoice.pdf.exe", b"x"),
                   ("tool.bin", PE)])
    found = symbols(scanner, mail(("files.zip", z, "application/zip")))
    opts = found["BANNED_IN_ARCHIVE"]
    assert "files.zip/docs/invoice.pdf.exe (double extension)" in opts
    assert "files.zip/tool.bin (executable content: application/x-msdownload)" in opts
    assert not any("readme" in o for o in opts)

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:gz") as tf:
        info = tarfile.TarInfo("payload.scr")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    found = symbols(scanner, mail(("backup.tgz", tar.getvalue(), "application/gzip")))
    assert found["BANNED_IN_ARCHIVE"] == ("backup.tgz/backup.tar/payload.scr (extension)",)


def test_zip_in_zip_in_gzip(scanner):
    inner = zip_bytes([("run.vbs", b"MsgBox 1")])
    outer = zip_bytes([("inner.zip", inner)])
    gz = gzip.compress(outer)
    found = symbols(scanner, mail(("a.zip.gz", gz, "application/gzip")))
    assert found["BANNED_IN_ARCHIVE"] == ("a.zip.gz/a.zip/inner.zip/run.vbs (extension)",)


def test_7z_names_and_password(scanner):
    py7zr = pytest.importorskip("py7zr")
    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w") as sz:
        sz.writestr(b"MZ..", "invoice.doc.exe")
    found = symbols(scanner, mail(("a.7z", buf.getvalue(), "application/x-7z-compressed")))
    assert "a.7z/invoice.doc.exe (double extension)" in found["BANNED_IN_ARCHIVE"]

    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w", password="secret") as sz:
        sz.writestr(b"hidden", "notes.txt")
    found = symbols(scanner, mail(("locked.7z", buf.getvalue(), "application/x-7z-compressed")))
    assert "ARCHIVE_ENCRYPTED" in found and found["ARCHIVE_ENCRYPTED"][0].startswith("locked.7z")


def encrypt_flag(z: bytes) -> bytes:
    """Mark every member of a zip as encrypted (general purpose flag bit 0), as a
    password-protected zip carries it; zipfile cannot write encrypted archives itself."""
    data = bytearray(z)
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = data.find(sig)
        while pos >= 0:
            data[pos + at] |= 1
            pos = data.find(sig, pos + 4)
    return bytes(data)


def test_password_protected_zip(scanner):
    z = encrypt_flag(zip_bytes([("salary.xlsx", b"secret numbers")]))
    found = symbols(scanner, mail(("salary.zip", z, "application/zip")))
    assert found["ARCHIVE_ENCRYPTED"] == ("salary.zip (password-protected zip)",)
    # names stay visible in an encrypted zip, and are still checked
    z = encrypt_flag(zip_bytes([("invoice.exe", b"MZ")]))
    found = symbols(scanner, mail(("inv.zip", z, "application/zip")))
    assert "inv.zip/invoice.exe (extension)" in found["BANNED_IN_ARCHIVE"]


def test_corrupt_archive_is_unreadable_not_a_crash(scanner):
    broken = b"PK\x03\x04" + b"\xff" * 300
    found = symbols(scanner, mail(("broken.zip", broken, "application/zip")))
    assert found["ARCHIVE_UNREADABLE"][0].startswith("broken.zip")
    assert "CHECK_ERROR" not in found


def test_unreadable_rar_is_reported(scanner):
    pytest.importorskip("rarfile")
    # a RAR 5 signature followed by garbage: no rar writer exists here to make a real one
    rar = b"Rar!\x1a\x07\x01\x00" + bytes(range(256)) * 2
    found = symbols(scanner, mail(("x.rar", rar, "application/x-rar-compressed")))
    assert found["ARCHIVE_UNREADABLE"][0].startswith("x.rar")


# --- bombs: bounded time and memory, and a symbol ------------------------------------------

def test_deeply_nested_zip_stops_at_max_depth(scanner):
    data = zip_bytes([("core.txt", b"x")])
    for level in range(30):
        data = zip_bytes([(f"level{level}.zip", data)])
    started = time.monotonic()
    found = symbols(scanner, mail(("nest.zip", data, "application/zip")))
    assert "ARCHIVE_TOO_DEEP" in found
    assert time.monotonic() - started < 10


def test_one_gigabyte_of_zeros_compressed_small(scanner):
    """A 1 GiB zero-filled member written in a streaming way (never 1 GiB in memory)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("zeros.bin", "w", force_zip64=True) as member:
            chunk = bytes(4 * 1024 * 1024)
            for _ in range(256):
                member.write(chunk)
    bomb = buf.getvalue()
    assert len(bomb) < 8 * 1024 * 1024
    raw = mail(("bomb.zip", bomb, "application/zip"))
    tracemalloc.start()
    started = time.monotonic()
    found = symbols(scanner, raw)
    elapsed = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert found["ARCHIVE_TOO_LARGE"][0].startswith("bomb.zip/zeros.bin")
    assert elapsed < 15
    assert peak < 200 * 1024 * 1024          # the message and its parse, not the gigabyte


def test_lying_sizes_still_stop_at_the_limit():
    """A nested archive whose declared size is small but inflates to more than the cap."""
    payload = zip_bytes([("z.bin", bytes(40 * 1024 * 1024))])
    # the outer member claims 100 bytes; inflating it must stop at the read cap
    outer = bytearray(zip_bytes([("inner.zip", payload)]))
    pos = outer.find(b"PK\x01\x02")
    struct.pack_into("<L", outer, pos + 24, 100)
    limits = Limits(max_member_read=1024 * 1024, max_expanded_bytes=4 * 1024 * 1024)
    tracemalloc.start()
    report = inspect("lie.zip", bytes(outer), limits)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * 1024 * 1024           # never the 40 MiB
    assert [p.kind for p in report.problems] == ["too_large"]


def test_gzip_bomb_stops_at_the_expanded_limit():
    # 64 MiB of zeros compressed, with a limit of 8 MiB
    compressor = gzip.compress(bytes(64 * 1024 * 1024), compresslevel=1)
    limits = Limits(max_expanded_bytes=8 * 1024 * 1024, max_member_read=1024 * 1024)
    started = time.monotonic()
    report = inspect("z.gz", compressor, limits)
    assert [p.kind for p in report.problems] == ["too_large"]
    assert report.expanded_bytes < 9 * 1024 * 1024
    assert time.monotonic() - started < 5


def test_hundred_thousand_members(scanner):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(100_000):
            zf.writestr(zipfile.ZipInfo(f"f{i}"), b"")
    many = buf.getvalue()
    started = time.monotonic()
    found = symbols(scanner, mail(("many.zip", many, "application/zip")))
    assert found["ARCHIVE_TOO_MANY_FILES"] == ("many.zip (more than 5000)",)
    assert time.monotonic() - started < 20


def test_time_budget_ends_inspection():
    data = zip_bytes([(f"f{i}.txt", b"x") for i in range(2000)])
    report = inspect("slow.zip", data, Limits(time_budget=0.0))
    assert [p.kind for p in report.problems] == ["timeout"]


def test_attachment_past_the_content_limit_is_still_inspected(tmp_path):
    from filterd.config import PROJECT_RULES
    rules = tmp_path / "rules"
    rules.mkdir()
    for name in ("actions.toml", "core.toml", "scores.toml", "banned.toml"):
        shutil.copy(PROJECT_RULES / name, rules / name)
    settings = config.defaults().with_overrides({
        "daemon.state_dir": str(tmp_path / "state"), "rules.dir": str(rules),
        "scan.content_size_limit": 64 * 1024})
    scanner = Scanner(settings)
    raw = mail(("big.txt", b"a" * 200_000, "text/plain"), ("late.exe", b"MZ", "application/x-foo"))
    assert parse(raw, content_limit=64 * 1024).truncated
    assert "BANNED_EXTENSION" in symbols(scanner, raw)


def test_archive_kind():
    assert archive_kind(zip_bytes([("a", b"b")])) == "zip"
    assert archive_kind(gzip.compress(b"x")) == "gzip"
    assert archive_kind(b"plain text") is None
