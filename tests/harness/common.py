"""Shared helpers of the harness: paths, skips, private dirs, templates, processes."""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Mapping

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
KEEP_ENV = "FILTERD_TEST_KEEP"       # set to 1 to keep the private dirs for a post-mortem


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
    """A new directory under /tmp, mode 0755, for one service instance."""
    d = Path(tempfile.mkdtemp(prefix=f"filterd-{prefix}-", dir="/tmp"))
    d.chmod(0o755)
    return d


def remove_dir(d: Path | None) -> None:
    if d is None or os.environ.get(KEEP_ENV) == "1":
        return
    shutil.rmtree(d, ignore_errors=True)


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


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the test process dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)            # PR_SET_PDEATHSIG
    except Exception:
        pass


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

