"""sd_notify for the agent without libsystemd: READY, STATUS, WATCHDOG and STOPPING datagrams.

The protocol is small (sd_notify(3)): one AF_UNIX SOCK_DGRAM datagram of newline-separated
`KEY=value` assignments sent to $NOTIFY_SOCKET, a filesystem path or, with a leading `@`, an
abstract socket name. The service manager learns the sender from the kernel's credentials, so
nothing else is needed. Outside systemd (no $NOTIFY_SOCKET) every call is a no-op returning
False, so the daemon runs the same in a terminal, in tests and under the unit.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)

# systemd reads a notification into a PIPE_BUF (4096 byte) buffer and drops a longer datagram
# whole, READY=1 included, which would leave the unit "activating" until its start timeout.
MAX_DATAGRAM = 4096
# A status line is what `systemctl status` shows; anything longer is cut well inside the limit.
MAX_STATUS = 1024


def _address(raw: str) -> bytes | None:
    """The socket address $NOTIFY_SOCKET names, or None when it names none we can use."""
    if raw.startswith("/"):
        return os.fsencode(raw)
    if raw.startswith("@") and len(raw) > 1:
        return b"\0" + os.fsencode(raw[1:])
    # Empty, relative, or a transport systemd 252 does not offer (vsock: came in 253).
    return None


def _one_line(text: str) -> str:
    # A newline would start a new assignment, a NUL would end the message early.
    return " ".join(text.replace("\0", " ").splitlines())


class Notifier:
    """sd_notify over $NOTIFY_SOCKET (path or abstract '@name'); a no-op when unset."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = self._parse_usec(env.get("WATCHDOG_USEC", ""))
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._sock: socket.socket | None = None
        # The watchdog ping may come from another thread than READY/STATUS.
        self._lock = threading.Lock()

    @staticmethod
    def _parse_usec(raw: str) -> int | None:
        raw = raw.strip()
        if not raw.isascii() or not raw.isdigit() or len(raw) > 20:
            return None
        usec = int(raw)
        return usec if usec > 0 else None

    @property
    def enabled(self) -> bool:
        """True when $NOTIFY_SOCKET names a socket to send to."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, None when no watchdog."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        # WATCHDOG_PID names the process the watchdog is meant for; a forked child (or a
        # process that inherited the environment) must not ping on the daemon's behalf.
        # Compared at call time, like sd_watchdog_enabled(), so it stays right after fork().
        if self._watchdog_pid and self._watchdog_pid.strip() != str(os.getpid()):
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, **fields: str) -> bool:
        """Send `KEY=value` lines in one datagram; False when not sent. Never raises."""
        if self._address is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            if not key or "=" in key or "\n" in key or "\0" in key:
                log.debug("sd_notify: refusing field name %r", key)
                return False
            lines.append(f"{key}={_one_line(str(value))}")
        data = "\n".join(lines).encode("utf-8", "replace")
        if len(data) > MAX_DATAGRAM:
            log.debug("sd_notify: %d bytes is more than systemd accepts, not sent", len(data))
            return False
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                # Unconnected: systemd may recreate its socket (daemon-reexec) between calls.
                # MSG_DONTWAIT: a manager that stopped reading must not stall the event loop;
                # a full queue is a lost ping, which is what the watchdog is there to notice.
                self._sock.sendto(data, socket.MSG_DONTWAIT, self._address)
            except OSError as exc:
                log.debug("sd_notify: %s", exc)
                self._close_locked()
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1, with STATUS= when given."""
        if status is None:
            return self.notify(READY="1")
        return self.notify(READY="1", STATUS=self._status_text(status))

    def status(self, text: str) -> bool:
        """STATUS=<text on one line>, what `systemctl status` shows."""
        return self.notify(STATUS=self._status_text(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the daemon is alive."""
        return self.notify(WATCHDOG="1")

    def stopping(self) -> bool:
        """STOPPING=1: shutting down on purpose."""
        return self.notify(STOPPING="1")

    def close(self) -> None:
        """Release the socket; a later call opens a new one."""
        with self._lock:
            self._close_locked()

    @staticmethod
    def _status_text(text: str) -> str:
        line = _one_line(text)
        return line if len(line) <= MAX_STATUS else line[: MAX_STATUS - 3] + "..."

    def _close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
