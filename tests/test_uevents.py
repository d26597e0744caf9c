"""The kernel uevent datagram reader: what a well-formed one gives, and what is refused."""

from __future__ import annotations

import pytest

from tdx_preflight.daemon.uevents import parse_event, parse_uevent

CREATE = (
    b"change@/devices/virtual/misc/kvm\0ACTION=change\0DEVPATH=/devices/virtual/misc/kvm\0"
    b"SUBSYSTEM=misc\0EVENT=create\0PID=4242\0COUNT=1\0CREATED=7\0STATS_PATH=/kvm/4242-11\0"
    b"SEQNUM=1234\0MAJOR=10\0MINOR=232\0DEVNAME=kvm\0"
)


def test_a_kvm_create_datagram_becomes_an_event() -> None:
    ev = parse_event(parse_uevent(CREATE))
    assert ev is not None
    assert (ev.event, ev.tid, ev.count, ev.created, ev.vm_fd) == ("create", 4242, 1, 7, 11)


def test_a_value_may_hold_an_equals_sign() -> None:
    assert parse_uevent(b"add@/x\0ACTION=add\0MODALIAS=a=b\0")["MODALIAS"] == "a=b"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"ACTION=change\0",  # no ACTION@DEVPATH header
        b"change@/x\0ACTION=change",  # last field not terminated (truncated)
        b"change@/x\0ACTION=change\0ACTION=add\0",  # a key twice: never last-one-wins
        b"change@/x\0novalue\0",
        b"change@/x\0=value\0",
    ],
)
def test_a_malformed_datagram_is_refused(data: bytes) -> None:
    # The source turns this into Overflow: the daemon reopens and reconciles from /proc.
    with pytest.raises(ValueError):
        parse_uevent(data)
