"""Root's CLI against a state directory the daemon's account controls (issue 14, item 1).

Each test plants what a compromised daemon account could plant in its own state directory (a
link from a lock, the index, an item's message, a day directory, the Bayes database, the rule
cache, the control socket to somewhere else), then runs the real CLI (.venv/bin/filterd) as
root against that directory, owned by `nobody`. Targets hold a marker that must appear in no
output and no SMTP transaction (the release listener is a real SMTP server on loopback); they
must not be created, chowned, touched or removed; the command must say why it refused.
Targets sit in a directory `nobody` may write, or are files `nobody` may read, wherever that
makes the descriptor discipline (and not only the switch to `nobody`) the thing under test.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from filterd.message import Envelope
from filterd.policy import Action, Symbol, Verdict
from filterd.quarantine import SpoolStore
from filterd.statefs import Dir, UnsafeFile, sqlite_file
from harness.loopback import Sink, SinkController, free_port

NOBODY = 65534
MARKER = b"MARKER-outside-the-state-directory-5f3a"
FILTERD = Path(sys.prefix) / "bin" / "filterd"
SPAM = Verdict(Action.QUARANTINE, 1000.0, (Symbol("GTUBE", (), 1000.0),),
               "spam score 1000 >= kill_level 10", 6.0, True, True)
RAW = b"From: a@example.org\r\nTo: u@test.example\r\nSubject: held\r\n\r\nquarantined body\r\n"
NOT_AN_ITEM = "20200101T000000-0123456789"

if os.geteuid() != 0:
    if os.environ.get("CI") == "true":
        pytest.fail("these tests run the CLI as root against a spool owned by nobody; run "
                    "pytest as root", pytrace=False)
    pytest.skip("needs root (the CLI's switch to the spool's owner is under test)",
                allow_module_level=True)


def chown_tree(top: Path, uid: int = NOBODY, gid: int = NOBODY) -> None:
    os.chown(top, uid, gid, follow_symlinks=False)
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


class World:
    """A state directory owned by nobody with one held item, a config file naming a loopback
    release listener, and `outside`, a directory next to it for the planted links' targets."""

    def __init__(self, base: Path, sink_port: int):
        self.base = base
        self.state = base / "state"
        self.spool = self.state / "quarantine"
        self.outside = base / "outside"
        self.outside.mkdir()
        self.outside.chmod(0o1777)  # nobody may create here: only the refusal stops it
        self.config = base / "filterd.toml"
        self.config.write_text(f'[quarantine]\nrelease_via = "127.0.0.1:{sink_port}"\n'
                               f'[daemon]\nhostname = "mx.test"\n')
        self.config.chmod(0o644)
        store = SpoolStore(self.spool)
        self.item = store.put(RAW, Envelope("a@example.org", ("u@test.example",), "192.0.2.1",
                                            "client.example", queue_id="Q1"), SPAM).id
        store.index.close()
        self.day = self.spool / self.item[:8]
        chown_tree(self.state)

    def target(self, name: str, content: bytes = MARKER, mode: int = 0o644) -> Path:
        path = self.outside / name
        path.write_bytes(content)
        path.chmod(mode)
        return path

    def plant(self, link: Path, target: Path) -> None:
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        else:
            link.unlink(missing_ok=True)
        link.symlink_to(target)
        os.chown(link, NOBODY, NOBODY, follow_symlinks=False)

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(FILTERD), "--config", str(self.config), "--state-dir",
                               str(self.state), *argv], capture_output=True, timeout=300,
                              cwd=self.base, env={**os.environ, "FILTERD_CONFIG": ""})
        assert MARKER not in proc.stdout and MARKER not in proc.stderr, proc
        return proc


@pytest.fixture
def sink():
    handler = Sink()
    port = free_port()
    controller = SinkController(handler, hostname="127.0.0.1", port=port)
    controller.start()
    handler.port = port
    yield handler
    controller.stop()


@pytest.fixture
def world(sink):
    base = Path(tempfile.mkdtemp(prefix="filterd-statefs-", dir="/tmp"))
    base.chmod(0o755)  # nobody must reach the config and the state directory
    try:
        yield World(base, sink.port)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def snapshot(path: Path) -> tuple:
    st = os.stat(path, follow_symlinks=False)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime_ns, path.read_bytes()


def refused(proc: subprocess.CompletedProcess, what: str = "symbolic link") -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, (proc.returncode, err)
    assert "refusing" in err and what in err, err
    return err


# --- the switch to the owner ------------------------------------------------------------------

def test_root_works_as_the_spools_owner(world):
    proc = world.run("quarantine", "list")
    assert proc.returncode == 0, proc.stderr
    assert world.item.encode() in proc.stdout
    made = [p for p in world.spool.iterdir() if p.name.startswith("index.sqlite")]
    assert made and all(p.stat().st_uid == NOBODY for p in made), made
    assert world.run("quarantine", "show", "--raw", world.item).stdout == RAW


# --- locks/<id>.lock -> any file ---------------------------------------------------------------

@pytest.mark.parametrize("which", ["existing", "nonexistent"])
def test_planted_lock_link_is_not_chowned_or_opened(world, which):
    item_id = world.item if which == "existing" else NOT_AN_ITEM
    victim = world.target("passwd-like", mode=0o666)
    world.plant(world.spool / "locks" / f"{item_id}.lock", victim)
    before = snapshot(victim)
    err = refused(world.run("quarantine", "delete", item_id))
    assert f"{item_id}.lock" in err
    assert snapshot(victim) == before
    assert (world.day / f"{world.item}.json").exists()  # nothing done


# --- index.sqlite -> a path that does not exist --------------------------------------------------

@pytest.mark.parametrize("command", [["quarantine", "list"], ["quarantine", "stats"],
                                     ["quarantine", "reindex"]])
def test_planted_index_link_creates_nothing(world, command):
    target = world.outside / "created-by-root"
    world.plant(world.spool / "index.sqlite", target)
    proc = world.run(*command)
    assert proc.returncode == 1, proc.stderr
    assert "index.sqlite: it is a symbolic link" in proc.stderr.decode()
    assert sorted(os.listdir(world.outside)) == []


def test_planted_wal_link_is_refused(world):
    assert world.run("quarantine", "list").returncode == 0   # a real index exists now
    victim = world.target("wal-victim", mode=0o666)
    world.plant(world.spool / "index.sqlite-wal", victim)
    before = snapshot(victim)
    err = refused(world.run("quarantine", "list"))
    assert "index.sqlite-wal" in err
    assert snapshot(victim) == before


# --- <id>.eml -> a file of root's ---------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o600, 0o644])  # root-only, and readable by nobody as well
def test_planted_message_link_is_not_shown_or_released(world, sink, mode):
    secret = world.target("shadow-like", mode=mode)
    world.plant(world.day / f"{world.item}.eml", secret)
    err = refused(world.run("quarantine", "show", "--raw", world.item))
    assert f"{world.item}.eml" in err
    refused(world.run("quarantine", "show", "--headers", world.item))
    refused(world.run("quarantine", "release", world.item))
    assert sink.messages == []
    listed = world.run("quarantine", "list", "--state", "held")
    assert world.item.encode() in listed.stdout  # the item stays held
    assert secret.read_bytes() == MARKER


# --- the day directory -> a directory outside ----------------------------------------------------

def test_planted_day_directory_link_is_not_read_or_emptied(world, sink):
    elsewhere = world.outside / "day"
    shutil.copytree(world.day, elsewhere, symlinks=True)
    for name in os.listdir(elsewhere):  # the outside copy carries the marker
        path = elsewhere / name
        path.write_bytes(path.read_bytes().replace(b"quarantined body", MARKER)
                         .replace(b'"subject": "held"', b'"subject": "' + MARKER + b'"'))
    chown_tree(elsewhere, 0, 0)
    before = {name: snapshot(elsewhere / name) for name in os.listdir(elsewhere)}
    world.plant(world.day, elsewhere)
    for argv in (["show", world.item], ["show", "--raw", world.item], ["show", "--json", world.item],
                 ["release", world.item], ["delete", world.item]):
        err = refused(world.run("quarantine", *argv))
        assert world.item[:8] in err
    assert sink.messages == []
    assert {name: snapshot(elsewhere / name) for name in os.listdir(elsewhere)} == before
    for argv in (["reindex"], ["expire", "--older-than", "0"]):
        proc = world.run("quarantine", *argv)
        assert "not a directory" in proc.stderr.decode()  # warned, the outside left alone
    assert {name: snapshot(elsewhere / name) for name in os.listdir(elsewhere)} == before


# --- the Bayes database -----------------------------------------------------------------------

def message_file(world) -> Path:
    path = world.base / "spam.eml"
    path.write_bytes(b"From: s@example.net\nSubject: cheap\n\nbuy cheap things now\n")
    path.chmod(0o644)
    return path


@pytest.mark.parametrize("suffix", ["", "-wal", "-journal"])
def test_planted_bayes_links_create_and_touch_nothing(world, suffix):
    spam = message_file(world)
    if suffix:
        assert world.run("learn", "--spam", str(spam)).returncode == 0
        assert (world.state / "bayes.sqlite").stat().st_uid == NOBODY
        victim = world.target("bayes-victim", mode=0o666)
        before = snapshot(victim)
    else:
        victim, before = world.outside / "bayes-created-by-root", None
    world.plant(world.state / f"bayes.sqlite{suffix}", victim)
    for argv in (["learn", "--spam", str(spam)], ["bayes", "stats"], ["bayes", "expire"]):
        refused(world.run(*argv))
    if before is None:
        assert os.listdir(world.outside) == []
    else:
        assert snapshot(victim) == before


# --- the rule compile cache --------------------------------------------------------------------

def test_planted_rule_cache_links_are_not_followed(world):
    pytest.importorskip("hyperscan")
    elsewhere = world.outside / "cache"
    elsewhere.mkdir(mode=0o777)
    elsewhere.chmod(0o777)
    world.plant(world.state / "rules-cache", elsewhere)
    proc = world.run("config", "check")
    assert proc.returncode == 0, proc.stderr  # compiled in memory instead
    assert "compiled rule cache not written: refusing" in proc.stderr.decode()
    assert os.listdir(elsewhere) == []

    (world.state / "rules-cache").unlink()
    assert world.run("config", "check").returncode == 0
    cached = sorted((world.state / "rules-cache").glob("*.hsdb"))
    assert cached and all(p.stat().st_uid == NOBODY for p in cached)
    victims = {}
    for n, path in enumerate(cached):
        victims[n] = world.target(f"hsdb-victim-{n}", mode=0o666)
        world.plant(path, victims[n])
    before = {n: snapshot(v) for n, v in victims.items()}
    proc = world.run("config", "check")
    assert proc.returncode == 0, proc.stderr
    assert "compiled rule cache not used: refusing" in proc.stderr.decode()
    assert {n: snapshot(v) for n, v in victims.items()} == before


# --- the control socket ------------------------------------------------------------------------

def test_planted_control_socket_link_is_not_connected(world):
    other = world.outside / "root-service.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(other))
    os.chmod(other, 0o666)
    server.listen(1)
    server.settimeout(0.1)
    connections = []

    def accept():
        try:
            connections.append(server.accept())
        except OSError:
            pass
    world.plant(world.state / "control.sock", other)
    for command in ("status", "reload"):
        proc = world.run(command)
        refused(proc)
        waiter = threading.Thread(target=accept)
        waiter.start()
        waiter.join()
    server.close()
    assert connections == []


# --- the descriptor layer in-process -----------------------------------------------------------

def test_fifo_and_foreign_files_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "theirs").write_bytes(b"x")
    os.chown(tmp_path / "theirs", NOBODY, NOBODY)
    with Dir.open(tmp_path, follow=True) as d:
        with pytest.raises(UnsafeFile, match="a FIFO"):
            d.read("fifo")
        with pytest.raises(UnsafeFile, match="owned by nobody"):
            d.read("theirs")
        with pytest.raises(UnsafeFile, match="not a plain file name"):
            d.read("../x")
    os.symlink(tmp_path / "theirs", tmp_path / "db.sqlite")
    with pytest.raises(UnsafeFile, match="symbolic link"):
        sqlite_file(tmp_path / "db.sqlite")


def test_root_refuses_sqlite_in_a_directory_another_user_owns(tmp_path):
    from filterd.quarantine.index import Index
    from filterd.stores import StoreError
    from filterd.stores.sqlite import SqliteTokenStore
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UnsafeFile, match="owned by nobody"):
        Index(theirs / "index.sqlite").ids()
    with pytest.raises(StoreError, match="owned by nobody"):
        SqliteTokenStore(theirs / "bayes.sqlite")
    assert os.listdir(theirs) == []


def test_learn_as_root_names_inputs_the_owner_cannot_read(world):
    private = world.base / "private"
    private.mkdir(mode=0o700)
    (private / "spam.eml").write_bytes(b"From: s@example.net\nSubject: x\n\nbuy now\n")
    readable = message_file(world)
    proc = world.run("learn", "--spam", str(private / "spam.eml"), str(readable))
    assert proc.returncode == 1
    assert f"{private / 'spam.eml'}: not readable by nobody" in proc.stderr.decode()
    assert b"learned 1 as spam" in proc.stdout  # the readable one still learned


def test_serve_start_hands_the_state_over_without_following_links(tmp_path):
    from filterd.statefs import hand_over
    outside = tmp_path / "outside"
    outside.mkdir()
    host_file = outside / "host-file"
    host_file.write_bytes(MARKER)
    (outside / "host-dir").mkdir()
    state = tmp_path / "state"
    (state / "quarantine" / "20261122").mkdir(parents=True)
    (state / "quarantine" / "20261122" / "x.json").write_bytes(b"{}")
    (state / "bayes.sqlite").write_bytes(b"")
    (state / "link-to-file").symlink_to(host_file)
    (state / "rules-cache").symlink_to(outside / "host-dir")
    os.link(host_file, state / "hard-link")
    hand_over(state, NOBODY, NOBODY)
    for path in (state, state / "quarantine", state / "quarantine" / "20261122",
                 state / "quarantine" / "20261122" / "x.json", state / "bayes.sqlite",
                 state / "link-to-file", state / "rules-cache"):
        assert os.lstat(path).st_uid == NOBODY, path
    for path in (outside, host_file, outside / "host-dir"):
        assert os.lstat(path).st_uid == 0, path


def test_bayes_backup_as_root_writes_as_the_owner_and_says_so(world):
    assert world.run("learn", "--spam", str(message_file(world))).returncode == 0
    private = world.base / "private"
    private.mkdir(mode=0o700)
    proc = world.run("bayes", "backup", str(private / "b.gz"))
    assert proc.returncode == 1 and os.listdir(private) == []
    assert "works as nobody, the owner of the state directory" in proc.stderr.decode()
    proc = world.run("bayes", "backup", "-")
    assert proc.returncode == 0 and proc.stdout[:2] == b"\x1f\x8b"  # gzip on stdout
    backup = private / "b.gz"
    backup.write_bytes(proc.stdout)   # root-only; restore reads it before switching
    proc = world.run("bayes", "restore", str(backup))
    assert proc.returncode == 0 and b"restored 1 spam" in proc.stdout, proc.stderr


def test_planted_sidecar_link_is_not_read(world, sink):
    sidecar = world.day / f"{world.item}.json"
    forged = world.target("forged.json", sidecar.read_bytes().replace(
        b'"subject": "held"', b'"subject": "' + MARKER + b'"'), mode=0o644)
    assert world.run("quarantine", "list").returncode == 0  # indexed while it was real
    world.plant(sidecar, forged)
    for argv in (["show", world.item], ["show", "--json", world.item], ["list"],
                 ["release", world.item]):
        err = refused(world.run("quarantine", *argv))
        assert f"{world.item}.json" in err
    assert sink.messages == []
