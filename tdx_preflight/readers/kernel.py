"""The running kernel: release, command line, config, kallsyms and kexec sysfs."""

from __future__ import annotations

import re
from typing import NamedTuple

from ..host import Host, Problem

#: The kernel runs TDH.SYS.DISABLE on kexec and kdump (7.2+, global, so always in kallsyms).
SYS_DISABLE_SYMBOL = "tdx_sys_disable"
#: Any of these in kallsyms means the kernel flushes TDX cache state on kexec:
#: 6.18 to 7.1 export tdx_cpu_flush_cache_for_kexec; 7.2 made the flush the static
#: tdx_cpu_flush_cache (usually inlined) on the shutdown path that tdx_sys_disable's
#: series built, so tdx_sys_disable is the 7.2+ evidence.
FLUSH_SYMBOLS = ("tdx_cpu_flush_cache_for_kexec", SYS_DISABLE_SYMBOL, "tdx_cpu_flush_cache")
#: Every name the checks ask kallsyms about: one scan of the file finds them all.
KALLSYMS_NAMES = FLUSH_SYMBOLS

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


#: 6.19+ (cf4340bdd967): the kexec attributes live here; the old names link to them.
KEXEC_DIR = "sys/kernel/kexec"
#: attribute -> its name before 6.19 (an obsolete symlink from 6.19 on).
KEXEC_OLD_NAMES = {
    "loaded": "sys/kernel/kexec_loaded",
    "crash_loaded": "sys/kernel/kexec_crash_loaded",
    "crash_size": "sys/kernel/kexec_crash_size",
}
_CMA_RANGE = re.compile(r"[0-9a-fA-F]{1,16}-[0-9a-fA-F]{1,16}")


class KexecSysfs(NamedTuple):
    """The kexec sysfs attributes, each read at its 6.19+ path first, its old name second.

    `paths` maps each attribute to the path that answered (or was tried last), so the
    evidence says which layout the host has. `crash_cma_ranges` is the number of
    ranges sys/kernel/kexec/crash_cma_ranges lists (6.19+), a Problem, or absent.
    """

    loaded: int | Problem
    crash_loaded: int | Problem
    crash_size: int | Problem
    crash_cma_ranges: int | Problem = Problem("absent", KEXEC_DIR + "/crash_cma_ranges", "")
    paths: dict[str, str] | None = None


def _flag(host: Host, rel: str) -> int | Problem:
    value = host.read_int(rel)
    if isinstance(value, int) and value not in (0, 1):
        return Problem("malformed", host.display(rel), f"expected 0 or 1, read {value}")
    return value


def _attr(host: Host, name: str, rel: str) -> int | Problem:
    return host.read_int(rel) if name == "crash_size" else _flag(host, rel)


def _cma_ranges(host: Host) -> int | Problem:
    """How many `%08llx-%08llx` lines crash_cma_ranges lists (kernel/ksysfs.c); 0 when empty."""
    rel = f"{KEXEC_DIR}/crash_cma_ranges"
    text = host.read_text(rel, 4096)
    if isinstance(text, Problem):
        return text
    lines = text.split()
    for line in lines:
        if not _CMA_RANGE.fullmatch(line):
            return Problem("malformed", host.display(rel), f"not a range: {line[:40]!r}")
    return len(lines)


def read_kexec(host: Host) -> KexecSysfs:
    """kexec sysfs: sys/kernel/kexec/{loaded,crash_loaded,crash_size} (6.19+), else the old
    sys/kernel/kexec_loaded, kexec_crash_loaded, kexec_crash_size (CONFIG_KEXEC_CORE,
    CONFIG_CRASH_DUMP). Only an absent new path falls back to the old one: a new path that
    exists but cannot be read stays a Problem. Values: 0/1 flags, crash_size in bytes."""
    values: dict[str, int | Problem] = {}
    paths: dict[str, str] = {}
    for name, old in KEXEC_OLD_NAMES.items():
        rel = f"{KEXEC_DIR}/{name}"
        value = _attr(host, name, rel)
        if isinstance(value, Problem) and value.kind == "absent":
            rel = old
            value = _attr(host, name, rel)
        values[name] = value
        paths[name] = host.display(rel)
    return KexecSysfs(
        values["loaded"], values["crash_loaded"], values["crash_size"], _cma_ranges(host), paths
    )
