"""tdx.module, errata.tdx_pw_mce and postkexec.tdx: the TDX module and what it implies."""

from __future__ import annotations

from typing import Any

from ..facts import HostFacts
from ..host import Problem
from ..readers import kernel, tdx
from .base import Outcome, check, problem_remedy

ERRATUM_MODELS = {(6, 143): "Sapphire Rapids", (6, 207): "Emerald Rapids"}


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
    "what the next kernel can do (postkexec.tdx).",
    reads=(
        "/sys/devices/faux/tdx_host/version",
        "/sys/firmware/tdx/tdx_module/status",
        "/sys/module/kvm_intel/parameters/tdx",
        "/dev/kmsg (virt/tdx lines)",
    ),
    remedies={
        "warn": "Look at `dmesg | grep -i tdx`: a failed initialization names its reason "
        "(hibernation enabled, too few KeyIDs, module missing); run as root so the kernel "
        "log can be read.",
    },
)
def tdx_module(facts: HostFacts, phase: str) -> Outcome:
    mod = facts.module
    evidence: dict[str, Any] = {"module": mod.to_json(), **_log_evidence(facts)}
    log = facts.tdx_log
    if mod.state == "initialized":
        ver = f" (version {mod.version})" if mod.version else ""
        return Outcome("pass", f"TDX module initialized{ver}", evidence)
    if mod.state == "failed":
        why = log.failure if isinstance(log, tdx.TdxLog) and log.failure else "see the log"
        return Outcome(
            "warn",
            f"TDX module initialization failed: {why}",
            evidence,
            "Fix the cause the kernel log names, then reboot (cold) to retry.",
        )
    if mod.state == "not initialized":
        said = mod.sources.get("firmware tdx_module status", "?")
        return Outcome(
            "warn",
            f"TDX is in use but the TDX module is not initialized (status: {said})",
            evidence,
            "Look at the kernel log (dmesg | grep -i tdx) for why the module was not brought up.",
        )
    remedy = "Run as root so the kernel log and sysfs can be read."
    if isinstance(log, Problem) and log.kind == "permission":
        remedy = problem_remedy("permission", "/dev/kmsg")
    return Outcome(
        "warn", "TDX is in use but no source tells the TDX module state", evidence, remedy
    )


@check(
    "errata.tdx_pw_mce",
    "Partial-write erratum",
    blocking=("load", "exec", "crash"),
    tdx_only=True,
    question="Will the kernel refuse kexec because of the TDX partial-write erratum?",
    why="On Sapphire Rapids and Emerald Rapids a partial write to TDX private memory "
    "poisons it and a later read raises a machine check. A kernel that brought up TDX on "
    "these CPUs refuses kexec_load and kexec_file_load (normal and crash images) with "
    "'Operation not supported' rather than risk it.",
    reads=("/proc/cpuinfo (bugs: tdx_pw_mce; family and model)", "/proc/kallsyms"),
    remedies={
        "fail": "Do not kexec this host: use a full (cold) reboot. A crash kernel cannot be "
        "loaded either; plan kdump accordingly.",
        "unknown": "Make /proc/cpuinfo readable so the CPU model can be checked.",
    },
)
def errata_tdx_pw_mce(facts: HostFacts, phase: str) -> Outcome:
    info = facts.cpuinfo
    evidence: dict[str, Any] = {}
    ks = facts.kallsyms
    if isinstance(ks, kernel.Kallsyms) and kernel.SYS_DISABLE_SYMBOL in ks.found:
        # The TDH.SYS.DISABLE series would lift the refusal; unverified, so evidence only.
        evidence["kallsyms"] = f"{kernel.SYS_DISABLE_SYMBOL} present (TDH.SYS.DISABLE series?)"
    if isinstance(facts.tdx_log, tdx.TdxLog) and facts.tdx_log.kexec_refused:
        evidence["kernel_log"] = "kexec: Not allowed on platform with tdx_pw_mce bug"
    if isinstance(info, Problem):
        return Outcome(
            "unknown",
            f"cannot tell the CPU model: {info}",
            {**evidence, "cpuinfo": info.to_json()},
            problem_remedy(info.kind, "/proc/cpuinfo"),
        )
    bug_cpus = info.cpus_with_bug("tdx_pw_mce")
    affected = sorted({ERRATUM_MODELS[m] for m in info.models if m in ERRATUM_MODELS})
    remedy = (
        "Do not kexec this host: use a full (cold) reboot. "
        + ("A crash kernel cannot be loaded on it." if phase == "crash" else "")
    ).strip()
    if bug_cpus:
        evidence["bug_cpus"] = len(bug_cpus)
        return Outcome(
            "fail",
            f"tdx_pw_mce on the bugs line of {len(bug_cpus)} CPUs: the kernel refuses kexec",
            evidence,
            remedy,
        )
    if affected:
        evidence["models"] = affected
        return Outcome(
            "fail",
            f"{' and '.join(affected)} with TDX in use: the kernel refuses kexec "
            "(partial-write erratum)",
            evidence,
            remedy,
        )
    return Outcome("pass", "CPU not affected by the TDX partial-write erratum", evidence)


@check(
    "postkexec.tdx",
    "TDX after kexec",
    blocking=(),
    tdx_only=True,
    question="What will the new kernel be able to do with TDX?",
    why="If this boot initialized the TDX module, the next kernel reached by kexec cannot "
    "initialize it again: no TD can start until a cold reboot (Documentation/arch/x86/"
    "tdx.rst).",
    reads=("TDX module state (sysfs, kernel log, kvm_intel tdx)",),
    remedies={
        "warn": "Plan a cold reboot before TD guests must run on this host again; migrate "
        "TD workloads elsewhere meanwhile.",
    },
    skips={"crash": "not applicable to a crash kernel"},
)
def postkexec_tdx(facts: HostFacts, phase: str) -> Outcome:
    mod = facts.module
    evidence = {"module": mod.to_json()}
    if mod.state == "initialized":
        return Outcome(
            "warn",
            "the TDX module was initialized in this boot: after kexec no TD can start "
            "until a cold reboot",
            evidence,
            "Plan a cold reboot before TD guests must run on this host again.",
        )
    return Outcome("pass", "the TDX module was not initialized in this boot", evidence)
