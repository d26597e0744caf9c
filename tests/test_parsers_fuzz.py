"""Arbitrary bytes into every parser: none raises, each returns a value or a typed Problem."""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdx_preflight.host import Host, Problem
from tdx_preflight.readers import cgroup, cpuinfo, kernel, kvm, tdx, vmclass

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
raw = st.binary(max_size=4096)
# Bytes shaped like the real formats find deeper paths than uniform noise.
shaped = st.lists(
    st.sampled_from(
        [
            b"processor\t: 0",
            b"vendor_id\t: GenuineIntel",
            b"model\t\t: 143",
            b"cpu family\t: x",
            b"flags\t\t: tdx_host_platform",
            b"bugs\t\t: tdx_pw_mce",
            b"",
            b":",
            b"tdx 1",
            b"tdx -1",
            b"6,1,2,-;virt/tdx: module initialized",
            b"4,2,3,c;virt/tdx: TDX-Module initialization failed (-5)",
            b"CONFIG_KEXEC_CORE=y",
            b"# CONFIG_X is not set",
            b"\xff\xfe",
            b"0::/a/b",
            b"Tgid:\t12",
            b"<domstatus pid='1'><domain><name>x</name></domain></domstatus>",
            b"ffffffff81000000 T tdx_cpu_flush_cache",
            b"9" * 5000,
        ]
    ),
    max_size=30,
).map(b"\n".join)
data = st.one_of(raw, shaped)


def _ok(result: object, *types: type) -> None:
    assert isinstance(result, (*types, Problem)), type(result)
    if isinstance(result, Problem):
        assert result.kind in ("absent", "permission", "io", "malformed")
        assert isinstance(result.detail, str) and result.detail


@FUZZ
@given(data)
def test_cpuinfo(blob: bytes) -> None:
    _ok(cpuinfo.parse_cpuinfo(blob), cpuinfo.CpuInfo)


@FUZZ
@given(st.text(max_size=200))
def test_cpu_list(text: str) -> None:
    result = cpuinfo.parse_cpu_list(text)
    assert result is None or all(isinstance(c, int) for c in result)


@FUZZ
@given(st.lists(data, max_size=20))
def test_kmsg(records: list[bytes]) -> None:
    _ok(tdx.parse_kmsg(records), tdx.TdxLog)


@FUZZ
@given(data)
def test_misc(blob: bytes) -> None:
    result = cgroup.parse_misc(blob.decode("utf-8", "replace"), "misc.current")
    _ok(result, dict)
    _ok(cgroup.tdx_count(result, "misc.current"), int)


@FUZZ
@given(data)
def test_config(blob: bytes) -> None:
    _ok(kernel.parse_config(blob, "config"), dict)


@FUZZ
@given(data, st.one_of(st.none(), st.integers(0, 1 << 22)))
def test_libvirt_xml(blob: bytes, pid: int | None) -> None:
    _ok(vmclass.parse_libvirt_status(blob, "x.xml", pid), vmclass.LibvirtDomain)


@FUZZ
@given(data)
def test_cmdline(blob: bytes) -> None:
    args = vmclass.parse_cmdline(blob)
    assert isinstance(args, tuple)
    evidence = vmclass.cmdline_td_evidence(args)
    assert evidence is None or "command line" in evidence
    name = vmclass.qemu_name(args)
    assert name is None or isinstance(name, str)


@FUZZ
@given(st.text(max_size=2000))
def test_status_and_cgroup(text: str) -> None:
    try:
        fields = kvm.parse_status(text)
    except ValueError as exc:
        assert "twice" in str(exc)
    else:
        assert isinstance(fields, dict) and set(fields) <= {"Tgid", "Uid"}
    path = cgroup.parse_proc_cgroup(text)
    assert path is None or path.startswith("/")


@FUZZ
@given(st.text(max_size=100))
def test_release(text: str) -> None:
    v = kernel.parse_release(text)
    assert v is None or (isinstance(v[0], int) and isinstance(v[1], int))


@FUZZ
@given(data)
def test_kallsyms(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(f"{root}/proc")
        with open(f"{root}/proc/kallsyms", "wb") as f:
            f.write(blob)
        with Host(root) as host:
            _ok(kernel.read_kallsyms(host), kernel.Kallsyms)


@FUZZ
@given(st.text(max_size=300), st.sampled_from(["kvm_intel.tdx", "kvm-intel.tdx", "a"]))
def test_kernel_cmdline(text: str, name: str) -> None:
    for param, value in kernel.cmdline_params(text):
        assert isinstance(param, str) and (value is None or isinstance(value, str))
    got = kernel.cmdline_bool(text, name, "cmdline")
    assert got is None or isinstance(got, bool) or got.kind == "malformed"


@pytest.mark.parametrize(
    "text",
    [
        "Name:\tq\nTgid:\t5\nPid:\t6\nTgid:\t7\n",
        "Tgid:\t5\nPid:\t6\nTgid:\t7\n",
        "Name:\tq\nUid:\t0\t0\t0\t0\nUid:\t1\t1\t1\t1\n",
    ],
)
def test_a_status_line_given_twice_is_malformed(text: str) -> None:
    # fs/proc/array.c prints each line once: a second one is not "the last one wins".
    with pytest.raises(ValueError, match="twice"):
        kvm.parse_status(text)


def test_a_status_line_given_once_is_read() -> None:
    text = "Name:\tq\nTgid:\t5\nPid:\t6\nUid:\t0\t0\t0\t0\n"
    assert kvm.parse_status(text) == {"Tgid": "5", "Uid": "0\t0\t0\t0"}
    assert kvm.parse_status("Tgid:\t9\n") == {"Tgid": "9"}
