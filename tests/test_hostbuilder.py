"""The fixture builder writes the kernel's formats: these tests pin the bytes readers rely on."""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hostbuilder import (
    CPU_MODELS,
    TDX_MSRS,
    TME_CAPABILITY,
    HostSpec,
    LibvirtDomain,
    VmProc,
    build,
    cloud_hypervisor_td_cmdline,
    libvirt_cgroup,
    qemu_td_cmdline,
    qemu_vm_cmdline,
    tdx_host,
)

CPUINFO_KEYS = [
    "processor\t",
    "vendor_id\t",
    "cpu family\t",
    "model\t\t",
    "model name\t",
    "stepping\t",
    "microcode\t",
    "cpu MHz\t\t",
    "cache size\t",
    "physical id\t",
    "siblings\t",
    "core id\t\t",
    "cpu cores\t",
    "apicid\t\t",
    "initial apicid\t",
    "fpu\t\t",
    "fpu_exception\t",
    "cpuid level\t",
    "wp\t\t",
    "flags\t\t",
    "vmx flags\t",
    "bugs\t\t",
    "bogomips\t",
    "clflush size\t",
    "cache_alignment\t",
    "address sizes\t",
]


def read(root: Path, rel: str) -> str:
    return (root / rel).read_text()


def cpu_blocks(root: Path) -> list[list[str]]:
    text = read(root, "proc/cpuinfo")
    assert text.endswith("\n\n") and text.rstrip("\n").rsplit("\n", 1)[1].startswith("power ")
    return [block.split("\n") for block in text.split("\n\n") if block]


def test_cpuinfo_has_one_block_per_cpu_in_kernel_layout(tmp_path: Path) -> None:
    root = build(tmp_path, HostSpec(cpu="sapphire_rapids", cpus=6, sockets=2))
    blocks = cpu_blocks(root)
    assert len(blocks) == 6
    for n, block in enumerate(blocks):
        assert [line.split(": ", 1)[0] for line in block[:-1]] == CPUINFO_KEYS
        assert block[-1] == "power management:"
        assert block[0] == f"processor\t: {n}"
    first = dict(line.split("\t: ", 1) for line in blocks[0][:-1])
    assert first["model\t"] == "143"
    assert first["model name"] == CPU_MODELS["sapphire_rapids"][3]
    assert blocks[5][9] == "physical id\t: 1"
    assert " tme " in blocks[0][19]
    assert "tdx_host_platform" not in blocks[0][19]


def test_tdx_flag_and_extra_bug_land_in_kernel_bit_order(tmp_path: Path) -> None:
    root = build(tmp_path, HostSpec(tdx_flag=True, extra_bugs=["tdx_pw_mce"]))
    block = cpu_blocks(root)[0]
    flags = block[19].split("\t\t: ", 1)[1].split()
    assert flags[flags.index("cdp_l3") + 1] == "tdx_host_platform"
    assert block[21] == (
        "bugs\t\t: spectre_v1 spectre_v2 spec_store_bypass swapgs eibrs_pbrsb tdx_pw_mce bhi"
    )


def test_amd_cpuinfo_has_no_vmx_flags_and_amd_defaults(tmp_path: Path) -> None:
    block = cpu_blocks(build(tmp_path, HostSpec(cpu="amd_epyc", cpus=1)))[0]
    keys = [line.split(":", 1)[0] for line in block]
    assert "vmx flags\t" not in keys
    assert "TLB size\t" in keys
    assert "vendor_id\t: AuthenticAMD" in block
    assert " svm " in block[19] and " vmx " not in block[19]


def test_msr_files_read_back_with_pread_at_the_index(tmp_path: Path) -> None:
    spec = tdx_host(cpus=3, msrs_per_cpu={2: {0x87: 0}})
    root = build(tmp_path, spec)
    for cpu in range(3):
        fd = os.open(root / f"dev/cpu/{cpu}/msr", os.O_RDONLY)
        try:
            values = {i: struct.unpack("<Q", os.pread(fd, 8, i))[0] for i in TDX_MSRS}
        finally:
            os.close(fd)
        expected = dict(TDX_MSRS)
        if cpu == 2:
            expected[0x87] = 0
        assert values == expected
    assert (root / "dev/cpu/0/msr").stat().st_size == 0x1401 + 8
    assert TDX_MSRS[0x87] >> 32 == 64 and TDX_MSRS[0x1401] & 0xC00 == 0xC00


def test_overlapping_msrs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="0x981 and 0x982"):
        build(tmp_path, HostSpec(msrs={0x981: TME_CAPABILITY, 0x982: 3}))


def test_no_msr_files_unless_asked(tmp_path: Path) -> None:
    assert not (build(tmp_path, HostSpec()) / "dev/cpu").exists()


def test_vm_process_files(tmp_path: Path) -> None:
    vm = VmProc(
        pid=4242,
        cmdline=qemu_td_cmdline(),
        comm="qemu-system-x86_64",
        cgroup="/machine.slice/td1.scope",
        vm_fds=[12, 40],
    )
    root = build(tmp_path, HostSpec(processes=[vm]))
    proc = root / "proc/4242"
    raw = (proc / "cmdline").read_bytes()
    assert raw.endswith(b"\0") and raw[:-1].split(b"\0") == [a.encode() for a in vm.cmdline]
    assert read(proc, "comm") == "qemu-system-x86\n"
    assert read(proc, "cgroup") == "0::/machine.slice/td1.scope\n"
    assert os.readlink(proc / "fd/12") == "anon_inode:kvm-vm"
    assert os.readlink(proc / "fd/40") == "anon_inode:kvm-vm"
    assert os.readlink(proc / "fd/0") == "/dev/null"
    links = [os.readlink(p) for p in (proc / "fd").iterdir()]
    assert "/dev/kvm" in links and "anon_inode:kvm-vcpu:0" in links
    assert links.count("anon_inode:kvm-vm") == 2
    assert sorted(os.listdir(root / "sys/kernel/debug/kvm/4242-12")) != []
    assert (root / "sys/kernel/debug/kvm/4242-40/vcpu0/pid").exists()
    assert (root / "sys/kernel/debug/kvm/exits").read_text() == "0\n"


def test_status_and_stat_shapes(tmp_path: Path) -> None:
    root = build(tmp_path, HostSpec(processes=[VmProc(pid=900, cmdline=["qemu"])]))
    for pid_dir in (p for p in (root / "proc").iterdir() if p.name.isdigit()):
        status = read(pid_dir, "status")
        assert status.endswith("\n")
        lines = status.splitlines()
        assert all(re.fullmatch(r"[A-Za-z_0-9]+:\t.*", line) for line in lines), lines
        fields = dict(line.split(":\t", 1) for line in lines)
        assert fields["Pid"] == fields["Tgid"] == pid_dir.name
        assert fields["Name"] == read(pid_dir, "comm").rstrip("\n")
        stat = read(pid_dir, "stat")
        assert stat.endswith("\n")
        head, _, rest = stat.rpartition(")")  # comm may hold ')' as "(sd-pam)" does
        assert head.startswith(f"{pid_dir.name} (")
        assert len(rest.split()) == 50  # 52 fields less pid and comm
    status = read(root, "proc/900/status")
    assert "\nUid:\t0\t0\t0\t0\n" in status and "\nThreads:\t" in status


def test_filler_processes_skip_vm_pids(tmp_path: Path) -> None:
    vm = VmProc(pid=3, cmdline=["qemu"], tid=4)
    root = build(tmp_path, HostSpec(processes=[vm], other_processes=40))
    pids = {int(p.name) for p in (root / "proc").iterdir() if p.name.isdigit()}
    assert pids == {3, 4} | set(range(1, 3)) | set(range(5, 43))
    assert read(root, "proc/1/comm") == "systemd\n"
    assert read(root, "proc/2/cmdline") == ""  # kernel thread
    assert os.listdir(root / "proc/2/fd") == []
    assert os.readlink(root / "proc/5/fd/0") in {"/dev/null", "/dev/pts/0"}


def test_vm_created_by_another_thread(tmp_path: Path) -> None:
    vm = VmProc(pid=5000, tid=5007, cmdline=qemu_vm_cmdline(), vm_fds=[21])
    root = build(tmp_path, HostSpec(processes=[vm]))
    assert (root / "sys/kernel/debug/kvm/5007-21").is_dir()
    status = read(root, "proc/5007/status")
    assert "\nTgid:\t5000\n" in status and "\nPid:\t5007\n" in status
    assert (root / "proc/5000/task/5007").is_dir()
    assert not (root / "proc/5007/fd").exists()  # a proc/*/fd scan meets the VM once


def test_debugfs_can_be_absent(tmp_path: Path) -> None:
    spec = HostSpec(debugfs_kvm=False, processes=[VmProc(pid=10, cmdline=["qemu"])])
    root = build(tmp_path, spec)
    assert not (root / "sys/kernel/debug").exists()
    assert os.readlink(root / "proc/10/fd/12") == "anon_inode:kvm-vm"


def test_tdx_host_kernel_sources(tmp_path: Path) -> None:
    root = build(tmp_path, tdx_host(kallsyms_filler=5000))
    assert read(root, "proc/sys/kernel/osrelease") == "6.18.2-1-amd64\n"
    assert read(root, "sys/module/kvm_intel/parameters/tdx") == "Y\n"
    assert read(root, "sys/devices/faux/tdx_host/version") == "1.5.08\n"
    assert read(root, "sys/kernel/kexec_loaded") == "1\n"
    assert read(root, "sys/kernel/kexec_crash_size") == "536870912\n"
    assert read(root, "sys/devices/system/cpu/online") == "0-3\n"
    assert read(root, "sys/fs/cgroup/misc.capacity") == "tdx 63\n"
    assert read(root, "sys/fs/cgroup/misc.current") == "tdx 0\n"

    kallsyms = read(root, "proc/kallsyms").splitlines()
    assert all(re.fullmatch(r"[0-9a-f]{16} [A-Za-z] \S+(\t\[\w+\])?", line) for line in kallsyms)
    names = [line.split()[2] for line in kallsyms]
    assert "tdx_cpu_flush_cache_for_kexec" in names
    assert "__pfx_tdx_cpu_flush_cache_for_kexec" in names
    assert "tdx_cpu_flush_cache" not in names
    assert any(line.endswith("\t[kvm_intel]") for line in kallsyms)

    kmsg = read(root, "dev/kmsg").splitlines()
    records = [re.fullmatch(r"(\d+),(\d+),(\d+),-;(.*)", line) for line in kmsg]
    assert all(records)
    seqs = [int(m.group(2)) for m in records if m]
    usecs = [int(m.group(3)) for m in records if m]
    assert seqs == list(range(len(kmsg))) and usecs == sorted(usecs)
    texts = [m.group(4) for m in records if m]
    assert "virt/tdx: TDX-Module initialized" in texts
    assert "virt/tdx: 1050644 KB allocated for PAMT" in texts

    config = read(root, "boot/config-6.18.2-1-amd64")
    assert config.startswith("#\n# Automatically generated file; DO NOT EDIT.\n")
    assert "# Linux/x86 6.18.2 Kernel Configuration\n" in config
    assert "\nCONFIG_INTEL_TDX_HOST=y\n" in config
    assert "\n# CONFIG_HIBERNATION is not set\n" in config


def test_gzip_config_and_absent_sources(tmp_path: Path) -> None:
    spec = HostSpec(
        release=None,
        config={"KEXEC_CORE": "n"},
        config_gz=True,
        kexec_loaded=None,
        kexec_crash_size=None,
    )
    root = build(tmp_path, spec)
    config = gzip.decompress((root / "proc/config.gz").read_bytes()).decode()
    assert "\n# CONFIG_KEXEC_CORE is not set\n" in config
    for rel in (
        "proc/sys/kernel/osrelease",
        "sys/kernel/kexec_loaded",
        "sys/kernel/kexec_crash_size",
        "proc/kallsyms",
        "dev/kmsg",
        "sys/module/kvm_intel",
        "sys/fs/cgroup/misc.capacity",
    ):
        assert not (root / rel).exists(), rel
    assert read(root, "sys/kernel/kexec_crash_loaded") == "0\n"


def test_plain_config_needs_a_release(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build(tmp_path, HostSpec(release=None, config={"KEXEC": "y"}))


def test_misc_charge_counts_up_the_hierarchy(tmp_path: Path) -> None:
    scope = libvirt_cgroup("td1", leaf=None)
    vms = [
        VmProc(pid=4242, cmdline=qemu_vm_cmdline("td1"), cgroup=libvirt_cgroup("td1"), misc_tdx=1),
        VmProc(
            pid=4300,
            cmdline=qemu_td_cmdline("td2"),
            cgroup="/machine.slice/td2.scope",
            misc_tdx=1,
        ),
    ]
    root = build(tmp_path, tdx_host(processes=vms, misc_current={"tdx": 2}))
    cg = root / "sys/fs/cgroup"
    assert scope == "/machine.slice/machine-qemu\\x2d1\\x2dtd1.scope"
    assert read(root, "proc/4242/cgroup") == f"0::{scope}/libvirt/emulator\n"
    assert read(cg, scope.lstrip("/") + "/libvirt/emulator/misc.current") == "tdx 1\n"
    assert read(cg, scope.lstrip("/") + "/misc.current") == "tdx 1\n"
    assert read(cg, "machine.slice/misc.current") == "tdx 2\n"
    assert read(cg, "machine.slice/td2.scope/misc.max") == "tdx max\n"
    assert read(cg, "misc.current") == "tdx 2\n"


def test_libvirt_live_xml_and_pid(tmp_path: Path) -> None:
    doms = [LibvirtDomain("td1", 4242), LibvirtDomain("vm1", 4300, tdx=False)]
    root = build(tmp_path, HostSpec(libvirt=doms))
    run = root / "run/libvirt/qemu"
    assert read(run, "td1.pid") == "4242\n"
    td = ET.parse(run / "td1.xml").getroot()
    assert td.tag == "domstatus" and td.get("pid") == "4242"
    security = td.find("domain/launchSecurity")
    assert security is not None and security.get("type") == "tdx"
    assert security.findtext("policy") == "0x10000000"
    assert security.find("quoteGenerationService") is not None
    vm = ET.parse(run / "vm1.xml").getroot()
    assert vm.find("domain/launchSecurity") is None
    assert vm.findtext("domain/name") == "vm1" and vm.find("domain").get("id") == "2"


def test_launch_command_lines() -> None:
    plain = qemu_td_cmdline("td7")
    assert plain[plain.index("-object") + 1] == "tdx-guest,id=tdx0"
    assert plain[plain.index("-name") + 1] == "td7,process=td7,debug-threads=on"
    machine = plain[plain.index("-machine") + 1]
    assert "confidential-guest-support=tdx0" in machine and "kernel_irqchip=split" in machine

    js = qemu_td_cmdline(json_object=True)
    obj = json.loads(js[js.index("-object") + 1])
    assert obj["qom-type"] == "tdx-guest" and obj["quote-generation-socket"]["port"] == "4050"

    vm = qemu_vm_cmdline("web")
    assert vm[vm.index("-name") + 1] == "guest=web,debug-threads=on"
    assert not any("tdx" in arg for arg in vm)

    ch = cloud_hypervisor_td_cmdline()
    assert ch[ch.index("--platform") + 1] == "tdx=on"


def test_extra_files_are_verbatim_and_remove_deletes(tmp_path: Path) -> None:
    spec = HostSpec(
        extra_files={"sys/kernel/kexec_loaded": "garbage", "etc/x": b"\x00\x01"},
        remove=["proc/cpuinfo"],
    )
    root = build(tmp_path, spec)
    assert read(root, "sys/kernel/kexec_loaded") == "garbage"
    assert (root / "etc/x").read_bytes() == b"\x00\x01"
    assert not (root / "proc/cpuinfo").exists()


def test_scenario_from_the_brief(tmp_path: Path) -> None:
    root = build(
        tmp_path,
        tdx_host(
            processes=[VmProc(pid=4242, cmdline=qemu_td_cmdline(), misc_tdx=1)],
            misc_current={"tdx": 1},
        ),
    )
    assert read(root, "sys/fs/cgroup/misc.current") == "tdx 1\n"
    assert "tdx_host_platform" in read(root, "proc/cpuinfo")
    assert (root / "sys/kernel/debug/kvm/4242-12").is_dir()
