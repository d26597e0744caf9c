"""Commands that set up an installation and serve its integrations: install-integrations,
uninstall-integrations and keep-crash-kernel (the stop guard of the kdump drop-ins)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from ..report import EXIT_USAGE
from .group import cli
from .options import common
from .run import run_checks

if TYPE_CHECKING:  # integrations (pathlib, hashlib, dataclasses) load only when a command runs
    from ..integrations import Step

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


@cli.command("install-integrations", short_help="pip installs: units, wrapper, alert rule.")
@_prefix
@_dry_run
def install_integrations_cmd(prefix: str, dry_run: bool) -> None:
    """Install the unit, the kexec/kdump drop-ins, the kexec wrapper and the alert rule.

    For pip installs only: the Debian package installs all of these itself, and also
    diverts kexec-tools' kexec to the wrapper, which this does not (see the wrapper's
    HOW TO ENABLE). Installs from this copy of tdx-preflight; links
    /usr/local/bin/tdx-preflight to it when nothing is there. What it writes is recorded
    in PREFIX/var/lib/tdx-preflight/integrations.json for uninstall-integrations. Exit 2
    when it cannot.
    """
    from pathlib import Path

    from ..integrations import MANIFEST, install_integrations

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


@cli.command("uninstall-integrations", short_help="Remove what install-integrations wrote.")
@_prefix
@_dry_run
def uninstall_integrations_cmd(prefix: str, dry_run: bool) -> None:
    """Remove what install-integrations wrote, as its manifest records it; nothing else.

    Files changed since the install (an edited config.yaml) are kept and named. Exit 2 when
    there is no manifest under PREFIX or a removal fails.
    """
    from ..integrations import uninstall_integrations

    try:
        steps = uninstall_integrations(prefix, dry_run=dry_run)
    except (OSError, ValueError) as exc:
        click.echo(f"tdx-preflight: uninstall-integrations: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    _echo_steps(steps, dry_run)


@cli.command("keep-crash-kernel", short_help="Exit 0 when kdump should keep its kernel.")
@common
def keep_crash_kernel(root: str | None, config_path: str | None) -> None:
    """Exit 0 when a restart of the kdump unit should keep the crash kernel armed now.

    That is: one is loaded, the crash phase blocks a new load, and the kernel itself would
    accept one (neither errata.tdx_pw_mce nor kernel.kexec fails). Exit 1 otherwise: the
    unit's stop unloads as usual. One line on stderr says why. Exit 2 on a usage or
    configuration error.
    """
    from ..gate import keep_armed_crash_kernel

    [report] = run_checks(root, config_path, ("crash",))
    keep, why = keep_armed_crash_kernel(report)
    click.echo(f"tdx-preflight: {why}", err=True)
    sys.exit(0 if keep else 1)
