"""The gate's commands, for what runs kexec: hook (answers a wrapper) and exec (runs the
command only on allow), with the operator's override."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from ..checks import PHASES
from ..report import EXIT_USAGE, also_blocking, blockers
from .group import cli
from .options import common, metrics_option, quiet_option
from .run import quiet_asked, refuse_with_quiet, run_checks, show_report, write_cli_metrics

_force = click.option("--force", is_flag=True, help="Override a block (root only; needs --reason).")
_reason = click.option("--reason", default=None, help="Why the override is needed (logged).")


def _blocked_line(report: Any) -> str:
    """The one line a wrapper's log shows: what blocks (in which phase), and the fix."""
    blocked = blockers(report.results)
    if not blocked:
        return f"tdx-preflight: {report.summary}"
    first = blocked[0]
    fix = f"; fix: {first.remedy}" if first.remedy else ""
    return (
        f"tdx-preflight: kexec {report.phase} blocked: {first.id} {first.status}: "
        f"{first.summary}{also_blocking(blocked)}{fix}"
    )


def _override(force: bool, reason: str | None) -> Any:
    """The operator's override, checked before any work: exit 2 when refused."""
    from ..gate import OverrideRefused, override

    try:
        return override(force, reason)
    except OverrideRefused as exc:
        click.echo(f"tdx-preflight: {exc}", err=True)
        sys.exit(EXIT_USAGE)


def _gate(report: Any, ov: Any) -> int:
    """Apply an override to a blocked report; the exit code the gate gives."""
    if report.verdict == "allow":
        return 0
    if ov is None:
        return report.exit_code
    from ..gate import log_override

    report.extra["overridden"] = {"by": ov.by, "reason": ov.reason}
    log_override(ov, report.phase, report.verdict, report.summary)
    if not quiet_asked():
        click.echo(_blocked_line(report), err=True)
        click.echo(f"tdx-preflight: OVERRIDDEN by {ov.by}: {ov.reason}", err=True)
    return 0


def _gate_check(
    root: str | None,
    config_path: str | None,
    phases: tuple[str, ...],
    kexec: Any,
    ov: Any,
    metrics_file: str | None,
) -> tuple[Any, int]:
    """Check every phase in `phases`: the deciding report (None when there is no phase), exit code.

    The report that decides is the first phase that failed, else the first
    that is unknown, else the first (all allow): so the exit code is 1 when
    any phase failed, else 3 when any is unknown, else 0.
    """
    if not phases:
        return None, 0
    loads = kexec is not None and {"load", "crash"} & set(phases)
    reports = run_checks(root, config_path, phases, kexec.image if loads else None)
    report = min(reports, key=lambda r: (r.exit_code != 1, r.exit_code != 3))
    report.extra["gate"] = {
        "phases": list(phases),
        "by_phase": {
            r.phase: {"verdict": r.verdict, "exit_code": r.exit_code, "summary": r.summary}
            for r in reports
        },
        "kexec_unreadable": kexec.unreadable if kexec is not None else None,
    }
    if len(reports) > 1:
        report.notes.append(
            "phases checked: " + ", ".join(f"{r.phase} ({r.verdict})" for r in reports)
        )
    if kexec is not None and kexec.unreadable:
        report.notes.append(f"kexec's arguments read as every phase: {kexec.unreadable}")
    code = _gate(report, ov)
    write_cli_metrics(metrics_file, reports, config_path)
    return report, code


def _nothing_to_check(fmt: str | None) -> None:
    """kexec's arguments perform no load and no exec (-u, --status, --help): say so when asked."""
    summary = "kexec's arguments perform no load, exec or crash load: nothing to check"
    if fmt == "json":
        from ..render import dump_json

        gate = {"phases": [], "by_phase": {}, "kexec_unreadable": None}
        nothing = {"schema": 1, "verdict": "allow", "exit_code": 0, "summary": summary}
        click.echo(dump_json({**nothing, "gate": gate}))
    elif fmt == "text":
        click.echo(f"tdx-preflight: {summary}")


@cli.command(
    passthrough="kexec_args",
    passthrough_metavar="KEXEC ARGS",
    help_exit=EXIT_USAGE,
    short_help="For kexec wrappers: exit 0 only on allow.",
)
@common
@click.option(
    "--format",
    "fmt",
    type=click.Choice(("text", "json")),
    default=None,
    help="Also print the report (default: only the exit code and, on block, one line).",
)
@_force
@_reason
@metrics_option
@quiet_option
# An explicit metavar: click 8.1 (Debian 12) shows a choice argument as [[a|b]], later
# versions as [a|b]; the docstring names the phases.
@click.argument("phase", type=click.Choice(PHASES), required=False, metavar="[PHASE]")
def hook(
    root: str | None,
    config_path: str | None,
    fmt: str | None,
    force: bool,
    reason: str | None,
    metrics_file: str | None,
    quiet: bool,
    phase: str | None,
    kexec_args: tuple[str, ...] | None,
) -> None:
    """For kexec wrappers: `hook [PHASE] [OPTIONS] [-- KEXEC ARGS...]`, exit 0 only on allow.

    Checks every phase kexec's arguments can perform (read as kexec-tools
    reads them), plus PHASE (load, exec or crash) when given; blocks when any phase blocks.
    Re-reads at decision time everything that can change (VMs, misc cgroup,
    kexec sysfs); the daemon is asked only for its TD ledger. A load names
    its kernel image, whose TDX support is reported (target.kernel). On
    block, one line on stderr says which phase blocks, what, and the fix.
    """
    refuse_with_quiet("fmt")
    ov = _override(force, reason)
    if phase is None and kexec_args is None:
        raise click.UsageError("hook needs a PHASE, kexec's arguments after --, or both")
    kexec = None
    phases: tuple[str, ...] = (phase,) if phase else ()
    if kexec_args is not None:  # a unit's `hook crash` does not load kexec's table
        from ..kexec_args import gate_phases, parse_kexec_args

        kexec = parse_kexec_args(kexec_args)
        phases = gate_phases(phase, kexec)
    report, code = _gate_check(root, config_path, phases, kexec, ov, metrics_file)
    if report is None:
        _nothing_to_check(fmt)
        sys.exit(0)
    show_report(report, fmt)
    if code and report.verdict == "block" and not quiet:
        click.echo(_blocked_line(report), err=True)
    sys.exit(code)


@cli.command(
    "exec",
    passthrough="command",
    passthrough_metavar="COMMAND",
    help_exit=EXIT_USAGE,
    short_help="Check, then run COMMAND only on allow.",
)
@common
@click.option(
    "--phase",
    type=click.Choice(PHASES),
    default=None,
    help="A phase to check besides those COMMAND can perform (kexec's arguments; "
    "systemctl kexec: load and exec; any other COMMAND: every phase).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(("text", "json")),
    default="text",
    show_default=True,
    help="How to print the report when kexec is blocked.",
)
@_force
@_reason
@metrics_option
def exec_(
    root: str | None,
    config_path: str | None,
    phase: str | None,
    fmt: str,
    force: bool,
    reason: str | None,
    metrics_file: str | None,
    command: tuple[str, ...] | None,
) -> None:
    """Check, then replace this process with COMMAND only on allow.

    `tdx-preflight exec -- systemctl kexec`, `tdx-preflight exec -- kexec -e`.
    With kexec as COMMAND, every phase its arguments can perform is checked;
    `systemctl kexec` is checked as load and exec; any other COMMAND (a shell,
    env, a script: the gate cannot read what it will do) as every phase.
    --phase adds a phase. On block the
    report is printed and the exit code is the check's.
    """
    from ..kexec_args import command_phases, gate_phases

    ov = _override(force, reason)
    if not command:
        raise click.UsageError("exec needs -- COMMAND (e.g. -- kexec -e)")
    kexec = command_phases(command)
    phases = gate_phases(phase, kexec)
    report, code = _gate_check(root, config_path, phases, kexec, ov, metrics_file)
    if code:
        show_report(report, fmt)
        click.echo(_blocked_line(report), err=True)
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    if "tdx_preflight.snapshot" in sys.modules:
        sys.modules["tdx_preflight.snapshot"].remove_extractions()  # exec skips atexit
    try:
        os.execvp(command[0], list(command))
    except OSError as exc:
        click.echo(f"tdx-preflight: cannot run {command[0]}: {exc.strerror}", err=True)
        sys.exit(EXIT_USAGE)
