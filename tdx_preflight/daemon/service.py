"""The daemon: one asyncio loop keeping a VM ledger current and serving reports.

Order at start: subscribe to kernel uevents first, then reconcile with the
kernel's truth (debugfs or /proc), then apply events. Events update the ledger
at once; a debounced refresh re-reads the host (in a worker thread), classifies
the VMs, recomputes the report and writes state.json. Reconcile runs again on
SIGHUP, on a lost-events overflow, when an event's COUNT disagrees with the
ledger, and every `reconcile_interval` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

from ..facts import HostFacts, gather
from ..host import Host, Problem
from ..metrics import write_metrics
from ..policy import ConfigError, Policy, load
from ..readers import kvm, vmclass
from ..readers.procinfo import own_health
from ..report import Report, evaluate
from .control import ControlServer, Peer, RequestError
from .ledger import CREATE_GRACE, Entry, VmLedger, rfc3339
from .state import SCHEMA, write_atomic
from .uevents import KvmEvent, Overflow, UeventSource

log = logging.getLogger("tdx_preflight.daemon")

#: Refresh (and rewrite state.json) once changes have paused this long, so a burst
#: costs one refresh; but never later than MAX_DELAY after the first change.
DEBOUNCE = 0.05
MAX_DELAY = 0.5
#: Reconciles closer together than this are merged.
RECONCILE_SPACING = 0.2
#: A VM announced by a uevent before its descriptor was installed: read the
#: process's descriptors again after these delays, then leave it to a reconcile.
FD_FILL_DELAYS = (0.002, 0.01, 0.05, 0.25, 1.0)
#: After a TD is destroyed, re-read misc.current at these delays to confirm teardown.
TEARDOWN_CHECKS = (0.05, 0.2, 1.0, 3.0, 10.0, 30.0)
#: Settings a SIGHUP cannot change: the sockets and files the daemon holds open, and the
#: root it watches. Every other setting is applied in full on reload.
RESTART_ONLY = ("root", "control_socket", "socket_group", "state_file", "uevent_rcvbuf")


def status_line(report: Report | None, ledger: VmLedger) -> str:
    tds = len(ledger.live_tds())
    vms = ledger.live_count - tds
    parts = []
    if tds:
        parts.append(f"{tds} TD guest{'s' if tds != 1 else ''} running")
    if vms:
        parts.append(f"{vms} VM{'s' if vms != 1 else ''}")
    if not parts:
        parts.append("no TD guest")
    verdict = "unknown" if report is None else report.verdict
    word = {"allow": "kexec allowed", "block": "kexec blocked"}.get(verdict, "not checked yet")
    return f"{', '.join(parts)}: {word}"


def _guest_of(e: Entry) -> vmclass.Guest:
    return vmclass.Guest(
        e.pid,
        e.tid,
        e.vm_fd if e.vm_fd is not None else -1,
        e.kind,
        e.name,
        tuple(e.evidence),
        vcpu_only=e.vcpu_only,
    )


class Daemon:
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

    async def _drop_inhibitor(self) -> None:
        """Release the inhibitor taken under the old settings; a refresh takes it anew."""
        inhibitor, self._inhibitor = self._inhibitor, None
        if inhibitor is not None:
            await asyncio.to_thread(inhibitor.close)
            log.info("shutdown inhibitor released: its settings changed")
        self._refresh_wanted.set()

    # -- events ----------------------------------------------------------------------

    async def _event_loop(self) -> None:
        while True:
            try:
                async for ev in self.source.events():
                    self.apply(ev)
            except Overflow as exc:
                self.resyncs += 1
                log.warning(
                    "uevents lost (%s): reopening and reconciling (resync %d)", exc, self.resyncs
                )
                self.source.close()
                await self.source.open()
                self._reconcile_now("overflow")
                self._changed()

    def apply(self, ev: KvmEvent) -> None:
        """Apply one KVM uevent to the ledger (DESIGN.md "The agent").

        The event's PID is the creating thread: it is mapped to its process
        now, while the thread may still exist. Without debugfs the event has no
        descriptor: the process's kvm-vm descriptors are read from /proc (once
        per burst, see _fds_of) to name the VM created or destroyed.
        """
        self.events += 1
        pid = kvm.tgid_of(self.host, ev.tid)
        pid = pid if isinstance(pid, int) else None
        if ev.event == "create":
            fds = None
            if ev.vm_fd is None and pid is not None:
                got = self._fds_of(pid, False)
                if isinstance(got, frozenset) and not (got - self.ledger.claimed_fds(pid)):
                    got = self._fds_of(pid, True)
                fds = got if isinstance(got, frozenset) else None
            entry, new = self.ledger.event_create(
                ev.tid, pid, ev.vm_fd, count=ev.count, serial=ev.created, fds=fds
            )
            if new:
                self._classify_new(entry)
            if entry.pid is None:
                # The creating thread exited before it could be mapped: a scan finds it.
                self.request_reconcile(f"creating thread {ev.tid} has exited")
            elif entry.vm_fd is None:
                self._schedule_fd_fill()
            log.info(
                "VM created: %s %s (tid %d fd %s)", entry.kind, entry.label(), ev.tid, entry.vm_fd
            )
        else:
            gone = self.ledger.event_destroy(
                ev.tid, pid, ev.vm_fd, count=ev.count, fds_of=self._fds_of
            )
            if gone is not None:
                log.info("VM destroyed: %s %s (fd %s)", gone.kind, gone.label(), gone.vm_fd)
                if gone.kind == "td":
                    self._schedule_teardown_checks()
        if ev.count is not None and ev.count != self.ledger.live_count:
            self.request_reconcile(
                f"COUNT {ev.count} from the kernel, {self.ledger.live_count} in the ledger"
            )
        self._changed()

    def _fds_of(self, pid: int, fresh: bool) -> frozenset[int] | Problem | None:
        """The kvm-vm descriptors of `pid` (None when it has gone), scanned at most
        once per turn of the event loop unless `fresh`: a burst of events for one
        process costs one scan of its descriptors, not one per event."""
        if not fresh and pid in self._fd_cache:
            return self._fd_cache[pid]
        got = kvm.vm_fds(self.host, pid)
        value = None if isinstance(got, Problem) and got.kind == "absent" else got
        if not self._fd_cache:
            asyncio.get_running_loop().call_soon(self._fd_cache.clear)
        self._fd_cache[pid] = value
        return value

    def _schedule_fd_fill(self) -> None:
        if self._fill_pending:
            return
        self._fill_pending = True
        asyncio.get_running_loop().call_later(FD_FILL_DELAYS[0], self._fill_fds, 0)

    def _fill_fds(self, attempt: int) -> None:
        """Read the descriptors of VMs announced before the kernel installed them."""
        self._fill_pending = False
        filled = 0
        for pid in self.ledger.wanting_fds():
            fds = self._fds_of(pid, True)
            if isinstance(fds, frozenset):
                filled += self.ledger.fill_fds(pid, fds)
        if filled:
            self._changed()
        if self.ledger.wanting_fds():
            if attempt + 1 < len(FD_FILL_DELAYS):
                self._fill_pending = True
                asyncio.get_running_loop().call_later(
                    FD_FILL_DELAYS[attempt + 1], self._fill_fds, attempt + 1
                )
            else:
                self.request_reconcile("VM descriptors not found in /proc")

    def _classify_new(self, entry: Entry) -> None:
        """Positive TD evidence now; the debounced refresh classifies the rest."""
        handle = kvm.VmHandle(
            entry.tid, entry.vm_fd if entry.vm_fd is not None else -1, entry.pid, "uevent create"
        )
        tdx_state = self.facts.tdx_use.state if self.facts else "no"
        [g] = vmclass.classify(
            self.host, kvm.Enumeration("event", (handle,)), "no", Problem("absent", "", "not read")
        )
        entry.name = g.name
        entry.evidence = ["uevent create", *g.evidence[1:]]
        if g.kind == "td" or entry.kind == "td":  # a TD stays one
            entry.kind = "td"
        else:
            # Without positive evidence on a TDX host the root misc count decides (refresh).
            entry.kind = "vm" if tdx_state == "no" else "unknown"

    def _changed(self) -> None:
        self._version += 1
        self._refresh_wanted.set()
        self._state_wanted.set()

    # -- reconcile ---------------------------------------------------------------------

    def request_reconcile(self, why: str) -> None:
        if self._reconcile_wanted is None:
            self._reconcile_wanted = why
        self._reconcile_event.set()

    def _reconcile_now(self, why: str) -> None:
        enumeration = kvm.enumerate_vms(self.host)
        if enumeration.method is None:
            log.error("reconcile (%s): cannot enumerate VMs: %s", why, enumeration.problem)
            self.last_reconcile = {
                "at": rfc3339(time.time()),
                "why": why,
                "error": str(enumeration.problem),
            }
            return
        before = {id(e): e.pid for e in self.ledger.live}
        added, removed, deferred = self.ledger.reconcile(
            enumeration.vms,
            enumeration.method,
            complete=enumeration.complete,
            unseen=enumeration.unseen,
        )
        if enumeration.problem is not None:
            kept = (
                "nothing removed"
                if enumeration.unseen is None
                else f"VMs of {len(enumeration.unseen)} unread processes kept"
            )
            log.log(
                logging.DEBUG if why == "timer" else logging.WARNING,
                "reconcile (%s): incomplete, %s: %s",
                why,
                kept,
                enumeration.problem,
            )
        if deferred:
            asyncio.get_running_loop().call_later(
                CREATE_GRACE + 0.1, self.request_reconcile, "deferred VMs"
            )
        for e in self.ledger.live:
            if id(e) not in before:
                self._classify_new(e)
                e.evidence.append("seen by reconcile")
            elif before[id(e)] is None and e.pid is not None:
                self._classify_new(e)  # its process is known only now
                e.evidence.append(f"holder pid {e.pid} found by reconcile")
        self.reconciles += 1
        self.last_reconcile = {
            "at": rfc3339(time.time()),
            "why": why,
            "added": added,
            "removed": removed,
            "method": enumeration.method,
        }
        level = logging.INFO if (added or removed or why != "timer") else logging.DEBUG
        log.log(
            level,
            "reconcile (%s): %d live, %d added, %d removed",
            why,
            self.ledger.live_count,
            added,
            removed,
        )
        if removed:
            self._schedule_teardown_checks()
        self._changed()

    async def _reconciler(self) -> None:
        while True:
            await self._reconcile_event.wait()
            await asyncio.sleep(RECONCILE_SPACING)
            self._reconcile_event.clear()
            why, self._reconcile_wanted = self._reconcile_wanted or "requested", None
            self._reconcile_now(why)

    async def _timer(self) -> None:
        while True:
            await asyncio.sleep(self.policy.reconcile_interval)
            self.request_reconcile("timer")

    def _schedule_teardown_checks(self) -> None:
        loop = asyncio.get_running_loop()
        for delay in TEARDOWN_CHECKS:
            loop.call_later(delay, self._check_teardowns)

    def _check_teardowns(self) -> None:
        if not self.ledger.pending_teardowns():
            return
        from ..readers import cgroup, view

        cgroup_ns = view.read_namespace(self.host, "cgroup").state
        count = cgroup.read_misc_root(self.host, cgroup_ns).tdx_current(self.host)
        for e in self.ledger.confirm_teardowns(count):
            log.info("TD teardown confirmed: %s (root misc.current tdx %s)", e.label(), count)
        self._changed()

    # -- refresh -------------------------------------------------------------------------

    def _gather(self) -> HostFacts:
        with Host(self.root) as host:
            return gather(host, load_msr_module=self.policy.load_msr_module)

    async def refresh(self) -> None:
        facts = await asyncio.to_thread(self._gather)
        self.ledger.classify(facts.guests)
        for e in self.ledger.confirm_teardowns(facts.root_tdx_current):
            log.info("TD teardown confirmed: %s", e.label())
        self.facts = facts
        self._version += 1
        self.report = self._current()
        self.notifier.status(status_line(self.report, self.ledger))
        await self._update_inhibitor()
        await self._write_metrics()

    async def _write_metrics(self) -> None:
        """Rewrite the metrics file (every phase) from the facts and the live ledger."""
        if not self.policy.metrics_file or self.facts is None:
            return
        reports = [self._evaluate(p) for p in ("load", "exec", "crash")]
        err = await asyncio.to_thread(write_metrics, self.policy.metrics_file, reports, "daemon")
        if err:
            log.warning("metrics: %s", err)

    async def _metrics_heartbeat(self) -> None:
        """Rewrite the metrics at least every metrics_interval, changes or not: on an idle
        host (reconcile_interval 0, no VM events) the timestamp would otherwise age until the
        stale alert fired on a healthy daemon."""
        while True:
            await asyncio.sleep(self.policy.metrics_interval)
            await self._write_metrics()

    @staticmethod
    async def _quiet(wanted: asyncio.Event, pause: float) -> None:
        """Wait for a change, then until changes pause (bounded by MAX_DELAY)."""
        await wanted.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAX_DELAY
        while True:
            wanted.clear()
            await asyncio.sleep(pause)
            if not wanted.is_set() or loop.time() >= deadline:
                wanted.clear()
                return

    async def _refresher(self) -> None:
        while True:
            await self._quiet(self._refresh_wanted, DEBOUNCE)
            try:
                await self.refresh()
            except Exception:
                log.exception("refresh failed")
            self._state_wanted.set()

    def _evaluate(self, phase: str, fresh: HostFacts | None = None) -> Report:
        """The report for `phase`: from freshly read facts, or from the last facts with
        the ledger's live VMs (which events keep current between refreshes)."""
        started = time.monotonic()
        if fresh is not None:
            facts = fresh._replace(ledger=self.ledger.view())
        else:
            assert self.facts is not None
            live = [_guest_of(e) for e in self.ledger.live]
            facts = self.facts._replace(guests=live, ledger=self.ledger.view())
        return evaluate(facts, phase, self.policy, started)

    async def _update_inhibitor(self) -> None:
        if not self.policy.inhibit_shutdown:
            return
        if self._inhibitor is None:
            from .inhibit import ShutdownInhibitor

            self._inhibitor = ShutdownInhibitor(self.policy.inhibit_bus)
        tds = self.ledger.live_tds()
        if tds:
            if not self._inhibitor.held:
                n = len(tds)
                why = f"{n} TD guest{'s' if n != 1 else ''} running: " + ", ".join(
                    e.label() for e in tds[:5]
                )
                err = await asyncio.to_thread(self._inhibitor.hold, why)
                if err:
                    log.warning("shutdown inhibitor not taken: %s", err)
                else:
                    log.info("shutdown inhibitor taken: %s", why)
        elif self._inhibitor.held and not self.ledger.pending_teardowns():
            await asyncio.to_thread(self._inhibitor.release)
            log.info("shutdown inhibitor released: no TD left")

    # -- state file ------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        report = self._current()
        return {
            "schema": SCHEMA,
            "boot_id": self._boot_id,
            "pid": os.getpid(),
            "generated_at": rfc3339(time.time()),
            "written_at": time.time(),
            **self.status(report),
            "report": report.to_json() if report else None,
            "ledger": self.ledger_json(),
        }

    def _write_state(self) -> None:
        try:
            write_atomic(self.policy.state_file, self.state())
        except OSError as exc:
            log.error("cannot write %s: %s", self.policy.state_file, exc)

    async def _state_writer(self) -> None:
        while True:
            await self._quiet(self._state_wanted, DEBOUNCE / 2)
            self._write_state()

    # -- watchdog ----------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval or 10.0
        while True:
            self.notifier.watchdog()  # from the loop itself: a stuck loop stops the pings
            await asyncio.sleep(interval)

    # -- control requests ---------------------------------------------------------------------

    def _current(self) -> Report | None:
        """The exec report for the ledger as it is now, evaluated once per change."""
        if self.facts is None:
            return None
        if self._status_cache[0] != self._version:
            self._status_cache = (self._version, self._evaluate("exec"))
        return self._status_cache[1]

    def status(self, report: Report | None = None) -> dict[str, Any]:
        report = report or self._current()
        live = self.ledger.live
        return {
            "daemon_pid": os.getpid(),
            "root": self.host.root,
            "generated_at": rfc3339(time.time()),
            "uptime_s": round(time.time() - self.started, 3),
            "phase": "exec",
            "verdict": report.verdict if report else None,
            "exit_code": report.exit_code if report else 3,
            "summary": report.summary if report else "not checked yet",
            "status_line": status_line(report, self.ledger),
            "live": {
                "tds": [e.to_json() for e in live if e.kind == "td"],
                "vms": [e.to_json() for e in live if e.kind == "vm"],
                "unknown": [e.to_json() for e in live if e.kind == "unknown"],
            },
            "recent_tds": [e.to_json() for e in self.ledger.recent_tds()],
            "resyncs": self.resyncs,
            "reconciles": self.reconciles,
            "health": own_health(),
            "last_reconcile": self.last_reconcile,
            "events": self.events,
            "reload": dict(self.reload),
            "uevent_rcvbuf": self.source.effective_rcvbuf,
            "inhibitor": {
                "enabled": self.policy.inhibit_shutdown,
                "held": bool(self._inhibitor and self._inhibitor.held),
            },
        }

    def ledger_json(self) -> dict[str, Any]:
        return {
            "root": self.host.root,
            "daemon_pid": os.getpid(),
            "live": [e.to_json() for e in self.ledger.live],
            "history": [e.to_json() for e in list(self.ledger.history)[-200:]],
            "tds_not_destroyed": list(self.ledger.view().tds_not_destroyed),
        }

    async def handle(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        op = req["op"]
        if op == "status":
            return self.status()
        if op == "ledger":
            return self.ledger_json()
        if op == "guests":
            e = self.facts.enumeration if self.facts else None
            return {
                "enumeration": {"method": e.method if e else None, "source": "daemon ledger"},
                "guests": [_guest_of(x).to_json() for x in self.ledger.live],
            }
        phase = req.get("phase", "exec")
        if phase not in ("load", "exec", "crash"):
            raise RequestError(f"unknown phase {phase!r}")
        # A gate decision never rests on cached facts: read the host again.
        facts = await asyncio.to_thread(self._gather)
        return {"report": self._evaluate(phase, facts).to_json()}


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
    """Run the daemon until SIGTERM; the process exit code (1: could not start)."""
    from .log import setup_logging

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
