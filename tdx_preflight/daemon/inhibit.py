"""An optional logind `shutdown` block inhibitor, held by the agent while TD guests run.

`ShutdownInhibitor.hold()` calls org.freedesktop.login1.Manager.Inhibit("shutdown",
"tdx-preflight", why, "block") on the system bus and keeps the returned file descriptor
open; logind keeps the lock exactly as long as some process holds that descriptor open, so
`release()` is just closing it (and a crash of the agent releases it too).

What the lock does and does not stop:

- From systemd 257 on, a `block` lock binds root too (mode "block-weak" keeps the old
  behaviour). Before 257, root and non-interactive callers skip `block` inhibitors unless
  they run `systemctl --check-inhibitors=yes`, so `systemctl kexec` from a script as root
  goes through.
- `kexec -e`, `systemctl --force kexec` and signals to PID 1 bypass logind entirely.

So the inhibitor helps (it makes `systemctl kexec` and desktop/reboot tooling refuse or
warn while TDs run) but it is never the only gate: the kexec hook still decides from fresh
state.

All calls are blocking with a bounded wait (default 5 s) and never raise for D-Bus or OS
errors: `hold()` returns a one-line error instead. The agent calls them through
`asyncio.to_thread`. jeepney is imported lazily because the CLI shares this package and
its start-up time matters.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jeepney.io.blocking import DBusConnection

LOGIND_NAME = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_MANAGER = "org.freedesktop.login1.Manager"
WHO = "tdx-preflight"
DEFAULT_TIMEOUT = 5.0

# Error names worth a plainer explanation than the raw D-Bus one.
_DBUS_ERROR_HINTS = {
    "org.freedesktop.DBus.Error.ServiceUnknown": "logind is not running on this bus",
    "org.freedesktop.DBus.Error.NameHasNoOwner": "logind is not running on this bus",
    # From the bus policy or from logind's polkit check: the text after it says which.
    "org.freedesktop.DBus.Error.AccessDenied": "access denied",
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired": "access denied (polkit)",
    "org.freedesktop.DBus.Error.NoReply": "logind did not answer in time",
    "org.freedesktop.DBus.Error.Timeout": "logind did not answer in time",
}


class ShutdownInhibitor:
    """Holds a logind `shutdown` block inhibitor (org.freedesktop.login1.Manager.Inhibit)."""

    def __init__(self, bus_address: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """`bus_address` None means the system bus (honouring DBUS_SYSTEM_BUS_ADDRESS), else a
        D-Bus address such as "unix:path=/run/x/bus". `timeout` bounds each blocking step."""
        self._bus_address = bus_address
        self._timeout = timeout
        self._conn: DBusConnection | None = None
        self._fd: int | None = None
        # The agent calls in from worker threads (asyncio.to_thread); a shutdown-time
        # release() may race a hold() still in flight, and a blocking jeepney connection
        # must not be used by two threads at once.
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def hold(self, why: str) -> str | None:
        """Take the lock unless held. None on success (or already held), else a one-line error.

        An existing lock is kept as is, `why` included: logind cannot change the text of a
        lock, and dropping it to take a new one would open a window without one.
        """
        with self._lock:
            if self._fd is not None:
                return None
            reused = self._conn is not None
            try:
                try:
                    self._fd = self._inhibit(why)
                except ConnectionError:
                    if not reused:
                        raise
                    # A long-idle connection can be dead (bus restarted); one fresh try is
                    # cheap and the first call could not have reached logind.
                    self._drop_connection()
                    self._fd = self._inhibit(why)
            except Exception as exc:  # never let the optional lock take the agent down
                # After a failure the connection state is unknown: a late reply could still
                # carry a lock fd. Closing the connection makes the bus discard it, and
                # logind then sees the other end closed and drops that lock.
                self._drop_connection()
                return self._describe(exc)
            return None

    def release(self) -> None:
        """Close the lock fd; logind drops the lock when the last copy closes. Idempotent."""
        with self._lock:
            self._release_locked()

    def close(self) -> None:
        """Release the lock and close the bus connection. Idempotent; hold() reconnects."""
        with self._lock:
            self._release_locked()
            self._drop_connection()

    # -- internals ---------------------------------------------------------------------

    def _release_locked(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            # EBADF would mean it is already gone: the lock is dropped either way.
            with contextlib.suppress(OSError):
                os.close(fd)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()

    def _connection(self) -> DBusConnection:
        if self._conn is None:
            self._conn = _connect(self._bus_address, self._timeout)
        return self._conn

    def _inhibit(self, why: str) -> int:
        from jeepney import DBusAddress, FileDescriptor, new_method_call
        from jeepney.wrappers import unwrap_msg

        manager = DBusAddress(LOGIND_PATH, bus_name=LOGIND_NAME, interface=LOGIND_MANAGER)
        call = new_method_call(
            manager, "Inhibit", "ssss", ("shutdown", WHO, _clean_text(why), "block")
        )
        reply = self._connection().send_and_get_reply(call, timeout=self._timeout)
        body = unwrap_msg(reply)  # raises DBusErrorResponse for an error reply
        received = [x for x in body if isinstance(x, FileDescriptor)]
        if len(body) != 1 or len(received) != 1:
            for extra in received:
                extra.close()
            raise _BadReply(f"Inhibit replied {reply.header.fields!r} with body {body!r}")
        fd = received[0].to_raw_fd()
        # Descriptors received over SCM_RIGHTS are inheritable. A child spawned without
        # close_fds (or an exec'd helper) would keep the lock alive after release().
        os.set_inheritable(fd, False)
        return fd

    def _describe(self, exc: BaseException) -> str:
        where = self._bus_address or "the system bus"
        from jeepney.wrappers import DBusErrorResponse

        if isinstance(exc, DBusErrorResponse):
            detail = " ".join(str(x) for x in exc.data) if exc.data else ""
            hint = _DBUS_ERROR_HINTS.get(exc.name or "")
            text = f"{hint} ({exc.name}: {detail})" if hint else f"{exc.name}: {detail}"
            return _one_line(f"logind inhibitor on {where}: {text}")
        if isinstance(exc, TimeoutError):
            return f"logind inhibitor on {where}: no answer within {self._timeout:g} s"
        if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
            return _one_line(f"logind inhibitor: no D-Bus bus listening at {where} ({exc})")
        if isinstance(exc, PermissionError):
            return _one_line(f"logind inhibitor: access denied to {where} ({exc})")
        return _one_line(f"logind inhibitor on {where}: {type(exc).__name__}: {exc}")


class _BadReply(RuntimeError):
    pass


def _connect(bus_address: str | None, timeout: float) -> DBusConnection:
    from jeepney.bus import get_bus
    from jeepney.io.blocking import prep_socket

    # prep_socket bounds connect + authentication; the Hello that follows is covered by
    # the bounded connection class (jeepney's own open_dbus_connection waits forever).
    sock = prep_socket(get_bus(bus_address or "SYSTEM"), enable_fds=True, timeout=timeout)
    try:
        return _bounded_connection_class()(sock, timeout)
    except BaseException:
        sock.close()
        raise


@functools.cache
def _bounded_connection_class() -> Any:
    from jeepney.io.blocking import DBusConnection

    class BoundedConnection(DBusConnection):
        """A blocking jeepney connection whose receives never wait without limit.

        DBusConnection.__init__ sends Hello with no timeout, so a wedged bus would hang
        the calling thread for good; bounding receive() covers that and any other call.
        """

        def __init__(self, sock: Any, limit: float) -> None:
            self._limit = limit  # set before super().__init__, which already receives
            super().__init__(sock, enable_fds=True)

        def receive(self, *, timeout: float | None = None) -> Any:
            return super().receive(timeout=self._limit if timeout is None else timeout)

    return BoundedConnection


def _clean_text(text: str) -> str:
    # Guest names come from process command lines: a NUL or a lone surrogate (from
    # surrogateescape decoding) would make the message unsendable and lose the lock.
    return text.replace("\0", " ").encode("utf-8", "replace").decode("utf-8")


def _one_line(text: str) -> str:
    return " ".join(text.split())
