"""Quality gates over the whole project: documented settings, described and scored symbols."""

import subprocess
import sys
from pathlib import Path

from filterd import config
from filterd.pipeline import load_checks
from filterd.ruleset import load

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-config-doc.py"),
                             "--check"], capture_output=True, timeout=60)
    assert result.returncode == 0, (
        "docs/configuration.md is out of date: run .venv/bin/python scripts/gen-config-doc.py")


def test_every_symbol_a_check_declares_is_described_and_scored():
    ruleset = load(config.defaults().rules_dir)
    missing_desc, missing_score = [], []
    for spec in load_checks().values():
        if spec.name.startswith("test."):
            continue
        for symbol in spec.symbols:
            if not ruleset.describe(symbol):
                missing_desc.append(f"{spec.name}: {symbol}")
            if not symbol.startswith("__") and symbol not in ruleset.scores:
                missing_score.append(f"{spec.name}: {symbol}")
    assert not missing_desc, f"symbols without a description: {missing_desc}"
    assert not missing_score, f"symbols without a score: {missing_score}"


def test_every_scored_symbol_is_described():
    ruleset = load(config.defaults().rules_dir)
    undescribed = sorted(n for n in ruleset.scores if not ruleset.describe(n))
    assert not undescribed, f"scores for symbols nobody describes: {undescribed}"
