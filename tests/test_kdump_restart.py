"""`systemctl restart kdump-tools` (or kdump) keeps an armed crash kernel only our check blocks.

`keep-crash-kernel` runs for real against fixture hosts; each kdump drop-in's ExecStop= guard
runs under /bin/sh with recording fakes of systemctl (its job list), tdx-preflight and the
unit's own stop (Debian's init script, kdump-utils' kdumpctl), as systemd would run it (the
unit's own `$$` unescaped).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import run_cli
from hostbuilder import build, tdx_host
from test_integrations import INSTALLED_AT, REPO, Fakes, _run

#: Each kdump unit with a stop guard, and the stop its drop-in puts the guard in front of.
UNIT_STOPS = {
    "kdump-tools.service": "/etc/init.d/kdump-tools",  # Debian's kdump-tools
    "kdump.service": "/usr/bin/kdumpctl",  # kdump-utils
}


def _keep(tmp_path: Path, config: str = "", **spec: object) -> tuple[int, str]:
    root = build(tmp_path / "root", tdx_host(**{"kexec_crash_loaded": 1, **spec}))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config or "{}\n")
    run = run_cli("keep-crash-kernel", "--root", str(root), "--config", str(cfg))
    assert run.stdout == ""
    [line] = run.stderr.splitlines()
    return run.code, line


def test_a_block_of_ours_keeps_the_armed_kernel(tmp_path: Path) -> None:
    # The loaded crash kernel is a warning (kexec.image) that this policy makes blocking.
    code, line = _keep(tmp_path, "block_on_warn: [kexec.image]\n")
    assert code == 0, line
    assert line.startswith("tdx-preflight: keeping the crash kernel loaded earlier: ")
    assert "kexec.image fail" in line


def test_the_kernels_own_refusal_unloads(tmp_path: Path) -> None:
    code, line = _keep(tmp_path, cpu="emerald_rapids", extra_bugs=["tdx_pw_mce"])
    assert code == 1
    assert "the kernel itself refuses a new load (errata.tdx_pw_mce)" in line


def test_no_crash_memory_unloads(tmp_path: Path) -> None:
    code, line = _keep(tmp_path, "block_on_warn: [kexec.image]\n", kexec_crash_size=0)
    assert code == 1 and "kernel.kexec" in line


def test_an_allowed_reload_unloads(tmp_path: Path) -> None:
    code, line = _keep(tmp_path)
    assert code == 1 and "allows a new load" in line


def test_nothing_loaded_nothing_kept(tmp_path: Path) -> None:
    code, line = _keep(tmp_path, "block_on_warn: [kexec.image]\n", kexec_crash_loaded=0)
    assert code == 1 and "no crash kernel is loaded" in line


def _exec_stop(unit: str, fakes: Fakes) -> list[str]:
    drop_in = REPO / "systemd" / f"{unit}.d" / "tdx-preflight.conf"
    values = re.findall(r"^ExecStop=(.*)$", drop_in.read_text(), flags=re.MULTILINE)
    # An empty ExecStop= first: the unit's own stop is replaced, not run twice.
    assert values[0] == "" and len(values) == 2
    argv = shlex.split(values[1].replace("$$", "$"))
    stop = UNIT_STOPS[unit]
    assert argv[:2] == ["/bin/sh", "-c"] and argv[2].endswith(f"; exec {stop} stop")
    # The guard asks about this unit's jobs, not another's.
    assert f"list-jobs --no-legend {unit} " in argv[2]
    script = argv[2].replace(INSTALLED_AT, str(fakes.bin / "tdx-preflight"))
    script = script.replace("/bin/systemctl", str(fakes.bin / "systemctl"))
    return [*argv[:2], script.replace(stop, str(fakes.bin / "unit-stop"))]


@pytest.mark.parametrize("unit", sorted(UNIT_STOPS))
@pytest.mark.parametrize(
    ("job", "keep_rc", "calls"),
    [
        ("restart", 0, [("tdx-preflight", ["keep-crash-kernel"])]),
        ("restart", 1, [("tdx-preflight", ["keep-crash-kernel"]), ("unit-stop", ["stop"])]),
        ("restart", 2, [("tdx-preflight", ["keep-crash-kernel"]), ("unit-stop", ["stop"])]),
        ("stop", 0, [("unit-stop", ["stop"])]),
        (None, 0, [("unit-stop", ["stop"])]),
    ],
)
def test_the_stop_guard(
    tmp_path: Path,
    unit: str,
    job: str | None,
    keep_rc: int,
    calls: list[tuple[str, list[str]]],
) -> None:
    fakes = Fakes(tmp_path)
    fakes.add("tdx-preflight", 'exit "${FAKE_RC:-0}"')
    # systemctl list-jobs answers for the unit it is asked about only (its jobs, not others').
    line = f"  129 {unit} {job} running" if job else ""
    (fakes.bin / "systemctl").write_text(
        f'#!/bin/sh\n[ -n {shlex.quote(line)} ] && [ "$3" = {shlex.quote(unit)} ] && '
        f"echo {shlex.quote(line)}\nexit 0\n"
    )
    (fakes.bin / "systemctl").chmod(0o755)
    fakes.add("unit-stop", "exit 0")
    run = _run(_exec_stop(unit, fakes), env=fakes.env(FAKE_RC=str(keep_rc)))
    assert run.returncode == 0, run.stderr
    assert [(c.name, c.argv) for c in fakes.calls()] == calls
