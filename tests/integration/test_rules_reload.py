"""Rule reload on the real daemon (issue 5): a good site rule file is taken on `filterd reload`;
a broken one is refused with file:line, and the daemon keeps scanning real mail (through
Postfix in milter mode) with the rule set it had.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.messages import message

SITE_RULE = """
[rule.SITE_RELOAD_MARK]
kind = "header"
header = "Subject"
pattern = '{word}'
description = "Subject carries the reload test word"

[scores]
SITE_RELOAD_MARK = 2.5
"""

BROKEN = """
[rule.SITE_RELOAD_MARK]
kind = "header"
header = "Subject"
pattern = '(unclosed'
description = "does not compile"
"""


@pytest.fixture
def rule_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from filterd.config import PROJECT_RULES
    shipped = tmp_path_factory.mktemp("shipped-rules")
    for name in ("actions.toml", "core.toml", "scores.toml", "rules-engine.toml"):
        shutil.copy(PROJECT_RULES / name, shipped / name)
    site = tmp_path_factory.mktemp("site")
    (site / "local.d").mkdir()
    (site / "local.d" / "site.toml").write_text(SITE_RULE.format(word="alpha"))
    for d in (shipped, site, site / "local.d"):
        d.chmod(0o755)
    return shipped, site


def filterd_cli(daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "filterd", "--config", str(daemon.config_file),
                           "--state-dir", str(daemon.state_dir), *args],
                          capture_output=True, text=True, timeout=60)


def spam_status(rig, subject: str, n: int) -> str:
    assert rig.send(message(subject=subject)).ok
    delivered = rig.wait_delivered("user", n)[-1]
    head = delivered.split(b"\r\n\r\n", 1)[0] if b"\r\n\r\n" in delivered else \
        delivered.split(b"\n\n", 1)[0]
    return head.decode("latin-1")


def test_broken_rule_file_on_reload_keeps_the_old_set_serving(rig_factory, rule_dirs) -> None:
    shipped, site = rule_dirs
    rig = rig_factory("milter", filterd_overrides={
        "rules.dir": str(shipped), "rules.site_dir": str(site),
        "headers.always_add_spam_headers": True})
    daemon = rig.filterd

    assert "SITE_RELOAD_MARK" in spam_status(rig, "alpha one", 1)

    # a good change is taken
    (site / "local.d" / "site.toml").write_text(SITE_RULE.format(word="beta"))
    done = filterd_cli(daemon, "reload")
    assert done.returncode == 0, done.stderr
    headers = spam_status(rig, "beta two", 2)
    assert "SITE_RELOAD_MARK" in headers

    # a broken change is refused with the file and line, and the old set keeps running
    (site / "local.d" / "site.toml").write_text(BROKEN)
    done = filterd_cli(daemon, "reload")
    assert done.returncode == 1
    assert "local.d/site.toml:5" in done.stderr and "does not compile" in done.stderr
    status = filterd_cli(daemon, "status", "--json")
    assert status.returncode == 0 and "local.d/site.toml:5" in status.stdout
    assert "SITE_RELOAD_MARK" in spam_status(rig, "beta three", 3)     # the old rule, still
    assert "SITE_RELOAD_MARK" not in spam_status(rig, "alpha four", 4)
