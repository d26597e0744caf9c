"""KVM VMs: enumeration (debugfs and /proc/*/fd together) and TD classification.

The rules are DESIGN.md's "VM enumeration" and "Classification of each VM".
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

from ..host import Host, Problem, parse_uint
from .cgroup import misc_file, parse_misc, parse_proc_cgroup, tdx_count

DEBUGFS_KVM = "sys/kernel/debug/kvm"
KVM_VM_LINK = "anon_inode:kvm-vm"
LIBVIRT_QEMU = "run/libvirt/qemu"
_DEBUGFS_ENTRY = re.compile(r"(\d{1,10})-(\d{1,10})")


class VmHandle(NamedTuple):
    """One live VM as enumeration found it."""

    tid: int | None  # the creating task (debugfs); None when only the /proc scan saw it
    vm_fd: int
    pid: int | None  # the holding process; None when debugfs alone saw it and its thread is gone
    source: str


class Enumeration(NamedTuple):
    method: str | None  # "debugfs", "proc" or None (unavailable)
    vms: tuple[VmHandle, ...]
    #: Why enumeration failed or is incomplete; None when it worked.
    problem: Problem | None = None
    notes: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return self.method is not None and self.problem is None


class Process(NamedTuple):
    pid: int
    comm: str | None
    cmdline: tuple[str, ...] | None
    cgroup: str | None
    problems: tuple[Problem, ...] = ()


class Guest(NamedTuple):
    pid: int | None
    tid: int | None
    vm_fd: int
    kind: str  # "td", "vm" or "unknown"
    name: str | None
    evidence: tuple[str, ...]
    comm: str | None = None
    cgroup: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "tid": self.tid,
            "vm_fd": self.vm_fd,
            "kind": self.kind,
            "name": self.name,
            "comm": self.comm,
            "cgroup": self.cgroup,
            "evidence": list(self.evidence),
        }


# -- enumeration ------------------------------------------------------------------


_STATUS_LINE = re.compile(r"^(Tgid|Uid):[ \t]*([^\n]*)", re.MULTILINE)


def parse_status(text: str) -> dict[str, str]:
    """The Tgid and Uid lines of /proc/PID/status (all this package needs of it)."""
    return {m.group(1): m.group(2).strip() for m in _STATUS_LINE.finditer(text)}


def tgid_of(host: Host, tid: int) -> int | Problem:
    """The process (thread group) of a task id, from proc/TID/status."""
    rel = f"proc/{tid}/status"
    text = host.read_text(rel)
    if isinstance(text, Problem):
        return text
    tgid = parse_uint(parse_status(text).get("Tgid", ""), 10)
    if tgid is None:
        return Problem("malformed", host.display(rel), "no Tgid line")
    return tgid


def vm_fds(host: Host, pid: int) -> frozenset[int] | Problem:
    """The descriptors of process `pid` whose links read `anon_inode:kvm-vm`.

    Problem kind "absent" only when the process has gone (proc/PID no longer
    exists); any other kind means the descriptors could not be listed
    (permission, I/O, an fd entry that is not a directory while the process
    lives).
    """
    rel = f"proc/{pid}/fd"
    fds = host.listdir(rel)
    if isinstance(fds, Problem):
        if fds.kind == "absent" and host.exists(f"proc/{pid}"):
            return Problem(
                "malformed", fds.path, "not a listable directory while the process exists"
            )
        return fds
    found: set[int] = set()
    for fd in fds:
        if host.readlink(f"{rel}/{fd}") == KVM_VM_LINK and (n := parse_uint(fd, 10)) is not None:
            found.add(n)
    return frozenset(found)


def _from_debugfs(host: Host, names: list[str]) -> tuple[list[VmHandle], list[str], list[str]]:
    """Handles for the debugfs kvm directories; (handles, unparsable names, notes).

    A handle's pid is None when its creating thread has exited: the /proc scan
    finds the holder (see _union).
    """
    vms: list[VmHandle] = []
    bad: list[str] = []
    tgids: dict[int, int | Problem] = {}  # one thread often creates many VMs
    for name in sorted(names):
        m = _DEBUGFS_ENTRY.fullmatch(name)
        if not m:
            # kvm/ also holds the global statistics files; a VM's entry is a directory.
            if host.is_dir(f"{DEBUGFS_KVM}/{name}"):
                bad.append(name)
            continue
        tid, fd = int(m.group(1)), int(m.group(2))
        pid = tgids.get(tid) or tgids.setdefault(tid, tgid_of(host, tid))
        vms.append(VmHandle(tid, fd, pid if isinstance(pid, int) else None, f"debugfs kvm/{name}"))
    return vms, bad, []


def _from_proc(host: Host) -> Enumeration:
    entries = host.listdir("proc")
    if isinstance(entries, Problem):
        return Enumeration(None, (), entries)
    vms: list[VmHandle] = []
    failed: list[tuple[int, Problem]] = []
    for entry in entries:
        pid = parse_uint(entry, 10)
        if pid is None:
            continue
        fds = vm_fds(host, pid)
        if isinstance(fds, Problem):
            if fds.kind != "absent":  # absent: the process exited meanwhile
                failed.append((pid, fds))
            continue
        vms.extend(
            VmHandle(None, n, pid, f"/proc/{pid}/fd/{n} -> {KVM_VM_LINK}") for n in sorted(fds)
        )
    problem = None
    if failed:
        pid, first = failed[0]
        need = ""
        if first.kind == "permission":
            need = "; needs CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE"
        problem = Problem(
            first.kind,
            host.display("proc/PID/fd"),
            f"cannot list the file descriptors of {len(failed)} processes "
            f"(e.g. {pid}: {first.detail}){need}",
        )
    return Enumeration("proc", tuple(sorted(vms, key=lambda v: (v.pid or 0, v.vm_fd))), problem)


def _union(debugfs: list[VmHandle], proc: tuple[VmHandle, ...]) -> tuple[list[VmHandle], list[str]]:
    """One handle per VM from both sources (DESIGN.md "VM enumeration").

    A debugfs directory TID-FD and a /proc descriptor FD of TID's process are one
    VM. A directory whose creating thread has exited is matched to the one
    unaccounted kvm-vm descriptor with that number, when there is exactly one.
    """
    by_key = {(v.pid, v.vm_fd): v for v in proc}
    out: list[VmHandle] = []
    orphans: list[VmHandle] = []
    notes: list[str] = []
    for d in debugfs:
        if d.pid is None:
            orphans.append(d)
            continue
        p = by_key.pop((d.pid, d.vm_fd), None)
        out.append(d if p is None else d._replace(source=f"{d.source}; {p.source}"))
    for d in orphans:
        match = [v for v in by_key.values() if v.vm_fd == d.vm_fd]
        name = d.source.removeprefix("debugfs ")
        if len(match) == 1:
            [p] = match
            del by_key[(p.pid, p.vm_fd)]
            notes.append(f"VM {name}: creating thread {d.tid} has exited; held by {p.pid}")
            out.append(d._replace(pid=p.pid, source=f"{d.source}; {p.source}"))
        else:
            notes.append(f"VM {name}: creating thread {d.tid} has exited; holder not found")
            out.append(d)
    out.extend(by_key.values())  # in /proc only: debugfs lacks them (duplicate names)
    return out, notes


def enumerate_vms(host: Host) -> Enumeration:
    """The union of the debugfs kvm directories and a scan of proc/*/fd.

    Either source alone still enumerates (method "debugfs" or "proc"); an
    unparsable debugfs name or a process whose descriptors cannot be listed
    makes the enumeration incomplete (`problem` set); neither source: method None.
    """
    names = host.listdir(DEBUGFS_KVM)
    proc = _from_proc(host)
    if isinstance(names, Problem):
        note = f"debugfs not used: {names}"
        return Enumeration(proc.method, proc.vms, proc.problem, (*proc.notes, note))
    debugfs, bad, notes = _from_debugfs(host, names)
    problem = proc.problem
    if bad:
        problem = Problem(
            "malformed",
            host.display(DEBUGFS_KVM),
            f"{len(bad)} directories are not named TID-FD (e.g. {bad[0]!r})",
        )
    if proc.method is None:
        assert proc.problem is not None
        notes.append(f"/proc scan not used: {proc.problem}")
        return Enumeration("debugfs", tuple(debugfs), problem, tuple(notes))
    vms, more = _union(debugfs, proc.vms)
    return Enumeration("debugfs+proc", tuple(vms), problem, (*notes, *more))


def read_process(host: Host, pid: int) -> Process:
    problems: list[Problem] = []
    comm = host.read_text(f"proc/{pid}/comm", 4096)
    if isinstance(comm, Problem):
        problems.append(comm)
        comm = None
    raw = host.read_bytes(f"proc/{pid}/cmdline", 1 << 20)
    cmdline: tuple[str, ...] | None
    if isinstance(raw, Problem):
        problems.append(raw)
        cmdline = None
    else:
        cmdline = parse_cmdline(raw)
    cg = host.read_text(f"proc/{pid}/cgroup", 64 * 1024)
    cgroup: str | None
    if isinstance(cg, Problem):
        problems.append(cg)
        cgroup = None
    else:
        cgroup = parse_proc_cgroup(cg)
    return Process(pid, comm.strip() if comm else None, cmdline, cgroup, tuple(problems))


def parse_cmdline(raw: bytes) -> tuple[str, ...]:
    """NUL-separated /proc/PID/cmdline to arguments (a trailing NUL ends the last)."""
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    if not raw:
        return ()
    return tuple(raw.decode("utf-8", errors="replace").split("\0"))


# -- command-line evidence ------------------------------------------------------------


def _keyval(value: str) -> list[str]:
    """QEMU's comma-separated options; `,,` is a literal comma."""
    return [p.replace("\0", ",") for p in value.replace(",,", "\0").split(",")]


_OPTIONS = frozenset(("-object", "--object", "-name", "--name", "--platform"))


def options(args: tuple[str, ...]) -> dict[str, list[str]]:
    """Values of the options that classify and name a VM, by option (`-o V` or `-o=V`)."""
    out: dict[str, list[str]] = {}
    take: str | None = None
    for arg in args:
        if take is not None:
            out.setdefault(take, []).append(arg)
            take = None
        elif arg in _OPTIONS:
            take = arg
        elif arg[:1] == "-" and "=" in arg:
            name, _, value = arg.partition("=")
            if name in _OPTIONS:
                out.setdefault(name, []).append(value)
    return out


def cmdline_td_evidence(
    args: tuple[str, ...], opts: dict[str, list[str]] | None = None
) -> str | None:
    """Why a command line launches a TD, or None (`opts`: options(args), if known)."""
    opts = options(args) if opts is None else opts
    for value in opts.get("-object", []) + opts.get("--object", []):
        stripped = value.lstrip()
        if stripped.startswith("{"):
            try:
                obj = json.loads(stripped)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("qom-type") == "tdx-guest":
                return 'command line: QEMU -object {"qom-type":"tdx-guest"} (JSON form)'
            continue
        parts = _keyval(value)
        if parts[0] == "tdx-guest" or "qom-type=tdx-guest" in parts:
            return "command line: QEMU -object tdx-guest"
    for value in opts.get("--platform", []):
        if "tdx=on" in value.split(","):
            return "command line: cloud-hypervisor --platform tdx=on"
    if "--tdx" in args or any(a.startswith("--tdx=") for a in args):
        return "command line: cloud-hypervisor --tdx"
    return None


def qemu_name(args: tuple[str, ...], opts: dict[str, list[str]] | None = None) -> str | None:
    """QEMU's `-name` value: its `guest=` key, else its bare first value."""
    opts = options(args) if opts is None else opts
    values = opts.get("-name", []) + opts.get("--name", [])
    if not values:
        return None
    parts = _keyval(values[-1])
    for part in parts:
        if part.startswith("guest="):
            return part[6:] or None
    first = parts[0]
    return first if first and "=" not in first else None


# -- libvirt ----------------------------------------------------------------------------


class LibvirtDomain(NamedTuple):
    name: str
    pid: int
    launch_security: str | None
    path: str


def parse_libvirt_status(data: bytes, path: str, pid_file: int | None) -> LibvirtDomain | Problem:
    """A libvirt live status XML (<domstatus pid=...><domain>...</domain></domstatus>)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(data)
    except (ET.ParseError, ValueError) as exc:
        return Problem("malformed", path, f"not XML: {exc}")
    domain = root if root.tag == "domain" else root.find("domain")
    if domain is None:
        return Problem("malformed", path, "no <domain> element")
    name = (domain.findtext("name") or "").strip()
    pid = parse_uint(root.get("pid", ""), 10) if root.tag == "domstatus" else None
    if pid is None:
        pid = pid_file
    if not name or pid is None:
        return Problem("malformed", path, "no domain name or pid")
    ls = domain.find("launchSecurity")
    return LibvirtDomain(name, pid, ls.get("type") if ls is not None else None, path)


def read_libvirt(host: Host) -> tuple[dict[int, LibvirtDomain], list[Problem]]:
    names = host.listdir(LIBVIRT_QEMU)
    if isinstance(names, Problem):
        return {}, ([] if names.kind == "absent" else [names])
    domains: dict[int, LibvirtDomain] = {}
    problems: list[Problem] = []
    for fname in sorted(names):
        if not fname.endswith(".xml"):
            continue
        base = fname[:-4]
        pid_text = host.read_value(f"{LIBVIRT_QEMU}/{base}.pid")
        pid_file = parse_uint(pid_text, 10) if isinstance(pid_text, str) else None
        data = host.read_bytes(f"{LIBVIRT_QEMU}/{fname}", 4 * 1024 * 1024)
        if isinstance(data, Problem):
            problems.append(data)
            continue
        dom = parse_libvirt_status(data, host.display(f"{LIBVIRT_QEMU}/{fname}"), pid_file)
        if isinstance(dom, Problem):
            problems.append(dom)
        else:
            domains[dom.pid] = dom
    return domains, problems


# -- classification ---------------------------------------------------------------------


class _Draft:
    """A VM while it is being classified."""

    __slots__ = ("evidence", "handle", "name", "proc", "td")

    def __init__(self, handle: VmHandle, proc: Process | None) -> None:
        self.handle = handle
        self.proc = proc
        self.evidence = [handle.source]
        self.td = False
        self.name: str | None = None


def _ancestors(path: str) -> list[str]:
    """`/a/b/c` -> [`/a/b/c`, `/a/b`, `/a`] (the root excluded)."""
    out: list[str] = []
    while path not in ("", "/"):
        out.append(path)
        path = path.rsplit("/", 1)[0]
    return out


def classify(
    host: Host,
    enumeration: Enumeration,
    tdx_in_use: str,
    root_tdx: int | Problem,
) -> list[Guest]:
    """Kind, name and evidence of every enumerated VM (DESIGN.md's three steps).

    tdx_in_use is "yes" or "no" (facts.TdxUse.state).
    """
    procs: dict[int, Process] = {}
    drafts: list[_Draft] = []
    for h in enumeration.vms:
        proc = None
        if h.pid is not None:
            proc = procs.get(h.pid) or read_process(host, h.pid)
            procs[h.pid] = proc
        drafts.append(_Draft(h, proc))
    libvirt, _ = read_libvirt(host) if drafts else ({}, [])
    misc_cache: dict[str, dict[str, int] | Problem] = {}

    def misc_current(cg: str) -> int | Problem:
        rel = misc_file(cg, "misc.current")
        if cg not in misc_cache:
            text = host.read_text(rel)
            misc_cache[cg] = (
                text if isinstance(text, Problem) else parse_misc(text, host.display(rel))
            )
        return tdx_count(misc_cache[cg], host.display(rel))

    # Which VM-holding processes sit at or below each cgroup.
    holders: dict[str, set[int]] = {}
    for pid, p in procs.items():
        for anc in _ancestors(p.cgroup or ""):
            holders.setdefault(anc, set()).add(pid)
    # Step 1: positive evidence.
    for d in drafts:
        proc = d.proc
        if proc is None:
            continue
        if proc.cgroup:
            # Its own cgroup counts as it is; an ancestor only while it holds no other VM.
            for n, anc in enumerate(_ancestors(proc.cgroup)):
                if n and holders[anc] != {proc.pid}:
                    break
                count = misc_current(anc)
                if isinstance(count, int):
                    d.evidence.append(f"misc.current tdx {count} in cgroup {anc}")
                    if count >= 1:
                        d.td = True
                        break
        if proc.cmdline is not None:
            opts = options(proc.cmdline)
            ev = cmdline_td_evidence(proc.cmdline, opts)
            if ev:
                d.evidence.append(ev)
                d.td = True
            d.name = qemu_name(proc.cmdline, opts)
        dom = libvirt.get(proc.pid)
        if dom is not None:
            d.name = dom.name
            if dom.launch_security == "tdx":
                d.evidence.append(f"libvirt domain {dom.name}: launchSecurity type tdx")
                d.td = True
            else:
                d.evidence.append(
                    f"libvirt domain {dom.name}: launchSecurity {dom.launch_security or 'none'}"
                )
        if d.name is None:
            d.name = proc.comm
    # Steps 2 and 3.
    found = sum(1 for d in drafts if d.td)
    guests: list[Guest] = []
    for d in drafts:
        if d.td:
            kind = "td"
        elif tdx_in_use == "no":
            kind = "vm"
        elif isinstance(root_tdx, int):
            k = root_tdx - found
            if k > 0:
                kind = "td"
                d.evidence.append(
                    f"root misc.current tdx {root_tdx} but only {found} TDs identified: "
                    "counted as td (fail closed)"
                )
            else:
                kind = "vm"
                d.evidence.append(f"root misc.current tdx {root_tdx}, all TDs identified: vm")
        else:
            kind = "unknown"
            d.evidence.append(f"no TD evidence and root misc.current unreadable: {root_tdx}")
        p = d.proc
        guests.append(
            Guest(
                pid=d.handle.pid,
                tid=d.handle.tid,
                vm_fd=d.handle.vm_fd,
                kind=kind,
                name=d.name,
                evidence=tuple(d.evidence),
                comm=p.comm if p else None,
                cgroup=p.cgroup if p else None,
            )
        )
    return guests
