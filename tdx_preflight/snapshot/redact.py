"""Redaction: command lines and libvirt's live XML reduced to what the classifier reads.

Both formats are parsed only by readers/kvm.py; this module decides what a
snapshot keeps of them and never reads them another way.
"""

from __future__ import annotations

from ..host import Problem
from ..readers import kvm

REDACTED = b"REDACTED"


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


def classified(raw: bytes) -> tuple[str | None, str | None]:
    args = kvm.parse_cmdline(raw)
    opts = kvm.options(args)
    return kvm.cmdline_td_evidence(args, opts), kvm.qemu_name(args, opts)


def pid_in_file(data: bytes | None) -> int | None:
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
