"""The real `filterd serve` as a subprocess, with a generated TOML config and a private
state directory.

    f = FilterdDaemon({"scan.deadline": 5.0}, reinject_port=pf.reinject_port).start()
    f.milter_port, f.smtp_port        # where it serves (free ports unless given)
    f.stop()     # SIGTERM, wait for exit      f.kill()    # SIGKILL, like a crash
    f.restart()  # same ports, same state dir   f.log()     # its stdout+stderr so far
    f.close()    # stop and remove the directory
    FilterdDaemon(umask=0o022)  # start it under this umask (a hand start), not the harness's
    milter.listen = "unix:/path" in the overrides: start-up waits for that socket instead

Config: `overrides` are settings by dotted key ("scan.deadline") or as nested tables
({"scan": {"deadline": 5.0}}); they go over the harness's base below and are written to
<dir>/filterd.toml. The base makes filterd testable on loopback:
  milter.listen = "inet:PORT@127.0.0.1", smtp.listen / smtp.reinject / quarantine.release_via
  on this instance's ports, scan.mynetworks = [] (test mail comes from 127.0.0.1, which would
  otherwise be "originating" and never spam-tagged), daemon.user = "" (stay root),
  daemon.hostname = "filterd.test.example", log.level = "info", metrics.listen on a free
  port (`metrics_port`).
`service_overrides(clamd=, dns=)` maps the harness's services to filterd settings,
for the keys this filterd version has (see SERVICE_KEYS).

Start-up waits up to $FILTERD_TEST_START_TIMEOUT seconds (default 120) for both listeners.
Command line: `filterd --config FILE --state-dir DIR serve` (the console script next to
this Python, else `python -m filterd`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from harness.common import (PrivateService, REPO, ServiceError, die_with_parent, private_dir,
                            read_tail, stop_process, track)
from harness.ports import free_port, wait_port, wait_port_closed

# How the harness's services are wired into filterd: (service, setting key, value builder).
# A row applies only when this filterd has the key (filterd.config.BY_KEY). Owners of
# settings that point at a service (a Redis URL, ...): add your row here.
SERVICE_KEYS: tuple[tuple[str, str, Any], ...] = (
    ("clamd", "clamav.socket", lambda c: c.socket),
    ("clamd", "clamav.tcp", lambda c: ""),
    ("dns", "dns.nameservers", lambda d: [d.host]),
    ("dns", "dns.port", lambda d: d.port),
)


START_TIMEOUT_ENV = "FILTERD_TEST_START_TIMEOUT"    # seconds filterd may take to listen


def known_keys() -> set[str]:
    """Setting keys of the filterd in this tree ({} if its config module does not import)."""
    try:
        from filterd.config import BY_KEY
    except Exception:
        return set()
    return set(BY_KEY)


def service_overrides(**services: Any) -> dict[str, Any]:
    """Settings that point filterd at the given harness services (clamd=, dns=, ...)."""
    keys = known_keys()
    out: dict[str, Any] = {}
    for attr, key, build in SERVICE_KEYS:
        svc = services.get(attr)
        if svc is not None and key in keys:
            out[key] = build(svc)
    return out


def filterd_command() -> list[str]:
    script = Path(sys.executable).parent / "filterd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "filterd"]


def filterd_available() -> tuple[bool, str]:
    """(True, "") when `filterd serve --help` works, else (False, why)."""
    try:
        res = subprocess.run([*filterd_command(), "serve", "--help"], capture_output=True,
                             text=True, timeout=60, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`filterd serve --help` could not run: {exc}"
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip().splitlines()
        return False, ("`filterd serve` is not available yet (`filterd serve --help` exited "
                       f"{res.returncode}: {err[-1] if err else ''})")
    return True, ""


# --- TOML ------------------------------------------------------------------------------
_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))            # JSON string escapes are valid TOML
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML: {v!r}")


def nest(settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{"a.b": 1, "c": {"d": 2}} -> {"a": {"b": 1}, "c": {"d": 2}}."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in settings.items():
        if isinstance(v, Mapping) and "." not in k:
            out.setdefault(k, {}).update(v)
        else:
            section, dot, name = k.partition(".")
            if not dot:
                raise ValueError(f"setting {k!r} needs a section: 'section.name'")
            out.setdefault(section, {})[name] = v
    return out


def to_toml(settings: Mapping[str, Any]) -> str:
    lines: list[str] = []
    for section, table in nest(settings).items():
        lines.append(f"[{_key(section)}]")
        lines.extend(f"{_key(k)} = {_value(v)}" for k, v in table.items())
        lines.append("")
    return "\n".join(lines)


class FilterdDaemon(PrivateService):
    def __init__(self, overrides: Mapping[str, Any] | None = None, *,
                 milter_port: int | None = None, smtp_port: int | None = None,
                 reinject_port: int | None = None, release_port: int | None = None,
                 milter: bool = True, smtp: bool = True, start_timeout: float | None = None,
                 env: Mapping[str, str] | None = None, umask: int | None = None):
        self.milter_port = milter_port or free_port()
        self.smtp_port = smtp_port or free_port()
        self.reinject_port = reinject_port or free_port()
        self.release_port = release_port or free_port()
        self.metrics_port = free_port()
        self.milter_enabled = milter
        self.smtp_enabled = smtp
        self.overrides = dict(overrides or {})
        self.start_timeout = start_timeout or float(os.environ.get(START_TIMEOUT_ENV, 120))
        self.env = dict(env or {})
        self.umask = umask          # the daemon's starting umask (None: this process's)
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    # --- paths and config ------------------------------------------------------------
    @property
    def _dir(self) -> Path:
        if self.dir is None:
            raise ServiceError("filterd has no directory yet: call start()")
        return self.dir

    @property
    def config_file(self) -> Path:
        return self._dir / "filterd.toml"

    @property
    def state_dir(self) -> Path:
        return self._dir / "state"

    @property
    def log_file(self) -> Path:
        return self._dir / "filterd.log"

    @property
    def milter_spec(self) -> str:
        """The milter address as Postfix writes it (smtpd_milters)."""
        return f"inet:127.0.0.1:{self.milter_port}"

    def settings(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "daemon.user": "",
            "daemon.hostname": "filterd.test.example",
            "log.level": "info",
            "scan.mynetworks": [],
            "milter.enabled": self.milter_enabled,
            "milter.listen": f"inet:{self.milter_port}@127.0.0.1",
            "smtp.enabled": self.smtp_enabled,
            "smtp.listen": f"127.0.0.1:{self.smtp_port}",
            "smtp.reinject": f"127.0.0.1:{self.reinject_port}",
            "quarantine.release_via": f"127.0.0.1:{self.release_port}",
        }
        keys = known_keys()
        if "metrics.listen" in keys:             # its default is a fixed port: never use it
            base["metrics.listen"] = f"127.0.0.1:{self.metrics_port}"
        for section, table in nest(self.overrides).items():
            for name, value in table.items():
                base[f"{section}.{name}"] = value
        return base

    def write_config(self) -> Path:
        self.config_file.write_text(to_toml(self.settings()))
        return self.config_file

    def command(self, *args: str) -> list[str]:
        return [*filterd_command(), "--config", str(self.config_file),
                "--state-dir", str(self.state_dir), *args]

    # --- lifecycle -------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "FilterdDaemon":
        if self.running:
            return self
        if self.dir is None:
            self.dir = private_dir("filterd")
            self.state_dir.mkdir(mode=0o750)
        self.write_config()
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "FILTERD_CONFIG": str(self.config_file),
                    "FILTERD_STATE_DIR": str(self.state_dir)})
        env.update(self.env)
        try:
            with open(self.log_file, "ab") as out:
                out.write(f"--- harness: start #{self.starts + 1}: "
                          f"{' '.join(self.command('serve'))}\n".encode())
                out.flush()
                self.proc = subprocess.Popen(die_with_parent(self.command("serve")),
                                             stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, env=env,
                                             cwd=str(self._dir),
                                             umask=-1 if self.umask is None else self.umask)
                track(self)
            self.starts += 1
            milter_listen = str(self.settings()["milter.listen"])
            if self.milter_enabled and milter_listen.startswith("unix:"):
                self._wait_unix_socket(Path(milter_listen[len("unix:"):]))
            elif self.milter_enabled:
                wait_port(self.milter_port, self.start_timeout, proc=self.proc,
                          what="filterd milter", log=self.log)
            if self.smtp_enabled:
                wait_port(self.smtp_port, self.start_timeout, proc=self.proc,
                          what="filterd SMTP filter", log=self.log)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_unix_socket(self, path: Path) -> None:
        import socket
        import time
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceError(f"filterd exited {self.proc.returncode} before its milter "
                                   f"socket {path} was ready:\n{read_tail(self.log_file)}")
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(str(path))
                return
            except OSError:
                time.sleep(0.1)
        raise ServiceError(f"filterd milter socket {path} not ready after {self.start_timeout} s")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; returns the exit status (None if it was not running)."""
        if self.proc is None:
            return None
        rc = stop_process(self.proc, timeout)
        self.proc = None
        self._wait_ports_closed()
        return rc

    def kill(self) -> None:
        """SIGKILL, as in a crash (in-flight scans are lost, nothing is cleaned up)."""
        if self.proc is None:
            return
        stop_process(self.proc, 5, sig=signal.SIGKILL)
        self.proc = None
        self._wait_ports_closed()

    def _wait_ports_closed(self) -> None:
        for enabled, port in ((self.milter_enabled, self.milter_port),
                              (self.smtp_enabled, self.smtp_port)):
            if enabled and not wait_port_closed(port, 10):
                raise ServiceError(f"port {port} still open after filterd exited")

    def restart(self, overrides: Mapping[str, Any] | None = None) -> "FilterdDaemon":
        """Stop and start again, on the same ports and state dir (new overrides merged)."""
        self.stop()
        if overrides:
            self.overrides.update(overrides)
        return self.start()

    # --- using it --------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 60.0, check: bool = True,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run `filterd --config ... --state-dir ... ARGS` against this instance."""
        res = subprocess.run(self.command(*args), capture_output=True, timeout=timeout,
                             input=input, cwd=str(self._dir))
        if check and res.returncode != 0:
            raise ServiceError(f"{' '.join(self.command(*args))} exited {res.returncode}:\n"
                               f"{res.stdout.decode(errors='replace')}"
                               f"{res.stderr.decode(errors='replace')}")
        return res

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except (OSError, ServiceError):
            return ""

    def log_tail(self, lines: int = 40) -> str:
        if self.dir is None:
            return "(no filterd log)"
        return f"--- {self.log_file} (tail) ---\n{read_tail(self.log_file, lines)}"
