"""Snapshots: exactly what the checks read, as a host-root tree packed in a .tar.gz.

`tdx-preflight snapshot OUT.tar.gz` runs `gather()` once on a `RecordingHost`, which
remembers every read the readers made and how it ended, then writes those results
as a host-root tree (DESIGN.md, "The host root") so that `check --root OUT.tar.gz`
reproduces the verdict and every check's status. What a file cannot hold is said
in the tree's SNAPSHOT.json, and the snapshot replays itself before packing so the
manifest also says whether (and where) the replay differs from the capture.

How each kind of read is reproduced:

- a file read: the exact bytes. A file over the reader's size cap: its first
  cap+1 bytes (still "larger than" the cap). A file that exists but could not be
  read (permission, I/O): a directory in its place, which `Host` reports as an
  I/O problem, so an unreadable fact stays unreadable and never turns into a pass.
  Every read that failed other than "absent" is also listed in the manifest's
  `unreadable`, and a replay's Host gives it the captured Problem (kind included)
  again: what the tree alone cannot hold (a listing of proc, a process whose
  descriptors could not be listed) stays unreadable too.
- a directory listing: the directory, with its listed names (empty files or
  directories as they were) unless they were read themselves; a listing that
  failed other than "absent": a symlink to itself (an I/O problem on replay).
- /proc: the entries of VM holders only (the processes and creating threads the
  enumeration found, and every process with a kvm-vm descriptor); of their fd
  links only the `anon_inode:kvm-vm` and `anon_inode:kvm-vcpu:N` ones. Command
  lines are redacted to what the classifier reads, and libvirt's live XML to the
  elements it reads, unless asked to keep them.
- MSRs: a sparse file with each value at offset = index (see `_msr_plan` for what
  a file cannot hold); the kernel log as one record a line; kallsyms as the lines
  of the symbols that were found plus one neutral line.

`extract_snapshot` is the other direction: a .tar.gz given as `--root` is read
whole or refused (every header, the gzip trailer, member count and size bounded,
all before anything is written), then extracted into a temporary directory
removed at exit and on SIGTERM, SIGHUP and SIGINT. `captured_unreadable` reads a
tree's manifest for the Host that replays it.
"""

from __future__ import annotations

import atexit
import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import stat
import struct
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, NamedTuple

from . import __version__
from .checks import PHASES
from .facts import HostFacts, Ledger, gather
from .host import CHUNK, LARGE, SMALL, Host, Problem, ProblemKind
from .policy import Policy
from .readers import kvm, msr
from .report import Report, evaluate

SUFFIXES = (".tar.gz", ".tgz")
MANIFEST = "SNAPSHOT.json"
REDACTED = b"REDACTED"
#: Extraction limits: far above any snapshot this tool writes (a few thousand members, a few
#: MiB: every file it reads is capped), low enough that a bomb is refused in seconds.
MAX_MEMBERS = 50_000
MAX_BYTES = 256 << 20
#: The decompressed tar stream: the members' data plus a header (and a PAX header) each.
_STREAM_LIMIT = MAX_BYTES + MAX_MEMBERS * 4 * tarfile.BLOCKSIZE + (1 << 20)

_PROC_PID = re.compile(r"proc/(\d+)(?:/|$)")
_PROC_FD = re.compile(r"proc/\d+/fd/[^/]+")
_NEUTRAL_SYMBOLS = ("_stext", "_text", "startup_64", "tdx_preflight_snapshot_neutral")
_LIBVIRT_XML = re.compile(re.escape(kvm.LIBVIRT_QEMU) + r"/[^/]+\.xml")


class SnapshotError(Exception):
    """A usage error: the output cannot be written, or an archive cannot be used."""


# -- recording ---------------------------------------------------------------------------


class RecordingHost(Host):
    """A Host that remembers the result of every read it answers."""

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        unreadable: dict[str, tuple[ProblemKind, str]] | None = None,
    ) -> None:
        super().__init__(root, unreadable)
        self.files: dict[str, bytes] = {}
        #: Files over a reader's cap: rel -> the cap (files[rel] holds cap+1 bytes).
        self.truncated: dict[str, int] = {}
        #: Reads that gave a Problem: rel -> (operation, problem).
        self.failed: dict[str, tuple[str, Problem]] = {}
        self.listings: dict[str, list[str]] = {}
        #: Listed names nothing read: rel -> True for a directory, False for anything else.
        self.listed_types: dict[str, bool] = {}
        self.links: dict[str, str] = {}
        #: kallsyms-format files: rel -> (names asked, names found).
        self.symbols: dict[str, tuple[set[str], set[str]]] = {}
        self.kmsg: dict[str, list[bytes]] = {}
        self.msrs: dict[int, dict[int, int | Problem]] = {}
        #: Per CPU: None when its MSR source opened, else why it did not.
        self.msr_open: dict[int, Problem | None] = {}
        self.existing: dict[str, bool] = {}
        #: Paths read twice with different results (the first result is kept).
        self.changed: list[str] = []
        self._nested = 0

    def _keep(self, rel: str, op: str, result: object, succeeded_before: bool) -> None:
        """Remember the first failure of a read that never succeeded; note a change."""
        if isinstance(result, Problem):
            if succeeded_before:
                self.changed.append(rel)
            elif rel not in self.failed:
                self.failed[rel] = (op, result)
        elif rel in self.failed:
            self.changed.append(rel)

    def read_bytes(self, rel: str, limit: int = SMALL) -> bytes | Problem:
        result = super().read_bytes(rel, limit)
        if self._nested:
            return result
        had = rel in self.files and rel not in self.truncated
        if isinstance(result, bytes) and rel in self.truncated:
            del self.failed[rel]  # now read whole (a larger cap): not a change
        self._keep(rel, "read", result, had)
        if isinstance(result, bytes):
            if not had:
                # A complete read supersedes a capped one: it reproduces both.
                self.truncated.pop(rel, None)
                self.files[rel] = result
            elif self.files[rel] != result:
                self.changed.append(rel)
        elif result.kind == "malformed" and rel not in self.files:
            prefix = self._prefix_of(rel, limit + 1)
            if prefix is not None and len(prefix) > limit:
                self.files[rel] = prefix
                self.truncated[rel] = limit
        return result

    def _prefix_of(self, rel: str, size: int) -> bytes | None:
        """The first `size` bytes of a file whose whole read was refused for its size."""
        data = Host.read_head(self, rel, size)  # not recorded: only the prefix is kept
        return data if isinstance(data, bytes) else None

    def listdir(self, rel: str) -> list[str] | Problem:
        result = super().listdir(rel)
        self._keep(rel, "list", result, rel in self.listings)
        if isinstance(result, list):
            self.listings.setdefault(rel, list(result))
            # /proc is reproduced from the reads of VM holders only, never from a listing.
            if rel != "proc" and not rel.startswith("proc/"):
                for name in result:
                    self.listed_types.setdefault(f"{rel}/{name}", self.is_dir(f"{rel}/{name}"))
        return result

    def readlinks(self, rel: str) -> dict[str, str | Problem] | Problem:
        # One recorded listing and one recorded readlink per entry: the tree needs both.
        names = self.listdir(rel)
        return names if isinstance(names, Problem) else self._each_readlink(rel, names)

    def readlink(self, rel: str) -> str | Problem:
        result = super().readlink(rel)
        self._keep(rel, "readlink", result, rel in self.links)
        if isinstance(result, str):
            self.links.setdefault(rel, result)
        return result

    def exists(self, rel: str) -> bool:
        result = super().exists(rel)
        self.existing.setdefault(rel, result)
        return result

    def find_symbols(self, rel: str, names: Iterable[str]) -> set[str] | Problem:
        wanted = list(names)
        result = super().find_symbols(rel, wanted)
        self._keep(rel, "kallsyms", result, rel in self.symbols and rel not in self.failed)
        asked, found = self.symbols.setdefault(rel, (set(), set()))
        asked.update(wanted)
        if isinstance(result, set):
            found.update(result)
        return result

    def read_kmsg(self, rel: str = "dev/kmsg", limit: int = LARGE) -> list[bytes] | Problem:
        # A fixture's kmsg file is read through read_bytes: record the records, not it.
        self._nested += 1
        try:
            result = super().read_kmsg(rel, limit)
        finally:
            self._nested -= 1
        self._keep(rel, "kmsg", result, rel in self.kmsg)
        if isinstance(result, list):
            self.kmsg.setdefault(rel, list(result))
        return result

    def read_msr(self, cpu: int, index: int) -> int | Problem:
        result = super().read_msr(cpu, index)
        opened = self._msr_fds.get(cpu)
        self.msr_open.setdefault(cpu, opened if isinstance(opened, Problem) else None)
        self.msrs.setdefault(cpu, {}).setdefault(index, result)
        return result


# -- redaction ---------------------------------------------------------------------------


def _value_matters(option: str, value: str) -> bool:
    """Whether the classifier reads this option value (readers/kvm.py)."""
    if option in ("-name", "--name"):
        return True
    if option in ("-object", "--object"):
        return kvm.cmdline_td_evidence(("-object", value)) is not None
    if option == "--platform":
        return "tdx=on" in value.split(",")
    return False


def redact_cmdline(raw: bytes) -> tuple[bytes, int]:
    """A NUL-separated command line with every argument the classifier ignores replaced.

    Kept: argv[0], TD evidence (a tdx-guest `-object`, `--platform` with tdx=on,
    `--tdx`), the `-name` values, and the option names of kept values. The walk is
    readers/kvm.py's `options()`, so an option that swallows the next argument
    swallows the same argument here. Returns the new bytes and how many arguments
    were replaced; kept arguments are the original bytes.
    """
    body = raw[:-1] if raw.endswith(b"\0") else raw
    if not body:
        return raw, 0
    args = body.split(b"\0")
    text = [a.decode("utf-8", errors="replace") for a in args]
    keep = [i == 0 for i in range(len(args))]
    take: str | None = None
    take_at = 0
    for i in range(1, len(args)):
        arg = text[i]
        if arg == "--tdx" or arg.startswith("--tdx="):
            keep[i] = True  # the classifier looks for it anywhere on the line
        if take is not None:
            if _value_matters(take, arg):
                keep[i] = keep[take_at] = True
            take = None
        elif arg in kvm._OPTIONS:  # the classifier's own option set, so the two never drift
            take, take_at = arg, i
        elif arg[:1] == "-" and "=" in arg:
            name, _, value = arg.partition("=")
            if name in kvm._OPTIONS and _value_matters(name, value):
                keep[i] = True
    out = [a if k else REDACTED for a, k in zip(args, keep, strict=True)]
    replaced = sum(1 for a, k in zip(args, keep, strict=True) if not k and a != REDACTED)
    return b"\0".join(out) + (b"\0" if raw.endswith(b"\0") else b""), replaced


def _classified(raw: bytes) -> tuple[str | None, str | None]:
    args = kvm.parse_cmdline(raw)
    opts = kvm.options(args)
    return kvm.cmdline_td_evidence(args, opts), kvm.qemu_name(args, opts)


def _pid_file(data: bytes | None) -> int | None:
    if data is None:
        return None
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 10 else None


def minimal_libvirt_xml(data: bytes, pid_file: int | None) -> bytes | None:
    """libvirt's live status XML reduced to what the classifier reads, or None.

    The domain XML names disk images, sockets and secrets; the classifier reads the
    pid, the domain name and the launchSecurity type. None when the reduced XML
    would not parse to the same domain (with or without the pid file).
    """
    from xml.sax.saxutils import escape, quoteattr

    original = kvm.parse_libvirt_status(data, "", pid_file)
    if isinstance(original, Problem):
        return None
    import xml.etree.ElementTree as ET

    root = ET.fromstring(data)
    inner = [f"<name>{escape(original.name)}</name>"]
    if original.launch_security is not None:
        inner.append(f"<launchSecurity type={quoteattr(original.launch_security)}/>")
    domain = "<domain type='kvm'>" + "".join(inner) + "</domain>"
    if root.tag == "domstatus":
        pid = root.get("pid")
        attr = f" pid={quoteattr(pid)}" if pid is not None else ""
        text = f"<domstatus state='running'{attr}>{domain}</domstatus>\n"
    else:
        text = domain + "\n"
    out = text.encode()
    for pf in (pid_file, None):
        if kvm.parse_libvirt_status(data, "", pf) != kvm.parse_libvirt_status(out, "", pf):
            return None
    return out


# -- the tree ----------------------------------------------------------------------------


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
        if pid is not None and target == kvm.KVM_VM_LINK:
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


def _overlay(reads: list[dict[str, str]]) -> dict[str, tuple[ProblemKind, str]]:
    return {u["path"]: (u["kind"], u["detail"]) for u in reads}  # type: ignore[misc]


def captured_unreadable(root: str) -> dict[str, tuple[ProblemKind, str]]:
    """The reads a snapshot tree at `root` records as unreadable at capture ({} when
    `root` holds no snapshot). A manifest that does not parse is a SnapshotError."""
    if os.path.abspath(root) == "/":
        return {}  # the live host: nothing was captured
    with Host(root) as host:
        data = host.read_bytes(MANIFEST, LARGE)
    if isinstance(data, Problem):
        if data.kind == "absent":
            return {}
        raise SnapshotError(f"cannot read the snapshot manifest: {data}")
    try:
        reads = json.loads(data).get("unreadable", [])
        overlay = _overlay(reads)
        if not all(k in ("permission", "io", "malformed") for k, _ in overlay.values()):
            raise ValueError("unknown kind")
        if not all(isinstance(p, str) and isinstance(d, str) for p, (_, d) in overlay.items()):
            raise ValueError("not a path")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SnapshotError(f"{MANIFEST} under {root}: bad 'unreadable' list ({exc})") from None
    return overlay


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
            if count and _classified(new) == _classified(data):
                data = new
                redacted[rel] = count
            elif count:
                notes.append(f"{rel}: kept unredacted (redaction would change how it classifies)")
        elif not keep_cmdlines and _LIBVIRT_XML.fullmatch(rel):
            base = rel[: -len(".xml")]
            small = minimal_libvirt_xml(data, _pid_file(rec.files.get(base + ".pid")))
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
        if _PROC_FD.fullmatch(rel) and not target.startswith(
            ("anon_inode:kvm-vm", "anon_inode:kvm-vcpu:")
        ):
            dropped_links += 1  # other descriptors name files and sockets the checks ignore
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


# -- reports -----------------------------------------------------------------------------


def _reports(facts: HostFacts, policy: Policy) -> dict[str, Report]:
    return {phase: evaluate(facts, phase, policy) for phase in PHASES}


def _statuses(report: Report) -> dict[str, str]:
    return {r.id: r.status for r in report.results}


def _guests(facts: HostFacts) -> list[dict[str, Any]]:
    return [{"pid": g.pid, "tid": g.tid, "kind": g.kind, "name": g.name} for g in facts.guests]


def _differences(
    capture: dict[str, Report], replay: dict[str, Report]
) -> dict[str, dict[str, list[Any]]]:
    out: dict[str, dict[str, list[Any]]] = {}
    for phase, rep in capture.items():
        again = replay[phase]
        diff = {
            cid: [status, _statuses(again)[cid]]
            for cid, status in _statuses(rep).items()
            if _statuses(again)[cid] != status
        }
        if rep.verdict != again.verdict or rep.exit_code != again.exit_code:
            diff["verdict"] = [
                f"{rep.verdict} ({rep.exit_code})",
                f"{again.verdict} ({again.exit_code})",
            ]
        if phase == "exec" and _guests(rep.facts) != _guests(again.facts):
            diff["guests"] = [_guests(rep.facts), _guests(again.facts)]
        if diff:
            out[phase] = diff
    return out


# -- packing -----------------------------------------------------------------------------


def _walk(top: str, rel: str = "") -> Iterator[str]:
    """Every path under `top`, parents first, sorted; symlinks are not followed."""
    with os.scandir(os.path.join(top, rel) if rel else top) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        sub = f"{rel}/{entry.name}" if rel else entry.name
        yield sub
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(top, sub)


def _pack(top: str, out: Any, mtime: float) -> int:
    """Write the tree as a gzip'd tar to the open file `out`; return the non-directories."""

    def owned_by_root(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mtime = int(mtime)
        ti.mode = 0o755 if ti.isdir() else 0o777 if ti.issym() else 0o644
        return ti

    count = 0
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for rel in _walk(top):
            path = os.path.join(top, rel)
            tar.add(path, arcname=rel, recursive=False, filter=owned_by_root)
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                count += 1
    return count


def open_output(output: str) -> tuple[int, str]:
    """A temporary file beside `output` (renamed over it when done): fail before reading."""
    if not output.endswith(SUFFIXES):
        raise SnapshotError(
            f"output {output} must end in .tar.gz or .tgz (it is read back as --root)"
        )
    parent = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise SnapshotError(f"output {output} is a directory")
    if not os.path.isdir(parent):
        raise SnapshotError(f"cannot write {output}: {parent} is not a directory")
    try:
        return tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise SnapshotError(f"cannot write {output}: {exc.strerror or exc}") from None


class SnapshotResult(NamedTuple):
    path: str
    files: int
    verdict: str
    exit_code: int
    differences: dict[str, dict[str, list[Any]]]
    unreproducible: int

    def summary(self) -> str:
        line = f"snapshot {self.path}: {self.files} files, verdict {self.verdict} (exec)"
        if self.unreproducible:
            line += f", {self.unreproducible} reads not reproducible byte for byte"
        if self.differences:
            what = sorted({k for d in self.differences.values() for k in d})
            line += f"; replay differs in {', '.join(what)} (see {MANIFEST})"
        return line


def take_snapshot(
    root: str,
    policy: Policy,
    output: str,
    *,
    keep_cmdlines: bool = False,
    source: str | None = None,
    ledger: Ledger | None = None,
    ledger_info: dict[str, Any] | None = None,
) -> SnapshotResult:
    """Capture what the checks read under `root` into the archive `output`."""
    fd, partial = open_output(output)
    try:
        started = time.time()
        with RecordingHost(root, captured_unreadable(root)) as rec:
            facts = gather(rec, load_msr_module=policy.load_msr_module, ledger=ledger)
        capture = _reports(facts, policy)
        plan, info = plan_tree(rec, facts, keep_cmdlines)
        unreadable = unreadable_reads(rec)
        with tempfile.TemporaryDirectory(prefix="tdx-preflight-snapshot-") as tmp:
            top = os.path.join(tmp, "root")
            os.mkdir(top)
            plan.write(top)
            with Host(top, _overlay(unreadable)) as replay_host:
                replay_facts = gather(replay_host, load_msr_module="never")
            differences = _differences(capture, _reports(replay_facts, policy))
            manifest = _manifest(
                rec,
                facts,
                capture,
                info,
                differences,
                keep_cmdlines,
                source or root,
                started,
                ledger_info,
            )
            manifest["unreadable"] = unreadable
            with open(os.path.join(top, MANIFEST), "x", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1, sort_keys=False)
                f.write("\n")
            with os.fdopen(fd, "wb") as out:
                fd = -1
                files = _pack(top, out, started)
                out.flush()
                os.fsync(out.fileno())
        os.replace(partial, output)
        partial = ""
    except OSError as exc:
        raise SnapshotError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
        if partial:
            with contextlib.suppress(OSError):
                os.unlink(partial)
    return SnapshotResult(
        output,
        files,
        capture["exec"].verdict,
        capture["exec"].exit_code,
        differences,
        len(info.unreproducible),
    )


def _manifest(
    rec: RecordingHost,
    facts: HostFacts,
    capture: dict[str, Report],
    info: TreeInfo,
    differences: dict[str, dict[str, list[Any]]],
    keep_cmdlines: bool,
    source: str,
    started: float,
    ledger_info: dict[str, Any] | None,
) -> dict[str, Any]:
    when = datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    msrs: dict[str, dict[str, Any]] = {}
    for cpu, values in sorted(rec.msrs.items()):
        # From a file, 0x981 holds 0x982's low bytes: neither the reader nor a person should use it.
        entry: dict[str, Any] = {"source": "file" if rec.msr_is_file(cpu) else "device"}
        entry.update(
            (f"0x{i:x}", f"0x{v:x}" if isinstance(v, int) else v.to_json())
            for i, v in sorted(values.items())
        )
        msrs[str(cpu)] = entry
    return {
        "schema": 1,
        "tool": {"name": "tdx-preflight", "version": __version__},
        "created_at": when,
        "source_root": source,
        "live": facts.live,
        "captured_as_uid": os.geteuid(),
        "kernel_release": facts.release if isinstance(facts.release, str) else None,
        "capture": {
            phase: {
                "verdict": rep.verdict,
                "exit_code": rep.exit_code,
                "checks": _statuses(rep),
            }
            for phase, rep in capture.items()
        },
        "guests": _guests(facts),
        "daemon_ledger": ledger_info,
        "vm_holders": info.holders,
        "omitted": {
            "processes_without_vms": info.dropped_processes,
            "fd_links_not_kvm_vm": info.dropped_fd_links,
            "kallsyms": "only the lines of the symbols found, and one neutral line",
        },
        "redaction": {
            "command_lines": "kept" if keep_cmdlines else "redacted",
            "rule": "argv[0], tdx-guest -object values, -name values, --platform tdx=on and "
            "--tdx are kept with their option names; every other argument reads REDACTED. "
            "libvirt status XML is reduced to pid, name and launchSecurity.",
            "redacted": info.redacted,
        },
        "msrs": {
            "values": msrs,
            "reader_notes": list(facts.msrs.notes) if facts.msrs else [],
            "note": "0x981 and 0x982 overlap in a file; the reader takes neither 0x981 "
            "nor a failed MSR from a file, so they are listed here",
        },
        "unreproducible": info.unreproducible,
        "notes": info.notes,
        "replay": {
            "matches_capture": not differences,
            "differences": differences,
            "note": "replayed by this snapshot before packing, without the daemon's ledger",
        },
    }


# -- extraction --------------------------------------------------------------------------


#: Python before 3.11.4 has no extraction filters (Debian 12 ships 3.11.2).
_FILTERS = hasattr(tarfile, "data_filter")


class UnsafeMember(getattr(tarfile, "FilterError", tarfile.TarError)):  # type: ignore[misc]
    """An archive member a snapshot never holds."""

    def __init__(self, member: tarfile.TarInfo, why: str) -> None:
        super().__init__(f"member {member.name!r}: {why}")
        self.tarinfo = member


class _Budget:
    """Checks every member; stricter than filter="data", and enough without it."""

    def __init__(self) -> None:
        self.members = 0
        self.bytes = 0
        self.names: set[str] = set()
        self.symlinks: set[str] = set()
        #: Every proper prefix of a member's name: directories some member lies below.
        self.parents: set[str] = set()

    def check(self, member: tarfile.TarInfo) -> None:
        # filter="data" strips a leading "/" and allows ".." that stays inside; a tree this
        # tool wrote has neither. Names and link targets without ".." or a leading "/" can
        # only descend from their directory, so no chain of them leaves the tree.
        parts = member.name.split("/")
        if member.name.startswith("/") or ".." in parts:
            raise UnsafeMember(member, "an absolute path or one with '..'")
        if member.isdir() and parts[-1:] == [""]:
            parts = parts[:-1]
        # One spelling per path: `./a`, `a//b` or `a/./b` would name a member twice.
        if not parts or any(p in ("", ".") for p in parts):
            raise UnsafeMember(member, "not a plain relative path")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(p in self.symlinks for p in prefixes):
            raise UnsafeMember(member, "below a symlink (it would name another member's path)")
        if member.issym() and "/".join(parts) in self.parents:
            raise UnsafeMember(member, "a symlink where other members are a directory")
        if not (member.isreg() or member.isdir() or member.issym()):
            raise UnsafeMember(member, "not a regular file, directory or symlink")
        if member.issym():
            target = member.linkname
            if target.startswith("/") or ".." in target.split("/"):
                raise UnsafeMember(member, f"a symlink to {target!r}, out of the tree")
        name = "/".join(parts)
        if name in self.names:
            raise UnsafeMember(member, "given twice (a later member would replace the first)")
        self.names.add(name)
        self.parents.update(prefixes)
        if member.issym():
            self.symlinks.add(name)
        self.members += 1
        self.bytes += member.size
        if self.members > MAX_MEMBERS or self.bytes > MAX_BYTES:
            raise UnsafeMember(member, "the archive is larger than any snapshot")


class _Bounded:
    """A decompressed stream that refuses to go past `limit` bytes (a gzip bomb)."""

    def __init__(self, f: Any, limit: int) -> None:
        self.f = f
        self.limit = limit

    def read(self, size: int = -1) -> bytes:
        # tarfile reads headers by the block and data in small pieces; only a PAX or long
        # name header asks for its whole declared size at once: far smaller in a snapshot.
        if not 0 <= size <= CHUNK:
            raise tarfile.ReadError("a header larger than any snapshot's")
        if self.f.tell() + size > self.limit:
            raise tarfile.ReadError("the archive is larger than any snapshot")
        return self.f.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET and offset > self.limit:
            raise tarfile.ReadError("the archive is larger than any snapshot")
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()


def _members(tar: tarfile.TarFile, stream: _Bounded) -> list[tarfile.TarInfo]:
    """Every member's header, checked, and the archive read to its end.

    tarfile ends an archive silently at a header that does not parse: only zero
    blocks may follow the last member. Reading the gzip stream to its end is what
    makes the gzip module verify the CRC and the length in its trailer.
    """
    budget = _Budget()
    members: list[tarfile.TarInfo] = []
    for member in tar:
        budget.check(member)
        members.append(member)
    stream.seek(tar.offset)
    tail = 0
    while chunk := stream.read(min(CHUNK, stream.limit - stream.tell())):
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(f"a header at byte {tar.offset} that does not parse")
        tail += len(chunk)
    if stream.f.read(1):
        raise tarfile.ReadError("the archive is larger than any snapshot")
    if tail < 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError("the archive is cut short (no end-of-archive blocks)")
    return members


_EXTRACTED: list[str] = []
_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _remove_extracted() -> None:
    while _EXTRACTED:
        shutil.rmtree(_EXTRACTED.pop(), ignore_errors=True)


def _on_signal(signum: int, frame: Any) -> None:
    """Remove the extracted trees, then die of the signal as if no handler were set."""
    _remove_extracted()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _guard_extractions() -> None:
    """From the first extraction to the process's end, every exit removes the trees."""
    if not _EXTRACTED and threading.current_thread() is threading.main_thread():
        for signum in _SIGNALS:
            if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(signum, _on_signal)
        atexit.register(_remove_extracted)


def remove_extractions() -> None:
    """Remove every tree `extract_snapshot` made, now (before an exec replaces us)."""
    _remove_extracted()


def extract_snapshot(archive: str) -> str:
    """Extract a snapshot into a new temporary directory removed at exit; return it.

    The archive is read whole or refused (DESIGN.md, "Snapshots"): a first pass
    checks every header, bounds the member count and total size, and reads the
    gzip stream to its end (CRC and length verified) before anything is written;
    the second pass extracts. SIGTERM, SIGHUP and SIGINT remove the tree too.
    """
    _guard_extractions()
    tmp = tempfile.mkdtemp(prefix="tdx-preflight-root-")
    _EXTRACTED.append(tmp)
    try:
        with gzip.open(archive, "rb") as gz:
            stream = _Bounded(gz, _STREAM_LIMIT)
            with tarfile.open(fileobj=stream, mode="r:", errorlevel=2) as tar:
                members = _members(tar, stream)
                if _FILTERS:
                    tar.extractall(tmp, members, filter="data")
                else:
                    for member in members:
                        tar.extract(member, tmp, set_attrs=False)  # no owners, modes, setuid
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        _EXTRACTED.remove(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SnapshotError(f"bad snapshot archive {archive}: {why}") from None
    return tmp
