"""File modes and untrusted text, on the real `filterd serve` and real CLI subprocesses.

One daemon per module, started as a hand start is (umask 022, not the unit's UMask=0027),
with its milter on a unix socket given to a group (milter.socket_group). A message whose
Subject and senders carry terminal escapes (OSC title, CSI clear screen, SGR colours, CR/LF, C1
CSI, bidi override) is quarantined through its after-queue SMTP listener (GTUBE: quarantine
is the after-queue default). Then:
  - the daemon's and the CLI's files (every one under the state directory: the spool, the
    quarantine index and its -wal/-shm, the Bayes database and its -wal/-shm, the rules cache,
    the control socket) are readable by no other user, the milter socket is 0660 in its group
    and the group's user can speak the milter protocol on it; `filterd health` agrees;
  - `quarantine list`/`show`/`--json` print no raw control character (the bytes of the
    subprocess output are tested), `show --raw` escapes on a terminal (a pty) and is
    byte-identical into a pipe.
"""

from __future__ import annotations

import grp
import json
import os
import pty
import pwd
import select
import smtplib
import stat
import subprocess
import tty
from pathlib import Path

import pytest

from harness import FilterdDaemon, filterd_available
from harness.common import private_dir, remove_dir, wait_for
from harness.messages import GTUBE

OSC_TITLE = "\x1b]0;owned\x07"
CSI_CLEAR = "\x1b[2J\x1b[H"
SGR_RED = "\x1b[31m"
# RFC 2047 carries what a raw header line cannot: CR, LF, ESC, BEL, C1, bidi
SUBJECT_WORDS = ("=?utf-8?q?pay=1B]0;owned=07now=1B[2J=1B[H=1B[31mred=0D=0Aforged_line"
                 "=C2=9B2J_=E2=80=AEexe.txt?=")
FROM_WORDS = "=?utf-8?q?Bank=1B[2J=1B]0;t=07?= <bank@example.org>"
ENVELOPE_FROM = "bank\x1b[31m@example.org"


def raw_controls(data: bytes) -> list[str]:
    """Control characters in output bytes, except the LF ending each line (a CR only before
    LF counts as a line end too)."""
    text = data.decode("utf-8", "replace")
    bad = []
    for i, ch in enumerate(text):
        code = ord(ch)
        if ch == "\n" or (ch == "\r" and text.startswith("\n", i + 1)):
            continue
        if code < 0x20 or 0x7f <= code < 0xa0 or ch in "\u202e\u202d\u2066\u2067\u2068\u2069":
            bad.append(f"U+{code:04X}")
    return bad


def hostile_message() -> bytes:
    return (f"From: {FROM_WORDS}\r\nTo: user@test.example\r\nSubject: {SUBJECT_WORDS}\r\n"
            "Message-ID: <hostile@example.org>\r\nDate: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
            # raw in the header block and body too: what `show --raw` prints as stored
            f"X-Raw: {OSC_TITLE}{CSI_CLEAR}\u009b31m\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"{GTUBE}\r\n{SGR_RED}red\rover\u202eexe.txt\r\n").encode()


@pytest.fixture(scope="module")
def socket_group() -> tuple[str, int, str | None]:
    """(group as configured, its gid, a user whose primary group it is, if any)."""
    for name in ("postfix", "mail", "nogroup"):
        try:
            gid = grp.getgrnam(name).gr_gid
        except KeyError:
            continue
        user = next((u.pw_name for u in pwd.getpwall() if u.pw_gid == gid and u.pw_uid), None)
        return name, gid, user
    return "65534", 65534, None


@pytest.fixture(scope="module")
def daemon(socket_group, wired_overrides):
    ok, why = filterd_available()
    if not ok:
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("needs root: the milter socket goes to another group")
    sockets = private_dir("modes-sockets")
    os.chmod(sockets, 0o711)   # the group's user must reach the socket in it
    f = FilterdDaemon({**wired_overrides, "milter.listen": f"unix:{sockets}/milter.sock",
                       "milter.socket_group": socket_group[0]}, umask=0o022)
    try:
        f.start()
        yield f
    finally:
        f.close()
        remove_dir(sockets)


def cli(daemon: FilterdDaemon, *args: str, **kw) -> subprocess.CompletedProcess:
    """The CLI as an admin's shell runs it: umask 022."""
    return subprocess.run(daemon.command(*args), capture_output=True, timeout=120,
                          umask=0o022, cwd=str(daemon.dir), **kw)


@pytest.fixture(scope="module")
def item(daemon) -> dict:
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        code, _ = smtp.docmd(f"MAIL FROM:<{ENVELOPE_FROM}>")
        if code != 250:   # the listener refused the escape in the envelope: keep the header's
            smtp.rset()
            smtp.docmd("MAIL FROM:<bank@example.org>")
        smtp.rcpt("user@test.example")
        code, reply = smtp.data(hostile_message())
    assert code == 250, f"{code} {reply!r}\n{daemon.log()}"

    def listed():
        res = cli(daemon, "quarantine", "list", "--json")
        return json.loads(res.stdout) if res.returncode == 0 else None

    items = wait_for(listed, 30)
    assert items, daemon.log()
    [found] = items
    # the spool folds the Subject's whitespace (CR/LF too) when it stores it; the rest is raw
    assert "\x1b]0;owned\x07" in found["subject"] and "\x9b" in found["subject"]
    return found


def stored_eml(daemon, item) -> Path:
    return daemon.state_dir / "quarantine" / item["id"][:8] / f"{item['id']}.eml"


# --- file modes -------------------------------------------------------------------------
def test_nothing_in_the_state_dir_is_world_accessible_after_a_hand_start(daemon, item):
    # the CLI creates state too (a Bayes database, the index's lock files): under umask 022
    learn = cli(daemon, "learn", "--spam", str(stored_eml(daemon, item)))
    assert learn.returncode == 0, learn.stderr
    # a message the daemon classifies opens the Bayes database (WAL) in the daemon
    # (no reinjection listener here: its answer is a tempfail, after the scan)
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("a@example.org")
        smtp.rcpt("user@test.example")
        smtp.data(b"Subject: plain\r\nFrom: a@example.org\r\n\r\nhello there\r\n")
    state = daemon.state_dir
    names = {p.name for p in state.rglob("*")}
    for expected in ("bayes.sqlite", "bayes.sqlite-wal", "bayes.sqlite-shm", "index.sqlite",
                     "index.sqlite-wal", "index.sqlite-shm", "control.sock",
                     f"{item['id']}.eml", f"{item['id']}.json"):
        assert expected in names, f"{expected} not in {sorted(names)}"
    assert any(p.suffix == ".hsdb" for p in (state / "rules-cache").iterdir())
    problems = []
    for path in [state, *state.rglob("*")]:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_mode & 0o007:
            problems.append(f"{path.relative_to(state.parent)} {stat.S_IMODE(st.st_mode):04o}")
    assert problems == []
    assert stat.S_IMODE(os.lstat(state / "control.sock").st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(state / "bayes.sqlite").st_mode) == 0o640
    health = cli(daemon, "health", "--only", "file_modes,daemon", "--json")
    rows = {r["component"]: r for r in json.loads(health.stdout)}
    assert rows["file_modes"]["status"] == "ok", rows
    assert rows["daemon"]["status"] == "ok", rows


def test_health_warns_on_world_readable_and_fails_on_world_writable_state(daemon, item):
    index = daemon.state_dir / "quarantine" / "index.sqlite"
    before = stat.S_IMODE(index.stat().st_mode)
    try:
        os.chmod(index, 0o644)
        res = cli(daemon, "health", "--only", "file_modes")
        assert res.returncode == 0 and b"WARN" in res.stdout
        assert b"index.sqlite (0644)" in res.stdout
        os.chmod(index, 0o666)
        res = cli(daemon, "health", "--only", "file_modes")
        assert res.returncode == 1 and b"FAIL" in res.stdout and b"world-writable" in res.stdout
    finally:
        os.chmod(index, before)


def test_milter_socket_is_0660_in_its_group_and_its_group_can_connect(daemon, socket_group):
    name, gid, user = socket_group
    path = Path(daemon.settings()["milter.listen"][len("unix:"):])
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == gid
    if user is None:
        pytest.skip(f"no user has group {name} as primary group to connect as")
    # a process of the group's user (as Postfix's smtpd is) negotiates with the milter
    probe = ("import socket,struct,sys\n"
             "s=socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n"
             "b=b'O'+struct.pack('!III',6,0x1ff,0x1fffff); s.sendall(struct.pack('!I',len(b))+b)\n"
             "n=struct.unpack('!I',s.recv(4))[0]; sys.stdout.write(s.recv(n)[:1].decode())\n")
    pw = pwd.getpwnam(user)
    python = "/usr/bin/python3"      # the system's: this interpreter may sit under /root
    if not os.path.exists(python):
        pytest.skip(f"{python} is missing: nothing to run as {user}")
    res = subprocess.run([python, "-c", probe, str(path)], capture_output=True, timeout=30,
                         user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
    assert res.returncode == 0 and res.stdout == b"O", res.stderr
    # and a user of no such group cannot
    other = subprocess.run([python, "-c", probe, str(path)], capture_output=True,
                           timeout=30, user=65534, group=65534 if gid != 65534 else 65533,
                           extra_groups=[])
    assert other.returncode != 0 and b"line 2, in <module>" in other.stderr   # the connect
    assert b"PermissionError: [Errno 13] Permission denied" in other.stderr


# --- untrusted text on output -------------------------------------------------------------
def test_list_and_show_print_no_raw_control_character(daemon, item):
    for args in (("quarantine", "list"), ("quarantine", "show", item["id"]),
                 ("quarantine", "list", "--json"), ("quarantine", "show", "--json", item["id"])):
        res = cli(daemon, *args)
        assert res.returncode == 0, res.stderr
        assert raw_controls(res.stdout) == [], (args, res.stdout)
    listed = cli(daemon, "quarantine", "list").stdout.decode()
    assert "\\x1b]0;owned\\x07" in listed and "red forged line" in listed
    assert len(listed.splitlines()) == 1          # one row: the CR/LF did not forge another
    shown = cli(daemon, "quarantine", "show", item["id"]).stdout.decode()
    assert "\\x1b[2J\\x1b[H\\x1b[31mred" in shown and "\\x9b2J" in shown and "\\u202eexe" in shown
    as_json = json.loads(cli(daemon, "quarantine", "show", "--json", item["id"]).stdout)
    assert as_json["subject"] == item["subject"]   # escaped on output, the same value


def run_on_pty(argv: list[str]) -> bytes:
    """Run argv with its stdout on a pty in raw mode (no LF -> CRLF), return what it wrote."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    try:
        proc = subprocess.Popen(argv, stdout=slave, stderr=subprocess.PIPE, umask=0o022)
    finally:
        os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:       # EIO: the child closed the pty
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else b""
    return out


def test_show_raw_escapes_on_a_terminal_and_is_byte_identical_into_a_pipe(daemon, item):
    stored = stored_eml(daemon, item).read_bytes()
    assert b"=1B]0;owned=07" in stored           # the stored message is the sender's, unchanged
    piped = cli(daemon, "quarantine", "show", "--raw", item["id"])
    assert piped.returncode == 0 and piped.stdout == stored
    assert raw_controls(stored) != []             # raw ESC, BEL, C1, CR and bidi, as sent
    on_tty = run_on_pty(daemon.command("quarantine", "show", "--raw", item["id"]))
    assert raw_controls(on_tty) == [], on_tty
    assert b"X-Raw: \\x1b]0;owned\\x07\\x1b[2J\\x1b[H\\x9b31m\r\n" in on_tty
    assert b"\\x1b[31mred\\x0dover\\u202eexe.txt\r\n" in on_tty
    assert on_tty.count(b"\r\n") == stored.count(b"\r\n")   # the lines as stored
    headers = run_on_pty(daemon.command("quarantine", "show", "--headers", item["id"]))
    assert raw_controls(headers) == [] and headers.startswith(b"From: =?utf-8?q?Bank")
    assert cli(daemon, "quarantine", "show", "--headers", item["id"]).stdout == \
        stored[:stored.index(b"\r\n\r\n") + 2]


def test_the_daemon_logs_the_hostile_message_on_one_line_with_escapes_shown(daemon, item):
    log = daemon.log_file.read_bytes()
    assert raw_controls(log) == []
    lines = [line for line in log.decode().splitlines()
             if "message_id=<hostile@example.org>" in line]
    assert len(lines) == 1, lines
    assert "filterd.message: " in lines[0] and item["id"] in lines[0]
    if item["mail_from"] == ENVELOPE_FROM:      # the listener took the escape in MAIL FROM
        assert "from=bank\\x1b[31m@example.org" in lines[0]
