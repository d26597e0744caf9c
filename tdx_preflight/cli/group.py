"""The CLI's group: `tdx-preflight` itself, on which every command module registers."""

from __future__ import annotations

import click

from .. import __version__
from .options import StrictGroup


@click.group(cls=StrictGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tdx-preflight")
def cli() -> None:
    """May this Intel TDX host kexec (or load a kdump kernel) now, and why (not).

    Every command reads its options wherever they stand; an option given
    twice, or with an empty value, is a usage error (exit 2). check, hook and
    exec exit 0 only on allow: their --help exits 2.
    """
