"""The daemon as a real process: real uevents from /dev/kvm, its real socket and state file.

Every daemon runs in a private mount namespace without debugfs (tests/daemonproc.py);
the VM-tracking tests run twice, once more with debugfs mounted in that namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
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
from hostbuilder import VmProc, build, tdx_host

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
    st = d.wait_for(
        lambda s: any(e["vm_fd"] == h.fds[0] and e["kind"] != "unknown" for e in entries(s, h.pid))
    )
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


def _wait_log(d: Any, words: str, count: int = 1) -> None:
    deadline = time.monotonic() + 10
    while d.log().count(words) < count:
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)


def _blocking(d: Any, check_id: str) -> bool:
    reply = d.request({"op": "check", "phase": "exec"})
    assert reply is not None and reply["ok"], reply
    return next(c["blocking"] for c in reply["report"]["checks"] if c["id"] == check_id)


def test_sighup_with_an_invalid_config_keeps_the_old_one(daemon) -> None:
    d = daemon()
    assert _blocking(d, "guests.vm") is False
    d.write_config({**d.config, "blocking": {"guests.vm": ["exec"]}, "bogus_key": 1})
    d.signal(signal.SIGHUP)
    _wait_log(d, "invalid configuration")
    assert d.proc.poll() is None and _blocking(d, "guests.vm") is False
    d.write_config({**d.config, "blocking": {"guests.vm": ["exec"]}})
    d.signal(signal.SIGHUP)
    _wait_log(d, f"reload: configuration {d.config_path} loaded")
    assert d.proc.poll() is None and _blocking(d, "guests.vm") is True


def _dropped_after(path: str, limit: float) -> float:
    """Seconds until the daemon drops a client that sends nothing (at most `limit`)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.settimeout(limit)
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            assert s.recv(1) == b""
        return time.monotonic() - started


def test_sighup_applies_every_reloadable_setting(daemon) -> None:
    d = daemon(client_timeout=30, reconcile_interval=0)
    assert _dropped_after(d.socket, 1.5) >= 1.5  # held: the timeout is 30 s
    before = d.status()["reconciles"]
    d.write_config(
        {
            **d.config,
            "client_timeout": 0.3,
            "reconcile_interval": 0.5,
            "control_socket": d.socket + ".new",
        }
    )
    d.signal(signal.SIGHUP)
    _wait_log(d, "reload: configuration")
    # The control server takes the new timeout, and the timer the daemon started without runs.
    assert _dropped_after(d.socket, 5) < 3
    st = d.wait_for(
        lambda s: s["reconciles"] >= before + 3 and s["last_reconcile"]["why"] == "timer"
    )
    assert st["ok"]
    log = d.log()
    assert "reload: control_socket change only with a restart" in log
    assert "applied: reconcile_interval, client_timeout" in log
    assert not os.path.exists(d.socket + ".new")


def test_check_and_status_take_the_daemons_view_and_say_so(daemon) -> None:
    d = daemon()
    run = run_cli("check", "--config", str(d.config_path), "--format", "json")
    report = run.json()
    assert report["daemon"]["answered"] is True and report["daemon"]["pid"] == d.proc.pid
    text = run_cli("check", "--config", str(d.config_path)).stdout
    assert f"TD ledger: from the daemon (pid {d.proc.pid})" in text
    st = run_cli("status", "--config", str(d.config_path), "--format", "json")
    assert st.code == run.code and st.json()["daemon_pid"] == d.proc.pid
    assert "control socket" in st.json()["source"]
    # Without a daemon: status exits 4 (JSON says so on stdout); check runs alone.
    d.stop()
    gone = run_cli("status", "--config", str(d.config_path), "--format", "json")
    assert gone.code == 4 and "no daemon answers" in gone.stderr
    assert gone.json()["daemon"] is None and gone.json()["exit_code"] == 4
    alone = run_cli("check", "--config", str(d.config_path), "--format", "json")
    assert alone.json()["daemon"]["answered"] is False
    assert alone.code == run.code  # the same host, the same verdict


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


def test_status_reports_the_daemons_own_health(daemon) -> None:
    d = daemon()
    health = d.status()["health"]
    assert health["rss_bytes"] > 10 * 2**20 and health["open_fds"] >= 4
    assert health["threads"] >= 1 and 0 <= health["cpu_seconds"] < 60
    text = run_cli("status", "--config", str(d.config_path)).stdout
    assert "daemon health: CPU" in text and "open fds" in text


@needs_kvm
def test_guests_verbose_shows_each_vm_process_uptime_and_rss(kvm_holder, tmp_path) -> None:
    h = kvm_holder(*VM_ARGS)
    text = run_cli("guests", "-v").stdout
    [line] = [ln for ln in text.splitlines() if "plain-d" in ln]
    after = text.splitlines()[text.splitlines().index(line) + 1]
    assert after.strip().startswith("process: up") and "MiB" in after
    data = run_cli("guests", "--format", "json").json()
    [g] = [g for g in data["guests"] if g["pid"] == h.pid]
    assert g["process"]["rss_bytes"] > 2**20 and g["process"]["uptime_s"] >= 0
    # A fixture host has no running processes to ask.
    root = build(tmp_path / "root", tdx_host(processes=[VmProc(pid=4242, cmdline=("qemu",))]))
    fixture = run_cli("guests", "--root", str(root), "--format", "json").json()
    assert [g["process"] for g in fixture["guests"]] == [None]
