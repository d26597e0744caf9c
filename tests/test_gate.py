"""The gate through the installed CLI: hook, exec, target kernel, override, metrics, races."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import kvm_usable, run_cli, statuses
from daemonproc import DaemonProc, entries
from hostbuilder import HostSpec, VmProc, build, bzimage, config_text, qemu_td_cmdline, tdx_host

RELEASE = "6.18.2-1-amd64"


def gate_root(tmp_path: Path, spec: HostSpec | None = None, **images: bytes) -> Path:
    spec = spec or tdx_host()
    for name, data in images.items():
        spec.extra_files[f"boot/{name}"] = data
    return build(tmp_path / "root", spec)


def hook(root: Path, phase: str, *kexec: str, opts: tuple[str, ...] = ()) -> Any:
    return run_cli("hook", "--root", str(root), *opts, phase, *(("--", *kexec) if kexec else ()))


# -- hook --------------------------------------------------------------------------------


def test_hook_allows_quietly_and_blocks_with_one_line(tmp_path: Path) -> None:
    ok = hook(gate_root(tmp_path / "a"), "exec")
    assert (ok.code, ok.stdout, ok.stderr) == (0, "", "")
    spec = tdx_host(cpu="emerald_rapids", extra_bugs=["tdx_pw_mce"])
    run = hook(gate_root(tmp_path / "b", spec), "load", "-l", "/boot/vmlinuz")
    assert run.code == 1 and run.stdout == ""
    [line] = run.stderr.strip().splitlines()
    assert "blocked" in line and "errata.tdx_pw_mce" in line and "fix:" in line


def test_hook_format_json_and_exit_3_on_unknown(tmp_path: Path) -> None:
    spec = tdx_host(release="6.17.0-1012-intel", kallsyms=None)
    spec.extra_files["proc/kallsyms/x"] = ""
    run = hook(gate_root(tmp_path, spec), "exec", opts=("--format", "json"))
    assert run.code == 3 and run.json()["exit_code"] == 3
    assert "kernel.cache_flush unknown" in run.stderr


def test_target_kernel_without_tdx_support_warns(tmp_path: Path) -> None:
    spec = tdx_host()
    spec.extra_files["boot/config-6.19.0-1-amd64"] = config_text(
        "6.19.0-1-amd64", {"CONFIG_KEXEC_CORE": "y", "CONFIG_INTEL_TDX_HOST": "n"}
    )
    root = gate_root(
        tmp_path,
        spec,
        **{
            "vmlinuz-6.19.0-1-amd64": bzimage(
                "6.19.0-1-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian"
            )
        },
    )
    run = hook(
        root,
        "load",
        "-l",
        "/boot/vmlinuz-6.19.0-1-amd64",
        "--reuse-cmdline",
        opts=("--format", "json"),
    )
    report = run.json()
    target = next(c for c in report["checks"] if c["id"] == "target.kernel")
    assert target["status"] == "warn" and "6.19.0-1-amd64" in target["summary"]
    assert target["evidence"]["release"] == "6.19.0-1-amd64"
    assert run.code == 0  # advisory: a warning does not block


def test_target_kernel_with_tdx_support_passes(tmp_path: Path) -> None:
    root = gate_root(tmp_path, None, **{f"vmlinuz-{RELEASE}": bzimage(f"{RELEASE} (x) #1 SMP")})
    run = hook(root, "load", "-l", f"/boot/vmlinuz-{RELEASE}", opts=("--format", "json"))
    assert statuses(run.json())["target.kernel"] == "pass" and run.code == 0


@pytest.mark.parametrize(
    ("name", "data", "words"),
    [
        ("not-a-kernel", b"#!/bin/sh\necho hi\n" * 100, "not a bzImage"),
        ("empty", b"", "not a bzImage"),
        ("missing", None, "does not exist"),
        ("odd name $(touch pwned) ;`x`\nline", b"junk", "not a bzImage"),
    ],
)
def test_unreadable_targets_are_unknown_and_advisory(
    tmp_path: Path, name: str, data: bytes | None, words: str
) -> None:
    images = {name: data} if data is not None else {}
    root = gate_root(tmp_path, None, **images)
    run = hook(root, "load", "-l", f"/boot/{name}", opts=("--format", "json"))
    target = next(c for c in run.json()["checks"] if c["id"] == "target.kernel")
    assert target["status"] == "unknown" and words in target["summary"]
    assert run.code == 0
    assert not (Path.cwd() / "pwned").exists() and not (root / "pwned").exists()


def test_huge_sparse_image_is_read_bounded(tmp_path: Path) -> None:
    root = gate_root(tmp_path)
    image = root / "boot/vmlinuz-huge"
    image.write_bytes(bzimage(f"{RELEASE} (x)"))
    with open(image, "r+b") as f:
        f.truncate(1 << 30)
    start = time.monotonic()
    run = hook(root, "load", "-l", "/boot/vmlinuz-huge", opts=("--format", "json"))
    assert time.monotonic() - start < 10
    assert statuses(run.json())["target.kernel"] == "pass"


# -- exec -------------------------------------------------------------------------------


def test_exec_runs_the_command_only_on_allow(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    prog = f"import sys; open({str(marker)!r}, 'w').write('x'); sys.exit(7)"
    ok = run_cli("exec", "--root", str(gate_root(tmp_path / "a")), "--", sys.executable, "-c", prog)
    assert ok.code == 7 and marker.exists()  # exit 7: the command replaced the checker
    marker.unlink()
    spec = tdx_host(
        processes=[VmProc(pid=4242, cmdline=qemu_td_cmdline("td1"), misc_tdx=1)],
        misc_current={"tdx": 1},
    )
    blocked = run_cli(
        "exec", "--root", str(gate_root(tmp_path / "b", spec)), "--", sys.executable, "-c", prog
    )
    assert blocked.code == 1 and not marker.exists()
    assert "guests.td" in blocked.stdout and "verdict: BLOCK" in blocked.stdout


def test_exec_usage_errors_and_phase_from_kexec_args(tmp_path: Path) -> None:
    assert run_cli("exec").code == 2
    assert (
        run_cli("exec", "--root", str(gate_root(tmp_path / "a")), "--", "/nonexistent/kexec-e").code
        == 2
    )
    spec = tdx_host(cpu="sapphire_rapids", extra_bugs=["tdx_pw_mce"])
    run = run_cli(
        "exec",
        "--root",
        str(gate_root(tmp_path / "b", spec)),
        "--format",
        "json",
        "--",
        "kexec",
        "-p",
        "/boot/vmlinuz",
    )
    assert run.code == 1 and run.json()["phase"] == "crash"


# -- override ---------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="the override needs root")
def test_override_needs_root_and_a_reason_and_is_recorded(tmp_path: Path) -> None:
    spec = tdx_host(cpu="emerald_rapids", extra_bugs=["tdx_pw_mce"])
    root = gate_root(tmp_path, spec)
    assert hook(root, "exec", opts=("--force",)).code == 2
    assert hook(root, "exec", opts=("--force", "--reason", "  ")).code == 2
    assert hook(root, "exec", opts=("--reason", "x")).code == 2
    run = hook(
        root, "exec", opts=("--force", "--reason", "firmware update window", "--format", "json")
    )
    assert run.code == 0
    report = run.json()
    assert report["verdict"] == "block" and report["exit_code"] == 1  # still computed
    assert report["overridden"]["reason"] == "firmware update window"
    assert "uid 0" in report["overridden"]["by"]
    assert "OVERRIDDEN" in run.stderr and "errata.tdx_pw_mce" in run.stderr
    # Not root: refused with exit 2 before any work. The CLI runs in a process that
    # drops to nobody after importing (the interpreter may live where nobody can read).
    code = (
        "import os, sys; import tdx_preflight.cli as cli, tdx_preflight.gate;"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534);"
        f"sys.argv = ['tdx-preflight', 'hook', '--root', {str(root)!r}, '--force',"
        " '--reason', 'x', 'exec']; cli.main()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "needs root" in proc.stderr, proc.stderr


# -- races: a VM started after the daemon last reported -------------------------------------


@pytest.mark.skipif(kvm_usable() is not None, reason=str(kvm_usable()))
def test_hook_catches_a_vm_started_after_the_daemon_reported(kvm_holder, tmp_path: Path) -> None:
    d = DaemonProc(blocking={"guests.vm": ["exec"]})

    def vm_row(run: Any) -> dict[str, Any]:
        return next(c for c in run.json()["checks"] if c["id"] == "guests.vm")

    try:
        before = d.status()
        assert not before["live"]["vms"]
        args = ("hook", "--config", str(d.config_path), "--format", "json", "exec")
        # No VM yet: guests.vm passes (or is unknown where some process's descriptors
        # cannot be read, as on machines whose PID 1 refuses ptrace): never "VMs alive".
        assert vm_row(run_cli(*args))["status"] in ("pass", "unknown")
        d.signal(signal.SIGSTOP)  # the daemon cannot have seen what follows
        vm = kvm_holder("-accel", "kvm", "-name", "guest=late,debug-threads=on")
        run = run_cli(*args)
        row = vm_row(run)
        assert run.code == 1 and row["status"] == "warn" and "late" in row["summary"]
        d.signal(signal.SIGCONT)
        assert entries(d.wait_for(lambda s: entries(s, vm.pid)), vm.pid)
    finally:
        d.signal(signal.SIGCONT)
        d.cleanup()


def test_hook_on_another_root_never_takes_the_live_daemons_ledger(tmp_path: Path) -> None:
    d = DaemonProc()
    try:
        assert d.status()["verdict"] in ("allow", "block")
        d.signal(signal.SIGSTOP)  # a stale daemon: it cannot answer, and must not be needed
        root = build(
            tmp_path / "td",
            tdx_host(
                processes=[VmProc(pid=4242, cmdline=qemu_td_cmdline("td1"), misc_tdx=1)],
                misc_current={"tdx": 1},
            ),
        )
        run = run_cli(
            "hook", "--root", str(root), "--config", str(d.config_path), "--format", "json", "exec"
        )
        assert run.code == 1 and "guests.td" in run.stderr
        d.signal(signal.SIGCONT)
        run = run_cli(
            "hook", "--root", str(root), "--config", str(d.config_path), "--format", "json", "exec"
        )
        report = run.json()
        assert run.code == 1 and report["daemon"]["answered"] is True
        assert "the daemon watches root /" in report["daemon"]["why"]
    finally:
        d.signal(signal.SIGCONT)
        d.cleanup()


def test_an_internal_error_never_exits_0(tmp_path: Path) -> None:
    """A bug below the CLI (here: gather raising) must not read as allow."""
    root = gate_root(tmp_path)
    code = (
        "import sys, tdx_preflight.facts as f\n"
        "def boom(*a, **k):\n    raise RuntimeError('injected')\n"
        "f.gather = boom\n"
        "from tdx_preflight.cli import main\n"
        f"sys.argv = ['tdx-preflight', 'hook', '--root', {str(root)!r}, 'exec']\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "internal error" in proc.stderr and "injected" in proc.stderr
