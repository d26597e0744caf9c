"""Build (once) and cache the Debian guest image the e2e test boots.

Two cache layers under ``$TDXPF_E2E_CACHE`` (default ``.cache/e2e`` in the tree, git-ignored):

- ``base-<hash>/rootfs``: an mmdebstrap tree of Debian 12 (minbase, the kernel, systemd with
  logind and D-Bus, kexec-tools, kdump-tools and the package's dependencies) keyed by the
  hash of the recipe below;
- ``image-<hash>/``: ``root.ext4`` (mke2fs -d), ``vmlinuz``, ``initrd.img``, keyed by the
  base hash, the guest files and the project's tree. The project goes in as its Debian
  package: built from the tree by dpkg-buildpackage (tests/debbuild.py) and installed with
  ``dpkg -i`` in the guest's root, so the guest runs what a Debian operator installs (the
  unit, the drop-ins, the kexec diversion, the conffile).

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
CACHE = Path(os.environ.get("TDXPF_E2E_CACHE", PROJECT / ".cache" / "e2e"))
sys.path.insert(0, str(PROJECT / "tests"))
from debbuild import build_deb, source_files  # noqa: E402

SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
PACKAGES = (
    "linux-image-amd64",
    "kexec-tools",
    "kdump-tools",
    "systemd-sysv",
    "dbus",
    "udev",
    "kmod",
    "procps",
    "python3",
    # The package's dependencies (debian/control), so that `dpkg -i` needs no network.
    "python3-click",
    "python3-jeepney",
    "python3-prometheus-client",
    "python3-psutil",
    "python3-yaml",
)
# A small initramfs (TCG decompresses and boots it much faster than MODULES=most). Set before
# the kernel is configured, so that kdump-tools' kernel hook builds its crash-kernel initrd
# from the same list (its default, MODULES=dep, cannot find a root device in a chroot).
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4")
ESSENTIAL_HOOK = r"""
mkdir -p "$1/etc/initramfs-tools/conf.d"
printf 'MODULES=list\nCOMPRESS=gzip\n' > "$1/etc/initramfs-tools/conf.d/tdxpf-e2e"
"""
BASE_HOOK = r"""
set -e
root="$1"
echo tdxpf-e2e > "$root/etc/hostname"
printf '%s\n' {modules} >> "$root/etc/initramfs-tools/modules"
chroot "$root" update-initramfs -u -k all
# The crash-kernel initrd, and the stamp kdump-config compares to decide to rebuild it at boot
# (two minutes under TCG otherwise).
for v in $(chroot "$root" linux-version list); do
    chroot "$root" /etc/kernel/postinst.d/kdump-tools "$v"
    cp "$root/etc/kdump/sysctl.conf" "$root/var/lib/kdump/latest_sysctls-$v"
done
: > "$root/etc/fstab"
# A persistent journal: the second boot reads the first one's (journalctl -b -1).
mkdir -p "$root/var/log/journal"
for u in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer \
         apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
         systemd-timesyncd.service man-db.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$u"
done
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
""".replace("{modules}", " ".join(INITRAMFS_MODULES))


def log(msg: str) -> None:
    print(f"[e2e-image] {msg}", file=sys.stderr, flush=True)


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:16]


def base_key() -> str:
    recipe = "\n".join((SUITE, *MIRRORS, *PACKAGES, ESSENTIAL_HOOK, BASE_HOOK, "minbase"))
    return _sha(recipe.encode())


def image_key() -> str:
    parts = [base_key().encode(), Path(__file__).read_bytes()]
    for p in (PROJECT / "tests/kvm_holder.py", PROJECT / "tests/debbuild.py"):
        parts += [p.name.encode(), p.read_bytes()]
    for p in sorted(GUEST.rglob("*")):
        if p.is_file():
            parts += [str(p.relative_to(GUEST)).encode(), p.read_bytes()]
    # What goes into the package: the tree as git sees it, tests and benchmarks aside.
    for name in source_files():
        if not name.startswith(("tests/", "bench/")):
            path = PROJECT / name
            body = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
            parts += [name.encode(), body]
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
            "--essential-hook=" + ESSENTIAL_HOOK.strip(),
            "--customize-hook=" + BASE_HOOK.strip(),
            SUITE,
            str(tmp),
            *MIRRORS,
        ]
    )
    tmp.rename(rootfs)
    (d / "done").write_text("ok\n")
    return rootfs


# What the guest's root gets besides the package: the boot-time driver and its unit, the
# KVM VM holder of the live tests, and the operator's edits to the package's conffile.
GUEST_INSTALL = r"""
set -e
dpkg -i /tmp/tdx-preflight.deb
rm /tmp/tdx-preflight.deb
cat /etc/tdxpf-e2e/config-append.yaml >> /etc/tdx-preflight/config.yaml
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
    with tempfile.TemporaryDirectory(prefix="tdxpf-e2e-deb-") as tmp:
        log("building the Debian package (dpkg-buildpackage)")
        shutil.copy2(build_deb(Path(tmp)), work / "tmp/tdx-preflight.deb")
    shutil.copy2(GUEST / "tdxpf-e2e", work / "usr/local/sbin/tdxpf-e2e")
    os.chmod(work / "usr/local/sbin/tdxpf-e2e", 0o755)
    shutil.copy2(GUEST / "tdxpf-e2e.service", work / "etc/systemd/system/tdxpf-e2e.service")
    (work / "etc/tdxpf-e2e").mkdir(exist_ok=True)
    for p in GUEST.glob("*.yaml"):
        shutil.copy2(p, work / "etc/tdxpf-e2e" / p.name)
    shutil.copy2(PROJECT / "tests/kvm_holder.py", work / "etc/tdxpf-e2e/kvm_holder.py")
    # dpkg -i and systemctl enable work offline in a chroot: no service is started there
    # (deb-systemd-invoke starts nothing while systemd does not run).
    clean_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    # Its own mount and PID namespaces with a /proc of their own: gone with the process.
    inner = (
        f'mount --make-rprivate / && mount -t proc proc "{work}/proc" && '
        f'exec chroot "{work}" /bin/sh -c "$1"'
    )
    run(
        ["unshare", "--mount", "--pid", "--fork", "sh", "-c", inner, "sh", GUEST_INSTALL],
        env=clean_env,
    )
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
