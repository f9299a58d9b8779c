"""A private redis-server on 127.0.0.1: no persistence, its own port and directory.

    r = RedisServer().start()
    r.url                    # "redis://127.0.0.1:PORT/0"
    r.ping()                 # True (raw RESP, needs no client library)
    r.client()               # redis.Redis (the `redis` extra)
    r.flushall()             # between tests
    r.close()

Started with `--save "" --appendonly no` (nothing written to disk), `--protected-mode yes`,
bound to 127.0.0.1 only, in the foreground, logging to a file in its directory. Needs the
redis-server package.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from harness.common import (PrivateService, ServiceError, die_with_parent, private_dir, read_tail,
                            require_binary, stop_process, track, wait_for)
from harness.ports import free_port


class RedisServer(PrivateService):
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def log_file(self) -> Path:
        if self.dir is None:
            raise ServiceError("redis has no directory yet: call start()")
        return self.dir / "redis.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "RedisServer":
        binary = require_binary("redis-server", "redis-server")
        if self.running:
            return self
        if self.dir is None:
            self.dir = private_dir("redis")
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--protected-mode", "yes", "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--daemonize", "no", "--logfile", str(self.log_file),
                "--databases", "16", "--io-threads", "1"]
        try:
            self.proc = subprocess.Popen(die_with_parent(argv), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            track(self)
            if not wait_for(lambda: self.ping() or self.proc.poll() is not None, 30) \
                    or not self.running:
                raise ServiceError(f"redis-server did not answer PING on port {self.port} "
                                   f"(exit status {self.proc.poll()})\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.proc, timeout)
        self.proc = None

    def command(self, *args: str, timeout: float = 5.0) -> bytes:
        """Send one command (RESP array) and return the raw first reply line."""
        payload = f"*{len(args)}\r\n".encode()
        for a in args:
            raw = a.encode()
            payload += b"$%d\r\n%s\r\n" % (len(raw), raw)
        with socket.create_connection(self.address, timeout=timeout) as s:
            s.sendall(payload)
            buf = b""
            while not buf.endswith(b"\r\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        return buf.rstrip(b"\r\n")

    def ping(self) -> bool:
        try:
            return self.command("PING", timeout=1) == b"+PONG"
        except OSError:
            return False

    def flushall(self) -> None:
        if self.command("FLUSHALL") != b"+OK":
            raise ServiceError("redis FLUSHALL failed")

    def client(self, db: int = 0):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=5)

    def log_tail(self, lines: int = 30) -> str:
        if self.dir is None:
            return "(no redis log)"
        return f"--- {self.log_file} (tail) ---\n{read_tail(self.log_file, lines)}"
