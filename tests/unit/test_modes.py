"""filterd.modes: the file-mode policy (umask 0027, sockets through their node) and the
`filterd health` file_modes probe, on real files, sockets and CLI subprocesses."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from filterd import config, health, modes

REPO = Path(__file__).resolve().parents[2]
MESSAGE = (b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hello\r\n"
           b"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nMessage-ID: <m1@example.org>\r\n\r\n"
           b"hello there, a plain message\r\n")
RULE = """
[rule.TEST_SUBJECT_HELLO]
kind = "header"
header = "Subject"
pattern = 'hel+o'
description = "a pattern rule, so the rules cache gets a compiled database"

[scores]
TEST_SUBJECT_HELLO = 0.1
"""


def world_accessible(root: Path) -> list[str]:
    out = []
    for path in [root, *root.rglob("*")]:
        st = os.lstat(path)
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o007:
            out.append(f"{path.relative_to(root)} {stat.S_IMODE(st.st_mode):04o}")
    return out


def test_cli_commands_under_umask_022_create_nothing_world_accessible(tmp_path, engine_rules):
    rules = engine_rules
    (rules / "test-pattern.toml").write_text(RULE)
    (tmp_path / "filterd.toml").write_text(f'[rules]\ndir = "{rules}"\n')
    (tmp_path / "m.eml").write_bytes(MESSAGE)
    state = tmp_path / "state"
    base = [sys.executable, "-m", "filterd", "--config", str(tmp_path / "filterd.toml"),
            "--state-dir", str(state)]
    for args in (["learn", "--spam", str(tmp_path / "m.eml")], ["quarantine", "list"],
                 ["scan", "--offline", str(tmp_path / "m.eml")]):
        res = subprocess.run(base + args, capture_output=True, umask=0o022, cwd=REPO,
                             timeout=300)
        assert res.returncode == 0, (args, res.stderr)
    made = {p.relative_to(state).as_posix() for p in state.rglob("*")}
    assert {"bayes.sqlite", "quarantine/index.sqlite", "quarantine/locks"} <= made, made
    assert any(p.endswith(".hsdb") for p in made), made
    assert world_accessible(state) == []
    assert stat.S_IMODE((state / "bayes.sqlite").stat().st_mode) == modes.FILE_MODE


def test_set_socket_mode_changes_the_socket_node_and_its_group(tmp_path):
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        old = os.umask(0o027)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o750
        group = 65534 if os.geteuid() == 0 else os.getegid()
        modes.set_socket_mode(path, modes.MTA_SOCKET_MODE, group)
        st = path.lstat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group


def test_set_socket_mode_refuses_what_is_not_our_socket(tmp_path):
    target = tmp_path / "target"
    target.write_text("x")
    target.chmod(0o600)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError):            # a planted link is not followed
        modes.set_socket_mode(tmp_path / "link", 0o666)
    with pytest.raises(OSError, match="not a socket"):
        modes.set_socket_mode(target, 0o666)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_group_id_names_a_missing_group():
    assert modes.group_id("0") == 0
    with pytest.raises(OSError, match="no group named"):
        modes.group_id("no-such-group-filterd")


def test_world_access_lists_files_dirs_and_sockets_but_not_links(tmp_path):
    (tmp_path / "d").mkdir(mode=0o750)
    (tmp_path / "d" / "ok").write_text("")
    os.chmod(tmp_path / "d" / "ok", 0o640)
    (tmp_path / "d" / "open").write_text("")
    os.chmod(tmp_path / "d" / "open", 0o644)
    (tmp_path / "d" / "link").symlink_to("/etc/passwd")
    os.chmod(tmp_path, 0o750)
    found = modes.world_access([tmp_path, tmp_path / "missing"])
    assert [(f.path.name, f.mode, f.kind) for f in found] == [("open", 0o644, "file")]
    assert not found[0].world_writable


def probe(tmp_path, **extra):
    settings = config.defaults().with_overrides({"daemon.state_dir": str(tmp_path / "state"),
                                                 "milter.listen": "inet:1@127.0.0.1", **extra})
    (tmp_path / "state").mkdir(mode=0o750, exist_ok=True)
    os.chmod(tmp_path / "state", 0o750)
    return health.run_one(health.HEALTH_CHECKS["file_modes"], settings, 10)


def test_health_file_modes_ok_warn_fail(tmp_path):
    assert probe(tmp_path).status == "ok"
    db = tmp_path / "state" / "bayes.sqlite-wal"
    db.write_text("")
    os.chmod(db, 0o644)
    result = probe(tmp_path)
    assert result.status == "WARN" and result.ok is True
    assert "bayes.sqlite-wal (0644)" in result.detail
    os.chmod(db, 0o646)
    result = probe(tmp_path)
    assert result.status == "FAIL" and "world-writable" in result.detail


def test_health_checks_the_unix_milter_socket_mode_and_group(tmp_path):
    path = tmp_path / "milter.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        result = probe(tmp_path, **{"milter.listen": f"unix:{path}",
                                    "milter.socket_group": "65534"})
        assert result.status == "WARN"
        assert "not 0660" in result.detail and "not milter.socket_group 65534" in result.detail


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_a_group_our_user_is_not_in_is_refused_with_the_reason():
    import shutil
    import tempfile
    where = Path(tempfile.mkdtemp(prefix="filterd-modes-"))   # pytest's tmp is root's only
    try:
        os.chmod(where, 0o777)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:   # the child becomes nobody, as a daemon.user not in the group would be
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                sock = socket.socket(socket.AF_UNIX)
                sock.bind(str(where / "s.sock"))
                try:
                    modes.set_socket_mode(where / "s.sock", modes.MTA_SOCKET_MODE, 0)
                    os.write(write, b"no error")
                except OSError as exc:
                    os.write(write, str(exc).encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        said = os.read(read, 4096).decode()
        os.close(read)
        assert "must be a member of it" in said, said
        assert os.lstat(where / "s.sock").st_gid == 65534
    finally:
        shutil.rmtree(where)
