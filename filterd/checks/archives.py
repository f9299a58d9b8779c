"""Look inside archives for the names and types of their members, with hard limits.

Trusts: nothing in the archive. Declared sizes, counts and names may lie; every read is capped,
so an archive bomb costs at most the limits, never memory or time in proportion to what it
claims or expands to:
  - members are listed from the zip central directory / tar headers / 7z and rar headers one by
    one and listing stops at `max_members` (a 100,000-member zip is never parsed whole);
  - a member is decompressed only when its first bytes show it is itself an archive, and then
    in chunks that count against `max_expanded_bytes` (a 1 GB zero-filled member ends at the
    limit; its declared size usually stops it before any byte is inflated);
  - nesting stops at `max_depth` archives; all of it stops at `time_budget` seconds.
Formats: zip (stored, deflate, bzip2), tar, gzip, bzip2, xz, 7z (py7zr), rar (rarfile: names
always; contents only of stored members or with an unrar/unar/bsdtar tool installed).
py7zr and rarfile are the optional extra `filterd[archives]`; without them such archives are
reported as not inspectable, never skipped silently.

Reads: no settings; the limits come from the banned check's arguments (rules/banned.toml).
Emits: no symbols itself; filterd.checks.banned turns an Inspection into BANNED_*/ARCHIVE_*.
"""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

_ZLIB_DECOMPRESS = type(zlib.decompressobj())
HEAD_BYTES = 8192           # enough for type sniffing (filetype reads at most 8 KB)
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    max_depth: int = 8                          # archives inside archives
    max_members: int = 5000                     # members listed over all levels
    max_expanded_bytes: int = 256 * 1024 * 1024  # declared + actually inflated bytes, all levels
    max_member_read: int = 32 * 1024 * 1024     # largest nested archive held in memory
    time_budget: float = 5.0                    # seconds for one attachment


@dataclass(frozen=True, slots=True)
class Member:
    """A file found inside an archive."""

    path: str            # "outer.zip/dir/inner.exe": where it is, for the symbol options
    name: str            # the member's own name ("dir/inner.exe")
    size: int            # declared uncompressed size, -1 when unknown
    head: bytes          # its first bytes when they were read (for sniffing), else b""
    depth: int           # 1 = directly inside the attachment


@dataclass(frozen=True, slots=True)
class Problem:
    """Why (part of) an archive could not be inspected, or what about it is suspicious."""

    kind: str            # encrypted, too_deep, too_many_members, too_large, unreadable, timeout
    path: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Inspection:
    kind: str | None                     # the outer archive format, None if not an archive
    members: tuple[Member, ...] = ()
    problems: tuple[Problem, ...] = ()
    expanded_bytes: int = 0


_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"PK\x03\x04", "zip"),
    (0, b"PK\x05\x06", "zip"),          # empty zip
    (0, b"\x1f\x8b", "gzip"),
    (0, b"BZh", "bzip2"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"7z\xbc\xaf\x27\x1c", "7z"),
    (0, b"Rar!\x1a\x07", "rar"),
    (257, b"ustar", "tar"),
)


def archive_kind(head: bytes) -> str | None:
    """The archive format of some bytes by their magic number, or None."""
    for offset, magic, kind in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return kind
    return None


class _Stop(Exception):
    """Inspection ends here (member count or time exhausted); what was found stays."""


@dataclass
class _Walk:
    limits: Limits
    deadline: float
    members: list[Member] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    expanded: int = 0
    too_large: bool = False

    # --- bookkeeping -----------------------------------------------------------------------
    def problem(self, kind: str, path: str, detail: str = "") -> None:
        if not any(p.kind == kind and p.path == path for p in self.problems):
            self.problems.append(Problem(kind, path, detail))

    def tick(self, path: str) -> None:
        if time.monotonic() > self.deadline:
            self.problem("timeout", path, f"{self.limits.time_budget:g}s")
            raise _Stop

    def count_member(self, path: str) -> None:
        if len(self.members) >= self.limits.max_members:
            self.problem("too_many_members", path, f"more than {self.limits.max_members}")
            raise _Stop

    def add_expanded(self, n: int, path: str) -> bool:
        """Count n more expanded bytes; False once the budget is spent."""
        if n > 0:
            self.expanded += n
        if self.expanded > self.limits.max_expanded_bytes:
            if not self.too_large:
                self.too_large = True
                self.problem("too_large", path,
                             f"expands to more than {self.limits.max_expanded_bytes} bytes")
            return False
        return True

    def budget(self) -> int:
        return max(0, min(self.limits.max_member_read,
                          self.limits.max_expanded_bytes - self.expanded))

    # --- walking ---------------------------------------------------------------------------
    def walk(self, path: str, data: bytes, level: int, *, partial: bool = False) -> None:
        """Look inside `data` (found at `path`, inside `level` archives) if it is an archive."""
        kind = archive_kind(data[:HEAD_BYTES])
        if kind is None:
            return
        if level >= self.limits.max_depth:
            self.problem("too_deep", path, f"more than {self.limits.max_depth} levels")
            return
        self.tick(path)
        handler: Callable[[str, bytes, int], None] = getattr(self, f"_{kind}")
        found_before = len(self.members)
        try:
            handler(path, data, level)
        except _Stop:
            raise
        except Exception as exc:
            # a member cut at max_member_read is incomplete: not finding its end is expected
            if not (partial and len(self.members) > found_before):
                self.problem("unreadable", path, f"{kind}: {type(exc).__name__}")

    def member(self, parent: str, name: str, size: int, level: int,
               read: Callable[[int], bytes] | None) -> None:
        """Record one member; read its head, and look inside it if it is an archive."""
        self.tick(parent)
        self.count_member(parent)
        path = f"{parent}/{name}"
        if size > 0:
            self.add_expanded(size, path)
        head = b""
        if read is not None and not self.too_large:
            try:
                head = read(HEAD_BYTES)
            except Exception as exc:
                self.problem("unreadable", path, f"{type(exc).__name__}")
                read = None
        self.members.append(Member(path, name, size, head, level + 1))
        if read is None or archive_kind(head) is None or self.too_large:
            return
        if level + 1 >= self.limits.max_depth:
            self.problem("too_deep", path, f"more than {self.limits.max_depth} levels")
            return
        # a nested archive: inflate it (counting every byte) and look inside
        cap = self.budget()
        try:
            data = read(cap + 1)
        except Exception as exc:
            self.problem("unreadable", path, f"{type(exc).__name__}")
            return
        # count what was inflated beyond the declared size (unknown or lying headers)
        self.add_expanded(len(data) - max(size, 0), path)
        partial = len(data) > cap
        self.walk(path, data[:cap], level + 1, partial=partial)

    # --- formats ---------------------------------------------------------------------------
    def _zip(self, path: str, data: bytes, level: int) -> None:
        for entry in _zip_entries(data):
            if entry.is_dir:
                continue
            if entry.encrypted:
                self.problem("encrypted", path, "password-protected zip")
                self.member(path, entry.name, entry.size, level, None)
                continue
            reader = None
            if entry.method in (0, 8, 12):
                reader = _zip_reader(data, entry)
            elif not self.too_large:
                self.problem("unreadable", f"{path}/{entry.name}",
                             f"zip compression method {entry.method}")
            self.member(path, entry.name, entry.size, level, reader)

    def _tar(self, path: str, data: bytes, level: int) -> None:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            while True:
                self.tick(path)
                info = tar.next()
                if info is None:
                    break
                # tarfile keeps every member it has read: forget them, we keep our own list
                tar.members.clear()
                if not info.isfile():
                    continue
                reader = _file_reader(tar.extractfile(info))
                self.member(path, info.name, info.size, level, reader)

    def _stream(self, path: str, data: bytes, level: int, decompressor: object,
                inner_name: str) -> None:
        """A single compressed stream (gzip, bzip2, xz): one member, inflated with caps."""
        self.count_member(path)
        cap = self.budget()
        kept = bytearray()
        total = 0
        # inflate in bounded chunks: each call returns at most _CHUNK bytes of output
        pending = data
        while True:
            self.tick(path)
            out = _decompress_some(decompressor, pending, _CHUNK)
            pending = b""
            if not out:
                break
            total += len(out)
            if len(kept) <= cap:
                kept.extend(out[:cap + 1 - len(kept)])
            if not self.add_expanded(len(out), f"{path}/{inner_name}"):
                break
        member_path = f"{path}/{inner_name}"
        self.members.append(Member(member_path, inner_name, total, bytes(kept[:HEAD_BYTES]),
                                   level + 1))
        if archive_kind(bytes(kept[:HEAD_BYTES])) is None or self.too_large:
            return
        partial = len(kept) > cap
        self.walk(member_path, bytes(kept[:cap]), level + 1, partial=partial)

    def _gzip(self, path: str, data: bytes, level: int) -> None:
        name = _gzip_name(data) or _inner_name(path.rsplit("/", 1)[-1], (".gz", ".tgz", ".gzip"))
        self._stream(path, data, level, zlib.decompressobj(16 + zlib.MAX_WBITS), name)

    def _bzip2(self, path: str, data: bytes, level: int) -> None:
        name = _inner_name(path.rsplit("/", 1)[-1], (".bz2", ".tbz2", ".tbz"))
        self._stream(path, data, level, bz2.BZ2Decompressor(), name)

    def _xz(self, path: str, data: bytes, level: int) -> None:
        name = _inner_name(path.rsplit("/", 1)[-1], (".xz", ".txz"))
        self._stream(path, data, level, lzma.LZMADecompressor(), name)

    def _7z(self, path: str, data: bytes, level: int) -> None:
        try:
            import py7zr
        except ImportError:
            self.problem("unreadable", path, "7z: py7zr not installed")
            return
        try:
            archive = py7zr.SevenZipFile(io.BytesIO(data), mode="r")
        except py7zr.PasswordRequired:
            self.problem("encrypted", path, "password-protected 7z (encrypted names)")
            return
        with archive:
            encrypted = archive.needs_password()
            if encrypted:
                self.problem("encrypted", path, "password-protected 7z")
            files = [f for f in archive.list() if not f.is_directory]
            declared = sum(max(int(f.uncompressed or 0), 0) for f in files)
            contents: dict[str, bytes] = {}
            # 7z members inflate in solid blocks: read them only when the declared total fits
            # in the budget (py7zr stops at the declared sizes), each kept up to the read cap
            if (not encrypted and files and declared <= self.budget()
                    and len(self.members) + len(files) <= self.limits.max_members):
                from py7zr.io import BytesIOFactory
                factory = BytesIOFactory(self.budget() + 1)
                archive.extractall(factory=factory)
                for name, product in factory.products.items():
                    product.seek(0)
                    contents[name] = product.read()
            for f in files:
                body = contents.get(f.filename)
                reader = _bytes_reader(body) if body is not None else None
                self.member(path, f.filename, int(f.uncompressed or -1), level, reader)

    def _rar(self, path: str, data: bytes, level: int) -> None:
        try:
            import rarfile
        except ImportError:
            self.problem("unreadable", path, "rar: rarfile not installed")
            return
        try:
            archive = rarfile.RarFile(io.BytesIO(data))
        except (rarfile.PasswordRequired, rarfile.RarWrongPassword):
            self.problem("encrypted", path, "password-protected rar (encrypted names)")
            return
        with archive:
            if archive.needs_password():
                self.problem("encrypted", path, "password-protected rar")
            infos = archive.infolist()
            if not infos:
                # rarfile stops quietly at headers it cannot parse
                self.problem("unreadable", path, "rar: no readable members")
            for info in infos:
                if info.is_dir():
                    continue
                reader = None
                if not info.needs_password():
                    reader = _rar_reader(archive, info, lambda: self.problem(
                        "unreadable", path, "rar: compressed members need unrar, unar or bsdtar"))
                self.member(path, info.filename, int(info.file_size or -1), level, reader)


def inspect(name: str, data: bytes, limits: Limits = Limits(), *,
            deadline: float | None = None) -> Inspection:
    """Everything found inside one attachment (nothing when it is not an archive).

    `deadline` (time.monotonic()) lets several attachments share one time budget.
    """
    kind = archive_kind(data[:HEAD_BYTES])
    if kind is None:
        return Inspection(None)
    walk = _Walk(limits, deadline if deadline is not None
                 else time.monotonic() + limits.time_budget)
    try:
        walk.walk(name, data, 0)
    except _Stop:
        pass
    except RecursionError:
        walk.problem("too_deep", name, "recursion")
    except MemoryError:
        walk.problem("too_large", name, "out of memory")
    return Inspection(kind, tuple(walk.members), tuple(walk.problems), walk.expanded)


# --- zip, by hand: the central directory one entry at a time ----------------------------------

@dataclass(frozen=True, slots=True)
class _ZipEntry:
    name: str
    method: int
    encrypted: bool
    compressed_size: int
    size: int
    header_offset: int
    is_dir: bool


_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_CD_ENTRY = b"PK\x01\x02"


def _zip_entries(data: bytes) -> Iterator[_ZipEntry]:
    """The entries of a zip's central directory, lazily; raises ValueError when there is none."""
    end = data.rfind(_EOCD, max(0, len(data) - 65536 - 22))
    if end < 0:
        raise ValueError("no end of central directory")
    (_, _, _, _, total, cd_size, cd_offset, _) = struct.unpack_from("<4s4H2LH", data, end)
    if cd_offset == 0xFFFFFFFF or total == 0xFFFF:
        loc = end - 20
        if loc >= 0 and data[loc:loc + 4] == _EOCD64_LOCATOR:
            (eocd64_at,) = struct.unpack_from("<Q", data, loc + 8)
            if data[eocd64_at:eocd64_at + 4] == b"PK\x06\x06":
                total, _, cd_size, cd_offset = struct.unpack_from("<QQQQ", data, eocd64_at + 24)
    # archives with a prefix (self-extractors) shift every offset: find the real start
    shift = max(0, end - cd_size - cd_offset) if data[cd_offset:cd_offset + 4] != _CD_ENTRY else 0
    pos = cd_offset + shift
    while pos + 46 <= len(data) and data[pos:pos + 4] == _CD_ENTRY:
        (flags, method) = struct.unpack_from("<HH", data, pos + 8)
        (csize, usize, name_len, extra_len, comment_len) = struct.unpack_from("<LLHHH", data,
                                                                              pos + 20)
        (offset,) = struct.unpack_from("<L", data, pos + 42)
        raw_name = data[pos + 46:pos + 46 + name_len]
        extra = data[pos + 46 + name_len:pos + 46 + name_len + extra_len]
        if 0xFFFFFFFF in (csize, usize, offset):
            usize, csize, offset = _zip64_sizes(extra, usize, csize, offset)
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        yield _ZipEntry(name, method, bool(flags & 1), csize, usize, offset + shift,
                        name.endswith("/"))
        pos += 46 + name_len + extra_len + comment_len


def _zip64_sizes(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    i = 0
    while i + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, i)
        if tag == 1:
            values = list(struct.unpack_from(f"<{size // 8}Q", extra, i + 4))
            if usize == 0xFFFFFFFF and values:
                usize = values.pop(0)
            if csize == 0xFFFFFFFF and values:
                csize = values.pop(0)
            if offset == 0xFFFFFFFF and values:
                offset = values.pop(0)
            break
        i += 4 + size
    return usize, csize, offset


def _zip_reader(data: bytes, entry: _ZipEntry) -> Callable[[int], bytes]:
    """read(n): the first n inflated bytes of one zip member, never inflating more than n."""

    def read(n: int) -> bytes:
        at = entry.header_offset
        if data[at:at + 4] != b"PK\x03\x04":
            raise ValueError("bad local header")
        name_len, extra_len = struct.unpack_from("<HH", data, at + 26)
        start = at + 30 + name_len + extra_len
        packed = memoryview(data)[start:start + entry.compressed_size]
        if entry.method == 0:
            return bytes(packed[:n])
        decompressor = (zlib.decompressobj(-15) if entry.method == 8
                        else bz2.BZ2Decompressor())
        out = bytearray()
        pending = bytes(packed)
        while len(out) < n:
            got = _decompress_some(decompressor, pending, min(_CHUNK, n - len(out)))
            pending = b""
            if not got:
                break
            out.extend(got)
        return bytes(out)

    return read


def _decompress_some(decompressor: object, data: bytes, max_length: int) -> bytes:
    """At most max_length bytes of output, feeding `data` (b"" to continue where it was)."""
    if isinstance(decompressor, _ZLIB_DECOMPRESS):
        if decompressor.eof:
            return b""
        return decompressor.decompress(data or decompressor.unconsumed_tail, max_length)
    if getattr(decompressor, "eof", False):
        return b""
    if not data and getattr(decompressor, "needs_input", False):
        return b""
    return decompressor.decompress(data, max_length)  # type: ignore[attr-defined]


def _file_reader(handle: io.BufferedReader | None) -> Callable[[int], bytes] | None:
    if handle is None:
        return None
    consumed = bytearray()

    def read(n: int) -> bytes:
        # the head is read first, then the whole member: keep what was read already
        if len(consumed) < n:
            consumed.extend(handle.read(n - len(consumed)))
        return bytes(consumed[:n])

    return read


def _bytes_reader(body: bytes) -> Callable[[int], bytes]:
    return lambda n: body[:n]


def _rar_reader(archive: object, info: object, no_tool: Callable[[], None]
                ) -> Callable[[int], bytes]:
    def read(n: int) -> bytes:
        import rarfile
        try:
            with archive.open(info) as handle:  # type: ignore[attr-defined]
                return handle.read(n)
        except rarfile.RarCannotExec:
            no_tool()
            return b""

    return read


def _gzip_name(data: bytes) -> str | None:
    """The original file name stored in a gzip header (FNAME), if any."""
    if len(data) < 10 or not data[3] & 0x08:
        return None
    pos = 10
    if data[3] & 0x04:  # FEXTRA
        if len(data) < 12:
            return None
        (xlen,) = struct.unpack_from("<H", data, 10)
        pos += 2 + xlen
    end = data.find(b"\0", pos, pos + 1024)
    if end < 0:
        return None
    return data[pos:end].decode("latin-1") or None


_INNER_NAMES = {".tgz": ".tar", ".tbz2": ".tar", ".tbz": ".tar", ".txz": ".tar",
                ".gz": "", ".gzip": "", ".bz2": "", ".xz": ""}


def _inner_name(outer: str, suffixes: tuple[str, ...]) -> str:
    """The name a compressed stream stands for: report.tar.gz -> report.tar, x.tgz -> x.tar."""
    lower = outer.lower()
    for suffix in suffixes:
        if lower.endswith(suffix):
            return outer[: -len(suffix)] + _INNER_NAMES[suffix]
    return outer + ".inner"
