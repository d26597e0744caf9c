"""The commands that answer a question about the host: check, guests, explain, schema."""

from __future__ import annotations

import sys

import click

from ..checks import PHASES, REGISTRY
from ..report import EXIT_UNKNOWN, EXIT_USAGE
from ..schema import NAMES as SCHEMA_NAMES
from .group import cli
from .options import common, metrics_option, quiet_option
from .run import host_and_policy, refuse_with_quiet, run_checks, show_report, write_cli_metrics


@cli.command(help_exit=EXIT_USAGE, short_help="Run the checks once: 0 allow, 1 or 3 block.")
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
@metrics_option
@quiet_option
def check(
    root: str | None,
    config_path: str | None,
    phase: str,
    fmt: str,
    verbose: bool,
    metrics_file: str | None,
    quiet: bool,
) -> None:
    """Run the checklist once and exit 0 (allow), 1 (block), 3 (block: unknown).

    When a daemon watching the same root answers, its TD ledger feeds
    guests.teardown; otherwise the check runs alone and says so.
    """
    refuse_with_quiet("fmt", "verbose")
    [report] = run_checks(root, config_path, (phase,))
    write_cli_metrics(metrics_file, [report], config_path)
    show_report(report, fmt, verbose)
    sys.exit(report.exit_code)


@cli.command(short_help="List KVM VMs and TD guests, with evidence.")
@common
@click.option(
    "--format", "fmt", type=click.Choice(("text", "json")), default="text", show_default=True
)
@click.option("-v", "--verbose", is_flag=True, help="Show every piece of evidence per VM.")
def guests(root: str | None, config_path: str | None, fmt: str, verbose: bool) -> None:
    """List KVM VMs and TD guests, with the evidence that classified them.

    On the live host, -v (and JSON) add each VM process's uptime and RSS.
    Exit 0 when the list is complete, 3 when VMs could not be enumerated.
    """
    from ..daemon.client import daemon_ledger
    from ..facts import gather
    from ..render import dump_json, guests_text

    host, policy = host_and_policy(root, config_path)
    with host:
        d = daemon_ledger(policy.control_socket, host.root)
        facts = gather(host, load_msr_module="never", full=False, ledger=d.ledger)
    e = facts.enumeration
    cur = facts.root_tdx_current
    code = 0 if e.complete else EXIT_UNKNOWN
    procs = None
    if host.live and (verbose or fmt == "json"):
        from ..readers.procinfo import process_info

        procs = {g.pid: process_info(g.pid) for g in facts.guests if g.pid is not None}
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
                        "unseen": None if e.unseen is None else sorted(e.unseen),
                    },
                    "tdx_in_use": facts.tdx_use.state,
                    "root_misc_current_tdx": cur if isinstance(cur, int) else None,
                    "guests": [
                        {**g.to_json(), "process": procs.get(g.pid) if procs and g.pid else None}
                        for g in facts.guests
                    ],
                    "daemon": d.info,
                }
            )
        )
    else:
        header = f"VMs via {e.method}" if e.method else "VM enumeration unavailable"
        click.echo(guests_text(facts.guests, header, verbose, e.complete, procs))
        if e.problem:
            click.echo(f"incomplete: {e.problem}", err=True)
        if isinstance(cur, int):
            click.echo(f"root misc.current tdx: {cur}")
        click.echo(d.note)
    sys.exit(code)


def _complete_check_id(
    _ctx: click.Context, _param: click.Parameter, incomplete: str
) -> list[click.shell_completion.CompletionItem]:
    """Check ids for shell completion of `explain ID`, each with its title."""
    from click.shell_completion import CompletionItem

    from ..checks import CHECKS

    return [CompletionItem(c.id, help=c.title) for c in CHECKS if c.id.startswith(incomplete)]


@cli.command(short_help="What a check asks, why, and how to fix it.")
@common
@click.argument("check_id", required=False, shell_complete=_complete_check_id)
def explain(root: str | None, config_path: str | None, check_id: str | None) -> None:
    """What a check asks, why it matters on a TDX host, what it reads, how to fix it.

    With a configuration, the phases it blocks in include the configured ones.
    """
    from ..checks import CHECKS

    _host, policy = host_and_policy(root, config_path)

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


@cli.command("schema", short_help="Print the JSON Schema of a JSON output.")
# An explicit metavar: click 8.1 (Debian 12) shows a choice argument as [[a|b]], later
# versions as [a|b]; the docstring lists the names.
@click.argument("name", type=click.Choice(SCHEMA_NAMES), default="report", metavar="[NAME]")
def schema_(name: str) -> None:
    """Print the JSON Schema (draft 2020-12) of a --format json output.

    NAME (default report): report: check, hook and exec; guests; status. The files ship inside the
    package (tdx_preflight/schema/NAME.schema.json).
    """
    from ..schema import text

    click.echo(text(name), nl=False)
