"""TDX module state: kvm_intel's tdx parameter, sysfs, and the kernel log."""

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
_VERSION_KEY = re.compile(r"(\d+\.\d+\.\d+)(?:\.\d+)?")


def version_key(version: str | None) -> str | None:
    """The X.Y.ZZ form a module version is compared by, as tdx_host/version prints it.

    `1.5.08` -> `1.5.08`; the 6.14 -intel log's four-part `2.0.08.00` -> `2.0.08` (the
    fourth part is the module's internal build step, which tdx_host/version does not
    print); a major.minor-only version (`1.5`, the old firmware sysfs and the 6.8 log) has
    no X.Y.ZZ form: None, so it never matches a listed version.
    """
    m = _VERSION_KEY.fullmatch(version or "")
    return m.group(1) if m else None


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
#: Lines that say why TDX or its module did not come up (arch/x86/virt/vmx/tdx/tdx.c):
#: the generic "initialization failed (N)" line that may follow keeps this reason.
_REASONS = re.compile(
    r"^(?:initialization failed: (?P<why>.*)"
    r"|(?P<rbp>frame pointer \(RBP\) clobber bug present.*)"
    r"|(?P<feature>\S+ is required for TDX.*))$"
)
_NOT_LOADED = re.compile(r"\bmodule not loaded\b")
_SEAMCALL_FAILED = re.compile(r"^SEAMCALL \(0x[0-9a-fA-F]+\) failed: 0x[0-9a-fA-F]+")
_UNSUPPORTED = "TDX not supported by the host platform"
_KEYIDS = re.compile(r"BIOS enabled: private KeyID range \[(\d+), (\d+)\)")
_PAMT = re.compile(r"(\d+) KB allocated for PAMT")
#: The three version lines: 7.1+ `Module version: X.Y.ZZ`; 6.14 -intel `TDX module X.Y.ZZ.WW,
#: build number N`; 6.8 -intel `TDX module: attributes .., major_version X, minor_version Y, ..`.
_LOG_VERSION = re.compile(
    r"(?:major_version (\d+), minor_version (\d+))"
    r"|(?:^TDX module (\d+\.\d+\.\d+(?:\.\d+)?), build number \d+)"
    r"|(?:version:? (\d+\.\d+\.\d+))"
)
_HKID_LEAK = re.compile(r"HKID (\d+) is leaked")
_KEXEC_REFUSED = "kexec: Not allowed on platform with tdx_pw_mce bug"


class TdxLog(NamedTuple):
    """What the kernel log says about TDX, in log order; `state` is the last word.

    `state`: "initialized", "failed", "not loaded" (TDH.SYS.INIT found no module: the BIOS
    did not load it), "unsupported" (7.1+: `TDX not supported by the host platform`, a host
    without TDX, not a failure) or None (the log does not say). `failure` is the kernel's
    own reason line when it printed one, with the error number of the generic line after it.
    """

    state: str | None
    state_line: str | None
    failure: str | None
    keyid_range: tuple[int, int] | None
    pamt_kb: int | None
    version: str | None
    leaked_hkids: tuple[int, ...]
    kexec_refused: bool
    lines: tuple[str, ...]
    records: int


class _LogState:
    """The module's state as the log tells it, line by line."""

    def __init__(self) -> None:
        self.state: str | None = None
        self.line: str | None = None
        self.failure: str | None = None
        #: A reason printed before the generic failure line (SEAMCALL errors, not loaded).
        self.reason: str | None = None

    def feed(self, msg: str, text: str) -> bool:
        """Take one TDX message; True when it spoke about the module's state."""
        if _INITIALIZED.match(msg):
            self.state, self.line, self.failure, self.reason = "initialized", text, None, None
        elif msg == _UNSUPPORTED or msg.startswith(_UNSUPPORTED):
            if self.state in ("failed", "not loaded"):
                # 7.1+: tdx_init printed why (e.g. "initialization failed: Hibernation
                # support is enabled", or "module not loaded") and left the platform flag
                # unset, so the boot's tdx_enable then says "not supported": the failure
                # said already is the better word.
                return True
            self.state, self.line, self.failure = "unsupported", text, None
        elif fm := _FAILED.match(msg):
            if self.state == "initialized":
                return True  # the module comes up once per boot: a later line changes nothing
            error = f"error {fm.group(1)}" if fm.group(1) else None
            reason = self.reason or (self.failure if self.state == "failed" else None)
            self.state = "not loaded" if reason == "module not loaded" else "failed"
            self.line = text
            self.failure = f"{reason} ({error})" if reason and error else reason or error
        elif _NOT_LOADED.search(msg):
            if self.state != "initialized":
                self.state, self.line = "not loaded", text
                self.failure = self.reason = "module not loaded"
        elif rm := _REASONS.match(msg):
            if self.state != "initialized":
                why = rm.group("why") or rm.group("rbp") or rm.group("feature")
                self.state, self.line, self.failure, self.reason = "failed", text, why, why
        elif _SEAMCALL_FAILED.match(msg):
            if self.state != "initialized":
                self.reason = msg  # runtime SEAMCALL errors after bring-up are not reasons
        else:
            return False
        return True


def parse_kmsg(records: list[bytes], path: str = "dev/kmsg") -> TdxLog | Problem:
    """Pick the TDX lines from kmsg records (`prio,seq,usec,flags;text`): the kernel's only
    (facility 0, the prio field below 8).

    Every spelling of KERNEL-FACTS.md "TDX module state" is accepted: 6.8 to 7.0 `module
    initialized`, 7.1+ `TDX-Module initialized`, their `initialization failed (N)` forms
    and the reason lines before them, and the three version lines. Raises nothing: a
    record list without one kmsg-format record is a malformed Problem.
    """
    module = _LogState()
    version = None
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
        if int(m.group(1)) >> 3:
            # Facility above 0: a record written to /dev/kmsg from userspace (the kernel
            # gives those LOG_USER or the writer's facility, never 0: printk.c
            # devkmsg_write), which can say anything, our own refusal lines included.
            continue
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
        if module.feed(msg, text):
            continue
        if km := _KEYIDS.search(msg):
            keyids = (int(km.group(1)), int(km.group(2)))
        elif pa := _PAMT.search(msg):
            pamt = int(pa.group(1))
        elif vm := _LOG_VERSION.search(msg):
            version = vm.group(3) or vm.group(4) or f"{vm.group(1)}.{vm.group(2)}"
    if records and not parsed:
        return Problem("malformed", path, "no record in the kmsg format")
    return TdxLog(
        module.state,
        module.line,
        module.failure,
        keyids,
        pamt,
        version,
        tuple(leaked),
        refused,
        tuple(lines[-50:]),
        parsed,
    )


# -- runtime module update (7.2+) -------------------------------------------------

#: The firmware-upload class device of the TDX module (a link into tdx_host/firmware/).
FW_UPLOAD = "sys/class/firmware/tdx_module"
TDX_HOST = "sys/devices/faux/tdx_host"
#: P-SEAMLDR attributes: evidence name -> the paths the series' revisions used.
SEAMLDR_FILES = {
    "seamldr_version": (f"{TDX_HOST}/seamldr_version", f"{TDX_HOST}/seamldr/version"),
    "num_remaining_updates": (
        f"{TDX_HOST}/num_remaining_updates",
        f"{TDX_HOST}/seamldr/num_remaining_updates",
    ),
}


class ModuleUpdate(NamedTuple):
    """sys/class/firmware/tdx_module (fw_upload, 7.2+) and the P-SEAMLDR attributes.

    `status` is what the status file reads (`idle`, `receiving`, `preparing`,
    `transferring`, `programming`) or why it could not be read; `error` the last error
    (`none` or `STAGE:REASON`) or None when unreadable; `seamldr` the readable P-SEAMLDR
    attributes (root-only, present when the module supports TD-preserving updates).
    """

    status: str | Problem
    error: str | None
    seamldr: dict[str, str]


def read_seamldr(host: Host) -> dict[str, str]:
    """The readable P-SEAMLDR attributes under tdx_host/ or tdx_host/seamldr/ (evidence)."""
    out: dict[str, str] = {}
    for name, paths in SEAMLDR_FILES.items():
        for rel in paths:
            value = host.read_value(rel)
            if isinstance(value, str):
                out[name] = value
                break
    return out


def read_module_update(host: Host) -> ModuleUpdate | None:
    """The runtime update state; None when the class directory is absent (no runtime
    update on this kernel). A directory without a readable status is a Problem status."""
    status = host.read_value(f"{FW_UPLOAD}/status")
    if isinstance(status, Problem) and status.kind == "absent" and not host.exists(FW_UPLOAD):
        return None
    error = host.read_value(f"{FW_UPLOAD}/error")
    return ModuleUpdate(status, error if isinstance(error, str) else None, read_seamldr(host))


def read_tdx_log(host: Host) -> TdxLog | Problem:
    records = host.read_kmsg()
    if isinstance(records, Problem):
        return records
    return parse_kmsg(records, host.display("dev/kmsg"))
