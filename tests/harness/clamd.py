"""A private clamd with the signature database filterd makes itself (no freshclam).

    c = Clamd().start()
    c.socket, c.port          # unix socket path, TCP port on 127.0.0.1
    c.instream(raw_message)   # "stream: OK" | "stream: Filterd.Test.EICAR.UNOFFICIAL FOUND"
    c.stop(); c.start()       # tests stop clamd mid-run; it comes back on the same socket/port
    c.close()                 # stop and remove the directory

The database is written by packaging/clamav/make-test-db (EICAR body signature + md5/sha256
of /usr/share/clamav-testfiles/*), the config is packaging/clamav/clamd.conf.in with
@CLAMD_DIR@ and @CLAMD_TCP_PORT@ filled in. Runs as whoever runs the tests (root in CI);
needs the clamav-daemon package (clamav-testfiles for the hash signatures).
"""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
from pathlib import Path

from harness.common import (PACKAGING, PrivateService, ServiceError, die_with_parent, private_dir,
                            read_tail, render, require_binary, stop_process, track, wait_for)
from harness.ports import free_port

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
TESTFILES = Path("/usr/share/clamav-testfiles")
MAKE_TEST_DB = PACKAGING / "clamav" / "make-test-db"
CONF_TEMPLATE = PACKAGING / "clamav" / "clamd.conf.in"


class Clamd(PrivateService):
    def __init__(self, *, port: int | None = None, start_timeout: float = 60.0):
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def socket(self) -> str:
        return str(self._dir / "clamd.sock")

    @property
    def db_dir(self) -> Path:
        return self._dir / "db"

    @property
    def log_file(self) -> Path:
        return self._dir / "clamd.log"

    @property
    def conf_file(self) -> Path:
        return self._dir / "clamd.conf"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def _dir(self) -> Path:
        if self.dir is None:
            raise ServiceError("clamd has no directory yet: call start()")
        return self.dir

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _prepare(self) -> None:
        self.dir = private_dir("clamd")
        res = subprocess.run([str(MAKE_TEST_DB), str(self.db_dir)], capture_output=True,
                             text=True, timeout=120)
        if res.returncode != 0:
            raise ServiceError(f"make-test-db failed ({res.returncode}): {res.stderr}")
        self.conf_file.write_text(render(CONF_TEMPLATE.read_text(),
                                         {"CLAMD_DIR": self.dir, "CLAMD_TCP_PORT": self.port},
                                         source=str(CONF_TEMPLATE)))

    def start(self) -> "Clamd":
        clamd = require_binary("clamd", "clamav-daemon")
        if self.running:
            return self
        if self.dir is None:
            self._prepare()
        try:
            with open(self._dir / "clamd.out", "ab") as out:
                self.proc = subprocess.Popen(die_with_parent([clamd, "-c", str(self.conf_file)]),
                                             stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            track(self)
            ok = wait_for(lambda: self._ready() or self.proc.poll() is not None,
                          self.start_timeout)
            if not ok or not self.running:
                raise ServiceError(f"clamd did not answer PING on {self.socket} "
                                   f"(exit status {self.proc.poll()})\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM and wait (clamd takes about 2 s); its socket file is then gone."""
        stop_process(self.proc, timeout)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the socket file stays behind, as after a crash (FixStaleSocket)."""
        stop_process(self.proc, 5, sig=signal.SIGKILL)
        self.proc = None

    # --- protocol --------------------------------------------------------------------
    def _ready(self) -> bool:
        try:
            return self.command("PING", timeout=1) == "PONG"
        except OSError:
            return False

    def _connect(self, via: str, timeout: float) -> socket.socket:
        if via == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr: str | tuple[str, int] = self.socket
        elif via == "tcp":
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            addr = self.address
        else:
            raise ValueError(f"via must be 'unix' or 'tcp', got {via!r}")
        s.settimeout(timeout)
        try:
            s.connect(addr)
        except OSError:
            s.close()
            raise
        return s

    @staticmethod
    def _read_reply(s: socket.socket) -> str:
        buf = b""
        while not buf.endswith(b"\0"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        return buf.rstrip(b"\0").decode("utf-8", "replace")

    def command(self, cmd: str, *, via: str = "unix", timeout: float = 10.0) -> str:
        """A z-command (PING, VERSION, RELOAD, STATS) and its reply."""
        with self._connect(via, timeout) as s:
            s.sendall(b"z" + cmd.encode() + b"\0")
            return self._read_reply(s)

    def instream(self, data: bytes, *, via: str = "unix", timeout: float = 30.0,
                 chunk: int = 65536) -> str:
        """Scan bytes with INSTREAM; returns clamd's reply, e.g. 'stream: OK'."""
        with self._connect(via, timeout) as s:
            s.sendall(b"zINSTREAM\0")
            for i in range(0, len(data), chunk):
                part = data[i:i + chunk]
                s.sendall(struct.pack("!L", len(part)) + part)
            s.sendall(struct.pack("!L", 0))
            return self._read_reply(s)

    def reload(self) -> None:
        """RELOAD the database (after changing files in db_dir) and wait until it answers."""
        reply = self.command("RELOAD")
        if reply != "RELOADING":
            raise ServiceError(f"clamd RELOAD answered {reply!r}")
        if not wait_for(self._ready, 30):
            raise ServiceError(f"clamd not answering after RELOAD\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.dir is None:
            return "(no clamd log)"
        return (f"--- {self.log_file} (tail) ---\n{read_tail(self.log_file, lines)}\n"
                f"--- clamd stdout/stderr ---\n{read_tail(self._dir / 'clamd.out', 10)}")
