"""The kernel release a bzImage carries in its setup header.

x86 boot protocol (Documentation/arch/x86/boot.rst): the setup header holds the
magic "HdrS" at offset 0x202 and, at 0x20E, `kernel_version`: a 16-bit pointer
to a NUL-terminated version string, minus 0x200. The string starts with the
release, e.g. `6.18.2-1-amd64 (debian-kernel@lists.debian.org) #1 SMP ...`.
"""

from __future__ import annotations

import re

from ..host import Host, Problem

HEADER_READ = 64 * 1024  # the version string lies in the setup sectors
_RELEASE = re.compile(r"[0-9][0-9A-Za-z.+_~-]{0,127}")


def parse_bzimage(data: bytes, path: str) -> str | Problem:
    """The release (first word of the kernel_version string), or why there is none."""
    if len(data) < 0x210 or data[0x202:0x206] != b"HdrS":
        return Problem("malformed", path, "not a bzImage (no HdrS setup header)")
    pointer = int.from_bytes(data[0x20E:0x210], "little")
    if pointer == 0:
        return Problem("malformed", path, "the setup header has no kernel_version")
    start = pointer + 0x200
    if start >= len(data):
        return Problem("malformed", path, "kernel_version points past the setup code")
    end = data.find(b"\0", start, start + 512)
    raw = data[start : end if end >= 0 else start + 512]
    text = raw.decode("ascii", errors="replace").split(" ", 1)[0]
    if not _RELEASE.fullmatch(text):
        return Problem(
            "malformed", path, f"kernel_version does not start with a release: {text[:40]!r}"
        )
    return text


def read_bzimage_release(host: Host, rel: str) -> str | Problem:
    """Read only the head of the image: bounded whatever the file's size."""
    data = host.read_head(rel, HEADER_READ)
    if isinstance(data, Problem):
        return data
    return parse_bzimage(data, host.display(rel))
