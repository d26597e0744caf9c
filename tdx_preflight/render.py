"""Text and JSON renderings of a report and of the guest list."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .readers.vmclass import Guest
from .report import Report

_COLOURS = {
    "pass": "green",
    "warn": "yellow",
    "fail": "red",
    "unknown": "magenta",
    "skip": "bright_black",
    "allow": "green",
    "block": "red",
}


def use_colour() -> bool:
    """Colour only on a terminal, and never with NO_COLOR set."""
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _style(text: str, status: str, colour: bool, bold: bool = False) -> str:
    if not colour:
        return text
    return click.style(text, fg=_COLOURS.get(status), bold=bold)


def report_text(report: Report, *, verbose: bool = False, colour: bool = False) -> str:
    f = report.facts
    host = report.host_json()
    where = "live host" if f.live else f"root {f.root}"
    cpu = host["cpu_model_name"] or "CPU unknown"
    kernel = host["kernel_release"] or "kernel unknown"
    lines = [f"tdx-preflight: {report.phase} phase, {where}: {cpu}, kernel {kernel}"]
    partial = f.view.partial
    if partial:
        lines.append(f"host view partial: {'; '.join(partial)}")
    width = max(len(r.id) for r in report.results)
    for r in report.results:
        tag = f"{r.status.upper():<7}"
        mark = "*" if r.blocks else " "
        lines.append(
            f"{_style(tag, r.status, colour, bold=True)}{mark}{r.id:<{width}}  {r.summary}"
        )
        if r.remedy:
            lines.append(f"{'':8} {'':{width}}  fix: {r.remedy}")
        if verbose and r.evidence:
            import json

            ev = json.dumps(r.evidence, sort_keys=True, default=str)
            lines.append(f"{'':8} {'':{width}}  evidence: {ev}")
    if verbose:
        lines.extend(_report_guest_lines(report))
    lines.extend(report.notes)
    if any(r.blocks for r in report.results):
        lines.append("(* blocks the verdict)")
    verdict = f"verdict: {report.verdict.upper()} (exit {report.exit_code}): {report.summary}"
    # The JSON summary stays as it is; the person reading the text also learns what could
    # not be read although it did not block (an allow with unknowns is not a clean allow).
    unread = [r.id for r in report.results if r.status == "unknown" and not r.blocks]
    if unread:
        verdict += f"; {len(unread)} unknown, not blocking ({', '.join(unread)})"
    lines.append(_style(verdict, report.verdict, colour, bold=True))
    vouched = report.sys_disable_vouched()
    if vouched:
        lines.append(
            f"passes resting on {vouched['key']} (config {vouched['config']}): "
            f"{', '.join(vouched['checks'])} for module {vouched['module_version']}"
        )
    return "\n".join(lines)


def report_json(report: Report) -> str:
    """Indented for a person at a terminal, compact for a program."""
    import json  # loaded by the JSON outputs only: a hook's text verdict never needs it

    return json.dumps(report.to_json(), indent=2 if sys.stdout.isatty() else None, default=str)


def _report_guest_lines(report: Report) -> list[str]:
    """check -v's VM list: when the enumeration is incomplete it says so, and where the
    reason is (guests.vm), rather than "no KVM VM found"."""
    guests = report.facts.guests
    if report.facts.enumeration.complete:
        return _guest_lines(guests, verbose=True)
    gap = "the list is not complete: see guests.vm"
    if not guests:
        return [f"no KVM VM found ({gap})"]
    return [*_guest_lines(guests, verbose=True), f"({gap})"]


def _guest_lines(
    guests: list[Guest],
    verbose: bool,
    complete: bool = True,
    procs: dict[int, dict[str, Any] | None] | None = None,
) -> list[str]:
    if not guests:
        return ["no KVM VM found" if complete else "no VM listed: the list is not complete"]
    out = [f"{'KIND':<8}{'PID':>8} {'TID':>8} {'FD':>4}  NAME"]
    for g in guests:
        pid = "-" if g.pid is None else str(g.pid)
        tid = "-" if g.tid is None else str(g.tid)
        out.append(f"{g.kind:<8}{pid:>8} {tid:>8} {g.vm_fd:>4}  {g.name or '?'}")
        if procs is not None and g.pid is not None:
            info = procs.get(g.pid)
            out.append(
                f"{'':30}process: up {_duration(info['uptime_s'])}, "
                f"RSS {info['rss_bytes'] / 2**20:.1f} MiB"
                if info
                else f"{'':30}process: gone or unreadable"
            )
        evidence = g.evidence if verbose else g.evidence[1:2] or g.evidence[:1]
        out.extend(f"{'':30}{e}" for e in evidence)
    return out


def guests_text(
    guests: list[Guest],
    header: str,
    verbose: bool = False,
    complete: bool = True,
    procs: dict[int, dict[str, Any] | None] | None = None,
) -> str:
    """The VM list for a person: a summary line, one line per VM and its evidence
    (all of it when `verbose`), each VM process's uptime and RSS when `procs` is given."""
    tds = sum(1 for g in guests if g.kind == "td")
    td_word = "TD guest" if tds == 1 else "TD guests"
    vm_word = "VM" if len(guests) == 1 else "VMs"
    summary = f"{header}: {len(guests)} {vm_word}, {tds} {td_word}"
    return "\n".join([summary, *_guest_lines(guests, verbose, complete, procs)])


def dump_json(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data, indent=2, default=str)


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + (f"{h}h" if h or d else "") + f"{m}m{s:02d}s"


def status_text(st: dict[str, Any]) -> str:
    """The daemon's status reply for a person."""
    lines = [
        f"tdx-preflight daemon pid {st.get('daemon_pid')}, up {_duration(st.get('uptime_s', 0))}, "
        f"root {st.get('root')} ({st.get('source')})",
        f"{st.get('status_line')}",
    ]
    health = st.get("health")
    if isinstance(health, dict):
        try:
            lines.insert(
                1,
                f"daemon health: CPU {float(health['cpu_seconds']):.2f} s, RSS "
                f"{int(health['rss_bytes']) / 2**20:.1f} MiB, {int(health['open_fds'])} open fds, "
                f"{int(health['threads'])} threads",
            )
        except (KeyError, TypeError, ValueError):
            lines.insert(1, "daemon health: malformed")
    live = st.get("live", {})
    for kind in ("tds", "unknown", "vms"):
        for e in live.get(kind, []):
            lines.append(
                f"  {e['kind']:<8}{e.get('pid') or '-':>8}  {e.get('name') or '?':<24}"
                f"created {e.get('created_at')} by {e.get('created_by')}"
            )
    recent = st.get("recent_tds", [])
    if recent:
        lines.append("recent TD lifecycles:")
        for e in recent[-10:]:
            lines.append(
                f"  {e.get('name') or '?'} (pid {e.get('pid')}): created {e.get('created_at')}, "
                f"destroyed {e.get('destroyed_at')} by {e.get('destroyed_by')}, "
                f"teardown {e.get('teardown')}"
            )
    last = st.get("last_reconcile") or {}
    lines.append(
        f"events {st.get('events')}, resyncs {st.get('resyncs')}, reconciles "
        f"{st.get('reconciles')} (last: {last.get('why')} at {last.get('at')})"
    )
    verdict = str(st.get("verdict") or "unknown")
    lines.append(f"verdict: {verdict.upper()} (exit {st.get('exit_code')}): {st.get('summary')}")
    return "\n".join(lines)
