"""Safe file access inside the state directory, and the CLI's switch to its owner.

Trusts: the configured paths themselves (daemon.state_dir, quarantine.dir, bayes.path,
rules.compile_cache, control.socket come from root's configuration), not what is inside them.
The daemon's account owns the state and may plant symbolic links, FIFOs or other users' files
there; root's CLI must not be turned against the host by them (issue 14).
Reads: daemon.state_dir (become_state_owner). Emits: no symbols.

The rules, in one place:
  * a configured directory must be owned by the user this process runs as and is not itself
    a link (`Dir.open`; the path up to it is root's configuration); every name below it is opened relative to the directory descriptor
    with O_NOFOLLOW (`Dir.sub`, `Dir.open_file`), and must be a directory or a regular file
    owned by that user;
  * files are created with O_EXCL (new files go to a tmp name and are renamed inside the same
    directory descriptor); modes and owners change through descriptors only, never by path;
  * SQLite opens its -wal, -shm and -journal files by path, which O_NOFOLLOW cannot protect:
    `sqlite_file` lets a database be opened only by the owner of its directory, so a planted
    link can at worst reach what that owner could reach anyway;
  * `become_state_owner`: the CLI run as root does its work as the owner of the state directory
    (setgroups, setgid, setuid, like postsuper and postcat keep to the queue's owner).
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import pkgutil
import pwd
import secrets
import stat
import sys
from pathlib import Path
from typing import Iterable, Iterator

from filterd.modes import DIR_MODE, FILE_MODE  # the one file-mode policy

log = logging.getLogger("filterd.statefs")


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW = os.O_NOFOLLOW


class UnsafeFile(OSError):
    """A path in the state directory that filterd refuses to use (str() says why)."""

    def __init__(self, path: Path | str, why: str):
        super().__init__(f"refusing {path}: {why}")
        self.path = str(path)
        self.why = why


class SwitchError(Exception):
    """The CLI, run as root, could not become the owner of the state directory."""


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISREG, "a regular file"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "an unknown kind of file"


def check(st: os.stat_result, path: Path | str, want: int) -> None:
    """Raise UnsafeFile unless `st` is of type `want` (stat.S_IFREG, S_IFDIR, S_IFSOCK) and
    owned by the user this process runs as."""
    if stat.S_IFMT(st.st_mode) != want:
        raise UnsafeFile(path, f"it is {_kind(st.st_mode)}, not {_kind(want)}")
    euid = os.geteuid()
    if st.st_uid != euid:
        hint = (" (run the command as that user; the filterd CLI started as root switches to "
                "the owner of daemon.state_dir by itself)" if euid == 0 else "")
        raise UnsafeFile(path, f"it is owned by {user_name(st.st_uid)}, not by "
                               f"{user_name(euid)} that this process runs as{hint}")


def _vetted(fd: int, path: Path | str, want: int, set_mode: int | None = None) -> int:
    """`fd` once check() passes on what it is open on (and, for a node this process just
    created, its mode is `set_mode` exactly); closed when anything fails."""
    try:
        check(os.fstat(fd), path, want)
        if set_mode is not None:
            os.fchmod(fd, set_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_nofollow(dir_fd: int, name: str, flags: int, path: str, mode: int = FILE_MODE) -> int:
    if not name or "/" in name or name in (".", ".."):
        raise UnsafeFile(path, "not a plain file name")
    try:
        # O_NONBLOCK: a planted FIFO must not hang the command (no effect on regular files)
        return os.open(name, flags | _NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode,
                       dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a link, or not a directory
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                raise exc from None
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeFile(path, "it is a symbolic link (links in the state directory "
                                       "are never followed)") from None
            raise UnsafeFile(path, f"it is {_kind(st.st_mode)}") from None
        raise


class Dir:
    """An open directory of the state; names inside are resolved against its descriptor."""

    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path

    # --- opening directories ---------------------------------------------------------------
    @classmethod
    def open(cls, path: Path | str, *, create: bool = False, mode: int = DIR_MODE,
             follow: bool = False) -> "Dir":
        """A configured directory, which must be owned by the user this process runs as. The
        path up to its parent is root's configuration and is followed; the directory itself
        may sit in the daemon's state directory (quarantine/, rules-cache/) and is not
        followed when it is a link, unless `follow` (a directory named only by root)."""
        path = Path(path)
        if follow:
            if create:
                path.mkdir(mode=mode, parents=True, exist_ok=True)
            return cls(_vetted(os.open(path, _DIR_FLAGS), path, stat.S_IFDIR), path)
        if create:
            path.parent.mkdir(mode=mode, parents=True, exist_ok=True)
        with cls(os.open(path.parent, _DIR_FLAGS), path.parent) as parent:
            return parent.sub(path.name, create=create, mode=mode)

    def sub(self, name: str, *, create: bool = False, mode: int = DIR_MODE) -> "Dir":
        """The directory `name` inside this one; never through a link."""
        path = self.path / name
        if create:
            try:
                os.mkdir(name, mode, dir_fd=self.fd)
                created = True
            except FileExistsError:
                created = False
        else:
            created = False
        fd = _open_nofollow(self.fd, name, _DIR_FLAGS, str(path))
        return Dir(_vetted(fd, path, stat.S_IFDIR, mode if created else None), path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Dir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- files -----------------------------------------------------------------------------
    def open_file(self, name: str, flags: int = os.O_RDONLY, mode: int = FILE_MODE) -> int:
        """A descriptor for the regular file `name` (O_NOFOLLOW; owner checked). With O_CREAT
        and without O_EXCL the file may exist; a file created here gets `mode` exactly."""
        path = str(self.path / name)
        created = False
        if flags & os.O_CREAT and not flags & os.O_EXCL:
            try:  # create-or-open, knowing which happened
                fd = _open_nofollow(self.fd, name, flags | os.O_EXCL, path, mode)
                created = True
            except FileExistsError:
                fd = _open_nofollow(self.fd, name, flags & ~os.O_CREAT, path, mode)
        else:
            fd = _open_nofollow(self.fd, name, flags, path, mode)
            created = bool(flags & os.O_CREAT)
        return _vetted(fd, path, stat.S_IFREG, mode if created else None)

    def read(self, name: str, limit: int | None = None) -> bytes:
        fd = self.open_file(name, os.O_RDONLY)
        try:
            chunks = []
            left = limit
            while left is None or left > 0:
                chunk = os.read(fd, 1 << 20 if left is None else min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                if left is not None:
                    left -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write_durably(self, name: str, data: bytes, mode: int = FILE_MODE) -> None:
        """tmp (O_EXCL) -> write -> fsync -> rename over `name`, inside this directory; the
        caller fsyncs the directory."""
        tmp = f".tmp.{name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = self.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.unlink(tmp, missing_ok=True)
            raise
        os.close(fd)
        try:
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self.unlink(tmp, missing_ok=True)
            raise

    def touch(self, name: str) -> None:
        """Set the file's times to now, through a descriptor (utime by path follows links)."""
        fd = self.open_file(name, os.O_RDONLY)
        try:
            os.utime(fd)
        finally:
            os.close(fd)

    # --- names -----------------------------------------------------------------------------
    def lstat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def exists(self, name: str) -> bool:
        try:
            self.lstat(name)
            return True
        except FileNotFoundError:
            return False

    def names(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def entries(self, want: int) -> Iterator[tuple[str, os.stat_result]]:
        """(name, lstat) of the entries of type `want`; links and other kinds are skipped."""
        for name in self.names():
            try:
                st = self.lstat(name)
            except FileNotFoundError:
                continue
            if stat.S_IFMT(st.st_mode) == want:
                yield name, st

    def unlink(self, name: str, *, missing_ok: bool = False) -> None:
        """Remove the name (a link is removed itself, never its target)."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmdir(self, name: str) -> None:
        os.rmdir(name, dir_fd=self.fd)

    def link(self, src: str, dst: str) -> None:
        os.link(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def fsync(self) -> None:
        os.fsync(self.fd)


# --- SQLite ---------------------------------------------------------------------------------

SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def sqlite_file(path: Path | str, *, create: bool = True) -> Path:
    """Check that SQLite may open `path` in this process, creating an empty file when absent.

    Its directory must be owned by the user this process runs as (root included only for a
    root-owned directory), and the database and its -wal, -shm and -journal files must be
    absent or regular files owned by that user. Raises UnsafeFile, FileNotFoundError (absent
    and not `create`) or OSError."""
    path = Path(path)
    with Dir.open(path.parent, create=create, follow=True) as parent:
        for suffix in SQLITE_SUFFIXES:
            name = path.name + suffix
            try:
                check(parent.lstat(name), parent.path / name, stat.S_IFREG)
            except FileNotFoundError:
                if suffix:
                    continue
                if not create:
                    raise
                try:
                    os.close(parent.open_file(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    check(parent.lstat(name), parent.path / name, stat.S_IFREG)
    return path


# --- the daemon's start as root ----------------------------------------------------------------

def hand_over(top: Path | str, uid: int, gid: int) -> None:
    """Give the tree under `top` to uid:gid (root, at `filterd serve` start, before switching
    to daemon.user), by descriptor: `top` is root's configuration and followed, nothing below it
    is; links are changed themselves, never their targets, and a file with more than one hard
    link (it could be a host file linked in) is left alone."""
    fd = os.open(top, _DIR_FLAGS)
    try:
        os.fchown(fd, uid, gid)
        _hand_over_below(fd, Path(top), uid, gid, depth=0)
    finally:
        os.close(fd)


def _hand_over_below(dir_fd: int, path: Path, uid: int, gid: int, depth: int) -> None:
    if depth > 16:  # the state is a few levels deep; deeper is not ours to walk
        return
    for name in os.listdir(dir_fd):
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                fd = _open_nofollow(dir_fd, name, _DIR_FLAGS, str(path / name))
                try:
                    os.fchown(fd, uid, gid)
                    _hand_over_below(fd, path / name, uid, gid, depth + 1)
                finally:
                    os.close(fd)
            elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                log.warning("not handing %s to uid %d: it has %d hard links", path / name, uid,
                            st.st_nlink)
            else:
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            pass  # vanished or refused: the daemon reports what it cannot use later


# --- the CLI's switch to the owner ----------------------------------------------------------

def become_state_owner(state_dir: Path | str, preload: Iterable[str] = ()) -> str | None:
    """When running as root against a state directory owned by another user, become that user
    for good (setgroups([]), setgid, setuid). Returns the user switched to, or None when no
    switch was needed (not root, a root-owned or missing state directory).

    The modules in `preload` are imported first: the owner may be unable to read the
    installation (a venv or Python under /root, mode 0700). What the owner cannot read is kept
    in `unreadable_after_switch` so that a later failing import can say why (cli.main).
    Raises SwitchError when the switch itself fails; the command must stop then."""
    global unreadable_after_switch, switched_to
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(state_dir)
    except FileNotFoundError:
        return None
    if st.st_uid == 0:
        return None
    uid = st.st_uid
    try:
        entry = pwd.getpwuid(uid)
        name, gid = entry.pw_name, entry.pw_gid
    except KeyError:
        name, gid = f"uid {uid}", st.st_gid
    for module in preload:
        _preload(module)
    used = _installation_dirs()
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise SwitchError(f"cannot switch to {name}, the owner of {state_dir}: {exc}; "
                          "nothing done") from None
    switched_to = name
    unreadable_after_switch = [d for d in used if not os.access(d, os.R_OK | os.X_OK)]
    return name


switched_to: str | None = None
unreadable_after_switch: list[str] = []


def import_failure_hint(exc: ImportError) -> str | None:
    """Why an import failed after become_state_owner, when the switch is the cause."""
    if switched_to is None or not unreadable_after_switch:
        return None
    return (f"cannot load {exc.name or exc}: this command switched from root to "
            f"{switched_to}, the owner of the state directory (so links planted there cannot "
            f"reach the host), and {switched_to} cannot read "
            f"{', '.join(unreadable_after_switch)}; install filterd where {switched_to} can "
            f"read it (not under /root), or run the command as {switched_to}")


def unreadable_inputs(paths: Iterable[str]) -> dict[str, str]:
    """After a switch, the admin's input paths this process cannot read, with why (for learn
    and scan, which then leave them out)."""
    if switched_to is None:
        return {}
    out = {}
    for p in paths:
        try:
            is_dir = stat.S_ISDIR(os.stat(p).st_mode)
            readable = os.access(p, os.R_OK | (os.X_OK if is_dir else 0))
        except FileNotFoundError:
            continue
        except PermissionError:
            readable = False
        if not readable:
            out[p] = (f"{p}: not readable by {switched_to}: run as root, this command works as "
                      f"{switched_to}, the owner of the state directory; copy it where "
                      f"{switched_to} can read it; skipped")
    return out


def _preload(module: str) -> None:
    """Import `module`, or with "pkg.*" every module of the package."""
    names = [module]
    if module.endswith(".*"):
        package = importlib.import_module(module[:-2])
        names = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
                 if not m.name.endswith(".__main__")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # optional parts (Bayes, Redis, libmilter): the command says so later
            pass


def _installation_dirs() -> list[str]:
    """The sys.path entries that modules of this process were loaded from."""
    files = [f for f in (getattr(m, "__file__", None) for m in list(sys.modules.values())) if f]
    used = []
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            prefix = os.path.join(os.path.abspath(entry), "")
            if any(f.startswith(prefix) for f in files):
                used.append(os.path.abspath(entry))
    return used


__all__ = ["Dir", "UnsafeFile", "SwitchError", "check", "sqlite_file", "become_state_owner",
           "import_failure_hint", "unreadable_inputs", "hand_over", "user_name", "DIR_MODE", "FILE_MODE", "SQLITE_SUFFIXES"]
