"""The YAML configuration through the real CLI: policy effects and exit 2 on bad files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_cli, statuses
from hostbuilder import VmProc, build, qemu_vm_cmdline, tdx_host

from tdx_preflight.checks import CHECKS, PHASES
from tdx_preflight.policy import ConfigError, parse

EXAMPLE = Path(__file__).parent.parent / "config" / "tdx-preflight.yaml"


def _cfg(tmp_path: Path, text: str) -> str:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return str(p)


def test_the_shipped_example_is_valid() -> None:
    policy = parse(EXAMPLE.read_text(), str(EXAMPLE))
    assert policy.load_msr_module == "auto"


def test_block_on_warn_turns_an_advisory_warning_into_a_block(tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host())
    assert run_cli("check", "--root", str(root)).code == 0
    cfg = _cfg(tmp_path, "block_on_warn: [postkexec.tdx]\n")
    run = run_cli("check", "--root", str(root), "--config", cfg, "--format", "json")
    report = run.json()
    assert run.code == 1 and report["verdict"] == "block"
    post = next(c for c in report["checks"] if c["id"] == "postkexec.tdx")
    assert post["status"] == "warn" and post["blocking"] is True


def test_blocking_override_applies_to_its_phase_only(tmp_path: Path) -> None:
    vm = VmProc(pid=5000, cmdline=qemu_vm_cmdline("web1"))
    root = build(tmp_path / "root", tdx_host(processes=[vm]))
    cfg = _cfg(tmp_path, "blocking:\n  guests.vm: [exec]\n")
    run = run_cli("check", "--root", str(root), "--config", cfg, "--format", "json")
    assert run.code == 1 and statuses(run.json())["guests.vm"] == "warn"
    assert run_cli("check", "--root", str(root), "--config", cfg, "--phase", "load").code == 0


def test_root_from_the_config(tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host(cpu="amd_epyc", tdx_flag=False))
    cfg = _cfg(tmp_path, f"root: {root}\nload_msr_module: never\n")
    report = run_cli("check", "--config", cfg, "--format", "json").json()
    assert report["host"]["root"] == str(root) and report["host"]["family"] == 25


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("block_on_warn: [postkexec.tdx\n", 2, "invalid YAML"),
        ("load_msr_module: auto\nbogus: 1\n", 2, "unknown setting 'bogus'"),
        ("load_msr_module: sometimes\n", 1, "expected auto or never"),
        ("block_on_warn: postkexec.tdx\n", 1, "expected a list of check ids"),
        ("block_on_warn:\n  - guests.vm\n  - guests.nope\n", 3, "unknown check id 'guests.nope'"),
        ("blocking:\n  guests.vm: [reboot]\n", 2, "expected a list of phases"),
        ("- just\n- a list\n", 1, "expected a mapping"),
        ("!!set {block_on_warn}\n", 1, "expected a mapping"),
        ("!!python/object:os.system {}\n", 1, "expected a mapping"),
        # Duplicate keys at every depth; the last would win and undo the first.
        ("block_on_warn: [postkexec.tdx]\nblock_on_warn: []\n", 2, "duplicate key"),
        ("blocking:\n  guests.vm: [exec]\n  guests.vm: [load]\n", 3, "duplicate key"),
        ("blocking: {guests.vm: [exec], 'guests.vm': [load]}\n", 1, "duplicate key"),
        # A merge key that overrides is a duplicate too (anchors and aliases are fine).
        ("blocking:\n  <<: {guests.vm: [exec]}\n  guests.vm: [load]\n", 3, "duplicate key"),
        ("<<: {client_timeout: 3}\nclient_timeout: 4\n", 2, "duplicate key"),
        # Complex keys: a traceback (exit 3) before.
        ("? [a, b]\n: 1\n", 1, "a key must be a plain value"),
        ("blocking:\n  ? {guests.vm: 1}\n  : [exec]\n", 2, "a key must be a plain value"),
        # Numbers that are not finite or out of range.
        ("reconcile_interval: .nan\n", 1, "expected a number from 0 to"),
        ("client_timeout: .inf\n", 1, "expected a number from 0.1 to"),
        ("state_max_age: -.inf\n", 1, "expected a number from 1 to"),
        ("uevent_rcvbuf: 99999999999\n", 1, "expected an integer from 4096 to"),
        # sun_path holds 108 bytes with its NUL.
        ("control_socket: /" + "s" * 107 + "\n", 1, "a unix socket path holds at most 107"),
        ('control_socket: "/run/a\\0b"\n', 1, "expected an absolute path"),
        # A blocking phase in which the check always skips could never take effect.
        ("blocking:\n  guests.teardown: [exec, load]\n", 2, "always skips in load"),
        ("blocking:\n  kexec.image: load\n", 2, "always skips in load"),
        ("blocking:\n  postkexec.tdx: [crash]\n", 2, "always skips in crash"),
        ("blocking:\n  guests.td: [crash]\n", 2, "always skips in crash"),
    ],
)
def test_invalid_config_exits_2_with_file_and_line(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    cfg = _cfg(tmp_path, text)
    for command in (["check"], ["guests"]):
        run = run_cli(*command, "--root", str(tmp_path), "--config", cfg)
        assert run.code == 2, run.stderr
        assert f"{cfg}:{line}:" in run.stderr and words in run.stderr
        assert run.stdout == ""
    with pytest.raises(ConfigError):
        parse(text, cfg)


def test_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    run = run_cli("check", "--config", str(tmp_path / "nope.yaml"))
    assert run.code == 2 and "nope.yaml" in run.stderr


def test_a_socket_path_that_fits_is_accepted() -> None:
    longest = "/" + "s" * 106
    assert parse(f"control_socket: {longest}\n").control_socket == longest
    anchored = parse("blocking:\n  guests.vm: &p [exec]\n  kexec.image: *p\n")
    assert anchored.blocking == {"guests.vm": {"exec"}, "kexec.image": {"exec"}}


def test_every_declared_skip_phase_is_refused_and_really_skips(tmp_path: Path) -> None:
    """The policy's refusals come from the checks' declarations, and each holds."""
    declared = {(c.id, p) for c in CHECKS for p in c.skips}
    assert {
        ("guests.teardown", "load"),
        ("guests.teardown", "crash"),
        ("kexec.image", "load"),
        ("postkexec.tdx", "crash"),
        ("guests.td", "crash"),
    } <= declared
    root = build(tmp_path / "root", tdx_host())
    reports = {
        p: run_cli("check", "--root", str(root), "--phase", p, "--format", "json").json()
        for p in PHASES
    }
    for check_id, phase in declared:
        with pytest.raises(ConfigError, match=f"always skips in {phase}"):
            parse(f"blocking:\n  {check_id}: [{phase}]\n")
        assert statuses(reports[phase])[check_id] == "skip", (check_id, phase)
    for c in CHECKS:
        allowed = [p for p in PHASES if p not in c.skips]
        assert parse(f"blocking:\n  {c.id}: [{', '.join(allowed)}]\n").blocking


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "oversize", "dangling"])
def test_a_config_that_is_not_a_small_regular_file_exits_2(tmp_path: Path, kind: str) -> None:
    cfg = tmp_path / "config.yaml"
    if kind == "fifo":
        os.mkfifo(cfg)  # opened for reading, it would wait for a writer forever
    elif kind == "directory":
        cfg.mkdir()
    elif kind == "device":
        cfg = Path("/dev/zero")  # endless: a read that is not capped never returns
    elif kind == "oversize":
        # Valid YAML up to the cap, then the setting a cut read would drop.
        cfg.write_text("#" * (1 << 20) + "\nblock_on_warn: [postkexec.tdx]\n")
    else:
        cfg.symlink_to(tmp_path / "nowhere.yaml")
    run = run_cli("check", "--root", str(tmp_path), "--config", str(cfg), timeout=20)
    assert run.code == 2, run.stderr
    assert str(cfg) in run.stderr and run.stdout == ""
    words = {
        "fifo": "is a FIFO, expected a regular file",
        "directory": "is a directory",
        "device": "is a character device, expected a regular file",
        "oversize": "larger than 1048576 bytes",
        "dangling": "cannot read",
    }
    assert words[kind] in run.stderr


def test_a_config_of_exactly_the_cap_is_read_whole(tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host())
    setting = "block_on_warn: [postkexec.tdx]\n"
    cfg = _cfg(tmp_path, "#" * ((1 << 20) - len(setting) - 1) + "\n" + setting)
    assert os.path.getsize(cfg) == 1 << 20
    assert run_cli("check", "--root", str(root), "--config", cfg).code == 1
