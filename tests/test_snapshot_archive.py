"""A snapshot archive is read whole or refused, and a replay is never more permissive.

DESIGN.md, "Snapshots": every tar header and the gzip trailer verified, member count
and size bounded before anything is written, the extraction removed on every exit
(signals included), and what could not be read at capture unreadable at replay.
Each archive here is a real snapshot (or one built like it), given to the real CLI.
"""

from __future__ import annotations

import ctypes
import gzip
import io
import json
import os
import signal
import struct
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from conftest import console_script, run_cli, statuses
from hostbuilder import build, tdx_host

from tdx_preflight.snapshot import MAX_BYTES, MAX_MEMBERS


def _snapshot(tmp_path: Path) -> Path:
    root = build(tmp_path / "root", tdx_host(other_processes=0))
    out = tmp_path / "snap.tar.gz"
    run = run_cli("snapshot", str(out), "--root", str(root))
    assert run.code == 0, run.stderr
    return out


def _replay(archive: Path, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    """`check --root ARCHIVE` with its own TMPDIR, so that what it leaves behind shows."""
    tmpdir.mkdir(exist_ok=True)
    return subprocess.run(
        [console_script(), "check", "--root", str(archive)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmpdir)},
        stdin=subprocess.DEVNULL,
    )


def _refused(archive: Path, tmpdir: Path, words: str) -> None:
    run = _replay(archive, tmpdir)
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert f"bad snapshot archive {archive}" in run.stderr and words in run.stderr, run.stderr
    assert run.stdout == "" and os.listdir(tmpdir) == []


def test_the_unaltered_snapshot_replays(tmp_path: Path) -> None:
    run = _replay(_snapshot(tmp_path), tmp_path / "tmp")
    assert run.returncode == 0, run.stderr
    assert os.listdir(tmp_path / "tmp") == []


def test_a_corrupt_header_in_the_middle_is_refused(tmp_path: Path) -> None:
    good = _snapshot(tmp_path)
    raw = bytearray(gzip.decompress(good.read_bytes()))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
        members = tar.getmembers()
    middle = members[len(members) // 2]
    raw[middle.offset] ^= 0x20  # its checksum no longer matches: tarfile stops there
    bad = tmp_path / "corrupt.tar.gz"
    bad.write_bytes(gzip.compress(bytes(raw)))
    _refused(bad, tmp_path / "tmp", "does not parse")
    # Data where the end-of-archive blocks belong is refused the same way.
    end = bytearray(gzip.decompress(good.read_bytes()))
    last = members[-1]
    tail = last.offset_data + -(-last.size // 512) * 512
    end[tail : tail + 6] = b"extra\n"
    (tmp_path / "tail.tar.gz").write_bytes(gzip.compress(bytes(end)))
    _refused(tmp_path / "tail.tar.gz", tmp_path / "tmp", "does not parse")


@pytest.mark.parametrize(("field", "words"), [(-8, "CRC check failed"), (-4, "length")])
def test_the_gzip_trailer_is_verified(tmp_path: Path, field: int, words: str) -> None:
    data = bytearray(_snapshot(tmp_path).read_bytes())
    value = struct.unpack_from("<I", data, len(data) + field)[0]
    struct.pack_into("<I", data, len(data) + field, value ^ 1)
    bad = tmp_path / "trailer.tar.gz"
    bad.write_bytes(bytes(data))
    _refused(bad, tmp_path / "tmp", words)


def _empty_members(count: int) -> bytes:
    """A tar stream of `count` empty files: one ustar header, its name and checksum varied
    (tarfile's own writer takes seconds for a few hundred thousand)."""
    template = bytearray(tarfile.TarInfo("x").tobuf(tarfile.USTAR_FORMAT))
    template[0:100] = bytes(100)
    template[148:156] = b" " * 8
    base = sum(template)
    out = io.BytesIO()
    for i in range(count):
        name = b"f/%d" % i
        template[0:100] = name.ljust(100, b"\0")
        template[148:156] = b"%06o\0 " % (base + sum(name))
        out.write(template)
        template[148:156] = b" " * 8
    out.write(bytes(1024))
    return out.getvalue()


def test_a_member_count_bomb_is_refused_quickly(tmp_path: Path) -> None:
    # 200,000 members in about a megabyte took minutes to extract.
    assert MAX_MEMBERS < 200_000
    bomb = tmp_path / "count.tar.gz"
    bomb.write_bytes(gzip.compress(_empty_members(200_000)))
    assert bomb.stat().st_size < 2 << 20
    started = time.monotonic()
    _refused(bomb, tmp_path / "tmp", "larger than any snapshot")
    assert time.monotonic() - started < 30  # refused from headers: nothing extracted


def test_a_size_bomb_is_refused_before_it_is_decompressed(tmp_path: Path) -> None:
    # One member of 1.9 GiB of zeros in 2 MB of gzip: a stream of gzip members, each
    # 1 MiB of zeros (the gzip module reads them as one stream).
    member = tarfile.TarInfo("proc/cpuinfo")
    member.size = 1900 << 20
    assert member.size > MAX_BYTES
    mib = gzip.compress(bytes(1 << 20), compresslevel=9)
    bomb = tmp_path / "size.tar.gz"
    with open(bomb, "wb") as out:
        out.write(gzip.compress(member.tobuf(tarfile.USTAR_FORMAT)))
        for _ in range(member.size >> 20):
            out.write(mib)
        out.write(gzip.compress(bytes(1024)))  # end-of-archive
    assert bomb.stat().st_size < 2_100_000
    started = time.monotonic()
    _refused(bomb, tmp_path / "tmp", "larger than any snapshot")
    assert time.monotonic() - started < 30


def test_sigterm_during_extraction_removes_the_tree(tmp_path: Path) -> None:
    """A real snapshot plus many small members (allowed), so extraction takes a while:
    SIGTERM is sent once files appear in the extraction directory."""
    root = build(tmp_path / "root", tdx_host(other_processes=0))
    archive = tmp_path / "big.tar.gz"
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
        for i in range(20_000):
            tar.addfile(tarfile.TarInfo(f"filler/{i}"))
    archive.write_bytes(gzip.compress(stream.getvalue(), compresslevel=1))
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen(
        [console_script(), "check", "--root", str(archive)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )
    deadline = time.monotonic() + 60
    extracting = False
    while not extracting and proc.poll() is None and time.monotonic() < deadline:
        for name in os.listdir(tmpdir):
            if name.startswith("tdx-preflight-root-"):
                extracting = bool(os.listdir(tmpdir / name))
        time.sleep(0.001)
    assert extracting, "the extraction never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, err)  # killed mid-way
    assert os.listdir(tmpdir) == []


def _without_dac_override() -> None:
    """In the child before exec: drop the capabilities that let root ignore file modes."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for cap in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _as_unprivileged(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        preexec_fn=_without_dac_override,
    )


def test_what_the_capture_could_not_read_stays_unreadable(tmp_path: Path) -> None:
    """A process whose descriptors cannot be listed makes VM enumeration incomplete; with
    no misc counts (a vendor kernel before 6.16) that leaves guests.* unknown: exit 3.
    A replay that drops the process would find enumeration complete and allow."""
    spec = tdx_host(debugfs_kvm=False, misc_capacity={}, misc_current={}, other_processes=3)
    root = build(tmp_path / "root", spec)
    pid = min(int(p) for p in os.listdir(root / "proc") if p.isdigit())
    os.chmod(root / f"proc/{pid}/fd", 0)
    out = tmp_path / "snap.tar.gz"
    capture = _as_unprivileged("check", "--root", str(root), "--format", "json")
    assert capture.returncode == 3, capture.stderr
    snap = _as_unprivileged("snapshot", str(out), "--root", str(root))
    assert snap.returncode == 0, snap.stderr
    os.chmod(root / f"proc/{pid}/fd", 0o755)
    assert run_cli("check", "--root", str(root)).code == 0  # readable, the host allows

    with tarfile.open(out, "r:gz") as tar:
        f = tar.extractfile("SNAPSHOT.json")
        assert f is not None
        manifest = json.loads(f.read())
    [entry] = [u for u in manifest["unreadable"] if u["path"] == f"proc/{pid}/fd"]
    assert entry["kind"] == "permission" and entry["read"] == "list"
    assert manifest["capture"]["exec"]["exit_code"] == 3
    assert manifest["replay"]["matches_capture"] is True, manifest["replay"]

    want = json.loads(capture.stdout)
    tree = tmp_path / "tree"
    with tarfile.open(out, "r:gz") as tar:
        tar.extractall(tree, filter="data")
    for replay_root in (out, tree):
        run = run_cli("check", "--root", str(replay_root), "--format", "json")
        assert run.code == 3, (replay_root, run.stderr)
        got = run.json()
        assert statuses(got) == statuses(want)
        assert got["verdict"] == "block"
    # A snapshot of the snapshot keeps the read unreadable.
    again = tmp_path / "again.tar.gz"
    assert run_cli("snapshot", str(again), "--root", str(out)).code == 0
    assert run_cli("check", "--root", str(again)).code == 3


def test_a_manifest_that_does_not_parse_is_refused(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    with tarfile.open(_snapshot(tmp_path), "r:gz") as tar:
        tar.extractall(tree, filter="data")
    manifest = json.loads((tree / "SNAPSHOT.json").read_text())
    manifest["unreadable"] = [{"path": "proc/cpuinfo", "kind": "fine", "detail": "x"}]
    (tree / "SNAPSHOT.json").write_text(json.dumps(manifest))
    run = run_cli("check", "--root", str(tree))
    assert run.code == 2 and "bad 'unreadable' list" in run.stderr
    manifest["unreadable"] = [{"path": "proc/cpuinfo", "kind": "io", "detail": "EIO"}]
    (tree / "SNAPSHOT.json").write_text(json.dumps(manifest))
    run = run_cli("check", "--root", str(tree), "--format", "json")
    assert run.code == 3 and statuses(run.json())["platform.cpu"] == "unknown"


def _with_extra_member(archive: Path, out: Path, *extra: tuple[tarfile.TarInfo, bytes]) -> Path:
    """The snapshot's members again, then `extra` ones (before the end-of-archive blocks)."""
    with tarfile.open(archive, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
        for info, data in extra:
            info.size = len(data) if info.isreg() else 0
            dst.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out


@pytest.mark.parametrize(
    "alias", ["./proc/cmdline", "proc//cmdline", "proc/./cmdline", "p/cmdline"]
)
def test_a_member_named_twice_in_another_spelling_is_refused(tmp_path: Path, alias: str) -> None:
    archive = _snapshot(tmp_path)
    extra: list[tuple[tarfile.TarInfo, bytes]] = []
    if alias.startswith("p/"):
        link = tarfile.TarInfo("p")
        link.type, link.linkname = tarfile.SYMTYPE, "proc"
        extra.append((link, b""))
    extra.append((tarfile.TarInfo(alias), b"quiet\n"))
    bad = _with_extra_member(archive, tmp_path / "alias.tar.gz", *extra)
    words = "below a symlink" if alias.startswith("p/") else "not a plain relative path"
    _refused(bad, tmp_path / "tmp", words)
