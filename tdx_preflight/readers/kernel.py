"""The running kernel: release, command line, config, kallsyms and kexec sysfs."""

from __future__ import annotations

import re
from typing import NamedTuple

from ..host import Host, Problem

FLUSH_SYMBOLS = ("tdx_cpu_flush_cache_for_kexec", "tdx_cpu_flush_cache")
#: Reported as evidence only (the TDH.SYS.DISABLE series, unverified).
SYS_DISABLE_SYMBOL = "tdx_sys_disable"
KALLSYMS_NAMES = (*FLUSH_SYMBOLS, SYS_DISABLE_SYMBOL)

_RELEASE = re.compile(r"(\d{1,4})\.(\d{1,4})")


def parse_release(release: str) -> tuple[int, int] | None:
    """(major, minor) of a kernel release such as `6.18.2-1-amd64`; None if it does not parse."""
    m = _RELEASE.match(release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def read_release(host: Host) -> str | Problem:
    return host.read_value("proc/sys/kernel/osrelease")


def read_cmdline(host: Host) -> str | Problem:
    text = host.read_text("proc/cmdline", 64 * 1024)
    return text.strip() if isinstance(text, str) else text


def parse_config(data: bytes, path: str) -> dict[str, str] | Problem:
    """`CONFIG_X=v` and `# CONFIG_X is not set` (value "n") lines."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Problem("malformed", path, f"not UTF-8 at byte {exc.start}")
    config: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_"):
            key, sep, value = line.partition("=")
            if not sep:
                return Problem("malformed", path, f"config line without '=': {line[:60]!r}")
            config[key] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            config[line[2:-11]] = "n"
        elif line and not line.startswith("#"):
            return Problem("malformed", path, f"not a config line: {line[:60]!r}")
    if not config:
        return Problem("malformed", path, "no CONFIG_ lines")
    return config


class KernelConfig(NamedTuple):
    source: str
    values: dict[str, str]


def read_config(host: Host, release: str | Problem) -> KernelConfig | Problem:
    """/proc/config.gz, else /boot/config-RELEASE."""
    gz = host.read_bytes("proc/config.gz", 4 * 1024 * 1024)
    if isinstance(gz, bytes):
        import gzip
        import zlib

        path = host.display("proc/config.gz")
        try:
            data = gzip.decompress(gz)
        except (OSError, EOFError, zlib.error) as exc:
            return Problem("malformed", path, f"not gzip: {exc}")
        parsed = parse_config(data, path)
        return parsed if isinstance(parsed, Problem) else KernelConfig(path, parsed)
    if gz.kind != "absent":
        return gz
    if isinstance(release, Problem):
        return release
    rel = f"boot/config-{release}"
    if "/" in release:
        return Problem("malformed", host.display(rel), "release contains '/'")
    data = host.read_bytes(rel, 4 * 1024 * 1024)
    if isinstance(data, Problem):
        if data.kind == "absent":
            return Problem(
                "absent", f"{host.display('proc/config.gz')}, {data.path}", "neither exists"
            )
        return data
    parsed = parse_config(data, host.display(rel))
    return parsed if isinstance(parsed, Problem) else KernelConfig(host.display(rel), parsed)


class Kallsyms(NamedTuple):
    path: str
    found: frozenset[str]


def read_kallsyms(host: Host) -> Kallsyms | Problem:
    found = host.find_symbols("proc/kallsyms", KALLSYMS_NAMES)
    if isinstance(found, Problem):
        return found
    return Kallsyms(host.display("proc/kallsyms"), frozenset(found))


class KexecSysfs(NamedTuple):
    loaded: int | Problem
    crash_loaded: int | Problem
    crash_size: int | Problem


def _flag(host: Host, rel: str) -> int | Problem:
    value = host.read_int(rel)
    if isinstance(value, int) and value not in (0, 1):
        return Problem("malformed", host.display(rel), f"expected 0 or 1, read {value}")
    return value


def read_kexec(host: Host) -> KexecSysfs:
    return KexecSysfs(
        loaded=_flag(host, "sys/kernel/kexec_loaded"),
        crash_loaded=_flag(host, "sys/kernel/kexec_crash_loaded"),
        crash_size=host.read_int("sys/kernel/kexec_crash_size"),
    )
