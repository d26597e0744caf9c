"""Problem: why a read of the host gave no value, typed by kind.

A read returns its value or a `Problem`: the file is absent, permission was
denied, an I/O error occurred, the content is malformed, or the source sees
only part of the host. Callers tell "not there" from "could not read" by
`Problem.kind`.
"""

import errno
import os
import stat
from typing import Literal, NamedTuple

#: "partial": the source exists but sees only part of the host (a foreign namespace,
#: a child cgroup): never read as a count of zero (DESIGN.md "The host view").
ProblemKind = Literal["absent", "permission", "io", "malformed", "partial"]


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
