"""Free loopback ports for the real services the integration tests start, and waiting on them.

Several test sessions (several engineers, CI jobs) run on one machine at once, so nothing
here uses a fixed port. `free_port()` picks a random port *below* the kernel's ephemeral
range (so an outgoing connection can never be handed the same port before our server binds
it), checks that it can be bound on 127.0.0.1 (TCP, and UDP when asked), and then reserves
it for the life of this process with an abstract unix socket named after the port: a
concurrent session doing the same sees the reservation and picks another port. Abstract
sockets leave no files and vanish when the process exits, however it exits.

A reserved port stays ours after a service stops, so a restarted clamd or Postfix comes
back on the same port and the filterd config that points at it stays right.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

_RESERVED: dict[int, socket.socket] = {}
_LOW = 20000                      # never below this: keep clear of well-known service ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _reserve(port: int) -> bool:
    r = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        r.bind(f"\0filterd-test-port-{port}")
    except OSError:
        r.close()
        return False
    _RESERVED[port] = r
    return True


def free_port(*, udp: bool = False) -> int:
    """A port on 127.0.0.1 nobody listens on and no other test session will pick.

    `udp=True` also requires the UDP port to be free (for a DNS server on both).
    """
    eph_lo, eph_hi = _ephemeral_range()
    if eph_lo - _LOW >= 1000:
        candidates: Callable[[], int] = lambda: random.randrange(_LOW, eph_lo)
    else:                                                   # odd kernel setting: use above it
        candidates = lambda: random.randrange(eph_hi + 1, 65535)
    for _ in range(500):
        port = candidates()
        if port in _RESERVED:
            continue
        if not _bindable(port, socket.SOCK_STREAM):
            continue
        if udp and not _bindable(port, socket.SOCK_DGRAM):
            continue
        if _reserve(port):
            return port
    raise RuntimeError("no free loopback port found after 500 tries")


def release_port(port: int) -> None:
    """Give a reservation back (normally never needed: process exit releases all)."""
    sock = _RESERVED.pop(port, None)
    if sock is not None:
        sock.close()


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 30.0, *, host: str = "127.0.0.1",
              proc: subprocess.Popen | None = None, what: str = "",
              log: Callable[[], str] | None = None) -> None:
    """Wait until something accepts TCP connections on host:port.

    Fails early when `proc` exits; the error names `what` and carries `log()` (a log tail).
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if port_open(port, host):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or 'process'} exited with {proc.returncode} before "
                               f"listening on {host}:{port}" + _tail(log))
        time.sleep(0.05)
    raise TimeoutError(f"{what or 'service'} not listening on {host}:{port} after "
                       f"{timeout:g}s" + _tail(log))


def wait_port_closed(port: int, timeout: float = 15.0, *, host: str = "127.0.0.1") -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not port_open(port, host, timeout=0.2):
            return True
        time.sleep(0.05)
    return False


def _tail(log: Callable[[], str] | None) -> str:
    if log is None:
        return ""
    try:
        text = log()
    except Exception as exc:                                # the log is only for the message
        return f"\n(log unavailable: {exc})"
    return "\n--- log tail ---\n" + tail(text)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])
