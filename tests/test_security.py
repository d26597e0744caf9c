"""Security properties, checked on the code and on real runs.

- No code path opens an MSR device (or anything under a host root) for writing.
- No shell runs with input the tool read: no shell=True, os.system or os.popen.
- Reads never follow a path out of the root, and nothing is written under it.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import console_script, run_cli
from hostbuilder import VmProc, build, qemu_td_cmdline, tdx_host

PACKAGE = Path(__file__).parent.parent / "tdx_preflight"
#: Modules that read the host root; everything that writes lives elsewhere.
READERS = [*sorted((PACKAGE / "host").glob("*.py")), *sorted((PACKAGE / "readers").glob("*.py"))]
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"}


def _calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    f = call.func
    if isinstance(f, ast.Attribute):
        base = f.value.id if isinstance(f.value, ast.Name) else "?"
        return f"{base}.{f.attr}"
    return f.id if isinstance(f, ast.Name) else "?"


def test_readers_open_nothing_for_writing() -> None:
    opens = 0
    for path in READERS:
        for call in _calls(path):
            name = _name(call)
            if name.endswith("._open") or name == "os.open" or name.endswith(".open"):
                opens += 1
                flags = {
                    n.attr for a in call.args for n in ast.walk(a) if isinstance(n, ast.Attribute)
                }
                flags |= {n.id for a in call.args for n in ast.walk(a) if isinstance(n, ast.Name)}
                assert not flags & WRITE_FLAGS, f"{path.name}:{call.lineno} opens for writing"
            assert name not in ("builtins.open", "open"), f"{path.name}:{call.lineno} uses open()"
    assert opens >= 5  # the scan did find the open calls


def test_no_shell_anywhere() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in _calls(path):
            name = _name(call)
            assert name not in ("os.system", "os.popen", "eval", "exec"), f"{path}:{call.lineno}"
            for kw in call.keywords:
                if kw.arg == "shell":
                    assert isinstance(kw.value, ast.Constant) and kw.value.value is False, (
                        f"{path}:{call.lineno} runs a shell"
                    )


def _tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                val = "link:" + os.readlink(p)
            elif p.is_file():
                val = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                val = "dir"
            out[str(p.relative_to(root))] = f"{val}:{st.st_mode:o}:{st.st_mtime_ns}"
    return out


def test_nothing_is_written_under_the_root(tmp_path: Path) -> None:
    td = VmProc(pid=4242, cmdline=qemu_td_cmdline("td1"), misc_tdx=1)
    root = build(tmp_path / "root", tdx_host(processes=[td], misc_current={"tdx": 1}))
    before = _tree_digest(root)
    for args in (["check"], ["guests"], ["hook", "--root", str(root), "exec"]):
        run = run_cli(*args, *(["--root", str(root)] if args[0] != "hook" else []))
        assert run.code in (0, 1, 3)
    assert run_cli("snapshot", str(tmp_path / "s.tar.gz"), "--root", str(root)).code == 0
    assert _tree_digest(root) == before


@pytest.mark.skipif(not shutil.which("strace"), reason="strace is not installed")
def test_traced_check_never_opens_for_writing_or_leaves_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "bait").write_text("ffffffff81000000 T tdx_cpu_flush_cache_for_kexec\n")
    spec = tdx_host(kallsyms=None)
    root = build(tmp_path / "root", spec)
    os.symlink(str(outside / "bait"), root / "proc/kallsyms")  # absolute: resolves in the root
    os.symlink("../../../outside/bait", root / "boot/config-bait")
    proc, lines = _trace(tmp_path, "check", "--root", str(root), "--format", "json")
    assert proc.returncode in (0, 1, 3), proc.stderr
    import json

    report = json.loads(proc.stdout)
    flush = next(c for c in report["checks"] if c["id"] == "kernel.cache_flush")
    assert "kallsyms names" not in flush["summary"]  # the bait outside was not read
    opened_root = 0
    for line in lines:
        m = re.search(r'open(?:at2?)?\((?:[^,]+, )?"([^"]*)", ([^)]*)', line)
        if not m:
            continue
        path, flags = m.group(1), m.group(2)
        assert "outside/bait" not in path, line
        under_root = path.startswith(str(root)) or not path.startswith("/")
        if under_root and ("proc/" in path or "sys/" in path or "dev/" in path):
            opened_root += 1
        if "/dev/cpu/" in path or under_root:
            assert not re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", flags), line
    assert opened_root > 10  # the trace did see the reads


@pytest.mark.skipif(not shutil.which("strace"), reason="strace is not installed")
def test_live_check_opens_msr_devices_read_only(tmp_path: Path) -> None:
    _, lines = _trace(tmp_path, "check", "--format", "json")
    assert any("/proc/cpuinfo" in line for line in lines)  # the trace did see the reads
    for line in lines:
        if "/dev/cpu/" in line or "/dev/kmsg" in line or "/sys/" in line or "/proc/" in line:
            assert not re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", line), line


def _trace(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the installed CLI under strace; its result and the traced open calls."""
    log = tmp_path / "strace.log"
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(log),
         console_script(), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return proc, log.read_text().splitlines()
