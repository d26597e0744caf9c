"""/proc/cpuinfo: vendor, family, model, model name, flags and bugs of every CPU."""

from __future__ import annotations

from typing import NamedTuple

from ..host import LARGE, Host, Problem, parse_uint

PATH = "proc/cpuinfo"


class Cpu(NamedTuple):
    processor: int
    vendor: str
    family: int | None
    model: int | None
    model_name: str
    stepping: int | None
    flags: frozenset[str]
    bugs: frozenset[str]


class CpuInfo(NamedTuple):
    cpus: tuple[Cpu, ...]

    @property
    def first(self) -> Cpu:
        return self.cpus[0]

    @property
    def vendors(self) -> set[str]:
        return {c.vendor for c in self.cpus}

    @property
    def is_intel(self) -> bool:
        return self.vendors == {"GenuineIntel"}

    def cpus_with_flag(self, flag: str) -> list[int]:
        return [c.processor for c in self.cpus if flag in c.flags]

    def cpus_with_bug(self, bug: str) -> list[int]:
        return [c.processor for c in self.cpus if bug in c.bugs]

    @property
    def models(self) -> set[tuple[int | None, int | None]]:
        return {(c.family, c.model) for c in self.cpus}


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    return parse_uint(value.strip())


_KEYS = frozenset(
    ("processor", "vendor_id", "cpu family", "model", "model name", "stepping", "flags", "bugs")
)
_FIRST = frozenset(k[0] for k in _KEYS)


def parse_cpuinfo(data: bytes, path: str = PATH) -> CpuInfo | Problem:
    """Parse the kernel's cpuinfo text: one block per CPU, each opened by `processor`.

    Only the keys the checks use are kept (a 256-CPU host prints about 7,000
    lines). A text with no processor line is malformed.
    """
    text = data.decode("utf-8", errors="replace")
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.split("\n"):
        if not line or line[0] not in _FIRST:
            continue
        key, sep, value = line.partition(":")
        key = key.rstrip()
        if not sep or key not in _KEYS:
            continue
        if key == "processor":
            current = {}
            blocks.append(current)
        current[key] = value.strip()
    cpus: list[Cpu] = []
    sets: dict[str, frozenset[str]] = {}  # hosts repeat one flags line on every CPU

    def words(line: str) -> frozenset[str]:
        found = sets.get(line)
        if found is None:
            found = sets[line] = frozenset(line.split())
        return found

    for block in blocks:
        processor = _int(block["processor"])
        if processor is None:
            return Problem("malformed", path, f"processor is not a number: {block['processor']!r}")
        family = _int(block.get("cpu family"))
        model = _int(block.get("model"))
        if ("cpu family" in block and family is None) or ("model" in block and model is None):
            return Problem(
                "malformed", path, f"processor {processor}: family or model not a number"
            )
        cpus.append(
            Cpu(
                processor=processor,
                vendor=block.get("vendor_id", ""),
                family=family,
                model=model,
                model_name=block.get("model name", ""),
                stepping=_int(block.get("stepping")),
                flags=words(block.get("flags", "")),
                bugs=words(block.get("bugs", "")),
            )
        )
    if not cpus:
        return Problem("malformed", path, "no processor block")
    return CpuInfo(tuple(cpus))


def read_cpuinfo(host: Host) -> CpuInfo | Problem:
    data = host.read_bytes(PATH, LARGE)
    if isinstance(data, Problem):
        return data
    return parse_cpuinfo(data, host.display(PATH))


def parse_cpu_list(text: str) -> list[int] | None:
    """`0-3,8,10-11` to [0, 1, 2, 3, 8, 10, 11]; None when malformed."""
    cpus: list[int] = []
    text = text.strip()
    if not text:
        return None
    for part in text.split(","):
        lo, dash, hi = part.partition("-")
        a = parse_uint(lo, 6)
        b = parse_uint(hi, 6) if dash else a
        if a is None or b is None or b < a:
            return None
        cpus.extend(range(a, b + 1))
    return cpus


def read_online(host: Host) -> list[int] | Problem:
    rel = "sys/devices/system/cpu/online"
    text = host.read_text(rel, 4096)
    if isinstance(text, Problem):
        return text
    cpus = parse_cpu_list(text)
    if cpus is None:
        return Problem("malformed", host.display(rel), f"not a CPU list: {text.strip()[:40]!r}")
    return cpus
