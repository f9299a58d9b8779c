"""The core mail path through a real Postfix and the real `filterd serve` (issue 2).

milter:      a clean message arrives once with X-Virus-Scanned, a forged X-Spam-Flag is gone;
             X-Spam-* headers appear at or above tag_level; GTUBE is refused with 550 5.7.1.
after queue: the same for clean mail; GTUBE is quarantined: not bounced, not delivered.
filterd killed mid-test: Postfix defers (after queue) or the client gets 451 (milter); nothing
             is delivered unscanned or lost, and the message arrives once after the restart.
"""

from __future__ import annotations

import re
import time

import pytest

from harness.messages import GTUBE, message

@pytest.fixture(scope="module")
def filterd_overrides(tmp_path_factory):
    """The core checks (sanity, GTUBE) plus antivirus (the harness wires the session's clamd):
    this module is about the mail path; other families have their own integration tests."""
    import shutil
    from filterd.config import PROJECT_RULES
    rules = tmp_path_factory.mktemp("core-rules")
    rules.chmod(0o755)
    for name in ("actions.toml", "core.toml", "scores.toml", "antivirus.toml"):
        shutil.copy(PROJECT_RULES / name, rules / name)
    return {"rules.dir": str(rules)}


FORGED = message(subject="forged verdict", headers={"X-Spam-Flag": "NO",
                                                     "X-Spam-Status": "No, score=-100"})


def headers_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0] if b"\r\n\r\n" in raw else raw.split(b"\n\n", 1)[0]


def quarantined(rig) -> list:
    return sorted((rig.filterd.state_dir / "quarantine").rglob("*.eml"))


@pytest.mark.parametrize("mode", ["milter", "after-queue"])
def test_clean_message_delivered_once_with_virus_scanned_and_no_forged_flag(
        mode, mta_milter, mta_after_queue):
    rig = mta_milter if mode == "milter" else mta_after_queue
    reply = rig.send(FORGED)
    assert reply.ok, f"{reply}\n{rig.logs()}"
    (delivered,) = rig.wait_delivered("user", 1)
    head = headers_of(delivered)
    assert re.search(rb"(?m)^X-Virus-Scanned: filterd at ", head), rig.logs()
    assert b"X-Spam-Flag: NO" not in head and b"score=-100" not in head
    assert b"Subject: forged verdict" in head
    time.sleep(1.0)  # nothing else arrives later (a loop or a second copy would)
    assert len(rig.mailbox("user")) == 1


def test_gtube_refused_with_571_in_milter_mode(mta_milter):
    reply = mta_milter.send(message(subject="gtube", body=GTUBE))
    assert reply.code == 550 and reply.text.startswith("5.7.1"), reply
    assert mta_milter.mailbox("user") == []
    assert mta_milter.queue_ids() == []


def test_gtube_quarantined_not_bounced_not_delivered_after_queue(mta_after_queue):
    rig = mta_after_queue
    before = len(quarantined(rig))
    reply = rig.send(message(subject="gtube", body=GTUBE))
    assert reply.ok, reply  # Postfix took it; filterd decides after queue
    rig.wait_queue_empty(30)
    assert rig.mailbox("user") == []
    items = quarantined(rig)
    assert len(items) == before + 1, rig.logs()
    assert GTUBE.encode() in items[-1].read_bytes()
    log = rig.maillog()
    assert "status=bounced" not in log and "status=sent (250 2.0.0 Ok: quarantined" in log


def test_spam_headers_at_tag_level(rig_factory, tmp_path, filterd_overrides):
    site = tmp_path / "site"
    (site / "local.d").mkdir(parents=True)
    # Any score reaches tag_level, so every message gets the X-Spam-* headers.
    (site / "local.d" / "levels.toml").write_text("[levels]\ntag_level = -100.0\n")
    rig = rig_factory("milter", filterd_overrides={"rules.site_dir": str(site),
                                                   **filterd_overrides})
    assert rig.send(FORGED).ok
    (delivered,) = rig.wait_delivered("user", 1)
    head = headers_of(delivered)
    assert re.search(rb"(?m)^X-Spam-Flag: NO\r?$", head)
    assert re.search(rb"(?m)^X-Spam-Status: No, score=\S+ required=6", head)
    assert head.count(b"X-Spam-Flag:") == 1


def test_filterd_killed_after_queue_defers_then_delivers_once(mta_after_queue):
    rig = mta_after_queue
    rig.filterd.kill()
    reply = rig.send(message(subject="while filterd is down"))
    assert reply.ok  # Postfix queues it
    rig.postfix.wait_log(r"status=deferred", timeout=30)
    assert rig.mailbox("user") == []
    assert len(rig.queue_ids()) == 1
    rig.filterd.start()
    rig.flush()
    (delivered,) = rig.wait_delivered("user", 1, timeout=60)
    assert b"X-Virus-Scanned: filterd" in delivered
    rig.wait_queue_empty(30)
    time.sleep(1.0)
    assert len(rig.mailbox("user")) == 1


def test_filterd_killed_milter_tempfails_then_delivers_once(mta_milter):
    rig = mta_milter
    rig.filterd.kill()
    msg = message(subject="retry me")
    reply = rig.send(msg)
    assert reply.temporary, reply  # milter_default_action = tempfail: the client retries
    assert rig.mailbox("user") == [] and rig.queue_ids() == []
    rig.filterd.start()
    assert rig.send(msg).ok  # the client's retry
    (delivered,) = rig.wait_delivered("user", 1)
    assert b"X-Virus-Scanned: filterd" in delivered
