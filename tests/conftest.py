"""Shared test helpers: the installed console script as a subprocess (whose JSON output is
validated against the shipped schema), KVM holders."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent


def console_script() -> str:
    """The `tdx-preflight` that pip installed next to this interpreter."""
    beside = Path(sys.executable).parent / "tdx-preflight"
    if beside.exists():
        return str(beside)
    found = shutil.which("tdx-preflight")
    if not found:
        pytest.fail("the tdx-preflight console script is not installed (pip install -e .)")
    return found


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        return json.loads(self.stdout)


#: Which shipped schema a command's --format json output follows.
SCHEMA_OF = {"check": "report", "hook": "report", "exec": "report"} | {
    name: name for name in ("guests", "status")
}


@functools.cache
def schema_validator(name: str) -> Any:
    """A validator for tdx_preflight/schema/NAME.schema.json, the others registered for $ref."""
    import jsonschema
    from referencing import Registry, Resource

    from tdx_preflight import schema

    docs = {n: schema.load(n) for n in schema.NAMES}
    registry = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc)) for doc in docs.values()
    )
    cls = jsonschema.validators.validator_for(docs[name])
    cls.check_schema(docs[name])
    return cls(docs[name], registry=registry)


def schema_errors(name: str, document: Any) -> list[str]:
    """Every way `document` departs from schema `name`, one line each (empty: it conforms)."""
    found = schema_validator(name).iter_errors(document)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:300]}" for e in found]


def _validate_output(args: tuple[str, ...], stdout: str) -> None:
    """A command's stdout that is a JSON object must follow the command's schema."""
    name = SCHEMA_OF.get(args[0]) if args else None
    if name is None or not stdout.lstrip().startswith("{"):
        return
    try:
        document = json.loads(stdout)
    except ValueError:
        return
    errors = schema_errors(name, document)
    if errors:
        pytest.fail(
            f"tdx-preflight {' '.join(args)}: output does not follow {name}.schema.json:\n"
            + "\n".join(errors[:20])
        )


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path | None = None
) -> Run:
    """The console script as a subprocess; JSON it prints is checked against its schema."""
    proc = subprocess.run(
        [console_script(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )
    _validate_output(args, proc.stdout)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {c["id"]: c["status"] for c in report["checks"]}


@pytest.fixture
def cli() -> Any:
    return run_cli


def kvm_usable() -> str | None:
    """None when /dev/kvm can create VMs here, else the reason it cannot."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is absent on this machine"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


class KvmHolder:
    """A child process holding real KVM VMs (tests/kvm_holder.py)."""

    def __init__(
        self, *args: str, count: int = 1, thread: bool = False, hold_thread: bool = False
    ) -> None:
        cmd = [sys.executable, str(HERE / "kvm_holder.py"), "--count", str(count)]
        if thread:
            cmd.append("--hold-thread" if hold_thread else "--thread")
        self.proc = subprocess.Popen(
            [*cmd, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5)
            raise RuntimeError("kvm_holder did not start")
        info = json.loads(line)
        self.pid: int = info["pid"]
        self.tid: int = info["tid"]
        self.fds: list[int] = info["fds"]

    def command(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close_vms(self) -> None:
        self.command("close")
        self.fds = []

    def close_vm(self, fd: int) -> None:
        """Destroy the one VM held by descriptor `fd`."""
        self.command(f"close {fd}")
        self.fds.remove(fd)

    def burst(self, n: int, keep: int) -> list[int]:
        """Create n VMs as fast as possible, destroy all but the last `keep`."""
        kept = self.command(f"burst {n} {keep}")["kept"]
        self.fds.extend(kept)
        return kept

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def kvm_holder() -> Iterator[Any]:
    reason = kvm_usable()
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    holders: list[KvmHolder] = []

    def start(
        *args: str, count: int = 1, thread: bool = False, hold_thread: bool = False
    ) -> KvmHolder:
        h = KvmHolder(*args, count=count, thread=thread, hold_thread=hold_thread)
        holders.append(h)
        return h

    yield start
    for h in holders:
        h.stop()
