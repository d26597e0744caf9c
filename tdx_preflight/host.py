"""Host: every read of the host, relative to one root directory, bounded and typed.

Nothing else in the package opens a path. A read returns its value or a
`Problem` that says why it could not: the file is absent, permission was
denied, an I/O error occurred, or the content is malformed. Callers tell
"not there" from "could not read" by `Problem.kind`.

Reads never block (files are opened O_NONBLOCK and must be regular files or,
for the few device readers, character devices), never write, and never leave
the root: for a root other than `/` every open goes through openat2 with
RESOLVE_IN_ROOT, so an absolute or `..` symlink in a snapshot resolves inside
the snapshot, and magic links (`/proc/PID/root`) are refused.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple

#: "partial": the source exists but sees only part of the host (a foreign namespace,
#: a child cgroup): never read as a count of zero (DESIGN.md "The host view").
ProblemKind = Literal["absent", "permission", "io", "malformed", "partial"]

#: Default cap for a file that should be small (sysfs values, proc files).
SMALL = 64 * 1024
#: Cap for files that grow with the machine (cpuinfo of 2,048 CPUs is about 5.5 MB).
LARGE = 8 * 1024 * 1024
#: kallsyms is 5 to 20 MB on real kernels; a regular file over this is not one
#: (DESIGN.md "Reading"), and reading it to its end would only cost time.
KALLSYMS_MAX = 256 * 1024 * 1024
#: Read size for streamed files.
CHUNK = 1 << 20


class Problem(NamedTuple):
    """Why a read gave no value."""

    kind: ProblemKind
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}"

    def to_json(self) -> dict[str, str]:
        return {"error": self.kind, "path": self.path, "detail": self.detail}


def problem_from_oserror(path: str, exc: OSError) -> Problem:
    """Map an OSError to a typed Problem."""
    code = exc.errno
    if code in (errno.ENOENT, errno.ENOTDIR, errno.ENODEV, errno.ENXIO):
        return Problem("absent", path, "does not exist")
    if code in (errno.EACCES, errno.EPERM):
        return Problem("permission", path, "permission denied")
    if code == errno.ELOOP:
        return Problem("io", path, "symlink loop or link out of the host root")
    if code == errno.EXDEV:
        return Problem("io", path, "path leaves the host root")
    if code in (errno.EAGAIN, errno.EWOULDBLOCK):
        return Problem("io", path, "would block (device or pipe did not answer)")
    if code == errno.EISDIR:
        return Problem("io", path, "is a directory")
    return Problem("io", path, os.strerror(code) if code else str(exc))


_KIND_NAMES = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def kind_name(mode: int) -> str:
    """What a file type is, as a person says it: "a FIFO", "a character device"."""
    return _KIND_NAMES.get(stat.S_IFMT(mode), "not a regular file")


class _Openat2:
    """openat2(2) with RESOLVE_IN_ROOT, loaded only for roots other than `/`."""

    RESOLVE_NO_MAGICLINKS = 0x02
    RESOLVE_IN_ROOT = 0x10
    SYS_openat2 = 437  # x86_64 and aarch64 share the number
    RETRIES = 64  # EAGAIN retries: a walk through `..` raced with a rename or mount

    def __init__(self) -> None:
        import ctypes

        class OpenHow(ctypes.Structure):
            _fields_ = [
                ("flags", ctypes.c_uint64),
                ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64),
            ]

        self._ctypes = ctypes
        self._how_type = OpenHow
        self._size = ctypes.sizeof(OpenHow)
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._hows: dict[int, object] = {}

    def open(self, dirfd: int, rel: bytes, flags: int) -> int:
        how = self._hows.get(flags)
        if how is None:
            how = self._how_type(flags, 0, self.RESOLVE_IN_ROOT | self.RESOLVE_NO_MAGICLINKS)
            self._hows[flags] = how
        # EAGAIN: a rename or mount anywhere on the system raced with a `..` step (a
        # symlink such as sys/class/firmware/tdx_module -> ../../devices/...) and the
        # kernel could not vouch for the walk: openat2(2) says to retry, so a busy
        # machine never turns a readable file into an unreadable one.
        for _ in range(self.RETRIES):
            fd = self._syscall(self.SYS_openat2, dirfd, rel, self._ctypes.byref(how), self._size)
            if fd >= 0:
                return fd
            err = self._ctypes.get_errno()
            if err != errno.EAGAIN:
                break
        raise OSError(err, os.strerror(err))


class Host:
    """Reads under one root directory; the live host when root is `/`.

    `unreadable` maps root-relative paths to the (kind, detail) of a read that failed
    where the tree was captured (a snapshot's manifest): every read of such a path
    gives that Problem again, so what could not be read stays unreadable on replay.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        unreadable: Mapping[str, tuple[ProblemKind, str]] | None = None,
        source: str | None = None,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        #: What a person named as the root: the snapshot archive a replay extracted
        #: into `root`, else `root` itself. Reports show it; reads use `root`.
        self.source = os.path.abspath(source) if source else self.root
        self.unreadable = dict(unreadable or {})
        self.live = self.root == "/"
        self._prefix = "/" if self.live else self.root.rstrip("/") + "/"
        self._rootfd: int | None = None
        self._openat2: _Openat2 | None = None
        self._safe_fallback = False
        self._msr_fds: dict[int, int | Problem] = {}
        self._msr_files: set[int] = set()

    # -- paths -----------------------------------------------------------------

    def display(self, rel: str) -> str:
        """The path as a person reads it: absolute on the live host, root-joined otherwise."""
        return self._prefix + rel

    def _captured(self, rel: str) -> Problem | None:
        """The Problem a read of `rel` gave at capture, when it is one of `unreadable`."""
        got = self.unreadable.get(rel) if self.unreadable else None
        if got is None:
            return None
        return Problem(got[0], self.display(rel), f"{got[1]} (unreadable at capture)")

    def _open(self, rel: str, flags: int) -> int:
        # openat2 rejects flags that O_PATH does not take, O_NOCTTY among them.
        flags |= os.O_CLOEXEC if flags & os.O_PATH else os.O_CLOEXEC | os.O_NOCTTY
        if self.live:
            return os.open("/" + rel, flags)
        if self._rootfd is None:
            self._rootfd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._openat2 = _Openat2()
            except (OSError, AttributeError):
                self._safe_fallback = True
        if self._openat2 is not None and not self._safe_fallback:
            try:
                return self._openat2.open(self._rootfd, os.fsencode(rel), flags)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
                self._safe_fallback = True
        # Kernels before 5.6: resolve in Python and refuse anything that leaves the root.
        full = os.path.join(self.root, rel)
        real = os.path.realpath(full)
        if real != self.root and not real.startswith(self.root.rstrip("/") + "/"):
            raise OSError(errno.EXDEV, "path leaves the host root")
        return os.open(real, flags | os.O_NOFOLLOW)

    def _open_read(
        self, rel: str, expected: str, chr_ok: bool = False
    ) -> tuple[int, os.stat_result] | Problem:
        """(fd, stat) of a regular file (or, on the live root, a character device when
        `chr_ok`)."""
        if captured := self._captured(rel):
            return captured
        try:
            fd = self._open(rel, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            return problem_from_oserror(self.display(rel), exc)
        st = os.fstat(fd)
        mode = st.st_mode
        # A device is read only on the live root: under any other root a device
        # node would read this machine's kernel, not the tree's (DESIGN.md "Reading").
        if stat.S_ISREG(mode) or (chr_ok and self.live and stat.S_ISCHR(mode)):
            return fd, st
        os.close(fd)
        return Problem("io", self.display(rel), f"is {kind_name(mode)}, expected {expected}")

    # -- plain reads -------------------------------------------------------------

    def read_bytes(self, rel: str, limit: int = SMALL) -> bytes | Problem:
        """The whole file, or a Problem. A file larger than `limit` is malformed.

        A regular file whose size already says so is refused unread (a 1 GiB
        sparse file costs nothing); proc and sys files report no real size and
        are read, at most `limit` + 1 bytes.
        """
        data = self._read(rel, limit + 1, refuse_over=limit)
        if isinstance(data, bytes) and len(data) > limit:
            return Problem("malformed", self.display(rel), f"larger than {limit} bytes")
        return data

    def read_head(self, rel: str, size: int) -> bytes | Problem:
        """The first `size` bytes of a file (all of it when shorter): for large files
        whose format puts what matters at the start (a kernel image's header)."""
        return self._read(rel, size, refuse_over=None)

    def _read(self, rel: str, size: int, refuse_over: int | None) -> bytes | Problem:
        opened = self._open_read(rel, "a file")
        if isinstance(opened, Problem):
            return opened
        fd, st = opened
        try:
            # sysfs reports 4096 for every attribute: only a larger size is a real one.
            if refuse_over is not None and st.st_size > max(refuse_over, 4096):
                return Problem("malformed", self.display(rel), f"larger than {refuse_over} bytes")
            chunks: list[bytes] = []
            total = 0
            while total < size:
                data = os.read(fd, min(CHUNK, size - total))
                if not data:
                    break
                chunks.append(data)
                total += len(data)
            return b"".join(chunks)
        except OSError as exc:
            return problem_from_oserror(self.display(rel), exc)
        finally:
            os.close(fd)

    def read_text(self, rel: str, limit: int = SMALL) -> str | Problem:
        """The file decoded as UTF-8; bytes that do not decode make it malformed."""
        data = self.read_bytes(rel, limit)
        if isinstance(data, Problem):
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Problem("malformed", self.display(rel), f"not UTF-8 at byte {exc.start}")

    def read_value(self, rel: str) -> str | Problem:
        """A one-value sysfs/procfs file, stripped; an empty file is malformed."""
        text = self.read_text(rel, 4096)
        if isinstance(text, Problem):
            return text
        value = text.strip()
        if not value:
            return Problem("malformed", self.display(rel), "empty")
        return value

    def read_int(self, rel: str) -> int | Problem:
        """A sysfs file holding one decimal integer."""
        value = self.read_value(rel)
        if isinstance(value, Problem):
            return value
        number = parse_uint(value)
        if number is None:
            return Problem("malformed", self.display(rel), f"not a number: {value[:40]!r}")
        return number

    def exists(self, rel: str) -> bool:
        """True when the path exists under the root (a dangling symlink counts)."""
        try:
            fd = self._open(rel, os.O_PATH | os.O_NOFOLLOW)
        except OSError:
            return False
        os.close(fd)
        return True

    def is_dir(self, rel: str) -> bool:
        """True when the path is a directory under the root (a symlink is not followed)."""
        try:
            fd = self._open(rel, os.O_PATH | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            return stat.S_ISDIR(os.fstat(fd).st_mode)
        finally:
            os.close(fd)

    def listdir(self, rel: str) -> list[str] | Problem:
        """Names in a directory."""
        if captured := self._captured(rel):
            return captured
        path = self.display(rel)
        try:
            if self.live:
                return os.listdir("/" + rel)
            fd = self._open(rel, os.O_RDONLY | os.O_DIRECTORY)
            try:
                return os.listdir(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            return problem_from_oserror(path, exc)

    def readlink(self, rel: str) -> str | Problem:
        """The target of a symlink, never followed."""
        if captured := self._captured(rel):
            return captured
        path = self.display(rel)
        try:
            if self.live:
                return os.readlink("/" + rel)
            parent, _, name = rel.rpartition("/")
            fd = self._open(parent or ".", os.O_PATH | os.O_DIRECTORY)
            try:
                return os.readlink(name, dir_fd=fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return Problem("malformed", path, "not a symlink")
            return problem_from_oserror(path, exc)

    def readlinks(self, rel: str) -> dict[str, str | Problem] | Problem:
        """Every entry of directory `rel` with its symlink target, or the Problem of each
        entry that is not one ("malformed": not a symlink; "absent": gone since the
        listing). The directory is opened once: a /proc/PID/fd scan of a large host
        costs one open per process, not one per descriptor."""
        if self.live or self.unreadable:
            names = self.listdir(rel)
            return names if isinstance(names, Problem) else self._each_readlink(rel, names)
        try:
            fd = self._open(rel, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            return problem_from_oserror(self.display(rel), exc)
        out: dict[str, str | Problem] = {}
        try:
            try:
                names = os.listdir(fd)
            except OSError as exc:
                return problem_from_oserror(self.display(rel), exc)
            for name in names:
                try:
                    # A name inside the opened directory: nothing to resolve, nothing to leave.
                    out[name] = os.readlink(name, dir_fd=fd)
                except OSError as exc:
                    path = self.display(f"{rel}/{name}")
                    out[name] = (
                        Problem("malformed", path, "not a symlink")
                        if exc.errno == errno.EINVAL
                        else problem_from_oserror(path, exc)
                    )
        finally:
            os.close(fd)
        return out

    def _each_readlink(self, rel: str, names: list[str]) -> dict[str, str | Problem]:
        """readlinks by one readlink per entry (the live root; overlays; recording)."""
        return {name: self.readlink(f"{rel}/{name}") for name in names}

    # -- streamed and device reads ----------------------------------------------

    def find_symbols(self, rel: str, names: Iterable[str]) -> set[str] | Problem:
        """Which of `names` appear as whole symbols in a kallsyms-format file.

        The file is read to its end in constant memory: a cut read could miss a
        symbol and turn into a false "absent". Over KALLSYMS_MAX bytes it is
        malformed (refused from its size when it is a regular file that says so).
        A name matches only between the type letter and the end of the line or
        the tab before `[module]`.
        """
        path = self.display(rel)
        wanted = {n.encode() for n in names}
        # Search each name that no other wanted name starts: one scan finds both.
        needles = [n for n in wanted if not any(o != n and n.startswith(o) for o in wanted)]
        overlap = max((len(n) for n in wanted), default=0) + 64  # the line's head too
        found: set[str] = set()
        opened = self._open_read(rel, "a file")
        if isinstance(opened, Problem):
            return opened
        fd = opened[0]
        if opened[1].st_size > KALLSYMS_MAX:
            os.close(fd)
            return Problem("malformed", path, f"larger than {KALLSYMS_MAX >> 20} MiB")
        try:
            # One reused buffer: the last `overlap` bytes of a chunk are carried to the
            # front of the next, so a name across a chunk boundary is still whole.
            buf = bytearray(overlap + CHUNK)
            view = memoryview(buf)
            buf[0] = 0x0A
            keep = 1
            total = 0
            while True:
                n = os.readv(fd, [view[keep : keep + CHUNK]])
                if not n:
                    break
                total += n
                if total > KALLSYMS_MAX:  # /proc/kallsyms reports size 0: count as we go
                    return Problem("malformed", path, f"larger than {KALLSYMS_MAX >> 20} MiB")
                end = keep + n
                found.update(_symbols_in(buf, end, wanted, needles))
                keep = min(overlap, end)
                buf[:keep] = buf[end - keep : end]
            # The last line may lack its newline.
            found.update(_symbols_in(bytes(buf[:keep]) + b"\n", keep + 1, wanted, needles))
            view.release()
            if not total:
                return Problem("malformed", path, "empty")
            return found
        except OSError as exc:
            return problem_from_oserror(path, exc)
        finally:
            os.close(fd)

    def read_kmsg(self, rel: str = "dev/kmsg", limit: int = LARGE) -> list[bytes] | Problem:
        """Kernel log records, one `prio,seq,usec,flags;text` line each.

        Live (/dev/kmsg, a character device): one record per read, non-blocking
        until EAGAIN; EPIPE (a record overwritten while reading) is skipped. A
        fixture's regular file is read whole and split into lines.
        """
        path = self.display(rel)
        opened = self._open_read(rel, "the kmsg device or a file", chr_ok=True)
        if isinstance(opened, Problem):
            return opened
        fd, st = opened
        try:
            if stat.S_ISREG(st.st_mode):
                os.close(fd)
                fd = -1
                data = self.read_bytes(rel, limit)
                if isinstance(data, Problem):
                    return data
                return data.splitlines()
            records: list[bytes] = []
            total = 0
            while total <= limit:
                try:
                    rec = os.read(fd, 8192)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EPIPE:
                        continue
                    raise
                if not rec:
                    break
                records.append(rec.rstrip(b"\n"))
                total += len(rec)
            if total > limit:
                return Problem("malformed", path, f"larger than {limit} bytes")
            return records
        except OSError as exc:
            return problem_from_oserror(path, exc)
        finally:
            if fd >= 0:
                os.close(fd)

    def read_msr(self, cpu: int, index: int) -> int | Problem:
        """One MSR of one CPU: 8 bytes little-endian at offset `index`. Read-only.

        The device (or file) is opened once per CPU and kept until close(): a 256-CPU
        host reads four MSRs on each, 1,024 reads through 256 opens.
        """
        fd = self._msr_fds.get(cpu)
        if fd is None:
            fd = self._msr_fds[cpu] = self._open_msr(cpu)
        if isinstance(fd, Problem):
            return fd
        try:
            data = os.pread(fd, 8, index)
        except OSError as exc:
            path = f"{self.display(f'dev/cpu/{cpu}/msr')} @0x{index:x}"
            if exc.errno == errno.EIO:
                return Problem("io", path, "the CPU does not implement this MSR (EIO)")
            return problem_from_oserror(path, exc)
        if len(data) != 8:
            path = f"{self.display(f'dev/cpu/{cpu}/msr')} @0x{index:x}"
            return Problem("io", path, f"short read ({len(data)} of 8 bytes)")
        return int.from_bytes(data, "little")

    def msr_is_file(self, cpu: int) -> bool:
        """True when CPU's MSR source is a regular file (a fixture), not the device."""
        return cpu in self._msr_files

    def _open_msr(self, cpu: int) -> int | Problem:
        opened = self._open_read(f"dev/cpu/{cpu}/msr", "the msr device or a file", chr_ok=True)
        if isinstance(opened, Problem):
            return opened
        fd, st = opened
        if stat.S_ISREG(st.st_mode):
            self._msr_files.add(cpu)
        return fd

    def close(self) -> None:
        """Release the descriptors a Host keeps (MSR devices, the root)."""
        for fd in self._msr_fds.values():
            if isinstance(fd, int):
                os.close(fd)
        self._msr_fds.clear()
        if self._rootfd is not None:
            os.close(self._rootfd)
            self._rootfd = None

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_uint(text: str, max_digits: int = 20) -> int | None:
    """A non-negative decimal integer, or None (no sign, no spaces, bounded length)."""
    if text.isascii() and text.isdigit() and len(text) <= max_digits:
        return int(text)
    return None


#: What stands before a symbol name on a kallsyms line: the address (hex, up to 64
#: bits) and the type letter (kernel/kallsyms.c s_show: "%px %c %s").
_KALLSYMS_HEAD = re.compile(rb"[0-9a-fA-F]{1,16} [A-Za-z] ")


def _symbols_in(
    buf: bytes | bytearray, end: int, wanted: set[bytes], needles: list[bytes]
) -> set[str]:
    """The names of `wanted` that stand in `buf[:end]` as whole kallsyms symbol names.

    Lines are `ADDR T name\n` or `ADDR t name\t[module]`: a name starts after
    the hex address, one space, the type letter and one space, at the start of
    a line, and ends at a tab or a newline.
    """
    found: set[str] = set()
    for needle in needles:
        i = buf.find(needle, 0, end)
        while i >= 0:
            start = buf.rfind(b"\n", max(0, i - 24), i) + 1
            if start and _KALLSYMS_HEAD.fullmatch(buf, start, i):
                for name in wanted:
                    stop = i + len(name)
                    if stop < end and buf[stop] in (0x0A, 0x09) and buf.startswith(name, i):
                        found.add(name.decode())
            i = buf.find(needle, i + 1, end)
    return found
