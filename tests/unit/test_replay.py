"""`filterd replay` on a small labelled corpus with a known confusion matrix.

tests/data/replay/corpus holds 18 messages; tests/data/replay/rules is a fixed rule set (only
the core checks, scores chosen by hand) so the numbers below do not move when the shipped rules
change. Every figure asserted here was worked out by hand from the messages:

  corpus  file             score  action      label
  alpha   ham/h1           0      accept      ham   TN
  alpha   ham/h2           1      accept      ham   TN   (no Message-ID)
  alpha   ham/h3           2      tag         ham   TN   (no Date)
  alpha   ham/h4           5      spam        ham   FP   (no Subject, no Message-ID)
  alpha   ham/h5           0.5    tempfail    ham   tempfail (NUL byte; [failures])
  alpha   spam/s1          100    reject      spam  TP   (GTUBE)
  alpha   spam/s2          6      spam        spam  TP
  alpha   spam/s3          2      tag         spam  FN
  alpha   spam/s4          0      accept      spam  FN
  alpha   spam/s5          0      quarantine  spam  TP   (8-bit header; [forced])
  beta    phish/p1         10     quarantine  spam  TP
  beta    phish/p2         1      accept      spam  FN
  beta    ham/h6           4      tag         ham   TN
  beta    ham/h7           0      accept      ham   TN
  beta    ham/box.mbox:1   0      accept      ham   TN
  beta    ham/box.mbox:2   2      tag         ham   TN
  beta    virus/v1         0      accept      virus (left out)
  other   x1               0      accept      unlabelled
"""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest

from filterd.cli.main import main
from filterd.policy import Levels
from filterd.replay import (MessageResult, compare, fn_at_fp, label_of, roc_auc, summarize,
                            threshold_table)

DATA = Path(__file__).resolve().parents[1] / "data" / "replay"
CORPUS = DATA / "corpus"


def write_config(path: Path, site: Path) -> Path:
    path.write_text(f'[rules]\ndir = "{DATA / "rules"}"\nsite_dir = "{site}"\n'
                    f'[daemon]\nstate_dir = "{path.parent / "state"}"\n', encoding="utf-8")
    return path


@pytest.fixture
def config_a(tmp_path: Path) -> Path:
    (tmp_path / "site-a").mkdir()
    return write_config(tmp_path / "a.toml", tmp_path / "site-a")


@pytest.fixture
def config_b(tmp_path: Path) -> Path:
    return write_config(tmp_path / "b.toml", DATA / "site-b")


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code = main(["replay", "--json", "--no-progress", *argv])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_confusion_matrix_overall_and_per_corpus(capsys, config_a):
    code, data = run_json(capsys, str(CORPUS), "--config", str(config_a))
    assert code == 0
    assert data["messages"] == 18 and data["errors"] == 0
    assert data["levels"] == {"tag_level": 2.0, "tag2_level": 5.0, "kill_level": 8.0,
                              "reject_level": 50.0}
    overall = data["overall"]
    assert {k: overall[k] for k in ("ham", "fp", "tn", "ham_tempfail", "spam", "tp", "fn",
                                    "spam_tempfail", "virus", "unlabelled")} == {
        "ham": 9, "fp": 1, "tn": 7, "ham_tempfail": 1, "spam": 7, "tp": 4, "fn": 3,
        "spam_tempfail": 0, "virus": 1, "unlabelled": 1}
    assert overall["fp_rate"] == pytest.approx(1 / 9)
    assert overall["fn_rate"] == pytest.approx(3 / 7)
    alpha, beta = data["corpora"]["alpha"], data["corpora"]["beta"]
    assert (alpha["ham"], alpha["fp"], alpha["tn"], alpha["ham_tempfail"]) == (5, 1, 3, 1)
    assert (alpha["spam"], alpha["tp"], alpha["fn"]) == (5, 3, 2)
    assert (beta["ham"], beta["fp"], beta["tn"], beta["spam"], beta["tp"], beta["fn"],
            beta["virus"]) == (4, 0, 4, 2, 1, 1, 1)
    assert data["actions"] == {"accept": 8, "quarantine": 2, "reject": 1, "spam": 2, "tag": 4,
                               "tempfail": 1}


def test_auc_fn_at_fp_and_threshold_table(capsys, config_a):
    _, data = run_json(capsys, str(CORPUS), "--config", str(config_a))
    # ham scores 0,0,0,1,2,2,4,5; spam 100,6,2,0,0,10,1: 35.5 wins of 56 pairs
    assert data["auc"] == pytest.approx(35.5 / 56)
    # FP <= 0.1% of 8 ham allows none: the threshold must pass the top ham score 5 -> 6
    at = data["fn_at_fp"]
    assert (at["threshold"], at["fp"], at["fn"]) == (6.0, 0, 4)
    assert at["fn_rate"] == pytest.approx(4 / 7)
    rows = {row["level"]: row for row in data["thresholds"]}
    # the row at the configured tag2_level repeats the confusion matrix
    assert rows[5.0]["is_tag2_level"] and (rows[5.0]["fp"], rows[5.0]["fn"]) == (1, 3)
    assert rows[8.0]["is_kill_level"]
    assert (rows[8.0]["ham_killed"], rows[8.0]["spam_killed"]) == (0, 3)
    assert (rows[1.0]["fp"], rows[1.0]["fn"]) == (5, 1)
    assert (rows[6.0]["fp"], rows[6.0]["fn"]) == (0, 3)
    assert (rows[20.0]["fp"], rows[20.0]["fn"], rows[20.0]["spam_killed"]) == (0, 5, 2)


def test_symbol_hits_and_slowest(capsys, config_a):
    _, data = run_json(capsys, str(CORPUS), "--config", str(config_a))
    assert data["symbols"]["MISSING_DATE"] == {"ham": 2, "spam": 3, "other": 0}
    assert data["symbols"]["GTUBE"] == {"ham": 0, "spam": 1, "other": 0}
    assert data["symbols"]["MESSAGE_NUL_BYTES"] == {"ham": 1, "spam": 0, "other": 0}
    assert len(data["slowest"]) == 10
    seconds = [row["seconds"] for row in data["slowest"]]
    assert seconds == sorted(seconds, reverse=True)


def test_forced_label_and_maildir(capsys, config_a):
    code, data = run_json(capsys, str(DATA / "maildir"), "--label", "spam",
                          "--config", str(config_a))
    assert code == 0
    overall = data["overall"]
    # two messages: one clean (FN), one without Subject (score 4, tag: FN at tag2_level 5)
    assert (overall["spam"], overall["tp"], overall["fn"], overall["ham"]) == (2, 0, 2, 0)
    assert data["auc"] is None


def test_compare_lists_changed_actions(capsys, config_a, config_b):
    code, data = run_json(capsys, str(CORPUS), "--config", str(config_a),
                          "--compare", str(config_b))
    assert code == 0
    changed = {Path(row["name"]).name: (row["action_a"], row["action_b"])
               for row in data["changed"]}
    assert changed == {"h3.eml": ("tag", "spam"), "s3.eml": ("tag", "spam"),
                       "box.mbox:2": ("tag", "spam"), "h6.eml": ("tag", "spam")}
    b = data["compare"]["summary"]["overall"]
    assert (b["fp"], b["fn"]) == (4, 2)


def test_text_output_and_unreadable_path(capsys, config_a, tmp_path):
    code = main(["replay", "--no-progress", "--config", str(config_a), str(CORPUS),
                 str(tmp_path / "missing")])
    captured = capsys.readouterr()
    assert code == 1  # one unreadable path: reported, the rest still measured
    assert "missing: no such file or directory" in captured.err
    assert "ROC AUC: 0.633929" in captured.out
    assert "<- tag2_level" in captured.out and "<- kill_level" in captured.out


def test_bad_config_is_a_clear_error(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[replay]\nfp_target = 'x'\n")
    with pytest.raises(SystemExit) as exited:  # as for every command: exit status 1
        main(["replay", "--no-progress", "--config", str(bad), str(CORPUS)])
    assert exited.value.code == 1
    assert "configuration error" in capsys.readouterr().err


def test_progress_bar_draws_on_stderr(capsys, config_a):
    assert main(["replay", "--progress", "--config", str(config_a), str(CORPUS / "alpha")]) == 0
    err = capsys.readouterr().err
    assert "\rreplay [" in err and "10/10" in err


class _Cells(HTMLParser):
    """Collects data-value of every <td> with a class, per table id."""

    def __init__(self) -> None:
        super().__init__()
        self.table: str | None = None
        self.cells: dict[str, list[tuple[str, str]]] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.table = a.get("id")
        elif tag == "td" and "data-value" in a and self.table:
            self.cells.setdefault(self.table, []).append((a.get("class", ""), a["data-value"]))


def test_report_writes_html_pngs_and_json(capsys, config_a, tmp_path):
    report = tmp_path / "report"
    code, data = run_json(capsys, str(CORPUS), "--config", str(config_a), "--report", str(report))
    assert code == 0
    for name in ("roc.png", "scores.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((report / "replay.json").read_text()) == data
    parser = _Cells()
    parser.feed((report / "index.html").read_text())
    figures = dict(parser.cells["figures"])
    assert json.loads(figures["auc"]) == data["auc"]
    levels = [json.loads(v) for c, v in parser.cells["thresholds"] if c == "level"]
    assert levels == [row["level"] for row in data["thresholds"]]


# --- the figures as functions ------------------------------------------------------------

def test_label_of_paths():
    assert label_of("/c/trec07p/ham/inmail.1") == ("ham", "trec07p")
    assert label_of("/c/nazario-phishing/phish/x.mbox:3") == ("spam", "nazario-phishing")
    assert label_of("/c/clamav/virus/clam.exe") == ("virus", "clamav")
    assert label_of("/c/misc/ham") == (None, "misc")  # a file named ham is not a label
    assert label_of("spam/1")[0] == "spam"


def test_roc_auc_edge_cases():
    assert roc_auc([], [1.0]) is None
    assert roc_auc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert roc_auc([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert roc_auc([1.0, 1.0], [1.0]) == 0.5


def test_fn_at_fp_allows_the_budget():
    ham = [float(i) for i in range(1000)]       # 0..999; 0.1% allows the top ham as FP
    spam = [998.5, 999.5, 2000.0]
    at = fn_at_fp(ham, spam, 0.001)
    assert at["threshold"] == 998.5 and at["fp"] == 1 and at["fn"] == 0
    strict = fn_at_fp(ham, spam, 0.0)
    assert strict["threshold"] == 999.5 and strict["fp"] == 0 and strict["fn"] == 1
    assert fn_at_fp(ham, [], 0.001) is None
    everything = fn_at_fp([1.0], [0.5, 3.0], 1.0)
    assert everything["fn"] == 0


def test_threshold_table_counts_forced_and_skips_tempfail():
    def r(label, score, action, forced=None):
        return MessageResult("x", "c", label, action, score, (), "", 0.0, forced=forced)
    results = [r("ham", 7.0, "spam"), r("ham", 9.0, "tempfail", "tempfail"),
               r("spam", 0.0, "quarantine", "quarantine"), r("spam", 3.0, "tag")]
    rows = {row["level"]: row for row in threshold_table(results, Levels(2.0, 6.0, 10.0, 15.0),
                                                         grid=(1.0, 8.0))}
    assert (rows[6.0]["fp"], rows[6.0]["fn"]) == (1, 1)
    assert (rows[8.0]["fp"], rows[8.0]["fn"]) == (0, 1)
    assert (rows[1.0]["fp"], rows[1.0]["fn"]) == (1, 0)
    assert rows[10.0]["spam_killed"] == 1 and rows[10.0]["ham_killed"] == 0
    summary = summarize(results, Levels(2.0, 6.0, 10.0, 15.0))
    assert summary.overall.ham_tempfail == 1 and summary.overall.fp == 1
    assert not math.isnan(summary.auc)


def test_compare_function():
    a = [MessageResult("m1", "c", "ham", "tag", 3.0, ("A",), "", 0.0),
         MessageResult("m2", "c", "ham", "accept", 0.0, (), "", 0.0)]
    b = [MessageResult("m1", "c", "ham", "spam", 6.0, ("A", "B"), "", 0.0),
         MessageResult("m2", "c", "ham", "accept", 0.0, (), "", 0.0)]
    assert compare(a, b) == [{"name": "m1", "label": "ham", "action_a": "tag",
                              "action_b": "spam", "verdict_a": "pass", "verdict_b": "spam",
                              "score_a": 3.0, "score_b": 6.0,
                              "symbols_added": ["B"], "symbols_removed": []}]
