"""Facts several checks derive alike, and the remedies chosen from them.

Pure functions of HostFacts (and the configuration's Settings): the erratum CPU,
"has TDH.SYS.DISABLE", the vouched TDX module version, and remedies that say what
the facts already tell (DESIGN.md, "Remedies") instead of a generic hint.
"""

from typing import NamedTuple

from ..facts import HostFacts
from ..host import Problem
from ..readers import kernel, tdx
from .base import Settings

ERRATUM_MODELS = {(6, 143): "Sapphire Rapids", (6, 207): "Emerald Rapids"}
#: Linux 7.2 runs TDH.SYS.DISABLE on kexec and kdump (5b25f249be32).
FIRST_SYS_DISABLE_RELEASE = (7, 2)


class Erratum(NamedTuple):
    """Which CPUs show the partial-write erratum: bug-line CPUs and affected model names."""

    bug_cpus: int
    models: tuple[str, ...]

    @property
    def affected(self) -> bool:
        """True when any CPU shows the bug or the model is an affected one."""
        return bool(self.bug_cpus or self.models)


def erratum(facts: HostFacts) -> Erratum | None:
    """`tdx_pw_mce` on a bugs line, or family 6 model 143/207 (arch/x86/virt/vmx/tdx/tdx.c
    check_tdx_erratum); None when cpuinfo could not be read."""
    info = facts.cpuinfo
    if isinstance(info, Problem):
        return None
    models = sorted({ERRATUM_MODELS[m] for m in info.models if m in ERRATUM_MODELS})
    return Erratum(len(info.cpus_with_bug("tdx_pw_mce")), tuple(models))


def release_at_least(facts: HostFacts, version: tuple[int, int]) -> bool:
    """True when the running release parses and is `version` or later."""
    parsed = kernel.parse_release(facts.release) if isinstance(facts.release, str) else None
    return parsed is not None and parsed >= version


class SysDisable(NamedTuple):
    """Does the running kernel run TDH.SYS.DISABLE at kexec, and how that is known."""

    present: bool
    how: str


def sys_disable(facts: HostFacts) -> SysDisable:
    """kallsyms names `tdx_sys_disable`; only without kallsyms, release 7.2 or later."""
    ks = facts.kallsyms
    name = kernel.SYS_DISABLE_SYMBOL
    if isinstance(ks, kernel.Kallsyms):
        if name in ks.found:
            return SysDisable(True, f"kallsyms names {name}")
        return SysDisable(False, f"kallsyms (read to its end) does not name {name}")
    why = ks.detail if isinstance(ks, Problem) else "not read"
    release = facts.release if isinstance(facts.release, str) else "unreadable"
    if release_at_least(facts, FIRST_SYS_DISABLE_RELEASE):
        return SysDisable(True, f"inferred from release {release} (7.2 or later; kallsyms: {why})")
    return SysDisable(False, f"inferred from release {release} (before 7.2; kallsyms: {why})")


def module_version(facts: HostFacts) -> str | None:
    """The running TDX module's version in the X.Y.ZZ form a configured list holds."""
    return tdx.version_key(facts.module.version)


#: The TdxModule sources that read the running module's version (facts.module_state).
_SYSFS_VERSIONS = frozenset({"tdx_host version", "firmware tdx_module status"})


def shown_version(facts: HostFacts) -> str:
    """The module's version for a summary, saying when only the boot log names it."""
    mod = facts.module
    if mod.version is None:
        return "of unknown version"
    if mod.version_from == "kernel log":
        return f"{mod.version} (the boot log's version; a runtime update would not show there)"
    return mod.version


def vouched_evidence(facts: HostFacts, settings: Settings) -> dict[str, str] | None:
    """Evidence that the operator vouches for the module's TDH.SYS.DISABLE; None if not.

    Only a version sysfs reads vouches: one from the kernel log is the module that
    booted, and on the kernels that run TDH.SYS.DISABLE (7.2+) a runtime update replaces
    the module without a new log line; only sysfs (tdx_host/version) names the running one.
    """
    version = module_version(facts)
    if version is None or version not in settings.sys_disable_module_versions:
        return None
    if facts.module.version_from not in _SYSFS_VERSIONS:
        return None
    return {"module_version": version, "sys_disable_vouched_by": f"config {settings.config_file}"}


def vouch_remedy(facts: HostFacts, settings: Settings) -> str:
    """How to vouch for the running module, naming its version, the key and the file."""
    version = module_version(facts)
    if version is None:
        shown = facts.module.version or "unknown"
        return (
            f"The TDX module's X.Y.ZZ version is not known here (read: {shown}): make "
            "sys/devices/faux/tdx_host/version readable (run as root) so it can be named."
        )
    if facts.module.version_from == "kernel log":
        return (
            f"TDX module {version} is the version the boot log names; a runtime module update "
            "replaces it without a log line. Load tdx_host (modprobe tdx_host) so "
            "/sys/devices/faux/tdx_host/version names the running module, then vouch for that "
            f"version in sys_disable_module_versions ({settings.config_file}) if it implements "
            "TDH.SYS.DISABLE."
        )
    return (
        f"If TDX module {version} implements TDH.SYS.DISABLE (ask the platform vendor), add "
        f'"{version}" to sys_disable_module_versions in {settings.config_file}; otherwise '
        "update the TDX module to one that does, or use a cold reboot."
    )


def kernel_remedy(facts: HostFacts) -> str:
    """Which kernel to boot for kexec on this host: never "6.18" to an erratum CPU."""
    e = erratum(facts)
    if e is not None and e.affected:
        return (
            "Boot a 7.2 or later kernel and a TDX module that implements TDH.SYS.DISABLE: "
            "this CPU has the partial-write erratum, and 6.18 to 7.1 refuse kexec on it."
        )
    return (
        "Boot a kernel that flushes TDX caches on kexec (Linux 6.18 or later, or a vendor "
        "kernel with the TDX kexec series)."
    )


_FAILURE_REMEDIES = (
    ("hibernation", "Disable hibernation (boot with nohibernate, or a kernel without "
     "CONFIG_HIBERNATION), then reboot."),
    ("too few private keyids", "Give TDX at least 2 private KeyIDs in the BIOS (the "
     "MKTME/TDX KeyID split), then cold reboot."),
    ("module not loaded", "The BIOS did not load the TDX module: enable TDX and its SEAM "
     "loader in the BIOS (or update the BIOS and TDX module), then cold reboot."),
    ("exhausted", "The memory map needs more TDMRs or reserved areas than this TDX module "
     "allows: update the TDX module (BIOS), or reduce memory holes (memory population, "
     "memmap=), then cold reboot."),
    ("rbp", "Upgrade the TDX module (a BIOS update): this one clobbers RBP."),
    ("is required for tdx", "The CPU lacks a feature TDX needs: check the BIOS CPU "
     "settings (TDX cannot run without it)."),
    ("seamcall", "A SEAMCALL failed while bringing the module up: update the TDX module "
     "(BIOS) and report the error code the log gives, then cold reboot."),
)  # fmt: skip


def failure_remedy(reason: str | None) -> str:
    """A fix for the reason the kernel log gives for TDX not coming up."""
    low = (reason or "").lower()
    for key, remedy in _FAILURE_REMEDIES:
        if key in low:
            return remedy
    return "Fix the cause the kernel log names (dmesg | grep -i tdx), then cold reboot to retry."


def enable_tdx_remedy(facts: HostFacts) -> str:
    """How to make a kernel use the TDX KeyIDs the BIOS reserved, from what was read."""
    cfg = facts.config
    if isinstance(cfg, kernel.KernelConfig) and cfg.values.get("CONFIG_INTEL_TDX_HOST") != "y":
        return (
            "Boot a kernel with TDX host support (CONFIG_INTEL_TDX_HOST=y; this one has "
            f"{cfg.values.get('CONFIG_INTEL_TDX_HOST', 'n')}), or disable TDX in the BIOS."
        )
    given = facts.kvm_tdx_cmdline
    if given is True:
        log = facts.tdx_log
        reason = log.failure if isinstance(log, tdx.TdxLog) else None
        said = f"the kernel log says: {reason}" if reason else "the kernel log gives no reason"
        fix = failure_remedy(reason)
        return f"The kernel command line already enables kvm_intel.tdx; {said}. {fix}"
    if given is False:
        return (
            "The kernel command line turns kvm_intel.tdx off: set kvm_intel.tdx=1 in its "
            "place, or disable TDX in the BIOS."
        )
    if isinstance(given, Problem) and isinstance(facts.cmdline, str):
        # The command line was read: what failed is the value given for kvm_intel.tdx.
        return (
            f"Fix kvm_intel.tdx on the kernel command line ({given.detail}): set "
            "kvm_intel.tdx=1, or disable TDX in the BIOS."
        )
    return "Enable TDX in the kernel (kvm_intel.tdx=1) or disable it in the BIOS."
