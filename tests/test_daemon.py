"""The daemon as a real process: real uevents from /dev/kvm, its real socket and state file.

Every daemon runs in a private mount namespace without debugfs (tests/daemonproc.py);
the VM-tracking tests run twice, once more with debugfs mounted in that namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import kvm_usable, run_cli
from daemonproc import DaemonProc, debugfs_kvm_names, entries, proc_kvm_vms
from hostbuilder import VmProc, build, qemu_td_cmdline, tdx_host

from tdx_preflight.checks import CHECKS
from tdx_preflight.daemon.client import request

TD_ARGS = (
    "-accel", "kvm",
    "-object", '{"qom-type":"tdx-guest","id":"tdx0"}',
    "-machine", "q35,confidential-guest-support=tdx0",
    "-name", "td,process=td-d,debug-threads=on",
)  # fmt: skip
VM_ARGS = ("-accel", "kvm", "-name", "guest=plain-d,debug-threads=on")

needs_kvm = pytest.mark.skipif(kvm_usable() is not None, reason=str(kvm_usable()))
#: VM tracking is proven without debugfs (the common case) and with it.
both_views = pytest.mark.parametrize("debugfs", [False, True], ids=["no-debugfs", "debugfs"])


@pytest.fixture
def daemon() -> Iterator[Any]:
    started: list[DaemonProc] = []

    def start(root: str | None = None, debugfs: bool = False, **config: Any) -> DaemonProc:
        d = DaemonProc(root, debugfs=debugfs, **config)
        started.append(d)
        return d

    yield start
    for d in started:
        d.cleanup()


def all_live(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for kind in ("tds", "vms", "unknown") for e in status["live"][kind]]


def test_daemon_runs_without_debugfs_whatever_the_machine_mounts(daemon) -> None:
    d = daemon()
    st = d.status()
    assert st["last_reconcile"]["method"] == "proc"
    assert "debugfs" not in st["last_reconcile"]["method"]


@needs_kvm
@both_views
def test_td_and_vm_lifecycle_through_events(daemon, kvm_holder, debugfs: bool) -> None:
    d = daemon(debugfs=debugfs)
    assert d.status()["last_reconcile"]["method"] == ("debugfs+proc" if debugfs else "proc")
    st = d.status()
    assert st["root"] == "/" and st["verdict"] in ("allow", "block")
    td = kvm_holder(*TD_ARGS)
    vm = kvm_holder(*VM_ARGS)
    # Each VM shows with its descriptor (read from /proc when debugfs is absent).
    st = d.wait_for(
        lambda s: (
            [e["vm_fd"] for e in entries(s, td.pid)] == td.fds
            and [e["vm_fd"] for e in entries(s, vm.pid)] == vm.fds
        )
    )
    [t] = entries(st, td.pid)
    [v] = entries(st, vm.pid)
    assert (t["kind"], t["name"], t["created_by"]) == ("td", "td", "event")
    assert t["tid"] == td.pid and t["vm_fd"] == td.fds[0] and t["destroyed_at"] is None
    assert any("tdx-guest" in e for e in t["evidence"])
    assert (v["kind"], v["name"]) == ("vm", "plain-d")
    assert "TD guest" in st["status_line"]
    # state.json follows (written atomically after the change).
    state = json.loads(Path(d.state_file).read_text())
    deadline = time.monotonic() + 5
    while not any(e["pid"] == td.pid for e in state["ledger"]["live"]):
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
        state = json.loads(Path(d.state_file).read_text())
    assert state["schema"] == 1 and state["pid"] == d.proc.pid and state["boot_id"]
    assert state["report"]["schema"] == 1
    # The ledger op names the live TD for guests.teardown.
    ledger = d.request({"op": "ledger"})
    assert ledger is not None and any("td (pid" in x for x in ledger["tds_not_destroyed"])

    td.close_vms()
    st = d.wait_for(lambda s: not entries(s, td.pid))
    [gone] = [e for e in st["recent_tds"] if e["pid"] == td.pid]
    assert gone["destroyed_by"] == "event" and gone["destroyed_at"]
    assert gone["teardown"] in ("pending", "confirmed") or gone["teardown"].startswith("unconf")

    def settled(s: dict[str, Any]) -> bool:
        return all(e["teardown"] != "pending" for e in s["recent_tds"] if e["pid"] == td.pid)

    st = d.wait_for(settled)
    [gone] = [e for e in st["recent_tds"] if e["pid"] == td.pid]
    # Without a misc cgroup (this machine) the teardown cannot be confirmed, and says why.
    misc = Path("/sys/fs/cgroup/misc.current")
    if misc.exists() and "tdx" in misc.read_text():
        assert gone["teardown"] == "confirmed"
    else:
        assert gone["teardown"].startswith("unconfirmable: root misc.current")
    assert entries(st, vm.pid)  # the plain VM is still there
    assert st["resyncs"] == 0
    note = d.drain_notes()
    assert any(n.startswith("STATUS=") for n in note)


@needs_kvm
@both_views
def test_vm_created_by_a_thread_is_keyed_by_tid_and_mapped_to_its_process(
    daemon, kvm_holder, debugfs: bool
) -> None:
    d = daemon(debugfs=debugfs)
    h = kvm_holder(*TD_ARGS, thread=True, hold_thread=True)
    assert h.tid != h.pid
    st = d.wait_for(lambda s: any(e["vm_fd"] == h.fds[0] for e in entries(s, h.pid)))
    [e] = entries(st, h.pid)
    assert (e["tid"], e["kind"], e["created_by"]) == (h.tid, "td", "event")
    h.close_vms()
    st = d.wait_for(lambda s: not entries(s, h.pid))
    [gone] = [x for x in st["recent_tds"] if x["pid"] == h.pid]
    assert gone["destroyed_by"] == "event" and st["reconciles"] == 1


@needs_kvm
@both_views
def test_vm_from_an_exited_thread_is_found_without_help(daemon, kvm_holder, debugfs) -> None:
    d = daemon(debugfs=debugfs)
    h = kvm_holder(*VM_ARGS, thread=True)  # the creating thread exits at once
    # No SIGHUP: when the thread cannot be mapped to its process, the daemon scans.
    st = d.wait_for(lambda s: any(e["vm_fd"] == h.fds[0] for e in entries(s, h.pid)))
    [e] = entries(st, h.pid)
    assert (e["tid"], e["kind"], e["name"]) == (h.tid, "vm", "plain-d")
    assert len(all_live(st)) == len(proc_kvm_vms())


@needs_kvm
@both_views
def test_vms_alive_before_start_are_seen_by_reconcile(daemon, kvm_holder, debugfs) -> None:
    h = kvm_holder(*TD_ARGS, count=2)
    d = daemon(debugfs=debugfs)
    st = d.status()
    found = entries(st, h.pid)
    assert sorted(e["vm_fd"] for e in found) == sorted(h.fds)
    assert all(
        e["created_by"] == "reconcile" and "seen by reconcile" in e["evidence"] for e in found
    )
    h.close_vms()
    st = d.wait_for(lambda s: not entries(s, h.pid))
    assert {e["destroyed_by"] for e in st["recent_tds"] if e["pid"] == h.pid} == {"event"}
    assert st["reconciles"] == 1  # the events alone kept the ledger right


@needs_kvm
@both_views
def test_a_destroy_event_removes_exactly_that_vm_not_a_neighbour(
    daemon, kvm_holder, debugfs
) -> None:
    h = kvm_holder(*TD_ARGS, count=3)  # found by the first reconcile, not by events
    d = daemon(debugfs=debugfs)
    assert sorted(e["vm_fd"] for e in entries(d.status(), h.pid)) == sorted(h.fds)
    middle = sorted(h.fds)[1]
    h.close_vm(middle)
    st = d.wait_for(lambda s: len(entries(s, h.pid)) == 2)
    assert sorted(e["vm_fd"] for e in entries(st, h.pid)) == sorted(h.fds)
    [gone] = [e for e in st["recent_tds"] if e["pid"] == h.pid]
    assert (gone["vm_fd"], gone["destroyed_by"]) == (middle, "event")
    # A VM made afterwards by the same process is told apart from its neighbours too.
    [new] = h.burst(1, 1)
    st = d.wait_for(lambda s: any(e["vm_fd"] == new for e in entries(s, h.pid)))
    assert sorted(e["vm_fd"] for e in entries(st, h.pid)) == sorted(h.fds)
    h.close_vm(new)
    st = d.wait_for(lambda s: len(entries(s, h.pid)) == 2)
    assert sorted(e["vm_fd"] for e in entries(st, h.pid)) == sorted(h.fds)
    assert st["reconciles"] == 1 and st["resyncs"] == 0


@needs_kvm
@both_views
def test_burst_through_a_small_buffer_ends_with_the_kernels_truth(
    daemon, kvm_holder, debugfs
) -> None:
    # 1,000 creates and 990 destroys through a 4 KiB buffer: the kernel may or may
    # not drop events. Either way the ledger must end equal to the kernel's VMs.
    d = daemon(debugfs=debugfs, uevent_rcvbuf=4096)
    h = kvm_holder(*VM_ARGS, count=0)
    kept = h.burst(1000, 10)

    def settled(s: dict[str, Any]) -> bool:
        return {(e["pid"], e["vm_fd"]) for e in all_live(s)} == proc_kvm_vms()

    st = d.wait_for(settled, timeout=30)
    assert sorted(e["vm_fd"] for e in entries(st, h.pid)) == sorted(kept)
    if debugfs:
        assert {f"{e['tid']}-{e['vm_fd']}" for e in all_live(st)} == debugfs_kvm_names()
    # Lost events are always noticed and logged: no resync without its log line.
    assert (st["resyncs"] >= 1) == ("uevents lost" in d.log())
    print(f"burst with debugfs={debugfs}: {st['resyncs']} resyncs, {st['events']} events")


def test_control_socket_refuses_bad_requests_and_keeps_serving(daemon) -> None:
    d = daemon()
    mode = os.stat(d.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660

    def raw(payload: bytes, timeout: float = 5) -> tuple[bytes, bool]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(d.socket)
            # The daemon stops reading at 64 KiB; its reply is still queued for us.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(payload)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return data, True  # the daemon closed the connection
                data += chunk

    for payload, words in [
        (b"{not json\n", "invalid JSON"),
        (b'{"op": "reboot"}\n', "unknown op"),
        (b"[1, 2]\n", "JSON object"),
        (b"x" * (70 * 1024) + b"\n", "64 KiB"),
        (b'{"op": "check", "phase": "later"}\n', "unknown phase"),
    ]:
        data, closed = raw(payload)
        reply = json.loads(data)
        assert reply["ok"] is False and words in reply["error"] and closed
    # 10 MiB without a newline: error reply, connection closed, memory bounded.
    data, closed = raw(b"y" * (10 * 1024 * 1024))
    assert json.loads(data)["ok"] is False and closed
    # A client that sends nothing is dropped after client_timeout (1 s here).
    start = time.monotonic()
    data, closed = raw(b"", timeout=10)
    assert closed and data == b"" and time.monotonic() - start < 5
    # Several requests on one connection, and the daemon still answers everyone.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(d.socket)
        s.sendall(b'{"op":"status"}\n{"op":"ledger"}\n')
        f = s.makefile("rb")
        assert json.loads(f.readline())["op"] == "status"
        assert json.loads(f.readline())["op"] == "ledger"
    assert "op=status from uid=0" in d.log()
    assert d.status()["ok"]


def test_many_clients_at_once(daemon) -> None:
    d = daemon()
    socks = []
    for _ in range(200):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(d.socket)
        socks.append(s)
    for s in socks:
        s.sendall(b'{"op":"status"}\n')
    for s in socks:
        s.settimeout(10)
        assert json.loads(s.makefile("rb").readline())["ok"]
        s.close()


def test_check_op_reads_the_host_again(daemon) -> None:
    d = daemon()
    reply = d.request({"op": "check", "phase": "crash"})
    assert reply is not None and reply["ok"]
    assert reply["report"]["phase"] == "crash" and len(reply["report"]["checks"]) == len(CHECKS)


def test_sighup_with_an_invalid_config_keeps_the_old_one(daemon) -> None:
    d = daemon()
    d.write_config({**d.config, "bogus_key": 1})
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "invalid configuration" not in d.log():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)
    assert d.proc.poll() is None and d.status()["ok"]
    d.write_config({**d.config, "block_on_warn": ["kernel.kexec"]})
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while f"reload: configuration {d.config_path} loaded" not in d.log():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)
    assert d.proc.poll() is None


def test_fixture_root_misc_cgroup_path_and_teardown_confirmation(daemon, tmp_path: Path) -> None:
    td = VmProc(
        pid=4242,
        cmdline=qemu_td_cmdline("td1"),
        comm="td1",
        misc_tdx=1,
        cgroup="/machine.slice/td1.scope",
    )
    root = build(tmp_path / "root", tdx_host(processes=[td], misc_current={"tdx": 1}))
    d = daemon(root=str(root))
    st = d.status()
    [e] = entries(st, 4242)
    assert (e["kind"], e["created_by"], e["name"]) == ("td", "reconcile", "td1")
    assert any("misc.current tdx 1" in x for x in e["evidence"])
    assert st["verdict"] == "block" and st["exit_code"] == 1
    # `check` on the same root takes the daemon's ledger; the JSON says so.
    run = run_cli("check", "--root", str(root), "--config", str(d.config_path), "--format", "json")
    report = run.json()
    assert run.code == 1 and report["daemon"]["answered"] is True
    assert report["daemon"]["tds_not_destroyed"] == ["td1 (pid 4242)"]
    text = run_cli("check", "--root", str(root), "--config", str(d.config_path)).stdout
    assert "TD ledger: from the daemon" in text
    # The TD goes away: its debugfs directory, its VM and vCPU descriptors (a vCPU fd
    # alone keeps a VM alive), then its KeyID.
    shutil.rmtree(root / "sys/kernel/debug/kvm/4242-12")
    for link in (root / "proc/4242/fd").iterdir():
        if os.readlink(link).startswith("anon_inode:kvm-"):
            link.unlink()
    d.signal(signal.SIGHUP)
    st = d.wait_for(lambda s: not entries(s, 4242))
    [gone] = [x for x in st["recent_tds"] if x["pid"] == 4242]
    assert gone["destroyed_by"] == "reconcile" and gone["teardown"] == "pending"
    (root / "sys/fs/cgroup/misc.current").write_text("tdx 0\n")
    (root / "sys/fs/cgroup/machine.slice/td1.scope/misc.current").write_text("tdx 0\n")
    d.signal(signal.SIGHUP)
    st = d.wait_for(lambda s: any(x["teardown"] == "confirmed" for x in s["recent_tds"]))
    # The refresh that re-reads misc.current follows the confirmation.
    st = d.wait_for(lambda s: s["verdict"] == "allow")
    assert st["exit_code"] == 0
    # status from the CLI, text and JSON, with the daemon's exit code.
    run = run_cli("status", "--config", str(d.config_path), "--format", "json")
    assert run.code == 0 and run.json()["verdict"] == "allow"
    text = run_cli("status", "--config", str(d.config_path))
    assert "recent TD lifecycles" in text.stdout and "teardown confirmed" in text.stdout
    # Without a daemon: status exits 4; check runs alone and says so.
    d.stop()
    run = run_cli("status", "--config", str(d.config_path))
    assert run.code == 4 and "no daemon answers" in run.stderr
    report = run_cli(
        "check", "--root", str(root), "--config", str(d.config_path), "--format", "json"
    ).json()
    assert report["daemon"]["answered"] is False


def test_status_falls_back_to_a_fresh_state_file(daemon, tmp_path: Path) -> None:
    d = daemon()
    os.rename(d.socket, d.socket + ".away")  # the daemon lives, its socket is unreachable
    run = run_cli("status", "--config", str(d.config_path), "--format", "json")
    assert run.code in (0, 1, 3) and "state file" in run.json()["source"]
    os.rename(d.socket + ".away", d.socket)


def test_ready_comes_after_the_first_reconcile(daemon) -> None:
    d = daemon()
    ready = d.wait_notify("READY=1")
    assert "STATUS=" in ready
    assert d.status()["reconciles"] >= 1
    assert request(d.socket + ".nope", {"op": "status"}) is None
