"""The running kernel: release, command line, config, kallsyms and kexec sysfs."""

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


CMDLINE = "proc/cmdline"
#: kvm_intel's `tdx` parameter (arch/x86/kvm/vmx/tdx.c: module_param_named(tdx,
#: enable_tdx, bool, 0444)), as the kernel command line names it.
KVM_INTEL_TDX = "kvm_intel.tdx"
#: isspace() of the kernel's lib/ctype.c for ASCII: what separates parameters.
_SPACE = " \t\n\v\f\r"


def read_cmdline(host: Host) -> str | Problem:
    """proc/cmdline, stripped; a Problem when it cannot be read."""
    text = host.read_text(CMDLINE, 64 * 1024)
    return text.strip() if isinstance(text, str) else text


def cmdline_params(cmdline: str) -> list[tuple[str, str | None]]:
    """(name, value) of each kernel parameter, in order, split as the kernel splits them.

    lib/cmdline.c next_arg: parameters are separated by white space outside double
    quotes; the name ends at the first `=`; a value (or a whole parameter) may be
    quoted and the quotes are dropped; a parameter without `=` has the value None.
    parse_args (kernel/params.c) stops at a bare `--`: what follows goes to init,
    not to the kernel, and is not listed. (modprobe reads /proc/cmdline itself for a
    modular kvm_intel, kmod libkmod-config.c kmod_config_parse_kcmdline, splitting at
    spaces only: on quotes and after `--` it can read differently.)
    """
    out: list[tuple[str, str | None]] = []
    i, n = 0, len(cmdline)
    while True:
        while i < n and cmdline[i] in _SPACE:
            i += 1
        if i >= n:
            return out
        quoted = cmdline[i] == '"'
        start = i + 1 if quoted else i
        in_quote, equals, j = quoted, -1, start
        while j < n and (in_quote or cmdline[j] not in _SPACE):
            if equals < 0 and cmdline[j] == "=" and j > start:
                equals = j
            if cmdline[j] == '"':
                in_quote = not in_quote
            j += 1
        # `stop` is where the C code writes its NUL over a closing quote.
        stop = j
        if equals < 0:
            if quoted and stop > start and cmdline[stop - 1] == '"':
                stop -= 1
            name, value = cmdline[start:stop], None
        else:
            vstart = equals + 1
            if vstart < j and cmdline[vstart] == '"':
                vstart += 1
                if cmdline[j - 1] == '"':
                    stop = j - 1
            if quoted and stop == j and cmdline[j - 1] == '"':
                stop = j - 1
            name, value = cmdline[start:equals], cmdline[vstart:stop] if vstart <= stop else ""
        if value is None and name == "--":
            return out
        out.append((name, value))
        i = j


def kstrtobool(value: str) -> bool | None:
    """The kernel's reading of a boolean (lib/kstrtox.c kstrtobool): the first character
    y, Y or 1 is true and n, N or 0 false; o or O followed by n/N is true ("on") and by
    f/F false ("off"); the rest of the string is not looked at. None: -EINVAL."""
    first = value[:1]
    if first in ("y", "Y", "1"):
        return True
    if first in ("n", "N", "0"):
        return False
    if first in ("o", "O"):
        second = value[1:2]
        if second in ("n", "N"):
            return True
        if second in ("f", "F"):
            return False
    return None


def cmdline_bool(cmdline: str | Problem, name: str, path: str) -> bool | Problem | None:
    """What the kernel command line sets a bool parameter `name` (`module.param`) to.

    True or False: the value the kernel applies; None: not given; a Problem: the
    command line could not be read (its own Problem), or a value given for `name` is
    not one kstrtobool takes ("malformed", naming it; `path` is where the command
    line was read).

    The kernel's rules, not ours: '-' and '_' are the same in a parameter name
    (kernel/params.c parameq, dash2underscore; modprobe likewise turns the module
    name's '-' into '_' for a modular kvm_intel, kmod libkmod-config.c
    kcmdline_parse_result); a name without `=` sets the bool (param_set_bool: "No
    equals means set"); values go through kstrtobool.

    Given twice, the last one wins, unlike the keys of files the kernel prints
    (DESIGN.md "Reading": a duplicate there is malformed): the command line is
    input, and the kernel applies each parameter in order (kernel/params.c
    parse_args calls the parameter's set for every occurrence; modprobe passes them
    in command line order), so a later kvm_intel.tdx=0 turns off an earlier
    kvm_intel.tdx=1. Reading it any other way would disagree with the kernel.

    Any value kstrtobool rejects makes the whole answer a Problem, even beside a
    valid one: built in, the kernel logs "`X' invalid for parameter" and keeps the
    other values; as a module, parse_args' error makes load_module
    (kernel/module/main.c) fail, and the module does not load at all.
    """
    if isinstance(cmdline, Problem):
        return cmdline
    want = name.replace("-", "_")
    effective: bool | None = None
    for param, value in cmdline_params(cmdline):
        if param.replace("-", "_") != want:
            continue
        got = True if value is None else kstrtobool(value)
        if got is None:
            return Problem(
                "malformed",
                path,
                f"{param}={value!r} is not a boolean the kernel takes (y/Y/1, n/N/0, on, "
                "off): a module given it fails to load; built in, the kernel ignores it",
            )
        effective = got
    return effective


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
