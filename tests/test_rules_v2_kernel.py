"""Rules version 2, kernel and TDX-module rows, through the installed CLI on fixture hosts.

errata.tdx_pw_mce, kernel.cache_flush and postkexec.tdx decided by TDH.SYS.DISABLE
(tdx_sys_disable in kallsyms) and the operator's sys_disable_module_versions;
tdx.module from every log spelling; tdx.module_update; kexec sysfs in both layouts;
remedies chosen from facts. Each test is one host and what DESIGN.md says of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, statuses
from hostbuilder import TDX_MSRS, HostSpec, build, tdx_host, tdx_host_7
from test_scenarios import check

DEFAULT_CONFIG = "/etc/tdx-preflight/config.yaml"
IN_FLIGHT = ("receiving", "preparing", "transferring", "programming")


def of(report: dict[str, Any], check_id: str) -> dict[str, Any]:
    return next(c for c in report["checks"] if c["id"] == check_id)


def config(tmp_path: Path, *versions: str) -> str:
    path = tmp_path / "config.yaml"
    listed = ", ".join(f'"{v}"' for v in versions)
    path.write_text(f"sys_disable_module_versions: [{listed}]\n")
    return str(path)


def emerald_rapids_7_2(**overrides: Any) -> HostSpec:
    """A 7.2 Emerald Rapids host that brought TDX up: tdx_pw_mce on the bugs line."""
    return tdx_host_7("7.2.0-1-amd64", cpu="emerald_rapids", extra_bugs=["tdx_pw_mce"], **overrides)


# -- the clean 7.3 host ------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["load", "exec", "crash"])
def test_clean_granite_rapids_on_7_3_is_allowed(tmp_path: Path, phase: str) -> None:
    report, st = check(tmp_path, tdx_host_7(), phase)
    assert (report["verdict"], report["exit_code"]) == ("allow", 0)
    assert report["host"]["model"] == 173 and report["host"]["rules"] == 2
    assert st["errata.tdx_pw_mce"] == "pass" and st["tdx.module_update"] == "pass"
    assert st["kernel.cache_flush"] == "pass" and st["kernel.kexec"] == "pass"
    assert "tdx_sys_disable" in of(report, "kernel.cache_flush")["summary"]
    assert of(report, "kernel.kexec")["evidence"]["kexec_sysfs"]["loaded"].endswith(
        "sys/kernel/kexec/loaded"
    )
    # The new kernel can bring TDX up only if module 1.5.08 implements TDH.SYS.DISABLE.
    assert st["postkexec.tdx"] == ("skip" if phase == "crash" else "unknown")
    assert report["sys_disable_vouched"] is None


# -- errata.tdx_pw_mce ---------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["load", "exec", "crash"])
def test_emerald_rapids_7_2_without_the_list_is_unknown(tmp_path: Path, phase: str) -> None:
    report, _ = check(tmp_path, emerald_rapids_7_2(), phase)
    assert (report["verdict"], report["exit_code"]) == ("block", 3)
    erratum = of(report, "errata.tdx_pw_mce")
    assert erratum["status"] == "unknown" and erratum["blocking"] is True
    assert "cannot tell whether TDX module 1.5.08 implements TDH.SYS.DISABLE" in erratum["summary"]
    for words in ('"1.5.08"', "sys_disable_module_versions", DEFAULT_CONFIG):
        assert words in erratum["remedy"]
    assert "6.18" not in erratum["remedy"]


@pytest.mark.parametrize("phase", ["load", "exec", "crash"])
def test_emerald_rapids_7_2_with_its_module_listed_is_allowed(tmp_path: Path, phase: str) -> None:
    cfg = config(tmp_path, "1.5.06", "1.5.08")
    report, st = check(tmp_path, emerald_rapids_7_2(), phase, "--config", cfg)
    assert (report["verdict"], report["exit_code"]) == ("allow", 0)
    erratum = of(report, "errata.tdx_pw_mce")
    assert erratum["status"] == "pass"
    assert erratum["evidence"]["sys_disable_vouched_by"] == f"config {cfg}"
    assert st["postkexec.tdx"] == ("skip" if phase == "crash" else "pass")
    vouched = ["errata.tdx_pw_mce"] + ([] if phase == "crash" else ["postkexec.tdx"])
    assert report["sys_disable_vouched"] == {
        "module_version": "1.5.08",
        "config": cfg,
        "key": "sys_disable_module_versions",
        "checks": vouched,
    }


@pytest.mark.parametrize("phase", ["exec", "crash"])
def test_a_version_only_the_boot_log_names_never_vouches(tmp_path: Path, phase: str) -> None:
    """Without tdx_host (unloaded after a runtime update, say) only the boot log names a
    version: the module that booted, which an update (7.2+) replaces without a log line."""
    cfg = config(tmp_path, "1.5.08")
    unloaded = emerald_rapids_7_2(tdx_host_version=None, tdx_host_attrs={}, fw_upload=None)
    report, st = check(tmp_path, unloaded, phase, "--config", cfg)
    assert (report["verdict"], report["exit_code"]) == ("block", 3)
    assert st["tdx.module_update"] == "pass"  # no update device: tdx_host is not loaded
    erratum = of(report, "errata.tdx_pw_mce")
    assert erratum["status"] == "unknown" and "1.5.08 (the boot log's version" in erratum["summary"]
    assert (
        "modprobe tdx_host" in erratum["remedy"]
        and "sys_disable_vouched_by" not in erratum["evidence"]
    )
    assert report["sys_disable_vouched"] is None
    if phase == "exec":
        assert st["postkexec.tdx"] == "unknown"


def test_text_output_says_which_passes_rest_on_the_list(tmp_path: Path) -> None:
    cfg = config(tmp_path, "1.5.08")
    root = build(tmp_path / "root", emerald_rapids_7_2())
    run = run_cli("check", "--root", str(root), "--config", cfg)
    assert run.code == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[-2].startswith("verdict: ALLOW")
    assert lines[-1] == (
        f"passes resting on sys_disable_module_versions (config {cfg}): "
        "errata.tdx_pw_mce, postkexec.tdx for module 1.5.08"
    )
    unlisted = run_cli("check", "--root", str(root), "--config", config(tmp_path, "1.5.16"))
    assert "resting on" not in unlisted.stdout


def test_metrics_say_which_passes_rest_on_the_list(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    cfg = config(tmp_path, "1.5.08")
    root = build(tmp_path / "root", emerald_rapids_7_2())
    prom = tmp_path / "m.prom"
    args = ("--root", str(root), "--config", cfg, "--metrics-file", str(prom))
    run = run_cli("hook", *args, "--", "-p", "/boot/vmlinuz", "--initrd=/boot/initrd.img")
    assert run.code == 0, run.stderr
    text = prom.read_text()
    got = {
        (s.labels["phase"], s.labels["check"], s.labels["module_version"], s.value)
        for fam in text_string_to_metric_families(text)
        if fam.name == "tdx_preflight_sys_disable_vouched"
        for s in fam.samples
    }
    assert got == {("crash", "errata.tdx_pw_mce", "1.5.08", 1.0)}
    run = run_cli("check", *args)
    assert run.code == 0 and 'check="postkexec.tdx"' in prom.read_text()
    run_cli("check", *args[:2], "--metrics-file", str(prom))  # no list: nothing rests on it
    assert "tdx_preflight_sys_disable_vouched{" not in prom.read_text()


def test_another_listed_version_does_not_vouch(tmp_path: Path) -> None:
    cfg = config(tmp_path, "1.5.16")
    report, st = check(tmp_path, emerald_rapids_7_2(), "exec", "--config", cfg)
    assert report["exit_code"] == 3 and st["errata.tdx_pw_mce"] == "unknown"
    assert cfg in of(report, "errata.tdx_pw_mce")["remedy"]


def test_sys_disable_inferred_from_release_when_kallsyms_is_absent(tmp_path: Path) -> None:
    report, st = check(tmp_path, emerald_rapids_7_2(kallsyms=None))
    assert st["errata.tdx_pw_mce"] == "unknown"
    assert "inferred from release 7.2.0-1-amd64" in of(report, "errata.tdx_pw_mce")["summary"]
    assert st["kernel.cache_flush"] == "pass"


def test_erratum_on_6_18_is_refused_and_the_remedy_names_7_2(tmp_path: Path) -> None:
    report, _ = check(tmp_path, tdx_host(cpu="emerald_rapids", extra_bugs=["tdx_pw_mce"]))
    erratum = of(report, "errata.tdx_pw_mce")
    assert erratum["status"] == "fail" and report["exit_code"] == 1
    assert erratum["summary"].endswith("the kernel refuses kexec")
    assert (
        "7.2 or later kernel and a TDX module that implements TDH.SYS.DISABLE"
        in (erratum["remedy"])
    )
    assert "6.18 or later" not in erratum["remedy"]


def test_erratum_refusal_in_the_log_is_refused_on_any_release(tmp_path: Path) -> None:
    spec = tdx_host(
        cpu="sapphire_rapids",
        release="6.17.0-1012-intel",
        kmsg=[
            "virt/tdx: TDX-Module initialized",
            "kexec: Not allowed on platform with tdx_pw_mce bug",
        ],
    )
    report, _ = check(tmp_path, spec, "load")
    erratum = of(report, "errata.tdx_pw_mce")
    assert erratum["status"] == "fail" and erratum["summary"].endswith("the kernel refuses kexec")


def test_erratum_on_a_vendor_kernel_without_refusal_is_unsafe(tmp_path: Path) -> None:
    report, _ = check(tmp_path, tdx_host(cpu="sapphire_rapids", release="6.12.0-1001-tdx"))
    erratum = of(report, "errata.tdx_pw_mce")
    assert erratum["status"] == "fail"
    assert erratum["summary"].endswith("kexec would not reset TDX private memory: unsafe")


def test_erratum_on_6_18_without_kexec_sysfs_is_unsafe_not_refused(tmp_path: Path) -> None:
    spec = tdx_host(
        cpu="sapphire_rapids", kexec_loaded=None, kexec_crash_loaded=None, kexec_crash_size=None
    )
    report, _ = check(tmp_path, spec, "crash")
    erratum = of(report, "errata.tdx_pw_mce")
    assert erratum["status"] == "fail" and erratum["blocking"] is True
    assert erratum["summary"].endswith("kexec would not reset TDX private memory: unsafe")


# -- kernel.cache_flush --------------------------------------------------------------------


def test_a_release_that_does_not_parse_counts_as_below_6_18(tmp_path: Path) -> None:
    report, st = check(tmp_path, tdx_host(release="custom-build", kallsyms=None))
    assert st["kernel.cache_flush"] == "unknown" and report["exit_code"] == 3


@pytest.mark.parametrize(
    "name", ["tdx_cpu_flush_cache_for_kexec", "tdx_sys_disable", "tdx_cpu_flush_cache"]
)
def test_each_flush_name_alone_passes(tmp_path: Path, name: str) -> None:
    report, st = check(tmp_path, tdx_host(kallsyms=[name, "tdx_enable"]))
    assert (
        st["kernel.cache_flush"] == "pass" and name in of(report, "kernel.cache_flush")["summary"]
    )


def test_a_longer_name_is_not_a_flush_name(tmp_path: Path) -> None:
    spec = tdx_host(kallsyms=["tdx_sys_disable_ops", "tdx_cpu_flush_cache_for_kexec_x"])
    report, st = check(tmp_path, spec)
    assert st["kernel.cache_flush"] == "fail" and report["exit_code"] == 1


def test_no_flush_on_an_erratum_host_recommends_7_2_not_6_18(tmp_path: Path) -> None:
    spec = tdx_host(cpu="emerald_rapids", extra_bugs=["tdx_pw_mce"], kallsyms=["tdx_enable"])
    report, _ = check(tmp_path, spec)
    flush = of(report, "kernel.cache_flush")
    assert flush["status"] == "fail" and "7.2 or later" in flush["remedy"]
    assert "6.18 or later" not in flush["remedy"]


# -- postkexec.tdx -------------------------------------------------------------------------


def test_postkexec_warns_without_sys_disable(tmp_path: Path) -> None:
    report, st = check(tmp_path, tdx_host())
    assert st["postkexec.tdx"] == "warn" and report["exit_code"] == 0
    assert "no TD can start until a cold reboot" in of(report, "postkexec.tdx")["summary"]


def test_postkexec_unknown_names_the_version(tmp_path: Path) -> None:
    report, _ = check(tmp_path, tdx_host_7(tdx_host_version="1.5.16"))
    post = of(report, "postkexec.tdx")
    assert post["status"] == "unknown" and "1.5.16" in post["summary"]
    assert post["blocking"] is False and report["exit_code"] == 0


def test_postkexec_unknown_when_the_module_state_is_unknown_before_7_1(tmp_path: Path) -> None:
    spec = tdx_host(kvm_intel_tdx=None, tdx_host_version=None, kmsg=["Linux version 6.18.2"])
    report, st = check(tmp_path, spec)
    assert report["host"]["tdx_module"]["state"] == "unknown"
    assert st["postkexec.tdx"] == "unknown"


def test_postkexec_on_7_1_takes_the_module_as_initialized_at_boot(tmp_path: Path) -> None:
    spec = tdx_host(
        release="7.1.3-1-amd64", kvm_intel_tdx=None, tdx_host_version=None, kmsg=["Linux 7.1"]
    )
    report, st = check(tmp_path, spec)
    assert st["postkexec.tdx"] == "warn"
    assert of(report, "postkexec.tdx")["evidence"]["inferred"].startswith("7.1+")


# -- tdx.module ------------------------------------------------------------------------------


def module_down(**overrides: Any) -> HostSpec:
    """A host whose TDX module did not come up: KVM says N, no tdx_host, no misc tdx line."""
    return tdx_host(
        kvm_intel_tdx="N", tdx_host_version=None, misc_capacity={}, misc_current={}, **overrides
    )


def test_granite_rapids_6_14_vendor_kernel_tdmr_exhausted(tmp_path: Path) -> None:
    spec = module_down(
        release="6.14.0-1007-intel",
        kmsg=[
            "virt/tdx: BIOS enabled: private KeyID range [64, 128)",
            "virt/tdx: TDX module 2.0.08.00, build number 882",
            "virt/tdx: initialization failed: TDMR [0x40000000, 0x80000000): reserved areas "
            "exhausted.",
            "virt/tdx: module initialization failed (-28)",
        ],
    )
    report, st = check(tmp_path, spec)
    module = of(report, "tdx.module")
    assert module["status"] == "warn"
    assert (
        "initialization failed: TDMR [0x40000000, 0x80000000): reserved areas exhausted. "
        "(error -28) (version 2.0.08.00)"
    ) in module["summary"]
    assert report["host"]["tdx_module"]["version"] == "2.0.08.00"
    assert "TDMRs or reserved areas" in module["remedy"] and "root" not in module["remedy"]
    assert st["postkexec.tdx"] == "pass"


def test_emerald_rapids_module_not_loaded(tmp_path: Path) -> None:
    spec = module_down(
        cpu="emerald_rapids",
        extra_bugs=["tdx_pw_mce"],
        kmsg=[
            "virt/tdx: BIOS enabled: private KeyID range [32, 64)",
            "virt/tdx: module not loaded",
        ],
    )
    report, _ = check(tmp_path, spec)
    module = of(report, "tdx.module")
    assert module["status"] == "warn" and module["summary"].startswith("TDX module not loaded")
    assert "no source tells" not in module["summary"]
    assert "BIOS" in module["remedy"] and "root" not in module["remedy"]
    assert report["host"]["tdx_module"]["state"] == "not loaded"


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (
            ["initialization failed: Hibernation support is enabled"],
            "Hibernation support is enabled",
        ),
        (
            ["SEAMCALL (0x21) failed: 0xc000010000000000", "TDX-Module initialization failed (-5)"],
            "SEAMCALL (0x21) failed: 0xc000010000000000 (error -5)",
        ),
        (
            ["frame pointer (RBP) clobber bug present, upgrade TDX module"],
            "frame pointer (RBP) clobber bug present, upgrade TDX module",
        ),
        (["TDX-Module initialization failed (-12)"], "error -12"),
    ],
)
def test_the_kernels_reason_line_is_kept(tmp_path: Path, lines: list[str], reason: str) -> None:
    spec = tdx_host(
        kvm_intel_tdx="N", tdx_host_version=None, kmsg=[f"virt/tdx: {x}" for x in lines]
    )
    report, _ = check(tmp_path, spec)
    assert of(report, "tdx.module")["summary"] == f"TDX module initialization failed: {reason}"


@pytest.mark.parametrize(
    ("lines", "version"),
    [
        (["TDX-Module initialized", "Module version: 1.5.16"], "1.5.16"),
        (
            [
                "TDX module: attributes 0x0, vendor_id 0x8086, major_version 1, minor_version 5, "
                "build_date 20240129, build_num 698",
                "module initialized",
            ],
            "1.5",
        ),
    ],
)
def test_log_spellings_of_an_initialized_module(
    tmp_path: Path, lines: list[str], version: str
) -> None:
    spec = tdx_host(
        kvm_intel_tdx=None, tdx_host_version=None, kmsg=[f"virt/tdx: {x}" for x in lines]
    )
    report, st = check(tmp_path, spec)
    assert st["tdx.module"] == "pass" and report["host"]["tdx_module"]["version"] == version


def test_tdx_not_supported_by_the_platform_is_no_tdx(tmp_path: Path) -> None:
    spec = HostSpec(
        release="7.1.3-1-amd64", kmsg=["virt/tdx: TDX not supported by the host platform"]
    )
    report, st = check(tmp_path, spec)
    assert report["exit_code"] == 0 and st["tdx.module"] == "skip"
    assert report["host"]["tdx_module"]["state"] == "not supported"


# -- tdx.module_update -----------------------------------------------------------------------


@pytest.mark.parametrize("status", IN_FLIGHT)
def test_an_update_in_flight_blocks_exec(tmp_path: Path, status: str) -> None:
    spec = tdx_host_7(fw_upload={"status": status, "error": "none"})
    report, _ = check(tmp_path, spec)
    update = of(report, "tdx.module_update")
    assert (update["status"], update["blocking"], report["exit_code"]) == ("fail", True, 1)
    assert update["evidence"] == {
        "status": status,
        "error": "none",
        "seamldr_version": "2.0.00",
        "num_remaining_updates": "16",
    }


def test_an_update_status_the_kernel_does_not_print_fails(tmp_path: Path) -> None:
    report, st = check(tmp_path, tdx_host_7(fw_upload={"status": "frobnicating"}))
    assert st["tdx.module_update"] == "fail" and report["exit_code"] == 1
    assert "in an unknown state" in of(report, "tdx.module_update")["summary"]


@pytest.mark.parametrize("phase", ["load", "crash"])
def test_an_update_in_flight_does_not_block_load_or_crash(tmp_path: Path, phase: str) -> None:
    report, st = check(tmp_path, tdx_host_7(fw_upload={"status": "programming"}), phase)
    assert st["tdx.module_update"] == "fail" and report["exit_code"] == 0


def test_idle_update_device_passes_with_seamldr_subdirectory(tmp_path: Path) -> None:
    attrs = {"seamldr/version": "2.0.01", "seamldr/num_remaining_updates": "3"}
    spec = tdx_host_7(tdx_host_attrs=attrs, fw_upload={"status": "idle", "error": "preparing:busy"})
    report, st = check(tmp_path, spec)
    assert st["tdx.module_update"] == "pass"
    assert of(report, "tdx.module_update")["evidence"] == {
        "status": "idle",
        "error": "preparing:busy",
        "seamldr_version": "2.0.01",
        "num_remaining_updates": "3",
    }


def test_absent_update_device_passes(tmp_path: Path) -> None:
    report, st = check(tmp_path, tdx_host())
    assert st["tdx.module_update"] == "pass"
    assert of(report, "tdx.module_update")["evidence"] == {"fw_upload": "absent"}


def test_unreadable_update_status_is_unknown_in_exec(tmp_path: Path) -> None:
    spec = tdx_host_7(fw_upload={"error": "none"})
    spec.extra_files["sys/devices/faux/tdx_host/firmware/tdx_module/status/x"] = ""
    report, st = check(tmp_path, spec)
    assert st["tdx.module_update"] == "unknown" and report["exit_code"] == 3


def test_update_check_skips_without_tdx(tmp_path: Path) -> None:
    _, st = check(tmp_path, HostSpec(fw_upload={"status": "programming"}))
    assert st["tdx.module_update"] == "skip"


# -- kernel.kexec and kexec.image in the 6.19+ layout ----------------------------------------


@pytest.mark.parametrize("layout", ["new", "both"])
def test_new_kexec_layout_is_read(tmp_path: Path, layout: str) -> None:
    report, st = check(tmp_path, tdx_host(kexec_sysfs=layout, kexec_loaded=0), "exec")
    assert st["kernel.kexec"] == "pass" and st["kexec.image"] == "warn"
    paths = of(report, "kexec.image")["evidence"]["kexec_sysfs"]
    assert paths["loaded"].endswith("sys/kernel/kexec/loaded")


def test_a_malformed_new_file_does_not_fall_back_to_the_old_name(tmp_path: Path) -> None:
    spec = tdx_host(kexec_sysfs="new")
    spec.extra_files["sys/kernel/kexec/loaded"] = "yes\n"
    spec.extra_files["sys/kernel/kexec_loaded"] = "1\n"
    report, st = check(tmp_path, spec)
    assert st["kernel.kexec"] == "unknown" and report["exit_code"] == 3


def test_crash_loaded_in_the_new_layout(tmp_path: Path) -> None:
    _, st = check(tmp_path, tdx_host(kexec_sysfs="both", kexec_crash_loaded=1), "crash")
    assert st["kexec.image"] == "warn" and st["kernel.kexec"] == "pass"


@pytest.mark.parametrize(
    ("size", "cma", "status"),
    [
        (0, "100000000-13fffffff\n", "pass"),
        (None, "100000000-13fffffff\n", "pass"),
        (0, "", "fail"),
        (None, None, "fail"),
        (0, "garbage\n", "unknown"),
    ],
)
def test_crash_reservation_by_size_or_cma_ranges(
    tmp_path: Path, size: int | None, cma: str | None, status: str
) -> None:
    spec = tdx_host(kexec_sysfs="both", kexec_crash_size=size, kexec_crash_cma_ranges=cma)
    report, st = check(tmp_path, spec, "crash")
    assert st["kernel.kexec"] == status
    assert report["exit_code"] == {"pass": 0, "fail": 1, "unknown": 3}[status]


def test_snapshot_of_the_6_19_layout_replays_the_same(tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host_7(kexec_crash_size=0, kexec_crash_cma_ranges="1-2\n"))
    assert (root / "sys/kernel/kexec_loaded").is_symlink()
    archive = tmp_path / "snap.tar.gz"
    assert run_cli("snapshot", str(archive), "--root", str(root)).code == 0
    for phase in ("exec", "crash"):
        args = ("--phase", phase, "--format", "json")
        want = run_cli("check", "--root", str(root), *args).json()
        got = run_cli("check", "--root", str(archive), *args).json()
        assert statuses(got) == statuses(want) and got["exit_code"] == want["exit_code"]
        kexec = of(got, "kernel.kexec")["evidence"]
        assert kexec["kexec_crash_cma_ranges"] == 1
        assert kexec["kexec_sysfs"]["loaded"].endswith("sys/kernel/kexec/loaded")


# -- remedies from facts ---------------------------------------------------------------------


def _bios_tdx_kernel_without(**overrides: Any) -> HostSpec:
    """TDX KeyIDs in MSR 0x87, but nothing says the kernel uses TDX."""
    return HostSpec(msrs=dict(TDX_MSRS), kexec_loaded=1, **overrides)


def test_kernel_config_without_tdx_host_support_says_so(tmp_path: Path) -> None:
    spec = _bios_tdx_kernel_without(config={"CONFIG_INTEL_TDX_HOST": "n"})
    report, st = check(tmp_path, spec)
    remedy = of(report, "platform.tdx")["remedy"]
    assert st["platform.tdx"] == "warn" and "CONFIG_INTEL_TDX_HOST=y" in remedy
    assert "kvm_intel.tdx=1" not in remedy


def test_kvm_intel_tdx_already_given_says_the_logs_reason(tmp_path: Path) -> None:
    spec = _bios_tdx_kernel_without(
        config={"CONFIG_INTEL_TDX_HOST": "y"},
        cmdline="BOOT_IMAGE=/boot/vmlinuz root=/dev/sda1 ro kvm_intel.tdx=1",
        kmsg=["virt/tdx: initialization failed: Hibernation support is enabled"],
    )
    report, _ = check(tmp_path, spec)
    remedy = of(report, "platform.tdx")["remedy"]
    assert "already enables kvm_intel.tdx" in remedy and "Hibernation support is enabled" in remedy
    assert "nohibernate" in remedy


def test_kvm_intel_tdx_suggested_when_nothing_says_more(tmp_path: Path) -> None:
    report, _ = check(tmp_path, _bios_tdx_kernel_without(config={"CONFIG_INTEL_TDX_HOST": "y"}))
    assert "Enable TDX in the kernel (kvm_intel.tdx=1)" in of(report, "platform.tdx")["remedy"]


def test_no_kexec_on_an_erratum_host_recommends_7_2(tmp_path: Path) -> None:
    spec = tdx_host(
        cpu="emerald_rapids",
        release="6.12.48-1-amd64",
        kexec_loaded=None,
        kexec_crash_loaded=None,
        kexec_crash_size=None,
    )
    report, _ = check(tmp_path, spec)
    kexec = of(report, "kernel.kexec")
    assert kexec["status"] == "fail" and "7.2 or later" in kexec["remedy"]
    assert "6.18 or later" not in kexec["remedy"]


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('sys_disable_module_versions: ["1.5.08", "1.5.08"]\n', 1, "'1.5.08' listed twice"),
        ("sys_disable_module_versions: [1.5]\n", 1, "is not a module version"),
        ('sys_disable_module_versions:\n  - "1.5.08"\n  - ""\n', 3, "'' is not a module version"),
        ('sys_disable_module_versions: "1.5.08"\n', 1, "expected a list"),
    ],
)
def test_invalid_module_version_lists_exit_2(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    run = run_cli("check", "--root", str(tmp_path), "--config", str(cfg))
    assert run.code == 2 and f"{cfg}:{line}:" in run.stderr and words in run.stderr


def test_explain_knows_the_update_check() -> None:
    run = run_cli("explain", "tdx.module_update")
    assert run.code == 0 and "sys/class/firmware/tdx_module/status" in run.stdout
    assert "Blocks in: exec" in run.stdout


def test_builder_writes_the_7_2_sysfs_as_the_kernel_lays_it_out(tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host_7())
    for old, new in (("kexec_loaded", "loaded"), ("kexec_crash_size", "crash_size")):
        assert (root / "sys/kernel" / old).readlink() == Path("kexec") / new
    link = root / "sys/class/firmware/tdx_module"
    assert link.is_symlink() and (link / "status").read_text() == "idle\n"
    assert (root / "sys/devices/faux/tdx_host/seamldr_version").read_text() == "2.0.00\n"
    assert not (root / "proc/kallsyms").read_text().count("tdx_cpu_flush_cache")
