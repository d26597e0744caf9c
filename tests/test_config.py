"""The YAML configuration through the real CLI: policy effects and exit 2 on bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli, statuses
from hostbuilder import VmProc, build, qemu_vm_cmdline, tdx_host

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
