"""The gate: the hook for kexec wrappers, the exec wrapper, and the override.

Nothing here runs a shell or passes an argument through one: the hook only
reads kexec's arguments, and exec replaces itself with the command's argv.
"""

from __future__ import annotations

import os
import pwd
from typing import NamedTuple

#: kexec options that take their value as the next argument (getopt_long style).
_KEXEC_VALUE_OPTIONS = frozenset(
    ("--initrd", "--ramdisk", "--append", "--command-line", "--dtb", "--type", "-t",
     "--mem-min", "--mem-max", "--console-serial", "--entry")
)  # fmt: skip
_LOAD = frozenset(("-l", "--load", "-s", "--kexec-file-syscall", "-c", "--kexec-syscall"))
_CRASH = frozenset(("-p", "--load-panic"))
_EXEC = frozenset(("-e", "--exec"))


class KexecArgs(NamedTuple):
    phase: str | None  # what the arguments do: "load", "crash", "exec" or None
    image: str | None  # the kernel image they name, if any


def parse_kexec_args(args: list[str]) -> KexecArgs:
    """Which phase kexec's arguments are for, and the image they load.

    kexec takes the image as its one positional argument (`kexec -l IMAGE
    --initrd=... --append=...`); short options may be bundled (`-sl`).
    """
    phase: str | None = None
    image: str | None = None
    skip = False
    positional_only = False
    for arg in args:
        if skip:
            skip = False
            continue
        if positional_only or not arg.startswith("-") or arg == "-":
            if image is None:
                image = arg
            continue
        if arg == "--":
            positional_only = True
            continue
        name = arg.split("=", 1)[0]
        if name in _KEXEC_VALUE_OPTIONS and "=" not in arg:
            skip = True
            continue
        letters = set(arg[1:]) if not arg.startswith("--") else set()
        if name in _CRASH or "p" in letters:
            phase = "crash"
        elif name in _LOAD or letters & {"l", "s", "c"}:
            phase = phase or "load"
        elif name in _EXEC or "e" in letters:
            phase = phase or "exec"
    return KexecArgs(phase, image)


class Override(NamedTuple):
    by: str
    reason: str


class OverrideRefused(Exception):
    """An override that may not be used (not root, no reason)."""


def override(force: bool, reason: str | None) -> Override | None:
    """The operator's override, or None; refuses non-root callers and empty reasons."""
    if not force:
        if reason:
            raise OverrideRefused("--reason is only meaningful with --force")
        return None
    if os.geteuid() != 0:
        raise OverrideRefused("--force needs root")
    if not reason or not reason.strip():
        raise OverrideRefused("--force needs --reason TEXT saying why")
    return Override(invoker(), reason.strip())


def invoker() -> str:
    """Who is acting: the sudo user when there is one, with the real uid."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    sudo = os.environ.get("SUDO_USER")
    return f"{sudo} (via sudo, uid {uid})" if sudo else f"{name} (uid {uid})"


def log_override(ov: Override, phase: str, verdict: str, summary: str) -> None:
    """Record an override in syslog/the journal (auth facility: it is a security decision)."""
    import syslog

    syslog.openlog("tdx-preflight", syslog.LOG_PID, syslog.LOG_AUTH)
    syslog.syslog(
        syslog.LOG_WARNING,
        f"override by {ov.by}: {phase} {verdict} overridden; reason: {ov.reason}; "
        f"report: {summary}",
    )
    syslog.closelog()
