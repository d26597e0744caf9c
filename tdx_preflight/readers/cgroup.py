"""The misc cgroup controller (cgroup v2, or v1's misc hierarchy): TDX KeyID capacity and use.

Which directory is the misc hierarchy's root, and whether what this process sees
there is the host's, is DESIGN.md "The host view" and "Reading".
"""

from typing import NamedTuple

from ..host import Host, Problem, parse_uint

CGROUP_ROOT = "sys/fs/cgroup"
#: cgroup v1 and hybrid hosts mount the misc hierarchy here.
V1_MISC_ROOT = "sys/fs/cgroup/misc"


def parse_misc(text: str, path: str) -> dict[str, int] | Problem:
    """`name value` lines (misc.capacity, misc.current) to {name: value}.

    The kernel prints each resource once (kernel/cgroup/misc.c): a name that
    appears twice, or any line that is not `name value` with a decimal value,
    makes the whole file malformed (never "the last one wins").
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            return Problem("malformed", path, f"expected 'name value', read {line[:60]!r}")
        number = parse_uint(parts[1])
        if number is None:
            return Problem("malformed", path, f"not a number in {line[:60]!r}")
        if parts[0] in values:
            return Problem("malformed", path, f"{parts[0]!r} appears twice")
        values[parts[0]] = number
    return values


def _read_misc(host: Host, rel: str) -> dict[str, int] | Problem:
    text = host.read_text(rel)
    if isinstance(text, Problem):
        return text
    return parse_misc(text, host.display(rel))


def misc_file(cgroup: str, name: str, base: str = CGROUP_ROOT) -> str:
    """Root-relative path of a misc file of a cgroup path such as `/machine.slice/x.scope`.

    `base` is the misc hierarchy's mount (MiscRoot.base): sys/fs/cgroup on v2,
    sys/fs/cgroup/misc on v1.
    """
    cgroup = cgroup.strip("/")
    return f"{base}/{cgroup}/{name}" if cgroup else f"{base}/{name}"


def read_misc(
    host: Host, name: str, cgroup: str = "/", base: str = CGROUP_ROOT
) -> dict[str, int] | Problem:
    """misc.capacity or misc.current of one cgroup (the root by default), parsed."""
    return _read_misc(host, misc_file(cgroup, name, base))


def tdx_count(misc: dict[str, int] | Problem, path: str) -> int | Problem:
    """The `tdx` line of a parsed misc file; a file without one cannot tell (kind absent)."""
    if isinstance(misc, Problem):
        return misc
    if "tdx" not in misc:
        return Problem("absent", path, "no 'tdx' resource (kernel without KVM TDX accounting)")
    return misc["tdx"]


class MiscRoot(NamedTuple):
    """The misc hierarchy's root as this process sees it (DESIGN.md "The host view").

    `layout` is "v2", "v1", "not the root" (a child cgroup, e.g. a container's
    /sys/fs/cgroup, or a foreign cgroup namespace) or "unavailable". `base` is
    the root-relative directory per-VM paths hang off (None when unavailable).
    Outside "v2"/"v1" both files are Problems saying why, never zero counts.
    """

    layout: str
    base: str | None
    capacity: dict[str, int] | Problem
    current: dict[str, int] | Problem

    @property
    def capacity_path(self) -> str:
        return misc_file("/", "misc.capacity", self.base or CGROUP_ROOT)

    @property
    def current_path(self) -> str:
        return misc_file("/", "misc.current", self.base or CGROUP_ROOT)

    def tdx_capacity(self, host: Host) -> int | Problem:
        """Root misc.capacity `tdx`: KeyIDs KVM TDX may hand out (kernel 6.16+)."""
        return tdx_count(self.capacity, host.display(self.capacity_path))

    def tdx_current(self, host: Host) -> int | Problem:
        """Root misc.current `tdx`: KeyIDs held by live (or leaked) TDs.

        No `tdx` line cannot tell (kind absent: a kernel that does not account
        TDs there, e.g. a vendor kernel before 6.16), and is malformed when
        misc.capacity lists tdx: the kernel prints the usage of every resource
        with a capacity (misc_cg_current_show, kernel/cgroup/misc.c).
        """
        count = tdx_count(self.current, host.display(self.current_path))
        cap = self.tdx_capacity(host)
        if isinstance(self.current, dict) and isinstance(count, Problem) and isinstance(cap, int):
            return Problem(
                "malformed",
                host.display(self.current_path),
                f"no 'tdx' line although misc.capacity lists tdx {cap}",
            )
        return count


def _misc_base(host: Host) -> tuple[str, str] | None:
    """(layout, directory) of the misc hierarchy's top as mounted under the root, or None."""
    for layout, base in (("v2", CGROUP_ROOT), ("v1", V1_MISC_ROOT)):
        if host.exists(f"{base}/misc.current") or host.exists(f"{base}/misc.capacity"):
            return layout, base
    return None


def read_misc_root(host: Host, cgroup_namespace: str) -> MiscRoot:
    """Find and read the misc hierarchy's root (v2 first, then v1's sys/fs/cgroup/misc).

    `cgroup_namespace` is "init", "foreign" or "unknown" (readers/view.py). A
    directory with misc.max is a child cgroup, not the root (the root has
    misc.capacity and no misc.max: CFTYPE_NOT_ON_ROOT in kernel/cgroup/misc.c).
    """
    found = _misc_base(host)
    if found is None:
        gone = Problem("absent", host.display(CGROUP_ROOT), "no misc cgroup (v2 root or v1 misc/)")
        return MiscRoot("unavailable", None, gone, gone)
    layout, base = found
    why = None
    if host.exists(f"{base}/misc.max"):
        why = "has misc.max: a child cgroup (a container's view), not the root"
    elif cgroup_namespace == "foreign":
        why = "a foreign cgroup namespace: its root is not the host's"
    if why is not None:
        partial = Problem("partial", host.display(base), f"misc counts are not the host's: {why}")
        return MiscRoot("not the root", base, partial, partial)
    capacity = read_misc(host, "misc.capacity", base=base)
    current = read_misc(host, "misc.current", base=base)
    return MiscRoot(layout, base, capacity, current)


def parse_proc_cgroup(text: str, layout: str = "v2") -> str | None:
    """A process's misc cgroup path from /proc/PID/cgroup, taken verbatim.

    v2: the `0::/PATH` line. v1 (and hybrid): the line whose controller list
    includes `misc`, e.g. `5:misc:/machine.slice/x.scope`. None when absent.
    """
    for line in text.splitlines():
        if layout == "v1":
            _, sep, rest = line.partition(":")
            controllers, sep2, path = rest.partition(":")
            if not (sep and sep2) or "misc" not in controllers.split(","):
                continue
        elif line.startswith("0::"):
            path = line[3:]
        else:
            continue
        return path if path.startswith("/") else None
    return None
