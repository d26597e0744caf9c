"""Host: every read of the host, relative to one root directory, bounded and typed.

Reads never block (files are opened O_NONBLOCK and must be regular files or,
for the few device readers, character devices), never write, and never leave
the root: for a root other than `/` every open goes through openat2 with
RESOLVE_IN_ROOT (`openat2.Openat2`).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Mapping

from .kallsyms import scan_symbols
from .limits import CHUNK, LARGE, SMALL
from .openat2 import Openat2
from .problem import Problem, ProblemKind, kind_name, problem_from_oserror


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
        self._openat2: Openat2 | None = None
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
                self._openat2 = Openat2()
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
        costs one open per process, not one per descriptor, and on the live root every
        link is read from the process the listing came from (a descriptor of a
        process that exits meanwhile is gone, never one of a process that took its
        number)."""
        if self.unreadable:
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
        """readlinks by one readlink per entry (a replay with captured problems; recording)."""
        return {name: self.readlink(f"{rel}/{name}") for name in names}

    # -- streamed and device reads ----------------------------------------------

    def find_symbols(self, rel: str, names: Iterable[str]) -> set[str] | Problem:
        """Which of `names` appear as whole symbols in a kallsyms-format file.

        The file is read to its end in constant memory: a cut read could miss a
        symbol and turn into a false "absent". Over KALLSYMS_MAX bytes it is
        malformed (refused from its size when it is a regular file that says so).
        A name matches only between the type letter and the end of the line or
        the tab before `[module]` (`kallsyms.scan_symbols`).
        """
        opened = self._open_read(rel, "a file")
        if isinstance(opened, Problem):
            return opened
        fd, st = opened
        try:
            return scan_symbols(fd, st.st_size, self.display(rel), names)
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
