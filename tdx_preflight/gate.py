"""The gate's override (who may force a blocked kexec through, and its record), and whether
a kdump restart keeps the crash kernel it armed.

kexec's arguments are read in kexec_args.py. Nothing of the gate runs a shell
or passes an argument through one: the hook only reads kexec's arguments, and
exec replaces itself with the command's argv.
"""

import os
import pwd
from typing import Any, NamedTuple


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


#: Checks whose failure means the running kernel itself refuses a new (crash) kernel load:
#: the partial-write erratum (kexec_load and kexec_file_load return EOPNOTSUPP), and no kexec
#: or no crash memory (kernel.kexec).
KERNEL_REFUSES = ("errata.tdx_pw_mce", "kernel.kexec")


def keep_armed_crash_kernel(report: Any) -> tuple[bool, str]:
    """Should a restart of the kdump unit keep the crash kernel it armed earlier?

    `report` is the crash phase's. Keep (True) when a crash kernel is loaded now, the crash
    phase blocks, and the kernel itself would accept a new load (no KERNEL_REFUSES check
    fails): the block is then a condition of ours (a policy, a check that cannot be read), and
    unloading would leave the host without crash dumps because of it. Otherwise (nothing
    loaded, the check allows, or the kernel refuses loads) the unit's stop runs as usual.
    Returns the decision and a one-line reason.
    """
    loaded = report.facts.kexec.crash_loaded
    if loaded != 1:
        return False, "no crash kernel is loaded: nothing to keep"
    if report.verdict == "allow":
        return False, "the crash phase allows a new load: the restart reloads it"
    refused = [r.id for r in report.results if r.id in KERNEL_REFUSES and r.status == "fail"]
    if refused:
        return False, f"the kernel itself refuses a new load ({', '.join(refused)}): unloading"
    blockers = ", ".join(f"{r.id} {r.blocks}" for r in report.results if r.blocks)
    return True, f"keeping the crash kernel loaded earlier: a new load is blocked by {blockers}"
