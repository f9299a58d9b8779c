"""The per-message log line (kv and JSON) and the log targets (journald's native socket, syslog).

journald and syslog are played by datagram sockets in a temporary directory, read back here:
a fake at the wire, as the house rules ask; the line itself comes from the real Scanner.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from contextlib import closing, contextmanager
from pathlib import Path


from filterd import config, logsetup
from filterd.message import Envelope
from filterd.service import Scanner

DATA = Path(__file__).resolve().parents[1] / "data" / "replay"
CORPUS = DATA / "corpus"


@contextmanager
def root_logging_restored():
    """The root logger's handlers and level as they were, after a test let logsetup.setup()
    replace them (the handlers it installed are closed)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        yield root
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def settings_for(tmp_path: Path, **extra):
    overrides = {"rules.dir": str(DATA / "rules"), "rules.site_dir": str(tmp_path),
                 "daemon.state_dir": str(tmp_path / "state"), **extra}
    return config.defaults().with_overrides(overrides)


def scan_and_log(settings, name: str) -> None:
    scanner = Scanner(settings)

    async def go() -> None:
        outcome = await scanner.scan((CORPUS / name).read_bytes(),
                                     Envelope(mail_from="a@example.org",
                                              rcpt_tos=("b@example.net", "c@example.net"),
                                              client_ip="192.0.2.7", client_helo="mx.example.org",
                                              queue_id="4AbCdE"))
        disposition = await scanner.dispose(outcome, "milter")
        scanner.log_message(outcome, disposition, "milter")

    asyncio.run(go())


def test_kv_line_has_every_field(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="filterd.message")
    scan_and_log(settings_for(tmp_path), "alpha/spam/s2.eml")  # no Subject, no Date: 6 -> spam
    line = [r.getMessage() for r in caplog.records if r.name == "filterd.message"][-1]
    fields = dict(part.split("=", 1) for part in line.split(" ") if "=" in part
                  and not part.startswith('"'))
    assert fields["queue_id"] == "4AbCdE" and fields["client"] == "192.0.2.7"
    assert fields["from"] == "a@example.org" and fields["rcpt"] == "b@example.net,c@example.net"
    assert fields["verdict"] == "spam" and fields["action"] == "accept"
    assert fields["score"] == "6.0"
    assert fields["symbols"] == "MISSING_SUBJECT(4),MISSING_DATE(2)" or \
        sorted(fields["symbols"].split(",")) == ["MISSING_DATE(2)", "MISSING_SUBJECT(4)"]
    assert fields["phases"].startswith("pre:")
    assert fields["message_id"] == "<s2@example.org>"


def test_json_line_keeps_types(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="filterd.message")
    scan_and_log(settings_for(tmp_path, **{"log.format": "json"}), "alpha/spam/s1.eml")
    record = json.loads([r.getMessage() for r in caplog.records
                         if r.name == "filterd.message"][-1])
    assert record["rcpt"] == ["b@example.net", "c@example.net"]
    assert record["symbols"]["GTUBE"] == 100.0
    assert record["verdict"] == "reject" and record["reply"].startswith("550 5.7.1")
    assert set(record["phases"]) >= {"pre"} and record["ms"] >= 0
    assert record["failure"] == "-"


def test_journald_target_sends_native_fields(tmp_path, monkeypatch):
    path = tmp_path / "journal.socket"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(path))
    journal.settimeout(5)
    monkeypatch.setattr(logsetup, "JOURNAL_SOCKET", str(path))
    settings = settings_for(tmp_path, **{"log.target": "journald"})
    with root_logging_restored(), closing(journal):
        logsetup.setup(settings)
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logsetup.JournalHandler)
        scan_and_log(settings, "alpha/spam/s2.eml")
        datagrams = []
        while True:
            data = journal.recv(65536)
            datagrams.append(data)
            if b"FILTERD_QUEUE_ID=" in data:
                break
    fields = dict(line.split(b"=", 1) for line in datagrams[-1].split(b"\n") if b"=" in line)
    assert fields[b"SYSLOG_IDENTIFIER"] == b"filterd" and fields[b"PRIORITY"] == b"6"
    assert fields[b"FILTERD_QUEUE_ID"] == b"4AbCdE"
    assert fields[b"FILTERD_VERDICT"] == b"spam"
    assert fields[b"FILTERD_RCPT"] == b"b@example.net,c@example.net"
    assert fields[b"MESSAGE"].startswith(b"filterd.message: queue_id=4AbCdE")


def test_journal_field_with_newline_uses_binary_form():
    assert logsetup._journal_field("message", "a\nb") == b"MESSAGE\n" + (3).to_bytes(8, "little") + b"a\nb\n"
    assert logsetup._journal_field("filterd.queue-id", "x") == b"FILTERD_QUEUE_ID=x\n"


def test_syslog_target_uses_the_configured_socket_and_facility(tmp_path):
    path = tmp_path / "log.socket"
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(str(path))
    syslog.settimeout(5)
    settings = settings_for(tmp_path, **{"log.target": "syslog",
                                         "log.syslog_address": str(path)})
    with root_logging_restored(), closing(syslog):
        logsetup.setup(settings)
        logging.getLogger("filterd.test").warning("hello syslog")
        data = syslog.recv(65536)
    # <PRI> = facility mail (2) * 8 + warning (4) = 20
    assert data.startswith(b"<20>filterd[") and b"filterd.test: hello syslog" in data


def test_unreachable_targets_fall_back_to_stderr(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(logsetup, "JOURNAL_SOCKET", str(tmp_path / "absent.socket"))
    with root_logging_restored() as root:
        logsetup.setup(settings_for(tmp_path, **{"log.target": "journald"}))
        assert isinstance(root.handlers[0], logging.StreamHandler)
    assert "logging to stderr instead" in capsys.readouterr().err


# --- one line per record, control characters escaped (filterd.logsetup.SafeFormatter) -------
HOSTILE = (b"From: =?utf-8?q?Eve_=1B]0;pwned=07?= <eve@example.org>\r\n"
           b"To: b@example.net\r\n"
           b"Subject: =?utf-8?q?hello=0D=0A2026-12-04_12:00:00,000_INFO_filterd.message:_forged"
           b"=1B[2J=1B[31m_=E2=80=AEtxt.exe?=\r\n"
           b"Message-ID: <id\x1b[2J\x1b]0;t\x07@example.org>\r\n"
           b"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\n\r\nhello\r\n")


def _capture_stderr(settings, capsys, emit) -> str:
    with root_logging_restored():
        logsetup.setup(settings)
        emit()
    return capsys.readouterr().err


def _raw_controls(text: str) -> list[str]:
    return [ch for ch in text if (ord(ch) < 0x20 and ch != "\n") or 0x7f <= ord(ch) < 0xa0
            or ch in "\u202e\u2028\u2029"]


def test_hostile_message_logs_one_line_without_raw_controls(tmp_path, capsys):
    settings = settings_for(tmp_path)
    scanner = Scanner(settings)
    subject = {}

    async def go() -> None:
        outcome = await scanner.scan(HOSTILE, Envelope(
            mail_from="eve\x1b[2J@example.org", rcpt_tos=("b@example.net",),
            client_ip="192.0.2.7", client_helo="mx\r\nforged\x1b]0;t\x07", queue_id="4Hostile"))
        subject["text"] = outcome.view.subject
        disposition = await scanner.dispose(outcome, "milter")
        scanner.log_message(outcome, disposition, "milter")
        # what a check logging the decoded Subject would write
        logging.getLogger("filterd.test").warning("subject %s", outcome.view.subject)

    err = _capture_stderr(settings, capsys, lambda: asyncio.run(go()))
    assert "\r" in subject["text"] and "\n" in subject["text"] and "\x1b" in subject["text"]
    lines = err.splitlines()
    logger = lambda line: line.split(" ", 4)[3]  # noqa: E731 - "DATE TIME LEVEL NAME: text"
    message_lines = [line for line in lines if logger(line) == "filterd.message:"]
    assert len(message_lines) == 1, lines
    assert "queue_id=4Hostile" in message_lines[0]
    assert "\\x1b[2J" in message_lines[0]          # shown, not obeyed
    subject_lines = [line for line in lines if logger(line) == "filterd.test:"]
    assert len(subject_lines) == 1 and "\\x0d\\x0a2026-12-04" in subject_lines[0]
    assert "\\u202etxt.exe" in subject_lines[0]
    assert not any(line.startswith("2026-12-04 12:00:00") for line in lines)
    assert _raw_controls(err) == []


def test_traceback_lines_are_indented_and_escaped(tmp_path, capsys):
    def emit() -> None:
        try:
            raise ValueError("bad\n2026-01-01 00:00:00,000 INFO filterd.message: forged\x1b[2J")
        except ValueError:
            logging.getLogger("filterd.test").exception("failed for %s", "x\ny")

    err = _capture_stderr(settings_for(tmp_path), capsys, emit)
    lines = err.splitlines()
    assert lines[0].endswith("filterd.test: failed for x\\x0ay")
    assert all(line.startswith((" ", "\t")) for line in lines[1:]), lines
    assert _raw_controls(err) == []


def test_journald_fields_are_escaped_too(tmp_path, monkeypatch):
    path = tmp_path / "journal.socket"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(path))
    journal.settimeout(5)
    monkeypatch.setattr(logsetup, "JOURNAL_SOCKET", str(path))
    handler = logsetup.JournalHandler()
    handler.setFormatter(logsetup.SafeFormatter("%(name)s: %(message)s"))
    record = logging.LogRecord("filterd.message", logging.INFO, __file__, 1, "helo=%s",
                               ("a\nb\x1b",), None)
    record.filterd = {"helo": "a\nb\x1b"}
    try:
        payload = handler.payload(record)
    finally:
        handler.close()
        journal.close()
    assert b"MESSAGE=filterd.message: helo=a\\x0ab\\x1b\n" in payload
    assert b"FILTERD_HELO=a\\x0ab\\x1b\n" in payload
