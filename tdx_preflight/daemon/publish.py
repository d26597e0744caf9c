"""What the daemon publishes: its status and ledger, the replies of the control socket
(the server itself is control.py), and state.json, rewritten once changes pause. A part
of the Daemon (service.py), which holds the state named below.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ..readers.procinfo import own_health
from .control import Peer, RequestError
from .ledger import rfc3339
from .refresh import DEBOUNCE, guest_of, status_line, until_quiet
from .state import SCHEMA, write_atomic

if TYPE_CHECKING:
    from ..facts import HostFacts
    from ..host import Host
    from ..policy import Policy
    from ..report import Report
    from .ledger import VmLedger
    from .uevents import UeventSource

log = logging.getLogger("tdx_preflight.daemon")


class Publishing:
    """Status, ledger and report replies, and the state file."""

    host: Host
    policy: Policy
    ledger: VmLedger
    source: UeventSource
    facts: HostFacts | None
    started: float
    resyncs: int
    reconciles: int
    events: int
    last_reconcile: dict[str, Any]
    reload: dict[str, Any]
    _boot_id: str | None
    _inhibitor: Any
    _state_wanted: asyncio.Event

    if TYPE_CHECKING:  # the Daemon's other parts

        def _current(self) -> Report | None: ...
        def _gather(self) -> HostFacts: ...
        def _evaluate(self, phase: str, fresh: HostFacts | None = None) -> Report: ...

    def state(self) -> dict[str, Any]:
        """What state.json holds: the status, the exec report and the ledger."""
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
            await until_quiet(self._state_wanted, DEBOUNCE / 2)
            self._write_state()

    def status(self, report: Report | None = None) -> dict[str, Any]:
        """The reply to `status` (and the head of state.json)."""
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
        """The reply to `ledger`: live VMs, the last 200 of its history, TDs not seen destroyed."""
        return {
            "root": self.host.root,
            "daemon_pid": os.getpid(),
            "live": [e.to_json() for e in self.ledger.live],
            "history": [e.to_json() for e in list(self.ledger.history)[-200:]],
            "tds_not_destroyed": list(self.ledger.view().tds_not_destroyed),
        }

    async def handle(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """Answer one control request (status, ledger, guests, or a report for a phase)."""
        op = req["op"]
        if op == "status":
            return self.status()
        if op == "ledger":
            return self.ledger_json()
        if op == "guests":
            e = self.facts.enumeration if self.facts else None
            return {
                "enumeration": {"method": e.method if e else None, "source": "daemon ledger"},
                "guests": [guest_of(x).to_json() for x in self.ledger.live],
            }
        phase = req.get("phase", "exec")
        if phase not in ("load", "exec", "crash"):
            raise RequestError(f"unknown phase {phase!r}")
        # A gate decision never rests on cached facts: read the host again.
        facts = await asyncio.to_thread(self._gather)
        return {"report": self._evaluate(phase, facts).to_json()}
