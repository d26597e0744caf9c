"""The real daemon as a subprocess, for tests and benchmarks.

It runs `tdx-preflight daemon` with its control socket and state file in a
short private directory (AF_UNIX paths are limited to 108 bytes), a real
NOTIFY_SOCKET to see READY/STATUS/WATCHDOG, and its stderr in a log file.

The daemon runs in a private mount namespace in which /sys/kernel/debug is
empty (the common production case, and CI's), whatever the machine has
mounted; `debugfs=True` mounts debugfs there instead. Uevents, /proc and
/dev/kvm are the machine's own either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import console_script

from tdx_preflight.daemon.client import request


class DaemonProc:
    def __init__(
        self,
        root: str | None = None,
        env: dict[str, str] | None = None,
        debugfs: bool = False,
        **config: Any,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tdxd-", dir="/tmp"))
        self.socket = str(self.dir / "control.sock")
        self.state_file = str(self.dir / "state.json")
        self.config_path = self.dir / "config.yaml"
        self.config = {
            "control_socket": self.socket,
            "state_file": self.state_file,
            "reconcile_interval": 0,
            "client_timeout": 1,
            "load_msr_module": "never",
            **config,
        }
        self.write_config(self.config)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.dir / "notify.sock"))
        self.notify.settimeout(0.1)
        self.notes: list[str] = []
        self.log_path = self.dir / "daemon.log"
        cmd = [console_script(), "daemon", "--config", str(self.config_path)]
        if root:
            cmd += ["--root", root]
        self.root = root or "/"
        self.debugfs = debugfs
        cmd = in_mount_namespace(cmd, debugfs)
        environ = {**os.environ, "NOTIFY_SOCKET": str(self.dir / "notify.sock"), **(env or {})}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environ
            )
        self.wait_notify("READY=1", 30)

    def write_config(self, config: dict[str, Any]) -> None:
        # JSON is YAML: no serializer needed.
        self.config_path.write_text(json.dumps(config))

    def wait_notify(self, word: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for note in self.notes:
                if word in note.split("\n"):
                    return note
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(TimeoutError):
                self.notes.append(self.notify.recv(65536).decode())
        raise TimeoutError(f"no {word} from the daemon: {self.log()}")

    def drain_notes(self) -> list[str]:
        self.notify.settimeout(0.01)
        try:
            while True:
                self.notes.append(self.notify.recv(65536).decode())
        except (TimeoutError, BlockingIOError):
            pass
        finally:
            self.notify.settimeout(0.1)
        return self.notes

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, obj: dict[str, Any], timeout: float = 10) -> dict[str, Any] | None:
        return request(self.socket, obj, timeout)

    def status(self) -> dict[str, Any]:
        reply = self.request({"op": "status"})
        assert reply is not None and reply["ok"], reply
        return reply

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15, op: str = "status"
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            last = self.request({"op": op})
            if last is not None and pred(last):
                return last
            time.sleep(0.02)
        raise AssertionError(f"condition not met within {timeout}s; last reply: {last}")

    def state(self) -> dict[str, Any]:
        return json.loads(Path(self.state_file).read_text())

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def in_mount_namespace(cmd: list[str], debugfs: bool) -> list[str]:
    """`cmd` run in a private mount namespace whose /sys/kernel/debug is empty
    (debugfs False) or a fresh debugfs mount (True); the process keeps its pid
    (unshare and sh exec into it)."""
    if debugfs:
        # Mounted already when the machine has it (the namespace inherits the mount).
        setup = "[ -d /sys/kernel/debug/kvm ] || mount -t debugfs debugfs /sys/kernel/debug"
    else:
        setup = (
            "if [ -d /sys/kernel/debug ]; then "
            "mount -t tmpfs -o size=4k,mode=0755 no-debugfs /sys/kernel/debug; fi"
        )
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-ec",
        f'{setup}; exec "$@"',
        "sh",
        *cmd,
    ]


def debugfs_kvm_names() -> set[str]:
    """The kernel's live VMs as debugfs names them (`TID-FD`), read in a private
    mount namespace with debugfs mounted."""
    out = subprocess.run(
        in_mount_namespace(["ls", "/sys/kernel/debug/kvm"], True),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return {n for n in out.split() if re.fullmatch(r"\d+-\d+", n)}


def proc_kvm_vms() -> set[tuple[int, int]]:
    """(pid, fd) of every kvm-vm descriptor on the machine, from /proc/*/fd."""
    found: set[tuple[int, int]] = set()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:kvm-vm":
                    found.add((int(pid), int(fd)))
    return found


def entries(status: dict[str, Any], pid: int) -> list[dict[str, Any]]:
    live = status["live"]
    return [e for kind in ("tds", "vms", "unknown") for e in live[kind] if e["pid"] == pid]
