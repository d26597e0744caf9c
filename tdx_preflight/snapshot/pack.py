"""Packing: `take_snapshot` captures, plans, replays and writes the .tar.gz archive.

The snapshot replays itself before packing, so its manifest (SNAPSHOT.json) says
whether, and where, the replay differs from the capture.
"""

import contextlib
import json
import os
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, NamedTuple

from .. import __version__
from ..checks import PHASES
from ..facts import HostFacts, Ledger, gather
from ..host import Host
from ..policy import Policy
from ..report import Report, evaluate
from .plan import TreeInfo, plan_tree, unreadable_reads
from .record import RecordingHost
from .replay import MANIFEST, SnapshotError, captured_unreadable, overlay

SUFFIXES = (".tar.gz", ".tgz")


def _reports(facts: HostFacts, policy: Policy) -> dict[str, Report]:
    return {phase: evaluate(facts, phase, policy) for phase in PHASES}


def _statuses(report: Report) -> dict[str, str]:
    return {r.id: r.status for r in report.results}


def _guests(facts: HostFacts) -> list[dict[str, Any]]:
    return [{"pid": g.pid, "tid": g.tid, "kind": g.kind, "name": g.name} for g in facts.guests]


def _differences(
    capture: dict[str, Report], replay: dict[str, Report]
) -> dict[str, dict[str, list[Any]]]:
    out: dict[str, dict[str, list[Any]]] = {}
    for phase, rep in capture.items():
        again = replay[phase]
        diff = {
            cid: [status, _statuses(again)[cid]]
            for cid, status in _statuses(rep).items()
            if _statuses(again)[cid] != status
        }
        if rep.verdict != again.verdict or rep.exit_code != again.exit_code:
            diff["verdict"] = [
                f"{rep.verdict} ({rep.exit_code})",
                f"{again.verdict} ({again.exit_code})",
            ]
        if phase == "exec" and _guests(rep.facts) != _guests(again.facts):
            diff["guests"] = [_guests(rep.facts), _guests(again.facts)]
        if diff:
            out[phase] = diff
    return out


def _walk(top: str, rel: str = "") -> Iterator[str]:
    """Every path under `top`, parents first, sorted; symlinks are not followed."""
    with os.scandir(os.path.join(top, rel) if rel else top) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        sub = f"{rel}/{entry.name}" if rel else entry.name
        yield sub
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(top, sub)


def _pack(top: str, out: Any, mtime: float) -> int:
    """Write the tree as a gzip'd tar to the open file `out`; return the non-directories."""

    def owned_by_root(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mtime = int(mtime)
        ti.mode = 0o755 if ti.isdir() else 0o777 if ti.issym() else 0o644
        return ti

    count = 0
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for rel in _walk(top):
            path = os.path.join(top, rel)
            tar.add(path, arcname=rel, recursive=False, filter=owned_by_root)
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                count += 1
    return count


def open_output(output: str) -> tuple[int, str]:
    """A temporary file beside `output` (renamed over it when done): fail before reading."""
    if not output.endswith(SUFFIXES):
        raise SnapshotError(
            f"output {output} must end in .tar.gz or .tgz (it is read back as --root)"
        )
    parent = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise SnapshotError(f"output {output} is a directory")
    if not os.path.isdir(parent):
        raise SnapshotError(f"cannot write {output}: {parent} is not a directory")
    try:
        return tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise SnapshotError(f"cannot write {output}: {exc.strerror or exc}") from None


class SnapshotResult(NamedTuple):
    path: str
    files: int
    verdict: str
    exit_code: int
    differences: dict[str, dict[str, list[Any]]]
    unreproducible: int

    def summary(self) -> str:
        line = f"snapshot {self.path}: {self.files} files, verdict {self.verdict} (exec)"
        if self.unreproducible:
            line += f", {self.unreproducible} reads not reproducible byte for byte"
        if self.differences:
            what = sorted({k for d in self.differences.values() for k in d})
            line += f"; replay differs in {', '.join(what)} (see {MANIFEST})"
        return line


def take_snapshot(
    root: str,
    policy: Policy,
    output: str,
    *,
    keep_cmdlines: bool = False,
    source: str | None = None,
    ledger: Ledger | None = None,
    ledger_info: dict[str, Any] | None = None,
) -> SnapshotResult:
    """Capture what the checks read under `root` into the archive `output`."""
    fd, partial = open_output(output)
    try:
        started = time.time()
        with RecordingHost(root, captured_unreadable(root)) as rec:
            facts = gather(rec, load_msr_module=policy.load_msr_module, ledger=ledger)
        capture = _reports(facts, policy)
        plan, info = plan_tree(rec, facts, keep_cmdlines)
        unreadable = unreadable_reads(rec)
        with tempfile.TemporaryDirectory(prefix="tdx-preflight-snapshot-") as tmp:
            top = os.path.join(tmp, "root")
            os.mkdir(top)
            plan.write(top)
            with Host(top, overlay(unreadable)) as replay_host:
                replay_facts = gather(replay_host, load_msr_module="never")
            differences = _differences(capture, _reports(replay_facts, policy))
            manifest = _manifest(
                rec,
                facts,
                capture,
                info,
                differences,
                keep_cmdlines,
                source or root,
                started,
                ledger_info,
            )
            manifest["unreadable"] = unreadable
            with open(os.path.join(top, MANIFEST), "x", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1, sort_keys=False)
                f.write("\n")
            with os.fdopen(fd, "wb") as out:
                fd = -1
                files = _pack(top, out, started)
                out.flush()
                os.fsync(out.fileno())
        os.replace(partial, output)
        partial = ""
    except OSError as exc:
        raise SnapshotError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
        if partial:
            with contextlib.suppress(OSError):
                os.unlink(partial)
    return SnapshotResult(
        output,
        files,
        capture["exec"].verdict,
        capture["exec"].exit_code,
        differences,
        len(info.unreproducible),
    )


def _manifest(
    rec: RecordingHost,
    facts: HostFacts,
    capture: dict[str, Report],
    info: TreeInfo,
    differences: dict[str, dict[str, list[Any]]],
    keep_cmdlines: bool,
    source: str,
    started: float,
    ledger_info: dict[str, Any] | None,
) -> dict[str, Any]:
    when = datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    msrs: dict[str, dict[str, Any]] = {}
    for cpu, values in sorted(rec.msrs.items()):
        # From a file, 0x981 holds 0x982's low bytes: neither the reader nor a person should use it.
        entry: dict[str, Any] = {"source": "file" if rec.msr_is_file(cpu) else "device"}
        entry.update(
            (f"0x{i:x}", f"0x{v:x}" if isinstance(v, int) else v.to_json())
            for i, v in sorted(values.items())
        )
        msrs[str(cpu)] = entry
    return {
        "schema": 1,
        "tool": {"name": "tdx-preflight", "version": __version__},
        "created_at": when,
        "source_root": source,
        "live": facts.live,
        "captured_as_uid": os.geteuid(),
        "kernel_release": facts.release if isinstance(facts.release, str) else None,
        "capture": {
            phase: {
                "verdict": rep.verdict,
                "exit_code": rep.exit_code,
                "checks": _statuses(rep),
            }
            for phase, rep in capture.items()
        },
        "guests": _guests(facts),
        "daemon_ledger": ledger_info,
        "vm_holders": info.holders,
        "omitted": {
            "processes_without_vms": info.dropped_processes,
            "fd_links_not_kvm_vm": info.dropped_fd_links,
            "kallsyms": "only the lines of the symbols found, and one neutral line",
        },
        "redaction": {
            "command_lines": "kept" if keep_cmdlines else "redacted",
            "rule": "argv[0], tdx-guest -object values, -name values, --platform tdx=on and "
            "--tdx are kept with their option names; every other argument reads REDACTED. "
            "libvirt status XML is reduced to pid, name and launchSecurity.",
            "redacted": info.redacted,
        },
        "msrs": {
            "values": msrs,
            "reader_notes": list(facts.msrs.notes) if facts.msrs else [],
            "note": "0x981 and 0x982 overlap in a file; the reader takes neither 0x981 "
            "nor a failed MSR from a file, so they are listed here",
        },
        "unreproducible": info.unreproducible,
        "notes": info.notes,
        "replay": {
            "matches_capture": not differences,
            "differences": differences,
            "note": "replayed by this snapshot before packing, without the daemon's ledger",
        },
    }
