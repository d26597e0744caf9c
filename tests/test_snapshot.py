"""tdx-preflight snapshot: capture a host root, replay it with `check --root ARCHIVE` (or its tree).

Every scenario is a real fixture tree and the real console script. The CLI runs are
what costs (about a third of a second each), so each stage runs its subprocesses in
parallel: build every fixture, snapshot them all, then replay them all.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Run, run_cli, statuses
from hostbuilder import (
    LibvirtDomain,
    VmProc,
    build,
    cloud_hypervisor_td_cmdline,
    libvirt_cgroup,
    qemu_td_cmdline,
    qemu_vm_cmdline,
    tdx_host,
)

FILLERS = 300


def _run_all(calls: list[tuple[str, ...]], env: dict[str, str] | None = None) -> list[Run]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda args: run_cli(*args, env=env), calls))


def _odd_host(root: Path) -> None:
    """Reads that fail other than "absent", and content a reader refuses."""
    os.unlink(root / "sys/kernel/kexec_loaded")
    os.mkfifo(root / "sys/kernel/kexec_loaded")  # io: "is a FIFO"
    os.unlink(root / "dev/cpu/2/msr")
    os.mkdir(root / "dev/cpu/2/msr")  # io: the MSR source of one CPU is a directory
    os.truncate(root / "dev/cpu/3/msr", 0x87 + 8)  # only 0x87: the others read short (EIO)
    # Over read_value's 4096-byte cap (malformed), and bytes that are not UTF-8 (malformed).
    (root / "sys/module/kvm_intel/parameters/tdx").write_bytes(b"Y" + b" " * 5000 + b"\n")
    (root / "sys/fs/cgroup/misc.current").write_bytes(b"tdx \xff\n")


def _td_with_thread() -> Any:
    # The VM was created by a thread (debugfs names tid 4250), so proc/4250 is read too.
    td = VmProc(
        pid=4242,
        tid=4250,
        cmdline=qemu_td_cmdline("td1"),
        comm="td1",
        misc_tdx=1,
        cgroup="/machine.slice/td1.scope",
    )
    return tdx_host(processes=[td], misc_current={"tdx": 1}, other_processes=40)


def _fillers() -> Any:
    # No debugfs: VMs are found by scanning every proc/PID/fd, fillers included.
    plain = VmProc(pid=5000, cmdline=qemu_vm_cmdline("web1"))
    lv = VmProc(
        pid=6000,
        cmdline=qemu_vm_cmdline("tdweb", domid=2),
        cgroup=libvirt_cgroup("tdweb", 2),
        misc_tdx=1,
    )
    ch = VmProc(pid=7000, cmdline=cloud_hypervisor_td_cmdline(), comm="cloud-hyperviso")
    return tdx_host(
        debugfs_kvm=False,
        other_processes=FILLERS,
        processes=[plain, lv, ch],
        libvirt=[LibvirtDomain("tdweb", 6000, tdx=True, domid=2)],
        misc_current={"tdx": 2},
    )


@dataclass(frozen=True)
class Scenario:
    spec: Callable[[], Any]
    holders: set[int]  # the proc/PID entries a snapshot keeps
    secrets: tuple[str, ...] = ()  # strings of redacted arguments
    post: Callable[[Path], None] | None = None


SCENARIOS: dict[str, Scenario] = {
    "idle": Scenario(tdx_host, set()),
    "qemu_td": Scenario(_td_with_thread, {4242, 4250}, ("/var/lib/tdx/td1.qcow2",)),
    "erratum": Scenario(lambda: tdx_host(cpu="emerald_rapids", extra_bugs=["tdx_pw_mce"]), set()),
    "no_flush": Scenario(lambda: tdx_host(kallsyms=["tdx_enable", "tdx_cpu_enable"]), set()),
    "fillers": Scenario(
        _fillers,
        {5000, 6000, 7000},
        ("images/web1.qcow2", "images/tdweb.qcow2", "/var/lib/tdx/td-guest.raw"),
    ),
    "odd": Scenario(tdx_host, set(), post=_odd_host),
    # A TD held by vCPU fds alone (its kvm-vm fd closed), on a cgroup v1 host, with the
    # capturing process's namespace link: all three replay.
    "vcpu_held_v1": Scenario(
        lambda: tdx_host(
            debugfs_kvm=False,
            cgroup_layout="v1",
            cgroup_ns=4026531835,
            processes=[
                VmProc(
                    pid=4242,
                    cmdline=qemu_vm_cmdline("t"),
                    vm_fds=[],
                    closed_vm_fds=[12],
                    misc_tdx=1,
                    cgroup="/machine.slice/t.scope",
                )
            ],
            misc_current={"tdx": 1},
        ),
        {4242},
        ("images/t.qcow2",),
    ),
    # A VM kept alive by a vCPU statistics descriptor alone (its kvm-vm and vCPU fds
    # closed): the /proc scan cannot name it, so enumeration is incomplete at capture,
    # and must be on replay.
    "stats_held": Scenario(
        lambda: tdx_host(
            debugfs_kvm=False,
            other_processes=20,
            processes=[
                VmProc(
                    pid=5000,
                    cmdline=qemu_vm_cmdline("s"),
                    vm_fds=[],
                    extra_fds={40: "anon_inode:kvm-vcpu-stats:0"},
                )
            ],
        ),
        {5000},
        ("images/s.qcow2",),
    ),
    # A TD held by its guest_memfd alone, in the link form of guest_memfd's own pseudo
    # filesystem (an absolute path no archive holds as a link), misc counts unavailable.
    "gmem_held": Scenario(
        lambda: tdx_host(
            debugfs_kvm=False,
            other_processes=20,
            misc_capacity={},
            misc_current={},
            processes=[
                VmProc(
                    pid=4242,
                    cmdline=qemu_td_cmdline("g"),
                    vm_fds=[],
                    extra_fds={40: "/[kvm-gmem] (deleted)"},
                )
            ],
        ),
        {4242},
    ),
}


@dataclass
class Captured:
    root: Path
    archive: Path
    tree: Path
    snap: Run
    original: Run
    from_archive: Run
    from_tree: Run
    manifest: dict[str, Any]


def _extract(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest


@dataclass
class Results:
    scenarios: dict[str, Captured]
    kept: Path  # the qemu_td snapshot taken with --keep-cmdlines, extracted
    again: Path  # a snapshot of the fillers snapshot (--root ARCHIVE), extracted

    def __getitem__(self, name: str) -> Captured:
        return self.scenarios[name]


def _tree_bytes(tree: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in tree.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> Results:
    base = tmp_path_factory.mktemp("snapshots")
    tmpdir = base / "tmp"  # TMPDIR of every run: what the CLI leaves behind shows here
    tmpdir.mkdir()
    env = {"TMPDIR": str(tmpdir)}
    roots: dict[str, Path] = {}
    for name, sc in SCENARIOS.items():
        roots[name] = build(base / name / "root", sc.spec())
        if sc.post:
            sc.post(roots[name])
    archives = {name: base / name / "snap.tar.gz" for name in SCENARIOS}
    kept = base / "kept.tar.gz"
    first = _run_all(
        [("snapshot", str(archives[n]), "--root", str(roots[n])) for n in SCENARIOS]
        + [("check", "--root", str(roots[n]), "--format", "json") for n in SCENARIOS]
        + [("snapshot", str(kept), "--root", str(roots["qemu_td"]), "--keep-cmdlines")],
        env,
    )
    snaps = dict(zip(SCENARIOS, first[: len(SCENARIOS)], strict=True))
    originals = dict(zip(SCENARIOS, first[len(SCENARIOS) : 2 * len(SCENARIOS)], strict=True))
    assert first[-1].code == 0, first[-1].stderr
    for name, run in snaps.items():
        assert run.code == 0, (name, run.stdout, run.stderr)
    trees = {n: _extract(archives[n], base / n / "tree") for n in SCENARIOS}
    again = base / "again.tar.gz"
    second = _run_all(
        [("check", "--root", str(archives[n]), "--format", "json") for n in SCENARIOS]
        + [("check", "--root", str(trees[n]), "--format", "json") for n in SCENARIOS]
        + [("snapshot", str(again), "--root", str(archives["fillers"]))],
        env,
    )
    assert second[-1].code == 0, second[-1].stderr
    assert os.listdir(tmpdir) == [], "an extracted snapshot or a temporary tree was left behind"
    scenarios = {
        n: Captured(
            roots[n],
            archives[n],
            trees[n],
            snaps[n],
            originals[n],
            second[i],
            second[len(SCENARIOS) + i],
            json.loads((trees[n] / "SNAPSHOT.json").read_text()),
        )
        for i, n in enumerate(SCENARIOS)
    }
    return Results(scenarios, _extract(kept, base / "kept"), _extract(again, base / "again"))


def _guests(report: dict[str, Any]) -> list[tuple[Any, ...]]:
    return sorted((g["kind"], g["name"], g["pid"], g["tid"], g["vm_fd"]) for g in report["guests"])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_replay_matches_the_original(captured: Results, name: str) -> None:
    c = captured[name]
    want = c.original.json()
    for replay in (c.from_archive, c.from_tree):
        got = replay.json()
        assert replay.code == c.original.code
        assert got["verdict"] == want["verdict"] and got["exit_code"] == want["exit_code"]
        assert statuses(got) == statuses(want)
        assert _guests(got) == _guests(want)
    # The snapshot replayed itself in every phase before packing, and says so.
    assert c.manifest["replay"] == {
        "matches_capture": True,
        "differences": {},
        "note": "replayed by this snapshot before packing, without the daemon's ledger",
    }
    assert c.manifest["capture"]["exec"]["checks"] == statuses(want)
    assert f"verdict {want['verdict']} (exec)" in c.snap.stdout
    assert c.snap.stdout.startswith(f"snapshot {c.archive}: ")


def test_scenarios_cover_each_outcome(captured: Results) -> None:
    def of(name: str) -> dict[str, str]:
        return statuses(captured[name].original.json())

    assert captured["idle"].original.code == 0
    assert of("qemu_td")["guests.td"] == "fail"
    assert of("erratum")["errata.tdx_pw_mce"] == "fail"
    assert of("no_flush")["kernel.cache_flush"] == "fail"
    assert of("fillers")["guests.vm"] == "warn" and of("fillers")["guests.td"] == "fail"
    assert of("odd")["kernel.kexec"] == "unknown"
    kinds = {
        (g["pid"], g["kind"], g["name"]) for g in captured["fillers"].original.json()["guests"]
    }
    assert kinds == {(5000, "vm", "web1"), (6000, "td", "tdweb"), (7000, "td", "cloud-hyperviso")}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_tree_holds_only_vm_holders_proc_entries(captured: Results, name: str) -> None:
    c = captured[name]
    in_fixture = {int(p.name) for p in (c.root / "proc").iterdir() if p.name.isdigit()}
    in_tree = {int(p.name) for p in (c.tree / "proc").iterdir() if p.name.isdigit()}
    assert len(in_fixture) >= len(SCENARIOS[name].holders) + 5  # the fillers were there
    assert in_tree == SCENARIOS[name].holders
    assert c.manifest["vm_holders"] == sorted(SCENARIOS[name].holders)
    for pid in in_tree:
        fd = c.tree / "proc" / str(pid) / "fd"
        # Only KVM descriptors are kept; other links name files the checks never read.
        links = [os.readlink(link) for link in fd.glob("*")]
        assert all(t.startswith(("anon_inode:kvm-", "anon_inode:[kvm-gmem]")) for t in links)


def test_fillers_scanned_through_proc_are_dropped(captured: Results) -> None:
    c = captured["fillers"]
    vm = next(k for k in c.original.json()["checks"] if k["id"] == "guests.vm")
    assert vm["evidence"]["vm_enumeration"] == "proc"  # every filler's fd directory was read
    assert c.manifest["omitted"]["processes_without_vms"] == FILLERS
    fds = sorted(p.name for p in (c.tree / "proc/5000/fd").iterdir())
    assert fds == ["12", "13", "14", "15", "16"]  # the VM, its two vCPUs and their stats


@pytest.mark.parametrize("name", ["qemu_td", "fillers"])
def test_command_lines_are_redacted_by_default(captured: Results, name: str) -> None:
    c = captured[name]
    data = _tree_bytes(c.tree)
    for secret in SCENARIOS[name].secrets:
        assert secret.encode() not in data, secret
        assert secret.encode() in _tree_bytes(c.root)
    assert b"REDACTED" in data
    assert all(count > 0 for count in c.manifest["redaction"]["redacted"].values())
    if name == "qemu_td":
        args = (c.tree / "proc/4242/cmdline").read_bytes().split(b"\0")
        assert args[0] == b"/usr/bin/qemu-system-x86_64"
        assert b"tdx-guest,id=tdx0" in args and b"td1,process=td1,debug-threads=on" in args
    else:
        xml = (c.tree / "run/libvirt/qemu/tdweb.xml").read_text()
        assert 'launchSecurity type="tdx"' in xml and "<name>tdweb</name>" in xml


def test_keep_cmdlines_keeps_them(captured: Results) -> None:
    kept = captured.kept
    original = (captured["qemu_td"].root / "proc/4242/cmdline").read_bytes()
    assert (kept / "proc/4242/cmdline").read_bytes() == original
    manifest = json.loads((kept / "SNAPSHOT.json").read_text())
    assert manifest["redaction"]["command_lines"] == "kept"
    assert manifest["redaction"]["redacted"] == {}


def test_unreadable_and_malformed_reads_stay_so(captured: Results) -> None:
    c = captured["odd"]
    # A file that could not be read is a directory in the tree: still an I/O error, never a pass.
    assert (c.tree / "sys/kernel/kexec_loaded").is_dir()
    assert (c.tree / "dev/cpu/2/msr").is_dir()
    assert os.path.getsize(c.tree / "dev/cpu/3/msr") == 0x87 + 8
    paths = {u["path"] for u in c.manifest["unreproducible"]}
    assert any(p.endswith("sys/kernel/kexec_loaded") for p in paths)
    assert any(p.endswith("dev/cpu/2/msr") for p in paths)
    # Malformed content is copied byte for byte; an over-cap file keeps cap+1 bytes.
    misc = "sys/fs/cgroup/misc.current"
    assert (c.tree / misc).read_bytes() == (c.root / misc).read_bytes() == b"tdx \xff\n"
    assert os.path.getsize(c.tree / "sys/module/kvm_intel/parameters/tdx") == 4097
    assert any("kvm_intel/parameters/tdx: larger than" in n for n in c.manifest["notes"])
    summary = c.original.json()["checks"]
    assert [k["status"] for k in summary if k["id"] == "kexec.image"] == ["unknown"]


def test_kallsyms_is_reduced_to_the_symbols_found(captured: Results) -> None:
    found = (captured["idle"].tree / "proc/kallsyms").read_text().splitlines()
    assert found == [
        "0000000000000000 T _stext",
        "ffffffffffffffff T tdx_cpu_flush_cache_for_kexec",
    ]
    # Nothing found still reads as a file read to its end, not an empty (malformed) one.
    assert (
        captured["no_flush"].tree / "proc/kallsyms"
    ).read_text() == "0000000000000000 T _stext\n"


def test_a_snapshot_of_a_snapshot_keeps_the_verdict(captured: Results) -> None:
    manifest = json.loads((captured.again / "SNAPSHOT.json").read_text())
    first = captured["fillers"].manifest
    assert manifest["capture"] == first["capture"]
    assert manifest["replay"]["matches_capture"] is True
    assert manifest["source_root"].endswith("fillers/snap.tar.gz")


def test_archive_members_are_root_owned_and_relative(captured: Results) -> None:
    with tarfile.open(captured["qemu_td"].archive, "r:gz") as tar:
        members = tar.getmembers()
    assert members and all(m.uid == 0 and m.gid == 0 for m in members)
    assert not any(m.name.startswith("/") or ".." in m.name.split("/") for m in members)
    assert "SNAPSHOT.json" in {m.name for m in members}
    # The only links are the VM holder's KVM descriptors (the /proc half of enumeration).
    assert {(m.name, m.linkname) for m in members if m.issym()} == {
        ("proc/4242/fd/12", "anon_inode:kvm-vm"),
        ("proc/4242/fd/13", "anon_inode:kvm-vcpu:0"),
        ("proc/4242/fd/14", "anon_inode:kvm-vcpu:1"),
        ("proc/4242/fd/15", "anon_inode:kvm-vcpu-stats:0"),
        ("proc/4242/fd/16", "anon_inode:kvm-vcpu-stats:1"),
    }


def test_snapshot_of_this_machine_replays_the_live_verdict(tmp_path: Path) -> None:
    out = tmp_path / "live.tar.gz"
    snap, live = _run_all([("snapshot", str(out)), ("check", "--format", "json")])
    assert snap.code == 0, snap.stderr
    replayed = run_cli("check", "--root", str(out), "--format", "json")
    manifest = json.loads(_member(out, "SNAPSHOT.json"))
    got, want = replayed.json(), live.json()
    # Against the capture itself (the same instant) everything must match.
    assert manifest["live"] is True
    assert statuses(got) == manifest["capture"]["exec"]["checks"]
    assert got["verdict"] == manifest["capture"]["exec"]["verdict"]
    assert manifest["replay"]["matches_capture"] is True
    # Against a separate `check` run beside it: VMs are the volatile part (other tests create
    # real KVM VMs on this machine), so the guests.* checks are compared only when both runs
    # saw the same VMs; everything else the two read is stable.
    volatile = {"guests.td", "guests.teardown", "guests.vm"}
    same_vms = [(g["pid"], g["kind"], g["name"]) for g in want["guests"]] == [
        (g["pid"], g["kind"], g["name"]) for g in manifest["guests"]
    ]
    for cid, status in statuses(want).items():
        if same_vms or cid not in volatile:
            assert statuses(got)[cid] == status, cid
    if same_vms:
        assert replayed.code == live.code and got["verdict"] == want["verdict"]
    assert got["host"]["kernel_release"] == want["host"]["kernel_release"]


def _member(archive: Path, name: str) -> str:
    with tarfile.open(archive, "r:gz") as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read().decode()


def _archive(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("proc/cpuinfo")
        ok.size = 4
        tar.addfile(ok, io.BytesIO(b"x\n\n\n"))
        for m in members:
            tar.addfile(m, io.BytesIO(b"pwned\n") if m.isreg() else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.size = 6
    return m


def _link(name: str, target: str) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = tarfile.SYMTYPE
    m.linkname = target
    return m


def test_malicious_archives_are_refused(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    absolute = tmp_path / "abs-escape"
    cases = {
        "dotdot": [_file("../escape")],
        "deep-dotdot": [_file("proc/../../escape")],
        "absolute": [_file(str(absolute))],
        "link-out": [_link("sys", "../../outside"), _file("sys/escape")],
        "link-absolute": [_link("sys", str(tmp_path))],
        "device": [_chr("dev/kmsg")],
    }
    archives = [_archive(inbox / f"{name}.tar.gz", m) for name, m in cases.items()]
    (inbox / "garbage.tgz").write_bytes(b"not a gzip stream")
    archives.append(inbox / "garbage.tgz")
    runs = _run_all([("check", "--root", str(a)) for a in archives], {"TMPDIR": str(tmpdir)})
    for archive, run in zip(archives, runs, strict=True):
        assert run.code == 2, (archive.name, run.stdout, run.stderr)
        assert f"bad snapshot archive {archive}" in run.stderr
    assert os.listdir(tmpdir) == []  # the partial extraction is gone too
    assert not absolute.exists()
    leftovers = {p.name for p in tmp_path.rglob("*")} - {"tmp", "inbox"}
    assert leftovers == {a.name for a in archives}


def _chr(name: str) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = tarfile.CHRTYPE
    m.devmajor, m.devminor = 1, 11
    return m


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    root = build(tmp_path / "root", tdx_host(other_processes=0))
    (tmp_path / "dir.tar.gz").mkdir()
    runs = _run_all(
        [
            ("snapshot", str(tmp_path / "out.zip"), "--root", str(root)),
            ("snapshot", str(tmp_path / "missing" / "out.tar.gz"), "--root", str(root)),
            ("snapshot", str(tmp_path / "dir.tar.gz"), "--root", str(root)),
            ("snapshot", str(tmp_path / "out.tar.gz"), "--root", str(tmp_path / "nope")),
        ]
    )
    assert [r.code for r in runs] == [2, 2, 2, 2], [r.stderr for r in runs]
    assert ".tar.gz" in runs[0].stderr and "missing" in runs[1].stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.tar.gz", "root"]


def test_a_failed_msr_below_a_value_stays_failed(tmp_path: Path) -> None:
    """A file reads short only past its end: values above a failed MSR are left out.

    A fixture file cannot fail below a value (it reads zeros there), so this one case is
    planned from recorded results directly.
    """
    from tdx_preflight.facts import gather
    from tdx_preflight.host import Host, Problem
    from tdx_preflight.snapshot import RecordingHost, plan_tree

    with RecordingHost(build(tmp_path / "root", tdx_host(other_processes=0))) as rec:
        facts = gather(rec, load_msr_module="never")
    eio = Problem("io", "/dev/cpu/1/msr @0x87", "the CPU does not implement this MSR (EIO)")
    rec.msrs[1] = {0x87: eio, 0x981: eio, 0x982: 7, 0x1401: 9}
    plan, info = plan_tree(rec, facts, keep_cmdlines=False)
    assert plan.nodes["dev/cpu/1/msr"].data == {}
    assert any("cpu 1: MSR 0x982, 0x1401 left out" in n for n in info.notes)
    # 0x981 never comes from a file (its slot overlaps 0x982's): written only without 0x982.
    assert set(plan.nodes["dev/cpu/0/msr"].data) == {0x87, 0x982, 0x1401}
    plan.write(str(tmp_path / "tree"))
    with Host(tmp_path / "tree") as host:
        assert isinstance(host.read_msr(1, 0x87), Problem)
        assert isinstance(host.read_msr(1, 0x1401), Problem)
        assert host.read_msr(0, 0x1401) == facts.msrs.readings[0x1401].values[0]
