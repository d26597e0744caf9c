"""The systemd integration: the unit file as systemd-analyze sees it, sd_notify, journald logging.

The unit is checked by the real `systemd-analyze` (verify, and the offline security review
whose score must not rise); the Notifier talks to real AF_UNIX datagram sockets standing in
for the service manager; the log prefixes are read from a real subprocess's stderr.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import console_script, run_cli

from tdx_preflight.daemon.notify import MAX_DATAGRAM, Notifier

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "tdx-preflight.service"
# What `systemd-analyze security --offline=true` reported for the unit (systemd 252); the unit's
# header comment says the same. Lower it when the unit gets tighter; never raise it silently.
# 2.5 -> 2.6: ProtectHome=read-only instead of yes, so an install under /root or /home runs.
MAX_EXPOSURE = 2.6


# --- the unit -------------------------------------------------------------------------------


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (no systemd on this machine)")
    return found


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_systemd_analyze(), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "SYSTEMD_PAGER": "cat", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"},
    )


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The shipped unit, its ExecStart pointed at the console script installed here.

    `verify` checks that the binary exists; /usr/local/bin/tdx-preflight need not on a
    development machine.
    """
    text, count = re.subn(
        r"^ExecStart=\S+",
        f"ExecStart={console_script()}",
        UNIT.read_text(),
        flags=re.MULTILINE,
    )
    assert count == 1, "the unit should have exactly one ExecStart= line"
    text, count = re.subn(
        r"^ExecReload=/usr/local/bin/tdx-preflight ",
        f"ExecReload={console_script()} ",
        text,
        flags=re.MULTILINE,
    )
    assert count == 1, "ExecReload= runs `tdx-preflight reload`"
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def _verify_complaints(unit: Path) -> tuple[int, list[str]]:
    run = _analyze("verify", "--man=no", str(unit))
    # Unknown directives and bad values only warn (exit 0): any line naming the unit counts.
    # Lines about other units on the host are not this unit's problem.
    lines = (run.stdout + run.stderr).splitlines()
    return run.returncode, [line for line in lines if unit.name in line or str(unit) in line]


def test_unit_verifies(unit: Path) -> None:
    code, complaints = _verify_complaints(unit)
    assert code == 0, complaints
    assert complaints == []


def test_verify_check_catches_a_bad_directive(unit: Path) -> None:
    # Guards the test above: a typo in the unit must show up as a complaint.
    unit.write_text(
        unit.read_text().replace("[Service]\n", "[Service]\nProtectKernelTunable=yes\n")
    )
    _code, complaints = _verify_complaints(unit)
    assert any("ProtectKernelTunable" in line for line in complaints), complaints


def test_unit_exposure_does_not_rise(unit: Path) -> None:
    run = _analyze("security", "--offline=true", "--no-pager", str(unit))
    assert run.returncode == 0, run.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", run.stdout)
    assert m, run.stdout[-2000:]
    exposure = float(m.group(1))
    assert exposure <= MAX_EXPOSURE, run.stdout
    assert f"overall exposure {MAX_EXPOSURE}" in UNIT.read_text(), (
        "the unit's header comment should state the exposure this test holds it to"
    )


def test_unit_keeps_what_the_daemon_needs() -> None:
    # The settings that look like hardening gaps but that the daemon cannot run without.
    settings = [line.strip() for line in UNIT.read_text().splitlines() if not line.startswith("#")]
    for needed in (
        "Type=notify",
        "WatchdogSec=30",
        "ProtectKernelTunables=no",  # =yes hides /proc/kallsyms
        "ProtectKernelLogs=no",  # =yes hides /dev/kmsg
        "PrivateDevices=no",  # =yes hides /dev/cpu/*/msr and drops CAP_SYS_RAWIO
        "DeviceAllow=char-cpu/msr r",
        "DeviceAllow=/dev/kmsg r",
        "RuntimeDirectory=tdx-preflight",
        "ProtectHome=read-only",  # =yes hides a venv under /root or /home (203/EXEC)
        "RestartPreventExitStatus=2",  # a configuration error stops; restarts cannot fix it
    ):
        assert needed in settings, needed


# --- sd_notify ------------------------------------------------------------------------------


def test_a_configuration_error_stops_the_daemon_loudly(tmp_path: Path) -> None:
    # Exit 2 (which the unit does not restart) with a journald CRIT line naming FILE:LINE.
    config = tmp_path / "config.yaml"
    config.write_text("reconcile_interval: 60\nreconcile_intervall: 30\n")
    run = run_cli("daemon", "--config", str(config))
    assert run.code == 2, run.stderr
    assert run.stdout == ""
    [line] = run.stderr.splitlines()
    assert line.startswith(f"<2>invalid configuration, not starting: {config}:2: "), line
    assert "systemctl restart tdx-preflight" in line


def _bound(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket at a path, standing in for systemd's notify socket."""
    path = tmp_path / "notify.sock"
    sock = _bound(str(path))
    yield sock, str(path)
    sock.close()


@pytest.fixture
def abstract_manager() -> Iterator[tuple[socket.socket, str]]:
    """The same on an abstract name, as $NOTIFY_SOCKET spells it: '@name'."""
    name = f"tdx-preflight-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = _bound(b"\0" + name.encode())
    yield sock, "@" + name
    sock.close()


def test_ready_with_status_on_a_path_socket(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("x") is True
    assert sock.recv(MAX_DATAGRAM + 1) == b"READY=1\nSTATUS=x"


def test_watchdog_on_an_abstract_socket(abstract_manager: tuple[socket.socket, str]) -> None:
    sock, name = abstract_manager
    notifier = Notifier({"NOTIFY_SOCKET": name})
    assert notifier.enabled
    assert notifier.watchdog() is True
    assert sock.recv(MAX_DATAGRAM + 1) == b"WATCHDOG=1"
    assert notifier.ready() is True
    assert sock.recv(MAX_DATAGRAM + 1) == b"READY=1"


def test_status_stopping_and_plain_fields(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    notifier = Notifier({"NOTIFY_SOCKET": path})
    # A newline in the status would inject a second assignment: it becomes a space.
    assert notifier.status("2 TDs alive\nblocking kexec\r\nRELOADING=1")
    assert sock.recv(MAX_DATAGRAM + 1) == b"STATUS=2 TDs alive blocking kexec RELOADING=1"
    assert notifier.stopping()
    assert sock.recv(MAX_DATAGRAM + 1) == b"STOPPING=1"
    assert notifier.notify(RELOADING="1", STATUS="reconciling")
    assert sock.recv(MAX_DATAGRAM + 1) == b"RELOADING=1\nSTATUS=reconciling"


def test_a_long_status_still_fits_one_datagram(manager: tuple[socket.socket, str]) -> None:
    # systemd drops an oversized datagram whole, READY=1 with it.
    sock, path = manager
    assert Notifier({"NOTIFY_SOCKET": path}).ready("x" * 100_000)
    data = sock.recv(2 * MAX_DATAGRAM)
    assert data.startswith(b"READY=1\nSTATUS=xxx") and len(data) <= MAX_DATAGRAM


def test_default_environment_is_os_environ(
    manager: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = manager
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "8000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier()
    assert notifier.watchdog_interval == 4.0
    assert notifier.watchdog()
    assert sock.recv(MAX_DATAGRAM + 1) == b"WATCHDOG=1"


@pytest.mark.parametrize(
    ("watchdog_pid", "expected"),
    [
        (None, 30_000_000 / 2 / 1e6),
        ("self", 30_000_000 / 2 / 1e6),
        ("other", None),
    ],
)
def test_watchdog_interval(
    manager: tuple[socket.socket, str], watchdog_pid: str | None, expected: float | None
) -> None:
    _sock, path = manager
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}
    if watchdog_pid == "self":
        env["WATCHDOG_PID"] = str(os.getpid())
    elif watchdog_pid == "other":
        # The variable was meant for another process (the environment was inherited).
        env["WATCHDOG_PID"] = str(os.getpid() + 1)
    assert Notifier(env).watchdog_interval == expected


@pytest.mark.parametrize("usec", ["", "0", "-5", "30s", "99999999999999999999999"])
def test_no_watchdog_without_a_usable_watchdog_usec(
    manager: tuple[socket.socket, str], usec: str
) -> None:
    _sock, path = manager
    env = {"NOTIFY_SOCKET": path}
    if usec:
        env["WATCHDOG_USEC"] = usec
    assert Notifier(env).watchdog_interval is None


def test_without_notify_socket_everything_is_a_quiet_no_op() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "30000000"})
    assert notifier.enabled is False
    assert notifier.watchdog_interval is None
    assert notifier.notify(READY="1") is False
    assert notifier.ready("x") is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False


@pytest.mark.parametrize("value", ["", "relative/notify.sock", "@"])
def test_unusable_notify_socket_is_disabled(value: str) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": value})
    assert notifier.enabled is False
    assert notifier.ready() is False


def test_notify_socket_pointing_nowhere_returns_false(tmp_path: Path) -> None:
    for target in (str(tmp_path / "absent.sock"), f"@tdx-preflight-absent-{uuid.uuid4().hex}"):
        notifier = Notifier({"NOTIFY_SOCKET": target})
        assert notifier.enabled
        assert notifier.ready("x") is False
        assert notifier.watchdog() is False


def test_a_manager_that_stopped_reading_does_not_block(
    manager: tuple[socket.socket, str],
) -> None:
    # The queue fills (net.unix.max_dgram_qlen); a send must fail at once, not hang the loop.
    sock, path = manager
    notifier = Notifier({"NOTIFY_SOCKET": path})
    sent = 0
    while notifier.watchdog():
        sent += 1
        if sent > 100_000:
            pytest.fail("100000 datagrams queued and none refused")
    assert sent > 0
    # Once the manager reads again, pings go through.
    sock.setblocking(False)
    while True:
        try:
            sock.recv(MAX_DATAGRAM + 1)
        except BlockingIOError:
            break
    assert notifier.watchdog() is True


def test_field_names_cannot_smuggle_assignments(manager: tuple[socket.socket, str]) -> None:
    _sock, path = manager
    assert Notifier({"NOTIFY_SOCKET": path}).notify(**{"READY=1\nSTATUS": "x"}) is False


# --- logging --------------------------------------------------------------------------------

_LOG_SCRIPT = textwrap.dedent(
    """
    import sys
    from tdx_preflight.daemon.log import setup_logging

    setup_logging(sys.argv[1])
    log = setup_logging(sys.argv[1])  # a second call must not add a second handler
    log.debug("debug line")
    log.info("info line")
    log.warning("warning line")
    log.error("error line")
    log.critical("critical line")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    print("stdout stays clean")
    """
)


def _log_lines(level: str) -> tuple[list[str], str]:
    run = subprocess.run(
        [sys.executable, "-c", _LOG_SCRIPT, level],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr
    return run.stderr.splitlines(), run.stdout


def test_log_lines_carry_journald_priorities() -> None:
    lines, stdout = _log_lines("debug")
    assert lines[:5] == [
        "<7>debug line",
        "<6>info line",
        "<4>warning line",
        "<3>error line",
        "<2>critical line",
    ]
    # The traceback: every line at error priority, so `journalctl -p err` shows it whole.
    traceback = lines[5:]
    assert traceback[0] == "<3>failed"
    assert traceback[-1] == "<3>RuntimeError: boom"
    assert all(line.startswith("<3>") for line in traceback)
    assert stdout == "stdout stays clean\n"


def test_log_level_filters() -> None:
    lines, _stdout = _log_lines("warning")
    assert lines[:3] == ["<4>warning line", "<3>error line", "<2>critical line"]
    assert not any(line.startswith(("<6>", "<7>")) for line in lines)


def test_unknown_log_level_is_refused() -> None:
    run = subprocess.run(
        [sys.executable, "-c", _LOG_SCRIPT, "loud"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode != 0
    assert "unknown log level 'loud'" in run.stderr
