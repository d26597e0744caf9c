"""The VM ledger: every KVM VM the daemon has seen, from creation to teardown.

Entries are keyed by the creating thread and the VM's file descriptor, the
same `TID-FD` pair that names the VM's debugfs directory and its uevents'
STATS_PATH. A VM that only a /proc scan found (no debugfs) has no tid; it is
matched by (pid, fd).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from ..facts import Ledger as LedgerView
from ..host import Problem
from ..readers.kvm import Guest, VmHandle

#: A VM whose destroy event came this recently may still show in debugfs (the
#: kernel removes the directory after the event): reconcile does not revive it yet.
DESTROY_GRACE = 2.0
#: A VM created this recently may not have its /proc fd link yet (the kernel
#: installs the fd after the event): a /proc reconcile does not bury it yet.
CREATE_GRACE = 2.0
HISTORY = 1000


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Entry:
    """One VM's life."""

    __slots__ = (
        "created_at",
        "created_by",
        "destroyed_at",
        "destroyed_by",
        "evidence",
        "kind",
        "name",
        "pid",
        "serial",
        "teardown",
        "tid",
        "vm_fd",
    )

    def __init__(
        self,
        tid: int | None,
        vm_fd: int | None,
        pid: int | None,
        created_at: float,
        created_by: str,
        serial: int | None = None,
    ) -> None:
        self.tid = tid
        self.vm_fd = vm_fd
        self.pid = pid
        self.serial = serial
        self.kind = "unknown"
        self.name: str | None = None
        self.evidence: list[str] = []
        self.created_at = created_at
        self.created_by = created_by
        self.destroyed_at: float | None = None
        self.destroyed_by: str | None = None
        #: For a destroyed TD: "pending", "confirmed" or "unconfirmable: why".
        self.teardown: str | None = None

    @property
    def alive(self) -> bool:
        return self.destroyed_at is None

    def label(self) -> str:
        who = self.name or "?"
        return f"{who} (pid {self.pid if self.pid is not None else '?'})"

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "tid": self.tid,
            "vm_fd": self.vm_fd,
            "kind": self.kind,
            "name": self.name,
            "evidence": list(self.evidence),
            "created_at": rfc3339(self.created_at),
            "created_by": self.created_by,
            "destroyed_at": rfc3339(self.destroyed_at),
            "destroyed_by": self.destroyed_by,
            "teardown": self.teardown,
            "serial": self.serial,
        }


class VmLedger:
    def __init__(self) -> None:
        self.live: list[Entry] = []
        self.history: deque[Entry] = deque(maxlen=HISTORY)

    # -- lookups -----------------------------------------------------------------

    def find_live(self, tid: int | None, vm_fd: int | None, pid: int | None = None) -> Entry | None:
        for e in self.live:
            if tid is not None and e.tid == tid and (vm_fd is None or e.vm_fd in (vm_fd, None)):
                return e
            if tid is None and pid is not None and e.pid == pid and e.vm_fd in (vm_fd, None):
                return e
        return None

    def _recently_destroyed(self, h: VmHandle, now: float) -> bool:
        for e in reversed(self.history):
            if e.destroyed_at is None or now - e.destroyed_at > DESTROY_GRACE:
                break
            if (
                e.destroyed_by == "event"
                and e.vm_fd == h.vm_fd
                and ((h.tid is not None and e.tid == h.tid) or (h.tid is None and e.pid == h.pid))
            ):
                return True
        return False

    @property
    def live_count(self) -> int:
        return len(self.live)

    def live_tds(self) -> list[Entry]:
        return [e for e in self.live if e.kind == "td"]

    def view(self) -> LedgerView:
        """What checks read: the TDs created and never destroyed."""
        return LedgerView(tuple(e.label() for e in self.live_tds()))

    # -- changes -------------------------------------------------------------------

    def create(
        self,
        tid: int | None,
        vm_fd: int | None,
        pid: int | None,
        *,
        by: str,
        serial: int | None = None,
        now: float | None = None,
    ) -> Entry:
        entry = Entry(tid, vm_fd, pid, time.time() if now is None else now, by, serial)
        self.live.append(entry)
        return entry

    def destroy(self, entry: Entry, *, by: str, now: float | None = None) -> None:
        entry.destroyed_at = time.time() if now is None else now
        entry.destroyed_by = by
        if entry.kind == "td":
            entry.teardown = "pending"
        self.live.remove(entry)
        self.history.append(entry)

    def reconcile(
        self, handles: Iterable[VmHandle], method: str, now: float | None = None
    ) -> tuple[int, int, int]:
        """Make the live set equal the enumeration; returns (added, removed, deferred).

        `deferred` counts the VMs left as they are for now because the kernel may
        not have finished creating or destroying them (see the graces above); the
        caller reconciles again after the grace.
        """
        now = time.time() if now is None else now
        unmatched = list(self.live)
        added = deferred = 0
        for h in handles:
            e = self._match(unmatched, h)
            if e is not None:
                unmatched.remove(e)
                e.pid = e.pid if e.pid is not None else h.pid
                e.vm_fd = e.vm_fd if e.vm_fd is not None else h.vm_fd
                continue
            if method == "debugfs" and self._recently_destroyed(h, now):
                deferred += 1
                continue
            entry = self.create(h.tid, h.vm_fd, h.pid, by="reconcile", now=now)
            entry.evidence.append("seen by reconcile")
            added += 1
        removed = 0
        for e in unmatched:
            if method == "proc" and e.created_by == "event" and now - e.created_at < CREATE_GRACE:
                deferred += 1
                continue
            self.destroy(e, by="reconcile", now=now)
            removed += 1
        return added, removed, deferred

    @staticmethod
    def _match(entries: list[Entry], h: VmHandle) -> Entry | None:
        for e in entries:
            if h.tid is not None and e.tid is not None:
                if e.tid == h.tid and e.vm_fd in (h.vm_fd, None):
                    return e
            elif e.pid is not None and e.pid == h.pid and e.vm_fd in (h.vm_fd, None):
                return e
        return None

    def classify(self, guests: Iterable[Guest]) -> bool:
        """Take kinds, names and evidence from a classification; True when a kind changed.

        A VM once seen as a TD stays one: the evidence for it only grows.
        """
        by_tid = {(e.tid, e.vm_fd): e for e in self.live if e.tid is not None}
        by_pid = {(e.pid, e.vm_fd): e for e in self.live if e.pid is not None}
        changed = False
        for g in guests:
            e = by_tid.get((g.tid, g.vm_fd)) if g.tid is not None else None
            e = (
                e
                or by_pid.get((g.pid, g.vm_fd))
                or (
                    self._match(self.live, VmHandle(g.tid, g.vm_fd, g.pid, ""))
                    if g.tid is None
                    else None
                )
            )
            if e is None:
                continue
            if e.kind != "td" and g.kind != e.kind:
                e.kind = g.kind
                changed = True
            e.name = g.name or e.name
            seen = "seen by reconcile" in e.evidence
            e.evidence = list(g.evidence) + (["seen by reconcile"] if seen else [])
        return changed

    def confirm_teardowns(self, root_tdx: int | Problem) -> list[Entry]:
        """Confirm pending TD teardowns once the kernel's KeyID count has dropped.

        The root misc.current `tdx` count falls when a TD's KeyID is freed, after
        its cache lines were written back. When it is no higher than the TDs still
        alive, every destroyed TD's teardown is complete.
        """
        pending = [e for e in self.history if e.teardown == "pending"]
        if not pending:
            return []
        if isinstance(root_tdx, Problem):
            for e in pending:
                e.teardown = f"unconfirmable: root misc.current {root_tdx.detail}"
            return []
        if root_tdx > len(self.live_tds()):
            return []
        for e in pending:
            e.teardown = "confirmed"
        return pending

    def pending_teardowns(self) -> list[Entry]:
        return [e for e in self.history if e.teardown == "pending"]

    def recent_tds(self, n: int = 20) -> list[Entry]:
        return [e for e in self.history if e.kind == "td"][-n:]
