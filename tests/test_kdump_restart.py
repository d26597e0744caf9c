"""`systemctl restart kdump-tools` keeps an armed crash kernel that only our check blocks.

`keep-crash-kernel` runs for real against fixture hosts; the drop-in's ExecStop= guard runs
under /bin/sh with recording fakes of systemctl (its job list), tdx-preflight and Debian's
init script, as systemd would run it (the unit's own `$$` unescaped).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import run_cli
from hostbuilder import build, tdx_host
from test_integrations import INSTALLED_AT, REPO, Fakes, _run

DROP_IN = REPO / "systemd" / "kdump-tools.service.d" / "tdx-preflight.conf"
INIT_SCRIPT = "/etc/init.d/kdump-tools"


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


def _exec_stop(fakes: Fakes) -> list[str]:
    values = re.findall(r"^ExecStop=(.*)$", DROP_IN.read_text(), flags=re.MULTILINE)
    # An empty ExecStop= first: Debian's stop is replaced, not run twice.
    assert values[0] == "" and len(values) == 2
    argv = shlex.split(values[1].replace("$$", "$"))
    assert argv[:2] == ["/bin/sh", "-c"] and INIT_SCRIPT + " stop" in argv[2]
    script = argv[2].replace(INSTALLED_AT, str(fakes.bin / "tdx-preflight"))
    script = script.replace("/bin/systemctl", str(fakes.bin / "systemctl"))
    return [*argv[:2], script.replace(INIT_SCRIPT, str(fakes.bin / "kdump-init"))]


@pytest.mark.parametrize(
    ("job", "keep_rc", "calls"),
    [
        ("restart", 0, [["keep-crash-kernel"]]),
        ("restart", 1, [["keep-crash-kernel"], ["stop"]]),
        ("restart", 2, [["keep-crash-kernel"], ["stop"]]),
        ("stop", 0, [["stop"]]),
        (None, 0, [["stop"]]),
    ],
)
def test_the_stop_guard(
    tmp_path: Path, job: str | None, keep_rc: int, calls: list[list[str]]
) -> None:
    fakes = Fakes(tmp_path)
    fakes.add("tdx-preflight", 'exit "${FAKE_RC:-0}"')
    line = f"  129 kdump-tools.service {job} running" if job else ""
    # Only what the guard asks of systemctl is answered; list-jobs is not recorded.
    (fakes.bin / "systemctl").write_text(
        f"#!/bin/sh\n[ -n {shlex.quote(line)} ] && echo {shlex.quote(line)}\nexit 0\n"
    )
    (fakes.bin / "systemctl").chmod(0o755)
    fakes.add("kdump-init", "exit 0")
    run = _run(_exec_stop(fakes), env=fakes.env(FAKE_RC=str(keep_rc)))
    assert run.returncode == 0, run.stderr
    assert [c.argv for c in fakes.calls()] == calls
