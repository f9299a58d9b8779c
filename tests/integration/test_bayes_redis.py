"""The shared Bayes store on a real redis-server: two filterd learners at once, exact counts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("redis")


def mail(i: int) -> bytes:
    return (f"From: s{i % 13}@example.org\nTo: u@example.net\nSubject: note {i} offer{i % 7}\n"
            f"Message-ID: <{i}@example.org>\nDate: Mon, 16 Apr 2007 04:13:20 -0400\n\n"
            f"shared words in every message plus word{i % 50} and unique{i}\n").encode()


def write_set(directory: Path, numbers: range | list[int]) -> None:
    directory.mkdir(parents=True)
    for i in numbers:
        (directory / f"{i:05d}.eml").write_bytes(mail(i))


def settings_file(path: Path, url: str | None) -> Path:
    backend = f'backend = "redis"\nredis_url = "{url}"\n' if url else ""
    path.write_text(f"[bayes]\n{backend}batch_size = 20\n")
    return path


def learn_cmd(config: Path, state: Path, label: str, directory: Path) -> list[str]:
    return [sys.executable, "-m", "filterd", "--config", str(config), "--state-dir", str(state),
            "learn", f"--{label}", "-q", str(directory)]


def test_two_learners_concurrently_end_with_exact_counts(redis_server, tmp_path):
    # two nodes learn overlapping sets at once: 300 spam each, 100 of them the same messages
    write_set(tmp_path / "a", range(0, 300))
    write_set(tmp_path / "b", range(200, 500))
    write_set(tmp_path / "ham", range(1000, 1150))
    cfg = settings_file(tmp_path / "redis.toml", redis_server.url)
    env = dict(os.environ)
    procs = [subprocess.Popen(learn_cmd(cfg, tmp_path / f"node{n}", "spam", tmp_path / d),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for n, d in ((1, "a"), (2, "b"))]
    procs.append(subprocess.Popen(learn_cmd(cfg, tmp_path / "node3", "ham", tmp_path / "ham"),
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    from filterd.stores.redis import RedisTokenStore
    shared = RedisTokenStore(redis_server.url)
    st = shared.stats()
    assert (st.nspam, st.nham) == (500, 150) and st.consistent
    # the same messages learned by one process into SQLite give exactly the same tokens
    write_set(tmp_path / "all", range(0, 500))
    ref_cfg = settings_file(tmp_path / "sqlite.toml", None)
    for label, d in (("spam", "all"), ("ham", "ham")):
        r = subprocess.run(learn_cmd(ref_cfg, tmp_path / "ref", label, tmp_path / d), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    from filterd.stores.sqlite import SqliteTokenStore
    ref = SqliteTokenStore(tmp_path / "ref" / "bayes.sqlite")
    assert [t[:3] for t in shared.iter_tokens()] == [t[:3] for t in ref.iter_tokens()]
    assert sorted(shared.iter_learned()) == sorted(ref.iter_learned())
    ref.close()
    shared.close()


def test_daemon_scans_with_the_shared_store(redis_server, tmp_path):
    """A Scanner on the Redis backend votes once trained, and survives Redis going away."""
    import asyncio

    from filterd import config
    from filterd.bayes import HAM, SPAM
    from filterd.bayes.api import learn
    from filterd.message import Envelope
    from filterd.service import Scanner
    import shutil
    rules = tmp_path / "rules"   # core rules plus ours: every family's rules load slowly
    rules.mkdir()
    for name in ("actions.toml", "core.toml", "scores.toml", "bayes.toml"):
        shutil.copy(config.PROJECT_RULES / name, rules / name)
    settings = config.defaults().with_overrides({
        "daemon.state_dir": str(tmp_path), "rules.dir": str(rules), "bayes.backend": "redis",
        "bayes.redis_url": redis_server.url, "bayes.min_spam": 3, "bayes.min_ham": 3})
    for i in range(5):
        learn(settings, mail(i).replace(b"shared words", b"cheap pills casino"), SPAM)
        learn(settings, mail(100 + i).replace(b"shared words", b"agenda meeting minutes"), HAM)
    scanner = Scanner(settings)

    def bayes_symbol(raw: bytes) -> str:
        outcome = asyncio.run(scanner.scan(raw, Envelope(), skip_network=True))
        return [s.name for s in outcome.verdict.symbols if s.name.startswith("BAYES_")][0]

    probe = mail(999).replace(b"shared words", b"cheap pills casino")
    assert bayes_symbol(probe) in ("BAYES_95", "BAYES_99", "BAYES_999")
    redis_server.stop()
    try:
        assert bayes_symbol(probe) == "BAYES_STORE_ERROR"
    finally:
        redis_server.start()
