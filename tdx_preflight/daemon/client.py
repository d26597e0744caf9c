"""Talking to a running daemon from the CLI: one request on the control socket.

Kept apart from the server so that `check` pays for a socket, not for asyncio.
"""

from __future__ import annotations

# The C module: the `socket` wrapper builds IntEnums of every constant at import,
# about 4 ms that every `check` would pay for one connect.
import _socket
import json
from typing import Any, NamedTuple

from ..facts import Ledger


def request(path: str, obj: dict[str, Any], timeout: float = 5.0) -> dict[str, Any] | None:
    """One request to a daemon's control socket; None when no daemon answers."""
    chunks: list[bytes] = []
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(obj).encode() + b"\n")
        total = 0
        while True:
            data = s.recv(1 << 16)
            if not data:
                break
            chunks.append(data)
            total += len(data)
            # Replies are one line of compact JSON: a newline ends it.
            if data.endswith(b"\n") or total > 256 * 1024 * 1024:
                break
    except OSError:
        return None
    finally:
        s.close()
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


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
    """The daemon's TD ledger when a daemon watching the same root answers."""
    reply = request(socket_path, {"op": "ledger"}, timeout)
    if reply is None or not reply.get("ok"):
        return DaemonLedger(
            None, {"answered": False, "socket": socket_path, "why": "no daemon answered"}
        )
    if reply.get("root") != root:
        return DaemonLedger(
            None,
            {
                "answered": True,
                "socket": socket_path,
                "why": f"the daemon watches root {reply.get('root')}",
            },
        )
    tds = reply.get("tds_not_destroyed")
    if not isinstance(tds, list) or not all(isinstance(t, str) for t in tds):
        return DaemonLedger(
            None, {"answered": True, "socket": socket_path, "why": "malformed ledger reply"}
        )
    info = {
        "answered": True,
        "socket": socket_path,
        "pid": reply.get("daemon_pid"),
        "tds_not_destroyed": tds,
    }
    return DaemonLedger(Ledger(tuple(tds)), info)
