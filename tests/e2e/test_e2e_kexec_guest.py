"""End to end: the Debian package under a real systemd and logind, up to a real kexec.

A Debian 12 guest under QEMU (TCG: no KVM is needed on the machine running the test) with an
emulated AMD CPU that has SVM, so the guest's own KVM works and VMs are real KVM VMs. Its root
holds the package built from this tree (e2e_image.py: dpkg-buildpackage, then `dpkg -i`), with
`inhibit_shutdown: true` and `blocking: guests.vm: [load, crash, exec]` added to the conffile.
The guest's driver (guest/tdxpf-e2e, a unit after multi-user.target) writes
``TDXPF-E2E: ...`` markers to the serial console; this test reads them and the console.

One QEMU process, three boots (the -snapshot overlay lives as long as the process):
1. first: the service starts (READY, watchdog); a TD and a second VM appear in `status` and the
   TD in `systemd-inhibit --list`; `systemctl --check-inhibitors=yes kexec` is refused; the
   kexec-load and kdump-tools units are gated (load and crash phases; the restart keeps the
   armed crash kernel); `kexec -e` by hand is refused with its reason in the journal; then a
   plain `systemctl kexec` runs the shutdown, and systemd-shutdown's final `kexec -e`, through
   the diversion, is refused (the second VM survived) and falls back to a cold reboot;
2. cold: the refusals are in the first boot's journal; `tdx-preflight exec -- systemctl kexec`
   is allowed (no VM) and the final `kexec -e` too;
3. kexec: the kernel loaded with tdxpf.second=1 runs, the service with it; power off.

Runs in the suite (CI: README's test command installs QEMU and mmdebstrap); as root, it needs
mmdebstrap, chroot and mke2fs. Deselect with ``-m 'not e2e'``. The image is cached
(e2e_image.py). Environment: ``TDXPF_E2E_TIMEOUT`` (seconds for the whole run, default 1200),
``TDXPF_E2E_SMP`` (vCPUs, default 1), ``TDXPF_E2E_CACHE`` (see e2e_image.py).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_image

pytestmark = pytest.mark.e2e

QEMU = "qemu-system-x86_64"
TOOLS = ("qemu-system-x86_64", "mmdebstrap", "mke2fs", "dpkg-buildpackage", "unshare")
MARK = "TDXPF-E2E: "


def say(msg: str) -> None:
    print(f"[e2e] {msg}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def image() -> Path:
    if os.geteuid() != 0:
        pytest.fail("the e2e image needs root (mmdebstrap --mode=root, chroot, mke2fs -d)")
    missing = [t for t in TOOLS if not shutil.which(t)]
    assert not missing, f"missing {missing}: README's test command installs them"
    t0 = time.monotonic()
    d = e2e_image.build_image()
    say(f"image ready in {time.monotonic() - t0:.1f}s: {d}")
    return d


@pytest.fixture
def qemu(image: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    log = tmp_path / "serial.log"
    cmd = [
        QEMU,
        "-machine",
        "q35",
        "-accel",
        "tcg",
        # An AMD CPU with SVM: TCG emulates SVM, so kvm_amd loads in the guest and KVM_CREATE_VM
        # works there (no VMX under TCG: an Intel model would have no /dev/kvm).
        "-cpu",
        "EPYC,+svm",
        "-smp",
        os.environ.get("TDXPF_E2E_SMP", "1"),
        "-m",
        "1536",
        "-kernel",
        str(image / "vmlinuz"),
        "-initrd",
        str(image / "initrd.img"),
        "-append",
        "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=1 panic=-1 crashkernel=192M",
        # -snapshot: the cached image is never written; the guest's writes go to a temporary
        # overlay that lives as long as this QEMU process, across the guest's reboots.
        "-drive",
        f"file={image / 'root.ext4'},format=raw,if=virtio",
        "-snapshot",
        "-nographic",
        "-serial",
        f"file:{log}",
        "-monitor",
        "none",
        "-nic",
        "none",
    ]
    say("$ " + " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            say(f"killing QEMU pid {proc.pid}")
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        keep = Path(e2e_image.CACHE) / "last-serial.log"
        if log.exists():
            shutil.copy2(log, keep)
            say(f"serial log kept at {keep}")


def _markers(log: Path) -> list[str]:
    if not log.exists():
        return []
    text = log.read_bytes().decode("utf-8", "replace")
    return [ln.split(MARK, 1)[1].strip() for ln in text.splitlines() if MARK in ln]


def _find(markers: list[str], prefix: str) -> str | None:
    return next((m for m in markers if m.startswith(prefix)), None)


def _kv(line: str | None, key: str) -> str | None:
    if line is None:
        return None
    found = re.search(rf"\b{re.escape(key)}=(\S+)", line)
    return found.group(1) if found else None


def _boots(markers: list[str]) -> dict[str, list[str]]:
    """The markers of each boot, by its kind (first, cold, kexec, unexpected)."""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for m in markers:
        if m.startswith("BOOT kind="):
            current = out.setdefault(m.split()[1].removeprefix("kind="), [])
        current.append(m)
    return out


def _console_between(log: Path, start: str, end: str) -> list[str]:
    """Console lines after the marker `start` and before the marker `end` (or the end)."""
    lines = log.read_bytes().decode("utf-8", "replace").splitlines()
    out: list[str] = []
    inside = False
    for ln in lines:
        if MARK + start in ln:
            inside = True
        elif inside and MARK + end in ln:
            break
        elif inside:
            out.append(ln)
    return out


STAGES = (
    "BOOT kind=first",
    "SERVICE",
    "STATUS",
    "GATED kdump-tools",
    "STAGE1-SYSTEMCTL-KEXEC",
    "BOOT kind=cold",
    "STAGE2-EXEC",
    "BOOT kind=kexec",
    "POWEROFF",
)
REFUSAL = re.compile(
    r"kexec-gated: tdx-preflight refused this kexec \(exit 1\);.*kexec exec blocked"
)


def test_package_under_systemd_gates_kexec(qemu: tuple[subprocess.Popen, Path]) -> None:
    proc, log = qemu
    budget = float(os.environ.get("TDXPF_E2E_TIMEOUT", "1200"))
    t0 = time.monotonic()
    seen: dict[str, float] = {}
    while time.monotonic() - t0 < budget:
        markers = _markers(log)
        for s in STAGES:
            if s not in seen and _find(markers, s):
                seen[s] = time.monotonic() - t0
                say(f"{seen[s]:7.1f}s  {_find(markers, s)}")
        if proc.poll() is not None:
            break
        time.sleep(1)
    elapsed = time.monotonic() - t0
    timed_out = proc.poll() is None
    boots = _boots(_markers(log))
    first, cold, second = boots.get("first", []), boots.get("cold", []), boots.get("kexec", [])
    results: list[tuple[str, bool, str]] = []

    def step(name: str, ok: bool, detail: str | None) -> None:
        results.append((name, ok, detail or "no marker"))

    pkg = _find(first, "PKG")
    step(
        "the package diverts kexec-tools' /sbin/kexec to kexec-gated",
        pkg is not None
        and "diversion of /sbin/kexec to /sbin/kexec.distrib by tdx-preflight" in pkg
        and _kv(pkg, "link") == "/usr/sbin/kexec-gated",
        pkg,
    )
    for kind, markers in (("first", first), ("cold", cold), ("kexec", second)):
        svc = _find(markers, "SERVICE")
        step(
            f"{kind} boot: tdx-preflight.service sent READY (Type=notify, active, running)",
            svc is not None
            and _kv(svc, "ready") == "yes"
            and _kv(svc, "Type") == "notify"
            and _kv(svc, "SubState") == "running"
            and _kv(svc, "WatchdogUSec") == "30s",
            svc,
        )
    dropins = [m for m in first if m.startswith("DROPIN")]
    step(
        "the package's drop-ins apply to kexec-load and kdump-tools",
        len(dropins) == 2
        and all("/lib/systemd/system/" in m and "tdx-preflight.conf" in m for m in dropins),
        " | ".join(dropins),
    )
    units = _find(first, "BOOT-UNITS")
    step(
        "at boot, with no VM: kexec-load and kdump-tools allowed, the crash kernel armed",
        _kv(units, "kexec-load") == "active"
        and _kv(units, "kdump-tools") == "active"
        and _kv(units, "kexec_crash_loaded") == "1",
        units,
    )
    for kind, markers in (("first", first), ("cold", cold)):
        load = _find(markers, "LOAD")
        step(
            f"{kind} boot: kexec -l through the diversion, allowed in the load phase",
            _kv(load, "rc") == "0" and _kv(load, "kexec_loaded") == "1",
            load,
        )
    status = _find(first, "STATUS")
    step(
        "status: the TD tracked, and the other VM as unknown (a TD runs, so TDX counts as in use "
        "and no misc cgroup count tells the other VM apart); the inhibitor held",
        _kv(status, "seen") == "yes"
        and _kv(status, "tds") == "1"
        and _kv(status, "vms") == "0"
        and _kv(status, "unknown") == "1"
        and _kv(status, "inhibitor_held") == "True",
        status,
    )
    inh = _find(first, "INHIBITOR")
    step(
        "systemd-inhibit --list shows tdx-preflight's shutdown block inhibitor",
        _kv(inh, "listed") == "yes" and "shutdown" in (inh or "") and "TD guest" in (inh or ""),
        inh,
    )
    ci = _find(first, "CHECK-INHIBITORS")
    step(
        "systemctl --check-inhibitors=yes kexec is refused while the TD runs",
        _kv(ci, "rc") not in (None, "0") and int(_kv(ci, "named") or 0) >= 1,
        ci,
    )
    kl = next((m for m in first if m.startswith("GATED kexec-load")), None)
    step(
        "kexec-load's start runs the load phase: blocked (a TD runs, the kernel flushes no TDX "
        "cache), the unit fails",
        kl is not None
        and _kv(kl, "rc") != "0"
        and _kv(kl, "state") == "failed"
        and "kexec load blocked: kernel.cache_flush" in kl,
        kl,
    )
    kd = next((m for m in first if m.startswith("GATED kdump-tools")), None)
    step(
        "kdump-tools' restart keeps the armed crash kernel; its start (crash phase) is blocked",
        kd is not None
        and _kv(kd, "rc") != "0"
        and _kv(kd, "state") == "failed"
        and _kv(kd, "kexec_crash_loaded") == "1"
        and "kexec crash blocked: kernel.cache_flush" in kd,
        kd,
    )
    by_hand = _find(first, "EXEC-BY-HAND")
    step(
        "kexec -e by hand is refused (exit 1) with its reason in the journal",
        _kv(by_hand, "rc") == "1"
        and _kv(by_hand, "kexec_loaded") == "1"
        and "kexec-gated: tdx-preflight refused this kexec" in (by_hand or "")
        and "kexec exec blocked: kernel.cache_flush" in (by_hand or ""),
        by_hand,
    )
    wd = _find(first, "WATCHDOG")
    pinged = (
        wd is not None
        and _kv(wd, "MainPID") == _kv(wd, "first_pid")
        and _kv(wd, "NRestarts") == "0"
        and int(_kv(wd, "WatchdogTimestampMonotonic") or 0)
        > int(_kv(wd, "ActiveEnterTimestampMonotonic") or 0)
        > 0
    )
    step("the watchdog: pinged after READY, the same process, never restarted", pinged, wd)
    final = [
        ln
        for ln in _console_between(log, "STAGE1-SYSTEMCTL-KEXEC ", "BOOT kind=")
        if REFUSAL.search(ln)
    ]
    step(
        "systemctl kexec: systemd-shutdown's final kexec -e goes through kexec-gated and is "
        "refused, on the console (kernel log and console record)",
        bool(final) and all("guests.vm" in ln for ln in final),
        " | ".join(final[:2]) or "no refusal on the console after STAGE1-SYSTEMCTL-KEXEC",
    )
    cb = _find(cold, "COLD-BOOT")
    step(
        "the refused kexec became a cold reboot (no kernel loaded after it)",
        cb is not None and _kv(cb, "kexec_loaded") == "0",
        cb,
    )
    prev = _find(cold, "PREVIOUS-BOOT-JOURNAL")
    step(
        "the first boot's journal holds the refusal (journalctl -b -1 -k)",
        prev is not None
        and int(prev.split()[1]) >= 1
        and "kexec exec blocked: kernel.cache_flush" in prev,
        prev,
    )
    sb = _find(second, "BOOT kind=kexec")
    step(
        "tdx-preflight exec -- systemctl kexec: allowed, the second kernel runs (tdxpf.second=1)",
        sb is not None and "tdxpf.second=1" in sb and _find(second, "SECOND-BOOT") is not None,
        sb,
    )
    step(
        "no unexpected boot; the guest powers off (QEMU exits)",
        not timed_out and "unexpected" not in boots and _find(second, "POWEROFF") is not None,
        f"qemu exit={proc.poll()} after {elapsed:.1f}s" + (" (TIMEOUT)" if timed_out else ""),
    )

    print()
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}\n      {detail}")
    print("timeline: " + ", ".join(f"{k} {v:.1f}s" for k, v in seen.items()))
    print(f"total guest run time: {elapsed:.1f}s")
    failed = [n for n, ok, _ in results if not ok]
    if failed:
        tail = log.read_bytes().decode("utf-8", "replace")[-8000:] if log.exists() else ""
        print("---- serial log tail ----\n" + tail)
    assert not failed, f"failed steps: {failed}"
