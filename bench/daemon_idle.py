#!/usr/bin/env python3
"""What the daemon costs while nothing happens: CPU time, wake-ups and memory.

Starts the real `tdx-preflight daemon` (tests/daemonproc.py) with the default
reconcile_interval of 60 s and client_timeout 10, waits for READY=1 on its
NOTIFY_SOCKET, then reads its utime+stime (all threads, /proc/PID/stat) once a
second for DURATION seconds while no VM comes or goes and no client talks to
it. Nothing is sent to the daemon during the window; its reconcile count is
read from state.json, which the daemon writes by itself.

Printed: CPU seconds over the window and per minute (target < 0.1 s per
minute), the seconds in which it used any CPU, its context switches (wake-ups),
VmRSS at the end of the window (target < 45 MiB), then VmRSS again once VMS
real KVM VMs (one tests/conftest.py KvmHolder) are alive and shown.

The timer's first reconcile falls at READY + reconcile_interval + 0.2 s: with
the default 60 s window it lands just outside; --duration 65 takes it in.

    python3 bench/daemon_idle.py [--duration 60] [--vms 50]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _daemonbench import (
    DaemonProc,
    cpu_seconds,
    die_without_kvm,
    live_keys,
    rss_mib,
    wait_until,
)
from conftest import KvmHolder


def status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return "?"


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of the process (all its threads), psutil."""
    import psutil

    c = psutil.Process(pid).num_ctx_switches()
    return c.voluntary + c.involuntary


def counters(state_file: str) -> tuple[int | None, int | None]:
    """(reconciles, uevents applied) from the daemon's state.json."""
    try:
        state = json.loads(Path(state_file).read_text())
    except (OSError, ValueError):
        return None, None
    return state.get("reconciles"), state.get("events")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="idle window, s (default 60)")
    ap.add_argument(
        "--skip", type=float, default=0.0, help="start the window S s after READY (default 0)"
    )
    ap.add_argument("--interval", type=float, default=60.0, help="reconcile_interval (default 60)")
    ap.add_argument("--vms", type=int, default=50, help="VMs for the second RSS (default 50)")
    ap.add_argument("--summary", help="also write the key figures as JSON to this file")
    args = ap.parse_args()
    if args.vms:
        die_without_kvm()
    d = holder = None
    try:
        d = DaemonProc(reconcile_interval=args.interval, client_timeout=10)
        t_ready = time.monotonic()
        pid = d.proc.pid
        rss_ready = rss_mib(pid)
        time.sleep(args.skip)
        rec0, ev0 = counters(d.state_file)
        cpu0, sw0, t0 = cpu_seconds(pid), context_switches(pid), time.monotonic()
        busy: list[tuple[float, float]] = []  # (seconds into the window, CPU s in that second)
        last = cpu0
        end = t0 + args.duration
        while (now := time.monotonic()) < end:
            time.sleep(min(1.0, end - now))
            c = cpu_seconds(pid)
            if c > last:
                busy.append((time.monotonic() - t0, c - last))
            last = c
        cpu1, sw1, t1 = cpu_seconds(pid), context_switches(pid), time.monotonic()
        rss_idle, hwm, threads = (
            rss_mib(pid),
            status_field(pid, "VmHWM"),
            status_field(pid, "Threads"),
        )
        rec1, ev1 = counters(d.state_file)
        rss_vms = None
        if args.vms:
            holder = KvmHolder(count=args.vms)
            want = {(holder.pid, fd) for fd in holder.fds}
            if not wait_until(lambda: want <= live_keys(d.status()), 15, 0.05):
                raise SystemExit(f"the daemon did not show the {args.vms} VMs within 15 s")
            time.sleep(1.0)  # the debounced refresh and state write
            rss_vms = rss_mib(pid)
    finally:
        if holder is not None:
            holder.stop()
        if d is not None:
            d.cleanup()

    window = t1 - t0
    cpu = cpu1 - cpu0
    per_min = cpu * 60 / window
    print(
        f"daemon pid {pid}, reconcile_interval {args.interval:g} s; window "
        f"{window:.1f} s starting {t0 - t_ready:.1f} s after READY"
    )
    print(f"  reconciles in the window      {rec0} -> {rec1} (from state.json)")
    print(
        f"  KVM uevents in the window     {ev0} -> {ev1} (any other than 0 -> 0: "
        "VMs came or went on this host, the window was not idle)"
    )
    print()
    print(f"  {'':34} {'value':>12}   target")
    print(f"  {'CPU (user+system) in window':34} {cpu:10.2f} s   (psutil cpu_times)")
    print(
        f"  {'CPU per minute':34} {per_min:10.3f} s   < 0.1 s: "
        f"{'met' if per_min < 0.1 else 'NOT met'}"
    )
    print(f"  {'context switches in window':34} {sw1 - sw0:12d}")
    print(f"  {'VmRSS at READY':34} {rss_ready:8.1f} MiB")
    print(
        f"  {'VmRSS at the end, idle':34} {rss_idle:8.1f} MiB   < 45 MiB: "
        f"{'met' if rss_idle < 45 else 'NOT met'}"
    )
    print(f"  {'VmHWM (peak) at the end':34} {hwm:>12}")
    print(f"  {'threads at the end':34} {threads:>12}")
    if rss_vms is not None:
        print(
            f"  {f'VmRSS with {args.vms} VMs alive':34} {rss_vms:8.1f} MiB   < 45 MiB: "
            f"{'met' if rss_vms < 45 else 'NOT met'}"
        )
    print()
    spent = ", ".join(f"{t:.0f}s: {c * 1000:.0f} ms" for t, c in busy) or "none"
    print(f"  CPU by second of the window (10 ms ticks): {spent}")

    if args.summary:
        summary = {
            "window_s": window,
            "cpu_per_min_s": per_min,
            "rss_idle_mib": rss_idle,
            "rss_vms_mib": rss_vms,
            "vms": args.vms,
        }
        Path(args.summary).write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
