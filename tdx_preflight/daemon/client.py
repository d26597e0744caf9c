"""Talking to a running daemon from the CLI: one request on the control socket.

Kept apart from the server so that `check` pays for a socket, not for asyncio.
"""

from typing import Any, NamedTuple

from ..facts import Ledger

#: A reply larger than this is not the daemon's (a status with 1,000 VMs is ~1 MiB).
MAX_REPLY = 64 * 1024 * 1024


class Reply(NamedTuple):
    """A reply and the process that sent it (SO_PEERCRED), as the kernel says."""

    body: dict[str, Any]
    peer_pid: int
    peer_uid: int


def exchange(path: str, obj: dict[str, Any], timeout: float = 5.0) -> Reply | None:
    """One request to a daemon's control socket, within `timeout` seconds in all.

    None when nothing answers, the whole reply (one JSON line) does not arrive
    before the deadline, it exceeds MAX_REPLY, or it is not a JSON object (deep
    nesting included). A server that trickles bytes cannot hold the caller: the
    deadline covers connect, send and every receive together.
    """
    # The C module: the `socket` wrapper builds IntEnums of every constant at import (about
    # 4 ms), and only a request that has a socket to go to pays for loading it.
    import _socket
    import json
    import struct
    import time

    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline")
        return remaining

    try:
        s.settimeout(left())
        s.connect(path)
        creds = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
        peer_pid, peer_uid, _gid = struct.unpack("3i", creds)
        s.settimeout(left())
        s.sendall(json.dumps(obj).encode() + b"\n")
        total = 0
        while True:
            s.settimeout(left())
            data = s.recv(1 << 16)
            if not data:
                break
            chunks.append(data)
            total += len(data)
            if total > MAX_REPLY:
                return None
            # Replies are one line of compact JSON: a newline ends it.
            if data.endswith(b"\n"):
                break
    except OSError:  # TimeoutError included
        return None
    finally:
        s.close()
    try:
        reply = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        return None
    return Reply(reply, peer_pid, peer_uid) if isinstance(reply, dict) else None


def request(path: str, obj: dict[str, Any], timeout: float = 5.0) -> dict[str, Any] | None:
    """One request to a daemon's control socket; None when no daemon answers (exchange)."""
    got = exchange(path, obj, timeout)
    return None if got is None else got.body


class DaemonLedger(NamedTuple):
    """What the CLI took from the daemon, and how to say so."""

    ledger: Ledger | None
    info: dict[str, Any]

    @property
    def note(self) -> str:
        if self.ledger is not None:
            return f"TD ledger: from the daemon (pid {self.info.get('pid')})"
        return f"TD ledger: none ({self.info.get('why')}); checked alone"


def daemon_ledger(socket_path: str, root: str, timeout: float = 2.0) -> DaemonLedger:
    """The daemon's TD ledger when a daemon watching the same root answers.

    The reply must come from the process it names (SO_PEERCRED) and have the
    ledger's shape; anything else is "no ledger", and the caller checks alone.
    """
    import os

    # No socket file: no daemon, as a refused connect would say, without loading the socket
    # module. (A daemon starting meanwhile is one a moment later: the same race as ever.)
    got = exchange(socket_path, {"op": "ledger"}, timeout) if os.path.exists(socket_path) else None
    reply = got.body if got is not None else None
    if got is None or reply is None or reply.get("ok") is not True:
        return DaemonLedger(
            None, {"answered": False, "socket": socket_path, "why": "no daemon answered"}
        )
    why = None
    pid = reply.get("daemon_pid")
    tds = reply.get("tds_not_destroyed")
    if reply.get("root") != root:
        why = f"the daemon watches root {str(reply.get('root'))[:200]}"
    elif not _is_count(pid) or pid != got.peer_pid:
        why = f"the reply names pid {str(pid)[:40]} but came from pid {got.peer_pid}"
    elif got.peer_uid not in trusted_uids():
        why = f"the reply came from uid {got.peer_uid}, neither root nor this user"
    elif not isinstance(tds, list) or not all(isinstance(t, str) for t in tds):
        why = "malformed ledger reply"
    if why is not None:
        return DaemonLedger(None, {"answered": True, "socket": socket_path, "why": why})
    assert isinstance(tds, list)
    info = {"answered": True, "socket": socket_path, "pid": pid, "tds_not_destroyed": tds}
    return DaemonLedger(Ledger(tuple(tds)), info)


def trusted_uids() -> tuple[int, ...]:
    """Whose daemon to believe: root's (the service) or this user's own."""
    import os

    return (0, os.geteuid())


def _is_count(value: object) -> bool:
    """A non-negative int that is not a bool (JSON `true` loads as True == 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
