"""What the commands share: the host and policy a command reads, running the checks once,
printing a report, writing the CLI's metrics file, and --quiet."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from ..report import EXIT_USAGE


def quiet_asked() -> bool:
    """--quiet was given to the command running now."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.params.get("quiet"))


def refuse_with_quiet(*names: str) -> None:
    """--quiet with an option that asks for output is a usage error, not a silent choice."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    if not ctx.params.get("quiet"):
        return
    for name in names:
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            param = next(p for p in ctx.command.params if p.name == name)
            raise click.UsageError(f"--quiet and {param.opts[-1]} contradict each other", ctx)


def host_and_policy(
    root: str | None, config_path: str | None, *, daemon: bool = False
) -> tuple[Any, Any]:
    """The Host to read (a directory, or a snapshot extracted) and the Policy; exit 2 on a
    configuration or root that cannot be used."""
    from ..host import Host
    from ..policy import ConfigError, load

    try:
        policy = load(config_path)
    except ConfigError as exc:
        if daemon:
            # A journald CRIT line with FILE:LINE; exit 2 stops the unit for good
            # (RestartPreventExitStatus=2) instead of restarting into the same typo.
            from ..daemon.log import setup_logging

            setup_logging().critical(
                "invalid configuration, not starting: %s (exit 2: fix it, then "
                "`systemctl restart tdx-preflight`)",
                exc,
            )
        else:
            click.echo(f"tdx-preflight: invalid configuration: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    host_root = root or policy.root or "/"
    snapshot = host_root.endswith((".tar.gz", ".tgz")) and os.path.isfile(host_root)
    if not snapshot and not os.path.isdir(host_root):
        click.echo(f"tdx-preflight: root {host_root} is not a directory", err=True)
        sys.exit(EXIT_USAGE)
    if not snapshot and (host_root == "/" or not os.path.lexists(f"{host_root}/SNAPSHOT.json")):
        return Host(host_root), policy
    from ..snapshot import SnapshotError, captured_unreadable, extract_snapshot

    try:
        archive = host_root if snapshot else None
        if archive:
            # Removed at exit and on SIGTERM, SIGHUP and SIGINT; `exec` removes it first.
            host_root = extract_snapshot(archive)
        # What could not be read at capture stays unreadable (the manifest lists it).
        return Host(host_root, captured_unreadable(host_root), source=archive), policy
    except SnapshotError as exc:
        click.echo(f"tdx-preflight: {exc}", err=True)
        sys.exit(EXIT_USAGE)


def run_checks(
    root: str | None,
    config_path: str | None,
    phases: tuple[str, ...],
    target_image: str | None = None,
) -> list[Any]:
    """Read the host once (with the daemon's TD ledger when it answers); one report a phase."""
    from ..daemon.client import daemon_ledger
    from ..facts import gather
    from ..report import evaluate

    started = time.monotonic()
    host, policy = host_and_policy(root, config_path)
    with host:
        d = daemon_ledger(policy.control_socket, host.root)
        facts = gather(
            host, load_msr_module=policy.load_msr_module, ledger=d.ledger, target_image=target_image
        )
        reports = [evaluate(facts, phase, policy, started) for phase in phases]
    for report in reports:
        report.extra["daemon"] = d.info
        report.notes.append(d.note)
    return reports


def show_report(report: Any, fmt: str | None, verbose: bool = False) -> None:
    """Print the report as text or JSON (nothing when fmt is None or under --quiet)."""
    if quiet_asked():
        return
    from ..render import report_json, report_text, use_colour

    if fmt == "json":
        click.echo(report_json(report))
    elif fmt == "text":
        click.echo(report_text(report, verbose=verbose, colour=use_colour()), color=use_colour())


def write_cli_metrics(path: str | None, reports: list[Any], config_path: str | None) -> None:
    """Write the metrics file when asked; a failure is a warning, never an exit code.

    A directory gets CLI_FILE in it. The daemon's file (its metrics_file, or any file named
    DAEMON_FILE) is never rewritten: its series would lose the phases a CLI run did not check.
    """
    if not path:
        return
    from ..metrics import CLI_FILE, DAEMON_FILE, write_metrics
    from ..policy import load

    if os.path.isdir(path):
        path = os.path.join(path, CLI_FILE)
    daemons = load(config_path).metrics_file
    if os.path.basename(path) == DAEMON_FILE or (
        daemons and os.path.realpath(path) == os.path.realpath(daemons)
    ):
        if not quiet_asked():
            click.echo(
                f"tdx-preflight: warning: {path} is the daemon's metrics file; not rewriting "
                f"it (write {CLI_FILE} beside it)",
                err=True,
            )
        return
    err = write_metrics(path, reports, "cli")
    if err and not quiet_asked():
        click.echo(f"tdx-preflight: warning: {err}", err=True)
