"""The gate's override: who may force a blocked kexec through, and its record.

kexec's arguments are read in kexec_args.py. Nothing of the gate runs a shell
or passes an argument through one: the hook only reads kexec's arguments, and
exec replaces itself with the command's argv.
"""

from __future__ import annotations

import os
import pwd
from typing import NamedTuple


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
