"""The per-message log line (kv and JSON) and the log targets (journald's native socket, syslog).

journald and syslog are played by datagram sockets in a temporary directory, read back here:
a fake at the wire, as the house rules ask; the line itself comes from the real Scanner.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path

import pytest

from filterd import config, logsetup
from filterd.message import Envelope
from filterd.service import Scanner

DATA = Path(__file__).resolve().parents[1] / "data" / "replay"
CORPUS = DATA / "corpus"


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
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
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
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        journal.close()
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
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logsetup.setup(settings)
        logging.getLogger("filterd.test").warning("hello syslog")
        data = syslog.recv(65536)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        syslog.close()
    # <PRI> = facility mail (2) * 8 + warning (4) = 20
    assert data.startswith(b"<20>filterd[") and b"filterd.test: hello syslog" in data


def test_unreachable_targets_fall_back_to_stderr(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(logsetup, "JOURNAL_SOCKET", str(tmp_path / "absent.socket"))
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logsetup.setup(settings_for(tmp_path, **{"log.target": "journald"}))
        assert isinstance(root.handlers[0], logging.StreamHandler)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    assert "logging to stderr instead" in capsys.readouterr().err
