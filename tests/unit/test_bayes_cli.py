"""`filterd learn` and `filterd bayes` as an admin runs them: bad input, kill -9, backup."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def mail(i: int, word: str = "offer") -> bytes:
    return (f"From: sender{i}@example.org\nTo: user@example.net\nSubject: {word} number {i}\n"
            f"Message-ID: <{i}.{word}@example.org>\nDate: Mon, 16 Apr 2007 04:13:20 -0400\n\n"
            f"body of message {i} about {word} and token{i % 97}\n").encode()


def filterd(state: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FILTERD_STATE_DIR=str(state), FILTERD_CONFIG=str(state / "f.toml"))
    return subprocess.run([sys.executable, "-m", "filterd", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def state(tmp_path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    (d / "f.toml").write_text("[bayes]\nbatch_size = 50\nmin_spam = 1\nmin_ham = 1\n")
    return d


def stats(state: Path) -> dict:
    result = filterd(state, "bayes", "stats", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_learn_reports_bad_input_and_continues(state, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        (src / f"m{i}.eml").write_bytes(mail(i))
    (src / "empty").write_bytes(b"")
    (src / "notes.txt").write_text("shopping list: eggs, milk\n")
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(500))
    (src / "sub" / "broken.eml").write_bytes(
        b"Subject: broken\nContent-Type: multipart/mixed; boundary=\"b\"\n\n--b\n"
        b"Content-Type: text/plain\n\nunterminated part spam words\n")
    mbox = src / "box.mbox"
    mbox.write_bytes(b"".join(b"From x@y Mon Apr 16 04:13:20 2007\n" + mail(100 + i) + b"\n"
                              for i in range(3)))
    unreadable = src / "secret.eml"
    if os.geteuid() == 0:
        # root reads any file whatever its mode: a file whose read fails with EIO instead
        unreadable.symlink_to("/proc/self/mem")
    else:
        unreadable.write_bytes(mail(50))
        unreadable.chmod(0)
    result = filterd(state, "learn", "--spam", str(src), str(tmp_path / "missing"))
    assert result.returncode == 1, result.stderr
    err = result.stderr
    for name, why in (("empty", "empty file"), ("notes.txt", "not a mail message"),
                      ("image.png", "not a mail message"), ("secret.eml", "unreadable"),
                      ("missing", "no such file")):
        assert any(name in line and why in line for line in err.splitlines()), (name, err)
    # 5 files + broken multipart (learned, counted as defective) + 3 from the mbox
    assert "learned 9 as spam" in result.stdout and "skipped 5" in result.stdout
    assert "with MIME defects 1" in result.stdout
    assert stats(state)["spam"] == 9


def test_learn_twice_moves_and_forgets(state, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        (src / f"m{i}").write_bytes(mail(i))
    assert filterd(state, "learn", "--spam", str(src)).returncode == 0
    again = filterd(state, "learn", "--spam", str(src))
    assert "learned 0 as spam" in again.stdout and "already learned 4" in again.stdout
    moved = filterd(state, "learn", "--ham", str(src / "m0"), str(src / "m1"))
    assert "moved 2 (were spam)" in moved.stdout
    s = stats(state)
    assert (s["spam"], s["ham"], s["consistent"]) == (2, 2, True)
    gone = filterd(state, "learn", "--forget", str(src))
    assert "forgotten 4" in gone.stdout
    s = stats(state)
    assert (s["spam"], s["ham"], s["tokens"]) == (0, 0, 0)


def test_kill_9_during_learn_leaves_a_consistent_database(state, tmp_path):
    src = tmp_path / "many"
    src.mkdir()
    for i in range(3000):
        (src / f"{i:05d}").write_bytes(mail(i, "bulk"))
    env = dict(os.environ, FILTERD_STATE_DIR=str(state), FILTERD_CONFIG=str(state / "f.toml"))
    proc = subprocess.Popen([sys.executable, "-m", "filterd", "learn", "--spam", str(src)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = state / "bayes.sqlite"
    deadline = time.monotonic() + 60
    try:
        # kill it once some batches are committed, while more are being written
        while time.monotonic() < deadline:
            if db.exists():
                s = stats(state)
                if s["spam"] >= 100:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    s = stats(state)
    assert s["consistent"] is True and s["integrity"] == "ok"
    assert s["spam"] % 50 == 0 and 100 <= s["spam"] < 3000      # whole batches only
    assert s["spam"] == s["learned_digests_spam"]
    # relearning finishes the job; the messages already learned are no-ops
    result = filterd(state, "learn", "--spam", str(src))
    assert result.returncode == 0
    assert f"already learned {s['spam']}" in result.stdout
    assert stats(state)["spam"] == 3000


def test_backup_restore_round_trip_and_bad_backup(state, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        (src / f"m{i}").write_bytes(mail(i))
    filterd(state, "learn", "--spam", str(src / "m0"), str(src / "m1"), str(src / "m2"))
    filterd(state, "learn", "--ham", str(src / "m3"), str(src / "m4"), str(src / "m5"))
    dump_before = filterd(state, "bayes", "dump").stdout
    backup = tmp_path / "bayes.jsonl.gz"
    assert filterd(state, "bayes", "backup", str(backup)).returncode == 0
    header = json.loads(gzip.open(backup, "rt").readline())
    assert (header["spam"], header["ham"]) == (3, 3)
    filterd(state, "learn", "--forget", str(src))
    assert stats(state)["tokens"] == 0
    assert filterd(state, "bayes", "restore", str(backup)).returncode == 0
    assert filterd(state, "bayes", "dump").stdout == dump_before
    s = stats(state)
    assert (s["spam"], s["ham"], s["consistent"]) == (3, 3, True)
    # relearning a restored message is still a no-op: the digests came back too
    assert "already learned 1" in filterd(state, "learn", "--spam", str(src / "m0")).stdout
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b'{"format": "something-else"}\n'))
    result = filterd(state, "bayes", "restore", str(bad))
    assert result.returncode == 1 and "unchanged" in result.stderr
    assert filterd(state, "bayes", "dump").stdout == dump_before


def test_stats_without_a_database_is_a_clear_error(state):
    result = filterd(state, "bayes", "stats")
    assert result.returncode == 1 and "no Bayes database" in result.stderr


def test_dump_and_expire(state, tmp_path):
    (tmp_path / "m").write_bytes(mail(1, "lottery"))
    filterd(state, "learn", "--spam", str(tmp_path / "m"))
    dump = filterd(state, "bayes", "dump", "--sort", "spammy", "--limit", "3").stdout.splitlines()
    assert dump[0] == "token\tspam\tham\tlast_learned" and len(dump) == 4
    result = filterd(state, "bayes", "expire", "--max-tokens", "5")
    assert result.returncode == 0 and "5 remain" in result.stdout
    assert stats(state)["tokens"] == 5


def test_dovecot_pipe_script_learns_and_moves(state):
    script = ROOT / "packaging" / "dovecot" / "filterd-learn"
    env = dict(os.environ, FILTERD_STATE_DIR=str(state), FILTERD_CONFIG=str(state / "f.toml"),
               FILTERD_BIN=str(Path(sys.executable).parent / "filterd"))
    for label in ("spam", "ham"):   # moved into Junk, then back out of it
        r = subprocess.run([str(script), label], input=mail(7), env=env, capture_output=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
    s = stats(state)
    assert (s["spam"], s["ham"], s["consistent"]) == (0, 1, True)
    bad = subprocess.run([str(script), "junk"], input=b"", env=env, capture_output=True)
    assert bad.returncode == 64
