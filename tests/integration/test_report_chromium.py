"""The replay report renders in headless Chromium and shows the numbers of replay's JSON.

`filterd replay --json --report DIR` runs once over the fixture corpus (tests/data/replay);
Chromium loads DIR/index.html from disk and dumps the DOM it rendered; the AUC, the confusion
matrix and the threshold table read back from that DOM (shown text and data-value) must equal
the JSON printed by the same run. Skips with a message when Debian's `chromium` is absent
(scripts/bootstrap.sh installs it with the test packages).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "replay"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


class Dom(HTMLParser):
    """Cells of the rendered tables: table id -> rows -> [(class, data-value, shown text)]."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, str | None, str]]]] = {}
        self.table: str | None = None
        self.cell: list | None = None
        self.row_attrs: list[dict[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.table = a.get("id")
            self.tables.setdefault(self.table or "", [])
        elif tag == "tr" and self.table is not None:
            self.tables[self.table].append([])
            self.row_attrs.append(a)
        elif tag == "td" and self.table is not None:
            self.cell = [a.get("class") or "", a.get("data-value"), ""]

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[2] += data

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None and self.table is not None:
            self.tables[self.table][-1].append(tuple(self.cell))
            self.cell = None
        elif tag == "table":
            self.table = None


def render(page: Path) -> str:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        done = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def cells(row: list[tuple[str, str | None, str]]) -> dict[str, tuple[str | None, str]]:
    return {cls: (value, text) for cls, value, text in row if cls}


def test_rendered_report_matches_replay_json(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    config = tmp_path / "a.toml"
    config.write_text(f'[rules]\ndir = "{DATA / "rules"}"\nsite_dir = "{site}"\n')
    report = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "filterd", "replay", "--json", "--no-progress",
                           "--config", str(config), "--report", str(report),
                           str(DATA / "corpus")], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    dom_text = render(report / "index.html")
    assert "<h1>filterd replay</h1>" in dom_text
    dom = Dom()
    dom.feed(dom_text)

    figures = {k: v for row in dom.tables["figures"] for k, v in cells(row).items()}
    value, shown = figures["auc"]
    assert json.loads(value) == data["auc"]
    assert shown == f"{data['auc']:.6f}"
    value, shown = figures["fn_at_fp"]
    assert json.loads(value) == data["fn_at_fp"]["fn_rate"]
    assert shown == f"{data['fn_at_fp']['fn_rate'] * 100:.3f}%"

    rows = [cells(r) for r in dom.tables["confusion"] if r]
    assert len(rows) == len(data["corpora"]) + 1
    for row, expected in zip(rows, [*data["corpora"].values(), data["overall"]]):
        for key in ("ham", "fp", "tn", "ham_tempfail", "spam", "tp", "fn", "spam_tempfail"):
            value, shown = row[key]
            assert json.loads(value) == expected[key] and int(shown) == expected[key], key
        for key in ("fp_rate", "fn_rate"):
            value, shown = row[key]
            assert json.loads(value) == expected[key]
            assert shown == ("-" if expected[key] is None else f"{expected[key] * 100:.3f}%")

    rows = [cells(r) for r in dom.tables["thresholds"] if r]
    assert len(rows) == len(data["thresholds"])
    for row, expected in zip(rows, data["thresholds"]):
        assert float(row["level"][1]) == expected["level"]
        for key in ("fp", "fn", "ham_killed", "spam_killed"):
            assert int(row[key][1]) == expected[key], (expected["level"], key)
        for key in ("fp_rate", "fn_rate"):
            assert row[key][1] == f"{expected[key] * 100:.3f}%"
    # the images the page points at were written and are PNGs
    for name in ("roc.png", "scores.png"):
        assert (report / name).read_bytes()[:4] == b"\x89PNG"
