"""Host: typed outcomes, bounded and non-blocking reads, never leaving the root."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tdx_preflight.host import CHUNK, Host, Problem


def _write(root: Path, rel: str, data: bytes | str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def test_value_absent_and_malformed(tmp_path: Path) -> None:
    _write(tmp_path, "sys/kernel/kexec_loaded", "1\n")
    _write(tmp_path, "sys/kernel/kexec_crash_size", "lots\n")
    _write(tmp_path, "sys/kernel/empty", "")
    host = Host(tmp_path)
    assert host.read_int("sys/kernel/kexec_loaded") == 1
    missing = host.read_int("sys/kernel/kexec_crash_loaded")
    assert isinstance(missing, Problem) and missing.kind == "absent"
    bad = host.read_int("sys/kernel/kexec_crash_size")
    assert isinstance(bad, Problem) and bad.kind == "malformed" and "lots" in bad.detail
    empty = host.read_value("sys/kernel/empty")
    assert isinstance(empty, Problem) and empty.kind == "malformed"


def test_non_utf8_is_malformed(tmp_path: Path) -> None:
    _write(tmp_path, "proc/sys/kernel/osrelease", b"6.18\xff\n")
    result = Host(tmp_path).read_text("proc/sys/kernel/osrelease")
    assert isinstance(result, Problem) and result.kind == "malformed"


def test_fifo_and_directory_do_not_hang(tmp_path: Path) -> None:
    (tmp_path / "sys/kernel").mkdir(parents=True)
    os.mkfifo(tmp_path / "sys/kernel/kexec_loaded")
    (tmp_path / "sys/kernel/kexec_crash_size").mkdir()
    host = Host(tmp_path)
    start = time.monotonic()
    fifo = host.read_int("sys/kernel/kexec_loaded")
    folder = host.read_int("sys/kernel/kexec_crash_size")
    assert time.monotonic() - start < 2
    assert isinstance(fifo, Problem) and fifo.kind == "io" and "FIFO" in fifo.detail
    assert isinstance(folder, Problem) and folder.kind == "io" and "directory" in folder.detail


def test_huge_sparse_file_is_read_bounded(tmp_path: Path) -> None:
    p = _write(tmp_path, "proc/cpuinfo", b"")
    with open(p, "r+b") as f:
        f.truncate(1 << 30)
    start = time.monotonic()
    result = Host(tmp_path).read_bytes("proc/cpuinfo", 4 << 20)
    assert time.monotonic() - start < 2
    assert isinstance(result, Problem) and result.kind == "malformed"
    assert "larger than" in result.detail


def test_symlinks_never_leave_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _write(outside, "secret", "1\n")
    root = tmp_path / "root"
    (root / "sys/kernel").mkdir(parents=True)
    os.symlink(outside / "secret", root / "sys/kernel/kexec_loaded")  # absolute
    os.symlink("../../../outside/secret", root / "sys/kernel/kexec_crash_loaded")  # relative
    _write(root, "real/value", "0\n")
    os.symlink("/real/value", root / "sys/kernel/kexec_crash_size")  # absolute, inside
    host = Host(root)
    for rel in ("sys/kernel/kexec_loaded", "sys/kernel/kexec_crash_loaded"):
        result = host.read_int(rel)
        assert isinstance(result, Problem), rel
    # An absolute link in a snapshot means the snapshot's own path.
    assert host.read_int("sys/kernel/kexec_crash_size") == 0


def test_listdir_and_readlink(tmp_path: Path) -> None:
    (tmp_path / "proc/42/fd").mkdir(parents=True)
    os.symlink("anon_inode:kvm-vm", tmp_path / "proc/42/fd/12")
    host = Host(tmp_path)
    assert host.listdir("proc/42/fd") == ["12"]
    assert host.readlink("proc/42/fd/12") == "anon_inode:kvm-vm"
    assert host.exists("proc/42/fd/12") and not host.exists("proc/43")
    gone = host.readlink("proc/43/fd/1")
    assert isinstance(gone, Problem) and gone.kind == "absent"


def test_msr_sparse_file_and_short_read(tmp_path: Path) -> None:
    p = _write(tmp_path, "dev/cpu/0/msr", b"")
    with open(p, "r+b") as f:
        f.seek(0x87)
        f.write((0x0000003F00000000).to_bytes(8, "little"))
    host = Host(tmp_path)
    assert host.read_msr(0, 0x87) == 0x3F00000000
    short = host.read_msr(0, 0x1401)
    assert isinstance(short, Problem) and short.kind == "io" and "short read" in short.detail
    absent = host.read_msr(1, 0x87)
    assert isinstance(absent, Problem) and absent.kind == "absent"
    host.close()


def test_msr_device_opened_read_only(tmp_path: Path) -> None:
    p = _write(tmp_path, "dev/cpu/0/msr", b"\0" * 0x90)
    host = Host(tmp_path)
    host.read_msr(0, 0x80)
    fd = host._msr_fds[0]
    assert isinstance(fd, int)
    flags = int(Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
    assert flags & os.O_ACCMODE == os.O_RDONLY
    host.close()
    assert p.read_bytes() == b"\0" * 0x90


def test_kallsyms_whole_symbol_across_chunk_boundary(tmp_path: Path) -> None:
    line = b"ffffffff81000000 T some_symbol_name\n"
    filler = line * (CHUNK // len(line))
    # Put the wanted symbol so that it straddles the first chunk boundary.
    pad = CHUNK - len(filler) - 10
    blob = filler + b"x" * pad + b"\nffffffff81000000 T tdx_cpu_flush_cache_for_kexec\n"
    blob += b"ffffffff81000000 t tdx_cpu_flush_cache_helper\n"
    _write(tmp_path, "proc/kallsyms", blob)
    found = Host(tmp_path).find_symbols(
        "proc/kallsyms", ["tdx_cpu_flush_cache_for_kexec", "tdx_cpu_flush_cache"]
    )
    assert found == {"tdx_cpu_flush_cache_for_kexec"}


@pytest.mark.skipif(not os.path.exists("/proc/kallsyms"), reason="kernel without CONFIG_KALLSYMS")
def test_the_live_kallsyms_scan_agrees_with_a_plain_parse() -> None:
    """/proc/kallsyms is a seq_file: each read gives at most a page, and the read that
    fills a chunk asks for less, so a chunk can end inside a line. The scan must name
    exactly what a plain parse of the same file names, at every chunk boundary."""
    data = Path("/proc/kallsyms").read_bytes()
    assert len(data) > CHUNK, "a kallsyms smaller than one chunk tests no boundary"
    lines = data.splitlines(keepends=True)
    starts = [0, *itertools.accumulate(map(len, lines))]
    picked: set[int] = {0, len(starts) - 2}  # the first and the last line
    line = 0
    for boundary in range(CHUNK, len(data), CHUNK):
        while starts[line + 1] <= boundary:
            line += 1
        picked.update(range(max(0, line - 2), min(len(starts) - 1, line + 3)))
    names = {lines[n].split()[2].decode() for n in picked}
    whole = {fields[2].decode() for fields in map(bytes.split, lines)}
    prefixes = {n[:-1] for n in names if len(n) > 1} - whole  # never whole symbols
    wanted = names | prefixes | {"tdx_preflight_no_such_symbol"}
    found = Host("/").find_symbols("proc/kallsyms", wanted)
    assert found == names, sorted(found ^ names)[:10]


def test_kallsyms_module_symbol_and_no_trailing_newline(tmp_path: Path) -> None:
    _write(tmp_path, "proc/kallsyms", "0 t tdx_sys_disable\t[kvm_intel]\n0 T tdx_cpu_flush_cache")
    found = Host(tmp_path).find_symbols(
        "proc/kallsyms", ["tdx_sys_disable", "tdx_cpu_flush_cache", "tdx_cpu"]
    )
    assert found == {"tdx_sys_disable", "tdx_cpu_flush_cache"}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_permission_denied_is_typed(tmp_path: Path) -> None:
    secret = _write(tmp_path, "proc/kallsyms", "0 T tdx_cpu_flush_cache\n")
    secret.chmod(0o600)
    tmp_path.chmod(0o755)
    code = (
        "import sys; from tdx_preflight.host import Host, Problem;"
        f"r = Host({str(tmp_path)!r}).read_text('proc/kallsyms');"
        "print(r.kind if isinstance(r, Problem) else 'read')"
    )
    src = str(Path(__file__).parent.parent)
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": src},
        timeout=30,
    )
    assert proc.stdout.strip() == "permission", proc.stderr


def test_a_walk_through_dotdot_that_races_a_rename_is_retried(tmp_path: Path) -> None:
    """openat2 RESOLVE_IN_ROOT fails with EAGAIN when a rename anywhere on the machine
    races with a `..` step (sys/class/firmware/tdx_module -> ../../devices/...): the
    read is retried, never reported as unreadable."""
    import ctypes
    import errno

    dev = tmp_path / "sys/devices/faux/tdx_host/firmware/tdx_module"
    dev.mkdir(parents=True)
    (dev / "status").write_text("idle\n")
    (tmp_path / "sys/class/firmware").mkdir(parents=True)
    os.symlink(
        "../../devices/faux/tdx_host/firmware/tdx_module",
        tmp_path / "sys/class/firmware/tdx_module",
    )
    with Host(tmp_path) as host:
        assert host.read_value("sys/class/firmware/tdx_module/status") == "idle"
        if host._openat2 is None:
            pytest.skip("no openat2 on this kernel")
        real, raced = host._openat2._syscall, [0]

        def racing(*args: object) -> int:
            if raced[0] < 3:
                raced[0] += 1
                ctypes.set_errno(errno.EAGAIN)
                return -1
            return real(*args)

        host._openat2._syscall = racing
        assert host.read_value("sys/class/firmware/tdx_module/status") == "idle"
        assert raced[0] == 3
