"""HostFacts: the typed snapshot every check reads, and how it is gathered."""

from __future__ import annotations

import os
from typing import NamedTuple

from .host import Host, Problem
from .readers import cgroup, cpuinfo, kernel, kvm, msr, tdx


class TdxUse(NamedTuple):
    """Is TDX in use: "yes" when any present source says so, else "no" (DESIGN.md).

    `sources` maps each source to what it said; `unreadable` names the sources
    that exist but could not be read (platform.tdx warns about them).
    """

    state: str
    sources: dict[str, str]
    unreadable: tuple[str, ...] = ()

    @property
    def evaluated(self) -> bool:
        """TDX-only checks run when TDX is in use."""
        return self.state == "yes"


class TdxModule(NamedTuple):
    """The TDX module as every source tells it.

    `state`: "initialized", "failed", "not loaded" (the BIOS loaded no module), "not
    initialized" (old firmware sysfs: none, loaded or shutdown), "not supported" (7.1+
    log: the platform has no TDX) or "unknown". `version` as the source printed it:
    X.Y.ZZ (tdx_host/version, 7.1+ log), X.Y.ZZ.WW (6.14 -intel log) or X.Y (old sysfs,
    6.8 -intel log); tdx.version_key gives the form a configured list is compared with.
    """

    state: str
    version: str | None
    sources: dict[str, str]

    def to_json(self) -> dict[str, object]:
        return {"state": self.state, "version": self.version, "sources": self.sources}


class Ledger(NamedTuple):
    """What the daemon remembers of TD lives (absent when no daemon answered)."""

    tds_not_destroyed: tuple[str, ...] = ()


class TargetKernel(NamedTuple):
    """The kernel a load names (`kexec -l IMAGE`), read from its bzImage header."""

    image: str
    release: str | Problem
    #: boot/config-RELEASE under the root; None when the release could not be read.
    config: kernel.KernelConfig | Problem | None


def read_target(host: Host, image: str) -> TargetKernel:
    from .readers.bzimage import read_bzimage_release

    path = os.path.abspath(image) if host.live or not image.startswith("/") else image
    release = read_bzimage_release(host, path.lstrip("/"))
    config = None
    if isinstance(release, str):
        data = host.read_bytes(f"boot/config-{release}", 4 * 1024 * 1024)
        if isinstance(data, Problem):
            config = data
        else:
            parsed = kernel.parse_config(data, host.display(f"boot/config-{release}"))
            config = (
                parsed
                if isinstance(parsed, Problem)
                else kernel.KernelConfig(host.display(f"boot/config-{release}"), parsed)
            )
    return TargetKernel(path, release, config)


class HostFacts(NamedTuple):
    root: str
    live: bool
    cpuinfo: cpuinfo.CpuInfo | Problem
    online: list[int] | Problem
    msrs: msr.MsrFacts | None  # None: not read (not an Intel CPU)
    release: str | Problem
    cmdline: str | Problem
    config: kernel.KernelConfig | Problem
    kallsyms: kernel.Kallsyms | Problem | None  # None: not read (TDX not in use)
    kexec: kernel.KexecSysfs
    kvm_tdx_param: bool | Problem
    tdx_host_version: str | Problem
    firmware_tdx: tdx.FirmwareTdx | Problem
    tdx_log: tdx.TdxLog | Problem
    misc_capacity: dict[str, int] | Problem
    misc_current: dict[str, int] | Problem
    tdx_use: TdxUse
    module: TdxModule
    enumeration: kvm.Enumeration
    guests: list[kvm.Guest]
    ledger: Ledger | None = None
    target: TargetKernel | None = None
    #: sys/class/firmware/tdx_module (7.2+ runtime update); None: absent or not read.
    module_update: tdx.ModuleUpdate | None = None

    @property
    def root_tdx_current(self) -> int | Problem:
        return cgroup.tdx_count(self.misc_current, "sys/fs/cgroup/misc.current")

    @property
    def is_intel(self) -> bool | None:
        """True/False from cpuinfo; None when cpuinfo could not be read."""
        if isinstance(self.cpuinfo, Problem):
            return None
        return self.cpuinfo.is_intel


def _said(value: object) -> str:
    return f"unreadable ({value})" if isinstance(value, Problem) else str(value)


def tdx_use(
    cpu: cpuinfo.CpuInfo | Problem,
    capacity: int | Problem,
    kvm_param: bool | Problem,
    module: TdxModule,
) -> TdxUse:
    sources: dict[str, str] = {}
    unreadable: list[str] = []
    yes = False

    def note(name: str, value: object, says_yes: bool) -> None:
        nonlocal yes
        if isinstance(value, Problem):
            if value.kind != "absent":
                unreadable.append(name)
                sources[name] = f"unreadable: {value}"
            return
        yes = yes or says_yes
        sources[name] = "yes" if says_yes else "no"

    if isinstance(cpu, Problem):
        note("cpuinfo tdx_host_platform", cpu, False)
    else:
        if not cpu.is_intel:
            return TdxUse("no", {"cpuinfo vendor_id": ", ".join(sorted(cpu.vendors)) or "none"})
        note("cpuinfo tdx_host_platform", cpu, bool(cpu.cpus_with_flag("tdx_host_platform")))
    note("misc.capacity tdx", capacity, isinstance(capacity, int) and capacity > 0)
    note("kvm_intel tdx", kvm_param, kvm_param is True)
    if module.state == "initialized":
        yes = True
        sources["TDX module"] = "initialized"
    for name, said in module.sources.items():
        if said.startswith("unreadable"):
            unreadable.append(name)
            sources[name] = said
    return TdxUse("yes" if yes else "no", sources, tuple(unreadable))


def module_state(
    kvm_param: bool | Problem,
    version: str | Problem,
    firmware: tdx.FirmwareTdx | Problem,
    log: tdx.TdxLog | Problem,
) -> TdxModule:
    """Combine every source of the TDX module's state; the strongest wins."""
    sources: dict[str, str] = {}
    state = "unknown"
    ver: str | None = None
    from_log: str | None = None  # the log's word when it is not "initialized"
    if isinstance(version, str):
        sources["tdx_host version"] = version
        state, ver = "initialized", version
    elif version.kind != "absent":
        sources["tdx_host version"] = f"unreadable: {version}"
    if isinstance(firmware, tdx.FirmwareTdx):
        sources["firmware tdx_module status"] = firmware.status
        if firmware.status == "initialized":
            state = "initialized"
            ver = ver or firmware.version
    elif firmware.kind != "absent":
        sources["firmware tdx_module status"] = f"unreadable: {firmware}"
    if isinstance(log, tdx.TdxLog):
        if log.state:
            sources["kernel log"] = log.state_line or log.state
            if log.state == "initialized":
                state = "initialized"
            else:
                from_log = log.state
        ver = ver or log.version
    elif log.kind != "absent":
        sources["kernel log"] = f"unreadable: {log}"
    if kvm_param is True:
        # KVM sets tdx=Y only after it brought the module up (reset to N on failure).
        sources["kvm_intel tdx"] = "Y (KVM initialized the TDX module)"
        state = "initialized"
    elif kvm_param is False:
        sources["kvm_intel tdx"] = "N"
    if state == "unknown" and from_log:
        state = "not supported" if from_log == "unsupported" else from_log
    if (
        state == "unknown"
        and isinstance(firmware, tdx.FirmwareTdx)
        and firmware.status in ("none", "loaded", "shutdown")
    ):
        state = "not initialized"
    return TdxModule(state, ver, sources)


def gather(
    host: Host,
    *,
    load_msr_module: str = "auto",
    ledger: Ledger | None = None,
    full: bool = True,
    target_image: str | None = None,
) -> HostFacts:
    """Read everything the checks need from the host (`full=False`: what guests need)."""
    cpu = cpuinfo.read_cpuinfo(host)
    online = cpuinfo.read_online(host)
    release = kernel.read_release(host)
    kvm_param = tdx.read_kvm_tdx_param(host)
    version = tdx.read_tdx_host_version(host)
    firmware = tdx.read_firmware_tdx(host)
    log = tdx.read_tdx_log(host)
    capacity = cgroup.read_misc(host, "misc.capacity")
    current = cgroup.read_misc(host, "misc.current")
    module = module_state(kvm_param, version, firmware, log)
    use = tdx_use(
        cpu,
        cgroup.tdx_count(capacity, host.display("sys/fs/cgroup/misc.capacity")),
        kvm_param,
        module,
    )
    msrs = None
    if full and (isinstance(cpu, Problem) or cpu.is_intel):
        cpus = online if isinstance(online, list) else None
        if cpus is None and isinstance(cpu, cpuinfo.CpuInfo):
            cpus = [c.processor for c in cpu.cpus]
        msrs = msr.read_msrs(host, cpus or [0], load_msr_module)
    kallsyms = kernel.read_kallsyms(host) if full and use.evaluated else None
    enumeration = kvm.enumerate_vms(host)
    root_tdx = cgroup.tdx_count(current, host.display("sys/fs/cgroup/misc.current"))
    guests = kvm.classify(host, enumeration, use.state, root_tdx)
    return HostFacts(
        root=host.root,
        live=host.live,
        cpuinfo=cpu,
        online=online,
        msrs=msrs,
        release=release,
        cmdline=kernel.read_cmdline(host),
        config=kernel.read_config(host, release) if full else Problem("absent", "", "not read"),
        kallsyms=kallsyms,
        kexec=kernel.read_kexec(host),
        kvm_tdx_param=kvm_param,
        tdx_host_version=version,
        firmware_tdx=firmware,
        tdx_log=log,
        misc_capacity=capacity,
        misc_current=current,
        tdx_use=use,
        module=module,
        enumeration=enumeration,
        guests=guests,
        ledger=ledger,
        target=read_target(host, target_image) if target_image else None,
        module_update=tdx.read_module_update(host) if full else None,
    )
