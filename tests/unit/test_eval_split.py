"""bench/eval_split.py: the counting (FP/FN, AUC, FN at FP, compare, census) on results built
here by hand, and one run over a handful of corpus messages.

The hand-made results (corpus "c" unless said):
  name  label  action      score  symbols
  h1    ham    accept      0      A
  h2    ham    tag         1      A, B
  h3    ham    spam        2      B          FP
  h4    ham    tempfail    9      -          neither FP nor TN; no score for the ROC
  s1    spam   spam        1.5    B          TP
  s2    spam   accept      3      -          FN (score above every ham: caught at FP 0)
  s3    spam   reject      20     C          TP   (corpus "d": no ham there)
  v1    virus  quarantine  0      CLAM       left out of the figures
ROC over c+d: ham 0, 1, 2 against spam 1.5, 3, 20: 1.5 beats two hams, 3 and 20 all three,
so AUC = 8/9. FN at FP <= 0.1 % of 3 ham allows no FP: the threshold is the lowest score above
the top ham (2), 3, and s1 (1.5) is the one FN: 1/3.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from filterd.policy import Levels
from filterd.replay import MessageResult, from_record, to_record

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("eval_split", ROOT / "bench" / "eval_split.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_split"] = module  # the forked pool pickles its functions by module
    spec.loader.exec_module(module)
    return module


tool = _load_tool()
LEVELS = Levels(2.0, 6.0, 10.0, 15.0)


def r(name, label, action, score, symbols=(), corpus="c", forced=None):
    return MessageResult(name, corpus, label, action, score, tuple(symbols), "", 0.0,
                         forced=forced)


def before():
    return [r("h1", "ham", "accept", 0.0, ("A",)), r("h2", "ham", "tag", 1.0, ("A", "B")),
            r("h3", "ham", "spam", 2.0, ("B",)), r("h4", "ham", "tempfail", 9.0, (),
                                                   forced="tempfail"),
            r("s1", "spam", "spam", 1.5, ("B",)), r("s2", "spam", "accept", 3.0),
            r("s3", "spam", "reject", 20.0, ("C",), corpus="d"),
            r("v1", "virus", "quarantine", 0.0, ("CLAM",), forced="quarantine")]


def test_fp_fn_auc_and_fn_at_fp():
    data = tool.figures(before(), LEVELS, 0.001)
    c, d, overall = data["corpora"]["c"], data["corpora"]["d"], data["overall"]
    assert (c["ham"], c["fp"], c["tn"], c["ham_tempfail"]) == (4, 1, 2, 1)
    assert (c["spam"], c["tp"], c["fn"]) == (2, 1, 1)
    assert c["fp_rate"] == pytest.approx(1 / 4) and c["fn_rate"] == pytest.approx(1 / 2)
    assert (d["ham"], d["spam"], d["tp"], d["fn_rate"]) == (0, 1, 1, 0.0)
    assert (overall["fp"], overall["fn"], overall["virus"]) == (1, 1, 1)
    assert overall["fn_rate"] == pytest.approx(1 / 3)
    assert data["auc"] == pytest.approx(8 / 9)
    at = data["fn_at_fp"]
    assert (at["threshold"], at["fp"], at["fn"]) == (3.0, 0, 1)
    assert at["fn_rate"] == pytest.approx(1 / 3)
    # per corpus: c alone is ham 0, 1, 2 against spam 1.5, 3; d has no ham, so no ROC
    assert c["auc"] == pytest.approx(5 / 6)
    assert c["fn_at_fp"]["fn"] == 1 and c["fn_at_fp"]["threshold"] == 3.0
    assert d["auc"] is None


def test_printed_figures_show_each_corpus_and_the_scores():
    import io
    out = io.StringIO()
    tool.print_figures("test", tool.figures(before(), LEVELS, 0.001), out)
    text = out.getvalue()
    rows = [line.split() for line in text.splitlines() if line.strip()]
    confusion = [row for row in rows if row[0] in ("c", "overall") and len(row) == 11]
    # corpus ham FP TN tmpf spam TP FN tmpf FP-rate FN-rate
    assert confusion == [["c", "4", "1", "2", "1", "2", "1", "1", "0", "25.000%", "50.000%"],
                         ["overall", "4", "1", "2", "1", "3", "2", "1", "0", "25.000%",
                          "33.333%"]]
    assert "ROC AUC: 0.888889" in text
    assert "FN rate at FP <= 0.1% of ham: 33.333% (threshold 3: FP 0, FN 1)" in text
    # per corpus: name AUC FN@FP threshold FP FN; d (no ham) has no row
    assert [row for row in rows if len(row) == 6 and row[0] in ("c", "d")] == [
        ["c", "0.833333", "50.000%", "3", "0", "1"]]


def after():
    """h2 loses A and gains D (still tag); h3 is no longer spam; s2 gains C and is caught;
    s3 goes from reject to quarantine (same verdict); v1 unchanged."""
    old = {x.name: x for x in before()}
    return [old["h1"], r("h2", "ham", "tag", 1.5, ("B", "D")), r("h3", "ham", "tag", 2.0, ("B",)),
            old["h4"], old["s1"], r("s2", "spam", "spam", 7.0, ("C",)),
            r("s3", "spam", "quarantine", 12.0, ("C",), corpus="d"), old["v1"]]


def test_comparison_counts_verdicts_actions_and_symbols():
    cmp = tool.comparison(before(), after())
    assert cmp["actions_changed"] == 3  # h3, s2, s3 (h2 kept its action, not its symbols)
    names = {c["name"]: (c["verdict_a"], c["verdict_b"]) for c in cmp["verdicts_changed"]}
    assert names == {"h3": ("spam", "pass"), "s2": ("pass", "spam")}
    assert cmp["verdicts_changed_by_label"] == {"ham": 1, "spam": 1}
    assert cmp["symbols"] == {
        "A": {"ham_gained": 0, "ham_lost": 1, "spam_gained": 0, "spam_lost": 0,
              "other_gained": 0, "other_lost": 0},
        "C": {"ham_gained": 0, "ham_lost": 0, "spam_gained": 1, "spam_lost": 0,
              "other_gained": 0, "other_lost": 0},
        "D": {"ham_gained": 1, "ham_lost": 0, "spam_gained": 0, "spam_lost": 0,
              "other_gained": 0, "other_lost": 0}}
    assert cmp["only_old"] == [] and cmp["only_new"] == []
    fewer = tool.comparison(before(), after()[:-1])
    assert fewer["only_old"] == ["v1"]


def test_jsonl_round_trip_and_compare_of_two_files(tmp_path, capsys):
    for x in before():
        assert from_record(json.loads(json.dumps(to_record(x)))) == x  # reason/seconds empty
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    tool.write_jsonl(old, before())
    tool.write_jsonl(new, after())
    assert tool.read_jsonl(old) == before()
    assert tool.main(["--compare", str(old), "--new", str(new)]) == 0
    text = capsys.readouterr().out
    assert "actions changed: 3; verdicts changed: 2 (ham 1, spam 1)" in text
    assert "  [ham] spam -> pass (spam 2 -> tag 2)  h3" in text
    assert "  [spam] pass -> spam (accept 3 -> spam 7) +C  s2" in text
    assert "symbols gained/lost: 3" in text
    (tmp_path / "bad.jsonl").write_text('{"path": "x"}\n')
    assert tool.main(["--compare", str(tmp_path / "bad.jsonl"), "--new", str(new)]) == 1
    assert "bad.jsonl:1: not a result line" in capsys.readouterr().err


def test_census_counts_every_message_and_names_the_ham():
    data = tool.census(before())
    assert data["totals"] == {"ham": 4, "spam": 3, "other": 1}
    assert data["symbols"]["A"] == {"ham": 2, "spam": 0, "other": 0}
    assert data["symbols"]["B"] == {"ham": 2, "spam": 1, "other": 0}
    assert data["symbols"]["CLAM"] == {"ham": 0, "spam": 0, "other": 1}
    only = tool.census(before(), ["B", "NEVER_SEEN"])
    assert list(only["symbols"]) == ["B", "NEVER_SEEN"]
    assert only["symbols"]["NEVER_SEEN"] == {"ham": 0, "spam": 0, "other": 0}
    assert only["ham_paths"] == {"B": ["h2", "h3"], "NEVER_SEEN": []}


def test_split_file_is_checked(tmp_path, capsys):
    bad = tmp_path / "SPLIT.tsv"
    bad.write_text("path\tlabel\thalf\nx/ham/1\tham\tC\n")
    assert tool.main(["--split", str(bad)]) == 1
    assert "expected path<TAB>label<TAB>A|B" in capsys.readouterr().err
    bad.write_text("not a split\n")
    assert tool.main(["--split", str(bad)]) == 1
    assert "not a split file" in capsys.readouterr().err
    assert tool.main(["--new", "x.jsonl"]) == 2


@pytest.mark.corpus
def test_smoke_on_a_few_corpus_messages(corpora_dir, tmp_path, capsys):
    """Two messages of each half and label from the real time split, trained and scanned with
    the shipped defaults; the census also takes what MANIFEST.tsv lists outside the split."""
    rows = (corpora_dir / "SPLIT-TIME.tsv").read_text().splitlines()
    picked, seen = [rows[0]], {}
    for line in rows[1:]:
        path, label, half = line.split("\t")
        key = (half, "ham" if label == "ham" else "spam")
        if seen.get(key, 0) < 2:
            seen[key] = seen.get(key, 0) + 1
            picked.append(line)
    split = tmp_path / "SPLIT-SMOKE.tsv"
    split.write_text("\n".join(picked) + "\n")
    out = tmp_path / "b.jsonl"
    code = tool.main(["--split", str(split), "--corpora", str(corpora_dir), "--out", str(out),
                      "--census", "--symbols", "BAYES_UNTRAINED,NO_SUCH_SYMBOL", "--limit", "2"])
    text = capsys.readouterr().out
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(x["label"] for x in lines) == ["ham", "ham", "spam", "spam"]
    b_paths = {line.split("\t")[0] for line in picked[1:] if line.endswith("\tB")}
    assert {x["path"] for x in lines} == b_paths
    # 2 ham and 2 spam learned: below bayes.min_ham/min_spam, so every scan says so
    assert all("BAYES_UNTRAINED" in x["symbols"] for x in lines)
    assert "trained on half A (2 ham, 2 spam)" in text
    overall = next(line for line in text.splitlines() if line.startswith("overall"))
    assert overall.split()[1] == "2" and overall.split()[5] == "2"
    census = text[text.index("== symbol census"):]
    ham_total = int(census.split(" ham,")[0].rsplit("(", 1)[1])
    untrained = next(line for line in census.splitlines() if line.startswith("BAYES_UNTRAINED"))
    assert int(untrained.split()[1]) == ham_total >= 4
    assert next(line for line in census.splitlines()
                if line.startswith("NO_SUCH_SYMBOL")).split()[1:] == ["0", "0", "0"]
    assert tool.main(["--compare", str(out), "--new", str(out)]) == 0
    assert "verdicts changed: 0" in capsys.readouterr().out


def test_refit_takes_no_config(capsys):
    assert tool.main(["--refit", "--config", "x.toml"]) == 2
    assert "--refit fits the shipped rules" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.corpus
def test_refit_smoke_fits_both_score_sets_into_the_site_layer(corpora_dir, tmp_path, capsys):
    """--refit on a split file outside the corpora (the fit reads a symlinked view): both
    score files land in the state directory's local.d/ and the scan says it used them."""
    rows = (corpora_dir / "SPLIT-TIME.tsv").read_text().splitlines()
    picked = [rows[0]] + [line for line in rows[1:]
                          if line.startswith("spamassassin/")][:400:20]
    split = tmp_path / "SPLIT-SMOKE.tsv"
    split.write_text("\n".join(picked) + "\n")
    state, report = tmp_path / "state", tmp_path / "report.json"
    assert tool.main(["--split", str(split), "--corpora", str(corpora_dir), "--refit",
                      "--state-dir", str(state), "--json", str(report)]) == 0
    assert "scores refitted on half A" in capsys.readouterr().out
    fitted = state / "local.d" / "scores-fitted.toml"
    assert "[scores]" in fitted.read_text()
    assert "[bayes_scores]" in (state / "local.d" / "scores-fitted-bayes.toml").read_text()
    data = json.loads(report.read_text())
    assert data["config"] == "shipped rules, scores refitted on half A"
    assert data["figures"]["messages"] == sum(line.endswith("\tB") for line in picked[1:])
