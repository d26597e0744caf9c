"""Fixture host roots: a short spec in, a directory tree in the kernel's own formats out.

A test scenario is a few lines::

    root = build(tmp_path, tdx_host(
        processes=[VmProc(pid=4242, cmdline=qemu_td_cmdline(), misc_tdx=1)],
        misc_current={"tdx": 1},
    ))

Every file is written as the kernel (or libvirt, or QEMU) writes it: cpuinfo blocks padded with
tabs, NUL-separated command lines, ``prio,seq,usec,flags;text`` kmsg records, sparse MSR files
read with ``pread(fd, 8, index)``, misc cgroup files charged up the hierarchy, ``TID-FD`` debugfs
directories. Text files end with a newline; ``extra_files`` are written verbatim so a test can
feed exact (even malformed) bytes.

Where a fixture cannot be the kernel:

- A fixture directory lists everything it holds: ``proc/TID`` of a thread that is not a process
  leader shows up when ``proc/`` is listed (the kernel hides it). It holds no ``fd/`` so a scan
  of ``proc/*/fd`` still finds each VM once.
- An MSR that is not given reads as zeros inside the file and as a short read past its end
  (the kernel answers EIO). Two MSRs less than 8 apart (0x981 and 0x982) cannot both be held:
  their 8-byte slots overlap, so `build` refuses such a spec.
- ``dev/kmsg`` is a regular file: read to EOF where the kernel answers EAGAIN.

The builder writes files directly (no subprocesses): 20,000 filler processes and 200,000
kallsyms lines take under two seconds on tmpfs. On a disk that limits I/O the 100,000 small files
cost what the disk allows, so a benchmark should build its root under /dev/shm.

`build` expects `root` to be new or empty.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import os
import shutil
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def bzimage(version: str, size: int = 64 * 1024) -> bytes:
    """A minimal x86 bzImage head: boot flag, "HdrS" at 0x202, kernel_version at 0x20E.

    As arch/x86/boot/header.S lays it out: the boot flag 0xAA55 at 0x1FE, the "HdrS" magic
    at 0x202, the boot protocol version at 0x206, and at 0x20E the offset, minus 0x200, of
    the NUL-terminated version string (here at 0x3000). `size` bytes in all.
    """
    data = bytearray(size)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    data[0x206:0x208] = (0x020F).to_bytes(2, "little")
    where = 0x3000
    data[0x20E:0x210] = (where - 0x200).to_bytes(2, "little")
    raw = version.encode() + b"\0"
    data[where : where + len(raw)] = raw
    return bytes(data)


def _words(text: str) -> list[str]:
    return text.split()


# key -> (vendor_id, family, model, model name)
CPU_MODELS: dict[str, tuple[str, int, int, str]] = {
    "sapphire_rapids": ("GenuineIntel", 6, 143, "Intel(R) Xeon(R) Platinum 8480+"),
    "emerald_rapids": ("GenuineIntel", 6, 207, "INTEL(R) XEON(R) PLATINUM 8592+"),
    "granite_rapids": ("GenuineIntel", 6, 173, "Intel(R) Xeon(R) 6980P"),
    "granite_rapids_d": ("GenuineIntel", 6, 174, "Intel(R) Xeon(R) 6 SoC 6556P-B"),
    "sierra_forest": ("GenuineIntel", 6, 175, "Intel(R) Xeon(R) 6780E"),
    "amd_epyc": ("AuthenticAMD", 25, 17, "AMD EPYC 9654 96-Core Processor"),
}


@dataclass(frozen=True)
class _CpuDetails:
    stepping: int
    microcode: int
    mhz: str
    cache_kb: int
    cpuid_level: int
    bogomips: str
    phys_bits: int
    virt_bits: int


_CPU_DETAILS: dict[str, _CpuDetails] = {
    "sapphire_rapids": _CpuDetails(8, 0x2B000620, "2000.000", 107520, 32, "4000.00", 46, 57),
    "emerald_rapids": _CpuDetails(2, 0x21000291, "1900.000", 327680, 32, "3800.00", 46, 57),
    "granite_rapids": _CpuDetails(1, 0x10003A2, "2000.000", 516096, 32, "4000.00", 52, 57),
    "granite_rapids_d": _CpuDetails(1, 0x10003A2, "2300.000", 294912, 32, "4600.00", 52, 57),
    "sierra_forest": _CpuDetails(3, 0x3000341, "2200.000", 110592, 32, "4400.00", 46, 57),
    "amd_epyc": _CpuDetails(1, 0xA101148, "2400.000", 1024, 16, "4792.88", 52, 57),
}
_DEFAULT_DETAILS = _CpuDetails(1, 0x1, "2000.000", 65536, 32, "4000.00", 46, 57)

# The flags line of a Sapphire Rapids server (bare metal, kernel 6.x), in the kernel's bit order.
INTEL_FLAGS: list[str] = _words(
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi "
    "mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon "
    "pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni pclmulqdq "
    "dtes64 monitor ds_cpl vmx smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 "
    "x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch "
    "cpuid_fault epb cat_l3 cat_l2 cdp_l3 intel_ppin cdp_l2 ssbd mba ibrs ibpb stibp "
    "ibrs_enhanced tpr_shadow flexpriority ept vpid ept_ad fsgsbase tsc_adjust bmi1 avx2 smep "
    "bmi2 erms invpcid cqm rdt_a avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb "
    "intel_pt avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc "
    "cqm_occup_llc cqm_mbm_total cqm_mbm_local split_lock_detect user_shstk avx_vnni "
    "avx512_bf16 wbnoinvd dtherm ida arat pln pts hfi vnmi avx512vbmi umip pku ospke waitpkg "
    "avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq la57 "
    "rdpid bus_lock_detect cldemote movdiri movdir64b enqcmd fsrm md_clear serialize tsxldtrk "
    "pconfig arch_lbr ibt amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d arch_capabilities"
)

INTEL_VMX_FLAGS: list[str] = _words(
    "vnmi preemption_timer posted_intr invvpid ept_x_only ept_ad ept_1gb flexpriority apicv "
    "tsc_offset vtpr mtf vapic ept vpid unrestricted_guest vapic_reg vid ple shadow_vmcs pml "
    "ept_mode_based_exec tsc_scaling usr_wait_pause notify_vm_exiting ipi_virt"
)

DEFAULT_BUGS: list[str] = _words("spectre_v1 spectre_v2 spec_store_bypass swapgs eibrs_pbrsb bhi")

# An EPYC 9654 (Genoa); used instead of the Intel defaults when the CPU is not Intel.
AMD_FLAGS: list[str] = _words(
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr "
    "sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good amd_lbr_v2 "
    "nopl nonstop_tsc cpuid extd_apicid aperfmperf rapl pni pclmulqdq monitor ssse3 fma cx16 "
    "pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm cmp_legacy svm "
    "extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs skinit wdt tce topoext "
    "perfctr_core perfctr_nb bpext perfctr_llc mwaitx cpb cat_l3 cdp_l3 hw_pstate ssbd mba "
    "perfmon_v2 ibrs ibpb stibp ibrs_enhanced vmmcall fsgsbase bmi1 avx2 smep bmi2 erms invpcid "
    "cqm rdt_a avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni "
    "avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total "
    "cqm_mbm_local user_shstk avx512_bf16 clzero irperf xsaveerptr rdpru wbnoinvd amd_ppin cppc "
    "arat npt lbrv svm_lock nrip_save tsc_scale vmcb_clean flushbyasid decodeassists "
    "pausefilter pfthreshold avic v_vmsave_vmload vgif x2avic v_spec_ctrl vnmi avx512vbmi umip "
    "pku ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq "
    "la57 rdpid overflow_recov succor smca fsrm flush_l1d debug_swap"
)

AMD_BUGS: list[str] = _words("sysret_ss_attrs spectre_v1 spectre_v2 spec_store_bypass srso")

# X86_BUG_* in bit order (arch/x86/include/asm/cpufeatures.h): the bugs line follows it.
_BUG_ORDER: list[str] = _words(
    "f00f fdiv coma amd_tlb_mmatch amd_apic_c1e 11ap fxsave_leak clflush_monitor "
    "sysret_ss_attrs espfix null_seg swapgs_fence monitor amd_e400 cpu_meltdown spectre_v1 "
    "spectre_v2 spec_store_bypass l1tf mds msbds_only swapgs taa itlb_multihit srbds "
    "mmio_stale_data mmio_unknown retbleed eibrs_pbrsb smt_rsb gds tdx_pw_mce srso div0 rfds "
    "bhi ibpb_no_ret spectre_v2_user old_microcode its its_native_only tsa vmscape"
)

TDX_HOST = "sys/devices/faux/tdx_host"
FW_UPLOAD_CLASS = "sys/class/firmware/tdx_module"
# HostSpec field (the pre-6.19 file name) -> its 6.19+ name in sys/kernel/kexec/.
KEXEC_NAMES = {
    "kexec_loaded": "loaded",
    "kexec_crash_loaded": "crash_loaded",
    "kexec_crash_size": "crash_size",
}

# misc cgroup resources in enum misc_res_type order (include/linux/misc_cgroup.h).
_MISC_ORDER = ["sev", "sev_es", "tdx"]

# Values from a Granite Rapids host with 64 TDX KeyIDs (KeyID bits 7, the top one for TDX).
# 0x981 (IA32_TME_CAPABILITY) is left out: a fixture MSR file holds each value at offset = index,
# so 0x981 and 0x982 would share 7 bytes (see build's ValueError). Use TME_CAPABILITY alone.
TDX_MSRS: dict[int, int] = {
    0x87: (64 << 32) | 63,  # 63 MKTME KeyIDs (1..63), 64 TDX KeyIDs (64..127)
    0x982: (1 << 48) | (1 << 36) | (7 << 32) | 0b11,  # locked, enabled, 7 bits, 1 for TDX
    0x1401: 0x000F_FFFF_FE00_0C00,  # SEAMRR mask: bit 10 locked, bit 11 enabled
}
TME_CAPABILITY: int = (127 << 36) | (7 << 32) | 0b101  # MSR 0x981: 127 keys, 7 KeyID bits

_DEBUGFS_KVM_STATS = _words(
    "blocking directed_yield_attempted directed_yield_successful exits fpu_reload guest_mode "
    "halt_attempted_poll halt_exits halt_poll_fail_hist halt_poll_fail_ns halt_poll_invalid "
    "halt_poll_success_hist halt_poll_success_ns halt_successful_poll halt_wait_hist "
    "halt_wait_ns halt_wakeup host_state_reload hypercalls insn_emulation insn_emulation_fail "
    "invlpg io_exits irq_exits irq_injections irq_window_exits l1d_flush "
    "max_mmu_page_hash_collisions max_mmu_rmap_size mmio_exits mmu_cache_miss mmu_flooded "
    "mmu_pde_zapped mmu_pte_write mmu_recycled mmu_shadow_zapped mmu_unsync nested_run "
    "nmi_injections nmi_window_exits notify_window_exits nx_lpage_splits pages_1g pages_2m "
    "pages_4k pf_emulate pf_fast pf_fixed pf_guest pf_mmio_spte_created pf_spurious pf_taken "
    "preemption_other preemption_reported remote_tlb_flush remote_tlb_flush_requests req_event "
    "request_irq_exits signal_exits tlb_flush"
)

_HZ = 100  # USER_HZ: proc/PID/stat times are in these ticks


@dataclass
class VmProc:
    """A process holding KVM VM file descriptors."""

    pid: int
    cmdline: list[str]  # proc/PID/cmdline: NUL-separated, trailing NUL
    comm: str = "qemu-system-x86"  # truncated to 15 characters like the kernel's TASK_COMM_LEN
    cgroup: str = "/"  # cgroup v2 path: proc/PID/cgroup reads "0::/PATH\n"
    vm_fds: list[int] = field(default_factory=lambda: [12])  # fd/N -> anon_inode:kvm-vm
    tid: int | None = None  # thread that created the VMs (debugfs TID-FD); default pid
    debugfs: bool = True  # sys/kernel/debug/kvm/TID-FD/ per VM fd (when HostSpec.debugfs_kvm)
    misc_tdx: int | None = None  # KeyIDs charged: misc.current "tdx N" in the cgroup and above
    uid: int = 0
    misc_cgroup: str | None = None  # cgroup charged, when not `cgroup` (a libvirt vcpu cgroup)
    ppid: int = 1
    vcpus: int = 2  # fd/N -> anon_inode:kvm-vcpu:I after the VM fds; vcpuI in debugfs
    # VMs whose kvm-vm fd was closed while their vCPU fds stay open (the VM lives on): no
    # fd/N -> kvm-vm link, but `vcpus` vCPU links each and the debugfs TID-FD directory.
    closed_vm_fds: list[int] = field(default_factory=list)
    # QEMU 8.1 and later holds a statistics descriptor per vCPU (KVM_GET_STATS_FD):
    # fd/N -> anon_inode:kvm-vcpu-stats:I after the vCPU links.
    vcpu_stats: bool = True
    extra_fds: dict[int, str] = field(default_factory=dict)  # more fd links, fd -> target
    start_ticks: int | None = None  # stat field 22; default: about an hour before "now"


@dataclass
class LibvirtDomain:
    """A running libvirt domain: run/libvirt/qemu/NAME.xml (live status) and NAME.pid."""

    name: str
    pid: int
    tdx: bool = True  # <launchSecurity type='tdx'>; else no launchSecurity element
    domid: int | None = None  # libvirt domain id; default: position in HostSpec.libvirt + 1
    vcpus: int = 2


@dataclass
class HostSpec:
    """What the fixture host looks like. Defaults: a Granite Rapids host, TDX off."""

    cpu: str | tuple[str, int, int, str] = "granite_rapids"  # CPU_MODELS key or the tuple
    cpus: int = 4
    sockets: int = 1
    # Vendor defaults: for a non-Intel CPU the Intel default lists are swapped for AMD ones.
    flags: list[str] = field(default_factory=lambda: list(INTEL_FLAGS))
    tdx_flag: bool = False  # "tdx_host_platform" on the flags line
    bugs: list[str] = field(default_factory=lambda: list(DEFAULT_BUGS))
    extra_bugs: list[str] = field(default_factory=list)  # e.g. ["tdx_pw_mce"]
    msrs: dict[int, int] | None = None  # same on every CPU: dev/cpu/N/msr
    msrs_per_cpu: dict[int, dict[int, int]] | None = None  # cpu -> {index: value}, over msrs
    release: str | None = "6.18.2-1-amd64"  # proc/sys/kernel/osrelease; None: absent
    cmdline: str = "BOOT_IMAGE=/boot/vmlinuz-6.18.2-1-amd64 root=/dev/mapper/vg-root ro quiet"
    config: dict[str, str] | None = None  # boot/config-RELEASE; "n" -> "# CONFIG_X is not set"
    config_gz: bool = False  # proc/config.gz instead of boot/config-RELEASE
    kallsyms: list[str] | None = None  # names (type T); "name [module]" for a module's
    kallsyms_filler: int = 2000  # realistic other symbols
    kmsg: list[str | tuple[int, str]] | None = None  # text, or (prio, text); dev/kmsg records
    kvm_intel_tdx: str | None = None  # "Y"/"N": sys/module/kvm_intel/parameters/tdx
    tdx_host_version: str | None = None  # sys/devices/faux/tdx_host/version
    firmware_tdx: dict[str, str] | None = None  # sys/firmware/tdx/tdx_module/<name>
    misc_capacity: dict[str, int] | None = None  # root misc.capacity, lines as given
    misc_current: dict[str, int] | None = None  # root misc.current, lines as given
    # "v2"; "v1" (RHEL 8 style: the misc hierarchy at sys/fs/cgroup/misc/, proc/PID/cgroup
    # lists v1 controllers, `N:misc:/PATH`); "hybrid" (v1 controllers plus the `0::` line).
    cgroup_layout: str = "v2"
    # The cgroup root seen is a child (a container's view): misc.max and misc.current there,
    # no misc.capacity (kernel/cgroup/misc.c: capacity only on the root, max never on it).
    cgroup_child_view: bool = False
    pid_ns: int | None = None  # proc/self/ns/pid -> "pid:[N]"; init is 4026531836
    cgroup_ns: int | None = None  # proc/self/ns/cgroup -> "cgroup:[N]"; init is 4026531835
    kexec_loaded: int | None = 1  # sys/kernel/kexec_loaded; None: absent
    kexec_crash_loaded: int | None = 0
    kexec_crash_size: int | None = 0
    # Where the three values live: "old" sys/kernel/kexec_* files (before 6.19), "new"
    # sys/kernel/kexec/{loaded,crash_loaded,crash_size} only, "both" the 6.19+ layout
    # (the directory, and the old names as symlinks into it).
    kexec_sysfs: str = "old"
    kexec_crash_cma_ranges: str | None = None  # sys/kernel/kexec/crash_cma_ranges (new layouts)
    # sys/devices/faux/tdx_host/<name> beside version (7.2+): "seamldr_version",
    # "num_remaining_updates", or the "seamldr/version" variant; written as given.
    tdx_host_attrs: dict[str, str] | None = None
    # Runtime module update (7.2+): files of tdx_host/firmware/tdx_module/ ("status", "error",
    # ...) with the class link sys/class/firmware/tdx_module; None: absent.
    fw_upload: dict[str, str] | None = None
    online: str | None = None  # sys/devices/system/cpu/online; default "0-(cpus-1)"
    debugfs_kvm: bool = True  # sys/kernel/debug/kvm/ with its stat files
    processes: list[VmProc] = field(default_factory=list)
    other_processes: int = 5  # filler processes without VMs
    libvirt: list[LibvirtDomain] = field(default_factory=list)
    extra_files: dict[str, bytes | str] = field(default_factory=dict)  # verbatim, last
    remove: list[str] = field(default_factory=list)  # paths deleted after everything else
    boot_id: str | None = "5b3c1f0e-8a47-4c2e-9d61-2f7a0e4b9c13"  # proc/sys/kernel/random
    uptime: float = 864000.0  # proc/uptime seconds; process start times fall before it


# --------------------------------------------------------------------------- low-level writes


def _put(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _line(value: object) -> bytes:
    text = str(value)
    return (text if text.endswith("\n") else text + "\n").encode()


def _mkdir(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def _symlink(target: str, path: str) -> None:
    try:
        os.symlink(target, path)
    except FileExistsError:
        os.unlink(path)
        os.symlink(target, path)


def _file(root: str, rel: str, data: bytes) -> None:
    path = os.path.join(root, rel)
    _mkdir(os.path.dirname(path))
    _put(path, data)


# --------------------------------------------------------------------------- CPU


def _cpu_identity(spec: HostSpec) -> tuple[tuple[str, int, int, str], _CpuDetails]:
    if isinstance(spec.cpu, tuple):
        return spec.cpu, _DEFAULT_DETAILS
    return CPU_MODELS[spec.cpu], _CPU_DETAILS.get(spec.cpu, _DEFAULT_DETAILS)


def _flags(spec: HostSpec, vendor: str) -> list[str]:
    flags = list(spec.flags)
    if vendor != "GenuineIntel" and flags == INTEL_FLAGS:
        flags = list(AMD_FLAGS)
    if spec.tdx_flag and "tdx_host_platform" not in flags:
        # X86_FEATURE_TDX_HOST_PLATFORM is word 7 bit 7, printed right after cdp_l3.
        at = flags.index("cdp_l3") + 1 if "cdp_l3" in flags else len(flags)
        flags.insert(at, "tdx_host_platform")
    return flags


def _bugs(spec: HostSpec, vendor: str) -> list[str]:
    bugs = list(spec.bugs)
    if vendor != "GenuineIntel" and bugs == DEFAULT_BUGS:
        bugs = list(AMD_BUGS)
    for bug in spec.extra_bugs:
        if bug not in bugs:
            bugs.append(bug)
    rank = {name: i for i, name in enumerate(_BUG_ORDER)}
    return sorted(bugs, key=lambda b: rank.get(b, len(rank)))  # stable for unknown names


def cpuinfo_text(spec: HostSpec) -> str:
    """proc/cpuinfo as arch/x86/kernel/cpu/proc.c prints it."""
    (vendor, family, model, name), d = _cpu_identity(spec)
    intel = vendor == "GenuineIntel"
    flags = _flags(spec, vendor)
    bugs = _bugs(spec, vendor)
    flags_line = "flags\t\t:" + "".join(" " + f for f in flags)
    vmx_line = "vmx flags\t:" + "".join(" " + f for f in INTEL_VMX_FLAGS)
    bugs_line = "bugs\t\t:" + "".join(" " + b for b in bugs)
    per_socket = -(-spec.cpus // max(1, spec.sockets))
    power = (
        "power management:"
        if intel
        else "power management: ts ttp tm hwpstate cpb eff_freq_ro [13] [14]"
    )
    blocks = []
    for cpu in range(spec.cpus):
        package, core = divmod(cpu, per_socket)
        apicid = package * 256 + core * 2 if intel else package * 256 + core
        lines = [
            f"processor\t: {cpu}",
            f"vendor_id\t: {vendor}",
            f"cpu family\t: {family}",
            f"model\t\t: {model}",
            f"model name\t: {name}",
            f"stepping\t: {d.stepping}",
            f"microcode\t: {d.microcode:#x}",
            f"cpu MHz\t\t: {d.mhz}",
            f"cache size\t: {d.cache_kb} KB",
            f"physical id\t: {package}",
            f"siblings\t: {per_socket}",
            f"core id\t\t: {core}",
            f"cpu cores\t: {per_socket}",
            f"apicid\t\t: {apicid}",
            f"initial apicid\t: {apicid}",
            "fpu\t\t: yes",
            "fpu_exception\t: yes",
            f"cpuid level\t: {d.cpuid_level}",
            "wp\t\t: yes",
            flags_line,
        ]
        if intel and "vmx" in flags:
            lines.append(vmx_line)
        lines += [bugs_line, f"bogomips\t: {d.bogomips}"]
        if not intel:
            lines.append("TLB size\t: 3584 4K pages")
        lines += [
            "clflush size\t: 64",
            "cache_alignment\t: 64",
            f"address sizes\t: {d.phys_bits} bits physical, {d.virt_bits} bits virtual",
            power,
            "",
            "",
        ]
        blocks.append("\n".join(lines))
    return "".join(blocks)


def _check_msr_overlap(cpu: int, values: dict[int, int]) -> None:
    indices = sorted(values)
    for low, high in itertools.pairwise(indices):
        if high - low < 8:
            raise ValueError(
                f"cpu {cpu}: MSRs {low:#x} and {high:#x} overlap in a fixture file read with "
                "pread(fd, 8, index); give only one of them"
            )


def _write_cpu(root: str, spec: HostSpec) -> None:
    _file(root, "proc/cpuinfo", cpuinfo_text(spec).encode())
    online = spec.online
    if online is None:
        online = "0" if spec.cpus == 1 else f"0-{spec.cpus - 1}"
    _file(root, "sys/devices/system/cpu/online", _line(online))
    if spec.msrs is None and spec.msrs_per_cpu is None:
        return
    for cpu in range(spec.cpus):
        values = dict(spec.msrs or {})
        values.update((spec.msrs_per_cpu or {}).get(cpu, {}))
        _check_msr_overlap(cpu, values)
        directory = os.path.join(root, "dev/cpu", str(cpu))
        _mkdir(directory)
        fd = os.open(os.path.join(directory, "msr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for index, value in values.items():
                os.pwrite(fd, struct.pack("<Q", value & 0xFFFF_FFFF_FFFF_FFFF), index)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- kernel


def _kernel_version(release: str) -> str:
    version = ""
    for ch in release:
        if not (ch.isdigit() or ch == "."):
            break
        version += ch
    return version.rstrip(".") or release


_CONFIG_BASE: list[tuple[str, str]] = [
    ("CONFIG_CC_VERSION_TEXT", '"x86_64-linux-gnu-gcc-14 (Debian 14.2.0-19) 14.2.0"'),
    ("CONFIG_CC_IS_GCC", "y"),
    ("CONFIG_GCC_VERSION", "140200"),
    ("CONFIG_CLANG_VERSION", "0"),
    ("CONFIG_AS_IS_GNU", "y"),
    ("CONFIG_AS_VERSION", "24400"),
    ("CONFIG_LD_IS_BFD", "y"),
    ("CONFIG_LD_VERSION", "24400"),
    ("CONFIG_IRQ_WORK", "y"),
    ("CONFIG_BUILDTIME_TABLE_SORT", "y"),
    ("CONFIG_THREAD_INFO_IN_TASK", "y"),
    ("CONFIG_INIT_ENV_ARG_LIMIT", "32"),
    ("CONFIG_COMPILE_TEST", "n"),
    ("CONFIG_WERROR", "n"),
    ("CONFIG_LOCALVERSION", '""'),
    ("CONFIG_LOCALVERSION_AUTO", "n"),
    ("CONFIG_X86_64_VERSION", "1"),
    ("CONFIG_64BIT", "y"),
    ("CONFIG_X86_64", "y"),
    ("CONFIG_X86", "y"),
    ("CONFIG_SMP", "y"),
    ("CONFIG_MODULES", "y"),
    ("CONFIG_MODULE_UNLOAD", "y"),
    ("CONFIG_KALLSYMS", "y"),
    ("CONFIG_KALLSYMS_ALL", "y"),
    ("CONFIG_CGROUPS", "y"),
    ("CONFIG_MEMCG", "y"),
    ("CONFIG_X86_MCE", "y"),
    ("CONFIG_X86_MCE_INTEL", "y"),
    ("CONFIG_X86_MSR", "m"),
    ("CONFIG_X86_CPUID", "m"),
    ("CONFIG_X86_X2APIC", "y"),
    ("CONFIG_X86_INTEL_TSX_MODE_OFF", "y"),
    ("CONFIG_HIBERNATION", "n"),
    ("CONFIG_VIRTUALIZATION", "y"),
    ("CONFIG_KVM", "m"),
    ("CONFIG_KVM_INTEL", "m"),
    ("CONFIG_KVM_AMD", "m"),
    ("CONFIG_DEBUG_FS", "y"),
    ("CONFIG_IKCONFIG", "n"),
]


def config_text(release: str, entries: dict[str, str]) -> str:
    """A kernel .config: the kconfig header, a base, then `entries` (CONFIG_ prefix optional)."""
    merged: dict[str, str] = dict(_CONFIG_BASE)
    for key, value in entries.items():
        merged[key if key.startswith("CONFIG_") else "CONFIG_" + key] = value
    lines = [
        "#",
        "# Automatically generated file; DO NOT EDIT.",
        f"# Linux/x86 {_kernel_version(release)} Kernel Configuration",
        "#",
    ]
    for key, value in merged.items():
        lines.append(f"# {key} is not set" if value == "n" else f"{key}={value}")
    return "\n".join(lines) + "\n"


_SYM_PREFIXES = _words(
    "kmem_cache vfs ext4 blk_mq tcp udp netif napi pci acpi irq sched rcu intel_pmu do_sys ksys "
    "mm page folio swap cgroup xfs nvme usb drm sock inet ip6 nf_conntrack bpf perf trace "
    "workqueue timer hrtimer kthread audit security selinux apparmor crypto"
)
_SYM_VERBS = _words(
    "alloc free init exit read write open release lookup update flush get put map unmap sync "
    "handle probe remove start stop enable disable show store"
)
_SYM_SUFFIXES = ("", ".isra.0", ".constprop.0", "", ".part.0", "", ".cold", "")
_SYM_TYPES = "TtTtTtDdbr"
_MODULES = ("kvm_intel", "kvm", "irqbypass", "nf_tables", "ext4", "nvme", "ice", "dm_mod")


def kallsyms_text(names: Iterable[str], filler: int) -> str:
    """proc/kallsyms: `names` as T symbols (with their __pfx_ padding symbols) among filler.

    A name written "name [module]" becomes a module symbol ("addr T name\\t[module]").
    """
    wanted = list(names)
    core = [n for n in wanted if not n.endswith("]")]
    mods = []
    for n in wanted:
        if n.endswith("]") and " [" in n:
            sym, mod = n[:-1].split(" [", 1)
            mods.append((sym, mod))
    taken = set(core) | {"__pfx_" + n for n in core} | {s for s, _ in mods}

    combos = [f"{p}_{v}" for p in _SYM_PREFIXES for v in _SYM_VERBS]
    fill_names = []
    for i in range(filler):
        rnd, k = divmod(i, len(combos))
        name = combos[k] if rnd == 0 else f"{combos[k]}_{rnd}"
        name += _SYM_SUFFIXES[i % len(_SYM_SUFFIXES)]
        if name in taken:
            name += "_filler"
        fill_names.append(name)

    n_core_fill = filler - filler // 10  # the last tenth are module symbols
    out = [
        "0000000000000000 A fixed_percpu_data",
        "0000000000000000 A __per_cpu_start",
        "0000000000001000 A cpu_debug_store",
        "0000000000002000 A irq_stack_backing_store",
        "0000000000006000 A cpu_tss_rw",
        "ffffffff81000000 T _text",
        "ffffffff81000000 T startup_64",
    ]
    addr = 0xFFFFFFFF81000100
    # Spread the wanted names through the filler so a chunked reader meets them anywhere.
    step = max(1, n_core_fill // (len(core) + 1))
    pending = list(core)
    for i in range(n_core_fill):
        if pending and i and i % step == 0:
            name = pending.pop(0)
            out.append(f"{addr - 16:016x} T __pfx_{name}")
            out.append(f"{addr:016x} T {name}")
            addr += 0x40
        out.append(f"{addr:016x} {_SYM_TYPES[i % 10]} {fill_names[i]}")
        addr += 0x30 + (i % 7) * 0x10
    for name in pending:
        out.append(f"{addr - 16:016x} T __pfx_{name}")
        out.append(f"{addr:016x} T {name}")
        addr += 0x40
    maddr = 0xFFFFFFFFC0A00000
    for j, i in enumerate(range(n_core_fill, filler)):
        mod = _MODULES[(j // 64) % len(_MODULES)]
        out.append(f"{maddr:016x} {'tT'[j % 2]} {fill_names[i]}\t[{mod}]")
        maddr += 0x40
    for sym, mod in mods:
        out.append(f"{maddr:016x} T {sym}\t[{mod}]")
        maddr += 0x40
    return "\n".join(out) + "\n"


def kmsg_bytes(entries: Iterable[str | tuple[int, str]]) -> bytes:
    """dev/kmsg records "prio,seq,usec,flags;text\\n" with increasing seq and usec."""
    records = []
    for seq, entry in enumerate(entries):
        prio, text = (6, entry) if isinstance(entry, str) else entry
        usec = 0 if seq < 2 else seq * 41_873 + (seq * seq) % 977
        records.append(f"{prio},{seq},{usec},-;{text}\n")
    return "".join(records).encode()


def _write_kernel(root: str, spec: HostSpec) -> None:
    if spec.release is not None:
        _file(root, "proc/sys/kernel/osrelease", _line(spec.release))
        version = (
            f"Linux version {spec.release} (debian-kernel@lists.debian.org) "
            "(x86_64-linux-gnu-gcc-14 (Debian 14.2.0-19) 14.2.0, GNU ld (GNU Binutils for "
            f"Debian) 2.44) #1 SMP PREEMPT_DYNAMIC Debian {spec.release.split('-amd64')[0]} "
            "(2025-12-18)"
        )
        _file(root, "proc/version", _line(version))
    _file(root, "proc/cmdline", _line(spec.cmdline))
    if spec.boot_id is not None:
        _file(root, "proc/sys/kernel/random/boot_id", _line(spec.boot_id))
    idle = spec.uptime * spec.cpus * 0.93
    _file(root, "proc/uptime", _line(f"{spec.uptime:.2f} {idle:.2f}"))
    if spec.config is not None:
        text = config_text(spec.release or "6.18.2", spec.config).encode()
        if spec.config_gz:
            _file(root, "proc/config.gz", gzip.compress(text, mtime=0))
        elif spec.release is None:
            raise ValueError("a plain kernel config needs a release (or set config_gz)")
        else:
            _file(root, f"boot/config-{spec.release}", text)
    if spec.kallsyms is not None:
        _file(root, "proc/kallsyms", kallsyms_text(spec.kallsyms, spec.kallsyms_filler).encode())
    if spec.kmsg is not None:
        _file(root, "dev/kmsg", kmsg_bytes(spec.kmsg))


def _write_tdx_state(root: str, spec: HostSpec) -> None:
    if spec.kvm_intel_tdx is not None:
        _file(root, "sys/module/kvm_intel/parameters/tdx", _line(spec.kvm_intel_tdx))
    if spec.tdx_host_version is not None:
        _file(root, f"{TDX_HOST}/version", _line(spec.tdx_host_version))
    if spec.firmware_tdx is not None:
        _mkdir(os.path.join(root, "sys/firmware/tdx/tdx_module"))
        for name, value in spec.firmware_tdx.items():
            _file(root, f"sys/firmware/tdx/tdx_module/{name}", _line(value))
    if spec.tdx_host_attrs is not None:
        for name, value in spec.tdx_host_attrs.items():
            _file(root, f"{TDX_HOST}/{name}", _line(value))
    if spec.fw_upload is not None:
        device = f"{TDX_HOST}/firmware/tdx_module"
        _mkdir(os.path.join(root, device))
        for name, value in spec.fw_upload.items():
            _file(root, f"{device}/{name}", _line(value))
        _mkdir(os.path.join(root, "sys/class/firmware"))
        _symlink("../../devices/faux/tdx_host/firmware/tdx_module", f"{root}/{FW_UPLOAD_CLASS}")
    _write_kexec(root, spec)


def _write_kexec(root: str, spec: HostSpec) -> None:
    if spec.kexec_sysfs not in ("old", "new", "both"):
        raise ValueError(f"kexec_sysfs: old, new or both, not {spec.kexec_sysfs!r}")
    new = spec.kexec_sysfs in ("new", "both")
    if new:
        _mkdir(os.path.join(root, "sys/kernel/kexec"))
        if spec.kexec_crash_cma_ranges is not None:
            _file(root, "sys/kernel/kexec/crash_cma_ranges", spec.kexec_crash_cma_ranges.encode())
    for old, name in KEXEC_NAMES.items():
        value = getattr(spec, old)
        if value is None:
            continue
        if not new:
            _file(root, f"sys/kernel/{old}", _line(value))
            continue
        _file(root, f"sys/kernel/kexec/{name}", _line(value))
        if spec.kexec_sysfs == "both":
            _symlink(f"kexec/{name}", f"{root}/sys/kernel/{old}")


# --------------------------------------------------------------------------- cgroups


def _misc_lines(values: dict[str, int]) -> bytes:
    return "".join(f"{k} {v}\n" for k, v in values.items()).encode()


_V1_CONTROLLERS = (
    "cpuset", "cpu,cpuacct", "blkio", "memory", "devices", "freezer", "net_cls,net_prio",
    "perf_event", "hugetlb", "pids", "rdma", "misc",
)  # fmt: skip


def proc_cgroup_text(spec: HostSpec, path: str) -> str:
    """proc/PID/cgroup for a process in cgroup `path` under the spec's layout."""
    if spec.cgroup_layout == "v2":
        return f"0::{path}\n"
    n = len(_V1_CONTROLLERS)
    lines = [f"{n + 1 - i}:{c}:{path}" for i, c in enumerate(_V1_CONTROLLERS)]
    lines.append(f"1:name=systemd:{path}")
    if spec.cgroup_layout == "hybrid":
        lines.append(f"0::{path}")
    return "\n".join(lines) + "\n"


def _write_namespaces(root: str, spec: HostSpec) -> None:
    """proc/self/ns/{pid,cgroup}: the links the kernel shows (`pid:[INODE]`)."""
    for name, inode in (("pid", spec.pid_ns), ("cgroup", spec.cgroup_ns)):
        if inode is not None:
            ns = os.path.join(root, "proc/self/ns")
            _mkdir(ns)
            _symlink(f"{name}:[{inode}]", os.path.join(ns, name))


def _misc_base(root: str, spec: HostSpec) -> str:
    sub = "sys/fs/cgroup" if spec.cgroup_layout == "v2" else "sys/fs/cgroup/misc"
    return os.path.join(root, sub)


def _write_cgroups(root: str, spec: HostSpec) -> None:
    base = _misc_base(root, spec)
    if spec.misc_capacity is not None or spec.misc_current is not None:
        _mkdir(base)
        if spec.cgroup_layout == "v2":
            _put(
                os.path.join(base, "cgroup.controllers"),
                b"cpuset cpu io memory hugetlb pids rdma misc\n",
            )
        else:
            _put(os.path.join(base, "cgroup.procs"), b"1\n")
    if spec.misc_capacity is not None:
        if spec.cgroup_child_view:
            _put(
                os.path.join(base, "misc.max"),
                b"".join(f"{k} max\n".encode() for k in spec.misc_capacity),
            )
        else:
            _put(os.path.join(base, "misc.capacity"), _misc_lines(spec.misc_capacity))
    if spec.misc_current is not None:
        _put(os.path.join(base, "misc.current"), _misc_lines(spec.misc_current))

    for proc in spec.processes:
        if proc.cgroup.strip("/"):
            directory = os.path.join(base, proc.cgroup.strip("/"))
            _mkdir(directory)
            _put(os.path.join(directory, "cgroup.procs"), _line(proc.pid))
    # misc charges count upward: every cgroup between the charged one and the root shows them.
    charged: dict[str, int] = {}
    for proc in spec.processes:
        if proc.misc_tdx is None:
            continue
        parts = (proc.misc_cgroup or proc.cgroup).strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            path = "/".join(parts[:depth])
            if path:
                charged[path] = charged.get(path, 0) + proc.misc_tdx
    capacity = spec.misc_capacity or {}
    names = [n for n in _MISC_ORDER if capacity.get(n, 0) > 0 or n == "tdx"]
    names += [n for n in capacity if n not in names and capacity[n] > 0]
    for path, usage in charged.items():
        directory = os.path.join(base, path)
        _mkdir(directory)
        current = {n: (usage if n == "tdx" else 0) for n in names}
        _put(os.path.join(directory, "misc.current"), _misc_lines(current))
        _put(os.path.join(directory, "misc.peak"), _misc_lines(current))
        _put(os.path.join(directory, "misc.max"), "".join(f"{n} max\n" for n in names).encode())
        _put(
            os.path.join(directory, "misc.events"), "".join(f"{n}.max 0\n" for n in names).encode()
        )


# --------------------------------------------------------------------------- processes


@functools.cache
def _cpumask(n: int) -> str:
    """A "%*pb" bitmap of CPUs 0..n-1: 32-bit hex words, comma separated, first one unpadded."""
    digits = f"{(1 << n) - 1:x}"
    first = len(digits) % 8 or 8
    words = [digits[:first]] + [digits[i : i + 8] for i in range(first, len(digits), 8)]
    return ",".join(words)


_MEMS_ALLOWED = ",".join(["00000000"] * 31 + ["00000001"])


def _status(
    *,
    name: str,
    pid: int,
    tgid: int,
    ppid: int,
    uid: int,
    threads: int,
    ncpus: int,
    kthread: bool = False,
    vm_kb: int = 0,
    rss_kb: int = 0,
    fdsize: int = 64,
    state: str = "S (sleeping)",
    sigcgt: str = "0000000000000000",
) -> str:
    cpus_list = "0" if ncpus == 1 else f"0-{ncpus - 1}"
    cap = "000001ffffffffff" if uid == 0 else "0000000000000000"
    head = (
        f"Name:\t{name}\nUmask:\t0022\nState:\t{state}\nTgid:\t{tgid}\nNgid:\t0\nPid:\t{pid}\n"
        f"PPid:\t{ppid}\nTracerPid:\t0\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
        f"Gid:\t{uid}\t{uid}\t{uid}\t{uid}\nFDSize:\t{fdsize}\nGroups:\t \nNStgid:\t{tgid}\n"
        f"NSpid:\t{pid}\nNSpgid:\t{0 if kthread else tgid}\nNSsid:\t{0 if kthread else tgid}\n"
        f"Kthread:\t{1 if kthread else 0}\n"
    )
    mem = ""
    if not kthread:
        mem = (
            f"VmPeak:\t{vm_kb + 4096:8d} kB\nVmSize:\t{vm_kb:8d} kB\nVmLck:\t       0 kB\n"
            f"VmPin:\t       0 kB\nVmHWM:\t{rss_kb + 512:8d} kB\nVmRSS:\t{rss_kb:8d} kB\n"
            f"RssAnon:\t{rss_kb * 3 // 4:8d} kB\nRssFile:\t{rss_kb // 4:8d} kB\n"
            "RssShmem:\t       0 kB\n"
            f"VmData:\t{vm_kb // 3:8d} kB\nVmStk:\t     132 kB\nVmExe:\t    4864 kB\n"
            f"VmLib:\t   41736 kB\nVmPTE:\t{max(40, rss_kb // 400):8d} kB\nVmSwap:\t       0 kB\n"
            "HugetlbPages:\t       0 kB\nCoreDumping:\t0\nTHP_enabled:\t1\n"
            "untag_mask:\t0xffffffffffffffff\n"
        )
    tail = (
        f"Threads:\t{threads}\nSigQ:\t0/1546361\nSigPnd:\t0000000000000000\n"
        "ShdPnd:\t0000000000000000\nSigBlk:\t0000000000000000\n"
        f"SigIgn:\t{'ffffffffffffffff' if kthread else '0000000000001000'}\nSigCgt:\t{sigcgt}\n"
        f"CapInh:\t0000000000000000\nCapPrm:\t{cap}\nCapEff:\t{cap}\n"
        "CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t0\n"
        f"Seccomp:\t{0 if kthread or uid == 0 else 2}\nSeccomp_filters:\t{0 if kthread else 1}\n"
        "Speculation_Store_Bypass:\tthread vulnerable\n"
        "SpeculationIndirectBranch:\tconditional enabled\n"
        f"Cpus_allowed:\t{_cpumask(ncpus)}\nCpus_allowed_list:\t{cpus_list}\n"
        f"Mems_allowed:\t{_MEMS_ALLOWED}\nMems_allowed_list:\t0\n"
        f"voluntary_ctxt_switches:\t{pid * 7 % 100000}\n"
        f"nonvoluntary_ctxt_switches:\t{pid * 3 % 1000}\n"
        "x86_Thread_features:\t\nx86_Thread_features_locked:\t\n"
    )
    return head + mem + tail


def _stat(
    *,
    pid: int,
    comm: str,
    ppid: int,
    threads: int,
    start: int,
    kthread: bool = False,
    vsize: int = 0,
    rss_pages: int = 0,
    guest_ticks: int = 0,
    state: str = "S",
) -> str:
    """proc/PID/stat: 52 fields, comm in parentheses as given (it may hold spaces or ')')."""
    if kthread:
        flags, code = 0x208040, "0 0 0 0 0"
        tail = "0 0 0 0 0 0 0 0 0 0"
        sig = "0 0 2147483647 0"
    else:
        flags, code = 0x400100, "94523418337280 94523423284753 140724566781728 0 0"
        tail = (
            f"{guest_ticks} 0 94523425631728 94523425920576 94523443093504 140724566785634 "
            "140724566785891 140724566785891 140724566786023 0"
        )
        sig = "0 0 4096 17475"
    fields = [
        f"{pid} ({comm}) {state} {ppid} {0 if kthread else pid} {0 if kthread else pid} 0 -1",
        f"{flags} {pid * 13 % 99991} 0 {pid % 17} 0 {pid * 5 % 9973} {pid * 3 % 4999} 0 0",
        f"20 0 {threads} 0 {start} {vsize} {rss_pages}",
        "18446744073709551615",  # rsslim
        code,  # startcode endcode startstack kstkesp kstkeip
        sig,  # signal blocked sigignore sigcatch
        "1 0 0",  # wchan (1: blocked in the kernel) nswap cnswap
        f"{0 if kthread else 17} {pid % 4} 0 0 0",  # exit_signal processor rt_prio policy blkio
        tail,
    ]
    return " ".join(fields) + "\n"


@dataclass(frozen=True)
class _Filler:
    comm: str
    argv: tuple[str, ...]
    cgroup: str
    fds: tuple[str, ...]
    uid: int = 0
    kthread: bool = False


_FILLERS: tuple[_Filler, ...] = (
    _Filler(
        "systemd-journal",
        ("/usr/lib/systemd/systemd-journald",),
        "/system.slice/systemd-journald.service",
        ("/dev/null", "/dev/null", "socket:[{i}]", "anon_inode:[eventfd]", "/dev/kmsg"),
    ),
    _Filler("kworker/{c}:1-events", (), "/", (), kthread=True),
    _Filler(
        "sshd",
        ("sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups",),
        "/system.slice/ssh.service",
        ("/dev/null", "socket:[{i}]", "socket:[{i}]", "socket:[{j}]"),
    ),
    _Filler(
        "cron",
        ("/usr/sbin/cron", "-f"),
        "/system.slice/cron.service",
        ("/dev/null", "socket:[{i}]", "socket:[{i}]", "/run/crond.pid"),
    ),
    _Filler(
        "dbus-daemon",
        (
            "/usr/bin/dbus-daemon",
            "--system",
            "--address=systemd:",
            "--nofork",
            "--nopidfile",
            "--systemd-activation",
            "--syslog-only",
        ),
        "/system.slice/dbus.service",
        ("/dev/null", "socket:[{i}]", "socket:[{i}]", "anon_inode:[eventpoll]"),
        uid=101,
    ),
    _Filler("rcu_tasks_kthread", (), "/", (), kthread=True),
    _Filler(
        "(sd-pam)",
        ("(sd-pam)",),
        "/user.slice/user-0.slice/user@0.service/init.scope",
        ("/dev/null", "/dev/null", "/dev/null"),
    ),
    _Filler(
        "bash",
        ("-bash",),
        "/user.slice/user-0.slice/session-1.scope",
        ("/dev/pts/0", "/dev/pts/0", "/dev/pts/0", "/dev/tty"),
    ),
    _Filler(
        "systemd-udevd",
        ("/usr/lib/systemd/systemd-udevd",),
        "/system.slice/systemd-udevd.service/udev",
        ("/dev/null", "socket:[{i}]", "socket:[{i}]", "anon_inode:[signalfd]", "pipe:[{j}]"),
    ),
    _Filler(
        "libvirtd",
        ("/usr/sbin/libvirtd", "--timeout", "120"),
        "/system.slice/libvirtd.service",
        ("/dev/null", "socket:[{i}]", "socket:[{i}]", "pipe:[{j}]", "pipe:[{j}]"),
    ),
    _Filler("ksoftirqd/{c}", (), "/", (), kthread=True),
    _Filler(
        "python3",
        ("/usr/bin/python3", "/usr/bin/networkd-dispatcher", "--run-startup-triggers"),
        "/system.slice/networkd-dispatcher.service",
        ("/dev/null", "socket:[{i}]", "socket:[{i}]", "anon_inode:inotify"),
    ),
)

_SYSTEMD = _Filler(
    "systemd",
    ("/sbin/init",),
    "/init.scope",
    ("/dev/null", "/dev/null", "/dev/kmsg", "anon_inode:[timerfd]", "anon_inode:[eventpoll]"),
)
_KTHREADD = _Filler("kthreadd", (), "/", (), kthread=True)


def _filler_pids(spec: HostSpec, reserved: set[int]) -> list[int]:
    pids: list[int] = []
    pid = 0
    while len(pids) < spec.other_processes:
        pid += 1
        if pid not in reserved:
            pids.append(pid)
    return pids


def _write_filler(root: str, spec: HostSpec, reserved: set[int]) -> None:
    # Sequential on purpose: threads only contend on proc/'s directory lock and the GIL.
    _write_filler_range(root, spec, _filler_pids(spec, reserved), 0)


def _write_filler_range(root: str, spec: HostSpec, pids: list[int], first: int) -> None:
    proc = os.path.join(root, "proc")
    uptime_ticks = int(spec.uptime * _HZ) - 1
    for n, pid in enumerate(pids, start=first):
        if pid == 1:
            tmpl = _SYSTEMD
        elif pid == 2:
            tmpl = _KTHREADD
        else:
            tmpl = _FILLERS[n % len(_FILLERS)]
        comm = tmpl.comm.format(c=pid % max(1, spec.cpus))
        if not tmpl.kthread:
            comm = comm[:15]
        ppid = 0 if pid <= 2 else (2 if tmpl.kthread else 1)
        start = min(uptime_ticks, 9 + pid * 3)
        if tmpl.kthread:
            status = _status(
                name=comm,
                pid=pid,
                tgid=pid,
                ppid=ppid,
                uid=0,
                threads=1,
                ncpus=spec.cpus,
                kthread=True,
            )
            stat = _stat(pid=pid, comm=comm, ppid=ppid, threads=1, start=start, kthread=True)
        else:
            status = _status(
                name=comm,
                pid=pid,
                tgid=pid,
                ppid=ppid,
                uid=tmpl.uid,
                threads=1,
                ncpus=spec.cpus,
                vm_kb=22_000 + pid % 9000,
                rss_kb=6_000 + pid % 4000,
                sigcgt="0000000180004a02",
            )
            stat = _stat(
                pid=pid,
                comm=comm,
                ppid=ppid,
                threads=1,
                start=start,
                vsize=(22_000 + pid % 9000) * 1024,
                rss_pages=(6_000 + pid % 4000) // 4,
            )
        d = f"{proc}/{pid}"
        os.mkdir(d)
        os.mkdir(d + "/fd")  # no task/: nothing reads a filler's threads, and mkdir is the cost
        _put(d + "/cmdline", "".join(a + "\0" for a in tmpl.argv).encode())
        _put(d + "/comm", (comm + "\n").encode())
        _put(d + "/cgroup", proc_cgroup_text(spec, tmpl.cgroup).encode())
        _put(d + "/status", status.encode())
        _put(d + "/stat", stat.encode())
        for fd, target in enumerate(tmpl.fds):
            os.symlink(target.format(i=20_000 + pid * 3, j=40_000 + pid), f"{d}/fd/{fd}")


def _vm_fd_table(vm: VmProc) -> dict[int, str]:
    table: dict[int, str] = {
        0: "/dev/null",
        1: f"socket:[{30_000 + vm.pid}]",
        2: f"socket:[{30_000 + vm.pid}]",
    }
    for fd in vm.vm_fds:
        table[fd] = "anon_inode:kvm-vm"
    low = [n for n in range(3, max(vm.vm_fds, default=3)) if n not in table]
    others = [
        "/dev/kvm",
        "anon_inode:[eventfd]",
        "anon_inode:[signalfd]",
        "anon_inode:[eventfd]",
        "/dev/vhost-vsock",
        "anon_inode:[eventpoll]",
        "/dev/net/tun",
        "/dev/vhost-net",
    ]
    for i, n in enumerate(low):
        table[n] = others[i] if i < len(others) else "anon_inode:[eventfd]"
    if "/dev/kvm" not in table.values():
        table[max(table) + 1] = "/dev/kvm"
    for fd in vm.closed_vm_fds:
        table.pop(fd, None)  # closed: the number may even be free
    nxt = max(table) + 1
    for _fd in [*vm.vm_fds, *vm.closed_vm_fds]:
        for i in range(vm.vcpus):
            table[nxt] = f"anon_inode:kvm-vcpu:{i}"
            nxt += 1
        if vm.vcpu_stats:
            for i in range(vm.vcpus):
                table[nxt] = f"anon_inode:kvm-vcpu-stats:{i}"
                nxt += 1
    table.update(vm.extra_fds)
    return table


def _write_vm(root: str, spec: HostSpec, vm: VmProc, index: int) -> None:
    tid = vm.tid if vm.tid is not None else vm.pid
    comm = vm.comm[:15]
    threads = 4 + vm.vcpus * max(1, len(vm.vm_fds)) + (1 if tid != vm.pid else 0)
    start = vm.start_ticks
    if start is None:
        start = max(1, int(spec.uptime * _HZ) - (3600 - index * 60) * _HZ)
    vm_kb = 6_291_456 + 4_194_304 * len(vm.vm_fds)
    rss_kb = 4_300_000
    d = os.path.join(root, "proc", str(vm.pid))
    _mkdir(d + "/fd")
    _put(d + "/cmdline", "".join(a + "\0" for a in vm.cmdline).encode())
    _put(d + "/comm", _line(comm))
    _put(d + "/cgroup", proc_cgroup_text(spec, vm.cgroup).encode())
    common = dict(
        ppid=vm.ppid,
        uid=vm.uid,
        threads=threads,
        ncpus=spec.cpus,
        vm_kb=vm_kb,
        rss_kb=rss_kb,
        fdsize=128,
        sigcgt="0000000180004243",
    )
    status = _status(name=comm, pid=vm.pid, tgid=vm.pid, **common)
    stat = _stat(
        pid=vm.pid,
        comm=comm,
        ppid=vm.ppid,
        threads=threads,
        start=start,
        vsize=vm_kb * 1024,
        rss_pages=rss_kb // 4,
        guest_ticks=start // 50,
    )
    _put(d + "/status", status.encode())
    _put(d + "/stat", stat.encode())
    for fd, target in _vm_fd_table(vm).items():
        _symlink(target, f"{d}/fd/{fd}")
    _mkdir(f"{d}/task/{vm.pid}")
    _put(f"{d}/task/{vm.pid}/status", status.encode())
    _put(f"{d}/task/{vm.pid}/comm", _line(comm))
    if tid != vm.pid:
        # The kernel answers /proc/TID for any thread although readdir(/proc) lists leaders only.
        tcomm = comm
        tstatus = _status(name=tcomm, pid=tid, tgid=vm.pid, **common)
        tstat = _stat(
            pid=tid,
            comm=tcomm,
            ppid=vm.ppid,
            threads=threads,
            start=start + 3,
            vsize=vm_kb * 1024,
            rss_pages=rss_kb // 4,
        )
        for t in (os.path.join(root, "proc", str(tid)), f"{d}/task/{tid}"):
            _mkdir(t)
            _put(t + "/status", tstatus.encode())
            _put(t + "/stat", tstat.encode())
            _put(t + "/comm", _line(tcomm))
            _put(t + "/cgroup", proc_cgroup_text(spec, vm.cgroup).encode())
            _put(t + "/cmdline", "".join(a + "\0" for a in vm.cmdline).encode())


def _write_debugfs(root: str, spec: HostSpec) -> None:
    if not spec.debugfs_kvm:
        return
    kvm = os.path.join(root, "sys/kernel/debug/kvm")
    _mkdir(kvm)
    for name in _DEBUGFS_KVM_STATS:
        _put(f"{kvm}/{name}", b"0\n")
    for vm in spec.processes:
        if not vm.debugfs:
            continue
        tid = vm.tid if vm.tid is not None else vm.pid
        for n, fd in enumerate([*vm.vm_fds, *vm.closed_vm_fds]):
            d = f"{kvm}/{tid}-{fd}"
            _mkdir(d)
            for name in _DEBUGFS_KVM_STATS:
                _put(f"{d}/{name}", b"0\n")
            _put(f"{d}/mmu_rmaps_stat", b"")
            for i in range(vm.vcpus):
                v = f"{d}/vcpu{i}"
                _mkdir(v)
                _put(f"{v}/guest_mode", b"0\n")
                _put(f"{v}/pid", _line(vm.pid + 10 + n * vm.vcpus + i))
                _put(f"{v}/tsc-offset", b"-2190514637458\n")


# --------------------------------------------------------------------------- libvirt


def _systemd_escape(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_." else f"\\x{ord(c):02x}" for c in name)


def libvirt_cgroup(name: str, domid: int = 1, leaf: str | None = "emulator") -> str:
    """The cgroup v2 path libvirt gives a QEMU domain (its emulator thread by default)."""
    scope = f"/machine.slice/machine-qemu\\x2d{domid}\\x2d{_systemd_escape(name)}.scope"
    return scope if leaf is None else f"{scope}/libvirt/{leaf}"


def libvirt_status_xml(dom: LibvirtDomain, domid: int) -> str:
    """The live status XML libvirtd keeps in /run/libvirt/qemu/NAME.xml."""
    dom_uuid = uuid.uuid5(uuid.NAMESPACE_DNS, f"{dom.name}.libvirt.test")
    vcpu_pids = "\n".join(
        f"    <vcpu id='{i}' pid='{dom.pid + 10 + i}'/>" for i in range(dom.vcpus)
    )
    security = (
        "    <launchSecurity type='tdx'>\n"
        "      <policy>0x10000000</policy>\n"
        "      <quoteGenerationService/>\n"
        "    </launchSecurity>\n"
        if dom.tdx
        else ""
    )
    loader = "/usr/share/ovmf/OVMF.inteltdx.fd" if dom.tdx else "/usr/share/OVMF/OVMF_CODE_4M.fd"
    lib = f"{domid}-{dom.name}"
    return f"""<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:
  virsh edit {dom.name}
or other application using the libvirt API.
-->

<domstatus state='running' reason='booted' pid='{dom.pid}'>
  <taint flag='high-privileges'/>
  <monitor path='/var/lib/libvirt/qemu/domain-{lib}/monitor.sock' type='unix'/>
  <namespaces>
    <mount/>
  </namespaces>
  <vcpus>
{vcpu_pids}
  </vcpus>
  <qemuCaps>
    <flag name='kvm'/>
    <flag name='tdx-guest'/>
  </qemuCaps>
  <devices>
    <device alias='virtio-disk0'/>
    <device alias='net0'/>
  </devices>
  <libDir path='/var/lib/libvirt/qemu/domain-{lib}'/>
  <channelTargetDir path='/run/libvirt/qemu/channel/{lib}'/>
  <allowReboot value='yes'/>
  <nodename type='storage' name='libvirt-1-storage'/>
  <blockjobs active='no'/>
  <agentTimeout>-2</agentTimeout>
  <domain type='kvm' id='{domid}'>
    <name>{dom.name}</name>
    <uuid>{dom_uuid}</uuid>
    <memory unit='KiB'>4194304</memory>
    <currentMemory unit='KiB'>4194304</currentMemory>
    <vcpu placement='static'>{dom.vcpus}</vcpu>
    <resource>
      <partition>/machine</partition>
    </resource>
    <os>
      <type arch='x86_64' machine='pc-q35-10.1'>hvm</type>
      <loader type='rom' readonly='yes'>{loader}</loader>
      <boot dev='hd'/>
    </os>
    <features>
      <acpi/>
      <apic/>
      <ioapic driver='qemu'/>
    </features>
    <cpu mode='host-passthrough' check='none' migratable='off'/>
    <clock offset='utc'/>
    <on_poweroff>destroy</on_poweroff>
    <on_reboot>restart</on_reboot>
    <on_crash>destroy</on_crash>
    <devices>
      <emulator>/usr/bin/qemu-system-x86_64</emulator>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='/var/lib/libvirt/images/{dom.name}.qcow2' index='1'/>
        <backingStore/>
        <target dev='vda' bus='virtio'/>
        <alias name='virtio-disk0'/>
      </disk>
      <interface type='network'>
        <mac address='52:54:00:3b:7a:{domid % 256:02x}'/>
        <source network='default'/>
        <target dev='vnet{domid - 1}'/>
        <model type='virtio'/>
        <alias name='net0'/>
      </interface>
      <console type='pty' tty='/dev/pts/{domid}'>
        <target type='serial' port='0'/>
        <alias name='serial0'/>
      </console>
    </devices>
{security}  </domain>
</domstatus>
"""


def _write_libvirt(root: str, spec: HostSpec) -> None:
    if not spec.libvirt:
        return
    d = os.path.join(root, "run/libvirt/qemu")
    _mkdir(d)
    for i, dom in enumerate(spec.libvirt):
        domid = dom.domid if dom.domid is not None else i + 1
        _put(f"{d}/{dom.name}.xml", libvirt_status_xml(dom, domid).encode())
        _put(f"{d}/{dom.name}.pid", _line(dom.pid))  # QEMU writes its -pidfile as "%d\n"


# --------------------------------------------------------------------------- entry points


def build(root: Path, spec: HostSpec) -> Path:
    """Write the host root described by `spec` under `root` and return `root`."""
    top = os.fspath(root)
    _mkdir(os.path.join(top, "proc"))
    _write_cpu(top, spec)
    _write_kernel(top, spec)
    _write_tdx_state(top, spec)
    _write_cgroups(top, spec)
    reserved: set[int] = set()
    for i, vm in enumerate(spec.processes):
        _write_vm(top, spec, vm, i)
        reserved.add(vm.pid)
        if vm.tid is not None:
            reserved.add(vm.tid)
    for dom in spec.libvirt:
        reserved.add(dom.pid)
    _write_filler(top, spec, reserved)
    _write_namespaces(top, spec)
    _write_debugfs(top, spec)
    _write_libvirt(top, spec)
    for rel, data in spec.extra_files.items():
        _file(top, rel, data.encode() if isinstance(data, str) else data)
    for rel in spec.remove:
        path = os.path.join(top, rel)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
    return Path(root)


def tdx_boot_kmsg(
    release: str = "6.18.2-1-amd64", cmdline: str = "", cpus: int = 4
) -> list[str | tuple[int, str]]:
    """Kernel log lines of a Granite Rapids host that brought up TDX with 64 KeyIDs."""
    version = release.split("-amd64")[0]
    return [
        f"Linux version {release} (debian-kernel@lists.debian.org) (x86_64-linux-gnu-gcc-14 "
        "(Debian 14.2.0-19) 14.2.0, GNU ld (GNU Binutils for Debian) 2.44) #1 SMP "
        f"PREEMPT_DYNAMIC Debian {version} (2025-12-18)",
        f"Command line: {cmdline}",
        "BIOS-provided physical RAM map:",
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009ffff] usable",
        "BIOS-e820: [mem 0x0000000000100000-0x000000005f9fffff] usable",
        "NX (Execute Disable) protection: active",
        "DMI: Intel Corporation AvenueCity/AvenueCity, BIOS BHSDCRB1.IPC.3544.P15.2410232346 "
        "10/23/2024",
        "tsc: Detected 2000.000 MHz processor",
        "x86/tme: enabled by BIOS",
        "virt/tdx: BIOS enabled: private KeyID range [64, 128)",
        "virt/tdx: Disable ACPI S3. Turn off TDX in the BIOS to use ACPI S3.",
        f"smpboot: Allowing {cpus} CPUs, 0 hotplug CPUs",
        f"Kernel command line: {cmdline}",
        "Memory: 1055839276K/1073213864K available",
        "Freeing unused kernel image (initmem) memory: 4148K",
        "Run /init as init process",
        (30, "systemd[1]: systemd 257.9-1~deb13u1 running in system mode"),
        (30, "systemd[1]: Detected architecture x86-64."),
        "virt/tdx: 1050644 KB allocated for PAMT",
        "virt/tdx: TDX-Module initialized",
    ]


def tdx_host(**overrides: Any) -> HostSpec:
    """A Granite Rapids host on 6.18.2 running TDX (module up, no TD yet); `overrides` win."""
    release = "6.18.2-1-amd64"
    cmdline = (
        f"BOOT_IMAGE=/boot/vmlinuz-{release} root=/dev/mapper/vg-root ro quiet "
        "crashkernel=512M kvm_intel.tdx=1"
    )
    base: dict[str, Any] = dict(
        cpu="granite_rapids",
        tdx_flag=True,
        msrs=dict(TDX_MSRS),
        release=release,
        cmdline=cmdline,
        config={
            "CONFIG_INTEL_TDX_HOST": "y",
            "CONFIG_KVM_INTEL_TDX": "y",
            "CONFIG_KEXEC_CORE": "y",
            "CONFIG_KEXEC": "y",
            "CONFIG_KEXEC_FILE": "y",
            "CONFIG_CRASH_DUMP": "y",
            "CONFIG_CGROUP_MISC": "y",
        },
        kallsyms=["tdx_cpu_flush_cache_for_kexec", "tdx_enable", "tdx_cpu_enable"],
        kvm_intel_tdx="Y",
        tdx_host_version="1.5.08",
        misc_capacity={"tdx": 63},  # the kernel prints only resources with capacity
        misc_current={"tdx": 0},
        kexec_loaded=1,
        kexec_crash_loaded=0,
        kexec_crash_size=536870912,
    )
    base.update(overrides)
    if "kmsg" not in overrides:
        base["kmsg"] = tdx_boot_kmsg(
            base["release"] or release, base["cmdline"], base.get("cpus", 4)
        )
    return HostSpec(**base)


#: kallsyms of a 7.2+ TDX host: tdx_sys_disable is global; the flush became the static (and
#: usually inlined) tdx_cpu_flush_cache, so no flush name is listed.
KALLSYMS_7_2 = ["tdx_sys_disable", "tdx_enable", "tdx_cpu_enable", "tdx_shutdown"]


def tdx_host_7(release: str = "7.3.1-1-amd64", **overrides: Any) -> HostSpec:
    """A Granite Rapids host on a 7.2+ kernel running TDX: tdx_sys_disable in kallsyms, the
    6.19+ kexec sysfs (directory plus links), tdx_host with P-SEAMLDR attributes, an idle
    runtime-update device, and 7.1+ log lines. `overrides` win."""
    cmdline = (
        f"BOOT_IMAGE=/boot/vmlinuz-{release} root=/dev/mapper/vg-root ro quiet crashkernel=512M"
    )
    base: dict[str, Any] = dict(
        release=release,
        cmdline=cmdline,
        kallsyms=list(KALLSYMS_7_2),
        kexec_sysfs="both",
        kexec_crash_cma_ranges="",
        tdx_host_attrs={"seamldr_version": "2.0.00", "num_remaining_updates": "16"},
        fw_upload={"status": "idle", "error": "none", "remaining_size": "0", "loading": "0"},
    )
    base.update(overrides)
    if "kmsg" not in overrides:
        kmsg = tdx_boot_kmsg(release, cmdline, base.get("cpus", 4))
        version = base.get("tdx_host_version", "1.5.08")
        base["kmsg"] = [*kmsg, f"virt/tdx: Module version: {version or '1.5.08'}"]
    return tdx_host(**base)


def qemu_td_cmdline(name: str = "td1", json_object: bool = False) -> list[str]:
    """A QEMU TD launch (QEMU 10.1+, Canonical's TDX tooling style).

    `-name NAME,process=NAME` makes QEMU rename its main thread: the real comm is NAME.
    """
    if json_object:
        obj = (
            '{"qom-type":"tdx-guest","id":"tdx0","quote-generation-socket":'
            '{"type":"vsock","cid":"2","port":"4050"}}'
        )
    else:
        obj = "tdx-guest,id=tdx0"
    return [
        "/usr/bin/qemu-system-x86_64",
        "-accel", "kvm",
        "-m", "4G",
        "-smp", "4",
        "-name", f"{name},process={name},debug-threads=on",
        "-cpu", "host",
        "-object", obj,
        "-object", "memory-backend-memfd,id=ram1,size=4G",
        "-machine", "q35,kernel_irqchip=split,confidential-guest-support=tdx0,"
        "memory-backend=ram1,hpet=off",
        "-bios", "/usr/share/ovmf/OVMF.fd",
        "-nographic",
        "-nodefaults",
        "-vga", "none",
        "-device", "virtio-net-pci,netdev=nic0",
        "-netdev", "user,id=nic0,hostfwd=tcp::10022-:22",
        "-drive", f"file=/var/lib/tdx/{name}.qcow2,if=none,id=virtio-disk0",
        "-device", "virtio-blk-pci,drive=virtio-disk0",
        "-device", "vhost-vsock-pci,guest-cid=3",
        "-pidfile", f"/run/tdx/{name}.pid",
        "-D", f"/var/log/tdx/{name}.log",
    ]  # fmt: skip


def qemu_vm_cmdline(name: str = "vm1", domid: int = 1) -> list[str]:
    """A plain KVM guest as libvirt starts QEMU (no TDX; JSON -object for other objects)."""
    lib = f"/var/lib/libvirt/qemu/domain-{domid}-{name}"
    dom_uuid = uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.libvirt.test")
    return [
        "/usr/bin/qemu-system-x86_64",
        "-name", f"guest={name},debug-threads=on",
        "-S",
        "-object",
        f'{{"qom-type":"secret","id":"masterKey0","format":"raw","file":"{lib}/master-key.aes"}}',
        "-machine", "pc-q35-10.1,usb=off,vmport=off,dump-guest-core=off,memory-backend=pc.ram,"
        "hpet=off,acpi=on",
        "-accel", "kvm",
        "-cpu", "host,migratable=on",
        "-m", "size=4194304k",
        "-object", '{"qom-type":"memory-backend-ram","id":"pc.ram","size":4294967296}',
        "-overcommit", "mem-lock=off",
        "-smp", "2,sockets=2,cores=1,threads=1",
        "-uuid", str(dom_uuid),
        "-no-user-config",
        "-nodefaults",
        "-chardev", "socket,id=charmonitor,fd=31,server=on,wait=off",
        "-mon", "chardev=charmonitor,id=monitor,mode=control",
        "-rtc", "base=utc,driftfix=slew",
        "-global", "kvm-pit.lost_tick_policy=delay",
        "-no-shutdown",
        "-boot", "strict=on",
        "-blockdev",
        f'{{"driver":"file","filename":"/var/lib/libvirt/images/{name}.qcow2",'
        '"node-name":"libvirt-1-storage","read-only":false}',
        "-device",
        '{"driver":"virtio-blk-pci","bus":"pci.3","addr":"0x0","drive":"libvirt-1-format",'
        '"id":"virtio-disk0","bootindex":1}',
        "-netdev", '{"type":"tap","fd":"33","vhost":true,"vhostfd":"35","id":"hostnet0"}',
        "-device",
        '{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0",'
        '"mac":"52:54:00:3b:7a:01","bus":"pci.1","addr":"0x0"}',
        "-chardev", "pty,id=charserial0",
        "-device", '{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}',
        "-audiodev", '{"id":"audio1","driver":"none"}',
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-msg", "timestamp=on",
    ]  # fmt: skip


def cloud_hypervisor_td_cmdline() -> list[str]:
    """A cloud-hypervisor TD (its comm is "cloud-hyperviso", 15 characters)."""
    return [
        "/usr/bin/cloud-hypervisor",
        "--platform", "tdx=on",
        "--firmware", "/usr/share/cloud-hypervisor/tdvf.fd",
        "--cpus", "boot=2",
        "--memory", "size=4G",
        "--disk", "path=/var/lib/tdx/td-guest.raw",
        "--net", "tap=ichtap0,mac=12:34:56:78:90:ab",
        "--serial", "tty",
        "--console", "off",
        "--api-socket", "path=/run/cloud-hypervisor/td1.sock",
    ]  # fmt: skip
