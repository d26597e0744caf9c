"""Build (once) and cache the Debian guest image the e2e kexec test boots.

Two cache layers under ``$TDXPF_E2E_CACHE`` (default ``/var/cache/tdx-preflight-e2e``):

- ``base-<hash>/rootfs``: an mmdebstrap tree (minbase + kernel, kexec-tools, python3,
  systemd, udev, kmod) keyed by the hash of the base recipe below;
- ``image-<hash>/``: ``root.ext4`` (mke2fs -d), ``vmlinuz``, ``initrd.img``, keyed by the
  base hash + the guest driver files + the project's source tree; the project is
  installed into a venv in the guest from wheels built on the host (``pip wheel``),
  offline (``--no-index --find-links``).

Run ``python tests/e2e/e2e_image.py`` to build without booting; it prints the image dir.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent.parent
GUEST = HERE / "guest"
CACHE = Path(os.environ.get("TDXPF_E2E_CACHE", "/var/cache/tdx-preflight-e2e"))

SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
PACKAGES = (
    "linux-image-amd64",
    "kexec-tools",
    "python3",
    "python3-venv",
    "systemd-sysv",
    "udev",
    "kmod",
    "procps",
    "e2fsprogs",
)
# A small initramfs (TCG decompresses and boots it much faster than MODULES=most).
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4")
BASE_HOOK = r"""
set -e
root="$1"
echo tdxpf-e2e > "$root/etc/hostname"
printf 'MODULES=list\nCOMPRESS=gzip\n' > "$root/etc/initramfs-tools/conf.d/tdxpf-e2e"
printf '%s\n' {modules} >> "$root/etc/initramfs-tools/modules"
chroot "$root" update-initramfs -u -k all
: > "$root/etc/fstab"
for u in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer \
         apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
         systemd-timesyncd.service kexec-load.service kexec.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$u"
done
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
""".replace("{modules}", " ".join(INITRAMFS_MODULES))

# Project files that go into the wheel (hashed for the image key, copied for the build).
PROJECT_EXCLUDE = {
    ".venv",
    ".git",
    "tests",
    "bench",
    "build",
    "dist",
    "__pycache__",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    ".mypy_cache",
}


def log(msg: str) -> None:
    print(f"[e2e-image] {msg}", file=sys.stderr, flush=True)


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:16]


def base_key() -> str:
    recipe = "\n".join((SUITE, *MIRRORS, *PACKAGES, BASE_HOOK, "minbase")).encode()
    return _sha(recipe)


def _project_files() -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(PROJECT):
        dirnames[:] = sorted(
            d for d in dirnames if d not in PROJECT_EXCLUDE and not d.endswith(".egg-info")
        )
        for f in sorted(filenames):
            if f.endswith((".pyc", ".pyo")):
                continue
            out.append(Path(dirpath) / f)
    return out


def image_key() -> str:
    parts = [base_key().encode(), Path(__file__).read_bytes()]
    for p in sorted(GUEST.rglob("*")):
        if p.is_file():
            parts += [str(p.relative_to(GUEST)).encode(), p.read_bytes()]
    for p in _project_files():
        parts += [str(p.relative_to(PROJECT)).encode(), p.read_bytes()]
    return _sha(*parts)


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def build_base() -> Path:
    d = CACHE / f"base-{base_key()}"
    rootfs = d / "rootfs"
    if (d / "done").exists():
        return rootfs
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    tmp = d / "rootfs.tmp"
    run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--include=" + ",".join(PACKAGES),
            "--customize-hook=" + BASE_HOOK.strip(),
            SUITE,
            str(tmp),
            *MIRRORS,
        ]
    )
    tmp.rename(rootfs)
    (d / "done").write_text("ok\n")
    return rootfs


def build_wheels(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="tdxpf-e2e-src-") as src:
        for p in _project_files():
            dst = Path(src) / p.relative_to(PROJECT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst)
        # Built from a copy so that setuptools writes nothing (build/, egg-info) into the repo.
        run([sys.executable, "-m", "pip", "wheel", "-q", src, "-w", str(out)])


GUEST_INSTALL = r"""
set -e
python3 -m venv /opt/tdx-preflight
/opt/tdx-preflight/bin/pip install -q --no-index --find-links /opt/tdxpf-wheels tdx-preflight
ln -sf /opt/tdx-preflight/bin/tdx-preflight /usr/local/bin/tdx-preflight
systemctl enable tdxpf-e2e.service
"""


def build_image() -> Path:
    """The cached image dir (root.ext4, vmlinuz, initrd.img), built when missing."""
    d = CACHE / f"image-{image_key()}"
    if (d / "done").exists():
        log(f"cached image {d}")
        return d
    base = build_base()
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    work = d / "rootfs"
    run(["cp", "-a", str(base), str(work)])
    wheels = work / "opt/tdxpf-wheels"
    wheels.mkdir(parents=True)
    build_wheels(wheels)
    shutil.copy2(GUEST / "tdxpf-e2e", work / "usr/local/sbin/tdxpf-e2e")
    os.chmod(work / "usr/local/sbin/tdxpf-e2e", 0o755)
    shutil.copy2(GUEST / "tdxpf-e2e.service", work / "etc/systemd/system/tdxpf-e2e.service")
    (work / "etc/tdxpf-e2e").mkdir(exist_ok=True)
    for p in GUEST.glob("*.yaml"):
        shutil.copy2(p, work / "etc/tdxpf-e2e" / p.name)
    # systemctl enable works offline in a chroot; the venv needs no /proc for a pure install.
    clean_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    run(["chroot", str(work), "/bin/sh", "-c", GUEST_INSTALL], env=clean_env)
    boot = work / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    if not kernels:
        raise RuntimeError(f"no kernel in {boot}")
    release = kernels[-1].name.removeprefix("vmlinuz-")
    shutil.copy2(boot / f"vmlinuz-{release}", d / "vmlinuz")
    shutil.copy2(boot / f"initrd.img-{release}", d / "initrd.img")
    (d / "release").write_text(release + "\n")
    run(
        [
            "mke2fs",
            "-q",
            "-t",
            "ext4",
            "-L",
            "tdxpf-root",
            "-d",
            str(work),
            str(d / "root.ext4"),
            "3G",
        ]
    )
    shutil.rmtree(work)
    (d / "done").write_text("ok\n")
    # Older images of this recipe are useless now; keep the base layers.
    for old in CACHE.glob("image-*"):
        if old != d:
            shutil.rmtree(old, ignore_errors=True)
    log(f"built image {d}")
    return d


if __name__ == "__main__":
    print(build_image())
