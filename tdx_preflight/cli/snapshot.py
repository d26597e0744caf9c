"""The snapshot command: what the checks read, captured as a host root to replay."""

from __future__ import annotations

import sys

import click

from ..report import EXIT_USAGE
from .group import cli
from .options import common
from .run import host_and_policy


@cli.command(short_help="Capture what the checks read, to replay.")
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
    from ..daemon.client import daemon_ledger
    from ..snapshot import SnapshotError, take_snapshot

    host, policy = host_and_policy(root, config_path)
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
