"""The daemon: one asyncio loop keeping a VM ledger current and serving reports.

Order at start: subscribe to kernel uevents first, then reconcile with the
kernel's truth (debugfs or /proc), then apply events. Events update the ledger
at once; a debounced refresh re-reads the host (in a worker thread), classifies
the VMs, recomputes the report and writes state.json. Reconcile runs again on
SIGHUP, on a lost-events overflow, when an event's COUNT disagrees with the
ledger, and every `reconcile_interval` seconds.

This module holds the Daemon's state, its life cycle (start, SIGHUP, stop), the
locks and the entry point; its parts live beside it: events.py (uevents applied
to the ledger), reconcile.py, refresh.py (facts, report, inhibitor, metrics) and
publish.py (status, control replies, state.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from typing import Any

from ..facts import HostFacts
from ..host import Host, Problem
from ..policy import ConfigError, Policy, load
from ..report import Report
from .control import ControlServer
from .events import UeventHandling
from .ledger import VmLedger, rfc3339
from .publish import Publishing
from .reconcile import Reconciling
from .refresh import Refreshing, status_line
from .uevents import UeventSource

log = logging.getLogger("tdx_preflight.daemon")

#: Settings a SIGHUP cannot change: the sockets and files the daemon holds open, and the
#: root it watches. Every other setting is applied in full on reload.
RESTART_ONLY = ("root", "control_socket", "socket_group", "state_file", "uevent_rcvbuf")


class Daemon(UeventHandling, Reconciling, Refreshing, Publishing):
    """The daemon's state and life cycle; its parts are the classes it is made of."""

    def __init__(self, policy: Policy, root: str, config_path: str | None) -> None:
        self.policy = policy
        self.root = root
        self.config_path = config_path
        self.host = Host(root)
        self.ledger = VmLedger()
        self.source = UeventSource(policy.uevent_rcvbuf)
        self.server: ControlServer | None = None
        self.started = time.time()
        self.resyncs = 0
        self.reconciles = 0
        self.events = 0
        self.facts: HostFacts | None = None
        self.report: Report | None = None
        self.last_reconcile: dict[str, Any] = {}
        #: Bumped by every SIGHUP once handled; error: why the new configuration was refused.
        self.reload: dict[str, Any] = {"generation": 0, "at": None, "error": None}
        self._stop = asyncio.Event()
        self._refresh_wanted = asyncio.Event()
        self._reconcile_wanted: str | None = None
        self._reconcile_event = asyncio.Event()
        self._state_wanted = asyncio.Event()
        self._inhibitor: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._fd_cache: dict[int, frozenset[int] | Problem | None] = {}
        self._fill_pending = False
        self._locks: list[int] = []
        self._timer_task: asyncio.Task[Any] | None = None
        self._boot_id: str | None = None
        #: Bumped on every change; status replies reuse the report of the same version.
        self._version = 0
        self._status_cache: tuple[int, Report | None] = (-1, None)
        from .notify import Notifier

        self.notifier = Notifier()

    # -- life cycle ----------------------------------------------------------------

    async def run(self) -> int:
        """Start (uevents, reconcile, refresh, control socket), serve until SIGTERM or SIGINT,
        stop; the exit code."""
        # Many control clients at once each hold a descriptor: lift the soft limit.
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        for path in (self.policy.control_socket, self.policy.state_file):
            os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        self._locks = take_locks((self.policy.control_socket, self.policy.state_file))
        boot = self.host.read_value("proc/sys/kernel/random/boot_id")
        self._boot_id = boot if isinstance(boot, str) else None
        await self.source.open()  # subscribe before the first reconcile: nothing falls between
        log.info(
            "uevents: kernel group 1, receive buffer %s bytes%s",
            self.source.effective_rcvbuf,
            "" if self.source.forced else " (not forced: no CAP_NET_ADMIN)",
        )
        self._reconcile_now("start")
        await self.refresh()
        self.server = ControlServer(
            self.policy.control_socket,
            self.policy.socket_group,
            self.policy.client_timeout,
            self.handle,
        )
        await self.server.start()
        self._write_state()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        self._tasks = [
            asyncio.create_task(self._event_loop(), name="uevents"),
            asyncio.create_task(self._refresher(), name="refresh"),
            asyncio.create_task(self._reconciler(), name="reconcile"),
            asyncio.create_task(self._state_writer(), name="state"),
            asyncio.create_task(self._metrics_heartbeat(), name="metrics"),
        ]
        self._start_timer()
        if self.notifier.watchdog_interval:
            self._tasks.append(asyncio.create_task(self._watchdog(), name="watchdog"))
        self.notifier.ready(status_line(self.report, self.ledger))
        log.info(
            "ready: %s; control socket %s",
            status_line(self.report, self.ledger),
            self.policy.control_socket,
        )
        await self._stop.wait()
        log.info("stopping")
        self.notifier.stopping()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.server.close()
        self.source.close()
        if self._inhibitor is not None:
            await asyncio.to_thread(self._inhibitor.close)
        self.host.close()
        return 0

    def _on_sighup(self) -> None:
        try:
            policy = load(self.config_path)
        except ConfigError as exc:
            log.error("reload: invalid configuration, keeping the old one: %s", exc)
            error: str | None = str(exc)
        else:
            self._apply_policy(policy)
            error = None
        # Published in status only once applied: `tdx-preflight reload` waits for it.
        self.reload = {
            "generation": self.reload["generation"] + 1,
            "at": rfc3339(time.time()),
            "error": error,
        }
        self._changed()
        self.request_reconcile("SIGHUP")

    def _apply_policy(self, policy: Policy) -> None:
        """Take a reloaded policy in full; name what only a restart changes."""
        fixed = [k for k in RESTART_ONLY if getattr(policy, k) != getattr(self.policy, k)]
        if fixed:
            log.warning("reload: %s change only with a restart; kept", ", ".join(fixed))
            policy = policy._replace(**{k: getattr(self.policy, k) for k in fixed})
        old, self.policy = self.policy, policy
        changed = [
            k for k in Policy._fields if k != "source" and getattr(old, k) != getattr(policy, k)
        ]
        if self.server is not None:
            self.server.timeout = policy.client_timeout
        if old.reconcile_interval != policy.reconcile_interval:
            self._start_timer()
        if (old.inhibit_shutdown, old.inhibit_bus) != (policy.inhibit_shutdown, policy.inhibit_bus):
            self._tasks.append(asyncio.create_task(self._drop_inhibitor(), name="inhibitor"))
        log.info(
            "reload: configuration %s loaded; applied: %s",
            policy.source or "(defaults)",
            ", ".join(changed) or "no change",
        )
        self._changed()  # the report, metrics and inhibitor follow the new policy

    def _start_timer(self) -> None:
        if self._timer_task is not None:
            self._timer_task.cancel()
        self._timer_task = None
        if self.policy.reconcile_interval > 0:
            self._timer_task = asyncio.create_task(self._timer(), name="timer")
            self._tasks.append(self._timer_task)

    def _changed(self) -> None:
        self._version += 1
        self._refresh_wanted.set()
        self._state_wanted.set()

    # -- watchdog ----------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval or 10.0
        while True:
            self.notifier.watchdog()  # from the loop itself: a stuck loop stops the pings
            await asyncio.sleep(interval)


class AlreadyRunning(Exception):
    """Another daemon holds the lock of this control socket or state file."""


def take_locks(paths: tuple[str, ...]) -> list[int]:
    """Hold an exclusive flock on PATH.lock for each path, for the daemon's life.

    One daemon per control socket and per state file (DESIGN.md "The agent"):
    a lock, not a probe of the socket, so two daemons starting at once cannot
    both win, and a dead daemon's lock goes with its process.
    Raises AlreadyRunning naming the path whose lock is held.
    """
    import fcntl

    fds: list[int] = []
    try:
        for path in sorted(set(paths)):
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(f"{path}.lock", flags, 0o600)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AlreadyRunning(f"another daemon holds {path}.lock") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def run_daemon(policy: Policy, root: str, config_path: str | None) -> int:
    """Run the daemon until SIGTERM; the process exit code (1: could not start).

    The cycle collector is turned on: the console entry (tdx_preflight.__main__)
    turns it off for the short-lived commands.
    """
    from .log import setup_logging

    gc.enable()

    setup_logging()
    daemon = Daemon(policy, root, config_path)
    try:
        return asyncio.run(daemon.run())
    except AlreadyRunning as exc:
        log.critical("cannot start: %s; one daemon per control socket and state file", exc)
        return 1
    except PermissionError as exc:
        log.critical("cannot start: %s (run as root)", exc)
        return 1
