"""`tdx-preflight reload` (the unit's ExecReload=): returns only once the daemon has applied
the reload, and says when the new configuration was refused.

Runs the real CLI against a real daemon process and its control socket.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from daemonproc import DaemonProc

from tdx_preflight.daemon.client import request


def _blocking(d: DaemonProc, check_id: str) -> bool:
    reply = request(d.socket, {"op": "check", "phase": "exec"})
    assert reply is not None and reply["ok"], reply
    return next(c["blocking"] for c in reply["report"]["checks"] if c["id"] == check_id)


@pytest.fixture
def daemon() -> Iterator[DaemonProc]:
    d = DaemonProc()
    try:
        yield d
    finally:
        d.cleanup()


def test_reload_returns_once_applied(daemon: DaemonProc) -> None:
    d = daemon
    assert d.status()["reload"] == {"generation": 0, "at": None, "error": None}
    assert _blocking(d, "guests.vm") is False
    d.write_config({**d.config, "blocking": {"guests.vm": ["exec"]}})
    run = run_cli("reload", "--config", str(d.config_path))
    assert (run.code, run.stdout, run.stderr) == (0, "", "")
    # No wait: the new policy is in force when reload returns.
    assert _blocking(d, "guests.vm") is True
    reload = d.status()["reload"]
    assert reload["generation"] == 1 and reload["error"] is None and reload["at"]


def test_reload_of_an_invalid_configuration_fails_and_keeps_the_old(daemon: DaemonProc) -> None:
    # The same file for both (the unit's case): reload reads it first and stops there.
    d = daemon
    d.config_path.write_text("blocking: {guests.vm: [exec]}\nbogus_key: 1\n")
    run = run_cli("reload", "--config", str(d.config_path))
    assert run.code == 2, run.stderr
    assert run.stderr.startswith(f"tdx-preflight: invalid configuration: {d.config_path}:2: ")
    assert d.status()["reload"]["generation"] == 0
    assert d.proc.poll() is None and _blocking(d, "guests.vm") is False


def test_a_configuration_the_daemon_refuses_fails_the_reload(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    # The daemon's file broken, the caller's fine: the daemon's refusal is what reload reports.
    d = daemon
    mine = tmp_path / "mine.yaml"
    mine.write_text(json.dumps(d.config))
    d.config_path.write_text("blocking: {guests.vm: [exec]}\nbogus_key: 1\n")
    run = run_cli("reload", "--config", str(mine))
    assert run.code == 2, run.stderr
    assert "invalid configuration, the daemon keeps the old one" in run.stderr
    assert f"{d.config_path}:2" in run.stderr
    assert d.proc.poll() is None and _blocking(d, "guests.vm") is False
    reload = d.status()["reload"]
    assert reload["generation"] == 1 and reload["error"].startswith(f"{d.config_path}:2")


def test_reload_without_a_daemon(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"control_socket: {tmp_path / 'none.sock'}\n")
    run = run_cli("reload", "--config", str(config))
    assert run.code == 4 and "no daemon answers" in run.stderr


def test_the_unit_reloads_through_the_command() -> None:
    unit = (
        Path(__file__).resolve().parent.parent / "systemd" / "tdx-preflight.service"
    ).read_text()
    assert "ExecReload=/usr/local/bin/tdx-preflight reload\n" in unit
    assert "3/NOTIMPLEMENTED" in unit and "SuccessExitStatus=" not in unit.replace(
        "Not a SuccessExitStatus=", ""
    )
