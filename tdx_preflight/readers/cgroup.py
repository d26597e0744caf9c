"""The misc cgroup controller (cgroup v2): TDX KeyID capacity and use."""

from __future__ import annotations

from ..host import Host, Problem, parse_uint

CGROUP_ROOT = "sys/fs/cgroup"


def parse_misc(text: str, path: str) -> dict[str, int] | Problem:
    """`name value` lines (misc.capacity, misc.current)."""
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
        values[parts[0]] = number
    return values


def _read_misc(host: Host, rel: str) -> dict[str, int] | Problem:
    text = host.read_text(rel)
    if isinstance(text, Problem):
        return text
    return parse_misc(text, host.display(rel))


def misc_file(cgroup: str, name: str) -> str:
    """Root-relative path of a misc file of a cgroup path such as `/machine.slice/x.scope`."""
    cgroup = cgroup.strip("/")
    return f"{CGROUP_ROOT}/{cgroup}/{name}" if cgroup else f"{CGROUP_ROOT}/{name}"


def read_misc(host: Host, name: str, cgroup: str = "/") -> dict[str, int] | Problem:
    """misc.capacity or misc.current of one cgroup (the root by default)."""
    return _read_misc(host, misc_file(cgroup, name))


def tdx_count(misc: dict[str, int] | Problem, path: str) -> int | Problem:
    """The `tdx` line of a parsed misc file; a file without one cannot tell."""
    if isinstance(misc, Problem):
        return misc
    if "tdx" not in misc:
        return Problem("absent", path, "no 'tdx' resource (kernel without KVM TDX accounting)")
    return misc["tdx"]


def parse_proc_cgroup(text: str) -> str | None:
    """The cgroup v2 path from /proc/PID/cgroup (`0::/PATH`), taken verbatim."""
    for line in text.splitlines():
        if line.startswith("0::"):
            path = line[3:]
            return path if path.startswith("/") else None
    return None
