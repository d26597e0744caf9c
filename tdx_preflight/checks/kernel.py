"""kernel.kexec, kernel.cache_flush and kexec.image: what the running kernel can do."""

from __future__ import annotations

from typing import Any

from ..facts import HostFacts
from ..host import Problem
from ..readers import kernel
from . import derived
from .base import Outcome, check, plural, problem_remedy

FIRST_FLUSHING_RELEASE = (6, 18)


def _kexec_evidence(facts: HostFacts) -> dict[str, Any]:
    k = facts.kexec

    def show(v: int | Problem) -> object:
        return v.to_json() if isinstance(v, Problem) else v

    out: dict[str, Any] = {
        "kexec_loaded": show(k.loaded),
        "kexec_crash_loaded": show(k.crash_loaded),
        "kexec_crash_size": show(k.crash_size),
        "kexec_crash_cma_ranges": show(k.crash_cma_ranges),
        "kexec_sysfs": k.paths,
        "kernel_release": facts.release if isinstance(facts.release, str) else None,
    }
    cfg = facts.config
    if isinstance(cfg, kernel.KernelConfig):
        out["config"] = {
            name: cfg.values.get(name, "n")
            for name in ("CONFIG_KEXEC_CORE", "CONFIG_CRASH_DUMP", "CONFIG_INTEL_TDX_HOST")
        }
    return out


@check(
    "kernel.kexec",
    "Kernel kexec support",
    blocking=("load", "exec", "crash"),
    tdx_only=False,
    question="Can the running kernel kexec at all (and, for kdump, does it reserve crash memory)?",
    why="Linux 6.8 to 6.17 could not build TDX host support and kexec together: such a "
    "kernel has no kexec syscalls and no kexec sysfs. The sysfs files are the evidence, "
    "not the version number (distributions backport). 6.19 moved them into "
    "/sys/kernel/kexec/ and left the old names as links.",
    reads=(
        "/sys/kernel/kexec/loaded (6.19+), else /sys/kernel/kexec_loaded",
        "/sys/kernel/kexec/crash_size, else /sys/kernel/kexec_crash_size, and "
        "/sys/kernel/kexec/crash_cma_ranges (crash phase)",
        "kernel config (evidence)",
    ),
    remedies={
        "fail": "Boot a kernel with kexec support (CONFIG_KEXEC_CORE=y; on a TDX host 6.18 or "
        "later, and 7.2 or later with a TDX module that implements TDH.SYS.DISABLE on "
        "Sapphire or Emerald Rapids); for kdump, reserve memory with crashkernel= on the "
        "command line.",
        "unknown": "Make the kexec sysfs files readable (is sysfs mounted?) and run again.",
    },
)
def kernel_kexec(facts: HostFacts, phase: str) -> Outcome:
    k = facts.kexec
    evidence = _kexec_evidence(facts)
    outcome = _kexec_rules(k, phase, evidence, _no_kexec_remedy(facts), _no_kexec(facts))
    # Only "no" caps: when TDX use is unknown, TDX may be in use (fail closed).
    if facts.tdx_use.state == "no":
        return outcome.at_worst_warn("TDX not in use: kexec-tools reports its own errors")
    return outcome


#: kernel.kexec's fix when the crash phase finds no crash kernel support.
NO_CRASH_REMEDY = "Boot a kernel built with CONFIG_CRASH_DUMP and a crashkernel= reservation."


def _no_kexec(facts: HostFacts) -> str:
    """What kernel.kexec sees when no kexec sysfs exists at all, in the host's paths (the
    evidence has the paths read, under a fixture or snapshot root)."""
    tdx = facts.tdx_use.state == "yes"
    why = " (a 6.8 to 6.17 kernel with TDX host support has none)" if tdx else ""
    return f"neither /sys/kernel/kexec/loaded nor /sys/kernel/kexec_loaded exists{why}"


def _no_kexec_remedy(facts: HostFacts) -> str:
    """What to boot when the running kernel has no kexec (kernel.kexec and kexec.image)."""
    fix = "Boot a kernel built with kexec (CONFIG_KEXEC_CORE)."
    if facts.tdx_use.state == "yes":
        fix += f" On this TDX host: {derived.kernel_remedy(facts)}"
    return fix


def _kexec_rules(
    k: kernel.KexecSysfs, phase: str, evidence: dict[str, Any], no_kexec_fix: str, no_kexec: str
) -> Outcome:
    loaded = k.loaded
    if isinstance(loaded, Problem):
        if loaded.kind == "absent":
            return Outcome(
                "fail",
                f"the running kernel has no kexec support: {no_kexec}",
                evidence,
                no_kexec_fix,
            )
        return Outcome(
            "unknown",
            f"cannot read kexec state: {loaded}",
            evidence,
            problem_remedy(loaded.kind, loaded.path),
        )
    if phase != "crash":
        return Outcome("pass", "the running kernel supports kexec", evidence)
    size = k.crash_size
    if isinstance(size, Problem) and size.kind != "absent":
        return Outcome(
            "unknown",
            f"cannot read the crash reservation: {size}",
            evidence,
            problem_remedy(size.kind, size.path),
        )
    if isinstance(size, int) and size > 0:
        return Outcome(
            "pass",
            f"the running kernel supports kdump ({size // (1 << 20)} MiB reserved)",
            evidence,
        )
    cma = k.crash_cma_ranges
    if isinstance(cma, int) and cma > 0:
        return Outcome(
            "pass",
            f"the running kernel supports kdump ({plural(cma, 'crash CMA range')})",
            evidence,
        )
    if isinstance(cma, Problem) and cma.kind != "absent":
        return Outcome(
            "unknown",
            f"crash_size is {size if isinstance(size, int) else 'absent'} and the crash CMA "
            f"ranges cannot be read: {cma}",
            evidence,
            problem_remedy(cma.kind, cma.path),
        )
    if isinstance(size, Problem):
        return Outcome(
            "fail",
            f"no crash kernel support: {size.path} is absent",
            evidence,
            NO_CRASH_REMEDY,
        )
    return Outcome(
        "fail",
        "no memory reserved for a crash kernel (crash_size is 0, no crash CMA ranges)",
        evidence,
        "Add crashkernel=... to the kernel command line (e.g. crashkernel=512M) and reboot.",
    )


@check(
    "kernel.cache_flush",
    "TDX cache flush on kexec",
    blocking=("load", "exec", "crash"),
    tdx_only=True,
    question="Does the running kernel flush TDX cache state (WBINVD) before jumping to the "
    "new kernel?",
    why="Cache lines written through private KeyIDs must be written back and invalidated "
    "before the new kernel runs, or a later eviction can corrupt memory it uses with "
    "KeyID 0. Linux 6.18 added the flush (tdx_cpu_flush_cache_for_kexec); 7.2 moved it "
    "into the TDX shutdown path beside tdx_sys_disable (the static tdx_cpu_flush_cache is "
    "usually inlined). kallsyms names one of them on kernels that flush, backports included.",
    reads=("/proc/kallsyms (read to its end)", "/proc/sys/kernel/osrelease"),
    remedies={
        "fail": "Boot a kernel that flushes TDX caches on kexec (Linux 6.18 or later, or a "
        "vendor kernel with the TDX kexec series; 7.2 or later on Sapphire or Emerald "
        "Rapids) before using kexec here; cold reboot now.",
        "unknown": "Make /proc/kallsyms readable (run as root; CONFIG_KALLSYMS) so the "
        "flush can be confirmed.",
    },
)
def kernel_cache_flush(facts: HostFacts, phase: str) -> Outcome:
    ks = facts.kallsyms
    release = facts.release
    evidence: dict[str, Any] = {"kernel_release": release if isinstance(release, str) else None}
    if isinstance(ks, kernel.Kallsyms):
        names = sorted(ks.found & set(kernel.FLUSH_SYMBOLS))
        evidence["kallsyms"] = {"path": ks.path, "found": sorted(ks.found)}
        if names:
            return Outcome("pass", f"kallsyms names {', '.join(names)}", evidence)
        return Outcome(
            "fail",
            f"kallsyms (read to its end) names none of {', '.join(kernel.FLUSH_SYMBOLS)}: "
            "this kernel does not flush TDX caches on kexec",
            evidence,
            derived.kernel_remedy(facts) + " Use a cold reboot now.",
        )
    problem = ks if isinstance(ks, Problem) else Problem("absent", "/proc/kallsyms", "not read")
    evidence["kallsyms"] = problem.to_json()
    if derived.release_at_least(facts, FIRST_FLUSHING_RELEASE):
        return Outcome(
            "pass",
            f"inferred from release {release} (6.18 or later flushes); kallsyms: {problem.detail}",
            evidence,
        )
    shown = release if isinstance(release, str) else f"unreadable ({release.detail})"
    return Outcome(
        "unknown",
        f"cannot confirm the flush: kallsyms {problem.detail} and release {shown} is not "
        "6.18 or later",
        evidence,
        problem_remedy(problem.kind, "/proc/kallsyms")
        if problem.kind == "permission"
        else "Make /proc/kallsyms readable so the flush can be confirmed.",
    )


@check(
    "kexec.image",
    "Kernel image loaded",
    blocking=(),
    tdx_only=False,
    question="Is a kernel loaded for this phase?",
    why="`kexec -e` fails without a loaded image (systemctl kexec loads one itself); "
    "loading a crash kernel replaces the one loaded now.",
    reads=(
        "/sys/kernel/kexec/loaded (6.19+), else /sys/kernel/kexec_loaded",
        "/sys/kernel/kexec/crash_loaded, else /sys/kernel/kexec_crash_loaded",
    ),
    remedies={
        "warn": "exec: load a kernel first (kexec -l IMAGE --initrd=... --reuse-cmdline) or use "
        "systemctl kexec. crash: the new load replaces the loaded crash kernel.",
        "unknown": "When kernel.kexec fails (the running kernel has no kexec sysfs), no "
        "kernel can be loaded: boot one with kexec support (its fix). Otherwise make the "
        "kexec sysfs files readable (is sysfs mounted on /sys?) and run again.",
    },
    skips={"load": "not applicable before loading a kernel"},
)
def kexec_image(facts: HostFacts, phase: str) -> Outcome:
    k = facts.kexec
    evidence = _kexec_evidence(facts)
    value = k.loaded if phase == "exec" else k.crash_loaded
    missing = isinstance(value, Problem) and value.kind == "absent"
    if missing and isinstance(k.loaded, Problem) and k.loaded.kind == "absent":
        # kernel.kexec fails on this: say so, not "cannot tell whether a kernel is loaded".
        return Outcome(
            "unknown",
            "no kernel can be loaded: the running kernel has no kexec support "
            f"({_no_kexec(facts)}; see kernel.kexec)",
            evidence,
            _no_kexec_remedy(facts),
        )
    if missing:
        return Outcome(
            "unknown",
            "no crash kernel can be loaded: the running kernel has no crash kexec support "
            f"({value.path} does not exist; see kernel.kexec)",
            evidence,
            NO_CRASH_REMEDY,
        )
    if isinstance(value, Problem):
        return Outcome(
            "unknown",
            f"cannot tell whether a kernel is loaded: {value}",
            evidence,
            problem_remedy(value.kind, value.path),
        )
    if phase == "exec":
        if value == 1:
            return Outcome("pass", "a kexec kernel is loaded", evidence)
        return Outcome(
            "warn",
            "no kexec kernel is loaded: `kexec -e` would fail (`systemctl kexec` loads one)",
            evidence,
            "Load one: kexec -l /boot/vmlinuz-... --initrd=/boot/initrd.img-... --reuse-cmdline",
        )
    if value == 0:
        return Outcome("pass", "no crash kernel is loaded yet", evidence)
    return Outcome(
        "warn",
        "a crash kernel is already loaded: the new load replaces it",
        evidence,
        "Nothing to do if replacing it is intended.",
    )
