"""Redaction: command lines reduced to what the classifier reads (and libvirt's XML).

Both formats are read only by readers/vmclass.py: this module walks a command
line with its `option_values` and asks it which values are TD evidence, and
libvirt's XML is reduced by its `minimal_libvirt_xml`. What stays here is the
snapshot's rule: what to keep, and that redaction never changes a classification.
"""

from __future__ import annotations

from ..readers import vmclass
from ..readers.vmclass import minimal_libvirt_xml, parse_pid_file

__all__ = ["REDACTED", "classified", "minimal_libvirt_xml", "parse_pid_file", "redact_cmdline"]

REDACTED = b"REDACTED"


def _value_matters(option: str, value: str) -> bool:
    """Whether the classifier reads this option value (readers/vmclass.py)."""
    return option in ("-name", "--name") or vmclass.option_td_evidence(option, value) is not None


def redact_cmdline(raw: bytes) -> tuple[bytes, int]:
    """A NUL-separated command line with every argument the classifier ignores replaced.

    Kept: argv[0], TD evidence (a tdx-guest `-object`, `--platform` with tdx=on,
    `--tdx`), the `-name` values, and the option names of kept values. The walk is
    the classifier's own (`vmclass.option_values`), so an option that swallows the
    next argument swallows the same argument here. Returns the new bytes and how
    many arguments were replaced; kept arguments are the original bytes.
    """
    body = raw[:-1] if raw.endswith(b"\0") else raw
    if not body:
        return raw, 0
    args = body.split(b"\0")
    text = vmclass.parse_cmdline(raw)
    keep = [i == 0 or vmclass.is_tdx_flag(arg) for i, arg in enumerate(text)]
    for option, value, at, value_at in vmclass.option_values(text):
        if keep[value_at] or _value_matters(option, value):
            keep[at] = keep[value_at] = True  # a kept value keeps its option's name
    out = [a if k else REDACTED for a, k in zip(args, keep, strict=True)]
    replaced = sum(1 for a, k in zip(args, keep, strict=True) if not k and a != REDACTED)
    return b"\0".join(out) + (b"\0" if raw.endswith(b"\0") else b""), replaced


def classified(raw: bytes) -> tuple[str | None, str | None]:
    """What the classifier takes from a command line: (TD evidence, QEMU name)."""
    args = vmclass.parse_cmdline(raw)
    opts = vmclass.options(args)
    return vmclass.cmdline_td_evidence(args, opts), vmclass.qemu_name(args, opts)
