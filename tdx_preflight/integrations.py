"""Installing and uninstalling the shipped integrations: unit, kexec/kdump drop-ins, wrapper.

Owns the list of files under systemd/ and config/ that a TDX host gets, where each goes and
with which mode, the copy itself (atomic per file, directories made world-readable, the
operator's /etc/tdx-preflight/config.yaml never overwritten), and the manifest of what an
install wrote, which is all an uninstall removes.

The files come from the installed package: tdx_preflight/shipped/ holds them in a wheel
(package data), and in the source tree its two entries are symlinks to the top-level systemd/
and config/, so an editable install reads the same files a wheel carries.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST",
    "SHIPPED",
    "IntegrationFilesMissing",
    "ManifestError",
    "Shipped",
    "Step",
    "install_integrations",
    "uninstall_integrations",
]


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

#: Where the shipped files are: package data in a wheel, symlinks to systemd/ and config/ in
#: the source tree.
SOURCE_ROOT = Path(__file__).resolve().parent / "shipped"
#: The link every unit, drop-in and the wrapper run.
LINK = "usr/local/bin/tdx-preflight"
#: What an install wrote, relative to the prefix; uninstall removes exactly that.
MANIFEST = "var/lib/tdx-preflight/integrations.json"
MANIFEST_SCHEMA = 1

_DIR_MODE = 0o755


@dataclass(frozen=True)
class Step:
    """One thing install or uninstall did (or, with dry_run, would do).

    action: install "copy", "link", "keep" (an existing file or link left alone); uninstall
    "remove", "rmdir", "keep" (changed since the install, or a directory not empty).
    """

    action: str
    destination: str
    source: str = ""
    why: str = ""


class IntegrationFilesMissing(FileNotFoundError):
    """The shipped files are not in the installed package (a broken or partial install)."""

    def __init__(self, root: Path, missing: list[str]) -> None:
        self.root = root
        self.missing = missing
        super().__init__(
            f"the integration files are not installed with this copy of tdx-preflight: "
            f"{', '.join(missing)} missing under {root}. They are package data of "
            f"tdx_preflight (shipped/): reinstall tdx-preflight (`pip install .` from the "
            f"source tree). The Debian package leaves them out on purpose: it installs them "
            f"itself (/lib/systemd/system, /usr/sbin/kexec-gated, /etc/tdx-preflight), so "
            f"install-integrations is only for pip installs."
        )


class ManifestError(ValueError):
    """The manifest is missing, unreadable or not one this version wrote."""


def install_integrations(
    prefix: str = "/",
    dry_run: bool = False,
    *,
    source_root: str | Path | None = None,
    script: str | Path | None = None,
) -> list[Step]:
    """Copy the shipped integrations under `prefix`; return the steps, in order.

    What goes where (destinations relative to `prefix`; see `SHIPPED`):

        systemd/tdx-preflight.service          etc/systemd/system/tdx-preflight.service
        systemd/kexec-load.service.d/...conf   etc/systemd/system/kexec-load.service.d/...
        systemd/kdump.service.d/...conf        etc/systemd/system/kdump.service.d/...
        systemd/kdump-tools.service.d/...conf  etc/systemd/system/kdump-tools.service.d/...
        config/kexec-wrapper.sh                usr/local/sbin/kexec-gated            (0755)
        config/prometheus/...-rules.yaml       etc/prometheus/rules/tdx-preflight-rules.yaml
        config/tdx-preflight.yaml              etc/tdx-preflight/config.yaml  (only if absent)
        `script` (when given)                  usr/local/bin/tdx-preflight (symlink, if absent)

    Every other file is replaced atomically (a temporary file in the same directory, then a
    rename) with mode 0644, or 0755 for the wrapper, whatever the umask; directories created
    on the way get 0755. An existing etc/tdx-preflight/config.yaml or usr/local/bin/
    tdx-preflight (a file, a directory or a symlink, even a dangling one) is never touched: a
    "keep" step says so. What was written (files with their SHA-256, the link, and every
    directory the install created) is recorded in `MANIFEST` under the prefix, merged with the
    manifest of an earlier install, so that `uninstall_integrations` removes exactly that.

    With `dry_run` nothing is created or written. All sources are checked before anything is
    written. Nothing else is done: no `systemctl daemon-reload`, no enabling.

    Raises IntegrationFilesMissing (a FileNotFoundError) when the shipped files are not there,
    naming what is missing; ManifestError when an earlier manifest cannot be read; OSError when
    a destination cannot be written (the files copied before it stay copied and recorded).
    """
    root = Path(source_root) if source_root is not None else SOURCE_ROOT
    missing = [item.source for item in SHIPPED if not (root / item.source).is_file()]
    if missing:
        raise IntegrationFilesMissing(root, missing)
    base = Path(prefix)
    manifest = _Manifest.load(base, missing_ok=True)
    steps: list[Step] = []
    try:
        for item in SHIPPED:
            source = root / item.source
            destination = base / item.destination
            if item.keep_existing and _exists(destination):
                steps.append(Step("keep", str(destination), str(source), "already there"))
                continue
            if not dry_run:
                manifest.dirs_made(_make_dirs(destination.parent), base)
                if not _copy(source, destination, item.mode, replace=not item.keep_existing):
                    continue
                manifest.file_written(item.destination, _sha256(destination))
            steps.append(Step("copy", str(destination), str(source)))
        if script is not None:
            steps.append(_link(base, Path(script), manifest, dry_run))
    finally:
        if not dry_run:
            manifest.save(base)
    return steps


def _link(base: Path, script: Path, manifest: _Manifest, dry_run: bool) -> Step:
    link = base / LINK
    if _exists(link):
        return Step("keep", str(link), str(script), "already there")
    if not dry_run:
        manifest.dirs_made(_make_dirs(link.parent), base)
        link.symlink_to(script)
        manifest.link_made(LINK, str(script))
    return Step("link", str(link), str(script))


def uninstall_integrations(prefix: str = "/", dry_run: bool = False) -> list[Step]:
    """Remove what `install_integrations` recorded in the manifest under `prefix`.

    Files are removed only when they still hold what the install wrote (same SHA-256), links
    only when they still point where the install pointed them; anything changed since is kept
    and a "keep" step says why (an edited config.yaml is the operator's now). Directories the
    install created are removed when empty, deepest first; no other directory is touched.
    The manifest goes last, with the directories made for it; when something was kept, the
    manifest stays, listing only what is left, so a second uninstall can finish the job.

    Raises ManifestError when there is no manifest (nothing was installed under `prefix` by
    this tool, or it was removed by hand) or it cannot be read; OSError when a removal fails.
    """
    base = Path(prefix)
    manifest = _Manifest.load(base, missing_ok=False)
    steps: list[Step] = []
    left = _Manifest()
    for entry in manifest.entries:
        kind, rel = entry["kind"], entry["path"]
        path = base / rel
        if kind == "dir":
            continue
        if not _exists(path):
            continue
        if kind == "file":
            same = path.is_file() and not path.is_symlink() and _sha256(path) == entry["sha256"]
        else:
            same = path.is_symlink() and os.readlink(path) == entry["target"]
        if not same:
            steps.append(Step("keep", str(path), why="changed since the install"))
            left.entries.append(entry)
            continue
        if not dry_run:
            path.unlink()
        steps.append(Step("remove", str(path)))
    manifest_dirs = [e for e in manifest.entries if e["kind"] == "dir" and e.get("for_manifest")]
    dirs = [e for e in manifest.entries if e["kind"] == "dir" and not e.get("for_manifest")]
    removed = {s.destination for s in steps if s.action == "remove"}
    steps += _rmdirs(base, dirs, removed, left, dry_run)
    if left.entries:
        left.entries[:0] = manifest_dirs
        if not dry_run:
            left.save(base)
        return steps
    if not dry_run:
        (base / MANIFEST).unlink()
    steps.append(Step("remove", str(base / MANIFEST)))
    removed.add(str(base / MANIFEST))
    steps += _rmdirs(base, manifest_dirs, removed, left, dry_run)
    return steps


def _rmdirs(
    base: Path, dirs: list[dict[str, Any]], removed: set[str], left: _Manifest, dry_run: bool
) -> list[Step]:
    """rmdir each recorded directory that is (or, in a dry run, would be) empty, deepest first."""
    steps: list[Step] = []
    for entry in sorted(dirs, key=lambda e: len(Path(e["path"]).parts), reverse=True):
        path = base / entry["path"]
        if not path.is_dir() or path.is_symlink():
            continue
        rest = [p for p in path.iterdir() if str(p) not in removed]
        if rest:
            steps.append(Step("keep", str(path), why=f"not empty ({len(rest)} entries)"))
            left.entries.append(entry)
            continue
        if not dry_run:
            try:
                path.rmdir()
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                steps.append(Step("keep", str(path), why="not empty"))
                left.entries.append(entry)
                continue
        removed.add(str(path))
        steps.append(Step("rmdir", str(path)))
    return steps


class _Manifest:
    """The JSON manifest: entries {"kind": "dir"|"file"|"link", "path": relative, ...}."""

    def __init__(self, entries: list[dict[str, Any]] | None = None) -> None:
        self.entries: list[dict[str, Any]] = entries or []

    @classmethod
    def load(cls, base: Path, *, missing_ok: bool) -> _Manifest:
        path = base / MANIFEST
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            if missing_ok:
                return cls()
            raise ManifestError(
                f"no manifest at {path}: install-integrations was not run with this prefix "
                f"(or its manifest was removed); nothing is removed"
            ) from None
        except (OSError, ValueError) as exc:
            raise ManifestError(f"cannot read the manifest {path}: {exc}") from exc
        entries = data.get("entries") if isinstance(data, dict) else None
        if data.get("schema") != MANIFEST_SCHEMA or not isinstance(entries, list):
            raise ManifestError(f"{path} is not a manifest of schema {MANIFEST_SCHEMA}")
        for e in entries:
            if not (
                isinstance(e, dict)
                and e.get("kind") in ("dir", "file", "link")
                and isinstance(e.get("path"), str)
                and not Path(e["path"]).is_absolute()
                and ".." not in Path(e["path"]).parts
            ):
                raise ManifestError(f"{path}: malformed entry {e!r}")
        return cls(entries)

    def _find(self, kind: str, rel: str) -> dict[str, Any] | None:
        return next((e for e in self.entries if e["kind"] == kind and e["path"] == rel), None)

    def dirs_made(self, made: list[Path], base: Path, *, for_manifest: bool = False) -> None:
        for path in made:
            entry: dict[str, Any] = {"kind": "dir", "path": str(path.relative_to(base))}
            if for_manifest:
                entry["for_manifest"] = True
            self.entries.append(entry)

    def file_written(self, rel: str, sha256: str) -> None:
        entry = self._find("file", rel)
        if entry is None:
            self.entries.append({"kind": "file", "path": rel, "sha256": sha256})
        else:
            entry["sha256"] = sha256

    def link_made(self, rel: str, target: str) -> None:
        self.entries.append({"kind": "link", "path": rel, "target": target})

    def save(self, base: Path) -> None:
        if not self.entries:
            return
        path = base / MANIFEST
        self.dirs_made(_make_dirs(path.parent), base, for_manifest=True)
        data = json.dumps({"schema": MANIFEST_SCHEMA, "entries": self.entries}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(data + "\n")
                os.fchmod(out.fileno(), 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _exists(path: Path) -> bool:
    # A dangling symlink counts: it is the operator's, and writing through it is not ours to do.
    return path.exists() or path.is_symlink()


def _make_dirs(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents with mode 0755; return those created."""
    missing: list[Path] = []
    walk = directory
    while not walk.exists() and not walk.is_symlink():
        missing.append(walk)
        walk = walk.parent
    made: list[Path] = []
    for path in reversed(missing):
        try:
            path.mkdir(mode=_DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(path, _DIR_MODE)
        made.append(path)
    return made


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
