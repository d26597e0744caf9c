"""openat2(2) with RESOLVE_IN_ROOT through ctypes: how a root other than `/` is read.

An absolute or `..` symlink in a snapshot resolves inside the snapshot, and
magic links (`/proc/PID/root`) are refused (include/uapi/linux/openat2.h).
ctypes is imported when the first such root is opened, never at start-up.
"""

from __future__ import annotations

import errno
import os


class Openat2:
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
        """A descriptor for `rel` (bytes) resolved under `dirfd` as its root, opened
        with `flags`.

        Raises OSError with the kernel's errno (openat2(2)): ENOSYS before Linux
        5.6, EXDEV or ELOOP for a walk the resolve flags refuse, EAGAIN only when
        every one of RETRIES walks raced with a rename or mount.
        """
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
