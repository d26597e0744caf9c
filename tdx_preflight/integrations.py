"""Installing the shipped integrations: the agent's unit, the kexec/kdump drop-ins, the wrapper.

Owns the list of files under systemd/ and config/ that a TDX host gets, where each goes and
with which mode, and the copy itself: atomic per file, directories made world-readable, the
operator's /etc/tdx-preflight/config.yaml never overwritten. The files are not package data
(pyproject.toml does not declare them), so they are found beside the package in the source
tree: a source checkout or an editable install (`pip install -e .`) has them, a wheel does not.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SHIPPED", "IntegrationFilesMissing", "Shipped", "install_integrations"]


@dataclass(frozen=True)
class Shipped:
    """One shipped file: its path in the source tree, where it goes under the prefix, its mode."""

    source: str
    destination: str
    mode: int = 0o644
    # The operator's file once present: installed only when the destination does not exist.
    keep_existing: bool = False


SHIPPED: tuple[Shipped, ...] = (
    Shipped("systemd/tdx-preflight.service", "etc/systemd/system/tdx-preflight.service"),
    Shipped(
        "systemd/kexec-load.service.d/tdx-preflight.conf",
        "etc/systemd/system/kexec-load.service.d/tdx-preflight.conf",
    ),
    Shipped(
        "systemd/kdump.service.d/tdx-preflight.conf",
        "etc/systemd/system/kdump.service.d/tdx-preflight.conf",
    ),
    Shipped(
        "systemd/kdump-tools.service.d/tdx-preflight.conf",
        "etc/systemd/system/kdump-tools.service.d/tdx-preflight.conf",
    ),
    Shipped("config/kexec-wrapper.sh", "usr/local/sbin/kexec-gated", mode=0o755),
    Shipped(
        "config/prometheus/tdx-preflight-rules.yaml",
        "etc/prometheus/rules/tdx-preflight-rules.yaml",
    ),
    Shipped("config/tdx-preflight.yaml", "etc/tdx-preflight/config.yaml", keep_existing=True),
)

# The source tree that holds systemd/ and config/: the directory above the package.
SOURCE_ROOT = Path(__file__).resolve().parent.parent

_DIR_MODE = 0o755


class IntegrationFilesMissing(FileNotFoundError):
    """The shipped files are not beside the package (an install from a wheel, or a partial tree)."""

    def __init__(self, root: Path, missing: list[str]) -> None:
        self.root = root
        self.missing = missing
        super().__init__(
            f"the integration files are not installed with this copy of tdx-preflight: "
            f"{', '.join(missing)} missing under {root}. They ship in the source tree (systemd/ "
            f"and config/), not in the wheel: run install-integrations from a source checkout "
            f"installed with `pip install -e .`, or copy the files by hand."
        )


def install_integrations(
    prefix: str = "/", dry_run: bool = False, *, source_root: str | Path | None = None
) -> list[tuple[str, str]]:
    """Copy the shipped integrations under `prefix`; return the (source, destination) pairs.

    What goes where (destinations relative to `prefix`; see `SHIPPED`):

        systemd/tdx-preflight.service          etc/systemd/system/tdx-preflight.service
        systemd/kexec-load.service.d/...conf   etc/systemd/system/kexec-load.service.d/...
        systemd/kdump.service.d/...conf        etc/systemd/system/kdump.service.d/...
        systemd/kdump-tools.service.d/...conf  etc/systemd/system/kdump-tools.service.d/...
        config/kexec-wrapper.sh                usr/local/sbin/kexec-gated            (0755)
        config/prometheus/...-rules.yaml       etc/prometheus/rules/tdx-preflight-rules.yaml
        config/tdx-preflight.yaml              etc/tdx-preflight/config.yaml  (only if absent)

    Every other file is replaced atomically (a temporary file in the same directory, then a
    rename) with mode 0644, or 0755 for the wrapper, whatever the umask; directories created
    on the way get 0755. An existing etc/tdx-preflight/config.yaml (a file, a directory or a
    symlink, even a dangling one) is never touched and is left out of the returned list.

    With `dry_run` nothing is created or written: the list says what would be copied (the
    config included only when it is absent now). All sources are checked before anything is
    written. Nothing else is done: no `systemctl daemon-reload`, no enabling, no link to
    /usr/local/bin/tdx-preflight, which the units and the wrapper run.

    Arguments: `prefix` is the root to install under ("/" for the live host, a staging
    directory for a package build); `source_root` is the directory holding systemd/ and config/
    (default: the source tree this module was imported from).

    Raises IntegrationFilesMissing (a FileNotFoundError) when the shipped files are not there,
    as in a wheel install, naming what is missing; OSError when a destination cannot be
    written (the pairs copied before it stay copied).

    A click command is a thin shell around it, for example:

        @cli.command("install-integrations")
        @click.option("--prefix", default="/", show_default=True,
                      type=click.Path(file_okay=False))
        @click.option("--dry-run", is_flag=True)
        def install_integrations_cmd(prefix: str, dry_run: bool) -> None:
            try:
                pairs = install_integrations(prefix, dry_run=dry_run)
            except OSError as exc:  # IntegrationFilesMissing included; its text says why
                raise click.ClickException(str(exc)) from exc
            for source, destination in pairs:
                click.echo(f"{source} -> {destination}")
    """
    root = Path(source_root) if source_root is not None else SOURCE_ROOT
    missing = [item.source for item in SHIPPED if not (root / item.source).is_file()]
    if missing:
        raise IntegrationFilesMissing(root, missing)

    base = Path(prefix)
    done: list[tuple[str, str]] = []
    for item in SHIPPED:
        source = root / item.source
        destination = base / item.destination
        if item.keep_existing and _exists(destination):
            continue
        if not dry_run:
            _make_dirs(destination.parent)
            if not _copy(source, destination, item.mode, replace=not item.keep_existing):
                continue
        done.append((str(source), str(destination)))
    return done


def _exists(path: Path) -> bool:
    # A dangling symlink counts: it is the operator's, and writing through it is not ours to do.
    return path.exists() or path.is_symlink()


def _make_dirs(directory: Path) -> None:
    """Create `directory` and its missing parents with mode 0755, whatever the umask."""
    missing: list[Path] = []
    walk = directory
    while not walk.exists() and not walk.is_symlink():
        missing.append(walk)
        walk = walk.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=_DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(path, _DIR_MODE)


def _copy(source: Path, destination: Path, mode: int, *, replace: bool) -> bool:
    """Write `source` to `destination` via a temporary file in the destination's directory.

    replace=True renames over an existing destination. replace=False links the new file into
    place, which fails if anything appeared there meanwhile: that is left alone and False
    returned. True when the destination now holds the source.
    """
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        if replace:
            os.replace(tmp, destination)
            return True
        try:
            os.link(tmp, destination)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
