"""Fixture hosts through the installed CLI: verdict, exit code and the targeted checks.

Each scenario is a host tree in the kernel's formats (hostbuilder), read by the
real `tdx-preflight check --root DIR --format json` subprocess.
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
    cloud_hypervisor_td_cmdline,
    libvirt_cgroup,
    qemu_td_cmdline,
    qemu_vm_cmdline,
    tdx_host,
)

TDX_ONLY = (
    "tdx.module",
    "tdx.module_update",
    "errata.tdx_pw_mce",
    "kernel.cache_flush",
    "guests.td",
    "guests.teardown",
    "postkexec.tdx",
)


def check(
    tmp_path: Path, spec: HostSpec, phase: str = "exec", *args: str
) -> tuple[dict[str, Any], dict[str, str]]:
    root = build(tmp_path / "root", spec)
    run = run_cli("check", "--root", str(root), "--phase", phase, "--format", "json", *args)
    report = run.json()
    assert run.code == report["exit_code"], run.stderr
    assert report["phase"] == phase
    return report, statuses(report)


def td_proc(pid: int = 4242, name: str = "td1", **kw: Any) -> VmProc:
    return VmProc(pid=pid, cmdline=qemu_td_cmdline(name), comm=name, misc_tdx=1, **kw)


# -- the scenarios of the issue -----------------------------------------------------


def test_granite_rapids_idle_allows_and_warns_about_after_kexec(tmp_path: Path) -> None:
    report, st = check(tmp_path, tdx_host())
    assert (report["verdict"], report["exit_code"]) == ("allow", 0)
    assert st == {
        "platform.cpu": "pass",
        "platform.tdx": "pass",
        "tdx.module": "pass",
        "tdx.module_update": "pass",
        "errata.tdx_pw_mce": "pass",
        "kernel.kexec": "pass",
        "kernel.cache_flush": "pass",
        "guests.td": "pass",
        "guests.teardown": "pass",
        "guests.vm": "pass",
        "kexec.image": "pass",
        "target.kernel": "skip",
        "postkexec.tdx": "warn",
    }
    host = report["host"]
    assert host["tdx_in_use"] == "yes" and host["model"] == 173
    assert host["tdx_module"]["version"] == "1.5.08"
    assert report["guests"] == []


def test_a_running_qemu_td_blocks(tmp_path: Path) -> None:
    spec = tdx_host(
        processes=[td_proc(cgroup="/system.slice/td1.service")], misc_current={"tdx": 1}
    )
    report, st = check(tmp_path, spec)
    assert (report["verdict"], report["exit_code"]) == ("block", 1)
    assert st["guests.td"] == "fail" and st["guests.teardown"] == "fail"
    [guest] = report["guests"]
    assert guest["kind"] == "td" and guest["name"] == "td1" and guest["pid"] == 4242
    assert any("tdx-guest" in e for e in guest["evidence"])
    assert any("misc.current tdx 1" in e for e in guest["evidence"])
    blocking = {c["id"]: c["blocking"] for c in report["checks"]}
    assert blocking["guests.td"] and blocking["guests.teardown"]


def test_only_a_plain_vm_allows_with_a_warning(tmp_path: Path) -> None:
    vm = VmProc(pid=5000, cmdline=qemu_vm_cmdline("web1"), cgroup=libvirt_cgroup("web1"))
    report, st = check(tmp_path, tdx_host(processes=[vm]))
    assert (report["verdict"], report["exit_code"]) == ("allow", 0)
    assert st["guests.vm"] == "warn" and st["guests.td"] == "pass"
    [guest] = report["guests"]
    assert guest["kind"] == "vm" and guest["name"] == "web1"


@pytest.mark.parametrize("cpu", ["sapphire_rapids", "emerald_rapids"])
@pytest.mark.parametrize("phase", ["load", "exec", "crash"])
def test_erratum_blocks_every_phase(tmp_path: Path, cpu: str, phase: str) -> None:
    report, st = check(tmp_path, tdx_host(cpu=cpu, extra_bugs=["tdx_pw_mce"]), phase)
    assert (report["verdict"], report["exit_code"]) == ("block", 1)
    assert st["errata.tdx_pw_mce"] == "fail"
    erratum = next(c for c in report["checks"] if c["id"] == "errata.tdx_pw_mce")
    assert erratum["blocking"] is True and erratum["remedy"]


def test_erratum_model_without_the_bug_line_still_fails(tmp_path: Path) -> None:
    _, st = check(tmp_path, tdx_host(cpu="sapphire_rapids"))
    assert st["errata.tdx_pw_mce"] == "fail"


def test_emerald_rapids_with_tdx_off_in_bios_allows(tmp_path: Path) -> None:
    spec = HostSpec(
        cpu="emerald_rapids",
        msrs={0x87: 127, 0x982: 0b11, 0x1401: 0},  # MKTME only, no TDX KeyIDs
        kallsyms=["tdx_cpu_flush_cache_for_kexec"],
        kvm_intel_tdx="N",
        kexec_loaded=1,
    )
    report, st = check(tmp_path, spec)
    assert (report["verdict"], report["exit_code"]) == ("allow", 0)
    assert all(st[i] == "skip" for i in TDX_ONLY)
    assert st["platform.tdx"] == "pass" and st["kernel.kexec"] == "pass"
    assert report["host"]["tdx_in_use"] == "no"


def test_granite_rapids_on_612_without_kexec_blocks(tmp_path: Path) -> None:
    spec = tdx_host(
        release="6.12.48-1-amd64",
        kexec_loaded=None,
        kexec_crash_loaded=None,
        kexec_crash_size=None,
        kallsyms=["tdx_enable"],
    )
    report, st = check(tmp_path, spec)
    assert (report["verdict"], report["exit_code"]) == ("block", 1)
    assert st["kernel.kexec"] == "fail"
    assert st["kexec.image"] == "unknown"  # advisory: does not decide the exit code alone


def test_618_kallsyms_without_flush_symbols_blocks(tmp_path: Path) -> None:
    report, st = check(tmp_path, tdx_host(kallsyms=["tdx_enable", "tdx_cpu_enable"]))
    assert (report["verdict"], report["exit_code"]) == ("block", 1)
    assert st["kernel.cache_flush"] == "fail"


def test_unreadable_kallsyms_on_a_617_vendor_kernel_is_unknown(tmp_path: Path) -> None:
    spec = tdx_host(release="6.17.0-1012-intel", kallsyms=None)
    spec.extra_files["proc/kallsyms/x"] = ""  # a directory where the file belongs
    report, st = check(tmp_path, spec)
    assert (report["verdict"], report["exit_code"]) == ("block", 3)
    assert st["kernel.cache_flush"] == "unknown" and st["kernel.kexec"] == "pass"


def test_absent_kallsyms_on_618_is_inferred_from_the_release(tmp_path: Path) -> None:
    report, st = check(tmp_path, tdx_host(kallsyms=None))
    assert st["kernel.cache_flush"] == "pass"
    flush = next(c for c in report["checks"] if c["id"] == "kernel.cache_flush")
    assert "inferred from release" in flush["summary"]


def test_vm_of_an_unknown_vmm_is_a_td_when_root_misc_counts_one(tmp_path: Path) -> None:
    vm = VmProc(
        pid=6100,
        cmdline=["/opt/acme/bin/acme-vmm", "--config", "/etc/acme/g1.toml"],
        comm="acme-vmm",
    )
    report, st = check(tmp_path, tdx_host(processes=[vm], misc_current={"tdx": 1}))
    assert (report["verdict"], report["exit_code"]) == ("block", 1)
    [guest] = report["guests"]
    assert guest["kind"] == "td" and guest["name"] == "acme-vmm"
    assert any("fail closed" in e for e in guest["evidence"])
    assert st["guests.td"] == "fail"


def test_amd_epyc_allows_with_tdx_checks_skipped(tmp_path: Path) -> None:
    report, st = check(tmp_path, HostSpec(cpu="amd_epyc", kexec_loaded=1))
    assert (report["verdict"], report["exit_code"]) == ("allow", 0)
    assert all(st[i] == "skip" for i in (*TDX_ONLY, "platform.tdx"))
    assert st["platform.cpu"] == "pass"


def test_msrs_absent_with_the_flag_present_warn(tmp_path: Path) -> None:
    report, st = check(tmp_path, tdx_host(msrs=None))
    assert st["platform.tdx"] == "warn"
    tdx = next(c for c in report["checks"] if c["id"] == "platform.tdx")
    assert "cannot be read" in tdx["summary"] and "modprobe msr" in tdx["remedy"]
    assert report["verdict"] == "allow"  # advisory


def test_msr_directory_in_place_of_the_device_warns(tmp_path: Path) -> None:
    spec = tdx_host(msrs=None)
    for cpu in range(4):
        spec.extra_files[f"dev/cpu/{cpu}/msr/x"] = ""
    _, st = check(tmp_path, spec)
    assert st["platform.tdx"] == "warn"


def test_cpus_disagreeing_on_0x87_warn(tmp_path: Path) -> None:
    spec = tdx_host(msrs_per_cpu={2: {**TDX_MSRS, 0x87: (32 << 32) | 31}})
    report, st = check(tmp_path, spec)
    assert st["platform.tdx"] == "warn"
    tdx = next(c for c in report["checks"] if c["id"] == "platform.tdx")
    assert "disagree" in tdx["summary"] and "0x87" in tdx["summary"]


# -- more rules of the checklist -------------------------------------------------------


def test_load_phase_with_a_td_only_warns(tmp_path: Path) -> None:
    spec = tdx_host(processes=[td_proc()], misc_current={"tdx": 1})
    report, st = check(tmp_path, spec, "load")
    assert st["guests.td"] == "warn" and st["guests.teardown"] == "skip"
    assert st["kexec.image"] == "skip"
    assert (report["verdict"], report["exit_code"]) == ("allow", 0)


def test_crash_phase_ignores_guests_and_needs_a_reservation(tmp_path: Path) -> None:
    spec = tdx_host(processes=[td_proc()], misc_current={"tdx": 1})
    report, st = check(tmp_path, spec, "crash")
    assert st["guests.td"] == "skip" and st["guests.teardown"] == "skip"
    assert st["postkexec.tdx"] == "skip" and st["kexec.image"] == "pass"
    assert (report["verdict"], report["exit_code"]) == ("allow", 0)
    report, st = check(tmp_path / "b", tdx_host(kexec_crash_size=0), "crash")
    assert st["kernel.kexec"] == "fail" and report["exit_code"] == 1


def test_crash_phase_warns_when_a_crash_kernel_is_loaded(tmp_path: Path) -> None:
    _, st = check(tmp_path, tdx_host(kexec_crash_loaded=1), "crash")
    assert st["kexec.image"] == "warn"


def test_exec_without_a_loaded_image_warns(tmp_path: Path) -> None:
    report, st = check(tmp_path, tdx_host(kexec_loaded=0))
    assert st["kexec.image"] == "warn" and st["kernel.kexec"] == "pass"
    assert report["verdict"] == "allow"


def test_no_kexec_on_a_non_tdx_host_is_at_worst_a_warning(tmp_path: Path) -> None:
    report, st = check(tmp_path, HostSpec(kexec_loaded=None))
    assert st["kernel.kexec"] == "warn" and report["exit_code"] == 0


def test_malformed_kexec_sysfs_is_unknown(tmp_path: Path) -> None:
    spec = tdx_host(kexec_loaded=None)
    spec.extra_files["sys/kernel/kexec_loaded"] = "yes\n"
    report, st = check(tmp_path, spec)
    assert st["kernel.kexec"] == "unknown" and report["exit_code"] == 3


def test_teardown_in_progress_fails_without_a_vm(tmp_path: Path) -> None:
    report, st = check(tmp_path, tdx_host(misc_current={"tdx": 2}))
    assert st["guests.teardown"] == "fail" and st["guests.td"] == "fail"
    assert report["exit_code"] == 1


def test_libvirt_td_charged_in_its_scope(tmp_path: Path) -> None:
    pid = 7001
    vm = VmProc(
        pid=pid,
        cmdline=qemu_vm_cmdline("tenant-a"),  # nothing TDX on the command line
        cgroup=libvirt_cgroup("tenant-a"),
        misc_tdx=1,
        misc_cgroup=libvirt_cgroup("tenant-a", leaf="vcpu0"),
    )
    spec = tdx_host(
        processes=[vm], libvirt=[LibvirtDomain("tenant-a", pid)], misc_current={"tdx": 1}
    )
    report, st = check(tmp_path, spec)
    [guest] = report["guests"]
    assert guest["kind"] == "td" and guest["name"] == "tenant-a"
    assert any("launchSecurity type tdx" in e for e in guest["evidence"])
    scope = libvirt_cgroup("tenant-a", leaf=None)
    # Charged in vcpu0, found from the emulator's cgroup by walking up inside the scope.
    assert any(e.startswith("misc.current tdx 1 in cgroup " + scope) for e in guest["evidence"])
    assert st["guests.td"] == "fail"


def test_misc_in_a_shared_ancestor_does_not_mark_a_plain_vm(tmp_path: Path) -> None:
    td = td_proc(pid=8001, cgroup="/machine.slice/td.scope")
    vm = VmProc(pid=8002, cmdline=qemu_vm_cmdline("plain"), cgroup="/machine.slice/plain.scope")
    report, _ = check(tmp_path, tdx_host(processes=[td, vm], misc_current={"tdx": 1}))
    kinds = {g["pid"]: g["kind"] for g in report["guests"]}
    assert kinds == {8001: "td", 8002: "vm"}


def test_json_object_and_cloud_hypervisor_tds(tmp_path: Path) -> None:
    a = VmProc(pid=9001, cmdline=qemu_td_cmdline("tdj", json_object=True), comm="tdj")
    b = VmProc(pid=9002, cmdline=cloud_hypervisor_td_cmdline(), comm="cloud-hyperviso")
    report, _ = check(tmp_path, HostSpec(processes=[a, b]))
    kinds = {g["pid"]: g["kind"] for g in report["guests"]}
    # Command-line evidence marks a TD on any host, TDX in use or not.
    assert kinds == {9001: "td", 9002: "td"}


def test_json_object_spelled_with_escapes_is_still_a_td(tmp_path: Path) -> None:
    """A JSON -object is parsed when it spells tdx-guest or holds an escape: QEMU's JSON
    parser reads `tdx\\u002dguest` as tdx-guest, and so must the classifier. The plain
    VM's JSON -objects (libvirt's secret, memory backend, ...) are not TDs: with one TD
    counted in misc.current and that one identified, it is a vm (had the escaped one been
    missed, both would be td, fail closed)."""
    escaped = '{"qom-type":"tdx\\u002dguest","id":"tdx0"}'
    a = VmProc(pid=9101, cmdline=[*qemu_vm_cmdline("esc"), "-object", escaped], comm="esc")
    b = VmProc(pid=9102, cmdline=qemu_vm_cmdline("plain"), comm="plain")
    report, _ = check(tmp_path, tdx_host(processes=[a, b], misc_current={"tdx": 1}))
    guests = {g["pid"]: g for g in report["guests"]}
    assert guests[9101]["kind"] == "td"
    assert any("JSON form" in e for e in guests[9101]["evidence"])
    assert guests[9102]["kind"] == "vm"


def test_unclassifiable_vm_without_root_misc_is_unknown(tmp_path: Path) -> None:
    vm = VmProc(pid=6200, cmdline=["/opt/acme/bin/acme-vmm"], comm="acme-vmm")
    report, st = check(tmp_path, tdx_host(processes=[vm], misc_current=None))
    assert report["guests"][0]["kind"] == "unknown"
    assert st["guests.td"] == "unknown" and st["guests.teardown"] == "unknown"
    assert (report["verdict"], report["exit_code"]) == ("block", 3)


def test_proc_scan_when_debugfs_is_missing(tmp_path: Path) -> None:
    spec = tdx_host(processes=[td_proc()], misc_current={"tdx": 1}, debugfs_kvm=False)
    report, st = check(tmp_path, spec)
    [guest] = report["guests"]
    assert guest["kind"] == "td" and guest["tid"] is None
    assert any("anon_inode:kvm-vm" in e for e in guest["evidence"])
    assert st["guests.td"] == "fail"


def test_older_log_spelling_and_firmware_sysfs(tmp_path: Path) -> None:
    spec = tdx_host(
        release="6.8.0-1004-intel",
        kvm_intel_tdx=None,
        tdx_host_version=None,
        firmware_tdx={"status": "initialized", "major_version": "1", "minor_version": "5"},
        kmsg=[
            "virt/tdx: BIOS enabled: private KeyID range [64, 128)",
            "virt/tdx: module initialized",
        ],
    )
    report, st = check(tmp_path, spec)
    assert st["tdx.module"] == "pass" and report["host"]["tdx_module"]["version"] == "1.5"
    assert report["host"]["tdx_module"]["state"] == "initialized"


def test_module_loaded_but_not_initialized_warns(tmp_path: Path) -> None:
    spec = tdx_host(
        kvm_intel_tdx=None,
        tdx_host_version=None,
        firmware_tdx={"status": "loaded"},
        kmsg=["virt/tdx: BIOS enabled: private KeyID range [64, 128)"],
    )
    report, st = check(tmp_path, spec)
    assert st["tdx.module"] == "warn" and report["host"]["tdx_module"]["state"] == "not initialized"
    assert st["postkexec.tdx"] == "pass"


def test_module_initialization_failure_warns(tmp_path: Path) -> None:
    spec = tdx_host(
        kvm_intel_tdx="N",
        tdx_host_version=None,
        misc_capacity={},
        misc_current={},
        kmsg=[
            "virt/tdx: BIOS enabled: private KeyID range [64, 128)",
            "virt/tdx: TDX-Module initialization failed (-5)",
        ],
    )
    _, st = check(tmp_path, spec)
    assert st["tdx.module"] == "warn" and st["postkexec.tdx"] == "pass"


def test_malformed_cpuinfo_is_unknown_and_blocks(tmp_path: Path) -> None:
    spec = tdx_host()
    spec.remove.append("proc/cpuinfo")
    spec.extra_files["proc/cpuinfo"] = b"\x00garbage without structure\n"
    report, st = check(tmp_path, spec)
    assert st["platform.cpu"] == "unknown" and st["errata.tdx_pw_mce"] == "unknown"
    assert report["exit_code"] == 3


def test_text_output_names_every_check_and_the_verdict(tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host(processes=[td_proc()], misc_current={"tdx": 1}))
    run = run_cli("check", "--root", str(root))
    assert run.code == 1
    lines = run.stdout.splitlines()
    assert lines[-1].startswith("verdict: BLOCK (exit 1)")
    assert any(line.startswith("FAIL") and "guests.td" in line for line in lines)
    assert any("fix:" in line for line in lines)
    assert "\x1b[" not in run.stdout  # no colour when not on a terminal
