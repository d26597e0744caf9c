"""The logind shutdown inhibitor against a real dbus-daemon and a logind stand-in.

Each test starts its own private dbus-daemon (session-style config, allow-all policy) and,
where logind is needed, tests/logind_standin.py as a subprocess that owns
org.freedesktop.login1 and records every Inhibit call and every release in a JSON-lines
file. Nothing is mocked: the lock fd really travels through the bus, and "released" is
the stand-in seeing end of file on its pipe.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jeepney import DBusAddress, HeaderFields, new_method_call
from jeepney.io.blocking import open_dbus_connection

from tdx_preflight.daemon.inhibit import ShutdownInhibitor

HERE = Path(__file__).parent
WAIT = 10.0  # generous upper bound; every wait returns as soon as its condition holds

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
  {extra}
</busconfig>
"""

DENY_INHIBIT = """<policy context="mandatory">
    <deny send_destination="org.freedesktop.login1"
          send_interface="org.freedesktop.login1.Manager" send_member="Inhibit"/>
  </policy>"""


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def read_line(proc: subprocess.Popen[bytes], timeout: float = WAIT) -> str:
    """The first stdout line of `proc`, waiting at most `timeout` (a hung child fails the test)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"{proc.args!r} printed nothing in {timeout} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"{proc.args!r} exited ({proc.wait()}) before its line")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    # Only complete lines: the stand-in may be mid-write when we look.
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def wait_for(
    path: Path, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = WAIT
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        seen = records(path)
        if pred(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"record never matched within {timeout} s: {seen}")
        time.sleep(0.02)


def released_count(seen: list[dict[str, Any]]) -> int:
    return sum(1 for r in seen if r.get("released") is True)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Not tmp_path: AF_UNIX paths are limited to 108 bytes and pytest's per-test
    # directories grow with the test name.
    d = Path(tempfile.mkdtemp(prefix="tdxinh-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def dbus_daemon() -> str:
    found = shutil.which("dbus-daemon")
    if not found:
        reason = "dbus-daemon is not installed (apt-get install dbus-daemon)"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    return found


@dataclass
class Bus:
    address: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        stop(self.proc)


@pytest.fixture
def start_bus(
    dbus_daemon: str, sockdir: Path, request: pytest.FixtureRequest
) -> Callable[..., Bus]:
    """Start a private dbus-daemon. Killed at teardown, pass or fail."""
    count = 0

    def start(extra_policy: str = "", socket_path: Path | None = None) -> Bus:
        nonlocal count
        count += 1
        sock = socket_path or sockdir / f"bus{count}"
        config = sockdir / f"bus{count}.conf"
        config.write_text(BUS_CONFIG.format(socket=sock, extra=extra_policy), encoding="utf-8")
        proc = subprocess.Popen(
            [dbus_daemon, f"--config-file={config}", "--nofork", "--print-address"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        request.addfinalizer(lambda: stop(proc))
        # The address is printed once the socket listens, so no polling for the file.
        address = read_line(proc)
        assert address.startswith("unix:"), address
        return Bus(address, proc)

    return start


@pytest.fixture
def start_standin(request: pytest.FixtureRequest) -> Callable[[str, Path], subprocess.Popen[bytes]]:
    """Start tests/logind_standin.py on a bus; returns once it owns org.freedesktop.login1."""

    def start(address: str, record: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "logind_standin.py"), address, str(record)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        request.addfinalizer(lambda: stop(proc))
        assert read_line(proc) == "ready"
        return proc

    return start


@pytest.fixture
def inhibitors() -> Iterator[Callable[..., ShutdownInhibitor]]:
    """Make inhibitors that are closed at teardown, so no lock fd outlives a failed test."""
    made: list[ShutdownInhibitor] = []

    def make(bus_address: str, **kwargs: Any) -> ShutdownInhibitor:
        inh = ShutdownInhibitor(bus_address, **kwargs)
        made.append(inh)
        return inh

    yield make
    for inh in made:
        inh.close()


@pytest.fixture
def logind(
    start_bus: Callable[..., Bus],
    start_standin: Callable[[str, Path], subprocess.Popen[bytes]],
    tmp_path: Path,
) -> tuple[str, Path]:
    """A bus with the logind stand-in on it: (address, record file)."""
    address = start_bus().address
    record = tmp_path / "inhibit.jsonl"
    start_standin(address, record)
    return address, record


def test_hold_takes_one_block_lock_and_release_drops_it(
    logind: tuple[str, Path], inhibitors: Callable[..., ShutdownInhibitor]
) -> None:
    address, record = logind
    inh = inhibitors(address)
    assert not inh.held

    assert inh.hold("2 TD guests running: td1, td2") is None
    assert inh.held
    # The stand-in writes the record before it replies, so it is there already.
    assert records(record) == [
        {
            "what": "shutdown",
            "who": "tdx-preflight",
            "why": "2 TD guests running: td1, td2",
            "mode": "block",
        }
    ]

    assert inh.hold("3 TD guests running: td1, td2, td3") is None
    assert inh.held
    assert len(records(record)) == 1, "a second hold() must not take a second lock"

    inh.release()
    assert not inh.held
    seen = wait_for(record, lambda s: released_count(s) == 1)
    assert seen[-1] == {"released": True}

    inh.release()  # idempotent
    assert not inh.held

    # The same inhibitor (and its still-open connection) can take the lock again.
    assert inh.hold("1 TD guest running: td3") is None
    wait_for(record, lambda s: len([r for r in s if "what" in r]) == 2)
    inh.close()
    assert not inh.held
    wait_for(record, lambda s: released_count(s) == 2)
    inh.close()  # idempotent


def test_lock_fd_is_not_inherited_by_children(
    logind: tuple[str, Path],
    inhibitors: Callable[..., ShutdownInhibitor],
    request: pytest.FixtureRequest,
) -> None:
    """A child started without close_fds must not keep the lock alive after release()."""
    address, record = logind
    inh = inhibitors(address)
    assert inh.hold("1 TD guest running: td1") is None
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        close_fds=False,
    )
    request.addfinalizer(lambda: stop(child))
    inh.release()
    wait_for(record, lambda s: released_count(s) == 1)
    assert child.poll() is None, "the child must still be running for this to prove anything"


def test_why_with_nul_and_undecodable_bytes_still_takes_the_lock(
    logind: tuple[str, Path], inhibitors: Callable[..., ShutdownInhibitor]
) -> None:
    # Guest names come from command lines, decoded with surrogateescape.
    name = b"td-\xff\x00x".decode("utf-8", "surrogateescape")
    address, record = logind
    inh = inhibitors(address)
    assert inh.hold(f"1 TD guest running: {name}") is None
    assert records(record)[0]["why"] == "1 TD guest running: td-? x"


@pytest.mark.parametrize("kind", ["no socket file", "socket file, no listener"])
def test_nothing_listening_is_an_error_string(
    kind: str, sockdir: Path, inhibitors: Callable[..., ShutdownInhibitor]
) -> None:
    path = sockdir / "dead"
    if kind == "socket file, no listener":
        # Bound but never listen()ed: connect() gets ECONNREFUSED, like a dead bus.
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    inh = inhibitors(f"unix:path={path}")
    err = inh.hold("1 TD guest running: td1")
    assert isinstance(err, str) and err
    assert "\n" not in err
    assert "no D-Bus bus listening" in err
    assert not inh.held


def test_bus_without_logind_is_an_error_string(
    start_bus: Callable[..., Bus], inhibitors: Callable[..., ShutdownInhibitor]
) -> None:
    inh = inhibitors(start_bus().address)
    err = inh.hold("1 TD guest running: td1")
    assert isinstance(err, str)
    assert "logind is not running" in err and "ServiceUnknown" in err
    assert "\n" not in err
    assert not inh.held


def test_policy_denial_is_an_error_string(
    start_bus: Callable[..., Bus],
    start_standin: Callable[[str, Path], subprocess.Popen[bytes]],
    inhibitors: Callable[..., ShutdownInhibitor],
    tmp_path: Path,
) -> None:
    address = start_bus(DENY_INHIBIT).address
    record = tmp_path / "inhibit.jsonl"
    start_standin(address, record)
    inh = inhibitors(address)
    err = inh.hold("1 TD guest running: td1")
    assert err is not None and "access denied" in err and "AccessDenied" in err
    assert not inh.held
    assert records(record) == []


class SilentBus:
    """A unix socket that accepts and then never answers, optionally after a valid
    D-Bus authentication (so that the client hangs on Hello, not on the handshake)."""

    def __init__(self, path: Path, authenticate: bool) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.authenticate = authenticate
        self.conns: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.conns.append(conn)
            if self.authenticate:
                self._handshake(conn)

    def _handshake(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        buf = b""
        try:
            while b"BEGIN\r\n" not in buf:
                chunk = conn.recv(1024)
                if not chunk:
                    return
                buf += chunk
                if b"AUTH " in chunk:
                    conn.sendall(b"OK " + b"0" * 32 + b"\r\n")
                if b"NEGOTIATE_UNIX_FD" in chunk:
                    conn.sendall(b"AGREE_UNIX_FD\r\n")
        except OSError:
            return
        # ...and now ignore the Hello that follows.

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("authenticate", [False, True], ids=["no-auth-answer", "no-hello-answer"])
def test_silent_bus_times_out(
    authenticate: bool,
    sockdir: Path,
    inhibitors: Callable[..., ShutdownInhibitor],
    request: pytest.FixtureRequest,
) -> None:
    path = sockdir / "silent"
    bus = SilentBus(path, authenticate)
    request.addfinalizer(bus.close)
    inh = inhibitors(f"unix:path={path}", timeout=0.5)
    started = time.monotonic()
    err = inh.hold("1 TD guest running: td1")
    took = time.monotonic() - started
    assert err is not None and "no answer within 0.5 s" in err, err
    assert not inh.held
    assert took < 3, f"hold() took {took:.1f} s against a 0.5 s timeout"


def test_hold_reconnects_after_the_bus_restarts(
    start_bus: Callable[..., Bus],
    start_standin: Callable[[str, Path], subprocess.Popen[bytes]],
    inhibitors: Callable[..., ShutdownInhibitor],
    sockdir: Path,
    tmp_path: Path,
) -> None:
    """The connection is kept between holds; a dead one is replaced, not reported."""
    sock = sockdir / "restarting"
    bus = start_bus(socket_path=sock)
    first = tmp_path / "first.jsonl"
    standin = start_standin(bus.address, first)
    inh = inhibitors(bus.address)
    assert inh.hold("1 TD guest running: td1") is None
    inh.release()
    wait_for(first, lambda s: released_count(s) == 1)

    # Stop that bus (the stand-in exits with it) and start a new one on the same path.
    bus.stop()
    standin.wait(WAIT)
    second = tmp_path / "second.jsonl"
    bus2 = start_bus(socket_path=sock)
    start_standin(bus2.address, second)

    assert inh.hold("1 TD guest running: td2") is None
    assert inh.held
    assert records(second)[0]["why"] == "1 TD guest running: td2"


def test_standin_rejects_other_methods(logind: tuple[str, Path]) -> None:
    """The stand-in itself: anything but Inhibit gets UnknownMethod, as from logind."""
    address, record = logind
    manager = DBusAddress(
        "/org/freedesktop/login1",
        bus_name="org.freedesktop.login1",
        interface="org.freedesktop.login1.Manager",
    )
    with open_dbus_connection(address, auth_timeout=5) as conn:
        reply = conn.send_and_get_reply(new_method_call(manager, "ListSessions"), timeout=5)
    assert reply.header.fields[HeaderFields.error_name] == (
        "org.freedesktop.DBus.Error.UnknownMethod"
    )
    assert records(record) == []


def test_daemon_holds_the_inhibitor_while_a_td_runs(
    logind: tuple[str, Path], kvm_holder: Callable[..., Any]
) -> None:
    """The real daemon, real KVM uevents: a TD appears, the lock is taken; it goes, released."""
    from daemonproc import DaemonProc

    address, record = logind
    d = DaemonProc(inhibit_shutdown=True, inhibit_bus=address)
    try:
        assert not d.status()["inhibitor"]["held"]
        td = kvm_holder("-object", "tdx-guest,id=tdx0", "-name", "td-inh")
        seen = wait_for(record, lambda s: any("what" in r for r in s))
        [call] = [r for r in seen if "what" in r]
        assert (call["what"], call["who"], call["mode"]) == ("shutdown", "tdx-preflight", "block")
        assert "td-inh" in call["why"] and "1 TD guest running" in call["why"]
        assert d.status()["inhibitor"]["held"] is True
        td.close_vms()
        wait_for(record, lambda s: released_count(s) == 1)
        deadline = time.monotonic() + WAIT
        while d.status()["inhibitor"]["held"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert "shutdown inhibitor released" in d.log()
    finally:
        d.cleanup()
