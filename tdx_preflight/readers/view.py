"""The host view: does this process see the whole host (PID and cgroup namespaces)?

DESIGN.md "The host view": proc/self/ns/{pid,cgroup} under the root (on the
live root the tool's own; a snapshot records the capturing process's) are
compared with the init namespaces' inode numbers, which the kernel fixes at
build time (include/linux/proc_ns.h: PROC_PID_INIT_INO 0xEFFFFFFC,
PROC_CGROUP_INIT_INO 0xEFFFFFFB). An absent link is no evidence either way.
"""

import re
from typing import NamedTuple

from ..host import Host, Problem

INIT_NS = {"pid": 4026531836, "cgroup": 4026531835}
_LINK = re.compile(r"(pid|cgroup):\[(\d{1,20})\]")


class Namespace(NamedTuple):
    """One namespace of the reading process: "init", "foreign" or "unknown", and why."""

    state: str
    said: str

    @property
    def foreign(self) -> bool:
        return self.state == "foreign"


def read_namespace(host: Host, name: str) -> Namespace:
    """proc/self/ns/NAME (`pid:[INODE]`) against the init namespace's inode.

    Unreadable or absent: "unknown" (no evidence either way); a link that is not
    `NAME:[INODE]` is "unknown" too, saying so.
    """
    rel = f"proc/self/ns/{name}"
    link = host.readlink(rel)
    if isinstance(link, Problem):
        return Namespace("unknown", str(link))
    m = _LINK.fullmatch(link)
    if not m or m.group(1) != name:
        return Namespace("unknown", f"{host.display(rel)}: not a {name} namespace link: {link!r}")
    state = "init" if int(m.group(2)) == INIT_NS[name] else "foreign"
    return Namespace(state, link)
