"""Command line: parse, call, render, exit code. No logic of its own."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .checks import PHASES, REGISTRY
from .report import EXIT_NO_DAEMON, EXIT_UNKNOWN, EXIT_USAGE

_common_root = click.option(
    "--root",
    type=click.Path(file_okay=False),
    default=None,
    help="Host root to read (default /, or the config's root).",
)
_common_config = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML configuration file (default /etc/tdx-preflight/config.yaml if present).",
)


def common(func: Callable[..., Any]) -> Callable[..., Any]:
    """--root and --config, the same on every command."""
    return _common_root(_common_config(func))


def _setup(root: str | None, config_path: str | None) -> tuple[Any, Any]:
    from .host import Host
    from .policy import ConfigError, load

    try:
        policy = load(config_path)
    except ConfigError as exc:
        click.echo(f"tdx-preflight: invalid configuration: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    host_root = root or policy.root or "/"
    import os

    if not os.path.isdir(host_root):
        click.echo(f"tdx-preflight: root {host_root} is not a directory", err=True)
        sys.exit(EXIT_USAGE)
    return Host(host_root), policy


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tdx-preflight")
def cli() -> None:
    """May this Intel TDX host kexec (or load a kdump kernel) now, and why (not)."""


@cli.command()
@common
@click.option(
    "--phase",
    type=click.Choice(PHASES),
    default="exec",
    show_default=True,
    help="load: before kexec -l; exec: before kexec -e / systemctl kexec; crash: before kexec -p.",
)
@click.option(
    "--format", "fmt", type=click.Choice(("text", "json")), default="text", show_default=True
)
@click.option(
    "-v", "--verbose", is_flag=True, help="Show the evidence of every check and the guests."
)
def check(root: str | None, config_path: str | None, phase: str, fmt: str, verbose: bool) -> None:
    """Run the checklist once and exit 0 (allow), 1 (block), 3 (block: unknown).

    When a daemon watching the same root answers, its TD ledger feeds
    guests.teardown; otherwise the check runs alone and says so.
    """
    from .daemon.client import daemon_ledger
    from .facts import gather
    from .render import report_json, report_text, use_colour
    from .report import evaluate

    started = time.monotonic()
    host, policy = _setup(root, config_path)
    with host:
        d = daemon_ledger(policy.control_socket, host.root)
        facts = gather(host, load_msr_module=policy.load_msr_module, ledger=d.ledger)
        report = evaluate(facts, phase, policy, started)
    report.extra["daemon"] = d.info
    report.notes.append(d.note)
    if fmt == "json":
        click.echo(report_json(report))
    else:
        click.echo(report_text(report, verbose=verbose, colour=use_colour()), color=use_colour())
    sys.exit(report.exit_code)


@cli.command()
@common
@click.option(
    "--format", "fmt", type=click.Choice(("text", "json")), default="text", show_default=True
)
@click.option("-v", "--verbose", is_flag=True, help="Show every piece of evidence per VM.")
def guests(root: str | None, config_path: str | None, fmt: str, verbose: bool) -> None:
    """List KVM VMs and TD guests, with the evidence that classified them.

    Exit 0 when the list is complete, 3 when VMs could not be enumerated.
    """
    from .daemon.client import daemon_ledger
    from .facts import gather
    from .render import dump_json, guests_text

    host, policy = _setup(root, config_path)
    with host:
        d = daemon_ledger(policy.control_socket, host.root)
        facts = gather(host, load_msr_module="never", full=False, ledger=d.ledger)
    e = facts.enumeration
    cur = facts.root_tdx_current
    code = 0 if e.complete else EXIT_UNKNOWN
    if fmt == "json":
        click.echo(
            dump_json(
                {
                    "schema": 1,
                    "enumeration": {
                        "method": e.method,
                        "complete": e.complete,
                        "problem": str(e.problem) if e.problem else None,
                        "notes": list(e.notes),
                    },
                    "tdx_in_use": facts.tdx_use.state == "yes",
                    "root_misc_current_tdx": cur if isinstance(cur, int) else None,
                    "guests": [g.to_json() for g in facts.guests],
                    "daemon": d.info,
                }
            )
        )
    else:
        header = f"VMs via {e.method}" if e.method else "VM enumeration unavailable"
        click.echo(guests_text(facts.guests, header, verbose))
        if e.problem:
            click.echo(f"incomplete: {e.problem}", err=True)
        if isinstance(cur, int):
            click.echo(f"root misc.current tdx: {cur}")
        click.echo(d.note)
    sys.exit(code)


@cli.command()
@common
def daemon(root: str | None, config_path: str | None) -> None:
    """Run the agent in the foreground (systemd Type=notify): track VMs and TDs, serve reports."""
    from .daemon.service import run_daemon

    host, policy = _setup(root, config_path)
    host.close()
    sys.exit(run_daemon(policy, host.root, config_path))


@cli.command()
@common
@click.option(
    "--format", "fmt", type=click.Choice(("text", "json")), default="text", show_default=True
)
def status(root: str | None, config_path: str | None, fmt: str) -> None:
    """The daemon's view: verdict, live TDs and VMs, TD lifecycles, resyncs, uptime.

    Exit 0/1/3 as for check, 4 when no daemon answers (nor a fresh state file).
    """
    from .daemon.client import request
    from .render import dump_json, status_text

    _host, policy = _setup(root, config_path)
    reply = request(policy.control_socket, {"op": "status"})
    source = f"control socket {policy.control_socket}"
    if reply is None or not reply.get("ok"):
        from .daemon.state import read_state

        boot = _host.read_value("proc/sys/kernel/random/boot_id")
        state, why = read_state(
            policy.state_file, policy.state_max_age, boot if isinstance(boot, str) else None
        )
        if state is None:
            click.echo(
                f"tdx-preflight: no daemon answers on {policy.control_socket}; {why}", err=True
            )
            sys.exit(EXIT_NO_DAEMON)
        reply, source = state, f"state file {policy.state_file} (the socket did not answer)"
    reply["source"] = source
    if fmt == "json":
        click.echo(dump_json(reply))
    else:
        click.echo(status_text(reply))
    code = reply.get("exit_code")
    sys.exit(code if code in (0, 1, 3) else EXIT_UNKNOWN)


@cli.command()
@common
@click.argument("check_id", required=False)
def explain(root: str | None, config_path: str | None, check_id: str | None) -> None:
    """What a check asks, why it matters on a TDX host, what it reads, how to fix it.

    With a configuration, the phases it blocks in include the configured ones.
    """
    from .checks import CHECKS

    _host, policy = _setup(root, config_path)

    if check_id is None:
        for c in CHECKS:
            click.echo(f"{c.id:<20} {c.title}")
        return
    chk = REGISTRY.get(check_id)
    if chk is None:
        click.echo(
            f"tdx-preflight: unknown check {check_id!r}; known: {', '.join(REGISTRY)}", err=True
        )
        sys.exit(EXIT_USAGE)
    blocking = (
        ", ".join(p for p in PHASES if policy.is_blocking(chk.id, chk.blocking, p))
        or "never (advisory)"
    )
    if chk.id in policy.block_on_warn or chk.id in (policy.blocking or {}):
        blocking += f" (configured in {policy.source}: its warn blocks too)"
    lines = [
        f"{chk.id}: {chk.title}",
        "",
        f"Question:  {chk.question}",
        f"Why:       {chk.why}",
        "Reads:     " + "; ".join(chk.reads),
        f"Blocks in: {blocking}"
        + ("  (TDX-only: skipped when TDX is not in use)" if chk.tdx_only else ""),
        "",
        "How to fix:",
    ]
    for status, remedy in chk.remedies.items():
        lines.append(f"  {status}: {remedy}")
    click.echo("\n".join(lines))


def main() -> None:
    """Console entry point: never exits 0 on an internal error."""
    try:
        cli.main(prog_name="tdx-preflight")
    except SystemExit:
        raise
    except Exception:
        import traceback

        traceback.print_exc()
        click.echo("tdx-preflight: internal error: not allowing kexec", err=True)
        sys.exit(EXIT_UNKNOWN)
