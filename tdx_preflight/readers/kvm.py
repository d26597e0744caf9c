"""KVM VMs: enumeration (debugfs, else /proc/*/fd) and TD classification.

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

    tid: int | None  # the creating task (debugfs); None from the /proc scan
    vm_fd: int
    pid: int | None  # the process holding it; None when the creating thread is gone
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


def _from_debugfs(host: Host, names: list[str]) -> Enumeration:
    vms: list[VmHandle] = []
    notes: list[str] = []
    orphans: list[tuple[int, int, str]] = []
    for name in sorted(names):
        m = _DEBUGFS_ENTRY.fullmatch(name)
        if not m:
            continue
        tid, fd = int(m.group(1)), int(m.group(2))
        pid = tgid_of(host, tid)
        if isinstance(pid, Problem):
            orphans.append((tid, fd, name))
            continue
        vms.append(VmHandle(tid, fd, pid, f"debugfs kvm/{name}"))
    if orphans:
        # The creating thread has exited: find the holder among the processes with a
        # kvm-vm descriptor of that number that no resolved entry accounts for.
        claimed = {(v.pid, v.vm_fd) for v in vms}
        scan = _from_proc(host)
        free = [v for v in scan.vms if (v.pid, v.vm_fd) not in claimed]
        for tid, fd, name in orphans:
            match = [v for v in free if v.vm_fd == fd]
            pid = match[0].pid if len(match) == 1 else None
            if pid is None:
                notes.append(f"VM {name}: creating thread {tid} has exited; holder not found")
            else:
                free.remove(match[0])
                notes.append(f"VM {name}: creating thread {tid} has exited; held by {pid}")
            vms.append(VmHandle(tid, fd, pid, f"debugfs kvm/{name}"))
    return Enumeration("debugfs", tuple(vms), None, tuple(notes))


def _from_proc(host: Host) -> Enumeration:
    entries = host.listdir("proc")
    if isinstance(entries, Problem):
        return Enumeration(None, (), entries)
    vms: list[VmHandle] = []
    denied: list[int] = []
    for entry in entries:
        pid = parse_uint(entry, 10)
        if pid is None:
            continue
        fds = host.listdir(f"proc/{entry}/fd")
        if isinstance(fds, Problem):
            if fds.kind == "permission":
                denied.append(pid)
            continue  # absent: the process exited meanwhile
        for fd in fds:
            target = host.readlink(f"proc/{entry}/fd/{fd}")
            if target == KVM_VM_LINK and (n := parse_uint(fd, 10)) is not None:
                vms.append(VmHandle(None, n, pid, f"/proc/{pid}/fd/{fd} -> {KVM_VM_LINK}"))
    problem = None
    if denied:
        problem = Problem(
            "permission",
            host.display("proc/PID/fd"),
            f"cannot list the file descriptors of {len(denied)} processes "
            f"(e.g. {denied[0]}); needs CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE",
        )
    return Enumeration("proc", tuple(sorted(vms, key=lambda v: (v.pid or 0, v.vm_fd))), problem)


def enumerate_vms(host: Host) -> Enumeration:
    """debugfs kvm directories when listable, else a scan of proc/*/fd."""
    names = host.listdir(DEBUGFS_KVM)
    if isinstance(names, list):
        return _from_debugfs(host, names)
    result = _from_proc(host)
    note = f"debugfs not used: {names}"
    return Enumeration(result.method, result.vms, result.problem, (*result.notes, note))


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
