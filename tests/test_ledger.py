"""The VM ledger's identity rules, where real uevents on this machine cannot reach.

The kernel here gives every uevent a STATS_PATH (debugfs dentries exist even when
debugfs is not mounted), so the daemon tests never see a create or destroy event
without the VM's descriptor. Kernels booted with `debugfs=off`, and a VM whose
debugfs name was taken (KVM logs "duplicate directory"), send events without it:
these cases feed the ledger such events directly, with what /proc would show.
"""

from __future__ import annotations

from tdx_preflight.daemon.ledger import VmLedger
from tdx_preflight.host import Problem
from tdx_preflight.readers.kvm import VmHandle

PID = 4000


def proc_handle(fd: int, pid: int = PID) -> VmHandle:
    return VmHandle(None, fd, pid, f"/proc/{pid}/fd/{fd} -> anon_inode:kvm-vm")


def found_by_proc(*fds: int) -> VmLedger:
    ledger = VmLedger()
    ledger.reconcile([proc_handle(fd) for fd in fds], "proc")
    return ledger


def live(ledger: VmLedger) -> list[tuple[int | None, int | None, int | None]]:
    return sorted((e.tid, e.pid, e.vm_fd) for e in ledger.live)


def fds_now(*fds: int):
    return lambda pid, fresh: frozenset(fds) if pid == PID else None


def test_a_destroy_without_descriptor_removes_the_vm_whose_descriptor_is_gone() -> None:
    ledger = found_by_proc(4, 5, 6)
    gone = ledger.event_destroy(PID, PID, None, count=2, fds_of=fds_now(4, 6))
    assert gone is not None and (gone.vm_fd, gone.destroyed_by) == (5, "event")
    assert live(ledger) == [(None, PID, 4), (None, PID, 6)]


def test_a_destroy_that_names_no_gone_descriptor_removes_nothing() -> None:
    ledger = found_by_proc(4, 5)
    # Both descriptors still open (say, one number was reused at once): ambiguous.
    assert ledger.event_destroy(PID, PID, None, count=1, fds_of=fds_now(4, 5)) is None
    assert live(ledger) == [(None, PID, 4), (None, PID, 5)]


def test_a_destroy_that_two_gone_descriptors_could_explain_removes_nothing() -> None:
    """VM 4's kvm-vm descriptor closed earlier, but its vCPU or statistics descriptors
    (QEMU 8.1+ holds kvm-vcpu-stats per vCPU) keep it alive; VM 5 is the one destroyed.
    Both numbers are gone from the process: taking the first would drop a live VM."""
    ledger = found_by_proc(4, 5, 6)
    assert ledger.event_destroy(PID, PID, None, count=2, fds_of=fds_now(6)) is None
    assert live(ledger) == [(None, PID, 4), (None, PID, 5), (None, PID, 6)]


def test_a_destroy_already_applied_by_a_reconcile_removes_nothing() -> None:
    ledger = found_by_proc(4)
    # The kernel counts 1 VM after this destroy; the ledger already holds only 1.
    assert ledger.event_destroy(PID, PID, None, count=1, fds_of=fds_now()) is None
    assert live(ledger) == [(None, PID, 4)]


def test_a_destroy_from_another_thread_never_takes_a_vm_that_thread_did_not_make() -> None:
    ledger = VmLedger()
    ledger.event_create(PID + 1, PID, 4, count=1, serial=1, fds=None)
    ledger.event_create(PID + 2, PID, 5, count=2, serial=2, fds=None)
    gone = ledger.event_destroy(PID + 2, PID, None, count=1, fds_of=fds_now())
    assert gone is not None and gone.tid == PID + 2
    assert live(ledger) == [(PID + 1, PID, 4)]


def test_a_destroy_when_the_process_has_gone_takes_its_vm() -> None:
    ledger = found_by_proc(4)
    gone = ledger.event_destroy(PID, PID, None, count=0, fds_of=lambda pid, fresh: None)
    assert gone is not None and ledger.live == []


def test_a_create_without_descriptor_takes_the_unclaimed_one() -> None:
    ledger = found_by_proc(4)
    entry, new = ledger.event_create(PID, PID, None, count=2, serial=9, fds=frozenset({4, 7}))
    assert new and (entry.vm_fd, entry.serial, entry.created_by) == (7, 9, "event")


def test_a_create_already_seen_by_a_reconcile_is_adopted_not_added_twice() -> None:
    ledger = found_by_proc(4, 7)  # the reconcile ran while the event was queued
    entry, new = ledger.event_create(PID, PID, None, count=2, serial=9, fds=frozenset({4, 7}))
    assert not new and entry.serial == 9 and entry.tid == PID
    assert len(ledger.live) == 2


def test_a_create_whose_descriptor_is_not_installed_yet_is_filled_later() -> None:
    ledger = found_by_proc(4)
    entry, new = ledger.event_create(PID, PID, None, count=2, serial=9, fds=frozenset({4}))
    assert new and entry.vm_fd is None and ledger.wanting_fds() == {PID}
    assert ledger.fill_fds(PID, frozenset({4, 8})) == 1 and entry.vm_fd == 8
    assert ledger.wanting_fds() == set()


def test_a_vm_whose_creating_thread_exited_is_paired_with_its_descriptor() -> None:
    ledger = VmLedger()
    # The event came with TID-FD, but the thread had gone: no process yet.
    ledger.event_create(4321, None, 5, count=1, serial=1, fds=None)
    ledger.reconcile([proc_handle(5)], "proc")
    assert live(ledger) == [(4321, PID, 5)]
    assert ledger.live[0].created_by == "event"


def test_an_incomplete_enumeration_removes_nothing() -> None:
    ledger = found_by_proc(4, 5)
    added, removed, _ = ledger.reconcile([proc_handle(4)], "proc", complete=False)
    assert (added, removed) == (0, 0) and len(ledger.live) == 2
    added, removed, _ = ledger.reconcile([proc_handle(4)], "proc")
    assert (added, removed) == (0, 1) and live(ledger) == [(None, PID, 4)]


def test_a_reused_descriptor_of_another_thread_is_another_vm() -> None:
    ledger = VmLedger()
    ledger.event_create(PID + 1, PID, 4, count=1, serial=1, fds=None)
    # debugfs names TID-FD: the same fd number made by another thread is not that VM.
    ledger.reconcile([VmHandle(PID + 2, 4, PID, "debugfs kvm/4002-4")], "debugfs")
    assert live(ledger) == [(PID + 2, PID, 4)]
    assert ledger.history[-1].tid == PID + 1


def test_teardown_unconfirmable_names_the_reason() -> None:
    ledger = VmLedger()
    entry, _ = ledger.event_create(PID, PID, 4, count=1, serial=1, fds=None)
    entry.kind = "td"
    ledger.event_destroy(PID, PID, 4, count=0, fds_of=fds_now())
    problem = Problem("absent", "/sys/fs/cgroup/misc.current", "does not exist")
    assert ledger.confirm_teardowns(problem) == []
    assert entry.teardown == "unconfirmable: root misc.current does not exist"


# -- VMs held by vCPU descriptors alone ------------------------------------------------


def vcpu_handle(fd: int, pid: int = PID) -> VmHandle:
    return VmHandle(None, fd, pid, f"/proc/{pid}/fd/{fd} -> kvm-vcpu, no kvm-vm fd left", True)


def test_a_vm_whose_fd_closed_stays_one_live_vm_when_vcpus_hold_it() -> None:
    ledger = found_by_proc(4, 5)
    [td] = [e for e in ledger.live if e.vm_fd == 4]
    td.kind = "td"
    # fd 4 closed; its vCPU fd 9 keeps the VM alive: the TD is renamed, not destroyed.
    assert ledger.reconcile([vcpu_handle(9), proc_handle(5)], "proc") == (0, 0, 0)
    assert live(ledger) == [(None, PID, 5), (None, PID, 9)]
    assert td.vcpu_only and td.vm_fd == 9 and td.kind == "td" and td.alive
    assert [e.label() for e in ledger.live_tds()] == [td.label()]
    assert list(ledger.history) == []


def test_a_destroy_without_descriptor_never_takes_a_vcpu_held_vm() -> None:
    ledger = VmLedger()
    ledger.reconcile([vcpu_handle(9), proc_handle(5)], "proc")
    # VM 5's descriptor is gone; the vCPU-held VM has no kvm-vm fd either, and stays.
    gone = ledger.event_destroy(PID, PID, None, count=1, fds_of=fds_now())
    assert gone is not None and gone.vm_fd == 5
    assert live(ledger) == [(None, PID, 9)]


def test_classification_reaches_a_vcpu_held_vm() -> None:
    from tdx_preflight.readers.vmclass import Guest

    ledger = VmLedger()
    ledger.reconcile([vcpu_handle(9)], "proc")
    g = Guest(PID, None, 9, "td", "td1", ("misc.current tdx 1",), vcpu_only=True)
    assert ledger.classify([g]) is True
    [e] = ledger.live
    assert (e.kind, e.name, e.to_json()["vcpu_only"]) == ("td", "td1", True)
    assert ledger.view().tds_not_destroyed == ("td1 (pid 4000)",)


def test_an_incomplete_enumeration_removes_only_vms_of_processes_it_read() -> None:
    ledger = found_by_proc(4)
    other = ledger.reconcile([proc_handle(4), proc_handle(7, pid=PID + 1)], "proc")
    assert other == (1, 0, 0)
    # PID+1's descriptors could not be read this time: its VM stays; PID's VM 4 is gone.
    added, removed, _ = ledger.reconcile([], "proc", complete=False, unseen=frozenset({PID + 1}))
    assert (added, removed) == (0, 1) and live(ledger) == [(None, PID + 1, 7)]
    # A gap with no bounds removes nothing.
    assert ledger.reconcile([], "proc", complete=False, unseen=None)[1] == 0
