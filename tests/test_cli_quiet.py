"""`--quiet` on check and hook (exit code only), and shell completion (check ids for explain).

The installed console script runs as a subprocess on fixture hosts; completion is asked of it
the way bash's completion function asks (click's _TDX_PREFLIGHT_COMPLETE protocol).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import console_script, run_cli
from hostbuilder import VmProc, build, qemu_td_cmdline, tdx_host

from tdx_preflight.checks import CHECKS


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("quiet")
    td = VmProc(pid=4242, cmdline=qemu_td_cmdline("td1"), misc_tdx=1)
    return {
        "allow": build(base / "allow", tdx_host()),
        "block": build(base / "block", tdx_host(processes=[td], misc_current={"tdx": 1})),
    }


@pytest.mark.parametrize(("root", "code"), [("allow", 0), ("block", 1)])
@pytest.mark.parametrize(
    "argv",
    [
        ["check", "--quiet"],
        ["check", "-q", "--phase", "exec"],
        ["hook", "exec", "--quiet"],
        ["hook", "-q", "--", "-l", "/vmlinuz", "-e"],
    ],
)
def test_quiet_is_the_exit_code_only(
    roots: dict[str, Path], tmp_path: Path, argv: list[str], root: str, code: int
) -> None:
    # A metrics file that cannot be written would warn; quiet keeps that quiet too.
    bad_metrics = str(tmp_path / "no" / "dir" / "m.prom")
    opts = ["--root", str(roots[root]), "--metrics-file", bad_metrics]
    at = argv.index("--") if "--" in argv else len(argv)
    run = run_cli(*argv[:at], *opts, *argv[at:])
    assert (run.code, run.stdout, run.stderr) == (code, "", "")


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "--quiet", "--format", "json"],
        ["check", "--quiet", "-v"],
        ["hook", "exec", "--quiet", "--format", "text"],
    ],
)
def test_quiet_with_an_option_that_prints_is_a_usage_error(
    roots: dict[str, Path], argv: list[str]
) -> None:
    run = run_cli(*argv, "--root", str(roots["allow"]))
    assert run.code == 2 and "contradict each other" in run.stderr and run.stdout == ""


def test_quiet_still_reports_a_configuration_error(roots: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("block_on_warn: [no.such.check]\n")
    run = run_cli("check", "--quiet", "--root", str(roots["allow"]), "--config", str(config))
    assert run.code == 2 and f"{config}:1" in run.stderr and run.stdout == ""


def _complete(*words: str) -> list[str]:
    env = {
        **os.environ,
        "_TDX_PREFLIGHT_COMPLETE": "bash_complete",
        "COMP_WORDS": " ".join(["tdx-preflight", *words]),
        "COMP_CWORD": str(len(words)),
    }
    run = subprocess.run([console_script()], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    # One `type,value` line per completion (an empty line when there is none).
    return [line.split(",", 1)[1] for line in run.stdout.splitlines() if line]


def test_explain_completes_check_ids() -> None:
    assert _complete("explain", "") == [c.id for c in CHECKS]
    assert _complete("explain", "guests.t") == ["guests.td", "guests.teardown"]
    assert _complete("explain", "nothing") == []


def test_commands_complete() -> None:
    assert "uninstall-integrations" in _complete("un")
    assert _complete("rel") == ["reload"]


def test_readme_documents_completion() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "_TDX_PREFLIGHT_COMPLETE=bash_source tdx-preflight" in readme
