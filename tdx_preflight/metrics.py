"""Fleet metrics in the node_exporter textfile format, through prometheus_client.

Written atomically (a temporary file renamed into place) and made readable for
node_exporter. Writing metrics never changes a verdict or an exit code: a
failure is reported to the caller as a message.
"""

from __future__ import annotations

import os
import time

from .checks import STATUSES
from .host import Problem
from .report import Report


def write_metrics(path: str, reports: list[Report]) -> str | None:
    """Write the metrics of `reports` (one per phase) to `path`; None or an error message."""
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
        ["phase"],
        registry=registry,
    )
    status = Gauge(
        "tdx_preflight_check_status",
        "1 for each check's current status, 0 for the others",
        ["check", "status"],
        registry=registry,
    )
    tds = Gauge("tdx_preflight_td_guests", "TD guests alive", registry=registry)
    vms = Gauge("tdx_preflight_kvm_vms", "KVM VMs alive (TDs included)", registry=registry)
    info = Gauge(
        "tdx_preflight_info",
        "Host facts as labels",
        ["kernel", "cpu_model", "tdx_module_version"],
        registry=registry,
    )
    stamp = Gauge(
        "tdx_preflight_last_check_timestamp_seconds",
        "When the reports were computed (Unix time)",
        registry=registry,
    )
    for report in reports:
        allowed.labels(phase=report.phase).set(1 if report.verdict == "allow" else 0)
    # Check statuses come from the exec report when there is one (the default gate).
    main = next((r for r in reports if r.phase == "exec"), reports[0])
    for r in main.results:
        for s in STATUSES:
            status.labels(check=r.id, status=s).set(1 if r.status == s else 0)
    guests = main.facts.guests
    tds.set(sum(1 for g in guests if g.kind == "td"))
    vms.set(len(guests))
    host = main.host_json()
    release = main.facts.release
    info.labels(
        kernel=release if not isinstance(release, Problem) else "",
        cpu_model=host["cpu_model_name"] or "",
        tdx_module_version=main.facts.module.version or "",
    ).set(1)
    stamp.set(time.time())
    try:
        write_to_textfile(path, registry)
        os.chmod(path, 0o644)  # node_exporter runs as another user
    except OSError as exc:
        return f"cannot write metrics to {path}: {exc.strerror or exc}"
    return None
