"""Command line: parse, call, render, exit code. No logic of its own."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from . import __version__
from .checks import PHASES, REGISTRY
from .cliadmin import ADMIN_COMMANDS
from .clioptions import StrictGroup, common
from .report import EXIT_NO_DAEMON, EXIT_UNKNOWN, EXIT_USAGE
from .schema import NAMES as SCHEMA_NAMES

_metrics_option = click.option(
    "--metrics-file",
    type=click.Path(),
    default=None,
    help="Also write node_exporter textfile metrics here: a file, or a directory to write "
    "tdx_preflight_cli.prom in (e.g. /var/lib/prometheus/node-exporter).",
)


_quiet_option = click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Exit code only: print nothing (usage and configuration errors, exit 2, still do).",
)


def _quiet() -> bool:
    """--quiet was given to the command running now."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.params.get("quiet"))


def _refuse_with_quiet(*names: str) -> None:
    """--quiet with an option that asks for output is a usage error, not a silent choice."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    if not ctx.params.get("quiet"):
        return
    for name in names:
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            param = next(p for p in ctx.command.params if p.name == name)
            raise click.UsageError(f"--quiet and {param.opts[-1]} contradict each other", ctx)


def _setup(root: str | None, config_path: str | None, *, daemon: bool = False) -> tuple[Any, Any]:
    from .host import Host
    from .policy import ConfigError, load

    try:
        policy = load(config_path)
    except ConfigError as exc:
        if daemon:
            # A journald CRIT line with FILE:LINE; exit 2 stops the unit for good
            # (RestartPreventExitStatus=2) instead of restarting into the same typo.
            from .daemon.log import setup_logging

            setup_logging().critical(
                "invalid configuration, not starting: %s (exit 2: fix it, then "
                "`systemctl restart tdx-preflight`)",
                exc,
            )
        else:
            click.echo(f"tdx-preflight: invalid configuration: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    host_root = root or policy.root or "/"
    import os

    snapshot = host_root.endswith((".tar.gz", ".tgz")) and os.path.isfile(host_root)
    if not snapshot and not os.path.isdir(host_root):
        click.echo(f"tdx-preflight: root {host_root} is not a directory", err=True)
        sys.exit(EXIT_USAGE)
    if not snapshot and (host_root == "/" or not os.path.lexists(f"{host_root}/SNAPSHOT.json")):
        return Host(host_root), policy
    from .snapshot import SnapshotError, captured_unreadable, extract_snapshot

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


@click.group(cls=StrictGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tdx-preflight")
def cli() -> None:
    """May this Intel TDX host kexec (or load a kdump kernel) now, and why (not).

    Every command reads its options wherever they stand; an option given
    twice, or with an empty value, is a usage error (exit 2). check, hook and
    exec exit 0 only on allow: their --help exits 2.
    """


@cli.command(help_exit=EXIT_USAGE)
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
@_metrics_option
@_quiet_option
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
    _refuse_with_quiet("fmt", "verbose")
    [report] = _run_checks(root, config_path, (phase,))
    _metrics(metrics_file, [report], config_path)
    _show(report, fmt, verbose)
    sys.exit(report.exit_code)


def _run_checks(
    root: str | None,
    config_path: str | None,
    phases: tuple[str, ...],
    target_image: str | None = None,
) -> list[Any]:
    """Read the host once (with the daemon's TD ledger when it answers); one report a phase."""
    from .daemon.client import daemon_ledger
    from .facts import gather
    from .report import evaluate

    started = time.monotonic()
    host, policy = _setup(root, config_path)
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


def _show(report: Any, fmt: str | None, verbose: bool = False) -> None:
    if _quiet():
        return
    from .render import report_json, report_text, use_colour

    if fmt == "json":
        click.echo(report_json(report))
    elif fmt == "text":
        click.echo(report_text(report, verbose=verbose, colour=use_colour()), color=use_colour())


def _metrics(path: str | None, reports: list[Any], config_path: str | None) -> None:
    """Write the metrics file when asked; a failure is a warning, never an exit code.

    A directory gets CLI_FILE in it. The daemon's file (its metrics_file, or any file named
    DAEMON_FILE) is never rewritten: its series would lose the phases a CLI run did not check.
    """
    if not path:
        return
    import os

    from .metrics import CLI_FILE, DAEMON_FILE, write_metrics
    from .policy import load

    if os.path.isdir(path):
        path = os.path.join(path, CLI_FILE)
    daemons = load(config_path).metrics_file
    if os.path.basename(path) == DAEMON_FILE or (
        daemons and os.path.realpath(path) == os.path.realpath(daemons)
    ):
        if not _quiet():
            click.echo(
                f"tdx-preflight: warning: {path} is the daemon's metrics file; not rewriting "
                f"it (write {CLI_FILE} beside it)",
                err=True,
            )
        return
    err = write_metrics(path, reports, "cli")
    if err and not _quiet():
        click.echo(f"tdx-preflight: warning: {err}", err=True)


@cli.command()
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
    procs = None
    if host.live and (verbose or fmt == "json"):
        from .readers.procinfo import process_info

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


@cli.command()
@common
def daemon(root: str | None, config_path: str | None) -> None:
    """Run the agent in the foreground (systemd Type=notify): track VMs and TDs, serve reports."""
    from .daemon.service import run_daemon

    host, policy = _setup(root, config_path, daemon=True)
    host.close()
    if host.root != "/":
        # Uevents describe the live kernel; applied to another tree they would lie.
        raise click.UsageError(
            f"the daemon watches the live host only; --root {host.root} is for check, "
            "guests, hook and snapshot"
        )
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
    from .daemon.client import exchange
    from .daemon.state import judge_status, read_state
    from .render import dump_json, status_text

    host, policy = _setup(root, config_path)
    got = exchange(policy.control_socket, {"op": "status"})
    source = f"control socket {policy.control_socket}"
    if got is None or got.body.get("ok") is not True:
        why_socket = "no daemon answers"
    else:
        stale = judge_status(
            got.body,
            root=host.root,
            max_age=policy.state_max_age,
            peer_pid=got.peer_pid,
            peer_uid=got.peer_uid,
        )
        why_socket = f"its reply is stale: {stale}" if stale else ""
    reply = got.body if got is not None and not why_socket else None
    if reply is None:
        boot = host.read_value("proc/sys/kernel/random/boot_id")
        state, why = read_state(
            policy.state_file,
            policy.state_max_age,
            boot if isinstance(boot, str) else None,
            host.root,
        )
        if state is None:
            message = f"{why_socket} on {policy.control_socket}; {why}"
            if fmt == "json":
                click.echo(dump_json({"daemon": None, "exit_code": EXIT_NO_DAEMON, "why": message}))
            click.echo(f"tdx-preflight: {message}", err=True)
            host.close()
            sys.exit(EXIT_NO_DAEMON)
        reply, source = state, f"state file {policy.state_file} ({why_socket} on the socket)"
    host.close()
    reply["source"] = source
    if fmt == "json":
        click.echo(dump_json(reply))
    else:
        click.echo(status_text(reply))
    code = reply.get("exit_code")
    sys.exit(code if code in (0, 1, 3) else EXIT_UNKNOWN)


def _complete_check_id(
    _ctx: click.Context, _param: click.Parameter, incomplete: str
) -> list[click.shell_completion.CompletionItem]:
    """Check ids for shell completion of `explain ID`, each with its title."""
    from click.shell_completion import CompletionItem

    from .checks import CHECKS

    return [CompletionItem(c.id, help=c.title) for c in CHECKS if c.id.startswith(incomplete)]


@cli.command()
@common
@click.argument("check_id", required=False, shell_complete=_complete_check_id)
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


_force = click.option("--force", is_flag=True, help="Override a block (root only; needs --reason).")
_reason = click.option("--reason", default=None, help="Why the override is needed (logged).")


def _blocked_line(report: Any) -> str:
    """The one line a wrapper's log shows: what blocks (in which phase), and the fix."""
    blockers = [r for r in report.results if r.blocks]
    if not blockers:
        return f"tdx-preflight: {report.summary}"
    first = blockers[0]
    more = f" (+{len(blockers) - 1} more)" if len(blockers) > 1 else ""
    fix = f"; fix: {first.remedy}" if first.remedy else ""
    return (
        f"tdx-preflight: kexec {report.phase} blocked: {first.id} {first.status}: "
        f"{first.summary}{more}{fix}"
    )


def _override(force: bool, reason: str | None) -> Any:
    """The operator's override, checked before any work: exit 2 when refused."""
    from .gate import OverrideRefused, override

    try:
        return override(force, reason)
    except OverrideRefused as exc:
        click.echo(f"tdx-preflight: {exc}", err=True)
        sys.exit(EXIT_USAGE)


def _gate(report: Any, ov: Any) -> int:
    """Apply an override to a blocked report; the exit code the gate gives."""
    from .gate import log_override

    if report.verdict == "allow":
        return 0
    if ov is None:
        return report.exit_code
    report.extra["overridden"] = {"by": ov.by, "reason": ov.reason}
    log_override(ov, report.phase, report.verdict, report.summary)
    if not _quiet():
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
    reports = _run_checks(root, config_path, phases, kexec.image if loads else None)
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
    _metrics(metrics_file, reports, config_path)
    return report, code


def _nothing_to_check(fmt: str | None) -> None:
    """kexec's arguments perform no load and no exec (-u, --status, --help): say so when asked."""
    summary = "kexec's arguments perform no load, exec or crash load: nothing to check"
    if fmt == "json":
        from .render import dump_json

        gate = {"phases": [], "by_phase": {}, "kexec_unreadable": None}
        nothing = {"schema": 1, "verdict": "allow", "exit_code": 0, "summary": summary}
        click.echo(dump_json({**nothing, "gate": gate}))
    elif fmt == "text":
        click.echo(f"tdx-preflight: {summary}")


@cli.command(passthrough="kexec_args", passthrough_metavar="KEXEC ARGS", help_exit=EXIT_USAGE)
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
@_metrics_option
@_quiet_option
@click.argument("phase", type=click.Choice(PHASES), required=False)
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
    reads them), plus PHASE when given; blocks when any phase blocks.
    Re-reads at decision time everything that can change (VMs, misc cgroup,
    kexec sysfs); the daemon is asked only for its TD ledger. A load names
    its kernel image, whose TDX support is reported (target.kernel). On
    block, one line on stderr says which phase blocks, what, and the fix.
    """
    from .kexec_args import gate_phases, parse_kexec_args

    _refuse_with_quiet("fmt")
    ov = _override(force, reason)
    if phase is None and kexec_args is None:
        raise click.UsageError("hook needs a PHASE, kexec's arguments after --, or both")
    kexec = parse_kexec_args(kexec_args) if kexec_args is not None else None
    report, code = _gate_check(
        root, config_path, gate_phases(phase, kexec), kexec, ov, metrics_file
    )
    if report is None:
        _nothing_to_check(fmt)
        sys.exit(0)
    _show(report, fmt)
    if code and report.verdict == "block" and not quiet:
        click.echo(_blocked_line(report), err=True)
    sys.exit(code)


@cli.command("exec", passthrough="command", passthrough_metavar="COMMAND", help_exit=EXIT_USAGE)
@common
@click.option(
    "--phase",
    type=click.Choice(PHASES),
    default=None,
    help="A phase to check besides those of kexec's own arguments (COMMAND kexec), or exec.",
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
@_metrics_option
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
    import os

    from .kexec_args import command_phases, gate_phases

    ov = _override(force, reason)
    if not command:
        raise click.UsageError("exec needs -- COMMAND (e.g. -- kexec -e)")
    kexec = command_phases(command)
    phases = gate_phases(phase, kexec)
    report, code = _gate_check(root, config_path, phases, kexec, ov, metrics_file)
    if code:
        _show(report, fmt)
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


@cli.command()
@common
@click.argument("output", type=click.Path(dir_okay=False))
@click.option(
    "--keep-cmdlines",
    is_flag=True,
    help="Keep VM command lines and libvirt XML whole (default: only what classifies a VM).",
)
def snapshot(root: str | None, config_path: str | None, output: str, keep_cmdlines: bool) -> None:
    """Capture what the checks read into OUTPUT.tar.gz, a host root `check --root` replays.

    Prints one line (path, files, verdict) and exits 0; 2 on a usage error.
    """
    from .daemon.client import daemon_ledger
    from .snapshot import SnapshotError, take_snapshot

    host, policy = _setup(root, config_path)
    host.close()
    d = daemon_ledger(policy.control_socket, host.root)
    try:
        result = take_snapshot(
            host.root,
            policy,
            output,
            keep_cmdlines=keep_cmdlines,
            source=root or policy.root or "/",
            ledger=d.ledger,
            ledger_info=d.info,
        )
    except SnapshotError as exc:
        click.echo(f"tdx-preflight: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(result.summary())
    if result.differences:
        click.echo(
            "tdx-preflight: warning: a replay of this snapshot differs from this host; "
            "SNAPSHOT.json lists the reads a tree cannot reproduce (as root there are fewer)",
            err=True,
        )


@cli.command("schema")
@click.argument("name", type=click.Choice(SCHEMA_NAMES), default="report")
def schema_(name: str) -> None:
    """Print the JSON Schema (draft 2020-12) of a --format json output.

    report: check, hook and exec; guests; status. The files ship inside the
    package (tdx_preflight/schema/NAME.schema.json).
    """
    from .schema import text

    click.echo(text(name), nl=False)


for _command in ADMIN_COMMANDS:
    cli.add_command(_command)

#: click's shell-completion switch; a shell calls the program with it and no arguments.
COMPLETE_VAR = "_TDX_PREFLIGHT_COMPLETE"


def main() -> None:
    """Console entry point: never exits 0 on an internal error, nor for having
    printed something other than a verdict when a command was asked for.

    Shell completion runs only when no argument is given (as the shells call it):
    with arguments, the completion variable is ignored and the command runs. The
    group's --help and --version answer only when they stand alone: before a
    command (`--version hook exec`) they are a usage error, never an exit 0.
    """
    args = sys.argv[1:]
    if args:
        os.environ.pop(COMPLETE_VAR, None)
        if args[0] in ("-h", "--help", "--version") and len(args) > 1:
            click.echo(
                f"Usage: tdx-preflight {args[0]}\n"
                f"Error: {args[0]} stands alone; a command's own help is COMMAND --help",
                err=True,
            )
            sys.exit(EXIT_USAGE)
    try:
        cli.main(prog_name="tdx-preflight", complete_var=COMPLETE_VAR)
    except SystemExit:
        raise
    except Exception:
        import traceback

        traceback.print_exc()
        click.echo("tdx-preflight: internal error: not allowing kexec", err=True)
        sys.exit(EXIT_UNKNOWN)
