"""kvm_intel.tdx on the kernel command line: one reader (readers/kernel.cmdline_bool), read
as the kernel reads it, and the platform.tdx summary and remedy that both follow it.

The kernel's rules: '-' and '_' are one in a parameter name (kernel/params.c parameq);
values go through kstrtobool (lib/kstrtox.c: y/Y/1, n/N/0, on, off, by the first one or
two characters); a bare name sets a bool (param_set_bool); quotes are dropped
(lib/cmdline.c next_arg); parameters apply in order, so the last one wins (parse_args);
nothing after `--` is the kernel's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hostbuilder import TDX_MSRS, HostSpec
from test_scenarios import check

from tdx_preflight.host import Problem
from tdx_preflight.readers import kernel

PATH = "/proc/cmdline"
BASE = "BOOT_IMAGE=/boot/vmlinuz-6.18.2-1-amd64 root=/dev/sda1 ro quiet"


def tdx(cmdline: str) -> bool | Problem | None:
    return kernel.cmdline_bool(cmdline, kernel.KVM_INTEL_TDX, PATH)


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("", None),
        ("kvm_intel.tdxx=1 kvm_intel.td=1 xkvm_intel.tdx=1 tdx=1", None),
        ("kvm_intel.tdx=1", True),
        ("kvm_intel.tdx=Y", True),
        ("kvm_intel.tdx=y", True),
        ("kvm_intel.tdx=yes", True),  # only the first character counts
        ("kvm_intel.tdx=on", True),
        ("kvm_intel.tdx=ON", True),
        ("kvm_intel.tdx=oN", True),
        ("kvm_intel.tdx", True),  # no `=`: a bool is set
        ('kvm_intel.tdx="1"', True),
        ('"kvm_intel.tdx=1"', True),
        ("kvm-intel.tdx=1", True),
        ("kvm-intel.tdx=on", True),
        ("kvm_intel.tdx=0", False),
        ("kvm_intel.tdx=N", False),
        ("kvm_intel.tdx=n", False),
        ("kvm_intel.tdx=no", False),
        ("kvm_intel.tdx=off", False),
        ("kvm_intel.tdx=Of", False),
        ("kvm-intel.tdx=0", False),
        ("kvm_intel.tdx=1 kvm_intel.tdx=0", False),  # the last one wins
        ("kvm_intel.tdx=0 kvm-intel.tdx=Y", True),
        ("kvm_intel.tdx=off\tkvm_intel.tdx", True),
        ("kvm_intel.tdx=1 -- kvm_intel.tdx=0", True),  # after `--`: init's, not the kernel's
        ("-- kvm_intel.tdx=1", None),
    ],
)
def test_the_kernels_reading_of_kvm_intel_tdx(given: str, want: bool | None) -> None:
    assert tdx(f"{BASE} {given}") is want


@pytest.mark.parametrize(
    "given",
    ["kvm_intel.tdx=", 'kvm_intel.tdx=""', "kvm_intel.tdx=maybe", "kvm_intel.tdx=o",
     "kvm_intel.tdx=2", "kvm_intel.tdx=true", "kvm_intel.tdx=1 kvm-intel.tdx=enable",
     "kvm_intel.tdx=bad kvm_intel.tdx=1"],
)  # fmt: skip
def test_a_value_kstrtobool_rejects_is_malformed(given: str) -> None:
    got = tdx(f"{BASE} {given}")
    assert isinstance(got, Problem) and got.kind == "malformed" and got.path == PATH
    assert "not a boolean the kernel takes" in got.detail


def test_an_unreadable_command_line_stays_its_problem() -> None:
    problem = Problem("permission", PATH, "permission denied")
    assert kernel.cmdline_bool(problem, kernel.KVM_INTEL_TDX, PATH) is problem


@pytest.mark.parametrize(
    ("cmdline", "want"),
    [
        ("a b=c", [("a", None), ("b", "c")]),
        ('a="x y" "b=c d" "e f"', [("a", "x y"), ("b", "c d"), ("e f", None)]),
        ("a=b=c  =d", [("a", "b=c"), ("=d", None)]),
        ("a -- b=c", [("a", None)]),
        ("a --=x b", [("a", None), ("--", "x"), ("b", None)]),
    ],
)
def test_parameters_split_as_next_arg_splits_them(
    cmdline: str, want: list[tuple[str, str | None]]
) -> None:
    assert kernel.cmdline_params(cmdline) == want


# -- what platform.tdx says, from the same reading ----------------------------------------


def _bios_tdx_unused(cmdline: str, **overrides: Any) -> HostSpec:
    """TDX KeyIDs in MSR 0x87, a kernel with TDX host support, nothing says TDX is up."""
    return HostSpec(
        msrs=dict(TDX_MSRS),
        kexec_loaded=1,
        config={"CONFIG_INTEL_TDX_HOST": "y"},
        cmdline=f"{BASE} {cmdline}",
        **overrides,
    )


def _platform_tdx(tmp_path: Path, cmdline: str) -> dict[str, Any]:
    report, st = check(tmp_path, _bios_tdx_unused(cmdline))
    assert st["platform.tdx"] == "warn"
    return next(c for c in report["checks"] if c["id"] == "platform.tdx")


@pytest.mark.parametrize("given", ["kvm-intel.tdx=1", "kvm_intel.tdx=on", "kvm_intel.tdx=y"])
def test_every_spelling_that_enables_it_is_read_as_enabled(tmp_path: Path, given: str) -> None:
    # Before one reader: kvm-intel and "on" read as absent, and "y" was enabled for the
    # summary while the remedy still said to add kvm_intel.tdx=1.
    row = _platform_tdx(tmp_path, given)
    assert "the kernel command line enables kvm_intel.tdx" in row["summary"]
    assert "already enables kvm_intel.tdx" in row["remedy"]
    assert "Enable TDX in the kernel" not in row["remedy"]


def test_a_later_kvm_intel_tdx_0_turns_it_off(tmp_path: Path) -> None:
    row = _platform_tdx(tmp_path, "kvm_intel.tdx=1 kvm_intel.tdx=0")
    assert "the kernel command line turns kvm_intel.tdx off" in row["summary"]
    assert "set kvm_intel.tdx=1 in its place" in row["remedy"]


def test_a_value_the_kernel_rejects_is_named(tmp_path: Path) -> None:
    row = _platform_tdx(tmp_path, "kvm_intel.tdx=maybe")
    assert "kvm_intel.tdx to is unknown" in row["summary"] and "'maybe'" in row["summary"]
    assert row["remedy"].startswith("Fix kvm_intel.tdx on the kernel command line")


def test_not_given_still_suggests_it(tmp_path: Path) -> None:
    row = _platform_tdx(tmp_path, "kvm_intel.tdxx=1")
    assert "kvm_intel.tdx=1 is not on the kernel command line" in row["summary"]
    assert "Enable TDX in the kernel (kvm_intel.tdx=1)" in row["remedy"]
