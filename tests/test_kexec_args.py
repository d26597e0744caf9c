"""kexec's arguments: one parser, one table, held against the parser, the gate and the wrapper.

tests/kexec_args_table.json lists argument vectors and every phase the gate
must check for them. The Python parser is held to it directly; the shipped
shell wrapper (config/kexec-wrapper.sh) is run for real under /bin/sh against
the installed console script on a fixture host, and the phases the hook
reports having checked must be the table's. Then the doors of issue 10,
class 2: on a host with a TD alive no reading of kexec's arguments that can
execute a kernel is allowed through.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
from conftest import console_script, run_cli
from hostbuilder import HostSpec, VmProc, build, qemu_td_cmdline, tdx_host
from test_integrations import WRAPPER, Fakes, _run

from tdx_preflight.kexec_args import parse_kexec_args

TABLE = json.loads((Path(__file__).parent / "kexec_args_table.json").read_text())["vectors"]
IDS = [" ".join(v["args"]) or "(none)" for v in TABLE]


def td_host() -> HostSpec:
    return tdx_host(
        processes=[VmProc(pid=4242, cmdline=qemu_td_cmdline("td1"), misc_tdx=1)],
        misc_current={"tdx": 1},
    )


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("roots")
    return {"idle": build(base / "idle", tdx_host()), "td": build(base / "td", td_host())}


@pytest.mark.parametrize("vector", TABLE, ids=IDS)
def test_the_parser_reads_the_table(vector: dict[str, Any]) -> None:
    got = parse_kexec_args(vector["args"])
    assert (list(got.phases), got.image) == (vector["phases"], vector["image"]), vector["why"]
    # Only a vector the table cannot read is checked as every phase, and it says why.
    assert (got.unreadable is not None) == vector.get("unreadable", False)


def _gated(fakes: Fakes, root: Path, *args: str) -> tuple[Any, list[str], dict[str, Any]]:
    """Run the real wrapper; its tdx-preflight is the installed one, told the root and --format.

    Returns the wrapper's result, the argv the (recording) kexec got, and the hook's JSON.
    """
    shim = fakes.bin / "preflight-on-root"
    shim.write_text(
        "#!/bin/sh\n"
        "sub=$1; shift\nexec "
        f'{shlex.quote(console_script())} "$sub" --root {shlex.quote(str(root))} '
        '--format json "$@"\n'
    )
    shim.chmod(0o755)
    env = fakes.env(KEXEC_GATED_PREFLIGHT=str(shim), KEXEC_GATED_KEXEC=str(fakes.bin / "kexec"))
    run = _run(["/bin/sh", str(WRAPPER), *args], env=env)
    kexec = [c.argv for c in fakes.calls() if c.name == "kexec"]
    report, _end = json.JSONDecoder().raw_decode(run.stderr)
    return run, (kexec[0] if kexec else None), report


@pytest.mark.parametrize("vector", TABLE, ids=IDS)
def test_the_wrapper_checks_the_table_phases(
    vector: dict[str, Any], tmp_path: Path, roots: dict[str, Path]
) -> None:
    fakes = Fakes(tmp_path)
    fakes.add("kexec")
    run, kexec, report = _gated(fakes, roots["idle"], *vector["args"])
    assert report["gate"]["phases"] == vector["phases"], (vector["why"], run.stderr)
    assert run.returncode == 0 and kexec == vector["args"], run.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["-s", "-e"], 1),
        (["-l", "/boot/vmlinuz", "-e"], 1),
        (["-f", "/boot/vmlinuz"], 1),
        (["/boot/vmlinuz"], 1),
        (["--exe"], 1),
        (["-p", "/var/lib/kdump/vmlinuz"], 0),  # a crash load with TDs alive is allowed
        (["-p", "-u"], 0),
    ],
)
def test_the_wrapper_runs_kexec_only_when_every_phase_allows(
    args: list[str], code: int, tmp_path: Path, roots: dict[str, Path]
) -> None:
    fakes = Fakes(tmp_path)
    fakes.add("kexec")
    run, kexec, _report = _gated(fakes, roots["td"], *args)
    assert run.returncode == code, run.stderr
    assert kexec == (args if code == 0 else None)
    if code:
        assert "kexec exec blocked: guests.td fail" in run.stderr


# -- class 2 through the CLI: exec and hook on a host with a TD alive ------------------------


def _exec(root: Path, tmp_path: Path, *args: str) -> tuple[Any, Path]:
    """`tdx-preflight exec ARGS` with a recording `kexec` first on PATH."""
    fakes = Fakes(tmp_path)
    fakes.add("kexec")
    run = run_cli("exec", "--root", str(root), "--format", "json", *args, env=fakes.env())
    return run, fakes.log


@pytest.mark.parametrize(
    ("args", "phases"),
    [
        (["--", "kexec", "-s", "-e"], ["exec"]),
        (["--", "kexec", "-c", "-e"], ["exec"]),
        (["--", "kexec", "-l", "/boot/vmlinuz", "-e"], ["load", "exec"]),
        (["--phase", "load", "--", "kexec", "-e"], ["load", "exec"]),
        (["--", "kexec", "/boot/vmlinuz"], ["load", "exec"]),
        (["--phase", "crash", "--", "systemctl", "kexec"], ["load", "exec", "crash"]),
    ],
)
def test_exec_checks_every_phase_kexec_can_perform(
    args: list[str], phases: list[str], tmp_path: Path, roots: dict[str, Path]
) -> None:
    run, calls = _exec(roots["td"], tmp_path, *args)
    assert run.code == 1, run.stderr
    assert not any(calls.iterdir())  # the command never ran
    report = run.json()
    assert report["gate"]["phases"] == phases and report["phase"] == "exec"
    assert report["gate"]["by_phase"]["exec"]["verdict"] == "block"
    assert "tdx-preflight: kexec exec blocked: guests.td fail" in run.stderr


def test_exec_runs_kexec_when_the_phases_allow(tmp_path: Path, roots: dict[str, Path]) -> None:
    run, calls = _exec(roots["td"], tmp_path, "--", "kexec", "-s", "-p", "/var/lib/kdump/vmlinuz")
    assert run.code == 0, run.stderr
    [record] = calls.iterdir()
    assert record.read_bytes().split(b"\0")[2:-1] == [b"-s", b"-p", b"/var/lib/kdump/vmlinuz"]


def test_hook_adds_its_phase_to_kexecs(roots: dict[str, Path]) -> None:
    run = run_cli("hook", "load", "--root", str(roots["td"]), "--", "-l", "/boot/v", "-e")
    assert run.code == 1 and run.stdout == ""
    [line] = run.stderr.splitlines()
    assert line.startswith("tdx-preflight: kexec exec blocked: guests.td fail")
    alone = run_cli("hook", "load", "--root", str(roots["td"]), "--format", "json")
    assert alone.code == 0 and alone.json()["gate"]["phases"] == ["load"]


@pytest.mark.parametrize("unreadable_kallsyms", [False, True])
def test_a_block_names_every_blocker_after_the_first(
    unreadable_kallsyms: bool, tmp_path: Path
) -> None:
    """The summary and the hook's line lead with the same blocker (fails before unknowns,
    as the exit code says) and name the others: a bare "(+1 more)" after a guest list
    that ends in "and 59 more" read as one more guest. With kallsyms unreadable on a 6.17
    kernel, kernel.cache_flush is unknown and comes before guests.td in check order."""
    spec = td_host()
    if unreadable_kallsyms:
        spec = tdx_host(
            release="6.17.0-1012-intel",
            kallsyms=None,
            processes=spec.processes,
            misc_current={"tdx": 1},
        )
    root = build(tmp_path, spec)
    report = run_cli("check", "--root", str(root), "--format", "json").json()
    blocking = [c for c in report["checks"] if c["blocking"]]
    first, *rest = [c for c in blocking if c["status"] == "fail"] + [
        c for c in blocking if c["status"] == "unknown"
    ]
    assert rest, "the TD host should block on guests.td and guests.teardown"
    statuses = [c["status"] for c in blocking if c["status"] in ("fail", "unknown")]
    assert (statuses[0] == "unknown") is unreadable_kallsyms, statuses
    also = "(also blocking: " + ", ".join(f"{c['id']} {c['status']}" for c in rest) + ")"
    head = f"{first['id']} {first['status']}: {first['summary']}"
    assert report["summary"] == f"kexec blocked (exec): {head} {also}"
    run = run_cli("hook", "exec", "--root", str(root))
    assert run.code == 1
    fix = f"; fix: {first['remedy']}"
    assert run.stderr == f"tdx-preflight: kexec exec blocked: {head} {also}{fix}\n"


def _unknown_everywhere(tmp_path: Path, crash_size: int) -> Path:
    """kallsyms unreadable on a 6.17 kernel: kernel.cache_flush unknown in every phase."""
    spec = tdx_host(release="6.17.0-1012-intel", kallsyms=None, kexec_crash_size=crash_size)
    spec.extra_files["proc/kallsyms/x"] = ""
    return build(tmp_path / f"root-{crash_size}", spec)


def test_a_fail_in_any_phase_outranks_an_unknown(tmp_path: Path) -> None:
    # exec and load are unknown; crash fails (no crash kernel memory): exit 1, naming crash.
    root = _unknown_everywhere(tmp_path, crash_size=0)
    run = run_cli("hook", "--root", str(root), "--format", "json", "--", "-p", "/boot/v", "-f")
    report = run.json()
    assert run.code == 1 and report["exit_code"] == 1 and report["phase"] == "crash"
    assert {p: v["exit_code"] for p, v in report["gate"]["by_phase"].items()} == {
        "load": 3,
        "exec": 3,
        "crash": 1,
    }
    assert run.stderr.startswith("tdx-preflight: kexec crash blocked: kernel.kexec fail")
    unknown = run_cli(
        "hook", "--root", str(_unknown_everywhere(tmp_path, 1 << 29)), "--", "-p", "/boot/v", "-f"
    )
    assert unknown.code == 3 and "kexec load blocked: kernel.cache_flush unknown" in unknown.stderr


def test_the_wrapper_reads_no_argument_itself() -> None:
    """One parser: the wrapper hands kexec's arguments to the hook untouched."""
    text = WRAPPER.read_text()
    code = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert any('"$preflight" hook -- "$@" 2>&1 1>&3' in line for line in code)
    assert not [line for line in code if "case $arg" in line or "getopt" in line or "shift" in line]


def test_the_hook_names_an_unreadable_vector(roots: dict[str, Path]) -> None:
    run = run_cli("hook", "--root", str(roots["idle"]), "--format", "text", "--", "--exe")
    assert run.code == 0
    assert "kexec's arguments read as every phase: --exe is unknown or ambiguous" in run.stdout
    assert "phases checked: load (allow), exec (allow), crash (allow)" in run.stdout
