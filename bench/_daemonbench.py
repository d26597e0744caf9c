"""Shared pieces of the daemon benchmarks (bench/daemon_*.py); not a benchmark itself.

Puts tests/ on sys.path (for DaemonProc and KvmHolder), and offers a VM maker
child (bench/vm_maker.py), a persistent JSON-lines client, percentiles and
a process's CPU time and RSS (psutil).
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from conftest import kvm_usable  # noqa: E402
from daemonproc import DaemonProc  # noqa: E402

__all__ = [
    "DaemonProc",
    "LineClient",
    "VmMaker",
    "cpu_seconds",
    "die_without_kvm",
    "live_keys",
    "pct",
    "rss_mib",
]


def die_without_kvm() -> None:
    reason = kvm_usable()
    if reason:
        raise SystemExit(f"cannot run: {reason}")


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads), through psutil."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB, through psutil."""
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def live_keys(status: dict[str, Any]) -> set[tuple[int | None, int | None]]:
    """(pid, vm_fd) of every live VM in a status reply."""
    live = status["live"]
    return {(e["pid"], e["vm_fd"]) for kind in ("tds", "vms", "unknown") for e in live[kind]}


class LineClient:
    """One persistent connection to a JSON-lines socket: a request out, a line back."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def raw(self, payload: bytes) -> bytes:
        """Send one request line; return the reply line (without its newline)."""
        self.sock.sendall(payload)
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line, self.buf = self.buf[:nl], self.buf[nl + 1 :]
                return line
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.buf += data

    def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        return json.loads(self.raw(json.dumps(obj).encode() + b"\n"))

    def close(self) -> None:
        self.sock.close()


def one_shot(path: str, payload: bytes, timeout: float = 10.0) -> bytes:
    """A new connection for one request; the reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(payload)
        chunks = []
        while True:
            data = s.recv(1 << 20)
            if not data:
                raise ConnectionError("the server closed the connection before replying")
            chunks.append(data)
            if data.endswith(b"\n"):
                return b"".join(chunks)


class VmMaker:
    """bench/vm_maker.py as a child: creates KVM VMs on command and times them."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "vm_maker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid: int = self._read()["pid"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5)
            raise RuntimeError(f"vm_maker exited {self.proc.returncode}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def command(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def create(self) -> tuple[int, float]:
        """One VM: its fd and the time.time() right after KVM_CREATE_VM returned."""
        r = self.command("create")
        return r["fd"], r["t"]

    def burst(self, n: int) -> dict[str, Any]:
        return self.command(f"burst {n}")

    def close(self, *fds: int) -> float:
        return self.command("close " + " ".join(map(str, fds)))["t"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def wait_until(pred: Any, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return False
