"""The file-mode policy: nothing filterd creates is readable or writable by other users.

  umask                   0027, set by every filterd command at start (filterd.cli.main),
                          whatever the caller's: `make run`, a hand start and root's shell
                          behave as the systemd unit (UMask=0027) does
  directories             0750 (state dir, quarantine spool and its day directories; the
                          rules cache is 0700)
  files                   0640 (quarantined mail and sidecars, the quarantine index, the Bayes
                          and recipient databases, compiled rule caches). SQLite creates a
                          database's -wal, -shm and -journal files with the database's own mode
  control socket          0600 (the daemon's user and root: it reloads the rule set)
  MTA-facing unix sockets 0660, group milter.socket_group (Postfix must connect to a unix
                          milter socket, which takes write permission on the socket)

Modes are decided at creation: by the umask, or by the mode given to os.open() followed by
fchmod() on the descriptor; never by chmod() on a path afterwards, which an attacker who can
write the directory could point elsewhere in between. A unix socket is the exception the
kernel forces: bind() creates its node with the umask, and fchmod() on the socket changes the
socket, not the node. set_socket_mode() therefore opens the node with O_PATH|O_NOFOLLOW,
checks it is a socket owned by us, and changes that very node through /proc/self/fd.

world_access() finds what breaks the policy, for `filterd health` (filterd.health, the
"file_modes" probe): world-writable is a failure, world-readable a warning.

Trusts: the state directory's owner. Reads: no settings itself (callers pass paths).
"""

from __future__ import annotations

import grp
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

UMASK = 0o027
DIR_MODE = 0o750
FILE_MODE = 0o640
CONTROL_SOCKET_MODE = 0o600
MTA_SOCKET_MODE = 0o660


def set_process_umask() -> int:
    """Apply the policy's umask to this process; returns the caller's."""
    return os.umask(UMASK)


def group_id(name: str) -> int:
    """A group name or number as a gid; OSError naming the group when there is none."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise OSError(f"no group named {name!r} (getent group {name})") from None


def set_socket_mode(path: Path | str, mode: int, group: int | None = None) -> None:
    """Give the unix socket node at `path` `mode` (and `group`), through a descriptor.

    Raises OSError when the node is not a socket we own (something replaced it after bind),
    or when the group cannot be given (our user must be a member of it).
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path}: not a socket (replaced after it was created?)")
        if st.st_uid != os.geteuid():
            raise OSError(f"{path}: owned by uid {st.st_uid}, not by us (uid {os.geteuid()})")
        node = f"/proc/self/fd/{fd}"   # the node checked above, whatever the path names now
        if group is not None and st.st_gid != group:
            try:
                os.chown(node, -1, group)
            except PermissionError:
                raise OSError(f"{path}: cannot give the socket to group {group}: filterd's "
                              "user must be a member of it (usermod -aG GROUP filterd)") from None
        os.chmod(node, mode)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Finding:
    path: Path
    mode: int
    kind: str           # "file", "directory", "socket", ...

    @property
    def world_writable(self) -> bool:
        return bool(self.mode & stat.S_IWOTH)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISREG, "file"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISFIFO, "fifo")):
        if test(mode):
            return name
    return "node"


def world_access(roots: Iterable[Path]) -> list[Finding]:
    """Every file, directory or socket under `roots` (and the roots themselves) that other
    users may read, write or enter. Symbolic links are neither followed nor reported (their
    own mode means nothing); a root that does not exist is skipped."""
    found: list[Finding] = []
    seen: set[tuple[int, int]] = set()
    stack = [Path(r) for r in roots]
    while stack:
        path = stack.pop()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode) or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        if st.st_mode & 0o007:
            found.append(Finding(path, stat.S_IMODE(st.st_mode), _kind(st.st_mode)))
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(path) as entries:
                    stack.extend(Path(e.path) for e in entries)
            except PermissionError:
                continue
    return sorted(found, key=lambda f: str(f.path))
