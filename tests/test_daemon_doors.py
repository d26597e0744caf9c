"""Doors into the daemon and its readers (issue classes: waits, status trust, one daemon).

Every wait has a deadline; `status` believes only the daemon watching the root it was
asked about; one daemon per control socket and state file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import console_script, run_cli
from daemonproc import DaemonProc
from hostbuilder import build, tdx_host


@pytest.fixture
def live_daemon() -> Iterator[DaemonProc]:
    d = DaemonProc()
    yield d
    d.cleanup()


def config(tmp_path: Path, **keys: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"load_msr_module": "never", **keys}))
    return path


class FakeServer:
    """A control socket served by something that is not the daemon."""

    def __init__(self, path: str, answer: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.answer = answer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.recv(65536)
                self.answer(conn)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


# -- one daemon per socket -----------------------------------------------------------------


def test_a_second_daemon_on_the_same_socket_or_state_file_refuses_to_start(
    live_daemon: DaemonProc, tmp_path: Path
) -> None:
    d = live_daemon
    second = subprocess.run(
        [console_script(), "daemon", "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert second.returncode == 1 and "another daemon holds" in second.stderr
    # Same state file, another socket: refused too.
    other = config(tmp_path, control_socket=str(tmp_path / "other.sock"), state_file=d.state_file)
    third = subprocess.run(
        [console_script(), "daemon", "--config", str(other)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert third.returncode == 1 and f"{d.state_file}.lock" in third.stderr
    # The first daemon still owns its socket and answers.
    assert os.path.exists(d.socket) and d.status()["daemon_pid"] == d.proc.pid


def test_a_daemon_removes_only_the_socket_it_created(live_daemon: DaemonProc) -> None:
    d = live_daemon
    os.rename(d.socket, d.socket + ".mine")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(d.socket)  # somebody else's socket now sits at the path
        d.stop()
        assert os.path.exists(d.socket)


def test_the_daemon_watches_the_live_host_only(tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host())
    run = run_cli("daemon", "--root", str(root), "--config", str(config(tmp_path)))
    assert run.code == 2 and "live host only" in run.stderr


# -- status believes only the daemon ---------------------------------------------------------


def test_status_for_another_root_is_stale(live_daemon: DaemonProc, tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host())
    run = run_cli("status", "--root", str(root), "--config", str(live_daemon.config_path))
    assert run.code == 4 and "about root /" in run.stderr
    ok = run_cli("status", "--config", str(live_daemon.config_path))
    assert ok.code in (0, 1, 3)


def test_status_does_not_believe_a_server_that_is_not_the_daemon(
    live_daemon: DaemonProc, tmp_path: Path
) -> None:
    real = live_daemon.status()
    path = str(tmp_path / "fake.sock")
    cfg = config(tmp_path, control_socket=path, state_file=str(tmp_path / "none.json"))
    replies = {
        "the real daemon's reply, from another process": real,
        "naming the serving process itself": {**real, "daemon_pid": os.getpid()},
        "bare allow": {"ok": True, "op": "status", "verdict": "allow", "exit_code": 0},
        "exit_code false": {**real, "exit_code": False},
        "deeply nested": "[" * 100_000 + "]" * 100_000,
    }
    for what, body in replies.items():
        data = (body if isinstance(body, str) else json.dumps(body)).encode() + b"\n"
        fake = FakeServer(path, lambda c, d=data: c.sendall(d))
        try:
            run = run_cli("status", "--config", str(cfg), "--format", "json")
        finally:
            fake.close()
            os.unlink(path)
        assert run.code == 4, what
        assert "Traceback" not in run.stderr, (what, run.stderr)


def test_a_trickling_server_cannot_hold_check_or_status(tmp_path: Path) -> None:
    path = str(tmp_path / "slow.sock")
    cfg = config(tmp_path, control_socket=path, state_file=str(tmp_path / "none.json"))
    root = build(tmp_path / "root", tdx_host())

    def trickle(conn: socket.socket) -> None:
        for _ in range(40):  # one byte every 1.5 s: 60 s in all
            conn.sendall(b" ")
            time.sleep(1.5)

    fake = FakeServer(path, trickle)
    try:
        started = time.monotonic()
        check = run_cli("check", "--root", str(root), "--config", str(cfg), timeout=30)
        status = run_cli("status", "--config", str(cfg), timeout=30)
        took = time.monotonic() - started
    finally:
        fake.close()
    assert check.code in (0, 1, 3) and status.code == 4
    assert took < 25, f"check and status took {took:.1f} s against a trickling server"


def state_variants(real: dict[str, Any]) -> dict[str, dict[str, Any] | str]:
    future = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() + 3600))
    return {
        "generated_at in the future": {**real, "generated_at": future},
        "generated_at not a time": {**real, "generated_at": "NaN"},
        "pid true": {**real, "pid": True, "daemon_pid": True},
        "exit_code false": {**real, "exit_code": False},
        "another root": {**real, "root": "/srv/other"},
        "another boot": {**real, "boot_id": "00000000-0000-0000-0000-000000000000"},
        "a pid that is not a daemon": {**real, "pid": os.getpid(), "daemon_pid": os.getpid()},
        "deeply nested": "[" * 100_000 + "]" * 100_000,
    }


def test_status_believes_a_state_file_only_from_the_running_daemon(
    live_daemon: DaemonProc, tmp_path: Path
) -> None:
    real = live_daemon.state()
    path = Path(live_daemon.state_file)  # the daemon holds its lock; the socket is elsewhere
    cfg = config(tmp_path, control_socket=str(tmp_path / "nobody.sock"), state_file=str(path))
    control = run_cli("status", "--config", str(cfg), "--format", "json")
    assert control.code in (0, 1, 3) and control.code == control.json()["exit_code"]
    assert "state file" in control.json()["source"]
    try:
        for what, body in state_variants(real).items():
            path.write_text(body if isinstance(body, str) else json.dumps(body))
            run = run_cli("status", "--config", str(cfg))
            assert run.code == 4, what
            assert "Traceback" not in run.stderr, (what, run.stderr)
    finally:
        path.write_text(json.dumps(real))
    # A faithful copy elsewhere names a live daemon, but not the one holding that file.
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps(real))
    other = config(tmp_path, control_socket=str(tmp_path / "nobody.sock"), state_file=str(copy))
    run = run_cli("status", "--config", str(other))
    assert run.code == 4 and "does not hold" in run.stderr


def test_a_fifo_as_state_file_does_not_hang_status(tmp_path: Path) -> None:
    fifo = tmp_path / "state.json"
    os.mkfifo(fifo)
    cfg = config(tmp_path, control_socket=str(tmp_path / "nobody.sock"), state_file=str(fifo))
    run = run_cli("status", "--config", str(cfg), timeout=20)
    assert run.code == 4 and "not a regular file" in run.stderr


# -- the daemon's own waits -------------------------------------------------------------------


def test_a_client_that_never_reads_its_replies_is_dropped(live_daemon: DaemonProc) -> None:
    d = live_daemon  # client_timeout 1 s
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(20)
    s.connect(d.socket)
    dropped = False
    try:
        for _ in range(100_000):
            s.sendall(b'{"op":"status"}\n')
    except TimeoutError:
        pytest.fail("the daemon kept the connection of a client that never reads")
    except (BrokenPipeError, ConnectionResetError):
        dropped = True
    finally:
        s.close()
    assert dropped and "does not read its replies" in d.log()
    assert d.status()["daemon_pid"] == d.proc.pid  # and everyone else is still served


def test_a_deeply_nested_request_gets_an_error_and_the_daemon_lives(
    live_daemon: DaemonProc,
) -> None:
    d = live_daemon
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(d.socket)
        s.sendall(b"[" * 30_000 + b"]" * 30_000 + b"\n")
        reply = json.loads(s.makefile("rb").readline())
    assert reply["ok"] is False and "nested" in reply["error"]
    assert d.status()["ok"]


def test_a_huge_sparse_kallsyms_is_refused_from_its_size(tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host())
    with open(root / "proc/kallsyms", "r+b") as f:
        f.truncate(4 << 30)
    started = time.monotonic()
    run = run_cli("check", "--root", str(root), "--format", "json", timeout=60)
    took = time.monotonic() - started
    flush = next(c for c in run.json()["checks"] if c["id"] == "kernel.cache_flush")
    assert "larger than 256 MiB" in json.dumps(flush["evidence"]), flush
    assert took < 10, f"a 4 GiB sparse kallsyms took {took:.1f} s"


FAKE_DAEMON = """
import json, os, socket, sys
reply = json.loads(sys.stdin.read())
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[2])
s.listen(4)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.recv(65536)
    c.sendall(json.dumps({**reply, "daemon_pid": os.getpid()}).encode() + b"\\n")
    c.close()
"""


def test_status_does_not_believe_another_users_process_dressed_as_the_daemon(
    live_daemon: DaemonProc, tmp_path: Path
) -> None:
    real = live_daemon.status()
    # A directory nobody can reach (pytest's own are root-only) and bind a socket in.
    work = Path(tempfile.mkdtemp(prefix="tdxpf-fake-", dir="/tmp"))
    work.chmod(0o777)
    script = work / "tdx-preflight"  # its command line reads `.../tdx-preflight daemon`
    script.write_text(FAKE_DAEMON)
    sock = work / "control.sock"
    fake = subprocess.Popen(
        ["/usr/bin/python3", str(script), "daemon", str(sock)],  # reachable by nobody
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        user=65534,
    )
    try:
        assert fake.stdin is not None and fake.stdout is not None
        fake.stdin.write(json.dumps(real))
        fake.stdin.close()
        assert fake.stdout.readline().strip() == "ready"
        cfg = config(tmp_path, control_socket=str(sock), state_file=str(tmp_path / "none.json"))
        run = run_cli("status", "--config", str(cfg))
        assert run.code == 4 and "neither root nor this user" in run.stderr
    finally:
        fake.kill()
        fake.wait()
        shutil.rmtree(work, ignore_errors=True)
