"""What an operator asks of a live process: how long it has run, how much memory it holds.

Read through psutil (its /proc parsing is kept by its maintainers, not here);
only on the live root: a fixture or snapshot has no running processes.
"""

from __future__ import annotations

import time
from typing import Any


def process_info(pid: int) -> dict[str, Any] | None:
    """{"uptime_s": float, "rss_bytes": int} of a running process, or None when it
    has gone or cannot be read."""
    import psutil

    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return {
                "uptime_s": round(max(0.0, time.time() - p.create_time()), 1),
                "rss_bytes": p.memory_info().rss,
            }
    except (psutil.Error, OSError):
        return None


def own_health() -> dict[str, Any]:
    """This process's health, for the daemon's status: {"uptime_s", "cpu_seconds",
    "rss_bytes", "open_fds", "threads"} (psutil.Process of os.getpid())."""
    import psutil

    p = psutil.Process()
    with p.oneshot():
        cpu = p.cpu_times()
        return {
            "uptime_s": round(max(0.0, time.time() - p.create_time()), 1),
            "cpu_seconds": round(cpu.user + cpu.system, 3),
            "rss_bytes": p.memory_info().rss,
            "open_fds": p.num_fds(),
            "threads": p.num_threads(),
        }
