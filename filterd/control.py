"""The control socket: how `filterd reload|status` reach the running daemon.

A unix socket (mode 0600) under the state directory; one JSON request line, one JSON reply
line. Commands: status, reload. Only the daemon's user and root can connect.
Trusts: the configured path (control.socket), not what the daemon's account may have put there:
the daemon binds under umask 0177 and never chmods by path; a client (the CLI, which switched to
the state directory's owner when run as root) talks only to a socket, not a link, owned by the
user it runs as (filterd.statefs).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from filterd.modes import CONTROL_SOCKET_MODE, set_socket_mode
from filterd.statefs import check

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def serve(path: Path, handler: Handler) -> asyncio.AbstractServer:
    path.unlink(missing_ok=True)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                request = json.loads(line or b"{}")
                reply = await handler(request)
            except Exception as exc:  # a bad request must not hurt the daemon
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    # created 0600 (no moment with a wider mode), then checked and set through the node itself
    old_umask = os.umask(0o777 & ~CONTROL_SOCKET_MODE)
    try:
        server = await asyncio.start_unix_server(on_client, path=str(path))
    finally:
        os.umask(old_umask)
    try:
        check_socket(path)
        set_socket_mode(path, CONTROL_SOCKET_MODE)
    except OSError:  # UnsafeFile included
        server.close()
        raise
    return server


def check_socket(path: Path) -> None:
    """Raise UnsafeFile unless `path` is a socket (not a link) owned by this process's user."""
    check(os.lstat(path), path, stat.S_IFSOCK)


def request(path: Path, command: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """Send one command to the daemon; raises OSError when it is not running (UnsafeFile
    when the path is a link or someone else's socket)."""
    check_socket(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        data = b""
        deadline = time.monotonic() + timeout
        while not data.endswith(b"\n") and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data or b"{}")
