"""The daemon's reconcile: the ledger set against the kernel's truth (debugfs or /proc) at
start, on SIGHUP, on lost events, when an event's COUNT disagrees with the ledger, and
every `reconcile_interval` seconds; and a TD's teardown confirmed by the root misc count.
A part of the Daemon (service.py), which holds the state named below.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from ..readers import kvm
from .ledger import CREATE_GRACE, rfc3339

if TYPE_CHECKING:
    from ..host import Host
    from ..policy import Policy
    from .ledger import Entry, VmLedger

log = logging.getLogger("tdx_preflight.daemon")

#: Reconciles closer together than this are merged.
RECONCILE_SPACING = 0.2
#: After a TD is destroyed, re-read misc.current at these delays to confirm teardown.
TEARDOWN_CHECKS = (0.05, 0.2, 1.0, 3.0, 10.0, 30.0)


class Reconciling:
    """Reconciles the ledger with the kernel, merging requests that come close together."""

    host: Host
    policy: Policy
    ledger: VmLedger
    reconciles: int
    last_reconcile: dict[str, Any]
    _reconcile_wanted: str | None
    _reconcile_event: asyncio.Event

    if TYPE_CHECKING:  # the Daemon's other parts

        def _changed(self) -> None: ...
        def _classify_new(self, entry: Entry) -> None: ...

    def request_reconcile(self, why: str) -> None:
        """Ask for a reconcile soon; requests close together make one (the first why)."""
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
