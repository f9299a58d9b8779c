"""The quarantine through a real Postfix and the real `filterd serve`, in both modes.

GTUBE (score 1000) is quarantined by default after queue (reject -> smtp.reject_action =
quarantine); in milter mode a site rule file (local.d) raises reject_level so GTUBE lands in the
quarantine band. Release goes through the Postfix release listener of
packaging/postfix/master.cf.release. Also: a SIGKILL under load loses nothing, a read-only spool
tempfails, a dead release target keeps the item held, concurrent releases deliver once.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from harness.common import private_dir, remove_dir, wait_for
from harness.messages import GTUBE, message

QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")


@pytest.fixture(scope="module")
def filterd_overrides():
    """Only the core rule files (GTUBE, sanity): these tests are about the quarantine, and
    must not wait for other families' rule sets to compile at each start."""
    import shutil
    from filterd.config import PROJECT_RULES
    d = private_dir("quarantine-rules")
    for name in ("actions.toml", "core.toml", "scores.toml"):
        shutil.copy(PROJECT_RULES / name, d / name)
    yield {"rules.dir": str(d)}
    remove_dir(d)


@pytest.fixture(scope="module")
def site_dir():
    d = private_dir("quarantine-site")
    (d / "local.d").mkdir()
    # GTUBE scores 1000: above kill_level (quarantine), below this reject_level
    (d / "local.d" / "levels.toml").write_text("[levels]\nreject_level = 2000.0\n")
    yield d
    remove_dir(d)


def items(filterd, *args) -> list[dict]:
    res = filterd.cli("quarantine", "list", "--json", "--limit", "0", *args)
    return json.loads(res.stdout)


def spool(filterd) -> Path:
    return filterd.state_dir / "quarantine"


def sidecars(filterd) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(spool(filterd).glob("*/*.json"))]


def body_of(raw: bytes) -> bytes:
    raw = raw.replace(b"\r\n", b"\n")  # Maildir files have LF line ends
    return raw.split(b"\n\n", 1)[1]


def release_and_check(rig, item: dict) -> None:
    stored = (spool(rig.filterd) / item["id"][:8] / f"{item['id']}.eml").read_bytes()
    res = rig.filterd.cli("quarantine", "release", item["id"], check=False)
    assert res.returncode == 0, f"{res.stdout!r} {res.stderr!r}\n{rig.logs()}"
    [delivered] = rig.wait_delivered("user", 1)
    assert body_of(delivered) == body_of(stored), "released body differs from the stored one"
    assert delivered.count(b"X-Filterd-Released: " + item["id"].encode()) == 1
    assert GTUBE.encode() in delivered
    [after] = [i for i in items(rig.filterd) if i["id"] == item["id"]]
    assert after["state"] == "released" and after["releases"][0]["to"] == ["user@test.example"]
    again = rig.filterd.cli("quarantine", "release", item["id"], check=False)
    assert again.returncode == 1 and b"already released" in again.stderr
    time.sleep(0.5)
    rig.wait_delivered("user", 1)  # still exactly one


def test_after_queue_gtube_is_quarantined_by_default_and_released_once(mta_after_queue):
    rig = mta_after_queue
    reply = rig.send(message(subject="aq quarantine", body=f"{GTUBE}\n"))
    assert reply.code == 250, f"{reply}\n{rig.logs()}"
    mine = lambda: [i for i in items(rig.filterd) if i["subject"] == "aq quarantine"]  # noqa: E731
    assert wait_for(mine, 30), rig.logs()
    rig.wait_queue_empty()
    assert rig.mailbox("user") == []
    [item] = mine()
    assert item["category"] == "spam" and item["state"] == "held"
    assert item["rcpt_tos"] == ["user@test.example"] and item["mail_from"] == "sender@client.test"
    assert item["queue_id"] == QUEUED_AS.search(reply.text).group(1)  # XFORWARD IDENT
    release_and_check(rig, item)


def test_milter_gtube_in_quarantine_band_is_discarded_and_released_once(rig_factory, site_dir):
    rig = rig_factory("milter", {"rules.site_dir": str(site_dir)})
    reply = rig.send(message(subject="milter quarantine", body=f"{GTUBE}\n"))
    assert reply.code == 250, f"{reply}\n{rig.logs()}"  # stored, then DISCARD: client sees 250
    rig.wait_queue_empty()
    time.sleep(0.5)
    assert rig.mailbox("user") == []
    [item] = items(rig.filterd)
    assert item["category"] == "spam" and item["listener"] == "milter"
    assert item["action"] == "quarantine"
    stored = (spool(rig.filterd) / item["id"][:8] / f"{item['id']}.eml").read_bytes()
    assert b"Subject: milter quarantine" in stored, f"headers missing from the stored message: {stored[:200]!r}"
    release_and_check(rig, item)


def test_release_target_down_keeps_the_item_held(rig_factory):
    rig = rig_factory("after-queue")
    rig.send(message(subject="target down", body=f"{GTUBE}\n"))
    assert wait_for(lambda: items(rig.filterd), 30), rig.logs()
    [item] = items(rig.filterd)
    rig.postfix.stop()
    res = rig.filterd.cli("quarantine", "release", item["id"], check=False)
    assert res.returncode == 1
    assert item["id"].encode() in res.stderr and b"cannot reach" in res.stderr
    assert items(rig.filterd)[0]["state"] == "held"
    # (a listener that answers 4xx/5xx is covered on loopback in tests/unit/test_quarantine.py:
    # the release listener of master.cf.release accepts any recipient from loopback)
    rig.postfix.start()
    assert rig.filterd.cli("quarantine", "release", item["id"]).returncode == 0
    rig.wait_delivered("user", 1)


def test_concurrent_releases_deliver_once(mta_after_queue):
    rig = mta_after_queue
    rig.send(message(subject="concurrent", body=f"{GTUBE}\n"))
    mine = lambda: [i for i in items(rig.filterd) if i["subject"] == "concurrent"]  # noqa: E731
    assert wait_for(mine, 30), rig.logs()
    [item] = mine()
    procs = [subprocess.Popen(rig.filterd.command("quarantine", "release", item["id"]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(5)]
    codes = sorted(p.wait(60) for p in procs)
    assert codes == [0, 1, 1, 1, 1]
    rig.wait_delivered("user", 1)


@pytest.mark.parametrize("mode", ["milter", "after-queue"])
def test_read_only_spool_tempfails_and_loses_nothing(rig_factory, mode, site_dir):
    rig = rig_factory(mode, {"rules.site_dir": str(site_dir)})
    q = spool(rig.filterd)
    q.mkdir(mode=0o750, exist_ok=True)
    mounted = subprocess.run(["mount", "--bind", str(q), str(q)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot bind-mount: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(q)], check=True)
        reply = rig.send(message(subject=f"read-only {mode}", body=f"{GTUBE}\n"))
        if mode == "milter":
            assert reply.code == 451 and "quarantine unavailable" in reply.text, \
                f"{reply}\n{rig.logs()}"
        else:
            assert reply.code == 250  # Postfix queued it; filterd must answer it 4xx
            assert wait_for(lambda: "quarantine failed" in rig.filterd.log(), 30), rig.logs()
            time.sleep(0.5)
            assert len(rig.queue_ids()) == 1, "the message must stay queued in Postfix"
        assert rig.mailbox("user") == []
    finally:
        subprocess.run(["umount", str(q)], check=True)
    if mode == "after-queue":
        rig.flush()
        rig.wait_queue_empty(60)
        assert len(items(rig.filterd)) == 1
    assert rig.mailbox("user") == []


def _index_rows(path: Path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return (list(db.execute("SELECT * FROM items ORDER BY id")) +
                list(db.execute("SELECT * FROM recipients ORDER BY id, address")))
    finally:
        db.close()


def test_sigkill_while_quarantining_loses_nothing_after_queue(rig_factory):
    rig = rig_factory("after-queue")
    total = 60
    queue_ids: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()

    def sender(n0: int) -> None:
        for n in range(n0, total, 4):
            reply = rig.send(message(subject=f"crash {n}", body=f"{GTUBE}\nmessage {n}\n"))
            with lock:
                if reply.code == 250:
                    queue_ids.append(QUEUED_AS.search(reply.text).group(1))
                else:
                    failures.append(str(reply))

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    # kill filterd while it is storing: some items are in, more are arriving
    assert wait_for(lambda: len(list(spool(rig.filterd).glob("*/*.json"))) >= 8, 60), rig.logs()
    rig.filterd.kill()
    for t in threads:
        t.join(120)
    assert not failures and len(queue_ids) == total  # Postfix queued everything (after queue)
    time.sleep(1)

    # right after the crash: every message is stored exactly once or still queued in Postfix
    stored = Counter(m["queue_id"] for m in sidecars(rig.filterd))
    queued = rig.settled_queue_ids()
    assert all(n == 1 for n in stored.values()), stored
    lost = set(queue_ids) - set(stored) - queued
    assert not lost, f"lost after SIGKILL: {lost}\n{rig.logs()}"
    assert not list(spool(rig.filterd).glob("*/*.eml.json"))
    for eml in spool(rig.filterd).glob("*/*.eml"):  # no half item that looks whole
        side = eml.with_suffix(".json")
        if side.exists():
            meta = json.loads(side.read_text())
            assert eml.stat().st_size == meta["size"]

    # restart: Postfix retries what was queued; the retry of an item stored just before the
    # kill must not create a second one
    rig.filterd.start()
    rig.flush()
    rig.wait_queue_empty(120)
    final = Counter(m["queue_id"] for m in sidecars(rig.filterd))
    assert set(final) == set(queue_ids) and all(n == 1 for n in final.values()), final
    assert rig.mailbox("user") == []
    index = spool(rig.filterd) / "index.sqlite"
    original = _index_rows(index)
    assert len([r for r in original if len(r) > 2]) == total
    res = rig.filterd.cli("quarantine", "reindex")
    assert f"indexed {total} item(s)".encode() in res.stdout
    assert _index_rows(index) == original


def test_sigkill_while_quarantining_milter_answers_4xx_or_stores_once(rig_factory, site_dir):
    rig = rig_factory("milter", {"rules.site_dir": str(site_dir)})
    total = 40
    replies: list[tuple[int, str]] = []
    lock = threading.Lock()

    def sender(n0: int) -> None:
        for n in range(n0, total, 4):
            reply = rig.send(message(subject=f"mcrash {n}", body=f"{GTUBE}\nmessage {n}\n"))
            with lock:
                replies.append((reply.code, reply.text))

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    assert wait_for(lambda: len(list(spool(rig.filterd).glob("*/*.json"))) >= 6, 60), rig.logs()
    rig.filterd.kill()
    for t in threads:
        t.join(120)
    assert len(replies) == total
    stored = Counter(m["queue_id"] for m in sidecars(rig.filterd))
    assert all(n == 1 for n in stored.values()), stored
    accepted = [QUEUED_AS.search(text).group(1) for code, text in replies if code == 250]
    tempfailed = [code for code, _ in replies if 400 <= code < 500]
    # 250 only for a message that is in quarantine exactly once; everything else got 4xx, so
    # the client still has it and retries
    assert all(stored[qid] == 1 for qid in accepted), (accepted, stored)
    assert len(accepted) + len(tempfailed) == total, replies
    assert tempfailed, "the kill should have hit some messages in flight"
    rig.filterd.start()
    assert rig.mailbox("user") == []
