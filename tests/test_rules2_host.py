"""Rules v2, host side: TDX in use, cpuinfo consistency, platform.tdx, the host view,
misc cgroup v1, vCPU-held VMs, classification step 2, leaked HKIDs.

Each scenario is a fixture host (hostbuilder) read by the installed CLI
(`tdx-preflight check --root DIR --format json`), as in test_scenarios.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, statuses
from hostbuilder import (
    TDX_MSRS,
    HostSpec,
    LibvirtDomain,
    VmProc,
    build,
    cpuinfo_text,
    libvirt_cgroup,
    qemu_td_cmdline,
    qemu_vm_cmdline,
    tdx_host,
)
from test_scenarios import TDX_ONLY

FOREIGN_PID_NS, FOREIGN_CGROUP_NS = 4026532481, 4026532482


def check(
    tmp_path: Path, spec: HostSpec, phase: str = "exec", fmt: str = "json"
) -> tuple[dict[str, Any], dict[str, str]]:
    root = build(tmp_path / "root", spec)
    run = run_cli("check", "--root", str(root), "--phase", phase, "--format", fmt)
    if fmt != "json":
        return {"text": run.stdout, "exit_code": run.code}, {}
    report = run.json()
    assert run.code == report["exit_code"], run.stderr
    return report, statuses(report)


def row(report: dict[str, Any], check_id: str) -> dict[str, Any]:
    return next(c for c in report["checks"] if c["id"] == check_id)


def td_proc(pid: int = 4242, **kw: Any) -> VmProc:
    return VmProc(pid=pid, cmdline=qemu_td_cmdline("td1"), comm="td1", misc_tdx=1, **kw)


def plain_host(**kw: Any) -> HostSpec:
    """Granite Rapids, TDX off everywhere: kvm_intel tdx=N, misc without tdx, no flag."""
    base: dict[str, Any] = dict(
        kvm_intel_tdx="N", misc_capacity={}, misc_current={}, kmsg=["Linux version 6.18.2"]
    )
    base.update(kw)
    return HostSpec(**base)


# -- TDX in use: yes / no / unknown ------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        dict(tdx_flag=True),
        dict(misc_capacity={"tdx": 63}, misc_current={"tdx": 0}),
        dict(misc_current={"tdx": 1}),
        dict(kvm_intel_tdx="Y"),
        dict(tdx_host_version="1.5.08"),
        dict(kmsg=["virt/tdx: TDX-Module initialized"]),
        dict(processes=[VmProc(pid=4242, cmdline=qemu_td_cmdline("td1"), comm="td1")]),
    ],
    ids=["flag", "capacity", "current", "kvm_intel", "tdx_host", "log", "td_evidence"],
)
def test_each_source_alone_puts_tdx_in_use(tmp_path: Path, source: dict[str, Any]) -> None:
    report, st = check(tmp_path, plain_host(**source))
    assert report["host"]["tdx_in_use"] == "yes"
    assert all(st[i] != "skip" for i in TDX_ONLY)


def test_no_source_says_yes_and_all_read_is_no(tmp_path: Path) -> None:
    report, st = check(tmp_path, plain_host())
    assert report["host"]["tdx_in_use"] == "no"
    assert all(st[i] == "skip" for i in TDX_ONLY) and report["exit_code"] == 0


@pytest.mark.parametrize(
    ("rel", "data", "named"),
    [
        ("sys/module/kvm_intel/parameters/tdx", "maybe\n", "kvm_intel tdx"),
        ("sys/fs/cgroup/misc.capacity", "tdx 0\ntdx 0\n", "misc.capacity tdx"),
    ],
)
def test_an_unreadable_sysfs_or_cgroup_source_makes_it_unknown(
    tmp_path: Path, rel: str, data: str, named: str
) -> None:
    spec = plain_host()
    spec.extra_files[rel] = data
    report, st = check(tmp_path, spec)
    assert report["host"]["tdx_in_use"] == "unknown"
    for i in TDX_ONLY:
        assert st[i] == "unknown" and named in row(report, i)["summary"], i
    assert st["platform.tdx"] == "warn" and named in row(report, "platform.tdx")["summary"]
    assert (report["verdict"], report["exit_code"]) == ("block", 3)


def test_unknown_tdx_use_keeps_phase_skips_and_the_load_cap(tmp_path: Path) -> None:
    spec = plain_host()
    spec.extra_files["sys/module/kvm_intel/parameters/tdx"] = "maybe\n"
    _, st = check(tmp_path / "crash", spec, "crash")
    assert st["guests.td"] == "skip" and st["guests.teardown"] == "skip"
    assert st["postkexec.tdx"] == "skip" and st["kernel.cache_flush"] == "unknown"
    report, st = check(tmp_path / "load", spec, "load")
    assert st["guests.td"] == "warn" and st["guests.teardown"] == "skip"
    assert "could not read kvm_intel tdx" in row(report, "guests.td")["summary"]


def test_tdx_in_use_and_no_source_telling_the_module_state_warns(tmp_path: Path) -> None:
    report, st = check(tmp_path, plain_host(tdx_flag=True, kvm_intel_tdx=None))
    assert report["host"]["tdx_in_use"] == "yes"
    assert st["tdx.module"] == "warn"
    assert "no source tells the TDX module state" in row(report, "tdx.module")["summary"]
    assert st["postkexec.tdx"] == "unknown" and report["exit_code"] == 0


def test_unreadable_kexec_sysfs_on_a_non_tdx_host_is_at_worst_a_warning(tmp_path: Path) -> None:
    spec = plain_host(kexec_loaded=None)
    spec.extra_files["sys/kernel/kexec_loaded"] = "yes\n"
    report, st = check(tmp_path, spec)
    assert st["kernel.kexec"] == "warn" and "cannot read" in row(report, "kernel.kexec")["summary"]
    assert report["exit_code"] == 0


def test_no_kexec_is_not_capped_when_tdx_use_is_unknown(tmp_path: Path) -> None:
    spec = plain_host(kexec_loaded=None)
    spec.extra_files["sys/module/kvm_intel/parameters/tdx"] = "maybe\n"
    report, st = check(tmp_path, spec)
    assert report["host"]["tdx_in_use"] == "unknown"
    assert st["kernel.kexec"] == "fail" and report["exit_code"] == 1


def test_an_unreadable_kernel_log_alone_is_not_unknown(tmp_path: Path) -> None:
    spec = plain_host(kmsg=None)
    spec.extra_files["dev/kmsg"] = b"\xff\xfe no record here\n"
    report, st = check(tmp_path, spec)
    assert report["host"]["tdx_in_use"] == "no" and st["guests.td"] == "skip"


# -- cpuinfo consistency ---------------------------------------------------------------


def _cpuinfo_with(spec: HostSpec, edit: Any) -> HostSpec:
    blocks = cpuinfo_text(spec).split("\n\n")
    blocks = [b for b in blocks if b.strip()]
    blocks[1] = edit(blocks[1])
    spec.extra_files["proc/cpuinfo"] = "\n\n".join(blocks) + "\n\n"
    return spec


@pytest.mark.parametrize(
    ("name", "edit", "said"),
    [
        ("no vendor_id", lambda b: b.replace("vendor_id\t: GenuineIntel\n", ""), "vendor_id"),
        ("no model", lambda b: b.replace("model\t\t: 173\n", ""), "'model'"),
        (
            "no bugs",
            lambda b: "\n".join(x for x in b.split("\n") if not x.startswith("bugs")),
            "bugs",
        ),
        ("other model", lambda b: b.replace("model\t\t: 173", "model\t\t: 143"), "disagree"),
        ("other vendor", lambda b: b.replace("GenuineIntel", "AuthenticAMD"), "disagree"),
        ("flags twice", lambda b: b + "\nflags\t\t: fpu", "twice"),
        (
            "model twice",
            lambda b: b.replace("model\t\t: 173", "model\t\t: 173\nmodel\t\t: 1"),
            "twice",
        ),
    ],
)
def test_inconsistent_cpuinfo_is_unknown_and_nothing_is_inferred(
    tmp_path: Path, name: str, edit: Any, said: str
) -> None:
    # The issue-10 example: one block without vendor_id made the host "not Intel" and
    # skipped every TDX check.
    spec = _cpuinfo_with(tdx_host(processes=[td_proc()], misc_current={"tdx": 1}), edit)
    report, st = check(tmp_path, spec)
    assert st["platform.cpu"] == "unknown" and said in row(report, "platform.cpu")["summary"]
    assert report["host"]["tdx_in_use"] == "yes"  # other sources still speak
    assert st["platform.tdx"] != "skip" and st["guests.td"] == "fail"
    assert report["exit_code"] == 1


def test_amd_cpuinfo_is_not_intel_and_skips_tdx(tmp_path: Path) -> None:
    report, st = check(tmp_path, plain_host(cpu="amd_epyc", kvm_intel_tdx=None))
    assert st["platform.cpu"] == "pass" and "not Intel" in row(report, "platform.cpu")["summary"]
    assert st["platform.tdx"] == "skip" and report["host"]["tdx_in_use"] == "no"


# -- platform.tdx ------------------------------------------------------------------------


def test_seamrr_enabled_but_unlocked_warns(tmp_path: Path) -> None:
    report, st = check(tmp_path, tdx_host(msrs={**TDX_MSRS, 0x1401: 0x000F_FFFF_FE00_0800}))
    assert st["platform.tdx"] == "warn"
    assert "SEAMRR enabled but not locked" in row(report, "platform.tdx")["summary"]
    assert report["exit_code"] == 0  # advisory


def test_bios_keyids_unused_says_the_kernel_lacks_tdx_host(tmp_path: Path) -> None:
    spec = plain_host(msrs=dict(TDX_MSRS), config={"CONFIG_INTEL_TDX_HOST": "n"})
    report, st = check(tmp_path, spec)
    tdx = row(report, "platform.tdx")
    assert st["platform.tdx"] == "warn" and "lacks INTEL_TDX_HOST" in tdx["summary"]
    assert "CONFIG_INTEL_TDX_HOST" in tdx["remedy"] and "kvm_intel.tdx=1" not in tdx["remedy"]


def test_bios_keyids_unused_without_kvm_intel_tdx_on_the_command_line(tmp_path: Path) -> None:
    spec = plain_host(msrs=dict(TDX_MSRS), config={"CONFIG_INTEL_TDX_HOST": "y"})
    report, st = check(tmp_path, spec)
    assert st["platform.tdx"] == "warn"
    assert (
        "kvm_intel.tdx=1 is not on the kernel command line"
        in row(report, "platform.tdx")["summary"]
    )


def test_bios_keyids_unused_because_the_7_1_boot_bring_up_failed(tmp_path: Path) -> None:
    """7.1+ brings TDX up at boot, whatever the command line: tdx_init's reason, then the
    boot's "TDX not supported by the host platform" (the flag was left unset). The reason
    is what the operator needs, not the command line."""
    spec = plain_host(
        release="7.1.3-1-amd64",
        msrs=dict(TDX_MSRS),
        config={"CONFIG_INTEL_TDX_HOST": "y"},
        kmsg=[
            "Linux version 7.1.3-1-amd64",
            "virt/tdx: initialization failed: Hibernation support is enabled",
            "virt/tdx: TDX not supported by the host platform",
        ],
    )
    report, st = check(tmp_path, spec)
    tdx = row(report, "platform.tdx")
    assert st["platform.tdx"] == "warn"
    assert "log says why TDX is not up: virt/tdx: initialization failed: Hib" in tdx["summary"]
    assert "command line" not in tdx["summary"]


@pytest.mark.parametrize(
    ("first", "state"),
    [
        ("virt/tdx: module not loaded", "not loaded"),
        ("virt/tdx: TDX-Module initialization failed (-5)", "failed"),
    ],
)
def test_not_supported_after_a_failure_keeps_the_failure(
    tmp_path: Path, first: str, state: str
) -> None:
    spec = plain_host(
        release="7.1.3-1-amd64",
        kmsg=[
            "Linux version 7.1.3-1-amd64",
            first,
            "virt/tdx: TDX not supported by the host platform",
        ],
    )
    report, _ = check(tmp_path, spec)
    assert report["host"]["tdx_module"]["state"] == state, report["host"]["tdx_module"]


def test_platform_tdx_passes_on_a_consistent_tdx_host(tmp_path: Path) -> None:
    report, st = check(tmp_path, tdx_host())
    assert (
        st["platform.tdx"] == "pass" and "64 TDX KeyIDs" in row(report, "platform.tdx")["summary"]
    )


# -- the host view -----------------------------------------------------------------------


def test_init_namespaces_and_v2_root_are_the_whole_host(tmp_path: Path) -> None:
    report, _ = check(tmp_path, tdx_host(pid_ns=4026531836, cgroup_ns=4026531835))
    assert report["host"]["view"] == {
        "pid_namespace": "init",
        "cgroup_namespace": "init",
        "misc_cgroup": "v2",
    }


def test_foreign_pid_namespace_enumerates_from_debugfs_only(tmp_path: Path) -> None:
    spec = tdx_host(processes=[td_proc()], misc_current={"tdx": 1}, pid_ns=FOREIGN_PID_NS)
    report, st = check(tmp_path, spec)
    assert report["host"]["view"]["pid_namespace"] == "foreign"
    [guest] = report["guests"]
    # debugfs lists the VM; its TID is the host's, so no /proc of this namespace is read.
    assert guest["pid"] is None and guest["kind"] == "td"
    assert row(report, "guests.td")["evidence"]["vm_enumeration"] == "debugfs"
    assert st["guests.td"] == "fail"
    text, _ = check(tmp_path / "t", spec, fmt="text")
    assert text["text"].count("host view partial: foreign PID namespace") == 1


def test_foreign_pid_namespace_without_debugfs_cannot_enumerate(tmp_path: Path) -> None:
    spec = tdx_host(pid_ns=FOREIGN_PID_NS, debugfs_kvm=False, processes=[td_proc()])
    report, st = check(tmp_path, spec)
    assert report["guests"] == [] and st["guests.vm"] == "unknown"
    assert "foreign PID namespace" in row(report, "guests.vm")["summary"]


@pytest.mark.parametrize(
    "where", [dict(cgroup_child_view=True), dict(cgroup_ns=FOREIGN_CGROUP_NS)], ids=["child", "ns"]
)
def test_misc_counts_below_the_root_are_unavailable_never_zero(
    tmp_path: Path, where: dict[str, Any]
) -> None:
    # A container sees its own cgroup: tdx 0 there says nothing of the host's TDs.
    vm = VmProc(pid=6100, cmdline=["/opt/acme/bin/acme-vmm"], comm="acme-vmm")
    report, st = check(tmp_path, tdx_host(processes=[vm], misc_current={"tdx": 0}, **where))
    assert report["host"]["view"]["misc_cgroup"] == "not the root"
    assert report["guests"][0]["kind"] == "unknown"
    assert st["guests.td"] == "unknown" and st["guests.teardown"] == "unknown"
    assert "not in a container" in row(report, "guests.teardown")["remedy"]
    assert report["exit_code"] == 3
    text, _ = check(tmp_path / "t", tdx_host(**where), fmt="text")
    assert "host view partial: misc cgroup is not the host's root" in text["text"]


def test_whole_view_prints_no_view_line(tmp_path: Path) -> None:
    text, _ = check(tmp_path, tdx_host(), fmt="text")
    assert "host view partial" not in text["text"]


# -- misc cgroup v1 / hybrid -------------------------------------------------------------


@pytest.mark.parametrize("layout", ["v1", "hybrid"])
def test_misc_on_cgroup_v1_finds_a_td_in_its_cgroup(tmp_path: Path, layout: str) -> None:
    vm = VmProc(pid=6100, cmdline=["/opt/acme/bin/acme-vmm"], comm="acme-vmm", misc_tdx=1,
                cgroup="/machine.slice/acme.scope")  # fmt: skip
    spec = tdx_host(processes=[vm], misc_current={"tdx": 1}, cgroup_layout=layout)
    report, st = check(tmp_path, spec)
    assert report["host"]["view"]["misc_cgroup"] == "v1"
    [guest] = report["guests"]
    assert "misc.current tdx 1 in cgroup /machine.slice/acme.scope" in guest["evidence"]
    assert guest["kind"] == "td" and st["guests.td"] == "fail"


def test_operator_rhel8_style_v1_host_with_one_plain_libvirt_vm_allows(tmp_path: Path) -> None:
    pid = 7001
    vm = VmProc(pid=pid, cmdline=qemu_vm_cmdline("web1"), cgroup=libvirt_cgroup("web1"))
    spec = tdx_host(
        cgroup_layout="v1", processes=[vm], libvirt=[LibvirtDomain("web1", pid, tdx=False)]
    )
    report, st = check(tmp_path, spec)
    [guest] = report["guests"]
    assert guest["kind"] == "vm" and guest["name"] == "web1"
    assert any("no TDX launchSecurity" in e for e in guest["evidence"])
    assert st["guests.td"] == "pass" and st["guests.teardown"] == "pass"
    assert st["guests.vm"] == "warn" and (report["verdict"], report["exit_code"]) == ("allow", 0)


def test_v1_host_without_a_misc_hierarchy_is_not_told_to_make_misc_readable(
    tmp_path: Path,
) -> None:
    pid = 7001
    vm = VmProc(pid=pid, cmdline=qemu_vm_cmdline("web1"), cgroup=libvirt_cgroup("web1"))
    spec = tdx_host(
        cgroup_layout="v1",
        misc_capacity=None,
        misc_current=None,
        processes=[vm],
        libvirt=[LibvirtDomain("web1", pid, tdx=False)],
    )
    report, st = check(tmp_path, spec)
    assert report["host"]["view"]["misc_cgroup"] == "unavailable"
    assert st["guests.td"] == "pass" and report["guests"][0]["kind"] == "vm"
    assert st["guests.teardown"] == "unknown"
    remedies = " ".join(c["remedy"] or "" for c in report["checks"])
    assert "readable" not in row(report, "guests.teardown")["remedy"]
    assert "make misc.current readable" not in remedies.lower()


def test_libvirt_plain_vm_is_vm_on_positive_evidence_on_a_tdx_host(tmp_path: Path) -> None:
    # Step 2 before step 3: root misc counts one TD, but libvirt ran this VM without TDX.
    pid = 7001
    vm = VmProc(pid=pid, cmdline=qemu_vm_cmdline("web1"), cgroup=libvirt_cgroup("web1"))
    spec = tdx_host(
        processes=[vm], libvirt=[LibvirtDomain("web1", pid, tdx=False)], misc_current={"tdx": 1}
    )
    report, st = check(tmp_path, spec)
    assert report["guests"][0]["kind"] == "vm"
    assert st["guests.td"] == "fail"  # the kernel still counts a TD KeyID


# -- VMs held by vCPU fds ---------------------------------------------------------------


@pytest.mark.parametrize("debugfs", [False, True])
def test_a_td_whose_vm_fd_closed_is_still_a_live_td(tmp_path: Path, debugfs: bool) -> None:
    td = td_proc(vm_fds=[], closed_vm_fds=[12])
    spec = tdx_host(processes=[td], misc_current={"tdx": 1}, debugfs_kvm=debugfs)
    report, st = check(tmp_path, spec)
    [guest] = report["guests"]
    assert guest["kind"] == "td" and guest["pid"] == 4242
    assert any("kvm-vcpu" in e for e in guest["evidence"])
    assert guest["held_by"] == ("kvm-vm fd" if debugfs else "kvm-vcpu fds only")
    assert st["guests.td"] == "fail"


def test_more_vms_by_vcpu_index_than_vm_fds(tmp_path: Path) -> None:
    vm = VmProc(pid=5000, cmdline=qemu_vm_cmdline("a"), vm_fds=[12], closed_vm_fds=[13])
    report, _ = check(tmp_path, plain_host(processes=[vm], debugfs_kvm=False))
    assert sorted(g["held_by"] for g in report["guests"]) == ["kvm-vcpu fds only", "kvm-vm fd"]
    assert "2 plain VMs" in row(report, "guests.vm")["summary"]


def _guests(tmp_path: Path, vm: VmProc) -> tuple[int, dict[str, Any]]:
    """`guests --format json` on a plain host holding `vm`, enumerated through /proc."""
    root = build(tmp_path / "root", plain_host(processes=[vm], debugfs_kvm=False))
    run = run_cli("guests", "--root", str(root), "--format", "json")
    return run.code, run.json()


#: Descriptors that hold a VM without naming it (virt/kvm/kvm_main.c): statistics of a
#: vCPU or a VM, x86's KVM device, and guest_memfd (an anon inode, later a pseudo file).
HOLDING = [
    "anon_inode:kvm-vcpu-stats:3",
    "anon_inode:kvm-vm-stats",
    "anon_inode:kvm-vfio",
    "anon_inode:[kvm-gmem]",
    "/[kvm-gmem] (deleted)",
]


@pytest.mark.parametrize("link", HOLDING)
def test_statistics_and_device_descriptors_beside_a_vm_add_none(tmp_path: Path, link: str) -> None:
    """QEMU 8.1+ holds a kvm-vcpu-stats descriptor per vCPU (the fixture's default too);
    these and the others belong to the VM the process holds."""
    vm = VmProc(pid=5000, cmdline=qemu_vm_cmdline("a"), extra_fds={40: link})
    code, data = _guests(tmp_path, vm)
    assert code == 0 and data["enumeration"]["complete"], data["enumeration"]
    [guest] = data["guests"]
    assert guest["vm_fd"] == 12 and guest["held_by"] == "kvm-vm fd"


@pytest.mark.parametrize("link", HOLDING)
def test_a_vm_held_only_by_descriptors_that_name_none_leaves_enumeration_incomplete(
    tmp_path: Path, link: str
) -> None:
    """They keep the VM alive, but nothing tells which VM or how many: the process is
    unseen and guests.vm unknown, never "no VM"."""
    vm = VmProc(pid=5000, cmdline=qemu_vm_cmdline("a"), vm_fds=[], extra_fds={40: link})
    code, data = _guests(tmp_path, vm)
    e = data["enumeration"]
    assert code == 3 and not e["complete"] and e["unseen"] == [5000] and not data["guests"]
    assert f"5000: descriptor 40 is {link.removeprefix('anon_inode:')} and none" in e["problem"]
    spec = plain_host(processes=[vm], debugfs_kvm=False)
    _, st = check(tmp_path / "check", spec)
    assert st["guests.vm"] == "unknown"


def test_a_td_held_only_by_its_guest_memfd_is_never_no_td(tmp_path: Path) -> None:
    """Without debugfs or misc counts, a TD whose only descriptor left is a guest_memfd
    was invisible: guests.td and guests.teardown passed, exit 0."""
    td = td_proc(vm_fds=[], extra_fds={40: "anon_inode:[kvm-gmem]"})
    spec = tdx_host(processes=[td], debugfs_kvm=False, misc_capacity={}, misc_current={})
    report, st = check(tmp_path, spec)
    assert st["guests.td"] == "unknown" and st["guests.teardown"] == "unknown"
    assert report["exit_code"] == 3


def test_more_statistics_descriptors_than_vms_named_leave_enumeration_incomplete(
    tmp_path: Path,
) -> None:
    """Two kvm-vcpu-stats:0 beside one VM: a second VM (its kvm-vm and vCPU descriptors
    closed) lives on through its statistics descriptor. guest_memfd descriptors, several
    per VM, count nothing."""
    stats = {40: "anon_inode:kvm-vcpu-stats:0"}
    gmem = {41: "anon_inode:[kvm-gmem]", 42: "anon_inode:[kvm-gmem]"}
    vm = VmProc(pid=5000, cmdline=qemu_vm_cmdline("a"), extra_fds={**stats, **gmem})
    code, data = _guests(tmp_path, vm)
    e = data["enumeration"]
    assert code == 3 and e["unseen"] == [5000], e
    assert "are kvm-vcpu-stats:0, more than the 1 VM named" in e["problem"]
    vm.extra_fds = gmem
    code, data = _guests(tmp_path / "gmem", vm)
    assert code == 0 and data["enumeration"]["complete"] and len(data["guests"]) == 1


@pytest.mark.parametrize(
    "link",
    [
        "anon_inode:kvm-vmx",
        "anon_inode:kvm-arm-vgic-v3",
        "anon_inode:kvm-vcpu-stats:x",
        "anon_inode:kvm-vcpu-stats:",
        "anon_inode:kvm-vm-stats:1",
        "anon_inode:kvm-vcpu:",
        "anon_inode:kvm-",
        "anon_inode:kvm-VFIO",
        "anon_inode:kvm-vfio ",
    ],
)
def test_a_kvm_descriptor_of_no_kernel_form_is_malformed(tmp_path: Path, link: str) -> None:
    vm = VmProc(pid=5000, cmdline=qemu_vm_cmdline("a"), extra_fds={40: link})
    code, data = _guests(tmp_path, vm)
    e = data["enumeration"]
    assert code == 3 and e["unseen"] == [5000] and not data["guests"], e
    assert f"unexpected {link!r}" in e["problem"]


# -- guests.td / guests.teardown ---------------------------------------------------------

LEAK = "kvm_intel: TDH_PHYMEM_PAGE_WBINVD failed. HKID 5 is leaked."


def test_a_leaked_hkid_without_vms_fails_teardown_only(tmp_path: Path) -> None:
    spec = tdx_host(misc_current={"tdx": 1})
    spec.kmsg = [*(spec.kmsg or []), (3, LEAK)]
    report, st = check(tmp_path, spec)
    assert st["guests.td"] == "pass"
    teardown = row(report, "guests.teardown")
    assert st["guests.teardown"] == "fail" and "HKID 5 leaked" in teardown["summary"]
    assert "cold" in teardown["summary"] and "cold" in teardown["remedy"]
    assert report["exit_code"] == 1


def test_a_leak_line_written_from_userspace_is_not_the_kernels(tmp_path: Path) -> None:
    """prio 14 is facility 1 (LOG_USER): devkmsg_write never gives a writer facility 0, so
    such a record cannot be the kernel's, whatever it says."""
    spec = tdx_host(misc_current={"tdx": 1})
    spec.kmsg = [*(spec.kmsg or []), (14, LEAK)]
    report, st = check(tmp_path, spec)
    assert st["guests.td"] == "fail"
    assert "leaked_hkids" not in row(report, "guests.teardown")["evidence"]


def test_fewer_leaked_hkids_than_the_count_still_fails_guests_td(tmp_path: Path) -> None:
    spec = tdx_host(misc_current={"tdx": 2})
    spec.kmsg = [*(spec.kmsg or []), (3, LEAK), (3, LEAK)]  # one HKID, named twice
    _, st = check(tmp_path, spec)
    assert st["guests.td"] == "fail" and st["guests.teardown"] == "fail"


def test_a_leak_does_not_hide_a_live_vm(tmp_path: Path) -> None:
    vm = VmProc(pid=6100, cmdline=["/opt/acme/bin/acme-vmm"], comm="acme-vmm")
    spec = tdx_host(processes=[vm], misc_current={"tdx": 1})
    spec.kmsg = [*(spec.kmsg or []), (3, LEAK)]
    _, st = check(tmp_path, spec)
    assert st["guests.td"] == "fail"


def test_no_tdx_line_anywhere_means_unavailable_when_tdx_is_in_use(tmp_path: Path) -> None:
    # A vendor kernel before 6.16: KVM TDX up, nothing accounted in the misc cgroup.
    vm = VmProc(pid=6100, cmdline=["/opt/acme/bin/acme-vmm"], comm="acme-vmm")
    spec = tdx_host(processes=[vm], misc_capacity={}, misc_current={})
    report, st = check(tmp_path, spec)
    assert report["guests"][0]["kind"] == "unknown"
    assert st["guests.td"] == "unknown" and st["guests.teardown"] == "unknown"
    _, st = check(tmp_path / "novm", tdx_host(misc_capacity={}, misc_current={}))
    assert st["guests.td"] == "pass" and st["guests.teardown"] == "pass"  # no VM exists


def test_capacity_with_tdx_and_current_without_is_malformed(tmp_path: Path) -> None:
    report, st = check(tmp_path, tdx_host(misc_current={"sev": 0}))
    assert st["guests.teardown"] == "unknown"
    assert "no 'tdx' line" in row(report, "guests.teardown")["summary"]


def test_a_tdx_line_twice_is_malformed_never_last_wins(tmp_path: Path) -> None:
    spec = tdx_host(processes=[td_proc()])
    spec.extra_files["sys/fs/cgroup/misc.current"] = "tdx 1\ntdx 0\n"
    report, st = check(tmp_path, spec)
    assert (
        st["guests.teardown"] == "unknown" and "twice" in row(report, "guests.teardown")["summary"]
    )
    assert st["guests.td"] == "fail" and report["exit_code"] == 1


@pytest.mark.parametrize(
    ("phase", "td", "teardown"), [("load", "warn", "skip"), ("crash", "skip", "skip")]
)
def test_guest_rows_by_phase(tmp_path: Path, phase: str, td: str, teardown: str) -> None:
    spec = tdx_host(misc_current={"tdx": 1})
    spec.kmsg = [*(spec.kmsg or []), (3, LEAK)]
    _, st = check(tmp_path / "leak", spec, phase)
    assert st["guests.teardown"] == teardown
    _, st = check(tmp_path / "td", tdx_host(processes=[td_proc()], misc_current={"tdx": 1}), phase)
    assert (st["guests.td"], st["guests.teardown"]) == (td, teardown)
