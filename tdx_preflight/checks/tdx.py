"""tdx.module, tdx.module_update, errata.tdx_pw_mce and postkexec.tdx: the TDX module and
what it implies for a kexec."""

from __future__ import annotations

from typing import Any

from ..facts import HostFacts
from ..host import Problem
from ..readers import tdx
from . import derived
from .base import Outcome, Settings, check, plural, problem_remedy


def _log_evidence(facts: HostFacts) -> dict[str, Any]:
    log = facts.tdx_log
    if isinstance(log, Problem):
        return {"kernel_log": log.to_json()}
    out: dict[str, Any] = {"kernel_log_records": log.records}
    if log.keyid_range:
        out["keyid_range"] = list(log.keyid_range)
    if log.pamt_kb is not None:
        out["pamt_kb"] = log.pamt_kb
    if log.leaked_hkids:
        out["leaked_hkids"] = list(log.leaked_hkids)
    if log.lines:
        out["tdx_log_lines"] = list(log.lines[-10:])
    return out


@check(
    "tdx.module",
    "TDX module",
    blocking=(),
    tdx_only=True,
    question="Is the TDX module initialized, and which version is it?",
    why="Only an initialized module runs TD guests and dirties caches through private "
    "KeyIDs; a failed initialization explains why no TD can run. The state also decides "
    "what the next kernel can do (postkexec.tdx), and the version whether the operator "
    "vouched for its TDH.SYS.DISABLE (errata.tdx_pw_mce).",
    reads=(
        "/sys/devices/faux/tdx_host/version (7.2+)",
        "/sys/firmware/tdx/tdx_module/{status,major_version,minor_version,...} (older "
        "Intel kernels)",
        "/sys/module/kvm_intel/parameters/tdx",
        "/dev/kmsg (virt/tdx lines: initialized, initialization failed and its reason, "
        "module not loaded, the version line)",
    ),
    remedies={
        "warn": "Follow the reason the kernel log gives (hibernation enabled: disable it; too "
        "few KeyIDs: change the BIOS split; module not loaded: enable it in the BIOS; TDMR "
        "reserved areas exhausted: update the TDX module), then cold reboot; run as root "
        "when the log could not be read.",
    },
)
def tdx_module(facts: HostFacts, phase: str) -> Outcome:
    mod = facts.module
    evidence: dict[str, Any] = {"module": mod.to_json(), **_log_evidence(facts)}
    log = facts.tdx_log
    reason = log.failure if isinstance(log, tdx.TdxLog) else None
    ver = f" (version {mod.version})" if mod.version else ""
    if mod.state == "initialized":
        return Outcome("pass", f"TDX module initialized{ver}", evidence)
    if mod.state == "failed":
        return Outcome(
            "warn",
            f"TDX module initialization failed: {reason or 'see the log'}{ver}",
            evidence,
            derived.failure_remedy(reason),
        )
    if mod.state == "not loaded":
        return Outcome(
            "warn",
            f"TDX module not loaded (the kernel log: {reason or 'module not loaded'}; the BIOS "
            "loaded no TDX module)",
            evidence,
            derived.failure_remedy("module not loaded"),
        )
    if mod.state == "not initialized":
        said = mod.sources.get("firmware tdx_module status", "?")
        return Outcome(
            "warn",
            f"TDX is in use but the TDX module is not initialized (status: {said})",
            evidence,
            "Look at the kernel log (dmesg | grep -i tdx) for why the module was not brought up.",
        )
    if mod.state == "not supported":
        return Outcome(
            "warn",
            "the kernel log says TDX is not supported by the host platform, yet another "
            "source says TDX is in use",
            evidence,
            "Compare the sources in the evidence; check the BIOS TDX settings.",
        )
    remedy = "Run as root so the kernel log and sysfs can be read."
    if isinstance(log, Problem) and log.kind == "permission":
        remedy = problem_remedy("permission", "/dev/kmsg")
    return Outcome(
        "warn", "TDX is in use but no source tells the TDX module state", evidence, remedy
    )


def _vouched(facts: HostFacts, settings: Settings, evidence: dict[str, Any]) -> str | None:
    """Record the module version in `evidence`; when sys_disable_module_versions lists it,
    record that the outcome rests on the list and return the version."""
    evidence["module_version"] = facts.module.version
    vouched = derived.vouched_evidence(facts, settings)
    if vouched is None:
        return None
    evidence.update(vouched)
    return vouched["module_version"]


UPDATE_STATES = ("idle", "receiving", "preparing", "transferring", "programming")


@check(
    "tdx.module_update",
    "TDX module update",
    blocking=("exec",),
    tdx_only=True,
    question="Is a runtime TDX module update in flight?",
    why="Linux 7.2 can replace the TDX module at runtime (P-SEAMLDR, through the "
    "firmware-upload device); the update runs under stop_machine and nothing on the kexec "
    "path waits for it, so a kexec must not cut into it.",
    reads=(
        "/sys/class/firmware/tdx_module/{status,error} (7.2+)",
        "/sys/devices/faux/tdx_host/{seamldr_version,num_remaining_updates} or "
        "tdx_host/seamldr/{version,num_remaining_updates} (evidence)",
    ),
    remedies={
        "fail": "Wait until /sys/class/firmware/tdx_module/status reads idle (the update "
        "finished or failed; see its error file), then run again.",
        "unknown": "Run as root so /sys/class/firmware/tdx_module/status can be read.",
    },
)
def tdx_module_update(facts: HostFacts, phase: str) -> Outcome:
    upd = facts.module_update
    if upd is None:
        return Outcome(
            "pass",
            "no runtime TDX module update on this kernel (sys/class/firmware/tdx_module absent)",
            {"fw_upload": "absent"},
        )
    evidence: dict[str, Any] = dict(upd.seamldr)
    if upd.error is not None:
        evidence["error"] = upd.error
    status = upd.status
    if isinstance(status, Problem):
        evidence["status"] = status.to_json()
        return Outcome(
            "unknown",
            f"cannot tell whether a TDX module update runs: {status}",
            evidence,
            problem_remedy(status.kind, "/sys/class/firmware/tdx_module/status"),
        )
    evidence["status"] = status
    if status == "idle":
        return Outcome("pass", "no TDX module update in flight (status idle)", evidence)
    what = "in flight" if status in UPDATE_STATES else "in an unknown state"
    return Outcome(
        "fail",
        f"a TDX module update is {what} (status {status[:40]}): a kexec now would cut into it",
        evidence,
        "Wait until /sys/class/firmware/tdx_module/status reads idle, then run again.",
    )


@check(
    "errata.tdx_pw_mce",
    "Partial-write erratum",
    blocking=("load", "exec", "crash"),
    tdx_only=True,
    question="Does the TDX partial-write erratum make this kexec refused or unsafe?",
    why="On Sapphire Rapids and Emerald Rapids a partial write to TDX private memory "
    "poisons it and a later read raises a machine check. Linux 6.18 to 7.1 refuse kexec "
    "there ('Operation not supported', normal and crash images). 7.2 runs TDH.SYS.DISABLE "
    "instead, which clears the poison only when the TDX module implements it, and "
    "userspace cannot see whether it does: the operator vouches for a module version in "
    "sys_disable_module_versions.",
    reads=(
        "/proc/cpuinfo (bugs: tdx_pw_mce; family and model)",
        "/proc/kallsyms (tdx_sys_disable; the release only when kallsyms is missing)",
        "kexec sysfs and the kernel log (is kexec refused)",
        "TDX module version; config sys_disable_module_versions",
    ),
    remedies={
        "fail": "Do not kexec this host: use a full (cold) reboot. For kexec here, boot a 7.2 "
        "or later kernel and a TDX module that implements TDH.SYS.DISABLE.",
        "unknown": "If the running TDX module implements TDH.SYS.DISABLE, list its version "
        "in sys_disable_module_versions in the configuration; else use a cold reboot. When "
        "cpuinfo was unreadable, make /proc/cpuinfo readable.",
    },
    settings=True,
)
def errata_tdx_pw_mce(facts: HostFacts, phase: str, settings: Settings) -> Outcome:
    info = facts.cpuinfo
    e = derived.erratum(facts)
    if isinstance(info, Problem) or e is None:
        problem = info if isinstance(info, Problem) else Problem("absent", "", "not read")
        return Outcome(
            "unknown",
            f"cannot tell the CPU model: {problem}",
            {"cpuinfo": problem.to_json()},
            problem_remedy(problem.kind, "/proc/cpuinfo"),
        )
    if not e.affected:
        return Outcome("pass", "CPU not affected by the TDX partial-write erratum")
    evidence: dict[str, Any] = {"bug_cpus": e.bug_cpus, "models": list(e.models)}
    what = (
        f"tdx_pw_mce on the bugs line of {plural(e.bug_cpus, 'CPU')}"
        if e.bug_cpus
        else f"{' and '.join(e.models)} with TDX in use"
    )
    has = derived.sys_disable(facts)
    evidence["sys_disable"] = has.how
    if has.present:
        if vouched := _vouched(facts, settings, evidence):
            return Outcome(
                "pass",
                f"{what}: the kernel runs TDH.SYS.DISABLE at kexec ({has.how}) and TDX module "
                f"{vouched} is listed in sys_disable_module_versions ({settings.config_file})",
                evidence,
            )
        version = derived.shown_version(facts)
        return Outcome(
            "unknown",
            f"{what}: the kernel runs TDH.SYS.DISABLE at kexec ({has.how}); userspace cannot tell "
            f"whether TDX module {version} implements TDH.SYS.DISABLE; without it the poison "
            "stays and the new kernel risks a machine check",
            evidence,
            derived.vouch_remedy(facts, settings),
        )
    log = facts.tdx_log
    logged = isinstance(log, tdx.TdxLog) and log.kexec_refused
    if logged:
        evidence["kernel_log"] = "kexec: Not allowed on platform with tdx_pw_mce bug"
    sysfs = not isinstance(facts.kexec.loaded, Problem) or facts.kexec.loaded.kind != "absent"
    refusing = (
        derived.release_at_least(facts, (6, 18))
        and not derived.release_at_least(facts, derived.FIRST_SYS_DISABLE_RELEASE)
        and sysfs
    )
    verdict = (
        "the kernel refuses kexec"
        if logged or refusing
        else "kexec would not reset TDX private memory: unsafe"
    )
    crash = " A crash kernel cannot be loaded either." if phase == "crash" else ""
    return Outcome(
        "fail",
        f"{what}, and the kernel has no TDH.SYS.DISABLE ({has.how}): {verdict}",
        evidence,
        "Do not kexec this host: use a full (cold) reboot."
        + crash
        + " For kexec here: "
        + derived.kernel_remedy(facts),
    )


@check(
    "postkexec.tdx",
    "TDX after kexec",
    blocking=(),
    tdx_only=True,
    question="What will the new kernel be able to do with TDX?",
    why="If this boot initialized the TDX module (7.1+ does at boot whenever the BIOS "
    "enables TDX), the next kernel can initialize it again only after TDH.SYS.DISABLE "
    "(7.2+) and only if the module implements it; otherwise no TD can start until a cold "
    "reboot.",
    reads=(
        "TDX module state and version (sysfs, kernel log, kvm_intel tdx)",
        "/proc/kallsyms (tdx_sys_disable)",
        "config sys_disable_module_versions",
    ),
    remedies={
        "warn": "Plan a cold reboot before TD guests must run on this host again; migrate "
        "TD workloads elsewhere meanwhile.",
        "unknown": "If the TDX module implements TDH.SYS.DISABLE, list its version in "
        "sys_disable_module_versions; else plan a cold reboot before TDs must run again.",
    },
    skips={"crash": "not applicable to a crash kernel"},
    settings=True,
)
def postkexec_tdx(facts: HostFacts, phase: str, settings: Settings) -> Outcome:
    mod = facts.module
    evidence: dict[str, Any] = {"module": mod.to_json()}
    initialized = mod.state == "initialized"
    if mod.state == "unknown" and derived.release_at_least(facts, (7, 1)):
        # 7.1+ brings the module up at boot whenever the BIOS enables TDX (and TDX is in use).
        evidence["inferred"] = "7.1+ initializes the TDX module at boot"
        initialized = True
    if not initialized:
        if mod.state == "unknown":
            return Outcome(
                "unknown",
                "cannot tell whether this boot initialized the TDX module",
                evidence,
                "Run as root so the kernel log and TDX sysfs can be read.",
            )
        return Outcome(
            "pass", f"the TDX module was not initialized in this boot ({mod.state})", evidence
        )
    has = derived.sys_disable(facts)
    evidence["sys_disable"] = has.how
    if not has.present:
        return Outcome(
            "warn",
            "the TDX module was initialized in this boot and the kernel has no "
            f"TDH.SYS.DISABLE ({has.how}): after kexec no TD can start until a cold reboot",
            evidence,
            "Plan a cold reboot before TD guests must run on this host again.",
        )
    if vouched := _vouched(facts, settings, evidence):
        return Outcome(
            "pass",
            f"the kernel runs TDH.SYS.DISABLE at kexec and TDX module {vouched} is listed in "
            "sys_disable_module_versions: the new kernel can bring TDX up again",
            evidence,
        )
    version = derived.shown_version(facts)
    return Outcome(
        "unknown",
        "the new kernel can bring TDX up again only if TDX module "
        f"{version} implements TDH.SYS.DISABLE (userspace cannot see whether it does)",
        evidence,
        derived.vouch_remedy(facts, settings),
    )
