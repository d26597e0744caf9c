"""TDX module state: kvm_intel's tdx parameter, sysfs, and the kernel log."""

from __future__ import annotations

import re
from typing import NamedTuple

from ..host import Host, Problem

KVM_TDX_PARAM = "sys/module/kvm_intel/parameters/tdx"
TDX_HOST_VERSION = "sys/devices/faux/tdx_host/version"
FIRMWARE_TDX = "sys/firmware/tdx/tdx_module"
FIRMWARE_FILES = (
    "status",
    "major_version",
    "minor_version",
    "build_date",
    "build_num",
    "attributes",
)
FIRMWARE_STATES = ("unknown", "none", "loaded", "initialized", "shutdown")


def read_kvm_tdx_param(host: Host) -> bool | Problem:
    value = host.read_value(KVM_TDX_PARAM)
    if isinstance(value, Problem):
        return value
    if value in ("Y", "y", "1"):
        return True
    if value in ("N", "n", "0"):
        return False
    return Problem(
        "malformed", host.display(KVM_TDX_PARAM), f"expected Y or N, read {value[:20]!r}"
    )


_VERSION = re.compile(r"\d+\.\d+\.\d+")


def read_tdx_host_version(host: Host) -> str | Problem:
    value = host.read_value(TDX_HOST_VERSION)
    if isinstance(value, str) and not _VERSION.fullmatch(value):
        return Problem(
            "malformed", host.display(TDX_HOST_VERSION), f"not a version: {value[:30]!r}"
        )
    return value


class FirmwareTdx(NamedTuple):
    """The older /sys/firmware/tdx/tdx_module directory (Intel and Canonical kernels)."""

    status: str
    values: dict[str, str]

    @property
    def version(self) -> str | None:
        major, minor = self.values.get("major_version"), self.values.get("minor_version")
        if major is None or minor is None:
            return None
        return f"{_num(major)}.{_num(minor)}"


def _num(value: str) -> str:
    try:
        return str(int(value, 0))
    except ValueError:
        return value


def read_firmware_tdx(host: Host) -> FirmwareTdx | Problem:
    status = host.read_value(f"{FIRMWARE_TDX}/status")
    if isinstance(status, Problem):
        return status
    if status not in FIRMWARE_STATES:
        return Problem(
            "malformed", host.display(f"{FIRMWARE_TDX}/status"), f"unknown state {status[:30]!r}"
        )
    values: dict[str, str] = {}
    for name in FIRMWARE_FILES[1:]:
        value = host.read_value(f"{FIRMWARE_TDX}/{name}")
        if isinstance(value, str):
            values[name] = value
    return FirmwareTdx(status, values)


# -- kernel log -----------------------------------------------------------------

_RECORD = re.compile(rb"(\d{1,3}),(\d{1,20}),(\d{1,20}),[^;]*;(.*)", re.DOTALL)
_TDX_PREFIX = re.compile(r"^(?:virt/tdx|tdx|TDX): ")
_INITIALIZED = re.compile(r"^(?:TDX-Module|TDX module|module) initialized\b")
_FAILED = re.compile(r"^(?:TDX-Module|TDX module|module) initialization failed(?: \((-?\d+)\))?")
_FAILED_REASON = re.compile(r"^initialization failed: (.*)")
_KEYIDS = re.compile(r"BIOS enabled: private KeyID range \[(\d+), (\d+)\)")
_PAMT = re.compile(r"(\d+) KB allocated for PAMT")
_LOG_VERSION = re.compile(
    r"(?:major_version (\d+), minor_version (\d+))|(?:version:? (\d+\.\d+\.\d+))"
)
_HKID_LEAK = re.compile(r"HKID (\d+) is leaked")
_KEXEC_REFUSED = "kexec: Not allowed on platform with tdx_pw_mce bug"


class TdxLog(NamedTuple):
    """What the kernel log says about TDX, in log order; `state` is the last word."""

    state: str | None  # "initialized", "failed" or None (the log does not say)
    state_line: str | None
    failure: str | None
    keyid_range: tuple[int, int] | None
    pamt_kb: int | None
    version: str | None
    leaked_hkids: tuple[int, ...]
    kexec_refused: bool
    lines: tuple[str, ...]
    records: int


def parse_kmsg(records: list[bytes], path: str = "dev/kmsg") -> TdxLog | Problem:
    """Pick the TDX lines from kmsg records (`prio,seq,usec,flags;text`)."""
    state = state_line = failure = version = None
    keyids: tuple[int, int] | None = None
    pamt: int | None = None
    leaked: list[int] = []
    refused = False
    lines: list[str] = []
    parsed = 0
    for rec in records:
        if not rec or rec[:1] == b" ":
            continue  # blank, or a dictionary continuation line (" KEY=value")
        m = _RECORD.fullmatch(rec)
        if not m:
            continue
        parsed += 1
        text = m.group(4).decode("utf-8", errors="replace").rstrip("\n")
        if _KEXEC_REFUSED in text:
            refused = True
            lines.append(text)
            continue
        if "HKID" in text:
            hk = _HKID_LEAK.search(text)
            if hk:
                leaked.append(int(hk.group(1)))
                lines.append(text)
            continue
        pm = _TDX_PREFIX.match(text)
        if not pm:
            continue
        msg = text[pm.end() :]
        lines.append(text)
        if _INITIALIZED.match(msg):
            state, state_line, failure = "initialized", text, None
        elif fm := _FAILED.match(msg):
            state, state_line = "failed", text
            failure = f"error {fm.group(1)}" if fm.group(1) else "failed"
        elif fr := _FAILED_REASON.match(msg):
            state, state_line, failure = "failed", text, fr.group(1)
        elif km := _KEYIDS.search(msg):
            keyids = (int(km.group(1)), int(km.group(2)))
        elif pa := _PAMT.search(msg):
            pamt = int(pa.group(1))
        elif vm := _LOG_VERSION.search(msg):
            version = vm.group(3) or f"{vm.group(1)}.{vm.group(2)}"
    if records and not parsed:
        return Problem("malformed", path, "no record in the kmsg format")
    return TdxLog(
        state,
        state_line,
        failure,
        keyids,
        pamt,
        version,
        tuple(leaked),
        refused,
        tuple(lines[-50:]),
        parsed,
    )


def read_tdx_log(host: Host) -> TdxLog | Problem:
    records = host.read_kmsg()
    if isinstance(records, Problem):
        return records
    return parse_kmsg(records, host.display("dev/kmsg"))
