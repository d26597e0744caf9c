"""How every command reads its own options: one mechanism, and one definition of each
option that commands share, for the whole CLI.

DESIGN.md, "The gate": options are options wherever they stand; a command's
foreign arguments (kexec's, or the command `exec` runs) are only what follows
`--`; an argument before `--` that the command does not declare is a usage
error; every option takes one value, so an option given twice is a usage
error, and so is an empty value (`--root ""` would otherwise read as "/").
`StrictGroup` makes every command of the CLI a `StrictCommand`, so a new
command cannot opt out by forgetting a decorator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


class _StrictParsing(click.Command):
    """Refuses an option given twice and an empty value, before click reads them."""

    def _refuse_repeats_and_empties(self, ctx: click.Context, args: list[str]) -> None:
        parser = self.make_parser(ctx)
        opts, _rest, order = parser.parse_args(args=list(args))
        seen: set[int] = set()
        for param in order:
            if not isinstance(param, click.Option):
                continue
            if id(param) in seen:
                raise click.UsageError(
                    f"option {param.opts[0]} given twice: every option takes one value", ctx
                )
            seen.add(id(param))
        for param in self.get_params(ctx):
            value = opts.get(param.name) if param.name else None
            if isinstance(value, str) and not value:
                raise click.BadParameter("must not be empty", ctx=ctx, param=param)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Check repeats and empty values, then let click parse as usual."""
        self._refuse_repeats_and_empties(ctx, args)
        return super().parse_args(ctx, args)


class StrictCommand(_StrictParsing):
    """A command of this CLI (see the module docstring).

    `passthrough` names the parameter that receives, verbatim, everything
    after the first `--` (None when there is no `--`); the command declares
    no positional parameter that could swallow arguments before it.
    `help_exit` is the exit code after --help: a command whose exit 0 means
    "allow" (check, hook, exec) must not exit 0 for having printed its help.
    """

    def __init__(
        self,
        *args: Any,
        passthrough: str | None = None,
        passthrough_metavar: str = "ARGS",
        help_exit: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.passthrough = passthrough
        self.passthrough_metavar = passthrough_metavar
        self.help_exit = help_exit

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Split at the first `--` (when the command takes foreign arguments), then parse."""
        tail: list[str] | None = None
        if self.passthrough is not None and "--" in args:
            at = args.index("--")
            args, tail = args[:at], args[at + 1 :]
        rest = super().parse_args(ctx, args)
        if self.passthrough is not None:
            ctx.params[self.passthrough] = tuple(tail) if tail is not None else None
        return rest

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        """The usage line shows where the foreign arguments go."""
        pieces = super().collect_usage_pieces(ctx)
        if self.passthrough is not None:
            pieces.append(f"[-- {self.passthrough_metavar}...]")
        return pieces

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        """--help, exiting with `help_exit` after printing the help."""
        option = super().get_help_option(ctx)
        if option is not None and self.help_exit:
            option.callback = self._show_help
        return option

    def _show_help(self, ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            click.echo(ctx.get_help(), color=ctx.color)
            ctx.exit(self.help_exit)


class StrictGroup(click.Group, _StrictParsing):
    """The CLI's group: its own options read strictly, and every command a StrictCommand.

    `lazy_commands` maps a command name to the module (in this package) whose import
    registers it: the module is imported when the command is first looked up.
    """

    command_class = StrictCommand

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = self.lazy_commands.get(cmd_name)
        if module is not None and cmd_name not in self.commands:
            __import__(f"{__package__}.{module}")
            if cmd_name not in self.commands:
                raise RuntimeError(f"{__package__}.{module} does not define {cmd_name!r}")
        return super().get_command(ctx, cmd_name)


_common_root = click.option(
    "--root",
    type=click.Path(),
    default=None,
    help="Host root to read: a directory or a snapshot .tar.gz (default /, or the config's root).",
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


#: --metrics-file, for the commands that run the checks (check, hook, exec).
metrics_option = click.option(
    "--metrics-file",
    type=click.Path(),
    default=None,
    help="Also write node_exporter textfile metrics here: a file, or a directory to write "
    "tdx_preflight_cli.prom in (e.g. /var/lib/prometheus/node-exporter).",
)

#: -q/--quiet, for the commands whose exit code is the answer (check, hook).
quiet_option = click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Exit code only: print nothing (usage and configuration errors, exit 2, still do).",
)
