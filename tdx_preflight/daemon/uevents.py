"""KVM uevents from the kernel (NETLINK_KOBJECT_UEVENT, kernel multicast group 1).

KVM sends one `change` uevent on /devices/virtual/misc/kvm per VM create and
destroy (virt/kvm/kvm_main.c, kvm_uevent_notify_change): EVENT, PID (the
creating task, a thread id), COUNT (live VMs), CREATED (VMs since boot) and
STATS_PATH (`/kvm/TID-FD`). Everything else on the socket is ignored.

The socket is the standard library's: a kernel uevent is one datagram,
`ACTION@DEVPATH` then `KEY=VALUE` fields, each NUL-terminated
(lib/kobject_uevent.c), read with asyncio's sock_recv. pyroute2 was used for
this before; its asynchronous socket exists only from 0.9, and Debian 12 ships
0.7.2, whose synchronous socket would block the event loop: nothing else of
pyroute2 was used.

Lost events: an overflowing receive buffer makes recv fail with ENOBUFS once,
and a datagram that is not a well-formed uevent (a duplicated key, no header)
is treated the same way: raise Overflow; the caller reopens the socket and
reconciles, so nothing malformed is settled quietly.
"""

import asyncio
import contextlib
import errno
import re
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any, NamedTuple

SO_RCVBUFFORCE = 33
NETLINK_KOBJECT_UEVENT = 15
#: UEVENT_BUFFER_SIZE is 2048 in the kernel; a datagram longer than this is truncated and
#: then fails to parse.
_RECV_SIZE = 8192
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


def parse_uevent(data: bytes) -> dict[str, str]:
    """The fields of one kernel uevent datagram; raise ValueError when it is not one."""
    header, sep, body = data.partition(b"\0")
    if not sep or b"@" not in header or not body.endswith(b"\0"):
        raise ValueError(f"not a kernel uevent: {data[:64]!r}")
    fields: dict[str, str] = {}
    for item in body[:-1].split(b"\0"):
        key, eq, value = item.partition(b"=")
        if not eq or not key:
            raise ValueError(f"uevent field without a key: {item[:64]!r}")
        name = key.decode("utf-8", "replace")
        if name in fields:
            raise ValueError(f"uevent names {name} twice")
        fields[name] = value.decode("utf-8", "replace")
    return fields


class UeventSource:
    """The kernel's uevents, as KvmEvents; raises Overflow when events were lost."""

    def __init__(self, rcvbuf: int) -> None:
        self.rcvbuf = rcvbuf
        self.sock: socket.socket | None = None
        #: What the receive buffer ended up as (the kernel doubles what it is asked).
        self.effective_rcvbuf: int | None = None
        self.forced: bool = False

    async def open(self) -> None:
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            NETLINK_KOBJECT_UEVENT,
        )
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
                self.forced = True
            except OSError:
                # Without CAP_NET_ADMIN the kernel caps SO_RCVBUF at net.core.rmem_max.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
                self.forced = False
            sock.bind((0, 1))  # kernel events only, not udev's rebroadcast (group 2)
        except BaseException:
            sock.close()
            raise
        self.effective_rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            # Closing a broken socket must not fail the reopen.
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    async def events(self) -> AsyncIterator[KvmEvent]:
        """Yield KVM events forever; raise Overflow when the kernel dropped some."""
        sock = self.sock
        if sock is None:
            raise RuntimeError("UeventSource.events() before open()")
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, sender = await loop.sock_recvfrom(sock, _RECV_SIZE)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    raise Overflow(str(exc)) from None
                raise
            if sender[0] != 0:
                continue  # not from the kernel (nl_pid 0): a process cannot speak for KVM
            try:
                fields = parse_uevent(data)
            except ValueError as exc:
                raise Overflow(str(exc)) from None
            ev = parse_event(fields)
            if ev is not None:
                yield ev
