"""KVM VMs: enumeration (debugfs and /proc/*/fd together).

The rules are DESIGN.md's "VM enumeration"; classifying the VMs it finds (TD or
not) is readers/vmclass.py.
"""

import os
import re
from typing import NamedTuple

from .. import plural
from ..host import Host, Problem, parse_uint

DEBUGFS_KVM = "sys/kernel/debug/kvm"
#: What every KVM descriptor's link starts with (virt/kvm/kvm_main.c names its anon inodes
#: "kvm-..."): a /proc/PID/fd link that starts so is one of the forms below or malformed.
KVM_LINK_PREFIX = "anon_inode:kvm-"
KVM_VM_LINK = "anon_inode:kvm-vm"
KVM_VCPU_LINK = "anon_inode:kvm-vcpu:"
#: Descriptors that keep a VM alive (each takes a reference on it) without naming it:
#: statistics of a vCPU (KVM_GET_STATS_FD on a vCPU; QEMU 8.1 and later holds one per
#: vCPU) or of a VM, and x86's one KVM device (KVM_CREATE_DEVICE, named after its
#: kvm_device_ops: virt/kvm/vfio.c).
KVM_VCPU_STATS_LINK = "anon_inode:kvm-vcpu-stats:"
KVM_VM_STATS_LINK = "anon_inode:kvm-vm-stats"
KVM_DEVICE_LINKS = frozenset({"anon_inode:kvm-vfio"})
#: guest_memfd (a TD's private memory) holds its VM too: an anon inode [kvm-gmem], or since
#: guest_memfd has its own pseudo filesystem, a pseudo file (fs/file_table.c simple_dname).
#: A VMM holds several per VM: they never count VMs, but held alone they mean one lives.
KVM_GMEM_LINK = "anon_inode:[kvm-gmem]"
KVM_GMEM_LINKS = frozenset({KVM_GMEM_LINK, "/[kvm-gmem] (deleted)"})


def is_kvm_link(link: str) -> bool:
    """Whether kvm_fds reads this /proc/PID/fd link (a KVM form, or malformed as one)."""
    return link.startswith(KVM_LINK_PREFIX) or link in KVM_GMEM_LINKS


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
    #: The /proc/PID/fd denial came although this process, reading the live host, runs as
    #: root with CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE (an LSM, a user namespace or a
    #: sandbox denies it): more privilege is not the fix.
    denied_to_root: bool = False

    @property
    def complete(self) -> bool:
        return self.method is not None and self.problem is None


#: The capabilities that let a process list every process's /proc/PID/fd.
CAP_DAC_READ_SEARCH = 2
CAP_SYS_PTRACE = 19
_CAP_MASK = re.compile(r"[0-9a-f]{1,16}")


def privileged(status: str, euid: int) -> bool:
    """Whether a process whose /proc/PID/status is `status` runs as root (`euid` 0) with
    CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE effective (its CapEff line)."""
    if euid != 0:
        return False
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "CapEff":
            if not _CAP_MASK.fullmatch(value.strip()):
                return False
            need = (1 << CAP_DAC_READ_SEARCH) | (1 << CAP_SYS_PTRACE)
            return int(value, 16) & need == need
    return False


def _self_privileged() -> bool:
    """Whether this process has what /proc/PID/fd needs. Read from the tool's own
    /proc/self/status, not through the host root: it is about the reader, and matters only
    for reads of the live host (a fixture's or snapshot's denials are not this process's)."""
    try:
        fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        raw = os.read(fd, 1 << 16)  # about 1.5 KiB; one read returns the whole seq_file
    except OSError:
        return False
    finally:
        os.close(fd)
    return privileged(raw.decode("utf-8", "replace"), os.geteuid())


# -- enumeration ------------------------------------------------------------------


def _status_value(text: str, key: str) -> str | None:
    """The value of the line `KEY:VALUE` of a status text, stripped; None when none.

    Raises ValueError when the line is there twice: fs/proc/array.c prints it once, and a
    duplicate is malformed, never "the last one wins".
    """
    marker = "\n" + key + ":"
    at = text.find(marker)
    first = text.startswith(key + ":")
    if at >= 0 and (first or text.find(marker, at + 1) >= 0):
        raise ValueError(f"the {key} line is there twice")
    if at >= 0:
        start = at + len(marker)
    elif first:
        start = len(key) + 1
    else:
        return None
    end = text.find("\n", start)
    return text[start : end if end >= 0 else len(text)].strip()


def parse_status(text: str) -> dict[str, str]:
    """The Tgid and Uid lines of /proc/PID/status (all this package needs of it), by name.

    Found by string search, not a per-line scan: a status file is about 55 lines, and
    the check reads one per VM (fs/proc/array.c prints each of these lines once).
    Raises ValueError when one of them is there twice (malformed).
    """
    out: dict[str, str] = {}
    for key in ("Tgid", "Uid"):
        value = _status_value(text, key)
        if value is not None:
            out[key] = value
    return out


def tgid_of(host: Host, tid: int) -> int | Problem:
    """The process (thread group) of a task id, from proc/TID/status."""
    rel = f"proc/{tid}/status"
    text = host.read_text(rel)
    if isinstance(text, Problem):
        return text
    try:
        fields = parse_status(text)
    except ValueError as exc:
        return Problem("malformed", host.display(rel), str(exc))
    tgid = parse_uint(fields.get("Tgid", ""), 10)
    if tgid is None:
        return Problem("malformed", host.display(rel), "no Tgid line")
    return tgid


class KvmFds(NamedTuple):
    """kvm-vm fds, vCPU fds by vCPU index, and (fd, link) of those holding a VM unnamed."""

    vm: frozenset[int]
    vcpus: dict[int, list[int]]
    holding: tuple[tuple[int, str], ...] = ()

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

    def unnamed_vm(self) -> str | None:
        """Why a VM lives here that no kvm-vm or vCPU descriptor names; None when none can.

        Held alone, the holding descriptors prove a VM lives; beside named VMs, more of
        one kind (a vCPU index's statistics, the VM's, vfio) than the VMs named prove one
        more. guest_memfd descriptors count no VMs (a VMM holds several per VM).
        """
        if not self.holding:
            return None
        n, link = self.holding[0]
        named = len(self.vm) + len(self.vcpu_only_vms())
        if not named:
            return (
                f"descriptor {n} is {link.removeprefix('anon_inode:')} and none is kvm-vm or "
                "a vCPU: a VM lives that no descriptor names"
            )
        kinds: dict[str, list[int]] = {}
        for fd, what in self.holding:
            if what not in KVM_GMEM_LINKS:
                kinds.setdefault(what, []).append(fd)
        for what, fds in kinds.items():
            if len(fds) > named:
                return (
                    f"descriptors {', '.join(map(str, fds))} are "
                    f"{what.removeprefix('anon_inode:')}, more than the "
                    f"{plural(named, 'VM')} named: "
                    "a VM lives that no descriptor names"
                )
        return None


def kvm_fds(host: Host, pid: int) -> KvmFds | Problem:
    """The kvm-vm and kvm-vcpu descriptors of process `pid` (links in proc/PID/fd).

    Problem kind "absent" only when the process has gone (proc/PID no longer
    exists); any other kind means the descriptors could not be listed or read
    (permission, I/O, an fd entry that is not a directory while the process
    lives, a descriptor that is not a symlink, a kvm link that does not parse:
    one that starts with KVM_LINK_PREFIX and is none of the kernel's forms above).
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
    holding: list[tuple[int, str]] = []
    for fd, link in fds.items():
        if isinstance(link, Problem):
            if link.kind == "absent":
                continue  # closed since the listing
            # Not a symlink, or unreadable: this descriptor could hold a VM.
            return Problem(link.kind, link.path, f"descriptor {fd!r}: {link.detail}")
        if not link.startswith(KVM_LINK_PREFIX):
            if link in KVM_GMEM_LINKS and (n := parse_uint(fd, 10)) is not None:
                holding.append((n, link))
            continue
        n = parse_uint(fd, 10)
        if n is not None and link == KVM_VM_LINK:
            vm.add(n)
            continue
        if n is not None and link.startswith(KVM_VCPU_LINK):
            index = parse_uint(link[len(KVM_VCPU_LINK) :], 10)
            if index is not None:
                vcpus.setdefault(index, []).append(n)
                continue
        elif n is not None and (
            link == KVM_VM_STATS_LINK
            or (
                link.startswith(KVM_VCPU_STATS_LINK)
                and parse_uint(link[len(KVM_VCPU_STATS_LINK) :], 10) is not None
            )
            or link in KVM_DEVICE_LINKS
        ):
            holding.append((n, link))
            continue
        return Problem("malformed", host.display(f"{rel}/{fd}"), f"unexpected {link!r}")
    return KvmFds(frozenset(vm), vcpus, tuple(sorted(holding)))


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
        if unnamed := fds.unnamed_vm():
            failed.append((pid, Problem("partial", host.display(f"proc/{pid}/fd"), unnamed)))
            continue
        vms.extend(
            VmHandle(None, n, pid, f"/proc/{pid}/fd/{n} -> {KVM_VM_LINK}") for n in sorted(fds.vm)
        )
        vms.extend(
            VmHandle(None, n, pid, f"/proc/{pid}/fd/{n} -> kvm-vcpu, no kvm-vm fd left", True)
            for n in fds.vcpu_only_vms()
        )
    problem = None
    denied_to_root = False
    if failed:
        pid, first = failed[0]
        need = ""
        if first.kind == "permission":
            denied_to_root = host.live and _self_privileged()
            need = (
                "; denied although this process runs as root with CAP_DAC_READ_SEARCH and "
                "CAP_SYS_PTRACE"
                if denied_to_root
                else "; needs CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE"
            )
        problem = Problem(
            first.kind,
            host.display("proc/PID/fd"),
            f"cannot read the VMs of {plural(len(failed), 'process', 'processes')} from their "
            f"descriptors (e.g. {pid}: {first.detail}){need}",
        )
    return Enumeration(
        "proc",
        tuple(sorted(vms, key=lambda v: (v.pid or 0, v.vm_fd))),
        problem,
        unseen=frozenset(pid for pid, _ in failed),
        denied_to_root=denied_to_root,
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
        notes.append(
            f"/proc read in the {plural(len(named), 'process', 'processes')} debugfs names"
        )
    # debugfs lists every VM of the host even when /proc shows only part of it.
    problem = None if proc_partial else proc.problem
    unseen = frozenset() if proc_partial else proc.unseen
    denied_to_root = problem is not None and proc.denied_to_root
    if bad:
        denied_to_root = False
        unseen = None  # a VM directory that names no process: the gap could be anyone's
        problem = Problem(
            "malformed",
            host.display(DEBUGFS_KVM),
            f"{len(bad)} directories are not named TID-FD (e.g. {bad[0]!r})",
        )
    if proc.method is None:
        assert proc.problem is not None
        notes.append(f"/proc scan not used: {proc.problem}")
        return Enumeration("debugfs", tuple(debugfs), problem, tuple(notes), unseen, denied_to_root)
    vms, more = _union(debugfs, proc.vms)
    return Enumeration("debugfs+proc", tuple(vms), problem, (*notes, *more), unseen, denied_to_root)
