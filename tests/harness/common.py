"""Shared helpers of the harness: paths, skips, private dirs, templates, processes."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Mapping

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
KEEP_ENV = "FILTERD_TEST_KEEP"       # set to 1 to keep the private dirs for a post-mortem
DIR_PREFIX = "filterd-h-"            # /tmp/filterd-h-<service>-XXXX: the harness's own dirs


class Unavailable(Exception):
    """This machine cannot run the service (not root, binary missing): skip, don't fail."""


class ServiceError(RuntimeError):
    """A service did not start, stop or answer as expected; the message carries its log."""


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise Unavailable(f"{what} needs root (the tests start it as root); run pytest as root")


def require_binary(name: str, package: str, *extra_dirs: str) -> str:
    """Path of a binary, searching PATH plus /usr/sbin, /sbin and `extra_dirs`."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(
        ("/usr/sbin", "/sbin", "/usr/local/sbin", *extra_dirs))
    found = shutil.which(name, path=path)
    if not found:
        raise Unavailable(f"{name} not found: install the Debian package {package} "
                          f"(scripts/bootstrap.sh test)")
    return found


def private_dir(prefix: str) -> Path:
    """A new directory under /tmp, mode 0755, for one service instance.

    It holds a .owner file (pid and start time of this process), so `sweep_stale_dirs()` in a
    later session can remove it if this process dies without cleaning up."""
    d = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{prefix}-", dir="/tmp"))
    d.chmod(0o755)
    (d / ".owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    return d


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _in_use(d: Path) -> bool:
    """Does any running process name `d` in its command line or environment?"""
    needle = str(d).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        for part in ("cmdline", "environ"):
            try:
                if needle in (proc / part).read_bytes():
                    return True
            except OSError:
                pass
    return False


def sweep_stale_dirs() -> list[Path]:
    """Remove harness dirs left by test processes that died (killed before their teardown).

    Only dirs with a .owner file whose process is gone, and that no running process still
    uses (a service that outlived its session keeps its dir). Returns what was removed."""
    removed = []
    for owner in Path("/tmp").glob(f"{DIR_PREFIX}*/.owner"):
        d = owner.parent
        try:
            pid_s, _, start = owner.read_text().strip().partition(" ")
            pid = int(pid_s)
        except (OSError, ValueError):
            continue
        if pid == os.getpid() or (_start_time(pid) == start and start):
            continue                                       # its owner is alive
        if _in_use(d):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def remove_dir(d: Path | None) -> None:
    if d is None or os.environ.get(KEEP_ENV) == "1":
        return
    shutil.rmtree(d, ignore_errors=True)


class PrivateService:
    """The lifecycle every harness service shares: its own start()/stop(), a private directory
    (`self.dir`) removed on close(), and use as a context manager."""

    dir: Path | None

    def start(self) -> "PrivateService":
        raise NotImplementedError

    def stop(self) -> Any:
        raise NotImplementedError

    def restart(self) -> Any:
        self.stop()
        return self.start()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            remove_dir(self.dir)
            self.dir = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


_PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")


def render(text: str, values: Mapping[str, object], *, source: str = "template") -> str:
    """Replace every @NAME@ in `text`; an @NAME@ without a value is an error."""
    missing = sorted({m for m in _PLACEHOLDER.findall(text) if m not in values})
    if missing:
        raise ValueError(f"{source}: no value for placeholder(s) {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


_LIVE: "weakref.WeakSet[object]" = weakref.WeakSet()


def track(service: object) -> None:
    """Remember a started service; whatever is still running at interpreter exit is
    stopped then (a fixture whose teardown never ran must not leave daemons behind)."""
    _LIVE.add(service)


@atexit.register
def _stop_leftovers() -> None:
    for service in list(_LIVE):
        try:
            service.close()  # type: ignore[attr-defined]
        except Exception:
            pass


def die_with_parent(argv: list[str]) -> list[str]:
    """`argv` run so that the child gets SIGTERM when the test process dies, even by SIGKILL
    (PR_SET_PDEATHSIG through setpriv, which then execs argv: the pid stays the service's).
    Without setpriv (util-linux) argv is returned as is."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else list(argv)


def stop_process(proc: subprocess.Popen | None, timeout: float = 15.0,
                 sig: int = signal.SIGTERM) -> int | None:
    """Signal a process we started and wait for it; SIGKILL it after `timeout`."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def wait_for(predicate, timeout: float, interval: float = 0.05):
    """Poll `predicate()` until it returns something truthy; returns it, or None on timeout."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            return None
        time.sleep(interval)


def read_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:])

