"""Commands that set up and steer an installation: install-integrations, uninstall-integrations,
keep-crash-kernel (the kdump-tools drop-in's stop guard) and reload (the unit's ExecReload=).

Registered on the CLI group by cli.py; each is a StrictCommand like every other command.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from .clioptions import StrictCommand, common
from .report import EXIT_NO_DAEMON, EXIT_UNKNOWN, EXIT_USAGE

if TYPE_CHECKING:  # integrations (pathlib, hashlib, dataclasses) load only when a command runs
    from .integrations import Step

_prefix = click.option(
    "--prefix",
    default="/",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Work under this directory instead of /.",
)
_dry_run = click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")

_VERBS = {
    "copy": ("would copy", "copied"),
    "link": ("would link", "linked"),
    "remove": ("would remove", "removed"),
    "rmdir": ("would remove directory", "removed directory"),
    "keep": ("would keep", "kept"),
}


def _echo_steps(steps: list[Step], dry_run: bool) -> None:
    for step in steps:
        verb = _VERBS[step.action][0 if dry_run else 1]
        what = {
            "copy": f"{step.source} -> {step.destination}",
            "link": f"{step.destination} -> {step.source}",
        }.get(step.action, step.destination)
        click.echo(f"{verb} {what}" + (f" ({step.why})" if step.why else ""))


@click.command("install-integrations", cls=StrictCommand)
@_prefix
@_dry_run
def install_integrations_cmd(prefix: str, dry_run: bool) -> None:
    """Install the unit, the kexec/kdump drop-ins, the kexec wrapper and the alert rule.

    From this installed copy of tdx-preflight; links /usr/local/bin/tdx-preflight to it when
    nothing is there. What it writes is recorded (PREFIX/var/lib/tdx-preflight/
    integrations.json) for uninstall-integrations. Exit 2 when it cannot.
    """
    from pathlib import Path

    from .integrations import MANIFEST, install_integrations

    script = Path(sys.executable).parent / "tdx-preflight"
    try:
        steps = install_integrations(
            prefix, dry_run=dry_run, script=script if script.exists() else None
        )
    except (OSError, ValueError) as exc:
        click.echo(f"tdx-preflight: install-integrations: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    _echo_steps(steps, dry_run)
    if not dry_run:
        click.echo(f"recorded in {Path(prefix) / MANIFEST}")


@click.command("uninstall-integrations", cls=StrictCommand)
@_prefix
@_dry_run
def uninstall_integrations_cmd(prefix: str, dry_run: bool) -> None:
    """Remove what install-integrations wrote, as its manifest records it; nothing else.

    Files changed since the install (an edited config.yaml) are kept and named. Exit 2 when
    there is no manifest under PREFIX or a removal fails.
    """
    from .integrations import uninstall_integrations

    try:
        steps = uninstall_integrations(prefix, dry_run=dry_run)
    except (OSError, ValueError) as exc:
        click.echo(f"tdx-preflight: uninstall-integrations: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    _echo_steps(steps, dry_run)


@click.command("keep-crash-kernel", cls=StrictCommand)
@common
def keep_crash_kernel(root: str | None, config_path: str | None) -> None:
    """Exit 0 when a restart of the kdump unit should keep the crash kernel armed now.

    That is: one is loaded, the crash phase blocks a new load, and the kernel itself would
    accept one (neither errata.tdx_pw_mce nor kernel.kexec fails). Exit 1 otherwise: the
    unit's stop unloads as usual. One line on stderr says why. Exit 2 on a usage or
    configuration error.
    """
    from .cli import _run_checks
    from .gate import keep_armed_crash_kernel

    [report] = _run_checks(root, config_path, ("crash",))
    keep, why = keep_armed_crash_kernel(report)
    click.echo(f"tdx-preflight: {why}", err=True)
    sys.exit(0 if keep else 1)


@click.command("reload", cls=StrictCommand)
@common
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 3600),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the daemon to apply the reload.",
)
def reload(root: str | None, config_path: str | None, timeout: float) -> None:
    """Make the daemon reload its configuration, and return once it has (ExecReload=).

    Sends SIGHUP to the daemon that answers on the control socket, then waits until its
    status shows the reload handled. Exit 0: applied; 2: the daemon refused the new
    configuration (FILE:LINE on stderr; it keeps the old one); 3: no answer before the
    deadline; 4: no daemon answers.
    """
    import os
    import signal
    import time

    from .cli import _setup
    from .daemon.client import exchange

    host, policy = _setup(root, config_path)
    host.close()
    socket_path = policy.control_socket
    deadline = time.monotonic() + timeout
    got = exchange(socket_path, {"op": "status"}, timeout=min(5.0, timeout))
    before = _reload_generation(got.body if got else None)
    if got is None or before is None:
        click.echo(f"tdx-preflight: reload: no daemon answers on {socket_path}", err=True)
        sys.exit(EXIT_NO_DAEMON)
    # The pid is the kernel's word for who answered (SO_PEERCRED), not the reply's.
    os.kill(got.peer_pid, signal.SIGHUP)
    while time.monotonic() < deadline:
        left = deadline - time.monotonic()
        now = exchange(socket_path, {"op": "status"}, timeout=max(0.1, min(5.0, left)))
        body = now.body if now is not None and now.peer_pid == got.peer_pid else None
        generation = _reload_generation(body)
        if body is not None and generation is not None and generation > before:
            error = body["reload"].get("error")
            if error:
                click.echo(
                    f"tdx-preflight: reload: invalid configuration, the daemon keeps the "
                    f"old one: {error}",
                    err=True,
                )
                sys.exit(EXIT_USAGE)
            sys.exit(0)
        time.sleep(0.05)
    click.echo(
        f"tdx-preflight: reload: daemon pid {got.peer_pid} did not report the reload "
        f"within {timeout:g} s",
        err=True,
    )
    sys.exit(EXIT_UNKNOWN)


def _reload_generation(body: dict[str, Any] | None) -> int | None:
    """The reload counter of a status reply, or None when it has none (not a daemon reply)."""
    if body is None or body.get("ok") is not True or not isinstance(body.get("reload"), dict):
        return None
    generation = body["reload"].get("generation")
    is_count = isinstance(generation, int) and not isinstance(generation, bool)
    return generation if is_count and generation >= 0 else None


ADMIN_COMMANDS: tuple[click.Command, ...] = (
    install_integrations_cmd,
    uninstall_integrations_cmd,
    keep_crash_kernel,
    reload,
)
