"""state.json: written atomically by the daemon, judged for freshness by readers."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from typing import Any

SCHEMA = 1


def write_atomic(path: str, data: dict[str, Any], mode: int = 0o644) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place.

    A reader sees the old file or the new one, never a half-written one.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
    try:
        # One json.dumps: json.dump streams through the pure-Python encoder, 4x slower.
        text = json.dumps(data, separators=(",", ":"), default=str) + "\n"
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(path: str, max_age: float, current_boot_id: str | None) -> tuple[dict | None, str]:
    """The state file's content and "fresh", or None and why it cannot be used."""
    try:
        with open(path, "rb") as f:
            raw = f.read(64 * 1024 * 1024)
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except OSError as exc:
        return None, f"{path}: {exc.strerror}"
    try:
        data = json.loads(raw)
    except ValueError:
        return None, f"{path} is not JSON"
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return None, f"{path}: unknown schema"
    if current_boot_id and data.get("boot_id") != current_boot_id:
        return None, f"{path} is from another boot"
    pid = data.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid):
        return None, f"{path}: its daemon (pid {pid}) is gone"
    written = data.get("written_at")
    if not isinstance(written, (int, float)) or time.time() - written > max_age:
        return None, f"{path} is older than {max_age:g} s"
    return data, "fresh"
