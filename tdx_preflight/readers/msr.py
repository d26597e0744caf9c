"""TDX-related MSRs on every online CPU, decoded and compared across CPUs.

Reads go through /dev/cpu/N/msr (or a fixture's sparse file) at offset = MSR
index. The device is opened read-only; nothing here ever writes an MSR.
"""

import os
from typing import NamedTuple

from ..host import Host, Problem

KEYID_PARTITIONING = 0x87
TME_CAPABILITY = 0x981
TME_ACTIVATE = 0x982
SEAMRR_PHYS_MASK = 0x1401
MSRS = (KEYID_PARTITIONING, TME_CAPABILITY, TME_ACTIVATE, SEAMRR_PHYS_MASK)
NAMES = {
    KEYID_PARTITIONING: "IA32_MKTME_KEYID_PARTITIONING",
    TME_CAPABILITY: "IA32_TME_CAPABILITY",
    TME_ACTIVATE: "IA32_TME_ACTIVATE",
    SEAMRR_PHYS_MASK: "IA32_SEAMRR_PHYS_MASK",
}


#: In a fixture's regular file (value at offset = index) these 8-byte slots overlap the
#: next MSR's, so their values cannot be told apart there; the device has no such limit.
_OVERLAPPED = {a: b for a in MSRS for b in MSRS if a < b < a + 8}


def decode(index: int, value: int) -> dict[str, int | bool]:
    """The fields of one MSR value that matter for TDX."""
    if index == KEYID_PARTITIONING:
        mktme = value & 0xFFFFFFFF
        tdx = value >> 32
        return {"mktme_keyids": mktme, "tdx_keyids": tdx, "tdx_keyid_start": mktme + 1}
    if index == TME_CAPABILITY:
        return {"max_keyid_bits": (value >> 32) & 0xF, "max_keys": (value >> 36) & 0x7FFF}
    if index == TME_ACTIVATE:
        return {
            "locked": bool(value & 1),
            "enabled": bool(value & 2),
            "mktme_keyid_bits": (value >> 32) & 0xF,
            "tdx_reserved_keyid_bits": (value >> 36) & 0xF,
        }
    if index == SEAMRR_PHYS_MASK:
        return {"locked": bool(value & (1 << 10)), "enabled": bool(value & (1 << 11))}
    return {}


class MsrReading(NamedTuple):
    """One MSR across the CPUs read: values by CPU, the CPUs that failed, and why."""

    index: int
    values: dict[int, int]
    problems: dict[int, Problem]

    @property
    def distinct(self) -> set[int]:
        return set(self.values.values())

    @property
    def consistent(self) -> bool:
        return len(self.distinct) <= 1

    @property
    def value(self) -> int | None:
        """The value when every CPU read agrees, else None."""
        d = self.distinct
        return next(iter(d)) if len(d) == 1 else None


class MsrFacts(NamedTuple):
    cpus: tuple[int, ...]
    readings: dict[int, MsrReading]
    #: Set when no CPU could be read at all (no msr module, no permission...).
    unavailable: Problem | None = None
    notes: tuple[str, ...] = ()


def _load_msr_module(host: Host, policy: str) -> str | None:
    """On the live host, as root, load the msr module when its device is missing."""
    if not host.live or policy != "auto" or host.exists("dev/cpu/0/msr"):
        return None
    if os.geteuid() != 0:
        return "msr module not loaded and not root: not loading it"
    import subprocess

    try:
        proc = subprocess.run(
            ["modprobe", "msr"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"msr module not loaded; modprobe msr could not run: {exc}"
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        return f"msr module not loaded; modprobe msr failed: {msg[-1] if msg else proc.returncode}"
    return "loaded the msr module (modprobe msr)"


def read_msrs(host: Host, cpus: list[int], load_module: str = "auto") -> MsrFacts:
    notes: list[str] = []
    note = _load_msr_module(host, load_module)
    if note:
        notes.append(note)
    readings: dict[int, MsrReading] = {i: MsrReading(i, {}, {}) for i in MSRS}
    unavailable: Problem | None = None
    for n, cpu in enumerate(cpus):
        for index in MSRS:
            if index in _OVERLAPPED and host.msr_is_file(cpu):
                # Not read: in a file this slot holds the next MSR's bytes too.
                result: int | Problem = Problem(
                    "malformed",
                    f"{host.display(f'dev/cpu/{cpu}/msr')} @0x{index:x}",
                    f"a file cannot hold 0x{index:x} beside 0x{_OVERLAPPED[index]:x} "
                    "(their 8-byte slots overlap); not read",
                )
            else:
                result = host.read_msr(cpu, index)
            if isinstance(result, Problem):
                readings[index].problems[cpu] = result
            else:
                readings[index].values[cpu] = result
        if n == 0 and all(cpu in r.problems for r in readings.values()):
            first = readings[KEYID_PARTITIONING].problems[cpu]
            if first.kind in ("absent", "permission"):
                # Same cause on every CPU: do not repeat it 256 times.
                unavailable = first
                break
    return MsrFacts(tuple(cpus), readings, unavailable, tuple(notes))
