"""KVM VMs: enumeration (debugfs and /proc/*/fd together) and TD classification.

The rules are DESIGN.md's "VM enumeration" and "Classification of each VM".
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

from ..host import Host, Problem, parse_uint
from .cgroup import MiscRoot, misc_file, parse_misc, parse_proc_cgroup, tdx_count

DEBUGFS_KVM = "sys/kernel/debug/kvm"
KVM_VM_LINK = "anon_inode:kvm-vm"
KVM_VCPU_LINK = "anon_inode:kvm-vcpu:"
LIBVIRT_QEMU = "run/libvirt/qemu"
_DEBUGFS_ENTRY = re.compile(r"(\d{1,10})-(\d{1,10})")


class VmHandle(NamedTuple):
    """One live VM as enumeration found it.

    A VM whose kvm-vm descriptor was closed lives on while a vCPU descriptor is
    open (DESIGN.md "VM enumeration"). When only vCPU descriptors show it,
    `vcpu_only` is True and `vm_fd` is one of its vCPU descriptors: no kvm-vm
    descriptor of that number exists, and the number stays taken while the VM
    lives, so (pid, vm_fd) still names one VM for the daemon's ledger.
    """

    tid: int | None  # the creating task (debugfs); None when only the /proc scan saw it
    vm_fd: int
    pid: int | None  # the holding process; None when debugfs alone saw it and its thread is gone
    source: str
    vcpu_only: bool = False


class Enumeration(NamedTuple):
    method: str | None  # "debugfs", "proc" or None (unavailable)
    vms: tuple[VmHandle, ...]
    #: Why enumeration failed or is incomplete; None when it worked.
    problem: Problem | None = None
    notes: tuple[str, ...] = ()
    #: When incomplete: the processes whose descriptors could not be read (a VM
    #: missing from the list can only be theirs); None when the gap has no bounds.
    unseen: frozenset[int] | None = frozenset()

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
    #: True when only vCPU descriptors hold the VM (vm_fd is one of them).
    vcpu_only: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "tid": self.tid,
            "vm_fd": self.vm_fd,
            "held_by": "kvm-vcpu fds only" if self.vcpu_only else "kvm-vm fd",
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


class KvmFds(NamedTuple):
    """A process's KVM descriptors: kvm-vm fds, and vCPU fds by vCPU index."""

    vm: frozenset[int]
    vcpus: dict[int, list[int]]

    def vcpu_only_vms(self) -> list[int]:
        """A vCPU descriptor standing for each VM held by vCPUs alone.

        vCPU ids restart at 0 in every VM, so the VMs with vCPUs number at least
        the count of the most frequent index; those beyond the kvm-vm descriptors
        are held by vCPUs only. Which vCPUs belong to which VM cannot be seen:
        each such VM is named by one descriptor of that index, highest first (a
        closed VM fd is the older VM's, most likely).
        """
        if not self.vcpus:
            return []
        _index, fds = max(self.vcpus.items(), key=lambda kv: (len(kv[1]), -kv[0]))
        extra = len(fds) - len(self.vm)
        return sorted(fds, reverse=True)[:extra] if extra > 0 else []


def kvm_fds(host: Host, pid: int) -> KvmFds | Problem:
    """The kvm-vm and kvm-vcpu descriptors of process `pid` (links in proc/PID/fd).

    Problem kind "absent" only when the process has gone (proc/PID no longer
    exists); any other kind means the descriptors could not be listed or read
    (permission, I/O, an fd entry that is not a directory while the process
    lives, a descriptor that is not a symlink, a kvm link that does not parse).
    """
    rel = f"proc/{pid}/fd"
    fds = host.readlinks(rel)
    if isinstance(fds, Problem):
        if fds.kind == "absent" and host.exists(f"proc/{pid}"):
            return Problem(
                "malformed", fds.path, "not a listable directory while the process exists"
            )
        return fds
    vm: set[int] = set()
    vcpus: dict[int, list[int]] = {}
    for fd, link in fds.items():
        if isinstance(link, Problem):
            if link.kind == "absent":
                continue  # closed since the listing
            # Not a symlink, or unreadable: this descriptor could hold a VM.
            return Problem(link.kind, link.path, f"descriptor {fd!r}: {link.detail}")
        if not link.startswith("anon_inode:kvm-"):
            continue
        n = parse_uint(fd, 10)
        index = parse_uint(link[len(KVM_VCPU_LINK) :], 10) if link != KVM_VM_LINK else 0
        if (
            n is None
            or index is None
            or not (link == KVM_VM_LINK or link.startswith(KVM_VCPU_LINK))
        ):
            return Problem("malformed", host.display(f"{rel}/{fd}"), f"unexpected {link!r}")
        if link == KVM_VM_LINK:
            vm.add(n)
        else:
            vcpus.setdefault(index, []).append(n)
    return KvmFds(frozenset(vm), vcpus)


def vm_fds(host: Host, pid: int) -> frozenset[int] | Problem:
    """The descriptors of process `pid` whose links read `anon_inode:kvm-vm` (see kvm_fds)."""
    found = kvm_fds(host, pid)
    return found if isinstance(found, Problem) else found.vm


def _from_debugfs(
    host: Host, names: list[str], map_tids: bool = True
) -> tuple[list[VmHandle], list[str], list[str]]:
    """Handles for the debugfs kvm directories; (handles, unparsable names, notes).

    A handle's pid is None when its creating thread has exited: the /proc scan
    finds the holder (see _union); also when `map_tids` is False (a foreign PID
    namespace, where proc/TID is another task or none).
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
        pid = None
        if map_tids:
            pid = tgids.get(tid) or tgids.setdefault(tid, tgid_of(host, tid))
        vms.append(VmHandle(tid, fd, pid if isinstance(pid, int) else None, f"debugfs kvm/{name}"))
    return vms, bad, []


def _from_proc(
    host: Host, partial: bool = False, only: frozenset[int] | None = None
) -> Enumeration:
    """The kvm-vm and vCPU descriptors of every process (or of the processes `only`)."""
    if partial:
        why = "a foreign PID namespace: /proc shows only part of the host"
        return Enumeration(None, (), Problem("partial", host.display("proc"), why), unseen=None)
    entries: list[str] | Problem
    entries = host.listdir("proc") if only is None else [str(p) for p in sorted(only)]
    if isinstance(entries, Problem):
        return Enumeration(None, (), entries, unseen=None)
    vms: list[VmHandle] = []
    failed: list[tuple[int, Problem]] = []
    for entry in entries:
        pid = parse_uint(entry, 10)
        if pid is None:
            continue
        fds = kvm_fds(host, pid)
        if isinstance(fds, Problem):
            if fds.kind != "absent":  # absent: the process exited meanwhile
                failed.append((pid, fds))
            continue
        vms.extend(
            VmHandle(None, n, pid, f"/proc/{pid}/fd/{n} -> {KVM_VM_LINK}") for n in sorted(fds.vm)
        )
        vms.extend(
            VmHandle(None, n, pid, f"/proc/{pid}/fd/{n} -> kvm-vcpu, no kvm-vm fd left", True)
            for n in fds.vcpu_only_vms()
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
    return Enumeration(
        "proc",
        tuple(sorted(vms, key=lambda v: (v.pid or 0, v.vm_fd))),
        problem,
        unseen=frozenset(pid for pid, _ in failed),
    )


def _union(debugfs: list[VmHandle], proc: tuple[VmHandle, ...]) -> tuple[list[VmHandle], list[str]]:
    """One handle per VM from both sources (DESIGN.md "VM enumeration").

    A debugfs directory TID-FD and a /proc descriptor FD of TID's process are one
    VM. A directory whose creating thread has exited is matched to the one
    unaccounted kvm-vm descriptor with that number, when there is exactly one.
    """
    by_key = {(v.pid, v.vm_fd): v for v in proc if not v.vcpu_only}
    vcpu_held: dict[int | None, list[VmHandle]] = {}
    for v in proc:
        if v.vcpu_only:
            vcpu_held.setdefault(v.pid, []).append(v)
    out: list[VmHandle] = []
    orphans: list[VmHandle] = []
    notes: list[str] = []
    for d in debugfs:
        if d.pid is None:
            orphans.append(d)
            continue
        p = by_key.pop((d.pid, d.vm_fd), None)
        if p is None and vcpu_held.get(d.pid):
            # Its kvm-vm fd is closed and vCPUs hold it: one VM, debugfs names it.
            p = vcpu_held[d.pid].pop(0)
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
    out.extend(v for held in vcpu_held.values() for v in held)
    return out, notes


def enumerate_vms(host: Host, proc_partial: bool = False) -> Enumeration:
    """The union of the debugfs kvm directories and a scan of proc/*/fd (kvm-vm and vCPU fds).

    With debugfs listable, /proc is read in the processes debugfs names (see the
    comment below: that is where a VM debugfs misses can be); without it, in every
    process. Either source alone still enumerates (method "debugfs" or "proc"); an
    unparsable debugfs name or a process whose descriptors cannot be listed
    makes the enumeration incomplete (`problem` set); neither source: method None.
    `proc_partial` (a foreign PID namespace) leaves /proc out: it shows only part
    of the host, and its numbers are not the host's (debugfs TIDs are not mapped).
    """
    names = host.listdir(DEBUGFS_KVM)
    if isinstance(names, Problem):
        proc = _from_proc(host, proc_partial)
        note = f"debugfs not used: {names}"
        return proc._replace(notes=(*proc.notes, note))
    debugfs, bad, notes = _from_debugfs(host, names, map_tids=not proc_partial)
    # debugfs misses a VM only when its name TID-FD was taken (KVM logs "duplicate
    # directory"): by a VM of the same creating thread, whose process debugfs names.
    # /proc is read in those processes, unless a name does not parse or a creating
    # thread has exited (its VMs' holders are then looked for everywhere).
    named = frozenset(d.pid for d in debugfs if d.pid is not None)
    whole = bool(bad) or any(d.pid is None for d in debugfs)
    proc = _from_proc(host, proc_partial, None if whole else named)
    if not whole:
        notes.append(f"/proc read in the {len(named)} processes debugfs names")
    # debugfs lists every VM of the host even when /proc shows only part of it.
    problem = None if proc_partial else proc.problem
    unseen = frozenset() if proc_partial else proc.unseen
    if bad:
        unseen = None  # a VM directory that names no process: the gap could be anyone's
        problem = Problem(
            "malformed",
            host.display(DEBUGFS_KVM),
            f"{len(bad)} directories are not named TID-FD (e.g. {bad[0]!r})",
        )
    if proc.method is None:
        assert proc.problem is not None
        notes.append(f"/proc scan not used: {proc.problem}")
        return Enumeration("debugfs", tuple(debugfs), problem, tuple(notes), unseen)
    vms, more = _union(debugfs, proc.vms)
    return Enumeration("debugfs+proc", tuple(vms), problem, (*notes, *more), unseen)


def read_process(host: Host, pid: int, layout: str = "v2") -> Process:
    """comm, cmdline and misc cgroup path of `pid` (`layout`: the misc hierarchy's, "v1"
    reads the `misc` controller line of proc/PID/cgroup); what failed goes to `problems`."""
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
        cgroup = parse_proc_cgroup(cg, layout)
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
    misc: MiscRoot | None = None,
) -> list[Guest]:
    """Kind, name and evidence of every enumerated VM (DESIGN.md's four steps).

    tdx_in_use is "yes", "no" or "unknown" (facts.TdxUse.state, before the VMs
    spoke: a TD found in step 1 makes it yes). `misc` is the misc hierarchy's
    root (readers/cgroup.read_misc_root); None reads per-VM misc files at the
    cgroup v2 mount. Per-VM misc counts are read only where the root is the
    host's (layout v2 or v1).
    """
    layout = misc.layout if misc is not None else "v2"
    base = misc.base if misc is not None and misc.base else "sys/fs/cgroup"
    procs: dict[int, Process] = {}
    drafts: list[_Draft] = []
    for h in enumeration.vms:
        proc = None
        if h.pid is not None:
            proc = procs.get(h.pid) or read_process(host, h.pid, layout)
            procs[h.pid] = proc
        drafts.append(_Draft(h, proc))
    libvirt, _ = read_libvirt(host) if drafts else ({}, [])
    misc_cache: dict[str, dict[str, int] | Problem] = {}

    def misc_current(cg: str) -> int | Problem:
        rel = misc_file(cg, "misc.current", base)
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
        if proc.cgroup and layout in ("v2", "v1"):
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
    # Steps 2 to 4.
    found = sum(1 for d in drafts if d.td)
    in_use = "yes" if found else tdx_in_use
    guests: list[Guest] = []
    for d in drafts:
        dom = libvirt.get(d.proc.pid) if d.proc is not None else None
        if d.td:
            kind = "td"
        elif dom is not None:
            # Step 2: libvirt wrote the command line it runs, and it asked for no TD.
            kind = "vm"
            d.evidence.append(f"libvirt domain {dom.name} has no TDX launchSecurity: vm")
        elif in_use == "no":
            kind = "vm"
        elif in_use == "unknown":
            kind = "unknown"
            d.evidence.append("no TD evidence and whether TDX is in use is unknown")
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
                vcpu_only=d.handle.vcpu_only,
            )
        )
    return guests
