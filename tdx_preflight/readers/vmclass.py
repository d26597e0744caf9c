"""KVM VMs: TD classification of the enumerated VMs (readers/kvm.py enumerates them).

The rules are DESIGN.md's "Classification of each VM". This module is the one
reader of the foreign formats classification needs: a process's command line
(QEMU's and cloud-hypervisor's options) and libvirt's live status XML; the
snapshot's redaction (snapshot/redact.py) reduces them through it.
"""

from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from ..host import Host, Problem, parse_uint
from .cgroup import MiscRoot, misc_file, parse_misc, parse_proc_cgroup, tdx_count

if TYPE_CHECKING:  # types only: xml.etree loads when a libvirt file is read
    from xml.etree.ElementTree import Element

    from .kvm import Enumeration, VmHandle

LIBVIRT_QEMU = "run/libvirt/qemu"


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


# -- processes ------------------------------------------------------------------


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


def option_values(args: tuple[str, ...]) -> Iterator[tuple[str, str, int, int]]:
    """The options that classify and name a VM (`-o V` or `-o=V`), in order, as
    (option, value, the option's index, the value's index): the one walk of a
    command line, which the classifier and the snapshot's redaction share."""
    take: str | None = None
    take_at = 0
    for i, arg in enumerate(args):
        if take is not None:
            yield take, arg, take_at, i
            take = None
        elif arg in _OPTIONS:
            take, take_at = arg, i
        elif arg[:1] == "-" and "=" in arg:
            name, _, value = arg.partition("=")
            if name in _OPTIONS:
                yield name, value, i, i


def options(args: tuple[str, ...]) -> dict[str, list[str]]:
    """Values of the options that classify and name a VM, by option (`-o V` or `-o=V`)."""
    out: dict[str, list[str]] = {}
    for option, value, _, _ in option_values(args):
        out.setdefault(option, []).append(value)
    return out


def is_tdx_flag(arg: str) -> bool:
    """cloud-hypervisor's `--tdx`, which counts wherever it stands on the line."""
    return arg == "--tdx" or arg.startswith("--tdx=")


def option_td_evidence(option: str, value: str) -> str | None:
    """Why one option's value launches a TD, or None."""
    if option in ("-object", "--object"):
        stripped = value.lstrip()
        if stripped.startswith("{"):
            # Without a backslash, JSON holds its strings verbatim: an object that does not
            # spell tdx-guest is not one (libvirt passes every -object in this form).
            if "tdx-guest" not in stripped and "\\" not in stripped:
                return None
            import json  # only for a JSON object that may be one

            try:
                obj = json.loads(stripped)
            except ValueError:
                return None
            if isinstance(obj, dict) and obj.get("qom-type") == "tdx-guest":
                return 'command line: QEMU -object {"qom-type":"tdx-guest"} (JSON form)'
            return None
        parts = _keyval(value)
        if parts[0] == "tdx-guest" or "qom-type=tdx-guest" in parts:
            return "command line: QEMU -object tdx-guest"
    elif option == "--platform" and "tdx=on" in value.split(","):
        return "command line: cloud-hypervisor --platform tdx=on"
    return None


def cmdline_td_evidence(
    args: tuple[str, ...], opts: dict[str, list[str]] | None = None
) -> str | None:
    """Why a command line launches a TD, or None (`opts`: options(args), if known)."""
    opts = options(args) if opts is None else opts
    for option in ("-object", "--object", "--platform"):
        for value in opts.get(option, []):
            evidence = option_td_evidence(option, value)
            if evidence:
                return evidence
    # One search of the joined line tells whether any argument can be `--tdx=...`: an
    # argument that starts so leaves its text in the join (QEMU lines never do).
    if "--tdx" in args or ("--tdx=" in "\0".join(args) and any(map(is_tdx_flag, args))):
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


def _status_tree(data: bytes, path: str) -> "tuple[Element, Element] | Problem":
    """The root and <domain> elements of a live status XML: the one parse of it."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(data)
    except (ET.ParseError, ValueError) as exc:
        return Problem("malformed", path, f"not XML: {exc}")
    domain = root if root.tag == "domain" else root.find("domain")
    if domain is None:
        return Problem("malformed", path, "no <domain> element")
    return root, domain


def parse_libvirt_status(data: bytes, path: str, pid_file: int | None) -> LibvirtDomain | Problem:
    """A libvirt live status XML (<domstatus pid=...><domain>...</domain></domstatus>)."""
    tree = _status_tree(data, path)
    if isinstance(tree, Problem):
        return tree
    root, domain = tree
    name = (domain.findtext("name") or "").strip()
    pid = parse_uint(root.get("pid", ""), 10) if root.tag == "domstatus" else None
    if pid is None:
        pid = pid_file
    if not name or pid is None:
        return Problem("malformed", path, "no domain name or pid")
    ls = domain.find("launchSecurity")
    return LibvirtDomain(name, pid, ls.get("type") if ls is not None else None, path)


def parse_pid_file(data: bytes) -> int | None:
    """libvirt's NAME.pid: one decimal pid (surrounding white space allowed), else None."""
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return parse_uint(text, 10)


def minimal_libvirt_xml(data: bytes, pid_file: int | None) -> bytes | None:
    """libvirt's live status XML reduced to what the classifier reads, or None.

    The domain XML names disk images, sockets and secrets; the classifier reads the
    pid, the domain name and the launchSecurity type. None when the reduced XML
    would not parse to the same domain (with or without the pid file).
    """
    from xml.sax.saxutils import escape, quoteattr

    original = parse_libvirt_status(data, "", pid_file)
    tree = _status_tree(data, "")
    if isinstance(original, Problem) or isinstance(tree, Problem):
        return None
    root, _ = tree
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
        if parse_libvirt_status(data, "", pf) != parse_libvirt_status(out, "", pf):
            return None
    return out


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
        raw = host.read_bytes(f"{LIBVIRT_QEMU}/{base}.pid", 4096)
        pid_file = parse_pid_file(raw) if isinstance(raw, bytes) else None
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

    def __init__(self, handle: "VmHandle", proc: Process | None) -> None:
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
    enumeration: "Enumeration",
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
