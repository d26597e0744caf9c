"""Reading a snapshot back: the archive checked whole and extracted, and its manifest.

A .tar.gz given as `--root` is read whole or refused (every header, the gzip
trailer, member count and size bounded, all before anything is written), then
extracted into a temporary directory removed at exit and on SIGTERM, SIGHUP and
SIGINT. `captured_unreadable` reads a tree's manifest for the Host that replays
it, so what was unreadable at capture stays unreadable.
"""

from __future__ import annotations

import atexit
import gzip
import json
import os
import shutil
import signal
import tarfile
import tempfile
import threading
import zlib
from typing import Any

from ..host import CHUNK, LARGE, Host, Problem, ProblemKind

MANIFEST = "SNAPSHOT.json"
#: Extraction limits: far above any snapshot this tool writes (a few thousand members, a few
#: MiB: every file it reads is capped), low enough that a bomb is refused in seconds.
MAX_MEMBERS = 50_000
MAX_BYTES = 256 << 20
#: The decompressed tar stream: the members' data plus a header (and a PAX header) each.
_STREAM_LIMIT = MAX_BYTES + MAX_MEMBERS * 4 * tarfile.BLOCKSIZE + (1 << 20)


class SnapshotError(Exception):
    """A usage error: the output cannot be written, or an archive cannot be used."""


def overlay(reads: list[dict[str, str]]) -> dict[str, tuple[ProblemKind, str]]:
    return {u["path"]: (u["kind"], u["detail"]) for u in reads}  # type: ignore[misc]


def captured_unreadable(root: str) -> dict[str, tuple[ProblemKind, str]]:
    """The reads a snapshot tree at `root` records as unreadable at capture ({} when
    `root` holds no snapshot). A manifest that does not parse is a SnapshotError."""
    if os.path.abspath(root) == "/":
        return {}  # the live host: nothing was captured
    with Host(root) as host:
        data = host.read_bytes(MANIFEST, LARGE)
    if isinstance(data, Problem):
        if data.kind == "absent":
            return {}
        raise SnapshotError(f"cannot read the snapshot manifest: {data}")
    try:
        reads = json.loads(data).get("unreadable", [])
        captured = overlay(reads)
        if not all(k in ("permission", "io", "malformed") for k, _ in captured.values()):
            raise ValueError("unknown kind")
        if not all(isinstance(p, str) and isinstance(d, str) for p, (_, d) in captured.items()):
            raise ValueError("not a path")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SnapshotError(f"{MANIFEST} under {root}: bad 'unreadable' list ({exc})") from None
    return captured


#: Python before 3.11.4 has no extraction filters (Debian 12 ships 3.11.2).
_FILTERS = hasattr(tarfile, "data_filter")


class UnsafeMember(getattr(tarfile, "FilterError", tarfile.TarError)):  # type: ignore[misc]
    """An archive member a snapshot never holds."""

    def __init__(self, member: tarfile.TarInfo, why: str) -> None:
        super().__init__(f"member {member.name!r}: {why}")
        self.tarinfo = member


class _Budget:
    """Checks every member; stricter than filter="data", and enough without it."""

    def __init__(self) -> None:
        self.members = 0
        self.bytes = 0
        self.names: set[str] = set()
        self.symlinks: set[str] = set()
        #: Every proper prefix of a member's name: directories some member lies below.
        self.parents: set[str] = set()

    def check(self, member: tarfile.TarInfo) -> None:
        # filter="data" strips a leading "/" and allows ".." that stays inside; a tree this
        # tool wrote has neither. Names and link targets without ".." or a leading "/" can
        # only descend from their directory, so no chain of them leaves the tree.
        parts = member.name.split("/")
        if member.name.startswith("/") or ".." in parts:
            raise UnsafeMember(member, "an absolute path or one with '..'")
        if member.isdir() and parts[-1:] == [""]:
            parts = parts[:-1]
        # One spelling per path: `./a`, `a//b` or `a/./b` would name a member twice.
        if not parts or any(p in ("", ".") for p in parts):
            raise UnsafeMember(member, "not a plain relative path")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(p in self.symlinks for p in prefixes):
            raise UnsafeMember(member, "below a symlink (it would name another member's path)")
        if member.issym() and "/".join(parts) in self.parents:
            raise UnsafeMember(member, "a symlink where other members are a directory")
        if not (member.isreg() or member.isdir() or member.issym()):
            raise UnsafeMember(member, "not a regular file, directory or symlink")
        if member.issym():
            target = member.linkname
            if target.startswith("/") or ".." in target.split("/"):
                raise UnsafeMember(member, f"a symlink to {target!r}, out of the tree")
        name = "/".join(parts)
        if name in self.names:
            raise UnsafeMember(member, "given twice (a later member would replace the first)")
        self.names.add(name)
        self.parents.update(prefixes)
        if member.issym():
            self.symlinks.add(name)
        self.members += 1
        self.bytes += member.size
        if self.members > MAX_MEMBERS or self.bytes > MAX_BYTES:
            raise UnsafeMember(member, "the archive is larger than any snapshot")


class _Bounded:
    """A decompressed stream that refuses to go past `limit` bytes (a gzip bomb)."""

    def __init__(self, f: Any, limit: int) -> None:
        self.f = f
        self.limit = limit

    def read(self, size: int = -1) -> bytes:
        # tarfile reads headers by the block and data in small pieces; only a PAX or long
        # name header asks for its whole declared size at once: far smaller in a snapshot.
        if not 0 <= size <= CHUNK:
            raise tarfile.ReadError("a header larger than any snapshot's")
        if self.f.tell() + size > self.limit:
            raise tarfile.ReadError("the archive is larger than any snapshot")
        return self.f.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET and offset > self.limit:
            raise tarfile.ReadError("the archive is larger than any snapshot")
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()


def _members(tar: tarfile.TarFile, stream: _Bounded) -> list[tarfile.TarInfo]:
    """Every member's header, checked, and the archive read to its end.

    tarfile ends an archive silently at a header that does not parse: only zero
    blocks may follow the last member. Reading the gzip stream to its end is what
    makes the gzip module verify the CRC and the length in its trailer.
    """
    budget = _Budget()
    members: list[tarfile.TarInfo] = []
    for member in tar:
        budget.check(member)
        members.append(member)
    stream.seek(tar.offset)
    tail = 0
    while chunk := stream.read(min(CHUNK, stream.limit - stream.tell())):
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(f"a header at byte {tar.offset} that does not parse")
        tail += len(chunk)
    if stream.f.read(1):
        raise tarfile.ReadError("the archive is larger than any snapshot")
    if tail < 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError("the archive is cut short (no end-of-archive blocks)")
    return members


_EXTRACTED: list[str] = []
_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _remove_extracted() -> None:
    while _EXTRACTED:
        shutil.rmtree(_EXTRACTED.pop(), ignore_errors=True)


def _on_signal(signum: int, frame: Any) -> None:
    """Remove the extracted trees, then die of the signal as if no handler were set."""
    _remove_extracted()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _guard_extractions() -> None:
    """From the first extraction to the process's end, every exit removes the trees."""
    if not _EXTRACTED and threading.current_thread() is threading.main_thread():
        for signum in _SIGNALS:
            if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(signum, _on_signal)
        atexit.register(_remove_extracted)


def remove_extractions() -> None:
    """Remove every tree `extract_snapshot` made, now (before an exec replaces us)."""
    _remove_extracted()


def extract_snapshot(archive: str) -> str:
    """Extract a snapshot into a new temporary directory removed at exit; return it.

    The archive is read whole or refused (DESIGN.md, "Snapshots"): a first pass
    checks every header, bounds the member count and total size, and reads the
    gzip stream to its end (CRC and length verified) before anything is written;
    the second pass extracts. SIGTERM, SIGHUP and SIGINT remove the tree too.
    """
    _guard_extractions()
    tmp = tempfile.mkdtemp(prefix="tdx-preflight-root-")
    _EXTRACTED.append(tmp)
    try:
        with gzip.open(archive, "rb") as gz:
            stream = _Bounded(gz, _STREAM_LIMIT)
            with tarfile.open(fileobj=stream, mode="r:", errorlevel=2) as tar:
                members = _members(tar, stream)
                if _FILTERS:
                    tar.extractall(tmp, members, filter="data")
                else:
                    for member in members:
                        tar.extract(member, tmp, set_attrs=False)  # no owners, modes, setuid
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        _EXTRACTED.remove(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SnapshotError(f"bad snapshot archive {archive}: {why}") from None
    return tmp
