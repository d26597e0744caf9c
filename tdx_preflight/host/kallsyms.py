"""The kallsyms symbol scan: which names stand as whole symbols, in constant memory."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from .limits import CHUNK
from .problem import Problem, problem_from_oserror

#: kallsyms is 5 to 20 MB on real kernels; a regular file over this is not one
#: (DESIGN.md "Reading"), and reading it to its end would only cost time.
KALLSYMS_MAX = 256 * 1024 * 1024


def scan_symbols(fd: int, size: int, path: str, names: Iterable[str]) -> set[str] | Problem:
    """Which of `names` appear as whole symbols in the kallsyms-format file open on `fd`.

    `size` is the file's st_size (0 for /proc/kallsyms) and `path` names it in a
    Problem. The file is read to its end in constant memory: a cut read could
    miss a symbol and turn into a false "absent". Over KALLSYMS_MAX bytes it is
    malformed (refused from `size` when that says so), and so is an empty file;
    a read error is the Problem of its errno. A name matches only between the
    type letter and the end of the line or the tab before `[module]`
    (kernel/kallsyms.c s_show). The caller keeps and closes `fd`.
    """
    wanted = {n.encode() for n in names}
    # Search each name that no other wanted name starts: one scan finds both.
    needles = [n for n in wanted if not any(o != n and n.startswith(o) for o in wanted)]
    overlap = max((len(n) for n in wanted), default=0) + 64  # the line's head too
    found: set[str] = set()
    if size > KALLSYMS_MAX:
        return Problem("malformed", path, f"larger than {KALLSYMS_MAX >> 20} MiB")
    try:
        # One reused buffer: the last `overlap` bytes of a chunk are carried to the
        # front of the next, so a name across a chunk boundary is still whole.
        buf = bytearray(overlap + CHUNK)
        view = memoryview(buf)
        buf[0] = 0x0A
        keep = 1
        total = 0
        eof = False
        while not eof:
            # Fill the chunk before searching it: /proc/kallsyms is a seq_file, which gives
            # at most a page per read (fs/seq_file.c seq_read_iter); a search after each
            # of the 1,300 reads of a 5 MiB kallsyms made the scan about 5% slower.
            end = keep
            while end < keep + CHUNK:
                n = os.readv(fd, [view[end : keep + CHUNK]])
                if not n:
                    eof = True
                    break
                end += n
                total += n
                if total > KALLSYMS_MAX:  # /proc/kallsyms reports size 0: count as we go
                    return Problem("malformed", path, f"larger than {KALLSYMS_MAX >> 20} MiB")
            if end == keep:
                break
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
