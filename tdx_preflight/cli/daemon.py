"""The daemon's commands: daemon (run it), status (ask it), reload (make it re-read its
configuration: the unit's ExecReload=)."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..report import EXIT_NO_DAEMON, EXIT_UNKNOWN, EXIT_USAGE
from .group import cli
from .options import common
from .run import host_and_policy


@cli.command(short_help="Run the agent (systemd Type=notify).")
@common
def daemon(root: str | None, config_path: str | None) -> None:
    """Run the agent in the foreground (systemd Type=notify): track VMs and TDs, serve reports."""
    from ..daemon.service import run_daemon

    host, policy = host_and_policy(root, config_path, daemon=True)
    host.close()
    if host.root != "/":
        # Uevents describe the live kernel; applied to another tree they would lie.
        raise click.UsageError(
            f"the daemon watches the live host only; --root {host.root} is for check, "
            "guests, hook and snapshot"
        )
    sys.exit(run_daemon(policy, host.root, config_path))


#: What `status` tells a person when no daemon answers (exit 4).
START_HINT = (
    "start the daemon: systemctl start tdx-preflight (tdx-preflight check works without it)"
)


@cli.command(short_help="The daemon's view: verdict, TDs, VMs.")
@common
@click.option(
    "--format", "fmt", type=click.Choice(("text", "json")), default="text", show_default=True
)
def status(root: str | None, config_path: str | None, fmt: str) -> None:
    """The daemon's view: verdict, live TDs and VMs, TD lifecycles, resyncs, uptime.

    Exit 0/1/3 as for check, 4 when no daemon answers (nor a fresh state file).
    """
    from ..daemon.client import exchange
    from ..daemon.state import judge_status, read_state
    from ..render import dump_json, status_text

    host, policy = host_and_policy(root, config_path)
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
            click.echo(f"tdx-preflight: {message}; {START_HINT}", err=True)
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


@cli.command(short_help="Make the daemon reload its configuration.")
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

    from ..daemon.client import exchange

    host, policy = host_and_policy(root, config_path)
    host.close()
    socket_path = policy.control_socket
    deadline = time.monotonic() + timeout
    got = exchange(socket_path, {"op": "status"}, timeout=min(5.0, timeout))
    before = _reload_generation(got.body if got else None)
    if got is None or before is None:
        click.echo(
            f"tdx-preflight: reload: no daemon answers on {socket_path}; start the daemon: "
            "systemctl start tdx-preflight (it reads the configuration as it starts)",
            err=True,
        )
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
