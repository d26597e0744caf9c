"""Messages a user reads say what was seen and what to do (issue 11, "Messages"): each test
runs the real CLI on a fixture host and reads what a new user would read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from hostbuilder import VmProc, build, qemu_td_cmdline, tdx_host


def _checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in report["checks"]}


@pytest.mark.parametrize("phase", ["exec", "crash"])
def test_kexec_image_says_no_kernel_can_be_loaded_without_kexec(tmp_path: Path, phase: str) -> None:
    """No kexec sysfs at all: kernel.kexec fails; kexec.image stays unknown (DESIGN.md) but
    says that nothing can be loaded and gives kernel.kexec's fix, not "cannot tell"."""
    spec = tdx_host(kexec_loaded=None, kexec_crash_loaded=None, kexec_crash_size=None)
    root = build(tmp_path / "root", spec)
    run = run_cli("check", "--root", str(root), "--phase", phase, "--format", "json")
    checks = _checks(run.json())
    kexec, image = checks["kernel.kexec"], checks["kexec.image"]
    assert kexec["status"] == "fail" and "no kexec support" in kexec["summary"]
    assert image["status"] == "unknown"
    assert image["summary"].startswith("no kernel can be loaded: the running kernel has no kexec")
    assert "see kernel.kexec" in image["summary"] and "cannot tell" not in image["summary"]
    assert image["remedy"] == kexec["remedy"] and "CONFIG_KEXEC_CORE" in image["remedy"]
    text = run_cli("check", "--root", str(root), "--phase", phase).stdout
    assert "cannot tell whether a kernel is loaded" not in text


def test_a_snapshot_replay_names_the_archive(tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host(other_processes=0))
    archive = tmp_path / "snap.tar.gz"
    assert run_cli("snapshot", str(archive), "--root", str(root)).code == 0
    report = run_cli("check", "--root", str(archive), "--format", "json").json()
    assert report["host"]["root"] == str(archive)
    header = run_cli("check", "--root", str(archive)).stdout.splitlines()[0]
    assert f"root {archive}:" in header and "tdx-preflight-root-" not in header


def test_an_absent_file_remedy_says_what_to_do(tmp_path: Path) -> None:
    """A missing /proc/cpuinfo: the fix is about mounting /proc, not "X is missing"."""
    root = build(tmp_path / "root", tdx_host(remove=["proc/cpuinfo"]))
    report = run_cli("check", "--root", str(root), "--format", "json").json()
    cpu = _checks(report)["platform.cpu"]
    assert cpu["status"] == "unknown" and "does not exist" in cpu["summary"]
    assert "missing on this host" not in cpu["remedy"]
    assert "proc mounted on /proc" in cpu["remedy"]


@pytest.mark.parametrize(
    "spec",
    [
        tdx_host(kexec_loaded=None, kexec_crash_loaded=None, kexec_crash_size=None),
        tdx_host(remove=["proc/cpuinfo"]),
        tdx_host(
            processes=[VmProc(pid=4242, cmdline=qemu_td_cmdline("td1"), misc_tdx=1)],
            misc_current={"tdx": 1},
        ),
    ],
    ids=["no-kexec", "no-cpuinfo", "td-alive"],
)
def test_no_remedy_restates_its_summary(tmp_path: Path, spec: Any) -> None:
    root = build(tmp_path / "root", spec)
    for phase in ("load", "exec", "crash"):
        report = run_cli("check", "--root", str(root), "--phase", phase, "--format", "json").json()
        for c in report["checks"]:
            if c["remedy"] is None:
                continue
            assert "is missing on this host" not in c["remedy"], c
            assert c["summary"] not in c["remedy"], c


def test_counts_of_one_are_singular(tmp_path: Path) -> None:
    """One CPU, one TD, one KeyID held: "1 CPU", "1 TD guest", "1 TD KeyID"."""
    td = VmProc(pid=4242, cmdline=qemu_td_cmdline("td1"), misc_tdx=1)
    root = build(tmp_path / "root", tdx_host(cpus=1, processes=[td], misc_current={"tdx": 1}))
    text = run_cli("check", "--root", str(root), "-v").stdout
    assert re.search(r"Granite Rapids\), 1 CPU$", text, re.M) and "1 TD guest alive" in text
    assert "root misc.current tdx 1: 1 TD KeyID still held" in text
    plural_one = re.findall(r"\b1 (?:TD|VM|CPU|TD KeyID|TDX KeyID|TD guest|plain VM)s\b", text)
    assert plural_one == []


def test_exec_phase_help_and_readme_say_what_command_is_checked_as() -> None:
    """`exec --help`'s --phase and README's exec bullet state command_phases' reading: kexec's
    arguments, `systemctl kexec` as load and exec, any other COMMAND as every phase."""
    from tdx_preflight.kexec_args import ALL_PHASES, command_phases

    assert command_phases(("systemctl", "kexec")).phases == ("load", "exec")
    assert command_phases(("sh", "-c", "kexec -e")).phases == ALL_PHASES
    help_text = " ".join(run_cli("exec", "--help").stdout.split())
    assert "(COMMAND kexec), or exec" not in help_text
    assert "systemctl kexec: load and exec; any other COMMAND: every phase" in help_text
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "Any COMMAND but kexec is checked as exec" not in readme
    assert "`systemctl kexec` is checked as load and exec; any other COMMAND" in readme


def test_no_kexec_names_host_paths(tmp_path: Path) -> None:
    """Both kexec sysfs files are named as the host's /sys paths, with their leading slash and
    not under the fixture root (the evidence has the paths read)."""
    spec = tdx_host(kexec_loaded=None, kexec_crash_loaded=None, kexec_crash_size=None)
    root = build(tmp_path / "root", spec)
    checks = _checks(run_cli("check", "--root", str(root), "--format", "json").json())
    said = "neither /sys/kernel/kexec/loaded nor /sys/kernel/kexec_loaded exists"
    for check_id in ("kernel.kexec", "kexec.image"):
        assert said in checks[check_id]["summary"], checks[check_id]
        assert str(root) not in checks[check_id]["summary"]


#: /proc/self/status's capability lines of root with every capability, and of a process
#: with none (a real kernel's format: 16 hex digits).
_CAPS_ALL = "Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n"
_CAPS_NONE = "Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t0000000000000000\n"


def test_privileged_reads_capeff() -> None:
    from tdx_preflight.readers.kvm import privileged

    assert privileged(_CAPS_ALL, 0)
    assert not privileged(_CAPS_ALL, 1000) and not privileged(_CAPS_NONE, 0)
    # CAP_SYS_PTRACE (19) without CAP_DAC_READ_SEARCH (2), and the reverse: not enough.
    assert not privileged("CapEff:\t0000000000080000\n", 0)
    assert not privileged("CapEff:\t0000000000000004\n", 0)
    assert privileged("CapEff:\t0000000000080004\n", 0)


@pytest.mark.parametrize("method", ["proc", "debugfs+proc"])
def test_fd_denied_to_root_does_not_say_run_as_root(tmp_path: Path, method: str) -> None:
    """The live host denied /proc/PID/fd to a root process holding CAP_DAC_READ_SEARCH and
    CAP_SYS_PTRACE: guests.vm's fix names what blocks it (an LSM, a user namespace, a
    container) and where to run; debugfs only when it was not already used. Without that
    privilege the fix stays "run as root"."""
    from tdx_preflight.facts import gather
    from tdx_preflight.host import Host, Problem
    from tdx_preflight.policy import Policy
    from tdx_preflight.readers.kvm import Enumeration
    from tdx_preflight.report import evaluate

    root = build(tmp_path / "root", tdx_host(other_processes=0))
    with Host(str(root)) as host:
        facts = gather(host, load_msr_module="never")
    denied = Problem("permission", "/proc/PID/fd", "cannot list the file descriptors")

    def remedy(denied_to_root: bool) -> str:
        e = Enumeration(method, (), denied, denied_to_root=denied_to_root)
        report = evaluate(facts._replace(enumeration=e), "exec", Policy())
        [vm] = [r for r in report.results if r.id == "guests.vm"]
        assert vm.status == "unknown"
        return vm.remedy

    as_root = remedy(True)
    assert "Run as root" not in as_root
    assert "was not enough" in as_root and "user namespace" in as_root
    assert "host's namespaces" in as_root
    assert ("mount -t debugfs" in as_root) == (method == "proc")
    assert remedy(False).startswith("Run as root (CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE)")


def test_one_process_is_singular_in_enumeration_notes(tmp_path: Path) -> None:
    vm = VmProc(pid=5000, cmdline=qemu_td_cmdline("td1"), misc_tdx=1)
    root = build(tmp_path / "root", tdx_host(processes=[vm], misc_current={"tdx": 1}))
    data = run_cli("guests", "--root", str(root), "--format", "json").json()
    assert data["enumeration"]["notes"] == ["/proc read in the 1 process debugfs names"]


def test_check_verbose_says_an_incomplete_vm_list_and_unknowns_that_did_not_block(
    tmp_path: Path,
) -> None:
    """An incomplete enumeration (a debugfs kvm directory not named TID-FD) with no VM found:
    `check -v` says the list is not complete instead of "no KVM VM found", and the verdict
    line names the unknowns that did not block; the JSON summary stays as it was."""
    root = build(tmp_path / "root", tdx_host(other_processes=0))
    (root / "sys/kernel/debug/kvm/not-a-vm").mkdir()
    report = run_cli("check", "--root", str(root), "--phase", "load", "--format", "json").json()
    # An allow: no unknown blocked.
    unknown = [c["id"] for c in report["checks"] if c["status"] == "unknown"]
    assert "guests.vm" in unknown and report["verdict"] == "allow"
    assert "unknown" not in report["summary"]
    text = run_cli("check", "--root", str(root), "--phase", "load", "-v").stdout.splitlines()
    assert "no KVM VM found" not in text
    assert "no KVM VM found (the list is not complete: see guests.vm)" in text
    [verdict] = [line for line in text if line.startswith("verdict: ")]
    tail = f"; {len(unknown)} unknown, not blocking ({', '.join(unknown)})"
    assert verdict.endswith(tail), verdict


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_daemon_says_how_to_start_it(tmp_path: Path, fmt: str) -> None:
    """status and reload without a daemon (exit 4) say what was seen and how to start one;
    status's JSON keeps its schema (run_cli validates it)."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"control_socket: {tmp_path / 'none.sock'}\nstate_file: {tmp_path / 'state.json'}\n"
    )
    run = run_cli("status", "--config", str(config), "--format", fmt)
    assert run.code == 4 and "no daemon answers" in run.stderr
    assert "start the daemon: systemctl start tdx-preflight" in run.stderr
    assert "tdx-preflight check works without it" in run.stderr
    reload = run_cli("reload", "--config", str(config))
    assert reload.code == 4 and "start the daemon: systemctl start tdx-preflight" in reload.stderr


@pytest.mark.parametrize("columns", ["74", "80"])
def test_command_list_is_not_cut(columns: str) -> None:
    """`--help` (and the manual page help2man makes of it, at 74 columns in
    debian/command-help.sh) lists each command with a whole line: no "..." that click
    adds when it shortens a first help line."""
    run = run_cli("--help", env={"COLUMNS": columns})
    listing = run.stdout.split("Commands:\n", 1)[1].splitlines()
    assert len(listing) == 13 and all(line.startswith("  ") for line in listing), listing
    assert not [line for line in listing if line.endswith("...")], listing


def test_choice_arguments_have_a_plain_metavar() -> None:
    """hook's PHASE and schema's NAME read the same with every click version (8.1 shows a
    choice argument as [[load|exec|crash]], later ones as [load|exec|crash])."""
    hook = run_cli("hook", "--help").stdout.splitlines()[0]
    assert hook == "Usage: tdx-preflight hook [OPTIONS] [PHASE] [-- KEXEC ARGS...]"
    schema = run_cli("schema", "--help").stdout.splitlines()[0]
    assert schema == "Usage: tdx-preflight schema [OPTIONS] [NAME]"


def test_install_integrations_says_it_is_for_pip_installs() -> None:
    text = " ".join(run_cli("install-integrations", "--help").stdout.split())
    assert "For pip installs only: the Debian package installs all of these itself" in text


def test_wrapper_how_to_enable_tells_a_debian_user_it_is_done() -> None:
    """The wrapper ships as /usr/sbin/kexec-gated in the package, whose postinst diverts
    kexec itself: its HOW TO ENABLE says so first, before the pip steps (a local diversion
    made by hand would clash with the package's)."""
    script = (Path(__file__).resolve().parents[1] / "config/kexec-wrapper.sh").read_text()
    how = script.split("# HOW TO ENABLE\n", 1)[1]
    first = " ".join(line.lstrip("# ") for line in how.split("#\n", 1)[0].splitlines())
    assert first.startswith("Debian package: already done.")
    assert "postinst diverts kexec-tools' kexec" in first and "for pip installs" in first
    assert how.index("pip installs.") < how.index("dpkg-divert --local")


def test_units_readme_gives_the_debian_package_paths() -> None:
    """systemd/README.md ships in the package (/usr/share/tdx-preflight/systemd-README.md):
    it names the package's paths beside the pip ones, and the diversion postinst makes."""
    repo = Path(__file__).resolve().parents[1]
    text = " ".join((repo / "systemd/README.md").read_text().split())
    opening = text.split("| file |", 1)[0]
    assert "/usr/bin/tdx-preflight" in opening and "/usr/local/bin/tdx-preflight" in opening
    table = text.split("| file |", 1)[1].split("Each file's header", 1)[0]
    assert "/lib/systemd/system/tdx-preflight.service" in table
    assert "`/usr/sbin/kexec-gated`, and kexec-tools' kexec diverted to it" in table
    diversion = text.split("## The kexec diversion", 1)[1].split("Debian's kexec-tools also", 1)[0]
    assert diversion.index("postinst diverts") < diversion.index("On a pip install")
    missing = text.split("Hosts where", 1)[1]
    assert missing.index("/usr/bin/tdx-preflight") < missing.index("fail (exit 127)")
    readme = " ".join((repo / "README.md").read_text().split())
    assert "It does not divert `/sbin/kexec` (the Debian package does)" in readme
