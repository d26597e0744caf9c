"""The real machine: the CLI on the live host, and real KVM VMs through /dev/kvm."""

from __future__ import annotations

from conftest import run_cli, statuses

from tdx_preflight.checks import CHECKS

TD_ARGS = (
    "-accel",
    "kvm",
    "-machine",
    "q35,kernel_irqchip=split,confidential-guest-support=tdx0",
    "-object",
    "tdx-guest,id=tdx0",
    "-name",
    "td-live,process=td-live,debug-threads=on",
)
VM_ARGS = ("-accel", "kvm", "-name", "guest=plain-live,debug-threads=on")


def _by_pid(guests: list[dict], pid: int) -> list[dict]:
    return [g for g in guests if g["pid"] == pid]


def test_check_on_this_machine_prints_a_report_and_exits_0() -> None:
    run = run_cli("check")
    assert run.code == 0, run.stdout + run.stderr
    assert "verdict: ALLOW" in run.stdout
    report = run_cli("check", "--format", "json").json()
    assert report["schema"] == 1
    assert report["verdict"] == "allow" and report["exit_code"] == 0
    assert len(report["checks"]) == len(CHECKS)
    assert statuses(report)["platform.cpu"] == "pass"


def test_live_td_is_seen_by_guests_and_check_then_gone(kvm_holder) -> None:
    plain = kvm_holder(*VM_ARGS)
    [g_vm] = _by_pid(run_cli("guests", "--format", "json").json()["guests"], plain.pid)
    assert g_vm["kind"] == "vm" and g_vm["name"] == "plain-live"
    assert statuses(run_cli("check", "--format", "json").json())["guests.vm"] == "warn"
    # A TD found on positive evidence puts TDX in use (rules v2): from then on a VM
    # without evidence is classified by the root misc count (step 3).
    td = kvm_holder(*TD_ARGS)
    listed = run_cli("guests", "--format", "json").json()["guests"]
    [g_td] = _by_pid(listed, td.pid)
    assert g_td["kind"] == "td"
    assert g_td["name"] == "td-live"
    assert g_td["vm_fd"] == td.fds[0]
    assert any("tdx-guest" in e for e in g_td["evidence"])
    assert _by_pid(listed, plain.pid)

    report = run_cli("check", "--format", "json").json()
    assert {g["pid"] for g in report["guests"]} >= {td.pid, plain.pid}
    assert statuses(report)["guests.td"] == "fail"
    text = run_cli("guests").stdout
    assert "td-live" in text and "plain-live" in text

    td.close_vms()
    plain.close_vms()
    listed = run_cli("guests", "--format", "json").json()["guests"]
    assert not _by_pid(listed, td.pid) and not _by_pid(listed, plain.pid)


def test_vm_created_by_a_thread_maps_to_its_process(kvm_holder) -> None:
    h = kvm_holder(*TD_ARGS, thread=True, count=2)
    assert h.tid != h.pid
    listed = _by_pid(run_cli("guests", "--format", "json").json()["guests"], h.pid)
    assert sorted(g["vm_fd"] for g in listed) == sorted(h.fds)
    assert all(g["kind"] == "td" for g in listed)
    # debugfs names the creating thread; the /proc scan cannot know it.
    assert {g["tid"] for g in listed} <= {h.tid, None}


def _without_debugfs() -> dict:
    """`tdx-preflight guests --format json` on the live root in a mount namespace without
    debugfs, so VMs can only be found through /proc (tests/daemonproc.py's namespace)."""
    import json
    import subprocess

    from conftest import console_script
    from daemonproc import in_mount_namespace

    cmd = in_mount_namespace([console_script(), "guests", "--format", "json"], debugfs=False)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode in (0, 3), out.stderr
    data = json.loads(out.stdout)
    assert data["enumeration"]["method"] == "proc", data["enumeration"]
    return data


def _guests_without_debugfs() -> list[dict]:
    return _without_debugfs()["guests"]


def test_a_vm_whose_fd_closed_lives_on_through_its_vcpus(kvm_holder) -> None:
    h = kvm_holder(*VM_ARGS)
    [vm_fd] = h.fds
    vcpus = h.command(f"vcpus {vm_fd} 2")["vcpus"]
    assert len(vcpus) == 2
    h.close_vm(vm_fd)  # the VM lives on: its vCPU fds hold a reference
    [g] = _by_pid(_guests_without_debugfs(), h.pid)
    assert g["held_by"] == "kvm-vcpu fds only" and g["vm_fd"] in vcpus
    assert g["kind"] == "vm" and g["name"] == "plain-live"
    # Also with debugfs, when it is there: one VM, never two.
    listed = _by_pid(run_cli("guests", "--format", "json").json()["guests"], h.pid)
    assert len(listed) == 1
    h.command("close-vcpus")
    assert not _by_pid(_guests_without_debugfs(), h.pid)


def test_statistics_descriptors_hold_their_vm_and_name_none(kvm_holder) -> None:
    """QEMU 8.1 and later keeps a statistics descriptor per vCPU (KVM_GET_STATS_FD:
    anon_inode:kvm-vcpu-stats:N; kvm-vm-stats for a VM). Beside the VM's own descriptors
    they add no VM and leave the process read in full. Held alone they keep the VM
    alive with nothing to name it: the process is unseen (enumeration incomplete),
    never a process without VMs."""
    h = kvm_holder(*VM_ARGS)
    [vm_fd] = h.fds
    vcpus = h.command(f"vcpus {vm_fd} 2")["vcpus"]
    stats = [h.command(f"stats {fd}")["stats"] for fd in (*vcpus, vm_fd)]
    data = _without_debugfs()
    [g] = _by_pid(data["guests"], h.pid)
    assert g["vm_fd"] == vm_fd and g["held_by"] == "kvm-vm fd" and g["name"] == "plain-live"
    assert h.pid not in data["enumeration"]["unseen"], data["enumeration"]
    for fd in (vm_fd, *vcpus):
        h.command(f"close {fd}")
    h.fds = []
    data = _without_debugfs()
    assert not _by_pid(data["guests"], h.pid)
    assert h.pid in data["enumeration"]["unseen"] and not data["enumeration"]["complete"]
    for fd in stats:
        h.command(f"close {fd}")
    data = _without_debugfs()
    assert not _by_pid(data["guests"], h.pid)
    assert h.pid not in data["enumeration"]["unseen"], data["enumeration"]
