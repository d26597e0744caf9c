"""Command line: parse, call, render, exit code. No logic of its own.

The group (group.py) and the console entry point (main, here). The commands live beside
this file, grouped by what they serve: check.py (check, guests, explain, schema), gate.py
(hook, exec), daemon.py (daemon, status, reload), snapshot.py (snapshot) and admin.py
(install-integrations, uninstall-integrations, keep-crash-kernel). options.py is how every
command reads its options; run.py is what the commands share (host, checks, output).
A command's module is imported when the command runs (group.COMMANDS); `cli`, taken
from here, is the group with all of them loaded.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

import click

from ..report import EXIT_UNKNOWN, EXIT_USAGE
from .group import cli as _group
from .group import load_all

__all__ = ["COMPLETE_VAR", "cli", "main"]


def __getattr__(name: str) -> Any:
    """`cli`: the group with every command loaded (main loads only the one it runs)."""
    if name == "cli":
        return load_all()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: click's shell-completion switch; a shell calls the program with it and no arguments.
COMPLETE_VAR = "_TDX_PREFLIGHT_COMPLETE"


def main() -> None:
    """Console entry point: never exits 0 on an internal error, nor for having
    printed something other than a verdict when a command was asked for.

    When the command is done, every object is frozen (gc.freeze): the interpreter's
    exit would otherwise run one last full collection over all of them, which decides
    nothing and cost about 20 ms of a `check` on bench/'s large host. (The console
    entry point, __main__.main, then usually ends without that teardown: see
    __main__.leave.)

    Shell completion runs only when no argument is given (as the shells call it):
    with arguments, the completion variable is ignored and the command runs. The
    group's --help and --version answer only when they stand alone: before a
    command (`--version hook exec`) they are a usage error, never an exit 0.
    """
    try:
        _main()
    finally:
        gc.freeze()


def _main() -> None:
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
        _group.main(prog_name="tdx-preflight", complete_var=COMPLETE_VAR)
    except SystemExit:
        raise
    except Exception:
        import traceback

        traceback.print_exc()
        click.echo("tdx-preflight: internal error: not allowing kexec", err=True)
        sys.exit(EXIT_UNKNOWN)
