"""A message costly to analyse holds no other mail (issue 13), through a real Postfix with ONE
`filterd serve` that is both its milter and its after-queue filter.

The hostile message (1 MiB) is costly twice over: an HTML part of unclosed `<!--` (quadratic
in filterd.message.html_to_text as of issue 13) and a text part on which this module's site
rule backtracks catastrophically (a pattern of an imported rule set that the `regex` engine
takes exponential time over). While it is in a content worker, a normal ham sent through
each front end (Postfix with the milter; filterd's after-queue listener) is answered within
1 s, and the hostile message itself gets a verdict (CONTENT_BUDGET: quarantined), not a 451.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from harness.messages import message
from harness.postfix import smtp_send

SLOW_RULES = '''[meta]
family = "test"

[rule.TEST_BACKTRACKS]
kind = "body"
pattern = '(a|a)+$'
description = "Backtracks exponentially on a run of a's that does not end the text"

[scores]
TEST_BACKTRACKS = 0.1
'''


@pytest.fixture(scope="module")
def filterd_overrides(tmp_path_factory):
    import shutil
    from filterd.config import PROJECT_RULES
    rules = tmp_path_factory.mktemp("isolation-rules")
    rules.chmod(0o755)
    for name in ("actions.toml", "core.toml", "scores.toml", "antivirus.toml",
                 "rules-engine.toml"):
        shutil.copy(PROJECT_RULES / name, rules / name)
    (rules / "slow.toml").write_text(SLOW_RULES)
    # one pattern at a time with `regex` (no Hyperscan pass), and no per-rule timeout before
    # the content budget: the rule is as slow as the message makes it
    return {"rules.dir": str(rules), "rules.engine": "re", "rules.rule_timeout": 600.0,
            "scan.content_workers": 2, "bayes.enabled": False}


def hostile_message() -> bytes:
    line = "<!--" * 19 + "\r\n"
    html = line * (1024 * 1024 // len(line))
    head = ("From: Sender <sender@client.test>\r\nTo: user@test.example\r\n"
            "Subject: quarterly figures\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
            "Message-ID: <hostile@client.test>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n')
    text = "--b1\r\nContent-Type: text/plain\r\n\r\nPlease see below.\r\n" + "a" * 34 + "!\r\n"
    return (head + text + "--b1\r\nContent-Type: text/html\r\n\r\n" + html
            + "--b1--\r\n").encode()


def _descendants(root: int) -> dict[int, int]:
    """pid -> parent pid of every process under root."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    out, frontier = {}, {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        out.update({pid: parents[pid] for pid in frontier})
    return out


def worker_cpu(root: int) -> float:
    """CPU seconds of filterd's content workers (the leaves of its process tree)."""
    tree = _descendants(root)
    leaves = [pid for pid in tree if pid not in tree.values()]
    total = 0.0
    for pid in leaves:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_while_hostile(rig, send_hostile):
    """Send the hostile message in a thread; once a worker is busy with it, send a ham
    through each front end and time their answers."""
    root = rig.filterd.proc.pid
    before = worker_cpu(root)
    hostile_reply: list = []
    sender = threading.Thread(target=lambda: hostile_reply.append(send_hostile()))
    started = time.monotonic()
    sender.start()
    while worker_cpu(root) - before < 0.15:
        assert time.monotonic() - started < 60, "the hostile message never reached a worker"
        assert sender.is_alive(), f"hostile message answered early: {hostile_reply}"
        time.sleep(0.02)
    t = time.monotonic()
    milter_reply = rig.send(message(subject="ham via the milter"))
    milter_seconds = time.monotonic() - t
    t = time.monotonic()
    aq_reply = smtp_send(rig.filterd.smtp_port, message(subject="ham after queue"),
                         "sender@client.test", ["user@test.example"])
    aq_seconds = time.monotonic() - t
    hostile_still_running = sender.is_alive()
    sender.join(120)
    return milter_reply, milter_seconds, aq_reply, aq_seconds, hostile_still_running, \
        hostile_reply[0]


def hostile_verdict_logged(rig) -> str:
    lines = [line for line in rig.filterd.log().splitlines()
             if "hostile@client.test" in line and "verdict=" in line]
    assert lines, rig.logs()
    return lines[-1]


@pytest.mark.parametrize("front_end", ["milter", "after-queue"])
def test_a_ham_through_each_front_end_is_answered_within_1s_while_a_hostile_message_is_scanned(
        mta_both, front_end):
    rig = mta_both
    hostile = hostile_message()
    assert len(hostile) > 1024 * 1024
    if front_end == "milter":
        def send_hostile():  # Postfix's smtpd hands it to the milter
            return rig.send(hostile)
    else:
        def send_hostile():  # as Postfix's content_filter delivery would
            return smtp_send(rig.filterd.smtp_port, hostile, "sender@client.test",
                             ["user@test.example"])
    milter_reply, milter_s, aq_reply, aq_s, overlapped, hostile_reply = run_while_hostile(
        rig, send_hostile)
    print(f"\n[{front_end}] ham via the milter answered in {milter_s:.3f} s, "
          f"ham after queue in {aq_s:.3f} s; hostile: {hostile_reply}")
    assert overlapped, "the hostile message was done before the hams were answered"
    assert milter_reply.ok, f"{milter_reply}\n{rig.logs()}"
    assert aq_reply.ok, f"{aq_reply}\n{rig.logs()}"
    assert milter_s < 1.0, milter_s
    assert aq_s < 1.0, aq_s
    # a verdict, not a tempfail that Postfix would retry for ever
    assert not hostile_reply.temporary, f"{hostile_reply}\n{rig.logs()}"
    line = hostile_verdict_logged(rig)
    assert "CONTENT_BUDGET" in line and "verdict=quarantine" in line, line
    assert "failure=-" in line, line
    # the two hams arrive (the milter one after its after-queue scan too)
    rig.wait_delivered("user", 2)
