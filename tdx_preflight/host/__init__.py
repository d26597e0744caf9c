"""The host layer: every read of the host, relative to one root directory, bounded and typed.

Nothing else in the package opens a path. A read returns its value or a
`Problem` that says why it could not: the file is absent, permission was
denied, an I/O error occurred, or the content is malformed. Callers tell
"not there" from "could not read" by `Problem.kind`.

Reads never block (files are opened O_NONBLOCK and must be regular files or,
for the few device readers, character devices), never write, and never leave
the root: for a root other than `/` every open goes through openat2 with
RESOLVE_IN_ROOT, so an absolute or `..` symlink in a snapshot resolves inside
the snapshot, and magic links (`/proc/PID/root`) are refused.

Modules: `problem` (Problem and its kinds), `limits` (read caps), `openat2`
(the RESOLVE_IN_ROOT wrapper), `kallsyms` (the symbol scan), `root` (Host).
The names below are imported from here.
"""

from __future__ import annotations

from .kallsyms import KALLSYMS_MAX
from .limits import CHUNK, LARGE, SMALL
from .problem import Problem, ProblemKind, kind_name, problem_from_oserror
from .root import Host, parse_uint

__all__ = [
    "CHUNK",
    "KALLSYMS_MAX",
    "LARGE",
    "SMALL",
    "Host",
    "Problem",
    "ProblemKind",
    "kind_name",
    "parse_uint",
    "problem_from_oserror",
]
