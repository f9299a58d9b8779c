"""A private Postfix instance on loopback, configured from packaging/postfix/ exactly.

    pf = PostfixInstance("milter", milter_port=..., ...)   # or "after-queue", "both", "none"
    pf.start()
    code, text = pf.send(raw_bytes, "sender@client.test", ["user@test.example"])
    pf.wait_delivered("user", 1)        # -> [bytes of each delivered message]
    pf.close()                          # stop, wait for every Postfix process, remove the dir

`postfix check`, then master(8) in the foreground as a child of the test process (its own
session, SIGTERM when the test process dies), `postfix stop` to stop: no Postfix outlives the
session, even when pytest is killed.

Layout under one private dir (mode 0755): etc/ (main.cf, master.cf, aliases), spool/
(queue_directory), data/ (data_directory, owned by postfix), mail/<user>/ (Maildirs, owned
by nobody: local(8) delivers from a root-owned alias table as default_privs), log/maillog
(postlogd, no syslog needed).

main.cf = a test base (no DNS, no outbound mail: every non-local domain goes to the error
transport) + the mode's snippets from packaging/postfix/ with their @PLACEHOLDERS@ filled in
from packaging/postfix/placeholders and this instance's ports + `main_cf` overrides last.
master.cf = the stock services (chroot off) + one smtpd on `smtp_port` + the snippets.

Mode -> snippets:  milter: main.cf.milter;  after-queue: main.cf.after-queue +
master.cf.after-queue;  both: all three;  none: no filter.  master.cf.release always.

Needs root (the postfix command is reserved for the superuser) and the postfix package.
"""

from __future__ import annotations

import email.message
import json
import os
import re
import signal
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

from harness.common import (PACKAGING, PrivateService, ServiceError, die_with_parent, private_dir,
                            read_tail, render, require_binary, require_root, stop_process, track,
                            wait_for)
from harness.ports import free_port, wait_port

SNIPPETS = PACKAGING / "postfix"
MODES = ("milter", "after-queue", "both", "none")
DEFAULT_USERS = ("user", "user2", "user3", "admin", "postmaster", "root", "abuse")
DOMAIN = "test.example"


class Reply(NamedTuple):
    """The SMTP server's answer to a whole transaction: the first refusal, or DATA's reply."""

    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


def placeholder_defaults() -> dict[str, str]:
    """NAME -> default from packaging/postfix/placeholders."""
    values: dict[str, str] = {}
    for line in (SNIPPETS / "placeholders").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def snippet(name: str, values: Mapping[str, object]) -> str:
    """A packaging/postfix snippet with its placeholders filled in (defaults, then values)."""
    merged: dict[str, object] = dict(placeholder_defaults())
    unknown = set(values) - set(merged)
    if unknown:
        raise ValueError(f"unknown Postfix placeholder(s): {', '.join(sorted(unknown))} "
                         f"(known: see {SNIPPETS / 'placeholders'})")
    merged.update(values)
    path = SNIPPETS / name
    return render(path.read_text(), merged, source=str(path))


_MASTER_BASE = """\
# Stock services (chroot off: the queue lives in a private /tmp dir).
# ==========================================================================
# service type  private unpriv  chroot  wakeup  maxproc command + args
# ==========================================================================
127.0.0.1:{smtp_port} inet n   -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_MAIN_BASE = """\
# Test base: a private instance under {root}; no DNS, no mail leaves this host.
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {myhostname}
mydomain = {domain}
myorigin = $mydomain
mydestination = {mydestination}
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
lmtp_host_lookup = native
default_transport = error:outbound mail disabled in tests
relay_transport = error:outbound mail disabled in tests
relayhost =
relay_domains =
alias_maps = texthash:{root}/etc/aliases
alias_database =
local_recipient_maps = $alias_maps
recipient_delimiter = +
biff = no
append_dot_mydomain = no
smtpd_banner = $myhostname ESMTP test
maillog_file = {root}/log/maillog
maillog_file_prefixes = {root}
# retry deferred mail soon (tests also flush the queue explicitly)
queue_run_delay = 2s
minimal_backoff_time = 2s
maximal_backoff_time = 10s
delay_warning_time = 0
smtpd_tls_security_level = none
smtp_tls_security_level = none
"""


# $1 = master, $2 = config dir. setsid(1) does not fork here (sh's child is no group leader).
_MASTER_WRAPPER = (
    'setsid "$1" -c "$2" -d & m=$!; '
    'trap \'kill -TERM $m 2>/dev/null; wait $m; exit 0\' TERM INT HUP; '
    'wait $m')


class PostfixInstance(PrivateService):
    def __init__(self, mode: str = "milter", *, smtp_port: int | None = None,
                 milter_port: int | None = None, filter_port: int | None = None,
                 reinject_port: int | None = None, release_port: int | None = None,
                 users: Iterable[str] = DEFAULT_USERS,
                 domains: Sequence[str] = (DOMAIN, "localhost"),
                 myhostname: str = "mx.test.example",
                 placeholders: Mapping[str, object] | None = None,
                 main_cf: Mapping[str, object] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.smtp_port = smtp_port or free_port()
        self.milter_port = milter_port or free_port()
        self.filter_port = filter_port or free_port()
        self.reinject_port = reinject_port or free_port()
        self.release_port = release_port or free_port()
        self.users = tuple(dict.fromkeys(users))
        self.domains = tuple(domains)
        self.myhostname = myhostname
        self.placeholders = dict(placeholders or {})
        self.main_cf = dict(main_cf or {})
        self.dir: Path | None = None
        self._running = False
        self._master: subprocess.Popen | None = None
        self.last_rcpt_replies: dict[str, tuple[int, str]] = {}

    # --- paths ----------------------------------------------------------------------
    @property
    def etc(self) -> Path:
        return self._root / "etc"

    @property
    def spool(self) -> Path:
        return self._root / "spool"

    @property
    def mail_dir(self) -> Path:
        return self._root / "mail"

    @property
    def log_file(self) -> Path:
        return self._root / "log" / "maillog"

    @property
    def _root(self) -> Path:
        if self.dir is None:
            raise ServiceError("Postfix instance has no directory yet: call start()")
        return self.dir

    @property
    def running(self) -> bool:
        return self._running and self._master_pid() is not None

    # --- configuration ----------------------------------------------------------------
    def snippet_values(self) -> dict[str, object]:
        values: dict[str, object] = {
            "FILTERD_MILTER_PORT": self.milter_port,
            "FILTERD_SMTP_PORT": self.filter_port,
            "POSTFIX_REINJECT_PORT": self.reinject_port,
            "POSTFIX_RELEASE_PORT": self.release_port,
        }
        values.update(self.placeholders)
        return values

    def main_cf_text(self) -> str:
        values = self.snippet_values()
        parts = [_MAIN_BASE.format(root=self._root, myhostname=self.myhostname,
                                   domain=self.domains[0],
                                   mydestination=", ".join(self.domains))]
        if self.mode in ("milter", "both"):
            parts.append(snippet("main.cf.milter", values))
        if self.mode in ("after-queue", "both"):
            parts.append(snippet("main.cf.after-queue", values))
        if self.main_cf:
            parts.append("# test overrides\n" + "".join(
                f"{k} = {_cf_value(v)}\n" for k, v in self.main_cf.items()))
        return "\n".join(parts)

    def master_cf_text(self) -> str:
        values = self.snippet_values()
        parts = [_MASTER_BASE.format(smtp_port=self.smtp_port)]
        if self.mode in ("after-queue", "both"):
            parts.append(snippet("master.cf.after-queue", values))
        parts.append(snippet("master.cf.release", values))
        return "\n".join(parts)

    def _write_config(self) -> None:
        root = self._root
        for sub in ("etc", "spool", "data", "log", "mail"):
            (root / sub).mkdir(exist_ok=True)
        (root / "etc" / "main.cf").write_text(self.main_cf_text())
        (root / "etc" / "master.cf").write_text(self.master_cf_text())
        # texthash: "key value", no colon (a colon makes Postfix reject the recipient)
        (root / "etc" / "aliases").write_text(
            "".join(f"{u} {self.mail_dir / u}/\n" for u in self.users))
        for u in self.users:
            for sub in ("new", "cur", "tmp"):
                (self.mail_dir / u / sub).mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "-R", "nobody:nogroup", str(self.mail_dir)], check=True)
        subprocess.run(["chown", "postfix:postfix", str(root / "data")], check=True)

    # --- process control --------------------------------------------------------------
    def start(self) -> "PostfixInstance":
        require_root("Postfix")
        self._postfix = require_binary("postfix", "postfix")
        self._postqueue = require_binary("postqueue", "postfix")
        self._postsuper = require_binary("postsuper", "postfix")
        self._postconf = require_binary("postconf", "postfix")
        if self.running:
            return self
        if self.dir is None:
            self.dir = private_dir("postfix")
        try:
            self._write_config()
            check = subprocess.run([self._postfix, "-c", str(self.etc), "check"],
                                   stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=60)
            if check.returncode != 0:
                raise ServiceError(f"postfix check failed ({check.returncode}):\n"
                                   f"{check.stdout}{check.stderr}\n{self.maillog_tail()}")
            # master(8) in the foreground (-d) in a session of its own (its SIGTERM handler
            # stops its process group), under a small sh that is our child and stops it when
            # the test process dies, even by SIGKILL (parent-death signal; master's own would
            # be cleared when it changes credentials). `postfix start` would daemonise it
            # instead, and hang run() if its output were captured.
            master = Path(self._daemon_directory()) / "master"
            with open(self._root / "log" / "master.out", "ab") as out:
                self._master = subprocess.Popen(
                    die_with_parent(["/bin/sh", "-c", _MASTER_WRAPPER, "sh", str(master),
                                     str(self.etc)]),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
            if not wait_for(lambda: self._master_pid() or self._master.poll() is not None, 30) \
                    or self._master.poll() is not None:
                raise ServiceError(f"Postfix master exited {self._master.poll()} at start:\n"
                                   f"{read_tail(self._root / 'log' / 'master.out', 10)}\n"
                                   f"{self.maillog_tail()}")
            self._running = True
            track(self)
            for port, what in ((self.smtp_port, "smtpd"), (self.release_port, "release smtpd")):
                wait_port(port, 30, what=f"Postfix {what}", log=self.maillog)
            if self.mode in ("after-queue", "both"):
                wait_port(self.reinject_port, 30, what="Postfix reinjection smtpd",
                          log=self.maillog)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """`postfix stop`, then wait until the master and all its children are gone."""
        if self.dir is None or not (self.etc / "main.cf").exists():
            return
        pid = self._master_pid()
        if pid is not None:
            subprocess.run([getattr(self, "_postfix", "postfix"), "-c", str(self.etc), "stop"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
            if not wait_for(lambda: not _alive(pid), timeout):
                _kill(pid)
        if self._master is not None:                        # reap it (and SIGKILL if need be)
            stop_process(self._master, 5, sig=signal.SIGKILL if self._master.poll() is None
                         else signal.SIGTERM)
            self._master = None
        # children linger a second or two after the master; they carry MAIL_CONFIG=etc
        if not wait_for(lambda: not self._instance_pids(), 10):
            for p in self._instance_pids():
                _kill(p)
        self._running = False

    def reload(self) -> None:
        self._run([self._postfix, "-c", str(self.etc), "reload"])

    def _daemon_directory(self) -> str:
        res = self._run([self._postconf, "-c", str(self.etc), "-h", "daemon_directory"])
        return res.stdout.strip() or "/usr/lib/postfix/sbin"

    def _master_pid(self) -> int | None:
        if self.dir is None:
            return None
        try:
            pid = int((self.spool / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def _instance_pids(self) -> list[int]:
        marker = f"MAIL_CONFIG={self.etc}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                env = (proc / "environ").read_bytes()
            except OSError:
                continue
            if marker in env.split(b"\0"):
                pids.append(int(proc.name))
        return pids

    def _run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=60, **kw)
        if res.returncode != 0:
            raise ServiceError(f"{' '.join(argv)} exited {res.returncode}: "
                               f"{res.stdout}{res.stderr}\n{self.maillog_tail()}")
        return res

    # --- SMTP ----------------------------------------------------------------------------
    def send(self, msg: bytes | str | email.message.Message,
             mail_from: str = "sender@client.test",
             rcpts: str | Sequence[str] = ("user@test.example",), *,
             port: int | str | None = None, helo: str = "client.test",
             timeout: float = 120.0) -> Reply:
        """One SMTP transaction to this instance; returns the reply instead of raising.

        `port`: None = the public smtpd, "reinject" / "release" = those listeners, or a port.
        The result is the first refusal (greeting, EHLO, MAIL, all RCPTs refused) or the
        reply to DATA. Per-recipient replies are in `last_rcpt_replies`.
        """
        if isinstance(rcpts, str):
            rcpts = [rcpts]
        if port is None:
            port = self.smtp_port
        elif port == "reinject":
            port = self.reinject_port
        elif port == "release":
            port = self.release_port
        return smtp_send(int(port), msg, mail_from, rcpts, helo=helo, timeout=timeout,
                         rcpt_replies=self.last_rcpt_replies)

    # --- mailboxes -----------------------------------------------------------------------
    def mailbox(self, user: str) -> list[bytes]:
        """Messages delivered to `user`'s Maildir, oldest first."""
        if user not in self.users:
            raise KeyError(f"{user!r} is not a mailbox of this instance ({self.users})")
        files = []
        for sub in ("new", "cur"):
            d = self.mail_dir / user / sub
            if d.is_dir():
                files.extend(p for p in d.iterdir() if p.is_file())
        files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def clear_mailboxes(self) -> None:
        for user in self.users:
            for sub in ("new", "cur", "tmp"):
                d = self.mail_dir / user / sub
                if d.is_dir():
                    for p in d.iterdir():
                        p.unlink(missing_ok=True)

    def wait_delivered(self, user: str, n: int = 1, timeout: float = 30.0, *,
                       exact: bool = True) -> list[bytes]:
        """Wait until `user` has at least n messages; with `exact`, also until the queue is
        empty, and then fail if there are more than n (a message delivered twice)."""
        if not wait_for(lambda: len(self.mailbox(user)) >= n, timeout):
            raise AssertionError(
                f"{user}: {len(self.mailbox(user))} message(s) delivered after {timeout:g}s, "
                f"expected {n}\nqueue: {self.queue_ids()}\n{self.maillog_tail()}")
        if exact:
            self.wait_queue_empty(timeout)
            time.sleep(0.2)
            got = self.mailbox(user)
            if len(got) != n:
                raise AssertionError(f"{user}: {len(got)} messages delivered, expected exactly "
                                     f"{n}\n{self.maillog_tail()}")
            return got
        return self.mailbox(user)

    # --- queue ---------------------------------------------------------------------------
    def queue(self) -> list[dict]:
        """`postqueue -j`: one dict per queued message (queue_name, queue_id, recipients...)."""
        res = self._run([self._postqueue, "-c", str(self.etc), "-j"])
        return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]

    def queue_ids(self) -> list[str]:
        return [m["queue_id"] for m in self.queue()]

    def flush(self) -> None:
        """`postqueue -f`: retry deferred mail now."""
        self._run([self._postqueue, "-c", str(self.etc), "-f"])

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        if not wait_for(lambda: not self.queue(), timeout, interval=0.1):
            raise AssertionError(f"queue not empty after {timeout:g}s: {self.queue()}\n"
                                 f"{self.maillog_tail()}")

    def delete_queue(self) -> None:
        """`postsuper -d ALL`: drop every queued message."""
        self._run([self._postsuper, "-c", str(self.etc), "-d", "ALL"])

    def reset(self) -> None:
        """Between tests: empty the queue and the mailboxes."""
        if self.running:
            self.delete_queue()
        self.clear_mailboxes()
        self.last_rcpt_replies.clear()

    # --- logs ----------------------------------------------------------------------------
    def maillog(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except (OSError, ServiceError):
            return ""

    def maillog_tail(self, lines: int = 40) -> str:
        if self.dir is None:
            return "(no maillog: instance has no directory)"
        return f"--- {self.log_file} (tail) ---\n" + read_tail(self.log_file, lines)

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """Wait until the maillog matches `pattern` (a regex); returns the match."""
        rx = re.compile(pattern)
        m = wait_for(lambda: rx.search(self.maillog()), timeout, interval=0.1)
        if not m:
            raise AssertionError(f"maillog: no match for {pattern!r} after {timeout:g}s\n"
                                 f"{self.maillog_tail()}")
        return m


def _cf_value(v: object) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:                                     # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


_BARE_LF = re.compile(rb"(?<!\r)\n")


def _as_bytes(msg: bytes | str | email.message.Message) -> bytes:
    if isinstance(msg, email.message.Message):
        msg = msg.as_bytes()
    elif isinstance(msg, str):
        msg = msg.encode("utf-8")
    return _BARE_LF.sub(b"\r\n", msg)


def smtp_send(port: int, msg: bytes | str | email.message.Message, mail_from: str,
              rcpts: Sequence[str], *, host: str = "127.0.0.1", helo: str = "client.test",
              timeout: float = 120.0,
              rcpt_replies: dict[str, tuple[int, str]] | None = None) -> Reply:
    """One SMTP transaction; returns the deciding reply, never raises on 4xx/5xx."""
    data = _as_bytes(msg)
    if rcpt_replies is not None:
        rcpt_replies.clear()

    def reply(code: int, text: bytes | str) -> Reply:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return Reply(code, text.replace("\n", " ").strip())

    try:
        s = smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout)
    except smtplib.SMTPConnectError as e:
        return reply(e.smtp_code, e.smtp_error)
    except smtplib.SMTPServerDisconnected as e:
        return reply(421, f"disconnected at greeting: {e}")
    try:
        code, text = s.ehlo()
        if code != 250:
            return reply(code, text)
        code, text = s.mail(mail_from)
        if code != 250:
            return reply(code, text)
        accepted = 0
        last = (0, b"")
        for r in rcpts:
            last = s.rcpt(r)
            if rcpt_replies is not None:
                rcpt_replies[r] = (last[0], last[1].decode("utf-8", "replace"))
            if last[0] in (250, 251):
                accepted += 1
        if not accepted:
            return reply(*last)
        try:
            code, text = s.data(data)
        except smtplib.SMTPDataError as e:
            return reply(e.smtp_code, e.smtp_error)
        return reply(code, text)
    except smtplib.SMTPServerDisconnected as e:
        return reply(421, f"server disconnected: {e}")
    finally:
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            s.close()
