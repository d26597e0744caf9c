"""Planning: what a RecordingHost read, turned into the nodes of a host-root tree.

How each kind of read is reproduced is the package's docstring; `plan_tree`
applies it (redaction from redact.py), `Plan.write` writes the tree, and
`unreadable_reads` lists what the manifest must call unreadable.
"""

import os
import re
import struct
from typing import NamedTuple

from ..facts import HostFacts
from ..host import LARGE, Problem
from ..readers import kvm, msr, vmclass
from .record import RecordingHost
from .redact import classified, minimal_libvirt_xml, parse_pid_file, redact_cmdline
from .replay import MANIFEST

_PROC_PID = re.compile(r"proc/(\d+)(?:/|$)")
_PROC_FD = re.compile(r"proc/\d+/fd/[^/]+")
_NEUTRAL_SYMBOLS = ("_stext", "_text", "startup_64", "tdx_preflight_snapshot_neutral")
_LIBVIRT_XML = re.compile(re.escape(vmclass.LIBVIRT_QEMU) + r"/[^/]+\.xml")


class Node(NamedTuple):
    """One path of the tree: kind "file" (data), "dir", "link" (target), "loop" or "msr"."""

    kind: str
    data: bytes | str | dict[int, int] | None = None


class Plan:
    """What to write, path by path; the first node given for a path wins."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.notes: list[str] = []

    def add(self, rel: str, node: Node) -> None:
        safe = _safe_rel(rel)
        if safe is None or safe == MANIFEST:
            self.notes.append(f"{rel!r}: not written (the path is not safe in a tree)")
            return
        self.nodes.setdefault(safe, node)

    def resolve(self) -> None:
        """A node with nodes below it must be a directory: placeholders become one."""
        for rel in sorted(self.nodes):
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                parent = "/".join(parts[:depth])
                above = self.nodes.get(parent)
                if above is None or above.kind == "dir":
                    continue
                if above.kind == "file" and not above.data:
                    self.nodes[parent] = Node("dir")
                    continue
                self.notes.append(f"{rel}: not written ({parent} is a {above.kind} in the tree)")
                del self.nodes[rel]
                break

    def write(self, top: str) -> None:
        for rel in sorted(self.nodes):
            node = self.nodes[rel]
            path = os.path.join(top, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if node.kind == "dir":
                os.makedirs(path, exist_ok=True)
            elif node.kind == "link":
                os.symlink(str(node.data), path)
            elif node.kind == "loop":
                os.symlink(os.path.basename(path), path)
            elif node.kind == "msr":
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    assert isinstance(node.data, dict)
                    for index, value in sorted(node.data.items()):
                        os.pwrite(fd, struct.pack("<Q", value), index)
                finally:
                    os.close(fd)
            else:
                data = node.data if isinstance(node.data, bytes) else b""
                with open(path, "xb") as f:
                    f.write(data)


def _safe_rel(rel: str) -> str | None:
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _proc_pid(rel: str) -> int | None:
    m = _PROC_PID.match(rel)
    return int(m.group(1)) if m else None


def vm_holders(rec: RecordingHost, facts: HostFacts) -> set[int]:
    """Processes and threads whose /proc entries the replay needs."""
    held = {v.pid for v in facts.enumeration.vms if v.pid is not None}
    held |= {v.tid for v in facts.enumeration.vms if v.tid is not None}
    for rel, target in rec.links.items():
        pid = _proc_pid(rel)
        if pid is not None and kvm.is_kvm_link(target):
            held.add(pid)
    return held


_REPLAYED_AS = {
    "read": "a directory (reads as an I/O error)",
    "kallsyms": "a directory (reads as an I/O error)",
    "kmsg": "a directory (reads as an I/O error)",
    "list": "a symlink to itself (lists as an I/O error)",
}


def _msr_plan(rec: RecordingHost, plan: Plan, unreproducible: list[dict[str, str]]) -> list[str]:
    """Plan dev/cpu/N/msr; return notes on values a file cannot hold.

    A read at an index fails in a file only past its end, so a failed MSR stays
    failed only when every value written lies below it: values above the lowest
    failed index are left out (fail closed; they are in the manifest). 0x981's
    slot overlaps 0x982's, and the reader never takes 0x981 from a file: it is
    written only when 0x982 is not, which keeps 0x982's read short.
    """
    notes: list[str] = []
    for cpu in sorted(rec.msrs):
        rel = f"dev/cpu/{cpu}/msr"
        opened = rec.msr_open.get(cpu)
        if opened is not None:
            if opened.kind != "absent":
                plan.add(rel, Node("dir"))
                unreproducible.append(_unrepro(opened, "msr", "a directory (an I/O error)"))
            continue
        results = rec.msrs[cpu]
        values = {i: v for i, v in results.items() if isinstance(v, int)}
        failed = [
            i for i, v in results.items() if isinstance(v, Problem) and i not in msr._OVERLAPPED
        ]
        lowest = min(failed, default=None)
        dropped = sorted(i for i in values if lowest is not None and i > lowest)
        for i in dropped:
            del values[i]
        for low, high in msr._OVERLAPPED.items():
            if low in values and high in values:
                del values[low]
        if dropped:
            notes.append(
                f"cpu {cpu}: MSR {', '.join(f'0x{i:x}' for i in dropped)} left out of the file "
                f"so that the failed read of 0x{lowest:x} stays failed (values in this manifest)"
            )
        plan.add(rel, Node("msr", values))
    return notes


#: A replay through tdx-preflight reads the manifest: the tree's stand-in is only for others.
_OVERLAY = "; a replay reports it unreadable, with the captured kind, from the manifest"


def unreadable_reads(rec: RecordingHost) -> list[dict[str, str]]:
    """Every read that failed at capture other than "absent" and never succeeded.

    The manifest lists them and a replay's Host gives each the same Problem again
    (DESIGN.md, "Snapshots": unreadable at capture is unreadable at replay, never
    absent), so a replay's verdict is never more permissive than the capture's.
    """
    succeeded = (
        {rel for rel in rec.files if rel not in rec.truncated}
        | set(rec.kmsg)
        | set(rec.listings)
        | set(rec.links)
    )
    out = [
        {"path": rel, "read": op, "kind": problem.kind, "detail": problem.detail}
        for rel, (op, problem) in rec.failed.items()
        if problem.kind != "absent" and rel not in succeeded
    ]
    out += [
        {"path": f"dev/cpu/{cpu}/msr", "read": "msr", "kind": opened.kind, "detail": opened.detail}
        for cpu, opened in rec.msr_open.items()
        if opened is not None and opened.kind != "absent"
    ]
    return sorted(out, key=lambda u: u["path"])


def _unrepro(problem: Problem, op: str, replayed_as: str) -> dict[str, str]:
    return {
        "path": problem.path,
        "read": op,
        "kind": problem.kind,
        "detail": problem.detail,
        "replayed_as": replayed_as,
    }


class TreeInfo(NamedTuple):
    holders: list[int]
    redacted: dict[str, int]
    unreproducible: list[dict[str, str]]
    notes: list[str]
    dropped_processes: int
    dropped_fd_links: int


def plan_tree(rec: RecordingHost, facts: HostFacts, keep_cmdlines: bool) -> tuple[Plan, TreeInfo]:
    """Turn what was read into the nodes of a host-root tree."""
    plan = Plan()
    holders = vm_holders(rec, facts)
    redacted: dict[str, int] = {}
    unreproducible: list[dict[str, str]] = []
    notes: list[str] = []
    dropped_pids: set[int] = set()
    dropped_links = 0
    denied_fd_dirs: set[int] = set()

    def wanted(rel: str) -> bool:
        pid = _proc_pid(rel)
        if pid is None or pid in holders:
            return True
        dropped_pids.add(pid)
        return False

    for rel, data in rec.files.items():
        if not wanted(rel):
            continue
        if rel in rec.truncated:
            notes.append(
                f"{rel}: larger than the reader's cap of {rec.truncated[rel]} bytes; its first "
                f"{rec.truncated[rel] + 1} bytes are kept (still too large, as read)"
            )
        elif not keep_cmdlines and re.fullmatch(r"proc/\d+/cmdline", rel):
            new, count = redact_cmdline(data)
            if count and classified(new) == classified(data):
                data = new
                redacted[rel] = count
            elif count:
                notes.append(f"{rel}: kept unredacted (redaction would change how it classifies)")
        elif not keep_cmdlines and _LIBVIRT_XML.fullmatch(rel):
            pid_rel = rel[: -len(".xml")] + ".pid"
            pid_data = None if pid_rel in rec.truncated else rec.files.get(pid_rel)
            pid_file = parse_pid_file(pid_data) if pid_data is not None else None
            small = minimal_libvirt_xml(data, pid_file)
            if small is not None:
                data = small
                redacted[rel] = 1
        plan.add(rel, Node("file", data))

    for rel, records in rec.kmsg.items():
        plan.add(rel, Node("file", b"".join(r + b"\n" for r in records)))

    for rel, (asked, found) in rec.symbols.items():
        if rel in rec.failed:
            continue
        neutral = next(n for n in _NEUTRAL_SYMBOLS if n not in asked)
        lines = [f"0000000000000000 T {neutral}"] + [
            f"ffffffffffffffff T {n}" for n in sorted(found)
        ]
        plan.add(rel, Node("file", ("\n".join(lines) + "\n").encode()))

    for rel, target in rec.links.items():
        if not wanted(rel):
            continue
        if _PROC_FD.fullmatch(rel) and not kvm.is_kvm_link(target):
            dropped_links += 1  # other descriptors name files and sockets the checks ignore
        elif _PROC_FD.fullmatch(rel) and target in kvm.KVM_GMEM_LINKS:
            # A guest_memfd: its pseudo-file form is an absolute path no archive holds as
            # a link; the anon-inode form reads the same (kvm.KVM_GMEM_LINKS).
            plan.add(rel, Node("link", kvm.KVM_GMEM_LINK))
        elif target.startswith("/") or ".." in target.split("/"):
            notes.append(f"{rel} -> {target}: not written (a link out of the tree)")
        else:
            plan.add(rel, Node("link", target))

    for rel in rec.listings:
        if wanted(rel):
            plan.add(rel, Node("dir"))

    msr_notes = _msr_plan(rec, plan, unreproducible)

    for rel, (op, problem) in rec.failed.items():
        if problem.kind == "absent" or rel in rec.files or rel in rec.kmsg:
            continue
        pid = _proc_pid(rel)
        if op == "readlink" and _PROC_FD.fullmatch(rel):
            # A descriptor that could not be read could hold a VM: the replay lists it
            # and reads it as the same Problem (the manifest's unreadable list).
            plan.add(rel, Node("file", b""))
            if pid is not None and pid not in holders:
                denied_fd_dirs.add(pid)
            continue
        if pid is not None and pid not in holders:
            if op == "list" and rel == f"proc/{pid}/fd":
                # The process must be listed for its descriptors to be unreadable on replay.
                plan.add(f"proc/{pid}", Node("dir"))
                denied_fd_dirs.add(pid)
            continue
        if op == "readlink":
            continue  # other links (namespaces) that failed: absent in the tree
        if op == "kallsyms" and problem.kind == "malformed":
            plan.add(rel, Node("file", b""))  # "empty" is the only malformed kallsyms
            continue
        if op == "kmsg" and problem.kind == "malformed":
            plan.add(rel, Node("file", b"\n" * (LARGE + 1)))  # over the cap, as read
            notes.append(f"{rel}: over the reader's cap; written as {LARGE + 1} empty lines")
            continue
        if op == "list" and rel == "proc":
            unreproducible.append(
                _unrepro(problem, op, "the tree's proc/ holds files the checks read" + _OVERLAY)
            )
            continue
        if problem.kind == "malformed" and op == "read":
            unreproducible.append(
                _unrepro(problem, op, "absent: its first bytes could not be read" + _OVERLAY)
            )
            continue
        node = Node("loop") if op == "list" else Node("dir")
        plan.add(rel, node)
        unreproducible.append(_unrepro(problem, op, _REPLAYED_AS.get(op, "a directory") + _OVERLAY))

    if denied_fd_dirs:
        unreproducible.append(
            {
                "path": "proc/PID/fd",
                "read": "list",
                "kind": "permission",
                "detail": f"{len(denied_fd_dirs)} processes' descriptors could not be listed "
                "or read",
                "replayed_as": "empty proc/PID directories in the tree" + _OVERLAY,
            }
        )

    for rel, is_dir in rec.listed_types.items():
        plan.add(rel, Node("dir") if is_dir else Node("file", b""))
    for rel, present in rec.existing.items():
        if present:
            plan.add(rel, Node("file", b""))

    plan.resolve()
    notes.extend(msr_notes)
    notes.extend(
        f"{rel}: read more than once with different results; the first kept"
        for rel in dict.fromkeys(rec.changed)
    )
    notes.extend(plan.notes)
    info = TreeInfo(
        sorted(holders), redacted, unreproducible, notes, len(dropped_pids), dropped_links
    )
    return plan, info
