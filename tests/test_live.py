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
    td = kvm_holder(*TD_ARGS)
    plain = kvm_holder(*VM_ARGS)
    listed = run_cli("guests", "--format", "json").json()["guests"]
    [g_td] = _by_pid(listed, td.pid)
    assert g_td["kind"] == "td"
    assert g_td["name"] == "td-live"
    assert g_td["vm_fd"] == td.fds[0]
    assert any("tdx-guest" in e for e in g_td["evidence"])
    [g_vm] = _by_pid(listed, plain.pid)
    assert g_vm["kind"] == "vm" and g_vm["name"] == "plain-live"

    report = run_cli("check", "--format", "json").json()
    assert {g["pid"] for g in report["guests"]} >= {td.pid, plain.pid}
    assert statuses(report)["guests.vm"] == "warn"
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
