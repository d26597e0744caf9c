"""The rest of the CLI surface: --version, explain, guests, usage errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import console_script, run_cli
from hostbuilder import VmProc, build, qemu_td_cmdline, qemu_vm_cmdline, tdx_host

from tdx_preflight import __version__
from tdx_preflight.checks import CHECKS


def test_version() -> None:
    run = run_cli("--version")
    assert run.code == 0 and __version__ in run.stdout


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_allow_that_cannot_be_written_never_exits_0(tmp_path: Path, fmt: str) -> None:
    """A verdict the reader never got is not an allow: click.echo meets EPIPE and click
    exits 1, which the CLI's ending (__main__.leave) keeps."""
    root = build(tmp_path, tdx_host())
    args = [console_script(), "check", "--root", str(root), "--format", fmt]
    allowed = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert allowed.returncode == 0 and "allow" in allowed.stdout, allowed.stderr
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the write gets EPIPE (SIGPIPE is ignored)
    try:
        gone = subprocess.run(args, stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert gone.returncode == 1, gone.stderr


def _leave(
    body: str,
    stdout: int = subprocess.PIPE,
    env: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """A Python process that runs `body`, with __main__.leave imported, and records
    at teardown: a module-level object whose __del__ prints when the modules are freed.
    Its stdout is block-buffered (no PYTHONUNBUFFERED), as a command's is into a pipe."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | (env or {})
    script = (
        "import atexit, sys, threading, time\n"
        "from tdx_preflight.__main__ import leave\n"
        "class Torn:\n"
        "    def __del__(self):\n"
        "        sys.__stderr__.write('torn down\\n')\n"
        "torn = Torn()\n" + body
    )
    return subprocess.run(
        [sys.executable, *flags, "-c", script],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def test_the_ending_runs_atexit_flushes_and_skips_the_teardown() -> None:
    """Buffered output on both streams and atexit callbacks (a snapshot's tree is removed
    by one) survive the short ending; only the freeing of the modules is skipped."""
    done = _leave(
        "atexit.register(print, 'atexit ran')\n"
        "sys.stdout.write('buffered ')\n"
        "sys.stderr.write('a line not ended')\n"
        "leave(3)"
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered atexit ran\n"
    assert done.stderr == "a line not ended"  # and no "torn down"
    plain = _leave("sys.exit(3)")  # the interpreter's own exit, for comparison
    assert plain.returncode == 3 and "torn down" in plain.stderr


def test_the_ending_is_the_interpreters_when_a_thread_is_alive() -> None:
    """Py_FinalizeEx waits for non-daemon threads: so does leave(), by not shortening."""
    done = _leave(
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()\nleave(0)"
    )
    assert done.returncode == 0 and done.stdout == "thread done\n", done.stderr


def test_an_ending_whose_flush_fails_exits_120() -> None:
    """Output nobody reads (EPIPE; SIGPIPE is ignored) fails the flush: status 120, as the
    interpreter's exit gives, never the command's 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = _leave("sys.stdout.write('lost')\nleave(0)", stdout=write_end)
    finally:
        os.close(write_end)
    assert done.returncode == 120, done.stderr
    assert "BrokenPipeError" in done.stderr


@pytest.mark.parametrize("code", ["'a message'", "300", "-1"])
def test_an_ending_with_another_code_is_the_interpreters(code: str) -> None:
    """A SystemExit code that is not a status 0 to 255 ends as sys.exit would end it."""
    done = _leave(f"leave({code})")
    plain = _leave(f"sys.exit({code})")
    assert (done.returncode, done.stderr) == (plain.returncode, plain.stderr)
    assert "torn down" in done.stderr


#: The two ways to ask for a prompt after the script that a SystemExit honours (one the
#: program sets in os.environ itself is read only when the script ends without one).
_INSPECT = {"PYTHONINSPECT": ((), {"PYTHONINSPECT": "1"}), "-i": (("-i",), {})}


@pytest.mark.parametrize("how", _INSPECT)
def test_an_ending_that_asks_for_a_prompt_is_the_interpreters(how: str) -> None:
    """-i or PYTHONINSPECT ask for a prompt after the script: the interpreter's exit
    decides. It reports the SystemExit instead of exiting, then meets the end of stdin."""
    flags, env = _INSPECT[how]
    done = _leave("leave(0)", env=env, flags=flags)
    plain = _leave("sys.exit(0)", env=env, flags=flags)
    assert done.returncode == plain.returncode, (done.stderr, plain.stderr)
    for run in (done, plain):
        assert "SystemExit: 0" in run.stderr and "torn down" in run.stderr, run.stderr


def test_explain_every_check() -> None:
    listing = run_cli("explain")
    assert listing.code == 0
    for chk in CHECKS:
        assert chk.id in listing.stdout
        run = run_cli("explain", chk.id)
        assert run.code == 0
        for part in ("Question:", "Why:", "Reads:", "Blocks in:", "How to fix:"):
            assert part in run.stdout, (chk.id, part)
        assert chk.why.split()[0] in run.stdout


def test_explain_shows_configured_blocking(tmp_path: Path) -> None:
    assert "never (advisory)" in run_cli("explain", "guests.vm").stdout
    cfg = tmp_path / "c.yaml"
    cfg.write_text("blocking:\n  guests.vm: [exec]\n")
    run = run_cli("explain", "guests.vm", "--config", str(cfg))
    assert run.code == 0 and "Blocks in: exec (configured in" in run.stdout


def test_explain_unknown_check_is_a_usage_error() -> None:
    run = run_cli("explain", "guests.nope")
    assert run.code == 2 and "guests.td" in run.stderr


def test_bad_phase_and_missing_root_are_usage_errors(tmp_path: Path) -> None:
    assert run_cli("check", "--phase", "reboot").code == 2
    assert run_cli("check", "--root", str(tmp_path / "none")).code == 2


def test_guests_text_and_json(tmp_path: Path) -> None:
    td = VmProc(pid=4242, cmdline=qemu_td_cmdline("td1"), comm="td1", misc_tdx=1)
    vm = VmProc(pid=5000, cmdline=qemu_vm_cmdline("web1"))
    root = build(tmp_path / "root", tdx_host(processes=[td, vm], misc_current={"tdx": 1}))
    data = run_cli("guests", "--root", str(root), "--format", "json").json()
    assert data["enumeration"] == {
        "method": "debugfs+proc",
        "complete": True,
        "problem": None,
        "notes": ["/proc read in the 2 processes debugfs names"],
        "unseen": [],
    }
    assert {(g["pid"], g["kind"], g["name"]) for g in data["guests"]} == {
        (4242, "td", "td1"),
        (5000, "vm", "web1"),
    }
    assert data["root_misc_current_tdx"] == 1
    text = run_cli("guests", "--root", str(root))
    assert text.code == 0
    assert "2 VMs, 1 TD guest\n" in text.stdout
    assert any(line.startswith("td") and "td1" in line for line in text.stdout.splitlines())


def test_guests_without_any_enumeration_exits_3(tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host(debugfs_kvm=False))
    (root / "proc").rename(root / "proc.gone")
    run = run_cli("guests", "--root", str(root), "--format", "json")
    assert run.code == 3 and run.json()["enumeration"]["method"] is None
    text = run_cli("guests", "--root", str(root))
    assert text.code == 3 and "no KVM VM found" not in text.stdout
    assert "the list is not complete" in text.stdout


def test_verbose_check_shows_evidence(tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host())
    run = run_cli("check", "--root", str(root), "-v")
    assert run.code == 0 and "evidence:" in run.stdout and "1.5.08" in run.stdout


def test_install_integrations_into_a_prefix(tmp_path: Path) -> None:
    dry = run_cli("install-integrations", "--dry-run", "--prefix", str(tmp_path))
    assert dry.code == 0 and "would copy" in dry.stdout and not any(tmp_path.iterdir())
    run = run_cli("install-integrations", "--prefix", str(tmp_path))
    assert run.code == 0
    assert (tmp_path / "etc/systemd/system/tdx-preflight.service").is_file()
    assert (tmp_path / "etc/systemd/system/kexec-load.service.d/tdx-preflight.conf").is_file()
    link = tmp_path / "usr/local/bin/tdx-preflight"
    assert link.is_symlink() and link.resolve().exists()
    again = run_cli("install-integrations", "--prefix", str(tmp_path))
    assert again.code == 0 and "kept" in again.stdout


# -- options are options wherever they stand (issue 10, class 1) ------------------------------


def _td_root(tmp_path: Path) -> Path:
    td = VmProc(pid=4242, cmdline=qemu_td_cmdline("td1"), misc_tdx=1)
    return build(tmp_path / "td", tdx_host(processes=[td], misc_current={"tdx": 1}))


def test_every_command_reads_options_one_way() -> None:
    from tdx_preflight.cli import cli
    from tdx_preflight.cli.options import StrictCommand, StrictGroup

    assert isinstance(cli, StrictGroup) and cli.commands
    assert all(isinstance(cmd, StrictCommand) for cmd in cli.commands.values())


def test_every_command_is_loaded_from_the_module_the_group_names() -> None:
    """The group imports a command's module only when the command runs: the table it
    reads must name every command each module defines, and nothing else."""
    import importlib

    import click

    from tdx_preflight.cli import group

    defined_by: dict[str | None, str] = {}
    for module in set(group.COMMANDS.values()):
        for obj in vars(importlib.import_module(f"tdx_preflight.cli.{module}")).values():
            if isinstance(obj, click.Command) and not isinstance(obj, click.Group):
                defined_by[obj.name] = module
    assert defined_by == group.COMMANDS
    from tdx_preflight.cli import cli

    assert set(cli.commands) == set(group.COMMANDS)


def _an_option(name: str) -> str:
    return "--prefix" if name.endswith("install-integrations") else "--root"


def _command_names() -> list[str]:
    from tdx_preflight.cli import cli

    return sorted(cli.commands)


def _options(name: str) -> set[str]:
    from tdx_preflight.cli import cli

    return {o for p in cli.commands[name].params for o in p.opts}


#: Commands that take no option (and so cannot be given one twice): they read no host.
OPTIONLESS = {"schema"}


def test_every_command_but_the_optionless_takes_the_option_tested_twice() -> None:
    assert {n for n in _command_names() if _an_option(n) not in _options(n)} == OPTIONLESS


@pytest.mark.parametrize("name", sorted(set(_command_names()) - OPTIONLESS))
def test_an_option_given_twice_is_a_usage_error(name: str, tmp_path: Path) -> None:
    # Before any work: no daemon starts, nothing is read, installed or written.
    opt = _an_option(name)
    one, two = tmp_path / "a", tmp_path / "b"
    run = run_cli(name, opt, str(one), opt, str(two), timeout=30)
    assert run.code == 2 and f"option {opt} given twice" in run.stderr, run.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("name", "opt"),
    [(n, o) for n in _command_names() for o in (_an_option(n), "--config") if o in _options(n)],
)
def test_an_empty_path_is_a_usage_error(name: str, opt: str, tmp_path: Path) -> None:
    run = run_cli(name, opt, "", timeout=30, cwd=tmp_path)
    assert run.code == 2 and f"Invalid value for '{opt}': must not be empty" in run.stderr
    assert not any(tmp_path.iterdir())  # an empty --prefix installed nothing here


def test_root_then_an_empty_root_does_not_check_slash(tmp_path: Path) -> None:
    root = _td_root(tmp_path)
    assert run_cli("check", "--root", str(root)).code == 1
    run = run_cli("check", "--root", str(root), "--root", "")
    assert run.code == 2 and "given twice" in run.stderr


def test_a_phase_given_twice_is_not_the_last_one(tmp_path: Path) -> None:
    root = _td_root(tmp_path)
    run = run_cli("check", "--root", str(root), "--phase", "exec", "--phase", "load")
    assert run.code == 2 and "option --phase given twice" in run.stderr


def test_hook_options_after_the_phase_are_options(tmp_path: Path) -> None:
    root = _td_root(tmp_path)
    # --root after PHASE: the TD host is checked (not /), and blocks.
    run = run_cli("hook", "exec", "--root", str(root))
    assert run.code == 1 and "guests.td fail" in run.stderr
    # --format after PHASE prints the report of that root.
    run = run_cli("hook", "exec", "--root", str(root), "--format", "json")
    assert run.code == 1 and run.json()["host"]["root"] == str(root)
    # --metrics-file after PHASE is written.
    prom = tmp_path / "m.prom"
    run = run_cli("hook", "exec", "--root", str(root), "--metrics-file", str(prom))
    allowed = 'tdx_preflight_kexec_allowed{phase="exec",source="cli"} 0.0'
    assert run.code == 1 and allowed in prom.read_text()
    # --config after PHASE is read: a broken one is a configuration error.
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("block_on_warn: 7\n")
    run = run_cli("hook", "exec", "--root", str(root), "--config", str(cfg))
    assert run.code == 2 and "invalid configuration" in run.stderr
    # --force after PHASE is the override (refused without a reason), never kexec's.
    run = run_cli("hook", "exec", "--root", str(root), "--force")
    assert run.code == 2 and "--force needs" in run.stderr
    # --help after PHASE: the help, and not an allow.
    run = run_cli("hook", "exec", "--help")
    assert run.code == 2 and "Usage: tdx-preflight hook" in run.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["hook", "exec", "-l", "/boot/vmlinuz"],
        ["hook", "exec", "/boot/vmlinuz"],
        ["hook", "exec", "load"],
        ["exec", "kexec", "-e"],
        ["exec", "--phase", "exec", "systemctl", "kexec"],
        ["check", "exec"],
        ["hook"],
        ["exec", "--"],
    ],
)
def test_arguments_before_the_separator_are_a_usage_error(args: list[str], tmp_path: Path) -> None:
    root = _td_root(tmp_path)
    run = run_cli(args[0], "--root", str(root), *args[1:])
    assert run.code == 2, run.stderr
    assert run.stderr.startswith("Usage: tdx-preflight")


def test_check_and_exec_help_is_not_an_allow() -> None:
    for name in ("check", "hook", "exec"):
        run = run_cli(name, "--help")
        assert run.code == 2 and f"Usage: tdx-preflight {name}" in run.stdout
    run = run_cli("guests", "--help")
    assert run.code == 0 and "Usage: tdx-preflight guests" in run.stdout
