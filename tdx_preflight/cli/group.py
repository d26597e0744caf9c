"""The CLI's group: `tdx-preflight` itself, on which every command module registers.

A command's module is imported when the command is looked up (COMMANDS names it), so
`check` and `hook` do not pay for defining the daemon's, the snapshot's and the
installer's commands; --help and shell completion list them all, and load them all.
"""

from __future__ import annotations

import click

from .. import __version__
from .options import StrictGroup

#: Every command, by the module of this package that defines it (and registers it on `cli`).
COMMANDS = {
    "check": "check",
    "guests": "check",
    "explain": "check",
    "schema": "check",
    "hook": "gate",
    "exec": "gate",
    "daemon": "daemon",
    "status": "daemon",
    "reload": "daemon",
    "snapshot": "snapshot",
    "install-integrations": "admin",
    "uninstall-integrations": "admin",
    "keep-crash-kernel": "admin",
}


@click.group(
    cls=StrictGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    lazy_commands=COMMANDS,
)
@click.version_option(__version__, prog_name="tdx-preflight")
def cli() -> None:
    """May this Intel TDX host kexec (or load a kdump kernel) now, and why (not).

    Every command reads its options wherever they stand; an option given
    twice, or with an empty value, is a usage error (exit 2). check, hook and
    exec exit 0 only on allow: their --help exits 2.
    """


def load_all() -> click.Group:
    """The group with every command registered (what --help lists), for callers that walk
    `cli.commands` themselves."""
    for name in COMMANDS:
        cli.get_command(click.Context(cli), name)
    return cli
