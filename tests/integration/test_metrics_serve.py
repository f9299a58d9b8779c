"""The metrics endpoint of the real `filterd serve`, scraped after mail went through Postfix.

Postfix (milter mode, tests/harness) hands filterd three clean messages and one carrying the
GTUBE string (rules: the fixed set in tests/data/replay/rules, where GTUBE rejects); the scrape must count exactly those: four scans, one reject with GTUBE among its
symbols, a total-time observation per message, and the health gauges of the wired services.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.messages import message

DATA = Path(__file__).resolve().parents[1] / "data" / "replay"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@pytest.fixture(scope="module")
def filterd_overrides(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # the small fixed rule set of the replay tests: known symbols, and a start-up that does
    # not wait for the shipped rule set to compile
    site = tmp_path_factory.mktemp("site")
    site.chmod(0o755)
    return {"rules.dir": str(DATA / "rules"), "rules.site_dir": str(site)}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_scrape_counts_the_messages_sent(mta_milter):
    port = mta_milter.filterd.metrics_port
    before = scrape(port)  # the rig is shared by the module: count the difference
    for i in range(3):
        code, _ = mta_milter.send(message(subject=f"metrics test {i}"))
        assert code == 250, mta_milter.logs()
    code, _ = mta_milter.send(message(subject="metrics spam", body=f"{GTUBE}\n"))
    assert code == 550, mta_milter.logs()
    deadline = time.monotonic() + 30
    while True:  # the hook runs right after the reply; give it a moment
        after = scrape(port)
        if total(after, "filterd_messages_total") - total(before, "filterd_messages_total") >= 4:
            break
        assert time.monotonic() < deadline, mta_milter.logs()
        time.sleep(0.2)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert total(after, "filterd_messages_total") - total(before, "filterd_messages_total") == 4
    assert delta("filterd_messages_total", action="reject") == 1
    assert delta("filterd_dispositions_total", disposition="reject") == 1
    assert (total(after, "filterd_dispositions_total")
            - total(before, "filterd_dispositions_total")) == 4
    assert delta("filterd_symbol_hits_total", symbol="GTUBE") == 1
    assert delta("filterd_scan_seconds_count", phase="total") == 4
    assert delta("filterd_message_bytes_count") == 4
    assert after[("filterd_component_up", (("component", "state_dir"),))] == 1
    if ("filterd_component_up", (("component", "clamd"),)) in after:
        assert after[("filterd_component_up", (("component", "clamd"),))] == 1
    from filterd import __version__
    assert after.get(("filterd_info", (("version", __version__),))) == 1
