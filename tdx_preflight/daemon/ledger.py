"""The VM ledger: every KVM VM the daemon has seen, from creation to teardown.

A VM is known by its holding process and file descriptor, and by the thread
that created it when that is known: debugfs and a uevent's STATS_PATH name
`TID-FD`, a /proc scan gives PID and FD, and a uevent's PID (a thread id) is
mapped to its process through proc/TID/status at event time. Nothing depends
on debugfs: without it, the descriptor of a VM that an event announced is
read from the process's /proc/PID/fd, and a destroy event removes the entry
whose descriptor is gone from its process.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from ..facts import Ledger as LedgerView
from ..host import Problem
from ..readers.kvm import VmHandle
from ..readers.vmclass import Guest

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
        "vcpu_only",
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
        #: Held by vCPU descriptors alone: vm_fd is one of them (readers/kvm.VmHandle).
        self.vcpu_only = False

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
            "vcpu_only": self.vcpu_only,
        }


def _same(e: Entry, tid: int | None, pid: int | None) -> bool:
    """Can entry `e` be the VM that task `tid` of process `pid` created?

    The creating thread decides when both are known (a reused descriptor number
    in the same process may belong to a VM another thread made); otherwise the
    holding process does.
    """
    if tid is not None and e.tid is not None:
        return e.tid == tid
    return pid is not None and e.pid == pid


class _Index:
    """Entries by (tid, fd) and by (pid, fd), for matching many VMs at once."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.keys: dict[tuple[str, int | None, int | None], list[Entry]] = {}
        for e in entries:
            if e.tid is not None:
                self.keys.setdefault(("t", e.tid, e.vm_fd), []).append(e)
            if e.pid is not None:
                self.keys.setdefault(("p", e.pid, e.vm_fd), []).append(e)

    def find(
        self, tid: int | None, pid: int | None, vm_fd: int, among: dict[Entry, None]
    ) -> Entry | None:
        """The entry in `among` that is this VM (same descriptor, same creator or holder)."""
        for key in (("t", tid, vm_fd), ("p", pid, vm_fd)):
            for e in self.keys.get(key, ()):
                if e in among and _same(e, tid, pid):
                    return e
        return None


#: fds_of(pid, fresh): the kvm-vm descriptors of a process, None when it has gone,
#: or a Problem when they cannot be listed; `fresh` asks for a new scan.
FdsOf = Callable[[int, bool], "frozenset[int] | Problem | None"]


class VmLedger:
    """The live VMs and the recent history, kept by uevents and reconciles.

    A VM's identity is (pid, vm_fd) with the creating tid when known: debugfs
    and STATS_PATH give TID-FD, a /proc scan gives PID and FD, a uevent gives
    the TID (mapped to its process through proc/TID/status at event time).
    Entries carry whatever is known and are completed as more is seen.
    """

    def __init__(self) -> None:
        self.live: list[Entry] = []
        self.history: deque[Entry] = deque(maxlen=HISTORY)

    # -- lookups -----------------------------------------------------------------

    def _recently_destroyed(self, h: VmHandle, now: float) -> bool:
        for e in reversed(self.history):
            if e.destroyed_at is None or now - e.destroyed_at > DESTROY_GRACE:
                break
            if e.destroyed_by == "event" and e.vm_fd == h.vm_fd and _same(e, h.tid, h.pid):
                return True
        return False

    @property
    def live_count(self) -> int:
        return len(self.live)

    def live_tds(self) -> list[Entry]:
        return [e for e in self.live if e.kind == "td"]

    def claimed_fds(self, pid: int) -> set[int]:
        return {e.vm_fd for e in self.live if e.pid == pid and e.vm_fd is not None}

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

    def event_create(
        self,
        tid: int,
        pid: int | None,
        vm_fd: int | None,
        *,
        count: int | None,
        serial: int | None,
        fds: frozenset[int] | None,
    ) -> tuple[Entry, bool]:
        """Apply a create uevent; returns (entry, True when it is new to the ledger).

        `vm_fd` is the event's (from STATS_PATH) or None; `fds` are the process's
        kvm-vm descriptors read now (None when unknown). A VM that a reconcile
        already found (the reconcile ran while the event was queued) is adopted,
        not added twice: the event's COUNT says whether the ledger already holds
        it, and a descriptor of the process that no entry claims says it does not.
        """
        unclaimed: list[int] = []
        if vm_fd is None and fds is not None and pid is not None:
            unclaimed = sorted(fds - self.claimed_fds(pid))
        if vm_fd is not None or not unclaimed:
            adoptable = [
                e
                for e in self.live
                if (vm_fd is None or e.vm_fd == vm_fd)
                and e.serial is None
                and e.created_by == "reconcile"
                and _same(e, tid, pid)
            ]
            exact = vm_fd is not None and bool(adoptable)
            if adoptable and (exact or (count is not None and self.live_count >= count)):
                e = adoptable[-1]
                e.tid = e.tid if e.tid is not None else tid
                e.pid = e.pid if e.pid is not None else pid
                e.serial = serial
                return e, False
        fd = vm_fd if vm_fd is not None else (unclaimed[0] if unclaimed else None)
        return self.create(tid, fd, pid, by="event", serial=serial), True

    def event_destroy(
        self, tid: int, pid: int | None, vm_fd: int | None, *, count: int | None, fds_of: FdsOf
    ) -> Entry | None:
        """Apply a destroy uevent; returns the entry removed, or None.

        None means the ledger holds no entry the event can name: the VM already
        left by a reconcile (the event's COUNT says so), or the match is
        ambiguous and a reconcile must decide. Without the event's descriptor,
        the VM is the candidate whose kvm-vm descriptor is gone from its process
        (a destroy follows the last close): a neighbour in the same process that
        still holds its descriptor is never removed.
        """
        cands = [e for e in self.live if _same(e, tid, pid)]
        if vm_fd is not None:
            exact = [e for e in cands if e.vm_fd == vm_fd]
            if exact:
                self.destroy(exact[0], by="event")
                return exact[0]
            cands = [e for e in cands if e.vm_fd is None]
        if count is not None and self.live_count <= count:
            return None
        cands.sort(key=lambda e: e.tid != tid)  # the creating thread's own first
        for fresh in (False, True):
            gone: list[Entry] = []
            for e in cands:
                # A vCPU-held VM's kvm-vm fd is gone already: that proves nothing here.
                if e.vm_fd is None or e.pid is None or e.vcpu_only:
                    continue
                fds = fds_of(e.pid, fresh)
                if fds is None:  # the process has gone: every VM it held goes, in any order
                    self.destroy(e, by="event")
                    return e
                if isinstance(fds, frozenset) and e.vm_fd not in fds:
                    gone.append(e)
            if len(gone) > 1:
                # Two of a live process's VMs lost their kvm-vm descriptor: one may live
                # on through vCPU or statistics descriptors. Which one died, a reconcile
                # decides; removing the first could drop a live TD.
                return None
            if gone:
                self.destroy(gone[0], by="event")
                return gone[0]
        for e in cands:
            if e.vm_fd is None:  # never seen with a descriptor: the event can only be its
                self.destroy(e, by="event")
                return e
        return None

    def fill_fds(self, pid: int, fds: frozenset[int]) -> int:
        """Give the process's entries without a descriptor its unclaimed kvm-vm ones."""
        unclaimed = sorted(fds - self.claimed_fds(pid))
        filled = 0
        for e in self.live:
            if not unclaimed:
                break
            if e.pid == pid and e.vm_fd is None:
                e.vm_fd = unclaimed.pop(0)
                filled += 1
        return filled

    def wanting_fds(self) -> set[int]:
        """Processes with live entries whose descriptor is not known yet."""
        return {e.pid for e in self.live if e.vm_fd is None and e.pid is not None}

    @staticmethod
    def _take(unmatched: dict[Entry, None], e: Entry, h: VmHandle) -> None:
        del unmatched[e]
        e.vcpu_only = h.vcpu_only
        e.vm_fd = h.vm_fd
        e.pid = e.pid if e.pid is not None else h.pid
        e.tid = e.tid if e.tid is not None else h.tid

    def reconcile(
        self,
        handles: Iterable[VmHandle],
        method: str,
        now: float | None = None,
        complete: bool = True,
        unseen: frozenset[int] | None = None,
    ) -> tuple[int, int, int]:
        """Make the live set equal the enumeration; returns (added, removed, deferred).

        Each handle is matched to an entry in passes: the same VM (descriptor
        and creator or holder); an entry that lacks its descriptor; an entry
        whose creating thread exited before it could be mapped to a process
        (same descriptor first). `deferred` counts the VMs left as they are for now because the
        kernel may not have finished creating or destroying them (see the graces
        above); the caller reconciles again after the grace. An incomplete
        enumeration (`complete` False) adds and completes entries, and removes
        only those of processes it read in full: an entry whose process is among
        `unseen` (its descriptors could not be read), or whose process is not
        known, stays; with `unseen` None (the gap has no bounds) none is removed.
        """
        now = time.time() if now is None else now
        unmatched = dict.fromkeys(self.live)  # ordered, O(1) removal
        index = _Index(self.live)
        rest: list[VmHandle] = []
        for h in handles:
            e = index.find(h.tid, h.pid, h.vm_fd, unmatched)
            if e is None:
                rest.append(h)
            else:
                self._take(unmatched, e, h)
        fallbacks: list[Callable[[Entry, VmHandle], bool]] = [
            lambda e, h: e.vm_fd is None and _same(e, h.tid, h.pid),
            # Its creating thread exited before it could be mapped to a process.
            lambda e, h: e.pid is None and e.vm_fd == h.vm_fd and h.tid in (None, e.tid),
            lambda e, h: e.pid is None and e.vm_fd is None and h.tid in (None, e.tid),
            # Its kvm-vm fd was closed and vCPUs hold it now: the same VM, renamed.
            lambda e, h: h.vcpu_only and not e.vcpu_only and e.pid == h.pid,
        ]
        for fits in fallbacks:
            left: list[VmHandle] = []
            for h in rest:
                e = next((e for e in unmatched if fits(e, h)), None)
                if e is None:
                    left.append(h)
                else:
                    self._take(unmatched, e, h)
            rest = left
        added = deferred = 0
        for h in rest:
            if "/proc/" not in h.source and self._recently_destroyed(h, now):
                deferred += 1  # debugfs outlives the destroy event for a moment
                continue
            entry = self.create(h.tid, h.vm_fd, h.pid, by="reconcile", now=now)
            entry.vcpu_only = h.vcpu_only
            entry.evidence.append("seen by reconcile")
            added += 1
        removed = 0
        for e in unmatched:
            if not complete and (unseen is None or e.pid is None or e.pid in unseen):
                continue  # not seen is not gone: it could hide where the scan could not look
            young = e.created_by == "event" and now - e.created_at < CREATE_GRACE
            if young and (e.vm_fd is None or "debugfs" not in method):
                deferred += 1  # its descriptor may not be installed yet
                continue
            self.destroy(e, by="reconcile", now=now)
            removed += 1
        return added, removed, deferred

    def classify(self, guests: Iterable[Guest]) -> bool:
        """Take kinds, names and evidence from a classification; True when a kind changed.

        A VM once seen as a TD stays one: the evidence for it only grows.
        """
        changed = False
        for g in guests:
            e = next((e for e in self.live if e.vm_fd == g.vm_fd and _same(e, g.tid, g.pid)), None)
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
