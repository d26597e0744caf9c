"""HostFacts: the typed snapshot every check reads, and how it is gathered."""

import os
from typing import NamedTuple

from .host import Host, Problem
from .readers import cgroup, cpuinfo, kernel, kvm, msr, tdx, view, vmclass


class TdxUse(NamedTuple):
    """Is TDX in use: "yes", "no" or "unknown" (DESIGN.md "The checklist").

    `sources` maps each source to what it said; `unreadable` names the sources
    that exist but could not be read (with why, in `sources`).
    """

    state: str
    sources: dict[str, str]
    unreadable: tuple[str, ...] = ()

    @property
    def evaluated(self) -> bool:
        """TDX-only checks run when TDX is in use."""
        return self.state == "yes"


class HostView(NamedTuple):
    """What this process sees of the host (DESIGN.md "The host view")."""

    pid_namespace: view.Namespace
    cgroup_namespace: view.Namespace
    misc_cgroup: str  # cgroup.MiscRoot.layout

    @property
    def partial(self) -> list[str]:
        """Why the view is partial, one phrase per reason; empty when it is whole."""
        out: list[str] = []
        if self.pid_namespace.foreign:
            out.append(
                f"foreign PID namespace ({self.pid_namespace.said}): /proc shows part of the "
                "host, VMs only from debugfs"
            )
        if self.cgroup_namespace.foreign or self.misc_cgroup == "not the root":
            out.append("misc cgroup is not the host's root: its counts are unavailable")
        return out

    def to_json(self) -> dict[str, str]:
        return {
            "pid_namespace": self.pid_namespace.state,
            "cgroup_namespace": self.cgroup_namespace.state,
            "misc_cgroup": self.misc_cgroup,
        }


class TdxModule(NamedTuple):
    """The TDX module as every source tells it.

    `state`: "initialized", "failed", "not loaded" (the BIOS loaded no module), "not
    initialized" (old firmware sysfs: none, loaded or shutdown), "not supported" (7.1+
    log: the platform has no TDX) or "unknown". `version` as the source printed it:
    X.Y.ZZ (tdx_host/version, 7.1+ log), X.Y.ZZ.WW (6.14 -intel log) or X.Y (old sysfs,
    6.8 -intel log); tdx.version_key gives the form a configured list is compared with.
    `version_from` names its source (a key of `sources`): "kernel log" means the module
    that booted, which a runtime update (7.2+) replaces without a new line.
    """

    state: str
    version: str | None
    sources: dict[str, str]
    version_from: str | None = None

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
    root: str  # as the user named it: a replayed snapshot's archive, not its extraction
    live: bool
    cpuinfo: cpuinfo.CpuInfo | Problem
    online: list[int] | Problem
    msrs: msr.MsrFacts | None  # None: not read (not an Intel CPU)
    release: str | Problem
    cmdline: str | Problem
    #: kvm_intel.tdx as the kernel command line sets it (kernel.cmdline_bool): True or
    #: False, None when not given, a Problem when unreadable or not a boolean.
    kvm_tdx_cmdline: bool | Problem | None
    config: kernel.KernelConfig | Problem
    kallsyms: kernel.Kallsyms | Problem | None  # None: not read (TDX not in use)
    kexec: kernel.KexecSysfs
    kvm_tdx_param: bool | Problem
    tdx_host_version: str | Problem
    firmware_tdx: tdx.FirmwareTdx | Problem
    tdx_log: tdx.TdxLog | Problem
    misc_capacity: dict[str, int] | Problem
    misc_current: dict[str, int] | Problem
    #: Root misc.current `tdx` (cgroup.MiscRoot.tdx_current): a missing line is 0 only
    #: when misc.capacity lists tdx.
    root_tdx_current: int | Problem
    view: HostView
    tdx_use: TdxUse
    module: TdxModule
    enumeration: kvm.Enumeration
    guests: list[vmclass.Guest]
    ledger: Ledger | None = None
    target: TargetKernel | None = None
    #: sys/class/firmware/tdx_module (7.2+ runtime update); None: absent or not read.
    module_update: tdx.ModuleUpdate | None = None

    @property
    def is_intel(self) -> bool | None:
        """True/False from cpuinfo; None when cpuinfo could not be read."""
        if isinstance(self.cpuinfo, Problem):
            return None
        return self.cpuinfo.is_intel


def tdx_use(
    cpu: cpuinfo.CpuInfo | Problem,
    capacity: int | Problem,
    current: int | Problem,
    kvm_param: bool | Problem,
    module: TdxModule,
) -> TdxUse:
    """Is TDX in use, from every source DESIGN.md lists but the VMs (see with_td_guests).

    yes: any readable source says so. unknown: none says yes and one exists but
    cannot be read (the kernel log alone does not count when cpuinfo was read;
    a misc count that is not the host's counts). no: otherwise. A cpuinfo that
    reads and is not Intel is no.
    """
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
    note("misc.current tdx", current, isinstance(current, int) and current > 0)
    note("kvm_intel tdx", kvm_param, kvm_param is True)
    if module.state == "initialized":
        yes = True
        sources["TDX module"] = "initialized"
    for name, said in module.sources.items():
        if said.startswith("unreadable"):
            sources[name] = said
            if name != "kernel log" or isinstance(cpu, Problem):
                unreadable.append(name)
    state = "yes" if yes else "unknown" if unreadable else "no"
    return TdxUse(state, sources, tuple(unreadable))


def with_td_guests(use: TdxUse, guests: list[vmclass.Guest]) -> TdxUse:
    """TDX is in use when a VM is a TD on positive evidence (classification step 1)."""
    tds = [g for g in guests if g.kind == "td"]
    if use.state == "yes" or not tds:
        return use
    names = ", ".join(f"{g.name or '?'} (pid {g.pid})" for g in tds[:3])
    return use._replace(state="yes", sources={**use.sources, "VMs classified td": names})


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
    ver_from: str | None = None
    from_log: str | None = None  # the log's word when it is not "initialized"
    if isinstance(version, str):
        sources["tdx_host version"] = version
        state, ver, ver_from = "initialized", version, "tdx_host version"
    elif version.kind != "absent":
        sources["tdx_host version"] = f"unreadable: {version}"
    if isinstance(firmware, tdx.FirmwareTdx):
        sources["firmware tdx_module status"] = firmware.status
        if firmware.status == "initialized":
            state = "initialized"
            if ver is None and firmware.version:
                ver, ver_from = firmware.version, "firmware tdx_module status"
    elif firmware.kind != "absent":
        sources["firmware tdx_module status"] = f"unreadable: {firmware}"
    if isinstance(log, tdx.TdxLog):
        if log.state:
            sources["kernel log"] = log.state_line or log.state
            if log.state == "initialized":
                state = "initialized"
            else:
                from_log = log.state
        if ver is None and log.version:
            ver, ver_from = log.version, "kernel log"
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
    return TdxModule(state, ver, sources, ver_from)


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
    pid_ns = view.read_namespace(host, "pid")
    cgroup_ns = view.read_namespace(host, "cgroup")
    misc = cgroup.read_misc_root(host, cgroup_ns.state)
    root_tdx = misc.tdx_current(host)
    module = module_state(kvm_param, version, firmware, log)
    use = tdx_use(cpu, misc.tdx_capacity(host), root_tdx, kvm_param, module)
    msrs = None
    if full and (isinstance(cpu, Problem) or cpu.is_intel):
        cpus = online if isinstance(online, list) else None
        if cpus is None and isinstance(cpu, cpuinfo.CpuInfo):
            cpus = [c.processor for c in cpu.cpus]
        msrs = msr.read_msrs(host, cpus or [0], load_msr_module)
    enumeration = kvm.enumerate_vms(host, proc_partial=pid_ns.foreign)
    guests = vmclass.classify(host, enumeration, use.state, root_tdx, misc)
    use = with_td_guests(use, guests)
    kallsyms = kernel.read_kallsyms(host) if full and use.evaluated else None
    cmdline = kernel.read_cmdline(host)
    return HostFacts(
        root=host.source,
        live=host.live,
        cpuinfo=cpu,
        online=online,
        msrs=msrs,
        release=release,
        cmdline=cmdline,
        kvm_tdx_cmdline=kernel.cmdline_bool(
            cmdline, kernel.KVM_INTEL_TDX, host.display(kernel.CMDLINE)
        ),
        config=kernel.read_config(host, release) if full else Problem("absent", "", "not read"),
        kallsyms=kallsyms,
        kexec=kernel.read_kexec(host),
        kvm_tdx_param=kvm_param,
        tdx_host_version=version,
        firmware_tdx=firmware,
        tdx_log=log,
        misc_capacity=misc.capacity,
        misc_current=misc.current,
        root_tdx_current=root_tdx,
        view=HostView(pid_ns, cgroup_ns, misc.layout),
        tdx_use=use,
        module=module,
        enumeration=enumeration,
        guests=guests,
        ledger=ledger,
        target=read_target(host, target_image) if target_image else None,
        module_update=tdx.read_module_update(host) if full else None,
    )
