"""More doors, found by trying the tool as an attacker would (issue classes 1, 2, 3, 4).

Each test fails on the code before its fix: a command that printed something else
and exited 0, a reader that skipped what it could not read, a device node under a
fixture root read as the live kernel's, a loose kallsyms match, a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import console_script, run_cli, statuses
from hostbuilder import VmProc, build, qemu_td_cmdline, qemu_vm_cmdline, tdx_host

from tdx_preflight.kexec_args import command_phases


def td_root(tmp_path: Path) -> Path:
    return build(
        tmp_path / "td",
        tdx_host(
            processes=[VmProc(pid=4242, cmdline=qemu_td_cmdline("td1"), misc_tdx=1)],
            misc_current={"tdx": 1},
        ),
    )


def raw_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("mode", ["bash_source", "bash_complete", "zsh_source"])
def test_the_completion_variable_never_replaces_a_check(tmp_path: Path, mode: str) -> None:
    root = td_root(tmp_path)
    env = {"_TDX_PREFLIGHT_COMPLETE": mode, "COMP_WORDS": "tdx-preflight ", "COMP_CWORD": "1"}
    for args in (("hook", "exec", "--root", str(root)), ("check", "--root", str(root))):
        run = raw_cli(*args, env=env)
        assert run.returncode == 1, (args, run.stdout[:200])
    # Called as a shell calls it (no arguments), completion still works.
    script = raw_cli(env={"_TDX_PREFLIGHT_COMPLETE": "bash_source"})
    assert script.returncode == 0 and "_tdx_preflight_completion" in script.stdout


@pytest.mark.parametrize("first", ["-h", "--help", "--version"])
def test_group_help_and_version_before_a_command_are_usage_errors(
    tmp_path: Path, first: str
) -> None:
    root = td_root(tmp_path)
    run = raw_cli(first, "hook", "exec", "--root", str(root))
    assert run.returncode == 2 and "stands alone" in run.stderr
    assert raw_cli(first).returncode == 0  # alone, it answers


def test_an_fd_entry_that_is_not_a_symlink_makes_enumeration_incomplete(tmp_path: Path) -> None:
    root = build(
        tmp_path / "r",
        tdx_host(processes=[VmProc(pid=5000, cmdline=qemu_vm_cmdline("v1"))], debugfs_kvm=False),
    )
    link = root / "proc/5000/fd/12"
    assert os.readlink(link) == "anon_inode:kvm-vm"
    link.unlink()
    link.write_text("not a link")
    report = run_cli("check", "--root", str(root), "--format", "json").json()
    vm = next(c for c in report["checks"] if c["id"] == "guests.vm")
    assert vm["status"] == "unknown" and "descriptor '12'" in json.dumps(vm["evidence"])


def test_device_nodes_under_a_fixture_root_are_never_read(tmp_path: Path) -> None:
    root = td_root(tmp_path)
    for rel, (major, minor) in {"dev/kmsg": (1, 11), "dev/cpu/0/msr": (1, 5)}.items():
        path = root / rel
        path.unlink(missing_ok=True)
        os.mknod(path, 0o600 | 0o020000, os.makedev(major, minor))
    report = run_cli("check", "--root", str(root), "--format", "json", "-v").json()
    text = json.dumps(report)
    assert "is a character device, expected the kmsg device or a file" in text
    assert "is a character device, expected the msr device or a file" in text


def test_a_kallsyms_line_that_is_not_address_type_name_does_not_count(tmp_path: Path) -> None:
    spec = tdx_host(release="6.17.0", kallsyms=["tdx_enable"])
    spec.extra_files["proc/kallsyms"] = (
        "ffffffff81000000 T _stext\njunk x y tdx_cpu_flush_cache_for_kexec\n"
        "ffffffff81000010 T tdx_enable\n"
    )
    report = run_cli("check", "--root", str(build(tmp_path / "r", spec)), "--format", "json")
    assert statuses(report.json())["kernel.cache_flush"] == "fail"
    spec.extra_files["proc/kallsyms"] += "ffffffff81000020 t tdx_cpu_flush_cache_for_kexec\n"
    report = run_cli("check", "--root", str(build(tmp_path / "r2", spec)), "--format", "json")
    assert statuses(report.json())["kernel.cache_flush"] == "pass"


def test_deeply_nested_yaml_is_a_configuration_error(tmp_path: Path) -> None:
    cfg = tmp_path / "deep.yaml"
    cfg.write_text("block_on_warn: " + "[" * 3000 + "]" * 3000 + "\n")
    run = run_cli("check", "--root", str(td_root(tmp_path)), "--config", str(cfg))
    assert run.code == 2 and f"{cfg}" in run.stderr and "nested too deeply" in run.stderr
    assert "Traceback" not in run.stderr


def test_exec_checks_a_command_it_cannot_read_in_every_phase(tmp_path: Path) -> None:
    # Only the crash phase blocks here: no crash kernel memory is reserved.
    spec = tdx_host()
    spec.extra_files["sys/kernel/kexec_crash_size"] = "0\n"
    root = build(tmp_path / "r", spec)
    marker = tmp_path / "ran"
    for command in (
        ("sh", "-c", f"touch {marker}"),
        ("env", "kexec", "-p", "/boot/vmlinuz"),
    ):
        run = run_cli("exec", "--root", str(root), "--format", "json", "--", *command)
        assert run.code == 1, command
        assert run.json()["gate"]["phases"] == ["load", "exec", "crash"]
    assert not marker.exists()
    # What exec reads of each command (never run here: an allowed one would be executed).
    assert command_phases(("systemctl", "--no-ask-password", "kexec")).phases == ("load", "exec")
    assert command_phases(("/usr/sbin/kexec", "-p", "/b")).phases == ("crash",)
    assert command_phases(("systemctl", "reboot")).phases == ("load", "exec", "crash")


def test_a_non_utf8_image_path_is_no_traceback(tmp_path: Path) -> None:
    root = build(tmp_path / "r", tdx_host())
    run = subprocess.run(
        [
            console_script(),
            "hook",
            "--root",
            str(root),
            "--",
            "-l",
            b"/boot/\xff".decode("utf-8", "surrogateescape"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode in (0, 1, 3) and "Traceback" not in run.stderr


def test_metrics_never_replace_something_that_is_not_a_regular_file(tmp_path: Path) -> None:
    root = build(tmp_path / "r", tdx_host())
    fifo = tmp_path / "metrics.prom"
    os.mkfifo(fifo)
    run = run_cli("check", "--root", str(root), "--metrics-file", str(fifo))
    assert run.code == 0 and "not a regular file" in run.stderr
    assert os.path.exists(fifo) and not fifo.is_file()  # still the FIFO
