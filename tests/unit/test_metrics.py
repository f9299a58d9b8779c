"""filterd.metrics: counters, histograms and health gauges, scraped over real HTTP on loopback.

Scans go through the real Scanner (the fixed replay-test rule set, so symbols are known) and
the real dispose(); the hook is the one the daemon installs. Only the scrape is read back.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from filterd import config, metrics
from filterd.message import Envelope
from filterd.service import AFTER_SCAN_HOOKS, Scanner

DATA = Path(__file__).resolve().parents[1] / "data" / "replay"
CORPUS = DATA / "corpus"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def settings(tmp_path: Path):
    state = tmp_path / "state"
    (state / "quarantine").mkdir(parents=True)
    overrides = {"rules.dir": str(DATA / "rules"), "rules.site_dir": str(tmp_path),
                 "daemon.state_dir": str(state), "metrics.listen": "127.0.0.1:0",
                 "metrics.health_timeout": 2.0, "smtp.reinject": f"127.0.0.1:{_closed_port()}"}
    if "clamav.tcp" in config.BY_KEY:
        overrides.update({"clamav.tcp": f"127.0.0.1:{_closed_port()}", "clamav.socket": ""})
    if "dns.nameservers" in config.BY_KEY:
        overrides.update({"dns.nameservers": ["127.0.0.1"], "dns.port": _closed_port(),
                          "dns.timeout": 0.5})
    return config.defaults().with_overrides(overrides)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_parse_listen():
    assert metrics.parse_listen("") is None
    assert metrics.parse_listen("127.0.0.1:9750") == metrics.Endpoint("127.0.0.1", 9750)
    assert metrics.parse_listen("[::1]:9750") == metrics.Endpoint("::1", 9750)
    with pytest.raises(ValueError):
        metrics.parse_listen("localhost")


def test_counters_histograms_and_gauges_match_the_messages(settings):
    m = metrics.start(settings)
    assert m is not None and m.observe in AFTER_SCAN_HOOKS
    try:
        port = m._server.server_address[1]
        scanner = Scanner(settings)
        names = ["alpha/ham/h1.eml", "alpha/ham/h3.eml", "alpha/spam/s1.eml",
                 "alpha/spam/s2.eml", "alpha/ham/h5.eml"]

        async def send() -> None:
            for name in names:
                outcome = await scanner.scan((CORPUS / name).read_bytes(),
                                             Envelope(mail_from="a@example.org",
                                                      rcpt_tos=("b@example.net",),
                                                      client_ip="192.0.2.1", queue_id=name))
                disposition = await scanner.dispose(outcome, "milter")
                scanner.log_message(outcome, disposition, "milter")

        asyncio.run(send())
        got = scrape(port)
    finally:
        metrics.stop(m)
    assert m.observe not in AFTER_SCAN_HOOKS

    def value(name: str, **labels: str) -> float:
        return got.get((name, tuple(sorted(labels.items()))), 0.0)

    # h1 accept, h3 tag (no Date), s1 reject (GTUBE), s2 spam (6), h5 tempfail (NUL)
    assert value("filterd_messages_total", action="accept") == 1
    assert value("filterd_messages_total", action="tag") == 1
    assert value("filterd_messages_total", action="reject") == 1
    assert value("filterd_messages_total", action="spam") == 1
    assert value("filterd_messages_total", action="tempfail") == 1
    assert value("filterd_dispositions_total", disposition="reject") == 1
    assert value("filterd_dispositions_total", disposition="tempfail") == 1
    assert value("filterd_dispositions_total", disposition="accept") == 3
    assert value("filterd_symbol_hits_total", symbol="GTUBE") == 1
    assert value("filterd_symbol_hits_total", symbol="MISSING_DATE") == 2
    assert value("filterd_symbol_hits_total", symbol="MESSAGE_NUL_BYTES") == 1
    assert value("filterd_scan_seconds_count", phase="total") == 5
    assert value("filterd_scan_seconds_count", phase="pre") == 5
    assert value("filterd_message_score_count") == 5
    assert value("filterd_message_score_sum") == pytest.approx(0 + 2 + 100 + 6 + 0.5)
    sizes = sum((CORPUS / n).stat().st_size for n in names)
    assert value("filterd_message_bytes_sum") == sizes
    # health gauges: the state dir is writable, the reinjection port and clamd are closed
    assert value("filterd_component_up", component="state_dir") == 1
    assert value("filterd_component_up", component="reinject") == 0
    if "clamav.tcp" in config.BY_KEY:
        assert value("filterd_component_up", component="clamd") == 0
    assert ("filterd_component_up", (("component", "daemon"),)) not in got
    assert value("filterd_quarantine_messages") == 0


def test_quarantine_size_counts_spool_files(tmp_path):
    day = tmp_path / "20250101"
    day.mkdir()
    (day / "a.eml").write_bytes(b"x" * 10)
    (day / "a.json").write_bytes(b"{}")
    (day / "b.eml").write_bytes(b"y" * 5)
    assert metrics.spool_size(tmp_path) == (2, 15)
    assert metrics.spool_size(tmp_path / "absent") == (0, 0)


def test_disabled_and_unbindable_endpoint(settings, caplog):
    assert metrics.start(settings.with_overrides({"metrics.listen": ""})) is None
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        m = metrics.start(settings.with_overrides({"metrics.listen": f"127.0.0.1:{port}"}))
    assert m is None  # logged; the daemon runs on without metrics
    assert "metrics endpoint" in caplog.text


def test_labelled_children_are_looked_up_once(settings):
    """observe() remembers each labelled series: labels() is asked once per label value."""
    from types import SimpleNamespace

    from filterd.policy import Action, Symbol

    m = metrics.Metrics(settings)
    calls: list[str] = []
    real = m.symbols.labels

    def counting(*values):
        calls.extend(values)
        return real(*values)

    m.symbols.labels = counting  # type: ignore[method-assign]
    outcome = SimpleNamespace(
        verdict=SimpleNamespace(action=Action.SPAM, score=7.0,
                                symbols=(Symbol("A"), Symbol("B"), Symbol("A"))),
        failure=None, timings={"main": 0.01, "total": 0.02}, view=SimpleNamespace(size=100))
    disposition = SimpleNamespace(action=Action.ACCEPT)
    for _ in range(3):
        m.observe(outcome, disposition)
    assert sorted(calls) == ["A", "B"]
    assert real("A")._value.get() == 3 and real("B")._value.get() == 3
    assert m.messages.labels("spam")._value.get() == 3
    assert m.phase_seconds.labels("total")._sum.get() == pytest.approx(0.06)
