"""Properties of malformed input (issue 10, class 3): a key twice, or a field missing,
never yields a pass, from the parser up to the verdict.

Each example rewrites one file of a real fixture host and runs the real readers and
checks on it (facts.gather, report.evaluate): nothing is mocked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hostbuilder import HostSpec, build, cpuinfo_text, tdx_host
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdx_preflight.facts import gather
from tdx_preflight.host import Host, Problem
from tdx_preflight.policy import Policy
from tdx_preflight.readers import cgroup, cpuinfo
from tdx_preflight.report import evaluate

PROPS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
names = st.sampled_from(["tdx", "sev", "sev_es", "x"])
values = st.integers(min_value=0, max_value=64)


def _statuses(root: Path, phase: str = "exec") -> tuple[dict[str, str], str]:
    with Host(root) as host:
        facts = gather(host, load_msr_module="never")
    report = evaluate(facts, phase, Policy())
    return {r.id: r.status for r in report.results}, report.verdict


@pytest.fixture(scope="module")
def idle_tdx_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TDX host with no VM: only the misc count can tell a teardown in progress."""
    return build(tmp_path_factory.mktemp("idle"), tdx_host(other_processes=2, kallsyms_filler=50))


@pytest.fixture(scope="module")
def plain_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TDX off everywhere but misc.capacity, which each example rewrites."""
    spec = HostSpec(kvm_intel_tdx="N", misc_capacity={}, misc_current={}, other_processes=2)
    return build(tmp_path_factory.mktemp("plain"), spec)


@st.composite
def misc_with_a_duplicate(draw: st.DrawFn) -> str:
    lines = draw(st.lists(st.tuples(names, values), max_size=4))
    dup = draw(names)
    lines[draw(st.integers(0, len(lines))) : 0] = [(dup, draw(values))]
    lines.insert(draw(st.integers(0, len(lines))), (dup, draw(values)))
    return "".join(f"{n} {v}\n" for n, v in lines)


@PROPS
@given(misc_with_a_duplicate())
def test_misc_current_with_a_duplicate_never_passes(idle_tdx_root: Path, text: str) -> None:
    assert isinstance(cgroup.parse_misc(text, "misc.current"), Problem)
    current = idle_tdx_root / "sys/fs/cgroup/misc.current"
    current.write_text(text)
    try:
        st_, verdict = _statuses(idle_tdx_root)
    finally:
        current.write_text("tdx 0\n")
    assert st_["guests.teardown"] == "unknown" and verdict == "block"


@PROPS
@given(misc_with_a_duplicate())
def test_misc_capacity_with_a_duplicate_never_passes(plain_root: Path, text: str) -> None:
    (plain_root / "sys/fs/cgroup/misc.capacity").write_text(text)
    st_, verdict = _statuses(plain_root)
    # The only TDX-in-use source left unread: TDX-only rows cannot skip.
    assert st_["guests.td"] == "unknown" and verdict == "block"


CPU_SPEC = tdx_host(cpus=4)
BLOCKS = [b for b in cpuinfo_text(CPU_SPEC).split("\n\n") if b.strip()]
FIELDS = [line.partition(":")[0] for line in BLOCKS[0].split("\n") if ":" in line]
REQUIRED = ["vendor_id", "cpu family", "model", "bugs"]


@st.composite
def broken_cpuinfo(draw: st.DrawFn) -> str:
    blocks = list(BLOCKS)
    n = draw(st.integers(0, len(blocks) - 1))
    lines = blocks[n].split("\n")
    if draw(st.booleans()):  # a field twice within the block, anywhere after processor
        i = draw(st.sampled_from([i for i, x in enumerate(lines) if ":" in x][1:]))
        lines.insert(draw(st.integers(i + 1, len(lines))), lines[i])
    else:  # a field every block needs, missing from this one
        key = draw(st.sampled_from(REQUIRED))
        lines = [x for x in lines if x.partition(":")[0].rstrip() != key]
    blocks[n] = "\n".join(lines)
    return "\n\n".join(blocks) + "\n\n"


@PROPS
@given(broken_cpuinfo())
def test_cpuinfo_with_a_field_twice_or_missing_never_passes(idle_tdx_root: Path, text: str) -> None:
    assert isinstance(cpuinfo.parse_cpuinfo(text.encode()), Problem)
    (idle_tdx_root / "proc/cpuinfo").write_text(text)
    try:
        st_, verdict = _statuses(idle_tdx_root)
    finally:
        (idle_tdx_root / "proc/cpuinfo").write_text(cpuinfo_text(tdx_host()))
    assert st_["platform.cpu"] == "unknown" and verdict == "block"
    assert st_["platform.tdx"] != "skip"  # never "not Intel"
