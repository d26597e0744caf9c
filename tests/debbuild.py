"""Build the project's Debian package from a copy of the tree, for the tests that install it.

`build_deb(work)` copies the tracked and new (not ignored) files of the tree into
`work/src`, runs `dpkg-buildpackage -us -uc -b` there with Debian's own python3 and
tools (nothing from a venv), and returns the path of the `tdx-preflight_*_all.deb`
it wrote into `work`, next to the `.changes` file. The tree itself is never written.
Raises `BuildFailed` with the tail of the build's output when it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Debian's own python3 and tools: a venv's or pyenv's python must not build the package.
BUILD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
#: What dpkg-buildpackage and the lint need (README's test command installs them).
BUILD_TOOLS = ("dpkg-buildpackage", "lintian", "help2man")


class BuildFailed(RuntimeError):
    """dpkg-buildpackage (or the copy of the tree) failed; the message has its output's tail."""


def build_tools_missing() -> list[str]:
    """The build tools not on Debian's PATH (empty when the package can be built here)."""
    return [t for t in BUILD_TOOLS if not shutil.which(t, path=BUILD_ENV["PATH"])]


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]


def source_files() -> list[str]:
    """The tree's tracked and new (not git-ignored) files, as paths relative to it, sorted.

    What a clean checkout would hold plus what is not committed yet: never the caches,
    venvs and build products that .gitignore names (the e2e image cache is gigabytes).
    Files deleted in the working tree are left out.
    """
    files = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO)
    if files.returncode != 0:
        raise BuildFailed(f"git ls-files: {files.stderr}")
    return sorted(
        name
        for name in set(filter(None, files.stdout.split("\0")))
        if (REPO / name).exists() or (REPO / name).is_symlink()
    )


def copy_source_tree(dst: Path) -> None:
    """Copy `source_files()` to `dst`, symlinks as links."""
    for name in source_files():
        source = REPO / name
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)


def build_deb(work: Path) -> Path:
    """The .deb built from a copy of the tree in `work` (see the module docstring)."""
    src = work / "src"
    copy_source_tree(src)
    env = {**BUILD_ENV, "HOME": str(work)}
    build = _run(["nice", "-n", "10", "dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, env=env)
    if build.returncode != 0:
        raise BuildFailed(build.stdout[-4000:] + build.stderr[-4000:])
    (built,) = work.glob("tdx-preflight_*_all.deb")
    return built
