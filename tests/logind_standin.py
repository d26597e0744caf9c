"""A stand-in for logind's Inhibit(), for the inhibitor tests.

Run as `python logind_standin.py BUS_ADDRESS RECORD_FILE`: it connects to the bus,
takes the name org.freedesktop.login1, prints one line "ready" on stdout and serves
/org/freedesktop/login1, interface org.freedesktop.login1.Manager, method Inhibit
(signature "ssss", returns "h") like logind does: each call appends a JSON line
{"what", "who", "why", "mode"} to RECORD_FILE and returns the write end of a fresh pipe.
When the read end sees end of file (every copy of the write end closed: the client
released the lock), it appends {"released": true}. Any other method call gets
org.freedesktop.DBus.Error.UnknownMethod. It exits when the bus goes away.
"""

from __future__ import annotations

import json
import os
import selectors
import sys
from pathlib import Path
from typing import Any

from jeepney import HeaderFields, MessageType, new_error, new_method_return
from jeepney.bus_messages import DBusNameFlags, message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from jeepney.low_level import Message
from jeepney.wrappers import unwrap_msg

NAME = "org.freedesktop.login1"
PATH = "/org/freedesktop/login1"
INTERFACE = "org.freedesktop.login1.Manager"


def append(record: Path, entry: dict[str, Any]) -> None:
    # One write per line, flushed before the D-Bus reply goes out, so a client that got its
    # reply can already read the line.
    with record.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def answer(conn: DBusConnection, msg: Message, sel: selectors.BaseSelector, record: Path) -> None:
    fields = msg.header.fields
    member = fields.get(HeaderFields.member)
    if (
        fields.get(HeaderFields.path) == PATH
        and fields.get(HeaderFields.interface, INTERFACE) == INTERFACE
        and member == "Inhibit"
    ):
        if fields.get(HeaderFields.signature) != "ssss":
            conn.send(new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", "s", ("want ssss",)))
            return
        what, who, why, mode = msg.body
        append(record, {"what": what, "who": who, "why": why, "mode": mode})
        r, w = os.pipe()
        try:
            conn.send(new_method_return(msg, "h", (w,)))
        finally:
            # Our copy of the write end must go, or the read end never sees EOF.
            os.close(w)
        sel.register(r, selectors.EVENT_READ)
        return
    where = fields.get(HeaderFields.path)
    text = f"no method {fields.get(HeaderFields.interface)}.{member} at {where}"
    conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (text,)))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: logind_standin.py BUS_ADDRESS RECORD_FILE", file=sys.stderr)
        return 2
    address, record = argv[0], Path(argv[1])
    conn = open_dbus_connection(address, enable_fds=True, auth_timeout=5)
    reply = conn.send_and_get_reply(
        message_bus.RequestName(NAME, DBusNameFlags.do_not_queue), timeout=5
    )
    if unwrap_msg(reply)[0] != 1:  # 1: DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
        print(f"could not own {NAME}: {reply.body}", file=sys.stderr)
        return 1
    print("ready", flush=True)

    sel = selectors.DefaultSelector()
    sel.register(conn.sock, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is conn.sock:
                # One read may bring several messages; drain what is parsed, then go back
                # to select (receive(timeout=0) raises TimeoutError when nothing is left).
                while True:
                    try:
                        msg = conn.receive(timeout=0)
                    except TimeoutError:
                        break
                    except (ConnectionError, OSError):
                        return 0  # the bus went away: the test is over
                    if msg.header.message_type is MessageType.method_call:
                        answer(conn, msg, sel, record)
            else:
                fd = key.fd
                if not os.read(fd, 4096):
                    sel.unregister(fd)
                    os.close(fd)
                    append(record, {"released": True})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
