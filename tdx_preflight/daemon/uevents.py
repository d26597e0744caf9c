"""KVM uevents from the kernel (NETLINK_KOBJECT_UEVENT, kernel multicast group 1).

KVM sends one `change` uevent on /devices/virtual/misc/kvm per VM create and
destroy (virt/kvm/kvm_main.c, kvm_uevent_notify_change): EVENT, PID (the
creating task, a thread id), COUNT (live VMs), CREATED (VMs since boot) and
STATS_PATH (`/kvm/TID-FD`). Everything else on the socket is ignored.

Lost events: an overflowing receive buffer makes recvfrom fail with ENOBUFS.
pyroute2 0.9's asynchronous socket does not raise it; its protocol stores the
error in `status['error']` and queues a bogus message. The synchronous
UeventSocket raises ENOBUFS and stays broken. Both count as an overflow here:
the caller reopens the socket and reconciles.
"""

from __future__ import annotations

import contextlib
import errno
import re
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any, NamedTuple

SO_RCVBUFFORCE = 33
KVM_DEVPATH = "/devices/virtual/misc/kvm"
_STATS_PATH = re.compile(r"/kvm/(\d{1,10})-(\d{1,10})")


class KvmEvent(NamedTuple):
    event: str  # "create" or "destroy"
    tid: int
    count: int | None
    created: int | None
    vm_fd: int | None
    stats_path: str | None


class Overflow(Exception):
    """Events were lost: reopen the socket and reconcile."""


def _int(value: object) -> int | None:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    return None


def parse_event(msg: Mapping[str, Any]) -> KvmEvent | None:
    """A KVM create/destroy event from one parsed uevent, or None for anything else."""
    if msg.get("ACTION") != "change":
        return None
    if msg.get("DEVPATH") != KVM_DEVPATH and not (
        msg.get("SUBSYSTEM") == "misc" and msg.get("DEVNAME") == "kvm"
    ):
        return None
    event = msg.get("EVENT")
    tid = _int(msg.get("PID"))
    if event not in ("create", "destroy") or tid is None:
        return None
    stats = msg.get("STATS_PATH")
    vm_fd = None
    if isinstance(stats, str):
        m = _STATS_PATH.fullmatch(stats)
        if m and int(m.group(1)) == tid:
            vm_fd = int(m.group(2))
    return KvmEvent(
        event,
        tid,
        _int(msg.get("COUNT")),
        _int(msg.get("CREATED")),
        vm_fd,
        stats if isinstance(stats, str) else None,
    )


class UeventSource:
    """The kernel's uevents, as KvmEvents; raises Overflow when events were lost."""

    def __init__(self, rcvbuf: int) -> None:
        self.rcvbuf = rcvbuf
        self.sock: Any = None
        #: What the receive buffer ended up as (the kernel doubles what it is asked).
        self.effective_rcvbuf: int | None = None
        self.forced: bool = False

    async def open(self) -> None:
        from pyroute2.netlink.uevent import AsyncUeventSocket

        sock = AsyncUeventSocket()
        await sock.bind(groups=1)  # kernel events only, not udev's rebroadcast
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
            self.forced = True
        except OSError:
            # Without CAP_NET_ADMIN the kernel caps SO_RCVBUF at net.core.rmem_max.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            self.forced = False
        self.effective_rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            # Closing a broken socket must not fail the reopen.
            with contextlib.suppress(Exception):
                self.sock.close()
            self.sock = None

    async def events(self) -> AsyncIterator[KvmEvent]:
        """Yield KVM events forever; raise Overflow when the kernel dropped some."""
        sock = self.sock
        while True:
            try:
                async for msg in sock.get():
                    self._check(sock)
                    ev = parse_event(msg)
                    if ev is not None:
                        yield ev
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    raise Overflow(str(exc)) from None
                raise
            self._check(sock)

    @staticmethod
    def _check(sock: Any) -> None:
        error = sock.status.get("error")
        if error is not None:
            raise Overflow(str(error))
