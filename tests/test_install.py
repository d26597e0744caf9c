"""install-integrations and uninstall-integrations: what they write, what they remove.

The library functions write into a temporary prefix; the commands are run as a real
subprocess from a real `pip install .` (non-editable) into a fresh virtual environment, so
the files come from the wheel's package data, as on an operator's host.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from debbuild import copy_source_tree

from tdx_preflight.integrations import (
    MANIFEST,
    SHIPPED,
    IntegrationFilesMissing,
    ManifestError,
    Step,
    install_integrations,
    uninstall_integrations,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED_ROOT = REPO / "tdx_preflight" / "shipped"
WRAPPER = REPO / "config" / "kexec-wrapper.sh"


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _tree(root: Path) -> list[str]:
    """Every path under `root` (itself included), with its type: what "as before" compares."""
    return sorted(
        f"{p.relative_to(root.parent)} {'l' if p.is_symlink() else 'd' if p.is_dir() else 'f'}"
        for p in [root, *root.rglob("*")]
    )


def _copies(steps: list[Step]) -> list[tuple[str, str]]:
    return [(s.source, s.destination) for s in steps if s.action == "copy"]


def test_the_shipped_directory_is_the_top_level_tree() -> None:
    # One copy of each file: the package's shipped/ points at systemd/ and config/.
    for name in ("systemd", "config"):
        link = SHIPPED_ROOT / name
        assert link.is_symlink() and os.readlink(link) == f"../../{name}"
        assert link.resolve() == REPO / name


def test_install_puts_every_file_in_place(tmp_path: Path, strict_umask: None) -> None:
    prefix = tmp_path / "root"
    steps = install_integrations(str(prefix))
    assert _copies(steps) == [
        (str(SHIPPED_ROOT / s.source), str(prefix / s.destination)) for s in SHIPPED
    ]
    expected = {
        "etc/systemd/system/tdx-preflight.service": 0o644,
        "etc/systemd/system/kexec-load.service.d/tdx-preflight.conf": 0o644,
        "etc/systemd/system/kdump.service.d/tdx-preflight.conf": 0o644,
        "etc/systemd/system/kdump-tools.service.d/tdx-preflight.conf": 0o644,
        "usr/local/sbin/kexec-gated": 0o755,
        "etc/prometheus/rules/tdx-preflight-rules.yaml": 0o644,
        "etc/tdx-preflight/config.yaml": 0o644,
        MANIFEST: 0o644,
    }
    installed = {str(p.relative_to(prefix)): _mode(p) for p in prefix.rglob("*") if not p.is_dir()}
    assert installed == expected
    for source, destination in _copies(steps):
        assert Path(destination).read_bytes() == Path(source).read_bytes()
    for directory in (p for p in prefix.rglob("*") if p.is_dir()):
        assert _mode(directory) == 0o755, directory
    assert os.access(prefix / "usr/local/sbin/kexec-gated", os.X_OK)


def test_install_dry_run_writes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    planned = install_integrations(str(prefix), dry_run=True)
    assert not prefix.exists()
    prefix.mkdir()
    assert install_integrations(str(prefix), dry_run=True) == planned
    assert list(prefix.iterdir()) == []
    assert install_integrations(str(prefix)) == planned


def test_install_keeps_the_operators_config(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    config = prefix / "etc/tdx-preflight/config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("block_on_warn: [postkexec.tdx]\n")
    config.chmod(0o600)
    for dry_run in (True, False):
        steps = install_integrations(str(prefix), dry_run=dry_run)
        assert str(config) not in {d for _, d in _copies(steps)}
        assert Step("keep", str(config), str(SHIPPED_ROOT / "config/tdx-preflight.yaml"),
                    "already there") in steps  # fmt: skip
        assert len(_copies(steps)) == len(SHIPPED) - 1
    assert config.read_text() == "block_on_warn: [postkexec.tdx]\n"
    assert _mode(config) == 0o600
    assert [p.name for p in config.parent.iterdir()] == ["config.yaml"]  # no temporary left
    # Not the install's: uninstall leaves it, and the directory that holds it.
    uninstall_integrations(str(prefix))
    assert config.read_text() == "block_on_warn: [postkexec.tdx]\n"
    assert not (prefix / "etc/systemd").exists()

    # A dangling symlink is the operator's too.
    config.unlink()
    config.symlink_to(tmp_path / "elsewhere.yaml")
    install_integrations(str(prefix))
    assert config.is_symlink() and not (tmp_path / "elsewhere.yaml").exists()


def test_install_replaces_its_own_files(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    install_integrations(str(prefix))
    wrapper = prefix / "usr/local/sbin/kexec-gated"
    wrapper.write_text("stale\n")
    wrapper.chmod(0o600)
    install_integrations(str(prefix))
    assert wrapper.read_bytes() == WRAPPER.read_bytes() and _mode(wrapper) == 0o755


def test_install_without_the_shipped_files_says_so(tmp_path: Path) -> None:
    partial = tmp_path / "tree"
    (partial / "systemd").mkdir(parents=True)
    shutil.copy(REPO / "systemd/tdx-preflight.service", partial / "systemd")
    prefix = tmp_path / "root"
    with pytest.raises(IntegrationFilesMissing) as raised:
        install_integrations(str(prefix), source_root=partial)
    assert isinstance(raised.value, FileNotFoundError)
    assert "config/kexec-wrapper.sh" in str(raised.value) and str(partial) in str(raised.value)
    assert "systemd/tdx-preflight.service" not in raised.value.missing
    assert not prefix.exists()


def test_uninstall_leaves_the_prefix_as_it_was(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    (prefix / "etc/systemd/system").mkdir(parents=True)
    (prefix / "etc/systemd/system/other.service").write_text("[Service]\n")
    (prefix / "usr/local/bin").mkdir(parents=True)
    before = _tree(prefix)
    script = tmp_path / "venv/bin/tdx-preflight"
    install_integrations(str(prefix), script=script)
    assert os.readlink(prefix / "usr/local/bin/tdx-preflight") == str(script)
    # A second install adds nothing to remove and forgets nothing it made.
    install_integrations(str(prefix), script=script)
    entries = json.loads((prefix / MANIFEST).read_text())["entries"]
    assert len(entries) == len({(e["kind"], e["path"]) for e in entries})
    dry = uninstall_integrations(str(prefix), dry_run=True)
    assert _tree(prefix) != before
    steps = uninstall_integrations(str(prefix))
    assert steps == dry
    assert _tree(prefix) == before
    # Directories that were there before the install stay, even when they end up empty.
    assert {s.destination for s in steps if s.action == "rmdir"}.isdisjoint(
        {str(prefix / "etc/systemd/system"), str(prefix / "usr/local/bin")}
    )
    with pytest.raises(ManifestError, match="no manifest"):
        uninstall_integrations(str(prefix))


def test_uninstall_keeps_what_changed_since(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    prefix.mkdir()
    before = _tree(prefix)
    install_integrations(str(prefix))
    config = prefix / "etc/tdx-preflight/config.yaml"
    config.write_text("reconcile_interval: 30\n")
    extra = prefix / "etc/systemd/system/kdump.service.d/local.conf"
    extra.write_text("[Service]\n")
    steps = uninstall_integrations(str(prefix))
    kept = {s.destination: s.why for s in steps if s.action == "keep"}
    assert kept[str(config)] == "changed since the install"
    assert kept[str(extra.parent)].startswith("not empty")
    assert config.exists() and extra.exists()
    # The manifest stays, listing what is left; once the operator's files go, a second
    # uninstall finishes.
    config.unlink()
    extra.unlink()
    uninstall_integrations(str(prefix))
    assert _tree(prefix) == before


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, **kwargs
    )  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tdx-preflight from a real, non-editable `pip install .` into a fresh venv (README's)."""
    work = tmp_path_factory.mktemp("pip")
    venv = work / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    # A copy of the tree, so the build leaves nothing (build/, *.egg-info) in the checkout.
    tree = work / "src"
    # Only what git tracks or would (not .cache/ with its guest images, nor .venv/).
    copy_source_tree(tree)
    pip = _run([str(venv / "bin/pip"), "install", "-q", str(tree)])
    assert pip.returncode == 0, pip.stdout + pip.stderr
    shutil.rmtree(tree)  # the install must not lean on the source tree
    return venv / "bin/tdx-preflight"


def test_the_wheel_carries_the_json_schemas(wheel_install: Path) -> None:
    for name in ("report", "guests", "status"):
        run = _run([str(wheel_install), "schema", name])
        assert run.returncode == 0, run.stderr
        assert run.stdout == (REPO / "tdx_preflight/schema" / f"{name}.schema.json").read_text()


def test_a_wheel_install_installs_and_uninstalls(wheel_install: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    prefix.mkdir()
    before = _tree(prefix)
    dry = _run([str(wheel_install), "install-integrations", "--dry-run", "--prefix", str(prefix)])
    assert dry.returncode == 0, dry.stderr
    assert "site-packages/tdx_preflight/shipped/systemd/tdx-preflight.service" in dry.stdout
    assert _tree(prefix) == before

    done = _run([str(wheel_install), "install-integrations", "--prefix", str(prefix)])
    assert done.returncode == 0, done.stderr
    for item in SHIPPED:
        assert (prefix / item.destination).read_bytes() == (REPO / item.source).read_bytes()
    link = prefix / "usr/local/bin/tdx-preflight"
    assert os.readlink(link) == str(wheel_install)
    assert f"linked {link} -> {wheel_install}" in done.stdout.splitlines()

    gone = _run([str(wheel_install), "uninstall-integrations", "--prefix", str(prefix)])
    assert gone.returncode == 0, gone.stderr
    assert _tree(prefix) == before
    again = _run([str(wheel_install), "uninstall-integrations", "--prefix", str(prefix)])
    assert again.returncode == 2 and "no manifest" in again.stderr
