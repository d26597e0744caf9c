"""The control socket: newline-delimited JSON requests and replies over AF_UNIX.

Requests are objects with an `op` ("status", "check", "guests", "ledger") and,
for check, a `phase`. Each request is logged with the peer's uid and pid from
SO_PEERCRED. A request over 64 KiB, invalid JSON or an unknown op gets a JSON
error reply and the connection is closed; a client that sends nothing within
the timeout is dropped.
"""

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

MAX_REQUEST = 64 * 1024
OPS = ("status", "check", "guests", "ledger")

log = logging.getLogger("tdx_preflight.control")


class Peer(NamedTuple):
    pid: int
    uid: int
    gid: int


class RequestError(Exception):
    """A request the daemon refuses; the message goes back to the client."""


Handler = Callable[[dict[str, Any], Peer], Awaitable[dict[str, Any]]]


def peer_of(writer: asyncio.StreamWriter) -> Peer:
    sock = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return Peer(*struct.unpack("3i", raw))
    except (OSError, AttributeError):
        return Peer(-1, -1, -1)


def parse_request(line: bytes) -> dict[str, Any]:
    try:
        req = json.loads(line)
    except (ValueError, RecursionError):
        raise RequestError("invalid JSON (or nested too deeply)") from None
    if not isinstance(req, dict):
        raise RequestError("a request is a JSON object")
    op = req.get("op")
    if op not in OPS:
        raise RequestError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    return req


class ControlServer:
    def __init__(self, path: str, group: str | None, timeout: float, handler: Handler) -> None:
        self.path = path
        self.group = group
        self.timeout = timeout
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None
        self.requests = 0
        #: (st_dev, st_ino) of the socket this server created: the only one it removes.
        self.created: tuple[int, int] | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # left by a daemon that died
        # Create the socket with no access for others, then open it to the group.
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(
                self._client, self.path, limit=MAX_REQUEST + 1
            )
        finally:
            os.umask(old)
        if self.group:
            import grp

            os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
        os.chmod(self.path, 0o660)
        st = os.lstat(self.path)
        self.created = (st.st_dev, st.st_ino)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.created:
                os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), self.timeout)
                except TimeoutError:
                    log.info("control: dropped idle client uid=%d pid=%d", peer.uid, peer.pid)
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    log.warning("control: oversized request from uid=%d pid=%d", peer.uid, peer.pid)
                    await self._refuse(reader, writer, "request over 64 KiB")
                    return
                if not line:
                    return
                if not line.endswith(b"\n"):
                    return  # the client closed in the middle of a request
                try:
                    req = parse_request(line)
                except RequestError as exc:
                    log.warning(
                        "control: bad request from uid=%d pid=%d: %s", peer.uid, peer.pid, exc
                    )
                    await self._refuse(reader, writer, str(exc))
                    return
                self.requests += 1
                log.info("control: op=%s from uid=%d pid=%d", req["op"], peer.uid, peer.pid)
                try:
                    reply = await self.handler(req, peer)
                except RequestError as exc:
                    await self._refuse(reader, writer, str(exc))
                    return
                except Exception:
                    log.exception("control: op=%s failed", req["op"])
                    await self._refuse(reader, writer, "internal error (see the daemon's log)")
                    return
                await self._reply(writer, {"ok": True, "op": req["op"], **reply})
        except (ConnectionError, OSError):
            # Close at once: a plain close would wait to flush replies nobody reads.
            writer.transport.abort()
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _refuse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: str
    ) -> None:
        """Send an error reply, then close so that the client can still read it.

        Closing an AF_UNIX socket with unread input resets the peer and loses the
        reply, so what the client still sends is read and dropped first (bounded
        in time; memory stays bounded as nothing is kept).
        """
        await self._reply(writer, {"ok": False, "error": error})
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(self.timeout, 2.0)
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            while loop.time() < deadline:
                chunk = await asyncio.wait_for(reader.read(1 << 16), deadline - loop.time())
                if not chunk:
                    break

    async def _reply(self, writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        """Send one reply line; a client that does not read it within the timeout is
        dropped (ConnectionError), so it cannot hold the daemon's memory or a task."""
        writer.write(json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n")
        try:
            await asyncio.wait_for(writer.drain(), self.timeout)
        except TimeoutError:
            log.warning("control: dropped a client that does not read its replies")
            raise ConnectionError("client does not read its replies") from None
