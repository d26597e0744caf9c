"""node_exporter textfile metrics: what the CLI and the daemon write, and that the real
node_exporter reads both from one directory without an error.

The CLI runs as a subprocess on fixture hosts, the daemon as a real process; the files are
parsed by prometheus_client's own parser and served by Debian's prometheus-node-exporter where
it is installed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from daemonproc import DaemonProc
from hostbuilder import VmProc, build, qemu_td_cmdline, tdx_host

from tdx_preflight.metrics import CLI_FILE, DAEMON_FILE, TEXTFILE_DIR

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _metrics(path: Path) -> Series:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(path.read_text()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _td_root(tmp_path: Path) -> Path:
    spec = tdx_host(
        processes=[VmProc(pid=4242, cmdline=qemu_td_cmdline("td1"), misc_tdx=1)],
        misc_current={"tdx": 1},
    )
    return build(tmp_path / "root", spec)


def _labels(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def test_metrics_file_never_changes_the_exit_code(tmp_path: Path) -> None:
    root = _td_root(tmp_path)
    prom = tmp_path / "tdx_preflight.prom"
    run = run_cli("check", "--root", str(root), "--metrics-file", str(prom))
    assert run.code == 1
    m = _metrics(prom)
    cli = {"source": "cli"}
    assert m[("tdx_preflight_kexec_allowed", _labels(**cli, phase="exec"))] == 0
    fail = _labels(**cli, phase="exec", check="guests.td", status="fail")
    passed = _labels(**cli, phase="exec", check="guests.td", status="pass")
    assert m[("tdx_preflight_check_status", fail)] == 1
    assert m[("tdx_preflight_check_status", passed)] == 0
    assert m[("tdx_preflight_td_guests", _labels(**cli))] == 1
    assert m[("tdx_preflight_kvm_vms", _labels(**cli))] == 1
    [info] = [k for k in m if k[0] == "tdx_preflight_info"]
    assert {
        ("kernel", "6.18.2-1-amd64"),
        ("tdx_module_version", "1.5.08"),
        ("source", "cli"),
    } <= set(info[1])
    assert time.time() - m[("tdx_preflight_last_check_timestamp_seconds", _labels(**cli))] < 60
    assert oct(prom.stat().st_mode & 0o777) == "0o644"
    bad = run_cli("check", "--root", str(root), "--metrics-file", str(tmp_path / "no/dir/x.prom"))
    assert bad.code == 1 and "warning" in bad.stderr


def test_every_series_has_a_source_and_statuses_a_phase(tmp_path: Path) -> None:
    root = _td_root(tmp_path)
    out = tmp_path / "textfile"
    out.mkdir()
    # A directory gets the CLI's own file name.
    run = run_cli(
        "hook", "--root", str(root), "--metrics-file", str(out), "--", "-l", "/vmlinuz", "-e"
    )
    assert run.code == 1
    m = _metrics(out / CLI_FILE)
    assert all(dict(labels).get("source") == "cli" for _, labels in m)
    phases = {dict(labels)["phase"] for name, labels in m if name == "tdx_preflight_check_status"}
    assert phases == {"load", "exec"}


def test_a_cli_never_rewrites_the_daemons_file(tmp_path: Path) -> None:
    root = _td_root(tmp_path)
    daemons = tmp_path / "d.prom"
    daemons.write_text("# the daemon's\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"metrics_file: {daemons}\n")
    for target in (daemons, tmp_path / DAEMON_FILE):
        run = run_cli(
            "check", "--root", str(root), "--config", str(config), "--metrics-file", str(target)
        )
        assert run.code == 1
        assert "is the daemon's metrics file; not rewriting it" in run.stderr
    assert daemons.read_text() == "# the daemon's\n"
    assert not (tmp_path / DAEMON_FILE).exists()


def _wait_for(path: Path, d: DaemonProc, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)


@pytest.fixture
def idle_daemon(tmp_path: Path) -> Iterator[tuple[DaemonProc, Path]]:
    prom = tmp_path / DAEMON_FILE
    d = DaemonProc(metrics_file=str(prom), reconcile_interval=0, metrics_interval=1)
    try:
        _wait_for(prom, d)
        yield d, prom
    finally:
        d.cleanup()


def test_daemon_writes_metrics_for_every_phase(idle_daemon: tuple[DaemonProc, Path]) -> None:
    _d, prom = idle_daemon
    m = _metrics(prom)
    allowed = [dict(k[1]) for k in m if k[0] == "tdx_preflight_kexec_allowed"]
    assert {a["phase"] for a in allowed} == {"load", "exec", "crash"}
    assert {dict(labels)["source"] for _, labels in m} == {"daemon"}
    statuses = {dict(k[1])["phase"] for k in m if k[0] == "tdx_preflight_check_status"}
    assert statuses == {"load", "exec", "crash"}


def test_an_idle_daemon_keeps_its_metrics_fresh(idle_daemon: tuple[DaemonProc, Path]) -> None:
    # reconcile_interval 0 and no VM events: nothing changes, yet the timestamp must move,
    # or TDXPreflightStale fires on a healthy host.
    d, prom = idle_daemon
    key = ("tdx_preflight_last_check_timestamp_seconds", _labels(source="daemon"))
    first = _metrics(prom)[key]
    deadline = time.monotonic() + 10
    while _metrics(prom)[key] <= first:
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_node_exporter_reads_the_daemon_and_a_cli_together(
    idle_daemon: tuple[DaemonProc, Path], tmp_path: Path
) -> None:
    exporter = shutil.which("prometheus-node-exporter")
    if exporter is None:
        pytest.skip("prometheus-node-exporter is not installed (Debian package)")
    assert TEXTFILE_DIR == "/var/lib/prometheus/node-exporter"  # Debian's default directory
    _d, prom = idle_daemon
    root = _td_root(tmp_path)
    run = run_cli("check", "--root", str(root), "--metrics-file", str(prom.parent))
    assert run.code == 1 and (prom.parent / CLI_FILE).exists()
    port = _free_port()
    proc = subprocess.Popen(
        [
            exporter,
            "--collector.disable-defaults",
            "--collector.textfile",
            f"--collector.textfile.directory={prom.parent}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"

    def scrape() -> tuple[int, str]:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()

    # Scrapes while both writers write: the daemon rewrites its file every second
    # (metrics_interval 1), the CLI rewrites its own on every run below.
    scrapes: list[tuple[int, str]] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            try:
                scrapes.append(scrape())
            except OSError as exc:  # a scrape that fails is a result, not a retry
                scrapes.append((0, repr(exc)))

    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, body = scrape()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no node_exporter"
                time.sleep(0.1)
        daemon_before = prom.stat().st_mtime_ns
        cli_before = (prom.parent / CLI_FILE).stat().st_mtime_ns
        thread = threading.Thread(target=scraper)
        thread.start()
        try:
            for _ in range(4):
                rerun = run_cli("check", "--root", str(root), "--metrics-file", str(prom.parent))
                assert rerun.code == 1, rerun.err
        finally:
            stop.set()
            thread.join(timeout=30)
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=20)
    assert prom.stat().st_mtime_ns > daemon_before, "the daemon did not write meanwhile"
    assert (prom.parent / CLI_FILE).stat().st_mtime_ns > cli_before
    # A duplicate series makes node_exporter answer 500 and log the error; a torn file, a parse
    # error (node_textfile_scrape_error 1).
    assert status == 200, body
    assert len(scrapes) >= 4, scrapes
    for code, text in scrapes:
        assert code == 200, text
        assert "node_textfile_scrape_error 0" in text, text
        for source in ("daemon", "cli"):
            assert f'tdx_preflight_kexec_allowed{{phase="exec",source="{source}"}}' in text
    print(f"{len(scrapes)} scrapes while the daemon and the CLI wrote: all 200, no scrape error")
    assert "node_textfile_scrape_error 0" in body
    assert "duplicate" not in err.lower() and "error gathering" not in err.lower(), err
    for source in ("daemon", "cli"):
        assert f'tdx_preflight_kexec_allowed{{phase="exec",source="{source}"}}' in body
