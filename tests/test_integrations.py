"""The integrations around the gate: drop-ins, the kexec wrapper, kured, Prometheus, the installer.

The drop-ins are verified by the real `systemd-analyze verify` beside stand-ins of the units
they extend (Debian's kexec-load.service is made by the real systemd-sysv-generator); their
shell guards, the wrapper and kured's reboot command run for real under /bin/sh with recording
fakes of tdx-preflight, kexec and systemctl; the alert rules are parsed, and checked and
unit-tested by promtool where it is installed; the installer is tested in test_install.py.
The agent's own unit is verified in test_systemd.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import console_script

from tdx_preflight.integrations import SHIPPED

REPO = Path(__file__).resolve().parent.parent
WRAPPER = REPO / "config" / "kexec-wrapper.sh"
RULES = REPO / "config" / "prometheus" / "tdx-preflight-rules.yaml"
KURED = REPO / "config" / "kured" / "kured-daemonset-patch.yaml"
INSTALLED_AT = "/usr/local/bin/tdx-preflight"

METRICS = {
    "tdx_preflight_kexec_allowed",
    "tdx_preflight_check_status",
    "tdx_preflight_td_guests",
    "tdx_preflight_kvm_vms",
    "tdx_preflight_info",
    "tdx_preflight_last_check_timestamp_seconds",
    "tdx_preflight_sys_disable_vouched",
}


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("env", os.environ.copy())
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


# --- recording fakes ------------------------------------------------------------------------


@dataclass
class Call:
    name: str
    argv: list[str]
    env: dict[str, str]


class Fakes:
    """Executables in a bin/ directory that record every call (argv exact, NUL-separated)."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.log = root / "calls"
        self.kmsg = root / "kmsg"
        self.console = root / "console"
        self.bin.mkdir()
        self.log.mkdir()

    def add(self, name: str, body: str = "") -> Path:
        """A fake NAME: records its argv and SYSTEMCTL_SKIP_AUTO_KEXEC, then runs `body`."""
        path = self.bin / name
        path.write_text(
            "#!/bin/sh\n"
            f"log={shlex.quote(str(self.log))}\n"
            'n=$(( $(ls "$log" | wc -l) ))\n'
            f'printf "%s\\0" {shlex.quote(name)} "${{SYSTEMCTL_SKIP_AUTO_KEXEC-}}" "$@" '
            '> "$log/$(printf %06d "$n")"\n' + body + "\n"
        )
        path.chmod(0o755)
        return path

    def calls(self) -> list[Call]:
        found = []
        for record in sorted(self.log.iterdir()):
            name, skip, *argv = record.read_bytes().decode().split("\0")[:-1]
            found.append(Call(name, argv, {"SYSTEMCTL_SKIP_AUTO_KEXEC": skip}))
        return found

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEXEC_GATED_")}
        env.pop("SYSTEMCTL_SKIP_AUTO_KEXEC", None)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        # A refusal is logged to the kernel log and the console: never the real ones here.
        env["KEXEC_GATED_KMSG"] = str(self.kmsg)
        env["KEXEC_GATED_CONSOLE"] = str(self.console)
        env.update(extra)
        return env


# A fake tdx-preflight: `hook` and `exec` exit with $FAKE_RC (default 0); on 0, `exec` runs the
# command after `--` as the real one does. It also prints on stdout, which the wrapper must keep
# off kexec's stdout.
PREFLIGHT_BODY = textwrap.dedent(
    """\
    echo "preflight says hello"
    rc=${FAKE_RC:-0}
    [ "$rc" -eq 0 ] || exit "$rc"
    if [ "$1" = exec ]; then
        while [ "$#" -gt 0 ] && [ "$1" != -- ]; do shift; done
        shift
        exec "$@"
    fi
    exit 0
    """
)


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    made = Fakes(tmp_path)
    made.add("tdx-preflight", PREFLIGHT_BODY)
    made.add("kexec", 'echo "kexec output"\nexit ${FAKE_KEXEC_RC:-0}')
    return made


# --- drop-ins: systemd-analyze verify -------------------------------------------------------


def _systemd_tool(name: str) -> str:
    for candidate in (shutil.which(name), f"/lib/systemd/{name}", f"/usr/lib/systemd/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip(f"{name} is not installed (no systemd on this machine)")


def _drop_in_text(name: str, preflight: str) -> str:
    text = (REPO / "systemd" / f"{name}.d" / "tdx-preflight.conf").read_text()
    assert INSTALLED_AT in text
    return text.replace(INSTALLED_AT, preflight)


# Stand-ins for the units the drop-ins extend: the packaged units' settings, with binaries that
# exist here. kexec-load.service comes from systemd-sysv-generator, as on Debian 12.
KDUMP_TOOLS_UNIT = """\
[Unit]
Description=Kernel crash dump capture service (stand-in for Debian kdump-tools 1:1.8.1)
DefaultDependencies=no
After=local-fs.target
After=networking.service
Before=basic.target

[Service]
Type=oneshot
StandardOutput=journal+console
EnvironmentFile=-/etc/default/kdump-tools
ExecStart=/bin/true
ExecStop=/bin/true
RemainAfterExit=yes

[Install]
WantedBy=basic.target
"""

KDUMP_UTILS_UNIT = """\
[Unit]
Description=Crash recovery kernel arming (stand-in for kdump-utils)
After=network.target

[Service]
Type=oneshot
ExecStart=/bin/true
ExecStop=/bin/true
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""

# The LSB header Debian's /etc/init.d/kexec-load carries, on a script that does nothing.
KEXEC_LOAD_INIT = """\
#!/bin/sh
### BEGIN INIT INFO
# Provides:          kexec-load
# Required-Start:    $local_fs $remote_fs kexec
# Required-Stop:     $local_fs $remote_fs kexec
# Default-Start:     2 3 4 5
# Default-Stop:      6
# Short-Description: Load kernel image with kexec (stand-in)
### END INIT INFO
exit 0
"""


def _kexec_load_unit(work: Path) -> str:
    """kexec-load.service as systemd-sysv-generator makes it from the init script."""
    init_d, rc_d, out = work / "init.d", work / "rc", work / "generated"
    for directory in (init_d, rc_d / "rc2.d", out):
        directory.mkdir(parents=True)
    script = init_d / "kexec-load"
    script.write_text(KEXEC_LOAD_INIT)
    script.chmod(0o755)
    (rc_d / "rc2.d" / "S01kexec-load").symlink_to(script)
    generator = _systemd_tool("system-generators/systemd-sysv-generator")
    env = {
        **os.environ,
        "SYSTEMD_SYSVINIT_PATH": str(init_d),
        "SYSTEMD_SYSVRCND_PATH": str(rc_d),
        "SYSTEMD_LOG_LEVEL": "err",
    }
    run = _run([generator, str(out), str(out), str(out)], env=env)
    assert run.returncode == 0, run.stderr
    unit = (out / "kexec-load.service").read_text()
    # The shape the drop-in's header describes.
    for line in ("Type=forking", "RemainAfterExit=yes", f"ExecStart={script} start"):
        assert line in unit.splitlines(), unit
    return unit


DROP_INS = ["kexec-load.service", "kdump-tools.service", "kdump.service"]


def _unit_with_drop_in(tmp_path: Path, name: str, drop_in: str | None = None) -> Path:
    units = tmp_path / "units"
    (units / f"{name}.d").mkdir(parents=True)
    if name == "kexec-load.service":
        text = _kexec_load_unit(tmp_path / "sysv")
    else:
        text = KDUMP_TOOLS_UNIT if name == "kdump-tools.service" else KDUMP_UTILS_UNIT
    (units / name).write_text(text)
    conf = units / f"{name}.d" / "tdx-preflight.conf"
    conf.write_text(drop_in if drop_in is not None else _drop_in_text(name, console_script()))
    return units / name


def _verify(unit: Path) -> tuple[int, list[str]]:
    analyze = _systemd_tool("systemd-analyze")
    env = {**os.environ, "SYSTEMD_PAGER": "cat", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"}
    run = _run([analyze, "verify", "--man=no", str(unit)], env=env)
    lines = (run.stdout + run.stderr).splitlines()
    return run.returncode, [line for line in lines if unit.name in line or "tdx-preflight" in line]


@pytest.mark.parametrize("name", DROP_INS)
def test_drop_in_verifies(tmp_path: Path, name: str) -> None:
    code, complaints = _verify(_unit_with_drop_in(tmp_path, name))
    assert code == 0, complaints
    assert complaints == []


def test_verify_reads_the_drop_in(tmp_path: Path) -> None:
    # Guards the test above: a typo in a drop-in must show up, naming the drop-in.
    text = _drop_in_text("kdump.service", console_script()) + "ExecStartPree=/bin/true\n"
    _code, complaints = _verify(_unit_with_drop_in(tmp_path, "kdump.service", text))
    assert any("ExecStartPree" in line and "tdx-preflight.conf" in line for line in complaints)


def _exec_start_pre(name: str) -> list[str]:
    """The drop-in's ExecStartPre= lines as argv lists, after systemd's own unescaping."""
    text = (REPO / "systemd" / f"{name}.d" / "tdx-preflight.conf").read_text()
    values = re.findall(r"^ExecStartPre=(.+)$", text, flags=re.MULTILINE)
    assert len(values) == 1, values
    # The lines use no %-specifiers and no backslashes, so quoting is the shell's and "$$" is "$".
    assert "%" not in values[0] and "\\" not in values[0]
    return shlex.split(values[0].replace("$$", "$"))


@pytest.mark.parametrize(
    ("name", "phase"),
    [("kexec-load.service", "load"), ("kdump-tools.service", "crash"), ("kdump.service", "crash")],
)
def test_drop_in_runs_the_hook(name: str, phase: str) -> None:
    # verify only checks ExecStart= and ExecStop= binaries; ExecStartPre= is checked here.
    argv = _exec_start_pre(name)
    if argv[:2] == ["/bin/sh", "-c"]:
        assert len(argv) == 3
        assert os.access("/bin/sh", os.X_OK)
        syntax = _run(["/bin/sh", "-n", "-c", argv[2]])
        assert syntax.returncode == 0, syntax.stderr
        assert f"; {INSTALLED_AT} hook {phase}; rc=$?; " in argv[2]
        assert argv[2].endswith('; exit "$rc"')
    else:
        assert argv == [INSTALLED_AT, "hook", phase]


def _guard(name: str, fakes: Fakes) -> list[str]:
    argv = _exec_start_pre(name)
    return [*argv[:2], argv[2].replace(INSTALLED_AT, str(fakes.bin / "tdx-preflight"))]


@pytest.mark.parametrize(
    ("env", "hook_runs"),
    [({"USE_KDUMP": "1"}, True), ({"USE_KDUMP": "0"}, False), ({}, False)],
)
@pytest.mark.parametrize("hook_rc", [0, 1, 2, 3])
def test_kdump_tools_guard(
    fakes: Fakes, tmp_path: Path, env: dict[str, str], hook_runs: bool, hook_rc: int
) -> None:
    if Path("/etc/default/kdump-tools").exists():
        pytest.skip("/etc/default/kdump-tools exists here and would decide instead of the test")
    if Path("/proc/vmcore").exists() and Path("/proc/vmcore").stat().st_size:
        pytest.skip("this is a crash kernel")
    kmsg = tmp_path / "kmsg"
    clean = fakes.env(FAKE_RC=str(hook_rc), TDX_PREFLIGHT_KMSG=str(kmsg))
    clean.pop("USE_KDUMP", None)
    run = _run(_guard("kdump-tools.service", fakes), env={**clean, **env})
    calls = fakes.calls()
    if hook_runs:
        assert [c.argv for c in calls] == [["hook", "crash"]]
        assert run.returncode == hook_rc
    else:
        assert calls == [] and run.returncode == 0
    _assert_config_error_logged(kmsg, hook_runs and hook_rc == 2, "kdump is off this boot")


def _assert_config_error_logged(kmsg: Path, logged: bool, consequence: str) -> None:
    """A configuration error (exit 2) leaves one err-priority line in the kernel log."""
    if not logged:
        assert not kmsg.exists()
        return
    [line] = kmsg.read_text().splitlines()
    assert line.startswith("<3>tdx-preflight: invalid configuration (exit 2): ")
    assert consequence in line


def test_drop_in_kmsg_path_defaults_to_dev_kmsg() -> None:
    for name in ("kexec-load.service", "kdump-tools.service"):
        text = (REPO / "systemd" / f"{name}.d" / "tdx-preflight.conf").read_text()
        assert '>"$${TDX_PREFLIGHT_KMSG:-/dev/kmsg}"' in text
        assert "TDX_PREFLIGHT_KMSG (default /dev/kmsg) is only" in text


@pytest.mark.parametrize(
    ("load_kexec", "hook_runs"), [("true", True), ("false", False), (None, False)]
)
@pytest.mark.parametrize("hook_rc", [1, 2])
def test_kexec_load_guard(
    fakes: Fakes, tmp_path: Path, load_kexec: str | None, hook_runs: bool, hook_rc: int
) -> None:
    if Path("/etc/default/kexec").exists() or Path("/etc/default/kexec.d").exists():
        pytest.skip("/etc/default/kexec exists here and would decide instead of the test")
    kmsg = tmp_path / "kmsg"
    env = fakes.env(FAKE_RC=str(hook_rc), TDX_PREFLIGHT_KMSG=str(kmsg))
    env.pop("LOAD_KEXEC", None)
    if load_kexec is not None:
        env["LOAD_KEXEC"] = load_kexec
    run = _run(_guard("kexec-load.service", fakes), env=env)
    if hook_runs:
        assert [c.argv for c in fakes.calls()] == [["hook", "load"]]
        assert run.returncode == hook_rc
    else:
        assert fakes.calls() == [] and run.returncode == 0
    _assert_config_error_logged(kmsg, hook_runs and hook_rc == 2, "reboots are cold")


# --- the kexec wrapper ----------------------------------------------------------------------


def test_wrapper_is_posix_sh() -> None:
    run = _run(["/bin/sh", "-n", str(WRAPPER)])
    assert run.returncode == 0, run.stderr
    assert WRAPPER.read_text().startswith("#!/bin/sh\n")
    assert not re.search(r"^\s*eval\b|\beval ", WRAPPER.read_text(), flags=re.MULTILINE)


def test_wrapper_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    run = _run([shellcheck, "--shell=sh", str(WRAPPER)])
    assert run.returncode == 0, run.stdout


def _wrap(fakes: Fakes, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    defaults = {
        "KEXEC_GATED_PREFLIGHT": str(fakes.bin / "tdx-preflight"),
        "KEXEC_GATED_KEXEC": str(fakes.bin / "kexec"),
    }
    environment = fakes.env(**{**defaults, **env})
    return _run(["/bin/sh", str(WRAPPER), *args], env=environment)


# Which phases a call is checked for is the hook's to say (tests/test_kexec_args.py runs this
# wrapper against the installed CLI over tests/kexec_args_table.json); here: what it hands over.
@pytest.mark.parametrize(
    "args",
    [["-l", "/boot/vmlinuz", "--initrd=/boot/initrd.img"], ["-e"], ["-p", "-u"], ["--help"], []],
)
def test_wrapper_hands_kexecs_arguments_to_the_hook(fakes: Fakes, args: list[str]) -> None:
    run = _wrap(fakes, *args)
    assert run.returncode == 0, run.stderr
    calls = fakes.calls()
    assert [(c.name, c.argv) for c in calls] == [
        ("tdx-preflight", ["hook", "--", *args]),
        ("kexec", args),
    ]


@pytest.mark.parametrize("hook_rc", [1, 2, 3])
def test_wrapper_runs_kexec_only_on_allow(fakes: Fakes, hook_rc: int) -> None:
    run = _wrap(fakes, "-e", FAKE_RC=str(hook_rc))
    assert run.returncode == hook_rc
    assert [c.name for c in fakes.calls()] == ["tdx-preflight"]
    assert run.stderr.strip().splitlines()[-1] == (
        f"kexec-gated: tdx-preflight refused this kexec (exit {hook_rc}); "
        f"{fakes.bin / 'kexec'} not run"
    )


@pytest.mark.parametrize("console_writable", [True, False])
def test_a_refusal_reaches_the_kernel_log_and_the_console(
    fakes: Fakes, console_writable: bool
) -> None:
    # The final `kexec -e` runs inside systemd-shutdown, after journald: the reason must
    # still be somewhere a person finds it.
    (fakes.bin / "tdx-preflight").write_text(
        "#!/bin/sh\necho 'tdx-preflight: kexec exec blocked: guests.td fail: 1 TD guest "
        "alive' >&2\nexit 1\n"
    )
    fakes.console.write_text("")
    if not console_writable:
        fakes.console.chmod(0o444)
    run = _wrap(fakes, "-e")
    assert run.returncode == 1
    assert [c.name for c in fakes.calls()] == []
    line = (
        f"kexec-gated: tdx-preflight refused this kexec (exit 1); {fakes.bin / 'kexec'} -e "
        "not run: tdx-preflight: kexec exec blocked: guests.td fail: 1 TD guest alive"
    )
    assert fakes.kmsg.read_text() == f"<3>{line}\n"
    if console_writable:
        assert fakes.console.read_text() == f"{line}\n"
    elif os.geteuid() != 0:  # root writes through mode 0444
        assert fakes.console.read_text() == ""
    assert run.stderr.splitlines()[0] == (
        "tdx-preflight: kexec exec blocked: guests.td fail: 1 TD guest alive"
    )


def test_a_missing_kernel_log_does_not_change_the_refusal(fakes: Fakes, tmp_path: Path) -> None:
    run = _wrap(fakes, "-e", FAKE_RC="3", KEXEC_GATED_KMSG=str(tmp_path / "no" / "kmsg"))
    assert run.returncode == 3
    assert "refused this kexec (exit 3)" in run.stderr and "kmsg" not in run.stderr


def test_the_kernel_log_and_console_default_to_the_real_devices() -> None:
    text = WRAPPER.read_text()
    assert "kmsg=${KEXEC_GATED_KMSG:-/dev/kmsg}" in text
    assert "console=${KEXEC_GATED_CONSOLE:-/dev/console}" in text
    assert (
        "KEXEC_GATED_KMSG       the kernel log to write a refusal to       (default /dev/kmsg)"
        in text
    )


def test_wrapper_passes_kexec_exit_code_and_stdout(fakes: Fakes) -> None:
    run = _wrap(fakes, "-e", FAKE_KEXEC_RC="7")
    assert run.returncode == 7
    # The hook's stdout goes to stderr: kexec's stdout stays kexec's.
    assert run.stdout == "kexec output\n"
    assert "preflight says hello" in run.stderr


HOSTILE = [
    "--append=root=/dev/mapper/vg-root ro quiet",
    "--command-line=$(touch {sentinel})",
    "`touch {sentinel}`",
    "; touch {sentinel} #",
    'it\'s "quoted" & piped | here > {sentinel}',
    "*",
    "two\nlines",
    "",
    "-",
    "/boot/vmlinuz with spaces",
]


def test_wrapper_keeps_arguments_intact(fakes: Fakes, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    args = ["-l", *(a.format(sentinel=sentinel) for a in HOSTILE)]
    run = _wrap(fakes, *args)
    assert run.returncode == 0, run.stderr
    hook, kexec = fakes.calls()
    assert hook.argv == ["hook", "--", *args]
    assert kexec.argv == args
    assert not sentinel.exists()


def test_wrapper_fails_closed_without_tdx_preflight(fakes: Fakes, tmp_path: Path) -> None:
    run = _wrap(fakes, "-e", KEXEC_GATED_PREFLIGHT=str(tmp_path / "missing" / "tdx-preflight"))
    assert run.returncode == 127
    assert fakes.calls() == []
    assert "could not be run" in run.stderr


def test_a_hook_without_an_answer_is_a_refusal_in_time(fakes: Fakes) -> None:
    # systemd-shutdown waits for its final kexec -e without a deadline: a hung hook would
    # hold the host instead of letting it fall back to a cold reboot.
    fakes.add("tdx-preflight", "exec sleep 60")
    t0 = time.monotonic()
    run = _wrap(fakes, "-e", KEXEC_GATED_TIMEOUT="1")
    took = time.monotonic() - t0
    assert run.returncode == 3, run.stderr
    assert took < 30, took
    assert [c.name for c in fakes.calls()] == ["tdx-preflight"]  # kexec never ran
    assert "tdx-preflight gave no answer within 1s (exit 3)" in run.stderr
    assert "gave no answer within 1s" in fakes.kmsg.read_text()


@pytest.mark.parametrize("limit", ["1s", "-1", "x", " 5"])
def test_a_timeout_that_is_not_seconds_refuses(fakes: Fakes, limit: str) -> None:
    run = _wrap(fakes, "-e", KEXEC_GATED_TIMEOUT=limit)
    assert run.returncode == 2, run.stderr
    assert fakes.calls() == [] and "KEXEC_GATED_TIMEOUT" in run.stderr


def test_a_refusal_is_appended_to_the_kernel_log_path(fakes: Fakes) -> None:
    fakes.kmsg.write_text("earlier record\n")
    run = _wrap(fakes, "-e", FAKE_RC="1")
    assert run.returncode == 1
    lines = fakes.kmsg.read_text().splitlines()
    assert lines[0] == "earlier record" and lines[1].startswith("<3>kexec-gated: ")


def test_wrapper_refuses_to_loop(fakes: Fakes) -> None:
    run = _wrap(fakes, "-e", KEXEC_GATED_ACTIVE="1")
    assert run.returncode == 2
    assert fakes.calls() == [] and "loop" in run.stderr


# `dpkg -L kexec-tools` lines around the binary: Debian 12 ships /sbin/kexec, newer releases
# /usr/sbin/kexec.
KEXEC_TOOLS_FILES = {
    "bookworm": ["/.", "/sbin", "/sbin/coldreboot", "/sbin/kexec", "/sbin/vmcore-dmesg",
                 "/usr/share/man/man8/kexec.8.gz"],
    "trixie": ["/.", "/usr/sbin", "/usr/sbin/coldreboot", "/usr/sbin/kexec",
               "/usr/share/man/man8/kexec.8.gz", "/usr/share/doc/kexec-tools/kexec"],
}  # fmt: skip


@pytest.mark.parametrize(
    ("release", "path"), [("bookworm", "/sbin/kexec"), ("trixie", "/usr/sbin/kexec")]
)
def test_the_diversion_recipe_finds_the_shipped_kexec(release: str, path: str) -> None:
    recipe = re.findall(r"^#       (\S.*)$", WRAPPER.read_text(), flags=re.MULTILINE)
    [find] = [line for line in recipe if line.startswith("kexec=$(dpkg -L kexec-tools | ")]
    pattern = find.removeprefix("kexec=$(dpkg -L kexec-tools | ").removesuffix(")")
    listing = "\n".join(KEXEC_TOOLS_FILES[release]) + "\n"
    run = subprocess.run(
        ["/bin/sh", "-c", pattern], input=listing, capture_output=True, text=True, timeout=30
    )
    assert run.stdout == f"{path}\n", run.stderr
    assert 'dpkg-divert --local --rename --divert "$kexec.distrib" --add "$kexec"' in recipe
    assert 'rm "$kexec" && dpkg-divert --local --rename --remove "$kexec"' in recipe


def test_the_wrapper_looks_for_the_diverted_kexec_at_both_paths() -> None:
    text = WRAPPER.read_text()
    assert "for candidate in /usr/sbin/kexec.distrib /sbin/kexec.distrib /usr/sbin/kexec" in text


def test_wrapper_is_found_on_path_as_kexec(fakes: Fakes, tmp_path: Path) -> None:
    # Installed in place of kexec (the dpkg diversion), its real kexec set apart: a call by
    # name reaches the gate, then the real binary.
    diverted = tmp_path / "diverted"
    diverted.mkdir()
    shutil.copy(WRAPPER, diverted / "kexec")
    (diverted / "kexec").chmod(0o755)
    env = fakes.env(
        KEXEC_GATED_PREFLIGHT=str(fakes.bin / "tdx-preflight"),
        KEXEC_GATED_KEXEC=str(fakes.bin / "kexec"),
    )
    env["PATH"] = f"{diverted}{os.pathsep}{env['PATH']}"
    run = _run(["kexec", "-p", "/var/lib/kdump/vmlinuz"], env=env)
    assert run.returncode == 0, run.stderr
    assert [(c.name, c.argv[:2]) for c in fakes.calls()] == [
        ("tdx-preflight", ["hook", "--"]),
        ("kexec", ["-p", "/var/lib/kdump/vmlinuz"]),
    ]


# --- kured ----------------------------------------------------------------------------------


def _kured_args() -> list[str]:
    doc = yaml.safe_load(KURED.read_text())
    assert doc["kind"] == "DaemonSet" and doc["metadata"]["name"] == "kured"
    spec = doc["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    (container,) = spec["containers"]
    assert container["name"] == "kured" and container["securityContext"]["privileged"] is True
    return container["args"]


def test_kured_args() -> None:
    args = _kured_args()
    assert "--reboot-method=command" in args
    commands = [a.removeprefix("--reboot-command=") for a in args if a.startswith("--reboot-c")]
    assert len(commands) == 1
    argv = shlex.split(commands[0])  # kured splits with google/shlex: the same rules here
    assert argv[:2] == ["/bin/sh", "-c"] and len(argv) == 3
    assert f"{INSTALLED_AT} exec -- /usr/bin/systemctl kexec" in argv[2]
    assert _run(["/bin/sh", "-n", "-c", argv[2]]).returncode == 0


def _kured_command(fakes: Fakes) -> list[str]:
    (command,) = [a for a in _kured_args() if a.startswith("--reboot-command=")]
    argv = shlex.split(command.removeprefix("--reboot-command="))
    script = argv[2].replace(INSTALLED_AT, str(fakes.bin / "tdx-preflight"))
    return [*argv[:2], script.replace("/usr/bin/systemctl", str(fakes.bin / "systemctl"))]


@pytest.mark.parametrize(
    ("hook_rc", "kexec_rc", "expected"),
    [
        (0, 0, [["kexec"]]),
        (1, 0, [["reboot"]]),
        (3, 0, [["reboot"]]),
        # Allowed, but systemctl kexec fails (no kernel it can load): fall back too.
        (0, 1, [["kexec"], ["reboot"]]),
    ],
)
def test_kured_command_falls_back_to_a_cold_reboot(
    fakes: Fakes, hook_rc: int, kexec_rc: int, expected: list[list[str]]
) -> None:
    fakes.add("systemctl", f'[ "$1" = kexec ] && exit {kexec_rc}\nexit 0')
    run = _run(_kured_command(fakes), env=fakes.env(FAKE_RC=str(hook_rc)))
    assert run.returncode == 0, run.stderr
    calls = [c for c in fakes.calls() if c.name == "systemctl"]
    assert [c.argv for c in calls] == expected
    for call in calls:
        # The fallback must stay a cold reboot even when a kernel is loaded (systemd >= 255).
        assert call.env["SYSTEMCTL_SKIP_AUTO_KEXEC"] == ("1" if call.argv == ["reboot"] else "")


# --- Prometheus -----------------------------------------------------------------------------

# PromQL words that are not metric names (functions, aggregations, keywords) used or likely.
PROMQL_WORDS = {
    "abs", "absent", "absent_over_time", "and", "avg", "avg_over_time", "bool", "by",
    "changes", "clamp_min", "count", "count_over_time", "delta", "group_left", "group_right",
    "ignoring", "increase", "label_replace", "max", "max_over_time", "min", "min_over_time",
    "offset", "on", "or", "rate", "resets", "scalar", "sum", "time", "timestamp", "topk",
    "unless", "vector", "without",
}  # fmt: skip


def _metric_names(promql: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", promql)  # strings
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)  # label matchers, ranges
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
    text = re.sub(grouping, "", text)  # label lists
    text = re.sub(r"\b\d+(?:\.\d+)?(?:[smhdwy]|ms)?\b", "", text)  # numbers, durations
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text)) - PROMQL_WORDS


def _template_queries(template: str) -> list[str]:
    """The PromQL in `printf "..."` calls of an alert template, Go string escapes undone."""
    found = re.findall(r'printf\s+"((?:[^"\\]|\\.)*)"', template)
    return [q.replace('\\"', '"').replace("%q", '"x"') for q in found]


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    rules = []
    for group in doc["groups"]:
        assert isinstance(group["name"], str) and group["rules"]
        rules.extend(group["rules"])
    return rules


def test_rules_structure() -> None:
    rules = _rules()
    by_name = {r["alert"]: r for r in rules}
    assert len(by_name) == len(rules)
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"[A-Z][A-Za-z]+", rule["alert"])
        assert isinstance(rule["expr"], str)
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert {"summary", "description"} <= set(rule["annotations"])
    assert set(by_name) == {
        "TDXKexecBlocked", "TDXKexecUnavailable", "TDXGuestsRunning", "TDXPreflightStale"
    }  # fmt: skip
    blocked = by_name["TDXKexecBlocked"]
    # Exec refused, except where that is expected: TD guests alive, or no kexec this boot.
    assert blocked["expr"] == (
        'tdx_preflight_kexec_allowed{source="daemon",phase="exec"} == 0'
        ' unless on(instance, job) tdx_preflight_td_guests{source="daemon"} > 0'
        ' unless on(instance, job) tdx_preflight_kexec_allowed{source="daemon",phase="load"} == 0'
    )
    assert (blocked["for"], blocked["labels"]["severity"]) == ("10m", "warning")
    unavailable = by_name["TDXKexecUnavailable"]
    assert unavailable["expr"] == 'tdx_preflight_kexec_allowed{source="daemon",phase="load"} == 0'
    stale = by_name["TDXPreflightStale"]
    assert stale["expr"] == (
        'time() - tdx_preflight_last_check_timestamp_seconds{source="daemon"} > 900'
    )
    assert by_name["TDXGuestsRunning"]["expr"] == 'tdx_preflight_td_guests{source="daemon"} > 0'
    # Only the daemon's series: a CLI's file is as old as its last run.
    for rule in rules:
        assert 'source="daemon"' in rule["expr"], rule["alert"]
    assert by_name["TDXGuestsRunning"]["labels"]["severity"] == "info"


def test_rules_read_only_our_metrics() -> None:
    for rule in _rules():
        assert _metric_names(rule["expr"]) <= METRICS, rule["alert"]
        for template in rule["annotations"].values():
            for query in _template_queries(template):
                assert _metric_names(query) <= METRICS, (rule["alert"], query)
            assert set(re.findall(r"tdx_preflight_\w+", template)) <= METRICS


def test_metric_name_extraction() -> None:
    # Guards the test above.
    assert _metric_names('time() - foo_seconds{a="b"} > 900') == {"foo_seconds"}
    assert _metric_names("sum by (x) (rate(bar_total[5m])) / on(y) group_left(z) baz") == {
        "bar_total", "baz"
    }  # fmt: skip
    assert _metric_names("a unless on(instance, job) b > 0") == {"a", "b"}
    assert _template_queries('{{ printf "m{instance=%q,s=~\\"a|b\\"} == 1" $x | query }}') == [
        'm{instance="x",s=~"a|b"} == 1'
    ]


def test_kured_filters_on_an_alert_that_exists() -> None:
    names = {r["alert"] for r in _rules()}
    for text in (KURED.read_text(), RULES.read_text(), (KURED.parent / "README.md").read_text()):
        filters = re.findall(r"--alert-filter-regexp=\^(\w+)\$", text)
        assert filters and set(filters) <= names
        assert "--alert-filter-match-only=true" in text


@pytest.fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return found


def test_promtool_checks_the_rules(promtool: str) -> None:
    run = _run([promtool, "check", "rules", str(RULES)])
    assert run.returncode == 0, run.stdout + run.stderr


def _series(host: str, metric: str, values: str, **labels: str) -> dict[str, str]:
    all_labels = {"instance": host, "job": "node", "source": "daemon", **labels}
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(all_labels.items()))
    return {"series": f"{metric}{{{inner}}}", "values": values}


def _status(host: str, values: str, phase: str, check: str, status: str) -> dict[str, str]:
    return _series(
        host, "tdx_preflight_check_status", values, phase=phase, check=check, status=status
    )


def _alert(host: str, severity: str, summary: str, description: str, **labels: str) -> Any:
    return {
        "exp_labels": {
            "instance": host,
            "job": "node",
            "source": "daemon",
            "severity": severity,
            **labels,
        },
        "exp_annotations": {"summary": summary, "description": description},
    }


# Three hosts, one minute apart for 20 minutes. "0+60x20" is a timestamp kept current.
#   tdx1: no TD guest, a teardown that never finished; its daemon stopped writing at t=0.
#   tdx2: the partial-write erratum: nothing can be loaded, let alone executed.
#   tdx3: two TD guests running; could kexec once they are gone.
PROMTOOL_SERIES = [
    _series("tdx1", "tdx_preflight_kexec_allowed", "1 0x20", phase="exec"),
    _series("tdx1", "tdx_preflight_kexec_allowed", "1x20", phase="load"),
    _series("tdx1", "tdx_preflight_td_guests", "0x20"),
    _status("tdx1", "0 1x20", "exec", "guests.teardown", "fail"),
    _status("tdx1", "1x20", "exec", "platform.cpu", "pass"),
    # The load phase does not check teardown: its statuses must not be listed for exec.
    _status("tdx1", "1x20", "load", "kernel.cache_flush", "unknown"),
    _series(
        "tdx1", "tdx_preflight_info", "1x20",
        kernel="6.18.2-1-amd64", cpu_model="Xeon 6", tdx_module_version="1.5.08",
    ),
    _series("tdx1", "tdx_preflight_last_check_timestamp_seconds", "0x20"),
    _series("tdx2", "tdx_preflight_kexec_allowed", "0x20", phase="exec"),
    _series("tdx2", "tdx_preflight_kexec_allowed", "0x20", phase="load"),
    _series("tdx2", "tdx_preflight_td_guests", "0x20"),
    _status("tdx2", "1x20", "load", "errata.tdx_pw_mce", "fail"),
    _status("tdx2", "1x20", "exec", "guests.td", "unknown"),
    _series(
        "tdx2", "tdx_preflight_info", "1x20",
        kernel="6.18.2-1-amd64", cpu_model="Xeon Platinum 8480+", tdx_module_version="1.5.06",
    ),
    _series("tdx2", "tdx_preflight_last_check_timestamp_seconds", "0+60x20"),
    _series("tdx3", "tdx_preflight_kexec_allowed", "0x20", phase="exec"),
    _series("tdx3", "tdx_preflight_kexec_allowed", "1x20", phase="load"),
    _series("tdx3", "tdx_preflight_td_guests", "2x20"),
    _status("tdx3", "1x20", "exec", "guests.td", "fail"),
    _series("tdx3", "tdx_preflight_last_check_timestamp_seconds", "0+60x20"),
    # tdx4: a healthy idle host whose daemon rewrites its file every minute, beside a CLI file
    # from one `check --phase crash` at t=0 that blocked: neither is an alert.
    _series("tdx4", "tdx_preflight_kexec_allowed", "1x20", phase="exec"),
    _series("tdx4", "tdx_preflight_kexec_allowed", "1x20", phase="load"),
    _series("tdx4", "tdx_preflight_td_guests", "0x20"),
    _series("tdx4", "tdx_preflight_last_check_timestamp_seconds", "0+60x20"),
    _series("tdx4", "tdx_preflight_kexec_allowed", "0x20", source="cli", phase="crash"),
    _series("tdx4", "tdx_preflight_kexec_allowed", "0x20", source="cli", phase="exec"),
    _series("tdx4", "tdx_preflight_td_guests", "1x20", source="cli"),
    _series("tdx4", "tdx_preflight_last_check_timestamp_seconds", "0x20", source="cli"),
]  # fmt: skip

PROMTOOL_EXPECTED = [
    ("9m", "TDXKexecBlocked", []),
    (
        "12m",
        "TDXKexecBlocked",
        [
            _alert(
                "tdx1", "warning", "kexec is blocked on tdx1",
                "tdx-preflight on tdx1 has refused kexec (exec phase) for 10 minutes, with no TD "
                "guest running. Kernel 6.18.2-1-amd64, Xeon 6, TDX module 1.5.08. Checks failing "
                "or unknown: guests.teardown=fail. Run `tdx-preflight check -v` on the host. A "
                "cold reboot is always safe.",
                phase="exec",
            )
        ],
    ),
    ("9m", "TDXKexecUnavailable", []),
    (
        "11m",
        "TDXKexecUnavailable",
        [
            _alert(
                "tdx2", "info", "tdx2 cannot kexec until a cold reboot",
                "tdx-preflight on tdx2 refuses even to load a kexec kernel. Kernel "
                "6.18.2-1-amd64, Xeon Platinum 8480+, TDX module 1.5.06. Checks failing or "
                "unknown: errata.tdx_pw_mce=fail. Reboot it cold (`systemctl reboot`); kured's "
                "command in config/kured/ does.",
                phase="load",
            )
        ],
    ),
    (
        "1m",
        "TDXGuestsRunning",
        [
            _alert(
                "tdx3", "info", "2 TD guest(s) running on tdx3",
                "kexec is refused on tdx3 while TD guests run. Informational; kured blocks on it "
                "with --alert-filter-regexp=^TDXGuestsRunning$ --alert-filter-match-only=true.",
            )
        ],
    ),
    ("15m", "TDXPreflightStale", []),
    (
        "16m",
        "TDXPreflightStale",
        [
            _alert(
                "tdx1", "warning", "tdx-preflight metrics on tdx1 are stale",
                "The daemon's last metrics on tdx1 are 16m 0s old. The tdx-preflight daemon is "
                "down or stuck (`systemctl status tdx-preflight`), so the kexec alerts for this "
                "host describe the past.",
            )
        ],
    ),
]  # fmt: skip


def test_promtool_unit_tests_the_alerts(promtool: str, tmp_path: Path) -> None:
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": PROMTOOL_SERIES,
                "alert_rule_test": [
                    {"eval_time": at, "alertname": name, "exp_alerts": alerts}
                    for at, name, alerts in PROMTOOL_EXPECTED
                ],
            }
        ],
    }
    test_file = tmp_path / "rules-test.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    run = _run([promtool, "test", "rules", str(test_file)])
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_is_unit_tested() -> None:
    assert {name for _, name, alerts in PROMTOOL_EXPECTED if alerts} == {
        r["alert"] for r in _rules()
    }


# --- what ships ----------------------------------------------------------------------------


def test_every_shipped_drop_in_is_installed() -> None:
    sources = {s.source for s in SHIPPED}
    drop_ins = {str(p.relative_to(REPO)) for p in (REPO / "systemd").glob("*.service.d/*.conf")}
    assert drop_ins and drop_ins <= sources
    assert {f"{name}.d/tdx-preflight.conf" for name in DROP_INS} == {
        d.removeprefix("systemd/") for d in drop_ins
    }


def test_drop_ins_say_where_both_install_paths_put_them() -> None:
    # The package's place (debian/rules) and install-integrations' (SHIPPED), both in the
    # drop-in's own HOW TO ENABLE.
    rules = (REPO / "debian/rules").read_text()
    assert "UNITS := $(PKG)/lib/systemd/system\n" in rules
    assert "$(UNITS)/$$unit.service.d/tdx-preflight.conf" in rules
    drop_ins = [s for s in SHIPPED if s.source.endswith(".service.d/tdx-preflight.conf")]
    assert len(drop_ins) == len(DROP_INS)
    for item in drop_ins:
        how = (REPO / item.source).read_text().split("# HOW TO ENABLE\n", 1)[1]
        how = how.split("\n#\n", 1)[0].replace("\n#  ", "")
        packaged = "/lib/systemd/system/" + item.source.removeprefix("systemd/")
        assert f"Debian package: installed as {packaged}" in how, item.source
        assert f"install-integrations` writes it as /{item.destination}" in how, item.source


def test_every_shipped_file_says_what_it_does() -> None:
    # Each integration's header: what it does, how to enable it, what it cannot catch.
    for item in SHIPPED:
        if item.source in {"systemd/tdx-preflight.service", "config/tdx-preflight.yaml"}:
            continue
        header = (REPO / item.source).read_text()[:6000]
        for part in ("WHAT IT DOES", "HOW TO ENABLE", "WHAT IT CANNOT CATCH"):
            assert part in header, (item.source, part)
    kured = KURED.read_text()
    for part in ("WHAT IT DOES", "HOW TO ENABLE", "WHAT IT CANNOT CATCH"):
        assert part in kured
