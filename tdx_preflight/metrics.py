"""Fleet metrics in the node_exporter textfile format, through prometheus_client.

Written atomically (a temporary file renamed into place) and made readable for
node_exporter. Writing metrics never changes a verdict or an exit code: a
failure is reported to the caller as a message.

Every series carries a `source` label, "daemon" or "cli": the daemon's file and a
CLI's file in the same textfile directory then never hold the same series, which
node_exporter would refuse as duplicates on every scrape. Their names differ too
(DAEMON_FILE, CLI_FILE), and a CLI never writes the daemon's file.
"""

from __future__ import annotations

import os
import stat
import time

from .checks import STATUSES
from .host import Problem
from .report import Report

#: Debian's prometheus-node-exporter reads *.prom here (--collector.textfile.directory).
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
DAEMON_FILE = "tdx_preflight_daemon.prom"
CLI_FILE = "tdx_preflight_cli.prom"
SOURCES = ("daemon", "cli")


def write_metrics(path: str, reports: list[Report], source: str) -> str | None:
    """Write the metrics of `reports` (one per phase) to `path`; None or an error message.

    `source` ("daemon" or "cli") labels every series. `tdx_preflight_check_status` has one
    set of series per phase reported; the other gauges describe the host, from the exec
    report when there is one.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    if not reports:
        return "no report"
    try:
        from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
    except ImportError as exc:
        return f"prometheus_client is not installed: {exc}"
    registry = CollectorRegistry()
    allowed = Gauge(
        "tdx_preflight_kexec_allowed",
        "1 when kexec is allowed in this phase, 0 when blocked",
        ["source", "phase"],
        registry=registry,
    )
    status = Gauge(
        "tdx_preflight_check_status",
        "1 for each check's current status in this phase, 0 for the others",
        ["source", "phase", "check", "status"],
        registry=registry,
    )
    tds = Gauge("tdx_preflight_td_guests", "TD guests alive", ["source"], registry=registry)
    vms = Gauge(
        "tdx_preflight_kvm_vms", "KVM VMs alive (TDs included)", ["source"], registry=registry
    )
    info = Gauge(
        "tdx_preflight_info",
        "Host facts as labels",
        ["source", "kernel", "cpu_model", "tdx_module_version"],
        registry=registry,
    )
    vouched = Gauge(
        "tdx_preflight_sys_disable_vouched",
        "1 for each check whose pass in this phase rests on the configured "
        "sys_disable_module_versions (the operator vouches that the TDX module implements "
        "TDH.SYS.DISABLE); no series when none does",
        ["source", "phase", "check", "module_version"],
        registry=registry,
    )
    stamp = Gauge(
        "tdx_preflight_last_check_timestamp_seconds",
        "When the reports were computed (Unix time); the daemon rewrites it at least every "
        "metrics_interval",
        ["source"],
        registry=registry,
    )
    for report in reports:
        allowed.labels(source=source, phase=report.phase).set(report.verdict == "allow")
        for r in report.results:
            for s in STATUSES:
                status.labels(source=source, phase=report.phase, check=r.id, status=s).set(
                    r.status == s
                )
        rest = report.sys_disable_vouched()
        for check in rest["checks"] if rest else ():
            vouched.labels(
                source=source,
                phase=report.phase,
                check=check,
                module_version=rest["module_version"],
            ).set(1)
    # Host facts come from the exec report when there is one (the default gate).
    main = next((r for r in reports if r.phase == "exec"), reports[0])
    guests = main.facts.guests
    tds.labels(source=source).set(sum(1 for g in guests if g.kind == "td"))
    vms.labels(source=source).set(len(guests))
    host = main.host_json()
    release = main.facts.release
    info.labels(
        source=source,
        kernel=release if not isinstance(release, Problem) else "",
        cpu_model=host["cpu_model_name"] or "",
        tdx_module_version=main.facts.module.version or "",
    ).set(1)
    stamp.labels(source=source).set(time.time())
    try:
        # The write renames a new file over `path`: never over a device, FIFO or socket
        # (as root, that would replace /dev/full with a regular file).
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        return f"cannot write metrics to {path}: {exc.strerror or exc}"
    else:
        if not stat.S_ISREG(st.st_mode):
            return f"cannot write metrics to {path}: it exists and is not a regular file"
    try:
        write_to_textfile(path, registry)
        os.chmod(path, 0o644)  # node_exporter runs as another user
    except OSError as exc:
        return f"cannot write metrics to {path}: {exc.strerror or exc}"
    return None
