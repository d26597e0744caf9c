"""guests.td, guests.teardown and guests.vm: what kexec would destroy."""

from __future__ import annotations

from typing import Any

from ..facts import HostFacts
from ..host import Problem
from ..readers.kvm import Guest
from .base import Outcome, check


def _names(guests: list[Guest]) -> str:
    shown = [f"{g.name or '?'} (pid {g.pid if g.pid is not None else '?'})" for g in guests[:5]]
    more = f" and {len(guests) - 5} more" if len(guests) > 5 else ""
    return ", ".join(shown) + more


def _brief(g: Guest) -> dict[str, object]:
    """A guest as evidence: who it is; the report's guest list has the rest."""
    return {"pid": g.pid, "name": g.name}


def _enumeration_evidence(facts: HostFacts) -> dict[str, Any]:
    e = facts.enumeration
    out: dict[str, Any] = {"vm_enumeration": e.method or "unavailable"}
    if e.problem:
        out["vm_enumeration_problem"] = str(e.problem)
    cur = facts.root_tdx_current
    out["root_misc_current_tdx"] = cur if isinstance(cur, int) else str(cur)
    return out


def _by_kind(facts: HostFacts, kind: str) -> list[Guest]:
    return [g for g in facts.guests if g.kind == kind]


def _enum_remedy(facts: HostFacts) -> str:
    e = facts.enumeration
    if e.problem is not None and e.problem.kind == "permission":
        return "Run as root (CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE) so every VM can be found."
    return "Mount debugfs (mount -t debugfs none /sys/kernel/debug) or make /proc readable."


@check(
    "guests.td",
    "TD guests",
    blocking=("exec",),
    tdx_only=True,
    question="Are TD guests alive on this host?",
    why="kexec destroys every running TD guest and its tenant's work, and a TD must be torn "
    "down (its KeyID freed, its caches written back) before the jump. The misc cgroup's "
    "tdx count is the kernel's own tally of live TDs.",
    reads=(
        "/sys/kernel/debug/kvm/ (else /proc/*/fd)",
        "/proc/PID/{status,cmdline,comm,cgroup}",
        "/sys/fs/cgroup/**/misc.current",
        "/run/libvirt/qemu/*.xml",
    ),
    remedies={
        "fail": "Shut down or migrate the TD guests listed (virsh shutdown NAME, or stop the "
        "VMM), wait until `tdx-preflight guests` shows none, then try again.",
        "unknown": "Find out what the unclassified VMs are (tdx-preflight guests -v); run as "
        "root so VMs and the misc cgroup can be read.",
        "warn": "TD guests are alive: they must be gone before kexec -e.",
    },
    skips={"crash": "not applicable to loading a crash kernel"},
)
def guests_td(facts: HostFacts, phase: str) -> Outcome:
    tds = _by_kind(facts, "td")
    unknown = _by_kind(facts, "unknown")
    evidence = _enumeration_evidence(facts)
    evidence["tds"] = [_brief(g) for g in tds]
    cur = facts.root_tdx_current
    if tds or (isinstance(cur, int) and cur > 0):
        count = max(len(tds), cur if isinstance(cur, int) else 0)
        who = f": {_names(tds)}" if tds else f" (root misc.current tdx {cur})"
        outcome = Outcome(
            "fail",
            f"{count} TD guest{'s' if count != 1 else ''} alive{who}",
            evidence,
            "Shut down or migrate these TD guests before kexec (virsh shutdown NAME, or stop "
            "the VMM); `tdx-preflight guests` shows when they are gone.",
        )
    elif unknown:
        evidence["unknown"] = [_brief(g) for g in unknown]
        outcome = Outcome(
            "unknown",
            f"{len(unknown)} VMs cannot be classified as TD or plain VM: {_names(unknown)}",
            evidence,
            "Make the root misc cgroup readable (misc.current) or stop these VMs.",
        )
    elif not facts.enumeration.complete and not isinstance(cur, int):
        outcome = Outcome(
            "unknown",
            f"cannot tell whether TDs run: VM enumeration failed and root misc.current {cur}",
            evidence,
            _enum_remedy(facts),
        )
    else:
        outcome = Outcome("pass", "no TD guest alive", evidence)
    if phase == "load":
        return outcome.at_worst_warn("load phase: TDs must be gone before exec, not before load")
    return outcome


@check(
    "guests.teardown",
    "TD teardown complete",
    blocking=("exec",),
    tdx_only=True,
    question="Have all TD KeyIDs been released (teardown and cache write-back done)?",
    why="A TD's KeyID is freed only after TDH.PHYMEM.CACHE.WB wrote its cache lines back; "
    "until the root misc cgroup's tdx count reads zero a teardown is still in progress or "
    "a KeyID leaked, and a kexec could leave dirty private cache lines behind.",
    reads=("/sys/fs/cgroup/misc.current", "KVM VM enumeration", "the daemon's ledger"),
    remedies={
        "fail": "Wait for the TD teardown to finish (misc.current tdx 0). If a KeyID leaked "
        "(dmesg: 'HKID ... is leaked'), only a cold reboot releases it.",
        "unknown": "Make /sys/fs/cgroup/misc.current readable (cgroup v2 with the misc "
        "controller, Linux 6.16 or later for KVM TDX accounting).",
    },
    skips={"load": "only checked before kexec -e", "crash": "only checked before kexec -e"},
)
def guests_teardown(facts: HostFacts, phase: str) -> Outcome:
    cur = facts.root_tdx_current
    evidence = _enumeration_evidence(facts)
    reasons: list[str] = []
    if isinstance(cur, int) and cur > 0:
        reasons.append(f"root misc.current tdx {cur}: {cur} TD KeyIDs still held")
    ledger = facts.ledger
    if ledger is not None and ledger.tds_not_destroyed:
        evidence["ledger_live_tds"] = list(ledger.tds_not_destroyed)
        reasons.append(
            f"the daemon saw {_n(len(ledger.tds_not_destroyed), 'TD')} created and never destroyed"
        )
    if reasons:
        return Outcome(
            "fail",
            "; ".join(reasons),
            evidence,
            "Wait until TD teardown completes (root misc.current tdx 0); a leaked KeyID "
            "(dmesg 'HKID ... is leaked') needs a cold reboot.",
        )
    if isinstance(cur, int):
        return Outcome("pass", "root misc.current tdx 0: every TD KeyID released", evidence)
    if facts.enumeration.complete and not facts.guests:
        return Outcome("pass", "no KVM VM exists", evidence)
    return Outcome(
        "unknown",
        f"cannot confirm TD teardown: root misc.current {cur}",
        evidence,
        "Use a kernel with KVM TDX misc cgroup accounting (Linux 6.16 or later) and cgroup v2.",
    )


@check(
    "guests.vm",
    "Plain VMs",
    blocking=(),
    tdx_only=False,
    question="Are plain (non-TD) KVM VMs alive? They die with the kexec.",
    why="kexec ends every process, VMs included; their owners lose them unless they were "
    "shut down or migrated first.",
    reads=("/sys/kernel/debug/kvm/ (else /proc/*/fd)", "/proc/PID/*"),
    remedies={
        "warn": "Shut down or migrate the VMs listed if their work matters.",
        "unknown": "Run as root, or mount debugfs, so VMs can be enumerated.",
    },
)
def guests_vm(facts: HostFacts, phase: str) -> Outcome:
    vms = _by_kind(facts, "vm")
    evidence = _enumeration_evidence(facts)
    evidence["vms"] = [_brief(g) for g in vms]
    if vms:
        return Outcome(
            "warn",
            f"{len(vms)} plain VM{'s' if len(vms) != 1 else ''} alive: {_names(vms)}",
            evidence,
            "Shut down or migrate these VMs if their work matters; kexec ends them.",
        )
    e = facts.enumeration
    if not e.complete:
        problem: Problem | None = e.problem
        return Outcome(
            "unknown",
            f"cannot enumerate VMs: {problem}",
            evidence,
            _enum_remedy(facts),
        )
    return Outcome("pass", "no plain VM alive", evidence)


def _n(count: int, noun: str) -> str:
    """`1 TD`, `2 TDs`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
