"""The daemon's uevent handling (DESIGN.md "The agent"): each KVM create or destroy
event applied to the VM ledger at once; the VM's descriptors read from /proc when the
event carries none; a new VM classified on positive TD evidence. A part of the Daemon
(service.py), which holds the state named below.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..host import Problem
from ..readers import kvm, vmclass
from .uevents import KvmEvent, Overflow

if TYPE_CHECKING:
    from ..facts import HostFacts
    from ..host import Host
    from .ledger import Entry, VmLedger
    from .uevents import UeventSource

log = logging.getLogger("tdx_preflight.daemon")

#: A VM announced by a uevent before its descriptor was installed: read the
#: process's descriptors again after these delays, then leave it to a reconcile.
FD_FILL_DELAYS = (0.002, 0.01, 0.05, 0.25, 1.0)


class UeventHandling:
    """Applies uevents to the ledger; asks for a reconcile when they cannot settle a VM."""

    host: Host
    ledger: VmLedger
    source: UeventSource
    facts: HostFacts | None
    resyncs: int
    events: int
    _fd_cache: dict[int, frozenset[int] | Problem | None]
    _fill_pending: bool

    if TYPE_CHECKING:  # the Daemon's other parts

        def _changed(self) -> None: ...
        def request_reconcile(self, why: str) -> None: ...
        def _reconcile_now(self, why: str) -> None: ...
        def _schedule_teardown_checks(self) -> None: ...

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
