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


#: A state file larger than this is not the daemon's (it keeps 200 history entries).
MAX_STATE = 16 * 1024 * 1024
#: Clock skew tolerated between the daemon's `generated_at` and the reader's clock.
SKEW = 5.0


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_daemon(pid: int) -> bool:
    """Whether `pid` runs a `tdx-preflight daemon` (its /proc/PID/cmdline says so)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read(64 * 1024).split(b"\0")
    except OSError:
        return False
    tool = any(a.endswith((b"tdx-preflight", b"tdx_preflight")) for a in args)
    return tool and b"daemon" in args


def _timestamp(text: object) -> float | None:
    """Seconds since the epoch of an RFC 3339 time ending in Z, or None."""
    from datetime import datetime

    if not isinstance(text, str) or not text.endswith("Z") or len(text) > 40:
        return None
    try:
        return datetime.fromisoformat(text[:-1] + "+00:00").timestamp()
    except ValueError:
        return None


def _entries_ok(entries: object) -> bool:
    if not isinstance(entries, list):
        return False
    for e in entries:
        if not isinstance(e, dict) or e.get("kind") not in ("td", "vm", "unknown"):
            return False
        if not all(isinstance(e.get(k), (str, type(None))) for k in _ENTRY_TEXT):
            return False
        if not all(e.get(k) is None or _is_count(e.get(k)) for k in ("pid", "tid", "vm_fd")):
            return False
    return True


_ENTRY_TEXT = ("name", "created_at", "created_by", "destroyed_at", "destroyed_by", "teardown")
_VERDICT_CODES = {"allow": (0,), "block": (1, 3), None: (3,)}


def holds_lock(pid: int, path: str) -> bool:
    """Whether process `pid` holds an flock on `path` (from /proc/locks, whose entries
    name the holder's pid and the locked file's MAJ:MIN:INODE; fs/locks.c lock_get_status)."""
    try:
        st = os.stat(path)
        with open("/proc/locks", "rb") as f:
            table = f.read(4 << 20).decode("ascii", "replace")
    except OSError:
        return False
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        words = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF" ("->" marks a waiter)
        if len(words) >= 6 and words[1] == "FLOCK" and words[4] == str(pid) and words[5] == want:
            return True
    return False


def judge_status(
    data: object,
    *,
    root: str,
    max_age: float,
    peer_pid: int | None = None,
    peer_uid: int | None = None,
    boot_id: str | None = None,
    state_file: str | None = None,
) -> str | None:
    """Why a status (a control-socket reply or state.json) cannot be believed; None if it can.

    DESIGN.md "The agent": a status about another root or boot, from a pid that
    is not a running daemon (for a reply: not the process that sent it, or a
    process of another user than root or the caller; for a state file: not the
    daemon that holds the file's lock), with a
    `generated_at` in the future, older than `max_age` or not a time, or with any
    value of the wrong type is stale, never a verdict.
    """
    import math

    if not isinstance(data, dict):
        return "not a JSON object"
    pid = data.get("daemon_pid")
    if not _is_count(pid) or pid == 0:
        return f"no daemon pid in it ({str(pid)[:40]})"
    if peer_pid is not None and pid != peer_pid:
        return f"it names daemon pid {pid} but came from pid {peer_pid}"
    if not _is_daemon(pid):
        return f"pid {pid} is not a running tdx-preflight daemon"
    if peer_uid is not None and peer_uid not in (0, os.geteuid()):
        return f"it came from uid {peer_uid}, neither root nor this user"
    if state_file is not None and not holds_lock(pid, f"{state_file}.lock"):
        # Only the daemon that owns this state file holds its lock: a copy is not its.
        return f"daemon pid {pid} does not hold {state_file}.lock"
    if data.get("root") != root:
        return f"it is about root {str(data.get('root'))[:200]}, not {root}"
    if boot_id is not None and data.get("boot_id") != boot_id:
        return "it is from another boot"
    generated = _timestamp(data.get("generated_at"))
    now = time.time()
    if generated is None or not math.isfinite(generated):
        return f"generated_at is not a time ({str(data.get('generated_at'))[:40]})"
    if generated > now + SKEW:
        return f"generated_at {data.get('generated_at')} is in the future"
    if now - generated > max_age:
        return f"generated_at {data.get('generated_at')} is older than {max_age:g} s"
    verdict, code = data.get("verdict"), data.get("exit_code")
    if verdict not in _VERDICT_CODES or not _is_count(code) or code not in _VERDICT_CODES[verdict]:
        return f"verdict {str(verdict)[:20]!r} with exit code {str(code)[:20]!r}"
    for key in ("summary", "status_line"):
        if not isinstance(data.get(key), str):
            return f"{key} is not text"
    for key in ("events", "resyncs", "reconciles"):
        if not _is_count(data.get(key)):
            return f"{key} is not a count"
    uptime = data.get("uptime_s")
    if isinstance(uptime, bool) or not isinstance(uptime, (int, float)) or not uptime >= 0:
        return "uptime_s is not a duration"
    live = data.get("live")
    if not isinstance(live, dict) or not all(_entries_ok(live.get(k)) for k in _LIVE_KINDS):
        return "live VMs malformed"
    if not _entries_ok(data.get("recent_tds")):
        return "recent TDs malformed"
    if not isinstance(data.get("last_reconcile"), dict):
        return "last_reconcile malformed"
    return None


_LIVE_KINDS = ("tds", "vms", "unknown")


def read_state(
    path: str, max_age: float, current_boot_id: str | None, root: str = "/"
) -> tuple[dict | None, str]:
    """The state file's content and "fresh", or None and why it cannot be used.

    The file is opened without blocking and without following a symlink, must
    be a regular file no larger than MAX_STATE, and must pass judge_status.
    """
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except OSError as exc:
        return None, f"{path}: {exc.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, f"{path} is not a regular file"
        if st.st_size > MAX_STATE:
            return None, f"{path} is larger than {MAX_STATE} bytes"
        raw = os.read(fd, MAX_STATE + 1)
    except OSError as exc:
        return None, f"{path}: {exc.strerror}"
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None, f"{path} is not JSON"
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return None, f"{path}: unknown schema"
    if data.get("pid") != data.get("daemon_pid"):
        return None, f"{path}: pid and daemon_pid disagree"
    why = judge_status(
        data, root=root, max_age=max_age, boot_id=current_boot_id or None, state_file=path
    )
    if why is not None:
        return None, f"{path}: {why}"
    return data, "fresh"
