"""The daemon's refresh: once changes pause, the host read again (in a worker thread),
the ledger's VMs classified, the exec report recomputed; then what follows the report:
sd_notify's status line, the shutdown inhibitor and the metrics file. A part of the
Daemon (service.py), which holds the state named below.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from ..facts import HostFacts, gather
from ..host import Host
from ..metrics import write_metrics
from ..readers import vmclass
from ..report import Report, evaluate

if TYPE_CHECKING:
    from ..policy import Policy
    from .ledger import Entry, VmLedger
    from .notify import Notifier

log = logging.getLogger("tdx_preflight.daemon")

#: Refresh (and rewrite state.json) once changes have paused this long, so a burst
#: costs one refresh; but never later than MAX_DELAY after the first change.
DEBOUNCE = 0.05
MAX_DELAY = 0.5


def status_line(report: Report | None, ledger: VmLedger) -> str:
    """One line for systemd (STATUS=) and `status`: the live TDs and VMs, and the verdict."""
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


def guest_of(e: Entry) -> vmclass.Guest:
    """The checks' view of a ledger entry: a Guest as enumeration and classification give."""
    return vmclass.Guest(
        e.pid,
        e.tid,
        e.vm_fd if e.vm_fd is not None else -1,
        e.kind,
        e.name,
        tuple(e.evidence),
        vcpu_only=e.vcpu_only,
    )


async def until_quiet(wanted: asyncio.Event, pause: float) -> None:
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


class Refreshing:
    """Keeps the facts and the exec report current, and what follows them."""

    root: str
    policy: Policy
    ledger: VmLedger
    notifier: Notifier
    facts: HostFacts | None
    report: Report | None
    _refresh_wanted: asyncio.Event
    _state_wanted: asyncio.Event
    _inhibitor: Any
    _version: int
    _status_cache: tuple[int, Report | None]

    def _gather(self) -> HostFacts:
        with Host(self.root) as host:
            return gather(host, load_msr_module=self.policy.load_msr_module)

    async def refresh(self) -> None:
        """Read the host again, classify the ledger's VMs, recompute the exec report; then
        the status line, the inhibitor and the metrics follow it."""
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

    async def _refresher(self) -> None:
        while True:
            await until_quiet(self._refresh_wanted, DEBOUNCE)
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
            live = [guest_of(e) for e in self.ledger.live]
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

    def _current(self) -> Report | None:
        """The exec report for the ledger as it is now, evaluated once per change."""
        if self.facts is None:
            return None
        if self._status_cache[0] != self._version:
            self._status_cache = (self._version, self._evaluate("exec"))
        return self._status_cache[1]

    async def _drop_inhibitor(self) -> None:
        """Release the inhibitor taken under the old settings; a refresh takes it anew."""
        inhibitor, self._inhibitor = self._inhibitor, None
        if inhibitor is not None:
            await asyncio.to_thread(inhibitor.close)
            log.info("shutdown inhibitor released: its settings changed")
        self._refresh_wanted.set()
