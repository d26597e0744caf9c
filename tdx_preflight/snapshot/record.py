"""Recording: a Host that remembers every read the checks made and how it ended.

`take_snapshot` (pack.py) runs `gather()` once on a `RecordingHost`; plan.py turns
what it remembered into a host-root tree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..host import LARGE, SMALL, Host, Problem, ProblemKind


class RecordingHost(Host):
    """A Host that remembers the result of every read it answers."""

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        unreadable: dict[str, tuple[ProblemKind, str]] | None = None,
    ) -> None:
        super().__init__(root, unreadable)
        self.files: dict[str, bytes] = {}
        #: Files over a reader's cap: rel -> the cap (files[rel] holds cap+1 bytes).
        self.truncated: dict[str, int] = {}
        #: Reads that gave a Problem: rel -> (operation, problem).
        self.failed: dict[str, tuple[str, Problem]] = {}
        self.listings: dict[str, list[str]] = {}
        #: Listed names nothing read: rel -> True for a directory, False for anything else.
        self.listed_types: dict[str, bool] = {}
        self.links: dict[str, str] = {}
        #: kallsyms-format files: rel -> (names asked, names found).
        self.symbols: dict[str, tuple[set[str], set[str]]] = {}
        self.kmsg: dict[str, list[bytes]] = {}
        self.msrs: dict[int, dict[int, int | Problem]] = {}
        #: Per CPU: None when its MSR source opened, else why it did not.
        self.msr_open: dict[int, Problem | None] = {}
        self.existing: dict[str, bool] = {}
        #: Paths read twice with different results (the first result is kept).
        self.changed: list[str] = []
        self._nested = 0

    def _keep(self, rel: str, op: str, result: object, succeeded_before: bool) -> None:
        """Remember the first failure of a read that never succeeded; note a change."""
        if isinstance(result, Problem):
            if succeeded_before:
                self.changed.append(rel)
            elif rel not in self.failed:
                self.failed[rel] = (op, result)
        elif rel in self.failed:
            self.changed.append(rel)

    def read_bytes(self, rel: str, limit: int = SMALL) -> bytes | Problem:
        result = super().read_bytes(rel, limit)
        if self._nested:
            return result
        had = rel in self.files and rel not in self.truncated
        if isinstance(result, bytes) and rel in self.truncated:
            del self.failed[rel]  # now read whole (a larger cap): not a change
        self._keep(rel, "read", result, had)
        if isinstance(result, bytes):
            if not had:
                # A complete read supersedes a capped one: it reproduces both.
                self.truncated.pop(rel, None)
                self.files[rel] = result
            elif self.files[rel] != result:
                self.changed.append(rel)
        elif result.kind == "malformed" and rel not in self.files:
            prefix = self._prefix_of(rel, limit + 1)
            if prefix is not None and len(prefix) > limit:
                self.files[rel] = prefix
                self.truncated[rel] = limit
        return result

    def _prefix_of(self, rel: str, size: int) -> bytes | None:
        """The first `size` bytes of a file whose whole read was refused for its size."""
        data = Host.read_head(self, rel, size)  # not recorded: only the prefix is kept
        return data if isinstance(data, bytes) else None

    def listdir(self, rel: str) -> list[str] | Problem:
        result = super().listdir(rel)
        self._keep(rel, "list", result, rel in self.listings)
        if isinstance(result, list):
            self.listings.setdefault(rel, list(result))
            # /proc is reproduced from the reads of VM holders only, never from a listing.
            if rel != "proc" and not rel.startswith("proc/"):
                for name in result:
                    self.listed_types.setdefault(f"{rel}/{name}", self.is_dir(f"{rel}/{name}"))
        return result

    def readlinks(self, rel: str) -> dict[str, str | Problem] | Problem:
        # One recorded listing and one recorded readlink per entry: the tree needs both.
        names = self.listdir(rel)
        return names if isinstance(names, Problem) else self._each_readlink(rel, names)

    def readlink(self, rel: str) -> str | Problem:
        result = super().readlink(rel)
        self._keep(rel, "readlink", result, rel in self.links)
        if isinstance(result, str):
            self.links.setdefault(rel, result)
        return result

    def exists(self, rel: str) -> bool:
        result = super().exists(rel)
        self.existing.setdefault(rel, result)
        return result

    def find_symbols(self, rel: str, names: Iterable[str]) -> set[str] | Problem:
        wanted = list(names)
        result = super().find_symbols(rel, wanted)
        self._keep(rel, "kallsyms", result, rel in self.symbols and rel not in self.failed)
        asked, found = self.symbols.setdefault(rel, (set(), set()))
        asked.update(wanted)
        if isinstance(result, set):
            found.update(result)
        return result

    def read_kmsg(self, rel: str = "dev/kmsg", limit: int = LARGE) -> list[bytes] | Problem:
        # A fixture's kmsg file is read through read_bytes: record the records, not it.
        self._nested += 1
        try:
            result = super().read_kmsg(rel, limit)
        finally:
            self._nested -= 1
        self._keep(rel, "kmsg", result, rel in self.kmsg)
        if isinstance(result, list):
            self.kmsg.setdefault(rel, list(result))
        return result

    def read_msr(self, cpu: int, index: int) -> int | Problem:
        result = super().read_msr(cpu, index)
        opened = self._msr_fds.get(cpu)
        self.msr_open.setdefault(cpu, opened if isinstance(opened, Problem) else None)
        self.msrs.setdefault(cpu, {}).setdefault(index, result)
        return result
