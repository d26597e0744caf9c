"""guests.td, guests.teardown and guests.vm: what kexec would destroy."""

from __future__ import annotations

from typing import Any

from ..facts import HostFacts
from ..host import Problem
from ..readers.vmclass import Guest
from .base import Outcome, check, plural


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


def _leaked(facts: HostFacts) -> tuple[int, ...]:
    """Distinct HKIDs the kernel log says leaked (`... HKID N is leaked`), sorted."""
    log = facts.tdx_log
    return () if isinstance(log, Problem) else tuple(sorted(set(log.leaked_hkids)))


def _leak_absorbs(facts: HostFacts, count: int) -> bool:
    """No VM exists, enumeration is complete and the log names at least `count` leaked
    HKIDs: root misc.current counts the leak, not live TDs (DESIGN.md guests.td)."""
    e = facts.enumeration
    return not facts.guests and e.complete and len(_leaked(facts)) >= count


def _misc_remedy(facts: HostFacts) -> str:
    """How to make the root misc count readable, from what the host is (DESIGN.md Remedies)."""
    cur = facts.root_tdx_current
    view = facts.view
    if view.misc_cgroup == "not the root" or view.cgroup_namespace.foreign:
        return "Run the check in the host's cgroup namespace (not in a container)."
    if isinstance(cur, Problem) and cur.kind == "permission":
        return "Run as root so the root misc cgroup (misc.current) can be read."
    if view.misc_cgroup == "v1":
        return (
            "This cgroup v1 host's misc hierarchy has no tdx count (a kernel before KVM TDX "
            "accounting): shut the VMs down or identify them by their launch."
        )
    if view.misc_cgroup == "unavailable":
        return (
            "No misc cgroup is mounted (neither cgroup v2 nor v1's misc hierarchy): "
            "shut the VMs down or identify them by their launch."
        )
    return "Use a kernel with KVM TDX misc cgroup accounting (Linux 6.16 or later)."


def _enum_remedy(facts: HostFacts) -> str:
    e = facts.enumeration
    if e.problem is not None and e.problem.kind == "permission":
        if e.denied_to_root:
            # Live host, and the tool already has root and both capabilities: more
            # privilege is not the fix; the namespace or the security policy is.
            fix = (
                "Running as root with CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE was not enough: "
                "an LSM (AppArmor, SELinux), a user namespace or a container denies "
                "/proc/PID/fd. Run in the host's namespaces, outside that confinement"
            )
            if e.method == "proc":
                fix += (
                    ", or mount debugfs (mount -t debugfs none /sys/kernel/debug): its "
                    "kvm/ directory lists every VM without reading /proc/PID/fd"
                )
            return fix + "."
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
        "/sys/kernel/debug/kvm/ and /proc/*/fd (kvm-vm and kvm-vcpu descriptors)",
        "/proc/PID/{status,cmdline,comm,cgroup}",
        "/sys/fs/cgroup/**/misc.current (cgroup v1: /sys/fs/cgroup/misc/**)",
        "/run/libvirt/qemu/*.xml",
        "/proc/self/ns/{pid,cgroup} (the host view)",
        "/dev/kmsg (HKID N is leaked)",
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
    if not tds and isinstance(cur, int) and cur > 0 and _leak_absorbs(facts, cur):
        evidence["leaked_hkids"] = list(_leaked(facts))
        outcome = Outcome(
            "pass",
            f"no TD guest alive: root misc.current tdx {cur} counts leaked KeyIDs "
            "(guests.teardown)",
            evidence,
        )
    elif tds or (isinstance(cur, int) and cur > 0):
        count = max(len(tds), cur if isinstance(cur, int) else 0)
        who = f": {_names(tds)}" if tds else f" (root misc.current tdx {cur})"
        outcome = Outcome(
            "fail",
            f"{plural(count, 'TD guest')} alive{who}",
            evidence,
            "Shut down or migrate these TD guests before kexec (virsh shutdown NAME, or stop "
            "the VMM); `tdx-preflight guests` shows when they are gone.",
        )
    elif unknown:
        evidence["unknown"] = [_brief(g) for g in unknown]
        outcome = Outcome(
            "unknown",
            f"{plural(len(unknown), 'VM')} cannot be classified as TD or plain VM: "
            f"{_names(unknown)}",
            evidence,
            f"{_misc_remedy(facts)} Or stop these VMs.",
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
    reads=(
        "/sys/fs/cgroup/misc.{capacity,current} (cgroup v1: /sys/fs/cgroup/misc/)",
        "KVM VM enumeration",
        "the daemon's ledger",
        "/dev/kmsg (HKID N is leaked)",
    ),
    remedies={
        "fail": "Wait for the TD teardown to finish (misc.current tdx 0). If a KeyID leaked "
        "(dmesg: 'HKID ... is leaked'), only a cold reboot releases it.",
        "unknown": "Make the root misc.current readable (cgroup v2, or v1's misc hierarchy; "
        "Linux 6.16 or later for KVM TDX accounting), from the host's cgroup namespace.",
    },
    skips={"load": "only checked before kexec -e", "crash": "only checked before kexec -e"},
)
def guests_teardown(facts: HostFacts, phase: str) -> Outcome:
    cur = facts.root_tdx_current
    evidence = _enumeration_evidence(facts)
    reasons: list[str] = []
    leaked = _leaked(facts)
    if leaked:
        evidence["leaked_hkids"] = list(leaked)
    if isinstance(cur, int) and cur > 0:
        reasons.append(f"root misc.current tdx {cur}: {plural(cur, 'TD KeyID')} still held")
    ledger = facts.ledger
    if ledger is not None and ledger.tds_not_destroyed:
        evidence["ledger_live_tds"] = list(ledger.tds_not_destroyed)
        reasons.append(
            f"the daemon saw {plural(len(ledger.tds_not_destroyed), 'TD')} created and never "
            "destroyed"
        )
    if leaked:
        reasons.append(
            f"the kernel log says HKID {', '.join(map(str, leaked))} leaked: only a cold "
            "reboot releases it"
        )
    if reasons:
        remedy = "Wait until TD teardown completes (root misc.current tdx 0)."
        if leaked:
            remedy = (
                "A leaked KeyID is never released by a kexec or a warm reboot: cold-reboot "
                "(power-cycle) the host instead of kexec."
            )
        return Outcome("fail", "; ".join(reasons), evidence, remedy)
    if isinstance(cur, int):
        return Outcome("pass", "root misc.current tdx 0: every TD KeyID released", evidence)
    # Without VMs only a count the kernel does not keep may be done without: a misc
    # file that exists but is malformed or unreadable could hide a teardown in progress.
    if facts.enumeration.complete and not facts.guests and cur.kind == "absent":
        return Outcome("pass", "no KVM VM exists", evidence)
    return Outcome(
        "unknown",
        f"cannot confirm TD teardown: root misc.current {cur}",
        evidence,
        _misc_remedy(facts),
    )


@check(
    "guests.vm",
    "Plain VMs",
    blocking=(),
    tdx_only=False,
    question="Are plain (non-TD) KVM VMs alive? They die with the kexec.",
    why="kexec ends every process, VMs included; their owners lose them unless they were "
    "shut down or migrated first.",
    reads=("/sys/kernel/debug/kvm/ and /proc/*/fd (kvm-vm and kvm-vcpu)", "/proc/PID/*"),
    remedies={
        "warn": "Shut down or migrate the VMs listed if their work matters.",
        "unknown": "Run as root, or mount debugfs, so VMs can be enumerated.",
    },
)
def guests_vm(facts: HostFacts, phase: str) -> Outcome:
    vms = _by_kind(facts, "vm")
    evidence = _enumeration_evidence(facts)
    evidence["vms"] = [_brief(g) for g in vms]
    e = facts.enumeration
    if vms:
        more = "" if e.complete else f" (and the list is not complete: {e.problem})"
        return Outcome(
            "warn",
            f"{plural(len(vms), 'plain VM')} alive: {_names(vms)}{more}",
            evidence,
            "Shut down or migrate these VMs if their work matters; kexec ends them.",
        )
    if not e.complete:
        problem: Problem | None = e.problem
        return Outcome(
            "unknown",
            f"cannot enumerate VMs: {problem}",
            evidence,
            _enum_remedy(facts),
        )
    return Outcome("pass", "no plain VM alive", evidence)
