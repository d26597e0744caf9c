"""platform.cpu and platform.tdx: which CPU, and what the BIOS and kernel made of TDX."""

from __future__ import annotations

from typing import Any

from ..facts import HostFacts
from ..host import Problem
from ..readers import kernel, msr
from . import derived
from .base import Outcome, check, plural, problem_remedy

CODENAMES = {
    (6, 143): "Sapphire Rapids",
    (6, 207): "Emerald Rapids",
    (6, 173): "Granite Rapids",
    (6, 174): "Granite Rapids D",
    (6, 175): "Sierra Forest",
    (6, 221): "Clearwater Forest",
}


def codename(family: int | None, model: int | None) -> str | None:
    return CODENAMES.get((family or 0, model or 0))


@check(
    "platform.cpu",
    "CPU identified",
    blocking=("load", "exec", "crash"),
    tdx_only=False,
    question="Which CPU is this, and is it an Intel CPU (where TDX exists)?",
    why="Every TDX rule depends on the CPU: the partial-write erratum is decided by "
    "family and model, and TDX exists only on Intel CPUs. A host whose CPU cannot be "
    "identified cannot be judged.",
    reads=("/proc/cpuinfo",),
    remedies={
        "unknown": "Make /proc/cpuinfo readable (is /proc mounted?), then run again; a "
        "cpuinfo whose CPU blocks disagree or lack vendor_id, cpu family, model or bugs is "
        "not trusted.",
    },
)
def platform_cpu(facts: HostFacts, phase: str) -> Outcome:
    info = facts.cpuinfo
    if isinstance(info, Problem):
        return Outcome(
            "unknown",
            f"cannot identify the CPU: {info}",
            {"cpuinfo": info.to_json()},
            problem_remedy(info.kind, "/proc/cpuinfo"),
        )
    first = info.first
    name = codename(first.family, first.model)
    evidence: dict[str, Any] = {
        "vendor": first.vendor,
        "family": first.family,
        "model": first.model,
        "stepping": first.stepping,
        "model_name": first.model_name,
        "codename": name,
        "cpus": len(info.cpus),
    }
    what = f"{first.model_name or first.vendor} (family {first.family} model {first.model}"
    what += f", {name})" if name else ")"
    suffix = "" if info.is_intel else ": not Intel, TDX does not apply"
    return Outcome("pass", f"{what}, {plural(len(info.cpus), 'CPU')}{suffix}", evidence)


def _msr_evidence(m: msr.MsrFacts) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for index, reading in m.readings.items():
        key = f"0x{index:x} {msr.NAMES[index]}"
        entry: dict[str, Any] = {}
        if reading.value is not None:
            entry["value"] = f"0x{reading.value:x}"
            entry["decoded"] = msr.decode(index, reading.value)
        elif reading.values:
            entry["values_by_cpu"] = {str(c): f"0x{v:x}" for c, v in sorted(reading.values.items())}
        if reading.problems:
            first = next(iter(reading.problems.values()))
            entry["unreadable_cpus"] = len(reading.problems)
            entry["error"] = str(first)
        out[key] = entry
    if m.unavailable:
        out["unavailable"] = str(m.unavailable)
    if m.notes:
        out["notes"] = list(m.notes)
    return out


def _msr_remedy(problem: Problem) -> str:
    if problem.kind == "absent":
        return "Load the msr module (modprobe msr) so the TDX MSRs can be read."
    if problem.kind == "permission":
        return "Run as root: reading MSRs needs CAP_SYS_RAWIO."
    return "Check the msr device; the MSR could not be read."


def _not_used_because(facts: HostFacts) -> tuple[str, str]:
    """Why the kernel does not use the TDX KeyIDs the BIOS reserved, and the fix,
    from what was read (DESIGN.md "Remedies"; the fix is derived.enable_tdx_remedy)."""
    config = facts.config
    given = facts.kvm_tdx_cmdline
    said = facts.module.sources.get("kernel log")
    if isinstance(config, kernel.KernelConfig) and config.values.get("CONFIG_INTEL_TDX_HOST") in (
        None,
        "n",
    ):
        why = f"the kernel config ({config.source}) lacks INTEL_TDX_HOST"
    elif facts.module.state in ("failed", "not loaded", "not supported") and said:
        # The kernel tried and said why (7.1+ tries at boot, whatever the command line).
        why = f"the kernel log says why TDX is not up: {said}"
    elif isinstance(given, Problem):
        why = f"what the kernel command line sets kvm_intel.tdx to is unknown ({given})"
    elif given is None:
        why = "kvm_intel.tdx=1 is not on the kernel command line"
    elif given is False:
        why = "the kernel command line turns kvm_intel.tdx off"
    else:
        why = "the kernel command line enables kvm_intel.tdx but no source reports TDX up"
    return why, derived.enable_tdx_remedy(facts)


def _msr_warnings(facts: HostFacts, m: msr.MsrFacts) -> tuple[list[str], list[str], int | None]:
    """(warnings, remedies, TDX KeyIDs from MSR 0x87) from the MSRs read."""
    use = facts.tdx_use
    warnings: list[str] = []
    remedies: list[str] = []
    tdx_keyids: int | None = None
    keyid = m.readings[msr.KEYID_PARTITIONING]
    if keyid.values:
        tdx_keyids = max(v >> 32 for v in keyid.values.values())
    disagree = [f"0x{i:x}" for i, r in m.readings.items() if not r.consistent]
    if disagree:
        warnings.append(f"CPUs disagree on MSR {', '.join(disagree)} (BIOS configuration)")
        remedies.append("Check the BIOS TDX/TME settings of every package.")
    seamrr = m.readings[msr.SEAMRR_PHYS_MASK].values
    unlocked = sorted(c for c, v in seamrr.items() if v & (1 << 11) and not v & (1 << 10))
    if unlocked:
        warnings.append(
            f"SEAMRR enabled but not locked (MSR 0x1401 bit 11 set, bit 10 clear) on "
            f"{plural(len(unlocked), 'CPU')} (e.g. CPU {unlocked[0]})"
        )
        remedies.append("Update or fix the BIOS: it must lock SEAMRR when it enables TDX.")
    unread = m.unavailable or next(iter(keyid.problems.values()), None)
    if use.state == "yes" and unread is not None:
        warnings.append(f"TDX in use but MSR 0x87 cannot be read: {unread.detail}")
        remedies.append(_msr_remedy(unread))
    if use.state == "no" and tdx_keyids:
        why, fix = _not_used_because(facts)
        warnings.append(
            f"the BIOS reserved {plural(tdx_keyids, 'TDX KeyID')} (MSR 0x87) but the kernel "
            f"does not use TDX: {why}"
        )
        remedies.append(fix)
    return warnings, remedies, tdx_keyids


@check(
    "platform.tdx",
    "TDX platform state",
    blocking=(),
    tdx_only=False,
    question="Is TDX in use on this host; how many TDX KeyIDs did the BIOS give; "
    "do all CPUs agree on the TDX MSRs?",
    why="The BIOS partitions KeyIDs between MKTME and TDX (MSR 0x87) per package. A "
    "BIOS that enabled TDX while the kernel does not use it, or packages that disagree, "
    "point at a configuration the operator should know about before relying on a kexec.",
    reads=(
        "/proc/cpuinfo (tdx_host_platform)",
        "/sys/fs/cgroup/misc.capacity",
        "/sys/module/kvm_intel/parameters/tdx",
        "/dev/cpu/*/msr (0x87, 0x981, 0x982, 0x1401)",
        "TDX module state (sysfs, kernel log)",
        "kernel config and command line (why BIOS KeyIDs go unused)",
    ),
    remedies={
        "warn": "Read the summary: load the msr module or run as root to read the MSRs; "
        "fix the BIOS so every package has the same TDX setting and SEAMRR is locked; or "
        "boot a kernel with TDX host support and kvm_intel.tdx=1 if the BIOS reservation "
        "is intended.",
    },
)
def platform_tdx(facts: HostFacts, phase: str) -> Outcome:
    if facts.is_intel is False:
        return Outcome("skip", "not an Intel CPU: TDX does not apply")
    use = facts.tdx_use
    evidence: dict[str, Any] = {"tdx_in_use": use.state, "sources": use.sources}
    warnings: list[str] = []
    remedies: list[str] = []
    tdx_keyids: int | None = None
    if facts.msrs is not None:
        evidence["msrs"] = _msr_evidence(facts.msrs)
        warnings, remedies, tdx_keyids = _msr_warnings(facts, facts.msrs)
        if tdx_keyids is not None:
            evidence["tdx_keyids"] = tdx_keyids
    if use.state == "unknown":
        warnings.append(
            f"cannot tell whether TDX is in use: could not read {', '.join(use.unreadable)}"
        )
        remedies.append(
            "Run as root, on the host (not in a container), so every TDX source can be read."
        )
    if warnings:
        return Outcome("warn", "; ".join(warnings), evidence, " ".join(dict.fromkeys(remedies)))
    if use.state == "yes":
        said = [k for k, v in use.sources.items() if v != "no" and not v.startswith("unread")]
        keys = f", {plural(tdx_keyids, 'TDX KeyID')}" if tdx_keyids else ""
        return Outcome("pass", f"TDX in use ({', '.join(said)}){keys}", evidence)
    bios = "no TDX KeyIDs in MSR 0x87" if tdx_keyids == 0 else "no source reports TDX"
    return Outcome("pass", f"TDX not in use ({bios})", evidence)
