"""The score set for messages the Bayes learner voted on: [bayes_scores] / [score_sets].

Loading and layering (filterd.ruleset), the choice per scan (Scanner through a real rule set),
and the fit that writes the set (`filterd rules fit --with-bayes`, filterd.ruleset.fit) with the
real Bayes learner on a small generated corpus.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import textwrap
from pathlib import Path

import pytest

from filterd import config
from filterd.config import PROJECT_RULES
from filterd.message import Envelope
from filterd.policy import Symbol
from filterd.ruleset import RulesetError, load
from filterd.ruleset.lint import lint

SHIPPED = """\
    [rule.TRIGGER]
    kind = "body"
    pattern = 'trigger word'
    description = "stands in for a Bayes band"

    [rule.PHRASE]
    kind = "body"
    pattern = 'cheap pills'
    description = "a phrase Bayes knows as well"

    [scores]
    TRIGGER = 0.0
    PHRASE = 3.0
    MISSING_DATE = 1.0
    """

BAYES_SET = """\
    [score_sets]
    bayes_scores = ["TRIGGER"]

    [bayes_scores]
    PHRASE = 1.0
    TRIGGER = 0.5
    """


def rules_dir(tmp_path: Path, *, bayes_set: str = BAYES_SET,
              site: dict[str, str] | None = None) -> tuple[Path, Path]:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name in ("core.toml", "actions.toml", "rules-engine.toml"):
        shutil.copy(PROJECT_RULES / name, shipped / name)
    (shipped / "test.toml").write_text(textwrap.dedent(SHIPPED))
    if bayes_set:
        (shipped / "scores-fitted-bayes.toml").write_text(textwrap.dedent(bayes_set))
    site_dir = tmp_path / "site"
    for name, text in (site or {}).items():
        path = site_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return shipped, site_dir


def test_set_is_chosen_only_when_a_selecting_symbol_fired(tmp_path: Path) -> None:
    ruleset = load(*rules_dir(tmp_path))
    assert ruleset.scores["PHRASE"] == 3.0
    assert ruleset.scores_for([Symbol("PHRASE")]) is ruleset.scores
    chosen = ruleset.scores_for([Symbol("PHRASE"), Symbol("TRIGGER")])
    assert chosen["PHRASE"] == 1.0 and chosen["TRIGGER"] == 0.5
    # names the set does not mention keep their [scores] value
    assert chosen["MISSING_DATE"] == ruleset.scores["MISSING_DATE"] == 1.0
    assert ruleset.bayes_score_origin["PHRASE"] == "bayes_scores.PHRASE"


def test_without_a_bayes_set_scores_are_the_only_set(tmp_path: Path) -> None:
    ruleset = load(*rules_dir(tmp_path, bayes_set=""))
    assert ruleset.bayes_scores == {} and not ruleset.bayes_set_when
    assert ruleset.scores_for([Symbol("TRIGGER")]) is ruleset.scores


def test_site_score_wins_over_the_shipped_bayes_set_and_its_own_bayes_score_over_that(
        tmp_path: Path) -> None:
    site = {"local.d/mine.toml": """\
        [scores]
        PHRASE = 4.0

        [bayes_scores]
        TRIGGER = 2.0
        """}
    ruleset = load(*rules_dir(tmp_path, site=site))
    chosen = ruleset.scores_for([Symbol("TRIGGER")])
    # a site that says PHRASE = 4 means it whatever Bayes said
    assert chosen["PHRASE"] == 4.0 and ruleset.bayes_score_origin["PHRASE"] == "scores.PHRASE"
    assert chosen["TRIGGER"] == 2.0
    assert ruleset.location_of("bayes_scores.TRIGGER").endswith("local.d/mine.toml:5")


@pytest.mark.parametrize("bayes_set, key, problem", [
    ("[bayes_scores]\nPHRASE = 1.0\n", "bayes_scores.PHRASE", "without [score_sets]"),
    ("[score_sets]\nother = [\"X\"]\n", "score_sets.other", "unknown score set"),
    ("[score_sets]\nbayes_scores = \"TRIGGER\"\n[bayes_scores]\nPHRASE = 1\n",
     "score_sets.bayes_scores", "list of symbol names"),
    ("[score_sets]\nbayes_scores = [\"TRIGGER\"]\n[bayes_scores]\nPHRASE = \"high\"\n",
     "bayes_scores.PHRASE", "expected a number"),
])
def test_bad_score_sets_are_refused_with_file_and_key(tmp_path: Path, bayes_set: str, key: str,
                                                      problem: str) -> None:
    with pytest.raises(RulesetError) as err:
        load(*rules_dir(tmp_path, bayes_set=bayes_set))
    assert err.value.key == key and problem in err.value.problem
    assert "scores-fitted-bayes.toml" in err.value.source


def test_lint_warns_about_a_set_score_for_a_name_nothing_emits(tmp_path: Path) -> None:
    ruleset = load(*rules_dir(tmp_path, bayes_set=BAYES_SET + "NOBODY = 1.0\n"))
    problems = [p for p in lint(ruleset) if "NOBODY" in p.key]
    assert problems and problems[0].severity == "warning"


def test_scanner_scores_with_the_set_the_scan_selected(tmp_path: Path) -> None:
    from filterd.service import Scanner
    shipped, site = rules_dir(tmp_path)
    settings = config.defaults().with_overrides({
        "daemon.state_dir": str(tmp_path / "state"), "rules.dir": str(shipped),
        "rules.site_dir": str(site), "scan.mynetworks": []})
    scanner = Scanner(settings)

    def score(body: str) -> float:
        raw = f"From: a@example.org\nTo: b@example.net\nSubject: s\n\n{body}\n".encode()
        outcome = asyncio.run(scanner.scan(raw, Envelope("a@example.org", ("b@example.net",))))
        return round(sum(s.score for s in outcome.verdict.symbols
                         if s.name in ("PHRASE", "TRIGGER")), 3)

    assert score("cheap pills here") == 3.0
    assert score("cheap pills and a trigger word") == 1.5


def test_shipped_rules_carry_a_bayes_set_selected_by_every_band() -> None:
    from filterd.bayes.classifier import BANDS
    ruleset = load(PROJECT_RULES)
    assert ruleset.bayes_set_when == {name for _, name in BANDS}
    assert not ruleset.bayes_set_when & {"BAYES_UNTRAINED", "BAYES_STORE_ERROR"}
    assert [p for p in lint(ruleset) if p.severity == "error"] == []


# ---- the fit ---------------------------------------------------------------------------------

HAM_WORDS = "meeting agenda minutes budget quarterly review schedule project notes".split()
SPAM_WORDS = "viagra casino winner lottery prize bitcoin replica pharmacy discount".split()


def _corpus(root: Path, n: int = 120, seed: int = 3) -> None:
    """ham and spam with separate vocabularies; a few spam say 'cheap pills' (PHRASE), and so
    do a few ham, so the rule alone is weak evidence that Bayes can outvote."""
    rnd = random.Random(seed)
    rows = ["path\tlabel\thalf"]
    for i in range(n):
        label = "spam" if i % 2 else "ham"
        words = SPAM_WORDS if label == "spam" else HAM_WORDS
        body = " ".join(rnd.choice(words) for _ in range(40))
        if (label == "spam" and rnd.random() < 0.5) or (label == "ham" and rnd.random() < 0.1):
            body += "\ncheap pills"
        rel = f"gen/{label}/{i:04d}"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"From: s{i}@example.org\nTo: r@example.net\nSubject: m{i}\n"
                         f"Message-ID: <{i}@example.org>\n\n{body}\n".encode())
        rows.append(f"{rel}\t{label}\t{'A' if i % 4 else 'B'}")
    (root / "SPLIT.tsv").write_text("\n".join(rows) + "\n")


def test_bayes_bands_are_out_of_fold_and_separate_the_classes(tmp_path: Path) -> None:
    from filterd.ruleset import fit
    corpus = tmp_path / "corpora"
    _corpus(corpus)
    samples = fit.read_split(corpus / "SPLIT.tsv", corpus, [corpus / "gen"])
    train = [s for s in samples if s.half == "A"]
    test = [s for s in samples if s.half == "B"]
    settings = fit.make_settings().with_overrides({"bayes.min_spam": 5, "bayes.min_ham": 5})
    train_bands, test_bands = fit.bayes_bands(train, test, corpus, settings, folds=5,
                                              progress=False)
    assert len(train_bands) == len(train) and len(test_bands) == len(test)
    for samples_, bands in ((train, train_bands), (test, test_bands)):
        spam = [b for s, b in zip(samples_, bands) if s.label]
        ham = [b for s, b in zip(samples_, bands) if not s.label]
        assert sum(b in fit.BAYES_SPAM_BANDS for b in spam) >= 0.9 * len(spam), spam
        assert sum(b in fit.BAYES_HAM_BANDS for b in ham) >= 0.9 * len(ham), ham
    # too little learned to vote: the daemon's BAYES_UNTRAINED, not a guess
    strict = fit.make_settings().with_overrides({"bayes.min_spam": 10_000})
    bands, _ = fit.bayes_bands(train[:10], [], corpus, strict, folds=2, progress=False)
    assert set(bands) == {"BAYES_UNTRAINED"}


def test_fit_with_bayes_writes_a_set_the_rule_loader_accepts(tmp_path: Path) -> None:
    from filterd.ruleset import fit
    corpus = tmp_path / "corpora"
    _corpus(corpus, n=200)
    shipped, _site = rules_dir(tmp_path, bayes_set="")
    bayes_file = PROJECT_RULES / "bayes.toml"
    shutil.copy(bayes_file, shipped / "bayes.toml")
    shutil.copy(PROJECT_RULES / "scores.toml", shipped / "scores.toml")
    (shipped / "test.toml").write_text(textwrap.dedent(SHIPPED).replace(
        "TRIGGER = 0.0\nPHRASE = 3.0\n", ""))
    out, report = shipped / "scores-fitted-bayes.toml", tmp_path / "FIT-REPORT-BAYES.md"
    settings = fit.make_settings().with_overrides({"bayes.min_spam": 5, "bayes.min_ham": 5})
    assert fit.main(shipped=shipped, site=None, corpora=[corpus / "gen"], split=None, half="A",
                    test_half="B", output=out, report=report, cap=5.0, l2=1e-4,
                    ham_weights=(2.0,), fp_target=0.01, folds=5, limit=0, settings=settings,
                    with_bayes=True) == 0
    ruleset = load(shipped)
    # the bands got fitted scores on the right side of zero, the rules a Bayes-set score too
    assert ruleset.bayes_scores["BAYES_999"] > 0 or ruleset.bayes_scores["BAYES_99"] > 0
    assert ruleset.bayes_scores["BAYES_00"] <= 0
    assert "PHRASE" in ruleset.bayes_score_origin
    assert ruleset.bayes_score_origin["PHRASE"] == "bayes_scores.PHRASE"
    text = report.read_text()
    assert "score set with Bayes" in text and "| BAYES_" in text
