"""/proc/cpuinfo: vendor, family, model, model name, flags and bugs of every CPU."""

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
        """Every CPU block says vendor_id GenuineIntel (DESIGN.md's "Intel")."""
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
#: Every block must name these (DESIGN.md "The checklist": a block without one is malformed).
_REQUIRED = ("vendor_id", "cpu family", "model")
#: ...and agree on them: CPUs of one host are one vendor, family and model.
_AGREE = ("vendor_id", "cpu family", "model")


def _blocks(text: str, path: str) -> list[dict[str, str]] | Problem:
    """Split cpuinfo into blocks of the keys the checks use; a key twice in a block is malformed.

    Every `key : value` line is checked for duplicates (the kernel prints each
    field once per CPU, arch/x86/kernel/cpu/proc.c), not only the kept keys.
    """
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    seen: set[str] = set()
    # Most lines repeat on every CPU (flags, model name...): each distinct line is split once.
    # (key, its value when the checks use it) of each line with a colon, else None.
    parsed: dict[str, tuple[str, str | None] | None] = {}
    for line in text.split("\n"):
        if line in parsed:
            kv = parsed[line]
        else:
            key, sep, raw = line.partition(":")
            key = key.rstrip()
            kv = parsed[line] = (key, raw.strip() if key in _KEYS else None) if sep else None
        if kv is None:
            continue
        key, value = kv
        if key == "processor":
            current = {}
            seen = set()
            blocks.append(current)
        elif key in seen:
            n = current.get("processor", "?")
            return Problem("malformed", path, f"processor {n}: {key!r} appears twice")
        seen.add(key)
        if value is not None:
            current[key] = value
    return blocks


def _consistency(blocks: list[dict[str, str]], path: str) -> Problem | None:
    """A block lacking vendor, family or model (or bugs, when any block has it), or blocks
    that disagree on vendor, family or model: malformed (nothing is inferred from it)."""
    required = _REQUIRED + (("bugs",) if any("bugs" in b for b in blocks) else ())
    first = blocks[0]
    for block in blocks:
        n = block.get("processor", "?")
        for key in required:
            if key not in block:
                return Problem("malformed", path, f"processor {n} has no {key!r} line")
        for key in _AGREE:
            if block[key] != first[key]:
                return Problem(
                    "malformed",
                    path,
                    f"CPUs disagree on {key!r}: processor {first['processor']} says "
                    f"{first[key][:40]!r}, processor {n} says {block[key][:40]!r}",
                )
    return None


def parse_cpuinfo(data: bytes, path: str = PATH) -> CpuInfo | Problem:
    """Parse the kernel's cpuinfo text: one block per CPU, each opened by `processor`.

    Only the keys the checks use are kept (a 256-CPU host prints about 7,000
    lines). Malformed (a Problem): no processor block, a field twice in one
    block, a block without vendor_id, cpu family or model (or without bugs
    when another block has it), blocks that disagree on those three, or a
    number that does not parse.
    """
    text = data.decode("utf-8", errors="replace")
    blocks = _blocks(text, path)
    if isinstance(blocks, Problem):
        return blocks
    if not blocks:
        return Problem("malformed", path, "no processor block")
    bad = _consistency(blocks, path)
    if bad is not None:
        return bad
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
        family = _int(block["cpu family"])
        model = _int(block["model"])
        if family is None or model is None:
            return Problem(
                "malformed", path, f"processor {processor}: family or model not a number"
            )
        cpus.append(
            Cpu(
                processor=processor,
                vendor=block["vendor_id"],
                family=family,
                model=model,
                model_name=block.get("model name", ""),
                stepping=_int(block.get("stepping")),
                flags=words(block.get("flags", "")),
                bugs=words(block.get("bugs", "")),
            )
        )
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
