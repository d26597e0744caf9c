"""The rest of the CLI surface: --version, explain, guests, usage errors."""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli
from hostbuilder import VmProc, build, qemu_td_cmdline, qemu_vm_cmdline, tdx_host

from tdx_preflight import __version__
from tdx_preflight.checks import CHECKS


def test_version() -> None:
    run = run_cli("--version")
    assert run.code == 0 and __version__ in run.stdout


def test_explain_every_check() -> None:
    listing = run_cli("explain")
    assert listing.code == 0
    for chk in CHECKS:
        assert chk.id in listing.stdout
        run = run_cli("explain", chk.id)
        assert run.code == 0
        for part in ("Question:", "Why:", "Reads:", "Blocks in:", "How to fix:"):
            assert part in run.stdout, (chk.id, part)
        assert chk.why.split()[0] in run.stdout


def test_explain_shows_configured_blocking(tmp_path: Path) -> None:
    assert "never (advisory)" in run_cli("explain", "guests.vm").stdout
    cfg = tmp_path / "c.yaml"
    cfg.write_text("blocking:\n  guests.vm: [exec]\n")
    run = run_cli("explain", "guests.vm", "--config", str(cfg))
    assert run.code == 0 and "Blocks in: exec (configured in" in run.stdout


def test_explain_unknown_check_is_a_usage_error() -> None:
    run = run_cli("explain", "guests.nope")
    assert run.code == 2 and "guests.td" in run.stderr


def test_bad_phase_and_missing_root_are_usage_errors(tmp_path: Path) -> None:
    assert run_cli("check", "--phase", "reboot").code == 2
    assert run_cli("check", "--root", str(tmp_path / "none")).code == 2


def test_guests_text_and_json(tmp_path: Path) -> None:
    td = VmProc(pid=4242, cmdline=qemu_td_cmdline("td1"), comm="td1", misc_tdx=1)
    vm = VmProc(pid=5000, cmdline=qemu_vm_cmdline("web1"))
    root = build(tmp_path / "root", tdx_host(processes=[td, vm], misc_current={"tdx": 1}))
    data = run_cli("guests", "--root", str(root), "--format", "json").json()
    assert data["enumeration"] == {
        "method": "debugfs+proc",
        "complete": True,
        "problem": None,
        "notes": [],
    }
    assert {(g["pid"], g["kind"], g["name"]) for g in data["guests"]} == {
        (4242, "td", "td1"),
        (5000, "vm", "web1"),
    }
    assert data["root_misc_current_tdx"] == 1
    text = run_cli("guests", "--root", str(root))
    assert text.code == 0
    assert "2 VMs, 1 TD guests" in text.stdout
    assert any(line.startswith("td") and "td1" in line for line in text.stdout.splitlines())


def test_guests_without_any_enumeration_exits_3(tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host(debugfs_kvm=False))
    (root / "proc").rename(root / "proc.gone")
    run = run_cli("guests", "--root", str(root), "--format", "json")
    assert run.code == 3 and run.json()["enumeration"]["method"] is None


def test_verbose_check_shows_evidence(tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host())
    run = run_cli("check", "--root", str(root), "-v")
    assert run.code == 0 and "evidence:" in run.stdout and "1.5.08" in run.stdout


def test_install_integrations_into_a_prefix(tmp_path: Path) -> None:
    dry = run_cli("install-integrations", "--dry-run", "--prefix", str(tmp_path))
    assert dry.code == 0 and "would copy" in dry.stdout and not any(tmp_path.iterdir())
    run = run_cli("install-integrations", "--prefix", str(tmp_path))
    assert run.code == 0
    assert (tmp_path / "etc/systemd/system/tdx-preflight.service").is_file()
    assert (tmp_path / "etc/systemd/system/kexec-load.service.d/tdx-preflight.conf").is_file()
    link = tmp_path / "usr/local/bin/tdx-preflight"
    assert link.is_symlink() and link.resolve().exists()
    again = run_cli("install-integrations", "--prefix", str(tmp_path))
    assert again.code == 0 and "kept" in again.stdout
