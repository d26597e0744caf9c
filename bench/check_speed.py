#!/usr/bin/env python3
"""Wall time of `tdx-preflight check` and `hook` on a large fixture host, against the click floor.

Builds (under /dev/shm when present) a host of 256 CPUs, 128 VMs of which 64
are TDs, N other processes, a 200,000-line kallsyms and a kernel image at
boot/vmlinuz-RELEASE, then prints the median of 10 runs of each of

    tdx-preflight check --root FIXTURE --format json
    tdx-preflight hook --root FIXTURE exec
    tdx-preflight hook --root FIXTURE load -- -l /boot/vmlinuz-RELEASE

beside the median of `python -c "import click"` with the same interpreter, and
each one's ratio to it. Runs are interleaved, so that drift on a busy machine
hits every command alike. `check` is measured with 200 other processes instead
of 20,000 too: with debugfs present the cost must follow the VMs, not the
processes.

The fixture's kallsyms is a regular file. On a live host /proc/kallsyms is a
seq_file that the kernel formats a page per read, which costs far more: the
scan of this machine's /proc/kallsyms is timed too, against a bare loop of the
same reads (when this process can read it). So is the live scan of a proc/PID/fd
directory of 200 descriptors (this process's own), against one readlink per path.

    python bench/check_speed.py [--runs 10] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
# The kallsyms figure runs the package's scanner in this process: this tree's copy.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from hostbuilder import VmProc, build, bzimage, qemu_td_cmdline, qemu_vm_cmdline, tdx_host

#: The fixture's kernel release (hostbuilder.tdx_host's); the image the hook loads carries it.
RELEASE = "6.18.2-1-amd64"
IMAGE = f"boot/vmlinuz-{RELEASE}"


def fixture(root: Path, other_processes: int) -> Path:
    procs = []
    for i in range(128):
        pid = 100_000 + i * 10
        if i < 64:
            procs.append(
                VmProc(
                    pid=pid,
                    cmdline=qemu_td_cmdline(f"td{i}"),
                    comm=f"td{i}",
                    cgroup=f"/machine.slice/td{i}.scope",
                    misc_tdx=1,
                )
            )
        else:
            procs.append(
                VmProc(
                    pid=pid, cmdline=qemu_vm_cmdline(f"vm{i}"), cgroup=f"/machine.slice/vm{i}.scope"
                )
            )
    spec = tdx_host(
        cpus=256,
        sockets=2,
        processes=procs,
        other_processes=other_processes,
        kallsyms_filler=200_000,
        misc_current={"tdx": 64},
    )
    assert spec.release == RELEASE
    spec.extra_files[IMAGE] = bzimage(f"{RELEASE} (debian-kernel@lists.debian.org) #1 SMP")
    return build(root, spec)


def medians(commands: dict[str, list[str]], runs: int) -> dict[str, float]:
    """Median wall time of each command; runs interleaved so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for cmd in commands.values():  # one warm-up each (page cache, dentries)
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(runs):
        for name, cmd in commands.items():
            start = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            times[name].append(time.perf_counter() - start)
            if proc.returncode not in (0, 1, 3):
                raise SystemExit(f"{cmd} failed: {proc.stderr.decode()}")
    return {name: statistics.median(t) for name, t in times.items()}


def live_kallsyms(runs: int) -> tuple[float, float, int] | None:
    """Median seconds of the kallsyms scan of this machine and of a bare loop of the same
    reads, and the file's size in bytes; None when /proc/kallsyms cannot be read."""
    from tdx_preflight.host import CHUNK, Host
    from tdx_preflight.readers.kernel import KALLSYMS_NAMES

    def bare() -> int:
        fd = os.open("/proc/kallsyms", os.O_RDONLY)
        try:
            buf = memoryview(bytearray(CHUNK))
            size = 0
            while n := os.readv(fd, [buf]):
                size += n
            return size
        finally:
            os.close(fd)

    try:
        size = bare()
    except OSError:
        return None
    scans: list[float] = []
    reads: list[float] = []
    host = Host("/")
    for _ in range(runs):
        start = time.perf_counter()
        host.find_symbols("proc/kallsyms", KALLSYMS_NAMES)
        scans.append(time.perf_counter() - start)
        start = time.perf_counter()
        bare()
        reads.append(time.perf_counter() - start)
    return statistics.median(scans), statistics.median(reads), size


def live_fd_scan(runs: int, descriptors: int = 200) -> tuple[float, float]:
    """Median seconds of Host("/").readlinks of this process's proc/PID/fd while it holds
    `descriptors` more descriptors (a QEMU with many vCPUs holds hundreds), and of the
    same scan by one readlink per path (/proc/PID/fd/N, as the live root once read it)."""
    from tdx_preflight.host import Host

    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(descriptors)]
    rel = f"proc/{os.getpid()}/fd"

    def by_path() -> dict[str, str]:
        out = {}
        for name in os.listdir("/" + rel):
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
                out[name] = os.readlink(f"/{rel}/{name}")
        return out

    try:
        host = Host("/")
        scans: list[float] = []
        paths: list[float] = []
        for _ in range(runs):
            start = time.perf_counter()
            host.readlinks(rel)
            scans.append(time.perf_counter() - start)
            start = time.perf_counter()
            by_path()
            paths.append(time.perf_counter() - start)
        return statistics.median(scans), statistics.median(paths)
    finally:
        for fd in held:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--keep", action="store_true", help="keep the fixtures")
    ap.add_argument("--summary", help="also write the key figures as JSON to this file")
    args = ap.parse_args()
    script = Path(sys.executable).parent / "tdx-preflight"
    if not script.exists():
        script = Path(shutil.which("tdx-preflight") or "tdx-preflight")
    # A regular install compiles bytecode; make sure this tree has it too.
    package = Path(__file__).resolve().parent.parent / "tdx_preflight"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    base = Path(
        tempfile.mkdtemp(prefix="tdx-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    try:
        t0 = time.perf_counter()
        big = fixture(base / "big", 20_000)
        small = fixture(base / "small", 200)
        print(f"fixtures built in {time.perf_counter() - t0:.1f} s under {base}")
        check = [str(script), "check", "--format", "json", "--root"]
        hook = [str(script), "hook", "--root"]
        m = medians(
            {
                "floor": [sys.executable, "-c", "import click"],
                "big": [*check, str(big)],
                "small": [*check, str(small)],
                "hook_exec": [*hook, str(big), "exec"],
                "hook_load": [*hook, str(big), "load", "--", "-l", f"/{IMAGE}"],
            },
            args.runs,
        )
        floor, t_big, t_small = m["floor"], m["big"], m["small"]

        def line(what: str, t: float, note: str = "") -> None:
            print(f"  {what:<40} {t * 1000:7.1f} ms   {t / floor:4.2f}x floor{note}")

        print(f"median of {args.runs} runs")
        print(f"  {'python -c import click':<40} {floor * 1000:7.1f} ms   (floor)")
        line("check, 20,000 other processes", t_big, " (target <= 1.5x)")
        line("check, 200 other processes", t_small)
        line("hook exec, 20,000 other processes", m["hook_exec"], " (target <= 1.5x)")
        line("hook load -- -l IMAGE, 20,000 other", m["hook_load"], " (target <= 1.5x)")
        print(
            f"  {'check, 20,000 vs 200 processes':<40} {t_big / t_small:7.3f}x    (target <= 1.10x)"
        )
        live = live_kallsyms(args.runs)
        if live is not None:
            scan, read, size = live
            print(
                f"  {'/proc/kallsyms scan, this machine':<40} {scan * 1000:7.1f} ms   "
                f"{scan / read:4.2f}x its bare reads ({read * 1000:.1f} ms, {size >> 20} MiB)"
            )
        fd_scan, fd_by_path = live_fd_scan(max(args.runs, 50))
        print(
            f"  {'live proc/PID/fd scan, 200 descriptors':<40} {fd_scan * 1e6:7.0f} us   "
            f"{fd_scan / fd_by_path:4.2f}x one readlink per path ({fd_by_path * 1e6:.0f} us)"
        )
        if args.summary:
            summary = {
                "floor_ms": floor * 1000,
                "check_ms": t_big * 1000,
                "check_small_ms": t_small * 1000,
                "hook_exec_ms": m["hook_exec"] * 1000,
                "hook_load_ms": m["hook_load"] * 1000,
                "ratio": t_big / floor,
                "hook_exec_ratio": m["hook_exec"] / floor,
                "hook_load_ratio": m["hook_load"] / floor,
                "scaling": t_big / t_small,
                "fd_scan_live_us": fd_scan * 1e6,
                "fd_scan_live_vs_paths": fd_scan / fd_by_path,
            }
            if live is not None:
                summary["kallsyms_live_ms"] = live[0] * 1000
                summary["kallsyms_live_vs_reads"] = live[0] / live[1]
            Path(args.summary).write_text(json.dumps(summary))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
